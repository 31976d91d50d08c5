//! Liveness (`/health`: the process answers) and readiness (`/ready`: its
//! dependencies answer too). Unprefixed, for load balancers and orchestrators.

use std::time::Duration;

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
}

/// Prometheus text format (scraped by Prometheus; not to be exposed publicly).
pub(super) async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::render(),
    )
}

pub(super) async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// Longest `/ready` waits for Postgres. A pool whose server is gone keeps
/// trying to connect for its whole acquire timeout (30 s), and a health check
/// needs its answer well before then: a database that does not answer within
/// this is not ready.
const POSTGRES_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// 503 only when Postgres (the source of truth) is unreachable; a missing Redis
/// or NATS degrades the service (no cache, read side paused) but commands and
/// queries still work, so it stays ready and says so.
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
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
    let nats = matches!(
        state.read.nats.connection_state(),
        async_nats::connection::State::Connected
    );
    let check = |ok: bool| if ok { "ok" } else { "unavailable" };
    let (status, summary) = match (postgres.is_ok(), redis && nats) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (true, false) => (StatusCode::OK, "degraded"),
        (true, true) => (StatusCode::OK, "ready"),
    };
    (
        status,
        Json(json!({
            "status": summary,
            "checks": {
                "postgres": check(postgres.is_ok()),
                "redis": check(redis),
                "nats": check(nats),
            },
        })),
    )
}
