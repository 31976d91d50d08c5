//! Where there is no bus: the commit signal that wakes the projection workers
//! which tail the event store themselves (`worker::Feed::StoreTail`).
//!
//! It carries no events, only "something was committed": a worker always reads
//! the store from its checkpoint, so a lost or doubled signal costs a little
//! latency (the worker's poll), never an event.
//!
//! Two sources: `LISTEN` on the Postgres store's commit channel ([`commits`]),
//! and the SQLite store's own in-process signal ([`sqlite_commits`]).

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{Position, postgres::COMMITS_CHANNEL};

/// Pause before listening again after the listener failed (a restart, a cut).
const RELISTEN_AFTER: Duration = Duration::from_millis(500);

/// A signal that changes whenever an append commits, from a `LISTEN` on the
/// store's commit channel kept up until `stop` (reconnecting after failures).
/// The task ends with `stop`; the receivers then see the sender gone and poll.
pub fn commits(
    pool: PgPool,
    stop: CancellationToken,
) -> (watch::Receiver<()>, tokio::task::JoinHandle<()>) {
    let (sender, receiver) = watch::channel(());
    let task = tokio::spawn(async move {
        while !stop.is_cancelled() {
            if let Err(e) = listen(&pool, &sender, &stop).await {
                tracing::warn!(error = %e, "listening for commits failed; listening again");
                tokio::select! {
                    () = tokio::time::sleep(RELISTEN_AFTER) => {}
                    () = stop.cancelled() => {}
                }
            }
        }
    });
    (receiver, task)
}

async fn listen(
    pool: &PgPool,
    sender: &watch::Sender<()>,
    stop: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(COMMITS_CHANNEL).await?;
    // Whatever committed while nobody listened: readers look once more.
    sender.send_replace(());
    loop {
        tokio::select! {
            notified = listener.recv() => {
                notified?;
                sender.send_replace(());
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// The same signal from the SQLite store's `committed()` watch
/// (`SqliteEventStore::committed`): it changes after every commit of that
/// store in this process. A task forwards each change until `stop` or until
/// the store is gone; the receivers then see the sender gone and poll (which
/// is also how they see appends by another process on the same file).
pub fn sqlite_commits(
    mut committed: watch::Receiver<Position>,
    stop: CancellationToken,
) -> (watch::Receiver<()>, tokio::task::JoinHandle<()>) {
    let (sender, receiver) = watch::channel(());
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = committed.changed() => {
                    if changed.is_err() {
                        return; // the store is gone
                    }
                    sender.send_replace(());
                }
                () = stop.cancelled() => return,
            }
        }
    });
    (receiver, task)
}
