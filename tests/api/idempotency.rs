use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, problem, spawn_app};

async fn keyed_post(app: &TestApp, token: &str, key: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/assistants"))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retry_returns_the_first_response_and_appends_nothing() {
    let app = spawn_app().await;
    let token = app.signed_up("retry@example.com").await;
    let first = keyed_post(&app, &token, "create-mika", json!({ "name": "Mika" })).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_token = first.headers()["x-consistency-token"].clone();
    let first_location = first.headers()["location"].clone();
    let first: Value = first.json().await.unwrap();
    let events = app.event_count().await;

    let retry = keyed_post(&app, &token, "create-mika", json!({ "name": "Mika" })).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["x-consistency-token"], first_token);
    assert_eq!(retry.headers()["location"], first_location);
    assert_eq!(retry.headers()["etag"], "\"1\"");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry, first);
    assert_eq!(app.event_count().await, events);

    // The same key with another body is a client mistake.
    let other = keyed_post(&app, &token, "create-mika", json!({ "name": "Other" })).await;
    problem(other, StatusCode::UNPROCESSABLE_ENTITY).await;
    // Another user's identical key is theirs.
    let bob = app.signed_up("bob@example.com").await;
    let theirs = keyed_post(&app, &bob, "create-mika", json!({ "name": "Mika" })).await;
    assert_eq!(theirs.status(), StatusCode::CREATED);
    let theirs: Value = theirs.json().await.unwrap();
    assert_ne!(theirs["id"], first["id"]);
}

#[tokio::test]
async fn a_refused_command_is_not_remembered() {
    let app = spawn_app().await;
    let token = app.signed_up("fixit@example.com").await;
    let bad = keyed_post(&app, &token, "k", json!({ "name": "" })).await;
    problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await;
    // The same request decided again gets the same refusal, not a replay of nothing.
    let again = keyed_post(&app, &token, "k", json!({ "name": "" })).await;
    problem(again, StatusCode::UNPROCESSABLE_ENTITY).await;
}

/// Concurrent duplicates: one creates, the others answer 409 while it runs or
/// replay it after; never two assistants. Registration hashes a password, which
/// keeps the first request in flight long enough for the others to meet it.
#[tokio::test]
async fn a_retry_while_the_first_runs_is_409() {
    let app = spawn_app().await;
    let mut saw_409 = false;
    for round in 0..5 {
        let email = format!("race{round}@example.com");
        let key = format!("register-{round}");
        let body = json!({ "email": email, "password": "correct horse", "display_name": "R" });
        let requests = (0..4).map(|_| {
            app.client
                .post(app.url("/api/v1/users"))
                .header("idempotency-key", &key)
                .json(&body)
                .send()
        });
        let mut ids = Vec::new();
        for response in futures::future::join_all(requests).await {
            let response = response.unwrap();
            match response.status() {
                StatusCode::CREATED => {
                    let user: Value = response.json().await.unwrap();
                    ids.push(user["id"].clone());
                }
                StatusCode::CONFLICT => {
                    saw_409 = true;
                    problem(response, StatusCode::CONFLICT).await;
                }
                other => panic!("unexpected {other}"),
            }
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "one user, answered the same to every 201");
        if saw_409 {
            break;
        }
    }
    assert!(saw_409, "no duplicate ever met the first one in flight");
    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'UserRegistered'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(users >= 1);
}
