//! The bulk writer: a fold's rows (`crate::fold`) written in bulk into tables
//! shaped as the live ones, and the key-wise rewrite of the few rows a tail
//! changed. The target table is named by the caller: the live one, a rebuild's
//! `<table>__next`, or verify's scratch copy. Each operation has one entry point
//! that takes a [`Conn`] and matches on the dialect:
//!
//! - Postgres: each table with one binary `COPY`, every value encoded by its
//!   column's type exactly as sqlx binds it on the live path;
//! - SQLite: multi-row `INSERT`s of a few hundred rows each (SQLite has no
//!   `COPY`), every value bound as the SQLite executor binds it
//!   (`executor::sqlite::bind`), so a bulk-written row reads back exactly as a
//!   row the live path wrote.
//!
//! Everything runs on the caller's connection (in the caller's transaction, if
//! any): on SQLite that is what decides how long the write lock is held, so a
//! caller writing many rows beside a live service commits in slices
//! ([`write_rows`] takes any slice of a table's rows).
//!
//! This is the executors' bulk half: the rows are the result of the same ops
//! the live path runs (`crate::executor`), so it only has to copy them, never
//! to know a projection's rules.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{AssertSqlSafe, PgConnection, SqliteConnection};

use crate::{
    db::Conn,
    executor::{postgres::bind_array, sqlite},
    fold::{Key, Row},
    ops::{Table, Type, Value},
    projections::Fold,
};

/// Write every row of `fold` into its tables named `<table><suffix>`.
pub async fn write_all(conn: &mut Conn<'_>, fold: &Fold, suffix: &str) -> Result<(), sqlx::Error> {
    for rows in &fold.tables {
        let target = format!("{}{suffix}", rows.table.name);
        let all: Vec<&Row> = rows.rows.iter().map(|(_, row)| row).collect();
        write_rows(conn, rows.table, &target, &all).await?;
    }
    Ok(())
}

/// Insert `rows` (shaped as `table`: every column, in its order) into `target`.
pub async fn write_rows(
    conn: &mut Conn<'_>,
    table: &Table,
    target: &str,
    rows: &[&Row],
) -> Result<(), sqlx::Error> {
    match conn {
        Conn::Postgres(conn) => copy(conn, table, target, rows).await,
        Conn::Sqlite(conn) => insert_sqlite(conn, table, target, rows).await,
    }
}

/// Rewrite the rows the fold changed since `track_changes` (or the last call):
/// delete them by key, then insert those that still exist.
pub async fn write_changed(
    conn: &mut Conn<'_>,
    fold: &mut Fold,
    suffix: &str,
) -> Result<(), sqlx::Error> {
    for rows in &mut fold.tables {
        let changed = rows.rows.take_changed();
        if changed.is_empty() {
            continue;
        }
        let target = format!("{}{suffix}", rows.table.name);
        match conn {
            Conn::Postgres(conn) => delete_keys(conn, rows.table, &target, &changed).await?,
            Conn::Sqlite(conn) => delete_keys_sqlite(conn, rows.table, &target, &changed).await?,
        }
        let still_there: Vec<&Row> = changed.iter().filter_map(|key| rows.get(key)).collect();
        write_rows(conn, rows.table, &target, &still_there).await?;
    }
    Ok(())
}

/// Rows per SQLite `INSERT`: a few hundred amortize the statement well (each
/// full-size statement is prepared once per connection, by sqlx's cache) while
/// staying far below SQLite's limit on bound parameters per statement
/// ([`SQLITE_MAX_PARAMETERS`]); the widest read-model table has 17 columns.
const SQLITE_ROWS_PER_INSERT: usize = 250;

/// SQLite's default `SQLITE_MAX_VARIABLE_NUMBER` since 3.32 (sqlx bundles a
/// newer one): no statement may bind more parameters.
const SQLITE_MAX_PARAMETERS: usize = 32_766;

/// Keys per SQLite `DELETE` of [`delete_keys_sqlite`] (a tail is small; this
/// only bounds the statement).
const SQLITE_KEYS_PER_DELETE: usize = 500;

/// `$a, $b, …` for `count` parameters numbered from `first`.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Multi-row `INSERT INTO <target> (every column) VALUES (…), (…), …`.
async fn insert_sqlite(
    conn: &mut SqliteConnection,
    table: &Table,
    target: &str,
    rows: &[&Row],
) -> Result<(), sqlx::Error> {
    let width = table.columns.len();
    let per_statement = SQLITE_ROWS_PER_INSERT.min(SQLITE_MAX_PARAMETERS / width);
    let columns: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
    for chunk in rows.chunks(per_statement) {
        let values: Vec<String> = (0..chunk.len())
            .map(|r| format!("({})", placeholders(r * width + 1, width)))
            .collect();
        let sql = format!(
            "INSERT INTO {target} ({}) VALUES {}",
            columns.join(", "),
            values.join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in chunk {
            debug_assert_eq!(row.len(), width, "a row of {} has every column", table.name);
            for value in *row {
                query = sqlite::bind(query, value);
            }
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// `DELETE` the rows of `target` (shaped as `table`) whose keys are `keys`:
/// `(k1, k2) IN (VALUES ($1, $2), …)`, a row value per key (SQLite has no
/// arrays to bind a key column as one parameter).
async fn delete_keys_sqlite(
    conn: &mut SqliteConnection,
    table: &Table,
    target: &str,
    keys: &[Key],
) -> Result<(), sqlx::Error> {
    let width = table.key.len();
    for chunk in keys.chunks(SQLITE_KEYS_PER_DELETE) {
        let values: Vec<String> = (0..chunk.len())
            .map(|r| format!("({})", placeholders(r * width + 1, width)))
            .collect();
        let sql = format!(
            "DELETE FROM {target} WHERE ({}) IN (VALUES {})",
            table.key.join(", "),
            values.join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for key in chunk {
            for value in key {
                query = sqlite::bind(query, value);
            }
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// `DELETE` the rows of `target` (shaped as `table`) whose keys are `keys`: one
/// statement, each key column bound as one array.
async fn delete_keys(
    conn: &mut PgConnection,
    table: &Table,
    target: &str,
    keys: &[Key],
) -> Result<(), sqlx::Error> {
    let arrays: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, column)| format!("${}::{}[]", i + 1, pg_type(table.column(column).ty)))
        .collect();
    let names: Vec<String> = (0..table.key.len()).map(|i| format!("k{i}")).collect();
    let sql = format!(
        "DELETE FROM {target} t USING unnest({}) AS k({}) WHERE ({}) = ({})",
        arrays.join(", "),
        names.join(", "),
        table
            .key
            .iter()
            .map(|c| format!("t.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
        names
            .iter()
            .map(|c| format!("k.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let columns: Vec<Vec<&Value>> = (0..table.key.len())
        .map(|i| keys.iter().map(|k| &k[i]).collect())
        .collect();
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (column, values) in table.key.iter().zip(&columns) {
        query = bind_array(query, table.column(column).ty, values);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// The Postgres name of a column type.
fn pg_type(ty: Type) -> &'static str {
    match ty {
        Type::Uuid => "uuid",
        Type::Text => "text",
        Type::I64 => "int8",
        Type::F64 => "float8",
        Type::Json => "jsonb",
        Type::Timestamp => "timestamptz",
        Type::Date => "date",
    }
}

/// `COPY <target> (every column) FROM STDIN (FORMAT binary)`, in buffers of a
/// few MB.
async fn copy(
    conn: &mut PgConnection,
    table: &Table,
    target: &str,
    rows: &[&Row],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let columns: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {target} ({}) FROM STDIN (FORMAT binary)",
            columns.join(", ")
        ))
        .await?;
    let mut out = CopyBinary::new();
    let fields = i16::try_from(table.columns.len()).expect("a table has fewer than 32k columns");
    for row in rows {
        out.row(fields);
        for value in *row {
            out.value(value);
        }
        if out.buf.len() >= COPY_BUFFER
            && let Err(e) = copy.send(std::mem::take(&mut out.buf)).await
        {
            let _ = copy.abort(e.to_string()).await;
            return Err(e);
        }
    }
    out.trailer();
    copy.send(out.buf).await?;
    copy.finish().await?;
    Ok(())
}

/// Bytes buffered before they are sent to a COPY.
const COPY_BUFFER: usize = 4 << 20;

/// Rows in the binary format of `COPY` (header, then per row a field count and
/// each field as length + bytes, -1 for NULL; a -1 field count ends the data).
struct CopyBinary {
    buf: Vec<u8>,
}

/// Postgres' epoch for timestamps and dates.
fn postgres_epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(2000, 1, 1).expect("a valid date")
}

impl CopyBinary {
    fn new() -> CopyBinary {
        let mut buf = Vec::with_capacity(COPY_BUFFER + (64 << 10));
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyBinary { buf }
    }

    fn row(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        self.buf
            .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// One value in Postgres' binary input format of its type.
    fn value(&mut self, value: &Value) {
        match value {
            Value::Null => self.buf.extend_from_slice(&(-1i32).to_be_bytes()),
            Value::Uuid(id) => self.field(id.as_bytes()),
            Value::Text(v) => self.field(v.as_bytes()),
            Value::I64(v) => self.field(&v.to_be_bytes()),
            Value::F64(v) => self.field(&v.to_be_bytes()),
            Value::Json(v) => {
                // jsonb: a version byte (1), then the text, as sqlx sends it.
                let mut bytes = vec![1u8];
                serde_json::to_writer(&mut bytes, v).expect("a JSON value always serializes");
                self.field(&bytes);
            }
            Value::Timestamp(at) => self.field(&timestamp_micros(at).to_be_bytes()),
            Value::Date(day) => {
                let days = (*day - postgres_epoch()).num_days();
                // chrono's dates (±262,000 years) are well inside i32 days.
                self.field(&(days as i32).to_be_bytes());
            }
        }
    }

    fn trailer(&mut self) {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
    }
}

/// Microseconds since 2000-01-01 UTC, truncated as sqlx truncates them.
fn timestamp_micros(at: &DateTime<Utc>) -> i64 {
    let epoch = postgres_epoch()
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    (*at - epoch)
        .num_microseconds()
        // chrono's range (±262,000 years) is inside i64 microseconds (±292,000).
        .expect("every chrono timestamp fits in i64 microseconds")
}
