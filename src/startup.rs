//! Building the service apart from running it (zero2prod's split): `build`
//! connects, migrates, binds (port 0 works, for tests) and starts the background
//! roles; `run_until` serves until the shutdown future resolves, lets in-flight
//! requests finish, then stops and joins every background task.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use ai_secretary_projections::{cache::Cache, worker};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::{
    app::Commands,
    auth::Tokens,
    bus::{self, BusConfig, relay::Relay},
    config::Config,
    http::{self, AppState, read::ReadSide},
    progress::Progress,
    recovery::Rebuilds,
    store::{
        PgEventStore,
        postgres::{self, CoalescingConfig},
    },
};

/// Which parts of the service this process runs.
#[derive(Debug, Clone)]
pub struct Roles {
    pub api: bool,
    pub relay: bool,
    /// Projections to run (by name); empty for none.
    pub projections: Vec<String>,
}

impl Roles {
    /// Everything in one process: the default.
    pub fn all() -> Roles {
        Roles {
            api: true,
            relay: true,
            projections: projection_names(),
        }
    }

    pub fn only_api() -> Roles {
        Roles {
            api: true,
            relay: false,
            projections: vec![],
        }
    }

    pub fn only_relay() -> Roles {
        Roles {
            api: false,
            relay: true,
            projections: vec![],
        }
    }

    /// The named projections, or all of them.
    pub fn only_projections(names: Vec<String>) -> anyhow::Result<Roles> {
        let known = projection_names();
        if let Some(unknown) = names.iter().find(|n| !known.contains(n)) {
            anyhow::bail!(
                "no projection named {unknown:?}; known: {}",
                known.join(", ")
            );
        }
        Ok(Roles {
            api: false,
            relay: false,
            projections: if names.is_empty() { known } else { names },
        })
    }
}

/// Names of every projection.
pub fn projection_names() -> Vec<String> {
    ai_secretary_projections::all(Cache::new("redis://unused", "", Duration::ZERO))
        .iter()
        .map(|p| p.name().to_owned())
        .collect()
}

pub struct Application {
    api: Option<(TcpListener, axum::Router)>,
    store: PgEventStore,
    stop: CancellationToken,
    /// Background roles; dropped unjoined (the process is going away), they abort.
    tasks: Vec<AbortOnDropHandle<()>>,
    /// Rebuilds started through the admin API, joined on shutdown.
    recovery: Option<Rebuilds>,
}

impl Application {
    pub async fn build(config: &Config, roles: Roles) -> anyhow::Result<Self> {
        config.validate()?;
        crate::telemetry::metrics();
        let pool = postgres::connect(
            config.database_url.expose(),
            config.database_max_connections,
        )
        .await?;
        let store = PgEventStore::new(
            pool.clone(),
            CoalescingConfig {
                max_batch: config.append_max_batch,
                flushers: config.append_flushers,
            },
        );
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let bus = BusConfig {
            url: config.nats_url.clone(),
            stream: config.nats_stream.clone(),
            subject_prefix: config.nats_subject_prefix.clone(),
        };
        let cache = Cache::new(
            &config.redis_url,
            &config.redis_key_prefix,
            Duration::from_secs(config.cache_ttl_seconds),
        );

        // Connecting does not wait for the server: NATS may come up later.
        let nats = bus::connect(&bus.url).await?;
        if roles.relay || !roles.projections.is_empty() {
            let jetstream = async_nats::jetstream::new(nats.clone());
            if roles.relay {
                let relay = Arc::new(Relay {
                    pool: pool.clone(),
                    store: Arc::new(store.clone()),
                    jetstream: jetstream.clone(),
                    bus: bus.clone(),
                });
                let stop = stop.clone();
                tasks.push(spawn(supervise("relay", stop.clone(), move || {
                    let (relay, stop) = (relay.clone(), stop.clone());
                    async move { relay.run(&stop).await }
                })));
            }
            let source = worker::Source {
                stream: bus.stream.clone(),
                subject_prefix: bus.subject_prefix.clone(),
            };
            for projection in ai_secretary_projections::all(cache.clone())
                .into_iter()
                .filter(|p| roles.projections.iter().any(|n| n == p.name()))
            {
                let (pool, jetstream, source, bus, stop) = (
                    pool.clone(),
                    jetstream.clone(),
                    source.clone(),
                    bus.clone(),
                    stop.clone(),
                );
                tasks.push(spawn(supervise(
                    projection.name(),
                    stop.clone(),
                    move || {
                        let (pool, jetstream, source, bus, stop, projection) = (
                            pool.clone(),
                            jetstream.clone(),
                            source.clone(),
                            bus.clone(),
                            stop.clone(),
                            projection.clone(),
                        );
                        async move {
                            // The relay usually creates the stream; a worker may start first.
                            bus::ensure_stream(&jetstream, &bus).await?;
                            Ok(worker::run(pool, jetstream, source, projection, stop).await?)
                        }
                    },
                )));
            }
        }

        let mut recovery = None;
        let api = if roles.api {
            let (progress, follower) = Progress::start(pool.clone(), stop.clone());
            let rebuilds = Rebuilds::new(pool.clone(), cache.clone(), stop.clone());
            tasks.push(AbortOnDropHandle::new(follower));
            let read = ReadSide {
                pool: pool.clone(),
                cache,
                progress,
                wait_limit: Duration::from_millis(config.consistency_timeout_ms),
                nats,
                subject_prefix: bus.subject_prefix.clone(),
            };
            let commands = Commands::new(Arc::new(store.clone()));
            let tokens = Tokens::new(config.jwt_secret_key.expose(), config.access_token_ttl());
            let state = AppState::new(commands, tokens, read)
                .with_recovery(rebuilds.clone(), &config.admin_emails);
            recovery = Some(rebuilds);
            let router = http::router(state, &config.cors_origins);
            Some((TcpListener::bind(config.bind).await?, router))
        } else {
            None
        };
        Ok(Self {
            api,
            store,
            stop,
            tasks,
            recovery,
        })
    }

    /// The API's address, if this process serves it.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        match self.api {
            Some((listener, router)) => {
                tracing::info!(addr = %listener.local_addr()?, "api listening");
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await?;
            }
            None => shutdown.await,
        }
        // Requests are done: stop the background roles, which finish their batch
        // (committed batches are acked; an unfinished one is simply read again).
        self.stop.cancel();
        for task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                tracing::warn!("a background task did not stop within 10 s");
            }
        }
        if let Some(rebuilds) = &self.recovery
            && tokio::time::timeout(Duration::from_secs(10), rebuilds.join())
                .await
                .is_err()
        {
            tracing::warn!("a rebuild did not stop within 10 s");
        }
        self.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

fn spawn(task: impl Future<Output = ()> + Send + 'static) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(task))
}

/// Run a background role until `stop`, restarting it a second after a failure.
async fn supervise<F, Fut>(name: &'static str, stop: CancellationToken, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    while !stop.is_cancelled() {
        if let Err(e) = run().await {
            tracing::warn!(
                role = name,
                error = format!("{e:#}"),
                "stopped on an error; restarting in 1 s"
            );
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => {}
            }
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight work");
}
