//! Part 2's baseline: the rows the `messages` projection writes for the
//! backlog, upserted one statement a row into scratch tables of the same shape.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

use crate::throughput::Run;

/// Rows per transaction of the raw upsert baseline (the worker's largest batch).
pub const RAW_ROWS_PER_TX: usize = 500;

/// A row the `messages` projection writes: one per event that touches its tables.
pub enum RawRow {
    /// `messages_conversations` (conversation, owner).
    Conversation(Uuid, Uuid),
    Message(Box<MessageRow>),
}

pub struct MessageRow {
    id: Uuid,
    conversation_id: Uuid,
    owner_id: Uuid,
    seq: i64,
    role: &'static str,
    content: Option<String>,
    status: &'static str,
    reply_to: Option<Uuid>,
    model: Option<String>,
    finish_reason: Option<String>,
    tokens: [Option<i64>; 3],
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// The rows the `messages` projection writes for the backlog, in commit order.
pub async fn baseline_rows(pool: &PgPool) -> Result<Vec<RawRow>> {
    let events: Vec<(Uuid, i64, String, Value)> = sqlx::query_as(
        "SELECT stream_id, version, event_type, data FROM events
         WHERE stream_type = 'conversation' ORDER BY transaction_id, global_position",
    )
    .fetch_all(pool)
    .await
    .context("reading the backlog")?;
    let uuid = |v: &Value| -> Result<Uuid> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("not a uuid: {v}"))
    };
    let time = |v: &Value| -> Result<DateTime<Utc>> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("not a timestamp: {v}"))
    };
    let mut owners = HashMap::new();
    let mut replies: HashMap<Uuid, (i64, Uuid, DateTime<Utc>)> = HashMap::new();
    let mut rows = Vec::with_capacity(events.len());
    for (stream, version, event_type, data) in events {
        // A reply's events are in its own stream and name their conversation.
        let stream = match data.get("conversation_id") {
            Some(conversation) if event_type.starts_with("Reply") => uuid(conversation)?,
            _ => stream,
        };
        let owner = |owners: &HashMap<Uuid, Uuid>| {
            owners
                .get(&stream)
                .copied()
                .ok_or_else(|| anyhow!("conversation {stream} was not started"))
        };
        let row = match event_type.as_str() {
            "ConversationStarted" => {
                let owner = uuid(&data["owner_id"])?;
                owners.insert(stream, owner);
                RawRow::Conversation(stream, owner)
            }
            "MessagePosted" => {
                let at = time(&data["posted_at"])?;
                RawRow::Message(Box::new(MessageRow {
                    id: uuid(&data["message_id"])?,
                    conversation_id: stream,
                    owner_id: owner(&owners)?,
                    seq: version,
                    role: "user",
                    content: data["content"].as_str().map(str::to_owned),
                    status: "completed",
                    reply_to: None,
                    model: None,
                    finish_reason: None,
                    tokens: [None; 3],
                    created_at: at,
                    updated_at: at,
                }))
            }
            "ReplyRequested" => {
                let (id, reply_to, at) = (
                    uuid(&data["reply_id"])?,
                    uuid(&data["reply_to"])?,
                    time(&data["requested_at"])?,
                );
                replies.insert(id, (version, reply_to, at));
                RawRow::Message(Box::new(MessageRow {
                    id,
                    conversation_id: stream,
                    owner_id: owner(&owners)?,
                    seq: version,
                    role: "assistant",
                    content: None,
                    status: "queued",
                    reply_to: Some(reply_to),
                    model: None,
                    finish_reason: None,
                    tokens: [None; 3],
                    created_at: at,
                    updated_at: at,
                }))
            }
            "ReplyCompleted" => {
                let id = uuid(&data["reply_id"])?;
                let (seq, reply_to, requested_at) = *replies
                    .get(&id)
                    .ok_or_else(|| anyhow!("reply {id} was not requested"))?;
                let usage = &data["usage"];
                RawRow::Message(Box::new(MessageRow {
                    id,
                    conversation_id: stream,
                    owner_id: owner(&owners)?,
                    seq,
                    role: "assistant",
                    content: data["content"].as_str().map(str::to_owned),
                    status: "completed",
                    reply_to: Some(reply_to),
                    model: data["model"].as_str().map(str::to_owned),
                    finish_reason: data["finish_reason"].as_str().map(str::to_owned),
                    tokens: [
                        usage["prompt_tokens"].as_i64(),
                        usage["completion_tokens"].as_i64(),
                        usage["total_tokens"].as_i64(),
                    ],
                    created_at: requested_at,
                    updated_at: time(&data["completed_at"])?,
                }))
            }
            _ => continue,
        };
        rows.push(row);
    }
    Ok(rows)
}

/// The baseline: every row upserted with its own statement on one connection,
/// `RAW_ROWS_PER_TX` rows per transaction, in the order the events committed.
pub async fn raw_upserts(db_url: &str, rows: &[RawRow]) -> Result<Run> {
    eprintln!("  raw upserts");
    let mut conn = PgConnection::connect(db_url)
        .await
        .context("opening the raw connection")?;
    conn.execute("TRUNCATE bench_messages, bench_messages_conversations")
        .await?;
    let started = Instant::now();
    for chunk in rows.chunks(RAW_ROWS_PER_TX) {
        conn.execute("BEGIN").await?;
        for row in chunk {
            match row {
                RawRow::Conversation(id, owner) => {
                    sqlx::query(
                        "INSERT INTO bench_messages_conversations (conversation_id, owner_id)
                         VALUES ($1, $2)
                         ON CONFLICT (conversation_id) DO UPDATE SET owner_id = excluded.owner_id",
                    )
                    .bind(id)
                    .bind(owner)
                    .execute(&mut conn)
                    .await?;
                }
                RawRow::Message(m) => {
                    sqlx::query(
                        "INSERT INTO bench_messages (id, conversation_id, owner_id, seq, role,
                             content, status, reply_to, model, finish_reason, prompt_tokens,
                             completion_tokens, total_tokens, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                         ON CONFLICT (id) DO UPDATE SET content = excluded.content,
                             status = excluded.status, model = excluded.model,
                             finish_reason = excluded.finish_reason,
                             prompt_tokens = excluded.prompt_tokens,
                             completion_tokens = excluded.completion_tokens,
                             total_tokens = excluded.total_tokens,
                             updated_at = excluded.updated_at",
                    )
                    .bind(m.id)
                    .bind(m.conversation_id)
                    .bind(m.owner_id)
                    .bind(m.seq)
                    .bind(m.role)
                    .bind(&m.content)
                    .bind(m.status)
                    .bind(m.reply_to)
                    .bind(&m.model)
                    .bind(&m.finish_reason)
                    .bind(m.tokens[0])
                    .bind(m.tokens[1])
                    .bind(m.tokens[2])
                    .bind(m.created_at)
                    .bind(m.updated_at)
                    .execute(&mut conn)
                    .await?;
                }
            }
        }
        conn.execute("COMMIT").await?;
    }
    let elapsed = started.elapsed();
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_messages")
        .fetch_one(&mut conn)
        .await?;
    let expected = rows
        .iter()
        .filter_map(|r| match r {
            RawRow::Message(m) => Some(m.id),
            RawRow::Conversation(..) => None,
        })
        .collect::<HashSet<_>>()
        .len();
    if written as usize != expected {
        bail!("the raw upserts left {written} messages, not {expected}");
    }
    conn.close().await.ok();
    Ok(Run {
        elapsed,
        per_projection: Vec::new(),
        batches: Vec::new(),
    })
}
