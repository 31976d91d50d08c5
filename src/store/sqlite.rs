//! The SQLite event store: the embedded default, one file under `DATA_DIR`,
//! behaving as `PgEventStore` does (callers cannot tell them apart).
//!
//! **One writer.** Every append goes through one queue to one flusher task
//! that owns the store's one write connection. The flusher takes whatever is
//! queued when its previous commit finishes and appends it in one `BEGIN
//! IMMEDIATE` transaction (one WAL fsync for the lot), then answers each caller
//! with its own outcome; the loop around a batch, who wins a claim and the
//! retries are shared with Postgres (`super::coalesce`). `BEGIN IMMEDIATE`
//! takes the write lock before the transaction reads anything, so two writers
//! (this process and, say, `ai-secretary replay` beside it) wait for each other
//! (the busy timeout) instead of failing a read-then-write upgrade half way.
//! Reads use a small pool of their own: in WAL mode readers never wait for the
//! writer.
//!
//! **Positions.** Commits are serialized, so `global_position` order is commit
//! order. `transaction_id` is the commit's first `global_position` (see
//! [`next_position`]): the events of one commit share it, it grows with every
//! commit, and `(transaction_id, global_position)` orders exactly as
//! `global_position`. A consistency token therefore compares as it does on
//! Postgres, and a reader never has to stop below an open transaction: what it
//! can see is always a prefix of commit order.
//!
//! **Wake-ups.** [`SqliteEventStore::committed`] is the store's LISTEN/NOTIFY:
//! a `watch` of the highest position this process has committed, for an
//! in-process feed to await. It is a hint only (appends by another process on
//! the same file do not move it): readers always read the store.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{
    Connection, Row, SqliteConnection, SqlitePool,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::{
    AppendError, AppendRequest, Appended, Behind, EventStore, IdempotencyRecord, NewEvent,
    Position, RecordedEvent, StoreError, StoredPayload, StoredResponse, UserKeyChange,
    coalesce::{
        Appender, Attempt, BatchWriter, CoalescingConfig, Job, answer, append_batch,
        append_riding_out_failures, idempotency_claims, idempotency_losers, key_changes, outcomes,
        reservation_claims, reservation_losers,
    },
    retrying,
};

/// How long a connection waits for another one's write lock before giving up
/// with SQLITE_BUSY (a transient error: the append is retried, then answered
/// 503). The store's own batches hold the lock for milliseconds; five seconds
/// rides out another process's batch or a WAL checkpoint by far, and is still
/// as short as the service's consistency wait (`CONSISTENCY_TIMEOUT_MS`), so a
/// lock that is stuck shows as 503s rather than requests that hang.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Idempotency keys deleted per statement when expiring them: each slice is a
/// short write transaction, so a large backlog never holds the write lock long.
const EXPIRE_SLICE: i64 = 5000;

/// The connection settings every connection to the file gets.
///
/// - `journal_mode=WAL`: readers never block the writer nor it them, and a
///   commit is one append to the log.
/// - `synchronous=FULL`: the WAL is fsynced at every commit, so an append is
///   durable before it is acknowledged: it survives `kill -9` *and* power loss.
///   (`NORMAL` survives a killed process but can lose the last commits on power
///   loss: a 2xx the service would then forget. Commit coalescing pays for the
///   fsync: one per batch, not per append.)
/// - `secure_delete=ON`: deleted rows are overwritten with zeros, so a
///   forgotten user's key, email reservation and kept responses leave no
///   readable bytes in the file (`forget` also truncates the WAL: see
///   [`wipe_wal`]).
/// - `foreign_keys=ON` (sqlx's default, kept): the event store's tables have no
///   foreign keys, but the read models' may.
/// - the busy timeout (see [`BUSY_TIMEOUT`]).
pub fn options(path_or_url: &str) -> Result<SqliteConnectOptions, StoreError> {
    let options = if path_or_url.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(path_or_url)?
    } else {
        SqliteConnectOptions::new().filename(path_or_url)
    };
    Ok(options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
        .pragma("secure_delete", "ON"))
}

/// Open (creating the file and its directory if need be) a pool of at most
/// `max_connections` on the SQLite database at `path_or_url` (a path, or a
/// `sqlite://PATH` URL), and apply migrations.
pub async fn connect(path_or_url: &str, max_connections: u32) -> Result<SqlitePool, StoreError> {
    let options = options(path_or_url)?;
    if let Some(dir) = options.get_filename().parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Sqlx(e.into()))?;
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections.max(1))
        .connect_with(options)
        .await?;
    migrate(&pool).await?;
    Ok(pool)
}

pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::migrate!("./migrations/sqlite")
        .run(pool)
        .await
        .map_err(|e| StoreError::Sqlx(e.into()))
}

/// SQLite event store. Cheap to clone; the flusher stops when the last clone
/// drops (or is [closed](SqliteEventStore::close)).
#[derive(Clone)]
pub struct SqliteEventStore {
    /// Reads (and nothing else of the store's).
    readers: SqlitePool,
    /// The one write connection: the flusher's, and between its batches the
    /// idempotency writes that come without events.
    writer: SqlitePool,
    queue: mpsc::Sender<Job>,
    committed: Arc<watch::Sender<Position>>,
    flusher: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl SqliteEventStore {
    /// The store over `readers` (from [`connect`]), with a write connection of
    /// its own on the same file; starts the flusher on the current Tokio
    /// runtime. Of `config`, only `max_batch` applies: there is one writer.
    pub fn new(readers: SqlitePool, config: CoalescingConfig) -> Self {
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*readers.connect_options()).clone());
        let max_batch = config.max_batch.max(1);
        let (queue, receiver) = mpsc::channel(max_batch * 4);
        let committed = Arc::new(watch::Sender::new(Position::START));
        let flusher = tokio::spawn(flush_loop(
            writer.clone(),
            receiver,
            committed.clone(),
            max_batch,
        ));
        Self {
            readers,
            writer,
            queue,
            committed,
            flusher: Arc::new(std::sync::Mutex::new(Some(flusher))),
        }
    }

    /// The highest position this store has committed since it started
    /// (`Position::START` before its first append): changes after every
    /// commit. A wake-up hint for tailing readers, never a substitute for
    /// reading the store (another process's appends do not move it).
    pub fn committed(&self) -> watch::Receiver<Position> {
        self.committed.subscribe()
    }

    /// The read pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.readers
    }

    /// Let the flusher commit what is queued, wait for it, then close both
    /// pools. Other clones must be gone first; if one lingers, the flusher is
    /// left to end with it after a short wait.
    pub async fn close(self) {
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (readers, writer) = (self.readers.clone(), self.writer.clone());
        drop(self);
        if let Some(flusher) = flusher
            && tokio::time::timeout(Duration::from_secs(10), flusher)
                .await
                .is_err()
        {
            tracing::warn!("event store flusher still busy at shutdown");
        }
        writer.close().await;
        readers.close().await;
    }

    /// How often a read is tried when it fails transiently (see
    /// `store::retrying`): one more than the pool has connections.
    fn read_attempts(&self) -> u32 {
        self.readers.options().get_max_connections() + 1
    }
}

async fn flush_loop(
    writer: SqlitePool,
    mut receiver: mpsc::Receiver<Job>,
    committed: Arc<watch::Sender<Position>>,
    max_batch: usize,
) {
    while let Some(first) = receiver.recv().await {
        // Whatever queued while the previous batch committed joins this one.
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let requests: Vec<&AppendRequest> = jobs.iter().map(|j| j.request.as_ref()).collect();
        let outcomes = match writer.acquire().await {
            Ok(mut conn) => append_batch(&mut *conn, &requests).await,
            Err(e) => {
                let e = Arc::new(e);
                requests
                    .iter()
                    .map(|_| Err(StoreError::Shared(e.clone()).into()))
                    .collect()
            }
        };
        // Committed (answers come only after the commit): wake the tailers.
        if let Some(highest) = outcomes.iter().flatten().map(|a| a.position).max() {
            committed.send_if_modified(|p| {
                let moved = highest > *p;
                if moved {
                    *p = highest;
                }
                moved
            });
        }
        answer(jobs, outcomes);
    }
}

#[async_trait::async_trait]
impl BatchWriter for SqliteConnection {
    async fn try_append(&mut self, batch: &[&AppendRequest]) -> Result<Attempt, sqlx::Error> {
        try_append(self, batch).await
    }
}

/// Append a batch in one `BEGIN IMMEDIATE` transaction: every command whose
/// stream is at its expected version goes in, then the claims; a lost claim
/// rolls everything back (the loop in `coalesce::append_batch` retries the
/// others).
async fn try_append(
    conn: &mut SqliteConnection,
    batch: &[&AppendRequest],
) -> Result<Attempt, sqlx::Error> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let transaction_id = next_position(&mut tx).await?;
    // One clock reading per transaction, as Postgres' now(): every event of a
    // commit is recorded at the same instant.
    let now = Utc::now().timestamp_micros();
    let mut appended = Vec::with_capacity(batch.len());
    for request in batch {
        appended.push(insert_command(&mut tx, request, transaction_id, now).await?);
    }
    let mut losers = claim_reservations(&mut tx, batch, &appended, now).await?;
    losers.extend(claim_idempotency_keys(&mut tx, batch, &appended, now).await?);
    if !losers.is_empty() {
        tx.rollback().await?;
        return Ok(Attempt::ClaimsLost(losers));
    }
    let forgot = change_user_keys(&mut tx, batch, &appended, now).await?;
    tx.commit().await?;
    if forgot {
        wipe_wal(conn).await;
    }
    Ok(Attempt::Committed(outcomes(batch, appended)))
}

/// The `global_position` the next inserted event will get, which this
/// transaction's events take as their `transaction_id`.
///
/// This is SQLite's own AUTOINCREMENT rule (one more than the larger of the
/// highest position ever handed out, kept in `sqlite_sequence`, and the highest
/// in the table), read under the write lock that `BEGIN IMMEDIATE` holds, so no
/// other writer can take it first. `insert_command` checks that the first
/// event did get it.
async fn next_position(tx: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),
                    coalesce((SELECT max(global_position) FROM events), 0)) + 1",
    )
    .fetch_one(&mut *tx)
    .await
}

/// Insert one command's events if its stream is at the expected version;
/// `None` (a version conflict) if not. A version behind the head would
/// overwrite, one beyond it would leave a gap: both are refused, as on
/// Postgres. Within the write lock nobody can move the head between the check
/// and the insert; the unique key stays as the last guard.
async fn insert_command(
    tx: &mut SqliteConnection,
    request: &AppendRequest,
    transaction_id: i64,
    now: i64,
) -> Result<Option<Appended>, sqlx::Error> {
    let head: i64 =
        sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1")
            .bind(request.stream_id)
            .fetch_one(&mut *tx)
            .await?;
    if head != request.expected_version {
        return Ok(None);
    }
    let mut last = None;
    for (version, event) in (request.expected_version + 1..).zip(&request.events) {
        let global_position =
            insert_event(tx, request, event, version, transaction_id, now).await?;
        if last.is_none() && global_position < transaction_id {
            // Only possible if the AUTOINCREMENT rule above were not SQLite's.
            return Err(sqlx::Error::Protocol(format!(
                "event store: position {global_position} below its transaction {transaction_id}"
            )));
        }
        last = Some(Appended {
            version,
            position: Position {
                transaction_id,
                global_position,
            },
        });
    }
    Ok(last)
}

async fn insert_event(
    tx: &mut SqliteConnection,
    request: &AppendRequest,
    event: &NewEvent,
    version: i64,
    transaction_id: i64,
    now: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO events (transaction_id, event_id, stream_id, stream_type, version,
                             event_type, schema_version, data, metadata, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         RETURNING global_position",
    )
    .bind(transaction_id)
    .bind(event.event_id)
    .bind(request.stream_id)
    .bind(request.stream_type)
    .bind(version)
    .bind(&event.event_type)
    .bind(event.schema_version)
    .bind(event.data.to_string())
    .bind(event.metadata.to_string())
    .bind(now)
    .fetch_one(&mut *tx)
    .await
}

/// Claim the reservations of commands whose events went in; losers by batch
/// index (an earlier command of the batch, or an earlier commit, has the value).
async fn claim_reservations(
    tx: &mut SqliteConnection,
    batch: &[&AppendRequest],
    appended: &[Option<Appended>],
    now: i64,
) -> Result<Vec<(usize, AppendError)>, sqlx::Error> {
    let wanted = reservation_claims(batch, appended);
    let mut won = Vec::with_capacity(wanted.len());
    for (_, reservation, stream) in &wanted {
        let claimed: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO reservations (scope, value, stream_id, reserved_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (scope, value) DO NOTHING
             RETURNING stream_id",
        )
        .bind(reservation.scope)
        .bind(&reservation.value)
        .bind(stream)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        won.extend(claimed);
    }
    Ok(reservation_losers(wanted, &won))
}

/// Record the responses of keyed commands whose events went in; losers by batch index.
async fn claim_idempotency_keys(
    tx: &mut SqliteConnection,
    batch: &[&AppendRequest],
    appended: &[Option<Appended>],
    now: i64,
) -> Result<Vec<(usize, AppendError)>, sqlx::Error> {
    let (unique, mut losers) = idempotency_claims(batch, appended);
    if unique.is_empty() {
        return Ok(losers);
    }
    let records: Vec<&IdempotencyRecord> = unique.iter().map(|(_, r)| r).collect();
    let won = insert_idempotency(tx, &records, now).await?;
    losers.extend(idempotency_losers(unique, &won));
    Ok(losers)
}

/// Insert idempotency records whose keys are free (never used, or expired: an
/// expired record is taken over); returns the keys inserted.
async fn insert_idempotency(
    conn: &mut SqliteConnection,
    records: &[&IdempotencyRecord],
    now: i64,
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let mut won = Vec::with_capacity(records.len());
    for record in records {
        let headers = serde_json::to_string(&record.response.headers)
            .map_err(|e| sqlx::Error::Encode(e.into()))?;
        let inserted: Option<(Uuid, String)> = sqlx::query_as(
            "INSERT INTO idempotency_keys (owner_id, key, request_hash, response_status,
                                           response_headers, response_body, transaction_id,
                                           global_position, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (owner_id, key) DO UPDATE SET
                 request_hash = excluded.request_hash, response_status = excluded.response_status,
                 response_headers = excluded.response_headers,
                 response_body = excluded.response_body,
                 transaction_id = excluded.transaction_id,
                 global_position = excluded.global_position,
                 created_at = excluded.created_at, expires_at = excluded.expires_at
             WHERE idempotency_keys.expires_at <= $9 -- now: the kept one has expired
             RETURNING owner_id, key",
        )
        .bind(record.owner_id)
        .bind(&record.key)
        .bind(&record.request_hash)
        .bind(i64::from(record.response.status))
        .bind(headers)
        .bind(record.response.body.to_string())
        .bind(record.response.position.map(|p| p.transaction_id))
        .bind(record.response.position.map(|p| p.global_position))
        .bind(now)
        .bind(record.expires_at.timestamp_micros())
        .fetch_optional(&mut *conn)
        .await?;
        won.extend(inserted);
    }
    Ok(won)
}

/// Keep or destroy the user keys of commands whose events went in, in their
/// transaction (see `coalesce::key_changes`); whether a user was forgotten.
async fn change_user_keys(
    tx: &mut SqliteConnection,
    batch: &[&AppendRequest],
    appended: &[Option<Appended>],
    now: i64,
) -> Result<bool, sqlx::Error> {
    let mut forgot = false;
    for change in key_changes(batch, appended) {
        match change {
            UserKeyChange::Create { user, wrapped } => {
                sqlx::query(
                    "INSERT INTO user_keys (user_id, wrapped, created_at) VALUES ($1, $2, $3)",
                )
                .bind(user)
                .bind(wrapped)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            UserKeyChange::Destroy { user } => {
                forgot = true;
                sqlx::query("DELETE FROM user_keys WHERE user_id = $1")
                    .bind(user)
                    .execute(&mut *tx)
                    .await?;
                // The email's reservation names only the user's stream, but while
                // it stands the email cannot register again.
                sqlx::query("DELETE FROM reservations WHERE stream_id = $1")
                    .bind(user)
                    .execute(&mut *tx)
                    .await?;
                // Kept responses hold personal data in plaintext: the user's own
                // requests', and their anonymous sign-up's (owner nil, the
                // response naming them by `id`, as hyphenated text).
                sqlx::query(
                    "DELETE FROM idempotency_keys
                     WHERE owner_id = $1 OR (owner_id = $2 AND response_body ->> 'id' = $3)",
                )
                .bind(user)
                .bind(Uuid::nil())
                .bind(user.hyphenated().to_string())
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    Ok(forgot)
}

/// After a user is forgotten: copy the WAL into the file and truncate it.
/// `secure_delete` zeroes the deleted rows in the pages the commit wrote, but
/// earlier versions of those pages (the key as it was inserted) stay in the
/// WAL until it is overwritten, which can take long. Best effort and after the
/// commit: a failure or a reader still holding an old snapshot (the checkpoint
/// then stops short) is logged, never reported as a failed append; the next
/// checkpoint finishes the job.
async fn wipe_wal(conn: &mut SqliteConnection) {
    match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
        .fetch_one(&mut *conn)
        .await
    {
        Ok((0, _, _)) => {}
        Ok((_, log, done)) => tracing::warn!(
            frames = log,
            checkpointed = done,
            "a reader held the WAL: the forgotten user's old pages stay in it until the next checkpoint"
        ),
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint after forgetting a user failed"),
    }
}

/// The columns `recorded_event` reads, in the events table's order.
const EVENT_COLUMNS: &str = "global_position, transaction_id, event_id, stream_id, stream_type, \
     version, event_type, schema_version, data, metadata, recorded_at";

/// Rows after a position `($1, $2)` = `(transaction_id, global_position)`, in
/// any query of the events table. The row comparison is the contract's
/// ordering; the first term lets SQLite start a rowid range scan instead of
/// reading the table: every row past the position has a global_position above
/// min($1, $2) (transaction_id <= global_position, and both grow with commit
/// order).
const AFTER_POSITION: &str =
    "global_position > min($1, $2) AND (transaction_id, global_position) > ($1, $2)";

fn json(column: &str, text: &str) -> Result<Value, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: e.into(),
    })
}

fn timestamp(column: &str, micros: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: format!("{micros} µs is outside chrono's dates").into(),
    })
}

fn position(row: &SqliteRow) -> Result<Position, sqlx::Error> {
    Ok(Position {
        transaction_id: row.try_get("transaction_id")?,
        global_position: row.try_get("global_position")?,
    })
}

fn recorded_event(row: SqliteRow) -> Result<RecordedEvent, sqlx::Error> {
    Ok(RecordedEvent {
        position: position(&row)?,
        event_id: row.try_get("event_id")?,
        stream_id: row.try_get("stream_id")?,
        stream_type: row.try_get("stream_type")?,
        version: row.try_get("version")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        data: json("data", row.try_get("data")?)?,
        metadata: json("metadata", row.try_get("metadata")?)?,
        recorded_at: timestamp("recorded_at", row.try_get("recorded_at")?)?,
    })
}

fn recorded_events(rows: Vec<SqliteRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    Ok(rows
        .into_iter()
        .map(recorded_event)
        .collect::<Result<_, _>>()?)
}

#[async_trait::async_trait]
impl Appender for SqliteEventStore {
    async fn find_appended(&self, request: &AppendRequest) -> Result<Option<Appended>, StoreError> {
        // A command's events go in all or none: its last event says where it ended.
        let Some(last) = request.events.last() else {
            return Ok(None);
        };
        let found = sqlx::query(
            "SELECT version, transaction_id, global_position FROM events WHERE event_id = $1",
        )
        .bind(last.event_id)
        .fetch_optional(&self.readers)
        .await?;
        Ok(found
            .map(|row| {
                Ok::<_, sqlx::Error>(Appended {
                    version: row.try_get("version")?,
                    position: position(&row)?,
                })
            })
            .transpose()?)
    }

    async fn append_once(&self, request: Arc<AppendRequest>) -> Result<Appended, AppendError> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(Job { request, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }
}

#[async_trait::async_trait]
impl EventStore for SqliteEventStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, AppendError> {
        append_riding_out_failures(self, request).await
    }

    async fn read_stream_from(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version"
        );
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(stream_id)
                .bind(after_version)
                .fetch_all(&self.readers)
                .await
        })
        .await?;
        recorded_events(rows)
    }

    async fn read_payloads_from(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<StoredPayload>, StoreError> {
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(
                "SELECT event_id, version, stream_type, transaction_id, global_position,
                        event_type, schema_version, data
                 FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version",
            )
            .bind(stream_id)
            .bind(after_version)
            .fetch_all(&self.readers)
            .await
        })
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                Ok(StoredPayload {
                    event_id: row.try_get("event_id")?,
                    version: row.try_get("version")?,
                    stream_type: row.try_get("stream_type")?,
                    position: position(&row)?,
                    event_type: row.try_get("event_type")?,
                    schema_version: row.try_get("schema_version")?,
                    data: row.try_get("data")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?)
    }

    async fn read_stream_backwards(
        &self,
        stream_id: Uuid,
        before_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version < $2
             ORDER BY version DESC LIMIT $3"
        );
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(stream_id)
                .bind(before_version)
                .bind(limit)
                .fetch_all(&self.readers)
                .await
        })
        .await?;
        recorded_events(rows)
    }

    async fn read_streams(&self, stream_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        if stream_ids.is_empty() {
            return Ok(vec![]);
        }
        // SQLite has no array binds: the ids travel as one JSON array of their
        // text forms, turned back into the 16 bytes the column holds. Blobs sort
        // bytewise, as Postgres sorts uuids.
        let ids = serde_json::to_string(stream_ids).map_err(|e| sqlx::Error::Encode(e.into()))?;
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE stream_id IN (SELECT unhex(replace(value, '-', '')) FROM json_each($1))
             ORDER BY stream_id, version"
        );
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(&ids)
                .fetch_all(&self.readers)
                .await
        })
        .await?;
        recorded_events(rows)
    }

    async fn read_conversation_feed(
        &self,
        conversation_id: Uuid,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        // As on Postgres: the conversation's own events past the last version at
        // or before `after`, and its replies' events after `after` (through the
        // partial index on their payload's conversation_id). What a reader sees
        // is a prefix of commit order, so no horizon is needed.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM (
                 SELECT * FROM events
                 WHERE stream_id = $3 AND version > (
                     SELECT coalesce(max(version), 0) FROM events
                     WHERE stream_id = $3 AND (transaction_id, global_position) <= ($1, $2))
                 UNION ALL
                 SELECT * FROM events
                 WHERE stream_type = 'reply' AND data ->> 'conversation_id' = $4
                   AND {AFTER_POSITION}
             )
             ORDER BY global_position
             LIMIT $5"
        );
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(after.transaction_id)
                .bind(after.global_position)
                .bind(conversation_id)
                .bind(conversation_id.hyphenated().to_string())
                .bind(limit)
                .fetch_all(&self.readers)
                .await
        })
        .await?;
        recorded_events(rows)
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        let head = retrying(self.read_attempts(), || async {
            sqlx::query(
                "SELECT transaction_id, global_position FROM events
                 ORDER BY global_position DESC LIMIT 1",
            )
            .fetch_optional(&self.readers)
            .await
        })
        .await?;
        Ok(head.map(|row| position(&row)).transpose()?)
    }

    async fn behind(&self, after: Position, limit: i64) -> Result<Behind, StoreError> {
        let sql = format!(
            "SELECT count(*), min(recorded_at) FROM (
                 SELECT recorded_at FROM events WHERE {AFTER_POSITION}
                 ORDER BY global_position LIMIT $3)"
        );
        let (events, oldest): (i64, Option<i64>) = retrying(self.read_attempts(), || async {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(after.transaction_id)
                .bind(after.global_position)
                .bind(limit)
                .fetch_one(&self.readers)
                .await
        })
        .await?;
        Ok(Behind {
            events,
            oldest_recorded_at: oldest
                .map(|micros| timestamp("recorded_at", micros))
                .transpose()?,
        })
    }

    async fn read_all(
        &self,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        // Commit order is global_position order, and a snapshot never holds a
        // later commit without the earlier ones: unlike Postgres, nothing to stop
        // below.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE {AFTER_POSITION}
             ORDER BY global_position LIMIT $3"
        );
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(after.transaction_id)
                .bind(after.global_position)
                .bind(limit)
                .fetch_all(&self.readers)
                .await
        })
        .await?;
        recorded_events(rows)
    }

    async fn find_user_key(&self, user: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(retrying(self.read_attempts(), || async {
            sqlx::query_scalar("SELECT wrapped FROM user_keys WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&self.readers)
                .await
        })
        .await?)
    }

    async fn find_reservation(
        &self,
        scope: &'static str,
        value: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        Ok(retrying(self.read_attempts(), || async {
            sqlx::query_scalar("SELECT stream_id FROM reservations WHERE scope = $1 AND value = $2")
                .bind(scope)
                .bind(value)
                .fetch_optional(&self.readers)
                .await
        })
        .await?)
    }

    async fn find_idempotency(
        &self,
        owner_id: Uuid,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredResponse)>, StoreError> {
        let now = Utc::now().timestamp_micros();
        let Some(row) = retrying(self.read_attempts(), || async {
            sqlx::query(
                "SELECT request_hash, response_status, response_headers, response_body,
                        transaction_id, global_position
                 FROM idempotency_keys
                 WHERE owner_id = $1 AND key = $2 AND expires_at > $3",
            )
            .bind(owner_id)
            .bind(key)
            .bind(now)
            .fetch_optional(&self.readers)
            .await
        })
        .await?
        else {
            return Ok(None);
        };
        let tx: Option<i64> = row.try_get("transaction_id")?;
        let gp: Option<i64> = row.try_get("global_position")?;
        let status: i64 = row.try_get("response_status")?;
        let headers = json("response_headers", row.try_get("response_headers")?)?;
        Ok(Some((
            row.try_get("request_hash")?,
            StoredResponse {
                status: u16::try_from(status).unwrap_or_default(),
                headers: serde_json::from_value(headers).unwrap_or_default(),
                body: json("response_body", row.try_get("response_body")?)?,
                position: tx
                    .zip(gp)
                    .map(|(transaction_id, global_position)| Position {
                        transaction_id,
                        global_position,
                    }),
            },
        )))
    }

    async fn remember_idempotency(&self, record: IdempotencyRecord) -> Result<bool, StoreError> {
        let mut conn = self.writer.acquire().await?;
        let now = Utc::now().timestamp_micros();
        Ok(!insert_idempotency(&mut conn, &[&record], now)
            .await?
            .is_empty())
    }

    async fn expire_idempotency_keys(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let now = Utc::now().timestamp_micros();
            let slice = sqlx::query(
                "DELETE FROM idempotency_keys WHERE rowid IN (
                     SELECT rowid FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2)",
            )
            .bind(now)
            .bind(EXPIRE_SLICE)
            .execute(&self.writer)
            .await?
            .rows_affected();
            deleted += slice;
            if slice < EXPIRE_SLICE as u64 {
                return Ok(deleted);
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }
}

/// The file a pool's connections open (for tools and tests that look at it).
pub fn database_file(pool: &SqlitePool) -> PathBuf {
    pool.connect_options().get_filename().to_owned()
}

/// What [`backup_into`] wrote: the file, and the events it holds.
#[derive(Debug, Clone)]
pub struct Backup {
    pub file: PathBuf,
    pub events: i64,
    pub bytes: u64,
}

/// A consistent copy of the live database into `file` (which must not exist),
/// taken with `VACUUM INTO` while the service runs: it reads one snapshot (WAL
/// readers never block the writer, nor it them) and writes a compact file
/// that holds every committed transaction up to that snapshot and nothing of
/// a later one. The copy is then opened on its own and checked
/// (`PRAGMA integrity_check`) before it is reported.
pub async fn backup_into(pool: &SqlitePool, file: &Path) -> Result<Backup, StoreError> {
    let io = |e: std::io::Error| StoreError::Sqlx(e.into());
    if file.exists() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists; a backup never overwrites", file.display()),
        )));
    }
    if let Some(dir) = file.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    sqlx::query("VACUUM INTO $1")
        .bind(file.to_string_lossy().into_owned())
        .execute(pool)
        .await?;
    let mut copy =
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(file).read_only(true))
            .await?;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut copy)
        .await?;
    if integrity != "ok" {
        return Err(StoreError::Sqlx(sqlx::Error::Protocol(format!(
            "the backup {} fails its integrity check: {integrity}",
            file.display()
        ))));
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut copy)
        .await?;
    copy.close().await?;
    let bytes = std::fs::metadata(file).map_err(io)?.len();
    Ok(Backup {
        file: file.to_owned(),
        events,
        bytes,
    })
}
