//! The batch path: the same rules as `live.rs`, folded into rows in memory
//! (`crate::fold`), for rebuilds and `verify`.

use ai_secretary_contract::{Event, EventEnvelope};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::fold::{Rows, stamp};

#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRow {
    pub owner_id: Uuid,
    pub assistant_id: Uuid,
    pub title: String,
    pub status: String,
    pub message_count: i64,
    pub last_message_at: Option<DateTime<Utc>>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    pub last_tx: i64,
    pub last_gp: i64,
}

/// Projection `conversations`: table `conversations`.
#[derive(Debug, Default)]
pub struct ConversationsFold {
    pub conversations: Rows<Uuid, ConversationRow>,
}

impl ConversationsFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        let (last_tx, last_gp) = stamp(e);
        if let Event::UserForgotten = event {
            let user = e.stream_id;
            self.conversations.remove_where(|_, c| c.owner_id == user);
            return;
        }
        if let Event::ConversationStarted(c) = event {
            self.conversations
                .insert_if_absent(e.stream_id, || ConversationRow {
                    owner_id: c.owner_id,
                    assistant_id: c.assistant_id,
                    title: c.title.clone(),
                    status: "active".into(),
                    message_count: 0,
                    last_message_at: None,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    total_tokens: 0,
                    created_at: c.started_at,
                    updated_at: c.started_at,
                    version: e.version,
                    last_tx,
                    last_gp,
                });
            return;
        }
        let Some(super::Change {
            title,
            status,
            counted,
            last_message_at,
            usage,
            at,
        }) = super::change(event)
        else {
            return;
        };
        let Some(conversation_id) = e.conversation_id(event) else {
            return;
        };
        if let Some(row) = self.conversations.get_mut(&conversation_id) {
            if let Some(title) = title {
                title.clone_into(&mut row.title);
            }
            if let Some(status) = status {
                row.status = status.into();
            }
            row.message_count += counted;
            row.last_message_at = last_message_at.or(row.last_message_at);
            row.prompt_tokens += usage.prompt_tokens;
            row.completion_tokens += usage.completion_tokens;
            row.total_tokens += usage.total_tokens;
            row.updated_at = at;
            // A reply's events leave the conversation's own version alone.
            row.version = e.conversation_version().unwrap_or(row.version);
            (row.last_tx, row.last_gp) = (last_tx, last_gp);
        }
    }
}
