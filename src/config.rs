//! Configuration from the environment (and a `.env` file if present), with the
//! defaults of the README's Configuration table. Secrets have redacted `Debug` and are refused in
//! production when left at their development defaults.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, ValueEnum};

pub const DEV_JWT_SECRET: &str = "development-only-jwt-secret-change-me";
pub const DEV_ENCRYPTION_KEY: &str =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    Development,
    Staging,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Where the projection workers and the replier read the events from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventFeed {
    /// The JetStream stream the relay publishes to: consumers anywhere.
    Bus,
    /// The event store itself, in commit order, woken by each commit: no hop
    /// through the relay and NATS (the feed of a topology without NATS).
    Store,
}

/// Where the read side's cache lives.
/// The embedded database's file inside `DATA_DIR`.
pub const EMBEDDED_DATABASE_FILE: &str = "ai-secretary.db";

/// Where the event store and the read models live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A Postgres server (`DATABASE_URL=postgres://…`).
    Postgres(Secret),
    /// An SQLite file: `DATABASE_URL=sqlite://PATH`, or the embedded default in `DATA_DIR`.
    Sqlite(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheBackend {
    /// Redis at `REDIS_URL`, shared by every process.
    Redis,
    /// This process's memory: only for a process that runs the `cache`
    /// projection beside the API (the embedded topology).
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LlmProvider {
    Offline,
    Gemini,
}

/// A value that must not reach logs: `Debug` prints `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Where the event store and the read models live: `postgres://…` (the
    /// database is created if absent) or `sqlite://PATH`. Unset: SQLite in
    /// `DATA_DIR` (the embedded default, no server needed).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,

    /// Directory of the embedded database (created on start), used when
    /// `DATABASE_URL` is unset.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Largest number of database connections per process.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,

    /// NATS with JetStream: the relay publishes there and the workers and the
    /// replier consume from there. Unset: they tail the event store in process.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,

    /// Redis for the read-side caches. Unset: the cache lives in this process.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Where the read-side cache lives: `redis` (at `REDIS_URL`) or `local`
    /// (in process). Default: Redis when `REDIS_URL` is set.
    #[arg(long, env = "CACHE_BACKEND", value_enum, hide = true)]
    pub cache_backend: Option<CacheBackend>,

    /// Where projection workers and the replier read events: `bus` (JetStream,
    /// through the relay) or `store` (the event store directly, woken by each
    /// commit). Default: the bus when `NATS_URL` is set.
    #[arg(long, env = "EVENT_FEED", value_enum)]
    pub event_feed: Option<EventFeed>,

    /// JetStream stream name.
    #[arg(long, env = "NATS_STREAM", default_value = "AI_SECRETARY_EVENTS")]
    pub nats_stream: String,

    /// Prefix of event subjects: `<prefix>.<stream_type>.<stream_id>`.
    #[arg(
        long,
        env = "NATS_SUBJECT_PREFIX",
        default_value = "ai_secretary.events"
    )]
    pub nats_subject_prefix: String,

    /// Prefix of Redis keys: `<prefix>:assistant:<id>`.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "ai_secretary")]
    pub redis_key_prefix: String,

    /// Where replies come from.
    #[arg(long, env = "LLM_PROVIDER", value_enum, default_value_t = LlmProvider::Offline)]
    pub llm_provider: LlmProvider,

    /// Gemini API key (LLM_PROVIDER=gemini).
    #[arg(long, env = "GEMINI_API_KEY", hide_env_values = true)]
    pub gemini_api_key: Option<Secret>,

    /// Gemini endpoint.
    #[arg(
        long,
        env = "GEMINI_BASE_URL",
        default_value = "https://generativelanguage.googleapis.com"
    )]
    pub gemini_base_url: String,

    /// Longest the model may stay silent, in seconds: before its response
    /// starts, and between two pieces of a streamed answer (an answer that keeps
    /// coming is not cut).
    #[arg(long, env = "LLM_IDLE_TIMEOUT_SECONDS", default_value_t = 30.0)]
    pub llm_idle_timeout_seconds: f64,

    /// Longest all attempts at one reply may take together, in seconds.
    #[arg(long, env = "LLM_DEADLINE_SECONDS", default_value_t = 90.0)]
    pub llm_deadline_seconds: f64,

    /// Most LLM requests for one reply (the first and its retries).
    #[arg(long, env = "LLM_MAX_ATTEMPTS", default_value_t = 4)]
    pub llm_max_attempts: u32,

    /// First retry backoff in ms; doubled each retry, with full jitter.
    #[arg(long, env = "LLM_BACKOFF_MS", default_value_t = 500)]
    pub llm_backoff_ms: u64,

    /// Stream replies: the model's text goes to the conversation's SSE as
    /// `message.delta` while it is written (the stored reply is still one event).
    #[arg(long, env = "LLM_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub llm_stream: bool,

    /// Conversation history sent with a message, in characters (oldest dropped first).
    #[arg(long, env = "LLM_HISTORY_CHARS", default_value_t = 24_000)]
    pub llm_history_chars: usize,

    /// Replies the replier works on at once.
    #[arg(long, env = "REPLIER_CONCURRENCY", default_value_t = 8)]
    pub replier_concurrency: usize,

    /// Seconds before JetStream hands an unacked reply request to a replier again
    /// (how soon a reply abandoned by a crash is picked up).
    #[arg(long, env = "REPLIER_ACK_WAIT_SECONDS", default_value_t = 60.0)]
    pub replier_ack_wait_seconds: f64,

    /// HS256 signing key of access tokens.
    #[arg(long, env = "JWT_SECRET_KEY", default_value = DEV_JWT_SECRET, hide_env_values = true, hide_default_value = true)]
    pub jwt_secret_key: Secret,

    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "ACCESS_TOKEN_TTL_SECONDS", default_value_t = 3600)]
    pub access_token_ttl_seconds: u64,

    /// 32 bytes as 64 hex characters: key of the per-user key wrapping.
    #[arg(long, env = "ENCRYPTION_KEY", default_value = DEV_ENCRYPTION_KEY, hide_env_values = true, hide_default_value = true)]
    pub encryption_key: Secret,

    /// Comma-separated origins allowed by CORS (none by default).
    #[arg(long, env = "CORS_ORIGINS", value_delimiter = ',', default_value = "")]
    pub cors_origins: Vec<String>,

    #[arg(long, env = "ENVIRONMENT", value_enum, default_value_t = Environment::Development)]
    pub environment: Environment,

    /// Listen address of the API.
    #[arg(long, env = "BIND", default_value = "0.0.0.0:8000")]
    pub bind: SocketAddr,

    /// `json` or `pretty` (default: json in production, pretty otherwise).
    #[arg(long, env = "LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Directory for daily-rotated log files (30 kept); stdout only when unset.
    #[arg(long, env = "LOG_DIR")]
    pub log_dir: Option<PathBuf>,

    /// Lifetime of cached resources, in seconds.
    #[arg(long, env = "CACHE_TTL_SECONDS", default_value_t = 3600)]
    pub cache_ttl_seconds: u64,

    /// Longest a query waits for Redis, in ms, before reading Postgres instead
    /// (Redis answers in well under a millisecond when it is well).
    #[arg(long, env = "CACHE_TIMEOUT_MS", default_value_t = 50)]
    pub cache_timeout_ms: u64,

    /// Comma-separated emails of the administrators (the /admin API; 403 for others).
    #[arg(long, env = "ADMIN_EMAILS", value_delimiter = ',', default_value = "")]
    pub admin_emails: Vec<String>,

    /// Longest a query carrying X-Consistency-Token waits for the read side, in ms.
    #[arg(long, env = "CONSISTENCY_TIMEOUT_MS", default_value_t = 5000)]
    pub consistency_timeout_ms: u64,

    /// Most commands coalesced into one append transaction.
    #[arg(long, env = "APPEND_MAX_BATCH", default_value_t = 256)]
    pub append_max_batch: usize,

    /// Append transactions in flight at once.
    #[arg(long, env = "APPEND_FLUSHERS", default_value_t = 2)]
    pub append_flushers: usize,

    /// Commands (POST, PATCH, DELETE) one user may send per minute, as a token
    /// bucket (bursts of that size); 0 turns the limit off.
    #[arg(long, env = "RATE_LIMIT_COMMANDS_PER_MINUTE", default_value_t = 300)]
    pub rate_limit_commands_per_minute: u32,

    /// Sign-ups from one client IP per hour (bursts of a tenth); 0 turns it off.
    #[arg(long, env = "RATE_LIMIT_SIGNUPS_PER_HOUR", default_value_t = 30)]
    pub rate_limit_signups_per_hour: u32,

    /// Logins from one client IP per minute (bursts of that size); 0 turns it off.
    #[arg(long, env = "RATE_LIMIT_LOGINS_PER_MINUTE", default_value_t = 30)]
    pub rate_limit_logins_per_minute: u32,

    /// Wrong passwords for one account (by email) before its logins are locked
    /// out; 0 turns the lockout off.
    #[arg(long, env = "LOGIN_MAX_FAILURES", default_value_t = 5)]
    pub login_max_failures: u32,

    /// The first lockout's length in seconds (and the window the failures are
    /// counted in); each further lockout of the account lasts twice as long,
    /// up to a day.
    #[arg(long, env = "LOGIN_LOCKOUT_SECONDS", default_value_t = 900)]
    pub login_lockout_seconds: u64,

    /// How long a keyed request's response is kept, in seconds: a retry with the
    /// same Idempotency-Key within it gets the first response; after it, the key
    /// is free again. A job deletes expired keys.
    #[arg(long, env = "IDEMPOTENCY_KEY_TTL_SECONDS", default_value_t = 86_400)]
    pub idempotency_key_ttl_seconds: u64,

    /// Comma-separated addresses or CIDR ranges of the proxies whose `X-Real-IP`
    /// is believed (nginx in front); the peer address is the client otherwise.
    #[arg(
        long,
        env = "TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub trusted_proxies: Vec<String>,

    /// Memory for folded aggregate states kept between commands, in MiB (0: none;
    /// every command then folds its stream from the start). The default keeps a
    /// process under load within 64 MiB resident.
    #[arg(long, env = "STATE_CACHE_MB", default_value_t = crate::app::STATE_CACHE_DEFAULT_BYTES >> 20)]
    pub state_cache_mb: u64,

    /// How often a rebuild started through the admin API writes its progress
    /// into its status row, in milliseconds.
    #[arg(long, env = "REBUILD_PROGRESS_MS", default_value_t = 2000, hide = true)]
    pub rebuild_progress_ms: u64,
}

impl Config {
    /// `TRUSTED_PROXIES`, parsed (an address alone is a range of one).
    pub fn trusted_proxies(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        self.trusted_proxies
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        anyhow::anyhow!("TRUSTED_PROXIES: {p:?} is not an address or CIDR range")
                    })
            })
            .collect()
    }

    /// The rate limits as this configuration sets them.
    pub fn limit_settings(&self) -> anyhow::Result<crate::http::limits::LimitSettings> {
        Ok(crate::http::limits::LimitSettings {
            commands_per_minute: self.rate_limit_commands_per_minute,
            signups_per_hour: self.rate_limit_signups_per_hour,
            logins_per_minute: self.rate_limit_logins_per_minute,
            trusted_proxies: self.trusted_proxies()?,
        })
    }

    /// Where the store and read models live: each URL that is set switches its
    /// own part to its server; with none set, everything is embedded.
    pub fn database(&self) -> anyhow::Result<Database> {
        let Some(url) = &self.database_url else {
            return Ok(Database::Sqlite(self.data_dir.join(EMBEDDED_DATABASE_FILE)));
        };
        let url = url.expose();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Database::Postgres(Secret(url.to_owned())))
        } else if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            // `sqlite://` names a file: anything after `?` (options) is not part of it.
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                anyhow::bail!("DATABASE_URL=sqlite://PATH needs a file path");
            }
            Ok(Database::Sqlite(PathBuf::from(path)))
        } else {
            anyhow::bail!("DATABASE_URL must start with postgres:// or sqlite://")
        }
    }

    /// Where the workers and the replier read events: `EVENT_FEED` if set, else
    /// the bus when there is a NATS server to use.
    pub fn event_feed(&self) -> EventFeed {
        self.event_feed.unwrap_or(match self.nats_url {
            Some(_) => EventFeed::Bus,
            None => EventFeed::Store,
        })
    }

    /// Where the cache lives: `CACHE_BACKEND` if set, else Redis when `REDIS_URL` is.
    pub fn cache_backend(&self) -> CacheBackend {
        self.cache_backend.unwrap_or(match self.redis_url {
            Some(_) => CacheBackend::Redis,
            None => CacheBackend::Local,
        })
    }

    /// NATS, for a process that uses the bus (the relay, or workers fed by it).
    pub fn nats_url(&self) -> anyhow::Result<&str> {
        self.nats_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("the bus needs NATS_URL"))
    }

    /// The cache as this configuration describes it (`cache_backend`).
    pub fn cache(&self) -> anyhow::Result<ai_secretary_projections::cache::Cache> {
        use ai_secretary_projections::cache::Cache;
        let ttl = std::time::Duration::from_secs(self.cache_ttl_seconds);
        Ok(match self.cache_backend() {
            CacheBackend::Redis => Cache::new(
                self.redis_url
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("CACHE_BACKEND=redis needs REDIS_URL"))?,
                &self.redis_key_prefix,
                ttl,
                std::time::Duration::from_millis(self.cache_timeout_ms),
            ),
            CacheBackend::Local => Cache::local(ttl),
        })
    }

    /// Refuse what must not run: malformed keys anywhere, default secrets in production.
    /// `ENCRYPTION_KEY`, the key users' data keys are wrapped under.
    pub fn master_key(&self) -> anyhow::Result<crate::crypto::MasterKey> {
        Ok(crate::crypto::MasterKey::from_hex(
            self.encryption_key.expose(),
        )?)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let key = self.encryption_key.expose();
        if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            anyhow::bail!("ENCRYPTION_KEY must be 32 bytes written as 64 hex characters");
        }
        if self.environment == Environment::Production {
            if self.jwt_secret_key.expose() == DEV_JWT_SECRET {
                anyhow::bail!(
                    "JWT_SECRET_KEY must be set in production (the development key is refused)"
                );
            }
            if self.jwt_secret_key.expose().len() < 32 {
                anyhow::bail!("JWT_SECRET_KEY must be at least 32 characters in production");
            }
            if key.eq_ignore_ascii_case(DEV_ENCRYPTION_KEY) {
                anyhow::bail!(
                    "ENCRYPTION_KEY must be set in production (the development key is refused)"
                );
            }
        }
        for (name, seconds) in [
            ("LLM_IDLE_TIMEOUT_SECONDS", self.llm_idle_timeout_seconds),
            ("LLM_DEADLINE_SECONDS", self.llm_deadline_seconds),
            ("REPLIER_ACK_WAIT_SECONDS", self.replier_ack_wait_seconds),
        ] {
            if !(seconds.is_finite() && seconds > 0.0 && seconds < 86_400.0) {
                anyhow::bail!("{name} must be a positive number of seconds below a day");
            }
        }
        self.trusted_proxies()?;
        let database = self.database()?;
        if self.event_feed() == EventFeed::Bus {
            self.nats_url()?;
            if let Database::Sqlite(_) = database {
                // The relay reads Postgres' commit order (its xid8 horizon);
                // the embedded store's consumers tail it in process instead.
                anyhow::bail!(
                    "the bus (NATS_URL or EVENT_FEED=bus) needs the Postgres store: set DATABASE_URL=postgres://… or unset NATS_URL"
                );
            }
        }
        if self.cache_backend() == CacheBackend::Redis && self.redis_url.is_none() {
            anyhow::bail!("CACHE_BACKEND=redis needs REDIS_URL");
        }
        if self.llm_provider == LlmProvider::Gemini && self.gemini_api_key.is_none() {
            anyhow::bail!("LLM_PROVIDER=gemini needs GEMINI_API_KEY");
        }
        Ok(())
    }

    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or(match self.environment {
            Environment::Production => LogFormat::Json,
            _ => LogFormat::Pretty,
        })
    }

    /// The state cache's bound in bytes.
    pub fn state_cache_bytes(&self) -> u64 {
        self.state_cache_mb.saturating_mul(1024 * 1024)
    }

    /// How the replier asks the model: attempts, timeouts and backoff.
    pub fn retry_policy(&self) -> crate::llm::RetryPolicy {
        crate::llm::RetryPolicy {
            max_attempts: self.llm_max_attempts.max(1),
            deadline: Duration::from_secs_f64(self.llm_deadline_seconds),
            base_backoff: Duration::from_millis(self.llm_backoff_ms),
            ..crate::llm::RetryPolicy::default()
        }
    }

    pub fn access_token_ttl(&self) -> Duration {
        Duration::from_secs(self.access_token_ttl_seconds)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["test"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().config
    }

    #[test]
    fn production_refuses_default_secrets() {
        let err = parse(&["--environment", "production"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET_KEY"), "{err}");
        let long_secret = "x".repeat(40);
        let err = parse(&[
            "--environment",
            "production",
            "--jwt-secret-key",
            &long_secret,
        ])
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("ENCRYPTION_KEY"), "{err}");
        let key = "ab".repeat(32);
        parse(&[
            "--environment",
            "production",
            "--jwt-secret-key",
            &long_secret,
            "--encryption-key",
            &key,
        ])
        .validate()
        .unwrap();
    }

    /// No URL: everything embedded. Each URL set switches its own part.
    #[test]
    fn each_url_that_is_set_switches_its_own_part_to_its_server() {
        let embedded = parse(&["--data-dir", "/tmp/x"]);
        assert_eq!(
            embedded.database().unwrap(),
            Database::Sqlite("/tmp/x/ai-secretary.db".into())
        );
        assert_eq!(embedded.event_feed(), EventFeed::Store);
        assert_eq!(embedded.cache_backend(), CacheBackend::Local);
        embedded.validate().unwrap();

        let postgres_only = parse(&["--database-url", "postgres://u@h/db"]);
        assert!(matches!(
            postgres_only.database().unwrap(),
            Database::Postgres(_)
        ));
        assert_eq!(postgres_only.event_feed(), EventFeed::Store);
        assert_eq!(postgres_only.cache_backend(), CacheBackend::Local);

        let servers = parse(&[
            "--database-url",
            "postgres://u@h/db",
            "--nats-url",
            "nats://h:4222",
            "--redis-url",
            "redis://h:6379",
        ]);
        assert_eq!(servers.event_feed(), EventFeed::Bus);
        assert_eq!(servers.cache_backend(), CacheBackend::Redis);
        servers.validate().unwrap();

        let file = parse(&["--database-url", "sqlite:///var/lib/a.db?mode=rwc"]);
        assert_eq!(
            file.database().unwrap(),
            Database::Sqlite("/var/lib/a.db".into())
        );
        // The bus needs the relay, which reads Postgres.
        let err = parse(&["--nats-url", "nats://h:4222"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("Postgres"), "{err}");
        let err = parse(&["--database-url", "mysql://h/db"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
        let err = parse(&["--cache-backend", "redis"]).validate().unwrap_err();
        assert!(err.to_string().contains("REDIS_URL"), "{err}");
    }

    #[test]
    fn development_runs_on_defaults_and_secrets_stay_out_of_debug() {
        let config = parse(&["--database-url", "postgres://user:pw@h/db"]);
        config.validate().unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains(DEV_JWT_SECRET));
        assert!(!printed.contains("postgres://"));
    }
}
