//! Operators' view of the read side: where the relay and each projection are
//! against the head of the store, in events and in seconds; and rebuilds of
//! read models (`POST …/rebuild` → 202 with the rebuild's status URL).
//!
//! Only administrators get here: users whose email is in `ADMIN_EMAILS`
//! (checked against the email the account was registered with). Everyone else
//! gets 403: the one place in the API where 403 is right, since these routes
//! are not owner-scoped resources whose existence must be hidden.

use ai_secretary_projections::checkpoint;
use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{AppState, error::ApiError, extract::AuthUser};
use crate::recovery::StartError;

/// Lag is counted exactly up to this many events, then reported as at least this.
const LAG_COUNT_LIMIT: i64 = 1_000_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/projections", get(projections))
        .route("/admin/projections/{name}/rebuild", post(rebuild))
        .route("/admin/rebuilds/{id}", get(rebuild_status))
}

/// Refuse (403) a caller whose registered email is not in `ADMIN_EMAILS`.
async fn require_admin(state: &AppState, user: Uuid) -> Result<(), ApiError> {
    let admin = state.commands.is_admin(user, &state.admin_emails).await?;
    if admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "administrators only (their emails are listed in ADMIN_EMAILS)",
        ))
    }
}

fn rebuilds(state: &AppState) -> Result<&crate::recovery::Rebuilds, ApiError> {
    state
        .recovery
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("this process does not run rebuilds".into()))
}

/// Start a rebuild of one projection: 202 with its status URL in `Location`.
async fn rebuild(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    require_admin(&state, user).await?;
    let rebuilds = rebuilds(&state)?;
    let id = match rebuilds.start(&name).await {
        Ok(id) => id,
        Err(StartError::Unknown(_)) => return Err(ApiError::NotFound("projection")),
        Err(e @ StartError::Running(_)) => return Err(ApiError::Conflict(e.to_string())),
        Err(StartError::Database(e)) => return Err(e.into()),
    };
    let status = rebuilds
        .status(id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("rebuild {id} vanished"))?;
    let url = format!("/api/v1/admin/rebuilds/{id}");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, url.clone())],
        Json(rebuild_json(&status, Some(&url))),
    ))
}

async fn rebuild_status(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&state, user).await?;
    let id: Uuid = id.parse().map_err(|_| ApiError::NotFound("rebuild"))?;
    let status = rebuilds(&state)?
        .status(id)
        .await?
        .ok_or(ApiError::NotFound("rebuild"))?;
    Ok(Json(rebuild_json(&status, None)))
}

fn rebuild_json(status: &crate::recovery::RebuildStatus, url: Option<&str>) -> Value {
    let mut body = json!({
        "object": "rebuild",
        "id": status.id,
        "projection": status.projection,
        "state": status.state,
        "events": status.events,
        "total_events": status.total_events,
        "started_at": status.started_at,
        "finished_at": status.finished_at,
        "error": status.error,
    });
    if let Some(url) = url {
        body["status_url"] = json!(url);
    }
    body
}

async fn projections(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Value>, ApiError> {
    require_admin(&state, user).await?;
    let latest = match &state.recovery {
        Some(rebuilds) => rebuilds.latest().await?,
        None => vec![],
    };
    let head = state.commands.head().await?;
    let mut data = Vec::new();
    for checkpoint in checkpoint::all(&state.read.pool).await? {
        let (name, at) = (&checkpoint.name, checkpoint.position);
        // How many events are past this checkpoint, and since when the oldest waits.
        let behind = state.commands.behind(at, LAG_COUNT_LIMIT).await?;
        let (lag_events, oldest) = (behind.events, behind.oldest_recorded_at);
        let lag_seconds = oldest.map_or(0.0, |t| {
            (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
        });
        data.push(json!({
            "name": name,
            "object": "projection",
            "kind": if name == crate::bus::relay::CHECKPOINT { "relay" } else { "projection" },
            "checkpoint": at.to_string(),
            "events_applied": checkpoint.events,
            "lag_events": lag_events,
            "lag_seconds": lag_seconds,
            "updated_at": checkpoint.updated_at,
            // The active worker's lease: takeovers so far, its holder and since when.
            "epoch": checkpoint.epoch,
            "owner": checkpoint.owner,
            "owner_since": checkpoint.owner_since,
            // The latest rebuild of this projection (running or finished), if any.
            "rebuild": latest.iter().find(|r| &r.projection == name).map(|r| rebuild_json(r, None)),
        }));
    }
    Ok(Json(json!({
        "object": "list",
        "head": head.map(|p| p.to_string()),
        "data": data,
    })))
}
