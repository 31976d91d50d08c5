//! The live path: each event applied in SQL, in the batch's transaction.

use crate::projection::{Projection, ProjectionError, forget_user};
use ai_secretary_contract::{Event, EventEnvelope};
use sqlx::PgConnection;

pub struct UsageDaily;

#[async_trait::async_trait]
impl Projection for UsageDaily {
    fn name(&self) -> &'static str {
        super::PROJECTION.name
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        match event {
            Event::UserForgotten => {
                forget_user(
                    tx,
                    e.stream_id,
                    &[
                        "DELETE FROM usage_daily WHERE owner_id = $1",
                        "DELETE FROM usage_conversations WHERE owner_id = $1",
                    ],
                )
                .await?;
            }
            Event::ConversationStarted(c) => {
                sqlx::query(
                    "INSERT INTO usage_conversations (conversation_id, owner_id, assistant_id)
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(e.stream_id)
                .bind(c.owner_id)
                .bind(c.assistant_id)
                .execute(&mut *tx)
                .await?;
            }
            Event::ReplyCompleted(r) => {
                sqlx::query(
                    "INSERT INTO usage_daily AS u (owner_id, day, assistant_id, model, messages,
                         prompt_tokens, completion_tokens, total_tokens)
                     SELECT c.owner_id, ($2::timestamptz AT TIME ZONE 'UTC')::date, c.assistant_id,
                            $3, 1, $4, $5, $6
                     FROM usage_conversations c WHERE c.conversation_id = $1
                     ON CONFLICT (owner_id, day, assistant_id, model) DO UPDATE SET
                         messages = u.messages + 1,
                         prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
                         completion_tokens = u.completion_tokens + excluded.completion_tokens,
                         total_tokens = u.total_tokens + excluded.total_tokens",
                )
                .bind(e.conversation_id(event))
                .bind(r.completed_at)
                .bind(&r.model)
                .bind(r.usage.prompt_tokens)
                .bind(r.usage.completion_tokens)
                .bind(r.usage.total_tokens)
                .execute(&mut *tx)
                .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
