//! `/metrics` as Prometheus sees it: valid exposition (`promtool check metrics`),
//! labelled by matched route, and carrying every name the dashboards and alerts
//! in `monitoring/` query.

use std::{io::Write, process::Stdio, time::Duration};

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    helpers::{TestApp, spawn_app},
    support::promql,
};

/// What the service must export (histograms by their `_bucket` series).
const REQUIRED: &[&str] = &[
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "events_appended_total",
    "append_batch_size_bucket",
    "relay_published_total",
    "relay_position",
    "relay_lag_events",
    "relay_lag_seconds",
    "projection_events_total",
    "projection_position",
    "projection_lag_events",
    "projection_lag_seconds",
    "projection_failures_total",
    "projection_dead_letters_total",
    "cache_available",
    "cache_requests_total",
    "llm_request_duration_seconds_bucket",
    "llm_tokens_total",
    "llm_replies_in_flight",
    "db_pool_size",
    "db_pool_max",
    "db_pool_connections",
    "db_pool_acquire_seconds_bucket",
];

async fn scrape(app: &TestApp) -> String {
    let response = app.send(Method::GET, "/metrics", None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

/// Register, create an assistant and a conversation, post a message, read the
/// assistant back, and ask for a route that does not exist; then wait until the
/// relay and the projections have applied it and sampled their lag.
async fn drive_a_flow(app: &TestApp) -> String {
    let token = app.signed_up("observed@example.com").await;
    let assistant = app.assistant(&token, "Observed").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap();
    let posted = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "a message the metrics must not carry" }),
        )
        .await;
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    let token_header = posted.headers()["x-consistency-token"].clone();
    let assistant_id = assistant["id"].as_str().unwrap();
    let read = app
        .client
        .get(app.url(&format!("/api/v1/assistants/{assistant_id}")))
        .bearer_auth(&token)
        .header("x-consistency-token", token_header)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    let missing = app
        .send(Method::GET, "/api/v1/no/such/route", None, None)
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // The samplers run every few seconds; the projections apply asynchronously.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(app).await;
        let names = promql::exposed_names(&text);
        let missing: Vec<_> = REQUIRED.iter().filter(|n| !names.contains(**n)).collect();
        if missing.is_empty() {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never exported {missing:?}; /metrics was:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn metrics_pass_promtool_and_are_labelled_by_route() {
    let app = spawn_app().await;
    let text = drive_a_flow(&app).await;

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Labelled by the route that matched, never by the raw path.
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .collect();
    assert!(
        requests
            .iter()
            .any(|l| l.contains(r#"path="/api/v1/assistants/{id}""#)
                && l.contains(r#"method="GET""#)
                && l.contains(r#"status="200""#)),
        "no GET /api/v1/assistants/{{id}} 200 series in {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|l| l.contains(r#"path="unmatched""#) && l.contains(r#"status="404""#)),
        "an unknown route is not labelled unmatched: {requests:#?}"
    );
    assert!(
        !text.contains("/no/such/route"),
        "a raw path leaked into labels"
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("events_appended_total"))
            .all(|l| l.starts_with("events_appended_total{event_type=\"")),
        "events_appended_total without its event_type label"
    );
    assert!(!text.contains("a message the metrics must not carry"));
}

/// Every metric a dashboard panel or an alert queries is one the service
/// exports (exporters' `pg_*`/`redis_*`, `up` and recording rules aside).
#[tokio::test]
async fn dashboards_and_alerts_query_only_exported_metrics() {
    let app = spawn_app().await;
    let names = promql::exposed_names(&drive_a_flow(&app).await);
    let mut queries = promql::alert_exprs();
    for (file, dashboard) in promql::dashboards() {
        for (title, expr) in promql::dashboard_exprs(&dashboard) {
            queries.push((format!("{file}: {title}"), expr));
        }
    }
    assert!(queries.len() >= 10, "too few queries found: {queries:?}");
    let mut unknown = Vec::new();
    for (origin, expr) in &queries {
        let used = promql::metric_names(expr);
        assert!(!used.is_empty(), "{origin}: no metric in {expr:?}");
        for name in used {
            if !promql::not_exported_by_the_service(&name) && !names.contains(&name) {
                unknown.push(format!("{origin}: {name} (in {expr})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queried but not exported:\n{}",
        unknown.join("\n")
    );
}

/// A worker process (no API) still answers /health and /metrics on its BIND,
/// for Docker's health check and Prometheus; the API is not there.
#[tokio::test]
async fn a_worker_serves_health_and_metrics_but_not_the_api() {
    use ai_secretary::startup::Roles;

    use crate::{
        helpers::spawn_app_on,
        support::{BusNames, TestDb},
    };
    let relay = spawn_app_on(
        TestDb::new().await,
        BusNames::new(),
        &[],
        Roles::only_relay(),
    )
    .await;
    let health = relay.send(Method::GET, "/health", None, None).await;
    assert_eq!(health.status(), StatusCode::OK);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let names = promql::exposed_names(&scrape(&relay).await);
        if ["relay_lag_events", "relay_lag_seconds", "db_pool_size"]
            .iter()
            .all(|n| names.contains(*n))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no relay gauges: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let api = relay
        .send(Method::GET, "/api/v1/assistants", None, None)
        .await;
    assert_eq!(api.status(), StatusCode::NOT_FOUND);
}
