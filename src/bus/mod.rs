//! The bus: NATS JetStream between the event store and the read side. The relay
//! publishes every committed event, in commit order, to
//! `<subject_prefix>.<stream_type>.<stream_id>` on one stream; a reply's events
//! go to their conversation's subject ([`subject_of`]).

pub mod relay;

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::{
    domain::{Decider, conversation::ConversationDecider, reply::ReplyDecider},
    store::RecordedEvent,
};

/// Names on the bus, so several instances (and parallel tests) share one server.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
}

/// How long JetStream remembers a `Nats-Msg-Id`: a relay that crashed between
/// publishing and saving its checkpoint republishes within this window unseen.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A client that keeps trying in the background: a NATS outage at start-up must
/// not keep the API (and so the write side) from starting.
pub async fn connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name("ai-secretary")
        .retry_on_initial_connect()
        .connect(url)
        .await
}

/// Create the stream, or bring an existing one to this configuration.
pub async fn ensure_stream(
    jetstream: &jetstream::Context,
    config: &BusConfig,
) -> Result<(), jetstream::context::CreateStreamError> {
    jetstream
        .create_or_update_stream(stream::Config {
            name: config.stream.clone(),
            subjects: vec![format!("{}.>", config.subject_prefix)],
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// The subject of a conversation's live, unstored updates (a reply's text as the
/// model streams it). Outside `<prefix>.>`, so the events stream never keeps them.
pub fn live_subject(prefix: &str, conversation_id: uuid::Uuid) -> String {
    format!("{prefix}_live.conversation.{conversation_id}")
}

/// The subject of a stream's events.
pub fn subject(prefix: &str, stream_type: &str, stream_id: uuid::Uuid) -> String {
    format!("{prefix}.{stream_type}.{stream_id}")
}

/// The subject an event is published on: its stream's, except for a reply's
/// events (streams of their own), which go to the subject of the conversation
/// their payload names. So a conversation's live feed (SSE) sees its replies
/// in commit order with its own events, on one subscription.
pub fn subject_of(prefix: &str, event: &RecordedEvent) -> String {
    let conversation = (event.stream_type == ReplyDecider::STREAM_TYPE)
        .then(|| event.data.get("conversation_id")?.as_str()?.parse().ok())
        .flatten();
    match conversation {
        Some(conversation_id) => subject(prefix, ConversationDecider::STREAM_TYPE, conversation_id),
        None => subject(prefix, &event.stream_type, event.stream_id),
    }
}
