//! AI replies: the replier answers each message exactly once, with the offline
//! provider (the default) and with Gemini's real wire format, served here by a
//! fake Gemini on loopback that answers as Google does: in pieces, thinking,
//! rate-limited with `RetryInfo` in the body, blocked, withheld, cut short, with
//! an error inside the stream, slow, or silent. Its bodies follow the forms of
//! the API reference (ai.google.dev/api/generate-content) and of real answers
//! reported against Google's SDKs.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode as AxumStatus},
    response::{IntoResponse, Response as AxumResponse},
    routing::post,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::helpers::{
    EventLog, TestApp, Topology, eventually, eventually_every, spawn_app, spawn_app_on,
};
use crate::stream::{Events, Sse, streamed_text, subscribe, until_completed, until_event};
use ai_secretary::{replier::CONSUMER, startup::Roles};
use async_nats::jetstream::consumer::{Info as ConsumerInfo, PullConsumer};

const API_KEY: &str = "fake-key-0123456789";

/// How the fake Gemini answers its `n`-th request (from 0).
#[derive(Clone, Copy, Debug)]
enum Script {
    Answer,
    /// The answer after thinking: thought parts (as with `includeThoughts`),
    /// then the text; usage with `thoughtsTokenCount` and `cachedContentTokenCount`.
    Thinking,
    /// 429 RESOURCE_EXHAUSTED for a per-minute quota, with this `retryDelay` in
    /// its `RetryInfo` and no `Retry-After` header, once; then answers.
    RateLimitedOnce(&'static str),
    /// 429 for a spent per-day quota (with a per-minute one and a short
    /// `retryDelay` beside it), every time.
    DailyQuota,
    /// 400 INVALID_ARGUMENT, as Google answers a bad key.
    InvalidKey,
    /// 503 UNAVAILABLE, every time.
    Unavailable,
    /// 200 with a candidate that finished (STOP) without text.
    EmptyCandidate,
    /// `promptFeedback.blockReason` and no candidates.
    PromptBlocked,
    /// A SAFETY candidate without content.
    Withheld,
    /// Text streams, then the candidate ends with SAFETY.
    WithheldMidway,
    /// MAX_TOKENS with no `parts`: the allowance went on thinking.
    ThoughtOut,
    /// Once: some text, then `{"error": …}` 503 inside the stream; then answers.
    ErrorEventOnce,
    /// Once: some text and the stream ends without a finish reason; then answers.
    CutShortOnce,
    /// Answers after this long, every time.
    Slow(Duration),
    /// The first request stalls this long, the others answer at once.
    SlowFirst(Duration),
    /// Streams its pieces this far apart.
    Trickle(Duration),
    /// Streams its first piece, then is silent this long before the rest.
    StallAfterFirst(Duration),
}

/// One request the fake received.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    /// The resource asked for: `models/gemini-2.5-flash`, `tunedModels/x`.
    model: String,
    streaming: bool,
    /// `alt=sse` was asked (without it Google streams one JSON array).
    sse: bool,
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
            .route("/v1beta/{*call}", post(generate))
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

/// Google's error envelope (`google.rpc.Status` as JSON).
fn google_error(code: u16, status: &str, message: &str, details: Value) -> Value {
    let mut error = json!({ "code": code, "message": message, "status": status });
    if details != Value::Null {
        error["details"] = details;
    }
    json!({ "error": error })
}

/// A 429's details as Google lists them: which quotas, where to read, how long to wait.
fn quota_details(quota_ids: &[&str], retry_delay: &str) -> Value {
    let violations: Vec<Value> = quota_ids
        .iter()
        .map(|id| {
            json!({
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": id,
                "quotaDimensions": { "location": "global", "model": "gemini-2.5-flash" },
                "quotaValue": "10",
            })
        })
        .collect();
    json!([
        { "@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": violations },
        { "@type": "type.googleapis.com/google.rpc.Help", "links": [{
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits" }] },
        { "@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay },
    ])
}

const QUOTA_MESSAGE: &str = "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.";

/// One streamed `GenerateContentResponse` with these parts.
fn chunk(parts: Value, finish: Option<&str>, usage: Value, version: &str) -> Value {
    let mut candidate = json!({ "content": { "parts": parts, "role": "model" }, "index": 0 });
    if let Some(reason) = finish {
        candidate["finishReason"] = json!(reason);
    }
    let mut response = json!({ "candidates": [candidate], "modelVersion": version, "responseId": "fake-response-1" });
    if usage != Value::Null {
        response["usageMetadata"] = usage;
    }
    response
}

fn usage(prompt: u64, candidates: Option<u64>, thoughts: Option<u64>) -> Value {
    let total = prompt + candidates.unwrap_or(0) + thoughts.unwrap_or(0);
    let mut usage = json!({
        "promptTokenCount": prompt,
        "totalTokenCount": total,
        "promptTokensDetails": [{ "modality": "TEXT", "tokenCount": prompt }],
    });
    if let Some(candidates) = candidates {
        usage["candidatesTokenCount"] = json!(candidates);
    }
    if let Some(thoughts) = thoughts {
        usage["thoughtsTokenCount"] = json!(thoughts);
    }
    usage
}

const SAFETY_RATINGS: &str = r#"[
    { "category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE" },
    { "category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE" },
    { "category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE" },
    { "category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true }
]"#;

/// What the fake sends for one request.
enum Reply {
    /// An HTTP error with Google's envelope.
    Error(u16, Value),
    /// 200: these responses, each after its pause. Streamed, one event each;
    /// otherwise merged into one body, as `generateContent` answers.
    Responses(Vec<(Duration, Value)>),
}

impl Reply {
    fn at_once(responses: Vec<Value>) -> Reply {
        Reply::Responses(responses.into_iter().map(|r| (Duration::ZERO, r)).collect())
    }
}

/// The normal answer, in three pieces: it echoes the last user turn, so a test
/// can tell which prompt it got.
fn answer_pieces(asked: &str, version: &str) -> Vec<Value> {
    vec![
        chunk(
            json!([{ "text": "Certainly. " }]),
            None,
            usage(21, None, None),
            version,
        ),
        chunk(json!([{ "text": "Done: " }]), None, Value::Null, version),
        chunk(
            json!([{ "text": asked }]),
            Some("STOP"),
            usage(21, Some(7), None),
            version,
        ),
    ]
}

fn script_reply(script: Script, n: usize, asked: &str, version: &str) -> Reply {
    let answer = || Reply::at_once(answer_pieces(asked, version));
    let overloaded = || {
        google_error(
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            Value::Null,
        )
    };
    match script {
        Script::Answer | Script::Slow(_) | Script::SlowFirst(_) => answer(),
        Script::Thinking => {
            let thinking = usage(21, None, Some(120));
            let mut done = usage(21, Some(7), Some(120));
            done["cachedContentTokenCount"] = json!(16);
            done["cacheTokensDetails"] = json!([{ "modality": "TEXT", "tokenCount": 16 }]);
            Reply::at_once(vec![
                chunk(
                    json!([{ "text": "**Reading the request**\n\nThe user wants a booking; I will confirm it briefly.", "thought": true }]),
                    None,
                    thinking.clone(),
                    version,
                ),
                chunk(json!([{ "text": "" }]), None, thinking, version),
                chunk(
                    json!([{ "text": "Certainly. Done: " }]),
                    None,
                    usage(21, Some(4), Some(120)),
                    version,
                ),
                chunk(json!([{ "text": asked }]), Some("STOP"), done, version),
            ])
        }
        Script::RateLimitedOnce(delay) if n == 0 => Reply::Error(
            429,
            google_error(
                429,
                "RESOURCE_EXHAUSTED",
                QUOTA_MESSAGE,
                quota_details(
                    &["GenerateRequestsPerMinutePerProjectPerModel-FreeTier"],
                    delay,
                ),
            ),
        ),
        Script::RateLimitedOnce(_) => answer(),
        Script::DailyQuota => Reply::Error(
            429,
            google_error(
                429,
                "RESOURCE_EXHAUSTED",
                QUOTA_MESSAGE,
                quota_details(
                    &[
                        "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    ],
                    "5s",
                ),
            ),
        ),
        Script::InvalidKey => Reply::Error(
            400,
            google_error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                json!([{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": { "service": "generativelanguage.googleapis.com" } }]),
            ),
        ),
        Script::Unavailable => Reply::Error(503, overloaded()),
        Script::EmptyCandidate => Reply::at_once(vec![chunk(
            json!([]),
            Some("STOP"),
            usage(9, None, None),
            version,
        )]),
        Script::PromptBlocked => Reply::at_once(vec![json!({
            "promptFeedback": { "blockReason": "SAFETY", "safetyRatings": serde_json::from_str::<Value>(SAFETY_RATINGS).unwrap() },
            "usageMetadata": usage(9, None, None),
            "modelVersion": version,
            "responseId": "fake-response-1",
        })]),
        Script::Withheld => Reply::at_once(vec![json!({
            "candidates": [{ "finishReason": "SAFETY", "index": 0, "safetyRatings": serde_json::from_str::<Value>(SAFETY_RATINGS).unwrap() }],
            "usageMetadata": usage(12, None, None),
            "modelVersion": version,
        })]),
        Script::WithheldMidway => Reply::at_once(vec![
            chunk(
                json!([{ "text": "Certainly. Here is how " }]),
                None,
                usage(12, None, None),
                version,
            ),
            json!({
                "candidates": [{ "content": { "parts": [{ "text": "" }], "role": "model" }, "finishReason": "SAFETY", "index": 0,
                                 "safetyRatings": serde_json::from_str::<Value>(SAFETY_RATINGS).unwrap() }],
                "usageMetadata": usage(12, Some(5), None),
                "modelVersion": version,
            }),
        ]),
        Script::ThoughtOut => Reply::at_once(vec![json!({
            "candidates": [{ "content": { "role": "model" }, "finishReason": "MAX_TOKENS", "index": 0 }],
            "usageMetadata": usage(9, None, Some(1280)),
            "modelVersion": version,
            "responseId": "fake-response-1",
        })]),
        Script::ErrorEventOnce if n == 0 => Reply::at_once(vec![
            chunk(
                json!([{ "text": "Certainly. " }]),
                None,
                usage(21, None, None),
                version,
            ),
            overloaded(),
        ]),
        Script::CutShortOnce if n == 0 => Reply::at_once(vec![chunk(
            json!([{ "text": "Certainly. " }]),
            None,
            usage(21, None, None),
            version,
        )]),
        Script::ErrorEventOnce | Script::CutShortOnce => answer(),
        Script::Trickle(pause) => Reply::Responses(
            answer_pieces(asked, version)
                .into_iter()
                .map(|r| (pause, r))
                .collect(),
        ),
        Script::StallAfterFirst(pause) => Reply::Responses(
            answer_pieces(asked, version)
                .into_iter()
                .enumerate()
                .map(|(i, r)| (if i == 1 { pause } else { Duration::ZERO }, r))
                .collect(),
        ),
    }
}

async fn generate(
    State(fake): State<Fake>,
    Path(call): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> AxumResponse {
    // `{collection}/{id}:generateContent` answers in one JSON body;
    // `:streamGenerateContent` streams, in server-sent events with `alt=sse`.
    let not_found = || {
        let error = google_error(
            404,
            "NOT_FOUND",
            &format!("{call} is not found for API version v1beta."),
            Value::Null,
        );
        (AxumStatus::NOT_FOUND, Json(error)).into_response()
    };
    let Some((model, method)) = call.split_once(':') else {
        return not_found();
    };
    let streaming = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return not_found(),
    };
    let known = matches!(model.split('/').collect::<Vec<_>>()[..], ["models" | "tunedModels", id] if !id.is_empty());
    if !known {
        return not_found();
    }
    let sse = streaming && query.get("alt").is_some_and(|alt| alt == "sse");
    let n = {
        let mut seen = fake.seen.lock().unwrap();
        seen.push(Seen {
            at: Instant::now(),
            model: model.to_owned(),
            streaming,
            sse,
            api_key: headers
                .get("x-goog-api-key")
                .and_then(|v| v.to_str().ok())
                .map(Into::into),
            body: body.clone(),
        });
        seen.len() - 1
    };
    match fake.script {
        Script::Slow(wait) => tokio::time::sleep(wait).await,
        Script::SlowFirst(wait) if n == 0 => tokio::time::sleep(wait).await,
        _ => {}
    }
    let asked = body["contents"]
        .as_array()
        .and_then(|c| c.last())
        .and_then(|t| t["parts"][0]["text"].as_str())
        .unwrap_or_default()
        .to_owned();
    let id = model.rsplit('/').next().unwrap_or_default();
    let version = format!("{id}-001");
    match script_reply(fake.script, n, &asked, &version) {
        Reply::Error(code, body) => {
            (AxumStatus::from_u16(code).unwrap(), Json(body)).into_response()
        }
        Reply::Responses(responses) if !streaming => {
            let pause = responses.iter().map(|(p, _)| *p).sum();
            tokio::time::sleep(pause).await;
            Json(merged(responses.into_iter().map(|(_, r)| r).collect())).into_response()
        }
        Reply::Responses(responses) => stream(responses, sse),
    }
}

/// The stream's responses as one: their parts in order, the last finish
/// reason, usage and version.
fn merged(responses: Vec<Value>) -> Value {
    let mut whole = responses.last().cloned().unwrap_or_else(|| json!({}));
    let parts: Vec<Value> = responses
        .iter()
        .flat_map(|r| {
            r["candidates"][0]["content"]["parts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    if whole["candidates"][0].is_object() {
        whole["candidates"][0]["content"] = json!({ "parts": parts, "role": "model" });
    }
    whole
}

/// Server-sent events as Google sends them (`data: …\r\n\r\n`), each after its
/// pause; without `alt=sse`, a JSON array streamed element by element.
fn stream(responses: Vec<(Duration, Value)>, sse: bool) -> AxumResponse {
    let count = responses.len();
    let pieces = futures::stream::iter(responses.into_iter().enumerate()).then(
        move |(i, (pause, response))| async move {
            tokio::time::sleep(pause).await;
            let piece = match (sse, i) {
                (true, _) => format!("data: {response}\r\n\r\n"),
                (false, 0) => format!("[{response}"),
                (false, _) => format!(",\r\n{response}"),
            };
            let end = if !sse && i + 1 == count { "]" } else { "" };
            Ok::<_, Infallible>(format!("{piece}{end}"))
        },
    );
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/json"
    };
    ([("content-type", content_type)], Body::from_stream(pieces)).into_response()
}

/// A user with an assistant (capped at 256 answer tokens) and a conversation,
/// who posts `content`; returns the token, the conversation id and the reply id.
async fn ask<D>(app: &TestApp<D>, email: &str, content: &str) -> (String, String, String) {
    let (token, conversation) = with_assistant(app, email, "gemini-2.5-flash").await;
    let reply = post_message(app, &token, &conversation, content).await;
    (token, conversation, reply)
}

/// A user with an assistant of `model` and a conversation with it: the token
/// and the conversation id.
async fn with_assistant<D>(app: &TestApp<D>, email: &str, model: &str) -> (String, String) {
    let token = app.signed_up(email).await;
    let response = app
        .post(
            "/assistants",
            &token,
            json!({ "name": "Mika", "role": "travel secretary", "instructions": "Be brief.",
                    "model": model, "temperature": 0.3,
                    "metadata": { "top_p": "0.8", "max_output_tokens": "256" } }),
        )
        .await;
    let assistant: Value = response.json().await.unwrap();
    let conversation = app.conversation(&token, &assistant["id"]).await;
    (token, conversation["id"].as_str().unwrap().to_owned())
}

/// Post `content`; returns the id of the reply it asks for.
async fn post_message<D>(
    app: &TestApp<D>,
    token: &str,
    conversation: &str,
    content: &str,
) -> String {
    let posted: Value = app
        .post(
            &format!("/conversations/{conversation}/messages"),
            token,
            json!({ "content": content }),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(posted["reply"]["status"], "queued");
    posted["reply"]["id"].as_str().unwrap().to_owned()
}

/// The reply as `GET /conversations/{id}/messages` lists it, once it has ended.
async fn ended_reply<D>(app: &TestApp<D>, token: &str, conversation: &str, reply: &str) -> Value {
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

/// `GET /stats/usage?group_by=model` once `usage_daily` totals `total_tokens`.
async fn usage_by_model_once<D>(app: &TestApp<D>, token: &str, total_tokens: &Value) -> Value {
    eventually("usage_daily has the reply's tokens", async || {
        let stats: Value = app
            .client
            .get(app.url("/api/v1/stats/usage?group_by=model"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (&stats["total"]["total_tokens"] == total_tokens)
            .then(|| stats.clone())
            .ok_or(stats.to_string())
    })
    .await
}

/// The payload of each event of `event_type` for `reply`, from the store.
async fn reply_events<D: EventLog>(app: &TestApp<D>, event_type: &str, reply: &str) -> Vec<Value> {
    let data: Vec<String> = crate::on_db!(app.read_side().await, |pool| {
        sqlx::query_scalar(
        "SELECT CAST(data AS TEXT) FROM events WHERE event_type = $1 AND data ->> 'reply_id' = $2
         ORDER BY global_position",
    )
    .bind(event_type)
    .bind(reply)
    .fetch_all(pool)
    .await
    .unwrap()
    });
    data.iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The replier's consumer once JetStream has nothing left to hand out on it
/// and nothing handed out unacked (so no reply can come from a delivery after
/// this), and `also` holds of it: its state then.
async fn quiet_replier<D>(
    app: &TestApp<D>,
    also: impl Fn(&ConsumerInfo) -> Result<(), String>,
) -> ConsumerInfo {
    let nats = async_nats::connect(&app.names.nats_url).await.unwrap();
    let stream = async_nats::jetstream::new(nats)
        .get_stream(&app.names.stream)
        .await
        .unwrap();
    eventually("the replier's consumer is quiet", async || {
        let mut consumer: PullConsumer = stream
            .get_consumer(CONSUMER)
            .await
            .map_err(|e| e.to_string())?;
        let info = consumer.info().await.map_err(|e| e.to_string())?.clone();
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            return Err(format!("{info:?}"));
        }
        also(&info).map_err(|e| format!("{e}: {info:?}"))?;
        Ok(info)
    })
    .await
}

/// The store-tailing replier's checkpoint is past the request for `reply`:
/// nothing can take it up again.
async fn replier_passed<D: EventLog>(app: &TestApp<D>, reply: &str) {
    let db = app.read_side().await;
    let requested: (i64, i64) = crate::on_db!(db, |pool| sqlx::query_as(
        "SELECT CAST(CAST(transaction_id AS TEXT) AS BIGINT), global_position FROM events
         WHERE event_type = 'ReplyRequested' AND data ->> 'reply_id' = $1",
    )
    .bind(reply)
    .fetch_one(pool)
    .await
    .unwrap());
    eventually("the replier's checkpoint passes the request", async || {
        let checkpoints = crate::support::progress::checkpoints(&db).await.unwrap();
        let at = checkpoints
            .get(ai_secretary::replier::CHECKPOINT)
            .map(|c| c.position);
        (at >= Some(requested))
            .then_some(())
            .ok_or(format!("{at:?} < {requested:?}"))
    })
    .await;
}

/// `quiet_replier`, and still quiet, with no delivery in between, after
/// `ack_wait` more: a message handed out and left unacked would have been
/// handed out again by then.
async fn settled_replier<D>(app: &TestApp<D>, ack_wait: Duration) -> ConsumerInfo {
    let quiet = quiet_replier(app, |_| Ok(())).await;
    tokio::time::sleep(ack_wait + Duration::from_millis(500)).await;
    let delivered = quiet.delivered.consumer_sequence;
    quiet_replier(app, |later| {
        (later.delivered.consumer_sequence == delivered)
            .then_some(())
            .ok_or(format!("delivered again after {delivered} deliveries"))
    })
    .await
}

crate::on_both!(with_the_defaults_a_message_is_answered_offline_with_usage);
async fn with_the_defaults_a_message_is_answered_offline_with_usage<D: EventLog>(app: TestApp<D>) {
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
    let stats = usage_by_model_once(&app, &token, &usage["total_tokens"]).await;
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

crate::on_both!(
    gemini_gets_the_real_request_and_its_answer_is_recorded,
    spawns
);
async fn gemini_gets_the_real_request_and_its_answer_is_recorded<D: Topology>() {
    let gemini = FakeGemini::start(Script::Answer).await;
    let app = D::spawn(&gemini.args(&[]), Roles::all()).await;
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
    assert_eq!(request.model, "models/gemini-2.5-flash");
    assert!(request.streaming);
    assert!(
        request.sse,
        "streamGenerateContent without alt=sse answers a JSON array"
    );
    assert_eq!(request.api_key.as_deref(), Some(API_KEY));
    assert_eq!(
        request.body["systemInstruction"]["parts"][0]["text"],
        "You are Mika, a travel secretary.\nBe brief."
    );
    assert_eq!(
        request.body["contents"],
        json!([{ "role": "user", "parts": [{ "text": "Find me a flight to Osaka on Friday" }] }])
    );
    // 2.5 Flash thinks: a default budget beside the 256 tokens kept for the answer.
    assert_eq!(
        request.body["generationConfig"],
        json!({ "temperature": 0.3, "topP": 0.8, "maxOutputTokens": 1280,
                "thinkingConfig": { "thinkingBudget": 1024 } })
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
    let leaked: i64 = crate::on_db!(app.read_side().await, |pool| sqlx::query_scalar(
        "SELECT count(*) FROM events
         WHERE CAST(data AS TEXT) LIKE $1 OR CAST(metadata AS TEXT) LIKE $1",
    )
    .bind(format!("%{API_KEY}%"))
    .fetch_one(pool)
    .await
    .unwrap());
    assert_eq!(leaked, 0);
}

crate::on_both!(
    gemini_streams_the_reply_text_to_sse_before_the_completion,
    spawns
);
async fn gemini_streams_the_reply_text_to_sse_before_the_completion<D: Topology>() {
    streams_the_reply_text::<D>(&[]).await;
}

/// Without NATS the deltas travel through the process's hub.
// Server-only: the server topology with NATS left out (the embedded service
// has no NATS either: `gemini_streams_the_reply_text_…::embedded`).
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn without_nats_gemini_streams_the_reply_text_to_sse_before_the_completion() {
    streams_the_reply_text::<crate::support::TestDb>(&[crate::helpers::WITHOUT_NATS]).await;
}

async fn streams_the_reply_text<D: Topology>(extra: &[&str]) {
    let gemini = FakeGemini::start(Script::Answer).await;
    let app = D::spawn(&gemini.args(extra), Roles::all()).await;
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

crate::on_both!(a_rate_limit_is_waited_out_as_its_retry_info_asks, spawns);
async fn a_rate_limit_is_waited_out_as_its_retry_info_asks<D: Topology>() {
    // A 429 with RetryInfo "2s" in the body and no Retry-After header, as Google sends it.
    let gemini = FakeGemini::start(Script::RateLimitedOnce("2s")).await;
    // Unary generateContent here; the other tests stream.
    let app = D::spawn(&gemini.args(&["--llm-stream", "false"]), Roles::all()).await;
    let (token, conversation, reply) = ask(&app, "limited@example.com", "Summarise my week").await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(answered["status"], "completed");
    let seen = gemini.seen();
    assert_eq!(seen.len(), 2);
    assert!(!seen[0].streaming);
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_millis(1950) && waited < Duration::from_secs(4),
        "retried after {waited:?}"
    );
    assert_eq!(reply_events(&app, "ReplyFailed", &reply).await.len(), 0);
}

/// A reply that failed: its one ReplyFailed, and how often the model was asked.
#[derive(Debug, PartialEq)]
struct Failed {
    error: String,
    retryable: bool,
    attempts: u64,
    asked: usize,
}

/// Ask once through a fake Gemini with `script`, and wait for the reply to fail.
async fn failed_through<D: Topology>(script: Script, extra: &[&str], email: &str) -> Failed {
    let gemini = FakeGemini::start(script).await;
    let app = D::spawn(&gemini.args(extra), Roles::all()).await;
    let (token, conversation, reply) = ask(&app, email, "How do I get past the gate?").await;
    let ended = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    assert_eq!(reply_events(&app, "ReplyCompleted", &reply).await.len(), 0);
    let failed = reply_events(&app, "ReplyFailed", &reply).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(
        ended["error"], failed[0]["error"],
        "the list shows the stored error"
    );
    Failed {
        error: failed[0]["error"].as_str().unwrap().to_owned(),
        retryable: failed[0]["retryable"].as_bool().unwrap(),
        attempts: failed[0]["attempts"].as_u64().unwrap(),
        asked: gemini.seen().len(),
    }
}

crate::on_both!(a_daily_quota_fails_the_reply_at_once_saying_so, spawns);
async fn a_daily_quota_fails_the_reply_at_once_saying_so<D: Topology>() {
    let failed = failed_through::<D>(Script::DailyQuota, &[], "daily@example.com").await;
    assert!(
        failed.error.starts_with("rate_limited: quota: the daily quota is spent; gemini 429 RESOURCE_EXHAUSTED: You exceeded your current quota"),
        "{failed:?}"
    );
    assert!(
        failed
            .error
            .contains("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
    );
    // Retryable later (tomorrow), but not waited for now: one request, not the
    // five seconds RetryInfo suggested and a retry.
    assert_eq!(
        (failed.retryable, failed.attempts, failed.asked),
        (true, 1, 1)
    );
}

crate::on_both!(
    a_quota_wait_past_the_deadline_fails_at_once_saying_so,
    spawns
);
async fn a_quota_wait_past_the_deadline_fails_at_once_saying_so<D: Topology>() {
    let started = Instant::now();
    let failed = failed_through::<D>(
        Script::RateLimitedOnce("47s"),
        &["--llm-deadline-seconds", "20"],
        "patient@example.com",
    )
    .await;
    assert!(
        failed.error.starts_with(
            "rate_limited: quota: the wait asked for (47 s) is past the reply's deadline"
        ),
        "{failed:?}"
    );
    assert_eq!(
        (failed.retryable, failed.attempts, failed.asked),
        (true, 1, 1)
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failed fast, not at the deadline"
    );
}

crate::on_both!(
    answers_that_cannot_succeed_fail_at_once_with_their_reason,
    spawns
);
async fn answers_that_cannot_succeed_fail_at_once_with_their_reason<D: Topology>() {
    let shapes = [
        (
            Script::PromptBlocked,
            "safety: the prompt was blocked (SAFETY)",
        ),
        (
            Script::Withheld,
            "safety: the answer was withheld (finish reason SAFETY)",
        ),
        (
            Script::ThoughtOut,
            "empty: the answer had no text (finish reason MAX_TOKENS, after 1280 tokens of thinking)",
        ),
        (
            Script::EmptyCandidate,
            "empty: the answer had no text (finish reason STOP)",
        ),
    ];
    for (i, (script, error)) in shapes.into_iter().enumerate() {
        let email = format!("refused{i}@example.com");
        let failed = failed_through::<D>(script, &[], &email).await;
        // The same request would get the same answer: not retried.
        let at_once = Failed {
            error: error.into(),
            retryable: false,
            attempts: 1,
            asked: 1,
        };
        assert_eq!(failed, at_once, "{script:?}");
    }
}

crate::on_both!(
    a_safety_finish_after_streamed_text_fails_the_reply_the_stream_showed,
    spawns
);
async fn a_safety_finish_after_streamed_text_fails_the_reply_the_stream_showed<D: Topology>() {
    let Watched {
        gemini,
        app,
        reply,
        mut live,
        ..
    } = watched_through::<D>(
        Script::WithheldMidway,
        "gemini-2.5-flash",
        "How do I get past the gate?",
    )
    .await;
    let (updates, failed) = until_event(&mut live, "message.failed").await;
    assert_eq!(failed.data["id"], reply.as_str());
    assert_eq!(
        failed.data["error"],
        "safety: the answer was withheld (finish reason SAFETY)"
    );
    assert_eq!(
        streamed_text(&updates, &json!(reply)),
        "Certainly. Here is how "
    );
    assert!(updates.iter().all(|u| u.event != "message.completed"));
    assert_eq!(reply_events(&app, "ReplyCompleted", &reply).await.len(), 0);
    assert_eq!(gemini.seen().len(), 1);
}

/// A conversation watched over SSE while its message is answered through a fake Gemini.
struct Watched<D> {
    gemini: FakeGemini,
    app: TestApp<D>,
    token: String,
    conversation: String,
    reply: String,
    live: Events,
}

/// A user with an assistant of `model` subscribes to the conversation's stream,
/// then posts `content`, answered through a fake Gemini with `script`.
async fn watched_through<D: Topology>(script: Script, model: &str, content: &str) -> Watched<D> {
    let gemini = FakeGemini::start(script).await;
    let app = D::spawn(&gemini.args(&[]), Roles::all()).await;
    let (token, conversation) = with_assistant(&app, "watcher@example.com", model).await;
    let live = subscribe(&app, &token, &conversation, None).await;
    let reply = post_message(&app, &token, &conversation, content).await;
    Watched {
        gemini,
        app,
        token,
        conversation,
        reply,
        live,
    }
}

/// The `message.delta`s of `reply`.
fn deltas_of<'a>(updates: &'a [Sse], reply: &str) -> Vec<&'a Sse> {
    updates
        .iter()
        .filter(|u| u.event == "message.delta" && u.data["id"] == reply)
        .collect()
}

crate::on_both!(
    a_thinking_answer_shows_no_thought_and_its_usage_adds_up,
    spawns
);
async fn a_thinking_answer_shows_no_thought_and_its_usage_adds_up<D: Topology>() {
    let Watched {
        gemini,
        app,
        token,
        conversation,
        reply,
        mut live,
    } = watched_through::<D>(Script::Thinking, "gemini-2.5-pro", "Book the 9:40 to Kyoto").await;
    let (updates, completed) = until_completed(&mut live).await;
    let answer = "Certainly. Done: Book the 9:40 to Kyoto";
    assert_eq!(completed.data["content"], answer);
    assert_eq!(streamed_text(&updates, &json!(reply)), answer);
    let deltas = deltas_of(&updates, &reply);
    assert_eq!(
        deltas.len(),
        2,
        "no thought and no empty piece is streamed: {deltas:?}"
    );

    // Thinking is output: billed in completion, so prompt + completion = Google's total.
    let billed = json!({ "prompt_tokens": 21, "completion_tokens": 127, "total_tokens": 148 });
    assert_eq!(completed.data["usage"], billed);
    let listed = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(listed["usage"], billed);
    let stored = reply_events(&app, "ReplyCompleted", &reply).await;
    assert_eq!(
        stored[0]["usage"],
        json!({ "prompt_tokens": 21, "completion_tokens": 127, "total_tokens": 148,
                "thoughts_tokens": 120, "cached_tokens": 16 })
    );
    let stats = usage_by_model_once(&app, &token, &json!(148)).await;
    assert_eq!(stats["total"]["prompt_tokens"], 21);
    assert_eq!(stats["total"]["completion_tokens"], 127);
    assert_eq!(stats["data"][0]["model"], "gemini-2.5-pro-001");

    // The request bounded the thinking and kept the answer's 256 tokens.
    assert_eq!(
        gemini.seen()[0].body["generationConfig"],
        json!({ "temperature": 0.3, "topP": 0.8, "maxOutputTokens": 1280,
                "thinkingConfig": { "thinkingBudget": 1024 } })
    );
}

crate::on_both!(
    an_error_inside_the_stream_fails_the_attempt_and_the_next_one_answers,
    spawns
);
async fn an_error_inside_the_stream_fails_the_attempt_and_the_next_one_answers<D: Topology>() {
    let Watched {
        gemini,
        app,
        reply,
        mut live,
        ..
    } = watched_through::<D>(Script::ErrorEventOnce, "gemini-2.5-flash", "Move my 3 pm").await;
    let (updates, completed) = until_completed(&mut live).await;
    assert_eq!(completed.data["content"], "Certainly. Done: Move my 3 pm");
    let first: Vec<&Sse> = deltas_of(&updates, &reply)
        .into_iter()
        .filter(|d| d.data["attempt"] == 1)
        .collect();
    assert_eq!(
        first.len(),
        1,
        "the first attempt streamed its text before the error"
    );
    assert_eq!(
        streamed_text(&updates, &json!(reply)),
        "Certainly. Done: Move my 3 pm"
    );
    assert_eq!(gemini.seen().len(), 2);
    assert_eq!(reply_events(&app, "ReplyFailed", &reply).await.len(), 0);
    assert_eq!(reply_events(&app, "ReplyCompleted", &reply).await.len(), 1);
}

crate::on_both!(a_stream_cut_before_its_finish_reason_is_asked_again, spawns);
async fn a_stream_cut_before_its_finish_reason_is_asked_again<D: Topology>() {
    let gemini = FakeGemini::start(Script::CutShortOnce).await;
    let app = D::spawn(&gemini.args(&[]), Roles::all()).await;
    let (token, conversation, reply) = ask(&app, "cut@example.com", "Cancel Friday").await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(answered["status"], "completed");
    assert_eq!(answered["content"], "Certainly. Done: Cancel Friday");
    assert_eq!(gemini.seen().len(), 2);
}

crate::on_both!(a_tuned_model_is_asked_by_its_own_name, spawns);
async fn a_tuned_model_is_asked_by_its_own_name<D: Topology>() {
    let gemini = FakeGemini::start(Script::Answer).await;
    let app = D::spawn(&gemini.args(&[]), Roles::all()).await;
    let (token, conversation) =
        with_assistant(&app, "tuned@example.com", "tunedModels/mika-secretary").await;
    let reply = post_message(&app, &token, &conversation, "Hello").await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(answered["status"], "completed", "{answered}");
    assert_eq!(answered["model"], "mika-secretary-001");
    let seen = gemini.seen();
    assert_eq!(seen[0].model, "tunedModels/mika-secretary");
    // Whether a tuned model thinks is unknown: no thinking config is sent for it.
    assert_eq!(
        seen[0].body["generationConfig"],
        json!({ "temperature": 0.3, "topP": 0.8, "maxOutputTokens": 256 })
    );
}

crate::on_both!(
    an_answer_that_keeps_coming_is_not_cut_by_the_idle_timeout,
    spawns
);
async fn an_answer_that_keeps_coming_is_not_cut_by_the_idle_timeout<D: Topology>() {
    // Three pieces 400 ms apart: 1.2 s in all, past the 1 s idle timeout, never silent that long.
    let gemini = FakeGemini::start(Script::Trickle(Duration::from_millis(400))).await;
    let app = D::spawn(
        &gemini.args(&["--llm-idle-timeout-seconds", "1"]),
        Roles::all(),
    )
    .await;
    let (token, conversation, reply) = ask(&app, "trickle@example.com", "Plan Monday").await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(answered["status"], "completed", "{answered}");
    assert_eq!(gemini.seen().len(), 1);
}

crate::on_both!(an_invalid_key_fails_at_once_without_retrying, spawns);
async fn an_invalid_key_fails_at_once_without_retrying<D: Topology>() {
    let gemini = FakeGemini::start(Script::InvalidKey).await;
    let app = D::spawn(&gemini.args(&["--llm-stream", "false"]), Roles::all()).await;
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

crate::on_both!(an_unavailable_model_is_retried_until_the_deadline, spawns);
async fn an_unavailable_model_is_retried_until_the_deadline<D: Topology>() {
    let gemini = FakeGemini::start(Script::Unavailable).await;
    let app = D::spawn(
        &gemini.args(&["--llm-deadline-seconds", "1.5", "--llm-max-attempts", "50"]),
        Roles::all(),
    )
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

crate::on_both!(silence_past_the_idle_timeout_fails_as_a_timeout, spawns);
async fn silence_past_the_idle_timeout_fails_as_a_timeout<D: Topology>() {
    let silences = [
        // Before the response head...
        (
            Script::Slow(Duration::from_secs(3)),
            "timeout: no response: Gemini was silent for 300 ms",
        ),
        // ...and between two pieces of a streamed answer.
        (
            Script::StallAfterFirst(Duration::from_secs(3)),
            "timeout: the answer stopped coming: Gemini was silent for 300 ms",
        ),
    ];
    for (i, (script, error)) in silences.into_iter().enumerate() {
        let idle = [
            "--llm-idle-timeout-seconds",
            "0.3",
            "--llm-max-attempts",
            "2",
        ];
        let failed = failed_through::<D>(script, &idle, &format!("silent{i}@example.com")).await;
        let each_attempt_timed_out = Failed {
            error: error.into(),
            retryable: true,
            attempts: 2,
            asked: 2,
        };
        assert_eq!(failed, each_attempt_timed_out, "{script:?}");
    }
}

// On the servers JetStream delivers the request again; the embedded replier
// tails the store, and takes the crashed one's lease and its unended reply.
crate::on_both!(a_replier_crash_mid_reply_ends_in_exactly_one_reply, spawns);
async fn a_replier_crash_mid_reply_ends_in_exactly_one_reply<D: Topology>() {
    // The first request stalls: the instance dies while waiting for the model.
    let gemini = FakeGemini::start(Script::SlowFirst(Duration::from_secs(30))).await;
    let args = gemini.args(&["--replier-ack-wait-seconds", "1"]);
    let app = D::spawn(&args, Roles::all()).await;
    let (token, conversation, reply) = ask(&app, "crash@example.com", "Plan my trip").await;
    eventually("the model is asked", async || {
        (!gemini.seen().is_empty())
            .then_some(())
            .ok_or("not yet".to_owned())
    })
    .await;
    let (data, names) = D::crash(app);

    // A new instance gets the request again and answers it once.
    let app = data.start(names, &args, Roles::all()).await;
    let answered = ended_reply(&app, &token, &conversation, &reply).await;
    assert_eq!(answered["status"], "completed");
    assert_eq!(answered["content"], "Certainly. Done: Plan my trip");
    // Count once no delivery can bring another reply: nothing pending or
    // unacked, and nothing delivered through one more ack wait; or, tailing
    // the store, the replier's checkpoint past the request.
    if D::SERVERS {
        settled_replier(&app, Duration::from_secs(1)).await;
    } else {
        replier_passed(&app, &reply).await;
    }
    assert!(gemini.seen().len() >= 2);
    assert_eq!(reply_events(&app, "ReplyCompleted", &reply).await.len(), 1);
    assert_eq!(reply_events(&app, "ReplyFailed", &reply).await.len(), 0);
    let starts = reply_events(&app, "ReplyStarted", &reply).await;
    assert!(starts.len() >= 2, "{starts:?}");
    assert_eq!(starts[0]["attempt"], 1);
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Server-only: redelivery by a re-created JetStream consumer.
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
    // Every message on the replier's subjects (a conversation's events and its
    // replies'), among them the three requests.
    let (messages, requests): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE event_type = 'ReplyRequested') FROM events
         WHERE stream_type IN ('conversation', 'reply')",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(requests, 3);

    // Drop the replier's consumer: it is re-created from the start of the
    // stream, and every message (every ReplyRequested with them) is delivered
    // again, and acked.
    let nats = async_nats::connect(&app.names.nats_url).await.unwrap();
    let stream = async_nats::jetstream::new(nats)
        .get_stream(&app.names.stream)
        .await
        .unwrap();
    let old = quiet_replier(&app, |_| Ok(())).await;
    stream.delete_consumer(CONSUMER).await.unwrap();
    let again = quiet_replier(&app, |info| {
        let fresh = info.created > old.created;
        let delivered = info.delivered.consumer_sequence;
        (fresh && delivered >= messages as u64)
            .then_some(())
            .ok_or(format!("a new consumer that delivered all {messages}"))
    })
    .await;
    assert!(
        again.ack_floor.consumer_sequence >= messages as u64,
        "{again:?}"
    );
    assert_eq!(app.event_count().await, before);
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ReplyCompleted'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(completed, 3);
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Server-only: two processes pulling from one JetStream consumer.
async fn two_repliers_share_the_work_and_each_message_gets_one_reply() {
    let app = spawn_app().await;
    // A second process with only the replier, on the same store and bus; JetStream
    // hands each request to one of the two pullers of the shared consumer. The
    // first answers offline (its model ends in "+offline"), the second asks
    // Gemini (a fake, whose model ends in "-001"): each reply says who wrote it.
    let gemini = FakeGemini::start(Script::Answer).await;
    let second = spawn_app_on(
        app.db.borrowed(),
        app.names.borrowed(),
        &gemini.args(&[]),
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
    // Count once no delivery can bring another reply.
    quiet_replier(&app, |_| Ok(())).await;
    let endings: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT data->>'reply_id', event_type, data->>'model' FROM events
         WHERE event_type IN ('ReplyCompleted', 'ReplyFailed')",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let distinct: std::collections::HashSet<&str> =
        endings.iter().map(|(reply, ..)| reply.as_str()).collect();
    assert_eq!((endings.len(), distinct.len()), (20, 20), "{endings:?}");
    let by = |suffix: &str| {
        endings
            .iter()
            .filter(|(_, kind, model)| {
                kind == "ReplyCompleted" && model.as_ref().is_some_and(|m| m.ends_with(suffix))
            })
            .count()
    };
    let (offline, gemini_answered) = (by("+offline"), by("-001"));
    assert_eq!(offline + gemini_answered, 20, "{endings:?}");
    assert!(
        offline > 0 && gemini_answered > 0,
        "both repliers answer: {offline} offline, {gemini_answered} through Gemini"
    );
    assert!(gemini.seen().len() >= gemini_answered);
    drop(second);
}
