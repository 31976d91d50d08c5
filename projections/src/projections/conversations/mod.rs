//! Projection `conversations`: title, status, message count, last message and
//! token totals of each conversation, for `GET /conversations`.
//!
//! Its rules are pure (`ops`): the live path runs them in SQL
//! (`crate::executor::postgres`), the rebuild's fold on rows in memory.

use ai_secretary_contract::{Event, EventEnvelope, Usage};
use chrono::{DateTime, Utc};

use super::{Live, Registered};
use crate::{
    cache::Cache,
    ops::{Found, Op, Rules, Set, Table, Type::*, Value, column, eq},
    projection::Projection,
};

pub const CONVERSATIONS: Table = Table {
    name: "conversations",
    key: &["id"],
    columns: &[
        column("id", Uuid),
        column("owner_id", Uuid),
        column("assistant_id", Uuid),
        column("title", Text),
        column("status", Text),
        column("message_count", I64),
        column("last_message_at", Timestamp),
        column("prompt_tokens", I64),
        column("completion_tokens", I64),
        column("total_tokens", I64),
        column("created_at", Timestamp),
        column("updated_at", Timestamp),
        column("version", I64),
        column("last_tx", I64),
        column("last_gp", I64),
    ],
};

pub const PROJECTION: Registered = Registered {
    name: "conversations",
    tables: &[&CONVERSATIONS],
    rules: RULES,
    live,
};

/// Nothing to read: every change is to the event's own conversation.
const RULES: Rules = Rules {
    lookup: |_, _| None,
    ops,
};

fn live(_: &Cache) -> std::sync::Arc<dyn Projection> {
    std::sync::Arc::new(Live {
        name: PROJECTION.name,
        rules: RULES,
    })
}

fn ops(e: &EventEnvelope, event: &Event, _: &Found) -> Vec<Op> {
    if let Event::UserForgotten = event {
        return vec![Op::delete(
            &CONVERSATIONS,
            vec![eq("owner_id", e.stream_id)],
        )];
    }
    if let Event::ConversationStarted(c) = event {
        return vec![Op::insert(
            &CONVERSATIONS,
            [
                ("id", e.stream_id.into()),
                ("owner_id", c.owner_id.into()),
                ("assistant_id", c.assistant_id.into()),
                ("title", c.title.clone().into()),
                ("status", "active".into()),
                ("message_count", 0i64.into()),
                ("last_message_at", Value::Null),
                ("prompt_tokens", 0i64.into()),
                ("completion_tokens", 0i64.into()),
                ("total_tokens", 0i64.into()),
                ("created_at", c.started_at.into()),
                ("updated_at", c.started_at.into()),
                ("version", e.version.into()),
                ("last_tx", e.transaction_id.into()),
                ("last_gp", e.global_position.into()),
            ],
        )];
    }
    // Every other conversation event changes some of these; NULL keeps a value.
    // A reply's events (in streams of their own) change their conversation's
    // row but not its version, which stays the conversation's own (ETag).
    let (Some(conversation_id), Some(change)) = (e.conversation_id(event), change(event)) else {
        return vec![];
    };
    vec![Op::update(
        &CONVERSATIONS,
        vec![eq("id", conversation_id)],
        [
            ("title", Set::Coalesce(change.title.into())),
            ("status", Set::Coalesce(change.status.into())),
            ("message_count", Set::Add(change.counted)),
            (
                "last_message_at",
                Set::Coalesce(change.last_message_at.into()),
            ),
            ("prompt_tokens", Set::Add(change.usage.prompt_tokens)),
            (
                "completion_tokens",
                Set::Add(change.usage.completion_tokens),
            ),
            ("total_tokens", Set::Add(change.usage.total_tokens)),
            ("updated_at", Set::To(change.at.into())),
            ("version", Set::Coalesce(e.conversation_version().into())),
            ("last_tx", Set::To(e.transaction_id.into())),
            ("last_gp", Set::To(e.global_position.into())),
        ],
    )]
}

/// What an event after the start changes in its conversation's row.
struct Change<'e> {
    title: Option<&'e str>,
    status: Option<&'static str>,
    /// Messages added (user messages and requested replies).
    counted: i64,
    last_message_at: Option<DateTime<Utc>>,
    usage: Usage,
    at: DateTime<Utc>,
}

/// The change `event` makes, or `None` for one that changes nothing here.
fn change(event: &Event) -> Option<Change<'_>> {
    let change = |counted, last_message_at, at| Change {
        title: None,
        status: None,
        counted,
        last_message_at,
        usage: Usage::default(),
        at,
    };
    Some(match event {
        Event::ConversationRenamed(r) => Change {
            title: Some(&r.title),
            ..change(0, None, r.renamed_at)
        },
        Event::ConversationArchived { at } => Change {
            status: Some("archived"),
            ..change(0, None, *at)
        },
        Event::MessagePosted(m) => change(1, Some(m.posted_at), m.posted_at),
        Event::ReplyRequested(r) => change(1, None, r.requested_at),
        Event::ReplyStarted(r) => change(0, None, r.started_at),
        Event::ReplyCompleted(r) => Change {
            usage: r.usage,
            ..change(0, Some(r.completed_at), r.completed_at)
        },
        Event::ReplyFailed(f) => change(0, None, f.failed_at),
        _ => return None,
    })
}
