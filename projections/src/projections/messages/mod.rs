//! Projection `messages`: a conversation's user messages and replies in order,
//! each reply listed as soon as it is requested and updated as it ends.

mod fold;
mod live;

pub use fold::{MessageRow, MessagesFold};
pub use live::Messages;

use ai_secretary_contract::Event;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Fold;
use super::{Registered, table};
use crate::{cache::Cache, projection::Projection};

pub const PROJECTION: Registered = Registered {
    name: "messages",
    tables: &[
        table("messages", &["id"]),
        table("messages_conversations", &["conversation_id"]),
    ],
    live,
    fold,
};

fn live(_: &Cache) -> std::sync::Arc<dyn Projection> {
    std::sync::Arc::new(Messages)
}

fn fold() -> Fold {
    Fold::Messages(Default::default())
}

/// A message an event adds to its conversation's list: the rule both the live
/// projection and the rebuild's fold (`fold.rs`) apply.
pub(crate) struct NewMessage<'e> {
    pub id: Uuid,
    pub role: &'static str,
    pub content: Option<&'e String>,
    pub status: &'static str,
    pub reply_to: Option<Uuid>,
    pub at: DateTime<Utc>,
}

/// The user message a `MessagePosted` adds, or the queued reply a
/// `ReplyRequested` adds; `None` for any other event.
pub(crate) fn new_message(event: &Event) -> Option<NewMessage<'_>> {
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
