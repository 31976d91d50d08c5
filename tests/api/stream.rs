//! Live updates over SSE, and a reply's completion flowing to every read model.

use std::time::Duration;

use ai_secretary::{
    domain::conversation::{ConversationEvent, Usage},
    store::{
        AppendRequest, EventMetadata, EventStore, PgEventStore, codec, postgres::CoalescingConfig,
    },
};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, problem, spawn_app};

/// One server-sent event.
#[derive(Debug)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

/// Open the conversation's stream and return a receiver of its events.
async fn subscribe(
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
        let mut buffer = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
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

async fn next(events: &mut tokio::sync::mpsc::Receiver<Sse>) -> Sse {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event within 10 s")
        .expect("the stream stays open")
}

/// Append a reply's completion as the replier will (through the same store).
async fn complete_reply(app: &TestApp, conversation: Uuid, reply: Uuid) -> String {
    let store = PgEventStore::new(app.db.pool.clone(), CoalescingConfig::default());
    let version = store.read_stream(conversation).await.unwrap().len() as i64;
    let event = ConversationEvent::ReplyCompleted {
        reply_id: reply,
        content: "Booked: table for two at 7pm.".into(),
        model: "gemini-2.5-flash".into(),
        finish_reason: "STOP".into(),
        usage: Usage {
            prompt_tokens: 12,
            completion_tokens: 8,
            total_tokens: 20,
        },
        latency_ms: 42,
        completed_at: chrono::Utc::now(),
    };
    let appended = store
        .append(AppendRequest {
            stream_id: conversation,
            stream_type: "conversation",
            expected_version: version,
            events: vec![codec::encode(&event, &EventMetadata::default()).unwrap()],
            reservation: None,
            idempotency: None,
        })
        .await
        .unwrap();
    appended.position.to_string()
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
    assert_eq!(user_message.id, "2");
    assert_eq!(user_message.data["id"], posted["message"]["id"]);
    assert_eq!(user_message.data["content"], "Dinner for two at 7pm");
    let reply = next(&mut live).await;
    assert_eq!(
        (reply.event.as_str(), reply.id.as_str()),
        ("message.created", "3")
    );
    assert_eq!(reply.data["status"], "queued");

    let reply_id: Uuid = posted["reply"]["id"].as_str().unwrap().parse().unwrap();
    let at = complete_reply(&app, id.parse().unwrap(), reply_id).await;
    let completed = next(&mut live).await;
    assert_eq!(completed.event, "message.completed");
    assert_eq!(completed.data["usage"]["total_tokens"], 20);

    // Reconnecting after event 2 replays 3 and 4 from the store.
    let mut resumed = subscribe(&app, &token, &id, Some("2")).await;
    let ids = [next(&mut resumed).await.id, next(&mut resumed).await.id];
    assert_eq!(ids, ["3", "4"]);

    // The completion reached the messages, the conversation and usage.
    let get = |path: String| {
        app.client
            .get(app.url(&format!("/api/v1{path}")))
            .bearer_auth(&token)
            .header("x-consistency-token", &at)
            .send()
    };
    let messages: Value = get(format!("/conversations/{id}/messages"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(messages["data"][1]["status"], "completed");
    assert_eq!(
        messages["data"][1]["content"],
        "Booked: table for two at 7pm."
    );
    assert_eq!(messages["data"][1]["usage"]["total_tokens"], 20);
    let conversation: Value = get(format!("/conversations/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conversation["usage"]["total_tokens"], 20);
    let usage: Value = get("/stats/usage?group_by=assistant".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["data"][0]["assistant_id"], assistant["id"]);
    assert_eq!(usage["data"][0]["messages"], 1);
    assert_eq!(usage["total"]["prompt_tokens"], 12);
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
