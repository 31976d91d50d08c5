//! The event wire contract of ai-secretary: what the write side commits and the
//! read side consumes, whatever carries it between them (JetStream today, a tail
//! of the store in process tomorrow).
//!
//! - [`Position`]: a place in commit order, and the `X-Consistency-Token` form.
//! - [`EventEnvelope`]: one event as published, with its place and its payload.
//! - [`Event`] and [`decode`]: the payloads the read side understands
//!   (`docs/events.md`).
//! - [`subjects`]: where each event is published on the bus.
//!
//! It depends on serde, serde_json, uuid and chrono only, and on no other crate
//! of the workspace: the store, the relay, the replier, live streams and the
//! projections all depend on it, never the reverse.

mod envelope;
mod event;
mod position;
pub mod subjects;

pub use envelope::{ASSISTANT, CONVERSATION, EventEnvelope, REPLY, USER};
pub use event::*;
pub use position::{InvalidPosition, Position};
