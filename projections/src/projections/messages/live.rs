//! The live path: each event applied in SQL, in the batch's transaction.

use super::{NewMessage, new_message};
use crate::projection::{Projection, ProjectionError, forget_user};
use ai_secretary_contract::{Event, EventEnvelope};
use sqlx::PgConnection;

pub struct Messages;

#[async_trait::async_trait]
impl Projection for Messages {
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
                        "DELETE FROM messages WHERE owner_id = $1",
                        "DELETE FROM messages_conversations WHERE owner_id = $1",
                    ],
                )
                .await?;
            }
            Event::ConversationStarted(c) => {
                sqlx::query(
                    "INSERT INTO messages_conversations (conversation_id, owner_id)
                     VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(e.stream_id)
                .bind(c.owner_id)
                .execute(&mut *tx)
                .await?;
            }
            Event::ReplyStarted(r) => {
                // Only a reply still waiting moves to in_progress: a late or repeated
                // start never reopens one that ended.
                sqlx::query(
                    "UPDATE messages SET status = 'in_progress', updated_at = $2
                     WHERE id = $1 AND status IN ('queued', 'in_progress')",
                )
                .bind(r.reply_id)
                .bind(r.started_at)
                .execute(&mut *tx)
                .await?;
            }
            Event::ReplyCompleted(r) => {
                sqlx::query(
                    "UPDATE messages SET content = $2, status = 'completed', model = $3,
                         finish_reason = $4, prompt_tokens = $5, completion_tokens = $6,
                         total_tokens = $7, updated_at = $8
                     WHERE id = $1",
                )
                .bind(r.reply_id)
                .bind(&r.content)
                .bind(&r.model)
                .bind(&r.finish_reason)
                .bind(r.usage.prompt_tokens)
                .bind(r.usage.completion_tokens)
                .bind(r.usage.total_tokens)
                .bind(r.completed_at)
                .execute(&mut *tx)
                .await?;
            }
            Event::ReplyFailed(f) => {
                sqlx::query(
                    "UPDATE messages SET status = 'failed', error = $2, updated_at = $3 WHERE id = $1",
                )
                .bind(f.reply_id)
                .bind(&f.error)
                .bind(f.failed_at)
                .execute(&mut *tx)
                .await?;
            }
            _ => {
                let Some(NewMessage {
                    id,
                    role,
                    content,
                    status,
                    reply_to,
                    at,
                }) = new_message(event)
                else {
                    return Ok(());
                };
                // seq is the event's version in the conversation stream: list order.
                sqlx::query(
                    "INSERT INTO messages (id, conversation_id, owner_id, seq, role, content,
                         status, reply_to, created_at, updated_at)
                     SELECT $1, $2, c.owner_id, $3, $4, $5, $6, $7, $8, $8
                     FROM messages_conversations c WHERE c.conversation_id = $2
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(id)
                .bind(e.stream_id)
                .bind(e.version)
                .bind(role)
                .bind(content)
                .bind(status)
                .bind(reply_to)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
        }
        Ok(())
    }
}
