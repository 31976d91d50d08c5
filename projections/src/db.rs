//! The database the read side lives in: Postgres (the server topology) or
//! SQLite (the embedded default, one file under `DATA_DIR` that also holds the
//! event store). Everything in this crate that touches SQL takes a [`Db`] and
//! writes its statement once where the two dialects agree (`$N` placeholders,
//! `ON CONFLICT … excluded`, `RETURNING`, values bound from Rust, never
//! `now()`); where they differ it matches on the variant, beside the SQL.
//!
//! Not `sqlx::Any`: it has no uuid, chrono or JSON types.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{PgPool, SqlitePool};
use tokio::sync::watch;

use crate::executor::sql::Dialect;

#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqliteDb),
}

/// The embedded database: its pool, and the signal that stands in for
/// Postgres' `NOTIFY` on the checkpoints channel. Clones share the signal, so
/// every part of one process hears every checkpoint move made in it; a move
/// made by another process on the same file (an operator's `replay`) is seen
/// by polling, which every waiter does anyway.
#[derive(Debug, Clone)]
pub struct SqliteDb {
    pub pool: SqlitePool,
    checkpoint_moves: Arc<watch::Sender<()>>,
}

impl SqliteDb {
    pub fn new(pool: SqlitePool) -> SqliteDb {
        SqliteDb {
            pool,
            checkpoint_moves: Arc::new(watch::Sender::new(())),
        }
    }

    /// Announce that a checkpoint moved (after the commit that moved it).
    pub fn checkpoint_moved(&self) {
        self.checkpoint_moves.send_replace(());
    }

    /// Changes on every checkpoint move this process commits.
    pub fn checkpoint_moves(&self) -> watch::Receiver<()> {
        self.checkpoint_moves.subscribe()
    }

    /// Begin a transaction that will write: `BEGIN IMMEDIATE` (see
    /// [`Db::begin_write`]).
    pub async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// [`begin_write`](SqliteDb::begin_write), asked again while the write
    /// lock stays busy past the connection's busy timeout, for up to
    /// `patience` in all.
    ///
    /// For background work that has time, like a rebuild. SQLite's busy
    /// handler polls, and grants the lock to whoever asks at the moment it is
    /// free, not to whoever waited longest: on a loaded machine, where every
    /// commit's fsync is slow and the service's appends and workers commit
    /// one after another, one waiter can lose every time for longer than the
    /// busy timeout.
    pub async fn begin_write_patiently(
        &self,
        patience: Duration,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        let started = Instant::now();
        loop {
            match self.begin_write().await {
                Err(e) if is_busy(&e) && started.elapsed() < patience => {
                    tracing::debug!(error = %e, "write lock still busy; asking again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                outcome => return outcome,
            }
        }
    }
}

/// Whether SQLite refused for a lock another connection held past the busy
/// timeout: SQLITE_BUSY (5) or SQLITE_LOCKED (6), with their extended codes
/// (whose low byte is the primary one). Asking again later may well succeed.
pub fn is_busy(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) if e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() => {
            e.code()
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| matches!(code & 0xff, 5 | 6))
        }
        _ => false,
    }
}

/// A write transaction on either database.
pub enum Tx {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Db {
    pub fn dialect(&self) -> Dialect {
        match self {
            Db::Postgres(_) => Dialect::Postgres,
            Db::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// Begin a transaction that will write. On SQLite it takes the write lock
    /// at once (`BEGIN IMMEDIATE`): a transaction that read first and wrote
    /// later could find the database changed under its snapshot and fail
    /// (SQLITE_BUSY_SNAPSHOT) instead of waiting its turn.
    pub async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            Db::Sqlite(db) => Tx::Sqlite(db.begin_write().await?),
        })
    }

    /// Announce a checkpoint move, after the commit that made it. On Postgres
    /// the moving statement's `NOTIFY` already did, at commit; on SQLite this
    /// is its stand-in ([`SqliteDb::checkpoint_moved`]).
    pub fn checkpoint_moved(&self) {
        if let Db::Sqlite(db) = self {
            db.checkpoint_moved();
        }
    }

    /// The Postgres pool, for what only the server topology has.
    pub fn postgres(&self) -> Option<&PgPool> {
        match self {
            Db::Postgres(pool) => Some(pool),
            Db::Sqlite(_) => None,
        }
    }
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => tx.commit().await,
            Tx::Sqlite(tx) => tx.commit().await,
        }
    }
}

/// A connection to write through, on either database: a transaction's (see
/// [`Tx::conn`]) or a session the caller holds for another reason (a rebuild's
/// lock session on Postgres). What writes through it matches on the variant.
pub enum Conn<'c> {
    Postgres(&'c mut sqlx::PgConnection),
    Sqlite(&'c mut sqlx::SqliteConnection),
}

impl Conn<'_> {
    /// The same connection, borrowed again for one call.
    pub fn reborrow(&mut self) -> Conn<'_> {
        match self {
            Conn::Postgres(conn) => Conn::Postgres(conn),
            Conn::Sqlite(conn) => Conn::Sqlite(conn),
        }
    }
}

impl Tx {
    /// The transaction's connection, to write through.
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Postgres(tx) => Conn::Postgres(tx),
            Tx::Sqlite(tx) => Conn::Sqlite(tx),
        }
    }
}
