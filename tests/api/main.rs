//! The HTTP API as a client drives it: the real service on port 0 against a fresh
//! database per test.

#[path = "../support/mod.rs"]
mod support;

mod assistants;
mod configuration;
mod contract;
mod conversations;
mod dashboards;
mod edges;
mod embedded;
mod errors;
mod failover;
mod feed;
mod forget;
mod health;
mod helpers;
mod hostile;
mod idempotency;
mod long_conversations;
mod near_cache;
mod observability;
mod poison;
mod process;
mod progress;
mod queries;
mod read_models;
mod read_sqlite;
mod recovery;
mod recovery_sqlite;
mod replies;
mod resilience;
mod servers;
mod shutdown;
mod sqlite_workers;
mod stream;
mod users;
