//! Google Gemini through its REST API: `POST {base}/v1beta/models/{model}:generateContent`
//! with the key in `x-goog-api-key` (never in the URL, so it cannot reach a log).
//!
//! One call is one attempt; `retry::complete` decides what to do with a failure.
//! The status classes are Gemini's documented ones: 429 RESOURCE_EXHAUSTED and
//! 500/503 are transient, 400/403/404 are the caller's to fix.

use std::time::Duration;

use reqwest::{
    StatusCode,
    header::{HeaderValue, RETRY_AFTER},
};
use serde::Deserialize;
use serde_json::{Value, json};

use futures_util::StreamExt;

use super::{AttemptError, Completion, Deltas, FailureReason, Prompt, Provider, Role};
use crate::{config::Secret, domain::conversation::Usage};

pub struct Gemini {
    http: reqwest::Client,
    base_url: String,
    /// Marked sensitive: never printed by reqwest's or our Debug output.
    api_key: HeaderValue,
}

impl Gemini {
    pub fn new(base_url: &str, api_key: &Secret) -> anyhow::Result<Self> {
        let mut api_key = HeaderValue::from_str(api_key.expose())
            .map_err(|_| anyhow::anyhow!("GEMINI_API_KEY is not a valid header value"))?;
        api_key.set_sensitive(true);
        Ok(Self {
            // The per-request timeout is the retry policy's; this only bounds connecting.
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
        })
    }
}

#[async_trait::async_trait]
impl Provider for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    async fn attempt(&self, prompt: &Prompt) -> Result<Completion, AttemptError> {
        let (response, model) = self.post(prompt, "generateContent").await?;
        let body = response.bytes().await.map_err(transport)?;
        let response: GenerateContentResponse = serde_json::from_slice(&body).map_err(malformed)?;
        let mut answer = Answer::default();
        answer.absorb(response, None);
        answer.finish(model)
    }

    /// `streamGenerateContent?alt=sse`: each server-sent event is a partial
    /// `GenerateContentResponse`; the last carries the finish reason and usage.
    async fn attempt_streaming(
        &self,
        prompt: &Prompt,
        deltas: Deltas<'_>,
    ) -> Result<Completion, AttemptError> {
        let (response, model) = self.post(prompt, "streamGenerateContent?alt=sse").await?;
        let mut body = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut answer = Answer::default();
        while let Some(chunk) = body.next().await {
            pending.extend_from_slice(&chunk.map_err(transport)?);
            while let Some(event) = next_sse_event(&mut pending) {
                if event.is_empty() {
                    continue;
                }
                let response: GenerateContentResponse =
                    serde_json::from_str(&event).map_err(malformed)?;
                answer.absorb(response, Some(deltas));
            }
        }
        answer.finish(model)
    }
}

impl Gemini {
    /// POST the prompt to `models/{model}:{method}`; an HTTP error becomes the
    /// attempt's error. Returns the response and the model asked.
    async fn post<'p>(
        &self,
        prompt: &'p Prompt,
        method: &str,
    ) -> Result<(reqwest::Response, &'p str), AttemptError> {
        let model = prompt.model.trim_start_matches("models/");
        let url = format!("{}/v1beta/models/{model}:{method}", self.base_url);
        let response = self
            .http
            .post(&url)
            .header("x-goog-api-key", self.api_key.clone())
            .json(&request_body(prompt))
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        if status.is_success() {
            return Ok((response, model));
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.bytes().await.map_err(transport)?;
        let mut error = AttemptError::new(classify(status), describe_error(status, &body));
        error.retry_after = retry_after;
        Err(error)
    }
}

fn transport(e: reqwest::Error) -> AttemptError {
    // Without the URL: it names the model, and a proxy could add more.
    AttemptError::new(FailureReason::Transport, e.without_url().to_string())
}

fn malformed(e: serde_json::Error) -> AttemptError {
    AttemptError::new(FailureReason::Malformed, format!("unreadable answer: {e}"))
}

/// Take the next complete server-sent event off `pending`: its `data:` lines
/// joined. `None` until a blank line ends one.
fn next_sse_event(pending: &mut Vec<u8>) -> Option<String> {
    let end = pending
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, 2));
    let end_crlf = pending
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let (at, len) = match (end, end_crlf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let raw: Vec<u8> = pending.drain(..at + len).collect();
    let text = String::from_utf8_lossy(&raw[..at]);
    Some(
        text.lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

fn classify(status: StatusCode) -> FailureReason {
    match status.as_u16() {
        429 => FailureReason::RateLimited,
        500..=599 => FailureReason::Unavailable,
        408 => FailureReason::Timeout,
        _ => FailureReason::Rejected,
    }
}

/// `gemini 400 INVALID_ARGUMENT: API key not valid…` from Google's error JSON.
fn describe_error(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        #[serde(default)]
        message: String,
        #[serde(default)]
        status: String,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error }) => format!(
            "gemini {} {}: {}",
            status.as_u16(),
            error.status,
            error.message
        ),
        Err(_) => format!("gemini {}", status.as_u16()),
    }
}

fn request_body(prompt: &Prompt) -> Value {
    let contents: Vec<Value> = prompt
        .turns
        .iter()
        .map(|t| {
            json!({
                "role": match t.role { Role::User => "user", Role::Model => "model" },
                "parts": [{ "text": t.text }],
            })
        })
        .collect();
    let mut generation = json!({ "temperature": prompt.temperature });
    if let Some(top_p) = prompt.top_p {
        generation["topP"] = json!(top_p);
    }
    if let Some(max) = prompt.max_output_tokens {
        generation["maxOutputTokens"] = json!(max);
    }
    json!({
        "systemInstruction": { "parts": [{ "text": prompt.system }] },
        "contents": contents,
        "generationConfig": generation,
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
    model_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Deserialize)]
struct Part {
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    total_token_count: u64,
}

/// An answer put together from one response, or from a stream of partial ones.
#[derive(Default)]
struct Answer {
    text: String,
    candidates: usize,
    finish_reason: Option<String>,
    block_reason: Option<String>,
    usage: Option<UsageMetadata>,
    model_version: Option<String>,
}

impl Answer {
    /// Add one (partial) response; its text also goes to `deltas`.
    fn absorb(&mut self, response: GenerateContentResponse, deltas: Option<Deltas<'_>>) {
        if let Some(reason) = response.prompt_feedback.and_then(|f| f.block_reason) {
            self.block_reason = Some(reason);
        }
        if let Some(candidate) = response.candidates.into_iter().next() {
            self.candidates += 1;
            for text in candidate
                .content
                .into_iter()
                .flat_map(|c| c.parts)
                .filter_map(|p| p.text)
            {
                if let Some(deltas) = deltas {
                    deltas(&text);
                }
                self.text.push_str(&text);
            }
            if candidate.finish_reason.is_some() {
                self.finish_reason = candidate.finish_reason;
            }
        }
        // Usage is cumulative: the last report counts.
        if response.usage_metadata.is_some() {
            self.usage = response.usage_metadata;
        }
        if response.model_version.is_some() {
            self.model_version = response.model_version;
        }
    }

    /// The completion, or why there is none.
    fn finish(self, model: &str) -> Result<Completion, AttemptError> {
        if let Some(reason) = self.block_reason {
            return Err(AttemptError::new(
                FailureReason::Safety,
                format!("the prompt was blocked ({reason})"),
            ));
        }
        if self.candidates == 0 {
            return Err(AttemptError::new(
                FailureReason::Empty,
                "the answer had no candidate",
            ));
        }
        let finish_reason = self
            .finish_reason
            .unwrap_or_else(|| "FINISH_REASON_UNSPECIFIED".into());
        if matches!(
            finish_reason.as_str(),
            "SAFETY" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "SPII" | "RECITATION"
        ) {
            return Err(AttemptError::new(
                FailureReason::Safety,
                format!("the answer was withheld (finish reason {finish_reason})"),
            ));
        }
        if self.text.trim().is_empty() {
            return Err(AttemptError::new(
                FailureReason::Empty,
                format!("the answer had no text (finish reason {finish_reason})"),
            ));
        }
        let usage = self.usage.unwrap_or_default();
        Ok(Completion {
            content: self.text,
            model: self.model_version.unwrap_or_else(|| model.to_owned()),
            finish_reason,
            usage: Usage {
                prompt_tokens: usage.prompt_token_count,
                completion_tokens: usage.candidates_token_count,
                total_tokens: usage.total_token_count,
            },
        })
    }
}

/// One whole response read as an answer.
#[cfg(test)]
fn read_answer(response: GenerateContentResponse, model: &str) -> Result<Completion, AttemptError> {
    let mut answer = Answer::default();
    answer.absorb(response, None);
    answer.finish(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Turn;

    #[test]
    fn the_request_carries_the_assistant_and_its_settings() {
        let prompt = Prompt {
            model: "gemini-2.5-flash".into(),
            system: "You are Mika.".into(),
            turns: vec![
                Turn {
                    role: Role::User,
                    text: "hi".into(),
                },
                Turn {
                    role: Role::Model,
                    text: "hello".into(),
                },
                Turn {
                    role: Role::User,
                    text: "book it".into(),
                },
            ],
            temperature: 0.3,
            top_p: Some(0.9),
            max_output_tokens: Some(256),
            assistant_name: "Mika".into(),
            assistant_role: "secretary".into(),
        };
        assert_eq!(
            request_body(&prompt),
            json!({
                "systemInstruction": { "parts": [{ "text": "You are Mika." }] },
                "contents": [
                    { "role": "user", "parts": [{ "text": "hi" }] },
                    { "role": "model", "parts": [{ "text": "hello" }] },
                    { "role": "user", "parts": [{ "text": "book it" }] },
                ],
                "generationConfig": { "temperature": 0.3, "topP": 0.9, "maxOutputTokens": 256 },
            })
        );
    }

    #[test]
    fn an_answer_reads_its_text_finish_reason_and_usage() {
        let response: GenerateContentResponse = serde_json::from_value(json!({
            "candidates": [{
                "content": { "role": "model", "parts": [{ "text": "Booked " }, { "text": "for 3 pm." }] },
                "finishReason": "STOP", "index": 0
            }],
            "usageMetadata": { "promptTokenCount": 11, "candidatesTokenCount": 4, "totalTokenCount": 15 },
            "modelVersion": "gemini-2.5-flash-001"
        }))
        .unwrap();
        let c = read_answer(response, "gemini-2.5-flash").unwrap();
        assert_eq!(c.content, "Booked for 3 pm.");
        assert_eq!(c.model, "gemini-2.5-flash-001");
        assert_eq!(c.usage.total_tokens, 15);
    }

    #[test]
    fn blocked_and_empty_answers_are_failures_with_a_reason() {
        let safety: GenerateContentResponse = serde_json::from_value(json!({
            "candidates": [{ "finishReason": "SAFETY" }]
        }))
        .unwrap();
        assert_eq!(
            read_answer(safety, "m").unwrap_err().reason,
            FailureReason::Safety
        );
        let empty: GenerateContentResponse =
            serde_json::from_value(json!({ "candidates": [] })).unwrap();
        assert_eq!(
            read_answer(empty, "m").unwrap_err().reason,
            FailureReason::Empty
        );
        let blocked: GenerateContentResponse =
            serde_json::from_value(json!({ "promptFeedback": { "blockReason": "SAFETY" } }))
                .unwrap();
        assert_eq!(
            read_answer(blocked, "m").unwrap_err().reason,
            FailureReason::Safety
        );
    }

    #[test]
    fn server_sent_events_are_cut_at_blank_lines() {
        let mut pending = b"data: {\"a\":1}\r\n\r\ndata: {\"b\":".to_vec();
        assert_eq!(next_sse_event(&mut pending).as_deref(), Some("{\"a\":1}"));
        assert_eq!(next_sse_event(&mut pending), None);
        pending.extend_from_slice(b"2}\n\n");
        assert_eq!(next_sse_event(&mut pending).as_deref(), Some("{\"b\":2}"));
        assert!(pending.is_empty());
    }

    #[test]
    fn google_error_json_becomes_a_readable_message() {
        let body = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(
            describe_error(StatusCode::BAD_REQUEST, body),
            "gemini 400 INVALID_ARGUMENT: API key not valid. Please pass a valid API key."
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS),
            FailureReason::RateLimited
        );
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE),
            FailureReason::Unavailable
        );
        assert_eq!(classify(StatusCode::FORBIDDEN), FailureReason::Rejected);
    }
}
