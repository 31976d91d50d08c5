//! Projection `conversations`: title, status, message count, last message and
//! token totals of each conversation, for `GET /conversations`.

mod fold;
mod live;

pub use fold::{ConversationRow, ConversationsFold};
pub use live::Conversations;

use ai_secretary_contract::{Event, Usage};
use chrono::{DateTime, Utc};

use super::Fold;
use super::{Registered, table};
use crate::{cache::Cache, projection::Projection};

pub const PROJECTION: Registered = Registered {
    name: "conversations",
    tables: &[table("conversations", &["id"])],
    live,
    fold,
};

fn live(_: &Cache) -> std::sync::Arc<dyn Projection> {
    std::sync::Arc::new(Conversations)
}

fn fold() -> Fold {
    Fold::Conversations(Default::default())
}

/// What an event after the start changes in its conversation's row: the one
/// rule that both the live projection and the rebuild's fold (`fold.rs`) apply.
pub(crate) struct Change<'e> {
    pub title: Option<&'e str>,
    pub status: Option<&'static str>,
    /// Messages added (user messages and requested replies).
    pub counted: i64,
    pub last_message_at: Option<DateTime<Utc>>,
    pub usage: Usage,
    pub at: DateTime<Utc>,
}

/// The change `event` makes, or `None` for one that changes nothing here.
pub(crate) fn change(event: &Event) -> Option<Change<'_>> {
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
