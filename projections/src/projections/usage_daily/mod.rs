//! Projection `usage_daily`: completed replies and their tokens per owner, UTC
//! day, assistant and model, for `GET /stats/usage`.
//!
//! Its rules are pure (`ops`): the live path runs them in SQL
//! (`crate::executor::postgres`), the rebuild's fold on rows in memory.

use ai_secretary_contract::{Event, EventEnvelope};

use super::{Live, Registered};
use crate::{
    cache::Cache,
    ops::{Found, Lookup, Op, Rules, Set, Table, Type::*, column, eq},
    projection::Projection,
};

pub const USAGE_DAILY: Table = Table {
    name: "usage_daily",
    key: &["owner_id", "day", "assistant_id", "model"],
    columns: &[
        column("owner_id", Uuid),
        column("day", Date),
        column("assistant_id", Uuid),
        column("model", Text),
        column("messages", I64),
        column("prompt_tokens", I64),
        column("completion_tokens", I64),
        column("total_tokens", I64),
    ],
};

/// Each conversation's owner and assistant, for the replies it completes.
pub const CONVERSATIONS: Table = Table {
    name: "usage_conversations",
    key: &["conversation_id"],
    columns: &[
        column("conversation_id", Uuid),
        column("owner_id", Uuid),
        column("assistant_id", Uuid),
    ],
};

pub const PROJECTION: Registered = Registered {
    name: "usage_daily",
    tables: &[&USAGE_DAILY, &CONVERSATIONS],
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

/// A completed reply needs its conversation's owner and assistant.
fn lookup(e: &EventEnvelope, event: &Event) -> Option<Lookup> {
    let Event::ReplyCompleted(_) = event else {
        return None;
    };
    Some(Lookup {
        table: &CONVERSATIONS,
        filter: eq("conversation_id", e.conversation_id(event)?),
        columns: &["owner_id", "assistant_id"],
    })
}

fn ops(e: &EventEnvelope, event: &Event, found: &Found) -> Vec<Op> {
    match event {
        Event::UserForgotten => vec![
            Op::delete(&USAGE_DAILY, vec![eq("owner_id", e.stream_id)]),
            Op::delete(&CONVERSATIONS, vec![eq("owner_id", e.stream_id)]),
        ],
        Event::ConversationStarted(c) => vec![Op::insert(
            &CONVERSATIONS,
            [
                ("conversation_id", e.stream_id.into()),
                ("owner_id", c.owner_id.into()),
                ("assistant_id", c.assistant_id.into()),
            ],
        )],
        Event::ReplyCompleted(r) => {
            let Some([owner, assistant]) = found.rows.first().map(|row| [&row[0], &row[1]]) else {
                return vec![];
            };
            // The UTC day, computed here rather than in SQL (the value is bound).
            let day = r.completed_at.date_naive();
            let tokens = r.usage;
            vec![
                Op::insert(
                    &USAGE_DAILY,
                    [
                        ("owner_id", owner.clone()),
                        ("day", day.into()),
                        ("assistant_id", assistant.clone()),
                        ("model", r.model.clone().into()),
                        ("messages", 1i64.into()),
                        ("prompt_tokens", tokens.prompt_tokens.into()),
                        ("completion_tokens", tokens.completion_tokens.into()),
                        ("total_tokens", tokens.total_tokens.into()),
                    ],
                )
                .or_update([
                    ("messages", Set::Add(1)),
                    ("prompt_tokens", Set::Add(tokens.prompt_tokens)),
                    ("completion_tokens", Set::Add(tokens.completion_tokens)),
                    ("total_tokens", Set::Add(tokens.total_tokens)),
                ]),
            ]
        }
        _ => vec![],
    }
}
