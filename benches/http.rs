//! Whole-pipeline throughput: commands over HTTP against the raw append rate,
//! the read side keeping up with them, a cached GET against `/health`, and the
//! service's memory, in one run on one machine (client included).
//!
//! The service is the real binary (`ai-secretary`, built by `cargo bench` in
//! the bench profile), started as a child process on the shared servers with a
//! fresh database, JetStream stream, subjects and Redis prefix of its own. The
//! load comes from this process: `BENCH_CONNECTIONS` keep-alive HTTP/1.1
//! connections (hyper's bare connection, no pool), each a closed loop.
//!
//! Each round measures, in this order:
//! 1. **raw**: `BENCH_CONNECTIONS` writers, each looping one autocommit
//!    single-row `INSERT INTO events` on its own connection (the append
//!    bench's raw path, `common/raw_postgres.rs`), into a migrated database;
//! 2. **api**: `ai-secretary serve` (the HTTP API alone: commands append,
//!    nothing projects), each connection looping `POST /api/v1/conversations`
//!    (a command that appends one event) as one signed-in user;
//! 3. **pipeline**: `ai-secretary` with every role in one process (API, relay,
//!    the projections with the cache, replier), first under the same closed
//!    loop, then **paced** at [`PACED_FRACTION`] of the round's raw rate (open
//!    loop: each connection sends on its own schedule). During both, the bench
//!    reads every checkpoint's lag behind the store's head every 100 ms, and
//!    after each, the time until every checkpoint is at the head is the drain.
//!    During the paced load one more connection probes freshness: it starts a
//!    conversation, then asks `GET /api/v1/conversations/{id}` (no consistency
//!    token) every millisecond on a second connection until it answers 200;
//!    freshness is the 201 → 200 time;
//! 4. **GET pair**, on the pipeline's process once its read side is at the
//!    head: `GET /api/v1/assistants/{id}` (served from the cache after the
//!    first read) against `GET /health`, each on every connection.
//!
//! RSS is the service's peak resident set (`VmHWM`) at the end of each phase;
//! the CPU per operation is what the service's process and every `postgres`
//! process used in the measured window (`/proc/<pid>/stat`), divided by the
//! operations completed in it: steadier than the rates on a shared machine.
//! Every phase counts the 2xx answers completing in the measured window after a
//! warm-up; any other status fails the run. Ratios are taken within a round,
//! and the median round is reported.
//!
//! ```text
//! cargo bench --bench http
//! BENCH_SECONDS=10 BENCH_ROUNDS=3 cargo bench --bench http
//! ```
//!
//! Environment:
//! - `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/`; its
//!   database part is ignored), `BENCH_NATS_URL` (`nats://127.0.0.1:4222`),
//!   `BENCH_REDIS_URL` (`redis://127.0.0.1:6379`);
//! - `BENCH_CONNECTIONS`: concurrent connections and raw writers (default 16);
//! - `BENCH_SECONDS`: measured seconds per phase (default 5), after
//!   `BENCH_WARMUP_SECONDS` (default 1);
//! - `BENCH_ROUNDS`: rounds, phases interleaved as above (default 2);
//! - `BENCH_LOG`: the service's log filter, to stderr (default `warn`);
//! - `BENCH_BINARY`: the service's binary (default the one `cargo bench`
//!   built), to measure another build, such as the one before a change.
//!
//! The service's rate limits are off (`RATE_LIMIT_*=0`). Without a `--bench`
//! argument (as under `cargo test --all-targets`) it does nothing. Its
//! databases (`ai_secretary_bench_<random hex>_*`), streams and Redis keys are
//! removed at the end, also after an error or Ctrl-C.

#[path = "common/appends.rs"]
#[allow(
    dead_code,
    reason = "shared with the append benches; only the raw path's writer and window are used here"
)]
mod appends;
#[path = "common/mod.rs"]
mod common;
#[path = "common/in_process.rs"]
#[allow(dead_code, reason = "the service runs as a child process here")]
mod in_process;
#[path = "common/raw_postgres.rs"]
mod raw_postgres;
#[path = "common/service.rs"]
#[allow(dead_code, reason = "the service runs as a child process here")]
mod service;
#[path = "../tests/support/mod.rs"]
mod support;

use appends::{Window, Writer, ms, percentile};
use common::{describe_server, env_or};
use service::{Names, Servers, remove};
use support::progress::{caught_up, checkpoints, consumers, head};

use std::{
    env,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ai_secretary::store::postgres;
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sqlx::{PgPool, postgres::PgConnectOptions};
use tokio::{net::TcpStream, task::JoinSet};
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/";
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";
/// How often the pipeline phase reads the checkpoints' lag.
const LAG_SAMPLE: Duration = Duration::from_millis(100);
/// How often the freshness probe asks for its conversation.
const PROBE_POLL: Duration = Duration::from_millis(1);
/// Longest wait for a service to answer `/ready`, or its read side to drain.
const PATIENCE: Duration = Duration::from_secs(60);
/// The paced load, as a fraction of the raw rate: the pipeline's throughput
/// target, at which its freshness is judged.
const PACED_FRACTION: f64 = 0.5;

/// The issue's targets, as ratios within a round (and absolute bounds).
const API_TARGET: f64 = 1.0;
const PIPELINE_TARGET: f64 = 0.5;
const CACHED_GET_TARGET: f64 = 0.6;
const FRESHNESS_P99_TARGET_MS: f64 = 50.0;
const RSS_TARGET_MIB: f64 = 64.0;

struct Settings {
    base_url: String,
    nats_url: String,
    redis_url: String,
    connections: usize,
    warmup: Duration,
    measured: Duration,
    rounds: usize,
    log: String,
    binary: String,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let measured: f64 = env_or("BENCH_SECONDS", 5.0)?;
        let warmup: f64 = env_or("BENCH_WARMUP_SECONDS", 1.0)?;
        if !(measured > 0.0 && warmup >= 0.0) {
            bail!("BENCH_SECONDS must be > 0 and BENCH_WARMUP_SECONDS >= 0");
        }
        Ok(Self {
            base_url: env::var("BENCH_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into()),
            nats_url: env::var("BENCH_NATS_URL").unwrap_or_else(|_| DEFAULT_NATS.into()),
            redis_url: env::var("BENCH_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS.into()),
            connections: env_or("BENCH_CONNECTIONS", 16_usize)?.max(1),
            warmup: Duration::from_secs_f64(warmup),
            measured: Duration::from_secs_f64(measured),
            rounds: env_or("BENCH_ROUNDS", 2_usize)?.max(1),
            log: env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            // Absolute: the service runs in a directory of its own.
            binary: std::fs::canonicalize(
                env::var("BENCH_BINARY")
                    .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ai-secretary").into()),
            )
            .context("BENCH_BINARY")?
            .display()
            .to_string(),
        })
    }

    fn servers(&self) -> Servers<'_> {
        Servers {
            base_url: &self.base_url,
            nats_url: &self.nats_url,
            redis_url: &self.redis_url,
        }
    }

    fn window(&self) -> Window {
        Window::starting_now(self.warmup, self.measured)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if !env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let settings = Settings::from_env()?;
    let run = format!("{:08x}", fastrand::u32(..));
    let mut parts = vec![Names::new(&settings.base_url, &run, "raw")?];
    for round in 0..settings.rounds {
        parts.push(Names::new(
            &settings.base_url,
            &run,
            &format!("api{round}"),
        )?);
        parts.push(Names::new(
            &settings.base_url,
            &run,
            &format!("all{round}"),
        )?);
    }
    let outcome = tokio::select! {
        outcome = run_rounds(&settings, &parts) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    for names in &parts {
        if let Err(e) = remove(&settings.servers(), names).await {
            eprintln!("cleaning up {}: {e:#}", names.database);
        }
    }
    outcome
}

/// One round's figures.
struct Round {
    raw: Rate,
    api: Rate,
    pipeline: Rate,
    pipeline_lag: Lag,
    /// The pipeline under [`PACED_FRACTION`] of the raw rate, sent on a schedule.
    paced: Rate,
    paced_lag: Lag,
    /// Freshness probes during the paced load.
    freshness: Vec<Duration>,
    health: Rate,
    cached: Rate,
    /// Peak resident set of each service process, MiB.
    api_rss: f64,
    pipeline_rss: f64,
}

async fn run_rounds(settings: &Settings, parts: &[Names]) -> Result<()> {
    let raw_names = &parts[0];
    eprintln!("creating database {}", raw_names.database);
    let raw_pool = postgres::connect(&raw_names.db_url, 4)
        .await
        .context("creating and migrating the raw database")?;
    let server = describe_server(&raw_pool).await?;
    let raw_options: PgConnectOptions = raw_names.db_url.parse()?;

    let mut rounds = Vec::new();
    for (round, services) in parts[1..].chunks(2).enumerate() {
        eprintln!("round {}", round + 1);
        rounds.push(one_round(settings, &raw_options, &services[0], &services[1]).await?);
    }
    raw_pool.close().await;
    report(settings, &server, rounds);
    Ok(())
}

async fn one_round(
    settings: &Settings,
    raw_options: &PgConnectOptions,
    api_names: &Names,
    all_names: &Names,
) -> Result<Round> {
    eprintln!("  raw appends");
    let raw = raw_appends(settings, raw_options).await?;

    eprintln!("  api alone: POST /api/v1/conversations");
    let api_service = ServiceProcess::start(settings, api_names, Some("serve")).await?;
    let api_user = User::sign_up(&api_service).await?;
    let api = commands(settings, &api_user).await?;
    let api_rss = api_service.peak_rss_mib()?;
    api_service.stop();

    eprintln!("  whole pipeline: POST /api/v1/conversations");
    let pipeline_service = ServiceProcess::start(settings, all_names, None).await?;
    let pool = postgres::connect(&all_names.db_url, 2).await?;
    let user = User::sign_up(&pipeline_service).await?;
    caught_up(&pool, &consumers(), PATIENCE).await?;
    let (pipeline, pipeline_lag) = with_lag(&pool, settings, commands(settings, &user)).await?;

    let pace = PACED_FRACTION * raw.per_sec();
    eprintln!("  whole pipeline, paced at {pace:.0} commands/s: freshness");
    let probe = tokio::spawn(probe_freshness(user.clone(), settings.window()));
    let (paced, paced_lag) =
        with_lag(&pool, settings, paced_commands(settings, &user, pace)).await?;
    let freshness = probe.await??;

    eprintln!("  GET /health and GET /api/v1/assistants/{{id}}");
    let health = gets(settings, &user, "/health").await?;
    let cached = gets(
        settings,
        &user,
        &format!("/api/v1/assistants/{}", user.assistant),
    )
    .await?;
    let pipeline_rss = pipeline_service.peak_rss_mib()?;
    pipeline_service.stop();
    pool.close().await;

    Ok(Round {
        raw,
        api,
        pipeline,
        pipeline_lag,
        paced,
        paced_lag,
        freshness,
        health,
        cached,
        api_rss,
        pipeline_rss,
    })
}

// ---------------------------------------------------------------------------
// Rates
// ---------------------------------------------------------------------------

/// What completed in a measured window, and the CPU it took.
struct Rate {
    /// Sorted latencies of the operations that completed in the window.
    latencies: Vec<Duration>,
    measured: Duration,
    cpu: Cpu,
}

impl Rate {
    fn new(mut latencies: Vec<Duration>, measured: Duration, cpu: Cpu, what: &str) -> Result<Rate> {
        if latencies.is_empty() {
            bail!("{what}: nothing completed in the measured window");
        }
        latencies.sort_unstable();
        Ok(Rate {
            latencies,
            measured,
            cpu,
        })
    }

    /// CPU microseconds per operation: the service's, and Postgres's.
    fn cpu_per_op(&self) -> (f64, f64) {
        let per = |seconds: f64| seconds * 1e6 / self.latencies.len() as f64;
        (per(self.cpu.service), per(self.cpu.postgres))
    }

    fn per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.measured.as_secs_f64()
    }

    fn p(&self, q: f64) -> f64 {
        ms(percentile(&self.latencies, q))
    }
}

/// Gather every task's latencies.
async fn gather(mut tasks: JoinSet<Result<Vec<Duration>>>) -> Result<Vec<Duration>> {
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.context("a load task panicked")??);
    }
    Ok(all)
}

async fn raw_appends(settings: &Settings, options: &PgConnectOptions) -> Result<Rate> {
    let connections = raw_postgres::connections(options, settings.connections).await?;
    let window = settings.window();
    let cpu = tokio::spawn(cpu_during(None, window));
    let mut tasks = JoinSet::new();
    for conn in connections {
        let writer = Writer::new(Uuid::now_v7(), 1);
        tasks.spawn(raw_postgres::raw_writer(conn, writer, window));
    }
    let latencies = gather(tasks).await?;
    Rate::new(latencies, settings.measured, cpu.await??, "raw appends")
}

/// Every connection looping `POST /api/v1/conversations` until the window ends.
async fn commands(settings: &Settings, user: &User) -> Result<Rate> {
    let body = Bytes::from(json!({ "assistant_id": user.assistant, "title": "Bench" }).to_string());
    let request = user.request(Method::POST, "/api/v1/conversations", Some(body));
    load(settings, user, request, StatusCode::CREATED).await
}

/// `POST /api/v1/conversations` at `rate` per second in all, spread evenly
/// over the connections, each sending on its own schedule (open loop: a send
/// that is late goes at once, and the schedule does not wait for answers
/// beyond the one in flight on that connection).
async fn paced_commands(settings: &Settings, user: &User, rate: f64) -> Result<Rate> {
    let body = Bytes::from(json!({ "assistant_id": user.assistant, "title": "Bench" }).to_string());
    let request = user.request(Method::POST, "/api/v1/conversations", Some(body));
    let interval = Duration::from_secs_f64(settings.connections as f64 / rate.max(1.0));
    let mut connections = Vec::new();
    for _ in 0..settings.connections {
        connections.push(Connection::open(user.address).await?);
    }
    let window = settings.window();
    let cpu = tokio::spawn(cpu_during(Some(user.service), window));
    let mut tasks = JoinSet::new();
    for (i, mut connection) in connections.into_iter().enumerate() {
        let request = request.clone();
        // Staggered, so the connections' sends do not arrive together.
        let first = Instant::now() + interval.mul_f64(i as f64 / settings.connections as f64);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut next = first;
            while next < window.until {
                tokio::time::sleep_until(next.into()).await;
                let started = Instant::now();
                let (status, body) = connection.send(&request).await?;
                if status != StatusCode::CREATED {
                    bail!(
                        "a paced command answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
                window.record(&mut latencies, started);
                next += interval;
            }
            Ok(latencies)
        });
    }
    let latencies = gather(tasks).await?;
    Rate::new(latencies, settings.measured, cpu.await??, "paced commands")
}

/// Run `load` while reading the read side's lag, then wait for it to drain.
async fn with_lag(
    pool: &PgPool,
    settings: &Settings,
    load: impl Future<Output = Result<Rate>>,
) -> Result<(Rate, Lag)> {
    let sampler = tokio::spawn(sample_lag(
        pool.clone(),
        settings.warmup + settings.measured,
    ));
    let rate = load.await?;
    let mut lag = sampler.await??;
    let drain_started = Instant::now();
    caught_up(pool, &consumers(), PATIENCE).await?;
    lag.drain = drain_started.elapsed();
    Ok((rate, lag))
}

/// Every connection looping `GET path` until the window ends.
async fn gets(settings: &Settings, user: &User, path: &str) -> Result<Rate> {
    let request = user.request(Method::GET, path, None);
    load(settings, user, request, StatusCode::OK).await
}

/// Every connection looping `request` until the window ends.
async fn load(
    settings: &Settings,
    user: &User,
    request: Template,
    expected: StatusCode,
) -> Result<Rate> {
    let mut connections = Vec::new();
    for _ in 0..settings.connections {
        connections.push(Connection::open(user.address).await?);
    }
    let window = settings.window();
    let cpu = tokio::spawn(cpu_during(Some(user.service), window));
    let mut tasks = JoinSet::new();
    for connection in connections {
        tasks.spawn(connection.load(request.clone(), expected, window));
    }
    let latencies = gather(tasks).await?;
    let what = format!("{} {}", request.method, request.path);
    Rate::new(latencies, settings.measured, cpu.await??, &what)
}

/// CPU seconds used in a window.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// By the service's process.
    service: f64,
    /// By every `postgres` process of the machine (the server is this bench's).
    postgres: f64,
}

/// The CPU used by process `service` and by Postgres between the window's
/// start of counting and its end.
async fn cpu_during(service: Option<u32>, window: Window) -> Result<Cpu> {
    tokio::time::sleep_until(window.counted_from.into()).await;
    let before = cpu_now(service)?;
    tokio::time::sleep_until(window.until.into()).await;
    let after = cpu_now(service)?;
    Ok(Cpu {
        service: after.service - before.service,
        postgres: after.postgres - before.postgres,
    })
}

/// CPU seconds so far of `service` and of every process named `postgres`.
fn cpu_now(service: Option<u32>) -> Result<Cpu> {
    // utime and stime, in clock ticks: fields 14 and 15 of /proc/<pid>/stat,
    // counted after the command name's closing parenthesis.
    fn ticks(stat: &str) -> Option<(String, f64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let used = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some((stat[open + 1..close].to_owned(), used))
    }
    const TICKS_PER_SECOND: f64 = 100.0;
    let mut cpu = Cpu::default();
    if let Some(pid) = service {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let (_, used) = ticks(&stat).ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
        cpu.service = used / TICKS_PER_SECOND;
    }
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        // A process may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((name, used)) = ticks(&stat)
            && name == "postgres"
        {
            cpu.postgres += used / TICKS_PER_SECOND;
        }
    }
    Ok(cpu)
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// A request to send again and again: its parts, cloned per send.
#[derive(Clone)]
struct Template {
    method: Method,
    path: String,
    host: String,
    token: String,
    body: Option<Bytes>,
}

impl Template {
    fn build(&self) -> Request<Full<Bytes>> {
        let builder = Request::builder()
            .method(self.method.clone())
            .uri(&self.path)
            .header("host", &self.host)
            .header("authorization", &self.token);
        match &self.body {
            Some(body) => builder
                .header("content-type", "application/json")
                .body(Full::new(body.clone())),
            None => builder.body(Full::new(Bytes::new())),
        }
        .expect("a request built from valid parts")
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    async fn open(address: SocketAddr) -> Result<Connection> {
        let stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("the HTTP handshake")?;
        tokio::spawn(connection);
        Ok(Connection { sender })
    }

    /// Send `template` and read the whole answer: its status and body.
    async fn send(&mut self, template: &Template) -> Result<(StatusCode, Bytes)> {
        self.sender.ready().await.context("the connection closed")?;
        let response = self.sender.send_request(template.build()).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// Loop `template` until the window closes; every answer must be `expected`.
    async fn load(
        mut self,
        template: Template,
        expected: StatusCode,
        window: Window,
    ) -> Result<Vec<Duration>> {
        let mut latencies = Vec::new();
        loop {
            let started = Instant::now();
            if started >= window.until {
                return Ok(latencies);
            }
            let (status, body) = self.send(&template).await?;
            if status != expected {
                bail!(
                    "{} {} answered {status}, not {expected}: {}",
                    template.method,
                    template.path,
                    String::from_utf8_lossy(&body)
                );
            }
            window.record(&mut latencies, started);
        }
    }
}

/// The signed-in bench user of one service, with an assistant of its own.
#[derive(Clone)]
struct User {
    address: SocketAddr,
    /// The service's process id.
    service: u32,
    /// `Bearer <token>`.
    token: String,
    assistant: Uuid,
}

impl User {
    async fn sign_up(service: &ServiceProcess) -> Result<User> {
        let address = service.address;
        let mut connection = Connection::open(address).await?;
        let anonymous = User {
            address,
            service: service.process.id(),
            token: String::new(),
            assistant: Uuid::nil(),
        };
        let (email, password) = (
            format!("bench-{}@example.com", Uuid::now_v7().simple()),
            "correct horse battery staple",
        );
        let credentials = json!({ "email": email, "password": password });
        let mut registration = credentials.clone();
        registration["display_name"] = "Bench".into();
        anonymous
            .call(
                &mut connection,
                "/api/v1/users",
                &registration,
                StatusCode::CREATED,
            )
            .await?;
        let token = anonymous
            .call(
                &mut connection,
                "/api/v1/auth/token",
                &credentials,
                StatusCode::OK,
            )
            .await?;
        let token = token["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("no access_token in {token}"))?;
        let mut user = User {
            token: format!("Bearer {token}"),
            ..anonymous
        };
        let assistant = user
            .call(
                &mut connection,
                "/api/v1/assistants",
                &json!({ "name": "Bench secretary" }),
                StatusCode::CREATED,
            )
            .await?;
        user.assistant = id_of(&assistant)?;
        Ok(user)
    }

    fn request(&self, method: Method, path: &str, body: Option<Bytes>) -> Template {
        Template {
            method,
            path: path.into(),
            host: self.address.to_string(),
            token: self.token.clone(),
            body,
        }
    }

    /// POST `body` to `path`, expecting `expected`; the answer's JSON.
    async fn call(
        &self,
        connection: &mut Connection,
        path: &str,
        body: &Value,
        expected: StatusCode,
    ) -> Result<Value> {
        let template = self.request(Method::POST, path, Some(body.to_string().into()));
        let (status, answer) = connection.send(&template).await?;
        if status != expected {
            bail!(
                "POST {path} answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        serde_json::from_slice(&answer).with_context(|| format!("the answer to POST {path}"))
    }
}

fn id_of(created: &Value) -> Result<Uuid> {
    created["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no id in {created}"))
}

// ---------------------------------------------------------------------------
// The read side: lag and freshness
// ---------------------------------------------------------------------------

/// How far the read side fell behind during the load.
#[derive(Default)]
struct Lag {
    /// The largest lag seen, in events (global positions), and whose.
    max: i64,
    max_of: String,
    /// The largest lag in the window's last second: bounded means no larger
    /// than the early ones.
    last_second: i64,
    /// From the end of the load until every checkpoint was at the head.
    drain: Duration,
}

/// Read every checkpoint's lag behind the head each [`LAG_SAMPLE`] for `length`.
async fn sample_lag(pool: PgPool, length: Duration) -> Result<Lag> {
    let started = Instant::now();
    let last_second = started + length.saturating_sub(Duration::from_secs(1));
    let mut lag = Lag::default();
    while started.elapsed() < length {
        let head = head(&pool).await?.1;
        let at = checkpoints(&pool).await?;
        let now = Instant::now();
        for name in consumers() {
            let behind = head - at.get(&name).map_or(0, |c| c.position.1);
            if behind > lag.max {
                lag.max = behind;
                lag.max_of = name.clone();
            }
            if now >= last_second {
                lag.last_second = lag.last_second.max(behind);
            }
        }
        tokio::time::sleep(LAG_SAMPLE).await;
    }
    Ok(lag)
}

/// Start conversations one after another on a connection of their own, and
/// time each from its 201 to the first 200 of `GET /api/v1/conversations/{id}`
/// sent after it.
async fn probe_freshness(user: User, window: Window) -> Result<Vec<Duration>> {
    let mut commands = Connection::open(user.address).await?;
    let mut queries = Connection::open(user.address).await?;
    let start = json!({ "assistant_id": user.assistant, "title": "Probe" });
    let mut freshness = Vec::new();
    while Instant::now() < window.until {
        let created = user
            .call(
                &mut commands,
                "/api/v1/conversations",
                &start,
                StatusCode::CREATED,
            )
            .await?;
        let answered = Instant::now();
        let read = user.request(
            Method::GET,
            &format!("/api/v1/conversations/{}", id_of(&created)?),
            None,
        );
        loop {
            let (status, body) = queries.send(&read).await?;
            match status {
                StatusCode::OK => break,
                StatusCode::NOT_FOUND => tokio::time::sleep(PROBE_POLL).await,
                other => bail!(
                    "the probe's GET answered {other}: {}",
                    String::from_utf8_lossy(&body)
                ),
            }
            if answered.elapsed() > PATIENCE {
                bail!("a started conversation was not visible within {PATIENCE:?}");
            }
        }
        if answered >= window.counted_from {
            freshness.push(answered.elapsed());
        }
    }
    freshness.sort_unstable();
    Ok(freshness)
}

// ---------------------------------------------------------------------------
// The service as a child process
// ---------------------------------------------------------------------------

struct ServiceProcess {
    process: std::process::Child,
    address: SocketAddr,
    /// Its `DATA_DIR` and working directory (lease files; no `.env` read).
    _data_dir: tempfile::TempDir,
}

impl ServiceProcess {
    /// Start the binary with `subcommand` (every role without one) under
    /// `names`, and wait until it answers `/ready`.
    async fn start(
        settings: &Settings,
        names: &Names,
        subcommand: Option<&str>,
    ) -> Result<ServiceProcess> {
        let address = free_address()?;
        let data_dir = tempfile::tempdir()?;
        let mut command = Command::new(&settings.binary);
        command
            .args(subcommand)
            .env_clear()
            .current_dir(data_dir.path())
            .env("DATA_DIR", data_dir.path())
            .env("BIND", address.to_string())
            .env("DATABASE_URL", &names.db_url)
            .env("NATS_URL", &settings.nats_url)
            .env("REDIS_URL", &settings.redis_url)
            .env("NATS_STREAM", &names.stream)
            .env("NATS_SUBJECT_PREFIX", &names.subject_prefix)
            .env("REDIS_KEY_PREFIX", &names.redis_prefix)
            .env("ENVIRONMENT", "development")
            .env("RATE_LIMIT_COMMANDS_PER_MINUTE", "0")
            .env("RATE_LIMIT_SIGNUPS_PER_HOUR", "0")
            .env("RATE_LIMIT_LOGINS_PER_MINUTE", "0")
            .env("RUST_LOG", &settings.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let process = command.spawn().context("starting ai-secretary")?;
        let mut child = ServiceProcess {
            process,
            address,
            _data_dir: data_dir,
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.process.try_wait()? {
                bail!("ai-secretary exited at start: {status}");
            }
            if ready(address).await {
                return Ok(child);
            }
            if Instant::now() > deadline {
                child.stop();
                bail!("ai-secretary was not ready within {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process's peak resident set so far, MiB.
    fn peak_rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmHWM in /proc/<pid>/status"))?;
        Ok(kib / 1024.0)
    }

    fn stop(mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn free_address() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

async fn ready(address: SocketAddr) -> bool {
    let Ok(mut connection) = Connection::open(address).await else {
        return false;
    };
    let probe = Template {
        method: Method::GET,
        path: "/ready".into(),
        host: address.to_string(),
        token: String::new(),
        body: None,
    };
    matches!(connection.send(&probe).await, Ok((StatusCode::OK, _)))
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/// The median of `f` over the rounds: with an even number of rounds (two
/// by default), the mean of the middle two, so that neither the better nor
/// the worse of two rounds alone decides whether a target is met.
fn median_by<T>(rounds: &[T], f: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = rounds.iter().map(f).collect();
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

fn report(settings: &Settings, server: &str, rounds: Vec<Round>) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!("Server: {server}; {cores} logical CPUs, client in the same machine");
    println!("Service: {}", settings.binary);
    println!(
        "{} connections; each phase {:.1} s warm-up + {:.1} s measured; {} rounds",
        settings.connections,
        settings.warmup.as_secs_f64(),
        settings.measured.as_secs_f64(),
        rounds.len()
    );
    println!();
    println!(
        "| round | what | per second | p50 ms | p99 ms | ratio | service CPU µs/op | Postgres CPU µs/op |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (i, r) in rounds.iter().enumerate() {
        let rows = [
            ("raw appends (1 event each)", &r.raw, String::new()),
            (
                "api alone: POST /conversations",
                &r.api,
                ratio(&r.api, &r.raw, "raw"),
            ),
            (
                "whole pipeline: POST /conversations",
                &r.pipeline,
                ratio(&r.pipeline, &r.raw, "raw"),
            ),
            ("GET /health", &r.health, String::new()),
            (
                "GET /assistants/{id} (cached)",
                &r.cached,
                ratio(&r.cached, &r.health, "/health"),
            ),
        ];
        for (what, rate, ratio) in rows {
            let (service, postgres) = rate.cpu_per_op();
            println!(
                "| {} | {what} | {:.0} | {:.2} | {:.2} | {ratio} | {service:.0} | {postgres:.0} |",
                i + 1,
                rate.per_sec(),
                rate.p(0.50),
                rate.p(0.99)
            );
        }
    }
    println!();
    println!(
        "| round | load | commands/s | max lag (events) | lag in the last second | drain ms | freshness p50 ms | p99 ms | probes |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in rounds.iter().enumerate() {
        let (p50, p99) = if r.freshness.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (
                ms(percentile(&r.freshness, 0.5)),
                ms(percentile(&r.freshness, 0.99)),
            )
        };
        for (load, rate, lag, freshness) in [
            (
                "closed loop",
                &r.pipeline,
                &r.pipeline_lag,
                String::from("| | |"),
            ),
            (
                "paced",
                &r.paced,
                &r.paced_lag,
                format!("{p50:.1} | {p99:.1} | {} |", r.freshness.len()),
            ),
        ] {
            println!(
                "| {} | {load} | {:.0} | {} ({}) | {} | {:.0} | {freshness}",
                i + 1,
                rate.per_sec(),
                lag.max,
                lag.max_of,
                lag.last_second,
                ms(lag.drain),
            );
        }
    }
    println!();
    println!("| round | RSS api MiB | RSS pipeline MiB |");
    println!("|---|---:|---:|");
    for (i, r) in rounds.iter().enumerate() {
        println!("| {} | {:.1} | {:.1} |", i + 1, r.api_rss, r.pipeline_rss);
    }
    let api = median_by(&rounds, |r| r.api.per_sec() / r.raw.per_sec());
    let pipeline = median_by(&rounds, |r| r.pipeline.per_sec() / r.raw.per_sec());
    let cached = median_by(&rounds, |r| r.cached.per_sec() / r.health.per_sec());
    let freshness = median_by(&rounds, |r| {
        r.freshness
            .last()
            .map_or(f64::INFINITY, |_| ms(percentile(&r.freshness, 0.99)))
    });
    let rss = rounds
        .iter()
        .map(|r| r.api_rss.max(r.pipeline_rss))
        .fold(0.0, f64::max);
    println!();
    println!("| target | median of the rounds | goal | met |");
    println!("|---|---:|---:|---|");
    println!(
        "| api alone ÷ raw | {api:.2}× | ≥ {API_TARGET:.1}× | {} |",
        met(api >= API_TARGET)
    );
    println!(
        "| whole pipeline ÷ raw | {pipeline:.2}× | ≥ {PIPELINE_TARGET:.1}× | {} |",
        met(pipeline >= PIPELINE_TARGET)
    );
    println!(
        "| freshness p99 at {PACED_FRACTION}× raw, paced | {freshness:.1} ms | ≤ {FRESHNESS_P99_TARGET_MS:.0} ms | {} |",
        met(freshness <= FRESHNESS_P99_TARGET_MS)
    );
    println!(
        "| cached GET ÷ /health | {cached:.2}× | ≥ {CACHED_GET_TARGET:.1}× | {} |",
        met(cached >= CACHED_GET_TARGET)
    );
    println!(
        "| peak RSS (largest) | {rss:.1} MiB | ≤ {RSS_TARGET_MIB:.0} MiB | {} |",
        met(rss <= RSS_TARGET_MIB)
    );
    println!();
}

fn ratio(rate: &Rate, baseline: &Rate, of: &str) -> String {
    format!("{:.2}× {of}", rate.per_sec() / baseline.per_sec())
}
