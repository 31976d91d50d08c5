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

use super::{AttemptError, Completion, FailureReason, Prompt, Provider, Role};
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
        let model = prompt.model.trim_start_matches("models/");
        let url = format!("{}/v1beta/models/{model}:generateContent", self.base_url);
        let response = self
            .http
            .post(&url)
            .header("x-goog-api-key", self.api_key.clone())
            .json(&request_body(prompt))
            .send()
            .await
            .map_err(|e| {
                // Without the URL: it names the model, and a proxy could add more.
                AttemptError::new(FailureReason::Transport, e.without_url().to_string())
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.bytes().await.map_err(|e| {
            AttemptError::new(FailureReason::Transport, e.without_url().to_string())
        })?;
        if !status.is_success() {
            let mut error = AttemptError::new(classify(status), describe_error(status, &body));
            error.retry_after = retry_after;
            return Err(error);
        }
        let response: GenerateContentResponse = serde_json::from_slice(&body).map_err(|e| {
            AttemptError::new(FailureReason::Malformed, format!("unreadable answer: {e}"))
        })?;
        read_answer(response, model)
    }
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

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    total_token_count: u64,
}

/// The first candidate's text, or why there is none.
fn read_answer(response: GenerateContentResponse, model: &str) -> Result<Completion, AttemptError> {
    if let Some(reason) = response.prompt_feedback.and_then(|f| f.block_reason) {
        return Err(AttemptError::new(
            FailureReason::Safety,
            format!("the prompt was blocked ({reason})"),
        ));
    }
    let Some(candidate) = response.candidates.into_iter().next() else {
        return Err(AttemptError::new(
            FailureReason::Empty,
            "the answer had no candidate",
        ));
    };
    let finish_reason = candidate
        .finish_reason
        .unwrap_or_else(|| "FINISH_REASON_UNSPECIFIED".into());
    let text: String = candidate
        .content
        .map(|c| c.parts.into_iter().filter_map(|p| p.text).collect())
        .unwrap_or_default();
    if matches!(
        finish_reason.as_str(),
        "SAFETY" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "SPII" | "RECITATION"
    ) {
        return Err(AttemptError::new(
            FailureReason::Safety,
            format!("the answer was withheld (finish reason {finish_reason})"),
        ));
    }
    if text.trim().is_empty() {
        return Err(AttemptError::new(
            FailureReason::Empty,
            format!("the answer had no text (finish reason {finish_reason})"),
        ));
    }
    let usage = response.usage_metadata.unwrap_or_default();
    Ok(Completion {
        content: text,
        model: response.model_version.unwrap_or_else(|| model.to_owned()),
        finish_reason,
        usage: Usage {
            prompt_tokens: usage.prompt_token_count,
            completion_tokens: usage.candidates_token_count,
            total_tokens: usage.total_token_count,
        },
    })
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
