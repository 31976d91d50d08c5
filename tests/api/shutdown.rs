//! Graceful shutdown of the real binary under load (docs/architecture.md: "in-flight
//! requests finish, consumers ack what they committed, and nothing is
//! half-written").

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::{
    helpers::eventually,
    process::{Service, configured},
    support::{BusNames, TestDb},
};

const ADMIN: &str = "admin@example.com";

/// Backends of this database waiting on a lock, by what they run.
async fn waiting_on_a_lock(service: &Service, query: &str) -> Result<(), String> {
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
    )
    .bind(format!("%{query}%"))
    .fetch_one(&service.db.pool)
    .await
    .unwrap();
    if waiting > 0 {
        Ok(())
    } else {
        Err(format!("nothing waits on a lock running {query:?}"))
    }
}

/// SIGTERM while commands stream in, a registration is held in flight and an
/// admin rebuild is running: every request the server took is answered 2xx and
/// committed once (those refused are refused at the door: the listener is
/// closed), the rebuild ends `failed` ("interrupted by shutdown") with nothing
/// live touched, the process exits 0, and `verify` finds no drift.
///
/// Two things are held in place by locks of the test's own, so that they are
/// surely in flight when the signal comes: the registration's email claim
/// waits on an uncommitted claim of the same email, and the rebuild waits to
/// drop a leftover `usage_daily__next` table (as an interrupted earlier
/// rebuild leaves behind) that the test holds a lock on.
// Server-only: holds Postgres locks to keep work in flight at SIGTERM.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_requests_and_interrupts_a_rebuild_cleanly() {
    let mut service = Service::start_on(
        TestDb::new().await,
        BusNames::new(),
        &[
            ("ADMIN_EMAILS", ADMIN),
            ("RATE_LIMIT_COMMANDS_PER_MINUTE", "0"),
        ],
    )
    .await;
    let admin = service.signed_up(ADMIN).await;
    let token = service.signed_up("busy@example.com").await;
    let assistant = service
        .created("/assistants", &token, json!({ "name": "Busy" }))
        .await;
    // One conversation per client: they do not contend for one stream.
    let mut conversations = Vec::new();
    for _ in 0..4 {
        let conversation = service.conversation(&token, &assistant).await;
        conversations.push(service.url(&format!(
            "/api/v1/conversations/{}/messages",
            conversation["id"].as_str().unwrap()
        )));
    }

    // The rebuild, held at its first step on the leftover table.
    let mut holder = PgConnection::connect(&service.db.url).await.unwrap();
    sqlx::query("CREATE TABLE usage_daily__next (LIKE usage_daily)")
        .execute(&mut holder)
        .await
        .unwrap();
    let mut leftover = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE usage_daily__next IN ACCESS SHARE MODE")
        .execute(&mut *leftover)
        .await
        .unwrap();
    let (status, started) = service
        .call(
            Method::POST,
            "/api/v1/admin/projections/usage_daily/rebuild",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let rebuild = started["id"].as_str().unwrap().to_owned();
    eventually("the rebuild waits on the leftover table", async || {
        waiting_on_a_lock(&service, "usage_daily__next").await
    })
    .await;

    // The registration, held on its email claim.
    let mut claimer = PgConnection::connect(&service.db.url).await.unwrap();
    let mut claim = claimer.begin().await.unwrap();
    // Emails are claimed by their keyed hash.
    sqlx::query("INSERT INTO reservations (scope, value, stream_id) VALUES ('user_email', $1, $2)")
        .bind(crate::helpers::master_key().email_lookup("held@example.com"))
        .bind(Uuid::now_v7())
        .execute(&mut *claim)
        .await
        .unwrap();
    let held = tokio::spawn(
        service
            .client
            .post(service.url("/api/v1/users"))
            .json(&json!({ "email": "held@example.com", "password": "correct horse battery", "display_name": "Held" }))
            .send(),
    );
    eventually("the registration waits on the claim", async || {
        waiting_on_a_lock(&service, "reservations").await
    })
    .await;

    // Commands streaming in from four clients until the door closes.
    let signalled = tokio_util::sync::CancellationToken::new();
    let loaders: Vec<_> = conversations
        .into_iter()
        .enumerate()
        .map(|(n, url)| {
            let (client, token, signalled) =
                (reqwest::Client::new(), token.clone(), signalled.clone());
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                for i in 0..5_000 {
                    let sent = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&json!({ "content": format!("load {n}.{i}") }))
                        .send()
                        .await;
                    match sent {
                        Ok(response) => {
                            let status = response.status();
                            let body: Value = response.json().await.unwrap();
                            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
                            accepted.push(body["message"]["id"].as_str().unwrap().to_owned());
                        }
                        // Refused at the door once the shutdown began: never taken.
                        Err(_) if signalled.is_cancelled() => return accepted,
                        Err(e) => panic!("a request failed before the shutdown: {e}"),
                    }
                }
                accepted
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    signalled.cancel();
    service.sigterm();
    // The door closes (new connections are refused) while the registration is
    // still in flight; then its claim is let go, and it finishes.
    let address = service.address.clone();
    eventually(
        "the listener closes",
        async || match tokio::net::TcpStream::connect(&address).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting".to_owned()),
        },
    )
    .await;
    assert!(!held.is_finished(), "the held registration ended early");
    claim.rollback().await.unwrap();
    let registered = held.await.unwrap().expect("the registration is answered");
    assert_eq!(registered.status(), StatusCode::CREATED);

    let exit = tokio::time::timeout(Duration::from_secs(30), service.exited())
        .await
        .expect("the process exits within 30 s of SIGTERM");
    assert!(exit.success(), "exit status {exit:?}");
    let mut accepted = Vec::new();
    for loader in loaders {
        accepted.extend(loader.await.expect("every answered request was a 202"));
    }
    assert!(!accepted.is_empty(), "no load ran");
    leftover.rollback().await.unwrap();

    // Each accepted message is in the store, once; nothing else was appended.
    let pool = &service.db.pool;
    let mut stored: Vec<String> = sqlx::query_scalar(
        "SELECT data->>'message_id' FROM events WHERE event_type = 'MessagePosted'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    stored.sort();
    accepted.sort();
    assert_eq!(
        stored, accepted,
        "what was committed is not what was answered 202"
    );
    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'UserRegistered'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(users, 3, "admin, busy and held");

    let (state, error): (String, Option<String>) =
        sqlx::query_as("SELECT state, error FROM rebuilds WHERE id = $1::uuid")
            .bind(&rebuild)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), error.as_deref()),
        ("failed", Some("interrupted by shutdown"))
    );

    let url = service.db.url.clone();
    let mut verify = configured(&[("DATABASE_URL", &url)]);
    verify.arg("verify");
    let output = tokio::task::spawn_blocking(move || verify.output())
        .await
        .unwrap()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "verify after the shutdown:\n{printed}"
    );
    assert!(printed.contains("verify: no drift"), "{printed}");
}
