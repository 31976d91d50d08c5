//! The event store: an append-only log of every fact, ordered per stream by
//! `version` and globally by commit position.
//!
//! [`EventStore`] is the seam the backends fit behind: [`postgres::PgEventStore`]
//! in production, [`sqlite::SqliteEventStore`] for the embedded default (one
//! file); what they share is in `coalesce`. Payloads cross the
//! seam as JSON; [`codec`] is the one place that turns them into domain events.

mod coalesce;
pub mod codec;
pub mod postgres;
pub mod rotation;
pub mod sealed;
pub mod sqlite;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use postgres::PgEventStore;
pub use sqlite::SqliteEventStore;

/// Where an event sits in commit order: the wire contract's one position type
/// (its `Display`/`FromStr` form is the `X-Consistency-Token`).
pub use ai_secretary_contract::{InvalidPosition, Position};

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub data: Value,
    pub metadata: Value,
}

/// An event as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub position: Position,
    pub event_id: Uuid,
    pub stream_id: Uuid,
    pub stream_type: String,
    pub version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub data: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// An event as a fold reads it: its place, its type and its payload text.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPayload {
    /// What its sealed fields are bound to (see `crate::crypto`).
    pub event_id: Uuid,
    pub version: i64,
    /// The kind of stream it is in: a fold checks that it is its own kind.
    pub stream_type: String,
    pub position: Position,
    pub event_type: String,
    pub schema_version: i32,
    /// The payload as JSON text.
    pub data: String,
}

/// What travels with every event: who asked, in answer to what.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub correlation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// One command's events for one stream, appended all or nothing.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub stream_id: Uuid,
    pub stream_type: &'static str,
    /// The stream's version the events were decided on; 0 for a new stream.
    pub expected_version: i64,
    pub events: Vec<NewEvent>,
    /// A cross-stream unique value to claim with the events (e.g. an email).
    pub reservation: Option<Reservation>,
    /// The response to remember for an `Idempotency-Key`, written with the events.
    pub idempotency: Option<IdempotencyRecord>,
    /// A user's data key to keep or to destroy with the events (crypto-shredding:
    /// see `sealed`). Set by the sealing store, never by callers.
    pub user_key: Option<UserKeyChange>,
}

/// What an append does to a user's data key, in its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserKeyChange {
    /// Keep a new user's key (wrapped: see `crate::crypto::MasterKey::wrap`).
    Create { user: Uuid, wrapped: Vec<u8> },
    /// Forget a user: destroy their key, and with it every copy of what was
    /// theirs that the store keeps beside the events: their email's reservation
    /// (so the email can register again) and the responses kept for their
    /// idempotency keys.
    Destroy { user: Uuid },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub scope: &'static str,
    pub value: String,
}

/// The first response to a keyed request.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    pub owner_id: Uuid,
    pub key: String,
    pub request_hash: Vec<u8>,
    pub response: StoredResponse,
    /// From then on the key is as good as absent: a request with it runs afresh.
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// Position of the command's last event, if it appended any.
    pub position: Option<Position>,
}

/// A successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream's version after the append.
    pub version: i64,
    /// Position of the last event appended.
    pub position: Position,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The stream is no longer at the expected version.
    #[error("stream {stream_id} is not at version {expected}")]
    VersionConflict { stream_id: Uuid, expected: i64 },
    /// The reservation's value is already claimed by another stream.
    #[error("{scope} is already taken")]
    ReservationTaken { scope: &'static str },
    /// A request with the same idempotency key committed first.
    #[error("idempotency key already used")]
    IdempotencyKeyTaken,
    #[error("the request has no events")]
    Empty,
    /// The user whose personal data the events carry is forgotten: nothing of
    /// theirs can be written any more.
    #[error("user {user} is forgotten")]
    OwnerForgotten { user: Uuid },
    /// An event with personal fields names no user to seal them for (a bug:
    /// refused rather than written in plaintext).
    #[error("{event_type} has personal fields and no user to seal them for")]
    Unsealable { event_type: String },
    #[error(transparent)]
    Database(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("event store: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// One database error met by every append of a batch.
    #[error("event store: {0}")]
    Shared(std::sync::Arc<sqlx::Error>),
    #[error("event store is shutting down")]
    Closed,
    /// Sealed personal data that does not open under a key that exists: the
    /// wrong `ENCRYPTION_KEY`, or tampering.
    #[error("event store: {0} (is ENCRYPTION_KEY the one the data was written with?)")]
    Crypto(#[from] crate::crypto::CryptoError),
}

impl StoreError {
    /// Whether the same statement could well succeed if tried again: the
    /// connection was lost or refused (a restart, a failover, an idle-connection
    /// killer, `pg_terminate_backend`), the pool had none to give in time, the
    /// transaction lost a serialization race, or (SQLite) another connection
    /// held the write lock past the busy timeout. Such errors are the database's
    /// weather, not the request's fault: callers retry them where that is safe
    /// and otherwise answer 503 with `Retry-After`, never 500.
    pub fn is_transient(&self) -> bool {
        let error = match self {
            StoreError::Sqlx(e) => e,
            StoreError::Shared(e) => e.as_ref(),
            StoreError::Closed | StoreError::Crypto(_) => return false,
        };
        transient(error)
    }
}

/// An error that can say whether trying again could help.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

impl Transient for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

impl Transient for sqlx::Error {
    fn is_transient(&self) -> bool {
        transient(self)
    }
}

/// Run a read again while it fails on a transient error, at most `attempts`
/// times, pausing a little longer each time (10, 20, 40… ms, at most 100).
///
/// Only for what is safe to repeat: reads, and nothing whose first attempt may
/// have committed. Each attempt takes another pooled connection, and after a
/// restart or a mass `pg_terminate_backend` every idle connection of the pool is
/// dead at once (each is found out, and dropped, by the attempt that meets it):
/// size `attempts` to the pool.
pub async fn retrying<T, E, F, Fut>(attempts: u32, mut read: F) -> Result<T, E>
where
    E: Transient + fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match read().await {
            Err(e) if e.is_transient() && attempt < attempts => {
                tracing::debug!(attempt, error = %e, "read interrupted; trying again");
                let pause = (10u64 << attempt.min(4)).min(100);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// See [`StoreError::is_transient`].
pub fn transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        // Another connection held SQLite's lock past the busy timeout.
        sqlx::Error::Database(e) if e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() => {
            ai_secretary_projections::db::is_busy(error)
        }
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            // Class 08: connection exceptions. 57P01–57P03: the server is
            // shutting down, crashed or not yet accepting connections (what a
            // terminated backend reports). 40001/40P01: serialization failure,
            // deadlock. 53300: too many connections.
            code.starts_with("08")
                || matches!(
                    code.as_ref(),
                    "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "53300"
                )
        }),
        _ => false,
    }
}

/// The event store as the rest of the service uses it.
#[async_trait::async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Append one command's events. Concurrent calls may share one transaction;
    /// each caller learns only its own outcome, after its events are durable.
    async fn append(&self, request: AppendRequest) -> Result<Appended, AppendError>;

    /// A stream's events in version order.
    async fn read_stream(&self, stream_id: Uuid) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_stream_from(stream_id, 0).await
    }

    /// A stream's events after `after_version`, in version order: the tail a
    /// cached state has not seen yet (usually nothing, or the one new event).
    async fn read_stream_from(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// [`read_stream_from`](EventStore::read_stream_from) as a fold needs it:
    /// each event's type, schema version and payload as JSON text, nothing else
    /// (no metadata, no JSON tree built), so a cold load of a long stream stays fast.
    async fn read_payloads_from(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<StoredPayload>, StoreError>;

    /// At most `limit` events of a stream before `before_version`, newest first:
    /// recent history, read backwards only as far as the reader needs.
    async fn read_stream_backwards(
        &self,
        stream_id: Uuid,
        before_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Every event of a few (small) streams, by stream and version: the replies
    /// named on one page of a conversation's history, in one round trip.
    async fn read_streams(&self, stream_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError>;

    /// A conversation's live feed: the events of its own stream and of its
    /// replies' streams (`stream_type` `reply`, whose payload names it as
    /// `conversation_id`) committed after `after`, in commit order and, as
    /// [`read_all`](EventStore::read_all), only below the read horizon; at most
    /// `limit`. What a reconnecting live client missed, whatever the length of
    /// the conversation.
    async fn read_conversation_feed(
        &self,
        conversation_id: Uuid,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The last event in commit order, if any.
    async fn head(&self) -> Result<Option<Position>, StoreError>;

    /// How far behind `after` is: events past it (counted up to `limit`) and
    /// when the oldest of them was recorded.
    async fn behind(&self, after: Position, limit: i64) -> Result<Behind, StoreError>;

    /// Committed events after `after`, in commit order, never past an event that
    /// an open transaction could still precede.
    async fn read_all(&self, after: Position, limit: i64)
    -> Result<Vec<RecordedEvent>, StoreError>;

    /// A user's data key, wrapped; `None` once they are forgotten (or for an id
    /// that never registered).
    async fn find_user_key(&self, user: Uuid) -> Result<Option<Vec<u8>>, StoreError>;

    /// The stream that holds a reserved value, if any.
    async fn find_reservation(
        &self,
        scope: &'static str,
        value: &str,
    ) -> Result<Option<Uuid>, StoreError>;

    /// The stored first response for an idempotency key, with its request hash.
    async fn find_idempotency(
        &self,
        owner_id: Uuid,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredResponse)>, StoreError>;

    /// Remember a response whose command appended nothing. False if the key was
    /// taken first (and has not expired).
    async fn remember_idempotency(&self, record: IdempotencyRecord) -> Result<bool, StoreError>;

    /// Delete expired idempotency keys (they are already ignored); how many.
    async fn expire_idempotency_keys(&self) -> Result<u64, StoreError>;

    /// Can the store be reached?
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Events past a reader's position (an operator's view of lag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind {
    /// Counted exactly up to the caller's limit, then reported as that limit.
    pub events: i64,
    pub oldest_recorded_at: Option<DateTime<Utc>>,
}

/// An event as the bus carries it (the wire contract's envelope); the relay
/// sets `previous`.
impl From<&RecordedEvent> for ai_secretary_contract::EventEnvelope {
    fn from(e: &RecordedEvent) -> Self {
        ai_secretary_contract::EventEnvelope {
            event_id: e.event_id,
            stream_id: e.stream_id,
            stream_type: e.stream_type.clone(),
            version: e.version,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            transaction_id: e.position.transaction_id,
            global_position: e.position.global_position,
            recorded_at: e.recorded_at,
            data: e.data.clone(),
            metadata: e.metadata.clone(),
            previous: None,
        }
    }
}
