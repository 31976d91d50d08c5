//! Where the read side has got to: every checkpoint, kept current from the
//! projections' announcements (`NOTIFY ai_secretary_checkpoints` on commit), with
//! a slow poll behind them. A query carrying `X-Consistency-Token` waits here,
//! woken by those notifications rather than polling, until the projections that
//! serve it have passed the command's position.

use std::{collections::HashMap, time::Duration};

use ai_secretary_projections::checkpoint;
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::Position;

/// Re-read every checkpoint this often, in case a notification was missed.
const RESYNC: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Progress {
    positions: watch::Receiver<HashMap<String, Position>>,
}

impl Progress {
    /// Follow the checkpoints until `shutdown`.
    pub fn start(
        pool: PgPool,
        shutdown: CancellationToken,
    ) -> (Progress, tokio::task::JoinHandle<()>) {
        let (sender, positions) = watch::channel(HashMap::new());
        let task = tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                if let Err(e) = follow(&pool, &sender, &shutdown).await {
                    tracing::warn!(error = %e, "following checkpoints failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(RESYNC) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            }
        });
        (Progress { positions }, task)
    }

    /// Whether every one of `names` is at or past `at` right now.
    pub fn reached(&self, names: &[&str], at: Position) -> bool {
        let map = self.positions.borrow();
        names
            .iter()
            .all(|name| map.get(*name).is_some_and(|p| *p >= at))
    }

    /// Whether checkpoint `a` is at or past checkpoint `b` right now.
    pub fn at_least(&self, a: &str, b: &str) -> bool {
        let map = self.positions.borrow();
        map.get(a).copied().unwrap_or_default() >= map.get(b).copied().unwrap_or_default()
    }

    /// Wait until every one of `names` is at or past `at`; false on timeout.
    pub async fn wait(&self, names: &[&str], at: Position, timeout: Duration) -> bool {
        let mut positions = self.positions.clone();
        let caught_up = |map: &HashMap<String, Position>| {
            names
                .iter()
                .all(|name| map.get(*name).is_some_and(|p| *p >= at))
        };
        matches!(
            tokio::time::timeout(timeout, positions.wait_for(caught_up)).await,
            Ok(Ok(_))
        )
    }
}

async fn follow(
    pool: &PgPool,
    sender: &watch::Sender<HashMap<String, Position>>,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(checkpoint::CHANNEL).await?;
    loop {
        // Listening first, then reading: nothing announced in between is lost.
        let all = checkpoint::postgres::all(pool).await?;
        sender.send_modify(|map| {
            for checkpoint in all {
                let entry = map.entry(checkpoint.name).or_default();
                *entry = (*entry).max(checkpoint.position);
            }
        });
        let deadline = tokio::time::sleep(RESYNC);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                notification = listener.recv() => {
                    let notification = notification?;
                    if let Some((name, position)) = parse(notification.payload()) {
                        sender.send_modify(|map| {
                            let entry = map.entry(name.to_owned()).or_default();
                            *entry = (*entry).max(position);
                        });
                    }
                }
                () = &mut deadline => break,
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// `"<name> <transaction_id>.<global_position>"`.
fn parse(payload: &str) -> Option<(&str, Position)> {
    let (name, position) = payload.split_once(' ')?;
    Some((name, position.parse().ok()?))
}
