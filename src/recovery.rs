//! Recovery glue of the service: the `replay` and `verify` commands (progress
//! bar on a terminal, log lines otherwise) and rebuilds started through the
//! admin API (a background task per rebuild, its state in the `rebuilds` table
//! so any replica can report it, joined on shutdown). The rebuild and verify
//! logic itself lives in the projections crate (`rebuild`, `verify`).

use std::{
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ai_secretary_projections::{
    Opener,
    cache::Cache,
    projections,
    rebuild::{self, RebuildError, Step},
    verify,
};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{
    config::Config,
    crypto::MasterKey,
    store::{PgEventStore, postgres::CoalescingConfig, sealed::Keyring},
};

/// What opens the sealed personal fields a rebuild or a verify folds: users'
/// keys, from the store on `pool`, unwrapped with `master`.
pub fn opener(master: MasterKey, pool: &PgPool) -> Arc<Keyring> {
    let store = PgEventStore::new(pool.clone(), CoalescingConfig::default());
    Arc::new(Keyring::new(master, Arc::new(store)))
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
    let pool = crate::store::postgres::connect(config.postgres_url("replay")?.expose(), 4).await?;
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
    let opener = opener(config.master_key()?, &pool);
    let result = rebuild::rebuild(&pool, opener, names, Some(&cache), &on_step).await;
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
    println!(
        "  redis keys under {:?} dropped; queries refill them",
        config.redis_key_prefix
    );
    Ok(())
}

/// `ai-secretary verify [NAME]`: prints the report; true when nothing drifted.
pub async fn verify(config: &Config, names: &[&str]) -> anyhow::Result<bool> {
    let pool = crate::store::postgres::connect(config.postgres_url("verify")?.expose(), 2).await?;
    let (report, clean) = verify_report(&pool, &config.master_key()?, names).await?;
    print!("{report}");
    Ok(clean)
}

/// The readable report of `verify`, and whether every table is clean.
pub async fn verify_report(
    pool: &PgPool,
    master: &MasterKey,
    names: &[&str],
) -> anyhow::Result<(String, bool)> {
    let opener = opener(master.clone(), pool);
    let results = verify::verify(pool, opener.as_ref(), names, &|_| {}).await?;
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
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
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

/// Rebuilds run inside the service (started by the admin API).
#[derive(Clone)]
pub struct Rebuilds {
    pub pool: PgPool,
    opener: Arc<dyn Opener>,
    pub cache: Cache,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Rebuilds {
    pub fn new(
        pool: PgPool,
        opener: Arc<dyn Opener>,
        cache: Cache,
        stop: CancellationToken,
    ) -> Rebuilds {
        Rebuilds {
            pool,
            opener,
            cache,
            tasks: TaskTracker::new(),
            stop,
        }
    }

    /// Wait for running rebuilds to stop (they are cancelled with the service).
    pub async fn join(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Record and start a rebuild of `name` in the background.
    pub async fn start(&self, name: &str) -> Result<Uuid, StartError> {
        let Some(name) = projections::find(name).map(|p| p.name) else {
            return Err(StartError::Unknown(name.to_owned()));
        };
        if rebuild::is_running(&self.pool, name).await? {
            return Err(StartError::Running(name.to_owned()));
        }
        // A row still 'running' with nobody holding the lock was left by a crash.
        sqlx::query(
            "UPDATE rebuilds SET state = 'failed', finished_at = now(),
                 error = 'interrupted (the process running it stopped)'
             WHERE projection = $1 AND state = 'running'",
        )
        .bind(name)
        .execute(&self.pool)
        .await?;
        let id = Uuid::now_v7();
        let inserted = sqlx::query(
            "INSERT INTO rebuilds (id, projection, state) VALUES ($1, $2, 'running')
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(name)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StartError::Running(name.to_owned()));
        }
        let this = self.clone();
        self.tasks.spawn(async move { this.run(id, name).await });
        Ok(id)
    }

    async fn run(&self, id: Uuid, name: &'static str) {
        let counter = Arc::new(Counter::default());
        let on_step = {
            let counter = counter.clone();
            move |step: Step| counter.observe(&step)
        };
        let names = [name];
        let rebuilt = rebuild::rebuild(
            &self.pool,
            self.opener.clone(),
            &names,
            Some(&self.cache),
            &on_step,
        );
        tokio::pin!(rebuilt);
        let mut tick = tokio::time::interval(REPORT_EVERY);
        let outcome: Result<(), String> = loop {
            tokio::select! {
                done = &mut rebuilt => break done.map(|_| ()).map_err(|e: RebuildError| e.to_string()),
                _ = tick.tick() => self.record_progress(id, &counter).await,
                // Dropping the rebuild rolls back its open transaction; its
                // `__next` tables are dropped by the next run.
                () = self.stop.cancelled() => break Err("interrupted by shutdown".into()),
            }
        };
        self.record_progress(id, &counter).await;
        match &outcome {
            Ok(()) => tracing::info!(projection = name, %id, "rebuild finished"),
            Err(e) => tracing::warn!(projection = name, %id, error = %e, "rebuild failed"),
        }
        let finished = sqlx::query(
            "UPDATE rebuilds SET state = $2, error = $3, finished_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(if outcome.is_ok() {
            "succeeded"
        } else {
            "failed"
        })
        .bind(outcome.err())
        .execute(&self.pool)
        .await;
        if let Err(e) = finished {
            tracing::warn!(%id, error = %e, "could not record the end of a rebuild");
        }
    }

    async fn record_progress(&self, id: Uuid, counter: &Counter) {
        let _ = sqlx::query("UPDATE rebuilds SET events = $2, total_events = $3 WHERE id = $1")
            .bind(id)
            .bind(counter.folded.load(Ordering::Relaxed) as i64)
            .bind(counter.total.load(Ordering::Relaxed) as i64)
            .execute(&self.pool)
            .await;
    }

    pub async fn status(&self, id: Uuid) -> Result<Option<RebuildStatus>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM rebuilds WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// The latest rebuild of each projection.
    pub async fn latest(&self) -> Result<Vec<RebuildStatus>, sqlx::Error> {
        sqlx::query_as(
            "SELECT DISTINCT ON (projection) * FROM rebuilds ORDER BY projection, started_at DESC",
        )
        .fetch_all(&self.pool)
        .await
    }
}
