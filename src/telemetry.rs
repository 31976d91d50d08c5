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

/// The process's Prometheus recorder, installed on first use.
pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Only one recorder per process: if another was installed first, this
        // handle renders nothing, which is better than failing to start.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        handle
    })
}
