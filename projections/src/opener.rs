//! Opening sealed personal fields, as the read side needs it.
//!
//! Kept here rather than in the wire contract: it is behaviour, not wire format,
//! and its async methods would make the contract crate depend on `async-trait`
//! (docs/decisions.md).

use serde_json::Value;

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
    /// reads give): the opened text, or `None` when it holds nothing sealed
    /// (use it as it is).
    async fn open_text(&self, event_id: uuid::Uuid, text: &str) -> Result<Option<String>, String>;

    /// `user` was forgotten (their `UserForgotten` was just read): stop using
    /// any copy of their key kept in memory, before the next event is opened.
    fn forget(&self, user: uuid::Uuid);
}
