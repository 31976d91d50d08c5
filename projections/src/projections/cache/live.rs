//! The live path: the Redis tombstones (in `prepare`) and the lookup (its ops).

use std::collections::HashMap;

use ai_secretary_contract::{Event, EventEnvelope};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    cache::{Cache, Kind},
    executor,
    projection::{Decoded, Projection, ProjectionError},
};

/// Projection `cache`: tombstones the keys each event touches.
///
/// The Redis calls are made in `prepare`, before the batch's transaction opens
/// (a stalled Redis must not hold a transaction, and with it the relay's read
/// horizon, open); they are stamped, so a batch prepared twice changes nothing
/// the second time. `apply` only keeps the conversation → assistant lookup,
/// by the projection's rules.
pub struct CacheInvalidation {
    pub cache: Cache,
}

/// Events after which a conversation's assistant is no longer as cached: its
/// conversation and message counts and its last activity moved.
fn moves_its_assistant(event: &Event) -> bool {
    matches!(
        event,
        Event::ConversationStarted(_)
            | Event::MessagePosted(_)
            | Event::ReplyRequested(_)
            | Event::ReplyCompleted(_)
    )
}

#[async_trait::async_trait]
impl Projection for CacheInvalidation {
    fn name(&self) -> &'static str {
        super::PROJECTION.name
    }

    async fn prepare(&self, pool: &PgPool, batch: &[&Decoded]) -> Result<(), ProjectionError> {
        // Each conversation's assistant: from the batch's own starts, else from
        // the lookup the earlier batches kept (one query for the batch).
        let mut assistant_of: HashMap<Uuid, Uuid> = batch
            .iter()
            .filter_map(|d| match &d.event {
                Event::ConversationStarted(c) => Some((d.envelope.stream_id, c.assistant_id)),
                _ => None,
            })
            .collect();
        let unknown: Vec<Uuid> = batch
            .iter()
            .filter(|d| moves_its_assistant(&d.event))
            .filter_map(|d| d.envelope.conversation_id(&d.event))
            .filter(|id| !assistant_of.contains_key(id))
            .collect();
        if !unknown.is_empty() {
            let known: Vec<(Uuid, Uuid)> = sqlx::query_as(
                "SELECT conversation_id, assistant_id FROM cache_conversations
                 WHERE conversation_id = ANY($1)",
            )
            .bind(&unknown)
            .fetch_all(pool)
            .await?;
            assistant_of.extend(known);
        }
        for Decoded { envelope: e, event } in batch.iter().copied() {
            let at = e.position();
            if let Event::UserForgotten = event {
                self.cache.forget_owner(e.stream_id).await?;
            }
            match e.stream_type.as_str() {
                "user" => self.cache.invalidate(Kind::User, e.stream_id, at).await?,
                "assistant" => {
                    self.cache
                        .invalidate(Kind::Assistant, e.stream_id, at)
                        .await?
                }
                // A reply's events (in streams of their own) change their conversation.
                "conversation" | "reply" => {
                    let Some(conversation) = e.conversation_id(event) else {
                        continue;
                    };
                    self.cache
                        .invalidate(Kind::Conversation, conversation, at)
                        .await?;
                    if moves_its_assistant(event)
                        && let Some(assistant) = assistant_of.get(&conversation)
                    {
                        self.cache
                            .invalidate(Kind::Assistant, *assistant, at)
                            .await?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        Ok(executor::postgres::apply(tx, &super::RULES, e, event).await?)
    }
}
