//! Projection `assistants`: each assistant with its settings and its activity
//! (conversations, messages, last activity), for `GET /assistants`.
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

/// `last_*` is the position of the last event applied to the row: the cache
/// only keeps a copy at least that new.
pub const ASSISTANTS: Table = Table {
    name: "assistants",
    key: &["id"],
    columns: &[
        column("id", Uuid),
        column("owner_id", Uuid),
        column("name", Text),
        column("role", Text),
        column("instructions", Text),
        column("model", Text),
        column("temperature", F64),
        column("metadata", Json),
        column("status", Text),
        column("conversation_count", I64),
        column("message_count", I64),
        column("last_activity_at", Timestamp),
        column("created_at", Timestamp),
        column("updated_at", Timestamp),
        column("version", I64),
        column("last_tx", I64),
        column("last_gp", I64),
    ],
};

/// Which assistant a conversation belongs to, for counting its messages.
pub const CONVERSATIONS: Table = Table {
    name: "assistants_conversations",
    key: &["conversation_id"],
    columns: &[
        column("conversation_id", Uuid),
        column("assistant_id", Uuid),
    ],
};

pub const PROJECTION: Registered = Registered {
    name: "assistants",
    tables: &[&ASSISTANTS, &CONVERSATIONS],
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

/// What a conversation event adds to its assistant: messages counted (user
/// messages and requested replies) and the time of the activity.
fn activity(event: &Event) -> Option<(i64, DateTime<Utc>)> {
    Some(match event {
        Event::MessagePosted(m) => (1, m.posted_at),
        Event::ReplyRequested(r) => (1, r.requested_at),
        Event::ReplyCompleted(r) => (0, r.completed_at),
        _ => return None,
    })
}

/// A forgetting needs the user's assistants (to drop their conversations'
/// links); an activity needs its conversation's assistant.
fn lookup(e: &EventEnvelope, event: &Event) -> Option<Lookup> {
    if let Event::UserForgotten = event {
        return Some(Lookup {
            table: &ASSISTANTS,
            filter: eq("owner_id", e.stream_id),
            columns: &["id"],
        });
    }
    activity(event)?;
    Some(Lookup {
        table: &CONVERSATIONS,
        filter: eq("conversation_id", e.conversation_id(event)?),
        columns: &["assistant_id"],
    })
}

fn ops(e: &EventEnvelope, event: &Event, found: &Found) -> Vec<Op> {
    // The position of the last event applied to a row.
    let last_tx = ("last_tx", Set::To(e.transaction_id.into()));
    let last_gp = ("last_gp", Set::To(e.global_position.into()));
    match event {
        Event::UserForgotten => {
            let theirs: Vec<Value> = found.uuids().into_iter().map(Value::from).collect();
            let mut ops = Vec::new();
            if !theirs.is_empty() {
                let links = vec![Cond::In("assistant_id", theirs)];
                ops.push(Op::delete(&CONVERSATIONS, links));
            }
            ops.push(Op::delete(&ASSISTANTS, vec![eq("owner_id", e.stream_id)]));
            ops
        }
        Event::AssistantCreated(a) => vec![Op::insert(
            &ASSISTANTS,
            [
                ("id", e.stream_id.into()),
                ("owner_id", a.owner_id.into()),
                ("name", a.name.clone().into()),
                ("role", a.role.clone().into()),
                ("instructions", a.instructions.clone().into()),
                ("model", a.model.clone().into()),
                ("temperature", a.temperature.into()),
                ("metadata", a.metadata.clone().into()),
                ("status", "active".into()),
                ("conversation_count", 0i64.into()),
                ("message_count", 0i64.into()),
                ("last_activity_at", Value::Null),
                ("created_at", a.created_at.into()),
                ("updated_at", a.created_at.into()),
                ("version", e.version.into()),
                ("last_tx", e.transaction_id.into()),
                ("last_gp", e.global_position.into()),
            ],
        )],
        // Only the fields the event carries change (NULL keeps the old value;
        // a JSON null reads as absent, as serde reads it).
        Event::AssistantUpdated(u) => vec![Op::update(
            &ASSISTANTS,
            vec![eq("id", e.stream_id)],
            [
                ("name", Set::Coalesce(u.name.clone().into())),
                ("role", Set::Coalesce(u.role.clone().into())),
                ("instructions", Set::Coalesce(u.instructions.clone().into())),
                ("model", Set::Coalesce(u.model.clone().into())),
                ("temperature", Set::Coalesce(u.temperature.into())),
                (
                    "metadata",
                    Set::Coalesce(u.metadata.clone().filter(|m| !m.is_null()).into()),
                ),
                ("updated_at", Set::To(u.updated_at.into())),
                ("version", Set::To(e.version.into())),
                last_tx,
                last_gp,
            ],
        )],
        Event::AssistantStatus { status, at } => vec![Op::update(
            &ASSISTANTS,
            vec![eq("id", e.stream_id)],
            [
                ("status", Set::To((*status).into())),
                ("updated_at", Set::To((*at).into())),
                ("version", Set::To(e.version.into())),
                last_tx,
                last_gp,
            ],
        )],
        Event::AssistantDeleted => vec![Op::delete(&ASSISTANTS, vec![eq("id", e.stream_id)])],
        Event::ConversationStarted(c) => vec![
            Op::insert(
                &CONVERSATIONS,
                [
                    ("conversation_id", e.stream_id.into()),
                    ("assistant_id", c.assistant_id.into()),
                ],
            ),
            Op::update(
                &ASSISTANTS,
                vec![eq("id", c.assistant_id)],
                [
                    ("conversation_count", Set::Add(1)),
                    ("last_activity_at", Set::Greatest(c.started_at.into())),
                    last_tx,
                    last_gp,
                ],
            ),
        ],
        _ => {
            let (Some((counted, at)), Some(assistant)) = (activity(event), found.uuid()) else {
                return vec![];
            };
            vec![Op::update(
                &ASSISTANTS,
                vec![eq("id", assistant)],
                [
                    ("message_count", Set::Add(counted)),
                    ("last_activity_at", Set::Greatest(at.into())),
                    last_tx,
                    last_gp,
                ],
            )]
        }
    }
}
