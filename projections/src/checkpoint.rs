//! Checkpoints: how far in commit order a consumer of the log has got. A
//! projection's row moves in the same transaction as its read-model changes, so an
//! event at or below it has been applied exactly once.
//!
//! The row is also the lease of its single active owner (see `lease`): `epoch`
//! counts takeovers, and the owner's every move is a compare-and-set on the epoch
//! and position it started from. A writer that was deposed (its lock connection
//! died and a standby took over) matches no row: its transaction is rolled back
//! and it stops, so two owners can never both move one checkpoint.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, Row};

use ai_secretary_contract::Position;

/// Channel on which every checkpoint move is announced (payload `name tx.gp`).
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

/// Make sure `name`'s row exists (at the start of the log) and read it.
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

/// Read a checkpoint as it is now (the row exists: the worker creates it before
/// consuming). No lock: the owner's write is a compare-and-set against what it
/// read here, so nothing can slip in between unseen.
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

/// Read and lock a checkpoint inside a transaction (the row exists): the first
/// statement of a projection's write transaction and of a rebuild's swap, so
/// the two take their locks in the same order and one waits for the other.
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

/// What an owner's checkpoint write is conditioned on: its lease's epoch, and
/// the position it read at the start of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub epoch: i64,
    pub from: Position,
}

/// The owner's move of its checkpoint from `fence.from` to `to`, after
/// `applied` more events (and to the JetStream message `stream_sequence`, if
/// known), announced on commit. One statement. `false` if the row is no longer
/// at the fence's epoch and position: the writer was deposed, and must roll back
/// and stop.
pub async fn save(
    conn: &mut PgConnection,
    name: &str,
    fence: Fence,
    to: Position,
    applied: i64,
    stream_sequence: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "WITH moved AS (
             UPDATE checkpoints
             SET transaction_id = $2, global_position = $3, events = events + $4,
                 stream_sequence = COALESCE($5, stream_sequence), updated_at = now()
             WHERE name = $1 AND epoch = $7
               AND transaction_id = $8 AND global_position = $9
             RETURNING name)
         SELECT pg_notify($6, name || ' ' || $2 || '.' || $3) FROM moved",
    )
    .bind(name)
    .bind(to.transaction_id)
    .bind(to.global_position)
    .bind(applied)
    .bind(stream_sequence)
    .bind(CHANNEL)
    .bind(fence.epoch)
    .bind(fence.from.transaction_id)
    .bind(fence.from.global_position)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(moved.is_some())
}

/// Move a checkpoint forward to `to` if it is behind, whoever owns it (a
/// rebuild's swap, under the row lock it took with [`lock`]), announcing it on
/// commit. Never moves it back.
pub async fn advance(conn: &mut PgConnection, name: &str, to: Position) -> Result<(), sqlx::Error> {
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

/// Every checkpoint, by name.
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
