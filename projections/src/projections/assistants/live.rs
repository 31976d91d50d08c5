//! The live path: each event applied in SQL, in the batch's transaction.

use super::activity;
use crate::projection::{Projection, ProjectionError, forget_user};
use ai_secretary_contract::{Event, EventEnvelope};
use sqlx::PgConnection;

pub struct Assistants;

#[async_trait::async_trait]
impl Projection for Assistants {
    fn name(&self) -> &'static str {
        super::PROJECTION.name
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        let (stx, sgp) = (e.transaction_id, e.global_position);
        match event {
            Event::UserForgotten => {
                forget_user(
                    tx,
                    e.stream_id,
                    &[
                        "DELETE FROM assistants_conversations WHERE assistant_id IN
                             (SELECT id FROM assistants WHERE owner_id = $1)",
                        "DELETE FROM assistants WHERE owner_id = $1",
                    ],
                )
                .await?;
            }
            Event::AssistantCreated(a) => {
                sqlx::query(
                    "INSERT INTO assistants (id, owner_id, name, role, instructions, model,
                         temperature, metadata, status, created_at, updated_at, version, last_tx, last_gp)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'active', $9, $9, $10, $11, $12)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(e.stream_id)
                .bind(a.owner_id)
                .bind(&a.name)
                .bind(&a.role)
                .bind(&a.instructions)
                .bind(&a.model)
                .bind(a.temperature)
                .bind(&a.metadata)
                .bind(a.created_at)
                .bind(e.version)
                .bind(stx)
                .bind(sgp)
                .execute(&mut *tx)
                .await?;
            }
            Event::AssistantUpdated(u) => {
                // Only the fields the event carries change (NULL keeps the old value).
                sqlx::query(
                    "UPDATE assistants SET
                         name = COALESCE($2, name), role = COALESCE($3, role),
                         instructions = COALESCE($4, instructions), model = COALESCE($5, model),
                         temperature = COALESCE($6, temperature), metadata = COALESCE($7, metadata),
                         updated_at = $8, version = $9, last_tx = $10, last_gp = $11
                     WHERE id = $1",
                )
                .bind(e.stream_id)
                .bind(&u.name)
                .bind(&u.role)
                .bind(&u.instructions)
                .bind(&u.model)
                .bind(u.temperature)
                .bind(&u.metadata)
                .bind(u.updated_at)
                .bind(e.version)
                .bind(stx)
                .bind(sgp)
                .execute(&mut *tx)
                .await?;
            }
            Event::AssistantStatus { status, at } => {
                sqlx::query(
                    "UPDATE assistants SET status = $2, updated_at = $3, version = $4,
                         last_tx = $5, last_gp = $6
                     WHERE id = $1",
                )
                .bind(e.stream_id)
                .bind(*status)
                .bind(at)
                .bind(e.version)
                .bind(stx)
                .bind(sgp)
                .execute(&mut *tx)
                .await?;
            }
            Event::AssistantDeleted => {
                sqlx::query("DELETE FROM assistants WHERE id = $1")
                    .bind(e.stream_id)
                    .execute(&mut *tx)
                    .await?;
            }
            Event::ConversationStarted(c) => {
                sqlx::query(
                    "INSERT INTO assistants_conversations (conversation_id, assistant_id)
                     VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(e.stream_id)
                .bind(c.assistant_id)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE assistants SET conversation_count = conversation_count + 1,
                         last_activity_at = GREATEST(last_activity_at, $2), last_tx = $3, last_gp = $4
                     WHERE id = $1",
                )
                .bind(c.assistant_id)
                .bind(c.started_at)
                .bind(stx)
                .bind(sgp)
                .execute(&mut *tx)
                .await?;
            }
            _ => {
                let Some((counted, at)) = activity(event) else {
                    return Ok(());
                };
                sqlx::query(
                    "UPDATE assistants a SET message_count = a.message_count + $2,
                         last_activity_at = GREATEST(a.last_activity_at, $3), last_tx = $4, last_gp = $5
                     FROM assistants_conversations c
                     WHERE c.conversation_id = $1 AND a.id = c.assistant_id",
                )
                .bind(e.conversation_id(event))
                .bind(counted)
                .bind(at)
                .bind(stx)
                .bind(sgp)
                .execute(&mut *tx)
                .await?;
            }
        }
        Ok(())
    }
}
