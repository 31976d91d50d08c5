//! Read models and caches of ai-secretary, built from the event wire contract.
//!
//! This crate knows only what travels on the bus (the envelope below and each
//! event's JSON payload, catalogued in `docs/events.md`), never the write side's
//! Rust types: the root crate depends on it, never the reverse. The projection
//! workers themselves come with the read side.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
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
}

impl EventEnvelope {
    /// The position a projection checkpoints after applying this event.
    pub fn position(&self) -> (i64, i64) {
        (self.transaction_id, self.global_position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(envelope.position(), (734, 4));
        assert_eq!(envelope.data["content"], "hi");
    }
}
