//! The Postgres executor: a projection's rules applied to one event in the
//! batch's transaction (lookup, then ops), each value bound as its column's type.
//!
//! The bulk path (a rebuild's or `verify`'s whole tables) is `crate::tables`.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{
    AssertSqlSafe, PgConnection, PgExecutor, Postgres, Row,
    postgres::{PgArguments, PgRow},
    query::Query,
};
use uuid::Uuid;

use super::{
    deferred::Write,
    sql::{self, Arg, Dialect},
};
use crate::ops::{Found, Lookup, Op, Table, Type, Value};

/// Make `writes` in order: an op as its statement, gathered inserts as one
/// `INSERT … SELECT FROM unnest(…)`, each column bound as one array.
pub async fn write(tx: &mut PgConnection, writes: Vec<Write>) -> Result<(), sqlx::Error> {
    for write in writes {
        match write {
            Write::Op(op) => run(tx, &[op]).await?,
            Write::Inserts { table, rows } => insert_rows(tx, table, rows).await?,
        }
    }
    Ok(())
}

/// Insert `rows` where their key is free, in order (the first row for a key
/// wins, as when they are inserted one by one), in one statement whose text
/// depends on the table alone.
async fn insert_rows(
    tx: &mut PgConnection,
    table: &Table,
    rows: Vec<Vec<Value>>,
) -> Result<(), sqlx::Error> {
    let mut columns: Vec<Vec<Value>> = table
        .columns
        .iter()
        .map(|_| Vec::with_capacity(rows.len()))
        .collect();
    for row in rows {
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value);
        }
    }
    let names: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
    let params: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
    let statement = format!(
        "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT ({}) DO NOTHING",
        table.name,
        names.join(", "),
        params.join(", "),
        table.key.join(", "),
    );
    let mut query = sqlx::query(AssertSqlSafe(statement));
    for (column, values) in table.columns.iter().zip(&columns) {
        query = bind_array(query, column.ty, &values.iter().collect::<Vec<_>>());
    }
    query.execute(&mut *tx).await?;
    Ok(())
}

/// Run `ops` in order.
pub async fn run(tx: &mut PgConnection, ops: &[Op]) -> Result<(), sqlx::Error> {
    for op in ops {
        let statement = sql::statement(Dialect::Postgres, op);
        bind_all(sqlx::query(AssertSqlSafe(statement.sql)), &statement.args)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Answer a lookup from the tables as the transaction sees them.
pub async fn read(tx: &mut PgConnection, lookup: &Lookup) -> Result<Found, sqlx::Error> {
    let statement = sql::lookup(Dialect::Postgres, lookup);
    let rows = bind_all(sqlx::query(AssertSqlSafe(statement.sql)), &statement.args)
        .fetch_all(&mut *tx)
        .await?;
    let types = lookup.column_types();
    let rows = rows
        .iter()
        .map(|row| decode_row(row, &types))
        .collect::<Result<_, _>>()?;
    Ok(Found { rows })
}

/// The rows of a query whose text is shared with SQLite (the read side's
/// queries, `crate::read`), each column read as `types`.
pub async fn fetch<'e>(
    executor: impl PgExecutor<'e>,
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

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

fn bind_all<'q>(mut query: PgQuery<'q>, args: &[Arg<'q>]) -> PgQuery<'q> {
    for arg in args {
        query = match *arg {
            Arg::One(ty, value) => bind(query, ty, value),
            Arg::Array(ty, values) => bind_array(query, ty, &values.iter().collect::<Vec<_>>()),
            Arg::I64(n) => query.bind(n),
        };
    }
    query
}

/// Bind one value as a column of type `ty` (a NULL too: Postgres refuses a
/// parameter of another type than its column's).
fn bind<'q>(query: PgQuery<'q>, ty: Type, value: &'q Value) -> PgQuery<'q> {
    match (ty, value) {
        (_, Value::Uuid(v)) => query.bind(*v),
        (_, Value::Text(v)) => query.bind(v.as_str()),
        (_, Value::I64(v)) => query.bind(*v),
        (_, Value::F64(v)) => query.bind(*v),
        (_, Value::Json(v)) => query.bind(&**v),
        (_, Value::Timestamp(v)) => query.bind(*v),
        (_, Value::Date(v)) => query.bind(*v),
        (Type::Uuid, Value::Null) => query.bind(None::<Uuid>),
        (Type::Text, Value::Null) => query.bind(None::<&str>),
        (Type::I64, Value::Null) => query.bind(None::<i64>),
        (Type::F64, Value::Null) => query.bind(None::<f64>),
        (Type::Json, Value::Null) => query.bind(None::<serde_json::Value>),
        (Type::Timestamp, Value::Null) => query.bind(None::<DateTime<Utc>>),
        (Type::Date, Value::Null) => query.bind(None::<NaiveDate>),
    }
}

/// Bind values of one column as a Postgres array of its type.
pub(crate) fn bind_array<'q>(query: PgQuery<'q>, ty: Type, values: &[&'q Value]) -> PgQuery<'q> {
    let values = values.iter().copied();
    match ty {
        Type::Uuid => query.bind(values.map(|v| v.as_uuid()).collect::<Vec<_>>()),
        Type::Text => query.bind(values.map(|v| v.as_str()).collect::<Vec<_>>()),
        Type::I64 => query.bind(values.map(|v| v.as_i64()).collect::<Vec<_>>()),
        Type::F64 => query.bind(
            values
                .map(|v| match v {
                    Value::F64(v) => Some(*v),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        Type::Json => query.bind(
            values
                .map(|v| match v {
                    Value::Json(v) => Some(&**v),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
        Type::Timestamp => query.bind(values.map(|v| v.as_timestamp()).collect::<Vec<_>>()),
        Type::Date => query.bind(
            values
                .map(|v| match v {
                    Value::Date(v) => Some(*v),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        ),
    }
}

/// A row's columns, read as `types`.
pub fn decode_row(row: &PgRow, types: &[Type]) -> Result<Vec<Value>, sqlx::Error> {
    types
        .iter()
        .enumerate()
        .map(|(i, ty)| decode(row, i, *ty))
        .collect()
}

/// Column `i` of `row`, read as type `ty`.
fn decode(row: &PgRow, i: usize, ty: Type) -> Result<Value, sqlx::Error> {
    Ok(match ty {
        Type::Uuid => row.try_get::<Option<Uuid>, _>(i)?.into(),
        Type::Text => row.try_get::<Option<String>, _>(i)?.into(),
        Type::I64 => row.try_get::<Option<i64>, _>(i)?.into(),
        Type::F64 => row.try_get::<Option<f64>, _>(i)?.into(),
        Type::Json => row.try_get::<Option<serde_json::Value>, _>(i)?.into(),
        Type::Timestamp => row.try_get::<Option<DateTime<Utc>>, _>(i)?.into(),
        Type::Date => row.try_get::<Option<NaiveDate>, _>(i)?.into(),
    })
}
