//! Projection workers and the replier fed by the event store itself
//! (`--event-feed store`): no relay and no bus between the store and what
//! consumes it. They read in commit order below the read horizon, as the relay
//! does, so an event whose transaction commits late is applied late, never
//! skipped; and a replier that crashes answers what it had not finished.

use std::time::Duration;

use ai_secretary::startup::Roles;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{EventLog, TestApp, Topology, eventually, spawn_app_on};
use crate::support::{BusNames, TestDb, http::consistency};

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
        &["--event-feed", "store"],
        roles,
    )
    .await
}

/// `(endings, distinct replies ended)` in the store.
async fn endings<D: EventLog>(app: &TestApp<D>) -> (i64, i64) {
    crate::on_db!(app.read_side().await, |pool| sqlx::query_as(
        "SELECT count(*), count(DISTINCT data ->> 'reply_id') FROM events
         WHERE event_type IN ('ReplyCompleted', 'ReplyFailed')",
    )
    .fetch_one(pool)
    .await
    .unwrap())
}

/// The service tailing the store, with or without the replier: on the
/// servers with `--event-feed store` and no relay; the embedded service
/// always tails.
fn tailing<D: EventLog>(replier: bool) -> (&'static [&'static str], Roles) {
    let roles = Roles {
        relay: false,
        replier,
        ..Roles::all()
    };
    let extra: &[&str] = if D::SERVERS {
        &["--event-feed", "store"]
    } else {
        &[]
    };
    (extra, roles)
}

/// `(name, events applied)` of every projection's checkpoint.
async fn applied(app: &TestApp) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT name, events FROM checkpoints ORDER BY name")
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

// Server-only: the servers' `--event-feed store` (the embedded service always tails: its tests are embedded.rs and sqlite_workers.rs).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
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
    let token_after = consistency(&posted).unwrap();
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

// Server-only: Postgres' commit order below the read horizon (an open transaction; SQLite has one writer).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
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

crate::on_both!(
    a_replier_tailing_the_store_answers_each_request_once_across_a_crash,
    spawns
);
async fn a_replier_tailing_the_store_answers_each_request_once_across_a_crash<D: Topology>() {
    // Requests committed while no replier runs at all...
    let (extra, roles) = tailing::<D>(false);
    let app = D::spawn(extra, roles).await;
    let token = app.signed_up("replies@example.com").await;
    let assistant = app.assistant(&token, "Answerer").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap().to_owned();
    let post = async |app: &TestApp<D>, n: usize| {
        let posted = app
            .post(
                &format!("/conversations/{id}/messages"),
                &token,
                json!({ "content": format!("question {n}") }),
            )
            .await;
        assert_eq!(posted.status(), StatusCode::ACCEPTED);
    };
    for n in 0..10 {
        post(&app, n).await;
    }
    let (data, names) = D::stop(app);
    // ...are answered by the first replier to start, from its checkpoint.
    let (extra, roles) = tailing::<D>(true);
    let app = data.start(names, extra, roles).await;
    for n in 10..20 {
        post(&app, n).await;
    }
    // A crash with replies in flight: whatever had not ended is answered by
    // the next process.
    let (data, names) = D::crash(app);
    let (extra, roles) = tailing::<D>(true);
    let app = data.start(names, extra, roles).await;
    for n in 20..30 {
        post(&app, n).await;
    }
    eventually("30 replies ended", async || match endings(&app).await {
        (30, 30) => Ok(()),
        other => Err(format!("(endings, replies) = {other:?}")),
    })
    .await;
    // Nothing more comes: each ended exactly once, and the replier's
    // checkpoint passed every request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(endings(&app).await, (30, 30));
    let db = app.read_side().await;
    let head: i64 = crate::on_db!(db, |pool| sqlx::query_scalar(
        "SELECT global_position FROM events WHERE event_type = 'ReplyRequested'
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap());
    eventually(
        "the replier's checkpoint passes every request",
        async || {
            let at: i64 = crate::on_db!(db, |pool| sqlx::query_scalar(
                "SELECT global_position FROM checkpoints WHERE name = 'replier'",
            )
            .fetch_one(pool)
            .await
            .map_err(|e| e.to_string()))?;
            (at >= head).then_some(()).ok_or(format!("{at} < {head}"))
        },
    )
    .await;
    // The list is the `messages` projection's, a worker of its own: where the
    // replier is says nothing of where it is.
    crate::progress::caught_up(&db, &["messages"]).await;
    let messages = app
        .get_ok(
            &format!("/conversations/{id}/messages?limit=100"),
            &token,
            None,
        )
        .await;
    let completed = messages["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "assistant" && m["status"] == "completed")
        .count();
    assert_eq!(completed, 30, "{messages}");
}
