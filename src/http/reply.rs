//! A command's answer: status, JSON body, `ETag`, `Location` and the
//! `X-Consistency-Token` that lets a later query wait for the read side to catch up.
//! The same shape is stored for an `Idempotency-Key` and replayed from there.

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
    pub body: Option<Value>,
    pub etag: Option<i64>,
    pub location: Option<String>,
    pub position: Option<Position>,
}

impl Reply {
    pub fn new(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            body: Some(body),
            etag: None,
            location: None,
            position: None,
        }
    }

    /// A query's answer: 200 with the resource, its `version` as the ETag.
    pub fn found(body: Value) -> Self {
        let version = body.get("version").and_then(Value::as_i64);
        let mut reply = Self::new(StatusCode::OK, body);
        reply.etag = version;
        reply
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
            body: self.body.clone().unwrap_or(Value::Null),
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
            Some(body) => (self.status, axum::Json(body)).into_response(),
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
