//! Reading the event log directly, in commit order: the rebuild's bulk read,
//! the worker's gap fill (events the bus did not deliver in order are read
//! here instead, never skipped), and the store tail of a worker without a bus.
//!
//! On Postgres, commit order is `(transaction_id, global_position)` and a
//! reader stops below the oldest open transaction. On SQLite (module
//! [`sqlite`]) commits are serialized, so `global_position` order IS commit
//! order and whatever a reader sees is a prefix of it: no horizon to stop at.

use sqlx::{PgConnection, Row};

use ai_secretary_contract::{EventEnvelope, Position};

use crate::db::Db;

/// An event's envelope columns and its payload as text, as [`envelope_of`]
/// reads them (a macro, so the queries below are put together at compile time).
macro_rules! envelope_and_payload {
    () => {
        "SELECT event_id, stream_id, stream_type, version, event_type, schema_version,
            transaction_id::text::int8 AS transaction_id, global_position, recorded_at,
            data::text AS data
         FROM events"
    };
}

/// The events in `(after, upto]` in commit order; the commit-order index serves
/// this range scan, and `upto` is at or below the head. Its `ORDER BY` names
/// the table's columns (`events.…`): a bare `transaction_id` would be the
/// select list's text-cast alias, which no index orders, and the whole range
/// would be sorted before its first row came out.
pub const RANGE: &str = concat!(
    envelope_and_payload!(),
    " WHERE (transaction_id, global_position) > ($1::int8::text::xid8, $2)
       AND (transaction_id, global_position) <= ($3::int8::text::xid8, $4)
     ORDER BY events.transaction_id, events.global_position"
);

/// Plan the range read with its actual bounds, for the rest of the transaction.
/// The service's pools force generic plans (the append path gains from them),
/// and a generic plan cannot tell a range of ten events from one of a million:
/// it scans a bitmap and sorts the range before its first row comes out. With
/// the bounds known, Postgres walks the commit-order index and rows stream at
/// once. `SET LOCAL` needs a transaction; it ends with it.
pub(crate) async fn plan_range_with_its_bounds(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(crate) fn range(
    after: Position,
    upto: Position,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(RANGE)
        .bind(after.transaction_id)
        .bind(after.global_position)
        .bind(upto.transaction_id)
        .bind(upto.global_position)
}

/// An envelope without its payload (no rule reads `metadata`; `data` comes
/// separately as text, to be decoded straight into the event's type).
pub(crate) fn envelope_of(row: &sqlx::postgres::PgRow) -> Result<EventEnvelope, sqlx::Error> {
    Ok(EventEnvelope {
        event_id: row.try_get(0)?,
        stream_id: row.try_get(1)?,
        stream_type: row.try_get(2)?,
        version: row.try_get(3)?,
        event_type: row.try_get(4)?,
        schema_version: row.try_get(5)?,
        transaction_id: row.try_get(6)?,
        global_position: row.try_get(7)?,
        recorded_at: row.try_get(8)?,
        data: serde_json::Value::Null,
        metadata: serde_json::Value::Null,
        previous: None,
    })
}

/// After a commit's notification that found nothing readable yet (an older
/// transaction still open holds the read horizon below it): look again this
/// often, this many times, rather than wait for the next poll. Shared by every
/// reader that tails the log: the relay and a worker without a bus.
pub const RECHECK: std::time::Duration = std::time::Duration::from_millis(2);
pub const RECHECKS: u32 = 100;

/// [`read_committed`]'s query: at most `$3` events after `($1, $2)`, below the
/// read horizon; `ORDER BY events.…` as in [`RANGE`].
pub const READ_COMMITTED: &str = concat!(
    envelope_and_payload!(),
    " WHERE (transaction_id, global_position) > ($1::int8::text::xid8, $2)
       AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
     ORDER BY events.transaction_id, events.global_position
     LIMIT $3"
);

/// At most `limit` committed events after `after`, in commit order, each with
/// its payload as JSON text: the relay's read (`EventStore::read_all`), for a
/// worker that tails the store instead of the bus. It stops below the oldest
/// transaction still open, which may yet commit an event ordered before rows
/// already visible: a reader that moved past it would never come back for it.
pub async fn read_committed(
    db: &Db,
    after: Position,
    limit: i64,
) -> Result<Vec<(EventEnvelope, String)>, sqlx::Error> {
    let pool = match db {
        Db::Postgres(pool) => pool,
        Db::Sqlite(db) => return sqlite::read_committed(&db.pool, after, limit).await,
    };
    let rows = sqlx::query(READ_COMMITTED)
        .bind(after.transaction_id)
        .bind(after.global_position)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| Ok((envelope_of(row)?, row.try_get::<String, _>(9)?)))
        .collect()
}

/// At most `limit` events in `(after, upto]`, each with its payload as JSON
/// text. `upto` must be at or below the read horizon: here it is the position of
/// an event the relay already read, so everything below it is committed.
pub async fn read(
    conn: &mut PgConnection,
    after: Position,
    upto: Position,
    limit: i64,
) -> Result<Vec<(EventEnvelope, String)>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{RANGE} LIMIT $5")))
        .bind(after.transaction_id)
        .bind(after.global_position)
        .bind(upto.transaction_id)
        .bind(upto.global_position)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| Ok((envelope_of(row)?, row.try_get::<String, _>(9)?)))
        .collect()
}

/// Read the events in `(after, upto]`, at most `limit`, on either database:
/// the range read of a gap fill or a rebuild, each call a snapshot of its own
/// (`read` and [`sqlite::read`] read within a caller's transaction instead).
pub async fn read_range(
    db: &Db,
    after: Position,
    upto: Position,
    limit: i64,
) -> Result<Vec<(EventEnvelope, String)>, sqlx::Error> {
    match db {
        Db::Postgres(pool) => {
            // A read-only transaction (it takes no transaction id), for the range plan.
            let mut snapshot = pool.begin().await?;
            plan_range_with_its_bounds(&mut snapshot).await?;
            let events = read(&mut snapshot, after, upto, limit).await?;
            snapshot.rollback().await?;
            Ok(events)
        }
        Db::Sqlite(db) => {
            let mut conn = db.pool.acquire().await?;
            sqlite::read(&mut conn, after, upto, limit).await
        }
    }
}

/// The log on SQLite (migrations/sqlite/20261129000001_event_store.sql): uuids
/// are BLOBs of 16 bytes, `recorded_at` INTEGER microseconds since 1970 UTC,
/// `data` JSON text. One writer at a time, so `global_position` order is
/// commit order and `transaction_id` (the commit's first position) never
/// orders differently: every statement here orders and bounds by
/// `global_position` alone, which the table's rowid serves as a range scan.
pub mod sqlite {
    use sqlx::{Row, SqliteConnection, SqlitePool, sqlite::SqliteRow};

    use ai_secretary_contract::{EventEnvelope, Position};

    use crate::checkpoint::sqlite::time;

    /// The events in `(after, upto]` in commit order: `$1` is `after`'s
    /// global position, `$2` `upto`'s. A position's global_position alone
    /// places it (see the module header), so no row comparison is needed.
    pub(crate) const RANGE: &str =
        "SELECT event_id, stream_id, stream_type, version, event_type, schema_version,
            transaction_id, global_position, recorded_at, data
     FROM events
     WHERE global_position > $1 AND global_position <= $2
     ORDER BY global_position";

    /// An envelope without its payload, as [`super::envelope_of`] makes it on
    /// Postgres; the ids are decoded from their BLOBs and `recorded_at` from
    /// its microseconds.
    pub(crate) fn envelope_of(row: &SqliteRow) -> Result<EventEnvelope, sqlx::Error> {
        Ok(EventEnvelope {
            event_id: row.try_get(0)?,
            stream_id: row.try_get(1)?,
            stream_type: row.try_get(2)?,
            version: row.try_get(3)?,
            event_type: row.try_get(4)?,
            schema_version: row.try_get(5)?,
            transaction_id: row.try_get(6)?,
            global_position: row.try_get(7)?,
            recorded_at: time("recorded_at", row.try_get(8)?)?,
            data: serde_json::Value::Null,
            metadata: serde_json::Value::Null,
            previous: None,
        })
    }

    fn with_payloads(rows: &[SqliteRow]) -> Result<Vec<(EventEnvelope, String)>, sqlx::Error> {
        rows.iter()
            .map(|row| Ok((envelope_of(row)?, row.try_get::<String, _>(9)?)))
            .collect()
    }

    /// See [`super::read_committed`]. Every committed event is readable at
    /// once and in order, so this is a plain `global_position > $1`: no
    /// horizon, nothing an open transaction could still slip in below.
    pub async fn read_committed(
        pool: &SqlitePool,
        after: Position,
        limit: i64,
    ) -> Result<Vec<(EventEnvelope, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT event_id, stream_id, stream_type, version, event_type, schema_version,
                transaction_id, global_position, recorded_at, data
             FROM events
             WHERE global_position > $1
             ORDER BY global_position
             LIMIT $2",
        )
        .bind(after.global_position)
        .bind(limit)
        .fetch_all(pool)
        .await?;
        with_payloads(&rows)
    }

    /// See [`super::read`]: at most `limit` events in `(after, upto]`, in
    /// the connection's snapshot (its transaction's, if it is in one).
    pub async fn read(
        conn: &mut SqliteConnection,
        after: Position,
        upto: Position,
        limit: i64,
    ) -> Result<Vec<(EventEnvelope, String)>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("{RANGE} LIMIT $3")))
            .bind(after.global_position)
            .bind(upto.global_position)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
        with_payloads(&rows)
    }
}
