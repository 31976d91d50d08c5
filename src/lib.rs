//! ai-secretary: an event-sourced CQRS backend for a team of AI secretaries.
//!
//! `domain` decides, `store` remembers, `app` joins the two for every caller,
//! `http` speaks the REST contract (docs/api.md), `replier` answers messages
//! through an `llm` provider, and `startup` wires them into a process that `cli`
//! names.

pub mod app;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod http;
pub mod listen;
pub mod llm;
pub mod progress;
pub mod read_side;
pub mod recovery;
pub mod replier;
pub mod sampler;
pub mod startup;
pub mod store;
pub mod telemetry;
