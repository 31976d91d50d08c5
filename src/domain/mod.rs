//! The domain: pure deciders for users, assistants, conversations and replies.
//!
//! Each aggregate is a [`Decider`]: `decide` holds every business rule and turns a
//! command into events (or refuses it), `evolve` only applies facts to the state.
//! Nothing here does IO or reads a clock: ids, timestamps and anything learned from
//! another aggregate arrive inside the command, so every rule is a unit test away.

pub mod assistant;
pub mod conversation;
pub mod reply;
pub mod user;
mod validate;

use serde::{Serialize, de::DeserializeOwned};

pub use validate::FieldError;

/// What kind of refusal a domain error is: the HTTP layer maps each to a status
/// code (422, 404, 409), without knowing any decider's error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// One or more fields break their rules.
    Invalid,
    /// The aggregate (or one it needs) does not exist, was deleted, or belongs
    /// to someone else.
    NotFound,
    /// The command contradicts the aggregate's current state.
    Conflict,
}

/// A decider's refusal. Each decider has its own enum, so callers match the
/// exact reason (the replier's "reply already ended") and tests compare
/// variants; `kind` is all that the HTTP layer needs.
pub trait DomainError: std::error::Error + Clone + PartialEq + Send + Sync + 'static {
    fn kind(&self) -> ErrorKind;

    /// The broken field rules, for an [`ErrorKind::Invalid`] refusal.
    fn field_errors(&self) -> &[FieldError] {
        &[]
    }
}

/// An aggregate's decision logic, in the shape of fmodel's decider.
pub trait Decider {
    type Command: Send + Sync + 'static;
    type Event: Serialize + DeserializeOwned + Clone + std::fmt::Debug + Send + Sync;
    type State: Default + Clone + std::fmt::Debug + Send + Sync + 'static;
    type Error: DomainError;

    /// The `stream_type` of this aggregate's streams in the event store.
    const STREAM_TYPE: &'static str;

    /// Every rule lives here: accept the command as new events, or refuse it.
    fn decide(
        command: &Self::Command,
        state: &Self::State,
    ) -> Result<Vec<Self::Event>, Self::Error>;

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
) -> Result<Vec<D::Event>, D::Error> {
    D::decide(when, &D::fold(given))
}
