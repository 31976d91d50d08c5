//! Checkpoints: how far in commit order a consumer of the log has got. A
//! projection's row moves in the same transaction as its read-model changes, so an
//! event at or below it has been applied exactly once.

use sqlx::{PgConnection, PgExecutor, Row};

use crate::envelope::Position;

/// Channel on which every checkpoint move is announced (payload `name tx.gp`).
pub const CHANNEL: &str = "ai_secretary_checkpoints";

/// Read (and lock, inside a transaction) a checkpoint; a new name starts at zero.
pub async fn lock(conn: &mut PgConnection, name: &str) -> Result<Position, sqlx::Error> {
    sqlx::query("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .execute(&mut *conn)
        .await?;
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

/// Move a checkpoint forward by `applied` events and announce it on commit.
pub async fn save(
    conn: &mut PgConnection,
    name: &str,
    position: Position,
    applied: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE checkpoints
         SET transaction_id = $2, global_position = $3, events = events + $4, updated_at = now()
         WHERE name = $1",
    )
    .bind(name)
    .bind(position.transaction_id)
    .bind(position.global_position)
    .bind(applied)
    .execute(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(format!(
            "{name} {}.{}",
            position.transaction_id, position.global_position
        ))
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
