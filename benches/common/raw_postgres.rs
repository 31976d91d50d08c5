//! The raw baseline on Postgres, shared by the benches that compare against
//! it: one writer, one connection, one autocommit `INSERT INTO events` per
//! append (bound parameters; one statement, one transaction, one commit).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sqlx::{AssertSqlSafe, Connection, PgConnection, postgres::PgConnectOptions};

use crate::appends::{STREAM_TYPE, Window, Writer};

/// Columns the raw INSERT writes, in bind order.
const COLUMNS: usize = 8;

/// One connection per writer, opened before the clock starts.
pub async fn connections(options: &PgConnectOptions, writers: usize) -> Result<Vec<PgConnection>> {
    let mut connections = Vec::with_capacity(writers);
    for _ in 0..writers {
        connections.push(
            PgConnection::connect_with(options)
                .await
                .context("opening a raw writer's connection")?,
        );
    }
    Ok(connections)
}

/// `INSERT INTO events ... VALUES (...), ...` for `rows` events.
fn insert_sql(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let params: Vec<String> = (1..=COLUMNS)
                .map(|c| format!("${}", r * COLUMNS + c))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, \
         schema_version, data, metadata) VALUES {}",
        values.join(", ")
    )
}

/// Loop one autocommit INSERT per append on the writer's own connection.
pub async fn raw_writer(
    mut conn: PgConnection,
    writer: Writer,
    window: Window,
) -> Result<Vec<Duration>> {
    let sql: Arc<str> = insert_sql(writer.events_per_append).into();
    let per_append = writer.events_per_append as i64;
    let mut version = 0_i64;
    let mut latencies = Vec::new();
    loop {
        let events = writer.events()?;
        let started = Instant::now();
        if started >= window.until {
            break;
        }
        let mut query = sqlx::query(AssertSqlSafe(sql.clone()));
        for (j, event) in events.iter().enumerate() {
            query = query
                .bind(event.event_id)
                .bind(writer.stream_id)
                .bind(STREAM_TYPE)
                .bind(version + 1 + j as i64)
                .bind(event.event_type.as_str())
                .bind(event.schema_version)
                .bind(&event.data)
                .bind(&event.metadata);
        }
        let done = query.execute(&mut conn).await.with_context(|| {
            format!(
                "raw INSERT on stream {} after version {version}",
                writer.stream_id
            )
        })?;
        if done.rows_affected() != per_append as u64 {
            bail!(
                "raw INSERT on stream {} wrote {} rows, not {per_append}",
                writer.stream_id,
                done.rows_affected()
            );
        }
        version += per_append;
        window.record(&mut latencies, started);
    }
    conn.close().await.ok();
    Ok(latencies)
}
