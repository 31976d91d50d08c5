//! Drift detection: fold the store into a copy of each read model and compare
//! it with the live one, row by row and column by column. Nothing live is
//! written.
//!
//! The live tables and each projection's checkpoint `P` are read from the same
//! snapshot (a projection moves its rows and its checkpoint in one commit), and
//! the copy is the fold of exactly the events up to `P`.
//!
//! - Postgres: everything happens in ONE `REPEATABLE READ` transaction. The
//!   fold is written with the same writer a rebuild uses into temporary scratch
//!   tables dropped with the transaction, and compared in SQL; only differing
//!   rows come back.
//! - SQLite: ONE read transaction reads the checkpoints and every live row
//!   (decoded by the table's declared column types, as the SQLite executor
//!   reads them), then the store is folded up to the checkpoints and the typed
//!   values are compared in memory, each folded value first made what storing
//!   it would make of it (a timestamp to the microsecond, JSON through its text).
//!
//! Both report drifts in the same text format.
//!
//! `cache`: its Postgres lookup (`cache_conversations`) is verified like any
//! table; the Redis values are not (they are copies stamped with the position
//! they were read at, refilled on a miss, and dropped by a rebuild).

use ai_secretary_contract::Position;
use std::{collections::HashMap, fmt};

use chrono::{DateTime, SecondsFormat};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection, PgPool, Row};

use crate::{
    checkpoint,
    db::{Conn, Db, SqliteDb},
    executor::sqlite::decode_row,
    fold::{Key, Row as FoldRow},
    opener::Opener,
    ops::{Table, Type, Value as Typed},
    projections::{self, Fold},
    rebuild::{self, Step},
    tables,
};

/// Suffix of verify's temporary scratch tables.
const SCRATCH: &str = "__verify";
/// Drifted rows reported in full per table (all are counted).
const SHOWN_PER_TABLE: i64 = 50;

/// One row that differs: which table, its key, and each differing column
/// (`None` on a side where the row does not exist).
#[derive(Debug, Clone)]
pub struct Drift {
    pub table: &'static str,
    pub key: String,
    /// (column, live, expected); for a missing or extra row, the whole row.
    pub columns: Vec<(String, Option<Value>, Option<Value>)>,
}

/// The outcome for one projection.
#[derive(Debug, Clone)]
pub struct Verified {
    pub projection: &'static str,
    pub position: Position,
    /// Rows compared per table: (table, live rows, expected rows, drifted rows).
    pub tables: Vec<(&'static str, i64, i64, i64)>,
    /// The drifted rows (at most `SHOWN_PER_TABLE` per table).
    pub drifts: Vec<Drift>,
}

impl Verified {
    pub fn clean(&self) -> bool {
        self.tables.iter().all(|t| t.3 == 0)
    }
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = format!(
            "{}.{}",
            self.position.transaction_id, self.position.global_position
        );
        for (table, live, expected, drifted) in &self.tables {
            let verdict = if *drifted == 0 { "ok" } else { "DRIFT" };
            writeln!(
                f,
                "{verdict:5} {}/{table} at {at}: {live} rows live, {expected} expected, {drifted} differ",
                self.projection
            )?;
        }
        for drift in &self.drifts {
            for (column, live, expected) in &drift.columns {
                let show =
                    |v: &Option<Value>| v.as_ref().map_or("(no row)".to_owned(), |v| v.to_string());
                writeln!(
                    f,
                    "  {} {} {column}: live {} ≠ expected {}",
                    drift.table,
                    drift.key,
                    show(live),
                    show(expected)
                )?;
            }
        }
        Ok(())
    }
}

/// Verify the named projections (all of them when `names` is empty).
pub async fn verify(
    db: &Db,
    opener: &dyn Opener,
    names: &[&str],
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<Vec<Verified>, rebuild::RebuildError> {
    let names: Vec<&str> = if names.is_empty() {
        projections::NAMES.to_vec()
    } else {
        names.to_vec()
    };
    let mut folds = Vec::new();
    for name in &names {
        let fold = Fold::new(name).ok_or_else(|| rebuild::RebuildError::Unknown((*name).into()))?;
        folds.push(fold);
    }
    match db {
        Db::Postgres(pool) => verify_postgres(pool, opener, folds, on_step).await,
        Db::Sqlite(lite) => verify_sqlite(lite, opener, folds, on_step).await,
    }
}

/// The checkpoint of each fold's projection in `checkpoints` (the start of the
/// log for one that never ran: it has applied nothing).
fn at_checkpoints(folds: Vec<Fold>, checkpoints: &[checkpoint::Status]) -> Vec<(Fold, Position)> {
    folds
        .into_iter()
        .map(|fold| {
            let at = checkpoints
                .iter()
                .find(|c| c.name == fold.name())
                .map_or(Position::default(), |c| c.position);
            (fold, at)
        })
        .collect()
}

async fn verify_postgres(
    pool: &PgPool,
    opener: &dyn Opener,
    folds: Vec<Fold>,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<Vec<Verified>, rebuild::RebuildError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // Not READ ONLY: that would refuse the temporary scratch tables. The
    // transaction is rolled back, and it writes nothing else.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let checkpoints = checkpoint::postgres::all(&mut *tx).await?;
    let mut limited = at_checkpoints(folds, &checkpoints);
    let upto = limited.iter().map(|f| f.1).max().unwrap_or_default();
    rebuild::fold_store(
        &mut Conn::Postgres(&mut tx),
        opener,
        &mut limited,
        Position::default(),
        upto,
        on_step,
    )
    .await?;

    let mut results = Vec::new();
    for (fold, at) in &limited {
        for table in fold.tables() {
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TEMP TABLE {}{SCRATCH} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
                table.name, table.name
            )))
            .execute(&mut *tx)
            .await?;
        }
        tables::write_all(&mut Conn::Postgres(&mut tx), fold, SCRATCH).await?;
        let mut verified = Verified {
            projection: fold.name(),
            position: *at,
            tables: vec![],
            drifts: vec![],
        };
        for table in fold.tables() {
            let scratch = format!("{}{SCRATCH}", table.name);
            let join = table
                .key
                .iter()
                .map(|k| format!("l.{k} = s.{k}"))
                .collect::<Vec<_>>()
                .join(" AND ");
            let order = table
                .key
                .iter()
                .map(|k| format!("COALESCE(l.{k}, s.{k})"))
                .collect::<Vec<_>>()
                .join(", ");
            // Whole rows compared as jsonb (every column, by name); a row on one
            // side only comes back with NULL on the other.
            let counts: (i64, i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT (SELECT count(*) FROM {t}), (SELECT count(*) FROM {scratch}),
                        (SELECT count(*) FROM {t} l FULL JOIN {scratch} s ON {join}
                         WHERE to_jsonb(l) IS DISTINCT FROM to_jsonb(s))",
                t = table.name
            )))
            .fetch_one(&mut *tx)
            .await?;
            verified
                .tables
                .push((table.name, counts.0, counts.1, counts.2));
            if counts.2 == 0 {
                continue;
            }
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT to_jsonb(l), to_jsonb(s) FROM {t} l FULL JOIN {scratch} s ON {join}
                 WHERE to_jsonb(l) IS DISTINCT FROM to_jsonb(s)
                 ORDER BY {order} LIMIT {SHOWN_PER_TABLE}",
                t = table.name
            )))
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let live: Option<Value> = row.try_get(0)?;
                let expected: Option<Value> = row.try_get(1)?;
                verified.drifts.push(diff(table, live, expected));
            }
        }
        results.push(verified);
    }
    tx.rollback().await?;
    Ok(results)
}

/// The differing columns of one row (the whole row when one side is missing).
fn diff(table: &projections::Table, live: Option<Value>, expected: Option<Value>) -> Drift {
    let either = live
        .as_ref()
        .or(expected.as_ref())
        .expect("one side exists");
    let key = table
        .key
        .iter()
        .map(|k| format!("{k}={}", either[*k]))
        .collect::<Vec<_>>()
        .join(",");
    let columns = match (&live, &expected) {
        (Some(Value::Object(l)), Some(Value::Object(e))) => l
            .iter()
            .filter(|(column, value)| e.get(*column) != Some(*value))
            .map(|(column, value)| (column.clone(), Some(value.clone()), e.get(column).cloned()))
            .collect(),
        _ => vec![("(row)".to_owned(), live, expected)],
    };
    Drift {
        table: table.name,
        key: format!("[{key}]"),
        columns,
    }
}

/// The live rows of one table on SQLite, by key.
type LiveRows = HashMap<Key, FoldRow>;

async fn verify_sqlite(
    db: &SqliteDb,
    opener: &dyn Opener,
    folds: Vec<Fold>,
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<Vec<Verified>, rebuild::RebuildError> {
    let mut conn = db.pool.acquire().await?;
    // A read transaction (deferred: it takes no write lock, so the live service
    // never waits for it). In WAL mode its snapshot is fixed by its first read
    // and kept to its end: the checkpoints and every live row below come from
    // one moment, whatever commits meanwhile.
    let mut snapshot = conn.begin().await?;
    let checkpoints = checkpoint::sqlite::all(&mut *snapshot).await?;
    let mut live: Vec<Vec<LiveRows>> = Vec::new();
    for fold in &folds {
        let mut of_fold = Vec::new();
        for table in fold.tables() {
            of_fold.push(live_rows(&mut snapshot, table).await?);
        }
        live.push(of_fold);
    }
    snapshot.rollback().await?;
    let mut limited = at_checkpoints(folds, &checkpoints);
    // The events up to the checkpoints are committed and never change: no need
    // to read them in the snapshot (SQLite commits one writer at a time).
    let upto = limited.iter().map(|f| f.1).max().unwrap_or_default();
    rebuild::fold_store(
        &mut Conn::Sqlite(&mut conn),
        opener,
        &mut limited,
        Position::default(),
        upto,
        on_step,
    )
    .await?;
    Ok(limited
        .iter()
        .zip(&live)
        .map(|((fold, at), live)| compare(fold, *at, live))
        .collect())
}

/// Every row of the live `table`, decoded by its declared column types.
async fn live_rows(
    conn: &mut sqlx::SqliteConnection,
    table: &'static Table,
) -> Result<LiveRows, sqlx::Error> {
    let columns: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
    let types: Vec<Type> = table.columns.iter().map(|c| c.ty).collect();
    let key: Vec<usize> = table.key.iter().map(|c| table.index(c)).collect();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {} FROM {}",
        columns.join(", "),
        table.name
    )))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let row = decode_row(row, &types)?;
            Ok((key.iter().map(|&i| row[i].clone()).collect(), row))
        })
        .collect()
}

/// One projection's fold against its live rows, table by table.
fn compare(fold: &Fold, at: Position, live: &[LiveRows]) -> Verified {
    let mut verified = Verified {
        projection: fold.name(),
        position: at,
        tables: vec![],
        drifts: vec![],
    };
    for (rows, live) in fold.tables.iter().zip(live) {
        let table = rows.table;
        let mut drifts = Vec::new();
        for (key, expected) in rows.rows.iter() {
            let expected: FoldRow = expected.iter().map(as_stored).collect();
            match live.get(key) {
                Some(found) if *found == expected => {}
                found => drifts.push(typed_drift(table, key, found, Some(&expected))),
            }
        }
        for (key, found) in live {
            if rows.get(key).is_none() {
                drifts.push(typed_drift(table, key, Some(found), None));
            }
        }
        let drifted = drifts.len() as i64;
        verified.tables.push((
            table.name,
            live.len() as i64,
            rows.rows.len() as i64,
            drifted,
        ));
        // Shown in a stable order: by key, as the report writes it.
        drifts.sort_by(|a, b| a.key.cmp(&b.key));
        drifts.truncate(SHOWN_PER_TABLE as usize);
        verified.drifts.extend(drifts);
    }
    verified
}

/// What storing `value` in SQLite and reading it back makes of it: a timestamp
/// keeps whole microseconds (stored as INTEGER µs), JSON is what its text
/// parses back to. Everything else is stored exactly.
fn as_stored(value: &Typed) -> Typed {
    match value {
        Typed::Timestamp(at) => DateTime::from_timestamp_micros(at.timestamp_micros())
            .map_or(Typed::Null, Typed::Timestamp),
        Typed::Json(json) => {
            serde_json::from_str(&json.to_string()).map_or_else(|_| value.clone(), Typed::Json)
        }
        _ => value.clone(),
    }
}

/// A drifted row of a SQLite table (`None` on the side where it is missing),
/// shown as Postgres' verify shows it: its key, and the differing columns as
/// JSON (or the whole row, when one side has none).
fn typed_drift(
    table: &'static Table,
    key: &Key,
    live: Option<&FoldRow>,
    expected: Option<&FoldRow>,
) -> Drift {
    let key = table
        .key
        .iter()
        .zip(key)
        .map(|(column, value)| format!("{column}={}", json_of(value)))
        .collect::<Vec<_>>()
        .join(",");
    let whole = |row: &FoldRow| -> Value {
        Value::Object(
            table
                .columns
                .iter()
                .zip(row)
                .map(|(c, v)| (c.name.to_owned(), json_of(v)))
                .collect(),
        )
    };
    let columns = match (live, expected) {
        (Some(live), Some(expected)) => table
            .columns
            .iter()
            .zip(live.iter().zip(expected))
            .filter(|(_, (l, e))| l != e)
            .map(|(c, (l, e))| (c.name.to_owned(), Some(json_of(l)), Some(json_of(e))))
            .collect(),
        _ => vec![("(row)".to_owned(), live.map(whole), expected.map(whole))],
    };
    Drift {
        table: table.name,
        key: format!("[{key}]"),
        columns,
    }
}

/// A typed value as JSON, as Postgres' `to_jsonb` shows its column: uuids,
/// timestamps (RFC 3339, UTC) and dates as strings.
fn json_of(value: &Typed) -> Value {
    match value {
        Typed::Null => Value::Null,
        Typed::Uuid(id) => Value::String(id.to_string()),
        Typed::Text(text) => Value::String(text.clone()),
        Typed::I64(n) => Value::from(*n),
        Typed::F64(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        Typed::Json(json) => (**json).clone(),
        Typed::Timestamp(at) => Value::String(at.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        Typed::Date(day) => Value::String(day.format("%Y-%m-%d").to_string()),
    }
}
