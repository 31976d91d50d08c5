//! Projection `messages`: a conversation's user messages and replies in order,
//! each reply listed as soon as it is requested and updated as it ends.
//!
//! Its rules are pure (`ops`): the live path runs them in SQL
//! (`crate::executor::postgres`), the rebuild's fold on rows in memory.

use ai_secretary_contract::{Event, EventEnvelope};
use chrono::{DateTime, Utc};

use super::{Live, Registered};
use crate::{
    cache::Cache,
    ops::{Cond, Found, Lookup, Op, Rules, Set, Table, Type::*, Value, column, eq},
    projection::Projection,
};

/// User messages and replies, ordered by their event's version in the
/// conversation stream (`seq`).
pub const MESSAGES: Table = Table {
    name: "messages",
    key: &["id"],
    columns: &[
        column("id", Uuid),
        column("conversation_id", Uuid),
        column("owner_id", Uuid),
        column("seq", I64),
        column("role", Text),
        column("content", Text),
        column("status", Text),
        column("reply_to", Uuid),
        column("model", Text),
        column("finish_reason", Text),
        column("prompt_tokens", I64),
        column("completion_tokens", I64),
        column("total_tokens", I64),
        column("error", Text),
        column("created_at", Timestamp),
        column("updated_at", Timestamp),
    ],
};

/// Each conversation's owner, for the messages it adds.
pub const CONVERSATIONS: Table = Table {
    name: "messages_conversations",
    key: &["conversation_id"],
    columns: &[column("conversation_id", Uuid), column("owner_id", Uuid)],
};

pub const PROJECTION: Registered = Registered {
    name: "messages",
    tables: &[&MESSAGES, &CONVERSATIONS],
    rules: RULES,
    live,
};

const RULES: Rules = Rules { lookup, ops };

fn live(_: &Cache) -> std::sync::Arc<dyn Projection> {
    std::sync::Arc::new(Live {
        name: PROJECTION.name,
        rules: RULES,
    })
}

/// A new message needs its conversation's owner.
fn lookup(e: &EventEnvelope, event: &Event) -> Option<Lookup> {
    new_message(event)?;
    Some(Lookup {
        table: &CONVERSATIONS,
        filter: eq("conversation_id", e.stream_id),
        columns: &["owner_id"],
    })
}

fn ops(e: &EventEnvelope, event: &Event, found: &Found) -> Vec<Op> {
    let id = |reply_id| vec![eq("id", reply_id)];
    match event {
        Event::UserForgotten => vec![
            Op::delete(&MESSAGES, vec![eq("owner_id", e.stream_id)]),
            Op::delete(&CONVERSATIONS, vec![eq("owner_id", e.stream_id)]),
        ],
        Event::ConversationStarted(c) => vec![Op::insert(
            &CONVERSATIONS,
            [
                ("conversation_id", e.stream_id.into()),
                ("owner_id", c.owner_id.into()),
            ],
        )],
        // Only a reply still waiting moves to in_progress: a late or repeated
        // start never reopens one that ended.
        Event::ReplyStarted(r) => {
            let waiting = Cond::In("status", vec!["queued".into(), "in_progress".into()]);
            vec![Op::update(
                &MESSAGES,
                vec![eq("id", r.reply_id), waiting],
                [
                    ("status", Set::To("in_progress".into())),
                    ("updated_at", Set::To(r.started_at.into())),
                ],
            )]
        }
        Event::ReplyCompleted(r) => vec![Op::update(
            &MESSAGES,
            id(r.reply_id),
            [
                ("content", Set::To(r.content.clone().into())),
                ("status", Set::To("completed".into())),
                ("model", Set::To(r.model.clone().into())),
                ("finish_reason", Set::To(r.finish_reason.clone().into())),
                ("prompt_tokens", Set::To(r.usage.prompt_tokens.into())),
                (
                    "completion_tokens",
                    Set::To(r.usage.completion_tokens.into()),
                ),
                ("total_tokens", Set::To(r.usage.total_tokens.into())),
                ("updated_at", Set::To(r.completed_at.into())),
            ],
        )],
        Event::ReplyFailed(f) => vec![Op::update(
            &MESSAGES,
            id(f.reply_id),
            [
                ("status", Set::To("failed".into())),
                ("error", Set::To(f.error.clone().into())),
                ("updated_at", Set::To(f.failed_at.into())),
            ],
        )],
        _ => {
            // A message of a conversation this projection never saw start is not listed.
            let (Some(m), Some(owner_id)) = (new_message(event), found.uuid()) else {
                return vec![];
            };
            vec![Op::insert(
                &MESSAGES,
                [
                    ("id", m.id.into()),
                    ("conversation_id", e.stream_id.into()),
                    ("owner_id", owner_id.into()),
                    // seq is the event's version in the conversation stream: list order.
                    ("seq", e.version.into()),
                    ("role", m.role.into()),
                    ("content", m.content.map(String::as_str).into()),
                    ("status", m.status.into()),
                    ("reply_to", m.reply_to.into()),
                    ("model", Value::Null),
                    ("finish_reason", Value::Null),
                    ("prompt_tokens", Value::Null),
                    ("completion_tokens", Value::Null),
                    ("total_tokens", Value::Null),
                    ("error", Value::Null),
                    ("created_at", m.at.into()),
                    ("updated_at", m.at.into()),
                ],
            )]
        }
    }
}

/// A message an event adds to its conversation's list.
struct NewMessage<'e> {
    id: uuid::Uuid,
    role: &'static str,
    content: Option<&'e String>,
    status: &'static str,
    reply_to: Option<uuid::Uuid>,
    at: DateTime<Utc>,
}

/// The user message a `MessagePosted` adds, or the queued reply a
/// `ReplyRequested` adds; `None` for any other event.
fn new_message(event: &Event) -> Option<NewMessage<'_>> {
    Some(match event {
        Event::MessagePosted(m) => NewMessage {
            id: m.message_id,
            role: "user",
            content: Some(&m.content),
            status: "completed",
            reply_to: None,
            at: m.posted_at,
        },
        Event::ReplyRequested(r) => NewMessage {
            id: r.reply_id,
            role: "assistant",
            content: None,
            status: "queued",
            reply_to: Some(r.reply_to),
            at: r.requested_at,
        },
        _ => return None,
    })
}
