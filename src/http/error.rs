//! One error type for every handler, rendered as RFC 9457 problem+json.
//!
//! `?` works on domain, application and store errors through the `From` impls.
//! A 5xx keeps its cause in the log (with the request's correlation id, from the
//! surrounding span) and shows the client only a generic detail.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{
    app::{AppError, ReadError},
    domain::{DomainError, ErrorKind, FieldError},
    store::StoreError,
};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The body of every refusal and failure (RFC 9457), sent as
/// `application/problem+json`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "about:blank", "title": "Unprocessable Entity", "status": 422,
    "detail": "the request has invalid fields",
    "errors": [{"pointer": "/temperature", "detail": "must be between 0 and 2"}]
}))]
pub struct Problem {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    #[schema(example = "about:blank")]
    pub kind: &'static str,
    /// The status's reason phrase.
    pub title: &'static str,
    pub status: u16,
    /// What went wrong, for a person (a 5xx names no cause: it is logged).
    pub detail: String,
    /// On 422: each broken rule, with a JSON pointer (RFC 6901) into the body
    /// or, for a query parameter, `/<name>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    /// On 412: the version the resource is at (also sent as its ETag).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A decider's refusal of something absent (its message is the detail).
    #[error("{0}")]
    Missing(String),
    /// Only for the admin API: everything owner-scoped answers 404 instead.
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("the resource is at version {current}")]
    PreconditionFailed { current: i64 },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Another request with the same Idempotency-Key committed first.
    #[error("a request with this Idempotency-Key is in progress")]
    IdempotencyKeyTaken,
    #[error("{0}")]
    Unavailable(String),
    /// Over a rate limit (`http::limits`): come back after `retry_after`.
    #[error("{detail}")]
    TooManyRequests {
        detail: String,
        retry_after: std::time::Duration,
    },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn invalid(errors: Vec<FieldError>) -> Self {
        ApiError::Unprocessable {
            detail: "the request has invalid fields".into(),
            errors,
        }
    }

    pub fn invalid_field(pointer: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        ApiError::Unprocessable {
            detail: detail.clone(),
            errors: vec![FieldError {
                pointer: pointer.into(),
                detail,
            }],
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) | ApiError::Missing(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::IdempotencyKeyTaken => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "request failed");
                "an internal error occurred; it has been logged".to_owned()
            }
            other => other.to_string(),
        };
        let body = Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
            errors: match &self {
                ApiError::Unprocessable { errors, .. } => Some(errors.clone()),
                _ => None,
            },
            current_version: match &self {
                ApiError::PreconditionFailed { current } => Some(*current),
                _ => None,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::PreconditionFailed { current } => {
                if let Ok(v) = HeaderValue::from_str(&format!("\"{current}\"")) {
                    headers.insert(header::ETAG, v);
                }
            }
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                // Whole seconds, rounded up: retrying at once would be refused again.
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            _ => {}
        }
        response
    }
}

impl ApiError {
    /// A decider's refusal, by its kind: 422 with the broken fields, 404, 409.
    pub fn refused(e: &impl DomainError) -> Self {
        match e.kind() {
            ErrorKind::Invalid => ApiError::invalid(e.field_errors().to_vec()),
            ErrorKind::NotFound => ApiError::Missing(e.to_string()),
            ErrorKind::Conflict => ApiError::Conflict(e.to_string()),
        }
    }
}

impl<E: DomainError> From<AppError<E>> for ApiError {
    fn from(e: AppError<E>) -> Self {
        match e {
            AppError::Domain(e) => ApiError::refused(&e),
            AppError::PreconditionFailed { current } => ApiError::PreconditionFailed { current },
            AppError::Contended => ApiError::Conflict(e.to_string()),
            // The only reservation today is the account email.
            AppError::ReservationTaken { .. } => {
                ApiError::Conflict("an account with this email already exists".into())
            }
            AppError::IdempotencyKeyTaken => ApiError::IdempotencyKeyTaken,
            // Only the owner commands their data, and they no longer exist.
            AppError::OwnerForgotten => {
                ApiError::Unauthorized("the token's account does not exist")
            }
            AppError::Store(e) => e.into(),
            AppError::Codec(e) => ApiError::Internal(e.into()),
            AppError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Store(e) => e.into(),
            ReadError::Codec(e) => ApiError::Internal(e.into()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from(e).into()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => ApiError::Unavailable("the service is shutting down".into()),
            e if e.is_transient() => {
                tracing::warn!(error = %e, "database unavailable for this request; answered 503");
                ApiError::Unavailable(
                    "the database connection was interrupted or is busy; try again".into(),
                )
            }
            e => ApiError::Internal(e.into()),
        }
    }
}
