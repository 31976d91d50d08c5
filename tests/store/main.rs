//! The event store against the real Postgres and a SQLite file: optimistic
//! concurrency, commit-order reading that never skips, append-only history,
//! coalesced batches in which one command's conflict fails only that command,
//! once-only idempotency keys, and forgetting a user.
//!
//! What the `EventStore` contract promises is tested on both stores: each such
//! test is one async fn over a [`Db`], run by [`on_both_stores!`] as
//! `<name>::postgres` and `<name>::sqlite` (a database of its own on the shared
//! server, dropped at the end; a SQLite file in a temporary directory, removed
//! at the end). What is about one store's internals is tested on that store
//! alone: Postgres' open transactions and NOTIFY here, SQLite's rollbacks,
//! durability, secure delete, triggers and second processes in `sqlite.rs`.

#[path = "../support/mod.rs"]
mod support;

mod sqlite;

use std::sync::Arc;

use ai_secretary::store::{
    AppendError, AppendRequest, EventStore, IdempotencyRecord, NewEvent, PgEventStore, Position,
    RecordedEvent, Reservation, StoredResponse, UserKeyChange, postgres::CoalescingConfig,
};
use futures::future::join_all;
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use support::{TestDb, cluster::PrivatePostgres};
use uuid::Uuid;

type Store = Arc<dyn EventStore>;

/// A database of one backend, and stores over it.
enum Db {
    Postgres {
        // Dropped in this order: the database, then its cluster.
        db: TestDb,
        _cluster: Option<PrivatePostgres>,
    },
    Sqlite(sqlite::SqliteDb),
}

impl Db {
    /// A database of its own on the shared Postgres server.
    async fn postgres() -> Db {
        Db::Postgres {
            db: TestDb::new().await,
            _cluster: None,
        }
    }

    /// A database on a Postgres cluster of the test's own, for tests that read
    /// the whole log (see [`Alone`]).
    async fn postgres_alone() -> Db {
        let cluster = PrivatePostgres::start().await;
        Db::Postgres {
            db: TestDb::on(&cluster.url()).await,
            _cluster: Some(cluster),
        }
    }

    async fn sqlite() -> Db {
        Db::Sqlite(sqlite::SqliteDb::new().await)
    }

    /// A store with the default coalescing. Each call is a store of its own,
    /// committing in its own transactions, as another process would.
    fn store(&self) -> Store {
        match self {
            Db::Postgres { db, .. } => Arc::new(store(db)),
            Db::Sqlite(db) => Arc::new(db.store()),
        }
    }

    /// A store that puts everything queued together into one transaction.
    fn single_flusher(&self) -> Store {
        match self {
            Db::Postgres { db, .. } => Arc::new(single_flusher(db)),
            // One writer, one flusher: always.
            Db::Sqlite(db) => Arc::new(db.store()),
        }
    }

    /// The keys of the idempotency records kept, in order.
    async fn idempotency_keys(&self) -> Vec<String> {
        let sql = "SELECT key FROM idempotency_keys ORDER BY key";
        match self {
            Db::Postgres { db, .. } => sqlx::query_scalar(sql).fetch_all(&db.pool).await,
            Db::Sqlite(db) => sqlx::query_scalar(sql).fetch_all(&db.pool).await,
        }
        .unwrap()
    }
}

/// `mod <name> { postgres, sqlite }`: the test fn `<name>(&Db)` on each store.
/// The Postgres database is made by `Db::<constructor>`; what follows it is
/// passed to `#[tokio::test(...)]`.
macro_rules! on_both_stores {
    ($name:ident, $postgres:ident $(, $($runtime:tt)*)?) => {
        mod $name {
            #[cfg_attr(not(test_servers), ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1")]
            #[tokio::test$(($($runtime)*))?]
            async fn postgres() {
                super::$name(&super::Db::$postgres().await).await
            }

            #[tokio::test$(($($runtime)*))?]
            async fn sqlite() {
                super::$name(&super::Db::sqlite().await).await
            }
        }
    };
}

fn event(tag: &str) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Tested".into(),
        schema_version: 1,
        data: json!({ "tag": tag }),
        metadata: json!({ "correlation_id": tag }),
    }
}

fn append(stream_id: Uuid, expected_version: i64, tags: &[&str]) -> AppendRequest {
    AppendRequest {
        stream_id,
        stream_type: "test",
        expected_version,
        events: tags.iter().map(|t| event(t)).collect(),
        reservation: None,
        idempotency: None,
        user_key: None,
    }
}

/// A database on a Postgres cluster of the test's own. `read_all` stops below
/// the oldest open transaction of the whole cluster: on the shared server, any
/// other test's open transaction would stop it too, and a reader that stopped
/// for that reason would look as if it had stopped for the test's. Alone on its
/// cluster, the test's own transaction is the only one that can hold it.
struct Alone {
    // Dropped in this order: the database, then its cluster.
    db: TestDb,
    _cluster: PrivatePostgres,
}

impl Alone {
    /// The store with event C committed before anything else is open, and a
    /// connection of its own for the test's transaction A.
    async fn c_committed(&self) -> (PgEventStore, PgConnection) {
        let store = store(&self.db);
        store
            .append(append(Uuid::now_v7(), 0, &["C"]))
            .await
            .unwrap();
        (store, PgConnection::connect(&self.db.url).await.unwrap())
    }

    async fn new() -> Alone {
        let cluster = PrivatePostgres::start().await;
        Alone {
            db: TestDb::on(&cluster.url()).await,
            _cluster: cluster,
        }
    }
}

async fn read_tags(store: &PgEventStore, after: Position) -> Vec<RecordedEvent> {
    store.read_all(after, 100).await.unwrap()
}

/// Event A, written straight into the table inside the test's own open
/// transaction; its global position.
async fn insert_a(tx: &mut PgConnection, stream: Uuid) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data)
         VALUES ($1, $2, 'test', 1, 'Tested', '{\"tag\": \"A\"}') RETURNING global_position",
    )
    .bind(Uuid::now_v7())
    .bind(stream)
    .fetch_one(tx)
    .await
    .unwrap()
}

fn tags_of(events: &[RecordedEvent]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e.data["tag"].as_str().unwrap())
        .collect()
}

fn store(db: &TestDb) -> PgEventStore {
    PgEventStore::new(db.pool.clone(), CoalescingConfig::default())
}

/// One flusher, so everything queued together lands in one batch.
fn single_flusher(db: &TestDb) -> PgEventStore {
    PgEventStore::new(
        db.pool.clone(),
        CoalescingConfig {
            max_batch: 256,
            flushers: 1,
        },
    )
}

async fn tags(store: &dyn EventStore, stream: Uuid) -> Vec<String> {
    store
        .read_stream(stream)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.data["tag"].as_str().unwrap().to_owned())
        .collect()
}

on_both_stores!(
    two_writers_at_the_same_version_one_wins,
    postgres,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn two_writers_at_the_same_version_one_wins(db: &Db) {
    // Two stores: two processes, so the race is between transactions, not in a batch.
    let (a, b) = (db.store(), db.store());
    for round in 0..20 {
        let stream = Uuid::now_v7();
        a.append(append(stream, 0, &["first"])).await.unwrap();
        let (ra, rb) = tokio::join!(
            a.append(append(stream, 1, &["a1", "a2", "a3"])),
            b.append(append(stream, 1, &["b1", "b2"])),
        );
        let written = tags(&*a, stream).await;
        match (&ra, &rb) {
            (Ok(won), Err(AppendError::VersionConflict { .. })) => {
                assert_eq!(won.version, 4);
                assert_eq!(written, ["first", "a1", "a2", "a3"], "round {round}");
            }
            (Err(AppendError::VersionConflict { .. }), Ok(won)) => {
                assert_eq!(won.version, 3);
                assert_eq!(written, ["first", "b1", "b2"], "round {round}");
            }
            other => panic!("round {round}: expected exactly one winner, got {other:?}"),
        }
    }
}

on_both_stores!(
    an_expected_version_that_is_not_the_head_is_a_conflict,
    postgres
);
async fn an_expected_version_that_is_not_the_head_is_a_conflict(db: &Db) {
    let store = db.store();
    let stream = Uuid::now_v7();
    store
        .append(append(stream, 0, &["one", "two"]))
        .await
        .unwrap();
    // Behind the head (it would overwrite) and beyond it (it would leave a gap).
    for expected in [0, 1, 3, 7] {
        let result = store.append(append(stream, expected, &["x", "y"])).await;
        assert!(
            matches!(result, Err(AppendError::VersionConflict { .. })),
            "expected {expected}: {result:?}"
        );
    }
    assert_eq!(tags(&*store, stream).await, ["one", "two"]);
    let appended = store.append(append(stream, 2, &["three"])).await.unwrap();
    assert_eq!(appended.version, 3);
}

/// Identity order is not commit order. A holds a lower position open while B
/// commits; a reader must stop exactly at A (reading C, committed before A
/// began, and not B), and must return A then B the moment A commits.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn no_reader_skips_an_event_committed_out_of_order() {
    let alone = Alone::new().await;
    let (store, mut a) = alone.c_committed().await;
    let mut tx_a = a.begin().await.unwrap();
    let stream_a = Uuid::now_v7();
    let position_a = insert_a(&mut tx_a, stream_a).await;

    let stream_b = Uuid::now_v7();
    let b = store.append(append(stream_b, 0, &["B"])).await.unwrap();
    assert!(
        b.position.global_position > position_a,
        "B took a higher identity than A but committed first"
    );

    // A reader that comes after B's commit stops at A: B could still land below it.
    let seen = read_tags(&store, Position::START).await;
    assert_eq!(tags_of(&seen), ["C"], "read past an open transaction");

    tx_a.commit().await.unwrap();
    let seen = read_tags(&store, Position::START).await;
    assert_eq!(tags_of(&seen), ["C", "A", "B"]);

    // Resuming from A's position returns B and only B; from B's, nothing.
    let after_a = read_tags(&store, seen[1].position).await;
    assert_eq!(tags_of(&after_a), ["B"]);
    assert_eq!(after_a[0].stream_id, stream_b);
    assert!(read_tags(&store, seen[2].position).await.is_empty());
}

/// The commit-order reads walk the commit-order index: none sorts the events
/// after its position to return the first few. (Before their `ORDER BY` named
/// the table's columns, each named the select list's cast instead, and every
/// one of these plans was a sort of the whole range, most with parallel
/// workers started for every relay read.) Planned as the service plans them:
/// generic plans on its pools, a custom one for the rebuild's range.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn commit_order_reads_walk_the_index_instead_of_sorting() {
    use ai_secretary::store::postgres::commit_order;
    use ai_secretary_projections::{log, rebuild};

    let db = TestDb::new().await;
    // Enough events, in two transactions, that a scan and sort of them is
    // something a planner weighs against the index.
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO events (event_id, stream_id, stream_type, version, event_type, data)
             SELECT gen_random_uuid(), gen_random_uuid(), 'test', 1, 'Tested',
                    jsonb_build_object('tag', repeat('x', 200), 'n', n)
             FROM generate_series(1, 20000) AS n",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    }
    sqlx::query("ANALYZE events")
        .execute(&db.pool)
        .await
        .unwrap();
    let (transaction_id, global_position): (i64, i64) = sqlx::query_as(commit_order::HEAD)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let near_the_head = format!("{transaction_id}, {}", global_position - 100);
    let head = format!("{transaction_id}, {global_position}");

    let mut conn = db.pool.acquire().await.unwrap();
    let reads = [
        (
            "EventStore::read_all",
            commit_order::READ_ALL,
            "generic",
            format!("({near_the_head}, 500)"),
        ),
        (
            "EventStore::head",
            commit_order::HEAD,
            "generic",
            String::new(),
        ),
        (
            "log::read_committed",
            log::READ_COMMITTED,
            "generic",
            format!("({near_the_head}, 500)"),
        ),
        ("rebuild::head", rebuild::HEAD, "generic", String::new()),
        (
            "log::RANGE (whole log)",
            log::RANGE,
            "custom",
            format!("(0, 0, {head})"),
        ),
        (
            "log::RANGE (its tail)",
            log::RANGE,
            "custom",
            format!("({near_the_head}, {head})"),
        ),
    ];
    for (n, (read, sql, plan, arguments)) in reads.into_iter().enumerate() {
        sqlx::query(AssertSqlSafe(format!(
            "SET plan_cache_mode = force_{plan}_plan"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!("PREPARE read_{n} AS {sql}")))
            .execute(&mut *conn)
            .await
            .unwrap();
        let (explained,): (serde_json::Value,) = sqlx::query_as(AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) EXECUTE read_{n}{arguments}"
        )))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        let explained = explained.to_string();
        assert!(
            explained.contains("events_commit_order_idx")
                && !explained.contains(r#""Node Type":"Sort""#)
                && !explained.contains("Gather"),
            "{read} ({plan} plan) does not walk the commit-order index: {explained}"
        );
    }
}

/// The same, with B's identity lower than A's: commit order, not identity, rules.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn commit_order_wins_over_identity_order() {
    let alone = Alone::new().await;
    let (store, mut a) = alone.c_committed().await;
    let mut tx_a = a.begin().await.unwrap();
    // A's transaction id is taken first; its row is written after B's.
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx_a)
        .await
        .unwrap();
    let b = store
        .append(append(Uuid::now_v7(), 0, &["B"]))
        .await
        .unwrap();
    let position_a = insert_a(&mut tx_a, Uuid::now_v7()).await;
    assert!(position_a > b.position.global_position);
    let seen = read_tags(&store, Position::START).await;
    assert_eq!(tags_of(&seen), ["C"], "read past an open transaction");
    tx_a.commit().await.unwrap();
    let seen = read_tags(&store, Position::START).await;
    assert_eq!(tags_of(&seen), ["C", "A", "B"]);
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn the_events_table_is_append_only() {
    let db = TestDb::new().await;
    let store = store(&db);
    store
        .append(append(Uuid::now_v7(), 0, &["kept"]))
        .await
        .unwrap();
    for sql in [
        "UPDATE events SET data = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

/// The transactions the streams' events were committed in.
async fn transactions_of(store: &dyn EventStore, streams: &[Uuid]) -> Vec<i64> {
    let mut transactions: Vec<i64> = store
        .read_streams(streams)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position.transaction_id)
        .collect();
    transactions.sort();
    transactions.dedup();
    transactions
}

on_both_stores!(
    a_coalesced_batch_fails_only_the_conflicting_command,
    postgres
);
async fn a_coalesced_batch_fails_only_the_conflicting_command(db: &Db) {
    let store = db.single_flusher();
    let taken = Uuid::now_v7();
    store.append(append(taken, 0, &["old"])).await.unwrap();

    let fresh: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    // On this single-threaded test runtime all 21 are queued before a flusher
    // runs. Postgres' first append finds the queue empty and goes directly; the
    // other 20 queue behind it and share one batch (SQLite's 21 all share one).
    let mut requests: Vec<_> = fresh
        .iter()
        .map(|s| append(*s, 0, &["new", "again"]))
        .collect();
    requests.insert(7, append(taken, 0, &["stale"]));
    let results = join_all(requests.into_iter().map(|r| store.append(r))).await;

    for (i, result) in results.iter().enumerate() {
        if i == 7 {
            assert!(
                matches!(result, Err(AppendError::VersionConflict { .. })),
                "{result:?}"
            );
        } else {
            assert_eq!(result.as_ref().unwrap().version, 2);
        }
    }
    assert_eq!(
        transactions_of(&*store, &fresh[1..]).await.len(),
        1,
        "one transaction"
    );
    assert_eq!(tags(&*store, taken).await, ["old"]);
}

on_both_stores!(
    commands_on_one_stream_in_one_batch_follow_each_other,
    postgres
);
async fn commands_on_one_stream_in_one_batch_follow_each_other(db: &Db) {
    let store = db.single_flusher();
    let stream = Uuid::now_v7();
    // Queued together (see above): a command decided on the version an
    // earlier one of the queue leaves goes in after it; one decided on the
    // same version as that earlier one conflicts. (A command decided on the
    // version the second leaves can only be sent once the second has been
    // answered, so none is queued beside it.)
    let requests = [
        append(stream, 0, &["a", "b"]),
        append(stream, 2, &["c"]),
        append(stream, 2, &["stale"]),
    ];
    let results = join_all(requests.into_iter().map(|r| store.append(r))).await;
    let versions: Vec<Option<i64>> = results
        .iter()
        .map(|r| r.as_ref().ok().map(|a| a.version))
        .collect();
    assert_eq!(versions, [Some(2), Some(3), None], "{results:?}");
    assert!(
        matches!(results[2], Err(AppendError::VersionConflict { .. })),
        "{results:?}"
    );
    assert_eq!(tags(&*store, stream).await, ["a", "b", "c"]);
    // Each command's answer is its own last event's position.
    let events = store.read_stream(stream).await.unwrap();
    for (result, last) in results.iter().flatten().zip([1, 2]) {
        assert_eq!(result.position, events[last].position);
    }
}

on_both_stores!(
    one_append_of_thousands_of_events_is_one_commit_in_order,
    postgres
);
async fn one_append_of_thousands_of_events_is_one_commit_in_order(db: &Db) {
    let store = db.single_flusher();
    let stream = Uuid::now_v7();
    // More rows than one SQLite statement may bind (10 values a row).
    let written: Vec<String> = (0..7_001).map(|i| format!("e{i}")).collect();
    let refs: Vec<&str> = written.iter().map(String::as_str).collect();
    let appended = store.append(append(stream, 0, &refs)).await.unwrap();
    assert_eq!(appended.version, 7_001);
    let events = store.read_stream(stream).await.unwrap();
    assert_eq!(events.len(), 7_001);
    assert_eq!(tags(&*store, stream).await, written);
    assert_eq!(
        transactions_of(&*store, &[stream]).await.len(),
        1,
        "one commit"
    );
    let positions: Vec<i64> = events.iter().map(|e| e.position.global_position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions in version order"
    );
    assert_eq!(appended.position, events[7_000].position);
}

on_both_stores!(a_lost_reservation_fails_only_its_command, postgres);
async fn a_lost_reservation_fails_only_its_command(db: &Db) {
    let store = db.single_flusher();
    let streams: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let emails = ["a@x.io", "b@x.io", "a@x.io", "c@x.io", "d@x.io"];
    let requests = streams.iter().zip(emails).map(|(s, email)| AppendRequest {
        reservation: Some(Reservation {
            scope: "user_email",
            value: email.into(),
        }),
        ..append(*s, 0, &[email])
    });
    let results = join_all(requests.map(|r| store.append(r))).await;

    assert!(matches!(
        results[2],
        Err(AppendError::ReservationTaken {
            scope: "user_email"
        })
    ));
    for i in [0, 1, 3, 4] {
        assert!(results[i].is_ok(), "{i}: {:?}", results[i]);
    }
    assert!(store.read_stream(streams[2]).await.unwrap().is_empty());
    assert_eq!(
        store
            .find_reservation("user_email", "a@x.io")
            .await
            .unwrap(),
        Some(streams[0])
    );
    // On Postgres streams[0] went directly (empty queue); the rest shared one
    // transaction (on SQLite, all the winners did).
    let batched = [streams[1], streams[3], streams[4]];
    assert_eq!(
        transactions_of(&*store, &batched).await.len(),
        1,
        "one transaction"
    );
}

fn keyed(owner: Uuid, key: &str, body: serde_json::Value) -> IdempotencyRecord {
    IdempotencyRecord {
        owner_id: owner,
        key: key.into(),
        request_hash: vec![1, 2, 3],
        response: StoredResponse {
            status: 201,
            headers: vec![("etag".into(), "\"1\"".into())],
            body,
            position: None,
        },
        expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
    }
}

on_both_stores!(
    an_expired_idempotency_key_is_free_again_and_is_cleaned_up,
    postgres
);
async fn an_expired_idempotency_key_is_free_again_and_is_cleaned_up(db: &Db) {
    let store = db.single_flusher();
    let owner = Uuid::now_v7();
    let expired = IdempotencyRecord {
        expires_at: chrono::Utc::now() - chrono::Duration::seconds(1),
        ..keyed(owner, "old", json!("first"))
    };
    assert!(store.remember_idempotency(expired).await.unwrap());
    // Expired: not found, and a new request with the key takes it over.
    assert!(
        store
            .find_idempotency(owner, "old")
            .await
            .unwrap()
            .is_none()
    );
    let stream = Uuid::now_v7();
    store
        .append(AppendRequest {
            idempotency: Some(keyed(owner, "old", json!("second"))),
            user_key: None,
            ..append(stream, 0, &["keyed"])
        })
        .await
        .expect("an expired key does not refuse the append");
    let (_, stored) = store.find_idempotency(owner, "old").await.unwrap().unwrap();
    assert_eq!(stored.body, json!("second"));
    // The cleanup deletes expired keys only.
    let gone = IdempotencyRecord {
        expires_at: chrono::Utc::now() - chrono::Duration::seconds(1),
        ..keyed(owner, "gone", json!(1))
    };
    assert!(store.remember_idempotency(gone).await.unwrap());
    assert_eq!(store.expire_idempotency_keys().await.unwrap(), 1);
    assert_eq!(db.idempotency_keys().await, ["old"]);
}

on_both_stores!(an_idempotency_key_appends_once, postgres);
async fn an_idempotency_key_appends_once(db: &Db) {
    let store = db.single_flusher();
    let owner = Uuid::now_v7();
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    let results = join_all([first, second].map(|s| {
        store.append(AppendRequest {
            idempotency: Some(keyed(owner, "k-1", json!({ "stream": s }))),
            user_key: None,
            ..append(s, 0, &["keyed"])
        })
    }))
    .await;
    let won = results[0].as_ref().unwrap();
    assert!(matches!(results[1], Err(AppendError::IdempotencyKeyTaken)));
    assert!(store.read_stream(second).await.unwrap().is_empty());

    let (hash, stored) = store.find_idempotency(owner, "k-1").await.unwrap().unwrap();
    assert_eq!(hash, vec![1, 2, 3]);
    assert_eq!(stored.body, json!({ "stream": first }));
    assert_eq!(stored.status, 201);
    assert_eq!(stored.position, Some(won.position));

    // The same key for another owner is another key.
    assert!(
        store
            .find_idempotency(Uuid::now_v7(), "k-1")
            .await
            .unwrap()
            .is_none()
    );
    // A response remembered without events is kept once too.
    assert!(
        store
            .remember_idempotency(keyed(owner, "k-2", json!(1)))
            .await
            .unwrap()
    );
    assert!(
        !store
            .remember_idempotency(keyed(owner, "k-2", json!(2)))
            .await
            .unwrap()
    );
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn appends_wake_listeners() {
    let db = TestDb::new().await;
    let store = store(&db);
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("ai_secretary_events").await.unwrap();
    store
        .append(append(Uuid::now_v7(), 0, &["ping"]))
        .await
        .unwrap();
    let notification = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification within 5 s")
        .unwrap();
    assert_eq!(notification.channel(), "ai_secretary_events");
}

fn reply_event(conversation: Uuid, tag: &str) -> NewEvent {
    NewEvent {
        data: json!({ "conversation_id": conversation, "tag": tag }),
        ..event(tag)
    }
}

/// Append one command of one event; where it went.
async fn one(store: &dyn EventStore, request: AppendRequest) -> Position {
    store.append(request).await.unwrap().position
}

on_both_stores!(every_read_follows_commit_order, postgres_alone);
/// Every read of the contract on one small log: a conversation with replies in
/// streams of their own, and noise around it.
async fn every_read_follows_commit_order(db: &Db) {
    let store = db.store();
    let (conversation, reply, noise, elsewhere) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let conv = |expected, tag| AppendRequest {
        stream_type: "conversation",
        ..append(conversation, expected, &[tag])
    };
    let reply_to = |stream, to, expected, tag| AppendRequest {
        stream_type: "reply",
        events: vec![reply_event(to, tag)],
        ..append(stream, expected, &[])
    };
    assert_eq!(store.head().await.unwrap(), None);
    let p1 = one(&*store, conv(0, "started")).await;
    let p2 = one(&*store, reply_to(reply, conversation, 0, "requested")).await;
    let p3 = one(&*store, append(noise, 0, &["noise"])).await;
    let p4 = one(&*store, conv(1, "posted")).await;
    let p5 = one(&*store, reply_to(reply, conversation, 1, "completed")).await;
    let p6 = one(&*store, reply_to(elsewhere, Uuid::now_v7(), 0, "elsewhere")).await;
    let positions = [p1, p2, p3, p4, p5, p6];
    assert!(positions.is_sorted(), "{positions:?}");

    assert_eq!(store.head().await.unwrap(), Some(p6));
    let all = store.read_all(Position::START, 100).await.unwrap();
    assert_eq!(
        tags_of(&all),
        [
            "started",
            "requested",
            "noise",
            "posted",
            "completed",
            "elsewhere"
        ]
    );
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        positions
    );
    assert_eq!(
        tags_of(&store.read_all(p2, 2).await.unwrap()),
        ["noise", "posted"]
    );
    assert!(store.read_all(p6, 100).await.unwrap().is_empty());

    let behind = store.behind(p2, 100).await.unwrap();
    assert_eq!(behind.events, 4);
    assert_eq!(behind.oldest_recorded_at, Some(all[2].recorded_at));
    assert_eq!(store.behind(p2, 2).await.unwrap().events, 2);
    let none = store.behind(p6, 100).await.unwrap();
    assert_eq!((none.events, none.oldest_recorded_at), (0, None));

    let feed = |after, limit| store.read_conversation_feed(conversation, after, limit);
    assert_eq!(
        tags_of(&feed(Position::START, 100).await.unwrap()),
        ["started", "requested", "posted", "completed"]
    );
    assert_eq!(
        tags_of(&feed(p2, 100).await.unwrap()),
        ["posted", "completed"]
    );
    assert_eq!(tags_of(&feed(p3, 1).await.unwrap()), ["posted"]);
    assert!(feed(p5, 100).await.unwrap().is_empty());

    let mut expected: Vec<RecordedEvent> = all
        .iter()
        .filter(|e| e.stream_id == reply || e.stream_id == conversation)
        .cloned()
        .collect();
    expected.sort_by_key(|e| (e.stream_id, e.version));
    assert_eq!(
        store.read_streams(&[reply, conversation]).await.unwrap(),
        expected
    );
    assert!(store.read_streams(&[]).await.unwrap().is_empty());

    let back = store
        .read_stream_backwards(conversation, 3, 1)
        .await
        .unwrap();
    assert_eq!(tags_of(&back), ["posted"]);
    let payloads = store.read_payloads_from(reply, 1).await.unwrap();
    assert_eq!(payloads.len(), 1);
    assert_eq!(payloads[0].position, p5);
    assert_eq!(
        (payloads[0].version, payloads[0].stream_type.as_str()),
        (2, "reply")
    );
    let data: serde_json::Value = serde_json::from_str(&payloads[0].data).unwrap();
    assert_eq!(data, all[4].data);
    assert_eq!(all[4].metadata, json!({ "correlation_id": "completed" }));
    store.ping().await.unwrap();
}

on_both_stores!(
    many_appenders_one_winner_per_version,
    postgres,
    flavor = "multi_thread",
    worker_threads = 2
);
/// Many tasks append to a few streams at the version they last read: each
/// version of each stream is won exactly once, the streams have no gaps, and
/// each event is the one its winner appended.
async fn many_appenders_one_winner_per_version(db: &Db) {
    let store = db.store();
    let streams: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let tasks = (0..24).map(|task| {
        let (store, streams) = (store.clone(), streams.clone());
        tokio::spawn(async move {
            let mut won = Vec::new();
            for round in 0..8 {
                let stream = streams[(task + round) % streams.len()];
                let head = store
                    .read_stream_backwards(stream, i64::MAX, 1)
                    .await
                    .unwrap()
                    .first()
                    .map_or(0, |e| e.version);
                let tag = format!("{task}-{round}");
                match store.append(append(stream, head, &[&tag])).await {
                    Ok(appended) => won.push((stream, appended.version, appended.position, tag)),
                    Err(AppendError::VersionConflict { .. }) => {}
                    Err(other) => panic!("task {task}: {other}"),
                }
            }
            won
        })
    });
    let mut won: Vec<_> = join_all(tasks)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    won.sort_by_key(|(stream, version, ..)| (*stream, *version));
    let mut positions: Vec<Position> = won.iter().map(|w| w.2).collect();
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len(), won.len(), "a position given twice");
    for stream in &streams {
        let events = store.read_stream(*stream).await.unwrap();
        let winners: Vec<_> = won.iter().filter(|w| w.0 == *stream).collect();
        assert!(!events.is_empty());
        assert_eq!(events.len(), winners.len(), "one winner per version");
        for (i, (event, winner)) in events.iter().zip(&winners).enumerate() {
            assert_eq!(event.version, i as i64 + 1);
            assert_eq!(winner.1, event.version);
            assert_eq!(winner.2, event.position);
            assert_eq!(event.data["tag"], winner.3.as_str());
        }
    }
}

on_both_stores!(a_long_stream_reads_back_in_order, postgres_alone);
/// 10,000 events of one stream, appended 1,000 a command, come back whole and
/// in order through every read.
async fn a_long_stream_reads_back_in_order(db: &Db) {
    let store = db.store();
    let stream = Uuid::now_v7();
    let tags: Vec<String> = (1..=10_000).map(|i| i.to_string()).collect();
    let mut last = None;
    for (i, chunk) in tags.chunks(1000).enumerate() {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let appended = store
            .append(append(stream, i as i64 * 1000, &chunk))
            .await
            .unwrap();
        assert_eq!(appended.version, (i as i64 + 1) * 1000);
        last = Some(appended.position);
    }
    let events = store.read_stream(stream).await.unwrap();
    assert_eq!(events.len(), 10_000);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.version, i as i64 + 1);
        assert_eq!(e.data["tag"], tags[i].as_str());
    }
    assert!(events.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(
        store.read_all(Position::START, 20_000).await.unwrap(),
        events
    );
    assert_eq!(store.head().await.unwrap(), last);
    assert_eq!(
        store.behind(Position::START, 20_000).await.unwrap().events,
        10_000
    );
    let back = store
        .read_stream_backwards(stream, 10_001, 3)
        .await
        .unwrap();
    assert_eq!(tags_of(&back), ["10000", "9999", "9998"]);
    let payloads = store.read_payloads_from(stream, 9_990).await.unwrap();
    assert_eq!(
        payloads.iter().map(|p| p.version).collect::<Vec<_>>(),
        (9_991..=10_000).collect::<Vec<_>>()
    );
}

on_both_stores!(
    nul_bytes_and_absurd_dates_round_trip_or_are_refused_clearly,
    postgres
);
/// A NUL in a JSON string, dates at the ends of chrono's range in a payload
/// and as an idempotency key's expiry: kept exactly, or refused with a typed
/// error that is not worth retrying, having written nothing. (Postgres' jsonb
/// cannot hold a NUL and its timestamps stop at 4713 BC; SQLite keeps both.)
async fn nul_bytes_and_absurd_dates_round_trip_or_are_refused_clearly(db: &Db) {
    let store = db.store();
    for data in [
        json!({ "text": "before\u{0}after" }),
        json!({ "at": "+262142-12-31T23:59:59.999999Z", "before": "-262143-01-01T00:00:00Z" }),
    ] {
        let stream = Uuid::now_v7();
        let request = AppendRequest {
            events: vec![NewEvent {
                data: data.clone(),
                ..event("odd")
            }],
            ..append(stream, 0, &[])
        };
        match store.append(request).await {
            Ok(_) => assert_eq!(store.read_stream(stream).await.unwrap()[0].data, data),
            Err(AppendError::Database(e)) => {
                assert!(!e.is_transient(), "{e}");
                assert!(store.read_stream(stream).await.unwrap().is_empty());
            }
            Err(other) => panic!("{data}: {other}"),
        }
    }
    let owner = Uuid::now_v7();
    let far_future = IdempotencyRecord {
        expires_at: chrono::DateTime::<chrono::Utc>::MAX_UTC,
        ..keyed(owner, "future", json!("kept"))
    };
    assert!(store.remember_idempotency(far_future).await.unwrap());
    let (_, kept) = store
        .find_idempotency(owner, "future")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.body, json!("kept"));
    let far_past = IdempotencyRecord {
        expires_at: chrono::DateTime::<chrono::Utc>::MIN_UTC,
        ..keyed(owner, "past", json!("gone"))
    };
    match store.remember_idempotency(far_past).await {
        Ok(remembered) => {
            assert!(remembered);
            assert!(
                store
                    .find_idempotency(owner, "past")
                    .await
                    .unwrap()
                    .is_none()
            );
        }
        Err(e) => assert!(!e.is_transient(), "{e}"),
    }
    store.expire_idempotency_keys().await.unwrap();
    assert_eq!(db.idempotency_keys().await, ["future"]);
}

on_both_stores!(
    forgetting_a_user_destroys_their_key_and_what_the_store_kept_of_them,
    postgres
);
async fn forgetting_a_user_destroys_their_key_and_what_the_store_kept_of_them(db: &Db) {
    let store = db.store();
    let (user, other) = (Uuid::now_v7(), Uuid::now_v7());
    let email = || Reservation {
        scope: "user_email",
        value: "forget.me@example.org".into(),
    };
    // Registration: the key, the email and the anonymous sign-up's response
    // (owner nil, the body naming the user).
    store
        .append(AppendRequest {
            reservation: Some(email()),
            idempotency: Some(keyed(Uuid::nil(), "sign-up", json!({ "id": user }))),
            user_key: Some(UserKeyChange::Create {
                user,
                wrapped: vec![7; 40],
            }),
            ..append(user, 0, &["registered"])
        })
        .await
        .unwrap();
    assert!(
        store
            .remember_idempotency(keyed(user, "own", json!(1)))
            .await
            .unwrap()
    );
    let theirs = json!({ "id": other });
    assert!(
        store
            .remember_idempotency(keyed(Uuid::nil(), "theirs", theirs.clone()))
            .await
            .unwrap()
    );
    assert_eq!(store.find_user_key(user).await.unwrap(), Some(vec![7; 40]));
    assert_eq!(
        store
            .find_reservation("user_email", "forget.me@example.org")
            .await
            .unwrap(),
        Some(user)
    );

    store
        .append(AppendRequest {
            user_key: Some(UserKeyChange::Destroy { user }),
            ..append(user, 1, &["forgotten"])
        })
        .await
        .unwrap();
    assert_eq!(store.find_user_key(user).await.unwrap(), None);
    assert_eq!(
        store
            .find_reservation("user_email", "forget.me@example.org")
            .await
            .unwrap(),
        None
    );
    assert!(
        store
            .find_idempotency(Uuid::nil(), "sign-up")
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.find_idempotency(user, "own").await.unwrap().is_none());
    let (_, kept) = store
        .find_idempotency(Uuid::nil(), "theirs")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.body, theirs);
    // The events stay (crypto-shredding, not deletion), and the email is free again.
    assert_eq!(tags(&*store, user).await, ["registered", "forgotten"]);
    let again = Uuid::now_v7();
    store
        .append(AppendRequest {
            reservation: Some(email()),
            ..append(again, 0, &["registered again"])
        })
        .await
        .unwrap();
}

async fn read_streams_returns_each_named_stream_once_in_version_order(db: &Db) {
    let store = db.store();
    let (a, b, other) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store.append(append(a, 0, &["a1", "a2"])).await.unwrap();
    store.append(append(other, 0, &["o1"])).await.unwrap();
    store.append(append(b, 0, &["b1"])).await.unwrap();
    store.append(append(a, 2, &["a3"])).await.unwrap();

    // Named twice, in no order, with a stream that does not exist.
    let read = store
        .read_streams(&[b, a, Uuid::now_v7(), a])
        .await
        .unwrap();
    let mut expected = vec![(a, 1), (a, 2), (a, 3), (b, 1)];
    expected.sort();
    assert_eq!(
        read.iter()
            .map(|e| (e.stream_id, e.version))
            .collect::<Vec<_>>(),
        expected,
        "each stream once, by stream then version"
    );
}

on_both_stores!(
    read_streams_returns_each_named_stream_once_in_version_order,
    postgres
);

/// Hundreds of tail reads at once, over streams of different lengths and from
/// different versions, several on the same stream: each gets its own stream's
/// events after its own version, in order, and nothing of another read's. (On
/// Postgres the reads that queue together are answered by one query,
/// `store/postgres/tail_reads.rs`; this is what its grouping must keep apart.)
async fn concurrent_tail_reads_each_get_their_own_streams_tail(db: &Db) {
    let store = db.store();
    let streams: Vec<(Uuid, i64)> = (0..40).map(|i| (Uuid::now_v7(), i % 7)).collect();
    for (stream, length) in &streams {
        if *length > 0 {
            let tags: Vec<String> = (1..=*length).map(|v| format!("{stream}/{v}")).collect();
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            store.append(append(*stream, 0, &tags)).await.unwrap();
        }
    }
    let reads = (0..400).map(|n| {
        let (stream, length) = streams[n % streams.len()];
        // From before the start to past the end, several per stream.
        let after = (n as i64 / 40) % (length + 2) - 1;
        let store = store.clone();
        async move {
            let tail = store.read_payloads_from(stream, after).await.unwrap();
            (stream, length, after, tail)
        }
    });
    for (stream, length, after, tail) in futures::future::join_all(reads).await {
        let expected: Vec<i64> = (after.max(0) + 1..=length).collect();
        assert_eq!(
            tail.iter().map(|p| p.version).collect::<Vec<_>>(),
            expected,
            "stream {stream} of {length} after {after}"
        );
        for p in &tail {
            let data: serde_json::Value = serde_json::from_str(&p.data).unwrap();
            assert_eq!(data["tag"], format!("{stream}/{}", p.version));
        }
    }
}

on_both_stores!(
    concurrent_tail_reads_each_get_their_own_streams_tail,
    postgres
);
