//! Conversations: start one with an assistant, rename, archive, and post messages
//! (each post records the user's message and requests the assistant's reply).

use ai_secretary_projections::{
    cache::Kind,
    read::{self, ConversationFilter, ConversationView, List, MessageView},
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
    read::{ConsistencyToken, ListParams, RawQuery},
    reply::Reply,
};
use crate::domain::conversation::{ConversationCommand, ConversationDecider, ConversationState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/conversations", post(start).get(list))
        .route("/conversations/{id}", get(one).patch(rename))
        .route("/conversations/{id}/archive", post(archive))
        .route(
            "/conversations/{id}/messages",
            post(post_message).get(messages),
        )
}

/// A conversation as its own stream knows it: what replies add later (their
/// tokens, the time of the last answer) comes from `GET` (docs/decisions.md).
fn conversation_json(state: &ConversationState, version: i64) -> Value {
    match state {
        ConversationState::Live(c) => json!({
            "id": c.id,
            "object": "conversation",
            "assistant_id": c.assistant_id,
            "title": c.title,
            "status": c.status,
            "message_count": c.message_count,
            "created_at": c.created_at,
            "updated_at": c.updated_at,
            "version": version,
        }),
        ConversationState::Absent => Value::Null,
    }
}

fn render(status: StatusCode) -> impl Fn(&ConversationState, i64) -> Reply + Sync {
    move |s, v| Reply::new(status, conversation_json(s, v)).version(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    assistant_id: Option<Uuid>,
    title: Option<String>,
}

async fn start(caller: Caller, ApiJson(body): ApiJson<StartBody>) -> Result<Response, ApiError> {
    let assistant_id = body
        .assistant_id
        .ok_or_else(|| ApiError::invalid_field("/assistant_id", "is required"))?;
    let (id, actor, at) = (Uuid::now_v7(), caller.user, Utc::now());
    let location = format!("/api/v1/conversations/{id}");
    let render = move |s: &ConversationState, v| {
        render(StatusCode::CREATED)(s, v).location(location.clone())
    };
    let commands = caller.commands().clone();
    caller
        .invocation()
        .run(render, move |context, remember| {
            Box::pin(async move {
                commands
                    .start_conversation(id, actor, assistant_id, body.title, at, context, remember)
                    .await
            })
        })
        .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameBody {
    title: Option<String>,
}

async fn rename(
    target: OnResource,
    ApiJson(body): ApiJson<RenameBody>,
) -> Result<Response, ApiError> {
    let title = body
        .title
        .ok_or_else(|| ApiError::invalid_field("/title", "is required"))?;
    let command = ConversationCommand::Rename {
        actor: target.user(),
        title,
        at: Utc::now(),
    };
    target
        .execute::<ConversationDecider>(command, render(StatusCode::OK))
        .await
}

async fn archive(target: OnResource) -> Result<Response, ApiError> {
    let command = ConversationCommand::Archive {
        actor: target.user(),
        at: Utc::now(),
    };
    target
        .execute::<ConversationDecider>(command, render(StatusCode::OK))
        .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    #[serde(default)]
    content: String,
}

/// 202: the message is recorded and the reply is queued for the replier.
async fn post_message(
    target: OnResource,
    ApiJson(body): ApiJson<MessageBody>,
) -> Result<Response, ApiError> {
    let (id, message_id, reply_id, at) = (target.id, Uuid::now_v7(), Uuid::now_v7(), Utc::now());
    let command = ConversationCommand::PostMessage {
        actor: target.user(),
        message_id,
        reply_id,
        content: body.content.clone(),
        at,
    };
    let content = body.content;
    let render = move |_: &ConversationState, v: i64| {
        let body = json!({
            "message": {
                "id": message_id,
                "object": "message",
                "conversation_id": id,
                "role": "user",
                "content": content,
                "status": "completed",
                "created_at": at,
            },
            "reply": {
                "id": reply_id,
                "object": "message",
                "conversation_id": id,
                "role": "assistant",
                "reply_to": message_id,
                "status": "queued",
                "created_at": at,
            },
        });
        Reply::new(StatusCode::ACCEPTED, body).version(v)
    };
    target.execute::<ConversationDecider>(command, render).await
}

/// The caller's conversations, newest first by default; `?assistant_id` and
/// `?status` filter.
async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    token: ConsistencyToken,
    RawQuery(raw): RawQuery,
) -> Result<Json<List<ConversationView>>, ApiError> {
    let ListParams(page) = ListParams::parse(&raw, true)?;
    let filter = ConversationFilter {
        assistant_id: raw
            .get("assistant_id")
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::invalid_field("/assistant_id", "must be an assistant id")
                })
            })
            .transpose()?,
        status: match raw.get("status").map(String::as_str) {
            None => None,
            Some(s @ ("active" | "archived")) => Some(s.to_owned()),
            Some(_) => {
                return Err(ApiError::invalid_field(
                    "/status",
                    "must be active or archived",
                ));
            }
        },
    };
    state.read.catch_up(&token, &["conversations"]).await?;
    Ok(Json(
        state
            .read
            .query(|pool| read::conversations_of(pool, user, &filter, page))
            .await?,
    ))
}

/// One conversation, through the cache.
async fn one(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdPath(id): IdPath,
    token: ConsistencyToken,
) -> Result<Reply, ApiError> {
    let kind = (Kind::Conversation, "conversations", "conversation");
    state
        .read
        .one(&token, kind, id, user, |pool| {
            read::conversation_of(pool, user, id)
        })
        .await
}

/// A conversation's user messages and replies, oldest first by default.
async fn messages(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdPath(id): IdPath,
    token: ConsistencyToken,
    RawQuery(raw): RawQuery,
) -> Result<Json<List<MessageView>>, ApiError> {
    let ListParams(page) = ListParams::parse(&raw, false)?;
    state.read.catch_up(&token, &["messages"]).await?;
    state
        .read
        .query(|pool| read::messages_of(pool, user, id, page))
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("conversation"))
}
