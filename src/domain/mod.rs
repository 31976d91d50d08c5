//! The domain: pure deciders for users, assistants and conversations.
//!
//! Each aggregate is a [`Decider`]: `decide` holds every business rule and turns a
//! command into events (or refuses it), `evolve` only applies facts to the state.
//! Nothing here does IO or reads a clock: ids, timestamps and anything learned from
//! another aggregate arrive inside the command, so every rule is a unit test away.

pub mod assistant;
pub mod conversation;
pub mod user;
mod validate;

use serde::{Serialize, de::DeserializeOwned};

pub use validate::FieldError;

/// Why a command was refused. The HTTP layer maps each kind to a status code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DomainError {
    /// One or more fields break their rules (422).
    #[error("validation failed")]
    Invalid(Vec<FieldError>),
    /// The aggregate does not exist, was deleted, or belongs to someone else (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The command contradicts the aggregate's current state (409).
    #[error("{0}")]
    Conflict(String),
}

/// An aggregate's decision logic, in the shape of fmodel's decider.
pub trait Decider {
    type Command;
    type Event: Serialize + DeserializeOwned + Clone + std::fmt::Debug + Send + Sync;
    type State: Default + Clone + std::fmt::Debug + Send + Sync;

    /// The `stream_type` of this aggregate's streams in the event store.
    const STREAM_TYPE: &'static str;

    /// Every rule lives here: accept the command as new events, or refuse it.
    fn decide(
        command: &Self::Command,
        state: &Self::State,
    ) -> Result<Vec<Self::Event>, DomainError>;

    /// Apply one fact. Never refuses: events are what already happened.
    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;

    /// Fold a history into its state.
    fn fold<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self::State
    where
        Self::Event: 'a,
    {
        events
            .into_iter()
            .fold(Self::State::default(), Self::evolve)
    }
}

/// Given/when/then for decider unit tests: fold `given`, decide `when`.
#[cfg(test)]
pub(crate) fn given_when<D: Decider>(
    given: &[D::Event],
    when: &D::Command,
) -> Result<Vec<D::Event>, DomainError> {
    D::decide(when, &D::fold(given))
}
