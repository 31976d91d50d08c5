//! Shared by the integration test binaries: a fresh Postgres database per test,
//! dropped when the test ends (pass or fail).

use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

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
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("ai_secretary_test_{}", Uuid::new_v4().simple());
        let url = format!("{}/{name}", server_url());
        let pool = ai_secretary::store::postgres::connect(&url, 8)
            .await
            .expect("create and migrate the test database");
        TestDb { name, url, pool }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = format!("{}/postgres", server_url());
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
