//! The read side when parts of it fail: NATS down while commands keep coming,
//! Redis down while queries keep coming, a relay that republishes what it had
//! already published, and projectors killed in the middle of a backlog.
//!
//! A test that stops a server runs its own private `nats-server` or
//! `redis-server` on a free port, with a data directory of its own, kills it and
//! restarts it on the same port (and, for NATS, the same JetStream store), and
//! always kills it at the end (a `Drop` guard). The shared servers other tests
//! use are never stopped; on them each test only touches its own database,
//! stream, subjects and Redis keys, so these tests run in parallel with the rest.
//! Nothing here waits a fixed time for an outcome: every expectation is polled
//! for with a deadline, and fails with what was last seen.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use ai_secretary::startup::{Roles, projection_names};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::{
    helpers::{
        TestApp, eventually, eventually_every, problem, spawn_app_on, spawn_app_with,
        spawn_app_without_replier, without_replier,
    },
    progress::{assert_each_event_applied_once, caught_up, event_count},
    servers::PrivateServer,
    support::{
        BusNames, TestDb,
        http::consistency,
        progress::{Checkpoint, checkpoints, consumers, head},
    },
};

// ---------------------------------------------------------------------------
// Polling and the read side's state

/// How many messages a JetStream stream holds.
async fn stream_messages(nats_url: &str, stream: &str) -> u64 {
    let client = async_nats::connect(nats_url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// A Redis command's answer, straight from the server.
async fn redis_call<T: redis::FromRedisValue>(
    redis_url: &str,
    cmd: &redis::Cmd,
) -> Result<T, String> {
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    cmd.query_async(&mut conn).await.map_err(|e| e.to_string())
}

/// The position a Redis cache key is stamped with, if any.
async fn stamp(redis_url: &str, key: &str) -> Result<Option<(i64, i64)>, String> {
    let (tx, gp): (Option<i64>, Option<i64>) =
        redis_call(redis_url, redis::cmd("HMGET").arg(key).arg("tx").arg("gp")).await?;
    Ok(tx.zip(gp))
}

/// The JSON a Redis cache key holds, if any (read straight from the server).
async fn cached_json(redis_url: &str, key: &str) -> Result<Option<String>, String> {
    redis_call(redis_url, redis::cmd("HGET").arg(key).arg("json")).await
}

// ---------------------------------------------------------------------------
// HTTP

/// Poll a GET carrying a consistency token until it answers 200 (a 503 means
/// the read side has not caught up yet).
async fn get_when_consistent(app: &TestApp, path: &str, token: &str, at: &str) -> Value {
    eventually(
        &format!("GET {path} with token {at} answers 200"),
        async || {
            let response = app.get(path, token, Some(at)).await;
            match response.status() {
                StatusCode::OK => Ok(response.json().await.unwrap()),
                StatusCode::SERVICE_UNAVAILABLE => Err("503".to_owned()),
                other => panic!("GET {path}: {other}: {}", response.text().await.unwrap()),
            }
        },
    )
    .await
}

/// `/ready`, which must answer 200 with Postgres up whatever else is missing.
async fn readiness(app: &TestApp) -> Value {
    let response = app.send(Method::GET, "/ready", None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["checks"]["postgres"], "ok", "{ready}");
    ready
}

fn id(resource: &Value) -> String {
    resource["id"].as_str().expect("an id").to_owned()
}

/// A command that must answer 2xx; its consistency token and body.
async fn command(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    body: Value,
) -> (String, Value) {
    let response = app
        .send(
            method.clone(),
            &format!("/api/v1{path}"),
            Some(token),
            Some(body),
        )
        .await;
    let status = response.status();
    assert!(
        status.is_success(),
        "{method} {path}: {status}: {}",
        response.text().await.unwrap()
    );
    let at = consistency(&response).unwrap();
    (at, response.json().await.unwrap())
}

async fn post_message(app: &TestApp, token: &str, conversation: &str, content: &str) -> String {
    let (at, body) = command(
        app,
        Method::POST,
        &format!("/conversations/{conversation}/messages"),
        token,
        json!({ "content": content }),
    )
    .await;
    assert_eq!(body["reply"]["status"], "queued");
    at
}

/// The user messages of a conversation's list, in order; every id in it unique.
fn user_contents(messages: &Value) -> Vec<String> {
    let data = messages["data"].as_array().unwrap();
    let ids: HashSet<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.len(),
        data.len(),
        "a message is listed twice: {messages}"
    );
    data.iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// The tests

// Server-only: stops a NATS server.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_succeed_while_nats_is_down_and_projections_catch_up() {
    let mut nats = PrivateServer::nats().await;
    let nats_url = nats.url();
    // Without the replier: the test counts every event the log holds.
    let app =
        spawn_app_without_replier(&["--nats-url", &nats_url, "--consistency-timeout-ms", "1000"])
            .await;
    let token = app.signed_up("nats-outage@example.com").await;
    let first = app.assistant(&token, "Before").await;
    let conversation = app.conversation(&token, &first["id"]).await;
    let (a1, c1) = (id(&first), id(&conversation));
    let at = post_message(&app, &token, &c1, "hello").await;
    // The pipeline runs through the private server before it goes away.
    let messages =
        get_when_consistent(&app, &format!("/conversations/{c1}/messages"), &token, &at).await;
    assert_eq!(user_contents(&messages), ["hello"]);
    caught_up(&app.db.pool, &consumers()).await;

    nats.kill();

    // Every command answers, without waiting for the bus.
    let started = Instant::now();
    let other = app.signed_up("nats-outage-2@example.com").await;
    let second = app.assistant(&token, "Second").await;
    let a2 = id(&second);
    command(
        &app,
        Method::PATCH,
        &format!("/assistants/{a1}"),
        &token,
        json!({ "name": "After" }),
    )
    .await;
    let c2 = id(&app.conversation(&token, &second["id"]).await);
    for content in ["one", "two", "three"] {
        post_message(&app, &token, &c1, content).await;
    }
    for content in ["uno", "dos"] {
        post_message(&app, &token, &c2, content).await;
    }
    let (last, _) = command(
        &app,
        Method::PATCH,
        &format!("/conversations/{c2}"),
        &token,
        json!({ "title": "Renamed while the bus was down" }),
    )
    .await;
    let commands_took = started.elapsed();
    assert!(
        commands_took < Duration::from_secs(10),
        "commands waited for the bus: {commands_took:?}"
    );

    // Queries answer from what the read side had (it cannot move without the bus).
    let list = app.get_ok("/assistants", &token, None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["data"][0]["name"], "Before");
    let one = app.get_ok(&format!("/assistants/{a1}"), &token, None).await;
    assert_eq!(one["id"], first["id"]);
    let me = app.get_ok("/users/me", &token, None).await;
    assert_eq!(me["email"], "nats-outage@example.com");
    // Still ready (Postgres answers), and saying what is missing.
    let ready = readiness(&app).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["checks"]["nats"], "unavailable", "{ready}");
    // A query that must see the last command cannot yet: a bounded wait, then 503.
    let waited = Instant::now();
    let stale = app
        .get(
            &format!("/conversations/{c1}/messages"),
            &token,
            Some(&last),
        )
        .await;
    assert_eq!(
        stale.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the read side moved on without the bus"
    );
    assert_eq!(stale.headers()["retry-after"], "1");
    problem(stale, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(waited.elapsed() >= Duration::from_millis(900));

    // Back on the same port with the same store: everything arrives, once.
    nats.start().await;
    let messages = get_when_consistent(
        &app,
        &format!("/conversations/{c1}/messages"),
        &token,
        &last,
    )
    .await;
    assert_eq!(user_contents(&messages), ["hello", "one", "two", "three"]);
    assert_eq!(messages["data"].as_array().unwrap().len(), 8);
    let messages = app
        .get_ok(
            &format!("/conversations/{c2}/messages"),
            &token,
            Some(&last),
        )
        .await;
    assert_eq!(user_contents(&messages), ["uno", "dos"]);
    assert_eq!(messages["data"].as_array().unwrap().len(), 4);

    let list = app
        .get_ok("/assistants?order=asc", &token, Some(&last))
        .await;
    let list = list["data"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let (l1, l2) = (&list[0], &list[1]);
    assert_eq!(
        (l1["id"].as_str(), l2["id"].as_str()),
        (Some(&*a1), Some(&*a2))
    );
    assert_eq!(l1["name"], "After");
    assert_eq!(l1["version"], 2);
    assert_eq!(l1["conversation_count"], 1);
    assert_eq!(l1["message_count"], 8);
    assert_eq!(l2["name"], "Second");
    assert_eq!(l2["conversation_count"], 1);
    assert_eq!(l2["message_count"], 4);
    let one = get_when_consistent(&app, &format!("/assistants/{a1}"), &token, &last).await;
    assert_eq!(one["name"], "After");
    assert_eq!(one["message_count"], 8);
    let renamed = get_when_consistent(&app, &format!("/conversations/{c2}"), &token, &last).await;
    assert_eq!(renamed["title"], "Renamed while the bus was down");
    assert_eq!(renamed["message_count"], 4);
    let conversations = app.get_ok("/conversations", &token, Some(&last)).await;
    assert_eq!(conversations["data"].as_array().unwrap().len(), 2);
    let others = app.get_ok("/assistants", &other, Some(&last)).await;
    assert_eq!(others["data"].as_array().unwrap().len(), 0);

    let pool = &app.db.pool;
    caught_up(pool, &consumers()).await;
    assert_each_event_applied_once(pool).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, 12);
    eventually("/ready says ready again", async || {
        let ready = readiness(&app).await;
        (ready["status"] == "ready")
            .then_some(())
            .ok_or(ready.to_string())
    })
    .await;
    // The relay may have re-sent what it had in flight; the stream holds each event once.
    assert_eq!(
        stream_messages(&nats_url, &app.names.stream).await,
        event_count(pool).await as u64
    );
}

// Server-only: stops a Redis server.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_while_redis_is_down() {
    let mut redis_server = PrivateServer::redis().await;
    let redis_url = redis_server.url();
    // Without the replier, whose answers would invalidate what the test caches.
    let app = spawn_app_without_replier(&[
        "--redis-url",
        &redis_url,
        "--consistency-timeout-ms",
        "1000",
    ])
    .await;
    let token = app.signed_up("redis-outage@example.com").await;
    let created = app.assistant(&token, "Before").await;
    let a = id(&created);
    let conversation = app.conversation(&token, &created["id"]).await;
    let c = id(&conversation);
    let at = post_message(&app, &token, &c, "hello").await;
    // Read once through the cache (which fills it), and the profile too.
    let one = get_when_consistent(&app, &format!("/assistants/{a}"), &token, &at).await;
    assert_eq!(one["name"], "Before");
    assert_eq!(one["message_count"], 2);
    let me = app.get_ok("/users/me", &token, None).await;
    assert_eq!(me["email"], "redis-outage@example.com");
    let key = format!("{}:assistant:{a}", app.names.redis_prefix);
    let cached = eventually("the assistant is cached", async || {
        cached_json(&redis_url, &key)
            .await?
            .ok_or_else(|| "no json yet".to_owned())
    })
    .await;
    assert!(cached.contains("\"Before\""), "{cached}");

    redis_server.kill();

    // Queries answer from Postgres, with the right data.
    let one = app.get_ok(&format!("/assistants/{a}"), &token, None).await;
    assert_eq!(one["name"], "Before");
    assert_eq!(one["message_count"], 2);
    let me = app.get_ok("/users/me", &token, None).await;
    assert_eq!(me["email"], "redis-outage@example.com");
    let list = app.get_ok("/assistants", &token, None).await;
    assert_eq!(list["data"][0]["id"], created["id"]);
    let list = app.get_ok("/conversations", &token, None).await;
    assert_eq!(list["data"][0]["id"], conversation["id"]);
    let one = app
        .get_ok(&format!("/conversations/{c}"), &token, None)
        .await;
    assert_eq!(one["message_count"], 2);
    // Still ready (Postgres answers), and saying what is missing.
    let ready = readiness(&app).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["checks"]["redis"], "unavailable", "{ready}");

    // Commands go on; the Postgres read models follow them.
    let (changed, body) = command(
        &app,
        Method::PATCH,
        &format!("/assistants/{a}"),
        &token,
        json!({ "name": "After" }),
    )
    .await;
    assert_eq!(body["name"], "After");
    let list = app.get_ok("/assistants", &token, Some(&changed)).await;
    assert_eq!(list["data"][0]["name"], "After");
    // Without a token, one assistant is read from Postgres: already the new name.
    let one = app.get_ok(&format!("/assistants/{a}"), &token, None).await;
    assert_eq!(one["name"], "After");
    assert_eq!(one["version"], 2);
    // With the token too: it waits only for the `assistants` projection and reads
    // Postgres. The `cache` projection cannot invalidate while Redis is down and
    // so does not move on (a stale copy must never outlive the outage), but the
    // query does not wait for it.
    let one = app
        .get_ok(&format!("/assistants/{a}"), &token, Some(&changed))
        .await;
    assert_eq!(one["name"], "After");
    assert_eq!(one["version"], 2);
    let stalled = checkpoints(&app.db.pool).await.unwrap()["cache"];
    let behind = checkpoints(&app.db.pool).await.unwrap()["assistants"];
    assert!(
        stalled.position < behind.position,
        "the query waited for the cache: cache {stalled:?} vs assistants {behind:?}"
    );

    // Back on the same port, with the old copy still in its append-only file:
    // no query serves it while the `cache` projection is behind the read model,
    // the projection tombstones it, and the token is honoured with the new data.
    redis_server.start().await;
    let one = get_when_consistent(&app, &format!("/assistants/{a}"), &token, &changed).await;
    assert_eq!(one["name"], "After");
    assert_eq!(one["version"], 2);
    // From now on no read may see the old copy, and reads fill the new one in.
    let cached = eventually("the cache holds the new copy", async || {
        let read = app.get_ok(&format!("/assistants/{a}"), &token, None).await;
        assert_eq!(read, one, "the copy cached before the outage was served");
        match cached_json(&redis_url, &key).await? {
            Some(json) if json.contains("\"After\"") => Ok(json),
            other => Err(format!("cached: {other:?}")),
        }
    })
    .await;
    assert!(!cached.contains("\"Before\""), "{cached}");
    let again = app.get_ok(&format!("/assistants/{a}"), &token, None).await;
    assert_eq!(again, one);
    let pool = &app.db.pool;
    caught_up(pool, &consumers()).await;
    assert_each_event_applied_once(pool).await;
    eventually("/ready says ready again", async || {
        let ready = readiness(&app).await;
        (ready["status"] == "ready")
            .then_some(())
            .ok_or(ready.to_string())
    })
    .await;
}

// Server-only: the `cache` projection on Redis.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The `cache` projection writes a batch's invalidations in one round trip.
/// A write Redis refuses leaves the whole batch unapplied: its checkpoint stays
/// before the batch, which is tried again (and again) until Redis takes it.
/// Then each key many events of the batch touched is stamped at the last.
async fn a_cache_batch_is_checkpointed_only_once_redis_took_all_of_it() {
    const REDIS_URL: &str = "redis://127.0.0.1:6379";
    // Without the `cache` worker (nor the replier): the events wait on the
    // bus, to be read as a backlog.
    let roles = Roles {
        projections: projection_names()
            .into_iter()
            .filter(|n| n != "cache")
            .collect(),
        ..without_replier()
    };
    let app = spawn_app_on(TestDb::new().await, BusNames::new(), &[], roles).await;
    let token = app.signed_up("batched@example.com").await;
    let created = app.assistant(&token, "Busy").await;
    let conversation = app.conversation(&token, &created["id"]).await;
    let c = id(&conversation);
    for n in 0..20 {
        post_message(&app, &token, &c, &format!("message {n}")).await;
    }
    caught_up(&app.db.pool, &["relay".to_owned()]).await;
    let started: (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::int8, global_position FROM events
         WHERE stream_id = $1::uuid ORDER BY events.transaction_id, events.global_position LIMIT 1",
    )
    .bind(&c)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let (db, names) = app.stop();
    let prefix = names.redis_prefix.clone();
    let (assistant_key, conversation_key) = (
        format!("{prefix}:assistant:{}", id(&created)),
        format!("{prefix}:conversation:{c}"),
    );
    // Not a hash: `INVALIDATE` fails on it, from the conversation's start on.
    let () = redis_call(
        REDIS_URL,
        redis::cmd("SET").arg(&conversation_key).arg("not a hash"),
    )
    .await
    .unwrap();

    let app = spawn_app_on(
        db,
        names,
        &[],
        Roles::only_projections(vec!["cache".into()]).unwrap(),
    )
    .await;
    let pool = &app.db.pool;
    // Redis runs the rest of a failed batch's pipeline: every attempt stamps
    // the assistant (the conversation's start moved it). Dropped and stamped
    // again, it shows an attempt ran to its end and the batch was tried again.
    for attempt in ["an attempt", "another attempt"] {
        eventually(
            &format!("{attempt} of the failing batch stamps the assistant"),
            async || match stamp(REDIS_URL, &assistant_key).await? {
                Some(seen) if seen >= started => Ok(()),
                other => Err(format!("stamped at {other:?}")),
            },
        )
        .await;
        let cache = checkpoints(pool).await.unwrap()["cache"];
        assert!(
            cache.position < started,
            "the failed batch was checkpointed: {cache:?}, the conversation started at {started:?}"
        );
        let _: i64 = redis_call(REDIS_URL, redis::cmd("DEL").arg(&assistant_key))
            .await
            .unwrap();
    }

    let _: i64 = redis_call(REDIS_URL, redis::cmd("DEL").arg(&conversation_key))
        .await
        .unwrap();
    caught_up(pool, &["cache".to_owned()]).await;
    // The last event, the last reply request, touched both keys.
    let last = head(pool).await.unwrap();
    for key in [&conversation_key, &assistant_key] {
        assert_eq!(stamp(REDIS_URL, key).await.unwrap(), Some(last), "{key}");
    }
    assert_eq!(
        checkpoints(pool).await.unwrap()["cache"].events,
        event_count(pool).await,
        "every event applied once"
    );
}

// Server-only: Redis coming back.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Reads more often than the fail-fast window must not keep the cache off after
/// Redis comes back (they once did: each skipped call extended the window).
async fn the_cache_comes_back_under_steady_read_traffic() {
    let mut redis_server = PrivateServer::redis().await;
    let redis_url = redis_server.url();
    let app = spawn_app_with(&[
        "--redis-url",
        &redis_url,
        "--consistency-timeout-ms",
        "1000",
    ])
    .await;
    let token = app.signed_up("steady-reader@example.com").await;
    let (created, body) = command(
        &app,
        Method::POST,
        "/assistants",
        &token,
        json!({ "name": "Before" }),
    )
    .await;
    let path = format!("/assistants/{}", id(&body));
    let one = get_when_consistent(&app, &path, &token, &created).await;
    assert_eq!(one["name"], "Before");

    redis_server.kill();
    let (changed, _) = command(
        &app,
        Method::PATCH,
        &path,
        &token,
        json!({ "name": "After" }),
    )
    .await;
    redis_server.start().await;

    // A dashboard keeps reading the assistant a few times a second, and every
    // read is answered (Redis or not).
    let stop_reading = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (client, url, token, stop) = (
            app.client.clone(),
            app.url(&format!("/api/v1{path}")),
            token.clone(),
            stop_reading.clone(),
        );
        tokio::spawn(async move {
            let mut reads = 0;
            while !stop.is_cancelled() {
                let response = client.get(&url).bearer_auth(&token).send().await.unwrap();
                let status = response.status();
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "a read failed: {}",
                    response.text().await.unwrap()
                );
                reads += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            reads
        })
    };
    let (tx, gp) = changed.split_once('.').unwrap();
    let target: (i64, i64) = (tx.parse().unwrap(), gp.parse().unwrap());
    eventually("the cache projection gets past the outage", async || {
        let cache = checkpoints(&app.db.pool).await.unwrap()["cache"];
        if cache.position >= target {
            Ok(())
        } else {
            Err(format!("cache at {cache:?}, the change at {target:?}"))
        }
    })
    .await;
    let one = app.get_ok(&path, &token, Some(&changed)).await;
    assert_eq!(one["name"], "After");
    stop_reading.cancel();
    let reads = reader.await.expect("every read was answered");
    assert!(reads > 0, "the reader never read");
}

// Server-only: relay republishing on NATS.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_republishes_changes_nothing() {
    // Without the replier, so the log only grows by what the test does.
    let app = spawn_app_without_replier(&[]).await;
    let token = app.signed_up("republish@example.com").await;
    let assistant = app.assistant(&token, "Echo").await;
    let a = id(&assistant);
    let c = id(&app.conversation(&token, &assistant["id"]).await);
    for n in 0..4 {
        post_message(&app, &token, &c, &format!("message {n}")).await;
    }
    let (at, _) = command(
        &app,
        Method::PATCH,
        &format!("/assistants/{a}"),
        &token,
        json!({ "instructions": "Answer twice as fast." }),
    )
    .await;
    get_when_consistent(&app, &format!("/assistants/{a}"), &token, &at).await;
    caught_up(&app.db.pool, &consumers()).await;
    let published = stream_messages(&app.names.nats_url, &app.names.stream).await;
    assert_eq!(published, event_count(&app.db.pool).await as u64);

    // The relay dies after publishing and before its checkpoint is saved: as if
    // it had saved nothing at all, the next one publishes everything again.
    let (db, names) = app.crash();
    let reset = sqlx::query(
        "UPDATE checkpoints SET transaction_id = 0, global_position = 0 WHERE name = 'relay'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(reset.rows_affected(), 1);
    let app = spawn_app_on(db, names, &[], without_replier()).await;
    let last = post_message(&app, &token, &c, "after the restart").await;
    let messages =
        get_when_consistent(&app, &format!("/conversations/{c}/messages"), &token, &last).await;
    assert_eq!(
        user_contents(&messages),
        [
            "message 0",
            "message 1",
            "message 2",
            "message 3",
            "after the restart"
        ]
    );
    assert_eq!(messages["data"].as_array().unwrap().len(), 10);

    let pool = &app.db.pool;
    // The relay went through every event again (its checkpoint is back at the head)...
    caught_up(pool, &consumers()).await;
    // ...and JetStream dropped the repeats by Nats-Msg-Id.
    assert_eq!(
        stream_messages(&app.names.nats_url, &app.names.stream).await,
        event_count(pool).await as u64
    );
    // Every effect, once.
    let one = get_when_consistent(&app, &format!("/assistants/{a}"), &token, &last).await;
    assert_eq!(one["conversation_count"], 1);
    assert_eq!(one["message_count"], 10);
    assert_eq!(one["instructions"], "Answer twice as fast.");
    let conversation =
        get_when_consistent(&app, &format!("/conversations/{c}"), &token, &last).await;
    assert_eq!(conversation["message_count"], 10);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, 10);
    assert_each_event_applied_once(pool).await;
}

/// Rows of a table as JSON, in primary-key order.
async fn rows_of(pool: &PgPool, table: &str, order: &str) -> Vec<Value> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT to_jsonb(t) FROM {table} t ORDER BY {order}"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Read-model tables and their primary keys.
const READ_MODELS: [(&str, &str); 8] = [
    ("assistants", "id"),
    ("conversations", "id"),
    ("messages", "id"),
    ("usage_daily", "owner_id, day, assistant_id, model"),
    ("assistants_conversations", "conversation_id"),
    ("messages_conversations", "conversation_id"),
    ("usage_conversations", "conversation_id"),
    ("cache_conversations", "conversation_id"),
];

/// Commands from two users, many at once: a backlog of a few hundred events.
async fn make_backlog(app: &TestApp) {
    let tokens = futures::future::join_all(
        ["backlog-a@example.com", "backlog-b@example.com"].map(|e| app.signed_up(e)),
    )
    .await;
    // Per user: 4 assistants, 3 conversations each, 20 messages in each: over
    // 1,000 events, more than two of a worker's batches (500 messages at most),
    // so that each projection stops part-way through the backlog at least
    // twice, however fast it applies a batch.
    let (mut conversations, mut retired) = (Vec::new(), Vec::new());
    let names: Vec<String> = (0..4).map(|n| format!("A{n}")).collect();
    for token in &tokens {
        let assistants =
            futures::future::join_all(names.iter().map(|n| app.assistant(token, n))).await;
        for assistant in &assistants {
            let started = futures::future::join_all(
                (0..3).map(|_| app.conversation(token, &assistant["id"])),
            )
            .await;
            conversations.extend(started.iter().map(|c| (token.clone(), id(c))));
        }
        for (n, assistant) in assistants.iter().enumerate() {
            command(
                app,
                Method::PATCH,
                &format!("/assistants/{}", id(assistant)),
                token,
                json!({ "name": format!("A{n} renamed"), "temperature": 0.5 }),
            )
            .await;
        }
        retired.push((token.clone(), id(&assistants[3])));
    }
    futures::stream::iter(conversations.iter().enumerate())
        .for_each_concurrent(12, |(n, (token, c))| async move {
            for m in 0..20 {
                post_message(app, token, c, &format!("message {m} in {n}")).await;
            }
            let (method, path, body) = if n % 3 == 0 {
                (
                    Method::POST,
                    format!("/conversations/{c}/archive"),
                    json!({}),
                )
            } else {
                (
                    Method::PATCH,
                    format!("/conversations/{c}"),
                    json!({ "title": format!("conversation {n}") }),
                )
            };
            command(app, method, &path, token, body).await;
        })
        .await;
    for (token, assistant) in &retired {
        let path = format!("/assistants/{assistant}/archive");
        command(app, Method::POST, &path, token, json!({})).await;
    }
}

// Server-only: projectors fed by JetStream (SQLite's: sqlite_workers.rs).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_batch_resumes_to_the_same_read_model() {
    // A backlog in the store and on the bus, no projection run yet.
    let writer = spawn_app_on(
        TestDb::new().await,
        BusNames::new(),
        &[],
        Roles {
            api: true,
            relay: true,
            projections: vec![],
            replier: false,
        },
    )
    .await;
    make_backlog(&writer).await;
    let events = event_count(&writer.db.pool).await;
    assert!(events > 1_000, "only {events} events");
    caught_up(&writer.db.pool, &["relay".to_owned()]).await;
    let (db, names) = writer.crash();
    let backlog_head = head(&db.pool).await.unwrap();

    // The projectors start on the backlog and die as soon as one is part-way.
    let projectors = spawn_app_on(db, names, &[], Roles::only_projections(vec![]).unwrap()).await;
    let what = "a projection is part-way through the backlog";
    let part_way = eventually_every(Duration::from_millis(5), what, async || {
        let all = checkpoints(&projectors.db.pool).await.unwrap();
        let moving: Vec<(&String, &Checkpoint)> = all
            .iter()
            .filter(|(n, c)| *n != "relay" && c.position > (0, 0) && c.position < backlog_head)
            .collect();
        if !moving.is_empty() {
            return Ok(format!("{moving:?}"));
        }
        if projection_names()
            .iter()
            .all(|n| all.get(n).is_some_and(|c| c.position >= backlog_head))
        {
            panic!("every projection finished the backlog before one was seen part-way: {all:?}");
        }
        Err(format!("{all:?}"))
    })
    .await;
    let (db, names) = projectors.crash();
    eprintln!("crashed the projectors with {part_way} (head {backlog_head:?})");

    // A full instance picks up where they left off.
    let resumed = spawn_app_on(db, names, &[], without_replier()).await;
    caught_up(&resumed.db.pool, &consumers()).await;
    assert_each_event_applied_once(&resumed.db.pool).await;
    let names = &resumed.names;
    assert_eq!(
        stream_messages(&names.nats_url, &names.stream).await,
        events as u64
    );

    // A fresh fold of the same events, on a database and stream of its own.
    let fresh = TestDb::new().await;
    let copied = sqlx::query(
        "INSERT INTO events OVERRIDING SYSTEM VALUE
         SELECT * FROM jsonb_populate_recordset(NULL::events, $1)",
    )
    .bind(
        sqlx::query_scalar::<_, Value>(
            "SELECT jsonb_agg(to_jsonb(e) ORDER BY global_position) FROM events e",
        )
        .fetch_one(&resumed.db.pool)
        .await
        .unwrap(),
    )
    .execute(&fresh.pool)
    .await
    .unwrap();
    assert_eq!(copied.rows_affected() as i64, events);
    // With the users' keys, or the copy's personal fields read as forgotten.
    sqlx::query(
        "INSERT INTO user_keys SELECT * FROM jsonb_populate_recordset(NULL::user_keys, $1)",
    )
    .bind(
        sqlx::query_scalar::<_, Value>("SELECT jsonb_agg(to_jsonb(k)) FROM user_keys k")
            .fetch_one(&resumed.db.pool)
            .await
            .unwrap(),
    )
    .execute(&fresh.pool)
    .await
    .unwrap();
    assert_eq!(head(&fresh.pool).await.unwrap(), backlog_head);
    let fold = spawn_app_on(
        fresh,
        BusNames::new(),
        &[],
        Roles {
            relay: true,
            ..Roles::only_projections(vec![]).unwrap()
        },
    )
    .await;
    caught_up(&fold.db.pool, &consumers()).await;
    assert_each_event_applied_once(&fold.db.pool).await;
    let names = &fold.names;
    assert_eq!(
        stream_messages(&names.nats_url, &names.stream).await,
        events as u64
    );

    for (table, order) in READ_MODELS {
        let live = rows_of(&resumed.db.pool, table, order).await;
        let folded = rows_of(&fold.db.pool, table, order).await;
        assert_eq!(
            live.len(),
            folded.len(),
            "{table}: {} rows live, {} in a fresh fold",
            live.len(),
            folded.len()
        );
        for (l, f) in live.iter().zip(&folded) {
            assert_eq!(l, f, "{table} differs from a fresh fold");
        }
    }
    // And the batch fold of `verify` (the rebuild's rules) agrees with both.
    let (report, clean) = ai_secretary::recovery::verify_report(
        &crate::helpers::pg(&resumed.db.pool),
        &crate::helpers::master_key(),
        &[],
    )
    .await
    .unwrap();
    assert!(clean, "verify found drift after the crash:\n{report}");
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&resumed.db.pool)
        .await
        .unwrap();
    // Users × assistants × conversations × messages, and the row of the reply
    // each message asks for.
    assert_eq!(messages, 2 * 4 * 3 * 20 * 2);
}
