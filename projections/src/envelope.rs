//! The wire contract: one event as the relay publishes it, and the payloads the
//! read side understands, decoded from `event_type` + `data` (docs/events.md).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use uuid::Uuid;

/// One event as published: its place in the store and its payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub stream_id: Uuid,
    pub stream_type: String,
    /// Position in its stream, from 1.
    pub version: i64,
    pub event_type: String,
    pub schema_version: i32,
    /// Commit order: `(transaction_id, global_position)` orders all events.
    pub transaction_id: i64,
    pub global_position: i64,
    pub recorded_at: DateTime<Utc>,
    pub data: Value,
    pub metadata: Value,
    /// The event just before this one in commit order (set by the relay): a
    /// reader whose checkpoint is not this has missed something in between.
    /// Absent from envelopes built outside the relay and from older relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Position>,
}

/// A place in commit order (the projections' checkpoints and cache stamps).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub transaction_id: i64,
    pub global_position: i64,
}

/// `<transaction_id>.<global_position>`, as in logs and consistency tokens.
impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.transaction_id, self.global_position)
    }
}

impl EventEnvelope {
    pub fn position(&self) -> Position {
        Position {
            transaction_id: self.transaction_id,
            global_position: self.global_position,
        }
    }

    /// The payload, decoded; an event the read side knows but cannot read is poison.
    pub fn decode(&self) -> Result<Event, String> {
        decode(&self.event_type, self.schema_version, &self.data)
    }

    /// The conversation this event belongs to, if any: its own stream for a
    /// conversation event, the one its payload names for a reply event (replies
    /// have streams of their own; older reply events were appended to the
    /// conversation, and name none).
    pub fn conversation_id(&self, event: &Event) -> Option<uuid::Uuid> {
        let named = match event {
            Event::ReplyStarted(r) => r.conversation_id,
            Event::ReplyCompleted(r) => r.conversation_id,
            Event::ReplyFailed(r) => r.conversation_id,
            _ => None,
        };
        named.or((self.stream_type == CONVERSATION).then_some(self.stream_id))
    }

    /// The conversation's own version at this event: `None` for an event of
    /// another stream (a reply's), which leaves the conversation's version alone.
    pub fn conversation_version(&self) -> Option<i64> {
        (self.stream_type == CONVERSATION).then_some(self.version)
    }
}

/// The `stream_type` of conversations.
pub const CONVERSATION: &str = "conversation";

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

/// Opens the sealed personal fields of payloads (crypto-shredding: the store
/// and the bus carry them encrypted under each user's key; the service's
/// keyring opens them). A forgotten user's values open to a placeholder; a
/// value that does not open under a key that exists is an error (the wrong
/// `ENCRYPTION_KEY`), which stops the batch rather than project it.
#[async_trait::async_trait]
pub trait Opener: Send + Sync + 'static {
    /// Replace each sealed value of `data`, a payload of event `event_id`, with
    /// its plaintext.
    async fn open(&self, event_id: uuid::Uuid, data: &mut Value) -> Result<(), String>;

    /// [`open`](Opener::open) on a payload's JSON text (what the store's bulk
    /// reads give), returned as it is when it holds nothing sealed.
    async fn open_text(&self, event_id: uuid::Uuid, text: String) -> Result<String, String>;

    /// `user` was forgotten (their `UserForgotten` was just read): stop using
    /// any copy of their key kept in memory, before the next event is opened.
    fn forget(&self, user: uuid::Uuid);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(event_type: &str, data: Value) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::nil(),
            stream_id: Uuid::nil(),
            stream_type: "conversation".into(),
            version: 2,
            event_type: event_type.into(),
            schema_version: 1,
            transaction_id: 734,
            global_position: 4,
            recorded_at: "2026-11-29T16:58:58Z".parse().unwrap(),
            data,
            metadata: serde_json::json!({}),
            previous: None,
        }
    }

    #[test]
    fn an_envelope_reads_from_its_documented_json() {
        let json = r#"{
            "event_id": "01a2283e-dd68-7136-b818-38152beae53d",
            "stream_id": "01a2283e-dcf3-7482-a9df-49d370ed5128",
            "stream_type": "conversation",
            "version": 2,
            "event_type": "MessagePosted",
            "schema_version": 1,
            "transaction_id": 734,
            "global_position": 4,
            "recorded_at": "2026-11-29T16:58:58.280348Z",
            "data": {"message_id": "01a2283e-dd68-7136-b818-38152beae53d", "content": "hi", "posted_at": "2026-11-29T16:58:58.280348Z"},
            "metadata": {"correlation_id": "c-1"}
        }"#;
        let envelope: EventEnvelope = serde_json::from_str(json).unwrap();
        assert_eq!(
            envelope.position(),
            Position {
                transaction_id: 734,
                global_position: 4
            }
        );
        assert!(matches!(envelope.decode(), Ok(Event::MessagePosted(m)) if m.content == "hi"));
    }

    #[test]
    fn unknown_types_are_skipped_and_broken_payloads_are_poison() {
        let unknown = envelope("SomethingNew", serde_json::json!({}));
        assert_eq!(unknown.decode(), Ok(Event::Unknown));
        let broken = envelope("MessagePosted", serde_json::json!({ "content": 5 }));
        assert!(broken.decode().unwrap_err().contains("MessagePosted"));
        let archived = envelope(
            "AssistantArchived",
            serde_json::json!({ "archived_at": "2026-01-01T00:00:00Z" }),
        );
        assert!(matches!(
            archived.decode(),
            Ok(Event::AssistantStatus {
                status: "archived",
                ..
            })
        ));
    }
}
