use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use ai_secretary::startup::Roles;

use crate::{
    helpers::{EventLog, TestApp, eventually, spawn_app_on},
    support::{BusNames, TestDb, cluster::PrivatePostgres, http::consistency, promql},
};

crate::on_both!(health_and_ready_answer);
async fn health_and_ready_answer<D: EventLog>(app: TestApp<D>) {
    // What is checked: the database the service runs on, and on the servers
    // Redis (the cache is there) and NATS; the embedded service has neither.
    let (database, all) = if D::SERVERS {
        (
            "postgres",
            json!({"postgres": "ok", "redis": "ok", "nats": "ok"}),
        )
    } else {
        ("sqlite", json!({"sqlite": "ok"}))
    };
    let health = app.send(Method::GET, "/health", None, None).await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    // NATS connects in the background: "degraded" until it has, then "ready".
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let response = app.send(Method::GET, "/ready", None, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["checks"][database], "ok", "{body}");
        if body["status"] == "ready" {
            assert_eq!(body["checks"], all);
            break;
        }
        assert_eq!(body["status"], "degraded", "{body}");
        assert!(std::time::Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

crate::on_both!(metrics_are_exposed_in_prometheus_format);
/// `/metrics` answers in the Prometheus text format, and what a request just
/// did is in it: its route's counter, and the event its command appended.
/// (`observability.rs` runs `promtool check metrics` on a full scrape.)
async fn metrics_are_exposed_in_prometheus_format<D>(app: TestApp<D>) {
    let token = app.signed_up("metrics@example.com").await;
    let created = app
        .post("/assistants", &token, json!({ "name": "Counted" }))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let at = consistency(&created).unwrap();
    let assistant: Value = created.json().await.unwrap();
    // Read it once the read side has it: a 200, counted under its route.
    let path = format!("/assistants/{}", assistant["id"].as_str().unwrap());
    let response = app.get(&path, &token, Some(&at)).await;
    assert_eq!(response.status(), StatusCode::OK);

    let response = app.send(Method::GET, "/metrics", None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    for (name, kind) in [
        ("http_requests_total", "counter"),
        ("events_appended_total", "counter"),
        ("append_batch_size", "histogram"),
        ("cache_requests_total", "counter"),
    ] {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "no `# TYPE {name} {kind}` in:\n{text}"
        );
    }
    let read = promql::sample(
        &text,
        "http_requests_total",
        &[
            ("method", "GET"),
            ("path", "/api/v1/assistants/{id}"),
            ("status", "200"),
        ],
    );
    assert!(read >= Some(1.0), "the read is not counted: {read:?}");
    let appended = promql::sample(
        &text,
        "events_appended_total",
        &[("event_type", "AssistantCreated")],
    );
    assert!(
        appended >= Some(1.0),
        "the append is not counted: {appended:?}"
    );
}

/// `/ready` answers 503 while Postgres (the source of truth) is down, and 200
/// again once it is back; `/health` (the process answers) stays 200. Postgres
/// is a cluster of the test's own: the shared server is never stopped.
// Server-only: stops a Postgres cluster of its own.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn ready_is_503_while_postgres_is_down() {
    let mut cluster = PrivatePostgres::start().await;
    let app = spawn_app_on(
        TestDb::on(&cluster.url()).await,
        BusNames::new(),
        &[],
        Roles::all(),
    )
    .await;
    let ready = async || -> (StatusCode, Value) {
        let response = app.send(Method::GET, "/ready", None, None).await;
        (response.status(), response.json().await.unwrap())
    };
    let (status, body) = ready().await;
    assert_eq!(
        (status, &body["checks"]["postgres"]),
        (StatusCode::OK, &json!("ok")),
        "{body}"
    );

    cluster.stop().await;
    let (status, body) = ready().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["checks"]["postgres"], "unavailable", "{body}");
    let health = app.send(Method::GET, "/health", None, None).await;
    assert_eq!(health.status(), StatusCode::OK);

    cluster.start_again().await;
    eventually("/ready is 200 again", async || {
        let (status, body) = ready().await;
        match (status, &body["checks"]["postgres"]) {
            (StatusCode::OK, v) if v == "ok" => Ok(()),
            _ => Err(format!("{status}: {body}")),
        }
    })
    .await;
}
