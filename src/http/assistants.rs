//! Assistants (the secretaries): create, change, archive, restore, delete.
//! Command responses carry the write model's view; conversation and message
//! counts come from the read side's GET.

use ai_secretary_projections::{
    cache::Kind,
    read::{self, AssistantView, List},
};
use axum::{Json, extract::State, http::StatusCode, response::Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    command::{Caller, OnResource},
    error::{ApiError, Problem},
    extract::{ApiJson, AuthUser, IdPath},
    openapi::{ConsistencyParam, IdParam, IdempotencyParam, IfMatchParam, ListParams as Page},
    read::{ConsistencyToken, ListParams},
    reply::Reply,
};
use crate::{
    app::Expected,
    domain::assistant::{
        AssistantCommand, AssistantDecider, AssistantFields, AssistantState, AssistantStatus,
        Metadata,
    },
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(one, update, delete))
        .routes(routes!(archive))
        .routes(routes!(restore))
}

/// Create and PATCH bodies: absent (or null) fields take defaults on create and
/// stay unchanged on PATCH.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "Ada", "role": "secretary", "instructions": "Keep my diary.",
    "model": "gemini-2.5-flash", "temperature": 0.7, "metadata": {"team": "sales"}
}))]
struct AssistantBody {
    /// 1 to 100 characters, one line (required on create).
    #[schema(max_length = 100)]
    name: Option<String>,
    /// Up to 100 characters, one line; `secretary` by default.
    #[schema(max_length = 100)]
    role: Option<String>,
    /// Up to 20,000 characters: the system prompt of the assistant's replies.
    #[schema(max_length = 20000)]
    instructions: Option<String>,
    /// The LLM model, e.g. `gemini-2.5-flash` (the default).
    #[schema(max_length = 100, pattern = "^[A-Za-z0-9._/-]+$")]
    model: Option<String>,
    /// 0 to 2; 0.7 by default.
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f64>,
    /// Up to 16 pairs of strings: keys 1 to 64 characters, values up to 512.
    metadata: Option<Metadata>,
}

/// An assistant as a command leaves it. Its activity (conversation and
/// message counts) is the read side's: `GET` has it.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "id": "0193a5c0-7d2e-7cc1-9a51-2f1e0e6c1a01", "object": "assistant", "name": "Ada",
    "role": "secretary", "instructions": "Keep my diary.", "model": "gemini-2.5-flash",
    "temperature": 0.7, "metadata": {"team": "sales"}, "status": "active",
    "created_at": "2026-11-30T09:00:00Z", "updated_at": "2026-11-30T09:00:00Z", "version": 1
}))]
struct AssistantSettings<'a> {
    id: Uuid,
    /// Always `assistant`.
    #[schema(example = "assistant")]
    object: &'static str,
    name: &'a str,
    role: &'a str,
    instructions: &'a str,
    model: &'a str,
    temperature: f64,
    metadata: &'a Metadata,
    status: AssistantStatus,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The assistant's version (its ETag, for If-Match).
    version: i64,
}

impl From<AssistantBody> for AssistantFields {
    fn from(b: AssistantBody) -> Self {
        AssistantFields {
            name: b.name,
            role: b.role,
            instructions: b.instructions,
            model: b.model,
            temperature: b.temperature,
            metadata: b.metadata,
        }
    }
}

fn assistant_json(state: &AssistantState, version: i64) -> Value {
    match state {
        AssistantState::Live(a) => serde_json::to_value(AssistantSettings {
            id: a.id,
            object: "assistant",
            name: &a.name,
            role: &a.role,
            instructions: &a.instructions,
            model: &a.model,
            temperature: a.temperature,
            metadata: &a.metadata,
            status: a.status,
            created_at: a.created_at,
            updated_at: a.updated_at,
            version,
        })
        .unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn render(status: StatusCode) -> impl Fn(&AssistantState, i64) -> Reply + Sync {
    move |s, v| Reply::new(status, assistant_json(s, v)).version(v)
}

/// Create an assistant.
#[utoipa::path(
    post,
    path = "/assistants",
    tag = "assistants",
    security(("bearer" = [])),
    params(IdempotencyParam),
    request_body = AssistantBody,
    responses(
        (status = 201, description = "The assistant", body = AssistantSettings, headers(
            ("ETag" = String, description = "The assistant's version, quoted"),
            ("Location" = String, description = "/api/v1/assistants/{id}"),
        )),
    ),
)]
async fn create(
    caller: Caller,
    ApiJson(body): ApiJson<AssistantBody>,
) -> Result<Response, ApiError> {
    let id = Uuid::now_v7();
    let command = AssistantCommand::Create {
        assistant_id: id,
        owner_id: caller.user,
        fields: body.into(),
        at: Utc::now(),
    };
    let location = format!("/api/v1/assistants/{id}");
    let render =
        move |s: &AssistantState, v| render(StatusCode::CREATED)(s, v).location(location.clone());
    caller
        .execute::<AssistantDecider>(id, Expected::New, command, render)
        .await
}

/// Change an assistant's settings: the fields given, the others as they are.
#[utoipa::path(
    patch,
    path = "/assistants/{id}",
    tag = "assistants",
    security(("bearer" = [])),
    params(IdParam, IfMatchParam),
    request_body = AssistantBody,
    responses(
        (status = 200, description = "The assistant as changed", body = AssistantSettings, headers(
            ("ETag" = String, description = "The assistant's new version, quoted"),
        )),
        (status = 409, description = "The assistant is archived", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
async fn update(
    target: OnResource,
    ApiJson(body): ApiJson<AssistantBody>,
) -> Result<Response, ApiError> {
    let command = AssistantCommand::Update {
        actor: target.user(),
        fields: body.into(),
        at: Utc::now(),
    };
    target
        .execute::<AssistantDecider>(command, render(StatusCode::OK))
        .await
}

/// Archive an assistant: it keeps its conversations but takes no new ones.
#[utoipa::path(
    post,
    path = "/assistants/{id}/archive",
    tag = "assistants",
    security(("bearer" = [])),
    params(IdParam, IfMatchParam, IdempotencyParam),
    responses(
        (status = 200, description = "The archived assistant", body = AssistantSettings, headers(
            ("ETag" = String, description = "The assistant's new version, quoted"),
        )),
        (status = 409, description = "Already archived", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
async fn archive(target: OnResource) -> Result<Response, ApiError> {
    let command = AssistantCommand::Archive {
        actor: target.user(),
        at: Utc::now(),
    };
    target
        .execute::<AssistantDecider>(command, render(StatusCode::OK))
        .await
}

/// Restore an archived assistant.
#[utoipa::path(
    post,
    path = "/assistants/{id}/restore",
    tag = "assistants",
    security(("bearer" = [])),
    params(IdParam, IfMatchParam, IdempotencyParam),
    responses(
        (status = 200, description = "The active assistant", body = AssistantSettings, headers(
            ("ETag" = String, description = "The assistant's new version, quoted"),
        )),
        (status = 409, description = "Not archived", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
async fn restore(target: OnResource) -> Result<Response, ApiError> {
    let command = AssistantCommand::Restore {
        actor: target.user(),
        at: Utc::now(),
    };
    target
        .execute::<AssistantDecider>(command, render(StatusCode::OK))
        .await
}

/// Delete an assistant.
#[utoipa::path(
    delete,
    path = "/assistants/{id}",
    tag = "assistants",
    security(("bearer" = [])),
    params(IdParam, IfMatchParam),
    responses((status = 204, description = "Deleted")),
)]
async fn delete(target: OnResource) -> Result<Response, ApiError> {
    let command = AssistantCommand::Delete {
        actor: target.user(),
        at: Utc::now(),
    };
    let render = |_: &AssistantState, _| Reply::no_content();
    target.execute::<AssistantDecider>(command, render).await
}

/// The caller's assistants with their activity, newest first by default.
#[utoipa::path(
    get,
    path = "/assistants",
    tag = "assistants",
    security(("bearer" = [])),
    params(Page, ConsistencyParam),
    responses((status = 200, description = "A page of assistants", body = List<AssistantView>)),
)]
async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    token: ConsistencyToken,
    ListParams(page): ListParams,
) -> Result<Json<List<AssistantView>>, ApiError> {
    state.read.catch_up(&token, &["assistants"]).await?;
    Ok(Json(
        state
            .read
            .query(|db| read::assistants_of(db, user, page))
            .await?,
    ))
}

/// One assistant with its activity, through the cache.
#[utoipa::path(
    get,
    path = "/assistants/{id}",
    tag = "assistants",
    security(("bearer" = [])),
    params(IdParam, ConsistencyParam),
    responses(
        (status = 200, description = "The assistant", body = AssistantView, headers(
            ("ETag" = String, description = "The assistant's version, quoted"),
        )),
    ),
)]
async fn one(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdPath(id): IdPath,
    token: ConsistencyToken,
) -> Result<Reply, ApiError> {
    let kind = (Kind::Assistant, "assistants", "assistant");
    state
        .read
        .one(&token, kind, id, user, |db| {
            read::assistant_of(db, user, id)
        })
        .await
}
