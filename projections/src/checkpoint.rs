//! Checkpoints: how far in commit order a consumer of the log has got. A
//! projection's row moves in the same transaction as its read-model changes, so an
//! event at or below it has been applied exactly once.

use sqlx::{PgConnection, PgExecutor, Row};

use crate::envelope::Position;

/// Channel on which every checkpoint move is announced (payload `name tx.gp`).
pub const CHANNEL: &str = "ai_secretary_checkpoints";

/// Read and lock a checkpoint inside the batch's transaction (the row exists:
/// the worker creates it before consuming).
pub async fn lock(conn: &mut PgConnection, name: &str) -> Result<Position, sqlx::Error> {
    let row = sqlx::query(
        "SELECT transaction_id, global_position FROM checkpoints WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Position {
        transaction_id: row.try_get(0)?,
        global_position: row.try_get(1)?,
    })
}

/// Move a checkpoint forward by `applied` events (and to the JetStream message
/// `stream_sequence`, if known), announcing it on commit. One statement.
pub async fn save(
    conn: &mut PgConnection,
    name: &str,
    position: Position,
    applied: i64,
    stream_sequence: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH moved AS (
             UPDATE checkpoints
             SET transaction_id = $2, global_position = $3, events = events + $4,
                 stream_sequence = COALESCE($5, stream_sequence), updated_at = now()
             WHERE name = $1
             RETURNING name)
         SELECT pg_notify($6, name || ' ' || $2 || '.' || $3) FROM moved",
    )
    .bind(name)
    .bind(position.transaction_id)
    .bind(position.global_position)
    .bind(applied)
    .bind(stream_sequence)
    .bind(CHANNEL)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Every checkpoint, by name.
pub async fn all<'e>(
    executor: impl PgExecutor<'e>,
) -> Result<Vec<(String, Position, i64, chrono::DateTime<chrono::Utc>)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT name, transaction_id, global_position, events, updated_at
         FROM checkpoints ORDER BY name",
    )
    .fetch_all(executor)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                r.try_get("name")?,
                Position {
                    transaction_id: r.try_get("transaction_id")?,
                    global_position: r.try_get("global_position")?,
                },
                r.try_get("events")?,
                r.try_get("updated_at")?,
            ))
        })
        .collect()
}
