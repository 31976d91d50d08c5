//! Long-conversation benchmark: does a command cost the same at message 5,000 as
//! at message 10? On a real Postgres, NATS JetStream and Redis, with the whole
//! service (API, relay, projections and the offline replier) in this process.
//!
//! **Part `single`.** One user posts `BENCH_MESSAGES` messages into one
//! conversation, one at a time (each `POST /api/v1/conversations/{id}/messages`
//! waits for its answer before the next is sent), while the replier answers
//! every one of them. Each POST's latency and status are kept; the report gives
//! the median and p99 per block of `BENCH_BLOCK` messages, the last block's
//! median over the first's (the baseline, measured in the same run), and every
//! non-202 answer (a 409 is a user refused). At the end it waits for the
//! replier to end every reply and checks that each ended exactly once.
//!
//! **Part `many`.** `BENCH_USERS` users, each in a conversation of their own,
//! each posting `BENCH_USER_MESSAGES` messages one at a time, all at once; the
//! same figures per block of `BENCH_USER_BLOCK` (a block holds that stretch of
//! every user's conversation).
//!
//! **Part `load`.** A conversation stream of `BENCH_LOAD_EVENTS` events is
//! appended straight through the store; then `Commands::load` of it is timed
//! cold (a new `Commands` with an empty state cache: every event read and
//! folded) and warm (the same `Commands` again: the cached state and an empty
//! tail), `BENCH_LOAD_ROUNDS` times each, medians reported.
//!
//! ```text
//! cargo bench --bench long_conversation
//! BENCH_PARTS=load cargo bench --bench long_conversation
//! ```
//!
//! Environment: `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/`;
//! its database part is ignored), `BENCH_NATS_URL`, `BENCH_REDIS_URL`,
//! `BENCH_PARTS` (`single,many,load`), `BENCH_MESSAGES` (5000), `BENCH_BLOCK`
//! (500), `BENCH_USERS` (16), `BENCH_USER_MESSAGES` (1000), `BENCH_USER_BLOCK`
//! (100), `BENCH_LOAD_EVENTS` (10000), `BENCH_LOAD_ROUNDS` (5),
//! `BENCH_DRAIN_SECONDS` (how long to wait for the last replies, 900),
//! `BENCH_LOG` (the service's log filter, to stderr; `warn`). The service runs
//! with `RATE_LIMIT_COMMANDS_PER_MINUTE=0` where that setting exists. Each part
//! has its own database (`ai_secretary_bench_<hex>_<part>`), JetStream stream and
//! subjects, and Redis key prefix, all removed at the end, also after an error
//! or Ctrl-C. Without `--bench` (as under `cargo test --all-targets`) it does
//! nothing.

#[path = "common/mod.rs"]
mod common;
#[path = "common/in_process.rs"]
mod in_process;
#[path = "common/service.rs"]
mod service;
#[path = "../tests/support/mod.rs"]
mod support;

use common::{describe_server, env_or};
use service::{Names, Servers, Service, remove};

use std::{
    env,
    sync::Arc,
    time::{Duration, Instant},
};

use ai_secretary::{
    app::{Commands, STATE_CACHE_DEFAULT_BYTES, StateCache},
    config::DEV_ENCRYPTION_KEY,
    crypto::MasterKey,
    domain::conversation::{ConversationDecider, ConversationEvent},
    startup::Roles,
    store::{
        AppendRequest, EventMetadata, EventStore, codec,
        postgres::{self, CoalescingConfig, PgEventStore},
        sealed::Keyring,
    },
};
use anyhow::{Result, anyhow, bail};
use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/";
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";
/// Target: the last block's median within this factor of the first block's.
const FLAT_TARGET: f64 = 1.2;
/// Target for a cold load of the `load` part's stream, in milliseconds: above
/// it, snapshots are worth their complexity.
const COLD_LOAD_TARGET_MS: f64 = 50.0;

struct Settings {
    base_url: String,
    nats_url: String,
    redis_url: String,
    parts: Vec<String>,
    messages: usize,
    block: usize,
    users: usize,
    user_messages: usize,
    user_block: usize,
    load_events: usize,
    load_rounds: usize,
    drain: Duration,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let parts: Vec<String> = env::var("BENCH_PARTS")
            .unwrap_or_else(|_| "single,many,load".into())
            .split(',')
            .map(|p| p.trim().to_owned())
            .collect();
        if let Some(unknown) = parts
            .iter()
            .find(|p| !["single", "many", "load"].contains(&p.as_str()))
        {
            bail!("BENCH_PARTS: unknown part {unknown:?} (single, many, load)");
        }
        let settings = Settings {
            base_url: env::var("BENCH_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into()),
            nats_url: env::var("BENCH_NATS_URL").unwrap_or_else(|_| DEFAULT_NATS.into()),
            redis_url: env::var("BENCH_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS.into()),
            parts,
            messages: env_or("BENCH_MESSAGES", 5000)?,
            block: env_or("BENCH_BLOCK", 500)?,
            users: env_or("BENCH_USERS", 16)?,
            user_messages: env_or("BENCH_USER_MESSAGES", 1000)?,
            user_block: env_or("BENCH_USER_BLOCK", 100)?,
            load_events: env_or("BENCH_LOAD_EVENTS", 10_000)?,
            load_rounds: env_or::<usize>("BENCH_LOAD_ROUNDS", 5)?.max(1),
            drain: Duration::from_secs(env_or("BENCH_DRAIN_SECONDS", 900)?),
        };
        if settings.block == 0 || settings.user_block == 0 || settings.users == 0 {
            bail!("BENCH_BLOCK, BENCH_USER_BLOCK and BENCH_USERS must be at least 1");
        }
        if settings.messages < settings.block || settings.user_messages < settings.user_block {
            bail!("a part needs at least one block of messages");
        }
        if settings.load_events < 2 {
            bail!("BENCH_LOAD_EVENTS must be at least 2");
        }
        Ok(settings)
    }

    fn servers(&self) -> Servers<'_> {
        Servers {
            base_url: &self.base_url,
            nats_url: &self.nats_url,
            redis_url: &self.redis_url,
        }
    }

    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if !env::args().any(|a| a == "--bench") {
        eprintln!(
            "long_conversation bench: skipped (run it with `cargo bench --bench long_conversation`)"
        );
        return Ok(());
    }
    let filter = env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::from_env()?;
    let run = Uuid::new_v4().simple().to_string();
    let names: Vec<(String, Names)> = ["single", "many", "load"]
        .into_iter()
        .filter(|p| settings.runs(p))
        .map(|p| Ok((p.to_owned(), Names::new(&settings.base_url, &run, &p[..1])?)))
        .collect::<Result<_>>()?;
    let outcome = tokio::select! {
        outcome = run_parts(&settings, &names) => outcome,
        Ok(()) = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let mut cleanup = Ok(());
    for (_, n) in &names {
        if let Err(e) = remove(&settings.servers(), n).await {
            eprintln!("cleaning up {}: {e:#}", n.database);
            cleanup = Err(e);
        }
    }
    outcome.and(cleanup)
}

async fn run_parts(settings: &Settings, names: &[(String, Names)]) -> Result<()> {
    let mut report = Vec::new();
    for (part, n) in names {
        report.push(match part.as_str() {
            "single" => single(settings, n).await?,
            "many" => many(settings, n).await?,
            _ => load(settings, n).await?,
        });
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!("Machine: {cores} logical CPUs shared by the service, the client and the servers");
    for section in report {
        println!();
        print!("{section}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The service in process, and a client of it
// ---------------------------------------------------------------------------

/// The service with every role, and a pool of the bench's own on its database.
struct Running {
    service: Service,
    address: String,
    pool: PgPool,
}

impl Running {
    async fn start(settings: &Settings, names: &Names) -> Result<Running> {
        let servers = settings.servers();
        let service = Service::start(&servers, names, Roles::all()).await?;
        let address = service
            .address
            .clone()
            .ok_or_else(|| anyhow!("the service has no address"))?;
        let pool = postgres::connect(&names.db_url, 4).await?;
        Ok(Running {
            service,
            address,
            pool,
        })
    }

    async fn stop(self) -> Result<()> {
        self.service.stop().await
    }

    /// Replies ended in the store: (endings, distinct replies ended).
    async fn endings(&self) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT count(*), count(DISTINCT data->>'reply_id') FROM events
             WHERE event_type IN ('ReplyCompleted', 'ReplyFailed')",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Wait until `expected` replies have ended (or `limit` passes); how long it took.
    async fn drain(&self, expected: i64, limit: Duration) -> Result<(Duration, i64, i64)> {
        let start = Instant::now();
        loop {
            let (endings, distinct) = self.endings().await?;
            if distinct >= expected || start.elapsed() > limit {
                return Ok((start.elapsed(), endings, distinct));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A signed-in user of the service with an assistant and one conversation.
struct User {
    client: reqwest::Client,
    api: String,
    assistant: String,
    messages_url: String,
    token: String,
}

impl User {
    async fn sign_up(address: &str, tag: &str) -> Result<User> {
        let client = reqwest::Client::new();
        let api = |path: &str| format!("{address}/api/v1{path}");
        let email = format!("bench-{tag}@example.com");
        let password = "correct horse battery staple";
        let registered = client
            .post(api("/users"))
            .json(&json!({ "email": email, "password": password, "display_name": "Bench" }))
            .send()
            .await?;
        if registered.status() != reqwest::StatusCode::CREATED {
            bail!("registering answered {}", registered.status());
        }
        let token: Value = client
            .post(api("/auth/token"))
            .json(&json!({ "email": email, "password": password }))
            .send()
            .await?
            .json()
            .await?;
        let token = token["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("no access token: {token}"))?
            .to_owned();
        let created = |body: Value| {
            let (client, token) = (client.clone(), token.clone());
            async move {
                let body: Value = client
                    .post(body["url"].as_str().unwrap_or_default())
                    .bearer_auth(token)
                    .json(&body["json"])
                    .send()
                    .await?
                    .json()
                    .await?;
                body["id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow!("not created: {body}"))
            }
        };
        let assistant = created(json!({
            "url": api("/assistants"),
            "json": { "name": "Mika", "role": "secretary", "instructions": "Be brief." },
        }))
        .await?;
        let mut user = User {
            api: api(""),
            assistant,
            messages_url: String::new(),
            client,
            token,
        };
        user.new_conversation().await?;
        Ok(user)
    }

    /// Post into a new conversation from now on.
    async fn new_conversation(&mut self) -> Result<()> {
        let body: Value = self
            .client
            .post(format!("{}/conversations", self.api))
            .bearer_auth(&self.token)
            .json(&json!({ "assistant_id": self.assistant, "title": "A conversation" }))
            .send()
            .await?
            .json()
            .await?;
        let id = body["id"]
            .as_str()
            .ok_or_else(|| anyhow!("not created: {body}"))?;
        self.messages_url = format!("{}/conversations/{id}/messages", self.api);
        Ok(())
    }

    /// Post message `n`; its latency and status (0: no answer at all).
    async fn post(&self, n: usize) -> (Duration, u16) {
        let start = Instant::now();
        let status = self
            .client
            .post(&self.messages_url)
            .bearer_auth(&self.token)
            .json(&json!({ "content": message_content(n) }))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        (start.elapsed(), status)
    }
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

// ---------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------

/// How often (every how many messages of the long conversation) the control posts.
const CONTROL_EVERY: usize = 5;

/// The median of unsorted samples, in milliseconds.
fn median_ms(samples: &[Duration]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    pct(&sorted, 0.5)
}

/// Nearest-rank percentile of sorted samples, in milliseconds.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

/// Latencies by block (`blocks[i]` holds every sample of block i), as a
/// markdown table; and the last block's median over the first's.
fn block_table(blocks: &[Vec<Duration>], block: usize) -> (String, f64) {
    let mut out = String::from("| messages | median ms | p99 ms | max ms |\n|---|---|---|---|\n");
    let mut medians = Vec::new();
    for (i, samples) in blocks.iter().enumerate() {
        let mut sorted = samples.clone();
        sorted.sort();
        let median = pct(&sorted, 0.5);
        medians.push(median);
        out.push_str(&format!(
            "| {}–{} | {median:.1} | {:.1} | {:.1} |\n",
            i * block + 1,
            (i + 1) * block,
            pct(&sorted, 0.99),
            pct(&sorted, 1.0),
        ));
    }
    let ratio = medians.last().unwrap_or(&0.0) / medians.first().unwrap_or(&1.0);
    (out, ratio)
}

/// The answers that were not 202, counted by status.
fn refusals(statuses: impl IntoIterator<Item = u16>) -> String {
    let mut counted = std::collections::BTreeMap::<u16, usize>::new();
    for s in statuses.into_iter().filter(|s| *s != 202) {
        *counted.entry(s).or_default() += 1;
    }
    if counted.is_empty() {
        "none".into()
    } else {
        counted
            .iter()
            .map(|(s, n)| {
                format!(
                    "{n} × {}",
                    if *s == 0 {
                        "no answer".into()
                    } else {
                        s.to_string()
                    }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn verdict(ratio: f64) -> &'static str {
    if ratio <= FLAT_TARGET {
        "met"
    } else {
        "NOT met"
    }
}

// ---------------------------------------------------------------------------
// Parts
// ---------------------------------------------------------------------------

async fn single(settings: &Settings, names: &Names) -> Result<String> {
    let service = Running::start(settings, names).await?;
    let server = describe_server(&service.pool).await?;
    let user = User::sign_up(&service.address, "single").await?;
    // The same command in the same minutes on a conversation that stays short
    // (a new one each block): each block's ratio to it is the figure the
    // machine's load cannot move (the shared cores slow both alike).
    let mut control = User::sign_up(&service.address, "control").await?;
    let mut blocks: Vec<Vec<Duration>> = vec![Vec::new(); settings.messages / settings.block];
    let mut controls: Vec<Vec<Duration>> = vec![Vec::new(); blocks.len()];
    let mut statuses = Vec::with_capacity(settings.messages);
    let mut first_refusal = None;
    let started = Instant::now();
    for n in 0..blocks.len() * settings.block {
        if n % settings.block == 0 {
            control.new_conversation().await?;
        }
        let (latency, status) = user.post(n).await;
        blocks[n / settings.block].push(latency);
        if n % CONTROL_EVERY == 0 {
            let (latency, status) = control.post(n).await;
            controls[n / settings.block].push(latency);
            statuses.push(status);
        }
        if status != 202 && first_refusal.is_none() {
            first_refusal = Some((n + 1, status));
        }
        statuses.push(status);
        if (n + 1) % settings.block == 0 {
            eprintln!(
                "single: {} messages posted in {:.0} s",
                n + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let posting = started.elapsed();
    let accepted = statuses.iter().filter(|s| **s == 202).count() as i64;
    let (drained, endings, distinct) = service.drain(accepted, settings.drain).await?;
    service.stop().await?;
    let (table, ratio) = block_table(&blocks, settings.block);
    let (control_table, _) = block_table(&controls, settings.block);
    let relative: Vec<f64> = blocks
        .iter()
        .zip(&controls)
        .map(|(b, c)| median_ms(b) / median_ms(c))
        .collect();
    let adjusted = relative.last().unwrap_or(&0.0) / relative.first().unwrap_or(&1.0);
    Ok(format!(
        "### One user, one conversation, {} messages one at a time (replier running)\n\n\
         {server}\n\n{table}\n\
         Last block's median ÷ first block's: **{ratio:.2}** (target ≤ {FLAT_TARGET}: {}).\n\n\
         The control, every {CONTROL_EVERY}th message, a post into a conversation of at most \
         {} messages (a new one each block), in the same minutes:\n\n{control_table}\n\
         Each block's median over its control's: {}; the last ÷ the first: **{adjusted:.2}**.\n\
         Answers other than 202: {}{}.\n\
         Posting took {:.1} s; the last reply ended {:.1} s after the last post; \
         replies ended: {distinct} of {accepted} accepted ({endings} endings).\n",
        statuses.len(),
        verdict(ratio),
        settings.block / CONTROL_EVERY,
        relative
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        refusals(statuses.iter().copied()),
        first_refusal.map_or(String::new(), |(n, s)| format!(
            " (the first at message {n}: {s})"
        )),
        posting.as_secs_f64(),
        drained.as_secs_f64(),
    ))
}

async fn many(settings: &Settings, names: &Names) -> Result<String> {
    let service = Running::start(settings, names).await?;
    let mut users = Vec::new();
    for u in 0..settings.users {
        users.push(User::sign_up(&service.address, &format!("many-{u}")).await?);
    }
    let per_user = settings.user_messages / settings.user_block * settings.user_block;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for user in users {
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_user);
            for n in 0..per_user {
                samples.push(user.post(n).await);
            }
            samples
        }));
    }
    let mut blocks: Vec<Vec<Duration>> = vec![Vec::new(); per_user / settings.user_block];
    let mut statuses = Vec::new();
    for task in tasks {
        for (n, (latency, status)) in task.await?.into_iter().enumerate() {
            blocks[n / settings.user_block].push(latency);
            statuses.push(status);
        }
    }
    let posting = started.elapsed();
    let accepted = statuses.iter().filter(|s| **s == 202).count() as i64;
    let (drained, endings, distinct) = service.drain(accepted, settings.drain).await?;
    service.stop().await?;
    let (table, ratio) = block_table(&blocks, settings.user_block);
    Ok(format!(
        "### {} users, each in a conversation of their own, {per_user} messages each, one at a time\n\n\
         Rows: the same stretch of every user's conversation ({} samples per row).\n\n{table}\n\
         Last block's median ÷ first block's: **{ratio:.2}** (target ≤ {FLAT_TARGET}: {}).\n\
         Answers other than 202: {}. {} posts in {:.1} s ({:.0}/s); the last reply ended \
         {:.1} s after the last post; replies ended: {distinct} of {accepted} ({endings} endings).\n",
        settings.users,
        settings.users * settings.user_block,
        verdict(ratio),
        refusals(statuses.iter().copied()),
        statuses.len(),
        posting.as_secs_f64(),
        statuses.len() as f64 / posting.as_secs_f64(),
        drained.as_secs_f64(),
    ))
}

/// A conversation stream of `events` events, appended straight through the
/// store: a start, then posts (a message and its reply request, one append each).
async fn long_stream(store: &PgEventStore, events: usize) -> Result<Uuid> {
    let conversation = Uuid::now_v7();
    let metadata = EventMetadata {
        correlation_id: "bench".into(),
        ..Default::default()
    };
    let mut history = vec![ConversationEvent::ConversationStarted {
        conversation_id: conversation,
        owner_id: Uuid::now_v7(),
        assistant_id: Uuid::now_v7(),
        title: "A long conversation".into(),
        started_at: Utc::now(),
    }];
    let mut n = 0;
    while history.len() < events {
        let message_id = Uuid::now_v7();
        history.push(ConversationEvent::MessagePosted {
            message_id,
            content: message_content(n),
            posted_at: Utc::now(),
        });
        history.push(ConversationEvent::ReplyRequested {
            reply_id: Uuid::now_v7(),
            reply_to: message_id,
            assistant_id: Uuid::nil(),
            requested_at: Utc::now(),
        });
        n += 1;
    }
    history.truncate(events);
    for (i, chunk) in history.chunks(500).enumerate() {
        store
            .append(AppendRequest {
                stream_id: conversation,
                stream_type: "conversation",
                expected_version: (i * 500) as i64,
                events: chunk
                    .iter()
                    .map(|e| codec::encode(e, &metadata))
                    .collect::<Result<_, _>>()?,
                reservation: None,
                idempotency: None,
                user_key: None,
            })
            .await
            .map_err(|e| anyhow!("appending the long stream: {e}"))?;
    }
    Ok(conversation)
}

async fn load(settings: &Settings, names: &Names) -> Result<String> {
    let pool = postgres::connect(&names.db_url, 4).await?;
    let server = describe_server(&pool).await?;
    let store = PgEventStore::new(pool.clone(), CoalescingConfig::default());
    let conversation = long_stream(&store, settings.load_events).await?;
    sqlx::query("VACUUM ANALYZE events").execute(&pool).await?;
    let store: Arc<dyn EventStore> = Arc::new(store);
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..settings.load_rounds {
        let keyring = Keyring::new(MasterKey::from_hex(DEV_ENCRYPTION_KEY)?, store.clone());
        let commands = Commands::new(
            store.clone(),
            StateCache::new(STATE_CACHE_DEFAULT_BYTES),
            keyring,
        );
        let start = Instant::now();
        let loaded = commands.load::<ConversationDecider>(conversation).await?;
        cold.push(start.elapsed());
        if loaded.version != settings.load_events as i64 {
            bail!(
                "loaded version {} of {}",
                loaded.version,
                settings.load_events
            );
        }
        let start = Instant::now();
        commands.load::<ConversationDecider>(conversation).await?;
        warm.push(start.elapsed());
    }
    cold.sort();
    warm.sort();
    let (cold_ms, warm_ms) = (pct(&cold, 0.5), pct(&warm, 0.5));
    Ok(format!(
        "### Loading a conversation of {} events (`Commands::load`)\n\n{server}\n\n\
         | load | median ms | min ms | max ms |\n|---|---|---|---|\n\
         | cold (new `Commands`, empty state cache) | {cold_ms:.1} | {:.1} | {:.1} |\n\
         | warm (same `Commands`, again) | {warm_ms:.2} | {:.2} | {:.2} |\n\n\
         Cold ÷ warm: {:.0}×; cold load target ≤ {COLD_LOAD_TARGET_MS} ms: {} \
         ({} rounds).\n",
        settings.load_events,
        pct(&cold, 0.0),
        pct(&cold, 1.0),
        pct(&warm, 0.0),
        pct(&warm, 1.0),
        cold_ms / warm_ms,
        if cold_ms <= COLD_LOAD_TARGET_MS {
            "met"
        } else {
            "NOT met"
        },
        settings.load_rounds,
    ))
}
