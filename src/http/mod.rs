//! The REST API (docs/api.md). Each resource owns its `router()`, an
//! `OpenApiRouter` whose routes carry their OpenAPI description; this module
//! merges them, serves the document (`/openapi.json`) and its viewer (`/docs`),
//! and wraps everything in the layers every request passes through.

mod admin;
mod assistants;
mod command;
mod conversations;
pub mod error;
mod extract;
mod health;
mod idempotency;
pub mod limits;
mod metrics;
mod openapi;
pub mod read;
mod reply;
mod stats;
mod stream;
pub(crate) mod users;

use std::{any::Any, time::Duration};

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    middleware,
};
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    set_header::SetResponseHeaderLayer,
    timeout::TimeoutLayer,
    trace::{DefaultOnResponse, TraceLayer},
};

use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::{app::Commands, auth::Tokens};
pub use error::ApiError;
pub use reply::CONSISTENCY_TOKEN;

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 1024 * 1024;
/// Longest a request may run before it is answered 408.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach, behind one `Arc`: axum clones the state for
/// every request, once per layer and extractor that holds it, and cloning the
/// fields themselves (a dozen `Arc`s, caches and clients, each counted up and
/// down again) was a sixth of the API's CPU per command (docs/benchmarks.md,
/// "HTTP commands").
#[derive(Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
#[derive(Clone)]
pub struct Shared {
    pub commands: Commands,
    pub tokens: Tokens,
    pub read: read::ReadSide,
    in_flight: idempotency::InFlight,
    /// Rebuilds started through the admin API, and who may start them.
    pub recovery: Option<crate::recovery::Rebuilds>,
    pub admin_emails: std::sync::Arc<[String]>,
    /// Rate limits of commands, sign-ups and logins (`limits`).
    pub limits: limits::Limits,
    /// How long a keyed request's response is kept for its retries.
    pub idempotency_ttl: std::time::Duration,
    /// Signing in, with the lockout of accounts after repeated failures.
    pub logins: crate::app::logins::Logins,
}

impl AppState {
    pub fn new(commands: Commands, tokens: Tokens, read: read::ReadSide) -> Self {
        Self(std::sync::Arc::new(Shared {
            tokens,
            read,
            in_flight: Default::default(),
            recovery: None,
            admin_emails: std::sync::Arc::new([]),
            limits: Default::default(),
            idempotency_ttl: std::time::Duration::from_secs(24 * 3600),
            logins: crate::app::logins::Logins::new(commands.clone(), 0, std::time::Duration::ZERO),
            commands,
        }))
    }

    /// The fields to set while the state is being built (before any clone).
    fn building(&mut self) -> &mut Shared {
        std::sync::Arc::make_mut(&mut self.0)
    }

    /// Lock an account's logins out after `max_failures` wrong passwords
    /// (none by default).
    pub fn with_login_lockout(mut self, max_failures: u32, lockout: std::time::Duration) -> Self {
        let commands = self.commands.clone();
        self.building().logins = crate::app::logins::Logins::new(commands, max_failures, lockout);
        self
    }

    /// Keep keyed responses for `ttl` (24 hours by default).
    pub fn with_idempotency_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.building().idempotency_ttl = ttl;
        self
    }

    /// With these rate limits (none by default).
    pub fn with_limits(mut self, limits: limits::Limits) -> Self {
        self.building().limits = limits;
        self
    }

    /// With rebuilds run in this process, and the administrators' emails.
    pub fn with_recovery(mut self, rebuilds: crate::recovery::Rebuilds, admins: &[String]) -> Self {
        let shared = self.building();
        shared.recovery = Some(rebuilds);
        shared.admin_emails = admins
            .iter()
            .map(|e| crate::domain::user::normalize_email(e))
            .filter(|e| !e.is_empty())
            .collect();
        self
    }
}

/// Where the OpenAPI document is served, and its viewer (Swagger UI, whose
/// assets are compiled into the binary: the page works offline).
pub const OPENAPI_PATH: &str = "/openapi.json";
pub const DOCS_PATH: &str = "/docs";

/// The whole HTTP surface: `/api/v1/...`, the unprefixed `/health`, `/ready`
/// and `/metrics`, and the API's document and docs page.
pub fn router(state: AppState, cors_origins: &[String]) -> Router {
    let (routes, doc) = api();
    // Before anything parses a body or hashes a password. (Only commands
    // are limited, and every route outside /api/v1 is a GET.)
    let routes = routes.layer(middleware::from_fn_with_state(
        state.clone(),
        limits::enforce,
    ));
    edge(with_docs(routes, doc), cors_origins).with_state(state)
}

/// Every route of the API and the OpenAPI document that describes them, from
/// one registration (each `routes!` gives both), so they cannot drift.
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::new()
        .merge(users::router())
        .merge(assistants::router())
        .merge(conversations::router())
        .merge(stream::router())
        .merge(stats::router())
        .merge(admin::router())
        // Every resource under /api/v1 is someone's own data (a token, a
        // profile, messages): no cache along the way may keep a copy.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ));
    let (routes, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .nest("/api/v1", api)
        .merge(health::router())
        .split_for_parts();
    openapi::complete(&mut doc);
    (routes, doc)
}

/// `routes` with the document at [`OPENAPI_PATH`], the docs page at
/// [`DOCS_PATH`], and the problem+json answers of an unknown route (404) and
/// of a method a route does not have (405).
pub fn with_docs(routes: Router<AppState>, doc: utoipa::openapi::OpenApi) -> Router<AppState> {
    routes
        .merge(SwaggerUi::new(DOCS_PATH).url(OPENAPI_PATH, doc))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this method is not allowed on this route".into())
        })
}

/// The layers every API request passes through, innermost first: the
/// Idempotency-Key fingerprint, the body limit (413), the timeout (408), a
/// caught panic (500, its cause logged, never shown), the request's log span,
/// the correlation id (a client's unusable `X-Request-Id` replaced, then set
/// and echoed), CORS, and outermost the RED metrics, so 408s and 500s are
/// counted too (a layer added with `Router::layer` still sees the route's
/// `MatchedPath`). Public so that tests can put a route of their own behind
/// exactly these layers.
pub fn edge<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    cors_origins: &[String],
) -> Router<S> {
    routes
        .layer(middleware::from_fn(idempotency::fingerprint))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        // Inside the span, so the panic's log line carries the correlation id.
        .layer(CatchPanicLayer::custom(|panic: Box<dyn Any + Send>| {
            let cause = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("a panic without a message");
            axum::response::IntoResponse::into_response(ApiError::Internal(anyhow::anyhow!(
                "handler panicked: {cause}"
            )))
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let route = request
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or(request.uri().path(), MatchedPath::as_str);
                    // `user_id` is filled in by the `AuthUser` extractor once the
                    // bearer token is verified; headers and bodies are never logged.
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        route,
                        correlation_id = %request_id(request.headers()),
                        user_id = tracing::field::Empty,
                    )
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(middleware::map_request(drop_unusable_request_id))
        .layer(cors(cors_origins))
        .layer(middleware::from_fn(metrics::track))
}

/// What a worker process (relay, projector, replier: no API) serves on BIND:
/// `/health` for the container's health check and `/metrics` for Prometheus.
pub fn ops_router() -> Router {
    Router::new()
        .route("/health", axum::routing::get(health::health))
        .route("/metrics", axum::routing::get(health::metrics))
        .fallback(|| async { ApiError::NotFound("route") })
        .layer(middleware::from_fn(metrics::track))
}

/// Longest client `X-Request-Id` taken as the correlation id.
const REQUEST_ID_MAX: usize = 128;

/// The correlation id: the request's `X-Request-Id`, which [`edge`] makes
/// sure is there and usable (the client's, or one it generated), so the log
/// span, the events' metadata and the echoed header all carry the same id.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| usable_request_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// 1 to 128 visible ASCII characters: what goes into logs and event metadata.
fn usable_request_id(id: &str) -> bool {
    (1..=REQUEST_ID_MAX).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Drop a client's `X-Request-Id` that is not usable (too long, empty, not
/// visible ASCII), so the request-id layer generates one instead: it is then
/// replaced, not echoed.
async fn drop_unusable_request_id(mut request: Request) -> Request {
    let unusable = request
        .headers()
        .get(REQUEST_ID)
        .is_some_and(|v| !v.to_str().is_ok_and(usable_request_id));
    if unusable {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

fn cors(origins: &[String]) -> CorsLayer {
    // `CORS_ORIGINS=https://a.example, https://b.example`: spaces are not part
    // of an origin, and an empty entry names none.
    let origins: Vec<HeaderValue> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            HeaderName::from_static("idempotency-key"),
            CONSISTENCY_TOKEN,
            REQUEST_ID,
        ])
        .expose_headers([
            header::ETAG,
            header::LOCATION,
            CONSISTENCY_TOKEN,
            REQUEST_ID,
        ])
        .max_age(Duration::from_secs(600))
}
