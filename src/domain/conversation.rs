//! A conversation between a user and one of their assistants: its title and
//! status, the user's messages and the replies they request. Replies are answered
//! later by the replier; this aggregate records that they were asked for and how
//! they ended, and refuses a second ending for the same reply.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    Decider, DomainError,
    assistant::{AssistantState, AssistantStatus},
    validate::Violations,
};

pub const DEFAULT_TITLE: &str = "New conversation";
pub const CONTENT_MAX_CHARS: usize = 32_000;

#[derive(Debug, Clone)]
pub enum ConversationCommand {
    Start {
        conversation_id: Uuid,
        actor: Uuid,
        /// The assistant as its own stream knows it, loaded by the caller.
        assistant: AssistantState,
        title: Option<String>,
        at: DateTime<Utc>,
    },
    Rename {
        actor: Uuid,
        title: String,
        at: DateTime<Utc>,
    },
    Archive {
        actor: Uuid,
        at: DateTime<Utc>,
    },
    /// A user message, and the reply it asks the assistant for.
    PostMessage {
        actor: Uuid,
        message_id: Uuid,
        reply_id: Uuid,
        content: String,
        at: DateTime<Utc>,
    },
    /// The replier begins (or, after a crash or redelivery, begins again) a reply.
    StartReply {
        reply_id: Uuid,
        attempt: u32,
        at: DateTime<Utc>,
    },
    /// The replier's answer. Refused once the reply has ended: one ending per reply.
    CompleteReply {
        reply_id: Uuid,
        content: String,
        model: String,
        finish_reason: String,
        usage: Usage,
        latency_ms: u64,
        at: DateTime<Utc>,
    },
    /// The replier gave up. Refused once the reply has ended, like `CompleteReply`.
    FailReply {
        reply_id: Uuid,
        error: String,
        retryable: bool,
        attempts: u32,
        at: DateTime<Utc>,
    },
}

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ConversationEvent {
    ConversationStarted {
        conversation_id: Uuid,
        owner_id: Uuid,
        assistant_id: Uuid,
        title: String,
        started_at: DateTime<Utc>,
    },
    ConversationRenamed {
        title: String,
        renamed_at: DateTime<Utc>,
    },
    ConversationArchived {
        archived_at: DateTime<Utc>,
    },
    MessagePosted {
        message_id: Uuid,
        content: String,
        posted_at: DateTime<Utc>,
    },
    ReplyRequested {
        reply_id: Uuid,
        reply_to: Uuid,
        assistant_id: Uuid,
        requested_at: DateTime<Utc>,
    },
    /// The replier took the reply up (`attempt` counts deliveries, from 1).
    ReplyStarted {
        reply_id: Uuid,
        attempt: u32,
        started_at: DateTime<Utc>,
    },
    ReplyCompleted {
        reply_id: Uuid,
        content: String,
        model: String,
        finish_reason: String,
        usage: Usage,
        latency_ms: u64,
        completed_at: DateTime<Utc>,
    },
    ReplyFailed {
        reply_id: Uuid,
        error: String,
        retryable: bool,
        attempts: u32,
        failed_at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationStatus {
    Active,
    Archived,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum ConversationState {
    #[default]
    Absent,
    /// Boxed: a conversation is large beside `Absent`.
    Live(Box<Conversation>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub assistant_id: Uuid,
    pub title: String,
    pub status: ConversationStatus,
    /// User messages and replies alike (a reply counts once it is requested).
    pub message_count: u64,
    pub last_message_at: Option<DateTime<Utc>>,
    pub usage: Usage,
    /// Replies requested and not yet completed or failed.
    pub pending_replies: BTreeSet<Uuid>,
    /// Replies that completed or failed: a second ending is refused.
    pub ended_replies: BTreeSet<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ConversationState {
    fn owned_by(&self, actor: Uuid) -> Result<&Conversation, DomainError> {
        match self {
            ConversationState::Live(c) if c.owner_id == actor => Ok(c),
            _ => Err(DomainError::NotFound("conversation")),
        }
    }

    /// The replier's commands act on a requested reply that has not ended. They
    /// come from the system, not a user: no owner check.
    fn pending_reply(&self, reply_id: Uuid) -> Result<&Conversation, DomainError> {
        let ConversationState::Live(c) = self else {
            return Err(DomainError::NotFound("conversation"));
        };
        if c.ended_replies.contains(&reply_id) {
            return Err(DomainError::Conflict(format!(
                "reply {reply_id} has already ended"
            )));
        }
        if !c.pending_replies.contains(&reply_id) {
            return Err(DomainError::NotFound("reply"));
        }
        Ok(c)
    }

    /// Whether a reply completed or failed (the replier's "already done").
    pub fn reply_ended(&self, reply_id: Uuid) -> bool {
        matches!(self, ConversationState::Live(c) if c.ended_replies.contains(&reply_id))
    }
}

pub struct ConversationDecider;

impl Decider for ConversationDecider {
    type Command = ConversationCommand;
    type Event = ConversationEvent;
    type State = ConversationState;
    const STREAM_TYPE: &'static str = "conversation";

    fn decide(
        command: &ConversationCommand,
        state: &ConversationState,
    ) -> Result<Vec<ConversationEvent>, DomainError> {
        use ConversationCommand as C;
        use ConversationEvent as E;
        match command {
            C::Start {
                conversation_id,
                actor,
                assistant,
                title,
                at,
            } => {
                if !matches!(state, ConversationState::Absent) {
                    return Err(DomainError::Conflict("conversation already exists".into()));
                }
                let assistant = assistant.owned_by(*actor)?;
                if assistant.status == AssistantStatus::Archived {
                    return Err(DomainError::Conflict(
                        "the assistant is archived: restore it to start a conversation".into(),
                    ));
                }
                let title = title.as_deref().unwrap_or(DEFAULT_TITLE).trim().to_owned();
                let mut v = Violations::default();
                v.chars("/title", &title, 1, 200);
                v.finish()?;
                Ok(vec![E::ConversationStarted {
                    conversation_id: *conversation_id,
                    owner_id: *actor,
                    assistant_id: assistant.id,
                    title,
                    started_at: *at,
                }])
            }
            C::Rename { actor, title, at } => {
                let current = state.owned_by(*actor)?;
                let title = title.trim();
                let mut v = Violations::default();
                v.chars("/title", title, 1, 200);
                v.finish()?;
                Ok(if title == current.title {
                    vec![]
                } else {
                    vec![E::ConversationRenamed {
                        title: title.to_owned(),
                        renamed_at: *at,
                    }]
                })
            }
            C::Archive { actor, at } => Ok(match state.owned_by(*actor)?.status {
                ConversationStatus::Archived => vec![],
                ConversationStatus::Active => vec![E::ConversationArchived { archived_at: *at }],
            }),
            C::PostMessage {
                actor,
                message_id,
                reply_id,
                content,
                at,
            } => {
                let current = state.owned_by(*actor)?;
                let mut v = Violations::default();
                v.chars("/content", content, 1, CONTENT_MAX_CHARS);
                v.not_blank("/content", content);
                v.finish()?;
                if current.status == ConversationStatus::Archived {
                    return Err(DomainError::Conflict(
                        "the conversation is archived: no new messages".into(),
                    ));
                }
                Ok(vec![
                    E::MessagePosted {
                        message_id: *message_id,
                        content: content.clone(),
                        posted_at: *at,
                    },
                    E::ReplyRequested {
                        reply_id: *reply_id,
                        reply_to: *message_id,
                        assistant_id: current.assistant_id,
                        requested_at: *at,
                    },
                ])
            }
            C::StartReply {
                reply_id,
                attempt,
                at,
            } => {
                state.pending_reply(*reply_id)?;
                Ok(vec![E::ReplyStarted {
                    reply_id: *reply_id,
                    attempt: *attempt,
                    started_at: *at,
                }])
            }
            C::CompleteReply {
                reply_id,
                content,
                model,
                finish_reason,
                usage,
                latency_ms,
                at,
            } => {
                state.pending_reply(*reply_id)?;
                Ok(vec![E::ReplyCompleted {
                    reply_id: *reply_id,
                    content: content.clone(),
                    model: model.clone(),
                    finish_reason: finish_reason.clone(),
                    usage: *usage,
                    latency_ms: *latency_ms,
                    completed_at: *at,
                }])
            }
            C::FailReply {
                reply_id,
                error,
                retryable,
                attempts,
                at,
            } => {
                state.pending_reply(*reply_id)?;
                Ok(vec![E::ReplyFailed {
                    reply_id: *reply_id,
                    error: error.clone(),
                    retryable: *retryable,
                    attempts: *attempts,
                    failed_at: *at,
                }])
            }
        }
    }

    fn evolve(state: ConversationState, event: &ConversationEvent) -> ConversationState {
        use ConversationEvent as E;
        let mut c = match (state, event) {
            (
                _,
                E::ConversationStarted {
                    conversation_id,
                    owner_id,
                    assistant_id,
                    title,
                    started_at,
                },
            ) => {
                return ConversationState::Live(Box::new(Conversation {
                    id: *conversation_id,
                    owner_id: *owner_id,
                    assistant_id: *assistant_id,
                    title: title.clone(),
                    status: ConversationStatus::Active,
                    message_count: 0,
                    last_message_at: None,
                    usage: Usage::default(),
                    pending_replies: BTreeSet::new(),
                    ended_replies: BTreeSet::new(),
                    created_at: *started_at,
                    updated_at: *started_at,
                }));
            }
            (ConversationState::Live(c), _) => c,
            // Nothing but a start can open a conversation.
            (ConversationState::Absent, _) => return ConversationState::Absent,
        };
        match event {
            E::ConversationStarted { .. } => unreachable!("handled above"),
            E::ConversationRenamed { title, renamed_at } => {
                c.title.clone_from(title);
                c.updated_at = *renamed_at;
            }
            E::ConversationArchived { archived_at } => {
                c.status = ConversationStatus::Archived;
                c.updated_at = *archived_at;
            }
            E::MessagePosted { posted_at, .. } => {
                c.message_count += 1;
                c.last_message_at = Some(*posted_at);
                c.updated_at = *posted_at;
            }
            E::ReplyRequested {
                reply_id,
                requested_at,
                ..
            } => {
                c.message_count += 1;
                c.pending_replies.insert(*reply_id);
                c.updated_at = *requested_at;
            }
            E::ReplyCompleted {
                reply_id,
                usage,
                completed_at,
                ..
            } => {
                c.pending_replies.remove(reply_id);
                c.ended_replies.insert(*reply_id);
                c.usage.prompt_tokens += usage.prompt_tokens;
                c.usage.completion_tokens += usage.completion_tokens;
                c.usage.total_tokens += usage.total_tokens;
                c.last_message_at = Some(*completed_at);
                c.updated_at = *completed_at;
            }
            E::ReplyFailed {
                reply_id,
                failed_at,
                ..
            } => {
                c.pending_replies.remove(reply_id);
                c.ended_replies.insert(*reply_id);
                c.updated_at = *failed_at;
            }
            // Being worked on changes nothing the rules look at.
            E::ReplyStarted { .. } => {}
        }
        ConversationState::Live(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        assistant::{AssistantDecider, AssistantEvent},
        given_when,
    };

    const OWNER: Uuid = Uuid::from_u128(1);
    const STRANGER: Uuid = Uuid::from_u128(2);
    const ASSISTANT: Uuid = Uuid::from_u128(10);
    const ID: Uuid = Uuid::from_u128(20);
    const MESSAGE: Uuid = Uuid::from_u128(30);
    const REPLY: Uuid = Uuid::from_u128(31);

    fn at() -> DateTime<Utc> {
        "2026-05-06T07:08:09Z".parse().unwrap()
    }

    fn assistant(extra: &[AssistantEvent]) -> AssistantState {
        let created = AssistantEvent::AssistantCreated {
            assistant_id: ASSISTANT,
            owner_id: OWNER,
            name: "Mika".into(),
            role: "secretary".into(),
            instructions: String::new(),
            model: "m".into(),
            temperature: 0.7,
            metadata: Default::default(),
            created_at: at(),
        };
        AssistantDecider::fold(std::iter::once(&created).chain(extra))
    }

    fn start(assistant: AssistantState, title: Option<&str>) -> ConversationCommand {
        ConversationCommand::Start {
            conversation_id: ID,
            actor: OWNER,
            assistant,
            title: title.map(Into::into),
            at: at(),
        }
    }

    fn started() -> ConversationEvent {
        ConversationEvent::ConversationStarted {
            conversation_id: ID,
            owner_id: OWNER,
            assistant_id: ASSISTANT,
            title: DEFAULT_TITLE.into(),
            started_at: at(),
        }
    }

    fn post(actor: Uuid, content: &str) -> ConversationCommand {
        ConversationCommand::PostMessage {
            actor,
            message_id: MESSAGE,
            reply_id: REPLY,
            content: content.into(),
            at: at(),
        }
    }

    #[test]
    fn start_with_an_active_assistant() {
        assert_eq!(
            given_when::<ConversationDecider>(&[], &start(assistant(&[]), None)),
            Ok(vec![started()])
        );
    }

    #[test]
    fn no_conversation_with_an_archived_assistant() {
        let archived = assistant(&[AssistantEvent::AssistantArchived { archived_at: at() }]);
        assert!(matches!(
            given_when::<ConversationDecider>(&[], &start(archived, None)),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn no_conversation_with_a_deleted_or_missing_or_foreign_assistant() {
        let deleted = assistant(&[AssistantEvent::AssistantDeleted { deleted_at: at() }]);
        for state in [deleted, AssistantState::Absent] {
            assert_eq!(
                given_when::<ConversationDecider>(&[], &start(state, None)),
                Err(DomainError::NotFound("assistant"))
            );
        }
        let foreign = ConversationCommand::Start {
            conversation_id: ID,
            actor: STRANGER,
            assistant: assistant(&[]),
            title: None,
            at: at(),
        };
        assert_eq!(
            given_when::<ConversationDecider>(&[], &foreign),
            Err(DomainError::NotFound("assistant"))
        );
    }

    #[test]
    fn title_is_validated() {
        let err = given_when::<ConversationDecider>(&[], &start(assistant(&[]), Some("  ")));
        assert!(matches!(err, Err(DomainError::Invalid(e)) if e[0].pointer == "/title"));
    }

    #[test]
    fn posting_records_the_message_and_requests_a_reply() {
        let events = given_when::<ConversationDecider>(&[started()], &post(OWNER, "Book a room"));
        assert_eq!(
            events,
            Ok(vec![
                ConversationEvent::MessagePosted {
                    message_id: MESSAGE,
                    content: "Book a room".into(),
                    posted_at: at(),
                },
                ConversationEvent::ReplyRequested {
                    reply_id: REPLY,
                    reply_to: MESSAGE,
                    assistant_id: ASSISTANT,
                    requested_at: at(),
                },
            ])
        );
        let mut given = vec![started()];
        given.extend(events.unwrap());
        let ConversationState::Live(c) = ConversationDecider::fold(&given) else {
            panic!()
        };
        assert_eq!(c.message_count, 2);
        assert!(c.pending_replies.contains(&REPLY));
    }

    #[test]
    fn no_message_to_an_archived_conversation() {
        let archived = ConversationEvent::ConversationArchived { archived_at: at() };
        assert!(matches!(
            given_when::<ConversationDecider>(&[started(), archived], &post(OWNER, "hi")),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn content_length_is_bounded() {
        for bad in [
            String::new(),
            "   ".into(),
            "x".repeat(CONTENT_MAX_CHARS + 1),
        ] {
            let err = given_when::<ConversationDecider>(&[started()], &post(OWNER, &bad));
            assert!(
                matches!(&err, Err(DomainError::Invalid(e)) if e[0].pointer == "/content"),
                "{err:?}"
            );
        }
        let max = "x".repeat(CONTENT_MAX_CHARS);
        assert!(given_when::<ConversationDecider>(&[started()], &post(OWNER, &max)).is_ok());
    }

    #[test]
    fn a_strangers_conversation_is_not_found() {
        assert_eq!(
            given_when::<ConversationDecider>(&[started()], &post(STRANGER, "hi")),
            Err(DomainError::NotFound("conversation"))
        );
    }

    #[test]
    fn rename_to_the_same_title_changes_nothing() {
        let rename = |title: &str| ConversationCommand::Rename {
            actor: OWNER,
            title: title.into(),
            at: at(),
        };
        assert_eq!(
            given_when::<ConversationDecider>(&[started()], &rename(DEFAULT_TITLE)),
            Ok(vec![])
        );
        assert_eq!(
            given_when::<ConversationDecider>(&[started()], &rename("Trip")),
            Ok(vec![ConversationEvent::ConversationRenamed {
                title: "Trip".into(),
                renamed_at: at()
            }])
        );
    }

    #[test]
    fn a_completed_reply_adds_usage_and_clears_pending() {
        let given = [
            started(),
            ConversationEvent::ReplyRequested {
                reply_id: REPLY,
                reply_to: MESSAGE,
                assistant_id: ASSISTANT,
                requested_at: at(),
            },
            ConversationEvent::ReplyCompleted {
                reply_id: REPLY,
                content: "Done".into(),
                model: "m".into(),
                finish_reason: "STOP".into(),
                usage: Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    total_tokens: 5,
                    ..Usage::default()
                },
                latency_ms: 12,
                completed_at: at(),
            },
        ];
        let ConversationState::Live(c) = ConversationDecider::fold(&given) else {
            panic!()
        };
        assert!(c.pending_replies.is_empty());
        assert_eq!(c.usage.total_tokens, 5);
    }

    fn requested() -> ConversationEvent {
        ConversationEvent::ReplyRequested {
            reply_id: REPLY,
            reply_to: MESSAGE,
            assistant_id: ASSISTANT,
            requested_at: at(),
        }
    }

    fn complete() -> ConversationCommand {
        ConversationCommand::CompleteReply {
            reply_id: REPLY,
            content: "Done".into(),
            model: "m".into(),
            finish_reason: "STOP".into(),
            usage: Usage::default(),
            latency_ms: 1,
            at: at(),
        }
    }

    fn fail() -> ConversationCommand {
        ConversationCommand::FailReply {
            reply_id: REPLY,
            error: "rate limited".into(),
            retryable: true,
            attempts: 3,
            at: at(),
        }
    }

    #[test]
    fn a_requested_reply_can_start_again_and_again_until_it_ends() {
        let start = |attempt| ConversationCommand::StartReply {
            reply_id: REPLY,
            attempt,
            at: at(),
        };
        let first = given_when::<ConversationDecider>(&[started(), requested()], &start(1));
        assert_eq!(
            first,
            Ok(vec![ConversationEvent::ReplyStarted {
                reply_id: REPLY,
                attempt: 1,
                started_at: at(),
            }])
        );
        // A crash after starting: the redelivery starts it again.
        let mut given = vec![started(), requested()];
        given.extend(first.unwrap());
        assert!(given_when::<ConversationDecider>(&given, &start(2)).is_ok());
        assert!(given_when::<ConversationDecider>(&given, &complete()).is_ok());
    }

    #[test]
    fn a_reply_ends_once_whether_completed_or_failed() {
        let completed = given_when::<ConversationDecider>(&[started(), requested()], &complete())
            .unwrap()
            .remove(0);
        let failed = given_when::<ConversationDecider>(&[started(), requested()], &fail())
            .unwrap()
            .remove(0);
        assert!(matches!(
            failed,
            ConversationEvent::ReplyFailed { attempts: 3, .. }
        ));
        for ending in [completed, failed] {
            let given = [started(), requested(), ending];
            assert!(ConversationDecider::fold(&given).reply_ended(REPLY));
            for again in [complete(), fail()] {
                assert!(matches!(
                    given_when::<ConversationDecider>(&given, &again),
                    Err(DomainError::Conflict(m)) if m.contains("already ended")
                ));
            }
            let restart = ConversationCommand::StartReply {
                reply_id: REPLY,
                attempt: 9,
                at: at(),
            };
            assert!(given_when::<ConversationDecider>(&given, &restart).is_err());
        }
    }

    #[test]
    fn a_reply_never_requested_is_not_found() {
        assert_eq!(
            given_when::<ConversationDecider>(&[started()], &complete()),
            Err(DomainError::NotFound("reply"))
        );
        assert_eq!(
            given_when::<ConversationDecider>(&[], &fail()),
            Err(DomainError::NotFound("conversation"))
        );
    }

    #[test]
    fn a_reply_still_ends_after_the_conversation_is_archived() {
        let archived = ConversationEvent::ConversationArchived { archived_at: at() };
        assert!(
            given_when::<ConversationDecider>(&[started(), requested(), archived], &complete())
                .is_ok()
        );
    }
}
