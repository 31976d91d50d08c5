//! Gauges that are read on a timer rather than updated where work happens:
//! the database pool's occupancy, and how far the relay and each projection are
//! behind the event store (on Postgres or SQLite).
//!
//! Lag is measured against the store, not reported by the worker itself, so a
//! worker that is stuck (failing batches, a dead NATS, a lost lock) still shows
//! its lag growing: the alerts need exactly that case. It is the same measure as
//! `GET /api/v1/admin/projections`: events past the checkpoint in commit order,
//! and the age of the oldest of them (0 when caught up).

use std::time::Duration;

use ai_secretary_projections::Db;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::bus::relay;

/// How often the gauges are refreshed (Prometheus scrapes every 5–15 s).
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Lag in events is counted exactly up to this many, then reported as this many:
/// counting a huge backlog every few seconds would itself load the database.
const LAG_COUNT_LIMIT: i64 = 100_000;

/// Refresh `db_pool_size`, `db_pool_max` and `db_pool_connections{state}` until `stop`.
pub async fn pool<DB: sqlx::Database>(pool: sqlx::Pool<DB>, stop: CancellationToken) {
    let max = pool.options().get_max_connections();
    loop {
        let size = pool.size();
        let idle = pool.num_idle() as u32;
        metrics::gauge!("db_pool_size").set(f64::from(size));
        metrics::gauge!("db_pool_max").set(f64::from(max));
        metrics::gauge!("db_pool_connections", "state" => "idle").set(f64::from(idle));
        metrics::gauge!("db_pool_connections", "state" => "active")
            .set(f64::from(size.saturating_sub(idle)));
        tokio::select! {
            () = tokio::time::sleep(INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Refresh the lag gauges of the named checkpoints (`relay` → `relay_lag_*`,
/// a projection → `projection_lag_*{projection}`) until `stop`.
pub async fn lag(db: Db, names: Vec<String>, stop: CancellationToken) {
    loop {
        for name in &names {
            match measure(&db, name).await {
                Ok((events, seconds)) if name == relay::CHECKPOINT => {
                    metrics::gauge!("relay_lag_events").set(events as f64);
                    metrics::gauge!("relay_lag_seconds").set(seconds);
                }
                Ok((events, seconds)) => {
                    metrics::gauge!("projection_lag_events", "projection" => name.clone())
                        .set(events as f64);
                    metrics::gauge!("projection_lag_seconds", "projection" => name.clone())
                        .set(seconds);
                }
                Err(e) => tracing::debug!(checkpoint = %name, error = %e, "lag not measured"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Events past `name`'s checkpoint (a checkpoint not created yet is at the
/// start), counted up to 100,000, and the age in seconds of the oldest of them.
pub async fn measure(db: &Db, name: &str) -> Result<(i64, f64), sqlx::Error> {
    let (events, oldest) = match db {
        Db::Postgres(pool) => behind_postgres(pool, name).await?,
        Db::Sqlite(db) => behind_sqlite(&db.pool, name).await?,
    };
    let Some(oldest) = oldest else {
        return Ok((0, 0.0));
    };
    let seconds = (Utc::now() - oldest).num_milliseconds().max(0) as f64 / 1000.0;
    Ok((events, seconds))
}

/// How many events are past `name`'s checkpoint (up to the limit) and when
/// the oldest was recorded, on Postgres: in `(transaction_id,
/// global_position)` order, the events' `transaction_id` being an xid8.
async fn behind_postgres(
    pool: &PgPool,
    name: &str,
) -> Result<(i64, Option<DateTime<Utc>>), sqlx::Error> {
    let (transaction_id, global_position): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(max(transaction_id), 0), coalesce(max(global_position), 0)
         FROM checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await?;
    let oldest: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT recorded_at FROM events
         WHERE (transaction_id, global_position) > ($1::int8::text::xid8, $2)
         ORDER BY transaction_id, global_position LIMIT 1",
    )
    .bind(transaction_id)
    .bind(global_position)
    .fetch_optional(pool)
    .await?;
    if oldest.is_none() {
        return Ok((0, None));
    }
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT 1 FROM events
             WHERE (transaction_id, global_position) > ($1::int8::text::xid8, $2)
             LIMIT $3) behind",
    )
    .bind(transaction_id)
    .bind(global_position)
    .bind(LAG_COUNT_LIMIT)
    .fetch_one(pool)
    .await?;
    Ok((events, oldest))
}

/// The same on SQLite: commits are serialized, so `global_position` alone is
/// commit order (the rowid range scan), and `recorded_at` is INTEGER
/// microseconds since 1970 UTC.
async fn behind_sqlite(
    pool: &sqlx::SqlitePool,
    name: &str,
) -> Result<(i64, Option<DateTime<Utc>>), sqlx::Error> {
    let global_position: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(global_position), 0) FROM checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await?;
    let oldest: Option<i64> = sqlx::query_scalar(
        "SELECT recorded_at FROM events WHERE global_position > $1
         ORDER BY global_position LIMIT 1",
    )
    .bind(global_position)
    .fetch_optional(pool)
    .await?;
    let Some(oldest) = oldest else {
        return Ok((0, None));
    };
    let oldest = DateTime::from_timestamp_micros(oldest).ok_or_else(|| {
        sqlx::Error::Decode(format!("recorded_at {oldest} µs is outside chrono's dates").into())
    })?;
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT 1 FROM events WHERE global_position > $1 LIMIT $2)",
    )
    .bind(global_position)
    .bind(LAG_COUNT_LIMIT)
    .fetch_one(pool)
    .await?;
    Ok((events, Some(oldest)))
}
