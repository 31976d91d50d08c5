//! The projection worker: applies the log to one projection, strictly in commit
//! order from its checkpoint, committing each batch's read-model changes with the
//! checkpoint in one Postgres transaction.
//!
//! - **One owner.** The worker holds its projection's lease (`lease`): a standby
//!   waits, and takes over when the owner's lock connection dies. Every batch's
//!   checkpoint move is fenced by the lease's epoch, so a deposed owner's batch
//!   rolls back and it stops.
//! - **Its own view of the bus.** Each worker reads the stream through an ordered
//!   consumer of its own (ephemeral, unacked), started just after the
//!   checkpoint's JetStream sequence. Nothing is shared between an owner and a
//!   standby, so two workers can never split one consumer's messages; the
//!   checkpoint in Postgres, not the consumer, is what says what was applied.
//! - **Nothing skipped.** Every envelope names the event before it in commit
//!   order (`previous`, set by the relay). An event whose predecessor is not the
//!   checkpoint is a gap (a relay republished out of order, or two relays
//!   overlapped): the missing events are read from the event store itself and
//!   applied first. An event at or below the checkpoint was applied before (a
//!   redelivery or a republish) and is skipped.
//! - An event that cannot be decoded goes to `dead_letters` with its reason; the
//!   projection moves on.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
};
use futures_util::{FutureExt, StreamExt};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{
    checkpoint,
    envelope::{self, EventEnvelope, Position},
    lease::Lease,
    log,
    projection::{Projection, ProjectionError},
};

/// Where the events are on the bus.
#[derive(Debug, Clone)]
pub struct Source {
    pub stream: String,
    pub subject_prefix: String,
}

/// Most messages applied in one transaction.
const MAX_BATCH: usize = 500;
/// Events read from the store per query while filling a gap.
const FILL_CHUNK: i64 = 1_000;
/// Pause after a failed batch before reading it again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    #[error("nats: {0}")]
    Nats(String),
    /// Another worker took the projection over: this one must stop writing.
    #[error("deposed: another worker holds the lease")]
    Deposed,
}

fn nats(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Nats(e.to_string())
}

/// The advisory lock a projection's lease is held under (the same key as the
/// once-only lock of earlier versions, so old and new workers exclude each other).
pub fn lock_key(name: &str) -> String {
    format!("ai_secretary.projection.{name}")
}

/// Run one projection until `shutdown` is cancelled: wait for its lease, apply
/// batches while it is held, and contend again when it is lost.
pub async fn run(
    pool: PgPool,
    jetstream: jetstream::Context,
    source: Source,
    projection: Arc<dyn Projection>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let name = projection.name();
    // Zeroed series, so a projection that never failed still shows 0 failures.
    for counter in [
        "projection_events_total",
        "projection_failures_total",
        "projection_dead_letters_total",
    ] {
        metrics::counter!(counter, "projection" => name).increment(0);
    }
    while !shutdown.is_cancelled() {
        let Some(lease) = Lease::acquire(&pool, &lock_key(name), name, &shutdown).await? else {
            break;
        };
        serve(&pool, &jetstream, &source, projection.as_ref(), &lease).await;
        if !shutdown.is_cancelled() {
            tracing::warn!(projection = name, "lease lost; contending again");
        }
    }
    Ok(())
}

/// Apply batches while `lease` is held, resuming from the checkpoint after a failure.
async fn serve(
    pool: &PgPool,
    jetstream: &jetstream::Context,
    source: &Source,
    projection: &dyn Projection,
    lease: &Lease,
) {
    let name = projection.name();
    while !lease.lost().is_cancelled() {
        match consume(pool, jetstream, source, projection, lease).await {
            Ok(()) => {}
            Err(WorkerError::Deposed) => return,
            Err(e) => {
                metrics::counter!("projection_failures_total", "projection" => name).increment(1);
                tracing::warn!(projection = name, error = %e, "projection batch failed; resuming from the checkpoint");
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER) => {}
                    () = lease.lost().cancelled() => {}
                }
            }
        }
    }
}

/// Read the stream from just after the checkpoint through a consumer of this
/// worker's own and apply batches until the lease is lost or a batch fails.
async fn consume(
    pool: &PgPool,
    jetstream: &jetstream::Context,
    source: &Source,
    projection: &dyn Projection,
    lease: &Lease,
) -> Result<(), WorkerError> {
    let consumer = position_consumer(pool, jetstream, source, projection.name()).await?;
    let mut messages = consumer.messages().await.map_err(nats)?;
    loop {
        let first = tokio::select! {
            next = messages.next() => next,
            () = lease.lost().cancelled() => return Ok(()),
        };
        let Some(first) = first else {
            return Err(nats("the consumer's message stream ended"));
        };
        let mut batch = vec![first.map_err(nats)?];
        // Take whatever else is already here: batches grow with the backlog.
        while batch.len() < MAX_BATCH {
            match messages.next().now_or_never() {
                Some(Some(Ok(message))) => batch.push(message),
                Some(Some(Err(e))) => return Err(nats(e)),
                _ => break,
            }
        }
        apply(pool, projection, lease, &batch).await?;
    }
}

/// An ordered consumer of this worker's own, starting at the message after the
/// checkpoint's (a hint: what it delivers is checked against the checkpoint).
async fn position_consumer(
    pool: &PgPool,
    jetstream: &jetstream::Context,
    source: &Source,
    name: &str,
) -> Result<jetstream::consumer::Consumer<pull::OrderedConfig>, WorkerError> {
    let stream = jetstream.get_stream(&source.stream).await.map_err(nats)?;
    let info = stream.get_info().await.map_err(nats)?;
    let sequence = checkpoint::ensure(pool, name).await?.stream_sequence;
    // A stream that was recreated (its sequences restarted below ours) is read
    // from its start; the positions in the checkpoint still skip what was applied.
    let next = (sequence as u64 + 1).max(info.state.first_sequence);
    let next = if next > info.state.last_sequence + 1 {
        info.state.first_sequence.max(1)
    } else {
        next
    };
    // The shared durable consumer of earlier versions (named after the
    // projection) would only keep messages for nobody; best effort.
    let _ = stream.delete_consumer(name).await;
    stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("{}.>", source.subject_prefix),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: next,
            },
            ..Default::default()
        })
        .await
        .map_err(nats)
}

/// Apply a batch in one transaction with the checkpoint, fenced by the lease.
async fn apply(
    pool: &PgPool,
    projection: &dyn Projection,
    lease: &Lease,
    batch: &[jetstream::Message],
) -> Result<(), WorkerError> {
    let name = projection.name();
    let mut tx = pool.begin().await?;
    let start = checkpoint::lock(&mut tx, name).await?;
    if start.epoch != lease.epoch {
        lease.fenced();
        return Err(WorkerError::Deposed);
    }
    let mut at = start.position;
    let mut applied = 0;
    let mut sequence = None;
    for message in batch {
        if let Ok(info) = message.info() {
            sequence = Some(info.stream_sequence);
        }
        let envelope: EventEnvelope = match serde_json::from_slice(&message.payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                // Nothing to place it by: the next event's `previous` will show
                // the gap, and the store's copy is applied then.
                let reason = format!("not an event envelope: {e}");
                let payload = String::from_utf8_lossy(&message.payload);
                dead_letter(&mut tx, name, None, &message.subject, &reason, &payload).await?;
                continue;
            }
        };
        if envelope.position() <= at {
            continue; // applied before: a redelivery or a republish
        }
        if envelope.previous != Some(at) {
            let (filled, reached) = fill_gap(&mut tx, projection, at, envelope.position()).await?;
            metrics::counter!("projection_gap_fills_total", "projection" => name).increment(1);
            if reached == envelope.position() {
                tracing::info!(projection = name, from = %at, to = %reached, filled,
                    "gap in the bus filled from the event store");
            } else {
                // The bus holds an event the store does not (restored to an older
                // point without purging the stream, docs/operations.md): never
                // apply what the log does not have.
                tracing::error!(projection = name, event_id = %envelope.event_id, at = %reached,
                    "event on the bus is not in the event store; not applied");
            }
            applied += filled;
            at = reached;
            continue;
        }
        match envelope.decode() {
            Ok(event) => projection.apply(&mut tx, &envelope, &event).await?,
            Err(reason) => {
                let payload = String::from_utf8_lossy(&message.payload);
                dead_letter(
                    &mut tx,
                    name,
                    Some(&envelope),
                    &message.subject,
                    &reason,
                    &payload,
                )
                .await?;
            }
        }
        at = envelope.position();
        applied += 1;
    }
    let moved = checkpoint::save(
        &mut tx,
        name,
        lease.fence(start.position),
        at,
        applied,
        sequence.map(|s| s as i64),
    )
    .await?;
    if !moved {
        lease.fenced();
        return Err(WorkerError::Deposed);
    }
    tx.commit().await?;
    metrics::counter!("projection_events_total", "projection" => name).increment(applied as u64);
    metrics::gauge!("projection_position", "projection" => name).set(at.global_position as f64);
    Ok(())
}

/// Apply the events in `(after, upto]` from the event store (the log the relay
/// reads; `upto` was published, so all of it is committed). Returns how many,
/// and the position of the last one (`upto`, unless the store lacks it).
async fn fill_gap(
    tx: &mut PgConnection,
    projection: &dyn Projection,
    after: Position,
    upto: Position,
) -> Result<(i64, Position), WorkerError> {
    log::plan_range_with_its_bounds(&mut *tx).await?;
    let name = projection.name();
    let mut at = after;
    let mut applied = 0;
    while at < upto {
        let events = log::read(&mut *tx, at, upto, FILL_CHUNK).await?;
        let Some((last, _)) = events.last() else {
            break; // not in the store (a restore older than the bus): nothing to apply
        };
        let last = last.position();
        for (envelope, data) in &events {
            match envelope::decode(&envelope.event_type, envelope.schema_version, data.as_str()) {
                Ok(event) => projection.apply(&mut *tx, envelope, &event).await?,
                Err(reason) => {
                    dead_letter(
                        &mut *tx,
                        name,
                        Some(envelope),
                        "(event store)",
                        &reason,
                        data,
                    )
                    .await?
                }
            }
            applied += 1;
        }
        at = last;
    }
    Ok((applied, at))
}

async fn dead_letter(
    tx: &mut PgConnection,
    projection: &str,
    envelope: Option<&EventEnvelope>,
    subject: &str,
    reason: &str,
    payload: &str,
) -> Result<(), sqlx::Error> {
    tracing::error!(
        projection,
        subject,
        reason,
        "poison event sent to dead_letters"
    );
    metrics::counter!("projection_dead_letters_total", "projection" => projection.to_owned())
        .increment(1);
    sqlx::query(
        "INSERT INTO dead_letters (projection, event_id, transaction_id, global_position,
             subject, reason, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(projection)
    .bind(envelope.map(|e| e.event_id))
    .bind(envelope.map(|e| e.transaction_id))
    .bind(envelope.map(|e| e.global_position))
    .bind(subject)
    .bind(reason)
    .bind(payload)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
