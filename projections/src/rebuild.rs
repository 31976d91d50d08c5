//! Blue-green rebuild of read models from the event store (never from NATS,
//! whose retention may be shorter than the store's history).
//!
//! 1. Fold the store up to its current head `H` in memory (on Postgres only
//!    below the oldest open transaction, so nothing committed later can land
//!    behind it; on SQLite commits are serialized, so the last event is the head).
//! 2. Write the rows into fresh tables `<table>__next`. The live tables keep
//!    serving and the live worker keeps consuming meanwhile.
//! 3. Swap, per projection, in ONE transaction: lock the projection's checkpoint
//!    (waits for the worker's batch in flight and holds off the next), fold the
//!    tail of events the worker applied past `H` (if any) into the new tables,
//!    drop the live tables, rename the new ones to the live names, and move the
//!    checkpoint to `H` only if it was behind. The JetStream sequence in the
//!    checkpoint is kept, so the worker resumes where it was and skips, by
//!    position, what the rebuild has already folded: no event is lost or
//!    applied twice. For `cache`, whose worker's work for an event is also
//!    invalidating cached values, the swap makes the invalidations of the
//!    events it moves the checkpoint past before it commits.
//!
//! Nothing but `__next` tables is written before the swap; leftovers of an
//! interrupted run are dropped when the next one starts. One rebuild per
//! projection at a time, across processes: a session advisory lock on Postgres,
//! an exclusive OS file lock beside the database file on SQLite; either is
//! released if the process dies. [`lock`] takes them apart from the work
//! ([`rebuild_locked`]), so a caller can hold them before it announces a rebuild.
//!
//! The dialects part in the steps' details, each explained beside its SQL:
//! Postgres writes `__next` with `COPY` on the rebuild's lock session, builds
//! its indexes before the swap and renames them in it; SQLite writes `__next`
//! in short write transactions (the live service's appends wait at most for one
//! slice, never for the whole write) and, having no `ALTER INDEX … RENAME`,
//! recreates the live table's indexes under their own names in the swap.

use ai_secretary_contract::{self as contract, Event, EventEnvelope, Position};
use std::{
    fs::{File, TryLockError},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, TryStreamExt};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Row, SqliteConnection};

use crate::{
    cache::Cache,
    checkpoint,
    db::{Conn, Db, SqliteDb},
    log::{self, envelope_of, plan_range_with_its_bounds, range},
    opener::Opener,
    projection::{Decoded, Projection, ProjectionError},
    projections::{self, Fold, Table, cache::CacheInvalidation},
    tables,
};

/// Suffix of the tables a rebuild writes before the swap.
pub const NEXT: &str = "__next";

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("no projection named {0:?}; known: {known}", known = projections::NAMES.join(", "))]
    Unknown(String),
    #[error("a rebuild of {0} is already running")]
    AlreadyRunning(String),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// A sealed field did not open (the wrong `ENCRYPTION_KEY`?).
    #[error("sealed data: {0}")]
    Sealed(String),
}

/// What a rebuild reports as it goes (for a progress bar, logs or a status row).
#[derive(Debug, Clone)]
pub enum Step {
    /// The head it folds up to, and about how many events lie below it (an
    /// estimate from the head's `global_position`; `Rebuilt::events` is exact).
    Started { head: Position, events: u64 },
    /// Events folded so far.
    Folded { events: u64 },
    /// Writing the fresh tables of a projection.
    Writing { projection: &'static str },
    /// A projection swapped in: its position, and events folded under the lock.
    Swapped {
        projection: &'static str,
        position: Position,
        tail: u64,
    },
}

/// What a finished rebuild did.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub head: Position,
    pub events: u64,
    pub seconds: f64,
    /// Per projection: its checkpoint after the swap and the tail folded under lock.
    pub swapped: Vec<(&'static str, Position, u64)>,
}

/// The advisory lock that lets one rebuild per projection run (Postgres).
fn lock_key(name: &str) -> String {
    format!("ai_secretary.rebuild.{name}")
}

/// One more swap (migrations/postgres/20261203000001_read_model_swaps.sql),
/// in the swap's own transaction: the count moves exactly when fresh tables do.
const COUNT_THE_SWAP: &str = "UPDATE read_model_swaps SET generation = generation + 1 WHERE id = 1";

/// How many swaps rebuilds have made, in any process. A process that caches
/// read models where others cannot reach them (the in-process cache) drops its
/// copies when this moves.
pub async fn swaps(db: &Db) -> Result<i64, sqlx::Error> {
    const SQL: &str = "SELECT generation FROM read_model_swaps WHERE id = 1";
    match db {
        Db::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await,
        Db::Sqlite(db) => sqlx::query_scalar(SQL).fetch_one(&db.pool).await,
    }
}

/// The rebuild locks of some projections, taken (see [`lock`]): while this
/// lives, no other rebuild of them starts, in this process or another.
pub struct Locked {
    names: Vec<&'static str>,
    held: Held,
}

enum Held {
    /// One session per projection, holding its advisory lock; the rebuild
    /// writes that projection's tables through it.
    Postgres(Vec<PgConnection>),
    /// One file lock per projection.
    Sqlite(Vec<RebuildLock>),
}

impl Locked {
    /// The projections locked, in the order they were named.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

/// Take the rebuild lock of each named projection, or none: a projection
/// whose lock is taken (a rebuild of it runs somewhere) fails with
/// [`RebuildError::AlreadyRunning`], at once (a second rebuild is refused,
/// not queued). Taken before a rebuild is announced (the admin API answers
/// 202 only once it holds them), so of concurrent starts exactly one wins.
pub async fn lock(db: &Db, names: &[&str]) -> Result<Locked, RebuildError> {
    let mut known = Vec::new();
    for name in names {
        let found =
            projections::find(name).ok_or_else(|| RebuildError::Unknown((*name).to_owned()))?;
        known.push(found.name);
    }
    let held = match db {
        Db::Postgres(pool) => {
            let mut leases = Vec::new();
            for name in &known {
                let mut lease = PgConnection::connect_with(&pool.connect_options()).await?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
                    .bind(lock_key(name))
                    .fetch_one(&mut lease)
                    .await?;
                if !locked {
                    return Err(RebuildError::AlreadyRunning((*name).to_owned()));
                }
                leases.push(lease);
            }
            Held::Postgres(leases)
        }
        Db::Sqlite(lite) => {
            let mut locks = Vec::new();
            for name in &known {
                match RebuildLock::try_take(lite, name)? {
                    Some(lock) => locks.push(lock),
                    None => return Err(RebuildError::AlreadyRunning((*name).to_owned())),
                }
            }
            Held::Sqlite(locks)
        }
    };
    Ok(Locked { names: known, held })
}

/// Rebuild the named projections (blue-green, see the module header): [`lock`]
/// then [`rebuild_locked`]. With a `cache`, its keys are dropped after the
/// swaps: queries fill them again.
pub async fn rebuild(
    db: &Db,
    opener: Arc<dyn Opener>,
    names: &[&str],
    cache: Option<&Cache>,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<Rebuilt, RebuildError> {
    let locked = lock(db, names).await?;
    rebuild_locked(db, locked, opener, cache, on_step).await
}

/// Rebuild the projections `locked` holds the locks of (taken by [`lock`] on
/// the same database); the locks go when it returns, or with it if dropped.
pub async fn rebuild_locked(
    db: &Db,
    locked: Locked,
    opener: Arc<dyn Opener>,
    cache: Option<&Cache>,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<Rebuilt, RebuildError> {
    let started = Instant::now();
    let folds: Vec<Fold> = locked
        .names
        .iter()
        .map(|name| Fold::new(name).expect("a locked projection is registered"))
        .collect();
    let (head, events, swapped) = match (db, locked.held) {
        (Db::Postgres(pool), Held::Postgres(leases)) => {
            rebuild_postgres(pool, leases, opener, folds, cache, on_step).await?
        }
        (Db::Sqlite(lite), Held::Sqlite(locks)) => {
            rebuild_sqlite(lite, locks, opener, folds, cache, on_step).await?
        }
        _ => {
            return Err(RebuildError::Database(sqlx::Error::Configuration(
                "the rebuild locks were taken on the other database".into(),
            )));
        }
    };
    if let Some(cache) = cache {
        cache.forget_all().await?;
    }
    Ok(Rebuilt {
        head,
        events,
        seconds: started.elapsed().as_secs_f64(),
        swapped,
    })
}

/// What a rebuild reports back: the head, the events folded, and per
/// projection its checkpoint after the swap and the tail folded in it.
type Outcome = (Position, u64, Vec<(&'static str, Position, u64)>);

/// The steps on Postgres: one lock session per projection, which also writes
/// that projection's fresh tables and swaps them in.
async fn rebuild_postgres(
    pool: &PgPool,
    mut leases: Vec<PgConnection>,
    opener: Arc<dyn Opener>,
    folds: Vec<Fold>,
    cache: Option<&Cache>,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<Outcome, RebuildError> {
    // Each projection's lock is held on a connection of its own (`leases`, in
    // the folds' order) for the whole run, and every write of that
    // projection's rebuild (its fresh tables, its swap) goes through that same
    // session: a rebuild whose lock connection died cannot write another row,
    // so a second rebuild that took the lock over never shares its tables with
    // a deposed one. Closing the connections releases the locks.

    let head = head(&mut *pool.acquire().await?).await?;
    // For the progress bar, the identity of the head estimates the events below
    // it (exact but for the numbers of rolled-back appends): counting them would
    // cost a scan of the whole log, as long as a fifth of the rebuild.
    on_step(Step::Started {
        head,
        events: head.global_position.max(0) as u64,
    });
    let mut limited: Vec<(Fold, Position)> = folds.into_iter().map(|f| (f, head)).collect();
    let events = fold_store_pipelined(
        pool,
        opener.clone(),
        &mut limited,
        Position::default(),
        head,
        on_step,
    )
    .await?;

    // Two projections written at a time, each on its own lease's session (the
    // machine this was measured on has two cores; Postgres uses one per session).
    // The one with the most rows first: its write is the longest by far
    // (messages: 2.7 s of 3 s of writing for 1M events), and the others all fit
    // beside it on the other session instead of delaying its start.
    let mut by_rows: Vec<_> = limited.iter().zip(&mut leases).collect();
    by_rows.sort_by_key(|((fold, _), _)| {
        std::cmp::Reverse(fold.tables.iter().map(|t| t.rows.len()).sum::<usize>())
    });
    let writes: Vec<_> = by_rows
        .into_iter()
        .map(|((fold, _), lease)| write_next_on(lease, fold, on_step))
        .collect();
    futures_util::stream::iter(writes)
        .buffer_unordered(2)
        .try_collect::<Vec<()>>()
        .await?;
    let mut swapped = Vec::new();
    for (fold, _) in &mut limited {
        fold.track_changes();
    }
    for ((mut fold, _), lease) in limited.into_iter().zip(&mut leases) {
        let db = Db::Postgres(pool.clone());
        let (position, tail) = swap(lease, &db, opener.as_ref(), cache, &mut fold, head).await?;
        on_step(Step::Swapped {
            projection: fold.name(),
            position,
            tail,
        });
        swapped.push((fold.name(), position, tail));
        // Swapped in, its rows are done with. Freeing them one by one (over a
        // million allocations for 1M events) took over a second of the
        // rebuild's time at its end (glibc consolidating its free lists):
        // nobody waits for it, so it runs on a thread of its own.
        tokio::task::spawn_blocking(move || drop(fold));
    }
    for lease in leases {
        let _ = lease.close().await;
    }
    Ok((head, events, swapped))
}

/// [`head`]'s query (`ORDER BY events.…` as in `log::RANGE`).
pub const HEAD: &str = "SELECT transaction_id::text::int8, global_position FROM events
     WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
     ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1";

/// The last event below the oldest open transaction: everything at or below it
/// is committed and visible, and nothing can commit behind it later.
pub async fn head(conn: &mut PgConnection) -> Result<Position, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(HEAD).fetch_optional(&mut *conn).await?;
    Ok(
        row.map_or(Position::default(), |(transaction_id, global_position)| {
            Position {
                transaction_id,
                global_position,
            }
        }),
    )
}

/// How often (in events) the fold reports progress.
const REPORT_EVERY: u64 = 50_000;

/// Fold one event, its payload opened and decoded first ([`decode_one`]).
async fn fold_one(
    opener: &dyn Opener,
    folds: &mut [(Fold, Position)],
    envelope: &EventEnvelope,
    data: &str,
) -> Result<(), RebuildError> {
    let event = decode_one(opener, envelope, data).await?;
    projections::apply_all(folds, envelope, event.as_ref());
    Ok(())
}

/// Open an event's payload (a forgotten user's sealed values read as
/// forgotten, as they did for the live projection after the forgetting) and
/// decode it, once for every fold. A `UserForgotten` forgets its user here, in
/// commit order, before any later event of theirs is opened.
async fn decode_one(
    opener: &dyn Opener,
    envelope: &EventEnvelope,
    data: &str,
) -> Result<Result<Event, String>, RebuildError> {
    let opened = opener
        .open_text(envelope.event_id, data)
        .await
        .map_err(RebuildError::Sealed)?;
    let data = opened.as_deref().unwrap_or(data);
    let event = contract::decode(&envelope.event_type, envelope.schema_version, data);
    if let Ok(Event::UserForgotten) = event {
        opener.forget(envelope.stream_id);
    }
    Ok(event)
}

/// Events read per statement by [`fold_store`] on SQLite: each page is a short
/// read of its own, large enough that the statement costs nothing beside the
/// rows, small enough that a page's payloads stay a few MB in memory.
const SQLITE_PAGE: i64 = 2_000;

/// Fold the events in `(after, upto]`, in commit order, into each fold up to its
/// own limit. Returns how many were read.
///
/// Postgres: streamed from one query on `conn` (inside a transaction).
/// SQLite: read in pages by position, in `conn`'s transaction if it is in one
/// (a swap's); otherwise each page is a snapshot of its own, which loses
/// nothing: SQLite commits one writer at a time, so the events up to `upto`
/// (at or below the head) are all committed and never change.
pub async fn fold_store(
    conn: &mut Conn<'_>,
    opener: &dyn Opener,
    folds: &mut [(Fold, Position)],
    after: Position,
    upto: Position,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<u64, RebuildError> {
    let mut read = 0u64;
    let folded = |read: &mut u64| {
        *read += 1;
        if read.is_multiple_of(REPORT_EVERY) {
            on_step(Step::Folded { events: *read });
        }
    };
    match conn {
        Conn::Postgres(conn) => {
            plan_range_with_its_bounds(conn).await?;
            let mut rows = range(after, upto).fetch(&mut **conn);
            while let Some(row) = rows.try_next().await? {
                fold_one(opener, folds, &envelope_of(&row)?, row.try_get(9)?).await?;
                folded(&mut read);
            }
        }
        Conn::Sqlite(conn) => {
            let mut at = after;
            loop {
                let page = log::sqlite::read(conn, at, upto, SQLITE_PAGE).await?;
                for (envelope, data) in &page {
                    fold_one(opener, folds, envelope, data).await?;
                    folded(&mut read);
                }
                match page.last() {
                    Some((last, _)) if page.len() as i64 == SQLITE_PAGE => {
                        at = Position {
                            transaction_id: last.transaction_id,
                            global_position: last.global_position,
                        };
                    }
                    _ => break,
                }
            }
        }
    }
    on_step(Step::Folded { events: read });
    Ok(read)
}

/// Events handed from the reader to the decoder, and from it to the folds, at a time.
const HANDOFF: usize = 2_000;

/// Events decoded once and shared by every projection's fold.
type DecodedBatch = Arc<Vec<(EventEnvelope, Result<Event, String>)>>;

/// `fold_store` for the bulk of a rebuild, in three stages that run at once:
/// a task reads and parses the rows; this one opens and decodes each payload,
/// once for all projections; and each projection folds the decoded events on
/// a thread of its own. Folding was 65 % of the single fold thread's time
/// (profiled on 1M events, five projections) and the projections' folds share
/// nothing, so they spread over the cores instead of queueing behind each other.
async fn fold_store_pipelined(
    pool: &PgPool,
    opener: Arc<dyn Opener>,
    folds: &mut [(Fold, Position)],
    after: Position,
    upto: Position,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<u64, RebuildError> {
    let (sender, mut batches) = tokio::sync::mpsc::channel::<Vec<(EventEnvelope, String)>>(16);
    let pool = pool.clone();
    let reader = tokio::spawn(async move {
        let mut conn = pool.begin().await?;
        plan_range_with_its_bounds(&mut conn).await?;
        let mut rows = range(after, upto).fetch(&mut *conn);
        let mut batch = Vec::with_capacity(HANDOFF);
        while let Some(row) = rows.try_next().await? {
            batch.push((envelope_of(&row)?, row.try_get::<String, _>(9)?));
            if batch.len() == HANDOFF
                && sender
                    .send(std::mem::replace(&mut batch, Vec::with_capacity(HANDOFF)))
                    .await
                    .is_err()
            {
                return Ok(()); // the fold stopped (it failed or was dropped)
            }
        }
        let _ = sender.send(batch).await;
        Ok::<(), sqlx::Error>(())
    });
    // Dropping this future (a cancelled rebuild) aborts the reader too.
    let reader = tokio_util::task::AbortOnDropHandle::new(reader);
    // Each fold moves to its thread and comes back when its channel closes (a
    // failed or cancelled rebuild drops the senders: the threads end, and the
    // folds with them).
    let mut workers = Vec::new();
    for (fold, limit) in folds.iter_mut() {
        let mut one = [(fold.take(), *limit)];
        let (to_fold, mut decoded) = tokio::sync::mpsc::channel::<DecodedBatch>(16);
        let thread = tokio::task::spawn_blocking(move || {
            while let Some(batch) = decoded.blocking_recv() {
                for (envelope, event) in batch.iter() {
                    projections::apply_all(&mut one, envelope, event.as_ref());
                }
            }
            let [(fold, _)] = one;
            fold
        });
        workers.push((to_fold, thread));
    }
    let mut read = 0u64;
    while let Some(batch) = batches.recv().await {
        let mut events = Vec::with_capacity(batch.len());
        for (envelope, data) in batch {
            let event = decode_one(opener.as_ref(), &envelope, &data).await?;
            events.push((envelope, event));
            read += 1;
            if read.is_multiple_of(REPORT_EVERY) {
                on_step(Step::Folded { events: read });
            }
        }
        let events: DecodedBatch = Arc::new(events);
        for (to_fold, _) in &workers {
            // Closed only if the thread is gone (it panicked): its join says why.
            if to_fold.send(events.clone()).await.is_err() {
                break;
            }
        }
    }
    reader
        .await
        .map_err(|e| sqlx::Error::Protocol(format!("the event reader stopped: {e}")))??;
    for ((to_fold, thread), (fold, _)) in workers.into_iter().zip(folds.iter_mut()) {
        drop(to_fold);
        *fold = thread
            .await
            .map_err(|e| sqlx::Error::Protocol(format!("a fold stopped: {e}")))?;
    }
    on_step(Step::Folded { events: read });
    Ok(read)
}

/// `write_next` on the session that holds the projection's rebuild lock.
async fn write_next_on(
    lease: &mut PgConnection,
    fold: &Fold,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<(), sqlx::Error> {
    on_step(Step::Writing {
        projection: fold.name(),
    });
    write_next(lease, fold).await
}

/// Create `<table>__next` for each table of the fold (dropping a leftover of an
/// interrupted run), fill it, then give it the live table's indexes and
/// constraints under `<name>__next` names.
async fn write_next(conn: &mut PgConnection, fold: &Fold) -> Result<(), sqlx::Error> {
    for table in fold.tables() {
        let next = format!("{}{NEXT}", table.name);
        sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {next}")))
            .execute(&mut *conn)
            .await?;
        // Columns, NOT NULL and defaults; indexes come after the bulk load (faster).
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {next} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
            table.name
        )))
        .execute(&mut *conn)
        .await?;
    }
    tables::write_all(&mut Conn::Postgres(conn), fold, NEXT).await?;
    for table in fold.tables() {
        copy_indexes(conn, table).await?;
        sqlx::query(AssertSqlSafe(format!("ANALYZE {}{NEXT}", table.name)))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The live table's indexes, as (index name, constraint name if it backs one,
/// constraint definition, index definition).
async fn indexes_of(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, Option<String>, Option<String>, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT i.relname::text, c.conname::text, pg_get_constraintdef(c.oid),
                pg_get_indexdef(x.indexrelid)
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid
         WHERE x.indrelid = to_regclass($1)
         ORDER BY i.relname",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await
}

async fn copy_indexes(conn: &mut PgConnection, table: &Table) -> Result<(), sqlx::Error> {
    let next = format!("{}{NEXT}", table.name);
    for (index, constraint, constraint_def, index_def) in indexes_of(conn, table.name).await? {
        let sql = match (constraint, constraint_def) {
            // e.g. `PRIMARY KEY (id)`: the constraint makes its index, same name.
            (Some(name), Some(def)) => {
                format!("ALTER TABLE {next} ADD CONSTRAINT {name}{NEXT} {def}")
            }
            // `CREATE [UNIQUE] INDEX name ON public.table USING btree (…)`
            _ => {
                let (_, method_and_columns) = index_def
                    .split_once(" USING ")
                    .expect("pg_get_indexdef always names the access method");
                let unique = if index_def.starts_with("CREATE UNIQUE") {
                    "UNIQUE "
                } else {
                    ""
                };
                format!("CREATE {unique}INDEX {index}{NEXT} ON {next} USING {method_and_columns}")
            }
        };
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Swap a projection's fresh tables in on Postgres (see the module header). Returns its
/// checkpoint afterwards and how many tail events were folded under the lock.
async fn swap(
    conn: &mut PgConnection,
    db: &Db,
    opener: &dyn Opener,
    cache: Option<&Cache>,
    fold: &mut Fold,
    head: Position,
) -> Result<(Position, u64), RebuildError> {
    let name = fold.name();
    let tables = projections::tables_of(name);
    let mut tx = conn.begin().await?;
    // Waiting for the worker's batch is fine; waiting forever on a stuck reader is not.
    sqlx::query("SET LOCAL lock_timeout = '60s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    // The checkpoint row first (the worker's batch takes it first too: no deadlock).
    let live = checkpoint::postgres::lock(&mut tx, name).await?.position;
    // Before the live tables are locked: the invalidations look their
    // conversations' assistants up in them, on another connection.
    invalidate_skipped(
        db,
        &mut Conn::Postgres(&mut tx),
        opener,
        cache,
        name,
        live,
        head,
    )
    .await?;
    // In the order of their names, as a batch's one statement locks them
    // (`executor::postgres::write_moving`): neither waits for one table while
    // holding another the other has.
    let mut names: Vec<&str> = tables.iter().map(|t| t.name).collect();
    names.sort_unstable();
    sqlx::query(AssertSqlSafe(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        names.join(", ")
    )))
    .execute(&mut *tx)
    .await?;
    let mut tail = 0;
    if live > head {
        // The worker applied events past the rebuild's head: fold them in too.
        let mut one = [(fold.take(), live)];
        tail = fold_store(
            &mut Conn::Postgres(&mut tx),
            opener,
            &mut one,
            head,
            live,
            &|_| {},
        )
        .await?;
        let [(folded, _)] = one;
        *fold = folded;
        tables::write_changed(&mut Conn::Postgres(&mut tx), fold, NEXT).await?;
    }
    for table in tables {
        let indexes = indexes_of(&mut tx, &format!("{}{NEXT}", table.name)).await?;
        sqlx::query(AssertSqlSafe(format!("DROP TABLE {}", table.name)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE {}{NEXT} RENAME TO {}",
            table.name, table.name
        )))
        .execute(&mut *tx)
        .await?;
        for (index, constraint, ..) in indexes {
            let live_name = index.trim_end_matches(NEXT);
            let sql = match constraint {
                // Renaming an index-backed constraint renames its index too.
                Some(c) => format!(
                    "ALTER TABLE {} RENAME CONSTRAINT {c} TO {}",
                    table.name,
                    c.trim_end_matches(NEXT)
                ),
                None => format!("ALTER INDEX {index} RENAME TO {live_name}"),
            };
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
    }
    let position = live.max(head);
    if head > live {
        // The rebuild is ahead of the worker: it resumes at its JetStream sequence
        // and skips, by position, the events folded here.
        checkpoint::postgres::advance(&mut tx, name, head).await?;
    }
    sqlx::query(COUNT_THE_SWAP).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok((position, tail))
}

/// The `cache` projection's work for the events in `(live, head]`, which its
/// worker has not done yet and, once the swap moves its checkpoint to `head`,
/// never will: the invalidations (and forgets) those events call for, made
/// here before the swap commits. Without them a value those events made stale
/// would be served as current between the commit (from which the read side
/// trusts the cache as of `head`) and the rebuild's `forget_all`. Stamped, so
/// safe to repeat, like the worker's own `prepare`. Nothing to do for another
/// projection, without a cache, or when the worker is at or past `head`.
async fn invalidate_skipped(
    db: &Db,
    conn: &mut Conn<'_>,
    opener: &dyn Opener,
    cache: Option<&Cache>,
    name: &str,
    live: Position,
    head: Position,
) -> Result<(), RebuildError> {
    let Some(cache) = cache else { return Ok(()) };
    if name != projections::cache::PROJECTION.name || live >= head {
        return Ok(());
    }
    // Read in pages but prepared as one batch: a conversation started early in
    // the range is looked up from the batch, not from the live lookup table
    // (which is only as far as the worker). A worker is normally a batch or
    // two behind, so the range is short.
    let mut events = Vec::new();
    let mut at = live;
    loop {
        let page = match conn {
            Conn::Postgres(conn) => {
                plan_range_with_its_bounds(conn).await?;
                log::read(conn, at, head, SQLITE_PAGE).await?
            }
            Conn::Sqlite(conn) => log::sqlite::read(conn, at, head, SQLITE_PAGE).await?,
        };
        let Some((last, _)) = page.last() else { break };
        at = last.position();
        let full = page.len() as i64 == SQLITE_PAGE;
        for (envelope, data) in page {
            let opened = opener
                .open_text(envelope.event_id, &data)
                .await
                .map_err(RebuildError::Sealed)?;
            let data = opened.as_deref().unwrap_or(&data);
            // An undecodable event is skipped here as the worker parks it.
            if let Ok(event) = contract::decode(&envelope.event_type, envelope.schema_version, data)
            {
                events.push(Decoded { envelope, event });
            }
        }
        if !full {
            break;
        }
    }
    let batch: Vec<&Decoded> = events.iter().collect();
    CacheInvalidation::new(cache.clone())
        .prepare(db, &batch)
        .await
        .map_err(|e| match e {
            ProjectionError::Database(e) => RebuildError::Database(e),
            ProjectionError::Cache(e) => RebuildError::Cache(e),
            ProjectionError::NotMoved => unreachable!("preparing moves no checkpoint"),
        })
}

/// The rebuild lock of a projection on SQLite, which has no advisory locks: an
/// exclusive OS file lock (`flock`) on `<database file>.rebuild-<name>`, beside
/// the database, so every process that opens the database finds the same file.
/// It excludes any other holder, a task of this process (each opens the file
/// anew: a lock belongs to its open file description) or another process on
/// the same `DATA_DIR`; dropping it, or the holder's death, releases it.
struct RebuildLock {
    _file: File,
}

impl RebuildLock {
    /// Take the lock of projection `name`; `None` if another rebuild holds it.
    /// Never waits: a second rebuild is refused, not queued.
    fn try_take(db: &SqliteDb, name: &str) -> Result<Option<RebuildLock>, sqlx::Error> {
        // The file's content is never used, only its lock. It is left in place:
        // deleting it could split holders between the old file and a new one.
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path(db, name)?)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(RebuildLock { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e.into()),
        }
    }
}

/// `<database file>.rebuild-<name>`, for a registered projection's `name` only
/// (so the name, part of a file name, is one of the service's own).
fn lock_path(db: &SqliteDb, name: &str) -> Result<PathBuf, sqlx::Error> {
    let name = projections::find(name)
        .ok_or_else(|| sqlx::Error::Configuration(format!("no projection {name:?}").into()))?
        .name;
    let database = db.pool.connect_options().get_filename().to_owned();
    // An in-memory database has no file, and no second process could share it.
    if database.as_os_str().is_empty() || database.as_os_str() == ":memory:" {
        return Err(sqlx::Error::Configuration(
            "a rebuild on SQLite needs a database file (not an in-memory database)".into(),
        ));
    }
    let mut path = database.into_os_string();
    path.push(format!(".rebuild-{name}"));
    Ok(PathBuf::from(path))
}

/// The head on SQLite: the last event. Commits are serialized (one writer at a
/// time), so every event at or below it is committed and visible, and nothing
/// can commit behind it later: no horizon to stop below.
pub async fn head_sqlite(conn: &mut SqliteConnection) -> Result<Position, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id, global_position FROM events
         ORDER BY global_position DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(
        row.map_or(Position::default(), |(transaction_id, global_position)| {
            Position {
                transaction_id,
                global_position,
            }
        }),
    )
}

/// The steps on SQLite (see the module header), under the file locks ([`lock`]):
/// the fold, the fresh tables written in slices, and one swap per projection.
async fn rebuild_sqlite(
    db: &SqliteDb,
    locks: Vec<RebuildLock>,
    opener: Arc<dyn Opener>,
    folds: Vec<Fold>,
    cache: Option<&Cache>,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<Outcome, RebuildError> {
    // `locks` are held to the end of the run (dropped on return, or with the
    // future if the rebuild is cancelled), so no second rebuild writes the
    // same `__next`.
    let mut conn = db.pool.acquire().await?;
    let head = head_sqlite(&mut conn).await?;
    // Positions are never reused, so the head's global position bounds the
    // number of events below it (exact but for rolled-back appends).
    on_step(Step::Started {
        head,
        events: head.global_position.max(0) as u64,
    });
    let mut limited: Vec<(Fold, Position)> = folds.into_iter().map(|f| (f, head)).collect();
    let events = fold_store(
        &mut Conn::Sqlite(&mut conn),
        opener.as_ref(),
        &mut limited,
        Position::default(),
        head,
        on_step,
    )
    .await?;
    drop(conn);
    for (fold, _) in &limited {
        on_step(Step::Writing {
            projection: fold.name(),
        });
        write_next_sqlite(db, fold).await?;
    }
    for (fold, _) in &mut limited {
        fold.track_changes();
    }
    let mut swapped = Vec::new();
    for (fold, _) in &mut limited {
        let (position, tail) = swap_sqlite(db, opener.as_ref(), cache, fold, head).await?;
        on_step(Step::Swapped {
            projection: fold.name(),
            position,
            tail,
        });
        swapped.push((fold.name(), position, tail));
    }
    drop(locks);
    Ok((head, events, swapped))
}

/// Rows of `__next` written per write transaction on SQLite. A slice holds the
/// database's one write lock while it is written, and the live service's
/// appends and workers wait for it (up to their busy timeout, 5 s): a few
/// thousand rows are written in tens of milliseconds, so they never wait long,
/// and the commit per slice costs little beside its rows.
const SQLITE_WRITE_SLICE: usize = 5_000;

/// Longest a rebuild on SQLite waits for the database's write lock, for each
/// of its write transactions (`SqliteDb::begin_write_patiently`). Far past the
/// busy timeout that the service's own writes wait (5 s): a rebuild is
/// background work, and on a loaded machine the lock can pass from one of the
/// service's commits to the next for longer than that. A lock held for a
/// minute is stuck, and the rebuild fails with its error.
const SQLITE_LOCK_PATIENCE: Duration = Duration::from_secs(60);

/// Create `<table>__next` for each table of the fold on SQLite (dropping a
/// leftover of an interrupted run) and fill it, slice by slice.
///
/// The table is created from the live table's own `CREATE TABLE` statement, as
/// SQLite keeps it in `sqlite_master`, with the name replaced: the same
/// columns, types, STRICT, keys, NOT NULLs and defaults (its key's automatic
/// index comes with it). Its other indexes are created in the swap, under the
/// live names (SQLite cannot rename an index).
async fn write_next_sqlite(db: &SqliteDb, fold: &Fold) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write_patiently(SQLITE_LOCK_PATIENCE).await?;
    for table in fold.tables() {
        let next = format!("{}{NEXT}", table.name);
        sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {next}")))
            .execute(&mut *tx)
            .await?;
        let live: String =
            sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = $1")
                .bind(table.name)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query(AssertSqlSafe(renamed_table(&live, &next)?))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    for rows in &fold.tables {
        let next = format!("{}{NEXT}", rows.table.name);
        let all: Vec<&crate::fold::Row> = rows.rows.iter().map(|(_, row)| row).collect();
        for slice in all.chunks(SQLITE_WRITE_SLICE) {
            let mut tx = db.begin_write_patiently(SQLITE_LOCK_PATIENCE).await?;
            tables::write_rows(&mut Conn::Sqlite(&mut tx), rows.table, &next, slice).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

/// `CREATE TABLE <name> (…)` as SQLite stored it, for a table named `next`:
/// everything up to the column list's opening parenthesis is replaced (a
/// table's name never holds one).
fn renamed_table(create: &str, next: &str) -> Result<String, sqlx::Error> {
    let starts_right = create
        .get(..12)
        .is_some_and(|s| s.eq_ignore_ascii_case("CREATE TABLE"));
    match create.find('(') {
        Some(columns) if starts_right => Ok(format!("CREATE TABLE {next} {}", &create[columns..])),
        _ => Err(sqlx::Error::Protocol(format!(
            "unexpected table definition in sqlite_master: {create:?}"
        ))),
    }
}

/// Swap a projection's fresh tables in on SQLite, in ONE `BEGIN IMMEDIATE`
/// transaction: it takes the database's write lock first, so the live worker's
/// batch in flight has committed and its next one waits (as do the live
/// service's appends, for the length of the swap; readers in WAL mode never
/// wait and see the old tables until the commit). Returns the checkpoint
/// afterwards and how many tail events were folded in the swap.
async fn swap_sqlite(
    db: &SqliteDb,
    opener: &dyn Opener,
    cache: Option<&Cache>,
    fold: &mut Fold,
    head: Position,
) -> Result<(Position, u64), RebuildError> {
    let name = fold.name();
    let tables = projections::tables_of(name);
    let mut tx = db.begin_write_patiently(SQLITE_LOCK_PATIENCE).await?;
    checkpoint::sqlite::ensure(&mut *tx, name).await?;
    let live = checkpoint::sqlite::lock(&mut tx, name).await?.position;
    // Its lookups read the live tables on another connection (WAL: they
    // never wait for this transaction).
    invalidate_skipped(
        &Db::Sqlite(db.clone()),
        &mut Conn::Sqlite(&mut tx),
        opener,
        cache,
        name,
        live,
        head,
    )
    .await?;
    let mut tail = 0;
    if live > head {
        // The worker applied events past the rebuild's head: fold them in too,
        // read in this transaction (they are all committed: the lock is ours).
        let mut one = [(fold.take(), live)];
        tail = fold_store(
            &mut Conn::Sqlite(&mut tx),
            opener,
            &mut one,
            head,
            live,
            &|_| {},
        )
        .await?;
        let [(folded, _)] = one;
        *fold = folded;
        tables::write_changed(&mut Conn::Sqlite(&mut tx), fold, NEXT).await?;
    }
    for table in tables {
        // The live table's own indexes (not its key's automatic one, which has
        // no SQL and comes with the table): recreated, under the same names,
        // on the fresh table once the live one and its indexes are dropped.
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT sql FROM sqlite_master
             WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL
             ORDER BY name",
        )
        .bind(table.name)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!("DROP TABLE {}", table.name)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE {}{NEXT} RENAME TO {}",
            table.name, table.name
        )))
        .execute(&mut *tx)
        .await?;
        for index in indexes {
            sqlx::query(AssertSqlSafe(index)).execute(&mut *tx).await?;
        }
    }
    let position = live.max(head);
    if head > live {
        // The rebuild is ahead of the worker: it resumes past the head and
        // skips, by position, the events folded here.
        checkpoint::sqlite::advance(&mut tx, name, head).await?;
    }
    sqlx::query(COUNT_THE_SWAP).execute(&mut *tx).await?;
    tx.commit().await?;
    // The in-process stand-in for the checkpoints' NOTIFY (consistency waits
    // of this process wake; another process's see it when they poll).
    db.checkpoint_moved();
    Ok((position, tail))
}
