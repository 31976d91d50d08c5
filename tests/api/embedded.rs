//! The embedded default, end to end: the service with no server at all (SQLite
//! in a temporary `DATA_DIR`, no NATS, no Redis), as `cargo run --release`
//! starts it on a fresh machine. These run on every `cargo test`, servers or
//! not.
//!
//! - the README's walkthrough: sign-up, assistant, conversation, a message and
//!   its reply, the read side with `X-Consistency-Token`, usage, the admin
//!   routes, live updates (SSE), bad input, forget-me;
//! - a restart on the same directory keeps everything and goes on;
//! - a backup (`ai-secretary backup`) and `verify`/`replay` as second processes
//!   beside the running service;
//! - `kill -9` under load: every 2xx survives, nothing is doubled, `verify` clean.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    helpers::{Embedded, TestApp, embedded_binary, eventually, spawn_embedded, spawn_embedded_on},
    servers::free_port,
    stream::{next, subscribe, until_completed},
    support::http::consistency,
};

const ADMIN: &str = "ada@example.com";

/// The reply to the message posted by `posted` (a 202 body), once completed.
async fn completed_reply<D>(
    app: &TestApp<D>,
    token: &str,
    conversation: &str,
    reply: &str,
) -> Value {
    eventually("the reply completes", async || {
        // Without a consistency token the conversation may not be projected yet (404).
        let response = app
            .get(
                &format!("/conversations/{conversation}/messages"),
                token,
                None,
            )
            .await;
        if response.status() != StatusCode::OK {
            return Err(format!("messages answer {}", response.status()));
        }
        let list: Value = response.json().await.map_err(|e| e.to_string())?;
        let found = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == reply)
            .cloned()
            .ok_or("the reply is not listed yet")?;
        if found["status"] == "completed" {
            Ok(found)
        } else {
            Err(format!("reply is {}", found["status"]))
        }
    })
    .await
}

#[tokio::test]
async fn the_readme_walkthrough_runs_embedded_with_no_server() {
    let app = spawn_embedded(&["--admin-emails", ADMIN]).await;
    assert!(
        app.db.file().exists(),
        "the database is created in DATA_DIR"
    );

    let token = app.signed_up(ADMIN).await;
    let created = app
        .post(
            "/assistants",
            &token,
            json!({"name": "Mika", "role": "scheduler", "instructions": "Be brief."}),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let read_after = consistency(&created).unwrap();
    let assistant: Value = created.json().await.unwrap();
    let id = assistant["id"].as_str().unwrap().to_owned();
    // Read your write: the consistency token waits for the projection.
    let one = app
        .get_ok(&format!("/assistants/{id}"), &token, Some(&read_after))
        .await;
    assert_eq!(one["name"], "Mika");

    let conversation = app.conversation(&token, &assistant["id"]).await;
    let conversation_id = conversation["id"].as_str().unwrap().to_owned();
    let mut live = subscribe(&app, &token, &conversation_id, None).await;
    let posted = app
        .post(
            &format!("/conversations/{conversation_id}/messages"),
            &token,
            json!({"content": "Book a room for Tuesday 3pm"}),
        )
        .await;
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    let posted: Value = posted.json().await.unwrap();
    let reply_id = posted["reply"]["id"].as_str().unwrap().to_owned();

    // Live: the message, then the reply's completion, from the store woken by commits.
    let first = next(&mut live).await;
    assert_eq!(first.event, "message.created");
    assert_eq!(first.data["content"], "Book a room for Tuesday 3pm");
    let (_, completed) = until_completed(&mut live).await;
    assert_eq!(completed.data["id"], reply_id.as_str());

    let reply = completed_reply(&app, &token, &conversation_id, &reply_id).await;
    assert_eq!(reply["role"], "assistant");
    assert!(reply["content"].as_str().is_some_and(|c| !c.is_empty()));
    let total = reply["usage"]["total_tokens"].as_i64().unwrap();
    assert!(total > 0);

    let usage = eventually("usage counts the reply", async || {
        let usage = app.get_ok("/stats/usage?group_by=day", &token, None).await;
        match usage["data"][0]["total_tokens"].as_i64() {
            Some(t) if t == total => Ok(usage),
            other => Err(format!("total_tokens {other:?}")),
        }
    })
    .await;
    assert_eq!(usage["data"][0]["messages"], 1);
    // Each read model has its own worker: usage counting the reply says
    // nothing of where the assistants' and conversations' workers are.
    eventually("the assistant counts its conversation", async || {
        let listed = app.get_ok("/assistants", &token, None).await;
        (listed["data"][0]["conversation_count"] == 1)
            .then_some(())
            .ok_or(format!("{listed}"))
    })
    .await;
    eventually("the conversation counts both messages", async || {
        let conversations = app.get_ok("/conversations", &token, None).await;
        (conversations["data"][0]["message_count"] == 2)
            .then_some(())
            .ok_or(format!("{conversations}"))
    })
    .await;

    // The admin routes: every projection listed, at the head.
    let admin = app.get_ok("/admin/projections", &token, None).await;
    let names: Vec<&str> = admin["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for projection in ai_secretary_projections::NAMES {
        assert!(names.contains(&projection), "{projection} in {admin}");
    }
    let other = app.signed_up("bob@example.com").await;
    assert_eq!(
        app.get("/admin/projections", &other, None).await.status(),
        StatusCode::FORBIDDEN
    );
    // Scoped: another user's resource is 404.
    assert_eq!(
        app.get(&format!("/assistants/{id}"), &other, None)
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    // Bad input: a clear 4xx, never a 500.
    let malformed = app
        .client
        .post(app.url("/api/v1/assistants"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"name\": \"\0")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let absurd = app
        .get("/stats/usage?from=99999-01-01&to=0000-13-40", &token, None)
        .await;
    assert!(absurd.status().is_client_error(), "{}", absurd.status());

    // Operations: ready (no NATS, no Redis to be down), metrics.
    let ready: Value = app
        .client
        .get(app.url("/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["checks"], json!({"sqlite": "ok"}), "{ready}");
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("projection_events_total"), "{metrics}");

    // Forget me: 204, then the account is gone.
    let forgotten = app
        .send(Method::DELETE, "/api/v1/users/me", Some(&token), None)
        .await;
    assert_eq!(forgotten.status(), StatusCode::NO_CONTENT);
    let login = app
        .send(
            Method::POST,
            "/api/v1/auth/token",
            None,
            Some(json!({"email": ADMIN, "password": "correct horse battery"})),
        )
        .await;
    assert_eq!(login.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_restart_on_the_same_data_dir_keeps_everything_even_after_a_key_rotation() {
    let app = spawn_embedded(&[]).await;
    let token = app.signed_up("keep@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap().to_owned();
    let posted: Value = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({"content": "first"}),
        )
        .await
        .json()
        .await
        .unwrap();
    completed_reply(&app, &token, &id, posted["reply"]["id"].as_str().unwrap()).await;
    let data = app.stop_embedded();

    // Rotate the encryption key with the service stopped, as docs/operations.md
    // says, then start it again with the new key only.
    const NEW_KEY: &str = "4242424242424242424242424242424242424242424242424242424242424242";
    let rotation = embedded_binary(data.dir.path(), &[("NEW_ENCRYPTION_KEY", NEW_KEY)])
        .arg("rotate-encryption-key")
        .output()
        .expect("the binary runs");
    let said = String::from_utf8_lossy(&rotation.stdout);
    assert!(
        rotation.status.success() && said.contains("rotated 1 user keys"),
        "{said}{}",
        String::from_utf8_lossy(&rotation.stderr)
    );
    let app = spawn_embedded_on(
        data,
        &["--encryption-key", NEW_KEY],
        ai_secretary::startup::Roles::all(),
    )
    .await;
    let token = app
        .signed_in("keep@example.com", "correct horse battery")
        .await;
    let posted: Value = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({"content": "second"}),
        )
        .await
        .json()
        .await
        .unwrap();
    completed_reply(&app, &token, &id, posted["reply"]["id"].as_str().unwrap()).await;
    let messages = app
        .get_ok(&format!("/conversations/{id}/messages"), &token, None)
        .await;
    assert_eq!(messages["data"].as_array().unwrap().len(), 4, "{messages}");
    // The email, sealed under a data key now wrapped by the new key, opens.
    let me = app.get_ok("/users/me", &token, None).await;
    assert_eq!(me["email"], "keep@example.com", "{me}");
}

#[tokio::test]
async fn backup_verify_and_replay_run_beside_the_live_embedded_service() {
    let app = spawn_embedded(&[]).await;
    let token = app.signed_up("ops@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap().to_owned();
    let posted: Value = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({"content": "hello"}),
        )
        .await
        .json()
        .await
        .unwrap();
    completed_reply(&app, &token, &id, posted["reply"]["id"].as_str().unwrap()).await;
    let dir = app.db.dir.path().to_owned();

    // A backup while the service runs: a checked copy with every event.
    let copy = dir.join("copy.sqlite");
    let output = embedded_binary(&dir, &[])
        .args(["backup", &copy.to_string_lossy()])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}{output:?}");
    assert!(printed.contains("integrity ok"), "{printed}");
    assert!(copy.exists());

    // verify and replay as second processes on the same file; the service answers meanwhile.
    let verify = embedded_binary(&dir, &[]).arg("verify").output().unwrap();
    assert!(
        verify.status.success(),
        "{}{verify:?}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let replay = embedded_binary(&dir, &[])
        .args(["replay", "--all"])
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}{replay:?}",
        String::from_utf8_lossy(&replay.stdout)
    );
    let again = app.get_ok("/assistants", &token, None).await;
    assert_eq!(again["data"][0]["message_count"], 2, "{again}");
    let verify = embedded_binary(&dir, &[]).arg("verify").output().unwrap();
    assert!(verify.status.success(), "{verify:?}");
}

/// Kills the child on drop (a test that fails midway leaves no process behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("could not kill the service: {e}");
        }
        let _ = self.0.wait();
    }
}

/// Start the binary embedded on `dir`, answering `/health`.
async fn start_binary(dir: &std::path::Path) -> (Killed, String) {
    let address = format!("127.0.0.1:{}", free_port());
    let child = embedded_binary(
        dir,
        &[
            ("BIND", &address),
            ("RATE_LIMIT_COMMANDS_PER_MINUTE", "0"),
            ("RATE_LIMIT_SIGNUPS_PER_HOUR", "0"),
            ("RATE_LIMIT_LOGINS_PER_MINUTE", "0"),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let child = Killed(child);
    let url = format!("http://{address}");
    crate::process::until_ok(&format!("{url}/health")).await;
    (child, url)
}

#[tokio::test]
async fn kill_9_under_load_loses_nothing_that_was_answered_and_verify_is_clean() {
    let data = Embedded::new();
    let dir = data.dir.path().to_owned();
    let (service, url) = start_binary(&dir).await;
    let client = reqwest::Client::new();
    let api = |path: &str| format!("{url}/api/v1{path}");
    let body = |v: Value| v.to_string();
    let signup = client
        .post(api("/users"))
        .header("content-type", "application/json")
        .body(body(json!({"email": "load@example.com", "password": "correct horse battery", "display_name": "L"})))
        .send()
        .await
        .unwrap();
    assert_eq!(signup.status(), StatusCode::CREATED);
    let token: Value = client
        .post(api("/auth/token"))
        .header("content-type", "application/json")
        .body(body(
            json!({"email": "load@example.com", "password": "correct horse battery"}),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();
    let assistant: Value = client
        .post(api("/assistants"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(body(json!({"name": "Mika"})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conversation: Value = client
        .post(api("/conversations"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(body(json!({"assistant_id": assistant["id"]})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conversation = conversation["id"].as_str().unwrap().to_owned();

    // Eight writers post messages until the process is killed under them.
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for writer in 0..8 {
        let (client, token, answered) = (client.clone(), token.clone(), answered.clone());
        let path = api(&format!("/conversations/{conversation}/messages"));
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                let sent = client
                    .post(&path)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(json!({"content": format!("w{writer} n{n}")}).to_string())
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == StatusCode::ACCEPTED => {
                        let v: Value = r.json().await.unwrap_or_default();
                        if let Some(id) = v["message"]["id"].as_str() {
                            answered.lock().unwrap().push(id.to_owned());
                        }
                    }
                    // Refused, nothing appended: 409 when another writer's post
                    // moved the conversation first and the retries ran out.
                    Ok(r) => assert!(
                        r.status().is_server_error()
                            || r.status() == StatusCode::CONFLICT
                            || r.status() == StatusCode::TOO_MANY_REQUESTS,
                        "unexpected {}",
                        r.status()
                    ),
                    Err(_) => return, // the process is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut service = service;
    // SIGKILL: no shutdown, no flush.
    service.0.kill().unwrap();
    let _ = service.0.wait();
    for writer in writers {
        writer.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() >= 20, "too little load: {}", answered.len());

    // Restarted: every answered message is there once, each gets one reply, verify is clean.
    let (_service, url) = start_binary(&dir).await;
    let messages = eventually("every reply is answered after the restart", async || {
        let list: Value = client
            .get(format!(
                "{url}/api/v1/conversations/{conversation}/messages?limit=100"
            ))
            .bearer_auth(&token)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let mut all = list["data"].as_array().cloned().unwrap_or_default();
        let mut after = list["last_id"].clone();
        let mut more = list["has_more"] == true;
        while more {
            let page: Value = client
                .get(format!(
                    "{url}/api/v1/conversations/{conversation}/messages?limit=100&after={}",
                    after.as_str().unwrap()
                ))
                .bearer_auth(&token)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            all.extend(page["data"].as_array().cloned().unwrap_or_default());
            after = page["last_id"].clone();
            more = page["has_more"] == true;
        }
        let pending = all
            .iter()
            .filter(|m| m["role"] == "assistant" && m["status"] != "completed")
            .count();
        // Read without a consistency token: the messages projection may still
        // be catching up after the restart, listing a prefix of the log whose
        // replies have all completed. Wait for every answered message too.
        let unlisted = answered
            .iter()
            .filter(|id| !all.iter().any(|m| m["id"] == id.as_str()))
            .count();
        if pending == 0 && unlisted == 0 {
            Ok(all)
        } else {
            Err(format!(
                "{pending} replies not completed, {unlisted} answered messages not listed"
            ))
        }
    })
    .await;
    let users: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["id"].as_str())
        .collect();
    let replies = messages.iter().filter(|m| m["role"] == "assistant").count();
    for id in &answered {
        assert_eq!(
            users.iter().filter(|u| *u == id).count(),
            1,
            "answered message {id} is there exactly once"
        );
    }
    assert_eq!(replies, users.len(), "one reply per message");
    let verify = embedded_binary(&dir, &[]).arg("verify").output().unwrap();
    assert!(
        verify.status.success(),
        "{}{verify:?}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
