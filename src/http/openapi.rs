//! The OpenAPI 3.1 document, generated from the code. Every route is registered
//! through `utoipa_axum`'s `OpenApiRouter` (`super::api`): one `routes!` call
//! gives the router its handler and the document its operation, so the two
//! cannot drift. Each handler's `#[utoipa::path]` says what is particular to it;
//! this module holds what they share: the document's header, the bearer scheme,
//! the parameters several routes take, and the refusals (problem+json) that
//! follow from what an operation takes, added by one rule instead of on every
//! route.

use axum::http::StatusCode;
use utoipa::{
    IntoParams, OpenApi,
    openapi::{
        self, ContentBuilder, HeaderBuilder, Ref, RefOr, ResponseBuilder,
        path::{HttpMethod, Operation, Parameter, ParameterIn},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use uuid::Uuid;

use super::error::{PROBLEM_JSON, Problem};
use crate::domain::FieldError;

/// The name of the bearer security scheme (each handler's `security(("bearer" = []))`).
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ai-secretary",
        description = "The REST API of the AI secretary team platform: accounts, assistants \
            (the secretaries), conversations with them, live updates (SSE) and usage. \
            docs/api.md in the repository is the guide to its conventions.",
        license(name = "MIT"),
    ),
    tags(
        (name = "users", description = "Accounts and bearer tokens"),
        (name = "assistants", description = "The secretaries: create, change, archive, restore, delete"),
        (name = "conversations", description = "Conversations with an assistant, their messages and live events"),
        (name = "stats", description = "Usage over days"),
        (name = "admin", description = "Operators: projections' progress and rebuilds (ADMIN_EMAILS only)"),
        (name = "operations", description = "Liveness, readiness and metrics (no /api/v1 prefix)"),
    ),
    components(schemas(Problem, FieldError)),
)]
pub struct ApiDoc;

/// `{id}` of a resource. Anything that is not a UUID names nothing (404).
#[derive(IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
pub struct IdParam(
    /// The resource's id.
    #[allow(dead_code)]
    Uuid,
);

/// `Idempotency-Key` of a command (a POST).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyParam {
    /// 1 to 255 visible ASCII characters chosen by the client. A retry with the
    /// same key gets the first response back (with `Idempotent-Replayed: true`);
    /// the same key with another request is refused (422); a retry while the
    /// first is still running gets 409. Keys expire after
    /// `IDEMPOTENCY_KEY_TTL_SECONDS` (a day).
    #[param(
        rename = "Idempotency-Key",
        pattern = r"^[\x21-\x7E]{1,255}$",
        example = "4b0c2f64-9a5e-4d1e-8f7a-3c2b1a0f9e8d"
    )]
    #[allow(dead_code)]
    idempotency_key: Option<String>,
}

/// `If-Match` of a change to a versioned resource.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatchParam {
    /// The ETag the client last saw (`"3"`): the change applies only to that
    /// version (412 with the current one otherwise). Absent or `*`: any version.
    #[param(
        rename = "If-Match",
        pattern = r#"^(\*|"?[0-9]{1,18}"?)$"#,
        example = "\"3\""
    )]
    #[allow(dead_code)]
    if_match: Option<String>,
}

/// `X-Consistency-Token` of a query.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ConsistencyParam {
    /// A command's `X-Consistency-Token`: the query waits (a few seconds at
    /// most, then 503 with `Retry-After`) until the read models it uses have
    /// applied that command. Read-your-writes on an eventually consistent read side.
    #[param(
        rename = "X-Consistency-Token",
        pattern = r"^[0-9]{1,18}\.[0-9]{1,18}$",
        example = "1042.877"
    )]
    #[allow(dead_code)]
    consistency_token: Option<String>,
}

/// The page of a list.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Items per page.
    #[param(minimum = 1, maximum = 100, default = 20)]
    #[allow(dead_code)]
    limit: Option<i64>,
    /// The page after this item (a `last_id`).
    #[allow(dead_code)]
    after: Option<Uuid>,
    /// The page before this item (a `first_id`); ignored when `after` is given.
    #[allow(dead_code)]
    before: Option<Uuid>,
    /// `desc` (newest first) or `asc`; each list has its default.
    #[param(value_type = Option<SortOrder>, inline)]
    #[allow(dead_code)]
    order: Option<String>,
}

/// A list's order.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum SortOrder {
    Asc,
    Desc,
}

/// Add the bearer scheme and, to every operation, the refusals its inputs can
/// earn and the headers its successes carry: one rule for the whole
/// document, so no route forgets one.
pub fn complete(doc: &mut openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "An access token from POST /api/v1/auth/token, sent as \
                     `Authorization: Bearer <token>`",
                ))
                .build(),
        ),
    );
    for refusal in REFUSALS {
        components
            .responses
            .insert(refusal.name.to_owned(), RefOr::T(refusal.response()));
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            (HttpMethod::Get, &mut item.get),
            (HttpMethod::Post, &mut item.post),
            (HttpMethod::Put, &mut item.put),
            (HttpMethod::Patch, &mut item.patch),
            (HttpMethod::Delete, &mut item.delete),
        ];
        for (method, operation) in operations {
            if let Some(operation) = operation {
                complete_operation(path, method, operation);
            }
        }
    }
}

/// A refusal the service may answer with, and when an operation can earn it.
struct Refusal {
    status: StatusCode,
    name: &'static str,
    description: &'static str,
    retry_after: bool,
    applies: fn(&Inputs) -> bool,
}

/// What an operation takes, as far as refusals go.
struct Inputs {
    api: bool,
    command: bool,
    authenticated: bool,
    body: bool,
    query: bool,
    path: bool,
    headers: Vec<String>,
}

impl Inputs {
    fn header(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h.eq_ignore_ascii_case(name))
    }
}

const REFUSALS: &[Refusal] = &[
    Refusal {
        status: StatusCode::BAD_REQUEST,
        name: "BadRequest",
        description: "Malformed: JSON that does not parse, a query string that does not, or a \
            header (If-Match, Idempotency-Key, X-Consistency-Token) this API did not issue",
        retry_after: false,
        applies: |i| {
            i.body
                || i.query
                || ["If-Match", "Idempotency-Key", "X-Consistency-Token"]
                    .iter()
                    .any(|h| i.header(h))
        },
    },
    Refusal {
        status: StatusCode::UNAUTHORIZED,
        name: "Unauthorized",
        description: "No bearer token, an invalid or expired one, or one whose account no \
            longer exists (`WWW-Authenticate: Bearer`)",
        retry_after: false,
        applies: |i| i.authenticated,
    },
    Refusal {
        status: StatusCode::NOT_FOUND,
        name: "NotFound",
        description: "No such resource among the caller's own: another user's id answers \
            404 too, never 403",
        retry_after: false,
        applies: |i| i.path,
    },
    Refusal {
        status: StatusCode::REQUEST_TIMEOUT,
        name: "RequestTimeout",
        description: "The request took longer than 30 s",
        retry_after: false,
        applies: |i| i.api,
    },
    Refusal {
        status: StatusCode::PRECONDITION_FAILED,
        name: "PreconditionFailed",
        description: "If-Match names another version than the current one (its ETag and \
            `current_version` say which)",
        retry_after: false,
        applies: |i| i.header("If-Match"),
    },
    Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        name: "PayloadTooLarge",
        description: "The body is larger than 1 MiB",
        retry_after: false,
        applies: |i| i.body,
    },
    Refusal {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        name: "UnsupportedMediaType",
        description: "The body is not sent as `application/json`",
        retry_after: false,
        applies: |i| i.body,
    },
    Refusal {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        name: "UnprocessableContent",
        description: "A field or parameter breaks a rule: `errors[]` lists each, with a JSON \
            pointer to it",
        retry_after: false,
        applies: |i| i.body || i.query || i.header("Idempotency-Key"),
    },
    Refusal {
        status: StatusCode::TOO_MANY_REQUESTS,
        name: "TooManyRequests",
        description: "Over a rate limit (commands per user, sign-ups and logins per client \
            address, or an account locked after failed logins): `Retry-After` says when to \
            come back",
        retry_after: true,
        applies: |i| i.api && i.command,
    },
    Refusal {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        name: "InternalServerError",
        description: "A fault of the service (logged with the request's correlation id); \
            never the client's input",
        retry_after: false,
        applies: |i| i.api,
    },
    Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        name: "ServiceUnavailable",
        description: "The database is unreachable or busy, the service is shutting down, or \
            the read side has not reached X-Consistency-Token in time: retry after \
            `Retry-After`",
        retry_after: true,
        applies: |i| i.api,
    },
];

impl Refusal {
    fn response(&self) -> openapi::Response {
        let example = serde_json::json!({
            "type": "about:blank",
            "title": self.status.canonical_reason(),
            "status": self.status.as_u16(),
            "detail": "what went wrong, for a person to read",
        });
        let mut response = ResponseBuilder::new()
            .description(self.description)
            .content(
                PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .example(Some(example))
                    .build(),
            );
        if self.retry_after {
            response = response.header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(Some(
                        openapi::ObjectBuilder::new()
                            .schema_type(openapi::Type::Integer)
                            .minimum(Some(1)),
                    ))
                    .description(Some("Seconds to wait before trying again"))
                    .build(),
            );
        }
        response.build()
    }
}

/// Give one operation the refusals its inputs can earn and, if it is a
/// command, the `X-Consistency-Token` of its successes.
fn complete_operation(path: &str, method: HttpMethod, operation: &mut Operation) {
    let parameters: Vec<&Parameter> = (operation.parameters.iter().flatten())
        .filter_map(|p| match p {
            RefOr::T(p) => Some(p),
            RefOr::Ref(_) => None,
        })
        .collect();
    let takes = |place: ParameterIn| parameters.iter().any(|p| p.parameter_in == place);
    let inputs = Inputs {
        api: path.starts_with("/api/"),
        command: !matches!(method, HttpMethod::Get),
        authenticated: operation.security.as_ref().is_some_and(|s| !s.is_empty()),
        body: operation.request_body.is_some(),
        query: takes(ParameterIn::Query),
        path: takes(ParameterIn::Path),
        headers: parameters
            .iter()
            .filter(|p| p.parameter_in == ParameterIn::Header)
            .map(|p| p.name.clone())
            .collect(),
    };
    let responses = &mut operation.responses.responses;
    // A command (it takes If-Match or Idempotency-Key) names the position of
    // its last event in every success, for read-your-writes.
    if inputs.header("If-Match") || inputs.header("Idempotency-Key") {
        for (_, response) in responses.iter_mut().filter(|(s, _)| s.starts_with('2')) {
            if let RefOr::T(response) = response {
                response.headers.insert(
                    "X-Consistency-Token".to_owned(),
                    HeaderBuilder::new()
                        .schema(Some(
                            openapi::ObjectBuilder::new()
                                .schema_type(openapi::Type::String)
                                .pattern(Some(r"^[0-9]+\.[0-9]+$")),
                        ))
                        .description(Some(
                            "The position of the command's last event: sent back on a \
                             query, it waits until the read side has applied it",
                        ))
                        .build()
                        .into(),
                );
            }
        }
    }
    for refusal in REFUSALS.iter().filter(|r| (r.applies)(&inputs)) {
        // What a handler says of a status itself stands.
        responses
            .entry(refusal.status.as_str().to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(refusal.name)));
    }
}
