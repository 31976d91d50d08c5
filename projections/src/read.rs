//! Queries over the read models, each scoped to its owner, returning the JSON
//! shapes of the REST contract. Lists page by cursor: `after`/`before` name an
//! item, and the order key of every list is immutable (time-ordered UUID v7 ids,
//! or a message's place in its conversation), so pages stay stable while new
//! rows arrive.
//!
//! Each query is written once and runs on either database ([`Db`]): the same
//! text (`$N` placeholders, no casts, no arrays), its rows decoded per dialect
//! by the executors' typed decoders into the same views, so both answer the
//! same JSON (tests/api/read_sqlite.rs asks every query of both). Where the
//! dialects would part (a NUL in a text filter, a day SQLite's TEXT dates
//! cannot order, a model name's collation), the query says how it keeps them
//! together.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::Value as Json;
use utoipa::ToSchema;
use uuid::Uuid;

use ai_secretary_contract::Position;

use crate::{
    db::Db,
    executor::{postgres, sql::Arg, sqlite},
    ops::{Table, Type, Value},
    projections::{assistants, conversations, messages, usage_daily},
};

/// A query's text, written once for both dialects with `$N` placeholders
/// (Postgres' own; sqlx's SQLite driver reads them too), and its arguments in
/// order. No cast and no `= ANY` in the text: every argument is bound from
/// Rust as its column is stored (a uuid as Postgres' `uuid`, as SQLite's
/// 16-byte BLOB), so the comparisons and the orders mean the same on both.
#[derive(Debug)]
struct Query {
    sql: String,
    args: Vec<(Type, Value)>,
}

/// What a query may bind: never a NULL (no read compares with one), each of
/// the column type it is compared with.
trait Param: Into<Value> {
    const TYPE: Type;
}

impl Param for Uuid {
    const TYPE: Type = Type::Uuid;
}

impl Param for String {
    const TYPE: Type = Type::Text;
}

impl Param for i64 {
    const TYPE: Type = Type::I64;
}

impl Param for NaiveDate {
    const TYPE: Type = Type::Date;
}

impl Query {
    /// `SELECT columns FROM table `, and the columns' declared types (how
    /// their values are decoded, from either database).
    fn select(table: &'static Table, columns: &'static [&'static str]) -> (Query, Columns) {
        let query = Query {
            sql: format!("SELECT {} FROM {} ", columns.join(", "), table.name),
            args: Vec::new(),
        };
        let types = columns.iter().map(|c| table.column(c).ty).collect();
        (
            query,
            Columns {
                names: columns,
                types,
            },
        )
    }

    fn push(&mut self, sql: &str) -> &mut Query {
        self.sql.push_str(sql);
        self
    }

    /// A placeholder for `value`.
    fn bind<T: Param>(&mut self, value: T) -> &mut Query {
        self.args.push((T::TYPE, value.into()));
        self.sql.push_str(&format!("${}", self.args.len()));
        self
    }

    /// The rows, each with `columns`' values in order, decoded per dialect into
    /// the same typed values: a timestamp stored as INTEGER microseconds in
    /// SQLite comes back as the `timestamptz` Postgres gives, a BLOB uuid as
    /// the `uuid`.
    async fn fetch(&self, db: &Db, columns: &Columns) -> Result<Vec<Row>, sqlx::Error> {
        let args: Vec<Arg<'_>> = self.args.iter().map(|(ty, v)| Arg::One(*ty, v)).collect();
        let rows = match db {
            Db::Postgres(pool) => postgres::fetch(pool, &self.sql, &args, &columns.types).await?,
            Db::Sqlite(lite) => sqlite::fetch(&lite.pool, &self.sql, &args, &columns.types).await?,
        };
        Ok(rows
            .into_iter()
            .map(|values| Row {
                names: columns.names,
                values,
            })
            .collect())
    }
}

/// The columns a query selects, with the types they are decoded as.
#[derive(Debug)]
struct Columns {
    names: &'static [&'static str],
    types: Vec<Type>,
}

/// One row's values, taken by column name (each once).
struct Row {
    names: &'static [&'static str],
    values: Vec<Value>,
}

impl Row {
    /// The value of `column`; a name the query did not select is a
    /// `ColumnNotFound` error (a bug in this file, found by its tests).
    fn take(&mut self, column: &str) -> Result<Value, sqlx::Error> {
        let i = self
            .names
            .iter()
            .position(|n| *n == column)
            .ok_or_else(|| sqlx::Error::ColumnNotFound(column.to_owned()))?;
        Ok(std::mem::replace(&mut self.values[i], Value::Null))
    }

    /// A value of a NOT NULL column: a NULL or another type is a decoding error.
    fn required<T>(
        &mut self,
        column: &str,
        get: impl FnOnce(Value) -> Option<T>,
    ) -> Result<T, sqlx::Error> {
        let value = self.take(column)?;
        let found = format!("{value:?}");
        get(value).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: format!("expected a value of its declared type, found {found}").into(),
        })
    }

    /// A value of a nullable column: NULL is `None`.
    fn optional<T>(
        &mut self,
        column: &str,
        get: impl FnOnce(Value) -> Option<T>,
    ) -> Result<Option<T>, sqlx::Error> {
        match self.take(column)? {
            Value::Null => Ok(None),
            value => {
                let found = format!("{value:?}");
                get(value)
                    .map(Some)
                    .ok_or_else(|| sqlx::Error::ColumnDecode {
                        index: column.to_owned(),
                        source: format!("expected a value of its declared type, found {found}")
                            .into(),
                    })
            }
        }
    }

    fn uuid(&mut self, column: &str) -> Result<Uuid, sqlx::Error> {
        self.required(column, |v| v.as_uuid())
    }

    fn text(&mut self, column: &str) -> Result<String, sqlx::Error> {
        self.required(column, text)
    }

    fn i64(&mut self, column: &str) -> Result<i64, sqlx::Error> {
        self.required(column, |v| v.as_i64())
    }

    fn timestamp(&mut self, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        self.required(column, |v| v.as_timestamp())
    }
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::Text(text) => Some(text),
        _ => None,
    }
}

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

impl<T: Serialize> List<T> {
    /// A page with nothing on it, and nothing after it.
    pub fn empty() -> List<T> {
        List {
            object: "list",
            data: Vec::new(),
            first_id: None,
            last_id: None,
            has_more: false,
        }
    }
}

/// Something a list holds.
pub trait Item {
    fn id(&self) -> Uuid;
}

/// How a list is keyed: the column it is ordered by, and how a cursor (an
/// item's id) names its key.
enum Key {
    /// The id itself (a UUID v7, so in time order). Postgres orders `uuid`s by
    /// their 16 bytes, SQLite BLOBs by theirs (memcmp): one order on both.
    Id,
    /// A message's place in its conversation (`seq`). A cursor that is not a
    /// message of that conversation has no key: its comparison is NULL on both,
    /// so the page is empty rather than the list's start.
    Seq { conversation: Uuid },
}

impl Key {
    fn column(&self) -> &'static str {
        match self {
            Key::Id => "id",
            Key::Seq { .. } => "seq",
        }
    }

    fn push_cursor(&self, query: &mut Query, cursor: Uuid) {
        match self {
            Key::Id => {
                query.bind(cursor);
            }
            Key::Seq { conversation } => {
                query
                    .push("(SELECT seq FROM messages WHERE id = ")
                    .bind(cursor)
                    .push(" AND conversation_id = ")
                    .bind(*conversation)
                    .push(")");
            }
        }
    }
}

/// Append the cursor condition and order to `query` (which ends in its `WHERE`
/// conditions), run it, and make a page of its rows with `item`.
async fn page<T: Item + Serialize>(
    db: &Db,
    mut query: Query,
    columns: &Columns,
    key: Key,
    page: Page,
    item: impl Fn(Row) -> Result<T, sqlx::Error>,
) -> Result<List<T>, sqlx::Error> {
    let column = key.column();
    // `before` walks backwards from the cursor: query the other way, then flip.
    let backwards = page.after.is_none() && page.before.is_some();
    let descending = page.descending != backwards;
    if let Some(after) = page.after {
        query.push(&format!(
            " AND {column} {} ",
            if page.descending { "<" } else { ">" }
        ));
        key.push_cursor(&mut query, after);
    } else if let Some(before) = page.before {
        query.push(&format!(
            " AND {column} {} ",
            if page.descending { ">" } else { "<" }
        ));
        key.push_cursor(&mut query, before);
    }
    // A negative limit is an empty page on both (Postgres refuses a negative
    // LIMIT; SQLite reads it as none); one more row than asked says whether
    // more follow, saturating so that no limit overflows.
    let limit = page.limit.max(0);
    query
        .push(&format!(
            " ORDER BY {column} {} LIMIT ",
            if descending { "DESC" } else { "ASC" }
        ))
        .bind(limit.saturating_add(1));
    let mut data = query
        .fetch(db, columns)
        .await?
        .into_iter()
        .map(item)
        .collect::<Result<Vec<T>, _>>()?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let has_more = data.len() > limit;
    data.truncate(limit);
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

/// An assistant with its activity, as the read side serves it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Assistant, example = json!({
    "id": "0193a5c0-7d2e-7cc1-9a51-2f1e0e6c1a01", "object": "assistant", "name": "Ada",
    "role": "secretary", "instructions": "Keep my diary.", "model": "gemini-2.5-flash",
    "temperature": 0.7, "metadata": {"team": "sales"}, "status": "active",
    "conversation_count": 2, "message_count": 8, "last_activity_at": "2026-12-01T10:15:00Z",
    "created_at": "2026-11-30T09:00:00Z", "updated_at": "2026-11-30T09:00:00Z", "version": 1
}))]
pub struct AssistantView {
    pub id: Uuid,
    #[schema(value_type = String, example = "assistant")]
    pub object: &'static str,
    pub name: String,
    pub role: String,
    pub instructions: String,
    pub model: String,
    pub temperature: f64,
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub metadata: Json,
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

const ASSISTANT_COLUMNS: &[&str] = &[
    "id",
    "name",
    "role",
    "instructions",
    "model",
    "temperature",
    "metadata",
    "status",
    "conversation_count",
    "message_count",
    "last_activity_at",
    "created_at",
    "updated_at",
    "version",
    "last_tx",
    "last_gp",
];

impl AssistantView {
    fn from_row(mut r: Row) -> Result<AssistantView, sqlx::Error> {
        Ok(AssistantView {
            id: r.uuid("id")?,
            object: "assistant",
            name: r.text("name")?,
            role: r.text("role")?,
            instructions: r.text("instructions")?,
            model: r.text("model")?,
            temperature: r.required("temperature", |v| match v {
                Value::F64(t) => Some(t),
                _ => None,
            })?,
            metadata: r.required("metadata", |v| match v {
                Value::Json(json) => Some(*json),
                _ => None,
            })?,
            status: r.text("status")?,
            conversation_count: r.i64("conversation_count")?,
            message_count: r.i64("message_count")?,
            last_activity_at: r.optional("last_activity_at", |v| v.as_timestamp())?,
            created_at: r.timestamp("created_at")?,
            updated_at: r.timestamp("updated_at")?,
            version: r.i64("version")?,
            last_tx: r.i64("last_tx")?,
            last_gp: r.i64("last_gp")?,
        })
    }
}

/// The owner's assistants: `SELECT … FROM assistants WHERE owner_id = $1`.
/// Every read is scoped to its owner in SQL, so another owner's id finds
/// nothing (404, never 403).
fn owners_assistants(owner: Uuid) -> (Query, Columns) {
    let (mut query, columns) = Query::select(&assistants::ASSISTANTS, ASSISTANT_COLUMNS);
    query.push("WHERE owner_id = ").bind(owner);
    (query, columns)
}

pub async fn assistant_of(
    db: &Db,
    owner: Uuid,
    id: Uuid,
) -> Result<Option<AssistantView>, sqlx::Error> {
    let (mut query, columns) = owners_assistants(owner);
    query.push(" AND id = ").bind(id);
    let row = query.fetch(db, &columns).await?.into_iter().next();
    row.map(AssistantView::from_row).transpose()
}

pub async fn assistants_of(
    db: &Db,
    owner: Uuid,
    p: Page,
) -> Result<List<AssistantView>, sqlx::Error> {
    let (query, columns) = owners_assistants(owner);
    page(db, query, &columns, Key::Id, p, AssistantView::from_row).await
}

/// Tokens an LLM counted.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"prompt_tokens": 42, "completion_tokens": 17, "total_tokens": 59}))]
pub struct TokenUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
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

const CONVERSATION_COLUMNS: &[&str] = &[
    "id",
    "assistant_id",
    "title",
    "status",
    "message_count",
    "last_message_at",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "created_at",
    "updated_at",
    "version",
    "last_tx",
    "last_gp",
];

impl ConversationView {
    fn from_row(mut r: Row) -> Result<ConversationView, sqlx::Error> {
        Ok(ConversationView {
            id: r.uuid("id")?,
            object: "conversation",
            assistant_id: r.uuid("assistant_id")?,
            title: r.text("title")?,
            status: r.text("status")?,
            message_count: r.i64("message_count")?,
            last_message_at: r.optional("last_message_at", |v| v.as_timestamp())?,
            usage: TokenUsage {
                prompt_tokens: r.i64("prompt_tokens")?,
                completion_tokens: r.i64("completion_tokens")?,
                total_tokens: r.i64("total_tokens")?,
            },
            created_at: r.timestamp("created_at")?,
            updated_at: r.timestamp("updated_at")?,
            version: r.i64("version")?,
            stamp: Position {
                transaction_id: r.i64("last_tx")?,
                global_position: r.i64("last_gp")?,
            },
        })
    }
}

/// The owner's conversations (scoped in SQL, as the assistants are).
fn owners_conversations(owner: Uuid) -> (Query, Columns) {
    let (mut query, columns) = Query::select(&conversations::CONVERSATIONS, CONVERSATION_COLUMNS);
    query.push("WHERE owner_id = ").bind(owner);
    (query, columns)
}

pub async fn conversation_of(
    db: &Db,
    owner: Uuid,
    id: Uuid,
) -> Result<Option<ConversationView>, sqlx::Error> {
    let (mut query, columns) = owners_conversations(owner);
    query.push(" AND id = ").bind(id);
    let row = query.fetch(db, &columns).await?.into_iter().next();
    row.map(ConversationView::from_row).transpose()
}

/// Filters of `GET /conversations`.
#[derive(Debug, Clone, Default)]
pub struct ConversationFilter {
    pub assistant_id: Option<Uuid>,
    pub status: Option<String>,
}

pub async fn conversations_of(
    db: &Db,
    owner: Uuid,
    filter: &ConversationFilter,
    p: Page,
) -> Result<List<ConversationView>, sqlx::Error> {
    let (mut query, columns) = owners_conversations(owner);
    if let Some(assistant) = filter.assistant_id {
        query.push(" AND assistant_id = ").bind(assistant);
    }
    if let Some(status) = &filter.status {
        // No stored text holds a NUL (Postgres' text cannot), so such a filter
        // matches nothing; asked as is, Postgres would refuse the parameter
        // while SQLite answered: both answer the empty page instead.
        if status.contains('\0') {
            return Ok(List::empty());
        }
        query.push(" AND status = ").bind(status.clone());
    }
    page(db, query, &columns, Key::Id, p, ConversationView::from_row).await
}

/// A user's message or an assistant's reply. A reply is listed from the
/// moment it is requested (`queued`), without content until it completes.
#[derive(Debug, Serialize, ToSchema)]
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
    /// On a completed reply: the tokens it took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,
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

const MESSAGE_COLUMNS: &[&str] = &[
    "id",
    "conversation_id",
    "role",
    "content",
    "status",
    "reply_to",
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "error",
    "created_at",
    "updated_at",
];

impl MessageView {
    fn from_row(mut r: Row) -> Result<MessageView, sqlx::Error> {
        // A reply's usage is whole or absent: all three counts or none.
        let usage = match (
            r.optional("prompt_tokens", |v| v.as_i64())?,
            r.optional("completion_tokens", |v| v.as_i64())?,
            r.optional("total_tokens", |v| v.as_i64())?,
        ) {
            (Some(prompt_tokens), Some(completion_tokens), Some(total_tokens)) => {
                Some(TokenUsage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens,
                })
            }
            _ => None,
        };
        Ok(MessageView {
            id: r.uuid("id")?,
            object: "message",
            conversation_id: r.uuid("conversation_id")?,
            role: r.text("role")?,
            content: r.optional("content", text)?,
            status: r.text("status")?,
            reply_to: r.optional("reply_to", |v| v.as_uuid())?,
            model: r.optional("model", text)?,
            finish_reason: r.optional("finish_reason", text)?,
            usage,
            error: r.optional("error", text)?,
            created_at: r.timestamp("created_at")?,
            updated_at: r.timestamp("updated_at")?,
        })
    }
}

/// A conversation's messages, or `None` if the conversation is not the owner's.
pub async fn messages_of(
    db: &Db,
    owner: Uuid,
    conversation: Uuid,
    p: Page,
) -> Result<Option<List<MessageView>>, sqlx::Error> {
    // The conversation's owner, as the `messages` projection knows it: the
    // messages are the owner's only if the conversation is.
    let (mut known, columns) = Query::select(&messages::CONVERSATIONS, &["owner_id"]);
    known.push("WHERE conversation_id = ").bind(conversation);
    let owner_of = match known.fetch(db, &columns).await?.into_iter().next() {
        Some(mut row) => Some(row.uuid("owner_id")?),
        None => None,
    };
    if owner_of != Some(owner) {
        return Ok(None);
    }
    let (mut query, columns) = Query::select(&messages::MESSAGES, MESSAGE_COLUMNS);
    query.push("WHERE conversation_id = ").bind(conversation);
    let key = Key::Seq { conversation };
    Ok(Some(
        page(db, query, &columns, key, p, MessageView::from_row).await?,
    ))
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
#[derive(Debug, Serialize, ToSchema)]
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

/// The days a usage query can name on both databases: SQLite stores a day as
/// TEXT `YYYY-MM-DD`, which sorts (and compares in `BETWEEN`) as the date only
/// while the year has four digits (`+10000-…` and `-0001-…` would sort
/// before `2026-…`). A range is cut to these days, on both, so it means the
/// same days on both; nothing is recorded outside them.
pub const FIRST_DAY: NaiveDate = NaiveDate::from_ymd_opt(0, 1, 1).expect("a valid date");
pub const LAST_DAY: NaiveDate = NaiveDate::from_ymd_opt(9999, 12, 31).expect("a valid date");

/// The columns of a usage query per grouping: the group's, then the sums.
const USAGE_BY_DAY: &[&str] = &[
    "day",
    "messages",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
];
const USAGE_BY_ASSISTANT: &[&str] = &[
    "assistant_id",
    "messages",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
];
const USAGE_BY_MODEL: &[&str] = &[
    "model",
    "messages",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
];

/// Usage between two UTC days (both included), grouped, in the group's order
/// (days by date, assistants by id, models by the bytes of their name).
pub async fn usage_of(
    db: &Db,
    owner: Uuid,
    from: NaiveDate,
    to: NaiveDate,
    group_by: GroupBy,
) -> Result<Vec<UsageRow>, sqlx::Error> {
    let (from, to) = (from.max(FIRST_DAY), to.min(LAST_DAY));
    if from > to {
        return Ok(Vec::new());
    }
    let names = match group_by {
        GroupBy::Day => USAGE_BY_DAY,
        GroupBy::Assistant => USAGE_BY_ASSISTANT,
        GroupBy::Model => USAGE_BY_MODEL,
    };
    let (group, summed) = (names[0], &names[1..]);
    // Only the group's column is selected (no typed NULL stands in for the
    // other two, which would need a cast in Postgres): the row is built per
    // group below. `sum` of a bigint is a numeric in Postgres and an integer
    // in SQLite; `CAST(… AS BIGINT)` (standard SQL, no `::`) is a bigint in
    // Postgres and an INTEGER in SQLite (its affinity rule: the name holds INT).
    let sums: Vec<String> = summed
        .iter()
        .map(|c| format!("CAST(sum({c}) AS BIGINT) AS {c}"))
        .collect();
    let mut query = Query {
        sql: format!(
            "SELECT {group}, {} FROM usage_daily WHERE owner_id = ",
            sums.join(", ")
        ),
        args: Vec::new(),
    };
    query
        .bind(owner)
        .push(" AND day BETWEEN ")
        .bind(from)
        .push(" AND ")
        .bind(to)
        .push(&format!(" GROUP BY {group}"));
    let columns = Columns {
        names,
        types: names
            .iter()
            .map(|c| usage_daily::USAGE_DAILY.column(c).ty)
            .collect(),
    };
    let mut rows = query
        .fetch(db, &columns)
        .await?
        .into_iter()
        .map(|mut r| {
            let mut row = UsageRow {
                day: None,
                assistant_id: None,
                model: None,
                messages: r.i64("messages")?,
                prompt_tokens: r.i64("prompt_tokens")?,
                completion_tokens: r.i64("completion_tokens")?,
                total_tokens: r.i64("total_tokens")?,
            };
            match group_by {
                GroupBy::Day => {
                    row.day = Some(r.required("day", |v| match v {
                        Value::Date(day) => Some(day),
                        _ => None,
                    })?)
                }
                GroupBy::Assistant => row.assistant_id = Some(r.uuid("assistant_id")?),
                GroupBy::Model => row.model = Some(r.text("model")?),
            }
            Ok(row)
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    // Ordered here, not in SQL: a model's name would sort by Postgres' collation
    // there (its locale's rules) but by its bytes in SQLite. Rust orders dates as
    // dates, uuids and names by their bytes, on rows from either.
    rows.sort_by(|a, b| (a.day, a.assistant_id, &a.model).cmp(&(b.day, b.assistant_id, &b.model)));
    Ok(rows)
}
