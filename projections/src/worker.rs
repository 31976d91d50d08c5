//! The projection worker: applies the log to one projection, strictly in commit
//! order from its checkpoint, committing each batch's read-model changes with the
//! checkpoint in one transaction, on Postgres or on SQLite (`crate::db`).
//!
//! - **One owner.** The worker holds its projection's lease (`lease`): a standby
//!   waits, and takes over when the owner's lock connection dies. Every batch's
//!   checkpoint move is fenced by the lease's epoch, so a deposed owner's batch
//!   rolls back and it stops.
//! - **Its feed.** Events come from the bus (`Feed::Bus`, production) or, where
//!   there is no NATS, straight from the event store (`Feed::StoreTail`): read
//!   in commit order below the read horizon, as the relay reads it, and woken by
//!   each commit (a wake-up only: the store is always what is read). On SQLite
//!   only the store tail applies: the bus is fed by the relay, which reads
//!   Postgres.
//! - **Its own view of the bus.** Each worker reads the stream through an ordered
//!   consumer of its own (ephemeral, unacked), started just after the
//!   checkpoint's JetStream sequence. Nothing is shared between an owner and a
//!   standby, so two workers can never split one consumer's messages; the
//!   checkpoint in Postgres, not the consumer, is what says what was applied.
//!   What a message decodes to is shared, though: the first of the process's
//!   workers to read it keeps it for the others (`decode_cache`).
//! - **Nothing skipped.** Every envelope names the event before it in commit
//!   order (`previous`, set by the relay). An event whose predecessor is not the
//!   checkpoint is a gap (a relay republished out of order, or two relays
//!   overlapped): the missing events are read from the event store itself and
//!   applied first. An event at or below the checkpoint was applied before (a
//!   redelivery or a republish) and is skipped.
//! - An event that cannot be decoded goes to `dead_letters` with its reason; the
//!   projection moves on.

use ai_secretary_contract::{self as contract, Event, EventEnvelope, Position, subjects};
use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
};
use futures_util::{FutureExt, StreamExt};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    checkpoint,
    db::{Db, Tx},
    decode_cache::DecodeCache,
    executor::known::Known,
    lease::{self, Lease},
    log,
    opener::Opener,
    projection::{Batch, BatchCommit, Decoded, Projection, ProjectionError},
};

/// Where the events are on the bus, how their sealed personal fields are
/// opened (the bus and the store carry them encrypted), and what the
/// process's workers already made of the latest messages.
#[derive(Clone)]
pub struct Source {
    pub stream: String,
    pub subject_prefix: String,
    pub opener: Arc<dyn Opener>,
    /// Shared by every worker given a clone of this source.
    pub decoded: DecodeCache,
}

/// Where a worker's events come from.
#[derive(Clone)]
pub enum Feed {
    /// The JetStream stream the relay publishes to (boxed: the context is
    /// large beside the other variant, and a feed is cloned per worker).
    Bus(Box<jetstream::Context>),
    /// The event store itself, with no bus in between: committed events after
    /// the checkpoint, in commit order. The receiver changes on every commit
    /// (LISTEN/NOTIFY, or the embedded store's own signal); a missed change
    /// costs at most [`TAIL_POLL`], never an event.
    StoreTail(watch::Receiver<()>),
}

/// How often a store-tailing worker looks for new events when no commit woke it
/// (a lost notification, a listener reconnecting).
pub const TAIL_POLL: Duration = Duration::from_secs(1);

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
    /// The checkpoint moved under the batch, by the same lease (a rebuild's
    /// swap): the batch is dropped and the next one resolves from there.
    #[error("the checkpoint moved under the batch (a rebuild swapped it)")]
    Moved,
    /// A sealed field did not open (the wrong `ENCRYPTION_KEY`?): the batch is
    /// not applied, and is tried again.
    #[error("sealed data: {0}")]
    Sealed(String),
    /// `Feed::Bus` with the read side on SQLite: the bus is fed by the relay,
    /// which reads the Postgres store, so this pairing has nothing to consume.
    #[error(
        "projection {0}: the bus feed needs Postgres (the relay reads it); on SQLite use the store tail (EVENT_FEED=store)"
    )]
    BusNeedsPostgres(&'static str),
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
    db: Db,
    feed: Feed,
    source: Source,
    projection: Arc<dyn Projection>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let name = projection.name();
    if matches!(feed, Feed::Bus(_)) && db.postgres().is_none() {
        return Err(WorkerError::BusNeedsPostgres(name));
    }
    // Zeroed series, so a projection that never failed still shows 0 failures.
    for counter in [
        "projection_events_total",
        "projection_failures_total",
        "projection_dead_letters_total",
        "projection_gap_fills_total",
    ] {
        metrics::counter!(counter, "projection" => name).increment(0);
    }
    BatchCommit::zero(name);
    lease::zero_metrics(name);
    while !shutdown.is_cancelled() {
        let Some(lease) = Lease::acquire(&db, &lock_key(name), name, &shutdown).await? else {
            break;
        };
        serve(&db, &feed, &source, projection.as_ref(), &lease).await;
        if !shutdown.is_cancelled() {
            tracing::warn!(projection = name, "lease lost; contending again");
        }
    }
    Ok(())
}

/// Apply batches while `lease` is held, resuming from the checkpoint after a failure.
async fn serve(db: &Db, feed: &Feed, source: &Source, projection: &dyn Projection, lease: &Lease) {
    let name = projection.name();
    while !lease.lost().is_cancelled() {
        let outcome = match (feed, db) {
            (Feed::Bus(jetstream), Db::Postgres(pool)) => {
                consume(db, pool, jetstream, source, projection, lease).await
            }
            // Refused by `run` before the lease was taken.
            (Feed::Bus(_), Db::Sqlite(_)) => Err(WorkerError::BusNeedsPostgres(name)),
            (Feed::StoreTail(commits), _) => {
                tail(db, commits.clone(), source, projection, lease).await
            }
        };
        match outcome {
            Ok(()) => {}
            Err(WorkerError::Deposed) => return,
            Err(e @ WorkerError::BusNeedsPostgres(_)) => {
                tracing::error!(projection = name, error = %e, "not consuming");
                return;
            }
            Err(WorkerError::Moved) => {
                tracing::info!(
                    projection = name,
                    "checkpoint moved by a rebuild; resuming from it"
                );
            }
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
    db: &Db,
    pool: &PgPool,
    jetstream: &jetstream::Context,
    source: &Source,
    projection: &dyn Projection,
    lease: &Lease,
) -> Result<(), WorkerError> {
    let consumer = position_consumer(pool, jetstream, source, projection.name()).await?;
    let mut messages = consumer.messages().await.map_err(nats)?;
    // Where the last batch left off: the next batch starts there without
    // reading the checkpoint again. Read at the start, and again after any
    // failure (this function returns, and `serve` calls it anew).
    let mut left_off = LeftOff::at(checkpoint::current(db, projection.name()).await?);
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
        // `unconstrained`: tokio's cooperative budget (a task's resource
        // polls per turn, spent here after some 64 messages) makes a buffered
        // message look `Pending` once it is used up, which ended every batch
        // near 64 messages however long the backlog (`ready_chunks` would
        // stop at that same `Pending`). The loop is bounded by `MAX_BATCH` and
        // only takes what is already buffered, so lifting the budget for it
        // starves no other task.
        while batch.len() < MAX_BATCH {
            match tokio::task::unconstrained(messages.next()).now_or_never() {
                Some(Some(Ok(message))) => batch.push(message),
                Some(Some(Err(e))) => return Err(nats(e)),
                _ => break,
            }
        }
        apply(db, pool, source, projection, lease, &mut left_off, &batch).await?;
    }
}

/// Read the event store from just after the checkpoint and apply batches until
/// the lease is lost or a batch fails: the feed where there is no bus.
///
/// Each read stops below the read horizon (`log::read_committed`), so an event
/// whose transaction is still open is never passed; the next read, woken by
/// its commit, starts from the checkpoint and finds it. (On SQLite there is no
/// horizon: a commit is readable, in order, the moment it is announced.)
async fn tail(
    db: &Db,
    mut commits: watch::Receiver<()>,
    source: &Source,
    projection: &dyn Projection,
    lease: &Lease,
) -> Result<(), WorkerError> {
    let name = projection.name();
    // After a wake-up that found nothing, how many quick looks remain: on
    // Postgres the commit may still be above the read horizon for a moment;
    // on SQLite a commit is visible when announced, so none are needed.
    let rechecks_after_a_commit = match db {
        Db::Postgres(_) => log::RECHECKS,
        Db::Sqlite(_) => 0,
    };
    let mut recheck = 0;
    let mut left_off = LeftOff::at(checkpoint::ensure(db, name).await?);
    loop {
        // Checked before every batch, not only when idle: under a steady stream
        // of commits there is always more to read, and a shutdown or a lost
        // lease must not wait for the log to run dry.
        if lease.lost().is_cancelled() {
            return Ok(());
        }
        // Seen before reading: a commit from here on wakes the wait below.
        commits.borrow_and_update();
        let start = checkpoint::current(db, name).await?;
        if start.epoch != lease.epoch {
            lease.fenced();
            return Err(WorkerError::Deposed);
        }
        if start.position != left_off.checkpoint.position {
            // Moved by someone else (a rebuild's swap): its tables may differ.
            left_off = LeftOff::at(start);
        }
        let events = log::read_committed(db, start.position, MAX_BATCH as i64).await?;
        if events.is_empty() {
            let pause = if recheck > 0 {
                recheck -= 1;
                log::RECHECK
            } else {
                TAIL_POLL
            };
            tokio::select! {
                changed = commits.changed(), if recheck == 0 => match changed {
                    Ok(()) => recheck = rechecks_after_a_commit,
                    // The signal's sender is gone (its listener stopped): poll.
                    Err(_) => tokio::select! {
                        () = tokio::time::sleep(TAIL_POLL) => {}
                        () = lease.lost().cancelled() => return Ok(()),
                    },
                },
                () = tokio::time::sleep(pause) => {}
                () = lease.lost().cancelled() => return Ok(()),
            }
            continue;
        }
        recheck = 0;
        let mut resolved = Resolved::from(start.position);
        resolved.push_stored(source, events).await?;
        commit(db, projection, lease, &mut left_off, resolved).await?;
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
    let sequence = checkpoint::postgres::ensure(pool, name)
        .await?
        .stream_sequence;
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
            filter_subject: subjects::all(&source.subject_prefix),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: next,
            },
            ..Default::default()
        })
        .await
        .map_err(nats)
}

/// Apply a batch: resolve it against the checkpoint (duplicates dropped, gaps
/// filled from the store, payloads decoded), let the projection do its work
/// outside Postgres (`Projection::prepare`), then write the read-model changes
/// and move the checkpoint in one short transaction, fenced by the lease.
///
/// The transaction is kept short on purpose: from its first lock or write it
/// holds a transaction id, and the relay reads nothing committed after that id
/// until it ends (the read horizon, `EventStore::read_all`). Nothing slow (a
/// Redis call, a read of the store) happens inside it.
///
/// `left_off` is where the previous batch left off. Only this worker moves
/// the checkpoint while it holds the lease, but a rebuild's swap or a takeover
/// may have moved it since; the transaction's row lock finds that out
/// ([`commit`]), and nothing of the batch is written then.
async fn apply(
    db: &Db,
    pool: &PgPool,
    source: &Source,
    projection: &dyn Projection,
    lease: &Lease,
    left_off: &mut LeftOff,
    batch: &[jetstream::Message],
) -> Result<(), WorkerError> {
    let name = projection.name();
    if left_off.checkpoint.epoch != lease.epoch {
        lease.fenced();
        return Err(WorkerError::Deposed);
    }
    let resolved = resolve(pool, source, name, batch, left_off.checkpoint.position).await?;
    commit(db, projection, lease, left_off, resolved).await
}

/// Where a worker's last batch left off: the checkpoint as that batch left
/// it, and what its lookups found (`executor::known`), which holds only while
/// the checkpoint is still there.
struct LeftOff {
    checkpoint: checkpoint::Checkpoint,
    known: Known,
}

impl LeftOff {
    /// At `checkpoint` as just read, knowing nothing yet.
    fn at(checkpoint: checkpoint::Checkpoint) -> LeftOff {
        LeftOff {
            checkpoint,
            known: Known::default(),
        }
    }
}

/// Write a resolved batch: let the projection do its work outside the
/// database (`Projection::prepare`), then apply it and move the checkpoint
/// from where `left_off` is, together, fenced by the lease (see [`apply`]):
/// in one statement when nothing in the batch must be read or written before
/// its end, in one short transaction otherwise (`Batch`); a batch with
/// nothing to write but the move makes it as one statement. `left_off` then
/// moves to where the batch left off; on an error it is left knowing nothing
/// (the caller reads the checkpoint again).
/// On SQLite that transaction holds the database's one write lock
/// (`BEGIN IMMEDIATE`), the event store's appends included: another reason
/// nothing slow happens inside it.
async fn commit(
    db: &Db,
    projection: &dyn Projection,
    lease: &Lease,
    left_off: &mut LeftOff,
    resolved: Resolved,
) -> Result<(), WorkerError> {
    let name = projection.name();
    let decoded: Vec<&Decoded> = resolved
        .steps
        .iter()
        .filter_map(|s| s.as_deref().ok())
        .collect();
    projection.prepare(db, &decoded).await?;

    let start = left_off.checkpoint;
    let m = checkpoint::Move {
        fence: lease.fence(start.position),
        to: resolved.at,
        applied: resolved.applied,
        stream_sequence: resolved.sequence.map(|s| s as i64),
    };
    let moved = if resolved.writes(projection) {
        // What the lookups found goes back only if the batch commits.
        let known = std::mem::take(&mut left_off.known);
        let batch = Batch::new(db, name, m, known);
        match write(batch, projection, &resolved.steps).await {
            Ok(known) => {
                left_off.known = known;
                true
            }
            // Nothing of the batch was written.
            Err(WorkerError::Projection(ProjectionError::NotMoved)) => false,
            Err(e) => return Err(e),
        }
    } else {
        // Nothing to write but the move: one statement, a transaction of its
        // own. Most batches of a quiet service are one command's events, and
        // most projections touch only some kinds of event (`usage_daily` one
        // of the four of a message and its reply, `cache` none of them in its
        // table): two round trips less for each of those batches.
        let moved = checkpoint::save_alone(db, name, m).await?;
        if moved {
            BatchCommit::MoveAlone.count(name);
        }
        moved
    };
    if !moved {
        // Deposed since the batch began, or a rebuild moved the checkpoint
        // under it (the epoch says which).
        if checkpoint::current(db, name).await?.epoch == lease.epoch {
            return Err(WorkerError::Moved);
        }
        lease.fenced();
        return Err(WorkerError::Deposed);
    }
    let applied = resolved.applied;
    db.checkpoint_moved();
    metrics::counter!("projection_events_total", "projection" => name).increment(applied as u64);
    metrics::gauge!("projection_position", "projection" => name)
        .set(resolved.at.global_position as f64);
    left_off.checkpoint = checkpoint::Checkpoint {
        position: resolved.at,
        epoch: lease.epoch,
        stream_sequence: resolved
            .sequence
            .map_or(start.stream_sequence, |s| s as i64),
    };
    Ok(())
}

/// Apply a batch's steps and commit it with its checkpoint's move (see
/// `Batch`: in one statement, or in a transaction whose first statement is
/// the move); what the lookups found, or `ProjectionError::NotMoved`.
async fn write(
    mut batch: Batch,
    projection: &dyn Projection,
    steps: &[Result<Arc<Decoded>, Poison>],
) -> Result<Known, WorkerError> {
    for step in steps {
        match step {
            Ok(decoded) => {
                let Decoded { envelope, event } = &**decoded;
                projection.apply(&mut batch, envelope, event).await?
            }
            Err(poison) => poison.record(batch.tx().await?, projection.name()).await?,
        }
    }
    Ok(batch.commit().await?)
}

/// A batch checked against the checkpoint.
struct Resolved {
    /// What to do, in commit order: apply an event (as decoded, perhaps by
    /// another worker: `DecodeCache`), or park a poison one.
    steps: Vec<Result<Arc<Decoded>, Poison>>,
    /// Events the checkpoint moves past (applied or parked).
    applied: i64,
    /// Where the checkpoint moves to.
    at: Position,
    /// The JetStream sequence of the batch's last message.
    sequence: Option<u64>,
}

/// An event that cannot be read, with why, for `dead_letters`.
struct Poison {
    envelope: Option<EventEnvelope>,
    subject: String,
    reason: String,
    payload: String,
}

/// Drop what is at or below `from`, fill gaps from the event store, decode
/// (or take what another worker of the process decoded: `DecodeCache`).
async fn resolve(
    pool: &PgPool,
    source: &Source,
    name: &str,
    batch: &[jetstream::Message],
    from: Position,
) -> Result<Resolved, WorkerError> {
    let mut resolved = Resolved::from(from);
    for message in batch {
        let sequence = message.info().ok().map(|info| info.stream_sequence);
        if sequence.is_some() {
            resolved.sequence = sequence;
        }
        let payload = || String::from_utf8_lossy(&message.payload).into_owned();
        let kept = sequence.and_then(|s| source.decoded.get(s, &message.payload));
        let read = match kept {
            Some(decoded) => Read::Kept(decoded),
            None => match serde_json::from_slice(&message.payload) {
                Ok(envelope) => Read::Parsed(envelope),
                Err(e) => {
                    // Nothing to place it by: the next event's `previous` will
                    // show the gap, and the store's copy is applied then.
                    resolved.steps.push(Err(Poison {
                        envelope: None,
                        subject: message.subject.to_string(),
                        reason: format!("not an event envelope: {e}"),
                        payload: payload(),
                    }));
                    continue;
                }
            },
        };
        let envelope = read.envelope();
        let at = resolved.at;
        if envelope.position() <= at {
            continue; // applied before: a redelivery or a republish
        }
        if envelope.previous != Some(at) {
            let (event_id, position) = (envelope.event_id, envelope.position());
            let filled = fill_gap(pool, source, at, position, &mut resolved).await?;
            metrics::counter!("projection_gap_fills_total", "projection" => name.to_owned())
                .increment(1);
            if resolved.at == position {
                tracing::info!(projection = name, from = %at, to = %resolved.at, filled,
                    "gap in the bus filled from the event store");
            } else {
                // The bus holds an event the store does not (restored to an older
                // point without purging the stream, docs/operations.md): never
                // apply what the log does not have.
                tracing::error!(projection = name, %event_id, at = %resolved.at,
                    "event on the bus is not in the event store; not applied");
            }
            continue;
        }
        let step = match read {
            Read::Kept(decoded) => Ok(decoded),
            Read::Parsed(mut envelope) => {
                let since = source.decoded.generation();
                source
                    .opener
                    .open(envelope.event_id, &mut envelope.data)
                    .await
                    .map_err(WorkerError::Sealed)?;
                match envelope.decode() {
                    Ok(event) => {
                        let decoded = Arc::new(Decoded { envelope, event });
                        if let Some(sequence) = sequence {
                            source
                                .decoded
                                .keep(sequence, &message.payload, &decoded, since);
                        }
                        Ok(decoded)
                    }
                    Err(reason) => Err(Poison {
                        subject: message.subject.to_string(),
                        reason,
                        payload: payload(),
                        envelope: Some(envelope),
                    }),
                }
            }
        };
        resolved.push(source, step);
    }
    Ok(resolved)
}

/// A message off the bus, as this worker found it.
#[allow(
    clippy::large_enum_variant,
    reason = "one at a time, for one message, on the stack: boxing would only add an allocation"
)]
enum Read {
    /// Decoded and opened already, by this worker or another (`DecodeCache`).
    Kept(Arc<Decoded>),
    /// Its envelope parsed here, its payload still sealed.
    Parsed(EventEnvelope),
}

impl Read {
    fn envelope(&self) -> &EventEnvelope {
        match self {
            Read::Kept(decoded) => &decoded.envelope,
            Read::Parsed(envelope) => envelope,
        }
    }
}

impl Resolved {
    /// Whether applying it writes anything but the checkpoint's move: an event
    /// the projection touches, or one to park in `dead_letters`.
    fn writes(&self, projection: &dyn Projection) -> bool {
        self.steps.iter().any(|step| match step.as_deref() {
            Ok(Decoded { envelope, event }) => projection.touches(envelope, event),
            Err(_) => true,
        })
    }

    /// Nothing yet, from the checkpoint at `from`.
    fn from(from: Position) -> Resolved {
        Resolved {
            steps: Vec::new(),
            applied: 0,
            at: from,
            sequence: None,
        }
    }

    /// Events read from the event store (sealed, as stored), opened and decoded
    /// in order; one that does not decode is parked with its stored payload.
    async fn push_stored(
        &mut self,
        source: &Source,
        events: Vec<(EventEnvelope, String)>,
    ) -> Result<(), WorkerError> {
        for (envelope, data) in events {
            let opened = source
                .opener
                .open_text(envelope.event_id, &data)
                .await
                .map_err(WorkerError::Sealed)?;
            let step = match contract::decode(
                &envelope.event_type,
                envelope.schema_version,
                opened.as_deref().unwrap_or(&data),
            ) {
                Ok(event) => Ok(Arc::new(Decoded { envelope, event })),
                Err(reason) => Err(Poison {
                    subject: "(event store)".into(),
                    reason,
                    // As stored: sealed, never the plaintext.
                    payload: data,
                    envelope: Some(envelope),
                }),
            };
            self.push(source, step);
        }
        Ok(())
    }

    /// One more event the checkpoint moves past.
    fn push(&mut self, source: &Source, step: Result<Arc<Decoded>, Poison>) {
        if let Ok(Decoded {
            envelope,
            event: Event::UserForgotten,
        }) = step.as_deref()
        {
            // Their key is gone from the store with this event; any copy in
            // memory goes now, before the batch's next event is opened, and
            // so does every value opened with it.
            source.opener.forget(envelope.stream_id);
            source.decoded.forget_all();
        }
        if let Some(envelope) = match &step {
            Ok(d) => Some(&d.envelope),
            Err(p) => p.envelope.as_ref(),
        } {
            self.at = envelope.position();
        }
        self.applied += 1;
        self.steps.push(step);
    }
}

/// Add the events in `(after, upto]` from the event store (the log the relay
/// reads; `upto` was published, so all of it is committed). Returns how many;
/// `resolved.at` ends at `upto`, unless the store lacks it.
async fn fill_gap(
    pool: &PgPool,
    source: &Source,
    after: Position,
    upto: Position,
    resolved: &mut Resolved,
) -> Result<i64, WorkerError> {
    // A read-only transaction (it takes no transaction id), for the range plan.
    let mut read = pool.begin().await?;
    log::plan_range_with_its_bounds(&mut read).await?;
    let mut at = after;
    let mut filled = 0;
    while at < upto {
        let events = log::read(&mut read, at, upto, FILL_CHUNK).await?;
        let Some((last, _)) = events.last() else {
            break; // not in the store (a restore older than the bus): nothing to apply
        };
        at = last.position();
        filled += events.len() as i64;
        resolved.push_stored(source, events).await?;
    }
    read.rollback().await?;
    Ok(filled)
}

impl Poison {
    async fn record(&self, tx: &mut Tx, projection: &str) -> Result<(), sqlx::Error> {
        dead_letter(
            tx,
            projection,
            self.envelope.as_ref(),
            &self.subject,
            &self.reason,
            &self.payload,
        )
        .await
    }
}

async fn dead_letter(
    tx: &mut Tx,
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
    match tx {
        Tx::Postgres(tx) => {
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
            .execute(&mut **tx)
            .await?;
        }
        // The same row; `recorded_at` has no default in SQLite's schema (no
        // clock there), so it is bound from Rust, as µs since 1970 UTC.
        Tx::Sqlite(tx) => {
            sqlx::query(
                "INSERT INTO dead_letters (projection, event_id, transaction_id, global_position,
                     subject, reason, payload, recorded_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(projection)
            .bind(envelope.map(|e| e.event_id))
            .bind(envelope.map(|e| e.transaction_id))
            .bind(envelope.map(|e| e.global_position))
            .bind(subject)
            .bind(reason)
            .bind(payload)
            .bind(chrono::Utc::now().timestamp_micros())
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}
