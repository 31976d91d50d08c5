//! Read models and caches of ai-secretary, built from the event wire contract.
//!
//! This crate knows only what travels on the bus (the wire contract of
//! `ai-secretary-contract`: the envelope and each event's payload, catalogued in
//! `docs/events.md`), never the write side's Rust types: the root crate depends
//! on it, never the reverse. Each projection owns
//! its tables and its checkpoint; `worker` feeds one from its JetStream consumer.

pub mod assistants;
pub mod cache;
pub mod checkpoint;
pub mod conversations;
pub mod fold;
pub mod lease;
pub mod log;
pub mod messages;
pub mod opener;
pub mod projection;
pub mod read;
pub mod rebuild;
pub mod tables;
pub mod usage;
pub mod verify;
pub mod worker;

use std::sync::Arc;

pub use ai_secretary_contract::{Event, EventEnvelope, Position};
pub use opener::Opener;
pub use projection::{Projection, ProjectionError};

/// Every projection, in the order their names are listed to operators.
pub fn all(cache: cache::Cache) -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(assistants::Assistants),
        Arc::new(conversations::Conversations),
        Arc::new(messages::Messages),
        Arc::new(usage::UsageDaily),
        Arc::new(cache::CacheInvalidation { cache }),
    ]
}
