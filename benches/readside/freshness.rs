//! Part 1, freshness: the service in this process under command load, first
//! closed loop for the sustained rate, then open loop at fractions of it (see
//! `open_loop.rs`); the report of each phase, and how busy the machine was.

use std::time::{Duration, Instant};

use ai_secretary::{startup::Roles, store::postgres};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use sqlx::PgPool;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::{
    Settings,
    api::{Api, created_id, sign_up},
    cell,
    common::describe_server,
    message_content, ms,
    open_loop::{PROBE_CONVERSATIONS, Phase, open_loop},
    pct,
    service::{Names, Service},
    support::progress::{caught_up, consumers},
    trace::Tracer,
};

/// Load levels of part 1, as fractions of the carried rate (see `freshness_on`).
const LEVELS: [f64; 3] = [0.25, 0.5, 1.0];
/// Freshness target: p99 at 50 % load.
const FRESHNESS_TARGET_MS: f64 = 25.0;

/// How long the replies of a phase may take to end after it.
const REPLIES_PATIENCE: Duration = Duration::from_secs(300);

/// `count` fresh conversations with `assistant`, then a read side caught up
/// with them and with every reply requested before: a level measures the
/// pipeline at its rate, not while the replier still works off the phase
/// before it (the closed loop leaves a backlog of replies behind).
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
    let waited = replies_ended(pool).await?;
    if waited > Duration::from_secs(1) {
        eprintln!(
            "freshness: waited {:.1} s for the replies of the phase before",
            waited.as_secs_f64()
        );
    }
    Ok(conversations)
}

/// Wait until the read side is at the head of the store and no reply is
/// queued or in progress; returns how long that took.
async fn replies_ended(pool: &PgPool) -> Result<Duration> {
    let started = Instant::now();
    loop {
        caught_up(pool, &consumers(), Duration::from_secs(60)).await?;
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM messages WHERE status IN ('queued', 'in_progress')",
        )
        .fetch_one(pool)
        .await?;
        if waiting == 0 {
            break;
        }
        if started.elapsed() > REPLIES_PATIENCE {
            bail!("{waiting} replies still not ended after {REPLIES_PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(started.elapsed())
}

pub async fn freshness(settings: &Settings, names: &Names) -> Result<String> {
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
         {:.0} s warm-up + {:.0} s measured; levels: fractions of the {} rate, {:.0} s each, \
         open loop over {} clients and {} fresh conversations; {measured}; a pending \
         conversation is polled every {:.1} ms (`GET …/messages?order=desc&limit=10`, no \
         X-Consistency-Token)",
        settings.clients,
        settings.warmup.as_secs_f64(),
        settings.sustain.as_secs_f64(),
        if settings.levels_of_carried {
            "carried (replies included)"
        } else {
            "accepted"
        },
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
            match (p.offered, p.carried) {
                (Some(offered), _) => format!("{offered:.0}"),
                (None, Some(carried)) => format!("closed loop (carried {carried:.0})"),
                (None, None) => "closed loop".into(),
            },
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
    let started = Instant::now();
    let (mut sustained, accepted) = sustained_rate(settings, &api, &conversations).await?;
    sustained.cpu_busy = cpu.busy_since();
    // The closed loop measures how fast commands are accepted; the replies they
    // ask for are still being written when it stops. The rate the whole service
    // carries is every accepted command over the time until its replies ended
    // and every projection applied them: the load levels are fractions of that.
    replies_ended(pool).await?;
    let carried = accepted as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "freshness: accepted {:.0} commands/s; carried, replies included, {carried:.0} commands/s",
        sustained.achieved
    );
    sustained.carried = Some(carried);
    let rate = if settings.levels_of_carried {
        carried
    } else {
        sustained.achieved
    };
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

/// Closed loop: each client posts, waits for the answer, posts again. Returns
/// the phase (its rate counts the measured window) and every command accepted,
/// warm-up included.
async fn sustained_rate(
    settings: &Settings,
    api: &Api,
    conversations: &[Uuid],
) -> Result<(Phase, usize)> {
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
            let mut accepted = 0;
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
                accepted += usize::from(ok);
                if done >= counted_from && done < until {
                    if ok {
                        latencies.push(done - sent);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors, accepted)
        });
    }
    let mut phase = Phase {
        label: format!("sustained ({} clients)", settings.clients),
        ..Phase::default()
    };
    let mut accepted = 0;
    while let Some(joined) = clients.join_next().await {
        let (latencies, errors, ok) = joined.context("a client task panicked")?;
        phase.command_latencies.extend(latencies);
        phase.errors += errors;
        accepted += ok;
    }
    phase.command_latencies.sort_unstable();
    phase.achieved = phase.command_latencies.len() as f64 / settings.sustain.as_secs_f64();
    Ok((phase, accepted))
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
