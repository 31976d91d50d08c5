//! Subjects on the bus. The relay publishes every event to
//! `<prefix>.<stream_type>.<stream_id>` on one JetStream stream, except a reply's
//! events (streams of their own), which go to the subject of the conversation
//! their payload names: so a conversation's live feed (SSE) and the replier see
//! its replies in commit order with its own events, on one subscription.
//! `<prefix>` keeps several deployments (and parallel tests) apart on one server.

use uuid::Uuid;

use crate::{CONVERSATION, EventEnvelope, REPLY};

/// The subject of a stream's events.
pub fn of_stream(prefix: &str, stream_type: &str, stream_id: Uuid) -> String {
    format!("{prefix}.{stream_type}.{stream_id}")
}

/// The subject `envelope` is published on (see the module's description).
pub fn of(prefix: &str, envelope: &EventEnvelope) -> String {
    let conversation = (envelope.stream_type == REPLY)
        .then(|| envelope.data.get("conversation_id")?.as_str()?.parse().ok())
        .flatten();
    match conversation {
        Some(conversation_id) => of_stream(prefix, CONVERSATION, conversation_id),
        None => of_stream(prefix, &envelope.stream_type, envelope.stream_id),
    }
}

/// Every event's subject: what the events stream holds, and what each
/// projection consumes.
pub fn all(prefix: &str) -> String {
    format!("{prefix}.>")
}

/// The subjects of every stream of one type (the replier: conversations, which
/// carry their replies' events too).
pub fn of_type(prefix: &str, stream_type: &str) -> String {
    format!("{prefix}.{stream_type}.>")
}

/// The subject of a conversation's live, unstored updates (a reply's text as the
/// model streams it). Outside `<prefix>.>`, so the events stream never keeps them.
pub fn live(prefix: &str, conversation_id: Uuid) -> String {
    format!("{prefix}_live.{CONVERSATION}.{conversation_id}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn envelope(stream_type: &str, stream_id: Uuid, data: serde_json::Value) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::nil(),
            stream_id,
            stream_type: stream_type.into(),
            version: 1,
            event_type: "ReplyStarted".into(),
            schema_version: 1,
            transaction_id: 1,
            global_position: 1,
            recorded_at: "2026-11-29T16:58:58Z".parse().unwrap(),
            data,
            metadata: json!({}),
            previous: None,
        }
    }

    #[test]
    fn a_reply_is_published_on_its_conversation_and_other_events_on_their_stream() {
        let (reply, conversation) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let named = envelope(REPLY, reply, json!({ "conversation_id": conversation }));
        assert_eq!(of("p", &named), format!("p.conversation.{conversation}"));
        // An older reply event, appended to its conversation, names none.
        let unnamed = envelope(REPLY, reply, json!({}));
        assert_eq!(of("p", &unnamed), format!("p.reply.{reply}"));
        let own = envelope(
            "assistant",
            reply,
            json!({ "conversation_id": conversation }),
        );
        assert_eq!(of("p", &own), format!("p.assistant.{reply}"));
    }

    #[test]
    fn live_updates_stay_outside_the_events_subjects() {
        let id = Uuid::from_u128(3);
        let live = live("p", id);
        assert_eq!(live, format!("p_live.conversation.{id}"));
        assert!(
            !live.starts_with("p."),
            "{live} would be kept by the events stream"
        );
        assert!(of_type("p", CONVERSATION).starts_with(all("p").trim_end_matches('>')));
    }
}
