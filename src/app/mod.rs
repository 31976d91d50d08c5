//! Command handling: load a stream, fold it, decide, append. The one place where
//! the domain meets the store, shared by the HTTP API and the replier.

use std::sync::Arc;

use uuid::Uuid;

use crate::{
    domain::{Decider, DomainError},
    store::{
        AppendError, AppendRequest, EventMetadata, EventStore, IdempotencyRecord, Position,
        Reservation, StoreError,
        codec::{self, CodecError},
    },
};

/// How many times a command without `If-Match` is decided before giving up on a
/// contended stream. Each round has a winner, so this many concurrent writers on
/// one stream all get through.
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
}

/// A stream folded into its state.
#[derive(Debug, Clone)]
pub struct Loaded<S> {
    pub state: S,
    pub version: i64,
    /// Position of the stream's last event.
    pub position: Option<Position>,
}

/// The result of a command.
#[derive(Debug, Clone)]
pub struct Decided<S> {
    pub state: S,
    pub version: i64,
    /// Position of the stream's last event: the one just appended, or the one the
    /// decision was made on when the command changed nothing.
    pub position: Option<Position>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the stream is at version {current}")]
    PreconditionFailed { current: i64 },
    #[error("too many concurrent changes; try again")]
    Contended,
    #[error("{scope} is already taken")]
    ReservationTaken { scope: &'static str },
    #[error("idempotency key already used")]
    IdempotencyKeyTaken,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Builds the idempotency record of a command from the state it produced.
pub type Remember<'a, S> = &'a (dyn Fn(&S, i64) -> IdempotencyRecord + Send + Sync);

/// The command side of the service.
#[derive(Clone)]
pub struct Commands {
    store: Arc<dyn EventStore>,
}

impl Commands {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Read a stream and fold it into the decider's state.
    pub async fn load<D: Decider>(&self, stream_id: Uuid) -> Result<Loaded<D::State>, AppError> {
        let recorded = self.store.read_stream(stream_id).await?;
        let mut state = D::State::default();
        for r in &recorded {
            state = D::evolve(state, &codec::decode::<D::Event>(r)?);
        }
        Ok(Loaded {
            state,
            version: recorded.last().map_or(0, |r| r.version),
            position: recorded.last().map(|r| r.position),
        })
    }

    /// Decide `command` on the stream's current state and append what it decided.
    ///
    /// With [`Expected::Any`] a lost race is re-decided on the new state (the rules
    /// are checked again); with [`Expected::Exactly`] it is a precondition failure.
    /// `reservation` is claimed with the events; `remember` builds the response to
    /// keep for an idempotency key, written in the same transaction.
    pub async fn execute<D: Decider>(
        &self,
        stream_id: Uuid,
        expected: Expected,
        command: &D::Command,
        context: &CommandContext,
        reservation: Option<Reservation>,
        remember: Option<Remember<'_, D::State>>,
    ) -> Result<Decided<D::State>, AppError> {
        let metadata = EventMetadata {
            correlation_id: context.correlation_id.clone(),
            causation_id: context.causation_id,
            user_id: context.user_id,
            idempotency_key: context.idempotency_key.clone(),
        };
        for attempt in 0..CONFLICT_ATTEMPTS {
            if attempt > 0 {
                // Step aside briefly so the writers that lost together spread out.
                tokio::time::sleep(std::time::Duration::from_millis(u64::from(attempt))).await;
            }
            let Loaded {
                state,
                version,
                position,
            } = self.load::<D>(stream_id).await?;
            if let Expected::Exactly(v) = expected
                && v != version
            {
                return Err(AppError::PreconditionFailed { current: version });
            }
            let events = D::decide(command, &state)?;
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
            };
            match self.store.append(request).await {
                Ok(appended) => {
                    return Ok(Decided {
                        state: new_state,
                        version: appended.version,
                        position: Some(appended.position),
                    });
                }
                Err(AppendError::VersionConflict { .. }) => match expected {
                    Expected::Any => continue,
                    Expected::Exactly(_) => {
                        let current = self.load::<D>(stream_id).await?.version;
                        return Err(AppError::PreconditionFailed { current });
                    }
                },
                Err(AppendError::ReservationTaken { scope }) => {
                    return Err(AppError::ReservationTaken { scope });
                }
                Err(AppendError::IdempotencyKeyTaken) => return Err(AppError::IdempotencyKeyTaken),
                Err(AppendError::Empty) => unreachable!("events checked non-empty above"),
                Err(AppendError::Database(e)) => return Err(e.into()),
            }
        }
        Err(AppError::Contended)
    }
}
