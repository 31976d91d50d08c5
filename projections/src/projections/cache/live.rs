//! The live path: the Redis tombstones (in `prepare`) and the lookup (its ops).

use std::collections::HashMap;

use ai_secretary_contract::{Event, EventEnvelope};
use uuid::Uuid;

use crate::{
    cache::{Cache, Invalidations, Kind},
    db::Db,
    executor,
    ops::{Cond, Lookup, Value},
    projection::{Batch, Decoded, Projection, ProjectionError},
};

/// Projection `cache`: tombstones the keys each event touches.
///
/// The Redis calls are made in `prepare`, before the batch's transaction opens
/// (a stalled Redis must not hold a transaction, and with it the relay's read
/// horizon, open), in one round trip for the batch; they are stamped, so a
/// batch prepared twice changes nothing the second time. `apply` only keeps the conversation → assistant lookup,
/// by the projection's rules.
pub struct CacheInvalidation {
    cache: Cache,
    /// Conversations' assistants, as the lookup table said: a conversation's
    /// assistant never changes, so an answer kept here
    /// stays true, and the lookup query is made only for conversations not
    /// seen lately (once each, instead of once per batch). A conversation
    /// forgotten with its user is still here a while: an event that raced the
    /// forgetting then invalidates its (deleted) assistant's key too, which
    /// costs a cache miss at most.
    assistants: moka::sync::Cache<Uuid, Uuid>,
}

/// Conversations whose assistant is kept (a few ids each): the active ones.
const ASSISTANTS_KEPT: u64 = 4_096;

impl CacheInvalidation {
    pub fn new(cache: Cache) -> CacheInvalidation {
        CacheInvalidation {
            cache,
            assistants: moka::sync::Cache::new(ASSISTANTS_KEPT),
        }
    }
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

    /// Its Redis work is done in `prepare`, for every batch; its table only
    /// by its rules.
    fn touches(&self, e: &EventEnvelope, event: &Event) -> bool {
        super::RULES.touches(e, event)
    }

    async fn prepare(&self, db: &Db, batch: &[&Decoded]) -> Result<(), ProjectionError> {
        // Each conversation's assistant: from the batch's own starts, else as
        // kept from earlier batches, else from the lookup the earlier batches
        // wrote (one query for the batch).
        let mut assistant_of: HashMap<Uuid, Uuid> = batch
            .iter()
            .filter_map(|d| match &d.event {
                Event::ConversationStarted(c) => Some((d.envelope.stream_id, c.assistant_id)),
                _ => None,
            })
            .collect();
        let mut unknown: Vec<Uuid> = Vec::new();
        for conversation in batch
            .iter()
            .filter(|d| moves_its_assistant(&d.event))
            .filter_map(|d| d.envelope.conversation_id(&d.event))
        {
            if assistant_of.contains_key(&conversation) {
                continue;
            }
            match self.assistants.get(&conversation) {
                Some(assistant) => {
                    assistant_of.insert(conversation, assistant);
                }
                None => unknown.push(conversation),
            }
        }
        if !unknown.is_empty() {
            // Kept as the table answered (the batch's own starts are not: a
            // flood of new conversations would only churn what is kept).
            for (conversation, assistant) in assistants_of(db, &unknown).await? {
                self.assistants.insert(conversation, assistant);
                assistant_of.insert(conversation, assistant);
            }
        }
        // Collected for the whole batch and sent in one round trip: a round
        // trip per event, awaited one by one, was what bounded the projection.
        let mut invalidations = Invalidations::default();
        for Decoded { envelope: e, event } in batch.iter().copied() {
            let at = e.position();
            if let Event::UserForgotten = event {
                invalidations.forget_owner(e.stream_id);
            }
            match e.stream_type.as_str() {
                "user" => invalidations.stamp(Kind::User, e.stream_id, at),
                "assistant" => invalidations.stamp(Kind::Assistant, e.stream_id, at),
                // A reply's events (in streams of their own) change their conversation.
                "conversation" | "reply" => {
                    let Some(conversation) = e.conversation_id(event) else {
                        continue;
                    };
                    invalidations.stamp(Kind::Conversation, conversation, at);
                    if moves_its_assistant(event)
                        && let Some(assistant) = assistant_of.get(&conversation)
                    {
                        invalidations.stamp(Kind::Assistant, *assistant, at);
                    }
                }
                _ => {}
            }
        }
        Ok(self.cache.invalidate(&invalidations).await?)
    }

    async fn apply(
        &self,
        batch: &mut Batch,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        batch.apply_rules(&super::RULES, e, event).await
    }
}

/// Conversations' ids in one SQLite lookup: SQLite takes a parameter per
/// element of an `IN (…)` list and allows at most 32,766 in a statement; a
/// batch asks for one per event at most, and a gap fill can make a batch
/// long, so the ids go in slices far below that limit.
const LOOKUP_CHUNK: usize = 1_000;

/// The assistant of each of `conversations` that the lookup table knows.
async fn assistants_of(db: &Db, conversations: &[Uuid]) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    match db {
        // One array parameter for the lot.
        Db::Postgres(pool) => {
            sqlx::query_as(
                "SELECT conversation_id, assistant_id FROM cache_conversations
                 WHERE conversation_id = ANY($1)",
            )
            .bind(conversations)
            .fetch_all(pool)
            .await
        }
        // No arrays in SQLite: the executor's lookup, whose `IN (…)` the SQLite
        // dialect expands into one parameter per id, bound as their BLOBs.
        Db::Sqlite(db) => {
            let mut conn = db.pool.acquire().await?;
            let mut known = Vec::new();
            for chunk in conversations.chunks(LOOKUP_CHUNK) {
                let lookup = Lookup {
                    table: &super::CONVERSATIONS,
                    filter: Cond::In(
                        "conversation_id",
                        chunk.iter().map(|id| Value::Uuid(*id)).collect(),
                    ),
                    columns: &["conversation_id", "assistant_id"],
                };
                let found = executor::sqlite::read(&mut conn, &lookup).await?;
                known.extend(found.rows.iter().filter_map(|row| match row.as_slice() {
                    [Value::Uuid(conversation), Value::Uuid(assistant)] => {
                        Some((*conversation, *assistant))
                    }
                    _ => None,
                }));
            }
            Ok(known)
        }
    }
}
