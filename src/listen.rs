//! The process's one `LISTEN` connection to Postgres, shared by every part of
//! the process that waits for a notification, and dispatched by channel:
//! - the store's commits channel wakes the relay and, where there is no bus,
//!   everything that tails the store (the signal carries no events);
//! - the checkpoints channel tells `Progress` where each projection has got to.
//!
//! **Why one.** On every commit that notifies (each append, each checkpoint
//! move), Postgres 15 signals every backend of the database that listens on
//! *any* channel, and each of them wakes to read the notification queue. A
//! second listening connection doubled that work for every command; one per
//! process, listening only on the channels its parts need, keeps it to one.
//!
//! A notification can be missed (the connection is cut and made again), so
//! nobody trusts them alone: on every (re)listen the commits signal fires and
//! the checkpoints subscribers are told to read everything again, and every
//! waiter also polls.

use std::{sync::Arc, time::Duration};

use ai_secretary_projections::checkpoint;
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::store::{Position, postgres::COMMITS_CHANNEL};

/// Pause before listening again after the connection failed (a restart, a cut).
const RELISTEN_AFTER: Duration = Duration::from_millis(500);

/// Checkpoint news held for a subscriber that has not read it yet. One that
/// falls further behind is told it lagged and reads every checkpoint again,
/// so the bound costs a read, never a move.
const CHECKPOINT_NEWS: usize = 4096;

/// The channels a process listens on: only those its parts wait for (a worker
/// fed by the bus waits for neither).
#[derive(Debug, Clone, Copy)]
pub struct Channels {
    /// The store's appends: the relay, and what tails the store.
    pub commits: bool,
    /// The checkpoints' moves: the API's consistency waits (`Progress`).
    pub checkpoints: bool,
}

/// What the checkpoints channel said.
#[derive(Debug, Clone)]
pub enum CheckpointNews {
    /// Listening (again) from here on: moves made before were not heard, so
    /// read every checkpoint.
    Listening,
    /// Checkpoint `name` moved to `position` (and committed).
    Moved(Arc<str>, Position),
}

/// The subscriptions to the process's listening connection.
#[derive(Debug)]
pub struct Listening {
    commits: Option<watch::Receiver<()>>,
    checkpoints: Option<broadcast::Sender<CheckpointNews>>,
}

impl Listening {
    /// Listen on `channels` until `stop`, reconnecting after failures. `None`
    /// when no channel is wanted: no connection is held at all. When the task
    /// ends, the commits receivers see their sender gone and the checkpoint
    /// subscribers see the channel closed; both then poll.
    pub fn start(
        pool: PgPool,
        channels: Channels,
        stop: CancellationToken,
    ) -> Option<(Listening, tokio::task::JoinHandle<()>)> {
        if !channels.commits && !channels.checkpoints {
            return None;
        }
        let (commits, commits_heard) = channels.commits.then(|| watch::channel(())).unzip();
        let checkpoints = channels
            .checkpoints
            .then(|| broadcast::Sender::new(CHECKPOINT_NEWS));
        let listening = Listening {
            commits: commits_heard,
            checkpoints: checkpoints.clone(),
        };
        let task = tokio::spawn(async move {
            let to = Dispatch {
                commits,
                checkpoints,
            };
            while !stop.is_cancelled() {
                if let Err(e) = to.listen(&pool, &stop).await {
                    tracing::warn!(error = %e, "listening to Postgres failed; listening again");
                    tokio::select! {
                        () = tokio::time::sleep(RELISTEN_AFTER) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
        });
        Some((listening, task))
    }

    /// A signal that changes whenever an append commits, if this process
    /// listens on the commits channel.
    pub fn commits(&self) -> Option<watch::Receiver<()>> {
        self.commits.clone()
    }

    /// The checkpoints' news from now on, if this process listens on the
    /// checkpoints channel.
    pub fn checkpoint_news(&self) -> Option<broadcast::Receiver<CheckpointNews>> {
        self.checkpoints.as_ref().map(broadcast::Sender::subscribe)
    }
}

/// Where each channel's notifications go.
struct Dispatch {
    commits: Option<watch::Sender<()>>,
    checkpoints: Option<broadcast::Sender<CheckpointNews>>,
}

impl Dispatch {
    async fn listen(&self, pool: &PgPool, stop: &CancellationToken) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        // A lost connection ends this listener (see below) rather than being
        // made again inside it, silently.
        listener.eager_reconnect(false);
        let mut channels = Vec::with_capacity(2);
        if self.commits.is_some() {
            channels.push(COMMITS_CHANNEL);
        }
        if self.checkpoints.is_some() {
            channels.push(checkpoint::CHANNEL);
        }
        listener.listen_all(channels).await?;
        // Whatever was announced while nobody listened: everyone looks again.
        self.heard_again();
        loop {
            tokio::select! {
                notification = listener.try_recv() => {
                    // `None`: the connection was lost, and with it whatever was
                    // announced meanwhile. Listening anew tells everyone so.
                    let Some(notification) = notification? else { return Ok(()) };
                    match notification.channel() {
                        COMMITS_CHANNEL => {
                            if let Some(commits) = &self.commits {
                                commits.send_replace(());
                            }
                        }
                        checkpoint::CHANNEL => {
                            if let (Some(checkpoints), Some((name, position))) =
                                (&self.checkpoints, parse(notification.payload()))
                            {
                                // No subscriber yet is no error: one reads
                                // every checkpoint when it starts.
                                let _ = checkpoints.send(CheckpointNews::Moved(name.into(), position));
                            }
                        }
                        _ => {}
                    }
                }
                () = stop.cancelled() => return Ok(()),
            }
        }
    }

    fn heard_again(&self) {
        if let Some(commits) = &self.commits {
            commits.send_replace(());
        }
        if let Some(checkpoints) = &self.checkpoints {
            let _ = checkpoints.send(CheckpointNews::Listening);
        }
    }
}

/// A checkpoint move's payload, `"<name> <transaction_id>.<global_position>"`
/// (`checkpoint::postgres::save`).
fn parse(payload: &str) -> Option<(&str, Position)> {
    let (name, position) = payload.split_once(' ')?;
    Some((name, position.parse().ok()?))
}
