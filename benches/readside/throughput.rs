//! Part 2, projection throughput: the backlog (`backlog.rs`) applied by the raw
//! upsert baseline (`raw.rs`), by the `messages` projection alone and by every
//! projection, rounds alternating; each run's batches from the checkpoint
//! notifications; the report.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use ai_secretary::{startup::Roles, store::postgres};
use ai_secretary_projections::projections::messages;
use anyhow::{Context, Result, anyhow, bail};
use sqlx::{AssertSqlSafe, PgPool, postgres::PgListener};

use crate::{
    CHECKPOINT_CHANNEL, Settings,
    backlog::{BACKLOG_WRITERS, POSTS_PER_CONVERSATION, build_backlog},
    cell, parse_position, pct,
    raw::{self, RAW_ROWS_PER_TX, raw_upserts},
    service::{Names, Service, delete_redis_keys},
    support::progress::{Position, checkpoints},
};

/// Tables the projections own, emptied before each projection run.
const READ_MODEL_TABLES: &str = "assistants, assistants_conversations, conversations, messages, \
     messages_conversations, usage_daily, usage_conversations, cache_conversations, dead_letters";

/// Throughput target: projection ÷ raw.
const THROUGHPUT_TARGET: f64 = 0.8;

pub async fn throughput(settings: &Settings, names: &Names) -> Result<String> {
    eprintln!("throughput: creating database {}", names.database);
    let pool = postgres::connect(&names.db_url, 4)
        .await
        .with_context(|| format!("creating and migrating {}", names.database))?;
    let outcome = throughput_on(settings, names, &pool).await;
    pool.close().await;
    outcome
}

/// A projection's batch commits in one run.
pub struct Batches {
    name: String,
    /// Events per batch.
    sizes: Vec<usize>,
    /// Sorted time between consecutive commits.
    intervals: Vec<Duration>,
    /// From the start of the run to the first commit.
    first: Option<Duration>,
}

/// One timed run.
pub struct Run {
    pub elapsed: Duration,
    /// For projection runs: each projection's time to the head.
    pub per_projection: Vec<(String, Duration)>,
    /// For projection runs: each one's batch commits.
    pub batches: Vec<Batches>,
}

async fn throughput_on(settings: &Settings, names: &Names, pool: &PgPool) -> Result<String> {
    let backlog = build_backlog(settings, names, pool).await?;
    let order = positions(pool).await?;
    let baseline = raw::baseline(pool).await?;
    let raw_rows = baseline.upserts.len();

    let all_names = ai_secretary::startup::projection_names();
    let (mut raws, mut singles, mut alls, mut caches) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..settings.rounds {
        eprintln!("throughput: round {} of {}", round + 1, settings.rounds);
        checkpoint(pool).await;
        raws.push(Run {
            elapsed: raw_upserts(&names.db_url, &baseline).await?,
            per_projection: Vec::new(),
            batches: Vec::new(),
        });
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
        baseline.rows_of(&messages::MESSAGES),
        baseline.rows_of(&messages::CONVERSATIONS),
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
async fn positions(pool: &PgPool) -> Result<Vec<Position>> {
    sqlx::query_as(
        "SELECT transaction_id::text::int8, global_position FROM events
         ORDER BY events.transaction_id, events.global_position",
    )
    .fetch_all(pool)
    .await
    .context("reading event positions")
}

/// Start an instance with only `projections`, time it from just before it is
/// built until every one of their checkpoints is at the head, and gather their
/// batch commits from the checkpoint notifications.
async fn projection_run(
    settings: &Settings,
    names: &Names,
    pool: &PgPool,
    order: &[Position],
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
    let mut commits: HashMap<String, Vec<(Instant, Position)>> = HashMap::new();
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
                    let Some(pos) = parse_position(at) else {
                        continue;
                    };
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
                            && at.get(name).is_some_and(|c| c.position >= head)
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
