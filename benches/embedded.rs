//! The embedded default measured against raw SQLite, in one run, on one file
//! system: what the service's own SQLite store and read side cost over the
//! database alone.
//!
//! **Part 1, appends.** The same scenarios and method as `benches/append.rs`,
//! on SQLite: 1 writer × 1 event, 16 writers × 1 event and 16 writers × 10
//! events, each on two paths against one freshly created database file (WAL,
//! `synchronous=FULL`, the store's own connection settings):
//!
//! - **raw**: each writer owns one connection and loops one autocommit
//!   `INSERT INTO events … VALUES (…), …` holding that append's rows (one
//!   statement, one transaction, one fsync per append; concurrent writers wait
//!   on SQLite's busy handler, as any program writing one file from many
//!   connections does);
//! - **store**: each writer loops `SqliteEventStore::append` through one shared
//!   store, whose single writer commits whatever appends are queued in one
//!   `BEGIN IMMEDIATE` transaction.
//!
//! **Part 2, freshness.** The embedded service (no `NATS_URL`, no `REDIS_URL`:
//! the workers tail the store in process, the cache is in process) runs in this
//! process on a fresh `DATA_DIR`. Closed-loop clients each `POST
//! /api/v1/conversations` (a one-event command), then poll `GET
//! /api/v1/conversations/{id}` without a consistency token every millisecond
//! until it answers 200. Freshness is the time from receiving the 201 to
//! receiving that 200: the store tail, the projection and the cache in between.
//! The achieved commands/s is set beside part 1's raw appends/s at as many
//! writers.
//!
//! ```text
//! RATE_LIMIT_COMMANDS_PER_MINUTE=0 cargo bench --bench embedded
//! BENCH_SECONDS=10 BENCH_ROUNDS=5 cargo bench --bench embedded
//! ```
//!
//! Environment:
//! - `BENCH_DIR`: where the database files go (default: the system's temp dir);
//!   each run makes its own directory there and removes it at the end;
//! - `BENCH_SECONDS`: measured seconds per append scenario and path, and per
//!   freshness phase (default 5);
//! - `BENCH_WARMUP_SECONDS`: uncounted seconds before that (default 1);
//! - `BENCH_ROUNDS`: rounds per append scenario, raw and store alternating; the
//!   median round of each path is reported (default 3);
//! - `BENCH_MAX_BATCH`: the store's `max_batch` (default:
//!   `CoalescingConfig::default()`);
//! - `BENCH_PARTS`: `appends`, `freshness` or both, comma-separated.
//!
//! The service is built with its rate limits off (see `common/in_process.rs`),
//! whatever `RATE_LIMIT_COMMANDS_PER_MINUTE` says. It refuses to start if
//! `DATABASE_URL`, `NATS_URL`, `REDIS_URL`, `EVENT_FEED` or `CACHE_BACKEND` is
//! set, since any of them would move a part off the embedded topology.
//!
//! Without a `--bench` argument (as under `cargo test --all-targets`) it does
//! nothing.

#[path = "common/appends.rs"]
mod appends;
#[path = "common/mod.rs"]
#[allow(
    dead_code,
    reason = "only the settings reader: no Postgres server is measured here"
)]
mod common;
#[path = "common/in_process.rs"]
mod in_process;
#[path = "../tests/support/mod.rs"]
mod support;

use appends::{
    Compared, Measurement, Path, STREAM_TYPE, Scenario, Window, Writer, ms, percentile,
    print_tables, store_writer,
};
use common::env_or;
use in_process::Service;
use support::http;

use std::{
    env,
    path::{Path as FilePath, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use ai_secretary::{
    startup::Roles,
    store::{
        postgres::CoalescingConfig,
        sqlite::{self, SqliteEventStore},
    },
};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, SqliteConnection, SqlitePool};
use uuid::Uuid;

/// Columns the raw INSERT writes, in bind order.
const COLUMNS: usize = 10;

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "1 writer × 1 event",
        writers: 1,
        events_per_append: 1,
        // One writer has nothing to coalesce: the store pays a channel hop and
        // its bookkeeping (reservations, idempotency, the commit signal).
        target: 0.8,
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

/// Closed-loop clients of the freshness phases.
const FRESHNESS_CLIENTS: [usize; 2] = [1, 16];
/// How often a client asks whether its conversation is visible yet.
const POLL_EVERY: Duration = Duration::from_millis(1);
/// A conversation not visible after this is counted unresolved.
const GIVE_UP: Duration = Duration::from_secs(10);
/// Variables that would move a part of the service off the embedded topology.
const SERVER_VARIABLES: [&str; 5] = [
    "DATABASE_URL",
    "NATS_URL",
    "REDIS_URL",
    "EVENT_FEED",
    "CACHE_BACKEND",
];

struct Settings {
    dir: PathBuf,
    measured: Duration,
    warmup: Duration,
    rounds: usize,
    coalescing: CoalescingConfig,
    appends: bool,
    freshness: bool,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let measured: f64 = env_or("BENCH_SECONDS", 5.0)?;
        let warmup: f64 = env_or("BENCH_WARMUP_SECONDS", 1.0)?;
        if !(measured > 0.0 && warmup >= 0.0) {
            bail!("BENCH_SECONDS must be > 0 and BENCH_WARMUP_SECONDS >= 0");
        }
        let defaults = CoalescingConfig::default();
        let coalescing = CoalescingConfig {
            max_batch: env_or("BENCH_MAX_BATCH", defaults.max_batch)?.max(1),
            ..defaults
        };
        let parts = env::var("BENCH_PARTS").unwrap_or_else(|_| "appends,freshness".into());
        let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
        if let Some(unknown) = parts.iter().find(|p| !["appends", "freshness"].contains(p)) {
            bail!("BENCH_PARTS: unknown part {unknown:?} (appends, freshness)");
        }
        let base = env::var_os("BENCH_DIR").map_or_else(env::temp_dir, PathBuf::from);
        Ok(Self {
            dir: base.join(format!("ai-secretary-bench-{}", Uuid::new_v4().simple())),
            measured: Duration::from_secs_f64(measured),
            warmup: Duration::from_secs_f64(warmup),
            rounds: env_or::<usize>("BENCH_ROUNDS", 3)?.max(1),
            coalescing,
            appends: parts.contains(&"appends"),
            freshness: parts.contains(&"freshness"),
        })
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if !env::args().any(|a| a == "--bench") {
        eprintln!("embedded bench: skipped (run it with `cargo bench --bench embedded`)");
        return Ok(());
    }
    if let Some(set) = SERVER_VARIABLES.iter().find(|v| env::var_os(v).is_some()) {
        bail!("{set} is set: unset it, this bench measures the embedded topology");
    }
    let settings = Settings::from_env()?;
    std::fs::create_dir_all(&settings.dir)
        .with_context(|| format!("creating {}", settings.dir.display()))?;
    let outcome = tokio::select! {
        outcome = run(&settings) => outcome,
        Ok(()) = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let removed = std::fs::remove_dir_all(&settings.dir)
        .with_context(|| format!("removing {}", settings.dir.display()));
    eprintln!("removed {}", settings.dir.display());
    outcome.and(removed)
}

async fn run(settings: &Settings) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let version: String = {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await?;
        sqlx::query_scalar("SELECT sqlite_version()")
            .fetch_one(&mut conn)
            .await?
    };
    println!();
    println!(
        "SQLite {version} (WAL, synchronous=FULL) under {}; {cores} logical CPUs",
        settings.dir.display()
    );
    let mut raw_rates = Vec::new();
    if settings.appends {
        raw_rates = appends_part(settings).await?;
    }
    if settings.freshness {
        freshness_part(settings, &raw_rates).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Part 1: appends
// ---------------------------------------------------------------------------

/// Part 1; the raw appends/s of each scenario with one event per append, by
/// writers, for part 2's comparison.
async fn appends_part(settings: &Settings) -> Result<Vec<(usize, f64)>> {
    let file = settings.dir.join("appends.db");
    let pool = sqlite::connect(file.to_str().context("BENCH_DIR is not UTF-8")?, 4).await?;
    let store = SqliteEventStore::new(pool.clone(), settings.coalescing);
    let (data_bytes, metadata_bytes) = Writer::sample_sizes()?;

    let mut compared = Vec::new();
    for scenario in &SCENARIOS {
        let (mut raws, mut stores) = (Vec::new(), Vec::new());
        for _ in 0..settings.rounds {
            raws.push(measure(settings, scenario, Path::Raw, &file, &store).await?);
            stores.push(measure(settings, scenario, Path::Store, &file, &store).await?);
        }
        compared.push(Compared::new(scenario, raws, stores));
    }
    store.close().await;

    println!();
    println!("### Part 1: appends, the store against raw INSERTs");
    println!();
    println!(
        "Each run: {:.1} s warm-up (not counted) + {:.1} s measured; event data {data_bytes} B, \
         metadata {metadata_bytes} B; {} rounds per scenario, raw and store alternating, each \
         path's median round shown; store max_batch {}; raw: one connection per writer",
        settings.warmup.as_secs_f64(),
        settings.measured.as_secs_f64(),
        settings.rounds,
        settings.coalescing.max_batch,
    );
    println!();
    print_tables(&compared);
    Ok(compared
        .iter()
        .filter(|c| c.scenario.events_per_append == 1)
        .map(|c| (c.scenario.writers, c.raw.appends_per_sec()))
        .collect())
}

async fn measure(
    settings: &Settings,
    scenario: &Scenario,
    path: Path,
    file: &FilePath,
    store: &SqliteEventStore,
) -> Result<Measurement> {
    eprintln!("measuring {} / {path}", scenario.name);
    let pool = store.pool();
    // Start every measurement with an empty WAL, so that neither path pays for
    // checkpointing the other's pages.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(pool)
        .await
        .context("checkpointing the WAL")?;
    let before = last_position(pool).await?;

    let writers: Vec<Writer> = (0..scenario.writers)
        .map(|_| Writer::new(Uuid::now_v7(), scenario.events_per_append))
        .collect();
    // Connect before the clock starts.
    let mut connections = Vec::new();
    if path == Path::Raw {
        let options = sqlite::options(file.to_str().context("BENCH_DIR is not UTF-8")?)?;
        for _ in 0..scenario.writers {
            connections.push(
                SqliteConnection::connect_with(&options)
                    .await
                    .context("opening a raw writer's connection")?,
            );
        }
    }

    let window = Window::starting_now(settings.warmup, settings.measured);
    let mut tasks = Vec::new();
    let mut connections = connections.into_iter();
    for writer in writers {
        tasks.push(match path {
            Path::Raw => {
                let conn = connections
                    .next()
                    .context("a raw writer has no connection")?;
                tokio::spawn(raw_writer(conn, writer, window))
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

    // A raw append is one statement, so one commit, by construction; the
    // store's commits are the distinct transaction ids it wrote.
    let events_per_commit = match path {
        Path::Raw => scenario.events_per_append as f64,
        Path::Store => {
            let (events, commits): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(DISTINCT transaction_id) FROM events
                 WHERE global_position > $1",
            )
            .bind(before)
            .fetch_one(pool)
            .await
            .context("counting the run's commits")?;
            events as f64 / commits.max(1) as f64
        }
    };
    Ok(Measurement {
        path,
        events_per_append: scenario.events_per_append,
        measured: settings.measured,
        latencies,
        events_per_commit,
    })
}

async fn last_position(pool: &SqlitePool) -> Result<i64> {
    sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events")
        .fetch_one(pool)
        .await
        .context("reading the last position")
}

/// `INSERT INTO events ... VALUES (...), ...` for `rows` events. The raw rows
/// carry the columns the store writes; `transaction_id` is the statement's
/// first position, as the store's is.
fn insert_sql(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let params: Vec<String> = (1..=COLUMNS)
                .map(|c| match c {
                    1 => "(SELECT coalesce(max(global_position), 0) + 1 FROM events)".to_owned(),
                    _ => format!("${}", r * (COLUMNS - 1) + c - 1),
                })
                .collect();
            format!("({})", params.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO events (transaction_id, event_id, stream_id, stream_type, version, \
         event_type, schema_version, data, metadata, recorded_at) VALUES {}",
        values.join(", ")
    )
}

/// Loop one autocommit INSERT per append on the writer's own connection.
async fn raw_writer(
    mut conn: SqliteConnection,
    writer: Writer,
    window: Window,
) -> Result<Vec<Duration>> {
    let sql: Arc<str> = insert_sql(writer.events_per_append).into();
    let per_append = writer.events_per_append as i64;
    let mut version = 0_i64;
    let mut latencies = Vec::new();
    loop {
        let events = writer.events()?;
        let started = Instant::now();
        if started >= window.until {
            break;
        }
        let now = chrono::Utc::now().timestamp_micros();
        let mut query = sqlx::query(AssertSqlSafe(sql.clone()));
        for (j, event) in events.iter().enumerate() {
            query = query
                .bind(event.event_id)
                .bind(writer.stream_id)
                .bind(STREAM_TYPE)
                .bind(version + 1 + j as i64)
                .bind(event.event_type.as_str())
                .bind(event.schema_version)
                .bind(event.data.to_string())
                .bind(event.metadata.to_string())
                .bind(now);
        }
        let done = query.execute(&mut conn).await.with_context(|| {
            format!(
                "raw INSERT on stream {} after version {version}",
                writer.stream_id
            )
        })?;
        if done.rows_affected() != per_append as u64 {
            bail!(
                "raw INSERT on stream {} wrote {} rows, not {per_append}",
                writer.stream_id,
                done.rows_affected()
            );
        }
        version += per_append;
        window.record(&mut latencies, started);
    }
    conn.close().await.ok();
    Ok(latencies)
}

// ---------------------------------------------------------------------------
// Part 2: freshness
// ---------------------------------------------------------------------------

/// A caller signed in as the bench user, with an assistant to talk to.
#[derive(Clone)]
struct Api {
    base: Arc<str>,
    token: Arc<str>,
    assistant: Arc<str>,
    client: reqwest::Client,
}

impl Api {
    async fn sign_up(base: &str) -> Result<Api> {
        let client = reqwest::Client::new();
        let (email, password) = ("bench@example.com", "correct horse battery staple");
        let registered = client
            .post(format!("{base}/api/v1/users"))
            .json(&json!({ "email": email, "password": password, "display_name": "Bench" }))
            .send()
            .await
            .context("registering the bench user")?;
        expect_status(registered, reqwest::StatusCode::CREATED, "registering").await?;
        let token = client
            .post(format!("{base}/api/v1/auth/token"))
            .json(&json!({ "email": email, "password": password }))
            .send()
            .await
            .context("signing in")?;
        let token = expect_status(token, reqwest::StatusCode::OK, "signing in").await?;
        let token = token["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("no access_token in {token}"))?;
        let assistant = client
            .post(format!("{base}/api/v1/assistants"))
            .bearer_auth(token)
            .json(&json!({ "name": "Bench assistant" }))
            .send()
            .await
            .context("creating the assistant")?;
        let assistant = expect_status(
            assistant,
            reqwest::StatusCode::CREATED,
            "creating the assistant",
        )
        .await?;
        let assistant = assistant["id"]
            .as_str()
            .ok_or_else(|| anyhow!("the assistant has no id: {assistant}"))?;
        Ok(Api {
            base: base.into(),
            token: token.into(),
            assistant: assistant.into(),
            client,
        })
    }

    /// A new conversation; its id.
    async fn start_conversation(&self, n: usize) -> Result<String> {
        let response = self
            .client
            .post(format!("{}/api/v1/conversations", self.base))
            .bearer_auth(&*self.token)
            .json(&json!({ "assistant_id": &*self.assistant, "title": format!("Bench {n}") }))
            .send()
            .await
            .context("POST /conversations")?;
        let body = expect_status(response, reqwest::StatusCode::CREATED, "a conversation").await?;
        body["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the conversation has no id: {body}"))
    }

    /// Whether `GET /conversations/{id}` (no consistency token) finds it.
    async fn visible(&self, id: &str) -> Result<bool> {
        let path = format!("/conversations/{id}");
        let response = http::get(&self.client, &self.base, &path, &self.token, None)
            .send()
            .await
            .context("GET /conversations/{id}")?;
        match response.status() {
            reqwest::StatusCode::OK => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            status => bail!(
                "GET /conversations/{id} answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }
}

async fn expect_status(
    response: reqwest::Response,
    expected: reqwest::StatusCode,
    what: &str,
) -> Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status != expected {
        bail!("{what} answered {status}: {body}");
    }
    Ok(body)
}

/// One client's results.
#[derive(Default)]
struct Client {
    commands: Vec<Duration>,
    freshness: Vec<Duration>,
    unresolved: usize,
}

/// Post a conversation, wait until it is visible, again, until the window ends.
async fn client(api: Api, window: Window, first: usize) -> Result<Client> {
    let mut out = Client::default();
    for n in first.. {
        let sent = Instant::now();
        if sent >= window.until {
            break;
        }
        let id = api.start_conversation(n).await?;
        let acked = Instant::now();
        let counted = acked >= window.counted_from && acked < window.until;
        let visible = loop {
            if api.visible(&id).await? {
                break Some(Instant::now());
            }
            if acked.elapsed() > GIVE_UP {
                break None;
            }
            tokio::time::sleep(POLL_EVERY).await;
        };
        if counted {
            out.commands.push(acked - sent);
            match visible {
                Some(at) => out.freshness.push(at - acked),
                None => out.unresolved += 1,
            }
        }
    }
    Ok(out)
}

async fn freshness_part(settings: &Settings, raw_rates: &[(usize, f64)]) -> Result<()> {
    let data_dir = settings.dir.join("service");
    let service = Service::launch(
        &[
            "--data-dir",
            data_dir.to_str().context("BENCH_DIR is not UTF-8")?,
        ],
        Roles::all(),
    )
    .await?;
    let outcome = freshness_on(settings, &service, raw_rates).await;
    service.stop().await?;
    outcome
}

async fn freshness_on(
    settings: &Settings,
    service: &Service,
    raw_rates: &[(usize, f64)],
) -> Result<()> {
    let base = service
        .address
        .as_deref()
        .context("the service has no listener")?;
    let api = Api::sign_up(base).await?;
    println!();
    println!("### Part 2: freshness of the embedded service");
    println!();
    println!(
        "Closed-loop clients: POST /conversations, then GET /conversations/{{id}} every {} ms \
         until 200; {:.1} s warm-up + {:.1} s measured per phase",
        POLL_EVERY.as_millis(),
        settings.warmup.as_secs_f64(),
        settings.measured.as_secs_f64(),
    );
    println!();
    println!(
        "| clients | commands/s | command p50 ms | command p99 ms | freshness p50 ms | freshness p99 ms | freshness max ms | unresolved | commands ÷ raw appends |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for clients in FRESHNESS_CLIENTS {
        eprintln!("freshness: {clients} clients");
        let window = Window::starting_now(settings.warmup, settings.measured);
        let tasks: Vec<_> = (0..clients)
            .map(|c| tokio::spawn(client(api.clone(), window, c * 1_000_000)))
            .collect();
        let mut all = Client::default();
        for task in tasks {
            let one = task.await.context("a client panicked")??;
            all.commands.extend(one.commands);
            all.freshness.extend(one.freshness);
            all.unresolved += one.unresolved;
        }
        if all.freshness.is_empty() {
            bail!("{clients} clients: no conversation became visible in the window");
        }
        all.commands.sort_unstable();
        all.freshness.sort_unstable();
        let rate = all.commands.len() as f64 / settings.measured.as_secs_f64();
        let versus = raw_rates
            .iter()
            .find(|(writers, _)| *writers == clients)
            .map_or("(part 1 not run)".to_owned(), |(_, raw)| {
                format!("{:.2}× of {raw:.0}/s", rate / raw)
            });
        println!(
            "| {clients} | {rate:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {versus} |",
            ms(percentile(&all.commands, 0.50)),
            ms(percentile(&all.commands, 0.99)),
            ms(percentile(&all.freshness, 0.50)),
            ms(percentile(&all.freshness, 0.99)),
            ms(percentile(&all.freshness, 1.0)),
            all.unresolved,
        );
    }
    println!();
    println!(
        "Clients wait for each conversation to show before posting the next, so commands/s is \
         what a reader-paced client gets, not the API's ceiling."
    );
    println!();
    Ok(())
}
