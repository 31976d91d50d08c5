//! Live updates over SSE, and the replier's answer flowing to every read model.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, problem, spawn_app};

/// One server-sent event.
#[derive(Debug)]
pub struct Sse {
    pub id: String,
    pub event: String,
    pub data: Value,
}

/// Every event up to a `message.completed`, and that one.
pub async fn until_completed(events: &mut tokio::sync::mpsc::Receiver<Sse>) -> (Vec<Sse>, Sse) {
    until_event(events, "message.completed").await
}

/// Every event up to the first of type `name`, and that one.
pub async fn until_event(
    events: &mut tokio::sync::mpsc::Receiver<Sse>,
    name: &str,
) -> (Vec<Sse>, Sse) {
    let mut before = Vec::new();
    loop {
        let event = next(events).await;
        if event.event == name {
            return (before, event);
        }
        before.push(event);
    }
}

/// The text of `reply` as its `message.delta` events carried it (the last attempt's).
pub fn streamed_text(updates: &[Sse], reply: &Value) -> String {
    let deltas: Vec<&Sse> = updates
        .iter()
        .filter(|u| u.event == "message.delta" && &u.data["id"] == reply)
        .collect();
    assert!(!deltas.is_empty(), "no message.delta in {updates:?}");
    let last_attempt = deltas
        .iter()
        .map(|d| d.data["attempt"].as_u64())
        .max()
        .flatten();
    let mut text = String::new();
    for (i, d) in deltas
        .iter()
        .filter(|d| d.data["attempt"].as_u64() == last_attempt)
        .enumerate()
    {
        assert_eq!(d.data["index"], i as u64, "deltas in order");
        assert_eq!(d.id, "", "a delta carries no SSE id");
        text.push_str(d.data["delta"].as_str().unwrap());
    }
    text
}

/// Open the conversation's stream and return a receiver of its events.
pub async fn subscribe(
    app: &TestApp,
    token: &str,
    conversation: &str,
    last_event_id: Option<&str>,
) -> tokio::sync::mpsc::Receiver<Sse> {
    let mut request = app
        .client
        .get(app.url(&format!("/api/v1/conversations/{conversation}/stream")))
        .bearer_auth(token);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        // Bytes until a whole event is in: a chunk may end inside a character.
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = buffer.drain(..end + 2).collect();
                let block = String::from_utf8(raw).expect("events are UTF-8");
                let mut sse = Sse {
                    id: String::new(),
                    event: String::new(),
                    data: Value::Null,
                };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        sse.id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        sse.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        sse.data = serde_json::from_str(v.trim()).unwrap_or(Value::Null);
                    }
                }
                // Keep-alive comments carry no event.
                if !sse.event.is_empty() && sender.send(sse).await.is_err() {
                    return;
                }
            }
        }
    });
    receiver
}

/// An SSE id as the commit position it names.
pub fn position(id: &str) -> (i64, i64) {
    let (tx, gp) = id
        .split_once('.')
        .expect("an id is <transaction>.<position>");
    (tx.parse().unwrap(), gp.parse().unwrap())
}

pub async fn next(events: &mut tokio::sync::mpsc::Receiver<Sse>) -> Sse {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event within 10 s")
        .expect("the stream stays open")
}

#[tokio::test]
async fn sse_delivers_what_happens_after_subscribing_and_resumes() {
    let app = spawn_app().await;
    let token = app.signed_up("live@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap().to_owned();

    let mut live = subscribe(&app, &token, &id, None).await;
    let posted: Value = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "Dinner for two at 7pm" }),
        )
        .await
        .json()
        .await
        .unwrap();
    let user_message = next(&mut live).await;
    assert_eq!(user_message.event, "message.created");
    assert_eq!(user_message.data["id"], posted["message"]["id"]);
    assert_eq!(user_message.data["content"], "Dinner for two at 7pm");
    let reply = next(&mut live).await;
    assert_eq!(reply.event, "message.created");
    assert_eq!(reply.data["status"], "queued");

    // The replier (offline provider) takes the reply up and streams its text,
    // then the completion arrives.
    let (updates, completed) = until_completed(&mut live).await;
    assert_eq!(completed.data["id"], posted["reply"]["id"]);
    let content = completed.data["content"].as_str().unwrap().to_owned();
    assert!(content.contains("Dinner for two at 7pm"), "{content}");
    let started: Vec<&Sse> = updates
        .iter()
        .filter(|u| u.event == "message.updated")
        .collect();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].data["status"], json!("in_progress"));
    // Ids are commit positions (`<transaction>.<position>`), increasing: the
    // reply's events (a stream of their own) are in one sequence with the
    // conversation's.
    let ids = [&user_message, &reply, started[0], &completed].map(|e| position(&e.id));
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(streamed_text(&updates, &posted["reply"]["id"]), content);
    let usage = completed.data["usage"].clone();
    let total = usage["total_tokens"].as_i64().unwrap();
    assert!(total > 0);

    // Reconnecting after the user's message replays the reply's three events
    // from the store; so does an id from before positions (the message's
    // version in the conversation, 2).
    let missed = [&reply, started[0], &completed].map(|e| e.id.clone());
    for last_event_id in [user_message.id.as_str(), "2"] {
        let mut resumed = subscribe(&app, &token, &id, Some(last_event_id)).await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(next(&mut resumed).await.id);
        }
        assert_eq!(ids, missed, "resuming after {last_event_id}");
    }

    // The completion reaches the messages, the conversation and usage.
    let get = async |path: String| -> Value {
        app.client
            .get(app.url(&format!("/api/v1{path}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    let messages = eventually("the reply is listed as completed", async || {
        let messages = get(format!("/conversations/{id}/messages")).await;
        (messages["data"][1]["status"] == "completed")
            .then(|| messages.clone())
            .ok_or(messages.to_string())
    })
    .await;
    assert_eq!(messages["data"][1]["content"], content.as_str());
    assert_eq!(messages["data"][1]["usage"], usage);
    let conversation = eventually("the conversation counts the tokens", async || {
        let c = get(format!("/conversations/{id}")).await;
        (c["usage"]["total_tokens"] == total)
            .then(|| c.clone())
            .ok_or(c.to_string())
    })
    .await;
    assert_eq!(conversation["usage"], usage);
    let usage_stats = eventually("usage_daily counts the tokens", async || {
        let u = get("/stats/usage?group_by=assistant".into()).await;
        (u["total"]["total_tokens"] == total)
            .then(|| u.clone())
            .ok_or(u.to_string())
    })
    .await;
    assert_eq!(usage_stats["data"][0]["assistant_id"], assistant["id"]);
    assert_eq!(usage_stats["data"][0]["messages"], 1);
    assert_eq!(
        usage_stats["total"]["prompt_tokens"],
        usage["prompt_tokens"]
    );
}

#[tokio::test]
async fn another_users_stream_is_404() {
    let app = spawn_app().await;
    let alice = app.signed_up("alice@example.com").await;
    let mallory = app.signed_up("mallory@example.com").await;
    let assistant = app.assistant(&alice, "Mika").await;
    let conversation = app.conversation(&alice, &assistant["id"]).await;
    let response = app
        .client
        .get(app.url(&format!(
            "/api/v1/conversations/{}/stream",
            conversation["id"].as_str().unwrap()
        )))
        .bearer_auth(&mallory)
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND).await;
}
