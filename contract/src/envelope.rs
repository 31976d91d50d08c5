//! One event as the relay publishes it (docs/events.md, "The envelope").

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{Event, Position, decode};

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
    pub fn conversation_id(&self, event: &Event) -> Option<Uuid> {
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

// Each `stream_type` (the write side's deciders name their streams with these).
/// The `stream_type` of users.
pub const USER: &str = "user";
/// The `stream_type` of assistants.
pub const ASSISTANT: &str = "assistant";
/// The `stream_type` of conversations.
pub const CONVERSATION: &str = "conversation";
/// The `stream_type` of replies (a stream each, naming their conversation).
pub const REPLY: &str = "reply";

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
