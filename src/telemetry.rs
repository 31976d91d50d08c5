//! Logging through `tracing`: JSON or pretty on stdout, and daily-rotated files
//! (30 kept) when a log directory is given. Filter with `RUST_LOG`. Metrics go
//! through the `metrics` facade to a Prometheus recorder rendered at `/metrics`.

use std::path::Path;

use tracing_appender::{non_blocking::WorkerGuard, rolling};
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::LogFormat;

/// Install the global subscriber. Keep the guard alive: it flushes the file writer.
pub fn init(format: LogFormat, dir: Option<&Path>) -> anyhow::Result<Option<WorkerGuard>> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let stdout = match format {
        LogFormat::Json => fmt::layer().json().flatten_event(true).boxed(),
        LogFormat::Pretty => fmt::layer().boxed(),
    };
    let (file, guard) = match dir {
        Some(dir) => {
            let appender = rolling::Builder::new()
                .rotation(rolling::Rotation::DAILY)
                .filename_prefix("ai-secretary")
                .filename_suffix("log")
                .max_log_files(30)
                .build(dir)?;
            let (writer, guard) = tracing_appender::non_blocking(appender);
            let layer = fmt::layer()
                .json()
                .flatten_event(true)
                .with_ansi(false)
                .with_writer(writer);
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stdout)
        .with(file)
        .try_init()?;
    Ok(guard)
}

/// Histogram buckets, in seconds, of request and LLM latencies and pool waits.
/// Prometheus needs buckets (not the exporter's default summaries) to compute
/// p95 across replicas with `histogram_quantile`.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// LLM calls take seconds, not milliseconds.
const LLM_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0];
/// Commands per append transaction (the coalescer's batches, up to APPEND_MAX_BATCH).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The process's Prometheus recorder, installed on first use (with the help
/// texts and zeroed series of [`describe_metrics`]).
pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        let builder = [
            ("http_request_duration_seconds", LATENCY_BUCKETS),
            ("db_pool_acquire_seconds", LATENCY_BUCKETS),
            ("llm_request_duration_seconds", LLM_BUCKETS),
            ("llm_quota_wait_seconds", LLM_BUCKETS),
            ("append_batch_size", BATCH_BUCKETS),
        ]
        .into_iter()
        .try_fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
            builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
        })
        .expect("the bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Only one recorder per process: if another was installed first, this
        // handle renders nothing, which is better than failing to start.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        } else {
            describe_metrics();
        }
        handle
    })
}

/// The Prometheus text of every metric, for `/metrics`.
pub fn render() -> String {
    let handle = metrics();
    // No background upkeep task is running: drain histogram buffers here.
    handle.run_upkeep();
    handle.render()
}

/// Describe every metric the service exports (help text and unit, so
/// `promtool check metrics` is clean), and create the series whose labels are
/// known in advance at zero, so dashboards and alerts see them from the first
/// scrape instead of "no data". Series labelled by a projection are created by
/// its worker, `db_pool_*` gauges by the pool sampler, `http_*` with the first
/// request of each route.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

    describe_counter!(
        "http_requests_total",
        Unit::Count,
        "HTTP requests answered, by method, matched route and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request (to the response head), by method and matched route"
    );

    describe_counter!(
        "events_appended_total",
        Unit::Count,
        "Events committed to the event store, by event type"
    );
    describe_histogram!(
        "append_batch_size",
        Unit::Count,
        "Commands coalesced into one append transaction"
    );

    describe_counter!(
        "relay_published_total",
        Unit::Count,
        "Events the relay published to JetStream (acknowledged)"
    );
    describe_gauge!(
        "relay_position",
        Unit::Count,
        "Global position of the last event the relay published"
    );
    describe_gauge!(
        "relay_lag_events",
        Unit::Count,
        "Committed events the relay has not published yet (sampled)"
    );
    describe_gauge!(
        "relay_lag_seconds",
        Unit::Seconds,
        "Age of the oldest committed event the relay has not published yet, 0 when caught up (sampled)"
    );

    describe_counter!(
        "projection_events_total",
        Unit::Count,
        "Events applied by a projection"
    );
    describe_gauge!(
        "projection_position",
        Unit::Count,
        "Global position of a projection's checkpoint"
    );
    describe_gauge!(
        "projection_lag_events",
        Unit::Count,
        "Committed events a projection has not applied yet (sampled)"
    );
    describe_gauge!(
        "projection_lag_seconds",
        Unit::Seconds,
        "Age of the oldest committed event a projection has not applied yet, 0 when caught up (sampled)"
    );
    describe_counter!(
        "projection_failures_total",
        Unit::Count,
        "Projection batches that failed and were retried from the checkpoint"
    );
    describe_counter!(
        "projection_dead_letters_total",
        Unit::Count,
        "Poison events a projection parked in dead_letters"
    );
    describe_counter!(
        "projection_batches_total",
        Unit::Count,
        "Projection batches committed, by projection and how: move_alone, one_statement or transaction"
    );
    describe_counter!(
        "projection_gap_fills_total",
        Unit::Count,
        "Gaps in the bus (an event whose predecessor was not the checkpoint) a projection filled from the event store"
    );
    describe_counter!(
        "leader_changes_total",
        Unit::Count,
        "Leases this process took over, by role (relay or a projection's name)"
    );
    describe_counter!(
        "fenced_writes_total",
        Unit::Count,
        "Checkpoint writes refused because another owner had taken the lease over, by role"
    );

    describe_gauge!(
        "cache_available",
        Unit::Count,
        "1 while Redis answers, 0 while queries fall back to Postgres"
    );
    describe_counter!(
        "idempotency_keys_expired_total",
        Unit::Count,
        "Expired idempotency keys deleted by the cleanup job"
    );
    describe_counter!(
        "login_lockouts_total",
        Unit::Count,
        "Accounts locked out after repeated failed logins (each round counts once)"
    );
    describe_counter!(
        "rate_limited_total",
        Unit::Count,
        "Requests refused with 429 by a rate limit (commands, sign-ups, logins) or an account's login lockout"
    );
    describe_gauge!(
        "cache_breaker_state",
        Unit::Count,
        "Circuit breaker of the queries' Redis calls: 0 closed (queries use the cache), 1 half-open (one probe), 2 open (queries read Postgres)"
    );
    describe_counter!(
        "cache_requests_total",
        Unit::Count,
        "Cache reads by result (hit or miss)"
    );

    describe_histogram!(
        "llm_request_duration_seconds",
        Unit::Seconds,
        "Time of one LLM call, by provider"
    );
    describe_counter!(
        "llm_tokens_total",
        Unit::Count,
        "LLM tokens of completed replies, by kind: prompt (not from cache), cached, completion (the answer), thoughts (thinking, billed as output); the kinds add up to the total billed"
    );
    describe_counter!(
        "llm_failures_total",
        Unit::Count,
        "LLM attempts that failed, by reason (retried ones included)"
    );
    describe_counter!(
        "llm_quota_waits_total",
        Unit::Count,
        "Spent provider quotas (rate limits saying how long to wait), by outcome: waited, past_deadline (the wait would pass the reply's deadline), daily (a per-day quota)"
    );
    describe_histogram!(
        "llm_quota_wait_seconds",
        Unit::Seconds,
        "Time waited before a retry because the provider's quota asked for it, by provider"
    );
    describe_counter!(
        "replies_total",
        Unit::Count,
        "Replies ended by this process, by outcome (completed or failed)"
    );
    describe_gauge!(
        "llm_replies_in_flight",
        Unit::Count,
        "Replies being generated right now"
    );

    describe_gauge!(
        "db_pool_size",
        Unit::Count,
        "Connections the Postgres pool holds (idle and in use)"
    );
    describe_gauge!(
        "db_pool_max",
        Unit::Count,
        "Most connections the Postgres pool may open (DATABASE_MAX_CONNECTIONS)"
    );
    describe_gauge!(
        "db_pool_connections",
        Unit::Count,
        "Postgres pool connections by state (idle or active)"
    );
    describe_histogram!(
        "db_pool_acquire_seconds",
        Unit::Seconds,
        "Time spent waiting for a pooled Postgres connection (the pool's queue)"
    );

    for result in ["hit", "miss"] {
        metrics::counter!("cache_requests_total", "result" => result).increment(0);
    }
    for kind in ["prompt", "cached", "completion", "thoughts"] {
        metrics::counter!("llm_tokens_total", "kind" => kind).increment(0);
    }
    metrics::gauge!("llm_replies_in_flight").set(0.0);
    metrics::gauge!("cache_breaker_state").set(0.0);
    metrics::counter!("idempotency_keys_expired_total").increment(0);
    metrics::counter!("login_lockouts_total").increment(0);
    for limit in ["commands", "sign-ups", "logins", "login lockout"] {
        metrics::counter!("rate_limited_total", "limit" => limit).increment(0);
    }
    for outcome in ["completed", "failed"] {
        metrics::counter!("replies_total", "outcome" => outcome).increment(0);
    }
    for reason in crate::llm::FailureReason::ALL {
        metrics::counter!("llm_failures_total", "reason" => reason.as_str()).increment(0);
    }
    metrics::counter!("relay_published_total").increment(0);
    // A registered histogram renders with zero observations (empty buckets):
    // true, and it keeps `histogram_quantile` panels from saying "no data".
    for provider in ["offline", "gemini"] {
        let _ = metrics::histogram!("llm_request_duration_seconds", "provider" => provider);
    }
    for outcome in ["waited", "past_deadline", "daily"] {
        metrics::counter!("llm_quota_waits_total", "provider" => "gemini", "outcome" => outcome)
            .increment(0);
    }
    let _ = metrics::histogram!("llm_quota_wait_seconds", "provider" => "gemini");
    let _ = metrics::histogram!("db_pool_acquire_seconds");
    let _ = metrics::histogram!("append_batch_size");
}
