//! A conversation between a user and one of their assistants: its title and
//! status, the user's messages and the replies they request. Replies are answered
//! later by the replier, in streams of their own (`super::reply`); this aggregate
//! only records that they were asked for. Its state is a handful of fields
//! however long the conversation grows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use super::reply::Usage;
use super::{
    Decider, DomainError, ErrorKind, FieldError,
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
    /// Legacy: the reply lifecycle was appended to the conversation before replies
    /// had streams of their own (`super::reply`). Still read from the streams that
    /// hold them; never decided any more.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConversationStatus {
    Active,
    Archived,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum ConversationState {
    #[default]
    Absent,
    Live(Conversation),
}

/// What the rules need, and what a command's answer shows. Nothing here grows
/// with the conversation: replies are counted when requested, and what they
/// add later (tokens, the time of the last answer) lives in their own streams
/// and reaches the read side, not this state.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub assistant_id: Uuid,
    pub title: String,
    pub status: ConversationStatus,
    /// User messages and replies alike (a reply counts once it is requested).
    pub message_count: u64,
    /// Whether the stream holds reply events from before replies had streams
    /// of their own (where a request may have ended; see `app::replies`). No
    /// command decides such events now, so a state without them stays so.
    pub legacy_replies: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Why a conversation command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConversationError {
    #[error("the request has invalid fields")]
    Invalid(Vec<FieldError>),
    /// Absent, or someone else's: the same answer for both.
    #[error("conversation not found")]
    NotFound,
    #[error("conversation already exists")]
    AlreadyExists,
    /// The assistant to start with is absent, deleted or someone else's.
    #[error("assistant not found")]
    AssistantNotFound,
    #[error("the assistant is archived: restore it to start a conversation")]
    AssistantArchived,
    #[error("the conversation is archived: no new messages")]
    Archived,
}

impl DomainError for ConversationError {
    fn kind(&self) -> ErrorKind {
        match self {
            ConversationError::Invalid(_) => ErrorKind::Invalid,
            ConversationError::NotFound | ConversationError::AssistantNotFound => {
                ErrorKind::NotFound
            }
            ConversationError::AlreadyExists
            | ConversationError::AssistantArchived
            | ConversationError::Archived => ErrorKind::Conflict,
        }
    }

    fn field_errors(&self) -> &[FieldError] {
        match self {
            ConversationError::Invalid(errors) => errors,
            _ => &[],
        }
    }
}

impl ConversationState {
    /// The conversation if it exists and belongs to `actor`.
    pub fn owned_by(&self, actor: Uuid) -> Result<&Conversation, ConversationError> {
        match self {
            ConversationState::Live(c) if c.owner_id == actor => Ok(c),
            _ => Err(ConversationError::NotFound),
        }
    }
}

pub struct ConversationDecider;

impl Decider for ConversationDecider {
    type Command = ConversationCommand;
    type Event = ConversationEvent;
    type State = ConversationState;
    type Error = ConversationError;
    const STREAM_TYPE: &'static str = ai_secretary_contract::CONVERSATION;

    fn decide(
        command: &ConversationCommand,
        state: &ConversationState,
    ) -> Result<Vec<ConversationEvent>, ConversationError> {
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
                    return Err(ConversationError::AlreadyExists);
                }
                let assistant = assistant
                    .owned_by(*actor)
                    .map_err(|_| ConversationError::AssistantNotFound)?;
                if assistant.status == AssistantStatus::Archived {
                    return Err(ConversationError::AssistantArchived);
                }
                let title = title.as_deref().unwrap_or(DEFAULT_TITLE).trim().to_owned();
                let mut v = Violations::default();
                v.chars("/title", &title, 1, 200);
                v.single_line("/title", &title);
                v.finish().map_err(ConversationError::Invalid)?;
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
                v.single_line("/title", title);
                v.finish().map_err(ConversationError::Invalid)?;
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
                v.finish().map_err(ConversationError::Invalid)?;
                if current.status == ConversationStatus::Archived {
                    return Err(ConversationError::Archived);
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
                return ConversationState::Live(Conversation {
                    id: *conversation_id,
                    owner_id: *owner_id,
                    assistant_id: *assistant_id,
                    title: title.clone(),
                    status: ConversationStatus::Active,
                    message_count: 0,
                    legacy_replies: false,
                    created_at: *started_at,
                    updated_at: *started_at,
                });
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
                c.updated_at = *posted_at;
            }
            E::ReplyRequested { requested_at, .. } => {
                c.message_count += 1;
                c.updated_at = *requested_at;
            }
            // Legacy reply lifecycle: nothing the rules look at.
            E::ReplyStarted { .. } | E::ReplyCompleted { .. } | E::ReplyFailed { .. } => {
                c.legacy_replies = true;
            }
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
            Err(ConversationError::AssistantArchived)
        ));
    }

    #[test]
    fn no_conversation_with_a_deleted_or_missing_or_foreign_assistant() {
        let deleted = assistant(&[AssistantEvent::AssistantDeleted { deleted_at: at() }]);
        for state in [deleted, AssistantState::Absent] {
            assert_eq!(
                given_when::<ConversationDecider>(&[], &start(state, None)),
                Err(ConversationError::AssistantNotFound)
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
            Err(ConversationError::AssistantNotFound)
        );
    }

    #[test]
    fn title_is_validated() {
        let err = given_when::<ConversationDecider>(&[], &start(assistant(&[]), Some("  ")));
        assert!(matches!(err, Err(ConversationError::Invalid(e)) if e[0].pointer == "/title"));
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
    }

    #[test]
    fn no_message_to_an_archived_conversation() {
        let archived = ConversationEvent::ConversationArchived { archived_at: at() };
        assert!(matches!(
            given_when::<ConversationDecider>(&[started(), archived], &post(OWNER, "hi")),
            Err(ConversationError::Archived)
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
                matches!(&err, Err(ConversationError::Invalid(e)) if e[0].pointer == "/content"),
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
            Err(ConversationError::NotFound)
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

    /// Reply events appended to conversations before replies had streams of
    /// their own still read, and change nothing the rules look at (the state
    /// only notes that there are some).
    #[test]
    fn legacy_reply_events_still_fold() {
        let requested = ConversationEvent::ReplyRequested {
            reply_id: REPLY,
            reply_to: MESSAGE,
            assistant_id: ASSISTANT,
            requested_at: at(),
        };
        let legacy = [
            ConversationEvent::ReplyStarted {
                reply_id: REPLY,
                attempt: 1,
                started_at: at(),
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
        let ConversationState::Live(before) =
            ConversationDecider::fold(&[started(), requested.clone()])
        else {
            panic!("live")
        };
        let mut given = vec![started(), requested];
        given.extend(legacy);
        assert_eq!(
            ConversationDecider::fold(&given),
            ConversationState::Live(Conversation {
                legacy_replies: true,
                ..before
            })
        );
        assert!(given_when::<ConversationDecider>(&given, &post(OWNER, "again")).is_ok());
    }
}
