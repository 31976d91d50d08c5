//! Queries over the read models, each scoped to its owner, returning the JSON
//! shapes of the REST contract. Lists page by cursor: `after`/`before` name an
//! item, and the order key of every list is immutable (time-ordered UUID v7 ids,
//! or a message's place in its conversation), so pages stay stable while new
//! rows arrive.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{FromRow, PgPool, Postgres, QueryBuilder};
use utoipa::ToSchema;
use uuid::Uuid;

use ai_secretary_contract::Position;

/// A page request: `limit` items after or before a cursor, in one direction.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub after: Option<Uuid>,
    pub before: Option<Uuid>,
    pub descending: bool,
}

/// A page of a list (the envelope of every list in the API): `first_id` and
/// `last_id` are the cursors for `before` and `after`.
#[derive(Debug, Serialize, ToSchema)]
pub struct List<T: Serialize> {
    /// Always `list`.
    #[schema(value_type = String, example = "list")]
    pub object: &'static str,
    pub data: Vec<T>,
    /// The first item's id (`?before=` this for the page before); null on an empty page.
    pub first_id: Option<Uuid>,
    /// The last item's id (`?after=` this for the next page); null on an empty page.
    pub last_id: Option<Uuid>,
    /// Whether more items follow in this direction.
    pub has_more: bool,
}

/// Something a list holds.
pub trait Item {
    fn id(&self) -> Uuid;
}

/// Append the cursor condition and order to a query over `key` (an expression
/// whose value for a cursor id is `cursor_key`), then run it.
async fn page<T>(
    pool: &PgPool,
    mut query: QueryBuilder<Postgres>,
    key: &str,
    cursor_key: impl Fn(&mut QueryBuilder<Postgres>, Uuid),
    page: Page,
) -> Result<List<T>, sqlx::Error>
where
    T: for<'r> FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + Serialize + Item,
{
    // `before` walks backwards from the cursor: query the other way, then flip.
    let backwards = page.after.is_none() && page.before.is_some();
    let descending = page.descending != backwards;
    if let Some(after) = page.after {
        query.push(format_args!(
            " AND {key} {} ",
            if page.descending { "<" } else { ">" }
        ));
        cursor_key(&mut query, after);
    } else if let Some(before) = page.before {
        query.push(format_args!(
            " AND {key} {} ",
            if page.descending { ">" } else { "<" }
        ));
        cursor_key(&mut query, before);
    }
    query.push(format_args!(
        " ORDER BY {key} {} LIMIT ",
        if descending { "DESC" } else { "ASC" }
    ));
    query.push_bind(page.limit + 1);
    let mut data: Vec<T> = query.build_query_as().fetch_all(pool).await?;
    let has_more = data.len() as i64 > page.limit;
    data.truncate(page.limit as usize);
    if backwards {
        data.reverse();
    }
    Ok(List {
        object: "list",
        first_id: data.first().map(Item::id),
        last_id: data.last().map(Item::id),
        data,
        has_more,
    })
}

fn by_id(query: &mut QueryBuilder<Postgres>, id: Uuid) {
    query.push_bind(id);
}

/// An assistant with its activity, as the read side serves it.
#[derive(Debug, Serialize, FromRow, ToSchema)]
#[schema(as = Assistant, example = json!({
    "id": "0193a5c0-7d2e-7cc1-9a51-2f1e0e6c1a01", "object": "assistant", "name": "Ada",
    "role": "secretary", "instructions": "Keep my diary.", "model": "gemini-2.5-flash",
    "temperature": 0.7, "metadata": {"team": "sales"}, "status": "active",
    "conversation_count": 2, "message_count": 8, "last_activity_at": "2026-12-01T10:15:00Z",
    "created_at": "2026-11-30T09:00:00Z", "updated_at": "2026-11-30T09:00:00Z", "version": 1
}))]
pub struct AssistantView {
    pub id: Uuid,
    #[sqlx(skip)]
    #[schema(value_type = String, example = "assistant")]
    pub object: &'static str,
    pub name: String,
    pub role: String,
    pub instructions: String,
    pub model: String,
    pub temperature: f64,
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub metadata: Value,
    /// `active` or `archived`.
    #[schema(example = "active")]
    pub status: String,
    pub conversation_count: i64,
    pub message_count: i64,
    pub last_activity_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    #[serde(skip)]
    pub last_tx: i64,
    #[serde(skip)]
    pub last_gp: i64,
}

impl Item for AssistantView {
    fn id(&self) -> Uuid {
        self.id
    }
}

/// What a row is current as of: the stamp the cache compares.
pub trait Stamped {
    fn stamp(&self) -> Position;
}

impl Stamped for AssistantView {
    fn stamp(&self) -> Position {
        Position {
            transaction_id: self.last_tx,
            global_position: self.last_gp,
        }
    }
}

const ASSISTANT_COLUMNS: &str = "SELECT id, name, role, instructions, model, temperature, metadata, \
     status, conversation_count, message_count, last_activity_at, created_at, updated_at, version, \
     last_tx, last_gp FROM assistants WHERE owner_id = ";

fn assistant(mut a: AssistantView) -> AssistantView {
    a.object = "assistant";
    a
}

pub async fn assistant_of(
    pool: &PgPool,
    owner: Uuid,
    id: Uuid,
) -> Result<Option<AssistantView>, sqlx::Error> {
    let mut query = QueryBuilder::new(ASSISTANT_COLUMNS);
    query.push_bind(owner).push(" AND id = ").push_bind(id);
    Ok(query
        .build_query_as()
        .fetch_optional(pool)
        .await?
        .map(assistant))
}

pub async fn assistants_of(
    pool: &PgPool,
    owner: Uuid,
    p: Page,
) -> Result<List<AssistantView>, sqlx::Error> {
    let mut query = QueryBuilder::new(ASSISTANT_COLUMNS);
    query.push_bind(owner);
    let mut list: List<AssistantView> = page(pool, query, "id", by_id, p).await?;
    list.data = list.data.into_iter().map(assistant).collect();
    Ok(list)
}

/// Tokens an LLM counted.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"prompt_tokens": 42, "completion_tokens": 17, "total_tokens": 59}))]
pub struct TokenUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

#[derive(Debug, FromRow)]
struct ConversationRow {
    id: Uuid,
    assistant_id: Uuid,
    title: String,
    status: String,
    message_count: i64,
    last_message_at: Option<DateTime<Utc>>,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
    last_tx: i64,
    last_gp: i64,
}

/// A conversation with its activity, as the read side serves it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Conversation, example = json!({
    "id": "0193a5c1-0b7e-7d10-8f0e-5b1c2d3e4f50", "object": "conversation",
    "assistant_id": "0193a5c0-7d2e-7cc1-9a51-2f1e0e6c1a01", "title": "Planning the week",
    "status": "active", "message_count": 4, "last_message_at": "2026-12-01T10:15:00Z",
    "usage": {"prompt_tokens": 84, "completion_tokens": 34, "total_tokens": 118},
    "created_at": "2026-12-01T10:00:00Z", "updated_at": "2026-12-01T10:00:00Z", "version": 3
}))]
pub struct ConversationView {
    pub id: Uuid,
    #[schema(value_type = String, example = "conversation")]
    pub object: &'static str,
    pub assistant_id: Uuid,
    pub title: String,
    /// `active` or `archived`.
    #[schema(example = "active")]
    pub status: String,
    pub message_count: i64,
    pub last_message_at: Option<DateTime<Utc>>,
    pub usage: TokenUsage,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    #[serde(skip)]
    pub stamp: Position,
}

impl Item for ConversationView {
    fn id(&self) -> Uuid {
        self.id
    }
}

impl Stamped for ConversationView {
    fn stamp(&self) -> Position {
        self.stamp
    }
}

impl From<ConversationRow> for ConversationView {
    fn from(r: ConversationRow) -> Self {
        ConversationView {
            id: r.id,
            object: "conversation",
            assistant_id: r.assistant_id,
            title: r.title,
            status: r.status,
            message_count: r.message_count,
            last_message_at: r.last_message_at,
            usage: TokenUsage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                total_tokens: r.total_tokens,
            },
            created_at: r.created_at,
            updated_at: r.updated_at,
            version: r.version,
            stamp: Position {
                transaction_id: r.last_tx,
                global_position: r.last_gp,
            },
        }
    }
}

// FromRow for the view goes through the row type, so `page` can build it.
impl<'r> FromRow<'r, sqlx::postgres::PgRow> for ConversationView {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        ConversationRow::from_row(row).map(Into::into)
    }
}

const CONVERSATION_COLUMNS: &str = "SELECT id, assistant_id, title, status, message_count, \
     last_message_at, prompt_tokens, completion_tokens, total_tokens, created_at, updated_at, \
     version, last_tx, last_gp FROM conversations WHERE owner_id = ";

pub async fn conversation_of(
    pool: &PgPool,
    owner: Uuid,
    id: Uuid,
) -> Result<Option<ConversationView>, sqlx::Error> {
    let mut query = QueryBuilder::new(CONVERSATION_COLUMNS);
    query.push_bind(owner).push(" AND id = ").push_bind(id);
    query.build_query_as().fetch_optional(pool).await
}

/// Filters of `GET /conversations`.
#[derive(Debug, Clone, Default)]
pub struct ConversationFilter {
    pub assistant_id: Option<Uuid>,
    pub status: Option<String>,
}

pub async fn conversations_of(
    pool: &PgPool,
    owner: Uuid,
    filter: &ConversationFilter,
    p: Page,
) -> Result<List<ConversationView>, sqlx::Error> {
    let mut query = QueryBuilder::new(CONVERSATION_COLUMNS);
    query.push_bind(owner);
    if let Some(assistant) = filter.assistant_id {
        query.push(" AND assistant_id = ").push_bind(assistant);
    }
    if let Some(status) = &filter.status {
        query.push(" AND status = ").push_bind(status.clone());
    }
    page(pool, query, "id", by_id, p).await
}

/// A user's message or an assistant's reply. A reply is listed from the
/// moment it is requested (`queued`), without content until it completes.
#[derive(Debug, Serialize, FromRow, ToSchema)]
#[schema(as = Message, example = json!({
    "id": "0193a5c1-2f00-7a3b-b1c2-0d9e8f7a6b5c", "object": "message",
    "conversation_id": "0193a5c1-0b7e-7d10-8f0e-5b1c2d3e4f50", "role": "assistant",
    "content": "Monday is free after 2 pm.", "status": "completed",
    "reply_to": "0193a5c1-2eff-7a3b-b1c2-0d9e8f7a6b5b", "model": "gemini-2.5-flash",
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 42, "completion_tokens": 17, "total_tokens": 59},
    "created_at": "2026-12-01T10:15:00Z", "updated_at": "2026-12-01T10:15:02Z"
}))]
pub struct MessageView {
    pub id: Uuid,
    #[sqlx(skip)]
    #[schema(value_type = String, example = "message")]
    pub object: &'static str,
    pub conversation_id: Uuid,
    /// `user` or `assistant`.
    #[schema(example = "assistant")]
    pub role: String,
    pub content: Option<String>,
    /// `queued`, `in_progress`, `completed` or `failed` (a user's message is `completed`).
    #[schema(example = "completed")]
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[sqlx(skip)]
    pub usage: Option<TokenUsage>,
    #[serde(skip)]
    pub prompt_tokens: Option<i64>,
    #[serde(skip)]
    pub completion_tokens: Option<i64>,
    #[serde(skip)]
    pub total_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Item for MessageView {
    fn id(&self) -> Uuid {
        self.id
    }
}

/// A conversation's messages, or `None` if the conversation is not the owner's.
pub async fn messages_of(
    pool: &PgPool,
    owner: Uuid,
    conversation: Uuid,
    p: Page,
) -> Result<Option<List<MessageView>>, sqlx::Error> {
    let known: Option<Uuid> = sqlx::query_scalar(
        "SELECT owner_id FROM messages_conversations WHERE conversation_id = $1",
    )
    .bind(conversation)
    .fetch_optional(pool)
    .await?;
    if known != Some(owner) {
        return Ok(None);
    }
    let mut query = QueryBuilder::new(
        "SELECT id, conversation_id, role, content, status, reply_to, model, finish_reason, \
         prompt_tokens, completion_tokens, total_tokens, error, created_at, updated_at \
         FROM messages WHERE conversation_id = ",
    );
    query.push_bind(conversation);
    let cursor = move |q: &mut QueryBuilder<Postgres>, id: Uuid| {
        q.push("(SELECT seq FROM messages WHERE id = ")
            .push_bind(id)
            .push(" AND conversation_id = ")
            .push_bind(conversation)
            .push(")");
    };
    let mut list: List<MessageView> = page(pool, query, "seq", cursor, p).await?;
    for m in &mut list.data {
        m.object = "message";
        if let (Some(prompt_tokens), Some(completion_tokens), Some(total_tokens)) =
            (m.prompt_tokens, m.completion_tokens, m.total_tokens)
        {
            m.usage = Some(TokenUsage {
                prompt_tokens,
                completion_tokens,
                total_tokens,
            });
        }
    }
    Ok(Some(list))
}

/// How `GET /stats/usage` groups its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    Assistant,
    Model,
}

/// One group of `GET /stats/usage`: `day`, `assistant_id` or `model` names
/// the group, as `group_by` asked.
#[derive(Debug, Serialize, FromRow, ToSchema)]
#[schema(example = json!({"day": "2026-12-01", "messages": 3, "prompt_tokens": 120,
                          "completion_tokens": 51, "total_tokens": 171}))]
pub struct UsageRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<NaiveDate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assistant_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub messages: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

/// Usage between two UTC days (both included), grouped.
pub async fn usage_of(
    pool: &PgPool,
    owner: Uuid,
    from: NaiveDate,
    to: NaiveDate,
    group_by: GroupBy,
) -> Result<Vec<UsageRow>, sqlx::Error> {
    let (select, group) = match group_by {
        GroupBy::Day => (
            "day, NULL::uuid AS assistant_id, NULL::text AS model",
            "day",
        ),
        GroupBy::Assistant => (
            "NULL::date AS day, assistant_id, NULL::text AS model",
            "assistant_id",
        ),
        GroupBy::Model => (
            "NULL::date AS day, NULL::uuid AS assistant_id, model",
            "model",
        ),
    };
    let sql = format!(
        "SELECT {select}, sum(messages)::int8 AS messages, sum(prompt_tokens)::int8 AS prompt_tokens,
                sum(completion_tokens)::int8 AS completion_tokens, sum(total_tokens)::int8 AS total_tokens
         FROM usage_daily WHERE owner_id = $1 AND day BETWEEN $2 AND $3
         GROUP BY {group} ORDER BY {group}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(owner)
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await
}
