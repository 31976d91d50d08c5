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
    Json,
    extract::{Path, State},
    http::{StatusCode, header},
    response::IntoResponse,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    error::{ApiError, Problem},
    extract::AuthUser,
};
use crate::recovery::{RebuildStatus, StartError};

/// Lag is counted exactly up to this many events, then reported as at least this.
const LAG_COUNT_LIMIT: i64 = 1_000_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(projections))
        .routes(routes!(rebuild))
        .routes(routes!(rebuild_status))
}

/// A rebuild of a projection from the event store.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "object": "rebuild", "id": "0193a5c2-0000-7000-8000-000000000001", "projection": "messages",
    "state": "running", "events": 1200, "total_events": 5000,
    "started_at": "2026-12-01T11:00:00Z", "finished_at": null, "error": null,
    "status_url": "/api/v1/admin/rebuilds/0193a5c2-0000-7000-8000-000000000001"
}))]
struct Rebuild {
    /// Always `rebuild`.
    #[schema(example = "rebuild")]
    object: &'static str,
    id: Uuid,
    projection: String,
    /// `running`, `succeeded` or `failed`.
    #[schema(example = "running")]
    state: String,
    /// Events folded so far.
    events: i64,
    /// Events to fold, once counted.
    total_events: Option<i64>,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    /// Why it failed.
    error: Option<String>,
    /// Where to follow it (only in the answer that started it).
    #[serde(skip_serializing_if = "Option::is_none")]
    status_url: Option<String>,
}

/// The relay and the projections against the head of the store.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "object": "list", "head": "1042.877",
    "data": [{"name": "messages", "object": "projection", "kind": "projection",
              "checkpoint": "1042.877", "events_applied": 877, "lag_events": 0,
              "lag_seconds": 0.0, "updated_at": "2026-12-01T11:00:00Z", "epoch": 1,
              "owner": "host-1/4242", "owner_since": "2026-12-01T09:00:00Z", "rebuild": null}]
}))]
struct Projections {
    /// Always `list`.
    #[schema(example = "list")]
    object: &'static str,
    /// The position of the store's last committed event (null while empty).
    head: Option<String>,
    data: Vec<Projection>,
}

/// Where one checkpoint (the relay's, a projection's, or the replier's when it
/// tails the store) is.
#[derive(Serialize, ToSchema)]
struct Projection {
    name: String,
    /// Always `projection`.
    #[schema(example = "projection")]
    object: &'static str,
    /// `relay`, `projection` or `replier`.
    #[schema(example = "projection")]
    kind: &'static str,
    /// The position it has applied, as `<transaction_id>.<global_position>`.
    checkpoint: String,
    events_applied: i64,
    /// Events committed past the checkpoint (counted up to a million).
    lag_events: i64,
    /// How long the oldest of them has waited.
    lag_seconds: f64,
    updated_at: DateTime<Utc>,
    /// The active worker's lease: takeovers so far, its holder and since when.
    epoch: i64,
    owner: Option<String>,
    owner_since: Option<DateTime<Utc>>,
    /// The latest rebuild of this projection (running or finished), if any.
    rebuild: Option<Rebuild>,
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
#[utoipa::path(
    post,
    path = "/admin/projections/{name}/rebuild",
    tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "A projection's name, as GET /admin/projections lists them")),
    responses(
        (status = 202, description = "Started", body = Rebuild, headers(
            ("Location" = String, description = "The rebuild's status URL"),
        )),
        (status = 403, description = "Not an administrator", body = Problem,
            content_type = "application/problem+json"),
        (status = 404, description = "No such projection", body = Problem,
            content_type = "application/problem+json"),
        (status = 409, description = "A rebuild of it is running", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
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

/// A rebuild's progress.
#[utoipa::path(
    get,
    path = "/admin/rebuilds/{id}",
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The rebuild's id")),
    responses(
        (status = 200, description = "The rebuild", body = Rebuild),
        (status = 403, description = "Not an administrator", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
async fn rebuild_status(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Rebuild>, ApiError> {
    require_admin(&state, user).await?;
    let id: Uuid = id.parse().map_err(|_| ApiError::NotFound("rebuild"))?;
    let status = rebuilds(&state)?
        .status(id)
        .await?
        .ok_or(ApiError::NotFound("rebuild"))?;
    Ok(Json(rebuild_json(&status, None)))
}

fn rebuild_json(status: &RebuildStatus, url: Option<&str>) -> Rebuild {
    Rebuild {
        object: "rebuild",
        id: status.id,
        projection: status.projection.clone(),
        state: status.state.clone(),
        events: status.events,
        total_events: status.total_events,
        started_at: status.started_at,
        finished_at: status.finished_at,
        error: status.error.clone(),
        status_url: url.map(str::to_owned),
    }
}

/// The relay's and each projection's progress.
///
/// Where each is against the head of the store, in events and in seconds,
/// with its lease and latest rebuild.
#[utoipa::path(
    get,
    path = "/admin/projections",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The checkpoints", body = Projections),
        (status = 403, description = "Not an administrator", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
async fn projections(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Projections>, ApiError> {
    require_admin(&state, user).await?;
    let latest = match &state.recovery {
        Some(rebuilds) => rebuilds.latest().await?,
        None => vec![],
    };
    let head = state.commands.head().await?;
    let mut data = Vec::new();
    for checkpoint in checkpoint::postgres::all(&state.read.pool).await? {
        let (name, at) = (&checkpoint.name, checkpoint.position);
        // How many events are past this checkpoint, and since when the oldest waits.
        let behind = state.commands.behind(at, LAG_COUNT_LIMIT).await?;
        let (lag_events, oldest) = (behind.events, behind.oldest_recorded_at);
        let lag_seconds = oldest.map_or(0.0, |t| {
            (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
        });
        data.push(Projection {
            name: name.clone(),
            object: "projection",
            kind: match name.as_str() {
                crate::bus::relay::CHECKPOINT => "relay",
                crate::replier::CHECKPOINT => "replier",
                _ => "projection",
            },
            checkpoint: at.to_string(),
            events_applied: checkpoint.events,
            lag_events,
            lag_seconds,
            updated_at: checkpoint.updated_at,
            epoch: checkpoint.epoch,
            owner: checkpoint.owner.clone(),
            owner_since: checkpoint.owner_since,
            rebuild: latest
                .iter()
                .find(|r| &r.projection == name)
                .map(|r| rebuild_json(r, None)),
        });
    }
    let body = Projections {
        object: "list",
        head: head.map(|p| p.to_string()),
        data,
    };
    Ok(Json(body))
}
