//! RED metrics for every request: `http_requests_total{method,path,status}` and
//! `http_request_duration_seconds{method,path}`, labelled by the route that
//! matched (`/api/v1/assistants/{id}`), never the raw path, so the number of
//! series stays bounded whatever clients send. A request no route matched is
//! labelled `unmatched`; an unusual method is labelled `other`.
//!
//! Duration runs until the response head is ready: for SSE that is the time to
//! open the stream, not its lifetime.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::Method,
    middleware::Next,
    response::Response,
};

/// The `path` label of a request no route matched.
pub const UNMATCHED: &str = "unmatched";

pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(
        "http_requests_total",
        "method" => method,
        "path" => path.clone(),
        "status" => status,
    )
    .increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method,
        "path" => path,
    )
    .record(started.elapsed().as_secs_f64());
    response
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
