//! What a projection is: a name and a way to apply one event inside the
//! transaction that also moves its checkpoint.

use ai_secretary_contract::{Event, EventEnvelope};

use crate::{
    db::{Db, Tx},
    executor::{self, deferred::Deferred, known::Known},
};

/// An event of a batch with its payload decoded.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub envelope: EventEnvelope,
    pub event: Event,
}

/// A live worker's batch: its transaction (`Db::begin_write`), the
/// read-model writes the executor holds back and gathers until their table is
/// read or the batch commits (`executor::deferred`), and what the worker's
/// lookups found (`executor::known`), which goes back to the worker only if
/// the batch commits.
pub struct Batch {
    pub tx: Tx,
    pub deferred: Deferred,
    pub known: Known,
}

impl Batch {
    pub fn new(tx: Tx, known: Known) -> Batch {
        Batch {
            tx,
            deferred: Deferred::default(),
            known,
        }
    }

    /// Write what is held, then commit; returns what the lookups found.
    pub async fn commit(mut self) -> Result<Known, sqlx::Error> {
        executor::flush(self.tx.conn(), &mut self.deferred).await?;
        self.tx.commit().await?;
        Ok(self.known)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// A read model fed by the log. `apply` must be deterministic given the events
/// before it: replaying the log rebuilds the same rows.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Its checkpoint row and durable consumer name.
    fn name(&self) -> &'static str;

    /// Work for a batch that is not a write to the database (the cache's
    /// Redis calls), done before the batch's transaction opens so that nothing
    /// slow holds it open (on SQLite that transaction holds the database's one
    /// write lock). It must be safe to repeat: a batch that then fails to
    /// commit is prepared again.
    async fn prepare(&self, _db: &Db, _batch: &[&Decoded]) -> Result<(), ProjectionError> {
        Ok(())
    }

    /// Whether `apply` writes or reads anything for this event. A batch of only
    /// events it does not touch has nothing to write but its checkpoint's
    /// move, which then commits as one statement, without a transaction of
    /// its own (`worker::commit`). Answering `true` is always safe.
    fn touches(&self, _envelope: &EventEnvelope, _event: &Event) -> bool {
        true
    }

    /// Apply one decoded event. `batch` holds the batch's transaction: what it
    /// writes commits together with the checkpoint, or not at all.
    async fn apply(
        &self,
        batch: &mut Batch,
        envelope: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError>;
}
