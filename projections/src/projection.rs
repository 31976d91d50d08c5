//! What a projection is: a name and a way to apply one event inside the
//! transaction that also moves its checkpoint.

use sqlx::PgConnection;

use crate::envelope::{Event, EventEnvelope};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Cache(#[from] redis::RedisError),
}

/// A read model fed by the log. `apply` must be deterministic given the events
/// before it: replaying the log rebuilds the same rows.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Its checkpoint row and durable consumer name.
    fn name(&self) -> &'static str;

    /// Apply one decoded event. `tx` is the batch's transaction: what it writes
    /// commits together with the checkpoint, or not at all.
    async fn apply(
        &self,
        tx: &mut PgConnection,
        envelope: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError>;
}
