//! Failover: standby workers taking over when the active ones lose their
//! connections, commands and queries riding out cut connections, a deposed
//! worker writing nothing, and a stopped or frozen Redis costing queries little.
//!
//! Connections are cut with `pg_terminate_backend` on every backend of the
//! test's own database (never another test's), from a connection to the
//! `postgres` database so the cutter survives its own cut.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use ai_secretary::{recovery::verify_report, startup::Roles};
use ai_secretary_projections::{
    Db, Position,
    checkpoint::{self, Fence},
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    helpers::{
        TestApp, eventually, eventually_within, spawn_app_on, spawn_app_with,
        spawn_app_without_replier,
    },
    progress::caught_up,
    servers::PrivateServer,
    support::{
        BusNames, TestDb,
        http::{self, consistency},
        progress::{checkpoints, consumers},
        server_url,
    },
};

// ---------------------------------------------------------------------------
// Cutting connections

/// Terminate every backend of `database` (the test's own), as an idle-connection
/// killer, a failover or an operator would. Returns how many were cut.
async fn cut_connections(database: &str) -> i64 {
    let mut admin = PgConnection::connect(&format!("{}/postgres", server_url()))
        .await
        .expect("connect to the postgres database");
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .expect("terminate the test database's backends");
    admin.close().await.expect("close the admin connection");
    cut
}

/// A pool of its own for the test's checks (the test database's pool is cut too).
async fn fresh_pool(db: &TestDb) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.url)
        .await
        .expect("connect to the test database")
}

/// The service, all in one process but the replier, with one user who has
/// one conversation: the service, the user's token and the conversation's id.
async fn app_with_a_conversation(email: &str, assistant: &str) -> (TestApp, String, String) {
    let app = spawn_app_without_replier(&[]).await;
    let token = app.signed_up(email).await;
    let assistant = app.assistant(&token, assistant).await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let c = conversation["id"].as_str().unwrap().to_owned();
    (app, token, c)
}

/// Rename conversation `c` as the holder of `token`; the command's consistency token.
async fn rename(app: &TestApp, token: &str, c: &str, title: &str) -> String {
    let response = app
        .send(
            Method::PATCH,
            &format!("/api/v1/conversations/{c}"),
            Some(token),
            Some(json!({ "title": title })),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    consistency(&response).unwrap()
}

// ---------------------------------------------------------------------------
// Load: writers posting messages into their own conversations

/// One writer's identity and conversation.
#[derive(Clone)]
struct Writer {
    token: String,
    conversation: String,
}

/// What a load run saw: every status, and each acknowledged post's ids.
#[derive(Default)]
struct Load {
    statuses: BTreeMap<u16, u64>,
    /// (conversation, message id, reply id) of every 2xx.
    acknowledged: Vec<(String, String, String)>,
}

impl Load {
    fn server_errors(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| **status >= 500)
            .map(|(_, n)| n)
            .sum()
    }
}

async fn writers(app: &TestApp, n: usize) -> Vec<Writer> {
    let mut writers = Vec::new();
    for i in 0..n {
        let token = app
            .signed_up(&format!(
                "writer{i}-{}@example.com",
                Uuid::new_v4().simple()
            ))
            .await;
        let assistant = app.assistant(&token, &format!("Aide {i}")).await;
        let conversation = app.conversation(&token, &assistant["id"]).await;
        writers.push(Writer {
            token,
            conversation: conversation["id"].as_str().unwrap().to_owned(),
        });
    }
    writers
}

/// Each writer posts messages, one at a time, until `until`.
async fn drive(app: &TestApp, writers: &[Writer], until: Instant) -> Load {
    let runs = writers.iter().enumerate().map(|(w, writer)| async move {
        let mut load = Load::default();
        let mut i = 0;
        while Instant::now() < until {
            i += 1;
            let response = app
                .post(
                    &format!("/conversations/{}/messages", writer.conversation),
                    &writer.token,
                    json!({ "content": format!("writer {w} message {i}") }),
                )
                .await;
            let status = response.status().as_u16();
            *load.statuses.entry(status).or_default() += 1;
            if response.status().is_success() {
                let body: Value = response.json().await.unwrap();
                load.acknowledged.push((
                    writer.conversation.clone(),
                    body["message"]["id"].as_str().unwrap().to_owned(),
                    body["reply"]["id"].as_str().unwrap().to_owned(),
                ));
            } else {
                eprintln!("{status}: {}", response.text().await.unwrap_or_default());
            }
        }
        load
    });
    let mut total = Load::default();
    for load in futures::future::join_all(runs).await {
        for (status, n) in load.statuses {
            *total.statuses.entry(status).or_default() += n;
        }
        total.acknowledged.extend(load.acknowledged);
    }
    total
}

/// Drive load for `seconds`, cutting every connection of the database at each
/// of `cuts` (seconds from the start).
async fn drive_with_cuts(app: &TestApp, writers: &[Writer], seconds: u64, cuts: &[u64]) -> Load {
    let start = Instant::now();
    let load = drive(app, writers, start + Duration::from_secs(seconds));
    let cutter = async {
        for at in cuts {
            tokio::time::sleep_until((start + Duration::from_secs(*at)).into()).await;
            let cut = cut_connections(&app.db.name).await;
            eprintln!("cut {cut} connections at {at} s");
            assert!(cut > 0, "nothing to cut at {at} s");
        }
    };
    let (load, ()) = tokio::join!(load, cutter);
    eprintln!(
        "statuses {:?}; {} acknowledged",
        load.statuses,
        load.acknowledged.len()
    );
    load
}

// ---------------------------------------------------------------------------
// The tests

// Server-only: Postgres connection cuts and lease takeover between processes (SQLite's leases: sqlite_workers.rs).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_workers_take_over_after_connection_cuts_and_nothing_is_lost() {
    let (db, names) = (TestDb::new().await, BusNames::new());
    // The active instance runs everything; the standby runs a second relay and
    // a second worker for every projection, waiting for their leases.
    let standby_roles = Roles {
        api: false,
        replier: false,
        ..Roles::all()
    };
    let standby = spawn_app_on(db.borrowed(), names.borrowed(), &[], standby_roles).await;
    let app = spawn_app_on(db, names, &[], Roles::all()).await;
    let writers = writers(&app, 6).await;

    let load = drive_with_cuts(&app, &writers, 10, &[3, 6]).await;
    assert_eq!(load.server_errors(), 0, "statuses {:?}", load.statuses);
    assert!(
        load.acknowledged.len() > 50,
        "too little load to mean anything: {:?}",
        load.statuses
    );

    let pool = fresh_pool(&app.db).await;
    // Every acknowledged message and its reply are listed, the reply answered.
    let expected: Vec<&str> = load
        .acknowledged
        .iter()
        .flat_map(|(_, message, reply)| [message.as_str(), reply.as_str()])
        .collect();
    // The replier answers the backlog the load left at its own pace.
    eventually_within(
        Duration::from_secs(180),
        Duration::from_millis(250),
        "every acknowledged message and reply is in `messages`, ended",
        async || {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT id::text, status FROM messages WHERE id::text = ANY($1)")
                    .bind(&expected)
                    .fetch_all(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
            let pending = rows
                .iter()
                .filter(|(_, status)| status == "queued" || status == "in_progress")
                .count();
            if rows.len() == expected.len() && pending == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} listed, {pending} not ended",
                    rows.len(),
                    expected.len()
                ))
            }
        },
    )
    .await;
    caught_up(&pool, &consumers()).await;
    // Each conversation counts exactly its acknowledged messages and replies.
    let mut posted: HashMap<&str, i64> = HashMap::new();
    for (conversation, ..) in &load.acknowledged {
        *posted.entry(conversation.as_str()).or_default() += 2;
    }
    for (conversation, count) in posted {
        let listed: i64 =
            sqlx::query_scalar("SELECT message_count FROM conversations WHERE id::text = $1")
                .bind(conversation)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(listed, count, "conversation {conversation}");
    }
    let (report, clean) = verify_report(
        &crate::helpers::pg(&pool),
        &crate::helpers::master_key(),
        &[],
    )
    .await
    .unwrap();
    assert!(clean, "{report}");
    // The cuts did depose the owners: every lease changed hands at least twice.
    let epochs: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, epoch FROM checkpoints ORDER BY name")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (name, epoch) in &epochs {
        assert!(
            *epoch >= 3,
            "{name} was taken over only {epoch} times: {epochs:?}"
        );
    }
    drop(standby);
}

// Server-only: cuts Postgres connections under load.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_ride_out_cut_connections_without_a_5xx_or_a_double() {
    let app = spawn_app_on(TestDb::new().await, BusNames::new(), &[], Roles::only_api()).await;
    let writers = writers(&app, 8).await;

    let load = drive_with_cuts(&app, &writers, 8, &[2, 5]).await;
    assert_eq!(load.server_errors(), 0, "statuses {:?}", load.statuses);

    // Every 2xx is durable, exactly once: one MessagePosted per acknowledged
    // message, and no message the client was not told about.
    let pool = fresh_pool(&app.db).await;
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT data->>'message_id' FROM events WHERE event_type = 'MessagePosted'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &stored {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    for (_, message, _) in &load.acknowledged {
        assert_eq!(
            counts.get(message.as_str()),
            Some(&1),
            "acknowledged message {message} stored {:?} times",
            counts.get(message.as_str())
        );
    }
    assert_eq!(
        stored.len(),
        load.acknowledged.len(),
        "messages stored without a 2xx (a retried append doubled?)"
    );
}

/// The process hears Postgres over one listening connection: the relay's
/// commits and the API's checkpoint moves both come over it (Postgres wakes
/// every listening backend on every notifying commit, so a second one would
/// double that work). When that connection is cut, the process listens again
/// on a new one, and a command is still read back through its token.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_listens_for_the_whole_process_and_listens_again_when_cut() {
    let (app, token, c) = app_with_a_conversation("listener@example.com", "Ears").await;
    let pool = fresh_pool(&app.db).await;
    let listening = async || -> Vec<i32> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN %'",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let first = eventually("one listening connection", async || {
        match listening().await.as_slice() {
            [pid] => Ok(*pid),
            pids => Err(format!("listening backends {pids:?}")),
        }
    })
    .await;
    let query: String = sqlx::query_scalar("SELECT query FROM pg_stat_activity WHERE pid = $1")
        .bind(first)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        query.contains("ai_secretary_events") && query.contains("ai_secretary_checkpoints"),
        "the one connection listens on both channels: {query}"
    );

    let cut: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(cut, "the listening backend is terminated");
    let again = eventually("listening again", async || {
        match listening().await.as_slice() {
            [pid] if *pid != first => Ok(*pid),
            pids => Err(format!(
                "listening backends {pids:?} (the cut one was {first})"
            )),
        }
    })
    .await;
    assert_ne!(again, first);

    for title in ["heard", "heard again"] {
        let at = rename(&app, &token, &c, title).await;
        let read = http::get(
            &app.client,
            &app.address,
            &format!("/conversations/{c}"),
            &token,
            Some(&at),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(read.status(), StatusCode::OK);
        let read: Value = read.json().await.unwrap();
        assert_eq!(read["title"], title, "read through the command's token");
    }
    assert_eq!(
        listening().await,
        vec![again],
        "still one listening connection"
    );
}

/// The active `conversations` worker is cut off in the middle of a batch (its
/// connections die while the batch waits on a lock) and a standby takes its
/// lease, and the relay's: the deposed worker and relay write nothing more,
/// however much is posted. Both resume, losing nothing, once the lease is free.
///
/// Which of its two guards stops the deposed worker first (its watcher finding
/// the lock connection dead, or the fence refusing its next batch) is a race;
/// either way nothing is written. The fence alone is tested by
/// `a_checkpoint_write_is_refused_unless_its_epoch_and_position_still_hold`.
// Server-only: Postgres row locks and lease fencing between processes (SQLite's: sqlite_workers.rs).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_worker_writes_nothing_after_its_lease_is_taken() {
    let (app, token, c) = app_with_a_conversation("deposed@example.com", "Fenced").await;
    let pool = &app.db.pool;
    caught_up(pool, &consumers()).await;
    let count = async || -> i64 {
        sqlx::query_scalar("SELECT message_count FROM conversations WHERE id::text = $1")
            .bind(&c)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    let post = async |i: u32| {
        let response = app
            .post(
                &format!("/conversations/{c}/messages"),
                &token,
                json!({ "content": format!("message {i}") }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    };

    // Hold the worker's next batch in the middle: a table lock (which, unlike a
    // row lock, takes no transaction id, so the relay still reads past it).
    let mut blocker = PgConnection::connect(&app.db.url).await.unwrap();
    let mut blocking = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE conversations IN SHARE MODE")
        .execute(&mut *blocking)
        .await
        .unwrap();
    post(1).await;
    let batch: i32 = eventually("the worker's batch waits in the middle", async || {
        let waiting: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE '%UPDATE conversations SET%'",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        waiting
            .first()
            .copied()
            .ok_or("no batch waiting".to_owned())
    })
    .await;

    // Its connections die (the batch's and the leases'), and a standby (this
    // test) takes both leases: their advisory locks, and the next epochs.
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database()
           AND (pid = $1 OR application_name IN
                ('ai-secretary lease conversations', 'ai-secretary lease relay'))",
    )
    .bind(batch)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        cut, 3,
        "the batch's connection and the two lease connections"
    );
    let mut standby = PgConnection::connect(&app.db.url).await.unwrap();
    for key in [
        "ai_secretary.projection.conversations",
        "ai_secretary.relay",
    ] {
        sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
            .bind(key)
            .execute(&mut standby)
            .await
            .unwrap();
    }
    sqlx::query(
        "UPDATE checkpoints SET epoch = epoch + 1 WHERE name IN ('conversations', 'relay')",
    )
    .execute(&mut standby)
    .await
    .unwrap();
    let before = checkpoints(pool).await.unwrap();
    let counted = count().await;
    assert_eq!(
        counted, 0,
        "the batch cut in the middle left nothing behind"
    );
    blocking.commit().await.unwrap();

    // Nothing gets written while the standby holds the leases.
    for i in 2..=6 {
        post(i).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = checkpoints(pool).await.unwrap();
    assert_eq!(after["conversations"], before["conversations"]);
    assert_eq!(after["relay"], before["relay"]);
    assert_eq!(count().await, counted, "a deposed worker wrote a row");

    // The standby goes away: the workers take their leases back and lose nothing.
    standby.close().await.unwrap();
    caught_up(pool, &consumers()).await;
    assert_eq!(count().await, 2 * 6);
    let epochs: Vec<i64> = sqlx::query_scalar(
        "SELECT epoch FROM checkpoints WHERE name IN ('conversations', 'relay')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(epochs, [3, 3], "taken, bumped by the standby, taken back");
}

/// The fence itself: an owner's checkpoint write moves the row only if the
/// epoch it holds and the position it started from are still the row's.
// Server-only: the Postgres checkpoint's compare-and-set (SQLite's: sqlite_workers.rs).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn a_checkpoint_write_is_refused_unless_its_epoch_and_position_still_hold() {
    let db = TestDb::new().await;
    let alone = Db::Postgres(db.pool.clone());
    let mut conn = db.pool.acquire().await.unwrap();
    let start = checkpoint::postgres::ensure(&mut *conn, "fenced")
        .await
        .unwrap();
    let at = |gp| Position {
        transaction_id: 7,
        global_position: gp,
    };
    let fence = |epoch, from| Fence { epoch, from };
    let server_default: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let one_more = |fence, to| checkpoint::Move {
        fence,
        to,
        applied: 1,
        stream_sequence: None,
    };
    // Both ways a worker moves it: in its batch's transaction, and alone (a
    // batch with nothing else to write).
    let in_batch = async |fence: Fence, to: Position| -> (bool, String) {
        let mut tx = db.pool.begin().await.unwrap();
        let moved = checkpoint::postgres::save(&mut *tx, "fenced", one_more(fence, to))
            .await
            .unwrap();
        // A move sets its transaction's commit not to wait for the disk.
        let wait: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (moved, wait)
    };
    let save_alone = async |fence: Fence, to: Position| -> bool {
        checkpoint::save_alone(&alone, "fenced", one_more(fence, to))
            .await
            .unwrap()
    };
    assert!(save_alone(fence(start.epoch, start.position), at(1)).await);
    // A standby takes over.
    sqlx::query("UPDATE checkpoints SET epoch = epoch + 1 WHERE name = 'fenced'")
        .execute(&mut *conn)
        .await
        .unwrap();
    // The deposed owner, from where it rightly was: refused, either way, and
    // the refused move leaves its transaction's setting alone.
    assert_eq!(
        in_batch(fence(start.epoch, at(1)), at(2)).await,
        (false, server_default.clone())
    );
    assert!(!save_alone(fence(start.epoch, at(1)), at(2)).await);
    // The new owner from a position that is not the row's: refused.
    let epoch = start.epoch + 1;
    assert_eq!(
        in_batch(fence(epoch, at(0)), at(2)).await,
        (false, server_default.clone())
    );
    assert!(!save_alone(fence(epoch, at(0)), at(2)).await);
    // The new owner from the row's position: moved, in a batch that does not
    // wait for the disk; and then alone.
    assert_eq!(
        in_batch(fence(epoch, at(1)), at(2)).await,
        (true, "off".to_owned())
    );
    assert!(save_alone(fence(epoch, at(2)), at(3)).await);
    let row = checkpoint::postgres::ensure(&mut *conn, "fenced")
        .await
        .unwrap();
    assert_eq!((row.position, row.epoch), (at(3), epoch));
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT events FROM checkpoints WHERE name = 'fenced'")
            .fetch_one(&mut *conn)
            .await
            .unwrap(),
        3,
        "three moves counted, the refused ones not"
    );
}

/// With Redis stopped, and then frozen, every query is served from Postgres,
/// with or without a consistency token; frozen, it costs each query at most a
/// short timeout once per breaker window.
// Server-only: stops and freezes a Redis server.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_served_from_postgres_while_redis_is_stopped_or_frozen() {
    let mut redis = PrivateServer::redis().await;
    let app = spawn_app_without_replier(&["--redis-url", &redis.url()]).await;
    let token = app.signed_up("frozen@example.com").await;
    let assistant = app.assistant(&token, "Cold").await;
    let a = assistant["id"].as_str().unwrap().to_owned();
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let c = conversation["id"].as_str().unwrap().to_owned();

    // A command's token, and reads with and without it, checked for content.
    let rename = async |title: &str| -> String { rename(&app, &token, &c, title).await };
    let read = async |path: &str, at: Option<&str>| -> (Duration, Value) {
        let request = http::get(&app.client, &app.address, path, &token, at);
        let started = Instant::now();
        let response = request.send().await.unwrap();
        let took = started.elapsed();
        if took > Duration::from_millis(100) {
            eprintln!("slow: GET {path} with {at:?}: {took:?}");
        }
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        (took, response.json().await.unwrap())
    };
    // Warm: the cache answers.
    let at = rename("warm").await;
    let (_, one) = read(&format!("/conversations/{c}"), Some(&at)).await;
    assert_eq!(one["title"], "warm");

    redis.kill();
    let at = rename("stopped").await;
    let (_, one) = read(&format!("/conversations/{c}"), Some(&at)).await;
    assert_eq!(one["title"], "stopped", "read with the token");
    let (_, one) = read(&format!("/assistants/{a}"), None).await;
    assert_eq!(one["name"], "Cold");

    redis.start().await;
    eventually("queries use Redis again", async || {
        let ready: Value = app
            .send(Method::GET, "/ready", None, None)
            .await
            .json()
            .await
            .unwrap();
        (ready["status"] == "ready")
            .then_some(())
            .ok_or(ready.to_string())
    })
    .await;

    redis.freeze();
    let mut took = Vec::new();
    for i in 0..40 {
        let title = format!("frozen {i}");
        let at = rename(&title).await;
        // What is timed is the query, not the projection it waits for (a loaded
        // machine makes that wait long whatever Redis does).
        caught_up(&app.db.pool, &["conversations".to_owned()]).await;
        let (t, one) = read(&format!("/conversations/{c}"), Some(&at)).await;
        assert_eq!(one["title"], title.as_str(), "read with the token");
        took.push(t);
        let (t, one) = read(&format!("/conversations/{c}"), None).await;
        assert!(one["title"].is_string());
        took.push(t);
        let (t, one) = read(&format!("/assistants/{a}"), None).await;
        assert_eq!(one["name"], "Cold");
        took.push(t);
        let (t, me) = read("/users/me", None).await;
        assert_eq!(me["email"], "frozen@example.com");
        took.push(t);
    }
    redis.thaw();
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    eprintln!(
        "while frozen: {} reads, median {:?}, p99 {p99:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took.last().unwrap()
    );
    assert!(
        p99 < Duration::from_millis(100),
        "p99 {p99:?} with Redis frozen"
    );
}

// Server-only: lease holders across processes on Postgres.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn admin_projections_shows_each_lease_holder() {
    let app = spawn_app_with(&["--admin-emails", "lease-admin@example.com"]).await;
    let token = app.signed_up("lease-admin@example.com").await;
    caught_up(&app.db.pool, &consumers()).await;
    let listed: Value = app
        .send(Method::GET, "/api/v1/admin/projections", Some(&token), None)
        .await
        .json()
        .await
        .unwrap();
    for projection in listed["data"].as_array().unwrap() {
        assert_eq!(projection["epoch"], 1, "{projection}");
        let owner = projection["owner"].as_str().unwrap();
        assert!(
            owner.ends_with(&format!("/{}", std::process::id())),
            "{projection}"
        );
        assert!(projection["owner_since"].is_string(), "{projection}");
    }
}
