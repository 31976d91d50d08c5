//! Where the read side is: each consumer's checkpoint against the head of the
//! event store, read straight from the test's database.

use std::collections::BTreeMap;

use ai_secretary::startup::projection_names;

use crate::helpers::{AsDb, eventually};

/// A consumer of the log: how far it has got and how many events it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: (i64, i64),
    pub events: i64,
}

/// Every checkpoint, on Postgres or SQLite.
pub async fn checkpoints(db: &impl AsDb) -> BTreeMap<String, Checkpoint> {
    let rows: Vec<(String, i64, i64, i64)> = crate::on_db!(db.db(), |pool| sqlx::query_as(
        "SELECT name, transaction_id, global_position, events FROM checkpoints ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .unwrap());
    rows.into_iter()
        .map(|(name, tx, gp, events)| {
            (
                name,
                Checkpoint {
                    position: (tx, gp),
                    events,
                },
            )
        })
        .collect()
}

/// The position of the last event in commit order ((0, 0) for none).
/// (Postgres' `xid8` has no cast to a number but through text.)
pub async fn head(db: &impl AsDb) -> (i64, i64) {
    crate::on_db!(db.db(), |pool| sqlx::query_as(
        "SELECT CAST(CAST(transaction_id AS TEXT) AS BIGINT), global_position FROM events
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .unwrap())
    .unwrap_or((0, 0))
}

pub async fn event_count(db: &impl AsDb) -> i64 {
    crate::on_db!(db.db(), |pool| sqlx::query_scalar(
        "SELECT count(*) FROM events"
    )
    .fetch_one(pool)
    .await
    .unwrap())
}

/// Every projection and the relay, by name.
pub fn consumers() -> Vec<String> {
    let mut names = projection_names();
    names.push("relay".into());
    names
}

/// Wait until every one of `names` has reached the store's head.
pub async fn caught_up(pool: &impl AsDb, names: &[String]) -> BTreeMap<String, Checkpoint> {
    eventually("every consumer reaches the head of the store", async || {
        let head = head(pool).await;
        let all = checkpoints(pool).await;
        let behind: Vec<&String> = names
            .iter()
            .filter(|n| all.get(*n).is_none_or(|c| c.position < head))
            .collect();
        if behind.is_empty() {
            Ok(all)
        } else {
            Err(format!(
                "head {head:?}; behind: {behind:?}; checkpoints {all:?}"
            ))
        }
    })
    .await
}

/// Exactly once: each projection applied every event of the store one time, and
/// none went to `dead_letters`.
pub async fn assert_each_event_applied_once(pool: &impl AsDb) {
    let events = event_count(pool).await;
    let all = checkpoints(pool).await;
    for name in projection_names() {
        assert_eq!(
            all[&name].events, events,
            "projection {name} applied {} events; the store has {events}",
            all[&name].events
        );
    }
    let dead: Vec<(String, String)> = crate::on_db!(pool.db(), |pool| sqlx::query_as(
        "SELECT projection, reason FROM dead_letters ORDER BY id"
    )
    .fetch_all(pool)
    .await
    .unwrap());
    assert!(dead.is_empty(), "dead letters: {dead:?}");
}
