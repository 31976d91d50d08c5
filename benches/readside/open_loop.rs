//! Part 1's open loop: sends scheduled at a fixed rate over several clients,
//! and which of them are measured (every one, or one per free probe slot),
//! each measured 202 handed to a poller (`poller.rs`).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinSet, time::sleep_until};
use uuid::Uuid;

use crate::{
    Settings,
    api::Api,
    message_content, parse_position,
    poller::{Pending, poller},
    support::http::consistency,
    trace::Trace,
};

/// One load phase's results: an open-loop level here, and the closed-loop
/// sustained phase of `freshness.rs`, which reports both.
#[derive(Default)]
pub struct Phase {
    pub label: String,
    pub offered: Option<f64>,
    /// 2xx received within the window, per second.
    pub achieved: f64,
    /// Closed loop only: every accepted command over the time until its
    /// replies ended and the read side applied them (the rate the whole
    /// service carries, and what the load levels are fractions of).
    pub carried: Option<f64>,
    pub errors: usize,
    /// Failed commands by what they got back.
    pub error_kinds: BTreeMap<String, usize>,
    /// Sorted: scheduled (or sent, closed loop) → response.
    pub command_latencies: Vec<Duration>,
    /// Sorted: 202 received → first listing received.
    pub freshness: Vec<Duration>,
    pub unresolved: usize,
    pub poll_errors: usize,
    pub polls_per_sec: f64,
    /// Sorted latencies of the polling GETs.
    pub poll_latencies: Vec<Duration>,
    /// Share of the machine's CPU time busy during the phase (all processes).
    pub cpu_busy: Option<f64>,
    /// Sorted, signed ms per measured command: 202 → on NATS, NATS → `messages`
    /// committed, committed → listed; and how many commands were traced.
    pub stages: Option<([Vec<f64>; 3], usize)>,
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
pub const PROBE_CONVERSATIONS: usize = 8;

/// Open loop at `rate` commands/s for one level, over `regular` conversations and,
/// when sampling, `probe` conversations (`PROBE_CONVERSATIONS` per slot).
pub async fn open_loop(
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
            position = consistency(&r).as_deref().and_then(parse_position);
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
