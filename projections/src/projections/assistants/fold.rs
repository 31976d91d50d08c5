//! The batch path: the same rules as `live.rs`, folded into rows in memory
//! (`crate::fold`), for rebuilds and `verify`.

use std::collections::HashSet;

use ai_secretary_contract::{Event, EventEnvelope};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::fold::{Rows, greatest, stamp};

#[derive(Debug, Clone, PartialEq)]
pub struct AssistantRow {
    pub owner_id: Uuid,
    pub name: String,
    pub role: String,
    pub instructions: String,
    pub model: String,
    pub temperature: f64,
    pub metadata: Value,
    pub status: String,
    pub conversation_count: i64,
    pub message_count: i64,
    pub last_activity_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    pub last_tx: i64,
    pub last_gp: i64,
}

/// Projection `assistants`: tables `assistants` and `assistants_conversations`.
#[derive(Debug, Default)]
pub struct AssistantsFold {
    pub assistants: Rows<Uuid, AssistantRow>,
    /// conversation id → assistant id.
    pub conversations: Rows<Uuid, Uuid>,
}

impl AssistantsFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        let (last_tx, last_gp) = stamp(e);
        match event {
            Event::UserForgotten => {
                let user = e.stream_id;
                let theirs: HashSet<Uuid> = self
                    .assistants
                    .iter()
                    .filter(|(_, a)| a.owner_id == user)
                    .map(|(id, _)| *id)
                    .collect();
                self.conversations
                    .remove_where(|_, assistant| theirs.contains(assistant));
                self.assistants.remove_where(|_, a| a.owner_id == user);
            }
            Event::AssistantCreated(a) => {
                self.assistants
                    .insert_if_absent(e.stream_id, || AssistantRow {
                        owner_id: a.owner_id,
                        name: a.name.clone(),
                        role: a.role.clone(),
                        instructions: a.instructions.clone(),
                        model: a.model.clone(),
                        temperature: a.temperature,
                        metadata: a.metadata.clone(),
                        status: "active".into(),
                        conversation_count: 0,
                        message_count: 0,
                        last_activity_at: None,
                        created_at: a.created_at,
                        updated_at: a.created_at,
                        version: e.version,
                        last_tx,
                        last_gp,
                    })
            }
            Event::AssistantUpdated(u) => {
                if let Some(row) = self.assistants.get_mut(&e.stream_id) {
                    if let Some(v) = &u.name {
                        row.name.clone_from(v);
                    }
                    if let Some(v) = &u.role {
                        row.role.clone_from(v);
                    }
                    if let Some(v) = &u.instructions {
                        row.instructions.clone_from(v);
                    }
                    if let Some(v) = &u.model {
                        row.model.clone_from(v);
                    }
                    if let Some(v) = u.temperature {
                        row.temperature = v;
                    }
                    // A JSON null is SQL NULL here too: COALESCE keeps the old value.
                    if let Some(v) = u.metadata.as_ref().filter(|v| !v.is_null()) {
                        row.metadata.clone_from(v);
                    }
                    row.updated_at = u.updated_at;
                    row.version = e.version;
                    (row.last_tx, row.last_gp) = (last_tx, last_gp);
                }
            }
            Event::AssistantStatus { status, at } => {
                if let Some(row) = self.assistants.get_mut(&e.stream_id) {
                    row.status = (*status).into();
                    row.updated_at = *at;
                    row.version = e.version;
                    (row.last_tx, row.last_gp) = (last_tx, last_gp);
                }
            }
            Event::AssistantDeleted => self.assistants.remove(&e.stream_id),
            Event::ConversationStarted(c) => {
                self.conversations
                    .insert_if_absent(e.stream_id, || c.assistant_id);
                if let Some(row) = self.assistants.get_mut(&c.assistant_id) {
                    row.conversation_count += 1;
                    row.last_activity_at = greatest(row.last_activity_at, c.started_at);
                    (row.last_tx, row.last_gp) = (last_tx, last_gp);
                }
            }
            _ => {
                let Some((counted, at)) = super::activity(event) else {
                    return;
                };
                let Some(assistant) = e
                    .conversation_id(event)
                    .and_then(|c| self.conversations.get(&c).copied())
                else {
                    return;
                };
                if let Some(row) = self.assistants.get_mut(&assistant) {
                    row.message_count += counted;
                    row.last_activity_at = greatest(row.last_activity_at, at);
                    (row.last_tx, row.last_gp) = (last_tx, last_gp);
                }
            }
        }
    }
}
