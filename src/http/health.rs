//! Liveness (`/health`: the process answers) and readiness (`/ready`: its
//! dependencies answer too). Unprefixed, for load balancers and orchestrators.

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let postgres = state.commands.store().ping().await;
    if let Err(e) = &postgres {
        tracing::warn!(error = %e, "readiness: postgres unreachable");
    }
    let status = if postgres.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let check = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({
            "status": if status.is_success() { "ready" } else { "unavailable" },
            "checks": { "postgres": check(postgres.is_ok()) },
        })),
    )
}
