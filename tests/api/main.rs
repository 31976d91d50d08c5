//! The HTTP API as a client drives it: the real service on port 0 against a fresh
//! database per test.

#[path = "../support/mod.rs"]
mod support;

mod assistants;
mod conversations;
mod errors;
mod health;
mod helpers;
mod idempotency;
mod long_conversations;
mod observability;
mod queries;
mod recovery;
mod replies;
mod resilience;
mod stream;
mod users;
