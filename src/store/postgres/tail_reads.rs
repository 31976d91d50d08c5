//! Stream tails read together: every command loads its streams' new events
//! (`read_payloads_from`, usually none, after the state cache's version), and
//! under load those reads, one query each, were most of what the API asked of
//! Postgres and a sixth of its own CPU per command (docs/benchmarks.md, "HTTP
//! commands"). Reads are queued instead, and a reader takes whatever is queued
//! and answers all of it with one query, as the append flushers do for writes.
//!
//! Each read still sees everything committed before it was asked: the query
//! that answers it starts after it was queued. A read alone in the queue costs
//! one hand-off to a reader task more than a query of its own.

use std::sync::Arc;

use sqlx::{PgPool, Row};
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use crate::store::{Position, StoreError, StoredPayload, retrying};

/// Readers, and so queries in flight at once: one gathers the reads that queue
/// while the other's query runs.
const READERS: usize = 2;
/// Most reads answered by one query.
const MAX_READS: usize = 256;

/// One queued tail read and where its answer goes.
struct Read {
    stream_id: Uuid,
    after_version: i64,
    answer: oneshot::Sender<Result<Vec<StoredPayload>, StoreError>>,
}

/// The queue of tail reads and its readers (they end with the last clone).
#[derive(Clone)]
pub(super) struct TailReads {
    queue: mpsc::Sender<Read>,
}

impl TailReads {
    /// Readers on `pool`, each retrying a failed query up to `attempts` times.
    pub(super) fn start(pool: PgPool, attempts: u32) -> TailReads {
        let (queue, receiver) = mpsc::channel(MAX_READS * READERS * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let in_flight = Arc::new(Semaphore::new(READERS));
        for _ in 0..READERS {
            tokio::spawn(read_loop(
                pool.clone(),
                receiver.clone(),
                in_flight.clone(),
                attempts,
            ));
        }
        TailReads { queue }
    }

    /// The events of `stream_id` after `after_version`, in version order.
    pub(super) async fn read(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<StoredPayload>, StoreError> {
        let (answer, answered) = oneshot::channel();
        let read = Read {
            stream_id,
            after_version,
            answer,
        };
        self.queue.send(read).await.map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

/// The readers ended: only when the runtime is shutting down.
fn gone() -> StoreError {
    StoreError::Shared(Arc::new(sqlx::Error::PoolClosed))
}

async fn read_loop(
    pool: PgPool,
    receiver: Arc<Mutex<mpsc::Receiver<Read>>>,
    in_flight: Arc<Semaphore>,
    attempts: u32,
) {
    loop {
        let mut reads = Vec::new();
        let permit;
        {
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(read) => reads.push(read),
                None => return,
            }
            // Wait for a query slot; what queues meanwhile joins this query.
            permit = match in_flight.clone().acquire_owned().await {
                Ok(permit) => permit,
                Err(_) => return,
            };
            while reads.len() < MAX_READS {
                match receiver.try_recv() {
                    Ok(read) => reads.push(read),
                    Err(_) => break,
                }
            }
        }
        let answers = retrying(attempts, || read_tails(&pool, &reads)).await;
        drop(permit);
        match answers {
            Ok(answers) => {
                for (read, answer) in reads.into_iter().zip(answers) {
                    // The caller may have gone (request cancelled).
                    let _ = read.answer.send(Ok(answer));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for read in reads {
                    let _ = read.answer.send(Err(StoreError::Shared(e.clone())));
                }
            }
        }
    }
}

/// Every read's tail in one query: the reads numbered by their place in the
/// batch, each joined to its stream's events after its version through the
/// `(stream_id, version)` key, the rows grouped back by that number.
async fn read_tails(pool: &PgPool, reads: &[Read]) -> Result<Vec<Vec<StoredPayload>>, sqlx::Error> {
    let streams: Vec<Uuid> = reads.iter().map(|r| r.stream_id).collect();
    let afters: Vec<i64> = reads.iter().map(|r| r.after_version).collect();
    let rows = sqlx::query(
        "SELECT t.n, e.event_id, e.version, e.stream_type,
                e.transaction_id::text::int8 AS transaction_id,
                e.global_position, e.event_type, e.schema_version, e.data::text AS data
         FROM unnest($1::uuid[], $2::int8[]) WITH ORDINALITY AS t(stream_id, after_version, n)
         JOIN events e ON e.stream_id = t.stream_id AND e.version > t.after_version
         ORDER BY t.n, e.version",
    )
    .bind(&streams)
    .bind(&afters)
    .fetch_all(pool)
    .await?;
    let mut tails: Vec<Vec<StoredPayload>> = reads.iter().map(|_| Vec::new()).collect();
    for row in rows {
        let n: i64 = row.try_get("n")?;
        let tail = usize::try_from(n - 1)
            .ok()
            .and_then(|i| tails.get_mut(i))
            .ok_or_else(|| {
                sqlx::Error::Decode(format!("a tail row for read {n} of {}", reads.len()).into())
            })?;
        tail.push(StoredPayload {
            event_id: row.try_get("event_id")?,
            version: row.try_get("version")?,
            stream_type: row.try_get("stream_type")?,
            position: Position {
                transaction_id: row.try_get("transaction_id")?,
                global_position: row.try_get("global_position")?,
            },
            event_type: row.try_get("event_type")?,
            schema_version: row.try_get("schema_version")?,
            data: row.try_get("data")?,
        });
    }
    Ok(tails)
}
