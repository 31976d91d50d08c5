//! Recovery on the embedded topology (SQLite under `DATA_DIR`, no server),
//! beside a live service: `verify` and `replay` run as second processes on
//! the same directory, rebuilds through the admin API run under a stream of
//! appends, and one rebuild per projection runs at a time, in the service and
//! across processes. These need no server and always run.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use ai_secretary::startup::Roles;
use ai_secretary_projections::{
    Db, NAMES, Position, SqliteDb,
    cache::{Cache, CachedJson, Kind, LocalCache},
    rebuild::{self, Step},
};
use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{
    Embedded, Running, TestApp, embedded_binary, eventually, eventually_within, problem, run,
    some_history, spawn_embedded, spawn_embedded_on, without_replier,
};

const ADMIN: &str = "admin@example.com";

/// Longest a second process (`verify`, `replay`) may take here.
const CHILD_LIMIT: Duration = Duration::from_secs(60);

/// Longest one request may take while a rebuild or a replay runs beside it:
/// under the busy timeout (5 s) that a write waiting on a stalled write lock
/// gives up after.
const ANSWER_LIMIT: Duration = Duration::from_secs(4);

/// Longest a rebuild of the small history here may take from its start to its
/// status reading `succeeded`, on a machine busy with other tests: a rebuild
/// stalled by its own progress writes costs a busy timeout (5 s) per write
/// (it took over 20 s before the fix).
const REBUILD_LIMIT: Duration = Duration::from_secs(10);

/// The embedded service with an administrator's email, recording a running
/// rebuild's progress every 10 ms (not every 2 s): a progress write then
/// lands in every step of a rebuild, and must never stall it.
async fn spawn_with_admin() -> TestApp<Embedded> {
    spawn_embedded(&["--admin-emails", ADMIN, "--rebuild-progress-ms", "10"]).await
}

/// POST a rebuild of `name` as `admin`.
async fn start_rebuild(app: &TestApp<Embedded>, admin: &str, name: &str) -> reqwest::Response {
    app.send(
        Method::POST,
        &format!("/api/v1/admin/projections/{name}/rebuild"),
        Some(admin),
        None,
    )
    .await
}

/// Poll a rebuild's status URL until it has finished; its last status.
async fn finished(app: &TestApp<Embedded>, admin: &str, location: &str) -> Value {
    eventually("the rebuild finishes", async || {
        let response = app.send(Method::GET, location, Some(admin), None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let status: Value = response.json().await.unwrap();
        if status["state"] == "running" {
            Err(status.to_string())
        } else {
            Ok(status)
        }
    })
    .await
}

/// A connection of `pool` in a `BEGIN IMMEDIATE` transaction: it holds the
/// database's one write lock until it rolls back.
async fn holding_the_write_lock(
    pool: &sqlx::SqlitePool,
) -> sqlx::pool::PoolConnection<sqlx::Sqlite> {
    let mut writer = pool.acquire().await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *writer)
        .await
        .unwrap();
    writer
}

/// `replay <name>` started as a second process on the data directory `dir`,
/// once it has taken its lock and is folding the store (its writes come next).
async fn replay_folding(dir: &std::path::Path, name: &str) -> Running {
    let replay =
        Running::start(embedded_binary(dir, &[("RUST_LOG", "info")]).args(["replay", name]));
    eventually("the replay has its lock and folds", async || {
        let printed = replay.printed_so_far();
        if printed.contains("folding the store") {
            Ok(())
        } else {
            Err(printed)
        }
    })
    .await;
    replay
}

/// Messages and replies counted by a conversation's `message_count`, in the store.
async fn messages_in_store(app: &TestApp<Embedded>, conversation: &str) -> i64 {
    let pool = app.db.pool().await;
    let count = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE stream_id = $1
         AND event_type IN ('MessagePosted', 'ReplyRequested')",
    )
    .bind(Uuid::parse_str(conversation).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    count
}

/// How many of `answered` (asked, answered) were both within `[from, to]`.
fn answered_within(answered: &[(Instant, Instant)], from: Instant, to: Instant) -> usize {
    answered
        .iter()
        .filter(|(asked, answer)| *asked >= from && *answer <= to)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_drift_and_replay_repairs_it_as_second_processes_beside_the_live_service() {
    let app = spawn_embedded(&[]).await;
    let (token, assistants, conversations) = some_history(&app, "drift@example.com").await;
    app.db.caught_up().await;
    let dir = app.db.dir.path().to_owned();
    let clean = run(embedded_binary(&dir, &[]).arg("verify"), CHILD_LIMIT).await;
    assert_eq!(clean.code, Some(0), "{}", clean.printed());

    // Corrupt one row and lose another, behind the service's back.
    let pool = app.db.pool().await;
    sqlx::query("UPDATE assistants SET name = 'corrupted', message_count = 99 WHERE id = $1")
        .bind(Uuid::parse_str(&assistants[0]).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let lost = sqlx::query(
        "DELETE FROM messages WHERE id = (SELECT id FROM messages ORDER BY id LIMIT 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(lost.rows_affected(), 1);

    // `verify` as a second process finds both: exit 1 and a readable diff.
    let drift = run(embedded_binary(&dir, &[]).arg("verify"), CHILD_LIMIT).await;
    let printed = drift.printed();
    assert_eq!(drift.code, Some(1), "{printed}");
    assert!(
        printed.contains(&format!(
            "assistants [id=\"{}\"] name: live \"corrupted\" ≠ expected \"Mika\"",
            assistants[0]
        )),
        "{printed}"
    );
    assert!(printed.contains("message_count: live 99"), "{printed}");
    assert!(printed.contains("(row): live (no row)"), "{printed}");
    assert!(printed.contains("verify: DRIFT found"), "{printed}");

    // `replay --all` as a second process, while the service answers reads and
    // takes new messages all along: every request answers, none waits long,
    // and some are asked and answered while the replay runs.
    let stop = CancellationToken::new();
    let traffic = |write: bool| {
        let (client, base, token, conversations, stop) = (
            app.client.clone(),
            app.url("/api/v1"),
            token.clone(),
            conversations.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut answered = vec![];
            while !stop.is_cancelled() {
                let asked = Instant::now();
                let n = answered.len();
                let request = if write {
                    client
                        .post(format!(
                            "{base}/conversations/{}/messages",
                            conversations[n % 3]
                        ))
                        .json(&json!({ "content": format!("during the replay {n}") }))
                } else {
                    client.get(format!("{base}/assistants"))
                };
                let response = request.bearer_auth(&token).send().await.unwrap();
                let status = response.status();
                let text = response.text().await.unwrap();
                let expected = if write {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::OK
                };
                assert_eq!(status, expected, "beside the replay: {text}");
                if !write {
                    let list: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
                }
                answered.push((asked, Instant::now()));
            }
            answered
        })
    };
    let (reads, writes) = (traffic(false), traffic(true));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut replay = Running::start(embedded_binary(&dir, &[]).args(["replay", "--all"]));
    let started = Instant::now();
    while replay.is_running() {
        assert!(started.elapsed() < CHILD_LIMIT, "the replay runs on");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ended = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.cancel();
    let (reads, writes) = (reads.await.unwrap(), writes.await.unwrap());
    let replayed = replay.finish(CHILD_LIMIT).await;
    let printed = replayed.printed();
    assert_eq!(replayed.code, Some(0), "{printed}");
    assert!(printed.contains("replayed "), "{printed}");
    for name in NAMES {
        assert!(
            printed.contains(&format!("  {name}: swapped in")),
            "{printed}"
        );
    }
    // Reads never wait (WAL): some are asked and answered within the replay.
    // Appends wait their turn for the write lock (the replay takes it in its
    // slices and swaps), but are taken all along: some were in flight during it.
    let within = answered_within(&reads, started, ended);
    let overlapping = writes
        .iter()
        .filter(|(asked, answer)| *asked < ended && *answer > started)
        .count();
    assert!(
        within >= 1 && overlapping >= 1,
        "{within} reads answered and {overlapping} appends in flight in the {:?} the replay ran",
        ended - started
    );
    let slowest = reads
        .iter()
        .chain(&writes)
        .map(|(asked, answer)| *answer - *asked)
        .max()
        .unwrap();
    assert!(
        slowest < ANSWER_LIMIT,
        "a request took {slowest:?} beside the replay"
    );

    // Repaired, and the messages posted meanwhile are all there.
    app.db.caught_up().await;
    let (name, count): (String, i64) =
        sqlx::query_as("SELECT name, message_count FROM assistants WHERE id = $1")
            .bind(Uuid::parse_str(&assistants[0]).unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(name, "Mika");
    let expected = messages_in_store(&app, &conversations[0]).await
        + messages_in_store(&app, &conversations[1]).await;
    assert_eq!(count, expected);
    let again = run(embedded_binary(&dir, &[]).arg("verify"), CHILD_LIMIT).await;
    assert_eq!(again.code, Some(0), "{}", again.printed());
    assert!(
        again.stdout.contains("verify: no drift"),
        "{}",
        again.printed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_another_process_is_served_within_a_second_not_after_the_cache_ttl() {
    // The service's cache is in its own process, where a `replay` cannot reach
    // it. A quiet store (no append during the replay) moves no checkpoint, so
    // nothing but the service's watch on the swaps drops the cached copy. (No
    // replier either: its answers would move checkpoints, and a read while the
    // cache's is behind the assistants' goes to the table and refills.)
    let app = spawn_embedded_on(Embedded::new(), &[], without_replier()).await;
    let (token, assistants, _) = some_history(&app, "cached@example.com").await;
    app.db.caught_up().await;
    let pool = app.db.pool().await;
    sqlx::query("UPDATE assistants SET name = 'corrupted' WHERE id = $1")
        .bind(Uuid::parse_str(&assistants[1]).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let path = format!("/assistants/{}", assistants[1]);
    let read = app.get_ok(&path, &token, None).await;
    assert_eq!(read["name"], "corrupted", "{read}");
    let replayed = run(
        embedded_binary(app.db.dir.path(), &[]).args(["replay", "assistants"]),
        CHILD_LIMIT,
    )
    .await;
    assert_eq!(replayed.code, Some(0), "{}", replayed.printed());

    eventually_within(
        Duration::from_secs(5),
        Duration::from_millis(50),
        "the API serves the repaired assistant",
        async || {
            let served = app.get_ok(&path, &token, None).await;
            (served["name"] == "Ren")
                .then_some(())
                .ok_or(format!("{served}"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rebuilds_during_appends_lose_and_double_nothing_and_never_serve_a_half_built_model()
{
    let app = spawn_with_admin().await;
    let admin = app.signed_up(ADMIN).await;
    let (token, assistants, conversations) = some_history(&app, "live@example.com").await;
    app.db.caught_up().await;
    // A reply completed (usage counts them), so no count read below starts at 0.
    eventually("a reply is counted in usage", async || {
        let usage = app
            .get_ok("/stats/usage?group_by=assistant", &token, None)
            .await;
        match usage["total"]["messages"].as_i64() {
            Some(n) if n > 0 => Ok(()),
            _ => Err(usage.to_string()),
        }
    })
    .await;

    let stop = CancellationToken::new();
    // Appends all along: each answers 202, and soon.
    let writer = {
        let (client, base, token, conversations, stop) = (
            app.client.clone(),
            app.url("/api/v1"),
            token.clone(),
            conversations.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let (mut posted, mut slowest) = (0, Duration::ZERO);
            while !stop.is_cancelled() {
                let c = &conversations[posted % conversations.len()];
                let asked = Instant::now();
                let response = client
                    .post(format!("{base}/conversations/{c}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({ "content": format!("live {posted}") }))
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let text = response.text().await.unwrap();
                assert_eq!(status, StatusCode::ACCEPTED, "append {posted}: {text}");
                slowest = slowest.max(asked.elapsed());
                posted += 1;
            }
            (posted, slowest)
        })
    };
    // Reads all along: nothing goes missing and no count goes backwards.
    let reader = {
        let (client, base, token, stop) = (
            app.client.clone(),
            app.url("/api/v1"),
            token.clone(),
            stop.clone(),
        );
        let (assistants, conversations) = (assistants.clone(), conversations.clone());
        tokio::spawn(async move {
            let read = async |path: &str| -> Value {
                let response = client
                    .get(format!("{base}{path}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let text = response.text().await.unwrap();
                assert_eq!(status, StatusCode::OK, "{path} failed mid-rebuild: {text}");
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
            };
            let mut seen: HashMap<String, i64> = HashMap::new();
            let since = Instant::now();
            let mut at_least = |what: String, count: Option<i64>, answer: &Value| {
                let count = count.unwrap_or_else(|| panic!("{what}: no count in {answer}"));
                let before = seen.insert(what.clone(), count).unwrap_or(1);
                assert!(
                    count >= before && count > 0,
                    "{what} went from {before} to {count} after {:?}: a half-built model \
                     was served: {answer}",
                    since.elapsed()
                );
            };
            let mut rounds = 0;
            while !stop.is_cancelled() {
                let list = read("/assistants").await;
                let data = list["data"].as_array().unwrap();
                assert_eq!(data.len(), 2, "assistants missing: {list}");
                let one = read(&format!("/assistants/{}", assistants[0])).await;
                let one = json!({ "read one by one (through the cache)": one });
                for (a, shown) in data
                    .iter()
                    .map(|a| (a, &list))
                    .chain([(&one["read one by one (through the cache)"], &one)])
                {
                    let id = a["id"].as_str().unwrap();
                    at_least(
                        format!("{id} conversations"),
                        a["conversation_count"].as_i64(),
                        shown,
                    );
                    at_least(format!("{id} messages"), a["message_count"].as_i64(), shown);
                }
                let list = read("/conversations").await;
                assert_eq!(
                    list["data"].as_array().unwrap().len(),
                    3,
                    "conversations missing: {list}"
                );
                for id in &conversations {
                    let one = read(&format!("/conversations/{id}")).await;
                    at_least(
                        format!("{id} message_count"),
                        one["message_count"].as_i64(),
                        &one,
                    );
                    let page = read(&format!("/conversations/{id}/messages?limit=100")).await;
                    at_least(
                        format!("{id} listed"),
                        page["data"].as_array().map(|d| d.len() as i64),
                        &json!({ "listed messages": page["data"].as_array().map(Vec::len) }),
                    );
                }
                let usage = read("/stats/usage?group_by=assistant").await;
                at_least(
                    "usage messages".into(),
                    usage["total"]["messages"].as_i64(),
                    &usage,
                );
                rounds += 1;
            }
            rounds
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every projection rebuilt through the API, one after the other, twice.
    for name in NAMES.iter().chain(NAMES.iter()) {
        let asked = Instant::now();
        let started = start_rebuild(&app, &admin, name).await;
        assert_eq!(started.status(), StatusCode::ACCEPTED, "{name}");
        let location = started.headers()["location"].to_str().unwrap().to_owned();
        let done = finished(&app, &admin, &location).await;
        let took = asked.elapsed();
        assert_eq!(done["state"], "succeeded", "{done}");
        assert!(done["events"].as_i64().unwrap() > 0, "{done}");
        assert!(done["total_events"].as_i64().unwrap() > 0, "{done}");
        assert!(
            took < REBUILD_LIMIT,
            "the rebuild of {name} took {took:?} (a stall on the write lock?)"
        );
    }

    stop.cancel();
    let (posted, slowest) = writer.await.unwrap();
    let rounds = reader.await.unwrap();
    assert!(
        posted > 5 && rounds > 2,
        "posted {posted}, read {rounds} rounds"
    );
    assert!(
        slowest < ANSWER_LIMIT,
        "an append took {slowest:?} during the rebuilds"
    );

    // Nothing lost or doubled: every count equals the store's, and every read
    // model equals the fold of the store.
    app.db.caught_up().await;
    for id in &conversations {
        let one = app
            .get_ok(&format!("/conversations/{id}"), &token, None)
            .await;
        assert_eq!(
            one["message_count"],
            messages_in_store(&app, id).await,
            "{one}"
        );
    }
    let (report, clean) = app.db.verify().await;
    assert!(clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_is_refused_in_the_service_and_across_processes() {
    let app = spawn_with_admin().await;
    let admin = app.signed_up(ADMIN).await;
    some_history(&app, "twice@example.com").await;
    app.db.caught_up().await;

    // In the service: of concurrent starts of one projection's rebuild,
    // exactly one is accepted, and it runs to the end.
    for round in 0..4 {
        let answers = join_all((0..3).map(|_| start_rebuild(&app, &admin, "messages"))).await;
        let statuses: Vec<StatusCode> = answers.iter().map(|a| a.status()).collect();
        let accepted: Vec<_> = answers
            .into_iter()
            .filter(|a| a.status() == StatusCode::ACCEPTED)
            .collect();
        assert_eq!(accepted.len(), 1, "round {round}: {statuses:?}");
        assert_eq!(
            statuses
                .iter()
                .filter(|s| **s == StatusCode::CONFLICT)
                .count(),
            2,
            "round {round}: {statuses:?}"
        );
        let location = accepted[0].headers()["location"]
            .to_str()
            .unwrap()
            .to_owned();
        let done = finished(&app, &admin, &location).await;
        assert_eq!(done["state"], "succeeded", "round {round}: {done}");
    }
    let pool = app.db.pool().await;
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rebuilds WHERE state <> 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(failed, 0, "a started rebuild was failed by another start");

    // Across processes: a `replay` holds the projection's lock; it is held
    // in its first write by the test, which takes SQLite's write lock first
    // (for well under the 5 s busy timeout).
    let dir = app.db.dir.path().to_owned();
    let mut writer = holding_the_write_lock(&pool).await;
    let holding = Instant::now();
    let first = replay_folding(&dir, "assistants").await;
    // The service refuses a rebuild of it (409) ...
    let refused = problem(
        start_rebuild(&app, &admin, "assistants").await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("a rebuild of assistants is already running"),
        "{refused}"
    );
    // ... and so does a second process (exit 1 and why), without waiting.
    let second = run(
        embedded_binary(&dir, &[]).args(["replay", "assistants"]),
        CHILD_LIMIT,
    )
    .await;
    assert_eq!(second.code, Some(1), "{}", second.printed());
    assert!(
        second
            .printed()
            .contains("a rebuild of assistants is already running"),
        "{}",
        second.printed()
    );
    assert!(
        holding.elapsed() < Duration::from_secs(4),
        "the write lock was held {:?}: the replay may have given up",
        holding.elapsed()
    );
    sqlx::query("ROLLBACK").execute(&mut *writer).await.unwrap();
    drop(writer);
    let first = first.finish(CHILD_LIMIT).await;
    assert_eq!(first.code, Some(0), "{}", first.printed());
    assert!(
        first.stdout.contains("assistants: swapped in"),
        "{}",
        first.printed()
    );

    // Its lock released with it: the service rebuilds it now.
    let again = start_rebuild(&app, &admin, "assistants").await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again = again.headers()["location"].to_str().unwrap().to_owned();
    let done = finished(&app, &admin, &again).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    pool.close().await;
    app.db.caught_up().await;
    let (report, clean) = app.db.verify().await;
    assert!(clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_waits_out_a_write_lock_held_past_the_busy_timeout() {
    // On a loaded machine SQLite's write lock can pass from one of the
    // service's commits to the next for longer than the busy timeout (5 s);
    // a rebuild, background work, waits it out instead of failing with
    // "database is locked". Here the test holds the lock itself, for longer.
    const HELD: Duration = Duration::from_secs(7);
    let app = spawn_embedded(&[]).await;
    some_history(&app, "patient@example.com").await;
    app.db.caught_up().await;
    let pool = app.db.pool().await;
    let mut writer = holding_the_write_lock(&pool).await;
    let holding = Instant::now();
    let dir = app.db.dir.path().to_owned();
    let replay = replay_folding(&dir, "assistants").await;
    tokio::time::sleep(HELD.saturating_sub(holding.elapsed())).await;
    assert!(
        !replay.printed_so_far().contains("assistants: swapped in"),
        "the replay swapped while the test held the write lock: {}",
        replay.printed_so_far()
    );
    sqlx::query("ROLLBACK").execute(&mut *writer).await.unwrap();
    drop(writer);
    pool.close().await;
    let replay = replay.finish(CHILD_LIMIT).await;
    assert_eq!(replay.code, Some(0), "{}", replay.printed());
    assert!(
        replay.stdout.contains("assistants: swapped in"),
        "{}",
        replay.printed()
    );
    app.db.caught_up().await;
    let (report, clean) = app.db.verify().await;
    assert!(clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_of_cache_makes_the_invalidations_its_worker_skips_before_it_swaps() {
    // The service without the `cache` worker: nothing invalidates the cache
    // while messages move an assistant's counts.
    let roles = Roles {
        projections: NAMES
            .iter()
            .filter(|n| **n != "cache")
            .map(|n| n.to_string())
            .collect(),
        ..Roles::all()
    };
    let app = spawn_embedded_on(Embedded::new(), &[], roles).await;
    let (_, assistants, _) = some_history(&app, "stale@example.com").await;
    app.db.caught_up_with(&["assistants"]).await;
    let pool = ai_secretary::store::sqlite::connect(&app.db.file().to_string_lossy(), 4)
        .await
        .unwrap();
    let assistant = Uuid::parse_str(&assistants[0]).unwrap();
    let owner: Uuid = sqlx::query_scalar("SELECT owner_id FROM assistants WHERE id = $1")
        .bind(assistant)
        .fetch_one(&pool)
        .await
        .unwrap();

    // A copy of the assistant filled before the events that moved it (stamped
    // at the start of the log), which the rebuild's swap moves the `cache`
    // checkpoint past: from its commit on, the read side trusts the cache as
    // current, so the copy must be gone by then, not only after the rebuild.
    let local = LocalCache::new(Duration::from_secs(60));
    let cache = Cache::Local(local.clone());
    cache
        .fill(
            Kind::Assistant,
            assistant,
            owner,
            Position::default(),
            &CachedJson::of(&json!({ "message_count": 0 })),
        )
        .await;
    assert!(local.get(Kind::Assistant, assistant, owner).is_some());
    let at_swap = std::sync::Mutex::new(None);
    let db = Db::Sqlite(SqliteDb::new(pool.clone()));
    let rebuilt = rebuild::rebuild(
        &db,
        ai_secretary::recovery::opener(crate::helpers::master_key(), &db),
        &["cache"],
        Some(&cache),
        &|step| {
            if let Step::Swapped { position, .. } = step {
                *at_swap.lock().unwrap() =
                    Some((position, local.get(Kind::Assistant, assistant, owner)));
            }
        },
    )
    .await
    .unwrap();
    let (position, copy) = at_swap
        .into_inner()
        .unwrap()
        .expect("the swap was reported");
    assert_eq!(position, rebuilt.head, "the checkpoint moved to the head");
    assert_eq!(
        copy, None,
        "a stale copy was still cached when the checkpoint moved past its invalidation"
    );
    pool.close().await;
}
