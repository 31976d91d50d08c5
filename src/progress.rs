//! Where the read side has got to: every checkpoint, kept current from the
//! projections' announcements, with a slow poll behind them. On Postgres the
//! announcements are `NOTIFY ai_secretary_checkpoints` on commit, each naming the
//! checkpoint and where it moved, heard on the process's one listening
//! connection (`crate::listen`); on SQLite, `SqliteDb::checkpoint_moves()`, a
//! signal that carries no position, so every one re-reads the checkpoints. A
//! query carrying `X-Consistency-Token` waits here, woken by those
//! announcements rather than polling, until the projections that serve it have
//! passed the command's position.

use std::{collections::HashMap, sync::Arc, time::Duration};

use ai_secretary_projections::{Db, SqliteDb, checkpoint};
use sqlx::PgPool;
use tokio::sync::{
    broadcast::{self, error::RecvError},
    watch,
};
use tokio_util::sync::CancellationToken;

use crate::{listen::CheckpointNews, store::Position};

/// Re-read every checkpoint this often, in case a notification was missed (on
/// SQLite: a move made by another process on the same file, such as an
/// operator's `replay`, which this process's signal does not hear).
const RESYNC: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Progress {
    positions: watch::Receiver<HashMap<String, Position>>,
}

impl Progress {
    /// Follow the checkpoints until `shutdown`. On Postgres, `news` is the
    /// checkpoints channel as this process hears it
    /// (`Listening::checkpoint_news`); without it, the checkpoints are only
    /// polled. On SQLite it is not used.
    pub fn start(
        db: Db,
        mut news: Option<broadcast::Receiver<CheckpointNews>>,
        shutdown: CancellationToken,
    ) -> (Progress, tokio::task::JoinHandle<()>) {
        let (sender, positions) = watch::channel(HashMap::new());
        let task = tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                let followed = match &db {
                    Db::Postgres(pool) => follow(pool, &mut news, &sender, &shutdown).await,
                    Db::Sqlite(lite) => follow_sqlite(lite, &sender, &shutdown).await,
                };
                if let Err(e) = followed {
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

    /// Where checkpoint `name` is right now (the start, if not known yet).
    pub fn position(&self, name: &str) -> Position {
        self.positions
            .borrow()
            .get(name)
            .copied()
            .unwrap_or_default()
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
    news: &mut Option<broadcast::Receiver<CheckpointNews>>,
    sender: &watch::Sender<HashMap<String, Position>>,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    loop {
        // Subscribed first (before this task started), then reading: nothing
        // announced in between is lost.
        let all = checkpoint::postgres::all(pool).await?;
        merge(sender, all.into_iter().map(|c| (c.name, c.position)));
        let deadline = tokio::time::sleep(RESYNC);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                heard = next_move(news) => match heard {
                    Some((name, position)) => merge(sender, [(name.to_string(), position)]),
                    // Unheard moves: read them all.
                    None => break,
                },
                () = &mut deadline => break,
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// The next checkpoint move heard; `None` when some may have gone unheard
/// (the connection listens anew, or this subscriber fell behind), so that
/// everything is read again. Once nothing can be heard any more (no news, or
/// the listening task has ended) it never resolves, and the poll goes on.
async fn next_move(
    news: &mut Option<broadcast::Receiver<CheckpointNews>>,
) -> Option<(Arc<str>, Position)> {
    if let Some(receiver) = news {
        match receiver.recv().await {
            Ok(CheckpointNews::Moved(name, position)) => return Some((name, position)),
            Ok(CheckpointNews::Listening) | Err(RecvError::Lagged(_)) => return None,
            Err(RecvError::Closed) => *news = None,
        }
    }
    std::future::pending().await
}

async fn follow_sqlite(
    db: &SqliteDb,
    sender: &watch::Sender<HashMap<String, Position>>,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut moves = db.checkpoint_moves();
    loop {
        // The signal marked seen first, then the read: a move committed after
        // the read is signalled after it, and wakes the next round.
        moves.borrow_and_update();
        let all = checkpoint::sqlite::all(&db.pool).await?;
        merge(sender, all.into_iter().map(|c| (c.name, c.position)));
        tokio::select! {
            moved = moves.changed() => {
                // The signal's sender lives in `db`, which this task holds: it
                // cannot close. Were it to, the poll below would still follow.
                if moved.is_err() {
                    tokio::select! {
                        () = tokio::time::sleep(RESYNC) => {}
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
            () = tokio::time::sleep(RESYNC) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Take in checkpoints as read: a checkpoint only moves forward here, so a read
/// that raced a newer announcement never takes it back.
fn merge(
    sender: &watch::Sender<HashMap<String, Position>>,
    read: impl IntoIterator<Item = (String, Position)>,
) {
    sender.send_modify(|map| {
        for (name, position) in read {
            let entry = map.entry(name).or_default();
            *entry = (*entry).max(position);
        }
    });
}
