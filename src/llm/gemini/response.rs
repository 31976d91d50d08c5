//! Reading `GenerateContentResponse`s into one answer
//! (ai.google.dev/api/generate-content#generatecontentresponse): one whole
//! response from `generateContent`, or the partial ones of a stream.
//!
//! What counts as an answer: a candidate that finished (`finishReason`) for a
//! reason other than safety, with text that is not a thought. A blocked prompt
//! (`promptFeedback.blockReason`, no candidates) or a withheld answer is a
//! safety failure; an answer that ends before its finish reason (a stream cut
//! short) is an incomplete attempt, worth another.

use serde::Deserialize;
use serde_json::Value;

use super::error;
use crate::{
    domain::conversation::Usage,
    llm::{AttemptError, Completion, Deltas, FailureReason},
};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GenerateContentResponse {
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
    /// Absent, not empty, when the model stopped before writing (MAX_TOKENS
    /// spent on thinking, SAFETY).
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Deserialize)]
struct Part {
    text: Option<String>,
    /// A thought summary (only sent when asked with `includeThoughts`), never
    /// part of the answer.
    #[serde(default)]
    thought: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

/// ai.google.dev/api/generate-content#UsageMetadata. `totalTokenCount` is what
/// is billed: the prompt (cached part included), tool-use prompts, the
/// candidates, and the thoughts, which `candidatesTokenCount` leaves out.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct UsageMetadata {
    prompt_token_count: u64,
    cached_content_token_count: u64,
    tool_use_prompt_token_count: u64,
    candidates_token_count: u64,
    thoughts_token_count: u64,
    total_token_count: u64,
}

impl UsageMetadata {
    /// As the service records usage: thinking is output (billed at the output
    /// rate), so it is counted in `completion_tokens`, and prompt plus
    /// completion is Google's total. A total larger than the parts we know is
    /// still what is billed; the difference is counted as completion.
    fn billed(&self) -> Usage {
        let prompt_tokens = self.prompt_token_count + self.tool_use_prompt_token_count;
        let completion = self.candidates_token_count + self.thoughts_token_count;
        let total_tokens = self.total_token_count.max(prompt_tokens + completion);
        if total_tokens != prompt_tokens + completion {
            tracing::debug!(
                ?self,
                "usage total beyond its parts; the rest counted as output"
            );
        }
        Usage {
            prompt_tokens,
            completion_tokens: total_tokens - prompt_tokens,
            total_tokens,
            thoughts_tokens: self.thoughts_token_count,
            cached_tokens: self.cached_content_token_count.min(prompt_tokens),
        }
    }
}

/// Finish reasons that mean the answer was withheld, not finished.
const WITHHELD: &[&str] = &[
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
];

/// An answer put together from one response, or from a stream of partial ones.
#[derive(Default)]
pub(super) struct Answer {
    text: String,
    /// Responses read so far.
    responses: usize,
    finish_reason: Option<String>,
    block_reason: Option<String>,
    usage: Option<UsageMetadata>,
    model_version: Option<String>,
}

impl Answer {
    /// One event of a stream: a partial response, or an error that ends the attempt.
    pub(super) fn read_event(
        &mut self,
        event: &str,
        deltas: Deltas<'_>,
    ) -> Result<(), AttemptError> {
        if event.trim().is_empty() {
            return Ok(());
        }
        let value: Value = serde_json::from_str(event).map_err(malformed)?;
        if let Some(error) = value.get("error") {
            return Err(error::from_event(error));
        }
        let response = GenerateContentResponse::deserialize(value).map_err(malformed)?;
        self.absorb(response, Some(deltas));
        Ok(())
    }

    /// Add one (partial) response; its answer text also goes to `deltas`.
    pub(super) fn absorb(&mut self, response: GenerateContentResponse, deltas: Option<Deltas<'_>>) {
        self.responses += 1;
        if let Some(reason) = response.prompt_feedback.and_then(|f| f.block_reason) {
            self.block_reason = Some(reason);
        }
        if let Some(candidate) = response.candidates.into_iter().next() {
            let answer_text = candidate
                .content
                .into_iter()
                .flat_map(|c| c.parts)
                .filter(|p| !p.thought)
                .filter_map(|p| p.text)
                .filter(|t| !t.is_empty());
            for text in answer_text {
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
    pub(super) fn finish(self, model: &str) -> Result<Completion, AttemptError> {
        if let Some(reason) = self.block_reason {
            return Err(AttemptError::new(
                FailureReason::Safety,
                format!("the prompt was blocked ({reason})"),
            ));
        }
        let Some(finish_reason) = self.finish_reason else {
            return Err(AttemptError::new(
                FailureReason::Transport,
                format!(
                    "the answer ended without a finish reason, after {} responses",
                    self.responses
                ),
            ));
        };
        if WITHHELD.contains(&finish_reason.as_str()) {
            return Err(AttemptError::new(
                FailureReason::Safety,
                format!("the answer was withheld (finish reason {finish_reason})"),
            ));
        }
        let usage = self.usage.unwrap_or_default();
        if self.text.trim().is_empty() {
            let thinking = match usage.thoughts_token_count {
                0 => String::new(),
                n => format!(", after {n} tokens of thinking"),
            };
            return Err(AttemptError::new(
                FailureReason::Empty,
                format!("the answer had no text (finish reason {finish_reason}{thinking})"),
            ));
        }
        Ok(Completion {
            content: self.text,
            model: self.model_version.unwrap_or_else(|| model.to_owned()),
            finish_reason,
            usage: usage.billed(),
        })
    }
}

pub(super) fn malformed(e: serde_json::Error) -> AttemptError {
    AttemptError::new(FailureReason::Malformed, format!("unreadable answer: {e}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;

    /// One whole response read as an answer.
    fn read(response: Value) -> Result<Completion, AttemptError> {
        let mut answer = Answer::default();
        answer.absorb(serde_json::from_value(response).unwrap(), None);
        answer.finish("gemini-2.5-flash")
    }

    /// A stream's events read as an answer, with the deltas it handed out.
    fn read_stream(events: &[Value]) -> (Result<Completion, AttemptError>, Vec<String>) {
        let pieces = Mutex::new(Vec::new());
        let deltas = |piece: &str| pieces.lock().unwrap().push(piece.to_owned());
        let mut answer = Answer::default();
        for event in events {
            if let Err(e) = answer.read_event(&event.to_string(), &deltas) {
                return (Err(e), pieces.into_inner().unwrap());
            }
        }
        (
            answer.finish("gemini-2.5-flash"),
            pieces.into_inner().unwrap(),
        )
    }

    #[test]
    fn an_answer_reads_its_text_finish_reason_and_usage() {
        let c = read(json!({
            "candidates": [{
                "content": { "role": "model", "parts": [{ "text": "Booked " }, { "text": "for 3 pm." }] },
                "finishReason": "STOP", "index": 0
            }],
            "usageMetadata": { "promptTokenCount": 11, "candidatesTokenCount": 4, "totalTokenCount": 15 },
            "modelVersion": "gemini-2.5-flash-001"
        }))
        .unwrap();
        assert_eq!(c.content, "Booked for 3 pm.");
        assert_eq!(c.model, "gemini-2.5-flash-001");
        assert_eq!(
            c.usage,
            Usage {
                prompt_tokens: 11,
                completion_tokens: 4,
                total_tokens: 15,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn thinking_is_billed_as_completion_and_never_shown() {
        let (c, deltas) = read_stream(&[
            json!({ "candidates": [{ "content": { "role": "model", "parts": [
                { "text": "**Checking the calendar**\n\nThe user wants…", "thought": true }] }, "index": 0 }] }),
            json!({ "candidates": [{ "content": { "role": "model", "parts": [{ "text": "" }, { "text": "Booked." }] },
                    "finishReason": "STOP", "index": 0 }],
                    "usageMetadata": { "promptTokenCount": 40, "cachedContentTokenCount": 32, "candidatesTokenCount": 3,
                                       "thoughtsTokenCount": 120, "totalTokenCount": 163 } }),
        ]);
        let c = c.unwrap();
        assert_eq!(c.content, "Booked.");
        assert_eq!(deltas, ["Booked."], "no thought and no empty delta");
        assert_eq!(
            c.usage,
            Usage {
                prompt_tokens: 40,
                completion_tokens: 123,
                total_tokens: 163,
                thoughts_tokens: 120,
                cached_tokens: 32,
            }
        );
    }

    #[test]
    fn blocked_withheld_and_empty_answers_are_failures_with_a_reason() {
        let blocked = read(json!({ "promptFeedback": { "blockReason": "PROHIBITED_CONTENT" },
                                   "usageMetadata": { "promptTokenCount": 9, "totalTokenCount": 9 } }))
        .unwrap_err();
        assert_eq!(blocked.reason, FailureReason::Safety);
        assert!(blocked.message.contains("PROHIBITED_CONTENT"));
        let withheld =
            read(json!({ "candidates": [{ "finishReason": "SAFETY", "index": 0 }] })).unwrap_err();
        assert_eq!(withheld.reason, FailureReason::Safety);
        let thought_out = read(json!({
            "candidates": [{ "content": { "role": "model" }, "finishReason": "MAX_TOKENS", "index": 0 }],
            "usageMetadata": { "promptTokenCount": 9, "thoughtsTokenCount": 256, "totalTokenCount": 265 }
        }))
        .unwrap_err();
        assert_eq!(
            (thought_out.reason, thought_out.message.as_str()),
            (
                FailureReason::Empty,
                "the answer had no text (finish reason MAX_TOKENS, after 256 tokens of thinking)"
            )
        );
    }

    #[test]
    fn a_stream_is_complete_only_with_its_finish_reason() {
        let (cut, deltas) = read_stream(&[json!({
            "candidates": [{ "content": { "role": "model", "parts": [{ "text": "Booked " }] }, "index": 0 }]
        })]);
        let cut = cut.unwrap_err();
        assert_eq!(cut.reason, FailureReason::Transport);
        assert!(cut.reason.retryable());
        assert_eq!(deltas, ["Booked "]);
        let (failed, _) = read_stream(&[
            json!({ "candidates": [{ "content": { "role": "model", "parts": [{ "text": "Booked " }] }, "index": 0 }] }),
            json!({ "error": { "code": 500, "message": "An internal error has occurred.", "status": "INTERNAL" } }),
        ]);
        let failed = failed.unwrap_err();
        assert_eq!(failed.reason, FailureReason::Unavailable);
        assert!(
            failed.message.starts_with("gemini 500 INTERNAL"),
            "{}",
            failed.message
        );
    }
}
