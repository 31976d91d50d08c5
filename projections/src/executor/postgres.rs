//! The Postgres executor: a projection's rules applied to one event in the
//! batch's transaction (lookup, then ops), each value bound as its column's type.
//!
//! The bulk path (a rebuild's or `verify`'s whole tables) is `crate::tables`.

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{
    AssertSqlSafe, PgConnection, PgExecutor, PgPool, Postgres, Row,
    postgres::{PgArguments, PgRow},
    query::Query,
};
use uuid::Uuid;

use super::{
    deferred::Write,
    sql::{self, Arg, Dialect},
};
use crate::{
    checkpoint::{self, Move},
    ops::{Cond, Found, Lookup, Op, Table, Type, Value},
};

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
    let columns = columns_of(table, &rows);
    let query = sqlx::query(AssertSqlSafe(insert_rows_sql(table, 0, "")));
    bind_columns(query, table, &columns)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// `INSERT … SELECT FROM unnest(…)`, each column bound as one array: its
/// placeholders follow `after` parameters bound before it, and `and` (empty,
/// or starting with ` AND`) is a condition the rows are selected under.
fn insert_rows_sql(table: &Table, after: usize, and: &str) -> String {
    let names: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
    let params: Vec<String> = (1..=names.len())
        .map(|i| format!("${}", after + i))
        .collect();
    format!(
        "INSERT INTO {} ({}) SELECT * FROM unnest({}) WHERE TRUE{and} ON CONFLICT ({}) DO NOTHING",
        table.name,
        names.join(", "),
        params.join(", "),
        table.key.join(", "),
    )
}

/// Rows as columns, for binding each column as one array.
fn columns_of<'v>(table: &Table, rows: &'v [Vec<Value>]) -> Vec<Vec<&'v Value>> {
    let mut columns: Vec<Vec<&Value>> = table
        .columns
        .iter()
        .map(|_| Vec::with_capacity(rows.len()))
        .collect();
    for row in rows {
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value);
        }
    }
    columns
}

fn bind_columns<'q>(
    mut query: PgQuery<'q>,
    table: &Table,
    columns: &[Vec<&'q Value>],
) -> PgQuery<'q> {
    for (column, values) in table.columns.iter().zip(columns) {
        query = bind_array(query, column.ty, values);
    }
    query
}

/// Most writes that ride on a checkpoint's move in one statement
/// ([`write_moving`]). Each different list of writes is a statement text of
/// its own, prepared once per connection; the bound keeps those few (a
/// batch's writes are a table's gathered inserts and one update per row it
/// changed), and a batch with more commits in a transaction.
pub const MOST_WRITES_IN_ONE_STATEMENT: usize = 8;

/// What became of a move with its writes in one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moving {
    /// Moved, and the writes made, in the statement's own transaction.
    Moved,
    /// The checkpoint is not where the move is fenced from: nothing written.
    NotMoved,
    /// Someone holds the checkpoint's row (a rebuild's swap): nothing
    /// written, and nothing waited for.
    RowBusy,
}

/// Whether `writes` can be made together with a checkpoint's move in one
/// statement ([`write_moving`]): few enough, and none of them on a row another
/// of them writes. A data-modifying `WITH` query does not see the rows of
/// another, so two writes of one statement must touch different rows:
/// gathered inserts into a table are one write, and the updates held for a
/// table are of different rows by its key (`deferred`), but a table must not
/// have both.
pub fn fit_one_statement(writes: &[Write]) -> bool {
    let mut inserted: Vec<&str> = Vec::new();
    let mut updated: Vec<(&str, &Value)> = Vec::new();
    writes.len() <= MOST_WRITES_IN_ONE_STATEMENT
        && writes.iter().all(|write| match write {
            Write::Inserts { table, .. } => {
                let fresh = !inserted.contains(&table.name)
                    && !updated.iter().any(|(t, _)| *t == table.name);
                inserted.push(table.name);
                fresh
            }
            Write::Op(Op::Update { table, filter, .. }) => match (table.key, &filter[..]) {
                ([key], [Cond::Eq(column, value)]) if column == key => {
                    let fresh =
                        !inserted.contains(&table.name) && !updated.contains(&(table.name, value));
                    updated.push((table.name, value));
                    fresh
                }
                _ => false,
            },
            Write::Op(_) => false,
        })
}

/// Move the checkpoint `name` as [`checkpoint::postgres::save`] does and make
/// `writes` (which [`fit_one_statement`]) in the same statement, so in one
/// round trip and one transaction of its own, with no `BEGIN` or `COMMIT`:
/// every write is a `WITH` query that changes nothing unless the move's
/// query has a row.
///
/// **It never waits for the checkpoint's row.** A statement takes the locks
/// of all its tables as it starts, before it reaches the row. A rebuild's
/// swap takes the row and then its tables: a statement that waited for the
/// row while holding the tables would deadlock with it. So the row is locked
/// `NOWAIT`, and when someone holds it the answer is [`Moving::RowBusy`] and
/// the caller makes the batch in a transaction, which locks the row first
/// (`projection::Batch`). The tables themselves are locked in the order of
/// their names, as the swap locks them.
pub async fn write_moving(
    pool: &PgPool,
    name: &str,
    m: Move,
    writes: &[Write],
) -> Result<Moving, sqlx::Error> {
    /// Fails at once (`lock_not_available`) if someone holds the row.
    const FREE: &str = "free AS (SELECT 1 FROM checkpoints WHERE name = $1 FOR UPDATE NOWAIT)";
    let mut sql = format!(
        "WITH {FREE}, {}",
        checkpoint::postgres::moved(&sql::only_if("free"))
    );
    let mut after = checkpoint::postgres::MOVE_PARAMETERS;
    let mut parts = Vec::with_capacity(writes.len());
    // Its tables are locked in the order they appear, before the row; a
    // swap locks them in the order of their names (`rebuild::swap`). In the
    // same order, neither can hold one table while waiting for the other's.
    // (The writes touch different rows, so their order is free.)
    let mut writes: Vec<&Write> = writes.iter().collect();
    writes.sort_by_key(|write| write.table().name);
    for (i, write) in writes.into_iter().enumerate() {
        let (text, part) = match write {
            Write::Op(op) => {
                let statement = sql::gated(Dialect::Postgres, op, after, "moved");
                after += statement.args.len();
                (statement.sql, Part::Args(statement.args))
            }
            Write::Inserts { table, rows } => {
                let text = insert_rows_sql(table, after, &sql::only_if("moved"));
                after += table.columns.len();
                (text, Part::Columns(table, columns_of(table, rows)))
            }
        };
        let _ = write!(sql, ", write_{i} AS ({text})");
        parts.push(part);
    }
    let _ = write!(sql, " {}", checkpoint::postgres::ANNOUNCE);
    let mut query = checkpoint::postgres::bind_move(sqlx::query(AssertSqlSafe(sql)), name, m);
    for part in &parts {
        query = match part {
            Part::Args(args) => bind_all(query, args),
            Part::Columns(table, columns) => bind_columns(query, table, columns),
        };
    }
    match query.fetch_optional(pool).await {
        Ok(Some(_)) => Ok(Moving::Moved),
        Ok(None) => Ok(Moving::NotMoved),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            Ok(Moving::RowBusy)
        }
        Err(e) => Err(e),
    }
}

/// SQLSTATE of a `NOWAIT` lock that someone else holds.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A write's values in a statement of several writes.
enum Part<'a> {
    Args(Vec<Arg<'a>>),
    Columns(&'a Table, Vec<Vec<&'a Value>>),
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

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::ops::Set;
    use crate::projections::assistants::{ASSISTANTS, CONVERSATIONS};

    fn update(id: Uuid) -> Write {
        Write::Op(Op::update(
            &ASSISTANTS,
            vec![crate::ops::eq("id", id)],
            [("message_count", Set::Add(1))],
        ))
    }

    fn inserts(table: &'static Table) -> Write {
        Write::Inserts {
            table,
            rows: vec![],
        }
    }

    /// Only writes of different rows share a statement, and only a few.
    #[test]
    fn only_a_few_writes_of_different_rows_fit_one_statement() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(fit_one_statement(&[]));
        assert!(fit_one_statement(&[
            inserts(&CONVERSATIONS),
            update(a),
            update(b)
        ]));
        // The same row twice: the second would not see the first.
        assert!(!fit_one_statement(&[update(a), update(a)]));
        // A table's inserts and updates: an update would not see the inserts.
        assert!(!fit_one_statement(&[inserts(&ASSISTANTS), update(a)]));
        assert!(!fit_one_statement(&[update(a), inserts(&ASSISTANTS)]));
        assert!(!fit_one_statement(&[
            inserts(&CONVERSATIONS),
            inserts(&CONVERSATIONS)
        ]));
        // Not a held write: a delete, an update by another filter.
        let delete = Write::Op(Op::delete(&ASSISTANTS, vec![crate::ops::eq("id", a)]));
        assert!(!fit_one_statement(&[delete]));
        let by_owner = Write::Op(Op::update(
            &ASSISTANTS,
            vec![crate::ops::eq("owner_id", a)],
            [("message_count", Set::Add(1))],
        ));
        assert!(!fit_one_statement(&[by_owner]));
        // More than the bound.
        let many: Vec<Write> = (0..=MOST_WRITES_IN_ONE_STATEMENT)
            .map(|_| update(Uuid::new_v4()))
            .collect();
        assert!(!fit_one_statement(&many));
        assert!(fit_one_statement(&many[1..]));
    }
}
