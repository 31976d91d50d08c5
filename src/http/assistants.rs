//! Assistants (the secretaries): create, change, archive, restore, delete.
//! Command responses carry the write model's view; conversation and message
//! counts come from the read side's GET.

use ai_secretary_projections::{
    cache::Kind,
    read::{self, AssistantView, List},
};
use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::Response,
    routing::{get, post},
};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    AppState,
    command::{Caller, OnResource},
    error::ApiError,
    extract::{ApiJson, AuthUser, IdPath},
    read::{ConsistencyToken, ListParams},
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
        .route("/assistants", post(create).get(list))
        .route("/assistants/{id}", get(one).patch(update).delete(delete))
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

async fn archive(target: OnResource) -> Result<Response, ApiError> {
    let command = AssistantCommand::Archive {
        actor: target.user(),
        at: Utc::now(),
    };
    target
        .execute::<AssistantDecider>(command, render(StatusCode::OK))
        .await
}

async fn restore(target: OnResource) -> Result<Response, ApiError> {
    let command = AssistantCommand::Restore {
        actor: target.user(),
        at: Utc::now(),
    };
    target
        .execute::<AssistantDecider>(command, render(StatusCode::OK))
        .await
}

async fn delete(target: OnResource) -> Result<Response, ApiError> {
    let command = AssistantCommand::Delete {
        actor: target.user(),
        at: Utc::now(),
    };
    let render = |_: &AssistantState, _| Reply::no_content();
    target.execute::<AssistantDecider>(command, render).await
}

/// The caller's assistants with their activity, newest first by default.
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
            .query(|pool| read::assistants_of(pool, user, page))
            .await?,
    ))
}

/// One assistant with its activity, through the cache.
async fn one(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdPath(id): IdPath,
    token: ConsistencyToken,
) -> Result<Reply, ApiError> {
    let kind = (Kind::Assistant, "assistants", "assistant");
    state
        .read
        .one(&token, kind, id, user, |pool| {
            read::assistant_of(pool, user, id)
        })
        .await
}
