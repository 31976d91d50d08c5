//! Drift detection: fold the store into a scratch copy of each read model and
//! compare it with the live one, row by row and column by column.
//!
//! Everything happens in ONE `REPEATABLE READ` transaction, so the live tables
//! and each projection's checkpoint `P` are read from the same snapshot (a
//! projection moves its rows and its checkpoint in one commit): the scratch copy
//! is the fold of exactly the events up to `P`. It is written with the same
//! writer a rebuild uses, into temporary tables dropped with the transaction,
//! and compared in SQL; only differing rows come back. Nothing live is written.
//!
//! `cache`: its Postgres lookup (`cache_conversations`) is verified like any
//! table; the Redis values are not (they are copies stamped with the position
//! they were read at, refilled on a miss, and dropped by a rebuild).

use ai_secretary_contract::Position;
use std::fmt;

use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection, PgPool, Row};

use crate::{
    checkpoint,
    db::Conn,
    opener::Opener,
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

/// Verify the named projections (all with a batch path when `names` is empty).
pub async fn verify(
    pool: &PgPool,
    opener: &dyn Opener,
    names: &[&str],
    on_step: &(dyn Fn(Step) + Sync),
) -> Result<Vec<Verified>, rebuild::RebuildError> {
    let names: Vec<&str> = if names.is_empty() {
        projections::NAMES.to_vec()
    } else {
        names.to_vec()
    };
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // Not READ ONLY: that would refuse the temporary scratch tables. The
    // transaction is rolled back, and it writes nothing else.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let mut folds = Vec::new();
    for name in &names {
        let fold = Fold::new(name).ok_or_else(|| rebuild::RebuildError::Unknown((*name).into()))?;
        folds.push(fold);
    }
    let checkpoints = checkpoint::all(&mut *tx).await?;
    let mut limited = Vec::new();
    for fold in folds {
        // A projection that never ran has applied nothing.
        let at = checkpoints
            .iter()
            .find(|c| c.name == fold.name())
            .map_or(Position::default(), |c| c.position);
        limited.push((fold, at));
    }
    let upto = limited.iter().map(|f| f.1).max().unwrap_or_default();
    rebuild::fold_store(
        &mut tx,
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
