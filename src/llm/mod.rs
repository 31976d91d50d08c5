//! Language models behind one trait. The replier builds a [`Prompt`] from the
//! assistant and the conversation, and [`retry::complete`] asks a [`Provider`]
//! for one [`Completion`], retrying what is worth retrying within a deadline.
//!
//! `offline` is the default: deterministic and needing no network. `gemini`
//! speaks Google's Generative Language REST API. Which one runs is chosen by
//! `LLM_PROVIDER`; each assistant's model name is passed through.

pub mod gemini;
pub mod offline;
pub mod prompt;
pub mod retry;

use std::time::Duration;

pub use prompt::{Prompt, Role, Turn};
pub use retry::{Failure, RetryPolicy, complete};

use crate::domain::conversation::Usage;

/// One answer of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    /// The model that answered (the provider's name for it).
    pub model: String,
    /// Why the model stopped, in the provider's words (`STOP`, `MAX_TOKENS`…).
    pub finish_reason: String,
    pub usage: Usage,
}

/// Why one attempt failed, and whether another might succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct AttemptError {
    pub reason: FailureReason,
    /// What went wrong, for the ReplyFailed event and the logs. Never a secret.
    pub message: String,
    /// The provider asked us to wait this long before trying again.
    pub retry_after: Option<Duration>,
    /// The provider's quota that ran out, when a rate limit says which: a
    /// per-day quota is not worth waiting for within one reply.
    pub quota: Option<Quota>,
}

impl AttemptError {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retry_after: None,
            quota: None,
        }
    }
}

/// The window of a quota the provider says is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// Requests or tokens per minute: refilled within the minute.
    PerMinute,
    /// Requests per day: refilled at the provider's midnight.
    PerDay,
}

/// Failure kinds: the `reason` label of `llm_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// 429: too many requests or quota.
    RateLimited,
    /// 5xx: the provider's trouble.
    Unavailable,
    /// The provider went quiet for longer than the idle timeout, or the
    /// reply's deadline passed during the attempt.
    Timeout,
    /// The connection failed, or a streamed answer ended before its finish reason.
    Transport,
    /// 400/401/403/404: the request, the key or the model is wrong.
    Rejected,
    /// The answer was blocked by the provider's safety filters.
    Safety,
    /// An answer without any candidate text.
    Empty,
    /// An answer we could not read.
    Malformed,
}

impl FailureReason {
    /// Every reason, so `llm_failures_total` shows each at 0 before it happens.
    pub const ALL: [FailureReason; 8] = [
        Self::RateLimited,
        Self::Unavailable,
        Self::Timeout,
        Self::Transport,
        Self::Rejected,
        Self::Safety,
        Self::Empty,
        Self::Malformed,
    ];

    /// Whether trying again could help.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited | Self::Unavailable | Self::Timeout | Self::Transport
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
            Self::Rejected => "rejected",
            Self::Safety => "safety",
            Self::Empty => "empty",
            Self::Malformed => "malformed",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a streaming attempt sends each piece of text as it arrives.
pub type Deltas<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// A language model: one attempt at answering a prompt. Retries, deadlines and
/// metrics are [`retry::complete`]'s, the same for every provider.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The `provider` label of the LLM metrics.
    fn name(&self) -> &'static str;

    async fn attempt(&self, prompt: &Prompt) -> Result<Completion, AttemptError>;

    /// The same answer, its text also handed to `deltas` piece by piece as the
    /// model produces it. Without a streaming API: the whole text in one piece.
    async fn attempt_streaming(
        &self,
        prompt: &Prompt,
        deltas: Deltas<'_>,
    ) -> Result<Completion, AttemptError> {
        let completion = self.attempt(prompt).await?;
        deltas(&completion.content);
        Ok(completion)
    }
}
