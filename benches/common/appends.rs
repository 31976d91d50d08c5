//! What the append benchmarks share, whichever store they measure: the
//! scenarios' shape, one writer's events, the measured window, the figures of
//! one measurement and the markdown tables they print.
//!
//! Each bench compares two paths on one freshly created database: **raw**
//! (one writer, one connection, one autocommit INSERT per append) and
//! **store** (the event store's `append`, which coalesces queued appends).

use std::{
    fmt::Display,
    time::{Duration, Instant},
};

use ai_secretary::store::{AppendRequest, EventMetadata, EventStore, NewEvent};
use anyhow::{Context, Result, bail};
use serde_json::json;
use uuid::Uuid;

pub const STREAM_TYPE: &str = "bench";
pub const EVENT_TYPE: &str = "BenchTaskNoted";

pub struct Scenario {
    pub name: &'static str,
    pub writers: usize,
    pub events_per_append: usize,
    /// The store ÷ raw events/s ratio the store must reach.
    pub target: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Raw,
    Store,
}

impl Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Raw => "raw",
            Path::Store => "store",
        })
    }
}

/// One writer's stream and the shape of what it appends.
pub struct Writer {
    pub stream_id: Uuid,
    user_id: Uuid,
    assistant_id: Uuid,
    pub events_per_append: usize,
}

impl Writer {
    pub fn new(stream_id: Uuid, events_per_append: usize) -> Self {
        Self {
            stream_id,
            user_id: Uuid::now_v7(),
            assistant_id: Uuid::now_v7(),
            events_per_append,
        }
    }

    /// One append's events: a ~200-byte data object and the metadata the service
    /// writes (a correlation id per command, the acting user).
    pub fn events(&self) -> Result<Vec<NewEvent>> {
        let metadata = serde_json::to_value(EventMetadata {
            correlation_id: Uuid::new_v4().to_string(),
            causation_id: None,
            user_id: Some(self.user_id),
            idempotency_key: None,
        })?;
        Ok((0..self.events_per_append)
            .map(|_| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: EVENT_TYPE.to_owned(),
                schema_version: 1,
                data: json!({
                    "task_id": Uuid::now_v7(),
                    "assistant_id": self.assistant_id,
                    "title": "Prepare the quarterly board pack",
                    "due_at": "2026-12-01T09:00:00Z",
                    "priority": "high",
                }),
                metadata: metadata.clone(),
            })
            .collect())
    }

    /// The byte sizes of one event's data and metadata, for the report.
    pub fn sample_sizes() -> Result<(usize, usize)> {
        let sample = Writer::new(Uuid::nil(), 1).events()?;
        Ok((
            serde_json::to_vec(&sample[0].data)?.len(),
            serde_json::to_vec(&sample[0].metadata)?.len(),
        ))
    }
}

/// The wall-time window of one measurement.
#[derive(Clone, Copy)]
pub struct Window {
    /// Appends completing before this are warm-up.
    pub counted_from: Instant,
    /// No append starts at or after this; completions after it are not counted.
    pub until: Instant,
}

impl Window {
    pub fn starting_now(warmup: Duration, measured: Duration) -> Window {
        let start = Instant::now();
        Window {
            counted_from: start + warmup,
            until: start + warmup + measured,
        }
    }

    pub fn record(&self, latencies: &mut Vec<Duration>, started: Instant) {
        let finished = Instant::now();
        if finished >= self.counted_from && finished < self.until {
            latencies.push(finished - started);
        }
    }
}

pub struct Measurement {
    pub path: Path,
    pub events_per_append: usize,
    pub measured: Duration,
    /// Sorted latencies of the appends that completed in the window.
    pub latencies: Vec<Duration>,
    /// Events per distinct transaction over the whole run, warm-up included.
    pub events_per_commit: f64,
}

impl Measurement {
    pub fn appends_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.measured.as_secs_f64()
    }

    pub fn events_per_sec(&self) -> f64 {
        self.appends_per_sec() * self.events_per_append as f64
    }

    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

/// Nearest-rank percentile of sorted, non-empty `sorted`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The measurement with the median events/s.
pub fn median(mut runs: Vec<Measurement>) -> Measurement {
    runs.sort_by(|a, b| a.events_per_sec().total_cmp(&b.events_per_sec()));
    runs.swap_remove(runs.len() / 2)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One scenario's rounds: each path's median, and the store ÷ raw ratio of
/// every round (raw and store alternate, so one quiet or noisy stretch of the
/// machine cannot decide the ratio).
pub struct Compared<'a> {
    pub scenario: &'a Scenario,
    pub raw: Measurement,
    pub store: Measurement,
    pub round_ratios: Vec<f64>,
}

impl<'a> Compared<'a> {
    pub fn new(scenario: &'a Scenario, raws: Vec<Measurement>, stores: Vec<Measurement>) -> Self {
        let round_ratios = raws
            .iter()
            .zip(&stores)
            .map(|(r, s)| s.events_per_sec() / r.events_per_sec())
            .collect();
        Compared {
            scenario,
            raw: median(raws),
            store: median(stores),
            round_ratios,
        }
    }

    fn ratio(&self) -> f64 {
        self.store.events_per_sec() / self.raw.events_per_sec()
    }
}

/// The figures table, each scenario's ratios by round, and the targets table.
pub fn print_tables(compared: &[Compared]) {
    println!(
        "| scenario | path | appends/s | events/s | p50 ms | p99 ms | events/commit | store ÷ raw |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for c in compared {
        for m in [&c.raw, &c.store] {
            let ratio = if m.path == Path::Store {
                format!("**{:.2}×**", c.ratio())
            } else {
                String::new()
            };
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {ratio} |",
                c.scenario.name,
                m.path,
                m.appends_per_sec(),
                m.events_per_sec(),
                ms(m.percentile(0.50)),
                ms(m.percentile(0.99)),
                m.events_per_commit,
            );
        }
    }
    println!();
    for c in compared {
        let ratios: Vec<String> = c.round_ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "- {}: store ÷ raw by round: {}",
            c.scenario.name,
            ratios.join(", ")
        );
    }
    println!();
    println!("| scenario | store ÷ raw | target | met |");
    println!("|---|---:|---:|---|");
    for c in compared {
        let ratio = c.ratio();
        println!(
            "| {} | {ratio:.2}× | ≥ {:.1}× | {} |",
            c.scenario.name,
            c.scenario.target,
            if ratio >= c.scenario.target {
                "yes"
            } else {
                "no"
            }
        );
    }
    println!();
}

/// Loop `store.append` on the writer's own stream (the store path of either bench).
pub async fn store_writer<S: EventStore>(
    store: S,
    writer: Writer,
    window: Window,
) -> Result<Vec<Duration>> {
    let per_append = writer.events_per_append as i64;
    let mut version = 0_i64;
    let mut latencies = Vec::new();
    loop {
        let events = writer.events()?;
        let started = Instant::now();
        if started >= window.until {
            break;
        }
        let appended = store
            .append(AppendRequest {
                stream_id: writer.stream_id,
                stream_type: STREAM_TYPE,
                expected_version: version,
                events,
                reservation: None,
                idempotency: None,
                user_key: None,
            })
            .await
            .with_context(|| {
                format!(
                    "store append on stream {} at expected version {version}",
                    writer.stream_id
                )
            })?;
        if appended.version != version + per_append {
            bail!(
                "store append on stream {} answered version {}, not {}",
                writer.stream_id,
                appended.version,
                version + per_append
            );
        }
        version = appended.version;
        window.record(&mut latencies, started);
    }
    Ok(latencies)
}
