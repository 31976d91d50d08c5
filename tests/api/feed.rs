//! Projection workers fed by the event store itself (`--projection-feed store`):
//! no relay and no bus between the store and the read models. They read in
//! commit order below the read horizon, as the relay does, so an event whose
//! transaction commits late is applied late, never skipped.

use std::time::Duration;

use ai_secretary::startup::Roles;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, consistency, eventually, spawn_app_on};
use crate::support::{BusNames, TestDb};

/// The API and every projection, tailing the store; no relay, no replier.
async fn tailing_app() -> TestApp {
    let roles = Roles {
        relay: false,
        replier: false,
        ..Roles::all()
    };
    spawn_app_on(
        TestDb::new().await,
        BusNames::new(),
        &["--projection-feed", "store"],
        roles,
    )
    .await
}

/// `(name, events applied)` of every projection's checkpoint.
async fn applied(app: &TestApp) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT name, events FROM checkpoints ORDER BY name")
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn workers_tailing_the_store_serve_read_your_writes_without_the_bus() {
    let app = tailing_app().await;
    let token = app.signed_up("tail@example.com").await;
    let assistant = app.assistant(&token, "Tailer").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap();

    let posted = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "hello, store" }),
        )
        .await;
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    let token_after = consistency(&posted);
    let messages = app
        .get_ok(
            &format!("/conversations/{id}/messages"),
            &token,
            Some(&token_after),
        )
        .await;
    let contents: Vec<&str> = messages["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents, ["hello, store"], "{messages}");
    let listed = app
        .get_ok(&format!("/conversations/{id}"), &token, Some(&token_after))
        .await;
    // The message and its reply, queued (no replier runs here).
    assert_eq!(listed["message_count"], 2, "{listed}");

    // Nothing went through the bus: the relay's stream was never even made.
    let jetstream =
        async_nats::jetstream::new(async_nats::connect(&app.names.nats_url).await.unwrap());
    assert!(
        jetstream.get_stream(&app.names.stream).await.is_err(),
        "the stream {} exists",
        app.names.stream
    );
}

#[tokio::test]
async fn an_event_committed_late_is_applied_late_never_skipped() {
    let app = tailing_app().await;
    let token = app.signed_up("late@example.com").await;
    let before: i64 = app.event_count().await;
    eventually("every projection has applied the sign-up", async || {
        let applied = applied(&app).await;
        match applied.iter().all(|(_, n)| *n == before)
            && applied.len() == ai_secretary::startup::projection_names().len()
        {
            true => Ok(()),
            false => Err(format!("{applied:?} of {before}")),
        }
    })
    .await;

    // A: an event inserted in a transaction left open. It takes its place in
    // commit order below B, which commits first.
    let mut held = app.db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data)
         VALUES ($1, $2, 'test', 1, 'Tested', '{}')",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .execute(&mut *held)
    .await
    .unwrap();
    let b = app.assistant(&token, "Committed first").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While A is open nobody may pass it: B waits, unapplied.
    for (name, n) in applied(&app).await {
        assert_eq!(n, before, "{name} moved past an open transaction");
    }
    held.commit().await.unwrap();

    // Both arrive (A is of a type no projection reads: each moves past it), and
    // every checkpoint counts every event of the store.
    let total = app.event_count().await;
    assert_eq!(total, before + 2);
    eventually("every projection has applied A and B", async || {
        let applied = applied(&app).await;
        match applied.iter().all(|(_, n)| *n == total) {
            true => Ok(()),
            false => Err(format!("{applied:?} of {total}")),
        }
    })
    .await;
    let id = b["id"].as_str().unwrap();
    let assistant: Value = app.get_ok(&format!("/assistants/{id}"), &token, None).await;
    assert_eq!(assistant["name"], "Committed first");
}
