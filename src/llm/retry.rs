//! Asking a provider until it answers, it refuses for good, or time runs out:
//! exponential backoff with full jitter (at least what `Retry-After` asks),
//! bounded attempts, a per-request timeout and an overall deadline. The LLM
//! metrics are recorded here, the same for every provider.

use std::time::{Duration, Instant};

use super::{AttemptError, Completion, FailureReason, Prompt, Provider};

/// Receives the text of a streaming answer as it comes: `(attempt, piece)`. A
/// retry starts again from its first piece, under the next attempt number.
pub type DeltaSink<'a> = &'a (dyn Fn(u32, &str) + Send + Sync);

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most attempts for one reply.
    pub max_attempts: u32,
    /// Longest one request may take.
    pub request_timeout: Duration,
    /// Longest all attempts together may take, waits included.
    pub deadline: Duration,
    /// The first backoff; each retry doubles it (up to `max_backoff`).
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            request_timeout: Duration::from_secs(30),
            deadline: Duration::from_secs(90),
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
        }
    }
}

/// The last error after the provider was given up on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{last} (after {attempts} attempts)")]
pub struct Failure {
    pub last: AttemptError,
    pub attempts: u32,
    /// Whether the same request could succeed later (the reason was transient).
    pub retryable: bool,
}

/// One completion of `prompt`, or the reason there is none.
/// With `deltas`, the provider is asked to stream and each piece is passed on.
pub async fn complete(
    provider: &dyn Provider,
    prompt: &Prompt,
    policy: &RetryPolicy,
    deltas: Option<DeltaSink<'_>>,
) -> Result<(Completion, u32), Failure> {
    let started = Instant::now();
    let labels = [("provider", provider.name())];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let remaining = policy.deadline.saturating_sub(started.elapsed());
        let timeout = policy.request_timeout.min(remaining);
        let asked = Instant::now();
        let asking = async {
            match deltas {
                Some(sink) => {
                    let this_attempt = attempt;
                    let forward = move |piece: &str| sink(this_attempt, piece);
                    provider.attempt_streaming(prompt, &forward).await
                }
                None => provider.attempt(prompt).await,
            }
        };
        let result = match tokio::time::timeout(timeout, asking).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::new(
                FailureReason::Timeout,
                format!("no answer within {} ms", timeout.as_millis()),
            )),
        };
        metrics::histogram!("llm_request_duration_seconds", &labels)
            .record(asked.elapsed().as_secs_f64());
        let error = match result {
            Ok(completion) => {
                metrics::counter!("llm_tokens_total", "kind" => "prompt")
                    .increment(completion.usage.prompt_tokens);
                metrics::counter!("llm_tokens_total", "kind" => "completion")
                    .increment(completion.usage.completion_tokens);
                return Ok((completion, attempt));
            }
            Err(error) => error,
        };
        metrics::counter!("llm_failures_total", "reason" => error.reason.as_str()).increment(1);
        let retryable = error.reason.retryable();
        let give_up = |last: AttemptError| Failure {
            last,
            attempts: attempt,
            retryable,
        };
        if !retryable || attempt >= policy.max_attempts {
            return Err(give_up(error));
        }
        let wait = backoff(policy, attempt).max(error.retry_after.unwrap_or_default());
        let remaining = policy.deadline.saturating_sub(started.elapsed());
        if wait >= remaining {
            tracing::debug!(reason = %error.reason, "no time left for another attempt");
            return Err(give_up(error));
        }
        tracing::debug!(reason = %error.reason, attempt, wait_ms = wait.as_millis() as u64, "retrying the model");
        tokio::time::sleep(wait).await;
    }
}

/// Full jitter: a random wait up to base × 2^(attempt-1), capped.
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let ceiling = policy
        .base_backoff
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(policy.max_backoff);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::domain::conversation::Usage;

    /// A provider that answers from a script, one entry per attempt.
    struct Scripted(Mutex<Vec<Result<Completion, AttemptError>>>);

    #[async_trait::async_trait]
    impl Provider for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        async fn attempt(&self, _: &Prompt) -> Result<Completion, AttemptError> {
            self.0.lock().unwrap().remove(0)
        }
    }

    fn ok() -> Result<Completion, AttemptError> {
        Ok(Completion {
            content: "hi".into(),
            model: "m".into(),
            finish_reason: "STOP".into(),
            usage: Usage::default(),
        })
    }

    fn err(reason: FailureReason) -> Result<Completion, AttemptError> {
        Err(AttemptError::new(reason, "scripted"))
    }

    fn prompt() -> Prompt {
        Prompt {
            model: "m".into(),
            system: String::new(),
            turns: vec![],
            temperature: 0.0,
            top_p: None,
            max_output_tokens: None,
            assistant_name: String::new(),
            assistant_role: String::new(),
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            base_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_an_answer() {
        let provider = Scripted(Mutex::new(vec![
            err(FailureReason::RateLimited),
            err(FailureReason::Unavailable),
            ok(),
        ]));
        let (_, attempts) = complete(&provider, &prompt(), &fast(), None).await.unwrap();
        assert_eq!(attempts, 3);
    }

    #[tokio::test]
    async fn a_rejection_is_final_at_once() {
        let provider = Scripted(Mutex::new(vec![err(FailureReason::Rejected), ok()]));
        let failure = complete(&provider, &prompt(), &fast(), None)
            .await
            .unwrap_err();
        assert_eq!((failure.attempts, failure.retryable), (1, false));
    }

    #[tokio::test]
    async fn attempts_are_bounded() {
        let provider = Scripted(Mutex::new(vec![
            err(FailureReason::Unavailable),
            err(FailureReason::Unavailable),
            err(FailureReason::Unavailable),
            err(FailureReason::Unavailable),
            ok(),
        ]));
        let failure = complete(&provider, &prompt(), &fast(), None)
            .await
            .unwrap_err();
        assert_eq!(failure.attempts, 4);
        assert!(failure.retryable);
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_deadline_ends_the_attempts() {
        let mut limited = AttemptError::new(FailureReason::RateLimited, "slow down");
        limited.retry_after = Some(Duration::from_secs(3600));
        let provider = Scripted(Mutex::new(vec![Err(limited), ok()]));
        let started = Instant::now();
        let failure = complete(&provider, &prompt(), &fast(), None)
            .await
            .unwrap_err();
        assert_eq!(failure.attempts, 1);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy::default();
        for attempt in 1..20 {
            let ceiling =
                (policy.base_backoff * 2u32.pow((attempt - 1).min(16))).min(policy.max_backoff);
            assert!(backoff(&policy, attempt) <= ceiling);
        }
    }
}
