//! Projection `conversations`: title, status, message count, last message and
//! token totals of each conversation, for `GET /conversations`.

use sqlx::PgConnection;

use crate::{
    envelope::{Event, EventEnvelope, Usage},
    projection::{Projection, ProjectionError},
};

pub struct Conversations;

#[async_trait::async_trait]
impl Projection for Conversations {
    fn name(&self) -> &'static str {
        "conversations"
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        if let Event::ConversationStarted(c) = event {
            sqlx::query(
                "INSERT INTO conversations (id, owner_id, assistant_id, title, status,
                     created_at, updated_at, version, last_tx, last_gp)
                 VALUES ($1, $2, $3, $4, 'active', $5, $5, $6, $7, $8)
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(e.stream_id)
            .bind(c.owner_id)
            .bind(c.assistant_id)
            .bind(&c.title)
            .bind(c.started_at)
            .bind(e.version)
            .bind(e.transaction_id)
            .bind(e.global_position)
            .execute(&mut *tx)
            .await?;
            return Ok(());
        }
        // Every other conversation event changes some of these; NULL keeps a value.
        let (title, status, counted, last_message_at, usage, at) = match event {
            Event::ConversationRenamed(r) => (Some(&r.title), None, 0, None, None, r.renamed_at),
            Event::ConversationArchived { at } => (None, Some("archived"), 0, None, None, *at),
            Event::MessagePosted(m) => (None, None, 1, Some(m.posted_at), None, m.posted_at),
            Event::ReplyRequested(r) => (None, None, 1, None, None, r.requested_at),
            Event::ReplyCompleted(r) => (
                None,
                None,
                0,
                Some(r.completed_at),
                Some(r.usage),
                r.completed_at,
            ),
            Event::ReplyStarted(r) => (None, None, 0, None, None, r.started_at),
            Event::ReplyFailed(f) => (None, None, 0, None, None, f.failed_at),
            _ => return Ok(()),
        };
        let usage = usage.unwrap_or(Usage::default());
        sqlx::query(
            "UPDATE conversations SET
                 title = COALESCE($2, title), status = COALESCE($3, status),
                 message_count = message_count + $4,
                 last_message_at = COALESCE($5, last_message_at),
                 prompt_tokens = prompt_tokens + $6, completion_tokens = completion_tokens + $7,
                 total_tokens = total_tokens + $8,
                 updated_at = $9, version = $10, last_tx = $11, last_gp = $12
             WHERE id = $1",
        )
        .bind(e.stream_id)
        .bind(title)
        .bind(status)
        .bind(counted as i64)
        .bind(last_message_at)
        .bind(usage.prompt_tokens)
        .bind(usage.completion_tokens)
        .bind(usage.total_tokens)
        .bind(at)
        .bind(e.version)
        .bind(e.transaction_id)
        .bind(e.global_position)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}
