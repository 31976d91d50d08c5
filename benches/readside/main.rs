//! Read-side benchmark: how fresh the query API is under command load, and how
//! fast the projections apply a backlog against raw upserts of the same rows, on
//! a real Postgres, NATS JetStream and Redis.
//!
//! **Part 1, freshness.** The whole service runs in this process
//! (`Application::build` with `Roles::all()`, bound to `127.0.0.1:0`, `run_until`
//! in a spawned task stopped through a oneshot). A user registers over HTTP and
//! creates an assistant and conversations. First the sustained command rate:
//! `BENCH_CLIENTS` closed-loop clients post `POST /api/v1/conversations/{id}/messages`
//! (two events each) as fast as they can; 2xx/s over the measured window is the
//! accepted rate. Each message asks for a reply, which the replier writes after
//! the 202, so the rate the whole service carries is lower: every command the
//! loop had accepted, over the time from its start until their replies ended
//! and every projection applied them. Then, at 25 %, 50 % and 100 % of that
//! carried rate, open-loop: sends are scheduled at fixed
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
//!   (`messages` and `messages_conversations`: each row an event changes, as the
//!   projection's own rules fold it), upserted into scratch tables of the same
//!   shape (`LIKE ... INCLUDING ALL`) with one `INSERT ... ON CONFLICT (..) DO
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
//! - `BENCH_LEVELS_OF`: `carried` (default) or `accepted`, the rate the load
//!   levels are fractions of (`accepted`: as this bench did before 2026-12-03);
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
//!
//! The code, by part: this file holds the settings, `main` and what both parts
//! share (where the read side is comes from the test kit, `tests/support`);
//! `freshness.rs` (part 1) drives the load through `api.rs`,
//! `open_loop.rs` and `poller.rs` and splits freshness into stages with
//! `trace.rs`; `throughput.rs` (part 2) appends the backlog with `backlog.rs`
//! and times the raw baseline of `raw.rs` against the projections.

#[path = "../common/mod.rs"]
mod common;

/// The service's allocator (`src/main.rs`): the service runs in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[path = "../common/in_process.rs"]
mod in_process;
#[path = "../common/service.rs"]
mod service;
#[path = "../../tests/support/mod.rs"]
mod support;

mod api;
mod backlog;
mod freshness;
mod open_loop;
mod poller;
mod raw;
mod throughput;
mod trace;

use common::env_or;
use service::{Names, Servers, remove};

use std::{env, time::Duration};

use anyhow::{Result, anyhow, bail};
use support::progress::Position;
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/";
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";
/// Where every projection batch commit is announced (`projections::checkpoint::CHANNEL`).
const CHECKPOINT_CHANNEL: &str = "ai_secretary_checkpoints";

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
    /// What the load levels are fractions of: the carried rate (`true`, the
    /// default) or the closed loop's accepted rate.
    levels_of_carried: bool,
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
            levels_of_carried: match env::var("BENCH_LEVELS_OF").as_deref().map(str::trim) {
                Err(_) | Ok("carried") => true,
                Ok("accepted") => false,
                Ok(other) => bail!("BENCH_LEVELS_OF: {other:?} is neither carried nor accepted"),
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
        report.push(freshness::freshness(settings, fresh).await?);
    }
    if settings.throughput {
        report.push(throughput::throughput(settings, proj).await?);
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
// What both parts show, send and read
// ---------------------------------------------------------------------------

/// What a user types; a few sizes, numbered.
fn message_content(n: usize) -> String {
    const TEXTS: [&str; 3] = [
        "Please move my 3pm with the design team to Thursday and send everyone the updated agenda.",
        "Draft a short, friendly reply to Anna thanking her for the proposal; say we will decide by Friday.",
        "What is on my calendar tomorrow morning, and is there a free hour before lunch for a call with the bank?",
    ];
    format!("{} (#{n})", TEXTS[n % TEXTS.len()])
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

/// `<tx>.<gp>` (an X-Consistency-Token or a checkpoint notification's position).
fn parse_position(s: &str) -> Option<Position> {
    let (tx, gp) = s.split_once('.')?;
    Some((tx.parse().ok()?, gp.parse().ok()?))
}
