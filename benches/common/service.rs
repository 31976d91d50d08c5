//! For benchmarks that run the service in their own process: its private names
//! on the shared servers (database, JetStream stream and subjects, Redis key
//! prefix), starting it on them (see `in_process.rs`), and removing the names
//! at the end.

use ai_secretary::startup::Roles;
use anyhow::{Context, Result};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

use crate::common::with_database;
pub use crate::in_process::Service;

/// Where the servers are.
pub struct Servers<'a> {
    /// Any database URL on the server; its database part is ignored.
    pub base_url: &'a str,
    pub nats_url: &'a str,
    pub redis_url: &'a str,
}

/// One part's private names: database, JetStream stream and subjects, Redis keys.
#[derive(Clone)]
pub struct Names {
    pub database: String,
    pub db_url: String,
    pub stream: String,
    pub subject_prefix: String,
    pub redis_prefix: String,
}

impl Names {
    /// The names of part `part` of run `run` (a random hex string).
    pub fn new(base_url: &str, run: &str, part: &str) -> Result<Self> {
        let database = format!("ai_secretary_bench_{run}_{part}");
        Ok(Self {
            db_url: with_database(base_url, &database)?,
            database,
            stream: format!("BENCH_{run}_{}", part.to_uppercase()),
            subject_prefix: format!("bench_{run}_{part}.events"),
            redis_prefix: format!("bench_{run}_{part}"),
        })
    }
}

/// Drop a part's database, JetStream stream and Redis keys (whichever exist).
pub async fn remove(servers: &Servers<'_>, names: &Names) -> Result<()> {
    let admin_url = with_database(servers.base_url, "postgres")?;
    let mut conn = PgConnection::connect(&admin_url)
        .await
        .with_context(|| format!("connecting to drop {}", names.database))?;
    conn.execute(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        names.database
    )))
    .await
    .with_context(|| format!("dropping database {}", names.database))?;
    conn.close().await.ok();

    let nats = async_nats::connect(servers.nats_url)
        .await
        .context("connecting to NATS to delete the bench stream")?;
    let jetstream = async_nats::jetstream::new(nats);
    if jetstream.get_stream(&names.stream).await.is_ok() {
        jetstream
            .delete_stream(&names.stream)
            .await
            .with_context(|| format!("deleting stream {}", names.stream))?;
    }
    let deleted = delete_redis_keys(servers.redis_url, &names.redis_prefix).await?;
    eprintln!(
        "removed database {}, stream {}, {deleted} Redis keys {}:*",
        names.database, names.stream, names.redis_prefix
    );
    Ok(())
}

/// Delete every `<prefix>:*` key; how many there were.
pub async fn delete_redis_keys(redis_url: &str, prefix: &str) -> Result<usize> {
    let client = redis::Client::open(redis_url).context("REDIS_URL")?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .context("scanning Redis keys")?;
        if !keys.is_empty() {
            deleted += keys.len();
            let () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .context("deleting Redis keys")?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

impl Service {
    /// The service on the shared servers, under `names`.
    pub async fn start(servers: &Servers<'_>, names: &Names, roles: Roles) -> Result<Service> {
        Service::launch(
            &[
                "--database-url",
                &names.db_url,
                "--nats-url",
                servers.nats_url,
                "--redis-url",
                servers.redis_url,
                "--nats-stream",
                &names.stream,
                "--nats-subject-prefix",
                &names.subject_prefix,
                "--redis-key-prefix",
                &names.redis_prefix,
            ],
            roles,
        )
        .await
    }
}
