//! Google's error envelope and what it says about trying again.
//!
//! Every error, whether an HTTP status or an event inside a stream, is a
//! `google.rpc.Status` as JSON: `{"error": {"code", "message", "status",
//! "details": [...]}}`. A 429 says how long to wait in its details, as a
//! `google.rpc.RetryInfo` with `retryDelay` (a protobuf Duration such as `"22s"`),
//! and which quota ran out in a `google.rpc.QuotaFailure` (`violations[].quotaId`,
//! such as `GenerateRequestsPerDayPerProjectPerModel-FreeTier`). Gemini sends no
//! `Retry-After` header; one from a proxy in between is honoured too.
//! References: ai.google.dev/gemini-api/docs/troubleshooting and
//! ai.google.dev/gemini-api/docs/rate-limits; googleapis/python-genai `errors.py`.

use std::time::{Duration, SystemTime};

use reqwest::{
    StatusCode,
    header::{HeaderMap, RETRY_AFTER},
};
use serde::Deserialize;
use serde_json::Value;

use crate::llm::{AttemptError, FailureReason, Quota};

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";
const QUOTA_FAILURE: &str = "type.googleapis.com/google.rpc.QuotaFailure";

/// The `error` object of Google's envelope. Every field may be missing.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Status {
    /// The HTTP status it stands for (inside a stream, where the HTTP one was 200).
    code: u16,
    message: String,
    /// The canonical code's name: `RESOURCE_EXHAUSTED`, `UNAVAILABLE`…
    status: String,
    /// `google.rpc.*` messages, each with its `@type`; read one by one, so one
    /// of an unexpected shape does not hide the others.
    details: Vec<Value>,
}

#[derive(Deserialize)]
struct Envelope {
    error: Status,
}

/// The attempt's error for an HTTP error response.
pub(super) fn from_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> AttemptError {
    let mut error = match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { mut error }) => {
            error.code = status.as_u16();
            from_status(error)
        }
        Err(_) => AttemptError::new(
            classify(status.as_u16(), ""),
            format!("gemini {}", status.as_u16()),
        ),
    };
    if let Some(asked) = retry_after_header(headers) {
        error.retry_after = Some(error.retry_after.map_or(asked, |d| d.max(asked)));
    }
    error
}

/// The attempt's error for `{"error": …}` sent as an event of a stream.
pub(super) fn from_event(error: &Value) -> AttemptError {
    match Status::deserialize(error) {
        Ok(status) => {
            let mut error = from_status(status);
            error.message = format!("{} (inside the stream)", error.message);
            error
        }
        Err(e) => AttemptError::new(
            FailureReason::Malformed,
            format!("an error event we could not read: {e}"),
        ),
    }
}

/// `gemini 429 RESOURCE_EXHAUSTED: You exceeded your current quota… [quota
/// GenerateRequestsPerMinutePerProjectPerModel]`, classified, with the wait and
/// the quota window its details give.
fn from_status(status: Status) -> AttemptError {
    let mut retry_after = None;
    let mut quota_ids = Vec::new();
    for detail in &status.details {
        match detail.get("@type").and_then(Value::as_str) {
            Some(RETRY_INFO) => {
                retry_after = detail
                    .get("retryDelay")
                    .and_then(Value::as_str)
                    .and_then(protobuf_duration);
            }
            Some(QUOTA_FAILURE) => quota_ids.extend(
                detail
                    .get("violations")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.get("quotaId").and_then(Value::as_str)),
            ),
            _ => {}
        }
    }
    let mut message = format!(
        "gemini {} {}: {}",
        status.code, status.status, status.message
    );
    if !quota_ids.is_empty() {
        message = format!("{message} [quota {}]", quota_ids.join(", "));
    }
    let mut error = AttemptError::new(classify(status.code, &status.status), message);
    error.retry_after = retry_after;
    error.quota = quota_window(&quota_ids);
    error
}

/// Gemini's documented classes: 429 is a quota (wait and retry), 5xx the
/// service's trouble (retry), 400/403/404 the caller's to fix. An error event
/// without a code is classified by its canonical name.
pub(super) fn classify(code: u16, status: &str) -> FailureReason {
    match (code, status) {
        (429, _) | (0, "RESOURCE_EXHAUSTED") => FailureReason::RateLimited,
        (408, _) | (0, "DEADLINE_EXCEEDED") => FailureReason::Timeout,
        (500..=599, _) | (0, "UNAVAILABLE" | "INTERNAL") => FailureReason::Unavailable,
        _ => FailureReason::Rejected,
    }
}

/// A per-day violation outweighs per-minute ones listed beside it: no wait
/// within a reply brings a spent daily quota back, whatever `retryDelay` says.
fn quota_window(quota_ids: &[&str]) -> Option<Quota> {
    if quota_ids.iter().any(|id| id.contains("PerDay")) {
        Some(Quota::PerDay)
    } else if quota_ids.iter().any(|id| id.contains("PerMinute")) {
        Some(Quota::PerMinute)
    } else {
        None
    }
}

/// A protobuf `Duration` in its JSON form: seconds with up to nine decimals and
/// an `s` (`"22s"`, `"1.5s"`). One too long to represent is as long as can be:
/// a wait no deadline allows, not a wait to ignore.
fn protobuf_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    if seconds.is_nan() || seconds < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
}

/// `Retry-After` in either of its forms: seconds, or an HTTP date.
fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;
    use serde_json::json;

    use super::*;

    /// A 429 as Google sends it for a spent per-minute quota (form of the bodies
    /// reported in googleapis/python-genai#2044 and the rate-limits page).
    fn per_minute_429() -> Value {
        json!({ "error": {
            "code": 429,
            "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                { "@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": { "location": "global", "model": "gemini-2.5-flash" },
                    "quotaValue": "10" }] },
                { "@type": "type.googleapis.com/google.rpc.Help", "links": [{
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits" }] },
                { "@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "22s" }
            ]
        }})
    }

    fn read(status: u16, body: &Value, headers: HeaderMap) -> AttemptError {
        from_response(
            StatusCode::from_u16(status).unwrap(),
            &headers,
            body.to_string().as_bytes(),
        )
    }

    #[test]
    fn a_429_waits_as_its_retry_info_says_and_names_the_quota() {
        let error = read(429, &per_minute_429(), HeaderMap::new());
        assert_eq!(error.reason, FailureReason::RateLimited);
        assert_eq!(error.retry_after, Some(Duration::from_secs(22)));
        assert_eq!(error.quota, Some(Quota::PerMinute));
        assert!(
            error
                .message
                .starts_with("gemini 429 RESOURCE_EXHAUSTED: You exceeded your current quota"),
            "{}",
            error.message
        );
        assert!(
            error
                .message
                .ends_with("[quota GenerateRequestsPerMinutePerProjectPerModel-FreeTier]")
        );
    }

    #[test]
    fn a_daily_violation_makes_it_a_daily_quota_whatever_else_is_listed() {
        let mut body = per_minute_429();
        body["error"]["details"][0]["violations"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier" }));
        assert_eq!(
            read(429, &body, HeaderMap::new()).quota,
            Some(Quota::PerDay)
        );
    }

    #[test]
    fn a_retry_after_header_counts_when_it_asks_for_longer() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("30"));
        assert_eq!(
            read(429, &per_minute_429(), headers).retry_after,
            Some(Duration::from_secs(30))
        );
        let mut headers = HeaderMap::new();
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(40));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&soon).unwrap());
        let asked = read(503, &json!({}), headers).retry_after.unwrap();
        assert!(asked > Duration::from_secs(38) && asked <= Duration::from_secs(40));
    }

    #[test]
    fn retry_delays_read_as_protobuf_durations() {
        assert_eq!(protobuf_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(protobuf_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(
            protobuf_duration("0.000340012s"),
            Some(Duration::from_nanos(340_012))
        );
        assert_eq!(protobuf_duration("22"), None);
        assert_eq!(protobuf_duration("-1s"), None);
        assert_eq!(protobuf_duration("NaNs"), None);
        assert_eq!(protobuf_duration("1e30s"), Some(Duration::MAX));
    }

    #[test]
    fn errors_are_classified_by_code_or_by_name() {
        let key = json!({ "error": { "code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT" } });
        let error = read(400, &key, HeaderMap::new());
        assert_eq!(
            (error.reason, error.message.as_str()),
            (
                FailureReason::Rejected,
                "gemini 400 INVALID_ARGUMENT: API key not valid. Please pass a valid API key."
            )
        );
        assert_eq!(
            read(502, &json!("<html>bad gateway</html>"), HeaderMap::new()).message,
            "gemini 502"
        );
        assert_eq!(classify(503, "UNAVAILABLE"), FailureReason::Unavailable);
        assert_eq!(classify(0, "INTERNAL"), FailureReason::Unavailable);
        assert_eq!(
            classify(0, "RESOURCE_EXHAUSTED"),
            FailureReason::RateLimited
        );
        assert_eq!(classify(403, "PERMISSION_DENIED"), FailureReason::Rejected);
        let event = from_event(
            &json!({ "code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE" }),
        );
        assert_eq!(event.reason, FailureReason::Unavailable);
        assert!(event.message.ends_with("(inside the stream)"));
    }
}
