//! The batch path: the lookup only (see `mod.rs`).

use ai_secretary_contract::{CONVERSATION, Event, EventEnvelope};
use uuid::Uuid;

use crate::fold::Rows;

/// Projection `cache`: its Postgres lookup `cache_conversations` (the Redis
/// values are not folded: a rebuild drops them and queries fill them again).
#[derive(Debug, Default)]
pub struct CacheFold {
    /// conversation id → assistant id.
    pub conversations: Rows<Uuid, Uuid>,
}

impl CacheFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        if let Event::ConversationStarted(c) = event
            && e.stream_type == CONVERSATION
        {
            self.conversations
                .insert_if_absent(e.stream_id, || c.assistant_id);
        }
    }
}
