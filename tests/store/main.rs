//! The event store against the real Postgres: optimistic concurrency, commit-order
//! reading that never skips, append-only history, coalesced batches in which one
//! command's conflict fails only that command, and once-only idempotency keys.

#[path = "../support/mod.rs"]
mod support;

use ai_secretary::store::{
    AppendError, AppendRequest, EventStore, IdempotencyRecord, NewEvent, PgEventStore, Position,
    RecordedEvent, Reservation, StoredResponse, postgres::CoalescingConfig,
};
use futures::future::join_all;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use support::{TestDb, cluster::PrivatePostgres};
use uuid::Uuid;

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

async fn tags(store: &PgEventStore, stream: Uuid) -> Vec<String> {
    store
        .read_stream(stream)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.data["tag"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_at_the_same_version_one_wins() {
    let db = TestDb::new().await;
    // Two stores: two processes, so the race is between transactions, not in a batch.
    let (a, b) = (store(&db), store(&db));
    for round in 0..20 {
        let stream = Uuid::now_v7();
        a.append(append(stream, 0, &["first"])).await.unwrap();
        let (ra, rb) = tokio::join!(
            a.append(append(stream, 1, &["a1", "a2", "a3"])),
            b.append(append(stream, 1, &["b1", "b2"])),
        );
        let written = tags(&a, stream).await;
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

#[tokio::test]
async fn an_expected_version_that_is_not_the_head_is_a_conflict() {
    let db = TestDb::new().await;
    let store = store(&db);
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
    assert_eq!(tags(&store, stream).await, ["one", "two"]);
    let appended = store.append(append(stream, 2, &["three"])).await.unwrap();
    assert_eq!(appended.version, 3);
}

/// Identity order is not commit order. A holds a lower position open while B
/// commits; a reader must stop exactly at A (reading C, committed before A
/// began, and not B), and must return A then B the moment A commits.
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

/// The same, with B's identity lower than A's: commit order, not identity, rules.
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

async fn transactions_of(db: &TestDb, streams: &[Uuid]) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT DISTINCT transaction_id::text::int8 FROM events WHERE stream_id = ANY($1)",
    )
    .bind(streams)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_coalesced_batch_fails_only_the_conflicting_command() {
    let db = TestDb::new().await;
    let store = single_flusher(&db);
    let taken = Uuid::now_v7();
    store.append(append(taken, 0, &["old"])).await.unwrap();

    let fresh: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    // On this single-threaded test runtime the first append finds the queue empty
    // and goes directly; the other 20 queue behind it and share one batch.
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
        transactions_of(&db, &fresh[1..]).await.len(),
        1,
        "one transaction"
    );
    assert_eq!(tags(&store, taken).await, ["old"]);
}

#[tokio::test]
async fn a_lost_reservation_fails_only_its_command() {
    let db = TestDb::new().await;
    let store = single_flusher(&db);
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
    // streams[0] went directly (empty queue); the rest shared one transaction.
    let batched = [streams[1], streams[3], streams[4]];
    assert_eq!(
        transactions_of(&db, &batched).await.len(),
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

#[tokio::test]
async fn an_expired_idempotency_key_is_free_again_and_is_cleaned_up() {
    let db = TestDb::new().await;
    let store = single_flusher(&db);
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
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys ORDER BY key")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, ["old"]);
}

#[tokio::test]
async fn an_idempotency_key_appends_once() {
    let db = TestDb::new().await;
    let store = single_flusher(&db);
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

#[tokio::test]
async fn read_streams_returns_each_named_stream_once_in_version_order() {
    let db = TestDb::new().await;
    let store = store(&db);
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
    let (first, second) = if a < b { (a, b) } else { (b, a) };
    let expected: Vec<(Uuid, i64)> = if first == a {
        vec![(a, 1), (a, 2), (a, 3), (b, 1)]
    } else {
        vec![(b, 1), (a, 1), (a, 2), (a, 3)]
    };
    assert_eq!(
        read.iter()
            .map(|e| (e.stream_id, e.version))
            .collect::<Vec<_>>(),
        expected,
        "by stream ({first} before {second}), then version"
    );
    assert!(store.read_streams(&[]).await.unwrap().is_empty());
}
