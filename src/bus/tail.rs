//! Where there is no bus: the commit signal that wakes the projection workers
//! which tail the event store themselves (`worker::Feed::StoreTail`).
//!
//! It carries no events, only "something was committed": a worker always reads
//! the store from its checkpoint, so a lost or doubled signal costs a little
//! latency (the worker's poll), never an event.
//!
//! Two sources: `LISTEN` on the Postgres store's commit channel (the process's
//! one listening connection, `crate::listen`), and the SQLite store's own
//! in-process signal ([`sqlite_commits`]).

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::Position;

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
