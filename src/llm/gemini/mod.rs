//! Google Gemini through its REST API: `POST {base}/v1beta/{model}:generateContent`,
//! or `:streamGenerateContent?alt=sse`, with the key in `x-goog-api-key` (never
//! in the URL, so it cannot reach a log).
//!
//! One call is one attempt; `retry::complete` decides what to do with a
//! failure. The pieces: [`request`] builds the body (thinking included),
//! [`response`] reads answers, [`error`] reads Google's errors and what they say
//! about waiting, [`sse`] cuts a stream into events.
//!
//! Timeouts are idle timeouts: the wait for the response head, and then for
//! each next piece of the body, is bounded by `idle_timeout`; a long answer that
//! keeps streaming is not cut. (The reply's deadline still bounds everything.)

mod error;
mod request;
mod response;
mod sse;

use std::{borrow::Cow, time::Duration};

use futures_util::{Stream, StreamExt};
use reqwest::header::HeaderValue;

use super::{AttemptError, Completion, Deltas, FailureReason, Prompt, Provider};
use crate::config::Secret;
use response::{Answer, GenerateContentResponse, malformed};

pub struct Gemini {
    http: reqwest::Client,
    base_url: String,
    /// Marked sensitive: never printed by reqwest's or our Debug output.
    api_key: HeaderValue,
    /// Longest silence from Google: before the response head, and between two
    /// pieces of the body.
    idle_timeout: Duration,
}

impl Gemini {
    pub fn new(base_url: &str, api_key: &Secret, idle_timeout: Duration) -> anyhow::Result<Self> {
        let mut api_key = HeaderValue::from_str(api_key.expose())
            .map_err(|_| anyhow::anyhow!("GEMINI_API_KEY is not a valid header value"))?;
        api_key.set_sensitive(true);
        Ok(Self {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            idle_timeout,
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
        let body = self.read_to_end(response).await?;
        let response: GenerateContentResponse = serde_json::from_slice(&body).map_err(malformed)?;
        let mut answer = Answer::default();
        answer.absorb(response, None);
        answer.finish(model)
    }

    /// Each server-sent event is a partial `GenerateContentResponse`; the last
    /// carries the finish reason and the usage.
    async fn attempt_streaming(
        &self,
        prompt: &Prompt,
        deltas: Deltas<'_>,
    ) -> Result<Completion, AttemptError> {
        let (response, model) = self.post(prompt, "streamGenerateContent?alt=sse").await?;
        let mut body = response.bytes_stream();
        let mut events = sse::Events::default();
        let mut answer = Answer::default();
        while let Some(piece) = self.next_piece(&mut body).await? {
            events.push(&piece);
            while let Some(event) = events.next_event() {
                answer.read_event(&event, deltas)?;
            }
        }
        if let Some(event) = events.rest() {
            answer.read_event(&event, deltas)?;
        }
        answer.finish(model)
    }
}

impl Gemini {
    /// POST the prompt to `{model}:{method}`; an HTTP error becomes the
    /// attempt's error. Returns the response and the model's name as asked.
    async fn post<'p>(
        &self,
        prompt: &'p Prompt,
        method: &str,
    ) -> Result<(reqwest::Response, &'p str), AttemptError> {
        let resource = resource_name(&prompt.model)?;
        let url = format!("{}/v1beta/{resource}:{method}", self.base_url);
        let sending = self
            .http
            .post(&url)
            .header("x-goog-api-key", self.api_key.clone())
            .json(&request::body(prompt))
            .send();
        let response = tokio::time::timeout(self.idle_timeout, sending)
            .await
            .map_err(|_| self.quiet("no response"))?
            .map_err(transport)?;
        let status = response.status();
        let model = prompt
            .model
            .strip_prefix("models/")
            .unwrap_or(&prompt.model);
        if status.is_success() {
            return Ok((response, model));
        }
        let headers = response.headers().clone();
        let body = self.read_to_end(response).await?;
        Err(error::from_response(status, &headers, &body))
    }

    /// The next piece of a body, waiting for it at most the idle timeout.
    async fn next_piece<B: AsRef<[u8]>>(
        &self,
        body: &mut (impl Stream<Item = reqwest::Result<B>> + Unpin),
    ) -> Result<Option<B>, AttemptError> {
        match tokio::time::timeout(self.idle_timeout, body.next()).await {
            Err(_) => Err(self.quiet("the answer stopped coming")),
            Ok(None) => Ok(None),
            Ok(Some(piece)) => piece.map(Some).map_err(transport),
        }
    }

    async fn read_to_end(&self, response: reqwest::Response) -> Result<Vec<u8>, AttemptError> {
        let mut body = response.bytes_stream();
        let mut all = Vec::new();
        while let Some(piece) = self.next_piece(&mut body).await? {
            all.extend_from_slice(&piece);
        }
        Ok(all)
    }

    fn quiet(&self, what: &str) -> AttemptError {
        AttemptError::new(
            FailureReason::Timeout,
            format!(
                "{what}: Gemini was silent for {} ms",
                self.idle_timeout.as_millis()
            ),
        )
    }
}

/// The model's resource name: a bare id is one of `models/`; a name that
/// already says its collection (`models/…`, `tunedModels/…`) is used as given.
/// Empty, `.` and `..` segments are refused before any request.
fn resource_name(model: &str) -> Result<Cow<'_, str>, AttemptError> {
    let sound = model
        .split('/')
        .all(|segment| !matches!(segment, "" | "." | ".."));
    if !sound {
        return Err(AttemptError::new(
            FailureReason::Rejected,
            format!("{model:?} is not a Gemini model name"),
        ));
    }
    Ok(if model.contains('/') {
        Cow::Borrowed(model)
    } else {
        Cow::Owned(format!("models/{model}"))
    })
}

fn transport(e: reqwest::Error) -> AttemptError {
    let reason = if e.is_timeout() {
        FailureReason::Timeout
    } else {
        FailureReason::Transport
    };
    // Without the URL: it names the model, and a proxy could add more.
    AttemptError::new(reason, e.without_url().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_with_a_collection_are_used_as_given() {
        assert_eq!(
            resource_name("gemini-2.5-flash").unwrap(),
            "models/gemini-2.5-flash"
        );
        assert_eq!(
            resource_name("models/gemini-2.5-flash").unwrap(),
            "models/gemini-2.5-flash"
        );
        assert_eq!(
            resource_name("tunedModels/mika-7").unwrap(),
            "tunedModels/mika-7"
        );
        for bad in ["", "models/", "models/../files/x", "a//b", "."] {
            assert_eq!(
                resource_name(bad).unwrap_err().reason,
                FailureReason::Rejected,
                "{bad:?}"
            );
        }
    }
}
