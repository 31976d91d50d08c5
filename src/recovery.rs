//! Recovery glue of the service: the `replay` and `verify` commands (progress
//! bar on a terminal, log lines otherwise) and rebuilds started through the
//! admin API (a background task per rebuild, its state in the `rebuilds` table
//! so any replica can report it, joined on shutdown). The rebuild and verify
//! logic itself lives in the projections crate (`rebuild`, `verify`).
//!
//! Both databases: the commands open the one the service is configured with
//! (`Config::database`), so on the embedded default `replay` and `verify` run
//! as a second process beside a live service on the same SQLite file. SQLite's
//! locks and busy timeout coordinate their writes with the service's, and the
//! rebuild's file lock keeps one rebuild per projection across processes.

use std::{
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ai_secretary_projections::{
    Db, Opener, SqliteDb,
    cache::Cache,
    projections,
    rebuild::{self, RebuildError, Step},
    verify,
};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::Row;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{
    config::{CacheBackend, Config, Database},
    crypto::MasterKey,
    store::{
        EventStore, PgEventStore, SqliteEventStore, postgres::CoalescingConfig, sealed::Keyring,
    },
};

/// What opens the sealed personal fields a rebuild or a verify folds: users'
/// keys, from the store in `db`, unwrapped with `master`.
pub fn opener(master: MasterKey, db: &Db) -> Arc<Keyring> {
    let store: Arc<dyn EventStore> = match db {
        Db::Postgres(pool) => {
            Arc::new(PgEventStore::new(pool.clone(), CoalescingConfig::default()))
        }
        // Only read here (users' keys): its writer connection opens lazily,
        // so it never takes the write lock.
        Db::Sqlite(lite) => Arc::new(SqliteEventStore::new(
            lite.pool.clone(),
            CoalescingConfig::default(),
        )),
    };
    Arc::new(Keyring::new(master, store))
}

/// The database the service is configured with, for an operator command that
/// needs `connections` of it: the Postgres server, or the SQLite file (the
/// embedded default), opened as the service opens it (WAL, busy timeout).
async fn open(config: &Config, connections: u32) -> anyhow::Result<Db> {
    Ok(match config.database()? {
        Database::Postgres(url) => {
            Db::Postgres(crate::store::postgres::connect(url.expose(), connections).await?)
        }
        Database::Sqlite(path) => Db::Sqlite(SqliteDb::new(
            crate::store::sqlite::connect(&path.to_string_lossy(), connections).await?,
        )),
    })
}

/// How often a rebuild without a terminal logs its progress, and how often a
/// service rebuild writes it to its `rebuilds` row.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Events folded and the total, shared between the fold and whoever reports it.
#[derive(Default)]
struct Counter {
    folded: AtomicU64,
    total: AtomicU64,
}

impl Counter {
    fn observe(&self, step: &Step) {
        match step {
            Step::Started { events, .. } => self.total.store(*events, Ordering::Relaxed),
            Step::Folded { events } => self.folded.store(*events, Ordering::Relaxed),
            _ => {}
        }
    }
}

/// `ai-secretary replay NAME|--all`: rebuild and print what was done. A progress
/// bar (events/s, ETA) on a terminal; a log line every few seconds otherwise.
pub async fn replay(config: &Config, names: &[&str]) -> anyhow::Result<()> {
    let db = open(config, 4).await?;
    let cache = config.cache()?;
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:12} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message("folding");
    let counter = Arc::new(Counter::default());
    let on_step = {
        let (bar, counter) = (bar.clone(), counter.clone());
        move |step: Step| {
            counter.observe(&step);
            match step {
                Step::Started { head, events } => {
                    bar.set_length(events);
                    tracing::info!(
                        head = format!("{}.{}", head.transaction_id, head.global_position),
                        events,
                        "replay: folding the store up to its head"
                    );
                }
                Step::Folded { events } => bar.set_position(events),
                Step::Writing { projection } => {
                    bar.set_message(format!("writing {projection}"));
                    tracing::info!(projection, "replay: writing fresh tables");
                }
                Step::Swapped {
                    projection,
                    position,
                    tail,
                } => tracing::info!(
                    projection,
                    checkpoint =
                        format!("{}.{}", position.transaction_id, position.global_position),
                    tail_events = tail,
                    "replay: swapped in; old tables dropped"
                ),
            }
        }
    };
    let logging = (!std::io::stderr().is_terminal()).then(|| {
        let counter = counter.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(REPORT_EVERY).await;
                let (folded, total) = (
                    counter.folded.load(Ordering::Relaxed),
                    counter.total.load(Ordering::Relaxed),
                );
                let rate = folded as f64 / started.elapsed().as_secs_f64();
                tracing::info!(
                    folded,
                    total,
                    events_per_second = rate as u64,
                    "replay: in progress"
                );
            }
        })
    });
    let opener = opener(config.master_key()?, &db);
    let result = rebuild::rebuild(&db, opener, names, Some(&cache), &on_step).await;
    if let Some(task) = logging {
        task.abort();
    }
    bar.finish_and_clear();
    let rebuilt = result?;
    println!(
        "replayed {} events up to {}.{} in {:.1} s ({:.0} events/s)",
        rebuilt.events,
        rebuilt.head.transaction_id,
        rebuilt.head.global_position,
        rebuilt.seconds,
        rebuilt.events as f64 / rebuilt.seconds.max(1e-9)
    );
    for (projection, at, tail) in &rebuilt.swapped {
        println!(
            "  {projection}: swapped in at {}.{} ({tail} events applied during the swap), old tables dropped",
            at.transaction_id, at.global_position
        );
    }
    match config.cache_backend() {
        CacheBackend::Redis => println!(
            "  redis keys under {:?} dropped; queries refill them",
            config.redis_key_prefix
        ),
        // A running service's in-process cache is its own: this process cannot
        // reach it, but the service sees the swaps and drops it itself.
        CacheBackend::Local => println!(
            "  a running service drops its in-process cache within {} s of the swaps",
            SWAPS_POLL.as_secs_f64()
        ),
    }
    Ok(())
}

/// How often a service with an in-process cache looks whether a rebuild (in
/// this process or, usually, a `replay` run as another one) swapped fresh
/// tables in: its cached copies may hold what the rebuild repaired. A read of
/// one row; a second is as long as a replay's operator waits to look.
pub const SWAPS_POLL: Duration = Duration::from_secs(1);

/// Drop the in-process `cache` whenever the count of swaps moves, until
/// `stop`. (A Redis cache needs none of this: the rebuilding process drops its
/// keys itself.) Queries refill it from the read models, as after any miss.
pub async fn forget_cache_after_swaps(db: Db, cache: Cache, stop: CancellationToken) {
    let mut seen = None;
    loop {
        match rebuild::swaps(&db).await {
            Ok(now) if seen.is_some_and(|seen| seen != now) => match cache.forget_all().await {
                Ok(dropped) => {
                    tracing::info!(dropped, "read models swapped in: the cache is dropped");
                    seen = Some(now);
                }
                Err(e) => tracing::warn!(error = %e, "dropping the cache after a swap"),
            },
            Ok(now) => seen = Some(now),
            Err(e) => tracing::warn!(error = %e, "reading the count of read-model swaps"),
        }
        tokio::select! {
            () = tokio::time::sleep(SWAPS_POLL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// `ai-secretary verify [NAME]`: prints the report; true when nothing drifted.
pub async fn verify(config: &Config, names: &[&str]) -> anyhow::Result<bool> {
    let db = open(config, 2).await?;
    let (report, clean) = verify_report(&db, &config.master_key()?, names).await?;
    print!("{report}");
    Ok(clean)
}

/// The readable report of `verify`, and whether every table is clean.
pub async fn verify_report(
    db: &Db,
    master: &MasterKey,
    names: &[&str],
) -> anyhow::Result<(String, bool)> {
    let opener = opener(master.clone(), db);
    let results = verify::verify(db, opener.as_ref(), names, &|_| {}).await?;
    let mut report = String::new();
    for verified in &results {
        report.push_str(&verified.to_string());
    }
    let clean = results.iter().all(|v| v.clean());
    report.push_str(if clean {
        "verify: no drift\n"
    } else {
        "verify: DRIFT found (rebuild with `ai-secretary replay NAME`)\n"
    });
    Ok((report, clean))
}

/// Why a rebuild could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no projection named {0:?}")]
    Unknown(String),
    #[error("a rebuild of {0} is already running")]
    Running(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A rebuild as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildStatus {
    pub id: Uuid,
    pub projection: String,
    pub state: String,
    pub events: i64,
    pub total_events: Option<i64>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// The columns of a [`RebuildStatus`], in the order its decoders read them.
const STATUS_COLUMNS: &str =
    "id, projection, state, events, total_events, started_at, finished_at, error";

impl RebuildStatus {
    fn from_postgres(row: &sqlx::postgres::PgRow) -> Result<RebuildStatus, sqlx::Error> {
        Ok(RebuildStatus {
            id: row.try_get(0)?,
            projection: row.try_get(1)?,
            state: row.try_get(2)?,
            events: row.try_get(3)?,
            total_events: row.try_get(4)?,
            started_at: row.try_get(5)?,
            finished_at: row.try_get(6)?,
            error: row.try_get(7)?,
        })
    }

    /// On SQLite the id is a BLOB and the times INTEGER µs since 1970 UTC.
    fn from_sqlite(row: &sqlx::sqlite::SqliteRow) -> Result<RebuildStatus, sqlx::Error> {
        Ok(RebuildStatus {
            id: row.try_get(0)?,
            projection: row.try_get(1)?,
            state: row.try_get(2)?,
            events: row.try_get(3)?,
            total_events: row.try_get(4)?,
            started_at: time(5, row.try_get(5)?)?,
            finished_at: row
                .try_get::<Option<i64>, _>(6)?
                .map(|micros| time(6, micros))
                .transpose()?,
            error: row.try_get(7)?,
        })
    }
}

/// A time stored on SQLite (INTEGER µs since 1970 UTC), read back.
fn time(column: usize, micros: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: format!("{micros} µs is outside chrono's dates").into(),
    })
}

/// Rebuilds run inside the service (started by the admin API).
#[derive(Clone)]
pub struct Rebuilds {
    pub db: Db,
    opener: Arc<dyn Opener>,
    pub cache: Cache,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// How often a running rebuild writes its progress to its row.
    report_every: Duration,
}

/// Why a rebuild still marked running was stopped by nobody: its process died.
const INTERRUPTED: &str = "interrupted (the process running it stopped)";

impl Rebuilds {
    pub fn new(db: Db, opener: Arc<dyn Opener>, cache: Cache, stop: CancellationToken) -> Rebuilds {
        Rebuilds {
            db,
            opener,
            cache,
            tasks: TaskTracker::new(),
            stop,
            report_every: REPORT_EVERY,
        }
    }

    /// Write a running rebuild's progress to its row every `every` (2 s unless
    /// `REBUILD_PROGRESS_MS` says otherwise).
    pub fn reporting_every(self, every: Duration) -> Rebuilds {
        Rebuilds {
            report_every: every,
            ..self
        }
    }

    /// Wait for running rebuilds to stop (they are cancelled with the service).
    pub async fn join(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Record and start a rebuild of `name` in the background.
    ///
    /// Every statement here is written once for both databases; times are bound
    /// from Rust (a `timestamptz` on Postgres, INTEGER µs on SQLite, which has
    /// no clock in its schema).
    pub async fn start(&self, name: &str) -> Result<Uuid, StartError> {
        let Some(name) = projections::find(name).map(|p| p.name) else {
            return Err(StartError::Unknown(name.to_owned()));
        };
        // The lock first, then the row and the 202: of concurrent starts (here
        // or on another replica, or a `replay` beside) exactly one gets it; the
        // others are refused before they write anything.
        let locked = match rebuild::lock(&self.db, &[name]).await {
            Ok(locked) => locked,
            Err(RebuildError::AlreadyRunning(_)) => {
                return Err(StartError::Running(name.to_owned()));
            }
            Err(RebuildError::Database(e)) => return Err(e.into()),
            Err(e) => return Err(sqlx::Error::Protocol(e.to_string()).into()),
        };
        // The lock is ours, so a row still 'running' was left by a crash.
        const STALE: &str = "UPDATE rebuilds SET state = 'failed', finished_at = $2, error = $3
             WHERE projection = $1 AND state = 'running'";
        // At most one running row per projection (a partial unique index):
        // a concurrent start inserts nothing.
        const INSERT: &str = "INSERT INTO rebuilds (id, projection, state, started_at)
             VALUES ($1, $2, 'running', $3) ON CONFLICT DO NOTHING";
        let id = Uuid::now_v7();
        let now = Utc::now();
        let inserted = match &self.db {
            Db::Postgres(pool) => {
                sqlx::query(STALE)
                    .bind(name)
                    .bind(now)
                    .bind(INTERRUPTED)
                    .execute(pool)
                    .await?;
                sqlx::query(INSERT)
                    .bind(id)
                    .bind(name)
                    .bind(now)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Db::Sqlite(lite) => {
                sqlx::query(STALE)
                    .bind(name)
                    .bind(now.timestamp_micros())
                    .bind(INTERRUPTED)
                    .execute(&lite.pool)
                    .await?;
                sqlx::query(INSERT)
                    .bind(id)
                    .bind(name)
                    .bind(now.timestamp_micros())
                    .execute(&lite.pool)
                    .await?
                    .rows_affected()
            }
        };
        if inserted == 0 {
            return Err(StartError::Running(name.to_owned()));
        }
        let this = self.clone();
        self.tasks
            .spawn(async move { this.run(id, name, locked).await });
        Ok(id)
    }

    async fn run(&self, id: Uuid, name: &'static str, locked: rebuild::Locked) {
        let counter = Arc::new(Counter::default());
        let on_step = {
            let counter = counter.clone();
            move |step: Step| counter.observe(&step)
        };
        // Progress is written by a task of its own, never between the
        // rebuild's steps in this one: on SQLite the rebuild holds the write
        // lock in its slices and its swap, and a progress write waiting for it
        // here would keep the rebuild from being polled to its commit: both
        // (and the service's appends) would wait out the busy timeout.
        let reporting = CancellationToken::new();
        let reporter = {
            let (this, counter, reporting) = (self.clone(), counter.clone(), reporting.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(this.report_every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => this.record_progress(id, &counter).await,
                        () = reporting.cancelled() => break,
                    }
                }
            })
        };
        let outcome: Result<(), String> = {
            let rebuilt = rebuild::rebuild_locked(
                &self.db,
                locked,
                self.opener.clone(),
                Some(&self.cache),
                &on_step,
            );
            tokio::select! {
                done = rebuilt => done.map(|_| ()).map_err(|e: RebuildError| e.to_string()),
                // Dropping the rebuild rolls back its open transaction and lets
                // its lock go; its `__next` tables are dropped by the next run.
                () = self.stop.cancelled() => Err("interrupted by shutdown".into()),
            }
        };
        // The rebuild is dropped by now (its connections, its transaction and
        // its locks with it), so the writes below never wait for it; and the
        // reporter has stopped, so none of its writes lands after them.
        reporting.cancel();
        let _ = reporter.await;
        self.record_progress(id, &counter).await;
        match &outcome {
            Ok(()) => tracing::info!(projection = name, %id, "rebuild finished"),
            Err(e) => tracing::warn!(projection = name, %id, error = %e, "rebuild failed"),
        }
        let state = if outcome.is_ok() {
            "succeeded"
        } else {
            "failed"
        };
        const FINISHED: &str =
            "UPDATE rebuilds SET state = $2, error = $3, finished_at = $4 WHERE id = $1";
        let now = Utc::now();
        let finished = match &self.db {
            Db::Postgres(pool) => sqlx::query(FINISHED)
                .bind(id)
                .bind(state)
                .bind(outcome.err())
                .bind(now)
                .execute(pool)
                .await
                .map(|_| ()),
            Db::Sqlite(lite) => sqlx::query(FINISHED)
                .bind(id)
                .bind(state)
                .bind(outcome.err())
                .bind(now.timestamp_micros())
                .execute(&lite.pool)
                .await
                .map(|_| ()),
        };
        if let Err(e) = finished {
            tracing::warn!(%id, error = %e, "could not record the end of a rebuild");
        }
    }

    async fn record_progress(&self, id: Uuid, counter: &Counter) {
        const PROGRESS: &str = "UPDATE rebuilds SET events = $2, total_events = $3 WHERE id = $1";
        let (events, total) = (
            counter.folded.load(Ordering::Relaxed) as i64,
            counter.total.load(Ordering::Relaxed) as i64,
        );
        // Progress is best effort: a write that fails is simply made again at
        // the next tick.
        let _ = match &self.db {
            Db::Postgres(pool) => sqlx::query(PROGRESS)
                .bind(id)
                .bind(events)
                .bind(total)
                .execute(pool)
                .await
                .map(|_| ()),
            Db::Sqlite(lite) => sqlx::query(PROGRESS)
                .bind(id)
                .bind(events)
                .bind(total)
                .execute(&lite.pool)
                .await
                .map(|_| ()),
        };
    }

    pub async fn status(&self, id: Uuid) -> Result<Option<RebuildStatus>, sqlx::Error> {
        let sql = format!("SELECT {STATUS_COLUMNS} FROM rebuilds WHERE id = $1");
        match &self.db {
            Db::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(pool)
                .await?
                .map(|row| RebuildStatus::from_postgres(&row))
                .transpose(),
            Db::Sqlite(lite) => sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(&lite.pool)
                .await?
                .map(|row| RebuildStatus::from_sqlite(&row))
                .transpose(),
        }
    }

    /// The latest rebuild of each projection.
    pub async fn latest(&self) -> Result<Vec<RebuildStatus>, sqlx::Error> {
        match &self.db {
            Db::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT DISTINCT ON (projection) {STATUS_COLUMNS} FROM rebuilds
                 ORDER BY projection, started_at DESC"
            )))
            .fetch_all(pool)
            .await?
            .iter()
            .map(RebuildStatus::from_postgres)
            .collect(),
            // No DISTINCT ON in SQLite: the first row of each projection's
            // rebuilds, newest first, picked by a window.
            Db::Sqlite(lite) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {STATUS_COLUMNS} FROM (
                     SELECT *, row_number() OVER (
                         PARTITION BY projection ORDER BY started_at DESC) AS newest
                     FROM rebuilds)
                 WHERE newest = 1 ORDER BY projection"
            )))
            .fetch_all(&lite.pool)
            .await?
            .iter()
            .map(RebuildStatus::from_sqlite)
            .collect(),
        }
    }
}
