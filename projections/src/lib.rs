//! Read models and caches of ai-secretary, built from the event wire contract.
//!
//! This crate knows only what travels on the bus (the wire contract of
//! `ai-secretary-contract`: the envelope and each event's payload, catalogued in
//! `docs/events.md`), never the write side's Rust types: the root crate depends
//! on it, never the reverse. Each projection owns
//! its tables and its checkpoint (`projections`, one folder each, registered
//! once); its rules are pure functions from an event to typed read-model
//! operations (`ops`), run by an executor (`executor`: Postgres) on the live
//! path and by the fold (`fold`) in rebuilds and `verify`; `worker` feeds one
//! from its JetStream consumer.

pub mod cache;
pub mod checkpoint;
pub mod db;
pub mod decode_cache;
pub mod executor;
pub mod fold;
pub mod lease;
pub mod log;
pub mod opener;
pub mod ops;
pub mod projection;
pub mod projections;
pub mod read;
pub mod rebuild;
pub mod tables;
pub mod verify;
pub mod worker;

pub use ai_secretary_contract::{Event, EventEnvelope, Position};
pub use db::{Db, SqliteDb, Tx};
pub use opener::Opener;
pub use projection::{Batch, Projection, ProjectionError};
pub use projections::{ALL, NAMES, Registered};
