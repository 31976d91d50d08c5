//! Building the service apart from running it (zero2prod's split): `build`
//! connects, migrates, binds (port 0 works, for tests) and starts the background
//! roles; `run_until` serves until the shutdown future resolves, lets in-flight
//! requests finish, then stops and joins every background task.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use ai_secretary_projections::{Db, SqliteDb, worker};
use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use crate::{
    app::{Commands, StateCache},
    auth::Tokens,
    bus::live::{Deltas, Live},
    bus::{self, BusConfig, relay::Relay},
    config::{CacheBackend, Config, Database, EventFeed, LlmProvider},
    http::{self, AppState, read::ReadSide},
    listen::{Channels, Listening},
    llm::{Provider, gemini::Gemini, offline::Offline},
    progress::Progress,
    recovery::Rebuilds,
    replier::Replier,
    store::{
        EventStore, PgEventStore, SqliteEventStore,
        postgres::{self, CoalescingConfig},
        sealed::Keyring,
        sqlite,
    },
};

/// Which parts of the service this process runs.
#[derive(Debug, Clone)]
pub struct Roles {
    pub api: bool,
    pub relay: bool,
    /// Projections to run (by name); empty for none.
    pub projections: Vec<String>,
    /// The LLM replier.
    pub replier: bool,
}

impl Roles {
    /// Everything in one process: the default.
    pub fn all() -> Roles {
        Roles {
            api: true,
            relay: true,
            projections: projection_names(),
            replier: true,
        }
    }

    pub fn only_api() -> Roles {
        Roles {
            api: true,
            relay: false,
            projections: vec![],
            replier: false,
        }
    }

    pub fn only_relay() -> Roles {
        Roles {
            api: false,
            relay: true,
            projections: vec![],
            replier: false,
        }
    }

    pub fn only_replier() -> Roles {
        Roles {
            api: false,
            relay: false,
            projections: vec![],
            replier: true,
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
            replier: false,
        })
    }
}

/// Names of every projection (the projections crate's registry).
pub fn projection_names() -> Vec<String> {
    ai_secretary_projections::NAMES.map(str::to_owned).to_vec()
}

pub struct Application {
    /// The listener and what it serves (the API, or a worker's ops endpoints).
    api: Option<(TcpListener, axum::Router)>,
    store: Store,
    stop: CancellationToken,
    /// Cancelled when the shutdown signal arrives, before in-flight requests are
    /// waited for: live streams (SSE) end then, instead of holding the shutdown
    /// open for as long as their clients stay.
    draining: CancellationToken,
    /// Background roles; dropped unjoined (the process is going away), they abort.
    tasks: Vec<AbortOnDropHandle<()>>,
    /// Rebuilds started through the admin API, joined on shutdown.
    recovery: Option<Rebuilds>,
}

impl Application {
    pub async fn build(config: &Config, roles: Roles) -> anyhow::Result<Self> {
        config.validate()?;
        crate::telemetry::metrics();
        let database = config.database()?;
        let event_feed = config.event_feed();
        let stop = CancellationToken::new();
        let draining = CancellationToken::new();
        let mut tasks = Vec::new();
        let coalescing = CoalescingConfig {
            max_batch: config.append_max_batch,
            flushers: config.append_flushers,
        };
        // The store, the read side's database, and the signal that wakes what
        // tails the store (the embedded store's own; Postgres' LISTEN below).
        let (store, db, pool, store_commits) = match &database {
            Database::Postgres(url) => {
                let pool = postgres::connect(url.expose(), config.database_max_connections).await?;
                tasks.push(spawn(crate::sampler::pool(pool.clone(), stop.clone())));
                let store = PgEventStore::new(pool.clone(), coalescing);
                let db = Db::Postgres(pool.clone());
                (Store::Postgres(store), db, Some(pool), None)
            }
            Database::Sqlite(path) => {
                let pool =
                    sqlite::connect(&path.to_string_lossy(), config.database_max_connections)
                        .await?;
                tasks.push(spawn(crate::sampler::pool(pool.clone(), stop.clone())));
                let store = SqliteEventStore::new(pool.clone(), coalescing);
                let (commits, forwarder) =
                    crate::bus::tail::sqlite_commits(store.committed(), stop.clone());
                tasks.push(AbortOnDropHandle::new(forwarder));
                let db = Db::Sqlite(SqliteDb::new(pool));
                (Store::Sqlite(store), db, None, Some(commits))
            }
        };
        // The store as it is (what the relay publishes: sealed personal fields),
        // and the users' keys, which commands seal with and projections open with.
        let raw: Arc<dyn EventStore> = store.shared();
        let keyring = Keyring::new(config.master_key()?, raw.clone());
        let cache = config.cache()?;
        // One line an operator reads to know what this process talks to.
        tracing::info!(
            store = match database {
                Database::Postgres(_) => "postgres".to_owned(),
                Database::Sqlite(path) => format!("sqlite {}", path.display()),
            },
            event_feed = ?event_feed,
            cache = ?config.cache_backend(),
            live_updates = if config.nats_url.is_some() { "nats" } else { "in-process" },
            llm = ?config.llm_provider,
            "backends"
        );
        // Lag of the checkpoints this process moves (none in an API-only process,
        // so replicas do not report the same series twice).
        let mut checkpoints = roles.projections.clone();
        if roles.relay && config.nats_url.is_some() {
            checkpoints.push(crate::bus::relay::CHECKPOINT.to_owned());
        }
        if !checkpoints.is_empty() {
            tasks.push(spawn(crate::sampler::lag(
                db.clone(),
                checkpoints,
                stop.clone(),
            )));
        }
        let bus = BusConfig {
            url: config.nats_url.clone().unwrap_or_default(),
            stream: config.nats_stream.clone(),
            subject_prefix: config.nats_subject_prefix.clone(),
        };

        // One cache of folded states per process, shared by the API and the replier.
        let states = StateCache::new(config.state_cache_bytes());
        // Connecting does not wait for the server: NATS may come up later.
        let nats = match &config.nats_url {
            Some(url) => Some(bus::connect(url).await?),
            None => None,
        };
        // The relay has nothing to do without a bus to publish to.
        let relay = roles.relay && nats.is_some();
        // Without NATS, one signal of commits wakes everything of the process
        // that tails the store: the workers, the replier and the live streams.
        let tails_store = nats.is_none()
            || (event_feed == EventFeed::Store && (roles.replier || !roles.projections.is_empty()));
        // On Postgres, what the process waits to hear comes over one listening
        // connection (see `listen`), on the channels its parts need.
        let listening = match &pool {
            Some(pool) => Listening::start(
                pool.clone(),
                Channels {
                    commits: relay || tails_store,
                    checkpoints: roles.api,
                },
                stop.clone(),
            )
            .map(|(listening, task)| {
                tasks.push(AbortOnDropHandle::new(task));
                listening
            }),
            None => None,
        };
        let commits = match (&store_commits, &listening) {
            (Some(commits), _) => Some(commits.clone()),
            (None, Some(listening)) if tails_store => listening.commits(),
            (None, _) => None,
        };
        // Live updates (SSE and reply deltas): NATS when there is one.
        let live = match (&nats, &commits) {
            (Some(client), _) => Live::Nats {
                client: client.clone(),
                subject_prefix: bus.subject_prefix.clone(),
            },
            (None, Some(commits)) => Live::InProcess {
                commits: commits.clone(),
                deltas: Deltas::default(),
            },
            (None, None) => anyhow::bail!("live updates need NATS_URL or commits to follow"),
        };
        // What the workers and the replier tail when they do not read the bus.
        let tail_commits = match event_feed {
            EventFeed::Bus => None,
            EventFeed::Store => commits.clone(),
        };
        if roles.replier {
            let replier = Replier {
                commands: Commands::new(raw.clone(), states.clone(), keyring.clone()),
                provider: provider(config)?,
                policy: config.retry_policy(),
                history_chars: config.llm_history_chars,
                concurrency: config.replier_concurrency,
                ack_wait: Duration::from_secs_f64(config.replier_ack_wait_seconds),
                nats: nats.clone(),
                live: live.clone(),
                stream: config.llm_stream,
                bus: bus.clone(),
                feed: match &tail_commits {
                    None => crate::replier::Feed::Bus,
                    Some(commits) => crate::replier::Feed::StoreTail {
                        db: db.clone(),
                        store: raw.clone(),
                        commits: commits.clone(),
                    },
                },
            };
            let stop = stop.clone();
            tasks.push(spawn(supervise("replier", stop.clone(), move || {
                let (replier, stop) = (replier.clone(), stop.clone());
                async move { replier.run(&stop).await }
            })));
        }
        if relay || !roles.projections.is_empty() {
            let jetstream = nats.clone().map(async_nats::jetstream::new);
            if let (true, Some(jetstream)) = (relay, &jetstream) {
                let relay = Arc::new(Relay {
                    pool: postgres_only(&pool, "the relay")?,
                    store: raw.clone(),
                    jetstream: jetstream.clone(),
                    bus: bus.clone(),
                    commits: listening
                        .as_ref()
                        .and_then(Listening::commits)
                        .context("the relay listens for commits")?,
                });
                let stop = stop.clone();
                tasks.push(spawn(supervise("relay", stop.clone(), move || {
                    let (relay, stop) = (relay.clone(), stop.clone());
                    async move { relay.run(&stop).await }
                })));
            }
            // The feed: the bus, or the store itself.
            let feed = match (&tail_commits, jetstream) {
                (Some(commits), _) => worker::Feed::StoreTail(commits.clone()),
                (None, Some(jetstream)) => worker::Feed::Bus(Box::new(jetstream)),
                (None, None) => anyhow::bail!("the bus feed needs NATS_URL"),
            };
            let source = worker::Source {
                stream: bus.stream.clone(),
                subject_prefix: bus.subject_prefix.clone(),
                opener: Arc::new(keyring.clone()),
                decoded: Default::default(),
            };
            for projection in ai_secretary_projections::ALL
                .iter()
                .filter(|p| roles.projections.iter().any(|n| n == p.name))
                .map(|p| (p.live)(&cache))
            {
                let (db, feed, source, bus, stop) = (
                    db.clone(),
                    feed.clone(),
                    source.clone(),
                    bus.clone(),
                    stop.clone(),
                );
                tasks.push(spawn(supervise(
                    projection.name(),
                    stop.clone(),
                    move || {
                        let (db, feed, source, bus, stop, projection) = (
                            db.clone(),
                            feed.clone(),
                            source.clone(),
                            bus.clone(),
                            stop.clone(),
                            projection.clone(),
                        );
                        async move {
                            if let worker::Feed::Bus(jetstream) = &feed {
                                // The relay usually creates the stream; a worker may start first.
                                bus::ensure_stream(jetstream, &bus).await?;
                            }
                            Ok(worker::run(db, feed, source, projection, stop).await?)
                        }
                    },
                )));
            }
        }

        let mut recovery = None;
        let api = if roles.api {
            let (progress, follower) = Progress::start(
                db.clone(),
                listening.as_ref().and_then(Listening::checkpoint_news),
                stop.clone(),
            );
            let rebuilds = Rebuilds::new(
                db.clone(),
                Arc::new(keyring.clone()),
                cache.clone(),
                stop.clone(),
            )
            .reporting_every(Duration::from_millis(config.rebuild_progress_ms.max(1)));
            tasks.push(AbortOnDropHandle::new(follower));
            if config.cache_backend() == CacheBackend::Local {
                tasks.push(spawn(crate::recovery::forget_cache_after_swaps(
                    db.clone(),
                    cache.clone(),
                    stop.clone(),
                )));
            }
            let read = ReadSide {
                db: db.clone(),
                cache,
                progress,
                wait_limit: Duration::from_millis(config.consistency_timeout_ms),
                live,
                draining: draining.clone(),
            };
            let commands = Commands::new(raw.clone(), states, keyring.clone());
            let tokens = Tokens::new(config.jwt_secret_key.expose(), config.access_token_ttl());
            let limits = http::limits::Limits::new(&config.limit_settings()?);
            let commands_for_jobs = commands.clone();
            tasks.push(spawn(forget_idle_buckets(limits.clone(), stop.clone())));
            let state = AppState::new(commands, tokens, read)
                .with_recovery(rebuilds.clone(), &config.admin_emails)
                .with_limits(limits)
                .with_idempotency_ttl(Duration::from_secs(config.idempotency_key_ttl_seconds))
                .with_login_lockout(
                    config.login_max_failures,
                    Duration::from_secs(config.login_lockout_seconds),
                );
            tasks.push(spawn(expire_idempotency_keys(
                commands_for_jobs,
                stop.clone(),
            )));
            recovery = Some(rebuilds);
            let router = http::router(state, &config.cors_origins);
            Some((TcpListener::bind(config.bind).await?, router))
        } else {
            // Workers have no API but still answer /health and /metrics on BIND,
            // so Prometheus scrapes them and Docker health-checks them.
            Some((TcpListener::bind(config.bind).await?, http::ops_router()))
        };
        Ok(Self {
            api,
            store,
            stop,
            draining,
            tasks,
            recovery,
        })
    }

    /// The address this process listens on: the API, or a worker's /health and /metrics.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let draining = self.draining.clone();
        let shutdown = async move {
            shutdown.await;
            draining.cancel();
        };
        match self.api {
            Some((listener, router)) => {
                tracing::info!(addr = %listener.local_addr()?, "listening");
                // With each connection's peer address: the rate limits key by it.
                let service = router.into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(listener, service)
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
        if let Some(rebuilds) = self.recovery
            && tokio::time::timeout(Duration::from_secs(10), rebuilds.join())
                .await
                .is_err()
        {
            tracing::warn!("a rebuild did not stop within 10 s");
        }
        // Every other handle on the store is gone now (the rebuilds' keyring
        // held one): its flushers can drain and stop.
        self.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The Postgres pool, for the relay: it reads Postgres' commit order, and
/// `Config::validate` refuses the bus on SQLite, so this only guards that rule.
fn postgres_only(pool: &Option<sqlx::PgPool>, part: &str) -> anyhow::Result<sqlx::PgPool> {
    pool.clone()
        .ok_or_else(|| anyhow::anyhow!("{part} needs DATABASE_URL=postgres://… for now"))
}

/// The event store of the process, on whichever database it was opened.
enum Store {
    Postgres(PgEventStore),
    Sqlite(SqliteEventStore),
}

impl Store {
    fn shared(&self) -> Arc<dyn EventStore> {
        match self {
            Store::Postgres(store) => Arc::new(store.clone()),
            Store::Sqlite(store) => Arc::new(store.clone()),
        }
    }

    /// Let the store's flushers commit what is queued, then close its pools.
    async fn close(self) {
        match self {
            Store::Postgres(store) => store.close().await,
            Store::Sqlite(store) => store.close().await,
        }
    }
}

/// The LLM provider `LLM_PROVIDER` names.
fn provider(config: &Config) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match config.llm_provider {
        LlmProvider::Offline => Arc::new(Offline),
        LlmProvider::Gemini => {
            let key = config
                .gemini_api_key
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("LLM_PROVIDER=gemini needs GEMINI_API_KEY"))?;
            if std::env::var_os("LLM_REQUEST_TIMEOUT_SECONDS").is_some() {
                tracing::warn!(
                    "LLM_REQUEST_TIMEOUT_SECONDS is no longer read: LLM_IDLE_TIMEOUT_SECONDS bounds the model's silences"
                );
            }
            let idle_timeout = Duration::from_secs_f64(config.llm_idle_timeout_seconds);
            Arc::new(Gemini::new(&config.gemini_base_url, key, idle_timeout)?)
        }
    })
}

/// How often expired idempotency keys are deleted (they are ignored from the
/// moment they expire; this only frees their rows).
const EXPIRE_KEYS_EVERY: Duration = Duration::from_secs(600);

/// Delete expired idempotency keys every ten minutes until `stop`. Every API
/// replica runs it; the deletes are idempotent.
async fn expire_idempotency_keys(commands: Commands, stop: CancellationToken) {
    loop {
        match commands.expire_idempotency_keys().await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("idempotency_keys_expired_total").increment(n);
                tracing::info!(deleted = n, "expired idempotency keys deleted");
            }
            Err(e) => tracing::warn!(error = %e, "expired idempotency keys not deleted"),
        }
        tokio::select! {
            () = tokio::time::sleep(EXPIRE_KEYS_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Drop the rate limits' idle buckets every minute until `stop`.
async fn forget_idle_buckets(limits: http::limits::Limits, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(http::limits::FORGET_EVERY) => limits.forget_idle(),
            () = stop.cancelled() => return,
        }
    }
}

fn spawn(task: impl Future<Output = ()> + Send + 'static) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(task))
}

/// How long a role may take to stop by itself once the service stops (finish
/// its batch, commit, return). One still busy then is waiting on something
/// that does not answer (a NATS server that is down, a request that will only
/// time out): it has nothing in flight worth the wait and is dropped, which
/// rolls back whatever it had not committed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Run a background role until `stop`, restarting it a second after a failure.
async fn supervise<F, Fut>(name: &'static str, stop: CancellationToken, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let overdue = async {
        stop.cancelled().await;
        tokio::time::sleep(STOP_GRACE).await;
    };
    tokio::pin!(overdue);
    while !stop.is_cancelled() {
        let outcome = tokio::select! {
            outcome = run() => outcome,
            () = &mut overdue => {
                tracing::warn!(role = name, "did not stop within {STOP_GRACE:?} of the shutdown; dropped");
                return;
            }
        };
        if let Err(e) = outcome {
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
