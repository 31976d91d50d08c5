//! A command's answer: status, JSON body, `ETag`, `Location` and the
//! `X-Consistency-Token` that lets a later query wait for the read side to catch up.
//! The same shape is stored for an `Idempotency-Key` and replayed from there.

use ai_secretary_projections::cache::CachedJson;
use axum::{
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::Value;

use crate::store::{Position, StoredResponse};

pub const CONSISTENCY_TOKEN: HeaderName = HeaderName::from_static("x-consistency-token");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Option<Body>,
    pub etag: Option<i64>,
    pub location: Option<String>,
    pub position: Option<Position>,
}

/// A reply's JSON: built by the handler, or as the cache keeps it (sent as
/// it is, without parsing it again).
#[derive(Debug, Clone)]
pub enum Body {
    Built(Value),
    Cached(CachedJson),
}

impl Reply {
    pub fn new(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            body: Some(Body::Built(body)),
            etag: None,
            location: None,
            position: None,
        }
    }

    /// A query's answer: 200 with the resource (as the cache keeps it), its
    /// `version` as the ETag.
    pub fn found(resource: CachedJson) -> Self {
        Self {
            status: StatusCode::OK,
            etag: resource.version(),
            body: Some(Body::Cached(resource)),
            location: None,
            position: None,
        }
    }

    pub fn no_content() -> Self {
        Self {
            status: StatusCode::NO_CONTENT,
            body: None,
            etag: None,
            location: None,
            position: None,
        }
    }

    pub fn version(mut self, version: i64) -> Self {
        self.etag = Some(version);
        self
    }

    pub fn location(mut self, location: String) -> Self {
        self.location = Some(location);
        self
    }

    pub fn at(mut self, position: Option<Position>) -> Self {
        self.position = position;
        self
    }

    /// The form kept for idempotent replay (the position is filled in by the store).
    pub fn to_stored(&self) -> StoredResponse {
        let mut headers = Vec::new();
        if let Some(v) = self.etag {
            headers.push((header::ETAG.to_string(), etag(v)));
        }
        if let Some(l) = &self.location {
            headers.push((header::LOCATION.to_string(), l.clone()));
        }
        StoredResponse {
            status: self.status.as_u16(),
            headers,
            body: match &self.body {
                Some(Body::Built(json)) => json.clone(),
                Some(Body::Cached(json)) => json.to_value(),
                None => Value::Null,
            },
            position: self.position,
        }
    }

    /// A stored first response, sent again.
    pub fn replay(stored: StoredResponse) -> Response {
        let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
        let mut response = match stored.body {
            Value::Null => status.into_response(),
            body => (status, axum::Json(body)).into_response(),
        };
        let headers = response.headers_mut();
        for (name, value) in stored.headers {
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(&value)) {
                headers.insert(n, v);
            }
        }
        set_position(headers, stored.position);
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }
}

/// What `axum::Json` says of its body, said of a cached one too.
const JSON: HeaderValue = HeaderValue::from_static("application/json");

pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

fn set_position(headers: &mut HeaderMap, position: Option<Position>) {
    if let Some(p) = position
        && let Ok(v) = HeaderValue::from_str(&p.to_string())
    {
        headers.insert(CONSISTENCY_TOKEN, v);
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Some(Body::Built(json)) => (self.status, axum::Json(json)).into_response(),
            Some(Body::Cached(json)) => (
                self.status,
                [(header::CONTENT_TYPE, JSON)],
                json.text().clone(),
            )
                .into_response(),
            None => self.status.into_response(),
        };
        let headers = response.headers_mut();
        if let Some(v) = self.etag
            && let Ok(v) = HeaderValue::from_str(&etag(v))
        {
            headers.insert(header::ETAG, v);
        }
        if let Some(l) = self.location
            && let Ok(v) = HeaderValue::from_str(&l)
        {
            headers.insert(header::LOCATION, v);
        }
        set_position(headers, self.position);
        response
    }
}
