//! Append-path benchmark: the event store's coalescing `append` against raw
//! one-transaction-per-append INSERTs, on a real Postgres.
//!
//! Three scenarios — 1 writer × 1 event per append, 16 writers × 1 event, and
//! 16 writers × 10 events — each measured on two paths against the same, freshly
//! created database, every writer on its own stream with versions 1, 2, 3, …:
//!
//! - **raw**: each writer owns one Postgres connection and loops one autocommit
//!   `INSERT INTO events (...) VALUES (...), ...` holding that append's rows (bound
//!   parameters; one statement, one transaction, one commit per append);
//! - **store**: each writer loops `PgEventStore::append` through one shared store,
//!   whose flusher tasks coalesce whatever appends are queued into one statement.
//!
//! Each measurement starts its writers, lets them run through a warm-up that is
//! not counted, then counts the appends that complete in a fixed wall-time window
//! and keeps each one's latency. It prints (stdout, markdown) appends/s, events/s,
//! p50 and p99 latency, events per commit, and the store ÷ raw ratio of events/s.
//!
//! Run it with a Postgres whose user may create and drop databases:
//!
//! ```text
//! cargo bench --bench append
//! BENCH_SECONDS=10 BENCH_FLUSHERS=4 BENCH_MAX_BATCH=64 cargo bench --bench append
//! ```
//!
//! Environment:
//! - `BENCH_DATABASE_URL`: server to use (default `postgres://postgres@127.0.0.1:5432/`);
//!   its database part is ignored;
//! - `BENCH_SECONDS`: measured seconds per scenario and path (default 5);
//! - `BENCH_WARMUP_SECONDS`: uncounted seconds before that (default 1);
//! - `BENCH_FLUSHERS`, `BENCH_MAX_BATCH`: the store's `CoalescingConfig`
//!   (defaults: `CoalescingConfig::default()`);
//! - `BENCH_POOL`: the store's pool size (default 20, at least flushers + 1);
//! - `BENCH_ROUNDS`: rounds per scenario, raw and store alternating; the median
//!   round of each path is reported (default 3).
//!
//! Without a `--bench` argument (as under `cargo test --all-targets`) it does
//! nothing. The database, `ai_secretary_bench_<random hex>`, is dropped at the end with
//! `DROP DATABASE ... WITH (FORCE)`, also after an error or Ctrl-C.

#[path = "common/appends.rs"]
mod appends;
#[path = "common/mod.rs"]
mod common;
#[path = "common/raw_postgres.rs"]
mod raw_postgres;

use appends::{Compared, Measurement, Path, Scenario, Window, Writer, print_tables, store_writer};
use common::{describe_server, env_or, with_database};

use std::{env, time::Duration};

use ai_secretary::store::postgres::{self, CoalescingConfig, PgEventStore};
use anyhow::{Context, Result, anyhow, bail};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, Row, postgres::PgConnectOptions};
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/";

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "1 writer × 1 event",
        writers: 1,
        events_per_append: 1,
        target: 0.9,
    },
    Scenario {
        name: "16 writers × 1 event",
        writers: 16,
        events_per_append: 1,
        target: 1.5,
    },
    Scenario {
        name: "16 writers × 10 events",
        writers: 16,
        events_per_append: 10,
        target: 0.9,
    },
];

struct Settings {
    base_url: String,
    measured: Duration,
    warmup: Duration,
    coalescing: CoalescingConfig,
    pool_size: u32,
    rounds: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let base_url = env::var("BENCH_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let measured: f64 = env_or("BENCH_SECONDS", 5.0)?;
        let warmup: f64 = env_or("BENCH_WARMUP_SECONDS", 1.0)?;
        if !(measured > 0.0 && warmup >= 0.0) {
            bail!("BENCH_SECONDS must be > 0 and BENCH_WARMUP_SECONDS >= 0");
        }
        let defaults = CoalescingConfig::default();
        let coalescing = CoalescingConfig {
            max_batch: env_or("BENCH_MAX_BATCH", defaults.max_batch)?,
            flushers: env_or("BENCH_FLUSHERS", defaults.flushers)?,
        };
        if coalescing.max_batch == 0 || coalescing.flushers == 0 {
            bail!("BENCH_MAX_BATCH and BENCH_FLUSHERS must be at least 1");
        }
        let pool_size: u32 = env_or("BENCH_POOL", 20)?;
        let pool_size = pool_size.max(coalescing.flushers as u32 + 1);
        let rounds: usize = env_or("BENCH_ROUNDS", 3)?;
        Ok(Self {
            rounds: rounds.max(1),
            base_url,
            measured: Duration::from_secs_f64(measured),
            warmup: Duration::from_secs_f64(warmup),
            coalescing,
            pool_size,
        })
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    // without it, and should not spend half a minute on a database.
    if !env::args().any(|a| a == "--bench") {
        eprintln!("append bench: skipped (run it with `cargo bench --bench append`)");
        return Ok(());
    }
    let settings = Settings::from_env()?;
    let db_name = format!("ai_secretary_bench_{}", Uuid::new_v4().simple());
    let db_url = with_database(&settings.base_url, &db_name)?;
    let admin_url = with_database(&settings.base_url, "postgres")?;

    let outcome = tokio::select! {
        outcome = run(&settings, &db_url, &db_name) => outcome,
        Ok(()) = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let dropped = drop_database(&admin_url, &db_name).await;
    match (outcome, dropped) {
        (Ok(()), dropped) => dropped,
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(drop_error)) => {
            eprintln!("also failed to drop database {db_name}: {drop_error:#}");
            Err(e)
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<()> {
    let mut conn = PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("connecting to the postgres database to drop {name}"))?;
    conn.execute(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .await
    .with_context(|| format!("dropping database {name}"))?;
    conn.close().await.ok();
    eprintln!("dropped database {name}");
    Ok(())
}

async fn run(settings: &Settings, db_url: &str, db_name: &str) -> Result<()> {
    eprintln!("creating database {db_name}");
    let pool = postgres::connect(db_url, settings.pool_size)
        .await
        .with_context(|| format!("creating and migrating database {db_name}"))?;
    let raw_options: PgConnectOptions = db_url
        .parse()
        .context("BENCH_DATABASE_URL is not a Postgres URL")?;
    let raw_options = raw_options.application_name("ai-secretary-bench-raw");

    let server = describe_server(&pool).await?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (data_bytes, metadata_bytes) = Writer::sample_sizes()?;

    let store = PgEventStore::new(pool.clone(), settings.coalescing);
    let mut compared = Vec::new();
    for scenario in &SCENARIOS {
        let (mut raws, mut stores) = (Vec::new(), Vec::new());
        for _ in 0..settings.rounds {
            raws.push(measure(settings, scenario, Path::Raw, &raw_options, &store).await?);
            stores.push(measure(settings, scenario, Path::Store, &raw_options, &store).await?);
        }
        compared.push(Compared::new(scenario, raws, stores));
    }
    drop(store);
    pool.close().await;

    println!();
    println!("Server: {server}; client machine: {cores} logical CPUs");
    println!(
        "Each run: {:.1} s warm-up (not counted) + {:.1} s measured; event data {data_bytes} B, metadata {metadata_bytes} B",
        settings.warmup.as_secs_f64(),
        settings.measured.as_secs_f64()
    );
    println!(
        "{} rounds per scenario, raw and store alternating; each path's median round is shown",
        settings.rounds
    );
    println!(
        "Store: CoalescingConfig {{ max_batch: {}, flushers: {} }}, pool of {} connections; raw: one connection per writer",
        settings.coalescing.max_batch, settings.coalescing.flushers, settings.pool_size
    );
    println!();
    print_tables(&compared);
    Ok(())
}

async fn measure(
    settings: &Settings,
    scenario: &Scenario,
    path: Path,
    raw_options: &PgConnectOptions,
    store: &PgEventStore,
) -> Result<Measurement> {
    eprintln!("measuring {} / {path}", scenario.name);
    let pool = store.pool();
    // Start every measurement from a clean checkpoint so that neither path pays
    // for the other's dirty buffers. Needs superuser or pg_checkpoint; optional.
    if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
        eprintln!("  (CHECKPOINT skipped: {e})");
    }

    let writers: Vec<Writer> = (0..scenario.writers)
        .map(|_| Writer::new(Uuid::now_v7(), scenario.events_per_append))
        .collect();
    let streams: Vec<Uuid> = writers.iter().map(|w| w.stream_id).collect();
    // Connect before the clock starts.
    let connections = match path {
        Path::Raw => raw_postgres::connections(raw_options, scenario.writers).await?,
        Path::Store => Vec::new(),
    };

    let window = Window::starting_now(settings.warmup, settings.measured);
    let mut tasks = Vec::new();
    let mut connections = connections.into_iter();
    for writer in writers {
        tasks.push(match path {
            Path::Raw => {
                let conn = connections
                    .next()
                    .context("a raw writer has no connection")?;
                tokio::spawn(raw_postgres::raw_writer(conn, writer, window))
            }
            Path::Store => tokio::spawn(store_writer(store.clone(), writer, window)),
        });
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.context("a writer task panicked")??);
    }
    if latencies.is_empty() {
        bail!(
            "{} / {path}: no append completed in the measured window",
            scenario.name
        );
    }
    latencies.sort_unstable();

    let row = sqlx::query(
        "SELECT count(*) AS events, count(DISTINCT transaction_id) AS commits
         FROM events WHERE stream_id = ANY($1)",
    )
    .bind(&streams)
    .fetch_one(pool)
    .await
    .context("counting the run's commits")?;
    let events: i64 = row.try_get("events")?;
    let commits: i64 = row.try_get("commits")?;

    Ok(Measurement {
        path,
        events_per_append: scenario.events_per_append,
        measured: settings.measured,
        latencies,
        events_per_commit: events as f64 / commits.max(1) as f64,
    })
}
