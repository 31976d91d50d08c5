//! The payloads the read side understands, decoded from an event's
//! `event_type` and `data` (docs/events.md).

use chrono::{DateTime, Utc};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;
use uuid::Uuid;

/// Where a payload is decoded from: the envelope's JSON value (from the bus) or
/// the text of the store's `data` column (a rebuild's bulk read, which so skips
/// building a `Value` per event).
pub trait Payload {
    fn parse<T: DeserializeOwned>(&self) -> serde_json::Result<T>;
}

impl Payload for Value {
    fn parse<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        T::deserialize(self)
    }
}

impl Payload for str {
    fn parse<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(self)
    }
}

/// Decode a payload by its `event_type`; an event the read side knows but
/// cannot read is poison, one it does not know is `Unknown`.
pub fn decode<P: Payload + ?Sized>(
    event_type: &str,
    schema_version: i32,
    payload: &P,
) -> Result<Event, String> {
    let d = Decoding {
        event_type,
        schema_version,
        payload,
    };
    Ok(match event_type {
        "UserRegistered" => Event::UserRegistered,
        "UserForgotten" => Event::UserForgotten,
        "AssistantCreated" => Event::AssistantCreated(d.data()?),
        "AssistantUpdated" => Event::AssistantUpdated(d.data()?),
        "AssistantArchived" => Event::AssistantStatus {
            status: "archived",
            at: d.data::<At>()?.at,
        },
        "AssistantRestored" => Event::AssistantStatus {
            status: "active",
            at: d.data::<At>()?.at,
        },
        "AssistantDeleted" => Event::AssistantDeleted,
        "ConversationStarted" => Event::ConversationStarted(d.data()?),
        "ConversationRenamed" => Event::ConversationRenamed(d.data()?),
        "ConversationArchived" => Event::ConversationArchived {
            at: d.data::<At>()?.at,
        },
        "MessagePosted" => Event::MessagePosted(d.data()?),
        "ReplyRequested" => Event::ReplyRequested(d.data()?),
        "ReplyStarted" => Event::ReplyStarted(d.data()?),
        "ReplyCompleted" => Event::ReplyCompleted(d.data()?),
        "ReplyFailed" => Event::ReplyFailed(d.data()?),
        _ => Event::Unknown,
    })
}

struct Decoding<'a, P: ?Sized> {
    event_type: &'a str,
    schema_version: i32,
    payload: &'a P,
}

impl<P: Payload + ?Sized> Decoding<'_, P> {
    fn data<T: DeserializeOwned>(&self) -> Result<T, String> {
        self.payload
            .parse()
            .map_err(|err| format!("{} v{}: {err}", self.event_type, self.schema_version))
    }
}

/// The timestamp of a lifecycle event, whatever its field is called.
#[derive(Deserialize)]
struct At {
    #[serde(
        alias = "archived_at",
        alias = "restored_at",
        alias = "deleted_at",
        alias = "renamed_at"
    )]
    at: DateTime<Utc>,
}

/// The events the read side acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    UserRegistered,
    /// The user of the stream asked to be forgotten: every projection drops
    /// what it holds of theirs (their key is already gone, so whatever of theirs
    /// is projected from then on reads as forgotten).
    UserForgotten,
    AssistantCreated(AssistantCreated),
    AssistantUpdated(AssistantUpdated),
    AssistantStatus {
        status: &'static str,
        at: DateTime<Utc>,
    },
    AssistantDeleted,
    ConversationStarted(ConversationStarted),
    ConversationRenamed(ConversationRenamed),
    ConversationArchived {
        at: DateTime<Utc>,
    },
    MessagePosted(MessagePosted),
    ReplyRequested(ReplyRequested),
    ReplyStarted(ReplyStarted),
    ReplyCompleted(ReplyCompleted),
    ReplyFailed(ReplyFailed),
    /// A type this version does not know: skipped, so a newer writer cannot stall it.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AssistantCreated {
    pub owner_id: Uuid,
    pub name: String,
    pub role: String,
    pub instructions: String,
    pub model: String,
    pub temperature: f64,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AssistantUpdated {
    pub name: Option<String>,
    pub role: Option<String>,
    pub instructions: Option<String>,
    pub model: Option<String>,
    pub temperature: Option<f64>,
    pub metadata: Option<Value>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ConversationStarted {
    pub owner_id: Uuid,
    pub assistant_id: Uuid,
    pub title: String,
    pub started_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ConversationRenamed {
    pub title: String,
    pub renamed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessagePosted {
    pub message_id: Uuid,
    pub content: String,
    pub posted_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReplyRequested {
    pub reply_id: Uuid,
    pub reply_to: Uuid,
    pub assistant_id: Uuid,
    pub requested_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReplyStarted {
    pub reply_id: Uuid,
    /// Absent from reply events appended to their conversation (before replies
    /// had streams of their own).
    #[serde(default)]
    pub conversation_id: Option<Uuid>,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReplyCompleted {
    pub reply_id: Uuid,
    /// Absent from reply events appended to their conversation (before replies
    /// had streams of their own).
    #[serde(default)]
    pub conversation_id: Option<Uuid>,
    pub content: String,
    pub model: String,
    pub finish_reason: String,
    pub usage: Usage,
    pub completed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReplyFailed {
    pub reply_id: Uuid,
    /// Absent from reply events appended to their conversation (before replies
    /// had streams of their own).
    #[serde(default)]
    pub conversation_id: Option<Uuid>,
    pub error: String,
    pub failed_at: DateTime<Utc>,
}
