#![allow(dead_code)] // each test binary uses a different part of this module
//! The test kit, shared by the integration test binaries and the benches: a
//! fresh Postgres database per test, dropped when the test ends (pass or
//! fail), and a test's own names on NATS and Redis (here); a database handle
//! whichever the backend ([`AsDb`], [`on_db!`]); where the read side is
//! (`progress.rs`); the query API's authenticated GET and consistency token
//! (`http.rs`); the command line of a service built in this process
//! (`service.rs`); private servers (`cluster.rs`); PromQL checks (`promql.rs`).

pub mod cluster;
pub mod http;
pub mod progress;
pub mod promql;
pub mod service;

use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// A database handle as the read side and the operations tools take it
/// ([`Db`](ai_secretary_projections::Db)), from a Postgres pool or a `Db`.
pub trait AsDb {
    fn db(&self) -> ai_secretary_projections::Db;
}

impl AsDb for PgPool {
    fn db(&self) -> ai_secretary_projections::Db {
        ai_secretary_projections::Db::Postgres(self.clone())
    }
}

impl AsDb for ai_secretary_projections::Db {
    fn db(&self) -> ai_secretary_projections::Db {
        self.clone()
    }
}

/// `$body` with `$pool` bound to the pool of `$db` (a
/// [`Db`](ai_secretary_projections::Db)), whichever database it is: SQL that
/// reads the same on Postgres and SQLite, written once and compiled for each.
#[macro_export]
macro_rules! on_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match &$db {
            ai_secretary_projections::Db::Postgres($pool) => $body,
            ai_secretary_projections::Db::Sqlite(lite) => {
                let $pool = &lite.pool;
                $body
            }
        }
    };
}

/// The machine's Postgres; `TEST_DATABASE_URL` may point elsewhere (no database name).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A database of its own, migrated, dropped on `Drop`.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    /// The server it is on (no database name), where `Drop` drops it.
    pub server: String,
}

impl TestDb {
    /// On the machine's Postgres.
    pub async fn new() -> TestDb {
        TestDb::on(&server_url()).await
    }

    /// On the server at `server` (a URL without a database name).
    pub async fn on(server: &str) -> TestDb {
        let name = format!("ai_secretary_test_{}", Uuid::new_v4().simple());
        let url = format!("{server}/{name}");
        let pool = ai_secretary::store::postgres::connect(&url, 8)
            .await
            .expect("create and migrate the test database");
        TestDb {
            name,
            url,
            pool,
            server: server.to_owned(),
        }
    }
}

impl TestDb {
    /// A placeholder that owns nothing (dropping it drops no database).
    pub fn detached() -> TestDb {
        TestDb {
            name: String::new(),
            url: String::new(),
            pool: sqlx::postgres::PgPoolOptions::new()
                .connect_lazy(&format!("{}/postgres", server_url()))
                .expect("a lazy pool needs no server"),
            server: String::new(),
        }
    }
}

impl TestDb {
    /// The same database for a second instance; dropping it drops nothing.
    pub fn borrowed(&self) -> TestDb {
        TestDb {
            name: String::new(),
            url: self.url.clone(),
            pool: self.pool.clone(),
            server: self.server.clone(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let name = self.name.clone();
        let admin = format!("{}/postgres", self.server);
        // Drop runs outside async; a short-lived runtime on its own thread does the SQL.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// A test's own names on the shared NATS server and Redis; the stream and the
/// keys are removed on `Drop`.
pub struct BusNames {
    pub stream: String,
    pub subject_prefix: String,
    pub redis_prefix: String,
    pub nats_url: String,
    pub redis_url: String,
    /// Whether dropping these names removes the stream and keys.
    pub owned: bool,
}

impl BusNames {
    pub fn new() -> BusNames {
        let id = Uuid::new_v4().simple().to_string();
        BusNames {
            stream: format!("TEST_{id}"),
            subject_prefix: format!("test_{id}.events"),
            redis_prefix: format!("test_{id}"),
            nats_url: "nats://127.0.0.1:4222".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            owned: true,
        }
    }
}

impl BusNames {
    /// A placeholder that owns nothing (dropping it removes nothing).
    pub fn detached() -> BusNames {
        BusNames {
            stream: String::new(),
            subject_prefix: String::new(),
            redis_prefix: String::new(),
            nats_url: String::new(),
            redis_url: String::new(),
            owned: false,
        }
    }

    /// The same names for a second instance; dropping them removes nothing.
    pub fn borrowed(&self) -> BusNames {
        BusNames {
            stream: self.stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            redis_prefix: self.redis_prefix.clone(),
            nats_url: self.nats_url.clone(),
            redis_url: self.redis_url.clone(),
            owned: false,
        }
    }
}

impl Drop for BusNames {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let (stream, prefix) = (self.stream.clone(), self.redis_prefix.clone());
        let (nats_url, redis_url) = (self.nats_url.clone(), self.redis_url.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let cleanup = async {
                    if let Ok(client) = async_nats::connect(&nats_url).await {
                        let _ = async_nats::jetstream::new(client)
                            .delete_stream(&stream)
                            .await;
                    }
                    if let Ok(client) = redis::Client::open(redis_url.as_str())
                        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                    {
                        let keys: Vec<String> = redis::cmd("KEYS")
                            .arg(format!("{prefix}:*"))
                            .query_async(&mut conn)
                            .await
                            .unwrap_or_default();
                        if !keys.is_empty() {
                            let _: redis::RedisResult<()> =
                                redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                        }
                    }
                };
                tokio::time::timeout(std::time::Duration::from_secs(5), cleanup)
                    .await
                    .ok()
            })
        })
        .join();
    }
}
