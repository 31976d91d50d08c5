//! An assistant's reply to one user message, as the replier works on it: taken
//! up (again after a crash or a redelivery), then ended exactly once, completed
//! or failed.
//!
//! Each reply is a stream of its own (`stream_type` `reply`, the reply id as
//! stream id), not part of its conversation's stream: the replier then never
//! races the user for the conversation's next version, and a reply's state is
//! three facts at most, whatever the length of the conversation. Every event
//! names its conversation (`conversation_id`), so the read side and the live
//! feed still see replies per conversation. The request itself
//! (`ReplyRequested`) stays in the conversation, appended with the message it
//! answers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Decider, DomainError, ErrorKind};

/// Tokens of one reply, as the provider bills them: `prompt_tokens +
/// completion_tokens = total_tokens`. The two details are parts of those, not
/// additions: thinking is billed as output, cached prompt tokens are still prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of `completion_tokens`, those the model spent thinking before it answered.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub thoughts_tokens: u64,
    /// Of `prompt_tokens`, those served from the provider's context cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone)]
pub enum ReplyCommand {
    /// The replier begins (or, after a crash or redelivery, begins again) a reply.
    Start {
        reply_id: Uuid,
        conversation_id: Uuid,
        attempt: u32,
        at: DateTime<Utc>,
    },
    /// The replier's answer. Refused once the reply has ended: one ending per reply.
    Complete {
        reply_id: Uuid,
        content: String,
        model: String,
        finish_reason: String,
        usage: Usage,
        latency_ms: u64,
        at: DateTime<Utc>,
    },
    /// The replier gave up. Refused once the reply has ended, like `Complete`.
    Fail {
        reply_id: Uuid,
        error: String,
        retryable: bool,
        attempts: u32,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ReplyEvent {
    /// The replier took the reply up (`attempt` counts deliveries, from 1).
    ReplyStarted {
        reply_id: Uuid,
        conversation_id: Uuid,
        attempt: u32,
        started_at: DateTime<Utc>,
    },
    ReplyCompleted {
        reply_id: Uuid,
        conversation_id: Uuid,
        content: String,
        model: String,
        finish_reason: String,
        usage: Usage,
        latency_ms: u64,
        completed_at: DateTime<Utc>,
    },
    ReplyFailed {
        reply_id: Uuid,
        conversation_id: Uuid,
        error: String,
        retryable: bool,
        attempts: u32,
        failed_at: DateTime<Utc>,
    },
}

/// All the rules need: whether the reply was taken up, and whether it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReplyState {
    #[default]
    Untouched,
    Started {
        conversation_id: Uuid,
    },
    Ended {
        conversation_id: Uuid,
    },
}

/// Why a reply command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Completed or failed already (a redelivery, or another replier was first).
    #[error("the reply has already ended")]
    AlreadyEnded,
    /// An ending for a reply nobody took up.
    #[error("the reply was never started")]
    NotStarted,
}

impl DomainError for ReplyError {
    fn kind(&self) -> ErrorKind {
        match self {
            ReplyError::AlreadyEnded => ErrorKind::Conflict,
            ReplyError::NotStarted => ErrorKind::NotFound,
        }
    }
}

pub struct ReplyDecider;

impl Decider for ReplyDecider {
    type Command = ReplyCommand;
    type Event = ReplyEvent;
    type State = ReplyState;
    type Error = ReplyError;
    const STREAM_TYPE: &'static str = ai_secretary_contract::REPLY;

    fn decide(command: &ReplyCommand, state: &ReplyState) -> Result<Vec<ReplyEvent>, ReplyError> {
        use ReplyCommand as C;
        use ReplyEvent as E;
        let started = match *state {
            ReplyState::Ended { .. } => return Err(ReplyError::AlreadyEnded),
            ReplyState::Started { conversation_id } => Some(conversation_id),
            ReplyState::Untouched => None,
        };
        Ok(vec![match command {
            C::Start {
                reply_id,
                conversation_id,
                attempt,
                at,
            } => E::ReplyStarted {
                reply_id: *reply_id,
                conversation_id: *conversation_id,
                attempt: *attempt,
                started_at: *at,
            },
            C::Complete {
                reply_id,
                content,
                model,
                finish_reason,
                usage,
                latency_ms,
                at,
            } => E::ReplyCompleted {
                reply_id: *reply_id,
                conversation_id: started.ok_or(ReplyError::NotStarted)?,
                content: content.clone(),
                model: model.clone(),
                finish_reason: finish_reason.clone(),
                usage: *usage,
                latency_ms: *latency_ms,
                completed_at: *at,
            },
            C::Fail {
                reply_id,
                error,
                retryable,
                attempts,
                at,
            } => E::ReplyFailed {
                reply_id: *reply_id,
                conversation_id: started.ok_or(ReplyError::NotStarted)?,
                error: error.clone(),
                retryable: *retryable,
                attempts: *attempts,
                failed_at: *at,
            },
        }])
    }

    fn evolve(_state: ReplyState, event: &ReplyEvent) -> ReplyState {
        match *event {
            ReplyEvent::ReplyStarted {
                conversation_id, ..
            } => ReplyState::Started { conversation_id },
            ReplyEvent::ReplyCompleted {
                conversation_id, ..
            }
            | ReplyEvent::ReplyFailed {
                conversation_id, ..
            } => ReplyState::Ended { conversation_id },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::given_when;

    const REPLY: Uuid = Uuid::from_u128(31);
    const CONVERSATION: Uuid = Uuid::from_u128(20);

    fn at() -> DateTime<Utc> {
        "2026-05-06T07:08:09Z".parse().unwrap()
    }

    fn start(attempt: u32) -> ReplyCommand {
        ReplyCommand::Start {
            reply_id: REPLY,
            conversation_id: CONVERSATION,
            attempt,
            at: at(),
        }
    }

    fn complete() -> ReplyCommand {
        ReplyCommand::Complete {
            reply_id: REPLY,
            content: "Done".into(),
            model: "m".into(),
            finish_reason: "STOP".into(),
            usage: Usage::default(),
            latency_ms: 1,
            at: at(),
        }
    }

    fn fail() -> ReplyCommand {
        ReplyCommand::Fail {
            reply_id: REPLY,
            error: "rate limited".into(),
            retryable: true,
            attempts: 3,
            at: at(),
        }
    }

    fn started(attempt: u32) -> ReplyEvent {
        ReplyEvent::ReplyStarted {
            reply_id: REPLY,
            conversation_id: CONVERSATION,
            attempt,
            started_at: at(),
        }
    }

    #[test]
    fn a_reply_can_start_again_and_again_until_it_ends() {
        assert_eq!(
            given_when::<ReplyDecider>(&[], &start(1)),
            Ok(vec![started(1)])
        );
        // A crash after starting: the redelivery starts it again, then ends it.
        assert_eq!(
            given_when::<ReplyDecider>(&[started(1)], &start(2)),
            Ok(vec![started(2)])
        );
        let ended = given_when::<ReplyDecider>(&[started(1), started(2)], &complete()).unwrap();
        assert!(matches!(
            &ended[..],
            [ReplyEvent::ReplyCompleted { conversation_id, .. }] if *conversation_id == CONVERSATION
        ));
    }

    #[test]
    fn a_reply_ends_once_whether_completed_or_failed() {
        for ending in [complete(), fail()] {
            let mut given = vec![started(1)];
            given.extend(given_when::<ReplyDecider>(&given, &ending).unwrap());
            assert_eq!(
                ReplyDecider::fold(&given),
                ReplyState::Ended {
                    conversation_id: CONVERSATION
                }
            );
            for again in [complete(), fail(), start(9)] {
                assert_eq!(
                    given_when::<ReplyDecider>(&given, &again),
                    Err(ReplyError::AlreadyEnded)
                );
            }
        }
    }

    #[test]
    fn an_ending_needs_a_start() {
        assert_eq!(
            given_when::<ReplyDecider>(&[], &complete()),
            Err(ReplyError::NotStarted)
        );
        assert_eq!(
            given_when::<ReplyDecider>(&[], &fail()),
            Err(ReplyError::NotStarted)
        );
    }
}
