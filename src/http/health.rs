//! Liveness (`/health`: the process answers) and readiness (`/ready`: its
//! dependencies answer too). Unprefixed, for load balancers and orchestrators.

use std::time::Duration;

use ai_secretary_projections::{Db, cache::Cache};
use axum::{Json, extract::State, http::StatusCode};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::AppState;
use crate::bus::live::Live;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

/// Prometheus metrics (scraped by Prometheus; not to be exposed publicly).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "The Prometheus text format",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String,
        example = "# TYPE http_requests_total counter\nhttp_requests_total{method=\"GET\",path=\"/health\",status=\"200\"} 1\n")),
)]
pub(super) async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::render(),
    )
}

/// The process answers.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"status": "ok", "version": "0.1.0"}))]
pub(super) struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    status: &'static str,
    /// The service's version.
    version: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "Alive", body = Health)),
)]
pub(super) async fn health() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Whether the service can serve, and each dependency's state.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"status": "degraded",
    "checks": {"postgres": "ok", "redis": "unavailable", "nats": "ok"}}))]
struct Readiness {
    /// `ready`, `degraded` (Redis or NATS down: commands and queries still
    /// work) or `unavailable` (the database down).
    #[schema(example = "ready")]
    status: &'static str,
    checks: Checks,
}

/// `ok` or `unavailable`, per dependency the service uses: the database it
/// runs on (`postgres` or `sqlite`, one of the two), Redis when the cache is
/// there, and NATS.
#[derive(Default, Serialize, ToSchema)]
struct Checks {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "ok")]
    postgres: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = json!(null))]
    sqlite: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "ok")]
    redis: Option<&'static str>,
    /// Absent where there is no NATS (live updates stay in the process).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "ok")]
    nats: Option<&'static str>,
}

/// Longest `/ready` waits for the database. A Postgres pool whose server is
/// gone keeps trying to connect for its whole acquire timeout (30 s), and a
/// health check needs its answer well before then: a database that does not
/// answer within this is not ready.
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness: whether the dependencies answer.
///
/// 503 only when the database (the source of truth: Postgres, or the embedded
/// SQLite file) does not answer; a missing Redis or NATS degrades the service
/// (no cache, read side paused) but commands and queries still work, so it
/// stays ready and says so. Redis is checked only when the cache lives there
/// (an in-process cache has nothing to reach).
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready, or degraded", body = Readiness),
        (status = 503, description = "The database is unreachable", body = Readiness),
    ),
)]
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let database = async {
        match tokio::time::timeout(DATABASE_CHECK_TIMEOUT, state.commands.ping()).await {
            Ok(pinged) => pinged.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {DATABASE_CHECK_TIMEOUT:?}")),
        }
    };
    let redis = async {
        match &state.read.cache {
            Cache::Redis(_) => Some(state.read.cache.ping().await),
            Cache::Local(_) => None,
        }
    };
    let (database, redis) = tokio::join!(database, redis);
    let name = match &state.read.db {
        Db::Postgres(_) => "postgres",
        Db::Sqlite(_) => "sqlite",
    };
    if let Err(e) = &database {
        tracing::warn!(error = %e, database = name, "readiness: database unreachable");
    }
    // Without NATS, live updates travel in process: nothing to be down.
    let nats = match &state.read.live {
        Live::Nats { client, .. } => Some(matches!(
            client.connection_state(),
            async_nats::connection::State::Connected
        )),
        Live::InProcess { .. } => None,
    };
    let check = |ok: bool| if ok { "ok" } else { "unavailable" };
    let optional_ok = [redis, nats].iter().all(|c| c.unwrap_or(true));
    let (status, summary) = match (database.is_ok(), optional_ok) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, false) => (StatusCode::OK, "degraded"),
        (true, true) => (StatusCode::OK, "ready"),
    };
    let mut checks = Checks {
        redis: redis.map(check),
        nats: nats.map(check),
        ..Checks::default()
    };
    let database = Some(check(database.is_ok()));
    match &state.read.db {
        Db::Postgres(_) => checks.postgres = database,
        Db::Sqlite(_) => checks.sqlite = database,
    }
    (
        status,
        Json(Readiness {
            status: summary,
            checks,
        }),
    )
}
