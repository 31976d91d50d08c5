//! The live path: each event applied in SQL, in the batch's transaction.

use super::{Change, change};
use crate::projection::{Projection, ProjectionError, forget_user};
use ai_secretary_contract::{Event, EventEnvelope};
use sqlx::PgConnection;

pub struct Conversations;

#[async_trait::async_trait]
impl Projection for Conversations {
    fn name(&self) -> &'static str {
        super::PROJECTION.name
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        if let Event::UserForgotten = event {
            let forget = ["DELETE FROM conversations WHERE owner_id = $1"];
            return forget_user(tx, e.stream_id, &forget).await;
        }
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
        // A reply's events (in streams of their own) change their conversation's
        // row but not its version, which stays the conversation's own (ETag).
        let Some(conversation_id) = e.conversation_id(event) else {
            return Ok(());
        };
        let Some(Change {
            title,
            status,
            counted,
            last_message_at,
            usage,
            at,
        }) = change(event)
        else {
            return Ok(());
        };
        sqlx::query(
            "UPDATE conversations SET
                 title = COALESCE($2, title), status = COALESCE($3, status),
                 message_count = message_count + $4,
                 last_message_at = COALESCE($5, last_message_at),
                 prompt_tokens = prompt_tokens + $6, completion_tokens = completion_tokens + $7,
                 total_tokens = total_tokens + $8,
                 updated_at = $9, version = COALESCE($10, version), last_tx = $11, last_gp = $12
             WHERE id = $1",
        )
        .bind(conversation_id)
        .bind(title)
        .bind(status)
        .bind(counted)
        .bind(last_message_at)
        .bind(usage.prompt_tokens)
        .bind(usage.completion_tokens)
        .bind(usage.total_tokens)
        .bind(at)
        .bind(e.conversation_version())
        .bind(e.transaction_id)
        .bind(e.global_position)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}
