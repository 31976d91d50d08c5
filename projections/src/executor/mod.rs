//! Executors of the typed read-model operations (`crate::ops`).
//!
//! - `sql`: the statement text of each op, written once for every SQL dialect;
//!   what differs between Postgres and SQLite is named in [`sql::Dialect`].
//! - `postgres`: runs ops and lookups in the batch's transaction (the live path),
//!   binding each value as its column's type.
//! - `sqlite`: the same, on SQLite, each value bound as SQLite stores its type.
//!
//! - `deferred`: what a live batch holds back and gathers (inserts into one
//!   table, updates of one row) until its table is read or the batch commits.
//! - `known`: what a live worker's lookups found, kept across its batches
//!   while nothing it writes could change the answer.
//!
//! The third executor is the fold (`crate::fold`): the same ops on rows in memory.

use ai_secretary_contract::{Event, EventEnvelope};

use crate::{
    db::Conn,
    ops::{Found, Lookup, Rules},
};
use deferred::{Deferred, Write};
use known::Known;

/// Apply `rules` to one event through `conn` (a batch's transaction): read
/// what they need, unless `known` has the answer, after writing what
/// `deferred` held for that table; then hand their ops to `deferred`, and
/// write what cannot wait. What it still holds is written by [`flush`],
/// before the transaction commits.
pub async fn apply(
    mut conn: Conn<'_>,
    deferred: &mut Deferred,
    known: &mut Known,
    rules: &Rules,
    e: &EventEnvelope,
    event: &Event,
) -> Result<(), sqlx::Error> {
    let mut now = Vec::new();
    let found = match (rules.lookup)(e, event) {
        // Nothing written to its table since it was read (`Known::written`),
        // so nothing held for the table is needed to answer it.
        Some(lookup) => match known.get(&lookup) {
            Some(found) => found.clone(),
            None => {
                deferred.release(lookup.table, &mut now);
                write(conn.reborrow(), std::mem::take(&mut now)).await?;
                let found = read(conn.reborrow(), &lookup).await?;
                known.keep(&lookup, &found);
                found
            }
        },
        None => Found::default(),
    };
    for op in (rules.ops)(e, event, &found) {
        known.written(&op);
        deferred.push(op, &mut now);
    }
    write(conn, now).await
}

/// Write everything `deferred` holds (before the batch's transaction commits).
pub async fn flush(conn: Conn<'_>, deferred: &mut Deferred) -> Result<(), sqlx::Error> {
    let mut now = Vec::new();
    deferred.release_all(&mut now);
    write(conn, now).await
}

/// Make `writes`, in order, with the executor of the connection's database.
async fn write(conn: Conn<'_>, writes: Vec<Write>) -> Result<(), sqlx::Error> {
    if writes.is_empty() {
        return Ok(());
    }
    match conn {
        Conn::Postgres(conn) => postgres::write(conn, writes).await,
        Conn::Sqlite(conn) => sqlite::write(conn, writes).await,
    }
}

/// Answer a lookup from the tables as the connection sees them.
async fn read(conn: Conn<'_>, lookup: &Lookup) -> Result<Found, sqlx::Error> {
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
