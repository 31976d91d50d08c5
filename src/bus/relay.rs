//! The relay: tails the event store in commit order and publishes each event to
//! JetStream, then moves its checkpoint.
//!
//! Woken by `NOTIFY` (polling as a safety net), it reads what is safely committed
//! (see `EventStore::read_all`), publishes a batch without waiting between
//! messages, awaits all the acks, and only then saves the checkpoint. A crash in
//! between republishes the batch; `Nats-Msg-Id = event_id` lets JetStream drop
//! the repeats. One relay per database is active (a Postgres advisory lock held
//! on its own connection); another waits for that lock and takes over.

use std::{sync::Arc, time::Duration};

use ai_secretary_projections::EventEnvelope;
use async_nats::jetstream::{self, message::PublishMessage};
use sqlx::{Connection, PgConnection, PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;

use super::{BusConfig, subject_of};
use crate::store::{EventStore, Position, RecordedEvent};

/// The relay's row in `checkpoints`.
pub const CHECKPOINT: &str = "relay";
/// Events published per round trip of acks.
const BATCH: i64 = 1000;
/// Look for new events this often even without a notification.
const POLL: Duration = Duration::from_millis(500);
/// After a notification that found nothing readable yet: look again this often,
/// this many times.
const RECHECK: Duration = Duration::from_millis(2);
const RECHECKS: u32 = 100;

pub struct Relay {
    pub pool: PgPool,
    pub store: Arc<dyn EventStore>,
    pub jetstream: jetstream::Context,
    pub bus: BusConfig,
}

impl Relay {
    /// Relay until `shutdown` is cancelled; an error ends the run (the caller
    /// restarts it), leaving the checkpoint at the last acknowledged batch.
    pub async fn run(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut lock = PgConnection::connect_with(&self.pool.connect_options()).await?;
        tokio::select! {
            locked = sqlx::query("SELECT pg_advisory_lock(hashtext('ai_secretary.relay'))")
                .execute(&mut lock) => { locked?; }
            () = shutdown.cancelled() => return Ok(()),
        }
        super::ensure_stream(&self.jetstream, &self.bus).await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("ai_secretary_events").await?;
        let mut checkpoint = self.checkpoint().await?;
        tracing::info!(%checkpoint, stream = %self.bus.stream, "relay active");
        // A notified commit can still be above the read horizon (an older
        // transaction was open): look again shortly rather than at the next poll.
        let mut recheck = 0;
        loop {
            let events = self.store.read_all(checkpoint, BATCH).await?;
            if let Some(last) = events.last() {
                self.publish(&events).await?;
                checkpoint = last.position;
                self.save(checkpoint).await?;
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
                    () = shutdown.cancelled() => break,
                }
            }
            // Caught up: wait for a commit, the poll, or shutdown; make sure the lock
            // is still ours (its connection alive) before going on.
            tokio::select! {
                notified = listener.recv() => { notified?; recheck = RECHECKS; }
                () = tokio::time::sleep(POLL) => {}
                () = shutdown.cancelled() => break,
            }
            sqlx::query("SELECT 1").execute(&mut lock).await?;
        }
        let _ = lock.close().await;
        Ok(())
    }

    async fn publish(&self, events: &[RecordedEvent]) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(events.len());
        for e in events {
            let envelope = EventEnvelope::from(e);
            let message = PublishMessage::build()
                .payload(serde_json::to_vec(&envelope)?.into())
                .message_id(e.event_id.to_string());
            let subject = subject_of(&self.bus.subject_prefix, e);
            acks.push(self.jetstream.send_publish(subject, message).await?);
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    async fn checkpoint(&self) -> Result<Position, sqlx::Error> {
        let (transaction_id, global_position): (i64, i64) = sqlx::query_as(
            "INSERT INTO checkpoints (name) VALUES ($1)
             ON CONFLICT (name) DO UPDATE SET name = excluded.name
             RETURNING transaction_id, global_position",
        )
        .bind(CHECKPOINT)
        .fetch_one(&self.pool)
        .await?;
        Ok(Position {
            transaction_id,
            global_position,
        })
    }

    async fn save(&self, at: Position) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE checkpoints SET transaction_id = $2, global_position = $3, updated_at = now()
             WHERE name = $1",
        )
        .bind(CHECKPOINT)
        .bind(at.transaction_id)
        .bind(at.global_position)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
