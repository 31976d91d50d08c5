//! The relay: tails the event store in commit order and publishes each event to
//! JetStream, then moves its checkpoint.
//!
//! Woken by `NOTIFY` (heard on the process's one listening connection,
//! `crate::listen`; polling as a safety net), it reads what is safely committed
//! (see `EventStore::read_all`), publishes a batch without waiting between
//! messages, awaits all the acks, and only then saves the checkpoint. A crash in
//! between republishes the batch; `Nats-Msg-Id = event_id` lets JetStream drop
//! the repeats. One relay per database is active: it holds the `relay` lease
//! (`ai_secretary_projections::lease`), a standby waits for it, and every
//! checkpoint move is fenced by the lease's epoch, so a relay that was deposed
//! stops at its next save.
//!
//! Each envelope names the event before it in commit order (`previous`), so a
//! reader can tell a gap on the bus (a republish that landed out of order, two
//! relays overlapping during a takeover) from the next event, and fill it from
//! the store instead of skipping it.

use std::{sync::Arc, time::Duration};

use ai_secretary_contract::{EventEnvelope, subjects};
use ai_secretary_projections::{
    Db, checkpoint,
    lease::{self, Lease},
    log::{RECHECK, RECHECKS},
};
use async_nats::jetstream::{self, message::PublishMessage};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::BusConfig;
use crate::store::{EventStore, Position, RecordedEvent};

/// The relay's row in `checkpoints`.
pub const CHECKPOINT: &str = "relay";
/// The advisory lock of the relay's lease (as in earlier versions, so an old and
/// a new relay exclude each other during a deploy).
const LOCK_KEY: &str = "ai_secretary.relay";
/// Events published per round trip of acks.
const BATCH: i64 = 1000;
/// Look for new events this often even without a notification.
const POLL: Duration = Duration::from_millis(500);

pub struct Relay {
    pub pool: PgPool,
    pub store: Arc<dyn EventStore>,
    pub jetstream: jetstream::Context,
    pub bus: BusConfig,
    /// Changes whenever an append commits (`Listening::commits`).
    pub commits: watch::Receiver<()>,
}

impl Relay {
    /// Relay until `shutdown` is cancelled, taking the lease over whenever it is
    /// free. An error ends the run (the caller restarts it), leaving the
    /// checkpoint at the last acknowledged batch.
    pub async fn run(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        lease::zero_metrics(CHECKPOINT);
        while !shutdown.is_cancelled() {
            let Some(lease) = Lease::acquire(
                &Db::Postgres(self.pool.clone()),
                LOCK_KEY,
                CHECKPOINT,
                shutdown,
            )
            .await?
            else {
                break;
            };
            self.serve(&lease).await?;
            if !shutdown.is_cancelled() {
                tracing::warn!("relay lease lost; contending again");
            }
        }
        Ok(())
    }

    /// Publish everything committed while `lease` is held.
    async fn serve(&self, lease: &Lease) -> anyhow::Result<()> {
        super::ensure_stream(&self.jetstream, &self.bus).await?;
        let mut commits = self.commits.clone();
        // False once the listening task is gone (shutdown): then only the poll.
        let mut hearing = true;
        let mut checkpoint = checkpoint::postgres::ensure(&self.pool, CHECKPOINT)
            .await?
            .position;
        tracing::info!(%checkpoint, stream = %self.bus.stream, "relay active");
        // A notified commit can still be above the read horizon (an older
        // transaction was open): look again shortly rather than at the next poll.
        let mut recheck = 0;
        // The events after the checkpoint, when they were read while the
        // checkpoint was being saved.
        let mut read_ahead: Option<Vec<RecordedEvent>> = None;
        while !lease.lost().is_cancelled() {
            let events = match read_ahead.take() {
                Some(events) => events,
                None => {
                    // Seen before every read: a commit from here on wakes the
                    // wait below.
                    commits.borrow_and_update();
                    self.store.read_all(checkpoint, BATCH).await?
                }
            };
            if let Some(last) = events.last() {
                self.publish(checkpoint, &events).await?;
                // The move is saved while the events after it are read (two
                // round trips at once instead of one after the other: under
                // load this loop is every event's way to the bus). Nothing
                // read ahead is published unless the save, fenced by the
                // lease, went through.
                commits.borrow_and_update();
                let (moved, next) = tokio::join!(
                    self.save(lease, checkpoint, last.position, events.len()),
                    self.store.read_all(last.position, BATCH)
                );
                if !moved? {
                    lease.fenced();
                    break;
                }
                read_ahead = Some(next?);
                checkpoint = last.position;
                metrics::counter!("relay_published_total").increment(events.len() as u64);
                metrics::gauge!("relay_position").set(checkpoint.global_position as f64);
                // relay_lag_* are sampled against the store (crate::sampler), so
                // they keep growing while the relay is stuck.
                recheck = 0;
                continue;
            }
            if recheck > 0 {
                recheck -= 1;
                tokio::select! {
                    () = tokio::time::sleep(RECHECK) => continue,
                    () = lease.lost().cancelled() => break,
                }
            }
            // Caught up: wait for a commit, the poll, or the end of the lease.
            tokio::select! {
                changed = commits.changed(), if hearing => match changed {
                    Ok(()) => recheck = RECHECKS,
                    Err(_) => hearing = false,
                },
                () = tokio::time::sleep(POLL) => {}
                () = lease.lost().cancelled() => break,
            }
        }
        Ok(())
    }

    /// Publish `events` (the ones right after `checkpoint` in commit order)
    /// without waiting in between, then await every ack.
    async fn publish(&self, checkpoint: Position, events: &[RecordedEvent]) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(events.len());
        let mut previous = checkpoint;
        for e in events {
            let mut envelope = EventEnvelope::from(e);
            envelope.previous = Some(previous);
            previous = e.position;
            let message = PublishMessage::build()
                .payload(serde_json::to_vec(&envelope)?.into())
                .message_id(e.event_id.to_string());
            let subject = subjects::of(&self.bus.subject_prefix, &envelope);
            acks.push(self.jetstream.send_publish(subject, message).await?);
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    /// Move the checkpoint from `from` to `to`, fenced by the lease: false if
    /// another relay took over.
    ///
    /// The commit does not wait for the disk: the next batch is published
    /// only after this save, so a flush here was a disk wait (queued behind
    /// the appends' own) in every event's way to the projections. A server crash
    /// may lose the last moves; the relay then publishes those batches again
    /// from the stored checkpoint, and JetStream (`Nats-Msg-Id`) and every
    /// consumer (positions at or below its checkpoint) drop the repeats.
    async fn save(
        &self,
        lease: &Lease,
        from: Position,
        to: Position,
        published: usize,
    ) -> Result<bool, sqlx::Error> {
        // One statement, its own transaction, whose commit does not wait for
        // the disk (`checkpoint::postgres::save`).
        let m = checkpoint::Move {
            fence: lease.fence(from),
            to,
            applied: published as i64,
            stream_sequence: None,
        };
        checkpoint::postgres::save(&self.pool, CHECKPOINT, m).await
    }
}
