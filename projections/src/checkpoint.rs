//! Checkpoints: how far in commit order a consumer of the log has got. A
//! projection's row moves in the same transaction as its read-model changes, so an
//! event at or below it has been applied exactly once.
//!
//! The row is also the lease of its single active owner (see `lease`): `epoch`
//! counts takeovers, and the owner's every move is a compare-and-set on the epoch
//! and position it started from. A writer that was deposed (its lock connection
//! died and a standby took over) matches no row: its transaction is rolled back
//! and it stops, so two owners can never both move one checkpoint.
//!
//! Two databases (`crate::db`): the functions here take a [`Db`] or a [`Tx`]
//! and run the statements of [`postgres`] or [`sqlite`], which say beside their
//! SQL where the dialects differ. What needs a Postgres connection of its own
//! (the relay's save, a rebuild's swap, `verify`'s snapshot) calls
//! [`postgres`] directly.

use chrono::{DateTime, Utc};

use ai_secretary_contract::Position;

use crate::db::{Db, Tx};

/// Channel on which every checkpoint move is announced (payload `name tx.gp`).
/// Postgres only: on SQLite the writer announces its move after its commit
/// ([`Db::checkpoint_moved`]).
pub const CHANNEL: &str = "ai_secretary_checkpoints";

/// A checkpoint as its owner reads it at the start of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: Position,
    /// The takeover count: the lease holder's own epoch, unless it was deposed.
    pub epoch: i64,
    /// The JetStream sequence of the last message consumed (where to resume).
    pub stream_sequence: i64,
}

/// What an owner's checkpoint write is conditioned on: its lease's epoch, and
/// the position it read at the start of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub epoch: i64,
    pub from: Position,
}

/// A checkpoint as operators see it.
#[derive(Debug, Clone)]
pub struct Status {
    pub name: String,
    pub position: Position,
    /// Events applied since the row was created.
    pub events: i64,
    pub updated_at: DateTime<Utc>,
    /// Takeovers so far, who holds it now and since when.
    pub epoch: i64,
    pub owner: Option<String>,
    pub owner_since: Option<DateTime<Utc>>,
}

/// Make sure `name`'s row exists (at the start of the log) and read it.
pub async fn ensure(db: &Db, name: &str) -> Result<Checkpoint, sqlx::Error> {
    match db {
        Db::Postgres(pool) => postgres::ensure(pool, name).await,
        Db::Sqlite(db) => sqlite::ensure(&db.pool, name).await,
    }
}

/// Read a checkpoint as it is now (the row exists: the worker creates it before
/// consuming). No lock: the owner's write is a compare-and-set against what it
/// read here, so nothing can slip in between unseen.
pub async fn current(db: &Db, name: &str) -> Result<Checkpoint, sqlx::Error> {
    match db {
        Db::Postgres(pool) => postgres::current(pool, name).await,
        Db::Sqlite(db) => sqlite::current(&db.pool, name).await,
    }
}

/// Every checkpoint, by name.
pub async fn all(db: &Db) -> Result<Vec<Status>, sqlx::Error> {
    match db {
        Db::Postgres(pool) => postgres::all(pool).await,
        Db::Sqlite(db) => sqlite::all(&db.pool).await,
    }
}

/// An owner's move of its checkpoint: from `fence.from` to `to`, after
/// `applied` more events (and to the JetStream message `stream_sequence`, if
/// known), only if the row is still at the fence's epoch and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub fence: Fence,
    pub to: Position,
    pub applied: i64,
    pub stream_sequence: Option<i64>,
}

/// Make `m` in a write transaction. One statement, and a projection batch's
/// first (it takes the row lock, which a rebuild's swap takes first too).
/// `false` if the row is no longer at the fence's epoch and position: the
/// writer was deposed, or a swap moved it, and must roll back.
///
/// Announced on commit: by Postgres itself (`NOTIFY`), on SQLite by the writer
/// calling [`Db::checkpoint_moved`] once the transaction has committed.
pub async fn save(tx: &mut Tx, name: &str, m: Move) -> Result<bool, sqlx::Error> {
    match tx {
        Tx::Postgres(tx) => postgres::save(&mut **tx, name, m).await,
        Tx::Sqlite(tx) => sqlite::save(&mut **tx, name, m).await,
    }
}

/// [`save`] as one statement with no transaction around it: a move with
/// nothing else to write (a batch whose events its projection does not touch,
/// `Projection::touches`; the replier's own progress). It commits, is fenced
/// and is announced as [`save`]'s would be, in one round trip instead of
/// three (begin, move, commit).
pub async fn save_alone(db: &Db, name: &str, m: Move) -> Result<bool, sqlx::Error> {
    match db {
        Db::Postgres(pool) => postgres::save(pool, name, m).await,
        Db::Sqlite(db) => sqlite::save(&db.pool, name, m).await,
    }
}

/// Move a checkpoint forward to `to` if it is behind, whoever owns it (a
/// rebuild's swap, under the row lock it took with `postgres::lock` or
/// `sqlite::lock`). Never moves it
/// back. Announced on commit, as [`save`] is.
pub async fn advance(tx: &mut Tx, name: &str, to: Position) -> Result<(), sqlx::Error> {
    match tx {
        Tx::Postgres(tx) => postgres::advance(tx, name, to).await,
        Tx::Sqlite(tx) => sqlite::advance(tx, name, to).await,
    }
}

/// The statements on Postgres: `transaction_id` is an xid8 in the events table
/// but a bigint here, timestamps are `timestamptz` set by `now()`, the row lock
/// is `FOR UPDATE`, and every move is announced with `pg_notify` on [`CHANNEL`].
pub mod postgres {
    use std::sync::LazyLock;

    use sqlx::{
        AssertSqlSafe, PgConnection, PgExecutor, Postgres, Row, postgres::PgArguments, query::Query,
    };

    use super::{CHANNEL, Checkpoint, Move, Status};
    use ai_secretary_contract::Position;

    /// See [`super::ensure`].
    pub async fn ensure<'e>(
        executor: impl PgExecutor<'e>,
        name: &str,
    ) -> Result<Checkpoint, sqlx::Error> {
        let row = sqlx::query(
            "INSERT INTO checkpoints (name) VALUES ($1)
             ON CONFLICT (name) DO UPDATE SET name = excluded.name
             RETURNING transaction_id, global_position, epoch, stream_sequence",
        )
        .bind(name)
        .fetch_one(executor)
        .await?;
        checkpoint_of(&row)
    }

    fn checkpoint_of(row: &sqlx::postgres::PgRow) -> Result<Checkpoint, sqlx::Error> {
        Ok(Checkpoint {
            position: Position {
                transaction_id: row.try_get("transaction_id")?,
                global_position: row.try_get("global_position")?,
            },
            epoch: row.try_get("epoch")?,
            stream_sequence: row.try_get("stream_sequence")?,
        })
    }

    /// See [`super::current`].
    pub async fn current<'e>(
        executor: impl PgExecutor<'e>,
        name: &str,
    ) -> Result<Checkpoint, sqlx::Error> {
        let row = sqlx::query(
            "SELECT transaction_id, global_position, epoch, stream_sequence
             FROM checkpoints WHERE name = $1",
        )
        .bind(name)
        .fetch_one(executor)
        .await?;
        checkpoint_of(&row)
    }

    /// Read and lock a checkpoint inside a write transaction (the row exists):
    /// a rebuild's swap's first statement, as a projection batch's is its
    /// move ([`super::save`]), so the two take their locks in the same order
    /// and one waits for the other. `FOR UPDATE`, held to the end of the
    /// transaction.
    pub async fn lock(conn: &mut PgConnection, name: &str) -> Result<Checkpoint, sqlx::Error> {
        let row = sqlx::query(
            "SELECT transaction_id, global_position, epoch, stream_sequence
             FROM checkpoints WHERE name = $1 FOR UPDATE",
        )
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
        checkpoint_of(&row)
    }

    /// See [`super::save`]: the compare-and-set and its `NOTIFY` in one
    /// statement (the notification is delivered on commit, or never), in a
    /// batch's transaction or alone ([`super::save_alone`]).
    ///
    /// **Its commit does not wait for the WAL to reach the disk.** When it
    /// moves the row it sets `synchronous_commit = off` to the end of its
    /// transaction (`set_config(…, true)`; the setting is read at commit): the
    /// statement's own when alone, its batch's otherwise, as the batch's first
    /// statement. A read model can always be made again from the event store,
    /// and its checkpoint commits with it: a crash of the server that loses the
    /// last batches (at most `wal_writer_delay` of them, 200 ms by default)
    /// loses their rows and their checkpoint move together, and the worker
    /// applies those events again from the checkpoint (its consumer is
    /// positioned from it, and this compare-and-set refuses to go on from a
    /// position that was lost). Nothing is skipped; a batch stops paying for a
    /// disk flush that every projection and the appends were waiting for in
    /// turn, and freshness loses that wait.
    pub async fn save<'e>(
        executor: impl PgExecutor<'e>,
        name: &str,
        m: Move,
    ) -> Result<bool, sqlx::Error> {
        static SAVE: LazyLock<String> = LazyLock::new(|| format!("WITH {} {ANNOUNCE}", moved("")));
        let moved = bind_move(sqlx::query(AssertSqlSafe(SAVE.as_str())), name, m)
            .fetch_optional(executor)
            .await?;
        Ok(moved.is_some())
    }

    /// The compare-and-set of [`save`] as the `WITH` query `moved`, which
    /// returns the row if it moved; `and` (empty, or starting with ` AND`)
    /// adds to its condition. Its parameters are `$1`–`$9`
    /// ([`MOVE_PARAMETERS`], bound by [`bind_move`]).
    pub(crate) fn moved(and: &str) -> String {
        format!(
            "moved AS (
                 UPDATE checkpoints
                 SET transaction_id = $2, global_position = $3, events = events + $4,
                     stream_sequence = COALESCE($5, stream_sequence), updated_at = now()
                 WHERE name = $1 AND epoch = $7
                   AND transaction_id = $8 AND global_position = $9{and}
                 RETURNING name)"
        )
    }

    /// How many parameters [`moved`] and [`ANNOUNCE`] take.
    pub(crate) const MOVE_PARAMETERS: usize = 9;

    /// The body of a move's statement, after its `WITH` queries: the
    /// announcement, and the commit that does not wait for the disk (see
    /// [`save`]). One row if the checkpoint moved, none if not.
    pub(crate) const ANNOUNCE: &str = "SELECT pg_notify($6, name || ' ' || $2 || '.' || $3),
                set_config('synchronous_commit', 'off', true)
         FROM moved";

    /// Bind the parameters of [`moved`] and [`ANNOUNCE`].
    pub(crate) fn bind_move<'q>(
        query: Query<'q, Postgres, PgArguments>,
        name: &'q str,
        m: Move,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(name)
            .bind(m.to.transaction_id)
            .bind(m.to.global_position)
            .bind(m.applied)
            .bind(m.stream_sequence)
            .bind(CHANNEL)
            .bind(m.fence.epoch)
            .bind(m.fence.from.transaction_id)
            .bind(m.fence.from.global_position)
    }

    /// See [`super::advance`].
    pub async fn advance(
        conn: &mut PgConnection,
        name: &str,
        to: Position,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "WITH moved AS (
                 UPDATE checkpoints
                 SET transaction_id = $2, global_position = $3, updated_at = now()
                 WHERE name = $1 AND (transaction_id, global_position) < ($2, $3)
                 RETURNING name)
             SELECT pg_notify($4, name || ' ' || $2 || '.' || $3) FROM moved",
        )
        .bind(name)
        .bind(to.transaction_id)
        .bind(to.global_position)
        .bind(CHANNEL)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// See [`super::all`].
    pub async fn all<'e>(executor: impl PgExecutor<'e>) -> Result<Vec<Status>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT name, transaction_id, global_position, events, updated_at, epoch, owner,
                    owner_since
             FROM checkpoints ORDER BY name",
        )
        .fetch_all(executor)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Status {
                    name: r.try_get("name")?,
                    position: Position {
                        transaction_id: r.try_get("transaction_id")?,
                        global_position: r.try_get("global_position")?,
                    },
                    events: r.try_get("events")?,
                    updated_at: r.try_get("updated_at")?,
                    epoch: r.try_get("epoch")?,
                    owner: r.try_get("owner")?,
                    owner_since: r.try_get("owner_since")?,
                })
            })
            .collect()
    }
}

/// The statements on SQLite (migrations/sqlite/20261202000006_consumers.sql).
/// What differs from [`postgres`], each said again beside its SQL:
///
/// - timestamps are INTEGER microseconds since 1970 UTC, bound from Rust
///   (no column defaults to a clock, and SQLite's own clock is not used);
/// - there is no row lock: a write transaction is `BEGIN IMMEDIATE`
///   ([`Db::begin_write`]), which holds the whole database's write lock from
///   its first statement, so a plain read inside it is already exclusive;
/// - there is no `NOTIFY`: the writer announces a move after its commit
///   ([`Db::checkpoint_moved`]), to this process; another process on the same
///   file sees it by polling.
pub mod sqlite {
    use chrono::{DateTime, Utc};
    use sqlx::{Row, SqliteConnection, SqliteExecutor, sqlite::SqliteRow};

    use super::{Checkpoint, Move, Status};
    use ai_secretary_contract::Position;

    /// See [`super::ensure`]. `updated_at` has no default (no clock in the
    /// schema): a new row gets now, bound from Rust; an existing row keeps its
    /// own (the no-op `DO UPDATE` only makes `RETURNING` answer for it too).
    pub async fn ensure<'e>(
        executor: impl SqliteExecutor<'e>,
        name: &str,
    ) -> Result<Checkpoint, sqlx::Error> {
        let row = sqlx::query(
            "INSERT INTO checkpoints (name, updated_at) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET name = excluded.name
             RETURNING transaction_id, global_position, epoch, stream_sequence",
        )
        .bind(name)
        .bind(Utc::now().timestamp_micros())
        .fetch_one(executor)
        .await?;
        checkpoint_of(&row)
    }

    fn checkpoint_of(row: &SqliteRow) -> Result<Checkpoint, sqlx::Error> {
        Ok(Checkpoint {
            position: Position {
                transaction_id: row.try_get("transaction_id")?,
                global_position: row.try_get("global_position")?,
            },
            epoch: row.try_get("epoch")?,
            stream_sequence: row.try_get("stream_sequence")?,
        })
    }

    /// See [`super::current`]. Same statement as on Postgres.
    pub async fn current<'e>(
        executor: impl SqliteExecutor<'e>,
        name: &str,
    ) -> Result<Checkpoint, sqlx::Error> {
        let row = sqlx::query(
            "SELECT transaction_id, global_position, epoch, stream_sequence
             FROM checkpoints WHERE name = $1",
        )
        .bind(name)
        .fetch_one(executor)
        .await?;
        checkpoint_of(&row)
    }

    /// See [`postgres::lock`](super::postgres::lock). No `FOR UPDATE` in SQLite, and none needed: `conn`
    /// is in a `BEGIN IMMEDIATE` transaction, which took the database's one
    /// write lock before this read, so no other writer (a rebuild's swap,
    /// another process's worker) can move the row until it ends.
    pub async fn lock(conn: &mut SqliteConnection, name: &str) -> Result<Checkpoint, sqlx::Error> {
        current(&mut *conn, name).await
    }

    /// See [`super::save`]: the same compare-and-set on the epoch and the
    /// position the batch started from, with `updated_at` bound from Rust and
    /// no `pg_notify` (the caller announces the move once it has committed).
    /// Alone ([`super::save_alone`]), an `UPDATE` takes the database's write
    /// lock as it starts, as `BEGIN IMMEDIATE` would.
    pub async fn save<'e>(
        executor: impl SqliteExecutor<'e>,
        name: &str,
        m: Move,
    ) -> Result<bool, sqlx::Error> {
        let moved = sqlx::query(
            "UPDATE checkpoints
             SET transaction_id = $2, global_position = $3, events = events + $4,
                 stream_sequence = COALESCE($5, stream_sequence), updated_at = $6
             WHERE name = $1 AND epoch = $7
               AND transaction_id = $8 AND global_position = $9
             RETURNING name",
        )
        .bind(name)
        .bind(m.to.transaction_id)
        .bind(m.to.global_position)
        .bind(m.applied)
        .bind(m.stream_sequence)
        .bind(Utc::now().timestamp_micros())
        .bind(m.fence.epoch)
        .bind(m.fence.from.transaction_id)
        .bind(m.fence.from.global_position)
        .fetch_optional(executor)
        .await?;
        Ok(moved.is_some())
    }

    /// See [`super::advance`]. The row-value comparison works in SQLite as in
    /// Postgres; `updated_at` is bound from Rust and there is no `pg_notify`.
    pub async fn advance(
        conn: &mut SqliteConnection,
        name: &str,
        to: Position,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE checkpoints
             SET transaction_id = $2, global_position = $3, updated_at = $4
             WHERE name = $1 AND (transaction_id, global_position) < ($2, $3)",
        )
        .bind(name)
        .bind(to.transaction_id)
        .bind(to.global_position)
        .bind(Utc::now().timestamp_micros())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// See [`super::all`]. The timestamps come back as microseconds and are
    /// turned into times here.
    pub async fn all<'e>(executor: impl SqliteExecutor<'e>) -> Result<Vec<Status>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT name, transaction_id, global_position, events, updated_at, epoch, owner,
                    owner_since
             FROM checkpoints ORDER BY name",
        )
        .fetch_all(executor)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Status {
                    name: r.try_get("name")?,
                    position: Position {
                        transaction_id: r.try_get("transaction_id")?,
                        global_position: r.try_get("global_position")?,
                    },
                    events: r.try_get("events")?,
                    updated_at: time("updated_at", r.try_get("updated_at")?)?,
                    epoch: r.try_get("epoch")?,
                    owner: r.try_get("owner")?,
                    owner_since: r
                        .try_get::<Option<i64>, _>("owner_since")?
                        .map(|micros| time("owner_since", micros))
                        .transpose()?,
                })
            })
            .collect()
    }

    /// A stored INTEGER of microseconds since 1970 UTC as a time.
    pub(crate) fn time(column: &str, micros: i64) -> Result<DateTime<Utc>, sqlx::Error> {
        DateTime::from_timestamp_micros(micros).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: format!("{micros} µs is outside chrono's dates").into(),
        })
    }
}
