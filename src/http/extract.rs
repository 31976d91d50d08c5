//! Extractors that turn a request into what handlers need, refusing bad input
//! with the right problem: JSON bodies (400/413/415/422 with a pointer), the
//! bearer token (401), `If-Match` (412 later, 400 if unreadable), path ids (404),
//! and the correlation id every command carries into its events.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Request},
    http::{header, request::Parts},
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use super::{AppState, error::ApiError};
use crate::{app::Expected, auth::Tokens};

/// A JSON body, checked in the order a client would fix it: media type, size,
/// syntax, then shape (`errors[].pointer` names the offending field).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(content_type) {
            return Err(ApiError::UnsupportedMediaType(
                "the body must be JSON, sent with Content-Type: application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            match rejection.status().as_u16() {
                413 => ApiError::PayloadTooLarge {
                    limit: super::BODY_LIMIT,
                },
                _ => ApiError::BadRequest(rejection.body_text()),
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
        refuse_control_characters(&value, &mut String::new())?;
        serde_path_to_error::deserialize(value)
            .map(ApiJson)
            .map_err(|e| {
                let detail = e.inner().to_string();
                let mut pointer = json_pointer(e.path());
                // serde reports a missing field at its parent; point at the field.
                if let Some(field) = backticked(&detail)
                    && detail.starts_with("missing field")
                {
                    pointer = format!("{pointer}/{field}");
                }
                ApiError::invalid_field(&pointer, detail)
            })
    }
}

/// Refuse (422, pointing at the field) any string or key in the body that holds
/// a control character other than tab, line feed and carriage return: NUL and
/// the rest of C0, and DEL. No field of this API has a use for them, Postgres
/// cannot store NUL in text at all, and they make logs and terminals lie.
/// Fields that must stay on one line refuse tab and line breaks too, in the
/// domain's own validation.
fn refuse_control_characters(value: &Value, pointer: &mut String) -> Result<(), ApiError> {
    let forbidden = |s: &str| {
        s.chars()
            .any(|c| c.is_ascii_control() && !matches!(c, '\t' | '\n' | '\r'))
    };
    let refuse = |pointer: &str| {
        ApiError::invalid_field(
            pointer,
            "must not contain control characters (NUL, other C0 characters or DEL)",
        )
    };
    match value {
        Value::String(s) if forbidden(s) => Err(refuse(pointer)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = pointer.len();
                pointer.push_str(&format!("/{i}"));
                refuse_control_characters(item, pointer)?;
                pointer.truncate(len);
            }
            Ok(())
        }
        Value::Object(fields) => {
            for (key, item) in fields {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                if forbidden(key) {
                    return Err(refuse(pointer));
                }
                refuse_control_characters(item, pointer)?;
                pointer.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn json_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(format!("/{index}")),
            Segment::Map { key } => Some(format!("/{}", key.replace('~', "~0").replace('/', "~1"))),
            Segment::Enum { variant } => Some(format!("/{variant}")),
            Segment::Unknown => None,
        })
        .collect()
}

fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// An optional JSON body: none when the request has no body at all (no
/// `Content-Type`, nothing sent); otherwise as [`ApiJson`], errors and all.
impl<S: Send + Sync, T: DeserializeOwned> axum::extract::OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, ApiError> {
        let headers = req.headers();
        let empty = headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|length| length.as_bytes() == b"0");
        if empty && !headers.contains_key(header::CONTENT_TYPE) {
            return Ok(None);
        }
        <ApiJson<T> as FromRequest<S>>::from_request(req, state)
            .await
            .map(Some)
    }
}

/// The authenticated caller, from `Authorization: Bearer <token>`, whose account
/// still exists.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser(pub Uuid);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let SignedIn { user, .. } = SignedIn::from_request_parts(parts, state).await?;
        Ok(AuthUser(user))
    }
}

/// The authenticated caller and when their token was issued (for what asks
/// for a recent sign-in, like forgetting the account).
#[derive(Debug, Clone, Copy)]
pub struct SignedIn {
    pub user: Uuid,
    pub issued_at: chrono::DateTime<chrono::Utc>,
}

impl FromRequestParts<AppState> for SignedIn {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (user, issued_at) = bearer(&parts.headers, &state.tokens)?;
        // On the request span, so every log line of this request names the caller.
        tracing::Span::current().record("user_id", tracing::field::display(user));
        // A valid token of an account that no longer exists (forgotten, or lost
        // to a restore) opens nothing (asked of the store at most once a second
        // per account: `Commands::account_exists`).
        if !state.commands.account_exists(user).await? {
            return Err(ApiError::Unauthorized("the token's account does not exist"));
        }
        Ok(SignedIn { user, issued_at })
    }
}

/// The user a request's bearer token names and when it was issued, or why
/// there is none.
fn bearer(
    headers: &axum::http::HeaderMap,
    tokens: &Tokens,
) -> Result<(Uuid, chrono::DateTime<chrono::Utc>), ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::Unauthorized("a bearer token is required"))?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(ApiError::Unauthorized(
            "the Authorization header must be Bearer <token>",
        ))?;
    tokens
        .verify_issued(token.trim())
        .ok_or(ApiError::Unauthorized("the token is invalid or expired"))
}

/// The user a valid bearer token names, if any (for middleware that only
/// needs to know who is asking, and leaves refusing to the handler).
pub fn bearer_user(headers: &axum::http::HeaderMap, tokens: &Tokens) -> Option<Uuid> {
    bearer(headers, tokens).ok().map(|(user, _)| user)
}

/// `If-Match: "<version>"` as the version a command expects; absent or `*` is any.
pub struct IfMatch(pub Expected);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::IF_MATCH) else {
            return Ok(IfMatch(Expected::Any));
        };
        let value = value.to_str().unwrap_or("").trim();
        if value == "*" {
            return Ok(IfMatch(Expected::Any));
        }
        value
            .trim_matches('"')
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 0)
            .map(|v| IfMatch(Expected::Exactly(v)))
            .ok_or_else(|| {
                ApiError::BadRequest("If-Match must be an ETag this API issued, like \"3\"".into())
            })
    }
}

/// A resource id from the path; anything that is not a UUID names nothing (404).
pub struct IdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<Uuid>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| IdPath(id))
            .map_err(|_| ApiError::NotFound("resource"))
    }
}

/// The request's correlation id (`X-Request-Id`, given or generated).
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for CorrelationId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(CorrelationId(super::request_id(&parts.headers)))
    }
}
