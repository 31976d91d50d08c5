//! Recovery (issue #5): read models rebuilt from the store while the service
//! serves and consumes, `verify` finding drift, deterministic replays, the
//! admin API's rebuilds, and backup → drop → restore with the scripts.

use std::{collections::HashMap, path::PathBuf, process::Command, time::Duration};

use ai_secretary::{
    recovery::verify_report,
    startup::{Roles, projection_names},
};
use ai_secretary_projections::{
    ALL, NAMES, Position,
    cache::{Cache, CachedJson, Kind},
    rebuild::{self, Step},
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgPool};

use crate::{
    helpers::{
        EventLog, TestApp, Topology, eventually, problem, some_history, spawn_app_on,
        spawn_app_with,
    },
    progress,
    support::{AsDb, BusNames, TestDb, http::consistency, progress::consumers},
};

const ADMIN: &str = "admin@example.com";

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_ai-secretary")
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// An instance whose `ADMIN` user may use the admin API.
async fn spawn_with_admin() -> TestApp {
    spawn_app_with(&["--admin-emails", ADMIN]).await
}

/// Wait until every projection's checkpoint has reached the head of the store.
async fn caught_up(pool: &impl AsDb) {
    progress::caught_up(pool, &projection_names()).await;
}

/// Wait until every requested reply has ended in the store: after that, the
/// replier appends nothing more, so what the read side shows stays put.
async fn every_reply_ended(db: &impl AsDb) {
    let db = db.db();
    eventually("every reply has ended", async || {
        let (requested, ended): (i64, i64) = crate::on_db!(db, |pool| sqlx::query_as(
            "SELECT (SELECT count(*) FROM events WHERE event_type = 'ReplyRequested'),
                    (SELECT count(*) FROM events
                     WHERE event_type IN ('ReplyCompleted', 'ReplyFailed'))",
        )
        .fetch_one(pool)
        .await
        .unwrap());
        (requested == ended)
            .then_some(())
            .ok_or(format!("{ended} of {requested}"))
    })
    .await;
}

/// A checksum of every read-model table, rows in key order.
async fn checksum(pool: &PgPool) -> String {
    let mut all = String::new();
    for projection in ALL {
        for table in projection.tables {
            let sum: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT md5(string_agg(to_jsonb(t)::text, ',' ORDER BY {}))
                 FROM {} t",
                table.key.join(", "),
                table.name
            )))
            .fetch_one(pool)
            .await
            .unwrap();
            all.push_str(&format!("{}={} ", table.name, sum.unwrap_or_default()));
        }
    }
    all
}

async fn rebuild_all(db: &impl AsDb) -> rebuild::Rebuilt {
    rebuild::rebuild(
        &db.db(),
        crate::helpers::keyring(db),
        &ai_secretary_projections::NAMES,
        None,
        &|_| {},
    )
    .await
    .expect("the rebuild succeeds")
}

/// Hold the lock a rebuild of projection `name` takes, as a running rebuild
/// would: Postgres' advisory lock, or on SQLite the `flock` on
/// `<database file>.rebuild-<name>`. Released when the holder drops.
async fn hold_the_rebuild_lock(
    db: &ai_secretary_projections::Db,
    name: &str,
) -> Box<dyn std::any::Any> {
    match db {
        ai_secretary_projections::Db::Postgres(pool) => {
            let mut holder = pool.acquire().await.unwrap().detach();
            sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
                .bind(format!("ai_secretary.rebuild.{name}"))
                .execute(&mut holder)
                .await
                .unwrap();
            Box::new(holder)
        }
        ai_secretary_projections::Db::Sqlite(lite) => {
            let mut path = lite
                .pool
                .connect_options()
                .get_filename()
                .as_os_str()
                .to_owned();
            path.push(format!(".rebuild-{name}"));
            let file = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .unwrap();
            file.try_lock().expect("no rebuild holds the lock yet");
            Box::new(file)
        }
    }
}

/// `(status, JSON body)` of a GET; a body that is not JSON fails the test.
async fn get_json<D>(app: &TestApp<D>, path: &str, token: &str) -> (StatusCode, Value) {
    let response = app
        .send(Method::GET, &format!("/api/v1{path}"), Some(token), None)
        .await;
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET {path} answered {status} with no JSON ({e}): {text}"));
    (status, body)
}

/// Poll a rebuild's status URL until it is no longer running; its last status.
async fn rebuild_finished<D>(app: &TestApp<D>, admin: &str, location: &str) -> Value {
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

crate::on_both!(verify_finds_a_corrupted_row_and_a_replay_repairs_it, with ["--admin-emails", super::ADMIN]);
async fn verify_finds_a_corrupted_row_and_a_replay_repairs_it<D: Topology>(app: TestApp<D>) {
    let (token, assistants, _) = some_history(&app, "drift@example.com").await;
    let db = app.read_side().await;
    caught_up(&db).await;
    let (report, clean) = verify_report(&db, &crate::helpers::master_key(), &[])
        .await
        .unwrap();
    assert!(clean, "{report}");

    // Corrupt one column of one row, and lose one message.
    let corrupted: uuid::Uuid = assistants[0].parse().unwrap();
    crate::on_db!(db, |pool| {
        sqlx::query("UPDATE assistants SET name = 'corrupted', message_count = 99 WHERE id = $1")
            .bind(corrupted)
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "DELETE FROM messages WHERE id = (SELECT id FROM messages ORDER BY id LIMIT 1)",
        )
        .execute(pool)
        .await
        .unwrap();
    });

    // The binary, as cron or CI runs it: exit 1 and a readable diff.
    let cli = D::cli_args(&app);
    let output = Command::new(binary())
        .args(&cli)
        .arg("verify")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains(&format!(
            "assistants [id=\"{}\"] name: live \"corrupted\" ≠ expected \"Mika\"",
            assistants[0]
        )),
        "{printed}"
    );
    assert!(printed.contains("message_count: live 99"), "{printed}");
    assert!(printed.contains("messages [id="), "{printed}");
    assert!(printed.contains("(row): live (no row)"), "{printed}");
    assert!(
        printed.contains("ok    conversations/conversations"),
        "{printed}"
    );
    // Only the named projection is checked when one is named.
    let output = Command::new(binary())
        .args(&cli)
        .args(["verify", "conversations"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));

    // A replay of the two projections repairs them; verify is clean again.
    let output = Command::new(binary())
        .args(&cli)
        .args(["replay", "assistants"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("assistants: swapped in at"), "{printed}");
    rebuild::rebuild(
        &db,
        crate::helpers::keyring(&db),
        &["messages"],
        None,
        &|_| {},
    )
    .await
    .unwrap();
    let (report, clean) = verify_report(&db, &crate::helpers::master_key(), &[])
        .await
        .unwrap();
    assert!(clean, "{report}");
    let (status, assistant) =
        get_json(&app, &format!("/assistants/{}", assistants[0]), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(assistant["name"], "Mika");
    assert_eq!(assistant["message_count"], 12, "{assistant}");
}

crate::on_both!(a_replay_is_deterministic_and_cleans_up_an_interrupted_one, with ["--admin-emails", super::ADMIN]);
async fn a_replay_is_deterministic_and_cleans_up_an_interrupted_one<D: EventLog>(app: TestApp<D>) {
    some_history(&app, "twice@example.com").await;
    let db = app.read_side().await;
    // No traffic between the replays.
    every_reply_ended(&db).await;
    caught_up(&db).await;
    let incremental = every_row(&app).await;

    // What an interrupted run leaves behind: a half-filled fresh table.
    crate::on_db!(db, |pool| {
        sqlx::query("CREATE TABLE assistants__next AS SELECT * FROM assistants LIMIT 1")
            .execute(pool)
            .await
            .unwrap();
    });

    let first = rebuild_all(&db).await;
    let once = every_row(&app).await;
    let second = rebuild_all(&db).await;
    let twice = every_row(&app).await;
    assert_eq!(first.head, second.head, "no traffic in between");
    assert_eq!(once, twice, "two replays differ");
    assert_eq!(
        once, incremental,
        "a replay differs from the incremental path"
    );
    // In each database's catalog: tables, and on Postgres indexes too.
    let leftovers: i64 = match &db {
        ai_secretary_projections::Db::Postgres(pool) => {
            sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relname LIKE '%\\_\\_next%'")
                .fetch_one(pool)
                .await
        }
        ai_secretary_projections::Db::Sqlite(lite) => {
            sqlx::query_scalar(
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE '%\\_\\_next%' ESCAPE '\\'",
            )
            .fetch_one(&lite.pool)
            .await
        }
    }
    .unwrap();
    assert_eq!(leftovers, 0, "fresh tables or indexes left behind");
    let (report, clean) = verify_report(&db, &crate::helpers::master_key(), &[])
        .await
        .unwrap();
    assert!(clean, "{report}");
}

/// Every row of every read-model table, as text, on either database.
async fn every_row<D: EventLog>(app: &TestApp<D>) -> Vec<String> {
    let mut all = Vec::new();
    for projection in ALL {
        for table in projection.tables {
            let rows = app.db.rows(table.name).await;
            all.extend(rows.into_iter().map(|row| format!("{} {row}", table.name)));
        }
    }
    assert!(!all.is_empty(), "no rows: the comparison proves nothing");
    all
}

crate::on_both!(a_rebuild_during_live_traffic_never_serves_a_half_built_model, with ["--admin-emails", super::ADMIN]);
async fn a_rebuild_during_live_traffic_never_serves_a_half_built_model<D: EventLog>(
    app: TestApp<D>,
) {
    let admin = app.signed_up(ADMIN).await;
    let (token, assistants, conversations) = some_history(&app, "live@example.com").await;
    let db = app.read_side().await;
    caught_up(&db).await;

    // Non-admins get 403 on the admin API; unknown projections 404.
    let other = app.signed_up("someone@example.com").await;
    for (method, path) in [
        (Method::GET, "/api/v1/admin/projections"),
        (Method::POST, "/api/v1/admin/projections/assistants/rebuild"),
    ] {
        problem(
            app.send(method, path, Some(&other), None).await,
            StatusCode::FORBIDDEN,
        )
        .await;
    }
    problem(
        app.send(
            Method::POST,
            "/api/v1/admin/projections/nope/rebuild",
            Some(&admin),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Writers keep posting while readers check that counts never go backwards
    // and every assistant is always there.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (client, base, token, conversations, stop) = (
            app.client.clone(),
            app.url("/api/v1"),
            token.clone(),
            conversations.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut posted = 0;
            while !stop.is_cancelled() {
                let c = &conversations[posted % conversations.len()];
                let response = client
                    .post(format!("{base}/conversations/{c}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({ "content": format!("live {posted}") }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::ACCEPTED);
                posted += 1;
            }
            posted
        })
    };
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
            // Every count each model serves, by what it counts: none may shrink.
            let mut seen: HashMap<String, i64> = HashMap::new();
            let mut at_least = |what: String, count: Option<i64>| {
                let count = count.unwrap_or_else(|| panic!("{what}: no count"));
                let before = seen.insert(what.clone(), count).unwrap_or(1);
                assert!(
                    count >= before && count > 0,
                    "{what} went from {before} to {count}: a half-built model was served"
                );
            };
            let mut rounds = 0;
            while !stop.is_cancelled() {
                // assistants (listed) and cache (one by one, read through Redis)
                let list = read("/assistants").await;
                let data = list["data"].as_array().unwrap();
                assert_eq!(data.len(), 2, "assistants missing: {list}");
                for a in data
                    .iter()
                    .chain([&read(&format!("/assistants/{}", assistants[0])).await])
                {
                    let id = a["id"].as_str().unwrap();
                    at_least(
                        format!("{id} conversations"),
                        a["conversation_count"].as_i64(),
                    );
                    at_least(format!("{id} messages"), a["message_count"].as_i64());
                }
                // conversations (listed and one by one) and messages
                let list = read("/conversations").await;
                assert_eq!(
                    list["data"].as_array().unwrap().len(),
                    3,
                    "conversations missing: {list}"
                );
                for id in &conversations {
                    let one = read(&format!("/conversations/{id}")).await;
                    at_least(format!("{id} message_count"), one["message_count"].as_i64());
                    let page = read(&format!("/conversations/{id}/messages?limit=100")).await;
                    at_least(
                        format!("{id} listed"),
                        page["data"].as_array().map(|d| d.len() as i64),
                    );
                }
                // usage_daily: replies completed so far
                let usage = read("/stats/usage?group_by=assistant").await;
                at_least("usage messages".into(), usage["total"]["messages"].as_i64());
                rounds += 1;
            }
            rounds
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A rebuild through the API: 202 with a status URL, shown in progress.
    let started = app
        .send(
            Method::POST,
            "/api/v1/admin/projections/assistants/rebuild",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = started.json().await.unwrap();
    assert_eq!(body["status_url"], location.as_str());
    assert_eq!(body["projection"], "assistants");
    let listed: Value = app
        .send(Method::GET, "/api/v1/admin/projections", Some(&admin), None)
        .await
        .json()
        .await
        .unwrap();
    let entry = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "assistants")
        .unwrap();
    assert_eq!(entry["rebuild"]["id"], body["id"], "{listed}");
    // And every projection from the command line at the same time as the traffic.
    let cli = rebuild::rebuild(
        &db,
        crate::helpers::keyring(&db),
        &["conversations", "messages", "usage_daily", "cache"],
        None,
        &|_| {},
    )
    .await
    .unwrap();
    assert_eq!(cli.swapped.len(), 4);
    let finished = rebuild_finished(&app, &admin, &location).await;
    assert_eq!(finished["state"], "succeeded", "{finished}");
    assert!(finished["events"].as_i64().unwrap() > 0, "{finished}");
    // Another, over the same stretch of traffic.
    let again = app
        .send(
            Method::POST,
            "/api/v1/admin/projections/assistants/rebuild",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again = again.headers()["location"].to_str().unwrap().to_owned();
    let finished = rebuild_finished(&app, &admin, &again).await;
    assert_eq!(finished["state"], "succeeded", "{finished}");

    stop.cancel();
    let posted = writer.await.unwrap();
    let rounds = reader.await.unwrap();
    assert!(
        posted > 5 && rounds > 2,
        "posted {posted}, read {rounds} rounds"
    );

    // A rebuild of the same projection while one runs: 409.
    let holder = hold_the_rebuild_lock(&db, "messages").await;
    problem(
        app.send(
            Method::POST,
            "/api/v1/admin/projections/messages/rebuild",
            Some(&admin),
            None,
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    drop(holder);

    // The live workers kept applying on the swapped-in tables (their prepared
    // statements were re-planned): a new message is counted, then all is clean.
    let posted = app
        .post(
            &format!("/conversations/{}/messages", conversations[0]),
            &token,
            json!({ "content": "after the swap" }),
        )
        .await;
    let at = consistency(&posted).unwrap();
    let conversation = app
        .get_ok(
            &format!("/conversations/{}", conversations[0]),
            &token,
            Some(&at),
        )
        .await;
    let stream: uuid::Uuid = conversations[0].parse().unwrap();
    let messages: i64 = crate::on_db!(db, |pool| sqlx::query_scalar(
        "SELECT count(*) FROM events
         WHERE stream_id = $1 AND event_type IN ('MessagePosted', 'ReplyRequested')",
    )
    .bind(stream)
    .fetch_one(pool)
    .await
    .unwrap());
    assert_eq!(conversation["message_count"], messages);
    caught_up(&db).await;
    let (report, clean) = verify_report(&db, &crate::helpers::master_key(), &[])
        .await
        .unwrap();
    assert!(clean, "{report}");
    let (_, assistant) = get_json(&app, &format!("/assistants/{}", assistants[0]), &token).await;
    assert!(
        assistant["message_count"].as_i64().unwrap() > 12,
        "{assistant}"
    );
}

// Server-only: the pg_dump-based backup scripts.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn backup_then_drop_then_restore_serves_the_same_data_and_verifies_clean() {
    let app = spawn_with_admin().await;
    let (token, assistants, conversations) = some_history(&app, "backup@example.com").await;
    // The replies end before the checksum: one ending between the checksum's
    // reads of two tables left `before` showing half of it.
    every_reply_ended(&app.db.pool).await;
    caught_up(&app.db.pool).await;
    let before = checksum(&app.db.pool).await;
    let backups = tempdir("backups");

    let output = Command::new(script("backup.sh"))
        .env("DATABASE_URL", &app.db.url)
        .env("BACKUP_DIR", &backups)
        .env_remove("S3_BUCKET")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("verified"), "{printed}");
    let file = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "dump"))
        .expect("a .dump file");

    // The database is lost.
    let (mut db, names) = app.crash();
    let url = db.url.clone();
    db.pool.close().await;
    // The restored database gets a TestDb of its own (which drops it at the end).
    let name = std::mem::take(&mut db.name);
    let mut admin =
        sqlx::PgConnection::connect(&format!("{}/postgres", crate::support::server_url()))
            .await
            .unwrap();
    for sql in [
        format!("DROP DATABASE \"{name}\" WITH (FORCE)"),
        format!("CREATE DATABASE \"{name}\""),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
    }

    let output = Command::new(script("restore.sh"))
        .arg(&file)
        .env("DATABASE_URL", &url)
        .env("AI_SECRETARY_BIN", binary())
        .env("REDIS_URL", &names.redis_url)
        .env("REDIS_KEY_PREFIX", &names.redis_prefix)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("verify: no drift"), "{printed}");

    // The restored data is served by the API.
    let pool = PgPool::connect(&url).await.unwrap();
    assert_eq!(checksum(&pool).await, before);
    let db = TestDb {
        name,
        url: url.clone(),
        pool,
        server: crate::support::server_url(),
    };
    let restored = spawn_app_on(db, names, &["--admin-emails", ADMIN], Roles::all()).await;
    let (status, assistant) =
        get_json(&restored, &format!("/assistants/{}", assistants[0]), &token).await;
    assert_eq!(status, StatusCode::OK, "{assistant}");
    assert_eq!(assistant["conversation_count"], 2);
    serves_the_backup_and_goes_on(&restored, &token, &conversations[0]).await;
    caught_up(&restored.db.pool).await;
    let (report, clean) = verify_report(
        &crate::helpers::pg(&restored.db.pool),
        &crate::helpers::master_key(),
        &[],
    )
    .await
    .unwrap();
    assert!(clean, "{report}");
    std::fs::remove_dir_all(&backups).unwrap();
}

/// docs/operations.md, "Restoring to an older point than NATS has seen": events
/// appended after the backup are gone from the restored store but still in the
/// JetStream stream (and their resources in Redis). Following the procedure
/// (stop the service, `restore.sh`, purge the stream, start the service,
/// `replay --all`), nothing of them is served, the service goes on from the
/// restored point, and `verify` finds no drift.
// Server-only: a restore behind what NATS has seen.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn a_restore_older_than_what_nats_has_seen_follows_the_procedure_to_a_clean_verify() {
    let app = spawn_with_admin().await;
    let (token, assistants, conversations) = some_history(&app, "older@example.com").await;
    caught_up(&app.db.pool).await;
    let backups = tempdir("backups-older");
    let backed_up = output(
        Command::new(script("backup.sh"))
            .env("DATABASE_URL", &app.db.url)
            .env("BACKUP_DIR", &backups)
            .env_remove("S3_BUCKET"),
    )
    .await;
    assert!(backed_up.status.success(), "{backed_up:?}");
    let file = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "dump"))
        .expect("a .dump file");

    // After the backup: an assistant and messages that NATS (and Redis) see.
    let lost = app.assistant(&token, "Lost in the restore").await;
    let lost = lost["id"].as_str().unwrap().to_owned();
    for n in 0..3 {
        let posted = app
            .post(
                &format!("/conversations/{}/messages", conversations[0]),
                &token,
                json!({ "content": format!("lost {n}") }),
            )
            .await;
        assert_eq!(posted.status(), StatusCode::ACCEPTED);
    }
    progress::caught_up(&app.db.pool, &consumers()).await;
    let (status, _) = get_json(&app, &format!("/assistants/{lost}"), &token).await;
    assert_eq!(status, StatusCode::OK, "read once, so Redis holds a copy");

    // 1. Stop the service. 2. Restore the backup (its own verify passes).
    let (db, names) = app.stop();
    let restored = output(
        Command::new(script("restore.sh"))
            .arg(&file)
            .env("DATABASE_URL", &db.url)
            .env("AI_SECRETARY_BIN", binary())
            .env("REDIS_URL", &names.redis_url)
            .env("REDIS_KEY_PREFIX", &names.redis_prefix),
    )
    .await;
    let printed = String::from_utf8_lossy(&restored.stdout);
    assert!(restored.status.success(), "{printed}{restored:?}");
    assert!(printed.contains("purge the NATS"), "{printed}");
    // 3. Purge the stream (`nats stream purge`).
    let jetstream = async_nats::jetstream::new(async_nats::connect(&names.nats_url).await.unwrap());
    let purged = jetstream
        .get_stream(&names.stream)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    assert!(purged.purged > 0, "the stream held the lost events");
    // 4. Start the service; 5. once the relay has republished, replay --all.
    let app = spawn_app_on(db, names, &["--admin-emails", ADMIN], Roles::all()).await;
    caught_up(&app.db.pool).await;
    let replayed = output(Command::new(binary()).args([
        "--database-url",
        &app.db.url,
        "--redis-url",
        &app.names.redis_url,
        "--redis-key-prefix",
        &app.names.redis_prefix,
        "replay",
        "--all",
    ]))
    .await;
    assert!(replayed.status.success(), "{replayed:?}");

    // Nothing appended after the backup is served, from Postgres or Redis.
    let (status, body) = get_json(&app, &format!("/assistants/{lost}"), &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (_, listed) = get_json(&app, "/assistants", &token).await;
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    assert!(
        ids.iter().all(|id| assistants.iter().any(|a| a == id)),
        "{listed}"
    );
    // The service goes on from the restored point: new events are applied.
    let posted = serves_the_backup_and_goes_on(&app, &token, &conversations[0]).await;
    let conversation: Value = app
        .get(
            &format!("/conversations/{}", conversations[0]),
            &token,
            Some(&consistency(&posted).unwrap()),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(conversation["message_count"], 8, "{conversation}");
    progress::caught_up(&app.db.pool, &consumers()).await;
    let (report, clean) = verify_report(
        &crate::helpers::pg(&app.db.pool),
        &crate::helpers::master_key(),
        &[],
    )
    .await
    .unwrap();
    assert!(clean, "{report}");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    std::fs::remove_dir_all(&backups).unwrap();
}

// Server-only: the operations scripts that watch Postgres, NATS and Redis.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn the_health_scripts_report_up_and_down_and_log_recovery_attempts() {
    let app = spawn_with_admin().await;
    // Ready once its background connections are up (degraded until then).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let up =
            output(Command::new(script("health-check.sh")).env("BASE_URL", &app.address)).await;
        if up.status.success() {
            break;
        }
        let printed = String::from_utf8_lossy(&up.stdout);
        assert!(tokio::time::Instant::now() < deadline, "{printed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Nothing listens there: down, and a restart that does not help is logged.
    let dead = "http://127.0.0.1:9";
    let down = output(Command::new(script("health-check.sh")).env("BASE_URL", dead)).await;
    assert!(!down.status.success());
    let logs = tempdir("recovery-log");
    let log = logs.join("auto-recovery.log");
    let marker = logs.join("restarted");
    let recovery = output(
        Command::new(script("auto-recovery.sh"))
            .env("BASE_URL", dead)
            .env("RESTART_COMMAND", format!("touch {}", marker.display()))
            .env("RECOVERY_WAIT_SECONDS", "1")
            .env("LOG_FILE", &log),
    )
    .await;
    assert!(!recovery.status.success());
    assert!(marker.exists(), "the restart command ran");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("still down"), "{logged}");

    // Healthy: nothing is restarted.
    std::fs::remove_file(&marker).unwrap();
    let fine = output(
        Command::new(script("auto-recovery.sh"))
            .env("BASE_URL", &app.address)
            .env("RESTART_COMMAND", format!("touch {}", marker.display()))
            .env("LOG_FILE", &log),
    )
    .await;
    assert!(fine.status.success());
    assert!(!marker.exists());
    std::fs::remove_dir_all(&logs).unwrap();
    // Every script explains itself.
    for name in [
        "backup.sh",
        "restore.sh",
        "health-check.sh",
        "auto-recovery.sh",
    ] {
        let help = output(Command::new(script(name)).arg("--help")).await;
        assert!(help.status.success(), "{name} --help");
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("Usage"),
            "{name}"
        );
    }
}

/// A restored conversation of `some_history` lists what it held at the backup
/// (three messages and their replies), and takes a new message; its answer.
async fn serves_the_backup_and_goes_on(
    app: &TestApp,
    token: &str,
    conversation: &str,
) -> reqwest::Response {
    let path = format!("/conversations/{conversation}/messages");
    let (status, messages) = get_json(app, &path, token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(messages["data"].as_array().unwrap().len(), 6, "{messages}");
    let posted = app
        .post(&path, token, json!({ "content": "after the restore" }))
        .await;
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    posted
}

/// Run a command off the test's runtime, so the service on it keeps answering.
async fn output(command: &mut Command) -> std::process::Output {
    let mut command = std::mem::replace(command, Command::new("true"));
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn tempdir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ai-secretary-{kind}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `recovery_sqlite`'s test of the same name, on Postgres with Redis.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_of_cache_makes_the_invalidations_its_worker_skips_before_it_swaps() {
    // Without the `cache` worker: nothing invalidates the cache meanwhile.
    let roles = Roles {
        projections: NAMES
            .iter()
            .filter(|n| **n != "cache")
            .map(|n| n.to_string())
            .collect(),
        ..Roles::all()
    };
    let app = spawn_app_on(TestDb::new().await, BusNames::new(), &[], roles).await;
    let (_, assistants, _) = some_history(&app, "stale@example.com").await;
    progress::caught_up(&app.db.pool, &["assistants".to_owned()]).await;
    let assistant = uuid::Uuid::parse_str(&assistants[0]).unwrap();
    let owner: uuid::Uuid = sqlx::query_scalar("SELECT owner_id FROM assistants WHERE id = $1")
        .bind(assistant)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    // The test's keys, under its own prefix (deleted with its names).
    let cache = Cache::new(
        "redis://127.0.0.1:6379",
        &app.names.redis_prefix,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    cache
        .fill(
            Kind::Assistant,
            assistant,
            owner,
            Position::default(),
            &CachedJson::of(&json!({ "message_count": 0 })),
        )
        .await;
    assert!(cache.get(Kind::Assistant, assistant, owner).await.is_some());

    // On a worker thread of its own, so the sync step callback can look the
    // key up in Redis (`block_in_place`) at the swap, before `forget_all`.
    let (db, opener) = (
        crate::helpers::pg(&app.db.pool),
        crate::helpers::keyring(&app.db.pool),
    );
    let rebuilt = tokio::spawn(async move {
        let at_swap = std::sync::Mutex::new(None);
        let rebuilt = rebuild::rebuild(&db, opener, &["cache"], Some(&cache), &|step| {
            if let Step::Swapped { position, .. } = step {
                let copy = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(cache.get(
                        Kind::Assistant,
                        assistant,
                        owner,
                    ))
                });
                *at_swap.lock().unwrap() = Some((position, copy));
            }
        })
        .await
        .unwrap();
        (rebuilt, at_swap.into_inner().unwrap())
    });
    let (rebuilt, at_swap) = rebuilt.await.unwrap();
    let (position, copy) = at_swap.expect("the swap was reported");
    assert_eq!(position, rebuilt.head, "the checkpoint moved to the head");
    assert_eq!(
        copy, None,
        "a stale copy was still cached when the checkpoint moved past its invalidation"
    );
}
