//! Liveness (`/health`: the process answers) and readiness (`/ready`: its
//! dependencies answer too). Unprefixed, for load balancers and orchestrators.

use std::time::Duration;

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
    /// work) or `unavailable` (Postgres down).
    #[schema(example = "ready")]
    status: &'static str,
    checks: Checks,
}

/// `ok` or `unavailable`, per dependency.
#[derive(Serialize, ToSchema)]
struct Checks {
    #[schema(example = "ok")]
    postgres: &'static str,
    #[schema(example = "ok")]
    redis: &'static str,
    /// `in_process` where there is no NATS (live updates stay in the process).
    #[schema(example = "ok")]
    nats: &'static str,
}

/// Longest `/ready` waits for Postgres. A pool whose server is gone keeps
/// trying to connect for its whole acquire timeout (30 s), and a health check
/// needs its answer well before then: a database that does not answer within
/// this is not ready.
const POSTGRES_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness: whether the dependencies answer.
///
/// 503 only when Postgres (the source of truth) is unreachable; a missing Redis
/// or NATS degrades the service (no cache, read side paused) but commands and
/// queries still work, so it stays ready and says so.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready, or degraded", body = Readiness),
        (status = 503, description = "Postgres is unreachable", body = Readiness),
    ),
)]
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let postgres = async {
        match tokio::time::timeout(POSTGRES_CHECK_TIMEOUT, state.commands.ping()).await {
            Ok(pinged) => pinged.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {POSTGRES_CHECK_TIMEOUT:?}")),
        }
    };
    let (postgres, redis) = tokio::join!(postgres, state.read.cache.ping());
    if let Err(e) = &postgres {
        tracing::warn!(error = %e, "readiness: postgres unreachable");
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
    let (status, summary) = match (postgres.is_ok(), redis && nats != Some(false)) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, false) => (StatusCode::OK, "degraded"),
        (true, true) => (StatusCode::OK, "ready"),
    };
    (
        status,
        Json(Readiness {
            status: summary,
            checks: Checks {
                postgres: check(postgres.is_ok()),
                redis: check(redis),
                nats: nats.map_or("in_process", check),
            },
        }),
    )
}
