//! Conversations: start one with an assistant, rename, archive, and post messages
//! (each post records the user's message and requests the assistant's reply).

use ai_secretary_projections::{
    cache::Kind,
    read::{self, ConversationFilter, ConversationView, List, MessageView},
};
use axum::{Json, extract::State, http::StatusCode, response::Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    command::{Caller, OnResource},
    error::{ApiError, Problem},
    extract::{ApiJson, AuthUser, IdPath},
    openapi::{ConsistencyParam, IdParam, IdempotencyParam, IfMatchParam, ListParams as Page},
    read::{ConsistencyToken, ListParams, RawQuery},
    reply::Reply,
};
use crate::domain::conversation::{
    ConversationCommand, ConversationDecider, ConversationState, ConversationStatus,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start, list))
        .routes(routes!(one, rename))
        .routes(routes!(archive))
        .routes(routes!(post_message, messages))
}

/// A conversation as a command leaves it. What replies add later (their
/// tokens, the time of the last answer) is the read side's: `GET` has it.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "id": "0193a5c1-0b7e-7d10-8f0e-5b1c2d3e4f50", "object": "conversation",
    "assistant_id": "0193a5c0-7d2e-7cc1-9a51-2f1e0e6c1a01", "title": "Planning the week",
    "status": "active", "message_count": 0, "created_at": "2026-12-01T10:00:00Z",
    "updated_at": "2026-12-01T10:00:00Z", "version": 1
}))]
struct ConversationSettings<'a> {
    id: Uuid,
    /// Always `conversation`.
    #[schema(example = "conversation")]
    object: &'static str,
    assistant_id: Uuid,
    title: &'a str,
    status: ConversationStatus,
    /// User messages and replies alike (a reply counts once it is requested).
    message_count: u64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The conversation's version (its ETag, for If-Match).
    version: i64,
}

/// A conversation as its own stream knows it: what replies add later (their
/// tokens, the time of the last answer) comes from `GET` (docs/decisions.md).
fn conversation_json(state: &ConversationState, version: i64) -> Value {
    match state {
        ConversationState::Live(c) => serde_json::to_value(ConversationSettings {
            id: c.id,
            object: "conversation",
            assistant_id: c.assistant_id,
            title: &c.title,
            status: c.status,
            message_count: c.message_count,
            created_at: c.created_at,
            updated_at: c.updated_at,
            version,
        })
        .unwrap_or(Value::Null),
        ConversationState::Absent => Value::Null,
    }
}

fn render(status: StatusCode) -> impl Fn(&ConversationState, i64) -> Reply + Sync {
    move |s, v| Reply::new(status, conversation_json(s, v)).version(v)
}

/// A new conversation.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "assistant_id": "0193a5c0-7d2e-7cc1-9a51-2f1e0e6c1a01", "title": "Planning the week"
}))]
struct StartBody {
    /// One of the caller's active assistants.
    #[schema(required)]
    assistant_id: Option<Uuid>,
    /// 1 to 200 characters, one line; `New conversation` by default.
    #[schema(max_length = 200)]
    title: Option<String>,
}

/// Start a conversation with one of the caller's assistants.
#[utoipa::path(
    post,
    path = "/conversations",
    tag = "conversations",
    security(("bearer" = [])),
    params(IdempotencyParam),
    request_body = StartBody,
    responses(
        (status = 201, description = "The conversation", body = ConversationSettings, headers(
            ("ETag" = String, description = "The conversation's version, quoted"),
            ("Location" = String, description = "/api/v1/conversations/{id}"),
        )),
        (status = 409, description = "The assistant is archived", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
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

/// A conversation's new title.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"title": "Planning next week"}))]
struct RenameBody {
    /// 1 to 200 characters, one line.
    #[schema(required, max_length = 200)]
    title: Option<String>,
}

/// Rename a conversation.
#[utoipa::path(
    patch,
    path = "/conversations/{id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(IdParam, IfMatchParam),
    request_body = RenameBody,
    responses(
        (status = 200, description = "The renamed conversation", body = ConversationSettings,
            headers(("ETag" = String, description = "The conversation's new version, quoted"))),
    ),
)]
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

/// Archive a conversation: it keeps its messages and takes no new ones.
#[utoipa::path(
    post,
    path = "/conversations/{id}/archive",
    tag = "conversations",
    security(("bearer" = [])),
    params(IdParam, IfMatchParam, IdempotencyParam),
    responses(
        (status = 200, description = "The archived conversation", body = ConversationSettings,
            headers(("ETag" = String, description = "The conversation's version, quoted"))),
    ),
)]
async fn archive(target: OnResource) -> Result<Response, ApiError> {
    let command = ConversationCommand::Archive {
        actor: target.user(),
        at: Utc::now(),
    };
    target
        .execute::<ConversationDecider>(command, render(StatusCode::OK))
        .await
}

/// A user's message.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"content": "What is on my calendar on Monday?"}))]
struct MessageBody {
    /// 1 to 32,000 characters, not blank.
    #[serde(default)]
    #[schema(required, min_length = 1, max_length = 32000)]
    content: String,
}

/// What posting a message answers: the message, recorded, and the reply it
/// asked for, queued (its progress arrives on the SSE stream and in the list).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "message": {"id": "0193a5c1-2eff-7a3b-b1c2-0d9e8f7a6b5b", "object": "message",
                "conversation_id": "0193a5c1-0b7e-7d10-8f0e-5b1c2d3e4f50", "role": "user",
                "content": "What is on my calendar on Monday?", "status": "completed",
                "created_at": "2026-12-01T10:15:00Z"},
    "reply": {"id": "0193a5c1-2f00-7a3b-b1c2-0d9e8f7a6b5c", "object": "message",
              "conversation_id": "0193a5c1-0b7e-7d10-8f0e-5b1c2d3e4f50", "role": "assistant",
              "reply_to": "0193a5c1-2eff-7a3b-b1c2-0d9e8f7a6b5b", "status": "queued",
              "created_at": "2026-12-01T10:15:00Z"}
}))]
struct Posted {
    message: PostedMessage,
    reply: QueuedReply,
}

/// The user's message, as recorded.
#[derive(Serialize, ToSchema)]
struct PostedMessage {
    id: Uuid,
    /// Always `message`.
    #[schema(example = "message")]
    object: &'static str,
    conversation_id: Uuid,
    /// Always `user`.
    #[schema(example = "user")]
    role: &'static str,
    content: String,
    /// Always `completed`.
    #[schema(example = "completed")]
    status: &'static str,
    created_at: DateTime<Utc>,
}

/// The assistant's reply, requested.
#[derive(Serialize, ToSchema)]
struct QueuedReply {
    id: Uuid,
    /// Always `message`.
    #[schema(example = "message")]
    object: &'static str,
    conversation_id: Uuid,
    /// Always `assistant`.
    #[schema(example = "assistant")]
    role: &'static str,
    /// The user's message it answers.
    reply_to: Uuid,
    /// `queued`, until the replier takes it up.
    #[schema(example = "queued")]
    status: &'static str,
    created_at: DateTime<Utc>,
}

/// Post a message: it is recorded and the assistant's reply is queued (202).
#[utoipa::path(
    post,
    path = "/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = [])),
    params(IdParam, IfMatchParam, IdempotencyParam),
    request_body = MessageBody,
    responses(
        (status = 202, description = "Recorded; the reply is queued", body = Posted,
            headers(("ETag" = String, description = "The conversation's new version, quoted"))),
        (status = 409, description = "The conversation is archived", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
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
        let body = Posted {
            message: PostedMessage {
                id: message_id,
                object: "message",
                conversation_id: id,
                role: "user",
                content: content.clone(),
                status: "completed",
                created_at: at,
            },
            reply: QueuedReply {
                id: reply_id,
                object: "message",
                conversation_id: id,
                role: "assistant",
                reply_to: message_id,
                status: "queued",
                created_at: at,
            },
        };
        let body = serde_json::to_value(body).unwrap_or(Value::Null);
        Reply::new(StatusCode::ACCEPTED, body).version(v)
    };
    target.execute::<ConversationDecider>(command, render).await
}

/// Filters of the conversation list.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct Filter {
    /// Only the conversations with this assistant.
    assistant_id: Option<Uuid>,
    /// Only the active or only the archived ones.
    status: Option<ConversationStatus>,
}

/// The caller's conversations, newest first by default.
///
/// `?assistant_id` and `?status` filter.
#[utoipa::path(
    get,
    path = "/conversations",
    tag = "conversations",
    security(("bearer" = [])),
    params(Page, Filter, ConsistencyParam),
    responses((status = 200, description = "A page of conversations", body = List<ConversationView>)),
)]
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
            .query(|db| read::conversations_of(db, user, &filter, page))
            .await?,
    ))
}

/// One conversation with its activity, through the cache.
#[utoipa::path(
    get,
    path = "/conversations/{id}",
    tag = "conversations",
    security(("bearer" = [])),
    params(IdParam, ConsistencyParam),
    responses(
        (status = 200, description = "The conversation", body = ConversationView,
            headers(("ETag" = String, description = "The conversation's version, quoted"))),
    ),
)]
async fn one(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdPath(id): IdPath,
    token: ConsistencyToken,
) -> Result<Reply, ApiError> {
    let kind = (Kind::Conversation, "conversations", "conversation");
    state
        .read
        .one(&token, kind, id, user, |db| {
            read::conversation_of(db, user, id)
        })
        .await
}

/// A conversation's user messages and replies, oldest first by default.
#[utoipa::path(
    get,
    path = "/conversations/{id}/messages",
    tag = "conversations",
    security(("bearer" = [])),
    params(IdParam, Page, ConsistencyParam),
    responses((status = 200, description = "A page of messages", body = List<MessageView>)),
)]
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
        .query(|db| read::messages_of(db, user, id, page))
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("conversation"))
}
