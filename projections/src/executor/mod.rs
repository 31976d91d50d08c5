//! Executors of the typed read-model operations (`crate::ops`).
//!
//! - `sql`: the statement text of each op, written once for every SQL dialect;
//!   what differs between Postgres and SQLite is named in [`sql::Dialect`].
//! - `postgres`: runs ops and lookups in the batch's transaction (the live path),
//!   binding each value as its column's type; or, for a batch that needs no
//!   transaction of its own, its writes and its checkpoint's move as one
//!   statement (`postgres::write_moving`).
//! - `sqlite`: the same, on SQLite, each value bound as SQLite stores its type.
//!
//! - `deferred`: what a live batch holds back and gathers (inserts into one
//!   table, updates of one row) until its table is read or the batch commits.
//! - `known`: what a live worker's lookups found, kept across its batches
//!   while nothing it writes could change the answer.
//!
//! A live batch (`crate::projection::Batch`) decides what is read and written
//! when; the executors here make it.
//!
//! The third executor is the fold (`crate::fold`): the same ops on rows in memory.

use crate::{
    db::Conn,
    ops::{Found, Lookup},
};
use deferred::Write;

/// Make `writes`, in order, with the executor of the connection's database.
pub async fn write(conn: Conn<'_>, writes: Vec<Write>) -> Result<(), sqlx::Error> {
    if writes.is_empty() {
        return Ok(());
    }
    match conn {
        Conn::Postgres(conn) => postgres::write(conn, writes).await,
        Conn::Sqlite(conn) => sqlite::write(conn, writes).await,
    }
}

/// Answer a lookup from the tables as the connection sees them.
pub async fn read(conn: Conn<'_>, lookup: &Lookup) -> Result<Found, sqlx::Error> {
    match conn {
        Conn::Postgres(conn) => postgres::read(conn, lookup).await,
        Conn::Sqlite(conn) => sqlite::read(conn, lookup).await,
    }
}

pub mod deferred;
pub mod known;
pub mod postgres;
pub mod sql;
pub mod sqlite;
