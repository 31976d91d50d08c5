//! The projection worker: one durable JetStream pull consumer per projection,
//! applying events in order and committing each batch's read-model changes with
//! the checkpoint in one Postgres transaction, then acking.
//!
//! Exactly-once effect on an at-least-once bus: an event at or below the
//! checkpoint is acked and skipped. Order is kept by resuming the consumer at the
//! JetStream sequence after the checkpoint's, both when the worker starts and
//! after a failed batch (its unacked messages are then simply read again), and by
//! letting only one worker per projection run (a Postgres advisory lock).
//! An event that cannot be decoded goes to `dead_letters` with its reason; the
//! projection moves on.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use futures_util::{FutureExt, StreamExt};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{
    checkpoint,
    envelope::EventEnvelope,
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
}

fn nats(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Nats(e.to_string())
}

/// Run one projection until `shutdown` is cancelled, retrying after failures.
pub async fn run(
    pool: PgPool,
    jetstream: jetstream::Context,
    source: Source,
    projection: Arc<dyn Projection>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let name = projection.name();
    // One active worker per projection: a second one waits here for the first to die.
    let mut lock = PgConnection::connect_with(&pool.connect_options()).await?;
    tokio::select! {
        locked = sqlx::query("SELECT pg_advisory_lock(hashtext('ai_secretary.projection.' || $1))")
            .bind(name)
            .execute(&mut lock) => { locked?; }
        () = shutdown.cancelled() => return Ok(()),
    }
    tracing::info!(projection = name, "projection worker active");
    // Zeroed series, so a projection that never failed still shows 0 failures.
    for counter in [
        "projection_events_total",
        "projection_failures_total",
        "projection_dead_letters_total",
    ] {
        metrics::counter!(counter, "projection" => name).increment(0);
    }
    while !shutdown.is_cancelled() {
        match consume(&pool, &jetstream, &source, projection.as_ref(), &shutdown).await {
            Ok(()) => {}
            Err(e) => {
                metrics::counter!("projection_failures_total", "projection" => name).increment(1);
                tracing::warn!(projection = name, error = %e, "projection batch failed; resuming from the checkpoint");
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER) => {}
                    () = shutdown.cancelled() => {}
                }
            }
        }
    }
    let _ = lock.close().await;
    Ok(())
}

/// (Re)create the consumer just after the checkpoint and apply batches until
/// shutdown or the first failure.
async fn consume(
    pool: &PgPool,
    jetstream: &jetstream::Context,
    source: &Source,
    projection: &dyn Projection,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let name = projection.name();
    let consumer = position_consumer(pool, jetstream, source, name).await?;
    let mut messages = consumer.messages().await.map_err(nats)?;
    loop {
        let first = tokio::select! {
            next = messages.next() => next,
            () = shutdown.cancelled() => return Ok(()),
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
        apply(pool, projection, &batch).await?;
        for message in &batch {
            message.ack().await.map_err(nats)?;
        }
    }
}

/// Point the durable consumer at the message after the checkpoint's.
async fn position_consumer(
    pool: &PgPool,
    jetstream: &jetstream::Context,
    source: &Source,
    name: &str,
) -> Result<PullConsumer, WorkerError> {
    let stream = jetstream.get_stream(&source.stream).await.map_err(nats)?;
    let info = stream.get_info().await.map_err(nats)?;
    let sequence: i64 = sqlx::query_scalar(
        "INSERT INTO checkpoints (name) VALUES ($1)
         ON CONFLICT (name) DO UPDATE SET name = excluded.name
         RETURNING stream_sequence",
    )
    .bind(name)
    .fetch_one(pool)
    .await?;
    // A stream that was recreated (its sequences restarted below ours) is read
    // from its start; the positions in the checkpoint still skip what was applied.
    let next = (sequence as u64 + 1).max(info.state.first_sequence);
    let next = if next > info.state.last_sequence + 1 {
        info.state.first_sequence.max(1)
    } else {
        next
    };
    // The consumer's own delivery state is not trusted: the checkpoint is.
    let _ = stream.delete_consumer(name).await;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: format!("{}.>", source.subject_prefix),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: next,
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(120),
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .map_err(nats)
}

/// Apply a batch in one transaction with the checkpoint.
async fn apply(
    pool: &PgPool,
    projection: &dyn Projection,
    batch: &[jetstream::Message],
) -> Result<(), WorkerError> {
    let name = projection.name();
    let mut tx = pool.begin().await?;
    let mut checkpoint = checkpoint::lock(&mut tx, name).await?;
    let mut applied = 0;
    let mut sequence = None;
    for message in batch {
        if let Ok(info) = message.info() {
            sequence = Some(info.stream_sequence);
        }
        let envelope: EventEnvelope = match serde_json::from_slice(&message.payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                dead_letter(
                    &mut tx,
                    name,
                    None,
                    message,
                    &format!("not an event envelope: {e}"),
                )
                .await?;
                continue;
            }
        };
        if envelope.position() <= checkpoint {
            continue; // applied before: a redelivery or a republish
        }
        match envelope.decode() {
            Ok(event) => projection.apply(&mut tx, &envelope, &event).await?,
            Err(reason) => dead_letter(&mut tx, name, Some(&envelope), message, &reason).await?,
        }
        checkpoint = envelope.position();
        applied += 1;
    }
    checkpoint::save(
        &mut tx,
        name,
        checkpoint,
        applied,
        sequence.map(|s| s as i64),
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("projection_events_total", "projection" => name).increment(applied as u64);
    metrics::gauge!("projection_position", "projection" => name)
        .set(checkpoint.global_position as f64);
    Ok(())
}

async fn dead_letter(
    tx: &mut PgConnection,
    projection: &str,
    envelope: Option<&EventEnvelope>,
    message: &jetstream::Message,
    reason: &str,
) -> Result<(), sqlx::Error> {
    tracing::error!(projection, subject = %message.subject, reason, "poison event sent to dead_letters");
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
    .bind(message.subject.as_str())
    .bind(reason)
    .bind(String::from_utf8_lossy(&message.payload).as_ref())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
