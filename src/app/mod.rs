//! Command handling: load a stream, fold it, decide, append. The one place where
//! the domain meets the store, shared by the HTTP API and the replier, and the
//! home of the use cases that need more than one command or a read of the
//! store: [`users`], [`conversations`], [`replies`].
//!
//! A load costs what is new in the stream, not its length: folded states are
//! kept in a [`StateCache`] and only the events after the cached version are read.

pub mod conversations;
mod histories;
pub mod logins;
pub mod replies;
mod state_cache;
pub mod users;

use std::sync::Arc;

use uuid::Uuid;

pub use state_cache::{DEFAULT_BYTES as STATE_CACHE_DEFAULT_BYTES, StateCache, Weigh};

use crate::{
    domain::Decider,
    store::{
        AppendError, AppendRequest, Behind, EventMetadata, EventStore, IdempotencyRecord, Position,
        Reservation, StoreError, StoredPayload, StoredResponse,
        codec::{self, CodecError},
        sealed::{Keyring, SealedStore},
    },
};

/// How many times a command without `If-Match` is decided on a fresh load before
/// giving up on a contended stream. Each round has a winner, so this many
/// concurrent writers on one stream all get through. A first decision made on
/// the cached state is not one of them: its conflict may only mean the cache
/// was behind, and every writer's cache may be.
const CONFLICT_ATTEMPTS: u32 = 10;

/// Who is asking, and under which correlation id: becomes each event's metadata.
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    pub correlation_id: String,
    /// The event this command answers (the replier's ReplyRequested).
    pub causation_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub idempotency_key: Option<String>,
}

/// Which version of the stream the caller believes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Whatever is current: re-decide on a lost race.
    Any,
    /// Exactly this version (`If-Match`): a mismatch is the caller's to resolve.
    Exactly(i64),
    /// A stream id the server has just generated: there is nothing to load.
    New,
}

/// A stream folded into its state (also the result of a command: the state
/// after its events).
#[derive(Debug, Clone, Default)]
pub struct Loaded<S> {
    pub state: S,
    pub version: i64,
    /// Position of the stream's last event: the one just appended, or the one
    /// the decision was made on when the command changed nothing.
    pub position: Option<Position>,
}

/// The result of a command.
pub type Decided<S> = Loaded<S>;

/// Reading the store failed (it is down, or holds a payload that does not decode).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Why a command did not go through: its decider's refusal `E`, or the store's.
#[derive(Debug, thiserror::Error)]
pub enum AppError<E> {
    #[error(transparent)]
    Domain(E),
    #[error("the stream is at version {current}")]
    PreconditionFailed { current: i64 },
    #[error("too many concurrent changes; try again")]
    Contended,
    #[error("{scope} is already taken")]
    ReservationTaken { scope: &'static str },
    #[error("idempotency key already used")]
    IdempotencyKeyTaken,
    /// The user the command's data belongs to is forgotten.
    #[error("the account is forgotten")]
    OwnerForgotten,
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Codec(CodecError),
    /// Something that is nobody's input's fault (a task that died).
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl<E> From<ReadError> for AppError<E> {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Store(e) => AppError::Store(e),
            ReadError::Codec(e) => AppError::Codec(e),
        }
    }
}

impl<E> From<StoreError> for AppError<E> {
    fn from(e: StoreError) -> Self {
        AppError::Store(e)
    }
}

impl<E> From<CodecError> for AppError<E> {
    fn from(e: CodecError) -> Self {
        AppError::Codec(e)
    }
}

/// Builds the idempotency record of a command from the state it produced.
pub type Remember<'a, S> = &'a (dyn Fn(&S, i64) -> IdempotencyRecord + Send + Sync);

/// The command side of the service.
#[derive(Clone)]
pub struct Commands {
    /// The sealing store (`store::sealed`): personal fields are encrypted on
    /// append and opened on read, out of the domain's sight.
    store: Arc<dyn EventStore>,
    states: StateCache,
    /// What the replier read of each conversation for its last prompt.
    histories: histories::Histories,
    keyring: Keyring,
    /// Accounts the store said exist, for [`users::ACCOUNT_RECHECK`] (`account_exists`).
    accounts: moka::sync::Cache<Uuid, ()>,
}

impl Commands {
    /// Commands on `store` (the real one: it is wrapped in the sealing store
    /// here), with users' keys in `keyring`.
    pub fn new(store: Arc<dyn EventStore>, states: StateCache, keyring: Keyring) -> Self {
        Self {
            store: Arc::new(SealedStore::new(store, keyring.clone())),
            states,
            histories: histories::Histories::new(histories::HISTORY_BYTES),
            keyring,
            accounts: users::recently_seen_accounts(),
        }
    }

    /// A stream folded into its decider's state: the cached state, if any, and
    /// the events after it (usually none, or the one just appended elsewhere).
    pub async fn load<D: Decider>(&self, stream_id: Uuid) -> Result<Loaded<D::State>, ReadError>
    where
        D::State: Weigh,
    {
        let cached = self.states.get::<D::State>(stream_id);
        let known = cached.is_some();
        let cached = cached.unwrap_or_default();
        let asked = self.states.asking();
        let tail = self
            .store
            .read_payloads_from(stream_id, cached.version)
            .await?;
        if tail.is_empty() {
            if known {
                self.states.confirm(stream_id, cached.version, asked);
            } else {
                // Remembered even while empty: the command that creates it
                // (a reply's start) is then decided without a second read.
                self.states.put(stream_id, &cached, asked);
            }
            return Ok(cached);
        }
        // The id of another kind of stream (a user's id sent as an assistant's)
        // names nothing of this kind: the decider sees no stream, and refuses
        // as it refuses any unknown id, instead of failing to decode its events.
        if tail.iter().any(|p| p.stream_type != D::STREAM_TYPE) {
            return Ok(Loaded::default());
        }
        let loaded = fold::<D>(cached, tail)?;
        self.states.put(stream_id, &loaded, asked);
        Ok(loaded)
    }

    /// Decide `command` on the stream's current state and append what it decided.
    ///
    /// The first decision is made on the cached state, if there is one, without
    /// reading the store: the append's expected version is the check that it is
    /// current, and a cache that fell behind (another process wrote) is a
    /// version conflict, decided again on a fresh load. Only events prove the
    /// cache current, so a refusal or a decision to change nothing made on it is
    /// made again on a fresh load before it is answered.
    ///
    /// With [`Expected::Any`] a lost race is re-decided on the new state (the rules
    /// are checked again, after reading only the events that won); with
    /// [`Expected::Exactly`] it is a precondition failure. `reservation` is claimed
    /// with the events; `remember` builds the response to keep for an idempotency
    /// key, written in the same transaction.
    pub async fn execute<D: Decider>(
        &self,
        stream_id: Uuid,
        expected: Expected,
        command: &D::Command,
        context: &CommandContext,
        reservation: Option<Reservation>,
        remember: Option<Remember<'_, D::State>>,
    ) -> Result<Decided<D::State>, AppError<D::Error>>
    where
        D::State: Weigh,
    {
        let metadata = EventMetadata {
            correlation_id: context.correlation_id.clone(),
            causation_id: context.causation_id,
            user_id: context.user_id,
            idempotency_key: context.idempotency_key.clone(),
        };
        let mut lost_races = 0;
        let mut cached = match expected {
            Expected::New => None,
            Expected::Any | Expected::Exactly(_) => self.states.get::<D::State>(stream_id),
        };
        loop {
            // At most one decision per command is made on the cache.
            let on_cache = cached.is_some();
            let Loaded {
                state,
                version,
                position,
            } = match (cached.take(), expected) {
                (Some(cached), _) => cached,
                (None, Expected::New) => Loaded::default(),
                (None, _) => self.load::<D>(stream_id).await?,
            };
            if let Expected::Exactly(v) = expected
                && v != version
            {
                if on_cache {
                    continue;
                }
                return Err(AppError::PreconditionFailed { current: version });
            }
            let events = match D::decide(command, &state) {
                Ok(events) if events.is_empty() && on_cache => continue,
                Ok(events) => events,
                Err(_) if on_cache => continue,
                Err(refused) => return Err(AppError::Domain(refused)),
            };
            let new_version = version + events.len() as i64;
            let new_state = events.iter().fold(state, |s, e| D::evolve(s, e));
            let record = remember.map(|f| f(&new_state, new_version));
            if events.is_empty() {
                if let Some(record) = record
                    && !self.store.remember_idempotency(record).await?
                {
                    return Err(AppError::IdempotencyKeyTaken);
                }
                return Ok(Decided {
                    state: new_state,
                    version,
                    position,
                });
            }
            let request = AppendRequest {
                stream_id,
                stream_type: D::STREAM_TYPE,
                expected_version: version,
                events: events
                    .iter()
                    .map(|e| codec::encode(e, &metadata))
                    .collect::<Result<_, _>>()?,
                reservation: reservation.clone(),
                idempotency: record,
                user_key: None,
            };
            let asked = self.states.asking();
            match self.store.append(request).await {
                Ok(appended) => {
                    let decided = Decided {
                        state: new_state,
                        version: appended.version,
                        position: Some(appended.position),
                    };
                    self.states.put(stream_id, &decided, asked);
                    return Ok(decided);
                }
                // The cache was behind: not a race lost, only a load skipped.
                Err(AppendError::VersionConflict { .. }) if on_cache => {}
                Err(AppendError::VersionConflict { .. }) => match expected {
                    Expected::Any => {
                        lost_races += 1;
                        if lost_races == CONFLICT_ATTEMPTS {
                            return Err(AppError::Contended);
                        }
                        // Step aside briefly so the writers that lost together spread out.
                        tokio::time::sleep(std::time::Duration::from_millis(u64::from(lost_races)))
                            .await;
                    }
                    Expected::Exactly(_) | Expected::New => {
                        let current = self.load::<D>(stream_id).await?.version;
                        return Err(AppError::PreconditionFailed { current });
                    }
                },
                Err(AppendError::ReservationTaken { scope }) => {
                    return Err(AppError::ReservationTaken { scope });
                }
                Err(AppendError::IdempotencyKeyTaken) => return Err(AppError::IdempotencyKeyTaken),
                Err(AppendError::Empty) => unreachable!("events checked non-empty above"),
                Err(AppendError::OwnerForgotten { .. }) => return Err(AppError::OwnerForgotten),
                Err(e @ AppendError::Unsealable { .. }) => {
                    return Err(AppError::Internal(e.into()));
                }
                Err(AppendError::Database(e)) => return Err(e.into()),
            }
        }
    }

    /// Open the sealed personal fields of an event's payload as it came from
    /// the bus (what the store gives through `Commands` is open already).
    pub async fn open(
        &self,
        event_id: Uuid,
        data: &mut serde_json::Value,
    ) -> Result<(), StoreError> {
        self.keyring.open(event_id, data).await
    }

    /// The first response stored for an idempotency key, with its request hash.
    pub async fn find_idempotency(
        &self,
        owner: Uuid,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredResponse)>, StoreError> {
        self.store.find_idempotency(owner, key).await
    }

    /// Can the event store be reached?
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    /// Delete the idempotency keys that have expired; how many.
    pub async fn expire_idempotency_keys(&self) -> Result<u64, StoreError> {
        self.store.expire_idempotency_keys().await
    }

    /// The last event in commit order, and how far a position is behind it (for
    /// operators: the projections' lag).
    pub async fn head(&self) -> Result<Option<Position>, StoreError> {
        self.store.head().await
    }

    pub async fn behind(&self, after: Position, limit: i64) -> Result<Behind, StoreError> {
        self.store.behind(after, limit).await
    }
}

/// Fold stored events onto a state.
fn fold<D: Decider>(
    mut loaded: Loaded<D::State>,
    events: Vec<StoredPayload>,
) -> Result<Loaded<D::State>, CodecError> {
    for payload in events {
        loaded.state = D::evolve(loaded.state, &codec::decode_payload::<D::Event>(&payload)?);
        loaded.version = payload.version;
        loaded.position = Some(payload.position);
    }
    Ok(loaded)
}
