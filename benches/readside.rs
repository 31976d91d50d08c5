//! Read-side benchmark: how fresh the query API is under command load, and how
//! fast the projections apply a backlog against raw upserts of the same rows, on
//! a real Postgres, NATS JetStream and Redis.
//!
//! **Part 1, freshness.** The whole service runs in this process
//! (`Application::build` with `Roles::all()`, bound to `127.0.0.1:0`, `run_until`
//! in a spawned task stopped through a oneshot). A user registers over HTTP and
//! creates an assistant and conversations. First the sustained command rate:
//! `BENCH_CLIENTS` closed-loop clients post `POST /api/v1/conversations/{id}/messages`
//! (two events each) as fast as they can; 2xx/s over the measured window. Then, at
//! 25 %, 50 % and 100 % of that rate, open-loop: sends are scheduled at fixed
//! intervals, spread round-robin over `BENCH_PACERS` clients (each its own HTTP
//! connection pool), over fresh conversations. A measured command's 202 goes to a
//! poller task, which sends `GET /api/v1/conversations/{id}/messages?order=desc&limit=10`
//! (no `X-Consistency-Token`) every `BENCH_POLL_MS` while it has something
//! pending; freshness is the time from receiving the 202 to receiving the first
//! response, of a GET sent after that 202, that lists the message. Before each
//! level the read side is let catch up (every checkpoint at the head of the store).
//!
//! Which commands are measured: polling every command's conversation every
//! millisecond is itself more load than a 2-core machine carries (the GETs then
//! outnumber the commands and the measurement measures itself), so by default
//! `BENCH_PROBES` (1) probe slot samples: a send is measured when a slot is free,
//! posted to one of the slot's own conversations, and the slot is free again once
//! the message is listed. Every other send goes to the level's regular
//! conversations, unmeasured. `BENCH_PROBES=all` measures every command instead
//! (one poller per regular conversation; a message pushed off the newest page
//! before it is seen counts as unresolved).
//!
//! To show where the time goes, the bench also subscribes to the event subjects
//! on NATS and LISTENs on `ai_secretary_checkpoints`, splitting each measured
//! command's freshness into 202 → its last event published, published → the
//! `messages` batch holding it committed, committed → listed; and it reads
//! `/proc/stat` for how busy the machine was in each phase.
//!
//! **Part 2, projection throughput.** In a second fresh database a backlog of
//! `BENCH_EVENTS` events is appended through `PgEventStore` (users, assistants,
//! conversations with `MessagePosted` + `ReplyRequested` appends and, in each
//! reply's own stream, `ReplyStarted` + `ReplyCompleted`, encoded from the domain
//! events by `store::codec`). An
//! instance with only the relay runs until the relay's checkpoint reaches the
//! head, so the JetStream stream holds the backlog. Then, per round, raw, `messages`
//! and all projections alternate:
//! - **raw**: the rows the `messages` projection writes for those events
//!   (`messages` and `messages_conversations`), upserted into scratch tables of the
//!   same shape (`LIKE ... INCLUDING ALL`) with one `INSERT ... ON CONFLICT (..) DO
//!   UPDATE` per row on one connection, one transaction per 500 rows; its rate is
//!   given both in rows/s and as backlog events ÷ time (the same work, per event);
//! - **messages**: an instance with only the `messages` projection, timed from
//!   just before `Application::build` until its checkpoint reaches the head (its
//!   read model and checkpoint are emptied first);
//! - **all**: the same with every projection, until the last one is at the head;
//! - **cache**: the same with only the `cache` projection (its Redis
//!   invalidations), as it catches up on a backlog after an outage.
//!
//! Each path's median round is reported; per-batch timing of the projections comes
//! from the `NOTIFY` each batch commit sends on `ai_secretary_checkpoints`.
//!
//! Run it with the three servers up (Postgres user allowed to create databases):
//!
//! ```text
//! cargo bench --bench readside
//! BENCH_PARTS=throughput BENCH_EVENTS=100000 cargo bench --bench readside
//! ```
//!
//! Environment:
//! - `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/`; its
//!   database part is ignored), `BENCH_NATS_URL` (`nats://127.0.0.1:4222`),
//!   `BENCH_REDIS_URL` (`redis://127.0.0.1:6379`);
//! - `BENCH_PARTS`: `freshness`, `throughput` or both, comma-separated (default both);
//! - `BENCH_CLIENTS`: closed-loop clients finding the sustained rate (default 16);
//! - `BENCH_SUSTAIN_SECONDS` (default 5) after `BENCH_WARMUP_SECONDS` (default 1);
//! - `BENCH_LEVEL_SECONDS`: seconds per load level (default 5);
//! - `BENCH_PACERS`: open-loop clients per level (default 4);
//! - `BENCH_CONVERSATIONS`: fresh conversations per phase (default 64);
//! - `BENCH_POLL_MS`: poll interval of a conversation with a pending message (default 1);
//! - `BENCH_PROBES`: probe slots, or `all` (see above; default 1);
//! - `BENCH_EVENTS`: backlog size (default 60000);
//! - `BENCH_ROUNDS`: throughput rounds, paths alternating; median shown (default 3);
//! - `BENCH_LOG`: the service's log filter, to stderr (default `warn`).
//!
//! The service's other settings come from its usual environment variables (e.g.
//! `DATABASE_MAX_CONNECTIONS`); database, bus and key names are the bench's own.
//! Without a `--bench` argument (as under `cargo test --all-targets`) it does
//! nothing. The databases (`ai_secretary_bench_<random hex>_f` and `_p`), the
//! JetStream streams (`BENCH_<hex>_F`, `_P`, subjects `bench_<hex>_f.events.>` and
//! `_p`) and the Redis keys (`bench_<hex>_f:*`, `_p:*`) are removed at the end,
//! also after an error or Ctrl-C.

#[path = "common/mod.rs"]
mod common;
#[path = "common/in_process.rs"]
mod in_process;
#[path = "common/service.rs"]
mod service;

use common::{describe_server, env_or};
use service::{Names, Servers, Service, delete_redis_keys, remove};

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    env,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ai_secretary::{
    domain::{
        assistant::AssistantEvent,
        conversation::ConversationEvent,
        reply::{ReplyEvent, Usage},
        user::UserEvent,
    },
    startup::Roles,
    store::{
        AppendRequest, EventMetadata, EventStore, NewEvent, codec,
        postgres::{self, CoalescingConfig, PgEventStore},
    },
};
use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool, postgres::PgListener};
use tokio::{
    sync::mpsc,
    task::{JoinHandle, JoinSet},
    time::sleep_until,
};
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/";
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";
/// Where every projection batch commit is announced (`projections::checkpoint::CHANNEL`).
const CHECKPOINT_CHANNEL: &str = "ai_secretary_checkpoints";
/// Rows per transaction of the raw upsert baseline (the worker's largest batch).
const RAW_ROWS_PER_TX: usize = 500;
/// Load levels of part 1, as fractions of the sustained rate.
const LEVELS: [f64; 3] = [0.25, 0.5, 1.0];
/// Freshness target: p99 at 50 % load.
const FRESHNESS_TARGET_MS: f64 = 25.0;
/// Throughput target: projection ÷ raw.
const THROUGHPUT_TARGET: f64 = 0.8;
/// Posts per conversation in the backlog (each: 2 events, then the reply's 2).
const POSTS_PER_CONVERSATION: usize = 16;
const BACKLOG_USERS: usize = 20;
const ASSISTANTS_PER_USER: usize = 3;
const BACKLOG_WRITERS: usize = 16;

struct Settings {
    base_url: String,
    nats_url: String,
    redis_url: String,
    freshness: bool,
    throughput: bool,
    clients: usize,
    warmup: Duration,
    sustain: Duration,
    level: Duration,
    pacers: usize,
    conversations: usize,
    poll: Duration,
    /// Probe slots (measured commands in flight at once); `None`: every command.
    probes: Option<usize>,
    events: usize,
    rounds: usize,
}

impl Settings {
    fn servers(&self) -> Servers<'_> {
        Servers {
            base_url: &self.base_url,
            nats_url: &self.nats_url,
            redis_url: &self.redis_url,
        }
    }

    fn from_env() -> Result<Self> {
        let parts = env::var("BENCH_PARTS").unwrap_or_else(|_| "freshness,throughput".into());
        let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
        if let Some(unknown) = parts
            .iter()
            .find(|p| !["freshness", "throughput"].contains(p))
        {
            bail!("BENCH_PARTS: unknown part {unknown:?} (freshness, throughput)");
        }
        let secs = |name: &str, default: f64| -> Result<Duration> {
            let v: f64 = env_or(name, default)?;
            if !(v >= 0.0 && v.is_finite()) {
                bail!("{name} must be a non-negative number of seconds");
            }
            Ok(Duration::from_secs_f64(v))
        };
        let settings = Self {
            base_url: env::var("BENCH_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into()),
            nats_url: env::var("BENCH_NATS_URL").unwrap_or_else(|_| DEFAULT_NATS.into()),
            redis_url: env::var("BENCH_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS.into()),
            freshness: parts.contains(&"freshness"),
            throughput: parts.contains(&"throughput"),
            clients: env_or("BENCH_CLIENTS", 16)?,
            warmup: secs("BENCH_WARMUP_SECONDS", 1.0)?,
            sustain: secs("BENCH_SUSTAIN_SECONDS", 5.0)?,
            level: secs("BENCH_LEVEL_SECONDS", 5.0)?,
            pacers: env_or("BENCH_PACERS", 4)?,
            conversations: env_or("BENCH_CONVERSATIONS", 64)?,
            poll: Duration::from_secs_f64(env_or::<f64>("BENCH_POLL_MS", 1.0)? / 1000.0),
            probes: match env::var("BENCH_PROBES").as_deref().map(str::trim) {
                Ok("all") => None,
                Ok(_) => Some(env_or::<usize>("BENCH_PROBES", 1)?.max(1)),
                Err(_) => Some(1),
            },
            events: env_or("BENCH_EVENTS", 60_000)?,
            rounds: env_or::<usize>("BENCH_ROUNDS", 3)?.max(1),
        };
        if settings.clients == 0 || settings.pacers == 0 || settings.conversations == 0 {
            bail!("BENCH_CLIENTS, BENCH_PACERS and BENCH_CONVERSATIONS must be at least 1");
        }
        if settings.sustain.is_zero() || settings.level.is_zero() {
            bail!("BENCH_SUSTAIN_SECONDS and BENCH_LEVEL_SECONDS must be > 0");
        }
        if settings.events < 1000 {
            bail!("BENCH_EVENTS must be at least 1000");
        }
        Ok(settings)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    // without it, and should not spend minutes on servers.
    if !env::args().any(|a| a == "--bench") {
        eprintln!("readside bench: skipped (run it with `cargo bench --bench readside`)");
        return Ok(());
    }
    let filter = env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::from_env()?;
    let run = Uuid::new_v4().simple().to_string();
    let fresh = Names::new(&settings.base_url, &run, "f")?;
    let proj = Names::new(&settings.base_url, &run, "p")?;

    let outcome = tokio::select! {
        outcome = run_parts(&settings, &fresh, &proj) => outcome,
        Ok(()) = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let mut cleanup_errors = Vec::new();
    for names in [&fresh, &proj] {
        if let Err(e) = remove(&settings.servers(), names).await {
            cleanup_errors.push(e);
        }
    }
    match outcome {
        Ok(()) => match cleanup_errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        },
        Err(e) => {
            for c in cleanup_errors {
                eprintln!("also failed to clean up: {c:#}");
            }
            Err(e)
        }
    }
}

async fn run_parts(settings: &Settings, fresh: &Names, proj: &Names) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut report = Vec::new();
    if settings.freshness {
        report.push(freshness(settings, fresh).await?);
    }
    if settings.throughput {
        report.push(throughput(settings, proj).await?);
    }
    println!();
    println!(
        "Client machine: {cores} logical CPUs (service, load generator and servers share them)"
    );
    for section in report {
        println!();
        print!("{section}");
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------
// The service in-process
// ---------------------------------------------------------------------------

/// Commit-order position: `(transaction_id, global_position)`.
type Pos = (i64, i64);

/// The last event of the store in commit order.
async fn head(pool: &PgPool) -> Result<Pos> {
    let row: Option<Pos> = sqlx::query_as(
        "SELECT transaction_id::text::int8, global_position FROM events
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .context("reading the head of the store")?;
    Ok(row.unwrap_or((0, 0)))
}

async fn checkpoints(pool: &PgPool) -> Result<HashMap<String, Pos>> {
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT name, transaction_id, global_position FROM checkpoints")
            .fetch_all(pool)
            .await
            .context("reading checkpoints")?;
    Ok(rows.into_iter().map(|(n, t, g)| (n, (t, g))).collect())
}

/// Wait until every named checkpoint is at the head of the store.
async fn wait_caught_up(pool: &PgPool, names: &[String], limit: Duration) -> Result<()> {
    let head = head(pool).await?;
    let deadline = Instant::now() + limit;
    loop {
        let at = checkpoints(pool).await?;
        let behind: Vec<&String> = names
            .iter()
            .filter(|n| at.get(*n).is_none_or(|p| *p < head))
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the read side did not catch up within {limit:?}: behind: {behind:?} (head {head:?}, at {at:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn every_checkpoint() -> Vec<String> {
    let mut names = ai_secretary::startup::projection_names();
    names.push("relay".into());
    names
}

// ---------------------------------------------------------------------------
// Part 1: freshness
// ---------------------------------------------------------------------------

/// An HTTP caller signed in as the bench user.
#[derive(Clone)]
struct Api {
    base: Arc<str>,
    token: Arc<str>,
    client: reqwest::Client,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        self.client
            .post(self.url(path))
            .bearer_auth(&*self.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))
    }

    /// A new conversation with `assistant`; its id.
    async fn conversation(&self, assistant: &str, n: usize) -> Result<Uuid> {
        let response = self
            .post(
                "/conversations",
                &json!({ "assistant_id": assistant, "title": format!("Bench conversation {n}") }),
            )
            .await?;
        created_id(response, "conversation").await
    }

    fn with_client(&self, client: reqwest::Client) -> Api {
        Api {
            client,
            ..self.clone()
        }
    }
}

async fn created_id(response: reqwest::Response, what: &str) -> Result<Uuid> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status != reqwest::StatusCode::CREATED {
        bail!("creating a {what} answered {status}: {body}");
    }
    body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("the created {what} has no id: {body}"))
}

/// What a user types; a few sizes, numbered.
fn message_content(n: usize) -> String {
    const TEXTS: [&str; 3] = [
        "Please move my 3pm with the design team to Thursday and send everyone the updated agenda.",
        "Draft a short, friendly reply to Anna thanking her for the proposal; say we will decide by Friday.",
        "What is on my calendar tomorrow morning, and is there a free hour before lunch for a call with the bank?",
    ];
    format!("{} (#{n})", TEXTS[n % TEXTS.len()])
}

async fn sign_up(base: &str, run_tag: &str) -> Result<Api> {
    let client = reqwest::Client::new();
    let email = format!("bench-{run_tag}@example.com");
    let password = "correct horse battery staple";
    let response = client
        .post(format!("{base}/api/v1/users"))
        .json(&json!({ "email": email, "password": password, "display_name": "Bench" }))
        .send()
        .await
        .context("registering the bench user")?;
    if response.status() != reqwest::StatusCode::CREATED {
        bail!(
            "registering answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let token: Value = client
        .post(format!("{base}/api/v1/auth/token"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .context("signing in")?
        .json()
        .await
        .context("the token response")?;
    let token = token["access_token"]
        .as_str()
        .ok_or_else(|| anyhow!("no access_token in {token}"))?;
    Ok(Api {
        base: base.into(),
        token: token.into(),
        client,
    })
}

/// `count` fresh conversations with `assistant`, then a read side caught up with them.
async fn fresh_conversations(
    api: &Api,
    pool: &PgPool,
    assistant: &str,
    count: usize,
) -> Result<Vec<Uuid>> {
    let mut conversations = Vec::with_capacity(count);
    for n in 0..count {
        conversations.push(api.conversation(assistant, n).await?);
    }
    wait_caught_up(pool, &every_checkpoint(), Duration::from_secs(60)).await?;
    Ok(conversations)
}

/// One phase's results.
#[derive(Default)]
struct Phase {
    label: String,
    offered: Option<f64>,
    /// 2xx received within the window, per second.
    achieved: f64,
    errors: usize,
    /// Failed commands by what they got back.
    error_kinds: BTreeMap<String, usize>,
    /// Sorted: scheduled (or sent, closed loop) → response.
    command_latencies: Vec<Duration>,
    /// Sorted: 202 received → first listing received.
    freshness: Vec<Duration>,
    unresolved: usize,
    poll_errors: usize,
    polls_per_sec: f64,
    /// Sorted latencies of the polling GETs.
    poll_latencies: Vec<Duration>,
    /// Share of the machine's CPU time busy during the phase (all processes).
    cpu_busy: Option<f64>,
    /// Sorted, signed ms per measured command: 202 → on NATS, NATS → `messages`
    /// committed, committed → listed; and how many commands were traced.
    stages: Option<([Vec<f64>; 3], usize)>,
}

/// Nearest-rank percentile of sorted durations, in ms.
fn pct(sorted: &[Duration], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
    Some(ms(sorted[rank - 1]))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.1}"))
}

async fn freshness(settings: &Settings, names: &Names) -> Result<String> {
    eprintln!("freshness: creating database {}", names.database);
    let pool = postgres::connect(&names.db_url, 4)
        .await
        .with_context(|| format!("creating and migrating {}", names.database))?;
    let server = describe_server(&pool).await?;
    let service = Service::start(&settings.servers(), names, Roles::all()).await?;
    let outcome = freshness_on(settings, names, &pool, &service).await;
    let stopped = service.stop().await;
    pool.close().await;
    let phases = outcome?;
    stopped.context("stopping the service")?;

    let mut out = String::new();
    use std::fmt::Write;
    writeln!(out, "## Freshness (part 1)")?;
    writeln!(out)?;
    writeln!(out, "Server: {server}")?;
    let measured = match settings.probes {
        None => "every command measured, one poller per conversation".to_owned(),
        Some(p) => format!(
            "{p} probe slot(s): a send is measured when a slot is free (one measured command in \
             flight per slot, on {PROBE_CONVERSATIONS} conversations of the slot's own)"
        ),
    };
    writeln!(
        out,
        "Service in-process with Roles::all(); sustained rate: {} closed-loop clients, \
         {:.0} s warm-up + {:.0} s measured; levels: {:.0} s each, open loop over {} clients and \
         {} fresh conversations; {measured}; a pending conversation is polled every {:.1} ms \
         (`GET …/messages?order=desc&limit=10`, no X-Consistency-Token)",
        settings.clients,
        settings.warmup.as_secs_f64(),
        settings.sustain.as_secs_f64(),
        settings.level.as_secs_f64(),
        settings.pacers,
        settings.conversations,
        ms(settings.poll),
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| phase | offered cmd/s | achieved 2xx/s | errors | command p50 ms | command p99 ms | measured | freshness p50 ms | freshness p99 ms | freshness max ms | unresolved | poll GETs/s | poll GET p50 ms | CPU busy |"
    )?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let dash = || "–".to_owned();
    for p in &phases {
        let open = p.offered.is_some();
        writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.label,
            p.offered
                .map_or_else(|| "closed loop".into(), |r| format!("{r:.0}")),
            p.achieved,
            p.errors,
            cell(pct(&p.command_latencies, 0.50)),
            cell(pct(&p.command_latencies, 0.99)),
            if open {
                p.freshness.len().to_string()
            } else {
                dash()
            },
            cell(pct(&p.freshness, 0.50)),
            cell(pct(&p.freshness, 0.99)),
            cell(pct(&p.freshness, 1.0)),
            if open {
                p.unresolved.to_string()
            } else {
                dash()
            },
            if open {
                format!("{:.0}", p.polls_per_sec)
            } else {
                dash()
            },
            cell(pct(&p.poll_latencies, 0.50)),
            p.cpu_busy
                .map_or_else(dash, |b| format!("{:.0} %", b * 100.0)),
        )?;
    }
    let notes = phases
        .iter()
        .any(|p| !p.error_kinds.is_empty() || p.poll_errors > 0);
    if notes {
        writeln!(out)?;
    }
    for p in &phases {
        if !p.error_kinds.is_empty() {
            let kinds: Vec<String> = p
                .error_kinds
                .iter()
                .map(|(k, n)| format!("{n} × {k}"))
                .collect();
            writeln!(out, "- {}: failed commands: {}", p.label, kinds.join(", "))?;
        }
        if p.poll_errors > 0 {
            writeln!(out, "- {}: {} polls failed", p.label, p.poll_errors)?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "Where a measured command's freshness goes (ms; the bench's own NATS subscription to the \
         event subjects and LISTEN on the checkpoint channel; \"published\" is when the bench saw \
         the command's last event on NATS, \"committed\" when the `messages` batch holding it \
         announced its commit; a stage may be negative when the 202 reached the client late):"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| phase | traced | 202 → published p50 | p99 | published → committed p50 | p99 | committed → listed p50 | p99 |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for p in &phases {
        if let Some((stages, traced)) = &p.stages {
            let q = |i: usize, f: f64| {
                let v = &stages[i];
                let rank = ((f * v.len() as f64).ceil() as usize).clamp(1, v.len());
                format!("{:.1}", v[rank - 1])
            };
            writeln!(
                out,
                "| {} | {traced} | {} | {} | {} | {} | {} | {} |",
                p.label,
                q(0, 0.5),
                q(0, 0.99),
                q(1, 0.5),
                q(1, 0.99),
                q(2, 0.5),
                q(2, 0.99),
            )?;
        }
    }
    writeln!(out)?;
    let half = phases.iter().find(|p| p.label == "50 %");
    let p99 = half.and_then(|p| pct(&p.freshness, 0.99));
    writeln!(out, "| target | measured | met |")?;
    writeln!(out, "|---|---:|---|")?;
    writeln!(
        out,
        "| freshness p99 ≤ {FRESHNESS_TARGET_MS:.0} ms at 50 % load | {} ms | {} |",
        cell(p99),
        match (p99, half) {
            (Some(v), Some(h)) if v <= FRESHNESS_TARGET_MS && h.unresolved == 0 => "yes",
            _ => "no",
        }
    )?;
    Ok(out)
}

async fn freshness_on(
    settings: &Settings,
    names: &Names,
    pool: &PgPool,
    service: &Service,
) -> Result<Vec<Phase>> {
    let base = service
        .address
        .clone()
        .ok_or_else(|| anyhow!("the service has no API address"))?;
    let run_tag = names.redis_prefix.replace('_', "-");
    let api = sign_up(&base, &run_tag).await?;
    let assistant = api
        .post(
            "/assistants",
            &json!({
                "name": "Mika",
                "role": "Executive assistant",
                "instructions": "Keep my calendar tidy and answer email politely.",
            }),
        )
        .await?;
    let assistant = created_id(assistant, "assistant").await?.to_string();

    let tracer = Tracer::start(settings, names, pool).await?;
    let mut phases = Vec::new();
    eprintln!(
        "freshness: sustained rate, {} closed-loop clients",
        settings.clients
    );
    let conversations = fresh_conversations(&api, pool, &assistant, settings.conversations).await?;
    let cpu = CpuTimes::now();
    let mut sustained = sustained_rate(settings, &api, &conversations).await?;
    sustained.cpu_busy = cpu.busy_since();
    let rate = sustained.achieved;
    eprintln!("freshness: sustained {rate:.0} commands/s");
    phases.push(sustained);
    if rate < 1.0 {
        bail!("the sustained rate is below one command per second");
    }
    let probes = settings.probes.map_or(0, |p| p * PROBE_CONVERSATIONS);
    for fraction in LEVELS {
        let mut conversations =
            fresh_conversations(&api, pool, &assistant, settings.conversations + probes).await?;
        let probe = conversations.split_off(settings.conversations);
        let offered = rate * fraction;
        eprintln!(
            "freshness: {:.0} % load, {offered:.0} commands/s",
            fraction * 100.0
        );
        let cpu = CpuTimes::now();
        let mut phase = open_loop(
            settings,
            &api,
            &conversations,
            &probe,
            offered,
            &tracer.trace,
        )
        .await?;
        phase.cpu_busy = cpu.busy_since();
        phase.label = format!("{:.0} %", fraction * 100.0);
        phases.push(phase);
    }
    Ok(phases)
}

/// Closed loop: each client posts, waits for the answer, posts again.
async fn sustained_rate(settings: &Settings, api: &Api, conversations: &[Uuid]) -> Result<Phase> {
    let start = Instant::now();
    let counted_from = start + settings.warmup;
    let until = counted_from + settings.sustain;
    let mut clients = JoinSet::new();
    for c in 0..settings.clients {
        let api = api.with_client(reqwest::Client::new());
        let mine: Vec<Uuid> = conversations
            .iter()
            .skip(c)
            .step_by(settings.clients)
            .copied()
            .collect();
        let mine = if mine.is_empty() {
            vec![conversations[c % conversations.len()]]
        } else {
            mine
        };
        clients.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut n = 0;
            loop {
                let sent = Instant::now();
                if sent >= until {
                    break;
                }
                let id = mine[n % mine.len()];
                let response = api
                    .post(
                        &format!("/conversations/{id}/messages"),
                        &json!({ "content": message_content(n) }),
                    )
                    .await;
                n += 1;
                let done = Instant::now();
                let ok = matches!(&response, Ok(r) if r.status().is_success());
                if let Ok(r) = response {
                    let _ = r.bytes().await;
                }
                if done >= counted_from && done < until {
                    if ok {
                        latencies.push(done - sent);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        });
    }
    let mut phase = Phase {
        label: format!("sustained ({} clients)", settings.clients),
        ..Phase::default()
    };
    while let Some(joined) = clients.join_next().await {
        let (latencies, errors) = joined.context("a client task panicked")?;
        phase.command_latencies.extend(latencies);
        phase.errors += errors;
    }
    phase.command_latencies.sort_unstable();
    phase.achieved = phase.command_latencies.len() as f64 / settings.sustain.as_secs_f64();
    Ok(phase)
}

/// A message whose 202 arrived and which is not yet seen in a listing.
struct Pending {
    conversation: Uuid,
    message_id: Uuid,
    acked_at: Instant,
    /// The command's X-Consistency-Token: the position of its last event.
    position: Option<Pos>,
}

/// A measured command: when its 202 came, when a listing first showed it.
struct Seen {
    acked_at: Instant,
    visible_at: Instant,
    position: Option<Pos>,
}

#[derive(Default)]
struct PollOutcome {
    seen: Vec<Seen>,
    unresolved: usize,
    polls: usize,
    errors: usize,
    latencies: Vec<Duration>,
}

/// How long a poller keeps looking for a message after the last send.
const GIVE_UP: Duration = Duration::from_secs(15);

/// Poll the conversations of what is pending, every `interval`, until each
/// message is listed. `free` (a probe slot) is set whenever nothing is pending.
async fn poller(
    api: Api,
    mut inbox: mpsc::UnboundedReceiver<Pending>,
    interval: Duration,
    free: Option<Arc<AtomicBool>>,
) -> PollOutcome {
    let mut out = PollOutcome::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut closed_at: Option<Instant> = None;
    loop {
        if pending.is_empty() {
            if let Some(free) = &free {
                free.store(true, Ordering::Release);
            }
            if closed_at.is_some() {
                break;
            }
            match inbox.recv().await {
                Some(p) => pending.push(p),
                None => break,
            }
        }
        loop {
            match inbox.try_recv() {
                Ok(p) => pending.push(p),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if closed_at.is_some_and(|at| at.elapsed() > GIVE_UP) {
            out.unresolved += pending.len();
            break;
        }
        // Everything pending was acked before this instant: each GET is sent after.
        let started = Instant::now();
        let mut conversations: Vec<Uuid> = pending.iter().map(|p| p.conversation).collect();
        conversations.sort_unstable();
        conversations.dedup();
        for conversation in conversations {
            let sent = Instant::now();
            let listed = list_messages(&api, conversation).await;
            let done = Instant::now();
            out.polls += 1;
            match listed {
                Ok(ids) => {
                    out.latencies.push(done - sent);
                    pending.retain(|p| {
                        let seen = p.conversation == conversation && ids.contains(&p.message_id);
                        if seen {
                            out.seen.push(Seen {
                                acked_at: p.acked_at,
                                visible_at: done,
                                position: p.position,
                            });
                        }
                        !seen
                    });
                }
                Err(_) => out.errors += 1,
            }
        }
        sleep_until((started + interval).into()).await;
    }
    out
}

/// The ids on the newest page of a conversation's messages (no consistency token).
async fn list_messages(api: &Api, conversation: Uuid) -> Result<HashSet<Uuid>> {
    let response = api
        .client
        .get(api.url(&format!(
            "/conversations/{conversation}/messages?order=desc&limit=10"
        )))
        .bearer_auth(&*api.token)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("GET messages answered {}", response.status());
    }
    let body: Value = response.json().await?;
    Ok(body["data"]
        .as_array()
        .map(|data| {
            data.iter()
                .filter_map(|m| m["id"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default())
}

/// A probe slot: at most one measured command in flight, on conversations of its
/// own (only probes post there, so the message is always on the newest page).
struct Slot {
    free: Arc<AtomicBool>,
    conversations: Vec<Uuid>,
    next: AtomicUsize,
    inbox: mpsc::UnboundedSender<Pending>,
}

/// Who watches which send.
enum Watch {
    /// Every send: one poller per regular conversation.
    All(Vec<mpsc::UnboundedSender<Pending>>),
    /// A send is measured when a probe slot is free.
    Probes(Vec<Slot>),
}

/// Where one send goes and who is told of its 202.
struct Target {
    conversation: Uuid,
    inbox: Option<mpsc::UnboundedSender<Pending>>,
    slot: Option<Arc<AtomicBool>>,
}

impl Watch {
    fn target(&self, n: usize, regular: &[Uuid]) -> Target {
        let conversation = regular[n % regular.len()];
        match self {
            Watch::All(inboxes) => Target {
                conversation,
                inbox: Some(inboxes[n % inboxes.len()].clone()),
                slot: None,
            },
            Watch::Probes(slots) => {
                let free = slots.iter().find(|s| {
                    s.free
                        .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                });
                match free {
                    Some(slot) => Target {
                        conversation: slot.conversations
                            [slot.next.fetch_add(1, Ordering::Relaxed) % slot.conversations.len()],
                        inbox: Some(slot.inbox.clone()),
                        slot: Some(slot.free.clone()),
                    },
                    None => Target {
                        conversation,
                        inbox: None,
                        slot: None,
                    },
                }
            }
        }
    }
}

struct Sent {
    acked_at: Option<Instant>,
    latency: Duration,
    error: Option<String>,
}

/// Conversations each probe slot rotates over (so no stream grows long).
const PROBE_CONVERSATIONS: usize = 8;

/// Open loop at `rate` commands/s for one level, over `regular` conversations and,
/// when sampling, `probe` conversations (`PROBE_CONVERSATIONS` per slot).
async fn open_loop(
    settings: &Settings,
    api: &Api,
    regular: &[Uuid],
    probe: &[Uuid],
    rate: f64,
    trace: &Mutex<Trace>,
) -> Result<Phase> {
    trace.lock().map_err(|_| anyhow!("trace lock"))?.clear();
    let poll_api = api.with_client(reqwest::Client::new());
    let mut pollers = JoinSet::new();
    let watch = match settings.probes {
        None => Watch::All(
            regular
                .iter()
                .map(|_| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    pollers.spawn(poller(poll_api.clone(), rx, settings.poll, None));
                    tx
                })
                .collect(),
        ),
        Some(_) => Watch::Probes(
            probe
                .chunks(PROBE_CONVERSATIONS)
                .map(|conversations| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let free = Arc::new(AtomicBool::new(true));
                    pollers.spawn(poller(
                        poll_api.clone(),
                        rx,
                        settings.poll,
                        Some(free.clone()),
                    ));
                    Slot {
                        free,
                        conversations: conversations.to_vec(),
                        next: AtomicUsize::new(0),
                        inbox: tx,
                    }
                })
                .collect(),
        ),
    };
    let watch = Arc::new(watch);
    let regular: Arc<[Uuid]> = regular.into();
    let gap = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let until = start + settings.level;
    let mut pacers = JoinSet::new();
    for p in 0..settings.pacers {
        let api = api.with_client(reqwest::Client::new());
        let (watch, regular) = (watch.clone(), regular.clone());
        let pacers_n = settings.pacers;
        pacers.spawn(async move {
            let mut sends = JoinSet::new();
            for n in (p..).step_by(pacers_n) {
                let at = start + gap.mul_f64(n as f64);
                if at >= until {
                    break;
                }
                sleep_until(at.into()).await;
                let target = watch.target(n, &regular);
                let api = api.clone();
                sends.spawn(async move { send(api, target, n, at).await });
            }
            let mut sent = Vec::new();
            while let Some(s) = sends.join_next().await {
                if let Ok(s) = s {
                    sent.push(s);
                }
            }
            sent
        });
    }
    let mut phase = Phase {
        offered: Some(rate),
        ..Phase::default()
    };
    let mut acked_in_window = 0;
    while let Some(joined) = pacers.join_next().await {
        for s in joined.context("a pacer task panicked")? {
            match s.acked_at {
                Some(at) => {
                    if at < until {
                        acked_in_window += 1;
                    }
                    phase.command_latencies.push(s.latency);
                }
                None => {
                    phase.errors += 1;
                    *phase
                        .error_kinds
                        .entry(s.error.unwrap_or_default())
                        .or_default() += 1;
                }
            }
        }
    }
    // Every send is answered: close the pollers' inboxes so they finish.
    drop(watch);
    let mut polls = 0;
    let mut seen = Vec::new();
    while let Some(joined) = pollers.join_next().await {
        let o = joined.context("a poller task panicked")?;
        phase
            .freshness
            .extend(o.seen.iter().map(|s| s.visible_at - s.acked_at));
        seen.extend(o.seen);
        phase.unresolved += o.unresolved;
        phase.poll_errors += o.errors;
        phase.poll_latencies.extend(o.latencies);
        polls += o.polls;
    }
    let elapsed = start.elapsed();
    phase.command_latencies.sort_unstable();
    phase.freshness.sort_unstable();
    phase.poll_latencies.sort_unstable();
    phase.achieved = acked_in_window as f64 / settings.level.as_secs_f64();
    phase.polls_per_sec = polls as f64 / elapsed.as_secs_f64();
    phase.stages = trace
        .lock()
        .map_err(|_| anyhow!("trace lock"))?
        .stages(&seen);
    Ok(phase)
}

/// Post one message as scheduled at `at`; tell the target's poller of its 202.
async fn send(api: Api, target: Target, n: usize, at: Instant) -> Sent {
    let conversation = target.conversation;
    let response = api
        .post(
            &format!("/conversations/{conversation}/messages"),
            &json!({ "content": message_content(n) }),
        )
        .await;
    let acked_at = Instant::now();
    let mut position = None;
    let outcome = match response {
        Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
            position = r
                .headers()
                .get("x-consistency-token")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_position);
            r.json::<Value>()
                .await
                .ok()
                .and_then(|b| b["message"]["id"].as_str()?.parse::<Uuid>().ok())
                .ok_or_else(|| "202 without a message id".to_owned())
        }
        Ok(r) => Err(r.status().to_string()),
        Err(e) => Err(format!("{:#}", e.root_cause())),
    };
    match outcome {
        Ok(message_id) => {
            if let Some(inbox) = &target.inbox {
                let _ = inbox.send(Pending {
                    conversation,
                    message_id,
                    acked_at,
                    position,
                });
            }
            Sent {
                acked_at: Some(acked_at),
                latency: acked_at - at,
                error: None,
            }
        }
        Err(error) => {
            if let Some(free) = &target.slot {
                free.store(true, Ordering::Release);
            }
            Sent {
                acked_at: None,
                latency: acked_at - at,
                error: Some(error),
            }
        }
    }
}

/// The machine's CPU time counters (`/proc/stat`, Linux), to tell how busy a phase was.
struct CpuTimes(Option<(u64, u64)>);

impl CpuTimes {
    fn now() -> CpuTimes {
        let read = || -> Option<(u64, u64)> {
            let stat = std::fs::read_to_string("/proc/stat").ok()?;
            let fields: Vec<u64> = stat
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            let total: u64 = fields.iter().take(8).sum();
            let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
            Some((total, idle))
        };
        CpuTimes(read())
    }

    /// Busy share since `self` was taken.
    fn busy_since(&self) -> Option<f64> {
        let (total0, idle0) = self.0?;
        let (total1, idle1) = CpuTimes::now().0?;
        let total = total1.checked_sub(total0)?;
        (total > 0).then(|| 1.0 - (idle1 - idle0) as f64 / total as f64)
    }
}

/// `<tx>.<gp>` (an X-Consistency-Token or a checkpoint notification's position).
fn parse_position(s: &str) -> Option<Pos> {
    let (tx, gp) = s.split_once('.')?;
    Some((tx.parse().ok()?, gp.parse().ok()?))
}

/// When each event showed up on NATS, and when the `messages` projection
/// committed each batch: the stages of a command's way to the query API.
#[derive(Default)]
struct Trace {
    published: HashMap<Pos, Instant>,
    /// `messages` checkpoint commits in arrival order.
    projected: Vec<(Instant, Pos)>,
}

impl Trace {
    fn clear(&mut self) {
        self.published.clear();
        self.projected.clear();
    }

    /// Per measured command: 202 → published, published → projected, projected
    /// → listed (signed ms, each sorted); none if nothing could be traced.
    fn stages(&self, seen: &[Seen]) -> Option<([Vec<f64>; 3], usize)> {
        let signed = |from: Instant, to: Instant| {
            if to >= from {
                ms(to - from)
            } else {
                -ms(from - to)
            }
        };
        let mut stages: [Vec<f64>; 3] = Default::default();
        for s in seen {
            let Some(position) = s.position else { continue };
            let Some(&published) = self.published.get(&position) else {
                continue;
            };
            let Some(&(projected, _)) = self.projected.iter().find(|(_, p)| *p >= position) else {
                continue;
            };
            stages[0].push(signed(s.acked_at, published));
            stages[1].push(signed(published, projected));
            stages[2].push(signed(projected, s.visible_at));
        }
        let traced = stages[0].len();
        for stage in &mut stages {
            stage.sort_by(f64::total_cmp);
        }
        (traced > 0).then_some((stages, traced))
    }
}

/// Background listeners filling a [`Trace`]: a core NATS subscription to the
/// event subjects and a LISTEN on the checkpoint channel.
struct Tracer {
    trace: Arc<Mutex<Trace>>,
    _tasks: Vec<AbortOnDrop>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Tracer {
    async fn start(settings: &Settings, names: &Names, pool: &PgPool) -> Result<Tracer> {
        #[derive(serde::Deserialize)]
        struct Envelope {
            transaction_id: i64,
            global_position: i64,
        }
        let trace = Arc::new(Mutex::new(Trace::default()));
        let nats = async_nats::connect(&settings.nats_url)
            .await
            .context("connecting to NATS to trace")?;
        let mut events = nats
            .subscribe(format!("{}.>", names.subject_prefix))
            .await
            .context("subscribing to the event subjects")?;
        let published = trace.clone();
        let on_nats = tokio::spawn(async move {
            let _client = nats;
            while let Some(message) = events.next().await {
                let at = Instant::now();
                if let Ok(e) = serde_json::from_slice::<Envelope>(&message.payload)
                    && let Ok(mut t) = published.lock()
                {
                    t.published
                        .insert((e.transaction_id, e.global_position), at);
                }
            }
        });
        let mut listener = PgListener::connect_with(pool)
            .await
            .context("listening for checkpoints")?;
        listener.listen(CHECKPOINT_CHANNEL).await?;
        let projected = trace.clone();
        let on_commit = tokio::spawn(async move {
            while let Ok(note) = listener.recv().await {
                let at = Instant::now();
                if let Some(("messages", position)) = note.payload().split_once(' ')
                    && let Some(position) = parse_position(position)
                    && let Ok(mut t) = projected.lock()
                {
                    t.projected.push((at, position));
                }
            }
        });
        Ok(Tracer {
            trace,
            _tasks: vec![AbortOnDrop(on_nats), AbortOnDrop(on_commit)],
        })
    }
}

// ---------------------------------------------------------------------------
// Part 2: projection throughput
// ---------------------------------------------------------------------------

/// Tables the projections own, emptied before each projection run.
const READ_MODEL_TABLES: &str = "assistants, assistants_conversations, conversations, messages, \
     messages_conversations, usage_daily, usage_conversations, cache_conversations, dead_letters";

struct Backlog {
    events: usize,
    by_type: BTreeMap<String, i64>,
    conversations: usize,
    build: Duration,
    relay: Duration,
    data_bytes: f64,
}

async fn throughput(settings: &Settings, names: &Names) -> Result<String> {
    eprintln!("throughput: creating database {}", names.database);
    let pool = postgres::connect(&names.db_url, 4)
        .await
        .with_context(|| format!("creating and migrating {}", names.database))?;
    let outcome = throughput_on(settings, names, &pool).await;
    pool.close().await;
    outcome
}

/// A projection's batch commits in one run.
struct Batches {
    name: String,
    /// Events per batch.
    sizes: Vec<usize>,
    /// Sorted time between consecutive commits.
    intervals: Vec<Duration>,
    /// From the start of the run to the first commit.
    first: Option<Duration>,
}

/// One timed run.
struct Run {
    elapsed: Duration,
    /// For projection runs: each projection's time to the head.
    per_projection: Vec<(String, Duration)>,
    /// For projection runs: each one's batch commits.
    batches: Vec<Batches>,
}

async fn throughput_on(settings: &Settings, names: &Names, pool: &PgPool) -> Result<String> {
    let backlog = build_backlog(settings, names, pool).await?;
    let order = positions(pool).await?;
    let rows = baseline_rows(pool).await?;
    let raw_rows = rows.len();
    let conversation_rows = rows
        .iter()
        .filter(|r| matches!(r, RawRow::Conversation(..)))
        .count();
    for sql in [
        "CREATE TABLE bench_messages (LIKE messages INCLUDING ALL)",
        "CREATE TABLE bench_messages_conversations (LIKE messages_conversations INCLUDING ALL)",
    ] {
        sqlx::query(sql)
            .execute(pool)
            .await
            .context("creating the scratch tables")?;
    }

    let all_names = ai_secretary::startup::projection_names();
    let (mut raws, mut singles, mut alls, mut caches) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..settings.rounds {
        eprintln!("throughput: round {} of {}", round + 1, settings.rounds);
        checkpoint(pool).await;
        raws.push(raw_upserts(&names.db_url, &rows).await?);
        reset(settings, names, pool).await?;
        checkpoint(pool).await;
        singles.push(projection_run(settings, names, pool, &order, vec!["messages".into()]).await?);
        reset(settings, names, pool).await?;
        checkpoint(pool).await;
        alls.push(projection_run(settings, names, pool, &order, all_names.clone()).await?);
        reset(settings, names, pool).await?;
        checkpoint(pool).await;
        caches.push(projection_run(settings, names, pool, &order, vec!["cache".into()]).await?);
    }
    let events = backlog.events as f64;
    let rate = |d: Duration| events / d.as_secs_f64();
    let by_round = |runs: &[Run]| -> String {
        runs.iter()
            .map(|r| format!("{:.0}", rate(r.elapsed)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ratios: Vec<String> = raws
        .iter()
        .zip(&singles)
        .map(|(r, s)| format!("{:.2}", r.elapsed.as_secs_f64() / s.elapsed.as_secs_f64()))
        .collect();
    let rounds_text = format!(
        "- events/s by round: raw {}; messages {}; all {}; cache {}\n- messages ÷ raw by round: {}\n",
        by_round(&raws),
        by_round(&singles),
        by_round(&alls),
        by_round(&caches),
        ratios.join(", "),
    );
    let raw = median(raws);
    let single = median(singles);
    let all = median(alls);
    let cache = median(caches);

    let mut out = String::new();
    use std::fmt::Write;
    writeln!(out, "## Projection throughput (part 2)")?;
    writeln!(out)?;
    let types: Vec<String> = backlog
        .by_type
        .iter()
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
    writeln!(
        out,
        "Backlog: {} events ({}), {} conversations of {} posts, mean data {:.0} B; \
         appended in {:.1} s through PgEventStore ({} writers); \
         relayed to JetStream by a relay-only instance in {:.1} s ({:.0} events/s)",
        backlog.events,
        types.join(", "),
        backlog.conversations,
        POSTS_PER_CONVERSATION,
        backlog.data_bytes,
        backlog.build.as_secs_f64(),
        BACKLOG_WRITERS,
        backlog.relay.as_secs_f64(),
        rate(backlog.relay),
    )?;
    writeln!(
        out,
        "{} rounds, raw / messages / all / cache in turn, CHECKPOINT before each; each path's median round is shown",
        settings.rounds
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| path | what is timed | s | rows/s | events/s | ÷ raw |"
    )?;
    writeln!(out, "|---|---|---:|---:|---:|---:|")?;
    writeln!(
        out,
        "| raw upsert | {raw_rows} rows ({} `messages` + {} `messages_conversations`), one `INSERT … ON CONFLICT DO UPDATE` each, {RAW_ROWS_PER_TX} per transaction, one connection | {:.2} | {:.0} | {:.0} | 1.00× |",
        raw_rows - conversation_rows,
        conversation_rows,
        raw.elapsed.as_secs_f64(),
        raw_rows as f64 / raw.elapsed.as_secs_f64(),
        rate(raw.elapsed),
    )?;
    writeln!(
        out,
        "| projection `messages` | start → checkpoint at the head | {:.2} | {:.0} | {:.0} | **{:.2}×** |",
        single.elapsed.as_secs_f64(),
        raw_rows as f64 / single.elapsed.as_secs_f64(),
        rate(single.elapsed),
        raw.elapsed.as_secs_f64() / single.elapsed.as_secs_f64(),
    )?;
    writeln!(
        out,
        "| all {} projections | start → the last checkpoint at the head | {:.2} | – | {:.0} per projection | – |",
        all_names.len(),
        all.elapsed.as_secs_f64(),
        rate(all.elapsed),
    )?;
    writeln!(
        out,
        "| projection `cache` | start → checkpoint at the head | {:.2} | – | {:.0} | {:.2}× |",
        cache.elapsed.as_secs_f64(),
        rate(cache.elapsed),
        raw.elapsed.as_secs_f64() / cache.elapsed.as_secs_f64(),
    )?;
    writeln!(out)?;
    out.push_str(&rounds_text);
    writeln!(out)?;
    writeln!(
        out,
        "| run | projection | first commit after s | at head after s | events/s | batches | events/batch | batch interval p50 ms | p99 ms |"
    )?;
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (label, run) in [
        ("messages only", &single),
        ("all", &all),
        ("cache only", &cache),
    ] {
        for (name, at) in &run.per_projection {
            let none = Batches {
                name: name.clone(),
                sizes: Vec::new(),
                intervals: Vec::new(),
                first: None,
            };
            let b = run
                .batches
                .iter()
                .find(|b| &b.name == name)
                .unwrap_or(&none);
            let mean = if b.sizes.is_empty() {
                0.0
            } else {
                b.sizes.iter().sum::<usize>() as f64 / b.sizes.len() as f64
            };
            writeln!(
                out,
                "| {label} | {name} | {} | {:.2} | {:.0} | {} | {mean:.0} | {} | {} |",
                b.first
                    .map_or_else(|| "–".into(), |f| format!("{:.2}", f.as_secs_f64())),
                at.as_secs_f64(),
                rate(*at),
                b.sizes.len(),
                cell(pct(&b.intervals, 0.50)),
                cell(pct(&b.intervals, 0.99)),
            )?;
        }
    }
    writeln!(out)?;
    let ratio = raw.elapsed.as_secs_f64() / single.elapsed.as_secs_f64();
    writeln!(out, "| target | measured | met |")?;
    writeln!(out, "|---|---:|---|")?;
    writeln!(
        out,
        "| `messages` projection ≥ {THROUGHPUT_TARGET:.1}× the raw upsert rate | {ratio:.2}× | {} |",
        if ratio >= THROUGHPUT_TARGET {
            "yes"
        } else {
            "no"
        }
    )?;
    Ok(out)
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by_key(|r| r.elapsed);
    runs.swap_remove(runs.len() / 2)
}

/// A clean start for each measurement; needs superuser or pg_checkpoint (optional).
async fn checkpoint(pool: &PgPool) {
    if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
        eprintln!("  (CHECKPOINT skipped: {e})");
    }
}

/// Every projection back to nothing: empty read models, no checkpoints, no cache.
async fn reset(settings: &Settings, names: &Names, pool: &PgPool) -> Result<()> {
    sqlx::query(AssertSqlSafe(format!("TRUNCATE {READ_MODEL_TABLES}")))
        .execute(pool)
        .await
        .context("emptying the read models")?;
    sqlx::query("DELETE FROM checkpoints WHERE name <> 'relay'")
        .execute(pool)
        .await
        .context("deleting the projections' checkpoints")?;
    delete_redis_keys(&settings.redis_url, &names.redis_prefix).await?;
    Ok(())
}

/// Every event's position in commit order (to size batches from checkpoints).
async fn positions(pool: &PgPool) -> Result<Vec<Pos>> {
    sqlx::query_as(
        "SELECT transaction_id::text::int8, global_position FROM events
         ORDER BY transaction_id, global_position",
    )
    .fetch_all(pool)
    .await
    .context("reading event positions")
}

/// Append the backlog, then relay it to JetStream with a relay-only instance.
async fn build_backlog(settings: &Settings, names: &Names, pool: &PgPool) -> Result<Backlog> {
    // The store gets a pool of its own: closing it closes that pool.
    let store_pool = postgres::connect(&names.db_url, 20)
        .await
        .context("the backlog writers' pool")?;
    let store = PgEventStore::new(store_pool, CoalescingConfig::default());
    let fixed = BACKLOG_USERS * (1 + ASSISTANTS_PER_USER);
    let per_conversation = 1 + 4 * POSTS_PER_CONVERSATION;
    let conversations = settings
        .events
        .saturating_sub(fixed)
        .div_ceil(per_conversation);
    eprintln!(
        "throughput: appending ~{} events ({conversations} conversations)",
        fixed + conversations * per_conversation
    );
    let started = Instant::now();

    let mut assistants = Vec::new();
    for u in 0..BACKLOG_USERS {
        let user = Uuid::now_v7();
        let at = Utc::now();
        append(
            &store,
            user,
            "user",
            0,
            &[UserEvent::UserRegistered {
                user_id: user,
                email: format!("user{u}@example.com"),
                display_name: format!("User {u}"),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$4xQ3b5Uq0kJ0n8h0d0Zr1Zb0ZKfJ0x0y0z0a0b0c0d0".into(),
                registered_at: at,
            }],
            user,
        )
        .await?;
        for a in 0..ASSISTANTS_PER_USER {
            let assistant = Uuid::now_v7();
            let metadata = BTreeMap::from([("team".to_owned(), format!("team-{a}"))]);
            append(
                &store,
                assistant,
                "assistant",
                0,
                &[AssistantEvent::AssistantCreated {
                    assistant_id: assistant,
                    owner_id: user,
                    name: format!("Assistant {a}"),
                    role: "Executive assistant".into(),
                    instructions:
                        "Keep my calendar tidy, draft replies to email, and remind me of deadlines."
                            .into(),
                    model: "gemini-2.0-flash".into(),
                    temperature: 0.7,
                    metadata,
                    created_at: Utc::now(),
                }],
                user,
            )
            .await?;
            assistants.push((user, assistant));
        }
    }

    let mut writers = JoinSet::new();
    for w in 0..BACKLOG_WRITERS {
        let store = store.clone();
        let mine: Vec<(Uuid, Uuid, Uuid)> = (0..conversations)
            .filter(|c| c % BACKLOG_WRITERS == w)
            .map(|c| {
                let (owner, assistant) = assistants[c % assistants.len()];
                (Uuid::now_v7(), owner, assistant)
            })
            .collect();
        writers.spawn(async move { conversation_writer(store, mine).await });
    }
    while let Some(joined) = writers.join_next().await {
        joined.context("a backlog writer panicked")??;
    }
    let build = started.elapsed();
    store.close().await;

    let by_type: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT event_type, count(*), avg(length(data::text))::float8 FROM events GROUP BY event_type",
    )
    .fetch_all(pool)
    .await
    .context("counting the backlog")?;
    let events: i64 = by_type.iter().map(|(_, n, _)| n).sum();
    let data_bytes =
        by_type.iter().map(|(_, n, b)| *n as f64 * b).sum::<f64>() / events.max(1) as f64;

    eprintln!("throughput: relaying {events} events to JetStream");
    let head = head(pool).await?;
    let started = Instant::now();
    let relay = Service::start(&settings.servers(), names, Roles::only_relay()).await?;
    let waited = wait_for(pool, &["relay".to_owned()], head, Duration::from_secs(600)).await;
    let relay_time = started.elapsed();
    relay.stop().await.context("stopping the relay")?;
    waited?;
    Ok(Backlog {
        events: events as usize,
        by_type: by_type.into_iter().map(|(t, n, _)| (t, n)).collect(),
        conversations,
        build,
        relay: relay_time,
        data_bytes,
    })
}

async fn append<E: Serialize>(
    store: &PgEventStore,
    stream_id: Uuid,
    stream_type: &'static str,
    expected_version: i64,
    events: &[E],
    user: Uuid,
) -> Result<i64> {
    let metadata = EventMetadata {
        correlation_id: Uuid::new_v4().to_string(),
        causation_id: None,
        user_id: Some(user),
        idempotency_key: None,
    };
    let events: Vec<NewEvent> = events
        .iter()
        .map(|e| codec::encode(e, &metadata))
        .collect::<Result<_, _>>()?;
    let appended = store
        .append(AppendRequest {
            stream_id,
            stream_type,
            expected_version,
            events,
            reservation: None,
            idempotency: None,
            user_key: None,
        })
        .await
        .with_context(|| format!("appending to {stream_type} {stream_id}"))?;
    Ok(appended.version)
}

/// A writer's conversations, interleaved: all started, then one post (and its
/// reply) in each per round, as concurrent users would produce them.
async fn conversation_writer(store: PgEventStore, mine: Vec<(Uuid, Uuid, Uuid)>) -> Result<()> {
    let mut versions = vec![0_i64; mine.len()];
    for (i, &(id, owner, assistant)) in mine.iter().enumerate() {
        versions[i] = append(
            &store,
            id,
            "conversation",
            0,
            &[ConversationEvent::ConversationStarted {
                conversation_id: id,
                owner_id: owner,
                assistant_id: assistant,
                title: format!("Planning week {}", i % 52 + 1),
                started_at: Utc::now(),
            }],
            owner,
        )
        .await?;
    }
    for post in 0..POSTS_PER_CONVERSATION {
        for (i, &(id, owner, assistant)) in mine.iter().enumerate() {
            let (message_id, reply_id, at) = (Uuid::now_v7(), Uuid::now_v7(), Utc::now());
            versions[i] = append(
                &store,
                id,
                "conversation",
                versions[i],
                &[
                    ConversationEvent::MessagePosted {
                        message_id,
                        content: message_content(post + i),
                        posted_at: at,
                    },
                    ConversationEvent::ReplyRequested {
                        reply_id,
                        reply_to: message_id,
                        assistant_id: assistant,
                        requested_at: at,
                    },
                ],
                owner,
            )
            .await?;
            // The reply's own stream, as the replier writes it: taken up, completed.
            let completion = 120 + (post * 7 + i) as u64 % 200;
            append(
                &store,
                reply_id,
                "reply",
                0,
                &[
                    ReplyEvent::ReplyStarted {
                        reply_id,
                        conversation_id: id,
                        attempt: 1,
                        started_at: at,
                    },
                    ReplyEvent::ReplyCompleted {
                        reply_id,
                        conversation_id: id,
                        content: reply_content(post + i),
                        model: "gemini-2.0-flash".into(),
                        finish_reason: "stop".into(),
                        usage: Usage {
                            prompt_tokens: 350,
                            completion_tokens: completion,
                            total_tokens: 350 + completion,
                            ..Usage::default()
                        },
                        latency_ms: 850,
                        completed_at: Utc::now(),
                    },
                ],
                owner,
            )
            .await?;
        }
    }
    Ok(())
}

fn reply_content(n: usize) -> String {
    format!(
        "Done. I moved the design review to Thursday at 15:00 and sent the updated agenda to \
         all six attendees; two have already accepted. Tomorrow morning you have the standup at \
         9:30 and a free slot from 10:00 to 11:00, which I held for the call with the bank. I \
         also drafted the reply to Anna thanking her for the proposal and promising a decision \
         by Friday; it is in your drafts for review. (#{n})"
    )
}

/// Wait until each named checkpoint reaches `head`; each one's time to get there.
async fn wait_for(
    pool: &PgPool,
    names: &[String],
    head: Pos,
    limit: Duration,
) -> Result<Vec<(String, Duration)>> {
    let started = Instant::now();
    let mut reached: Vec<(String, Duration)> = Vec::new();
    loop {
        let at = checkpoints(pool).await?;
        for name in names {
            if !reached.iter().any(|(n, _)| n == name) && at.get(name).is_some_and(|p| *p >= head) {
                reached.push((name.clone(), started.elapsed()));
            }
        }
        if reached.len() == names.len() {
            return Ok(reached);
        }
        if started.elapsed() > limit {
            bail!("checkpoints {names:?} did not reach {head:?} within {limit:?}: {at:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Start an instance with only `projections`, time it from just before it is
/// built until every one of their checkpoints is at the head, and gather their
/// batch commits from the checkpoint notifications.
async fn projection_run(
    settings: &Settings,
    names: &Names,
    pool: &PgPool,
    order: &[Pos],
    projections: Vec<String>,
) -> Result<Run> {
    eprintln!("  projections: {}", projections.join(", "));
    let head = *order.last().ok_or_else(|| anyhow!("empty backlog"))?;
    let mut listener = PgListener::connect_with(pool)
        .await
        .context("listening for checkpoints")?;
    listener.listen(CHECKPOINT_CHANNEL).await?;
    let started = Instant::now();
    let service = Service::start(
        &settings.servers(),
        names,
        Roles::only_projections(projections.clone())?,
    )
    .await?;
    // Notifications say when each batch committed and how far it got.
    let mut commits: HashMap<String, Vec<(Instant, Pos)>> = HashMap::new();
    let mut reached: Vec<(String, Duration)> = Vec::new();
    let limit = Duration::from_secs(900);
    let outcome: Result<()> = async {
        while reached.len() < projections.len() {
            if started.elapsed() > limit {
                bail!("projections {projections:?} did not reach the head within {limit:?}");
            }
            let note = tokio::time::timeout(Duration::from_millis(250), listener.try_recv()).await;
            match note {
                Ok(Ok(Some(n))) => {
                    let now = Instant::now();
                    let Some((name, at)) = n.payload().split_once(' ') else {
                        continue;
                    };
                    let Some((tx, gp)) = at.split_once('.') else {
                        continue;
                    };
                    let pos: Pos = (tx.parse()?, gp.parse()?);
                    commits.entry(name.to_owned()).or_default().push((now, pos));
                    if pos >= head && !reached.iter().any(|(n, _)| n == name) {
                        reached.push((name.to_owned(), started.elapsed()));
                    }
                }
                Ok(Ok(None)) => {} // reconnected; the table check below covers gaps
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    let at = checkpoints(pool).await?;
                    for name in &projections {
                        if !reached.iter().any(|(n, _)| n == name)
                            && at.get(name).is_some_and(|p| *p >= head)
                        {
                            reached.push((name.clone(), started.elapsed()));
                        }
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    let elapsed = started.elapsed();
    service.stop().await.context("stopping the projections")?;
    outcome?;
    let count = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM checkpoints WHERE name = ANY($1) AND events <> $2",
    )
    .bind(&projections)
    .bind(order.len() as i64)
    .fetch_one(pool)
    .await?;
    if count > 0 {
        eprintln!(
            "  note: {count} projection(s) counted another number of events than the backlog"
        );
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(pool)
        .await?;
    if dead > 0 {
        bail!("{dead} events went to dead_letters");
    }
    let mut batches = Vec::new();
    for (name, notes) in commits {
        let mut sizes = Vec::new();
        let mut intervals = Vec::new();
        let first = notes.first().map(|(at, _)| *at - started);
        let (mut prev_index, mut prev_at) = (0_usize, None::<Instant>);
        for (at, pos) in notes {
            let index = order.partition_point(|p| *p <= pos);
            sizes.push(index.saturating_sub(prev_index));
            if let Some(prev) = prev_at {
                intervals.push(at - prev);
            }
            (prev_index, prev_at) = (index, Some(at));
        }
        intervals.sort_unstable();
        batches.push(Batches {
            name,
            sizes,
            intervals,
            first,
        });
    }
    reached.sort_by_key(|(_, d)| *d);
    Ok(Run {
        elapsed,
        per_projection: reached,
        batches,
    })
}

/// A row the `messages` projection writes: one per event that touches its tables.
enum RawRow {
    /// `messages_conversations` (conversation, owner).
    Conversation(Uuid, Uuid),
    Message(Box<MessageRow>),
}

struct MessageRow {
    id: Uuid,
    conversation_id: Uuid,
    owner_id: Uuid,
    seq: i64,
    role: &'static str,
    content: Option<String>,
    status: &'static str,
    reply_to: Option<Uuid>,
    model: Option<String>,
    finish_reason: Option<String>,
    tokens: [Option<i64>; 3],
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// The rows the `messages` projection writes for the backlog, in commit order.
async fn baseline_rows(pool: &PgPool) -> Result<Vec<RawRow>> {
    let events: Vec<(Uuid, i64, String, Value)> = sqlx::query_as(
        "SELECT stream_id, version, event_type, data FROM events
         WHERE stream_type = 'conversation' ORDER BY transaction_id, global_position",
    )
    .fetch_all(pool)
    .await
    .context("reading the backlog")?;
    let uuid = |v: &Value| -> Result<Uuid> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("not a uuid: {v}"))
    };
    let time = |v: &Value| -> Result<DateTime<Utc>> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("not a timestamp: {v}"))
    };
    let mut owners = HashMap::new();
    let mut replies: HashMap<Uuid, (i64, Uuid, DateTime<Utc>)> = HashMap::new();
    let mut rows = Vec::with_capacity(events.len());
    for (stream, version, event_type, data) in events {
        // A reply's events are in its own stream and name their conversation.
        let stream = match data.get("conversation_id") {
            Some(conversation) if event_type.starts_with("Reply") => uuid(conversation)?,
            _ => stream,
        };
        let owner = |owners: &HashMap<Uuid, Uuid>| {
            owners
                .get(&stream)
                .copied()
                .ok_or_else(|| anyhow!("conversation {stream} was not started"))
        };
        let row = match event_type.as_str() {
            "ConversationStarted" => {
                let owner = uuid(&data["owner_id"])?;
                owners.insert(stream, owner);
                RawRow::Conversation(stream, owner)
            }
            "MessagePosted" => {
                let at = time(&data["posted_at"])?;
                RawRow::Message(Box::new(MessageRow {
                    id: uuid(&data["message_id"])?,
                    conversation_id: stream,
                    owner_id: owner(&owners)?,
                    seq: version,
                    role: "user",
                    content: data["content"].as_str().map(str::to_owned),
                    status: "completed",
                    reply_to: None,
                    model: None,
                    finish_reason: None,
                    tokens: [None; 3],
                    created_at: at,
                    updated_at: at,
                }))
            }
            "ReplyRequested" => {
                let (id, reply_to, at) = (
                    uuid(&data["reply_id"])?,
                    uuid(&data["reply_to"])?,
                    time(&data["requested_at"])?,
                );
                replies.insert(id, (version, reply_to, at));
                RawRow::Message(Box::new(MessageRow {
                    id,
                    conversation_id: stream,
                    owner_id: owner(&owners)?,
                    seq: version,
                    role: "assistant",
                    content: None,
                    status: "queued",
                    reply_to: Some(reply_to),
                    model: None,
                    finish_reason: None,
                    tokens: [None; 3],
                    created_at: at,
                    updated_at: at,
                }))
            }
            "ReplyCompleted" => {
                let id = uuid(&data["reply_id"])?;
                let (seq, reply_to, requested_at) = *replies
                    .get(&id)
                    .ok_or_else(|| anyhow!("reply {id} was not requested"))?;
                let usage = &data["usage"];
                RawRow::Message(Box::new(MessageRow {
                    id,
                    conversation_id: stream,
                    owner_id: owner(&owners)?,
                    seq,
                    role: "assistant",
                    content: data["content"].as_str().map(str::to_owned),
                    status: "completed",
                    reply_to: Some(reply_to),
                    model: data["model"].as_str().map(str::to_owned),
                    finish_reason: data["finish_reason"].as_str().map(str::to_owned),
                    tokens: [
                        usage["prompt_tokens"].as_i64(),
                        usage["completion_tokens"].as_i64(),
                        usage["total_tokens"].as_i64(),
                    ],
                    created_at: requested_at,
                    updated_at: time(&data["completed_at"])?,
                }))
            }
            _ => continue,
        };
        rows.push(row);
    }
    Ok(rows)
}

/// The baseline: every row upserted with its own statement on one connection,
/// `RAW_ROWS_PER_TX` rows per transaction, in the order the events committed.
async fn raw_upserts(db_url: &str, rows: &[RawRow]) -> Result<Run> {
    eprintln!("  raw upserts");
    let mut conn = PgConnection::connect(db_url)
        .await
        .context("opening the raw connection")?;
    conn.execute("TRUNCATE bench_messages, bench_messages_conversations")
        .await?;
    let started = Instant::now();
    for chunk in rows.chunks(RAW_ROWS_PER_TX) {
        conn.execute("BEGIN").await?;
        for row in chunk {
            match row {
                RawRow::Conversation(id, owner) => {
                    sqlx::query(
                        "INSERT INTO bench_messages_conversations (conversation_id, owner_id)
                         VALUES ($1, $2)
                         ON CONFLICT (conversation_id) DO UPDATE SET owner_id = excluded.owner_id",
                    )
                    .bind(id)
                    .bind(owner)
                    .execute(&mut conn)
                    .await?;
                }
                RawRow::Message(m) => {
                    sqlx::query(
                        "INSERT INTO bench_messages (id, conversation_id, owner_id, seq, role,
                             content, status, reply_to, model, finish_reason, prompt_tokens,
                             completion_tokens, total_tokens, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                         ON CONFLICT (id) DO UPDATE SET content = excluded.content,
                             status = excluded.status, model = excluded.model,
                             finish_reason = excluded.finish_reason,
                             prompt_tokens = excluded.prompt_tokens,
                             completion_tokens = excluded.completion_tokens,
                             total_tokens = excluded.total_tokens,
                             updated_at = excluded.updated_at",
                    )
                    .bind(m.id)
                    .bind(m.conversation_id)
                    .bind(m.owner_id)
                    .bind(m.seq)
                    .bind(m.role)
                    .bind(&m.content)
                    .bind(m.status)
                    .bind(m.reply_to)
                    .bind(&m.model)
                    .bind(&m.finish_reason)
                    .bind(m.tokens[0])
                    .bind(m.tokens[1])
                    .bind(m.tokens[2])
                    .bind(m.created_at)
                    .bind(m.updated_at)
                    .execute(&mut conn)
                    .await?;
                }
            }
        }
        conn.execute("COMMIT").await?;
    }
    let elapsed = started.elapsed();
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_messages")
        .fetch_one(&mut conn)
        .await?;
    let expected = rows
        .iter()
        .filter_map(|r| match r {
            RawRow::Message(m) => Some(m.id),
            RawRow::Conversation(..) => None,
        })
        .collect::<HashSet<_>>()
        .len();
    if written as usize != expected {
        bail!("the raw upserts left {written} messages, not {expected}");
    }
    conn.close().await.ok();
    Ok(Run {
        elapsed,
        per_projection: Vec::new(),
        batches: Vec::new(),
    })
}
