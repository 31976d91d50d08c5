//! Asking a provider until it answers, it refuses for good, or time runs out:
//! exponential backoff with full jitter (at least the wait the provider asks
//! for), bounded attempts and an overall deadline. A spent quota that will not
//! come back within the deadline ends the attempts at once. The LLM metrics are
//! recorded here, the same for every provider.

use std::time::{Duration, Instant};

use super::{AttemptError, Completion, FailureReason, Prompt, Provider, Quota};

/// Receives the text of a streaming answer as it comes: `(attempt, piece)`. A
/// retry starts again from its first piece, under the next attempt number.
pub type DeltaSink<'a> = &'a (dyn Fn(u32, &str) + Send + Sync);

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most attempts for one reply.
    pub max_attempts: u32,
    /// Longest all attempts together may take, waits included. (How long one
    /// attempt may stay silent is the provider's idle timeout.)
    pub deadline: Duration,
    /// The first backoff; each retry doubles it (up to `max_backoff`).
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
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
        let result = match tokio::time::timeout(remaining, asking).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::new(
                FailureReason::Timeout,
                format!(
                    "the reply's deadline ({} ms) passed during the attempt",
                    policy.deadline.as_millis()
                ),
            )),
        };
        metrics::histogram!("llm_request_duration_seconds", &labels)
            .record(asked.elapsed().as_secs_f64());
        let error = match result {
            Ok(completion) => {
                count_tokens(&completion);
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
        if !retryable {
            return Err(give_up(error));
        }
        let provider_name = provider.name();
        if error.quota == Some(Quota::PerDay) {
            record_quota(provider_name, "daily", None);
            return Err(give_up(quota_spent(error, "the daily quota is spent")));
        }
        if attempt >= policy.max_attempts {
            return Err(give_up(error));
        }
        let wait = backoff(policy, attempt).max(error.retry_after.unwrap_or_default());
        let remaining = policy.deadline.saturating_sub(started.elapsed());
        let quota_wait = error.reason == FailureReason::RateLimited && error.retry_after.is_some();
        if wait >= remaining {
            tracing::debug!(reason = %error.reason, "no time left for another attempt");
            if !quota_wait {
                return Err(give_up(error));
            }
            record_quota(provider_name, "past_deadline", None);
            let why = format!(
                "the wait asked for ({} s) is past the reply's deadline ({} s left)",
                wait.as_secs_f64().ceil(),
                remaining.as_secs_f64().floor()
            );
            return Err(give_up(quota_spent(error, &why)));
        }
        if quota_wait {
            record_quota(provider_name, "waited", Some(wait));
        }
        tracing::debug!(reason = %error.reason, attempt, wait_ms = wait.as_millis() as u64, "retrying the model");
        tokio::time::sleep(wait).await;
    }
}

/// `llm_tokens_total` by kind. The kinds do not overlap, so they add up to the
/// total billed: `prompt` (not from cache), `cached`, `completion` (the answer),
/// `thoughts` (thinking, billed as output).
fn count_tokens(completion: &Completion) {
    let usage = &completion.usage;
    for (kind, tokens) in [
        (
            "prompt",
            usage.prompt_tokens.saturating_sub(usage.cached_tokens),
        ),
        ("cached", usage.cached_tokens),
        (
            "completion",
            usage
                .completion_tokens
                .saturating_sub(usage.thoughts_tokens),
        ),
        ("thoughts", usage.thoughts_tokens),
    ] {
        metrics::counter!("llm_tokens_total", "kind" => kind).increment(tokens);
    }
}

/// `llm_quota_waits_total{outcome}`: what became of a spent quota, `waited`
/// (then `llm_quota_wait_seconds` has the wait), `past_deadline` or `daily`.
fn record_quota(provider: &'static str, outcome: &'static str, waited: Option<Duration>) {
    metrics::counter!("llm_quota_waits_total", "provider" => provider, "outcome" => outcome)
        .increment(1);
    if let Some(waited) = waited {
        metrics::histogram!("llm_quota_wait_seconds", "provider" => provider)
            .record(waited.as_secs_f64());
    }
}

/// The error a reply fails with when a quota will not come back in time: it
/// says so first, then what the provider said.
fn quota_spent(mut error: AttemptError, why: &str) -> AttemptError {
    error.message = format!("quota: {why}; {}", error.message);
    error
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
            thinking: None,
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

    fn quota_spent(
        quota: Option<Quota>,
        retry_after: Duration,
    ) -> Result<Completion, AttemptError> {
        let mut limited =
            AttemptError::new(FailureReason::RateLimited, "gemini 429 RESOURCE_EXHAUSTED");
        limited.retry_after = Some(retry_after);
        limited.quota = quota;
        Err(limited)
    }

    #[tokio::test]
    async fn a_spent_quota_that_outlasts_the_deadline_fails_at_once_saying_so() {
        let provider = Scripted(Mutex::new(vec![
            quota_spent(Some(Quota::PerMinute), Duration::from_secs(47)),
            ok(),
        ]));
        let started = Instant::now();
        let thirty_seconds = RetryPolicy {
            deadline: Duration::from_secs(30),
            ..fast()
        };
        let failure = complete(&provider, &prompt(), &thirty_seconds, None)
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!((failure.attempts, failure.retryable), (1, true));
        assert!(
            failure.last.to_string().starts_with(
                "rate_limited: quota: the wait asked for (47 s) is past the reply's deadline (29 s left)"
            ),
            "{}",
            failure.last
        );
        assert!(
            failure
                .last
                .message
                .ends_with("gemini 429 RESOURCE_EXHAUSTED")
        );
    }

    #[tokio::test]
    async fn a_daily_quota_is_not_waited_for_even_when_a_short_wait_is_asked() {
        let provider = Scripted(Mutex::new(vec![
            quota_spent(Some(Quota::PerDay), Duration::from_secs(5)),
            ok(),
        ]));
        let failure = complete(&provider, &prompt(), &fast(), None)
            .await
            .unwrap_err();
        assert_eq!((failure.attempts, failure.retryable), (1, true));
        assert!(
            failure
                .last
                .message
                .starts_with("quota: the daily quota is spent; "),
            "{}",
            failure.last
        );
        // Said so even when no retry was allowed anyway.
        let provider = Scripted(Mutex::new(vec![quota_spent(
            Some(Quota::PerDay),
            Duration::from_secs(5),
        )]));
        let one_attempt = RetryPolicy {
            max_attempts: 1,
            ..fast()
        };
        let failure = complete(&provider, &prompt(), &one_attempt, None)
            .await
            .unwrap_err();
        assert!(
            failure
                .last
                .message
                .starts_with("quota: the daily quota is spent; ")
        );
    }

    #[tokio::test]
    async fn a_per_minute_quota_is_waited_out_as_asked() {
        let provider = Scripted(Mutex::new(vec![
            quota_spent(Some(Quota::PerMinute), Duration::from_millis(300)),
            ok(),
        ]));
        let started = Instant::now();
        let (_, attempts) = complete(&provider, &prompt(), &fast(), None).await.unwrap();
        assert_eq!(attempts, 2);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn an_attempt_is_cut_by_the_deadline_not_before() {
        struct Slow;
        #[async_trait::async_trait]
        impl Provider for Slow {
            fn name(&self) -> &'static str {
                "slow"
            }
            async fn attempt(&self, _: &Prompt) -> Result<Completion, AttemptError> {
                tokio::time::sleep(Duration::from_millis(400)).await;
                ok()
            }
        }
        let roomy = RetryPolicy {
            deadline: Duration::from_secs(2),
            ..fast()
        };
        assert!(complete(&Slow, &prompt(), &roomy, None).await.is_ok());
        let tight = RetryPolicy {
            deadline: Duration::from_millis(100),
            ..fast()
        };
        let failure = complete(&Slow, &prompt(), &tight, None).await.unwrap_err();
        assert_eq!(failure.last.reason, FailureReason::Timeout);
        assert_eq!(failure.attempts, 1);
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
