//! Where the read side is, read straight from the database beside the service
//! (Postgres or SQLite): the head of the event store, each consumer's
//! checkpoint, and waiting until the named consumers have reached the head.
//! The tests and the benches both wait with [`caught_up`].

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use ai_secretary::startup::projection_names;
use anyhow::{Context, Result, bail};

use super::AsDb;

/// A place in the log in commit order: `(transaction_id, global_position)`.
pub type Position = (i64, i64);

/// A consumer of the log: how far it has got and how many events it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: Position,
    pub events: i64,
}

/// Every checkpoint, by consumer name.
pub async fn checkpoints(db: &impl AsDb) -> Result<BTreeMap<String, Checkpoint>> {
    let rows: Vec<(String, i64, i64, i64)> = crate::on_db!(db.db(), |pool| sqlx::query_as(
        "SELECT name, transaction_id, global_position, events FROM checkpoints ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .context("reading the checkpoints")?);
    Ok(rows
        .into_iter()
        .map(|(name, tx, gp, events)| {
            (
                name,
                Checkpoint {
                    position: (tx, gp),
                    events,
                },
            )
        })
        .collect())
}

/// The position of the last event in commit order ((0, 0) for none).
/// (Postgres' `xid8` has no cast to a number but through text.)
pub async fn head(db: &impl AsDb) -> Result<Position> {
    let head = crate::on_db!(db.db(), |pool| sqlx::query_as(
        "SELECT CAST(CAST(transaction_id AS TEXT) AS BIGINT), global_position FROM events
         ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .context("reading the head of the store")?);
    Ok(head.unwrap_or((0, 0)))
}

/// Every projection and the relay, by name: every consumer of the log on the
/// servers.
pub fn consumers() -> Vec<String> {
    let mut names = projection_names();
    names.push("relay".into());
    names
}

/// How often [`caught_up`] looks.
const POLL: Duration = Duration::from_millis(10);

/// Wait until every one of `names` has reached the head of the store (read
/// anew each time it looks), for at most `limit`; then every checkpoint.
pub async fn caught_up(
    db: &impl AsDb,
    names: &[impl AsRef<str>],
    limit: Duration,
) -> Result<BTreeMap<String, Checkpoint>> {
    let started = Instant::now();
    loop {
        let head = head(db).await?;
        let all = checkpoints(db).await?;
        let behind: Vec<&str> = names
            .iter()
            .map(AsRef::as_ref)
            .filter(|n| all.get(*n).is_none_or(|c| c.position < head))
            .collect();
        if behind.is_empty() {
            return Ok(all);
        }
        if started.elapsed() > limit {
            bail!(
                "the read side did not catch up within {limit:?}: head {head:?}; \
                 behind: {behind:?}; checkpoints {all:?}"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
