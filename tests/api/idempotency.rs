use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::helpers::{TestApp, problem, spawn_app};

async fn keyed_post<D>(app: &TestApp<D>, token: &str, key: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/assistants"))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

crate::on_both!(a_retry_returns_the_first_response_and_appends_nothing);
async fn a_retry_returns_the_first_response_and_appends_nothing<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
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

crate::on_both!(a_refused_command_is_not_remembered);
/// docs/decisions.md: a refused command (4xx) is not remembered, so the client
/// fixes the request and retries with the same key. Were the refusal kept, the
/// fixed request would meet it: a replayed 422, or a 422 for "a different
/// request" under the same key.
async fn a_refused_command_is_not_remembered<D: crate::helpers::EventLog>(
    app: crate::helpers::TestApp<D>,
) {
    let token = app.signed_up("fixit@example.com").await;
    let events = app.event_count().await;
    let bad = keyed_post(&app, &token, "k", json!({ "name": "" })).await;
    problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(app.event_count().await, events, "a refusal appends nothing");

    // The fixed request under the same key is decided afresh: created, not replayed.
    let fixed = keyed_post(&app, &token, "k", json!({ "name": "Fixed" })).await;
    assert_eq!(fixed.status(), StatusCode::CREATED);
    assert!(
        fixed.headers().get("idempotent-replayed").is_none(),
        "the fixed request was answered from a stored response"
    );
    let created: Value = fixed.json().await.unwrap();
    assert_eq!(created["name"], "Fixed");
    assert_eq!(app.event_count().await, events + 1);

    // From now on the key holds that success: a retry replays it.
    let retry = keyed_post(&app, &token, "k", json!({ "name": "Fixed" })).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap()["id"], created["id"]);
    assert_eq!(app.event_count().await, events + 1);
}

/// A retry while the first request is still running gets 409, and once the first
/// has answered, the retry gets its response. The first is held in flight
/// deterministically: the test holds an uncommitted claim on the same email, so
/// the registration's own claim waits on it.
// Server-only: holds a Postgres row lock on the email's reservation.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_the_first_runs_is_409() {
    let app = spawn_app().await;
    let body =
        json!({ "email": "slow@example.com", "password": "correct horse", "display_name": "S" });
    let mut blocker = PgConnection::connect(&app.db.url).await.unwrap();
    let mut claim = blocker.begin().await.unwrap();
    // Emails are claimed by their keyed hash.
    sqlx::query("INSERT INTO reservations (scope, value, stream_id) VALUES ('user_email', $1, $2)")
        .bind(crate::helpers::master_key().email_lookup("slow@example.com"))
        .bind(uuid::Uuid::now_v7())
        .execute(&mut *claim)
        .await
        .unwrap();

    let register = || {
        app.client
            .post(app.url("/api/v1/users"))
            .header("idempotency-key", "register-slow")
            .json(&body)
            .send()
    };
    let first = tokio::spawn(register());
    // Wait until the first request is blocked on the test's claim.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&app.db.name)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first request never blocked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let duplicate = register().await.unwrap();
    problem(duplicate, StatusCode::CONFLICT).await;

    // Let the first one through: it answers 201, and a retry now replays it.
    claim.rollback().await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let retry = register().await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap()["id"], first["id"]);
    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'UserRegistered'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(users, 1);
}

crate::on_both!(a_key_expires_after_its_time_to_live, with ["--idempotency-key-ttl-seconds", "1"]);
async fn a_key_expires_after_its_time_to_live<D>(app: TestApp<D>) {
    let token = app.signed_up("expiry@example.com").await;
    let first = keyed_post(&app, &token, "daily", json!({ "name": "Mika" })).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let replayed = keyed_post(&app, &token, "daily", json!({ "name": "Mika" })).await;
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    // Past the key's life, the same request is a new request.
    let again = keyed_post(&app, &token, "daily", json!({ "name": "Mika" })).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(again.headers().get("idempotent-replayed").is_none());
    let again: Value = again.json().await.unwrap();
    assert_ne!(
        again["id"], first["id"],
        "the expired response was replayed"
    );
    // And the key now holds the new response.
    let replayed = keyed_post(&app, &token, "daily", json!({ "name": "Mika" })).await;
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    let replayed: Value = replayed.json().await.unwrap();
    assert_eq!(replayed["id"], again["id"]);
}
