//! What a projection is: a name and a way to apply one event in the batch
//! that also moves its checkpoint.

use ai_secretary_contract::{Event, EventEnvelope};

use crate::{
    checkpoint::{self, Move},
    db::{Db, Tx},
    executor::{
        self,
        deferred::Deferred,
        known::Known,
        postgres::{self, Moving},
    },
    ops::{Found, Rules},
};

/// An event of a batch with its payload decoded.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub envelope: EventEnvelope,
    pub event: Event,
}

/// A live worker's batch: the checkpoint move it commits with, the
/// read-model writes the executor holds back and gathers until their table is
/// read or the batch commits (`executor::deferred`), and what the worker's
/// lookups found (`executor::known`), which goes back to the worker only if
/// the batch commits.
///
/// **Its transaction begins only when something cannot wait.** A projection's
/// rules are pure: most batches read nothing the worker does not already know
/// and make only writes that can wait for the end. Such a batch needs no
/// transaction of its own: on Postgres its writes and its checkpoint's move
/// are one statement (`executor::postgres::write_moving`), one round trip
/// where `BEGIN`, the move, the writes and `COMMIT` were four or more. A
/// lookup the worker cannot answer, a write that cannot wait, or a dead
/// letter begins the transaction ([`Batch::tx`]), whose first statement is the
/// move, as before; so does SQLite, always, at the end.
pub struct Batch {
    db: Db,
    name: &'static str,
    moving: Move,
    tx: Option<Tx>,
    deferred: Deferred,
    known: Known,
}

impl Batch {
    /// A batch of `name`'s that moves its checkpoint as `moving` says, and
    /// knows what `known` does.
    pub fn new(db: &Db, name: &'static str, moving: Move, known: Known) -> Batch {
        Batch {
            db: db.clone(),
            name,
            moving,
            tx: None,
            deferred: Deferred::default(),
            known,
        }
    }

    /// The batch's transaction, begun now if it was not: its first statement
    /// moves the checkpoint, fenced, and takes its row lock (a rebuild's swap
    /// takes that lock first too: whoever has it goes ahead, the other waits,
    /// never a deadlock over the tables). [`ProjectionError::NotMoved`] if
    /// the checkpoint is no longer where the batch began: then nothing of the
    /// batch may be written.
    pub async fn tx(&mut self) -> Result<&mut Tx, ProjectionError> {
        let tx = self.take_tx().await?;
        Ok(self.tx.insert(tx))
    }

    /// The batch's transaction ([`Batch::tx`]), taken out of the batch.
    async fn take_tx(&mut self) -> Result<Tx, ProjectionError> {
        if let Some(tx) = self.tx.take() {
            return Ok(tx);
        }
        let mut tx = self.db.begin_write().await?;
        if !checkpoint::save(&mut tx, self.name, self.moving).await? {
            return Err(ProjectionError::NotMoved);
        }
        Ok(tx)
    }

    /// Apply `rules` to one event: read what they need, unless `known` has
    /// the answer, after writing what is held for that table; then hold
    /// their ops, and write what cannot wait.
    pub async fn apply_rules(
        &mut self,
        rules: &Rules,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        let mut now = Vec::new();
        let found = match (rules.lookup)(e, event) {
            // Nothing written to its table since it was read (`Known::written`),
            // so nothing held for the table is needed to answer it.
            Some(lookup) => match self.known.get(&lookup) {
                Some(found) => found.clone(),
                None => {
                    self.deferred.release(lookup.table, &mut now);
                    let mut conn = self.tx().await?.conn();
                    executor::write(conn.reborrow(), std::mem::take(&mut now)).await?;
                    let found = executor::read(conn, &lookup).await?;
                    self.known.keep(&lookup, &found);
                    found
                }
            },
            None => Found::default(),
        };
        for op in (rules.ops)(e, event, &found) {
            self.known.written(&op);
            self.deferred.push(op, &mut now);
        }
        if !now.is_empty() {
            executor::write(self.tx().await?.conn(), now).await?;
        }
        Ok(())
    }

    /// Write what is held and move the checkpoint, together or not at all;
    /// returns what the lookups found. [`ProjectionError::NotMoved`] if the
    /// checkpoint was no longer where the batch began: nothing was written.
    pub async fn commit(mut self) -> Result<Known, ProjectionError> {
        let mut writes = Vec::new();
        self.deferred.release_all(&mut writes);
        if let (None, Db::Postgres(pool)) = (&self.tx, &self.db)
            && postgres::fit_one_statement(&writes)
        {
            match postgres::write_moving(pool, self.name, self.moving, &writes).await? {
                Moving::Moved => {
                    BatchCommit::OneStatement.count(self.name);
                    return Ok(self.known);
                }
                Moving::NotMoved => return Err(ProjectionError::NotMoved),
                // A swap holds the row: the transaction waits for it.
                Moving::RowBusy => {}
            }
        }
        let mut tx = self.take_tx().await?;
        executor::write(tx.conn(), writes).await?;
        tx.commit().await?;
        BatchCommit::Transaction.count(self.name);
        Ok(self.known)
    }
}

/// How a batch committed, counted in `projection_batches_total{commit}`.
#[derive(Debug, Clone, Copy)]
pub enum BatchCommit {
    /// Nothing to write but the move (`worker::commit`).
    MoveAlone,
    /// The writes with the move, no transaction around them ([`Batch::commit`]).
    OneStatement,
    /// In a transaction whose first statement is the move ([`Batch::tx`]).
    Transaction,
}

impl BatchCommit {
    const ALL: [BatchCommit; 3] = [
        BatchCommit::MoveAlone,
        BatchCommit::OneStatement,
        BatchCommit::Transaction,
    ];

    /// Count one batch of `projection` committed this way.
    pub fn count(self, projection: &'static str) {
        self.add(projection, 1);
    }

    /// Every way at 0 for `projection`, so that each series exists before
    /// its first batch.
    pub fn zero(projection: &'static str) {
        for commit in Self::ALL {
            commit.add(projection, 0);
        }
    }

    fn add(self, projection: &'static str, batches: u64) {
        let label = match self {
            BatchCommit::MoveAlone => "move_alone",
            BatchCommit::OneStatement => "one_statement",
            BatchCommit::Transaction => "transaction",
        };
        metrics::counter!("projection_batches_total", "projection" => projection, "commit" => label)
            .increment(batches);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The checkpoint was not where the batch began: its owner was deposed,
    /// or a rebuild's swap moved it. Nothing of the batch is written.
    #[error("the checkpoint is no longer where the batch began")]
    NotMoved,
}

/// A read model fed by the log. `apply` must be deterministic given the events
/// before it: replaying the log rebuilds the same rows.
#[async_trait::async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Its checkpoint row and durable consumer name.
    fn name(&self) -> &'static str;

    /// Work for a batch that is not a write to the database (the cache's
    /// Redis calls), done before the batch's writes begin so that nothing
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

    /// Apply one decoded event. What it writes through `batch` commits
    /// together with the checkpoint's move, or not at all.
    async fn apply(
        &self,
        batch: &mut Batch,
        envelope: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError>;
}
