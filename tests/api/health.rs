use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn health_and_ready_answer() {
    let app = spawn_app().await;
    let health = app.send(Method::GET, "/health", None, None).await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    // NATS connects in the background: "degraded" until it has, then "ready".
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let response = app.send(Method::GET, "/ready", None, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["checks"]["postgres"], "ok");
        if body["status"] == "ready" {
            assert_eq!(body["checks"]["redis"], "ok");
            assert_eq!(body["checks"]["nats"], "ok");
            break;
        }
        assert_eq!(body["status"], "degraded", "{body}");
        assert!(std::time::Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_are_exposed_in_prometheus_format() {
    let app = spawn_app().await;
    let token = app.signed_up("metrics@example.com").await;
    let assistant = app.assistant(&token, "Counted").await;
    // Read it with the create's effect awaited, so the read side has run.
    let response = app
        .send(
            Method::GET,
            &format!("/api/v1/assistants/{}", assistant["id"].as_str().unwrap()),
            Some(&token),
            None,
        )
        .await;
    assert!(response.status().is_success() || response.status() == StatusCode::NOT_FOUND);
    let response = app.send(Method::GET, "/metrics", None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for name in [
        "events_appended_total",
        "append_batch_size",
        "cache_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}
