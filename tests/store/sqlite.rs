//! What is particular to the SQLite event store: positions across rollbacks,
//! durability of an acknowledged append, secure delete, the append-only
//! triggers, a second process on the same file, the commit wake-up, and how
//! the file is opened.

use std::path::{Path, PathBuf};

use ai_secretary::store::{
    AppendError, AppendRequest, EventStore, Position, Reservation, SqliteEventStore, UserKeyChange,
    postgres::CoalescingConfig, sqlite,
};
use futures::future::join_all;
use serde_json::json;
use sqlx::{Connection, SqlitePool};
use uuid::Uuid;

use super::{append, keyed, tags, tags_of};

/// A SQLite file of the test's own, in a temporary directory removed (with the
/// file, its WAL and its shared memory) when the test ends.
pub struct SqliteDb {
    pub pool: SqlitePool,
    pub path: PathBuf,
    // Last: the directory goes after the pool.
    dir: tempfile::TempDir,
}

impl SqliteDb {
    pub async fn new() -> SqliteDb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let pool = sqlite::connect(path.to_str().unwrap(), 4).await.unwrap();
        SqliteDb { pool, path, dir }
    }

    /// A store over the file, with a write connection of its own.
    pub fn store(&self) -> SqliteEventStore {
        SqliteEventStore::new(self.pool.clone(), CoalescingConfig::default())
    }

    /// What is on disk now: the file and its WAL, concatenated.
    fn bytes_on_disk(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            if let Ok(b) = std::fs::read(with_suffix(&self.path, suffix)) {
                bytes.extend(b);
            }
        }
        bytes
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// No acknowledged position is ever given again, whatever rolls back: a
/// transaction that inserts and rolls back, and a coalesced batch rolled back
/// because one of its commands lost its claim (and retried without it). The
/// numbers a rollback gave back are handed out again (no reader could see
/// them), so the log has no gaps; the head only moves forward.
#[tokio::test]
async fn positions_are_never_reused_after_a_rollback() {
    let db = SqliteDb::new().await;
    let store = db.store();
    let first = store
        .append(AppendRequest {
            reservation: Some(Reservation {
                scope: "user_email",
                value: "taken@x.io".into(),
            }),
            ..append(Uuid::now_v7(), 0, &["first"])
        })
        .await
        .unwrap();

    let mut conn = db.pool.acquire().await.unwrap();
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query(
        "INSERT INTO events (transaction_id, event_id, stream_id, stream_type, version,
                             event_type, data, recorded_at)
         VALUES (0, $1, $2, 'test', 1, 'Tested', '{\"tag\": \"rolled back\"}', 0)",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    drop(conn);

    // One batch (all queued before the flusher runs): the loser's claim rolls
    // it back, the two others commit on the retry.
    let loser = AppendRequest {
        reservation: Some(Reservation {
            scope: "user_email",
            value: "taken@x.io".into(),
        }),
        ..append(Uuid::now_v7(), 0, &["loser"])
    };
    let results = join_all([
        store.append(append(Uuid::now_v7(), 0, &["second"])),
        store.append(loser),
        store.append(append(Uuid::now_v7(), 0, &["third", "fourth"])),
    ])
    .await;
    assert!(matches!(
        results[1],
        Err(AppendError::ReservationTaken { .. })
    ));
    let (second, third) = (
        results[0].as_ref().unwrap().position,
        results[2].as_ref().unwrap().position,
    );
    let after = store
        .append(append(Uuid::now_v7(), 0, &["after"]))
        .await
        .unwrap()
        .position;

    let all = store.read_all(Position::START, 100).await.unwrap();
    assert_eq!(
        tags_of(&all),
        ["first", "second", "third", "fourth", "after"]
    );
    let numbers: Vec<i64> = all.iter().map(|e| e.position.global_position).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5], "no gaps, nothing given twice");
    assert_eq!(
        [first.position, second, third, after],
        [
            all[0].position,
            all[1].position,
            all[3].position,
            all[4].position
        ]
    );
    // The batch's commit is one transaction, named by its first position.
    assert_eq!(second.transaction_id, 2);
    assert_eq!(third.transaction_id, 2);
    assert_eq!(after.transaction_id, 5);
    assert!(first.position < second && second < third && third < after);
    assert_eq!(store.head().await.unwrap(), Some(after));
    // AUTOINCREMENT's high-water mark: nothing below it is handed out again.
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(seq, 5);
}

/// An acknowledged append is on disk: the files as they are the moment it is
/// acknowledged (what `kill -9` leaves; nothing closed, nothing checkpointed)
/// open to it, and so does the file after the store and its pools are dropped
/// without being closed. Power loss is `synchronous=FULL`'s part: the WAL is
/// fsynced before the commit returns.
#[tokio::test]
async fn an_acknowledged_append_survives_the_process_dying() {
    let db = SqliteDb::new().await;
    let store = db.store();
    let stream = Uuid::now_v7();
    let appended = store
        .append(append(stream, 0, &["durable", "too"]))
        .await
        .unwrap();

    let copy = tempfile::tempdir().unwrap();
    let copied = copy.path().join("events.db");
    for suffix in ["", "-wal"] {
        std::fs::copy(with_suffix(&db.path, suffix), with_suffix(&copied, suffix)).unwrap();
    }
    let reopened = SqliteEventStore::new(
        sqlite::connect(copied.to_str().unwrap(), 2).await.unwrap(),
        CoalescingConfig::default(),
    );
    assert_eq!(tags(&reopened, stream).await, ["durable", "too"]);
    assert_eq!(reopened.head().await.unwrap(), Some(appended.position));

    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(synchronous, 2, "FULL");

    let path = db.path.to_str().unwrap().to_owned();
    drop(store);
    drop(db.pool);
    let reopened = SqliteEventStore::new(
        sqlite::connect(&path, 2).await.unwrap(),
        CoalescingConfig::default(),
    );
    assert_eq!(tags(&reopened, stream).await, ["durable", "too"]);
    drop(db.dir);
}

/// `secure_delete` is on for every connection, and forgetting a user leaves
/// none of their key's or email's bytes in the file or its WAL.
#[tokio::test]
async fn forgetting_a_user_leaves_no_readable_bytes() {
    let db = SqliteDb::new().await;
    let secure_delete: i64 = sqlx::query_scalar("PRAGMA secure_delete")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(secure_delete, 1);

    let store = db.store();
    let user = Uuid::now_v7();
    let key = b"wrapped key of the user who asked to be forgotten".to_vec();
    let email = "forgotten.user.4711@example.org";
    store
        .append(AppendRequest {
            reservation: Some(Reservation {
                scope: "user_email",
                value: email.into(),
            }),
            user_key: Some(UserKeyChange::Create {
                user,
                wrapped: key.clone(),
            }),
            ..append(user, 0, &["registered"])
        })
        .await
        .unwrap();
    assert!(
        store
            .remember_idempotency(keyed(user, "k", json!({ "email": email })))
            .await
            .unwrap()
    );
    let before = db.bytes_on_disk();
    assert!(contains(&before, &key) && contains(&before, email.as_bytes()));

    store
        .append(AppendRequest {
            user_key: Some(UserKeyChange::Destroy { user }),
            ..append(user, 1, &["forgotten"])
        })
        .await
        .unwrap();
    let after = db.bytes_on_disk();
    assert!(!contains(&after, &key), "the key's bytes are still on disk");
    assert!(
        !contains(&after, email.as_bytes()),
        "the email is still on disk"
    );
    assert_eq!(tags(&store, user).await, ["registered", "forgotten"]);
}

#[tokio::test]
async fn the_events_table_refuses_update_and_delete() {
    let db = SqliteDb::new().await;
    let store = db.store();
    store
        .append(append(Uuid::now_v7(), 0, &["kept"]))
        .await
        .unwrap();
    for sql in [
        "UPDATE events SET data = '{}'",
        "DELETE FROM events WHERE version = 1",
        "DELETE FROM events",
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let kept = store.read_all(Position::START, 10).await.unwrap();
    assert_eq!(tags_of(&kept), ["kept"]);
}

/// Two pools on one file, as `replay` or `verify` beside a live service: both
/// append at once, to streams of their own and to shared ones. Every append is
/// answered (a writer waits for the other's lock, it does not fail), each
/// version of a shared stream is won once, and the file is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_on_one_file_append_side_by_side() {
    let db = SqliteDb::new().await;
    let other_pool = sqlite::connect(db.path.to_str().unwrap(), 4).await.unwrap();
    let stores = [
        db.store(),
        SqliteEventStore::new(other_pool, CoalescingConfig::default()),
    ];
    let shared: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    let tasks = (0..16).map(|task| {
        let store = stores[task % 2].clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let own = Uuid::now_v7();
            let mut won = 0;
            for round in 0..20 {
                let tag = format!("{task}-{round}");
                store
                    .append(append(own, round, &[&tag]))
                    .await
                    .unwrap_or_else(|e| panic!("{tag}: {e}"));
                let stream = shared[round as usize % 2];
                let head = store
                    .read_stream_backwards(stream, i64::MAX, 1)
                    .await
                    .unwrap()
                    .first()
                    .map_or(0, |e| e.version);
                match store.append(append(stream, head, &[&tag])).await {
                    Ok(_) => won += 1,
                    Err(AppendError::VersionConflict { .. }) => {}
                    Err(e) => panic!("{tag}: {e}"),
                }
            }
            (own, won)
        })
    });
    let done: Vec<(Uuid, i64)> = join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let [a, b] = stores;
    for (own, _) in &done {
        // Each store reads what the other wrote.
        assert_eq!(b.read_stream(*own).await.unwrap().len(), 20);
        assert_eq!(a.read_stream(*own).await.unwrap().len(), 20);
    }
    let shared_events: usize = join_all(shared.iter().map(|s| a.read_stream(*s)))
        .await
        .into_iter()
        .map(|events| {
            let events = events.unwrap();
            assert!(
                events
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.version == i as i64 + 1)
            );
            events.len()
        })
        .sum();
    assert_eq!(shared_events as i64, done.iter().map(|d| d.1).sum::<i64>());
    let all = a.read_all(Position::START, 10_000).await.unwrap();
    assert_eq!(all.len(), 16 * 20 + shared_events);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
}

/// The store's LISTEN/NOTIFY: a tailer waiting on `committed` wakes up with
/// the position of what was just committed.
#[tokio::test]
async fn commits_wake_tailers() {
    let db = SqliteDb::new().await;
    let store = db.store();
    let mut committed = store.committed();
    assert_eq!(*committed.borrow(), Position::START);
    let tailer = tokio::spawn(async move {
        committed.changed().await.unwrap();
        *committed.borrow_and_update()
    });
    let appended = store
        .append(append(Uuid::now_v7(), 0, &["wake up"]))
        .await
        .unwrap();
    let woken = tokio::time::timeout(std::time::Duration::from_secs(5), tailer)
        .await
        .expect("a wake-up within 5 s")
        .unwrap();
    assert_eq!(woken, appended.position);
    // A conflict commits nothing and moves nothing.
    let mut committed = store.committed();
    committed.borrow_and_update();
    let stale = store.append(append(Uuid::now_v7(), 3, &["stale"])).await;
    assert!(matches!(stale, Err(AppendError::VersionConflict { .. })));
    assert!(!committed.has_changed().unwrap());
}

/// `connect` takes a path or a `sqlite://` URL, makes the directories the file
/// needs, switches the file to WAL, and applies migrations once.
#[tokio::test]
async fn connect_creates_the_file_and_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("nested").join("events.db");
    let url = format!("sqlite://{}", path.display());
    let pool = sqlite::connect(&url, 2).await.unwrap();
    assert!(path.exists());
    assert_eq!(sqlite::database_file(&pool), path);
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let store = SqliteEventStore::new(pool, CoalescingConfig::default());
    store
        .append(append(Uuid::now_v7(), 0, &["one"]))
        .await
        .unwrap();
    store.close().await;
    // Again, by path: the migrations are already there and the event too.
    let again = sqlite::connect(path.to_str().unwrap(), 2).await.unwrap();
    let store = SqliteEventStore::new(again, CoalescingConfig::default());
    assert_eq!(
        tags_of(&store.read_all(Position::START, 10).await.unwrap()),
        ["one"]
    );
}
