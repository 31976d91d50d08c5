//! The SQLite executor: the same rules and the same statement text as the
//! Postgres executor (`sql::statement` with `Dialect::Sqlite`), each value bound
//! as SQLite stores its column's type. The storage types are the SQLite event
//! store's (migrations/sqlite): a uuid as a BLOB of its 16 bytes (what sqlx
//! binds for a `Uuid`), a timestamp as INTEGER microseconds since 1970 UTC
//! (Postgres' precision; sorts and compares as a number, so `MAX` is the later
//! time), JSON as TEXT, a date as TEXT `YYYY-MM-DD` (sorts as it reads).

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{
    AssertSqlSafe, Row, Sqlite, SqliteConnection, SqliteExecutor,
    query::Query,
    sqlite::{SqliteArguments, SqliteRow},
};
use uuid::Uuid;

use super::{
    deferred::Write,
    sql::{self, Arg, Dialect},
};
use crate::ops::{Found, Lookup, OnConflict, Op, Type, Value};

/// Make `writes` in order; gathered inserts one row at a time (a statement
/// costs no round trip in process, and SQLite has no arrays to bind).
pub async fn write(conn: &mut SqliteConnection, writes: Vec<Write>) -> Result<(), sqlx::Error> {
    for write in writes {
        match write {
            Write::Op(op) => run(conn, &[op]).await?,
            Write::Inserts { table, rows } => {
                let ops: Vec<Op> = rows
                    .into_iter()
                    .map(|row| Op::Insert {
                        table,
                        row,
                        on_conflict: OnConflict::Nothing,
                    })
                    .collect();
                run(conn, &ops).await?;
            }
        }
    }
    Ok(())
}

/// Run `ops` in order.
pub async fn run(conn: &mut SqliteConnection, ops: &[Op]) -> Result<(), sqlx::Error> {
    for op in ops {
        let statement = sql::statement(Dialect::Sqlite, op);
        bind_all(sqlx::query(AssertSqlSafe(statement.sql)), &statement.args)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Answer a lookup from the tables as the connection sees them.
pub async fn read(conn: &mut SqliteConnection, lookup: &Lookup) -> Result<Found, sqlx::Error> {
    let statement = sql::lookup(Dialect::Sqlite, lookup);
    let rows = bind_all(sqlx::query(AssertSqlSafe(statement.sql)), &statement.args)
        .fetch_all(&mut *conn)
        .await?;
    let types = lookup.column_types();
    let rows = rows
        .iter()
        .map(|row| decode_row(row, &types))
        .collect::<Result<_, _>>()?;
    Ok(Found { rows })
}

/// The rows of a query whose text is shared with Postgres (the read side's
/// queries, `crate::read`), each column read as `types`.
pub async fn fetch<'e>(
    executor: impl SqliteExecutor<'e>,
    sql: &str,
    args: &[Arg<'_>],
    types: &[Type],
) -> Result<Vec<Vec<Value>>, sqlx::Error> {
    bind_all(sqlx::query(AssertSqlSafe(sql)), args)
        .fetch_all(executor)
        .await?
        .iter()
        .map(|row| decode_row(row, types))
        .collect()
}

pub(crate) type LiteQuery<'q> = Query<'q, Sqlite, SqliteArguments>;

fn bind_all<'q>(mut query: LiteQuery<'q>, args: &[Arg<'q>]) -> LiteQuery<'q> {
    for arg in args {
        query = match *arg {
            Arg::One(_, value) => bind(query, value),
            Arg::I64(n) => query.bind(n),
            // `Dialect::Sqlite` expands a list into one parameter per element.
            Arg::Array(..) => unreachable!("no array parameter in SQLite's statements"),
        };
    }
    query
}

/// Bind one value as SQLite stores its type (a NULL is a NULL of any type).
pub(crate) fn bind<'q>(query: LiteQuery<'q>, value: &'q Value) -> LiteQuery<'q> {
    match value {
        Value::Null => query.bind(None::<i64>),
        Value::Uuid(v) => query.bind(*v),
        Value::Text(v) => query.bind(v.as_str()),
        Value::I64(v) => query.bind(*v),
        Value::F64(v) => query.bind(*v),
        Value::Json(v) => query.bind(v.to_string()),
        Value::Timestamp(v) => query.bind(v.timestamp_micros()),
        Value::Date(v) => query.bind(v.format("%Y-%m-%d").to_string()),
    }
}

/// A row's columns, read as `types`.
pub fn decode_row(row: &SqliteRow, types: &[Type]) -> Result<Vec<Value>, sqlx::Error> {
    types
        .iter()
        .enumerate()
        .map(|(i, ty)| decode(row, i, *ty))
        .collect()
}

/// Column `i` of `row`, read as type `ty`.
fn decode(row: &SqliteRow, i: usize, ty: Type) -> Result<Value, sqlx::Error> {
    let invalid = |what: String| sqlx::Error::ColumnDecode {
        index: i.to_string(),
        source: what.into(),
    };
    Ok(match ty {
        Type::Uuid => row.try_get::<Option<Uuid>, _>(i)?.into(),
        Type::Text => row.try_get::<Option<String>, _>(i)?.into(),
        Type::I64 => row.try_get::<Option<i64>, _>(i)?.into(),
        Type::F64 => row.try_get::<Option<f64>, _>(i)?.into(),
        Type::Json => match row.try_get::<Option<String>, _>(i)? {
            None => Value::Null,
            Some(text) => Value::Json(Box::new(
                serde_json::from_str(&text).map_err(|e| invalid(format!("json: {e}")))?,
            )),
        },
        Type::Timestamp => match row.try_get::<Option<i64>, _>(i)? {
            None => Value::Null,
            Some(micros) => Value::Timestamp(
                DateTime::<Utc>::from_timestamp_micros(micros)
                    .ok_or_else(|| invalid(format!("timestamp {micros} µs")))?,
            ),
        },
        Type::Date => match row.try_get::<Option<String>, _>(i)? {
            None => Value::Null,
            Some(day) => Value::Date(
                NaiveDate::parse_from_str(&day, "%Y-%m-%d")
                    .map_err(|e| invalid(format!("date {day:?}: {e}")))?,
            ),
        },
    })
}

/// The SQLite type a column of type `ty` is stored as (in a STRICT table).
pub fn storage_type(ty: Type) -> &'static str {
    match ty {
        Type::Uuid => "BLOB",
        Type::Text | Type::Json | Type::Date => "TEXT",
        Type::I64 | Type::Timestamp => "INTEGER",
        Type::F64 => "REAL",
    }
}
