//! The batch path: the same rules as `live.rs`, folded into rows in memory
//! (`crate::fold`), for rebuilds and `verify`.

use ai_secretary_contract::{Event, EventEnvelope};
use chrono::NaiveDate;
use uuid::Uuid;

use crate::fold::Rows;

/// `(owner_id, day, assistant_id, model)`.
pub type UsageKey = (Uuid, NaiveDate, Uuid, String);

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UsageRow {
    pub messages: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

/// Projection `usage_daily`: tables `usage_daily` and `usage_conversations`.
#[derive(Debug, Default)]
pub struct UsageFold {
    pub usage: Rows<UsageKey, UsageRow>,
    /// conversation id → (owner id, assistant id).
    pub conversations: Rows<Uuid, (Uuid, Uuid)>,
}

impl UsageFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        match event {
            Event::UserForgotten => {
                let user = e.stream_id;
                self.usage.remove_where(|(owner, ..), _| *owner == user);
                self.conversations
                    .remove_where(|_, (owner, _)| *owner == user);
            }
            Event::ConversationStarted(c) => {
                self.conversations
                    .insert_if_absent(e.stream_id, || (c.owner_id, c.assistant_id));
            }
            Event::ReplyCompleted(r) => {
                let Some((owner, assistant)) = e
                    .conversation_id(event)
                    .and_then(|c| self.conversations.get(&c).copied())
                else {
                    return;
                };
                // `($2::timestamptz AT TIME ZONE 'UTC')::date`
                let day = r.completed_at.date_naive();
                let row = self
                    .usage
                    .entry_or((owner, day, assistant, r.model.clone()), UsageRow::default);
                row.messages += 1;
                row.prompt_tokens += r.usage.prompt_tokens;
                row.completion_tokens += r.usage.completion_tokens;
                row.total_tokens += r.usage.total_tokens;
            }
            _ => {}
        }
    }
}
