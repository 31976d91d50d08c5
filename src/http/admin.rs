//! Operators' view of the read side: where the relay and each projection are
//! against the head of the store, in events and in seconds.

use ai_secretary_projections::checkpoint;
use axum::{Json, Router, extract::State, routing::get};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{AppState, error::ApiError, extract::AuthUser};

/// Lag is counted exactly up to this many events, then reported as at least this.
const LAG_COUNT_LIMIT: i64 = 1_000_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/projections", get(projections))
}

async fn projections(
    State(state): State<AppState>,
    AuthUser(_): AuthUser,
) -> Result<Json<Value>, ApiError> {
    let pool = &state.read.pool;
    let head: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::int8, global_position FROM events
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    let mut data = Vec::new();
    for (name, at, events, updated_at) in checkpoint::all(pool).await? {
        // How many events are past this checkpoint, and since when the oldest waits.
        let (lag_events, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*), min(recorded_at) FROM (
                 SELECT recorded_at FROM events
                 WHERE (transaction_id, global_position) > ($1::int8::text::xid8, $2)
                 LIMIT $3) behind",
        )
        .bind(at.transaction_id)
        .bind(at.global_position)
        .bind(LAG_COUNT_LIMIT)
        .fetch_one(pool)
        .await?;
        let lag_seconds = oldest.map_or(0.0, |t| {
            (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
        });
        data.push(json!({
            "name": name,
            "object": "projection",
            "kind": if name == crate::bus::relay::CHECKPOINT { "relay" } else { "projection" },
            "checkpoint": format!("{}.{}", at.transaction_id, at.global_position),
            "events_applied": events,
            "lag_events": lag_events,
            "lag_seconds": lag_seconds,
            "updated_at": updated_at,
        }));
    }
    Ok(Json(json!({
        "object": "list",
        "head": head.map(|(tx, gp)| format!("{tx}.{gp}")),
        "data": data,
    })))
}
