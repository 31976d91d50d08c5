//! The batch path: the same rules as `live.rs`, folded into rows in memory
//! (`crate::fold`), for rebuilds and `verify`.

use ai_secretary_contract::{Event, EventEnvelope};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::fold::Rows;

#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub conversation_id: Uuid,
    pub owner_id: Uuid,
    pub seq: i64,
    pub role: &'static str,
    pub content: Option<String>,
    pub status: &'static str,
    pub reply_to: Option<Uuid>,
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Projection `messages`: tables `messages` and `messages_conversations`.
#[derive(Debug, Default)]
pub struct MessagesFold {
    pub messages: Rows<Uuid, MessageRow>,
    /// conversation id → owner id.
    pub conversations: Rows<Uuid, Uuid>,
}

impl MessagesFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        match event {
            Event::UserForgotten => {
                let user = e.stream_id;
                self.messages.remove_where(|_, m| m.owner_id == user);
                self.conversations.remove_where(|_, owner| *owner == user);
            }
            Event::ConversationStarted(c) => {
                self.conversations
                    .insert_if_absent(e.stream_id, || c.owner_id);
            }
            Event::ReplyStarted(r) => {
                // As the live projection: only a reply still waiting moves.
                if let Some(row) = self.messages.get_mut(&r.reply_id)
                    && matches!(row.status, "queued" | "in_progress")
                {
                    row.status = "in_progress";
                    row.updated_at = r.started_at;
                }
            }
            Event::ReplyCompleted(r) => {
                if let Some(row) = self.messages.get_mut(&r.reply_id) {
                    row.content = Some(r.content.clone());
                    row.status = "completed";
                    row.model = Some(r.model.clone());
                    row.finish_reason = Some(r.finish_reason.clone());
                    row.prompt_tokens = Some(r.usage.prompt_tokens);
                    row.completion_tokens = Some(r.usage.completion_tokens);
                    row.total_tokens = Some(r.usage.total_tokens);
                    row.updated_at = r.completed_at;
                }
            }
            Event::ReplyFailed(f) => {
                if let Some(row) = self.messages.get_mut(&f.reply_id) {
                    row.status = "failed";
                    row.error = Some(f.error.clone());
                    row.updated_at = f.failed_at;
                }
            }
            _ => {
                let Some(super::NewMessage {
                    id,
                    role,
                    content,
                    status,
                    reply_to,
                    at,
                }) = super::new_message(event)
                else {
                    return;
                };
                let Some(owner_id) = self.conversations.get(&e.stream_id).copied() else {
                    return;
                };
                self.messages.insert_if_absent(id, || MessageRow {
                    conversation_id: e.stream_id,
                    owner_id,
                    seq: e.version,
                    role,
                    content: content.cloned(),
                    status,
                    reply_to,
                    model: None,
                    finish_reason: None,
                    prompt_tokens: None,
                    completion_tokens: None,
                    total_tokens: None,
                    error: None,
                    created_at: at,
                    updated_at: at,
                });
            }
        }
    }
}
