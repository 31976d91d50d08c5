//! Rebuild benchmark: how fast `replay --all` rebuilds every projection from the
//! event store, against a raw sequential read of the same events in the same run.
//!
//! A fresh `ai_secretary_bench_<hex>_r` database (real migrations) is filled with
//! `BENCH_EVENTS` (default 1,000,000) events in the documented wire format
//! (docs/events.md), generated server-side by `INSERT … SELECT` over
//! `generate_series`: users, two assistants each, and conversations of
//! `ConversationStarted` then rounds of `MessagePosted`, `ReplyRequested`,
//! `ReplyCompleted`, in chunks of 100,000 events per transaction. Then:
//!
//! - **raw read**: one streaming `SELECT` of the events in commit order, the same
//!   query, columns and Rust types the rebuild reads (`data` as text, borrowed),
//!   and nothing else: no JSON decoding, no fold, no writes;
//! - **rebuild**: `projections::rebuild::rebuild` of all five projections (fold
//!   in memory, write `__next` tables, indexes, swap), as `replay --all` runs it.
//!
//! Knobs: `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/`),
//! `BENCH_EVENTS`. The database is dropped at the end (also on error or Ctrl-C).
//! Run with `cargo bench --bench rebuild`; the table goes to stdout.

#[path = "common/mod.rs"]
mod common;

/// The service's allocator (`src/main.rs`), so the rebuild runs as `replay
/// --all` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{env, time::Instant};

use ai_secretary::{config::DEV_ENCRYPTION_KEY, crypto::MasterKey, recovery::opener};
use ai_secretary_projections::{NAMES, rebuild};
use anyhow::{Context, Result, anyhow};
use common::{describe_server, env_or, with_database};
use futures_util::TryStreamExt;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool, Row};
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/";
/// Events per generating transaction.
const CHUNK: i64 = 100_000;
/// Rounds of (MessagePosted, ReplyRequested, ReplyCompleted) per conversation.
const ROUNDS: i64 = 10;
/// Events per conversation: started + the rounds.
const PER_CONVERSATION: i64 = 1 + 3 * ROUNDS;
const USERS: i64 = 1_000;

#[tokio::main]
async fn main() -> Result<()> {
    if !env::args().any(|a| a == "--bench") {
        eprintln!("rebuild bench: skipped (run it with `cargo bench --bench rebuild`)");
        return Ok(());
    }
    let base = env::var("BENCH_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    let events: i64 = env_or("BENCH_EVENTS", 1_000_000)?;
    let database = format!("ai_secretary_bench_{}_r", Uuid::new_v4().simple());
    let url = with_database(&base, &database)?;
    let outcome = tokio::select! {
        outcome = run(&url, events) => outcome,
        Ok(()) = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let mut admin = PgConnection::connect(&with_database(&base, "postgres")?).await?;
    admin
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        )))
        .await
        .with_context(|| format!("dropping {database}"))?;
    outcome
}

async fn run(url: &str, events: i64) -> Result<()> {
    let pool = ai_secretary::store::postgres::connect(url, 4).await?;
    eprintln!("generating {events} events…");
    let started = Instant::now();
    let generated = generate(&pool, events).await?;
    eprintln!(
        "generated {generated} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    pool.execute("VACUUM ANALYZE events").await?;
    pool.execute("CHECKPOINT").await?;

    // Raw: the same rows, order and columns as the rebuild's read; nothing more.
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut rows = sqlx::query(
        "SELECT event_id, stream_id, stream_type, version, event_type, schema_version,
                transaction_id::text::int8 AS transaction_id, global_position, recorded_at,
                data::text AS data
         FROM events ORDER BY events.transaction_id, events.global_position",
    )
    .fetch(&mut *conn);
    let mut read = 0u64;
    let mut bytes = 0usize;
    while let Some(row) = rows.try_next().await? {
        let _: Uuid = row.try_get(0)?;
        let _: Uuid = row.try_get(1)?;
        let stream_type: String = row.try_get(2)?;
        let _: i64 = row.try_get(3)?;
        let event_type: String = row.try_get(4)?;
        let _: i32 = row.try_get(5)?;
        let _: i64 = row.try_get(6)?;
        let _: i64 = row.try_get(7)?;
        let _: chrono::DateTime<chrono::Utc> = row.try_get(8)?;
        let data: &str = row.try_get(9)?;
        bytes += stream_type.len() + event_type.len() + data.len();
        read += 1;
    }
    drop(rows);
    drop(conn);
    let raw_seconds = started.elapsed().as_secs_f64();
    std::hint::black_box(bytes);

    pool.execute("CHECKPOINT").await?;
    let started = Instant::now();
    let master = MasterKey::from_hex(DEV_ENCRYPTION_KEY)?;
    let db = ai_secretary_projections::Db::Postgres(pool.clone());
    let rebuilt = rebuild::rebuild(&db, opener(master, &db), &NAMES, None, &|step| {
        let at = started.elapsed().as_secs_f64();
        match step {
            rebuild::Step::Started { events, .. } => {
                eprintln!("  {at:>6.1} s: reading {events} events");
            }
            rebuild::Step::Folded { events } if events % 250_000 == 0 => {
                eprintln!("  {at:>6.1} s: {events} folded");
            }
            rebuild::Step::Writing { projection } => {
                eprintln!("  {at:>6.1} s: writing {projection}");
            }
            rebuild::Step::Swapped { projection, .. } => {
                eprintln!("  {at:>6.1} s: swapped {projection}");
            }
            _ => {}
        }
    })
    .await?;
    let rebuild_seconds = started.elapsed().as_secs_f64();

    let mut counts = Vec::new();
    for table in ["assistants", "conversations", "messages", "usage_daily"] {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&pool)
            .await?;
        counts.push(format!("{table} {n}"));
    }

    println!("{}", describe_server(&pool).await?);
    println!();
    println!("| path | events | seconds | events/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| raw sequential read (same query and columns, no decoding) | {read} | {raw_seconds:.2} | {:.0} |",
        read as f64 / raw_seconds
    );
    println!(
        "| full rebuild, all 5 projections (`replay --all`) | {} | {rebuild_seconds:.2} | {:.0} |",
        rebuilt.events,
        rebuilt.events as f64 / rebuild_seconds
    );
    println!();
    println!("rows written: {}", counts.join(", "));
    Ok(())
}

/// Fill the store: users, two assistants each, then conversations (in chunks of
/// about `CHUNK` events per transaction) until `events` are written.
async fn generate(pool: &PgPool, events: i64) -> Result<i64> {
    // Ids are derived from numbers (md5 → uuid) so the chunks can refer to each
    // other; timestamps advance one second per conversation.
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data, metadata)
         SELECT gen_random_uuid(), md5('user' || u)::uuid, 'user', 1, 'UserRegistered',
                jsonb_build_object('user_id', md5('user' || u)::uuid,
                    'email', 'user' || u || '@example.com', 'display_name', 'User ' || u,
                    'password_hash', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA',
                    'registered_at', to_jsonb(timestamptz '2026-01-01' + u * interval '1 s')),
                jsonb_build_object('correlation_id', gen_random_uuid(), 'user_id', md5('user' || u)::uuid)
         FROM generate_series(0, $1 - 1) AS u ORDER BY u",
    )
    .bind(USERS)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data, metadata)
         SELECT gen_random_uuid(), md5('assistant' || a)::uuid, 'assistant', 1, 'AssistantCreated',
                jsonb_build_object('assistant_id', md5('assistant' || a)::uuid,
                    'owner_id', md5('user' || (a / 2))::uuid, 'name', 'Assistant ' || a,
                    'role', 'secretary', 'instructions', 'Be brief and kind.',
                    'model', 'gemini-2.0-flash', 'temperature', 0.7,
                    'metadata', jsonb_build_object('team', 'bench'),
                    'created_at', to_jsonb(timestamptz '2026-01-02' + a * interval '1 s')),
                jsonb_build_object('correlation_id', gen_random_uuid(), 'user_id', md5('user' || (a / 2))::uuid)
         FROM generate_series(0, $1 - 1) AS a ORDER BY a",
    )
    .bind(USERS * 2)
    .execute(pool)
    .await?;
    let conversations = (events - 3 * USERS).max(0) / PER_CONVERSATION;
    let per_chunk = (CHUNK / PER_CONVERSATION).max(1);
    let mut first = 0;
    while first < conversations {
        let last = (first + per_chunk).min(conversations) - 1;
        // j = 0 starts conversation c; then round r = (j-1)/3 posts, requests and
        // completes a reply. User u = c % USERS owns it, with assistant 2u + c % 2.
        sqlx::query(
            "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data, metadata)
             SELECT gen_random_uuid(), md5('conversation' || c)::uuid, 'conversation', j + 1,
                    CASE WHEN j = 0 THEN 'ConversationStarted'
                         WHEN (j - 1) % 3 = 0 THEN 'MessagePosted'
                         WHEN (j - 1) % 3 = 1 THEN 'ReplyRequested'
                         ELSE 'ReplyCompleted' END,
                    CASE WHEN j = 0 THEN jsonb_build_object(
                             'conversation_id', md5('conversation' || c)::uuid,
                             'owner_id', md5('user' || (c % $3))::uuid,
                             'assistant_id', md5('assistant' || (2 * (c % $3) + c % 2))::uuid,
                             'title', 'Conversation ' || c, 'started_at', to_jsonb(at))
                         WHEN (j - 1) % 3 = 0 THEN jsonb_build_object(
                             'message_id', md5('message' || c || '.' || j)::uuid,
                             'content', 'Could you summarise the meeting notes from ' || c || ' for me, with the action items first?',
                             'posted_at', to_jsonb(at))
                         WHEN (j - 1) % 3 = 1 THEN jsonb_build_object(
                             'reply_id', md5('reply' || c || '.' || j)::uuid,
                             'reply_to', md5('message' || c || '.' || (j - 1))::uuid,
                             'assistant_id', md5('assistant' || (2 * (c % $3) + c % 2))::uuid,
                             'requested_at', to_jsonb(at))
                         ELSE jsonb_build_object(
                             'reply_id', md5('reply' || c || '.' || (j - 1))::uuid,
                             'content', 'Here is the summary. Action items: send the budget, book the room, and confirm the agenda with the team by Friday.',
                             'model', CASE WHEN c % 3 = 0 THEN 'gemini-2.0-pro' ELSE 'gemini-2.0-flash' END,
                             'finish_reason', 'stop',
                             'usage', jsonb_build_object('prompt_tokens', 40 + j, 'completion_tokens', 30 + c % 50,
                                                         'total_tokens', 70 + j + c % 50),
                             'latency_ms', 800 + c % 400,
                             'completed_at', to_jsonb(at + interval '2 s')) END,
                    jsonb_build_object('correlation_id', gen_random_uuid(), 'user_id', md5('user' || (c % $3))::uuid)
             FROM generate_series($1::int8, $2::int8) AS c,
                  generate_series(0, $4::int8 - 1) AS j,
                  LATERAL (SELECT timestamptz '2026-02-01' + c * interval '1 min' + j * interval '1 s' AS at) t
             ORDER BY c, j",
        )
        .bind(first)
        .bind(last)
        .bind(USERS)
        .bind(PER_CONVERSATION)
        .execute(pool)
        .await?;
        first = last + 1;
    }
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?)
}
