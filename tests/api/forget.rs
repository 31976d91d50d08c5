//! "Forget me" (`DELETE /api/v1/users/me`) and the encryption it rests on: the
//! event store and the bus only ever hold a user's personal data sealed under
//! their own key, and once the key is destroyed nothing of theirs can be read
//! anywhere: not in a dump of the database, not in Redis, not on the stream.
//! The same on the embedded service, which has only the database (SQLite).

use std::time::{Duration, Instant};

use ai_secretary::{
    app::users::ACCOUNT_RECHECK, auth::Tokens, config::DEV_JWT_SECRET, startup::Roles,
};
use ai_secretary_projections::{NAMES, rebuild};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    helpers::{EventLog, TestApp, Topology, keyring, master_key, spawn_app_on},
    support::{BusNames, TestDb},
};

const PASSWORD: &str = "correct horse battery";

/// Everything one user wrote, each string unique to this test run.
struct Personal {
    email: String,
    strings: Vec<String>,
}

impl Personal {
    fn new(who: &str) -> Personal {
        let tag = Uuid::now_v7().simple().to_string();
        let email = format!("{who}-{tag}@example.com");
        let strings = [
            "Zanzibar", "Mika", "planner", "Quokka", "Ocelot", "Trip", "Pangolin", "Narwhal",
        ]
        .iter()
        .map(|word| format!("{word}{who}{tag}"))
        .collect();
        Personal { email, strings }
    }

    fn s(&self, i: usize) -> &str {
        &self.strings[i]
    }

    /// What the read models keep of it: the assistant's name, role,
    /// instructions and metadata, the conversation's (latest) title, the
    /// message (and the reply, which quotes it).
    fn in_read_models(&self) -> Vec<String> {
        [1, 2, 3, 4, 6, 7]
            .iter()
            .map(|&i| self.strings[i].clone())
            .collect()
    }

    /// The strings (and the email) found in `text`.
    fn found_in(&self, text: &str) -> Vec<String> {
        std::iter::once(&self.email)
            .chain(&self.strings)
            .filter(|s| text.contains(s.as_str()))
            .cloned()
            .collect()
    }
}

/// Register, write a little of everything, get a reply; returns the token.
async fn active_user<D>(app: &TestApp<D>, p: &Personal) -> String {
    let registered = app
        .client
        .post(app.url("/api/v1/users"))
        .header("idempotency-key", Uuid::now_v7().to_string())
        .json(&json!({ "email": p.email, "password": PASSWORD, "display_name": p.s(0) }))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::CREATED);
    let token: Value = app
        .send(
            Method::POST,
            "/api/v1/auth/token",
            None,
            Some(json!({ "email": p.email, "password": PASSWORD })),
        )
        .await
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();
    let assistant: Value = app
        .post(
            "/assistants",
            &token,
            json!({ "name": p.s(1), "role": p.s(2), "instructions": p.s(3),
                    "metadata": { "team": p.s(4) } }),
        )
        .await
        .json()
        .await
        .unwrap();
    let conversation: Value = app
        .post(
            "/conversations",
            &token,
            json!({ "assistant_id": assistant["id"], "title": p.s(5) }),
        )
        .await
        .json()
        .await
        .unwrap();
    let path = format!(
        "/conversations/{}/messages",
        conversation["id"].as_str().unwrap()
    );
    let posted = app
        .client
        .post(app.url(&format!("/api/v1{path}")))
        .bearer_auth(&token)
        .header("idempotency-key", Uuid::now_v7().to_string())
        .json(&json!({ "content": p.s(6) }))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    let renamed = app
        .client
        .patch(app.url(&format!(
            "/api/v1/conversations/{}",
            conversation["id"].as_str().unwrap()
        )))
        .bearer_auth(&token)
        .json(&json!({ "title": p.s(7) }))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), StatusCode::OK);
    // The reply, and every resource read once so the caches hold a copy.
    crate::helpers::eventually("the reply is completed", async || {
        let listed: Value = app.get(&path, &token, None).await.json().await.unwrap();
        let done = listed["data"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["status"] == "completed"));
        done.then_some(()).ok_or(listed.to_string())
    })
    .await;
    for read in [
        "/users/me".to_owned(),
        format!("/assistants/{}", assistant["id"].as_str().unwrap()),
        format!("/conversations/{}", conversation["id"].as_str().unwrap()),
    ] {
        // Each projection catches up in its own time.
        crate::helpers::eventually(&format!("{read} is readable"), async || {
            let status = app.get(&read, &token, None).await.status();
            (status == StatusCode::OK)
                .then_some(())
                .ok_or(status.to_string())
        })
        .await;
    }
    token
}

/// Every key and value under the test's Redis prefix, as text; `None` for
/// the embedded service, whose cache is in its memory.
async fn redis_dump<D: EventLog>(app: &TestApp<D>) -> Option<String> {
    if !D::SERVERS {
        return None;
    }
    let client = redis::Client::open(app.names.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", app.names.redis_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut dump = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let values: Vec<String> = match kind.as_str() {
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "string" => vec![
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap(),
            ],
            other => panic!("{key} is a Redis {other}: not one the cache writes"),
        };
        dump.push_str(&format!("{key} {}\n", values.join(" ")));
    }
    Some(dump)
}

/// Every message of the test's JetStream stream, payload as text; and how
/// many. `None` for the embedded service, which has no bus.
async fn stream_dump<D: EventLog>(app: &TestApp<D>) -> Option<(String, u64)> {
    if !D::SERVERS {
        return None;
    }
    let client = async_nats::connect(&app.names.nats_url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(&app.names.stream).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut dump = String::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await.unwrap();
        dump.push_str(&String::from_utf8_lossy(&message.payload));
        dump.push('\n');
    }
    Some((dump, state.messages))
}

/// Every row of every read model, in a stable order (for comparing before and
/// after a replay).
async fn read_models<D: EventLog>(app: &TestApp<D>) -> Vec<String> {
    let mut rows = Vec::new();
    for table in [
        "assistants",
        "assistants_conversations",
        "conversations",
        "messages",
        "messages_conversations",
        "usage_daily",
        "usage_conversations",
        "cache_conversations",
    ] {
        let text = app.db.rows(table).await;
        rows.extend(text.into_iter().map(|r| format!("{table} {r}")));
    }
    rows
}

crate::on_both!(the_store_and_the_bus_hold_personal_data_only_sealed);
async fn the_store_and_the_bus_hold_personal_data_only_sealed<D: EventLog>(app: TestApp<D>) {
    let ada = Personal::new("ada");
    active_user(&app, &ada).await;
    app.caught_up().await;
    let events = app.db.dump(Some("events")).await;
    assert_eq!(ada.found_in(&events), Vec::<String>::new(), "in the events");
    assert!(
        !events.contains("argon2"),
        "a password hash in plaintext: {events}"
    );
    let reservations = app.db.dump(Some("reservations")).await;
    assert!(!reservations.contains(&ada.email), "{reservations}");
    if let Some((stream, messages)) = stream_dump(&app).await {
        assert!(messages >= 8, "{messages} messages");
        assert_eq!(ada.found_in(&stream), Vec::<String>::new(), "{stream}");
        assert!(!stream.contains("argon2"));
    }
    // …and the read side opened them: the read models hold the plaintext.
    let models = read_models(&app).await.join("\n");
    assert_eq!(ada.found_in(&models), ada.in_read_models(), "{models}");
}

crate::on_both!(forgetting_asks_for_the_password_or_a_recent_token);
async fn forgetting_asks_for_the_password_or_a_recent_token<D: EventLog>(app: TestApp<D>) {
    let ada = Personal::new("ada");
    let token = active_user(&app, &ada).await;
    let me = app.get_ok("/users/me", &token, None).await;
    let id: Uuid = me["id"].as_str().unwrap().parse().unwrap();
    let tokens = Tokens::new(DEV_JWT_SECRET, std::time::Duration::from_secs(3600));
    let old = tokens
        .issue(id, chrono::Utc::now() - chrono::Duration::minutes(10))
        .unwrap();
    let forget = async |token: &str, body: Option<Value>| {
        app.send(Method::DELETE, "/api/v1/users/me", Some(token), body)
            .await
    };
    let refused = forget(&old, None).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let problem: Value = refused.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("password"),
        "{problem}"
    );
    let wrong = forget(&old, Some(json!({ "password": "not the password at all" }))).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let unknown = forget(&old, Some(json!({ "password": PASSWORD, "why": "x" }))).await;
    assert_eq!(unknown.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Nothing happened: the account still works.
    assert_eq!(
        app.get("/users/me", &old, None).await.status(),
        StatusCode::OK
    );
    assert!(!app.events().await.iter().any(|e| e.2 == "UserForgotten"));

    let done = forget(&old, Some(json!({ "password": PASSWORD }))).await;
    assert_eq!(done.status(), StatusCode::NO_CONTENT);
    // A fresh token needs no password (another account shows it).
    let bob = Personal::new("bob");
    let bobs = active_user(&app, &bob).await;
    assert_eq!(forget(&bobs, None).await.status(), StatusCode::NO_CONTENT);
}

crate::on_both!(a_forgotten_user_leaves_nothing_readable_and_a_replay_agrees);
async fn a_forgotten_user_leaves_nothing_readable_and_a_replay_agrees<D: EventLog>(
    app: TestApp<D>,
) {
    let (ada, bob) = (Personal::new("ada"), Personal::new("bob"));
    let token = active_user(&app, &ada).await;
    let bobs = active_user(&app, &bob).await;

    let forgotten = app
        .send(Method::DELETE, "/api/v1/users/me", Some(&token), None)
        .await;
    assert_eq!(forgotten.status(), StatusCode::NO_CONTENT);
    app.caught_up().await;

    // Their tokens stop working, they cannot sign in, and their email is free.
    for path in ["/users/me", "/assistants", "/conversations", "/stats/usage"] {
        assert_eq!(
            app.get(path, &token, None).await.status(),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let login = app
        .send(
            Method::POST,
            "/api/v1/auth/token",
            None,
            Some(json!({ "email": ada.email, "password": PASSWORD })),
        )
        .await;
    assert_eq!(login.status(), StatusCode::UNAUTHORIZED);

    // Nothing of theirs anywhere: the database (events, read models, the
    // reservations, the kept idempotent responses), Redis, the stream. The
    // other user's data is there, in the read models and the caches: the
    // greps can find what is there.
    let dump = app.db.dump(None).await;
    assert_eq!(ada.found_in(&dump), Vec::<String>::new(), "in the database");
    let bobs_found = bob.found_in(&dump);
    assert!(
        bob.in_read_models().iter().all(|s| bobs_found.contains(s)),
        "bob's read models: {bobs_found:?}"
    );
    if let Some(cached) = redis_dump(&app).await {
        assert_eq!(
            ada.found_in(&cached),
            Vec::<String>::new(),
            "in Redis: {cached}"
        );
        assert!(
            !bob.found_in(&cached).is_empty(),
            "bob's cached copies: {cached}"
        );
    }
    if let Some((stream, _)) = stream_dump(&app).await {
        assert_eq!(ada.found_in(&stream), Vec::<String>::new(), "on the stream");
    }
    let forgotten: Vec<String> = app
        .events()
        .await
        .into_iter()
        .map(|(_, _, event_type)| event_type)
        .filter(|event_type| event_type == "UserForgotten")
        .collect();
    assert_eq!(forgotten, ["UserForgotten"]);

    // A replay from the store gives the same read models, and verify agrees.
    let before = read_models(&app).await;
    let db = app.read_side().await;
    rebuild::rebuild(&db, keyring(&db), &NAMES, None, &|_| {})
        .await
        .unwrap();
    assert_eq!(read_models(&app).await, before);
    let (report, clean) = ai_secretary::recovery::verify_report(&db, &master_key(), &[])
        .await
        .unwrap();
    assert!(clean, "{report}");

    // The email registers again, as a new account that sees nothing of the old.
    let again = app
        .send(
            Method::POST,
            "/api/v1/users",
            None,
            Some(json!({ "email": ada.email, "password": PASSWORD, "display_name": "New" })),
        )
        .await;
    assert_eq!(again.status(), StatusCode::CREATED);
    let fresh = app.signed_in(&ada.email, PASSWORD).await;
    let assistants = app.get_ok("/assistants", &fresh, None).await;
    assert_eq!(assistants["data"], json!([]));
    // Bob is untouched.
    assert_eq!(
        app.get("/users/me", &bobs, None).await.status(),
        StatusCode::OK
    );
}

crate::on_both!(
    a_rotated_encryption_key_opens_everything_and_the_old_one_nothing,
    spawns
);
async fn a_rotated_encryption_key_opens_everything_and_the_old_one_nothing<D: Topology>() {
    use ai_secretary::{
        app::users::EMAIL_SCOPE,
        crypto::{MasterKey, random_master_key_hex},
        recovery::verify_report,
        startup::Roles,
        store::rotation::{Rotated, rotate_master_key, rotate_master_key_sqlite},
    };
    use ai_secretary_projections::Db;
    let app = D::spawn(&[], Roles::all()).await;
    let ada = Personal::new("ada");
    active_user(&app, &ada).await;
    app.caught_up().await;
    let (data, names) = D::stop(app);
    let db = data.read_side().await;
    // `ai-secretary rotate-key` on either database.
    let rotate = async |old: &MasterKey, new: &MasterKey| match &db {
        Db::Postgres(pool) => rotate_master_key(pool, old, new, EMAIL_SCOPE).await,
        Db::Sqlite(lite) => rotate_master_key_sqlite(&lite.pool, old, new, EMAIL_SCOPE).await,
    };

    let new_hex = random_master_key_hex();
    let new = MasterKey::from_hex(&new_hex).unwrap();
    // From a key that is not the one in use, nothing rotates.
    let wrong = MasterKey::from_hex(&random_master_key_hex()).unwrap();
    assert!(rotate(&wrong, &new).await.is_err());
    let rotated = rotate(&master_key(), &new).await.unwrap();
    assert_eq!(
        rotated,
        Rotated {
            keys: 1,
            reservations: 1
        }
    );
    // The old key opens nothing any more.
    assert!(verify_report(&db, &master_key(), &[]).await.is_err());
    drop(db);

    let app = data
        .start(names, &["--encryption-key", &new_hex], Roles::all())
        .await;
    // Signing in finds the account by its re-hashed email; everything reads.
    let token = app.signed_in(&ada.email, PASSWORD).await;
    let me = app.get_ok("/users/me", &token, None).await;
    assert_eq!(me["display_name"], ada.s(0));
    let assistants = app.get_ok("/assistants", &token, None).await;
    assert_eq!(assistants["data"][0]["name"], ada.s(1));
    let (report, clean) = verify_report(&app.read_side().await, &new, &[])
        .await
        .unwrap();
    assert!(clean, "{report}");
}

/// The process that forgot an account refuses its tokens at once; another API
/// process on the same data, which had seen the account exist, within
/// `ACCOUNT_RECHECK` (it asks the store at most once a second per account).
/// Server topology only: two API processes share one database there.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn another_api_process_refuses_a_forgotten_accounts_token_within_the_recheck() {
    let (db, names) = (TestDb::new().await, BusNames::new());
    let other = spawn_app_on(db.borrowed(), names.borrowed(), &[], Roles::only_api()).await;
    let app = spawn_app_on(db, names, &[], Roles::all()).await;
    let ada = Personal::new("ada");
    let token = active_user(&app, &ada).await;
    let signed_in = async |on: &TestApp| on.get("/assistants", &token, None).await.status();
    assert_eq!(
        signed_in(&other).await,
        StatusCode::OK,
        "the other process saw the account"
    );

    let forgotten = app
        .send(Method::DELETE, "/api/v1/users/me", Some(&token), None)
        .await;
    assert_eq!(forgotten.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        signed_in(&app).await,
        StatusCode::UNAUTHORIZED,
        "at once where it was forgotten"
    );

    let deadline = Instant::now() + ACCOUNT_RECHECK + Duration::from_millis(500);
    loop {
        let status = signed_in(&other).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other process still answers {status} more than {ACCOUNT_RECHECK:?} after the forget"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
