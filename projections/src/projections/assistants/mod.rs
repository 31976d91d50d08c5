//! Projection `assistants`: each assistant with its settings and its activity
//! (conversations, messages, last activity), for `GET /assistants`.

mod fold;
mod live;

pub use fold::{AssistantRow, AssistantsFold};
pub use live::Assistants;

use ai_secretary_contract::Event;
use chrono::{DateTime, Utc};

use super::Fold;
use super::{Registered, table};
use crate::{cache::Cache, projection::Projection};

pub const PROJECTION: Registered = Registered {
    name: "assistants",
    tables: &[
        table("assistants", &["id"]),
        table("assistants_conversations", &["conversation_id"]),
    ],
    live,
    fold,
};

fn live(_: &Cache) -> std::sync::Arc<dyn Projection> {
    std::sync::Arc::new(Assistants)
}

fn fold() -> Fold {
    Fold::Assistants(Default::default())
}

/// What a conversation event adds to its assistant: messages counted (user
/// messages and requested replies) and the time of the activity. The rule both
/// the live projection and the rebuild's fold (`fold.rs`) apply.
pub(crate) fn activity(event: &Event) -> Option<(i64, DateTime<Utc>)> {
    Some(match event {
        Event::MessagePosted(m) => (1, m.posted_at),
        Event::ReplyRequested(r) => (1, r.requested_at),
        Event::ReplyCompleted(r) => (0, r.completed_at),
        _ => return None,
    })
}
