//! Assistants (the secretaries): create, change, archive, restore, delete.
//! Command responses carry the write model's view; conversation and message
//! counts come from the read side's GET.

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    response::Response,
    routing::{patch, post},
};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    AppState,
    command::Invocation,
    error::ApiError,
    extract::{ApiJson, AuthUser, CorrelationId, IdPath, IfMatch},
    idempotency::IdempotencyKey,
    reply::Reply,
};
use crate::{
    app::Expected,
    domain::assistant::{
        AssistantCommand, AssistantDecider, AssistantFields, AssistantState, Metadata,
    },
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/assistants", post(create))
        .route("/assistants/{id}", patch(update).delete(delete))
        .route("/assistants/{id}/archive", post(archive))
        .route("/assistants/{id}/restore", post(restore))
}

/// Create and PATCH bodies: absent (or null) fields take defaults on create and
/// stay unchanged on PATCH.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssistantBody {
    name: Option<String>,
    role: Option<String>,
    instructions: Option<String>,
    model: Option<String>,
    temperature: Option<f64>,
    metadata: Option<Metadata>,
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
        AssistantState::Live(a) => json!({
            "id": a.id,
            "object": "assistant",
            "name": a.name,
            "role": a.role,
            "instructions": a.instructions,
            "model": a.model,
            "temperature": a.temperature,
            "metadata": a.metadata,
            "status": a.status,
            "created_at": a.created_at,
            "updated_at": a.updated_at,
            "version": version,
        }),
        _ => Value::Null,
    }
}

fn render(status: StatusCode) -> impl Fn(&AssistantState, i64) -> Reply + Sync {
    move |s, v| Reply::new(status, assistant_json(s, v)).version(v)
}

async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    CorrelationId(cid): CorrelationId,
    key: IdempotencyKey,
    ApiJson(body): ApiJson<AssistantBody>,
) -> Result<Response, ApiError> {
    let id = Uuid::now_v7();
    let command = AssistantCommand::Create {
        assistant_id: id,
        owner_id: user,
        fields: body.into(),
        at: Utc::now(),
    };
    let location = format!("/api/v1/assistants/{id}");
    let render =
        move |s: &AssistantState, v| render(StatusCode::CREATED)(s, v).location(location.clone());
    Invocation::by_owner(&state, user, cid, &key)
        .execute::<AssistantDecider>(id, Expected::Exactly(0), command, None, render)
        .await
}

async fn update(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    CorrelationId(cid): CorrelationId,
    IdPath(id): IdPath,
    IfMatch(expected): IfMatch,
    key: IdempotencyKey,
    ApiJson(body): ApiJson<AssistantBody>,
) -> Result<Response, ApiError> {
    let command = AssistantCommand::Update {
        actor: user,
        fields: body.into(),
        at: Utc::now(),
    };
    Invocation::by_owner(&state, user, cid, &key)
        .execute::<AssistantDecider>(id, expected, command, None, render(StatusCode::OK))
        .await
}

async fn archive(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    CorrelationId(cid): CorrelationId,
    IdPath(id): IdPath,
    IfMatch(expected): IfMatch,
    key: IdempotencyKey,
) -> Result<Response, ApiError> {
    let command = AssistantCommand::Archive {
        actor: user,
        at: Utc::now(),
    };
    Invocation::by_owner(&state, user, cid, &key)
        .execute::<AssistantDecider>(id, expected, command, None, render(StatusCode::OK))
        .await
}

async fn restore(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    CorrelationId(cid): CorrelationId,
    IdPath(id): IdPath,
    IfMatch(expected): IfMatch,
    key: IdempotencyKey,
) -> Result<Response, ApiError> {
    let command = AssistantCommand::Restore {
        actor: user,
        at: Utc::now(),
    };
    Invocation::by_owner(&state, user, cid, &key)
        .execute::<AssistantDecider>(id, expected, command, None, render(StatusCode::OK))
        .await
}

async fn delete(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    CorrelationId(cid): CorrelationId,
    IdPath(id): IdPath,
    IfMatch(expected): IfMatch,
    key: IdempotencyKey,
) -> Result<Response, ApiError> {
    let command = AssistantCommand::Delete {
        actor: user,
        at: Utc::now(),
    };
    let render = |_: &AssistantState, _| Reply::no_content();
    Invocation::by_owner(&state, user, cid, &key)
        .execute::<AssistantDecider>(id, expected, command, None, render)
        .await
}
