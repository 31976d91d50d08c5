//! AI replies: the replier answers each message exactly once, with the offline
//! provider (the default) and with Gemini's real wire format, served here by a
//! fake Gemini on loopback that can answer, rate-limit, refuse, fail or stall.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode as AxumStatus},
    response::{IntoResponse, Response as AxumResponse},
    routing::post,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::helpers::{
    TestApp, eventually, eventually_every, spawn_app, spawn_app_on, spawn_app_with,
};
use crate::stream::{streamed_text, subscribe, until_completed};
use ai_secretary::startup::Roles;

const API_KEY: &str = "fake-key-0123456789";

/// How the fake Gemini answers its `n`-th request (from 0).
#[derive(Clone, Copy, Debug)]
enum Script {
    Answer,
    /// 429 with `Retry-After: 1` once, then answers.
    RateLimitedOnce,
    /// 400 INVALID_ARGUMENT, as Google answers a bad key.
    InvalidKey,
    /// 503 UNAVAILABLE, every time.
    Unavailable,
    /// 200 with a candidate that has no text.
    EmptyCandidate,
    /// Answers after this long, every time.
    Slow(Duration),
    /// The first request stalls this long, the others answer at once.
    SlowFirst(Duration),
}

/// One request the fake received.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    model: String,
    streaming: bool,
    api_key: Option<String>,
    body: Value,
}

#[derive(Clone)]
struct Fake {
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A fake `generativelanguage.googleapis.com` on a free loopback port.
struct FakeGemini {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeGemini {
    async fn start(script: Script) -> FakeGemini {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1beta/models/{call}", post(generate))
            .with_state(Fake {
                script,
                seen: seen.clone(),
            });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeGemini {
            url,
            seen,
            _server: server,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The options that point the service at this fake.
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--llm-provider",
            "gemini",
            "--gemini-api-key",
            API_KEY,
            "--gemini-base-url",
            &self.url,
            "--llm-backoff-ms",
            "50",
        ];
        args.extend_from_slice(extra);
        args
    }
}

impl Drop for FakeGemini {
    fn drop(&mut self) {
        self._server.abort();
    }
}

async fn generate(
    State(fake): State<Fake>,
    Path(call): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> AxumResponse {
    // `:generateContent` answers in one JSON body; `:streamGenerateContent?alt=sse`
    // in server-sent events, each a partial response.
    let (model, streaming) = match call.split_once(':') {
        Some((model, "generateContent")) => (model, false),
        Some((model, "streamGenerateContent")) => (model, true),
        _ => return (AxumStatus::NOT_FOUND, "unknown method").into_response(),
    };
    let n = {
        let mut seen = fake.seen.lock().unwrap();
        seen.push(Seen {
            at: Instant::now(),
            model: model.to_owned(),
            streaming,
            api_key: headers
                .get("x-goog-api-key")
                .and_then(|v| v.to_str().ok())
                .map(Into::into),
            body: body.clone(),
        });
        seen.len() - 1
    };
    let error = |code: u16, status: &str, message: &str| {
        (
            AxumStatus::from_u16(code).unwrap(),
            Json(json!({ "error": { "code": code, "message": message, "status": status } })),
        )
            .into_response()
    };
    match fake.script {
        Script::Answer => {}
        Script::RateLimitedOnce if n == 0 => {
            let mut response = error(
                429,
                "RESOURCE_EXHAUSTED",
                "Resource has been exhausted (e.g. check quota).",
            );
            response
                .headers_mut()
                .insert("retry-after", "1".parse().unwrap());
            return response;
        }
        Script::RateLimitedOnce => {}
        Script::InvalidKey => {
            return error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
            );
        }
        Script::Unavailable => {
            return error(
                503,
                "UNAVAILABLE",
                "The model is overloaded. Please try again later.",
            );
        }
        Script::EmptyCandidate => {
            return answer(
                streaming,
                vec![json!({
                    "candidates": [{ "content": { "role": "model", "parts": [] }, "finishReason": "STOP", "index": 0 }],
                    "usageMetadata": { "promptTokenCount": 9, "totalTokenCount": 9 },
                    "modelVersion": model,
                })],
            );
        }
        Script::Slow(wait) => tokio::time::sleep(wait).await,
        Script::SlowFirst(wait) if n == 0 => tokio::time::sleep(wait).await,
        Script::SlowFirst(_) => {}
    }
    // The answer echoes the last user turn, so a test can tell which prompt it got.
    let asked = body["contents"]
        .as_array()
        .and_then(|c| c.last())
        .and_then(|t| t["parts"][0]["text"].as_str())
        .unwrap_or_default()
        .to_owned();
    let usage = json!({ "promptTokenCount": 21, "candidatesTokenCount": 7, "totalTokenCount": 28 });
    let version = format!("{model}-001");
    if streaming {
        // As Gemini streams: text in pieces, the finish reason and usage at the end.
        return answer(
            true,
            vec![
                json!({ "candidates": [{ "content": { "role": "model", "parts": [{ "text": "Certainly. " }] }, "index": 0 }],
                        "usageMetadata": { "promptTokenCount": 21, "totalTokenCount": 21 }, "modelVersion": version }),
                json!({ "candidates": [{ "content": { "role": "model", "parts": [{ "text": "Done: " }] }, "index": 0 }],
                        "modelVersion": version }),
                json!({ "candidates": [{ "content": { "role": "model", "parts": [{ "text": asked }] }, "finishReason": "STOP", "index": 0 }],
                        "usageMetadata": usage, "modelVersion": version }),
            ],
        );
    }
    answer(
        false,
        vec![json!({
            "candidates": [{
                "content": { "role": "model", "parts": [{ "text": "Certainly. " }, { "text": format!("Done: {asked}") }] },
                "finishReason": "STOP",
                "index": 0,
                "safetyRatings": []
            }],
            "usageMetadata": usage,
            "modelVersion": version,
        })],
    )
}

/// One JSON body, or server-sent events of each part (`\r\n\r\n`-separated, as Google sends them).
fn answer(streaming: bool, parts: Vec<Value>) -> AxumResponse {
    if !streaming {
        return Json(parts.into_iter().next().unwrap()).into_response();
    }
    let body: String = parts.iter().map(|p| format!("data: {p}\r\n\r\n")).collect();
    ([("content-type", "text/event-stream")], body).into_response()
}

/// A user with an assistant and a conversation, who posts `content`; returns the
/// token, the conversation id and the reply id.
async fn ask(app: &TestApp, email: &str, content: &str) -> (String, String, String) {
    let token = app.signed_up(email).await;
    let response = app
        .post(
            "/assistants",
            &token,
            json!({ "name": "Mika", "role": "travel secretary", "instructions": "Be brief.",
                    "temperature": 0.3, "metadata": { "top_p": "0.8", "max_output_tokens": "256" } }),
        )
        .await;
    let assistant: Value = response.json().await.unwrap();
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap().to_owned();
    let posted: Value = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": content }),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(posted["reply"]["status"], "queued");
    let reply = posted["reply"]["id"].as_str().unwrap().to_owned();
    (token, id, reply)
}

/// The reply as `GET /conversations/{id}/messages` lists it, once it has ended.
async fn ended_reply(app: &TestApp, token: &str, conversation: &str, reply: &str) -> Value {
    eventually_every(Duration::from_millis(20), "the reply ends", async || {
        let messages: Value = app
            .client
            .get(app.url(&format!("/api/v1/conversations/{conversation}/messages")))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let found = messages["data"]
            .as_array()
            .and_then(|d| d.iter().find(|m| m["id"] == reply))
            .cloned()
            .ok_or_else(|| messages.to_string())?;
        match found["status"].as_str() {
            Some("completed" | "failed") => Ok(found),
            _ => Err(found.to_string()),
        }
    })
    .await
}

/// The payload of each event of `event_type` for `reply`, from the store.
async fn reply_events(app: &TestApp, event_type: &str, reply: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT data FROM events WHERE event_type = $1 AND data->>'reply_id' = $2
         ORDER BY global_position",
    )
    .bind(event_type)
    .bind(reply)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn with_the_defaults_a_message_is_answered_offline_with_usage() {
    let app = spawn_app().await;
    let started = Instant::now();
    let (token, conversation, reply) = ask(
        &app,
        "offline@example.com",
        "Please book a meeting room for 2026-12-03 at 15:00.",
    )
    .await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    let took = started.elapsed();
    eprintln!("offline reply listed as completed {took:?} after the post");
    assert_eq!(answered["status"], "completed");
    assert_eq!(answered["role"], "assistant");
    let content = answered["content"].as_str().unwrap();
    assert!(
        content.starts_with("This is Mika, your travel secretary."),
        "{content}"
    );
    assert!(
        content.contains("Dates and times noted: 2026-12-03, 15:00."),
        "{content}"
    );
    assert_eq!(answered["model"], "gemini-2.5-flash+offline");
    let usage = &answered["usage"];
    assert!(usage["prompt_tokens"].as_i64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"].as_i64().unwrap(),
        usage["prompt_tokens"].as_i64().unwrap() + usage["completion_tokens"].as_i64().unwrap()
    );
    assert_eq!(reply_events(&app, "ReplyCompleted", &reply).await.len(), 1);

    // The tokens reach usage_daily.
    let stats = eventually("usage_daily has the reply's tokens", async || {
        let stats: Value = app
            .client
            .get(app.url("/api/v1/stats/usage?group_by=model"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (stats["total"]["total_tokens"] == usage["total_tokens"])
            .then(|| stats.clone())
            .ok_or(stats.to_string())
    })
    .await;
    assert_eq!(stats["data"][0]["model"], "gemini-2.5-flash+offline");
    assert_eq!(stats["total"]["prompt_tokens"], usage["prompt_tokens"]);

    // The same question to another, identical secretary gets the same answer.
    let (token2, conversation2, reply2) = ask(
        &app,
        "offline-twin@example.com",
        "Please book a meeting room for 2026-12-03 at 15:00.",
    )
    .await;
    let twin = ended_reply(&app, &token2, &conversation2, &reply2).await;
    assert_eq!(twin["content"], answered["content"]);
    assert_eq!(twin["usage"], answered["usage"]);
}

#[tokio::test]
async fn gemini_gets_the_real_request_and_its_answer_is_recorded() {
    let gemini = FakeGemini::start(Script::Answer).await;
    let app = spawn_app_with(&gemini.args(&[])).await;
    let (token, conversation, reply) = ask(
        &app,
        "gemini@example.com",
        "Find me a flight to Osaka on Friday",
    )
    .await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(answered["status"], "completed");
    assert_eq!(
        answered["content"],
        "Certainly. Done: Find me a flight to Osaka on Friday"
    );
    assert_eq!(answered["model"], "gemini-2.5-flash-001");
    assert_eq!(
        answered["usage"],
        json!({ "prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28 })
    );

    let seen = gemini.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.model, "gemini-2.5-flash");
    assert!(request.streaming);
    assert_eq!(request.api_key.as_deref(), Some(API_KEY));
    assert_eq!(
        request.body["systemInstruction"]["parts"][0]["text"],
        "You are Mika, a travel secretary.\nBe brief."
    );
    assert_eq!(
        request.body["contents"],
        json!([{ "role": "user", "parts": [{ "text": "Find me a flight to Osaka on Friday" }] }])
    );
    assert_eq!(
        request.body["generationConfig"],
        json!({ "temperature": 0.3, "topP": 0.8, "maxOutputTokens": 256 })
    );
    let completed = reply_events(&app, "ReplyCompleted", &reply).await;
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0]["finish_reason"], "STOP");
    assert!(completed[0]["latency_ms"].as_u64().is_some());

    // A second message carries the first exchange as history.
    let second: Value = app
        .post(
            &format!("/conversations/{conversation}/messages"),
            &token,
            json!({ "content": "Make it the morning one" }),
        )
        .await
        .json()
        .await
        .unwrap();
    let reply2 = second["reply"]["id"].as_str().unwrap();
    ended_reply(&app, &token, &conversation, reply2).await;
    let seen = gemini.seen();
    assert_eq!(
        seen[1].body["contents"],
        json!([
            { "role": "user", "parts": [{ "text": "Find me a flight to Osaka on Friday" }] },
            { "role": "model", "parts": [{ "text": "Certainly. Done: Find me a flight to Osaka on Friday" }] },
            { "role": "user", "parts": [{ "text": "Make it the morning one" }] },
        ])
    );

    // The key is in no event.
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE data::text LIKE $1 OR metadata::text LIKE $1",
    )
    .bind(format!("%{API_KEY}%"))
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
}

#[tokio::test]
async fn gemini_streams_the_reply_text_to_sse_before_the_completion() {
    let gemini = FakeGemini::start(Script::Answer).await;
    let app = spawn_app_with(&gemini.args(&[])).await;
    let token = app.signed_up("streaming@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let id = conversation["id"].as_str().unwrap();
    let mut live = subscribe(&app, &token, id, None).await;
    let posted: Value = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "Reserve the 8:15 train" }),
        )
        .await
        .json()
        .await
        .unwrap();
    let (updates, completed) = until_completed(&mut live).await;
    assert_eq!(
        completed.data["content"],
        "Certainly. Done: Reserve the 8:15 train"
    );
    assert_eq!(
        streamed_text(&updates, &posted["reply"]["id"]),
        "Certainly. Done: Reserve the 8:15 train"
    );
    let pieces = updates
        .iter()
        .filter(|u| u.event == "message.delta")
        .count();
    assert_eq!(pieces, 3, "one delta per streamed chunk");
    assert_eq!(completed.data["usage"]["total_tokens"], 28);
}

#[tokio::test]
async fn a_rate_limit_is_waited_out_as_retry_after_asks() {
    let gemini = FakeGemini::start(Script::RateLimitedOnce).await;
    // Unary generateContent here; the other tests stream.
    let app = spawn_app_with(&gemini.args(&["--llm-stream", "false"])).await;
    let (token, conversation, reply) = ask(&app, "limited@example.com", "Summarise my week").await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(answered["status"], "completed");
    let seen = gemini.seen();
    assert_eq!(seen.len(), 2);
    assert!(!seen[0].streaming);
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}"
    );
    assert_eq!(reply_events(&app, "ReplyFailed", &reply).await.len(), 0);
}

#[tokio::test]
async fn an_invalid_key_fails_at_once_without_retrying() {
    let gemini = FakeGemini::start(Script::InvalidKey).await;
    let app = spawn_app_with(&gemini.args(&["--llm-stream", "false"])).await;
    let (token, conversation, reply) = ask(&app, "badkey@example.com", "Hello").await;
    let failed = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(failed["status"], "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("API key not valid"), "{error}");
    assert!(!error.contains(API_KEY));
    let events = reply_events(&app, "ReplyFailed", &reply).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["retryable"], false);
    assert_eq!(events[0]["attempts"], 1);
    assert_eq!(gemini.seen().len(), 1);
}

#[tokio::test]
async fn an_unavailable_model_is_retried_until_the_deadline() {
    let gemini = FakeGemini::start(Script::Unavailable).await;
    let app = spawn_app_with(&gemini.args(&[
        "--llm-deadline-seconds",
        "1.5",
        "--llm-max-attempts",
        "50",
    ]))
    .await;
    let (token, conversation, reply) = ask(&app, "overloaded@example.com", "Hello").await;
    let failed = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(failed["status"], "failed");
    let events = reply_events(&app, "ReplyFailed", &reply).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["retryable"], true);
    let attempts = events[0]["attempts"].as_u64().unwrap();
    let seen = gemini.seen();
    assert_eq!(attempts, seen.len() as u64);
    assert!(attempts >= 3, "only {attempts} attempts");
    assert!(attempts < 50, "the deadline did not bound the attempts");
    let span = seen.last().unwrap().at - seen[0].at;
    assert!(
        span < Duration::from_millis(1500),
        "attempts spread over {span:?}"
    );
    assert!(
        events[0]["error"]
            .as_str()
            .unwrap()
            .contains("503 UNAVAILABLE")
    );
}

#[tokio::test]
async fn an_answer_without_text_is_a_failure_with_its_reason() {
    let gemini = FakeGemini::start(Script::EmptyCandidate).await;
    let app = spawn_app_with(&gemini.args(&[])).await;
    let (token, conversation, reply) = ask(&app, "empty@example.com", "Hello").await;
    let failed = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"].as_str().unwrap().contains("no text"),
        "{failed}"
    );
    let events = reply_events(&app, "ReplyFailed", &reply).await;
    assert_eq!(
        (
            events[0]["retryable"].clone(),
            events[0]["attempts"].clone()
        ),
        (json!(false), json!(1))
    );
}

#[tokio::test]
async fn a_slow_answer_past_the_timeout_fails_as_a_timeout() {
    let gemini = FakeGemini::start(Script::Slow(Duration::from_secs(3))).await;
    let app = spawn_app_with(&gemini.args(&[
        "--llm-request-timeout-seconds",
        "0.3",
        "--llm-max-attempts",
        "2",
    ]))
    .await;
    let (token, conversation, reply) = ask(&app, "slow@example.com", "Hello").await;
    let failed = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(failed["status"], "failed");
    let events = reply_events(&app, "ReplyFailed", &reply).await;
    assert_eq!(events[0]["attempts"], 2);
    assert_eq!(events[0]["retryable"], true);
    assert!(
        events[0]["error"].as_str().unwrap().starts_with("timeout"),
        "{}",
        events[0]
    );
    assert_eq!(gemini.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replier_crash_mid_reply_ends_in_exactly_one_reply() {
    // The first request stalls: the instance dies while waiting for the model.
    let gemini = FakeGemini::start(Script::SlowFirst(Duration::from_secs(30))).await;
    let args = gemini.args(&["--replier-ack-wait-seconds", "1"]);
    let app = spawn_app_with(&args).await;
    let (token, conversation, reply) = ask(&app, "crash@example.com", "Plan my trip").await;
    eventually("the model is asked", async || {
        (!gemini.seen().is_empty())
            .then_some(())
            .ok_or("not yet".to_owned())
    })
    .await;
    let (db, names) = app.crash();

    // A new instance gets the request again from JetStream and answers it once.
    let app = spawn_app_on(db, names, &args, Roles::all()).await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(answered["status"], "completed");
    assert_eq!(answered["content"], "Certainly. Done: Plan my trip");
    assert!(gemini.seen().len() >= 2);
    assert_eq!(reply_events(&app, "ReplyCompleted", &reply).await.len(), 1);
    assert_eq!(reply_events(&app, "ReplyFailed", &reply).await.len(), 0);
    let starts = reply_events(&app, "ReplyStarted", &reply).await;
    assert!(starts.len() >= 2, "{starts:?}");
    assert_eq!(starts[0]["attempt"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_delivered_again_adds_no_second_reply() {
    let app = spawn_app().await;
    let (token, conversation, reply) = ask(&app, "again@example.com", "First").await;
    ended_reply(&app, &token, &conversation, &reply).await;
    for text in ["Second", "Third"] {
        let posted: Value = app
            .post(
                &format!("/conversations/{conversation}/messages"),
                &token,
                json!({ "content": text }),
            )
            .await
            .json()
            .await
            .unwrap();
        ended_reply(
            &app,
            &token,
            &conversation,
            posted["reply"]["id"].as_str().unwrap(),
        )
        .await;
    }
    let before = app.event_count().await;

    // Drop the replier's consumer: it is re-created from the start of the stream,
    // and every ReplyRequested is delivered again.
    let nats = async_nats::connect(&app.names.nats_url).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let stream = jetstream.get_stream(&app.names.stream).await.unwrap();
    stream.delete_consumer("replier").await.unwrap();
    eventually(
        "the replier's new consumer has gone through the stream",
        async || {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer("replier")
                .await
                .map_err(|e| e.to_string())?;
            let info = consumer.info().await.map_err(|e| e.to_string())?;
            (info.num_pending == 0
                && info.num_ack_pending == 0
                && info.delivered.stream_sequence > 0)
                .then_some(())
                .ok_or(format!("{info:?}"))
        },
    )
    .await;
    assert_eq!(app.event_count().await, before);
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ReplyCompleted'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(completed, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_repliers_share_the_work_and_each_message_gets_one_reply() {
    let app = spawn_app().await;
    // A second process with only the replier, on the same store and bus; JetStream
    // hands each request to one of the two pullers of the shared consumer.
    let second = spawn_app_on(
        app.db.borrowed(),
        app.names.borrowed(),
        &[],
        Roles::only_replier(),
    )
    .await;
    let token = app.signed_up("busy@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let mut replies = Vec::new();
    for c in 0..4 {
        let conversation = app.conversation(&token, &assistant["id"]).await;
        let id = conversation["id"].as_str().unwrap().to_owned();
        let path = format!("/conversations/{id}/messages");
        let posts =
            (0..5).map(|m| app.post(&path, &token, json!({ "content": format!("Task {c}.{m}") })));
        for posted in futures::future::join_all(posts).await {
            let posted: Value = posted.json().await.unwrap();
            replies.push((
                id.clone(),
                posted["reply"]["id"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for (conversation, reply) in &replies {
        let ended = ended_reply(&app, &token, conversation, reply).await;
        assert_eq!(ended["status"], "completed");
    }
    let (endings, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT data->>'reply_id') FROM events
         WHERE event_type IN ('ReplyCompleted', 'ReplyFailed')",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((endings, distinct), (20, 20));
    drop(second);
}
