//! Helpers the benchmarks share: settings from the environment, database URLs,
//! and a line describing the Postgres server measured.

use std::{env, fmt::Display, str::FromStr};

use anyhow::{Context, Result, anyhow};
use sqlx::{PgPool, Row};

/// An environment variable parsed as `T`, or `default` if it is unset.
pub fn env_or<T>(name: &str, default: T) -> Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    match env::var(name) {
        Ok(raw) => raw
            .trim()
            .parse()
            .map_err(|e| anyhow!("{name}={raw:?} is not valid: {e}")),
        Err(env::VarError::NotPresent) => Ok(default),
        Err(e) => Err(anyhow!("{name}: {e}")),
    }
}

/// `url` with its database (path) replaced by `database`; query parameters kept.
pub fn with_database(url: &str, database: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| anyhow!("BENCH_DATABASE_URL must look like postgres://user@host:port/"))?;
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

pub async fn describe_server(pool: &PgPool) -> Result<String> {
    let row = sqlx::query(
        "SELECT current_setting('server_version') AS version,
                current_setting('fsync') AS fsync,
                current_setting('synchronous_commit') AS synchronous_commit,
                current_setting('wal_sync_method') AS wal_sync_method",
    )
    .fetch_one(pool)
    .await
    .context("reading server settings")?;
    Ok(format!(
        "PostgreSQL {}, fsync={}, synchronous_commit={}, wal_sync_method={}",
        row.try_get::<String, _>("version")?,
        row.try_get::<String, _>("fsync")?,
        row.try_get::<String, _>("synchronous_commit")?,
        row.try_get::<String, _>("wal_sync_method")?,
    ))
}
