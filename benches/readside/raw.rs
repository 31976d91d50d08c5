//! Part 2's baseline: the rows the `messages` projection writes for the
//! backlog, upserted one statement a row into scratch tables of the same shape.
//!
//! The rows come from the projection itself, not from a copy of its rules: the
//! backlog is folded through its rules (`Fold`, the executor rebuilds use), and
//! each row an event changed is taken as it stands after that event. Each is
//! written as an `INSERT … ON CONFLICT (key) DO UPDATE` of every column, the
//! statement made and bound by the projections' Postgres executor; the scratch
//! tables are the projection's own names in a schema of their own.

use std::time::{Duration, Instant};

use ai_secretary_projections::{
    Db, Position,
    executor::postgres::run,
    fold::Row,
    log::read_committed,
    ops::{OnConflict, Op, Set, Table},
    projections::{Fold, messages},
};
use anyhow::{Context, Result, anyhow, bail};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};

/// Rows per transaction of the raw upsert baseline (the worker's largest batch).
pub const RAW_ROWS_PER_TX: usize = 500;

/// The schema of the scratch tables.
const SCRATCH: &str = "bench_raw";

/// Events read at a time while folding the backlog.
const PAGE: i64 = 10_000;

/// What the baseline writes: an upsert per row an event changed, in commit
/// order, and how many rows each table holds at the end.
pub struct Baseline {
    pub upserts: Vec<Op>,
    tables: Vec<(&'static Table, usize)>,
}

/// The `messages` projection's rows for the backlog in `pool` (see above), and
/// the scratch tables to write them to.
pub async fn baseline(pool: &PgPool) -> Result<Baseline> {
    let db = Db::Postgres(pool.clone());
    let mut fold = Fold::new(messages::PROJECTION.name).context("the messages projection")?;
    fold.track_changes();
    let mut upserts = Vec::new();
    let mut after = Position::default();
    loop {
        let page = read_committed(&db, after, PAGE)
            .await
            .context("reading the backlog")?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = last.position();
        for (envelope, data) in &page {
            let event = ai_secretary_contract::decode(
                &envelope.event_type,
                envelope.schema_version,
                data.as_str(),
            )
            .map_err(|e| anyhow!("event {}: {e}", envelope.event_id))?;
            fold.apply(envelope, &event);
            for rows in &mut fold.tables {
                for key in rows.rows.take_changed() {
                    let row = rows
                        .get(&key)
                        .ok_or_else(|| anyhow!("the backlog deletes from {}", rows.table.name))?;
                    upserts.push(upsert(rows.table, row.clone()));
                }
            }
        }
    }
    let tables = fold
        .tables
        .iter()
        .map(|rows| (rows.table, rows.rows.len()))
        .collect();
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {SCRATCH}")))
        .execute(pool)
        .await
        .context("creating the scratch schema")?;
    for table in messages::PROJECTION.tables {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {SCRATCH}.{t} (LIKE public.{t} INCLUDING ALL)",
            t = table.name
        )))
        .execute(pool)
        .await
        .context("creating the scratch tables")?;
    }
    Ok(Baseline { upserts, tables })
}

/// `row` (every column of `table`) inserted, or written over the row with its key.
fn upsert(table: &'static Table, row: Row) -> Op {
    let sets = table
        .columns
        .iter()
        .zip(&row)
        .filter(|(c, _)| !table.key.contains(&c.name))
        .map(|(c, v)| (c.name, Set::To(v.clone())))
        .collect();
    Op::Insert {
        table,
        row,
        on_conflict: OnConflict::Update(sets),
    }
}

impl Baseline {
    /// How many of the upserts go to `table`.
    pub fn rows_of(&self, table: &Table) -> usize {
        self.upserts
            .iter()
            .filter(|op| op.table().name == table.name)
            .count()
    }
}

/// The baseline: every row upserted with its own statement on one connection,
/// `RAW_ROWS_PER_TX` rows per transaction, in the order the events committed.
/// Returns how long the upserts took.
pub async fn raw_upserts(db_url: &str, baseline: &Baseline) -> Result<Duration> {
    eprintln!("  raw upserts");
    let mut conn = PgConnection::connect(db_url)
        .await
        .context("opening the raw connection")?;
    conn.execute(AssertSqlSafe(format!("SET search_path TO {SCRATCH}")))
        .await?;
    for (table, _) in &baseline.tables {
        conn.execute(AssertSqlSafe(format!("TRUNCATE {}", table.name)))
            .await?;
    }
    let started = Instant::now();
    for chunk in baseline.upserts.chunks(RAW_ROWS_PER_TX) {
        conn.execute("BEGIN").await?;
        run(&mut conn, chunk).await?;
        conn.execute("COMMIT").await?;
    }
    let elapsed = started.elapsed();
    for (table, expected) in &baseline.tables {
        let written: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            table.name
        )))
        .fetch_one(&mut conn)
        .await?;
        if written as usize != *expected {
            bail!(
                "the raw upserts left {written} rows in {}, not {expected}",
                table.name
            );
        }
    }
    conn.close().await.ok();
    Ok(elapsed)
}
