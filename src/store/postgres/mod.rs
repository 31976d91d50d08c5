//! The Postgres event store, with commit coalescing.
//!
//! Appends are queued to a few flusher tasks. Each flusher takes whatever is
//! queued when its previous commit finishes and appends it in one statement (one
//! transaction, one WAL flush), then answers every caller with its own outcome.
//! A version conflict fails only its command: each command's first event is
//! inserted with `ON CONFLICT DO NOTHING`, and a command's later events are only
//! inserted if its first one was. Commands that also claim a reservation or an
//! idempotency key take an explicit transaction, and a lost claim rolls the batch
//! back and retries it without the loser. The loop around a batch, who wins a
//! claim and the retries are shared with the SQLite store (`super::coalesce`);
//! this file holds the Postgres SQL. Stream tail reads are gathered the same
//! way (`tail_reads`).

use std::{collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{
    Connection, PgConnection, PgPool, Postgres, Row,
    migrate::MigrateDatabase,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
};
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use uuid::Uuid;

mod tail_reads;
use tail_reads::TailReads;

use super::{
    AppendError, AppendRequest, Appended, Behind, EventStore, IdempotencyRecord, Position,
    RecordedEvent, StoreError, StoredPayload, StoredResponse, UserKeyChange,
    coalesce::{
        Appender, Attempt, BatchWriter, Job, answer, append_batch, append_riding_out_failures,
        idempotency_claims, idempotency_losers, key_changes, outcomes, reservation_claims,
        reservation_losers,
    },
    retrying,
};

pub use super::coalesce::CoalescingConfig;

/// Postgres event store. Cheap to clone; the flushers stop when the last clone
/// drops (or is [closed](PgEventStore::close)).
#[derive(Clone)]
pub struct PgEventStore {
    pool: PgPool,
    queue: mpsc::Sender<Job>,
    /// One permit per transaction in flight, shared by the flushers and by callers
    /// that find the queue empty and append directly.
    in_flight: Arc<Semaphore>,
    /// The connection kept for direct appends (returning a pooled connection after
    /// every append cost a task hand-off of its own).
    direct: Arc<Mutex<Option<PoolConnection<Postgres>>>>,
    flushers: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// Streams' tails, read together (`tail_reads`).
    tails: TailReads,
}

/// Create the database if it does not exist, connect, and apply migrations.
pub async fn connect(database_url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    if !Postgres::database_exists(database_url).await? {
        // Another process may create it between the check and here; that is fine.
        if let Err(e) = Postgres::create_database(database_url).await
            && !Postgres::database_exists(database_url).await?
        {
            return Err(e.into());
        }
    }
    let options: PgConnectOptions = database_url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        // No ping before every checkout: that is one more round trip per append. A
        // dead connection fails its statement instead, and the batch is retried.
        .test_before_acquire(false)
        .connect_with(
            options
                .application_name("ai-secretary")
                // Our statements are short and keyed; re-planning the append's unnest
                // on every execution cost more than the insert (a custom plan is never
                // judged worse, so Postgres never settles on the generic one).
                //
                // A generic plan is made once per connection, for the table as it
                // is then, and kept until the table is next analyzed. Made while
                // `events` is small, it scans the table (the append's "is the
                // stream at the expected version" check hashed the whole of
                // `events` on every commit, seen with auto_explain in the
                // long-conversation bench), and it stays that way as the table
                // grows: for as long as the connection lives if autovacuum is off
                // (it is on this project's test machines), until the next
                // autoanalyze otherwise. So sequential scans are off: wherever an
                // index serves a statement, the plan uses it whatever the table's
                // size when it was planned; a statement no index serves still
                // scans (the setting only prices scans, it does not forbid them).
                .options([
                    ("plan_cache_mode", "force_generic_plan"),
                    ("enable_seqscan", "off"),
                ]),
        )
        .await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// The channel every append notifies on commit (the `events` table's trigger,
/// migration `20261129000001_event_store.sql`): what wakes the readers that
/// tail the log (the relay, and workers where there is no bus).
pub const COMMITS_CHANNEL: &str = "ai_secretary_events";

pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::migrate!("./migrations/postgres")
        .run(pool)
        .await
        .map_err(|e| StoreError::Sqlx(e.into()))
}

impl PgEventStore {
    /// Start the flushers on the current Tokio runtime.
    pub fn new(pool: PgPool, config: CoalescingConfig) -> Self {
        let (queue, receiver) = mpsc::channel(config.max_batch * config.flushers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let in_flight = Arc::new(Semaphore::new(config.flushers.max(1)));
        let flushers = (0..config.flushers.max(1))
            .map(|_| {
                tokio::spawn(flush_loop(
                    pool.clone(),
                    receiver.clone(),
                    in_flight.clone(),
                    config.max_batch.max(1),
                ))
            })
            .collect();
        Self {
            tails: TailReads::start(pool.clone(), read_attempts(&pool)),
            pool,
            queue,
            in_flight,
            direct: Arc::new(Mutex::new(None)),
            flushers: Arc::new(std::sync::Mutex::new(flushers)),
        }
    }

    /// Let the flushers commit what is queued, wait for them, then close the pool.
    /// Other clones must be gone first (the server's state is dropped when it stops);
    /// if one lingers, the flushers are left to end with it after a short wait.
    pub async fn close(self) {
        let flushers =
            std::mem::take(&mut *self.flushers.lock().unwrap_or_else(|p| p.into_inner()));
        let pool = self.pool.clone();
        // Give back the direct connection, or closing the pool would wait for it.
        self.direct.lock().await.take();
        drop(self);
        let drained = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            for flusher in flushers {
                let _ = flusher.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("event store flushers still busy at shutdown");
        }
        pool.close().await;
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn read_attempts(&self) -> u32 {
        read_attempts(&self.pool)
    }
}

/// How often a read is tried when connections fail under it: one more than
/// the pool can hold dead connections (see `store::retrying`).
fn read_attempts(pool: &PgPool) -> u32 {
    pool.options().get_max_connections() + 1
}

async fn flush_loop(
    pool: PgPool,
    receiver: Arc<Mutex<mpsc::Receiver<Job>>>,
    in_flight: Arc<Semaphore>,
    max_batch: usize,
) {
    loop {
        let mut jobs = Vec::new();
        let permit;
        {
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
            // Wait for a transaction slot; what queues meanwhile joins this batch.
            permit = match in_flight.clone().acquire_owned().await {
                Ok(permit) => permit,
                Err(_) => return,
            };
            while jobs.len() < max_batch {
                match receiver.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        let requests: Vec<&AppendRequest> = jobs.iter().map(|j| j.request.as_ref()).collect();
        let waited = std::time::Instant::now();
        let connection = pool.acquire().await;
        metrics::histogram!("db_pool_acquire_seconds").record(waited.elapsed().as_secs_f64());
        let outcomes = match connection {
            Ok(mut conn) => append_batch(&mut *conn, &requests).await,
            Err(e) => {
                let e = Arc::new(e);
                requests
                    .iter()
                    .map(|_| Err(StoreError::Shared(e.clone()).into()))
                    .collect()
            }
        };
        drop(permit);
        answer(jobs, outcomes);
    }
}

#[async_trait::async_trait]
impl BatchWriter for PgConnection {
    async fn try_append(&mut self, batch: &[&AppendRequest]) -> Result<Attempt, sqlx::Error> {
        try_append(self, batch).await
    }
}

async fn try_append(
    conn: &mut PgConnection,
    batch: &[&AppendRequest],
) -> Result<Attempt, sqlx::Error> {
    let claims = batch
        .iter()
        .any(|r| r.reservation.is_some() || r.idempotency.is_some() || r.user_key.is_some());
    if !claims {
        // The common case: one statement, committed on its own.
        let appended = match batch {
            [single] => vec![insert_command(conn, single).await?],
            _ => insert_events(&mut *conn, batch).await?,
        };
        return Ok(Attempt::Committed(outcomes(batch, appended)));
    }
    let mut tx = conn.begin().await?;
    let appended = insert_events(&mut *tx, batch).await?;
    let mut losers = claim_reservations(&mut tx, batch, &appended).await?;
    losers.extend(claim_idempotency_keys(&mut tx, batch, &appended).await?);
    if !losers.is_empty() {
        tx.rollback().await?;
        return Ok(Attempt::ClaimsLost(losers));
    }
    change_user_keys(&mut tx, batch, &appended).await?;
    tx.commit().await?;
    Ok(Attempt::Committed(outcomes(batch, appended)))
}

/// Insert one command's events with a plain statement: nothing else shares the
/// transaction, so a conflict may fail it whole. `None` if the stream is not at
/// the expected version.
async fn insert_command(
    conn: &mut PgConnection,
    request: &AppendRequest,
) -> Result<Option<Appended>, sqlx::Error> {
    if let [event] = request.events.as_slice() {
        return insert_one_event(conn, request, event).await;
    }
    let n = request.events.len();
    let versions: Vec<i64> = (1..=n as i64)
        .map(|i| request.expected_version + i)
        .collect();
    let event_ids: Vec<Uuid> = request.events.iter().map(|e| e.event_id).collect();
    let types: Vec<&str> = request
        .events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    let schemas: Vec<i32> = request.events.iter().map(|e| e.schema_version).collect();
    let data: Vec<&Value> = request.events.iter().map(|e| &e.data).collect();
    let metadata: Vec<&Value> = request.events.iter().map(|e| &e.metadata).collect();
    // The EXISTS refuses a gap (expected version beyond the head); the unique key
    // refuses a stale expected version, failing the whole statement.
    let inserted = sqlx::query(
        r#"
        INSERT INTO events (event_id, stream_id, stream_type, version, event_type,
                            schema_version, data, metadata)
        SELECT t.event_id, $2, $3, t.version, t.event_type, t.schema_version, t.data, t.metadata
        FROM unnest($1::uuid[], $4::int8[], $5::text[], $6::int4[], $7::jsonb[], $8::jsonb[])
            AS t(event_id, version, event_type, schema_version, data, metadata)
        WHERE $9::int8 = 0 OR EXISTS (
            SELECT 1 FROM events e WHERE e.stream_id = $2 AND e.version = $9::int8)
        ORDER BY t.version
        RETURNING version, global_position, transaction_id::text::int8 AS transaction_id
        "#,
    )
    .bind(&event_ids)
    .bind(request.stream_id)
    .bind(request.stream_type)
    .bind(&versions)
    .bind(&types)
    .bind(&schemas)
    .bind(&data)
    .bind(&metadata)
    .bind(request.expected_version)
    .fetch_all(&mut *conn)
    .await;
    appended_or_conflict(inserted.map(|rows| rows.into_iter().last()))
}

/// The commonest append of all, one event, with scalar binds: no arrays to
/// build and unnest.
async fn insert_one_event(
    conn: &mut PgConnection,
    request: &AppendRequest,
    event: &super::NewEvent,
) -> Result<Option<Appended>, sqlx::Error> {
    let inserted = sqlx::query(
        r#"
        INSERT INTO events (event_id, stream_id, stream_type, version, event_type,
                            schema_version, data, metadata)
        SELECT $1, $2, $3, $4::int8 + 1, $5, $6, $7, $8
        WHERE $4::int8 = 0 OR EXISTS (
            SELECT 1 FROM events e WHERE e.stream_id = $2 AND e.version = $4::int8)
        RETURNING version, global_position, transaction_id::text::int8 AS transaction_id
        "#,
    )
    .bind(event.event_id)
    .bind(request.stream_id)
    .bind(request.stream_type)
    .bind(request.expected_version)
    .bind(&event.event_type)
    .bind(event.schema_version)
    .bind(&event.data)
    .bind(&event.metadata)
    .fetch_optional(&mut *conn)
    .await;
    appended_or_conflict(inserted)
}

/// A plain insert's outcome: the last row's place, or a conflict when the unique
/// key refused it or the gap check let nothing through.
fn appended_or_conflict(
    inserted: Result<Option<PgRow>, sqlx::Error>,
) -> Result<Option<Appended>, sqlx::Error> {
    let last = match inserted {
        Ok(Some(row)) => row,
        Ok(None) => return Ok(None),
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("events_stream_version_key") => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(Some(Appended {
        version: last.try_get("version")?,
        position: Position {
            transaction_id: last.try_get("transaction_id")?,
            global_position: last.try_get("global_position")?,
        },
    }))
}

/// Insert every command's events in one statement; `None` for a command that lost
/// its stream to a concurrent writer (or was decided on a version that is not the
/// stream's head).
async fn insert_events<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    batch: &[&AppendRequest],
) -> Result<Vec<Option<Appended>>, sqlx::Error> {
    let rows: usize = batch.iter().map(|r| r.events.len()).sum();
    let mut cmd = Vec::with_capacity(rows);
    let mut event_id = Vec::with_capacity(rows);
    let mut stream_id = Vec::with_capacity(rows);
    let mut stream_type = Vec::with_capacity(rows);
    let mut version = Vec::with_capacity(rows);
    let mut expected = Vec::with_capacity(rows);
    let mut event_type = Vec::with_capacity(rows);
    let mut schema_version = Vec::with_capacity(rows);
    let mut data: Vec<&Value> = Vec::with_capacity(rows);
    let mut metadata: Vec<&Value> = Vec::with_capacity(rows);
    let mut command_of = HashMap::with_capacity(rows);
    for (i, r) in batch.iter().enumerate() {
        for (j, e) in r.events.iter().enumerate() {
            cmd.push(i as i32);
            event_id.push(e.event_id);
            stream_id.push(r.stream_id);
            stream_type.push(r.stream_type);
            version.push(r.expected_version + 1 + j as i64);
            expected.push(r.expected_version);
            event_type.push(e.event_type.as_str());
            schema_version.push(e.schema_version);
            data.push(&e.data);
            metadata.push(&e.metadata);
            command_of.insert(e.event_id, i);
        }
    }
    // A command's first event is the gate: it must follow the stream's head exactly
    // (the expected version exists and the next one does not). Its later events are
    // inserted only if the gate row was, and without ON CONFLICT: once we hold
    // version N+1, nobody else can hold N+2, so a conflict there is a bug worth an error.
    let returned = sqlx::query(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::int4[], $2::uuid[], $3::uuid[], $4::text[], $5::int8[],
                                 $6::int8[], $7::text[], $8::int4[], $9::jsonb[], $10::jsonb[])
                AS t(cmd, event_id, stream_id, stream_type, version,
                     expected, event_type, schema_version, data, metadata)
        ),
        first_events AS (
            INSERT INTO events (event_id, stream_id, stream_type, version, event_type,
                                schema_version, data, metadata)
            SELECT i.event_id, i.stream_id, i.stream_type, i.version, i.event_type,
                   i.schema_version, i.data, i.metadata
            FROM input i
            WHERE i.version = i.expected + 1
              AND (i.expected = 0 OR EXISTS (
                    SELECT 1 FROM events e WHERE e.stream_id = i.stream_id AND e.version = i.expected))
            ORDER BY i.cmd
            ON CONFLICT (stream_id, version) DO NOTHING
            RETURNING event_id, version, global_position, transaction_id
        ),
        later_events AS (
            INSERT INTO events (event_id, stream_id, stream_type, version, event_type,
                                schema_version, data, metadata)
            SELECT i.event_id, i.stream_id, i.stream_type, i.version, i.event_type,
                   i.schema_version, i.data, i.metadata
            FROM input i
            WHERE i.version > i.expected + 1
              AND i.cmd IN (SELECT w.cmd FROM input w JOIN first_events f USING (event_id))
            ORDER BY i.cmd, i.version
            RETURNING event_id, version, global_position, transaction_id
        )
        SELECT event_id, version, global_position, transaction_id::text::int8 AS transaction_id
        FROM first_events
        UNION ALL
        SELECT event_id, version, global_position, transaction_id::text::int8
        FROM later_events
        "#,
    )
    .bind(&cmd)
    .bind(&event_id)
    .bind(&stream_id)
    .bind(&stream_type)
    .bind(&version)
    .bind(&expected)
    .bind(&event_type)
    .bind(&schema_version)
    .bind(&data)
    .bind(&metadata)
    .fetch_all(executor)
    .await?;

    let mut appended: Vec<Option<Appended>> = vec![None; batch.len()];
    for row in returned {
        let id: Uuid = row.try_get("event_id")?;
        let Some(&i) = command_of.get(&id) else {
            continue;
        };
        let candidate = Appended {
            version: row.try_get("version")?,
            position: Position {
                transaction_id: row.try_get("transaction_id")?,
                global_position: row.try_get("global_position")?,
            },
        };
        let slot = &mut appended[i];
        if slot.is_none_or(|a| a.version < candidate.version) {
            *slot = Some(candidate);
        }
    }
    Ok(appended)
}

/// Claim the reservations of commands whose events went in; losers by batch index.
async fn claim_reservations(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    batch: &[&AppendRequest],
    appended: &[Option<Appended>],
) -> Result<Vec<(usize, AppendError)>, sqlx::Error> {
    let wanted = reservation_claims(batch, appended);
    if wanted.is_empty() {
        return Ok(vec![]);
    }
    let scopes: Vec<&str> = wanted.iter().map(|w| w.1.scope).collect();
    let values: Vec<&str> = wanted.iter().map(|w| w.1.value.as_str()).collect();
    let streams: Vec<Uuid> = wanted.iter().map(|w| w.2).collect();
    let won: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO reservations (scope, value, stream_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[])
         ON CONFLICT (scope, value) DO NOTHING
         RETURNING stream_id",
    )
    .bind(&scopes)
    .bind(&values)
    .bind(&streams)
    .fetch_all(&mut **tx)
    .await?;
    Ok(reservation_losers(wanted, &won))
}

/// Keep or destroy the user keys of commands whose events went in, in their
/// transaction (see `coalesce::key_changes`).
async fn change_user_keys(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    batch: &[&AppendRequest],
    appended: &[Option<Appended>],
) -> Result<(), sqlx::Error> {
    for change in key_changes(batch, appended) {
        match change {
            UserKeyChange::Create { user, wrapped } => {
                sqlx::query("INSERT INTO user_keys (user_id, wrapped) VALUES ($1, $2)")
                    .bind(user)
                    .bind(wrapped)
                    .execute(&mut **tx)
                    .await?;
            }
            UserKeyChange::Destroy { user } => {
                sqlx::query("DELETE FROM user_keys WHERE user_id = $1")
                    .bind(user)
                    .execute(&mut **tx)
                    .await?;
                // The email's reservation names only the user's stream, but while
                // it stands the email cannot register again.
                sqlx::query("DELETE FROM reservations WHERE stream_id = $1")
                    .bind(user)
                    .execute(&mut **tx)
                    .await?;
                // Kept responses hold personal data in plaintext: the user's own
                // requests', and their anonymous sign-up's (owner nil, the
                // response naming them by `id`).
                sqlx::query(
                    "DELETE FROM idempotency_keys
                     WHERE owner_id = $1
                        OR (owner_id = '00000000-0000-0000-0000-000000000000'
                            AND response_body->>'id' = $1::text)",
                )
                .bind(user)
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    Ok(())
}

/// Record the responses of keyed commands whose events went in; losers by batch index.
async fn claim_idempotency_keys(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    batch: &[&AppendRequest],
    appended: &[Option<Appended>],
) -> Result<Vec<(usize, AppendError)>, sqlx::Error> {
    let (unique, mut losers) = idempotency_claims(batch, appended);
    if unique.is_empty() {
        return Ok(losers);
    }
    let records: Vec<&IdempotencyRecord> = unique.iter().map(|(_, r)| r).collect();
    let won = insert_idempotency(&mut **tx, &records).await?;
    losers.extend(idempotency_losers(unique, &won));
    Ok(losers)
}

/// Insert idempotency records whose keys are free (never used, or expired: an
/// expired record is taken over); returns the keys inserted.
async fn insert_idempotency<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    records: &[&IdempotencyRecord],
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let owners: Vec<Uuid> = records.iter().map(|r| r.owner_id).collect();
    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    let hashes: Vec<&[u8]> = records.iter().map(|r| r.request_hash.as_slice()).collect();
    let statuses: Vec<i16> = records.iter().map(|r| r.response.status as i16).collect();
    let headers: Vec<Value> = records
        .iter()
        .map(|r| serde_json::to_value(&r.response.headers).unwrap_or_default())
        .collect();
    let bodies: Vec<&Value> = records.iter().map(|r| &r.response.body).collect();
    let txs: Vec<Option<i64>> = records
        .iter()
        .map(|r| r.response.position.map(|p| p.transaction_id))
        .collect();
    let gps: Vec<Option<i64>> = records
        .iter()
        .map(|r| r.response.position.map(|p| p.global_position))
        .collect();
    let expiries: Vec<DateTime<Utc>> = records.iter().map(|r| r.expires_at).collect();
    let rows = sqlx::query(
        "INSERT INTO idempotency_keys AS k (owner_id, key, request_hash, response_status,
                                            response_headers, response_body, transaction_id,
                                            global_position, expires_at)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::int2[],
                              $5::jsonb[], $6::jsonb[], $7::int8[], $8::int8[], $9::timestamptz[])
         ON CONFLICT (owner_id, key) DO UPDATE SET
             request_hash = excluded.request_hash, response_status = excluded.response_status,
             response_headers = excluded.response_headers, response_body = excluded.response_body,
             transaction_id = excluded.transaction_id, global_position = excluded.global_position,
             created_at = now(), expires_at = excluded.expires_at
         WHERE k.expires_at <= now()
         RETURNING owner_id, key",
    )
    .bind(&owners)
    .bind(&keys)
    .bind(&hashes)
    .bind(&statuses)
    .bind(&headers)
    .bind(&bodies)
    .bind(&txs)
    .bind(&gps)
    .bind(&expiries)
    .fetch_all(executor)
    .await?;
    rows.into_iter()
        .map(|row| Ok((row.try_get("owner_id")?, row.try_get("key")?)))
        .collect()
}

/// A recorded event's columns, as `recorded_event` reads them (a macro, so the
/// constant reads below can be put together at compile time).
macro_rules! event_columns {
    () => {
        "global_position, transaction_id::text::int8 AS transaction_id, event_id, \
         stream_id, stream_type, version, event_type, schema_version, data, metadata, recorded_at"
    };
}
const EVENT_COLUMNS: &str = event_columns!();

/// The reads in commit order that run all the time (the relay's, and the
/// head for lag and readiness); public so that a test can check their plans.
///
/// Their `ORDER BY` names the table's columns (`events.…`): a bare
/// `transaction_id` there would name the select list's `transaction_id::text
/// ::int8` (an output column takes its name from the column it casts), which
/// no index orders. Postgres then fetched and sorted every event after the
/// checkpoint to return the first `limit`, starting parallel workers for each
/// read: 10 ms for a read that found nothing on 600k events, where walking
/// the commit-order index takes 0.06 ms.
pub mod commit_order {
    /// At most `$3` committed events after `($1, $2)`. Only below the oldest
    /// transaction still open: an open transaction may hold a lower position
    /// than rows already visible, and a reader that moved past it would never
    /// come back for it.
    pub const READ_ALL: &str = concat!(
        "SELECT ",
        event_columns!(),
        " FROM events
         WHERE (transaction_id, global_position) > ($1::int8::text::xid8, $2)
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY events.transaction_id, events.global_position
         LIMIT $3"
    );

    /// The last event in commit order.
    pub const HEAD: &str = "SELECT transaction_id::text::int8, global_position FROM events
         ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1";
}

fn recorded_event(row: PgRow) -> Result<RecordedEvent, sqlx::Error> {
    Ok(RecordedEvent {
        position: Position {
            transaction_id: row.try_get("transaction_id")?,
            global_position: row.try_get("global_position")?,
        },
        event_id: row.try_get("event_id")?,
        stream_id: row.try_get("stream_id")?,
        stream_type: row.try_get("stream_type")?,
        version: row.try_get("version")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        data: row.try_get("data")?,
        metadata: row.try_get("metadata")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

#[async_trait::async_trait]
impl Appender for PgEventStore {
    async fn find_appended(&self, request: &AppendRequest) -> Result<Option<Appended>, StoreError> {
        let ids: Vec<Uuid> = request.events.iter().map(|e| e.event_id).collect();
        let found: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT version, global_position, transaction_id::text::int8 FROM events
             WHERE event_id = ANY($1) ORDER BY version DESC LIMIT 1",
        )
        .bind(&ids)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            found.map(|(version, global_position, transaction_id)| Appended {
                version,
                position: Position {
                    transaction_id,
                    global_position,
                },
            }),
        )
    }

    /// One attempt: directly, or through a flusher.
    async fn append_once(&self, request: Arc<AppendRequest>) -> Result<Appended, AppendError> {
        // Nobody to coalesce with and a free slot: append directly, sparing the
        // hand-off to a flusher. (Only this caller's append is at stake if the
        // caller is cancelled mid-way; queued appends never ride on it.)
        if self.queue.capacity() == self.queue.max_capacity()
            && let Ok(_permit) = self.in_flight.try_acquire()
            && let Ok(mut slot) = self.direct.try_lock()
        {
            let conn = match slot.as_mut() {
                Some(conn) => conn,
                None => slot.insert(self.pool.acquire().await.map_err(StoreError::from)?),
            };
            let outcome = append_batch(&mut **conn, &[request.as_ref()])
                .await
                .pop()
                .unwrap_or(Err(AppendError::Empty));
            if matches!(outcome, Err(AppendError::Database(_))) {
                // The connection may be broken: take a fresh one next time.
                *slot = None;
            }
            return outcome;
        }
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(Job { request, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }
}

fn recorded_events(rows: Vec<PgRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    Ok(rows
        .into_iter()
        .map(recorded_event)
        .collect::<Result<_, _>>()?)
}

#[async_trait::async_trait]
impl EventStore for PgEventStore {
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
                .fetch_all(&self.pool)
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
        self.tails.read(stream_id, after_version).await
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
                .fetch_all(&self.pool)
                .await
        })
        .await?;
        recorded_events(rows)
    }

    async fn read_streams(&self, stream_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        if stream_ids.is_empty() {
            return Ok(vec![]);
        }
        // One index lookup per named stream. `stream_id = ANY($1)` would be one
        // query too, but the pool forces generic plans, and the generic plan a
        // connection caches while `events` is small is a sequential scan, kept
        // until the table is next analyzed: the replier read the whole store once
        // per reply (seen with auto_explain in the long-conversation bench: 864
        // of 864 executions). A lateral subquery keyed by each id can only be
        // planned as a lookup on the `(stream_id, version)` key, whatever the
        // table's size when it was planned.
        let sql = format!(
            "SELECT e.* FROM unnest($1::uuid[]) AS wanted(stream_id)
             CROSS JOIN LATERAL (
                 SELECT {EVENT_COLUMNS} FROM events
                 WHERE events.stream_id = wanted.stream_id ORDER BY version
             ) e
             ORDER BY e.stream_id, e.version"
        );
        // Each stream once, however often it was named (the lateral join would
        // return a stream's events once per mention).
        let mut stream_ids = stream_ids.to_vec();
        stream_ids.sort_unstable();
        stream_ids.dedup();
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(&stream_ids)
                .fetch_all(&self.pool)
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
        // The conversation's own events after `after` start past the last version
        // at or before it (found walking the stream's key backwards, so only what
        // was missed is touched); its replies' events are found by the partial
        // index on their payload's conversation_id. Both stop at the read horizon,
        // as `read_all` does, so a later live event is never behind one sent here.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM (
                 SELECT * FROM events
                 WHERE stream_id = $1 AND version > (
                     SELECT coalesce(max(version), 0) FROM events
                     WHERE stream_id = $1
                       AND (transaction_id, global_position) <= ($2::int8::text::xid8, $3))
                 UNION ALL
                 SELECT * FROM events
                 WHERE stream_type = 'reply' AND data->>'conversation_id' = $4
                   AND (transaction_id, global_position) > ($2::int8::text::xid8, $3)
             ) feed
             WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY feed.transaction_id, feed.global_position
             LIMIT $5"
        );
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(conversation_id)
                .bind(after.transaction_id)
                .bind(after.global_position)
                .bind(conversation_id.to_string())
                .bind(limit)
                .fetch_all(&self.pool)
                .await
        })
        .await?;
        recorded_events(rows)
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        let head: Option<(i64, i64)> = retrying(self.read_attempts(), || async {
            sqlx::query_as(commit_order::HEAD)
                .fetch_optional(&self.pool)
                .await
        })
        .await?;
        Ok(head.map(|(transaction_id, global_position)| Position {
            transaction_id,
            global_position,
        }))
    }

    async fn behind(&self, after: Position, limit: i64) -> Result<Behind, StoreError> {
        let (events, oldest_recorded_at): (i64, Option<DateTime<Utc>>) =
            retrying(self.read_attempts(), || async {
                sqlx::query_as(
                    "SELECT count(*), min(recorded_at) FROM (
                         SELECT recorded_at FROM events
                         WHERE (transaction_id, global_position) > ($1::int8::text::xid8, $2)
                         LIMIT $3) behind",
                )
                .bind(after.transaction_id)
                .bind(after.global_position)
                .bind(limit)
                .fetch_one(&self.pool)
                .await
            })
            .await?;
        Ok(Behind {
            events,
            oldest_recorded_at,
        })
    }

    async fn read_all(
        &self,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        // Commit order, below the read horizon (see `commit_order::READ_ALL`).
        let rows = retrying(self.read_attempts(), || async {
            sqlx::query(commit_order::READ_ALL)
                .bind(after.transaction_id)
                .bind(after.global_position)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
        })
        .await?;
        recorded_events(rows)
    }

    async fn find_user_key(&self, user: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(retrying(self.read_attempts(), || async {
            sqlx::query_scalar("SELECT wrapped FROM user_keys WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&self.pool)
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
                .fetch_optional(&self.pool)
                .await
        })
        .await?)
    }

    async fn find_idempotency(
        &self,
        owner_id: Uuid,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredResponse)>, StoreError> {
        let Some(row) = retrying(self.read_attempts(), || async {
            sqlx::query(
                "SELECT request_hash, response_status, response_headers, response_body,
                        transaction_id, global_position
                 FROM idempotency_keys
                 WHERE owner_id = $1 AND key = $2 AND expires_at > now()",
            )
            .bind(owner_id)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
        })
        .await?
        else {
            return Ok(None);
        };
        let tx: Option<i64> = row.try_get("transaction_id")?;
        let gp: Option<i64> = row.try_get("global_position")?;
        let headers: Value = row.try_get("response_headers")?;
        let status: i16 = row.try_get("response_status")?;
        Ok(Some((
            row.try_get("request_hash")?,
            StoredResponse {
                status: status as u16,
                headers: serde_json::from_value(headers).unwrap_or_default(),
                body: row.try_get("response_body")?,
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
        Ok(!insert_idempotency(&self.pool, &[&record]).await?.is_empty())
    }

    async fn expire_idempotency_keys(&self) -> Result<u64, StoreError> {
        // In slices, so a large backlog never holds a long transaction (and with
        // it the relay's read horizon).
        let mut deleted = 0;
        loop {
            let slice = sqlx::query(
                "DELETE FROM idempotency_keys WHERE ctid IN (
                     SELECT ctid FROM idempotency_keys WHERE expires_at <= now() LIMIT 5000)",
            )
            .execute(&self.pool)
            .await?
            .rows_affected();
            deleted += slice;
            if slice < 5000 {
                return Ok(deleted);
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
