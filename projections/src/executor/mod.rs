//! Executors of the typed read-model operations (`crate::ops`).
//!
//! - `sql`: the statement text of each op, written once for every SQL dialect;
//!   what differs between Postgres and SQLite is named in [`sql::Dialect`].
//! - `postgres`: runs ops and lookups in the batch's transaction (the live path),
//!   binding each value as its column's type.
//! - `sqlite`: the same, on SQLite, each value bound as SQLite stores its type.
//!
//! The third executor is the fold (`crate::fold`): the same ops on rows in memory.

pub mod postgres;
pub mod sql;
pub mod sqlite;
