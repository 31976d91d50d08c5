//! Projection `cache`: tombstones the Redis keys each event touches
//! (`crate::cache` describes the cache), and keeps the conversation → assistant
//! lookup (`cache_conversations`) it needs to find an assistant's key.
//!
//! The lookup table follows the same typed rules as every read model (`ops`,
//! run by the Postgres executor and by the fold). The Redis calls are not ops:
//! they are made in `prepare`, outside the batch's transaction, and a rebuild
//! drops the keys rather than folding them (`live.rs`).

mod live;

pub use live::CacheInvalidation;

use ai_secretary_contract::{CONVERSATION, Event, EventEnvelope};

use super::Registered;
use crate::{
    cache::Cache,
    ops::{Found, Op, Rules, Table, Type::*, column},
    projection::Projection,
};

pub const CONVERSATIONS: Table = Table {
    name: "cache_conversations",
    key: &["conversation_id"],
    columns: &[
        column("conversation_id", Uuid),
        column("assistant_id", Uuid),
    ],
};

pub const PROJECTION: Registered = Registered {
    name: "cache",
    tables: &[&CONVERSATIONS],
    rules: RULES,
    live,
};

pub(crate) const RULES: Rules = Rules {
    lookup: |_, _| None,
    ops,
};

fn live(cache: &Cache) -> std::sync::Arc<dyn Projection> {
    std::sync::Arc::new(CacheInvalidation::new(cache.clone()))
}

fn ops(e: &EventEnvelope, event: &Event, _: &Found) -> Vec<Op> {
    match event {
        Event::ConversationStarted(c) if e.stream_type == CONVERSATION => vec![Op::insert(
            &CONVERSATIONS,
            [
                ("conversation_id", e.stream_id.into()),
                ("assistant_id", c.assistant_id.into()),
            ],
        )],
        _ => vec![],
    }
}
