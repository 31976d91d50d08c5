//! The bus: NATS JetStream between the event store and the read side. The relay
//! publishes every committed event, in commit order, to
//! `<subject_prefix>.<stream_type>.<stream_id>` on one stream; a reply's events
//! go to their conversation's subject (the wire contract's `subjects`).

pub mod live;
pub mod relay;
pub mod tail;

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use ai_secretary_contract::subjects;

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
            subjects: vec![subjects::all(&config.subject_prefix)],
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map(|_| ())
}
