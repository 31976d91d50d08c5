//! The projection workers on SQLite, the embedded default: real events appended
//! through `SqliteEventStore` to a file in a temporary directory, every
//! projection of `ALL` run by `worker::run` on that file and fed by tailing the
//! store (woken by the store's own commit signal), and the read models compared
//! with what the fold of the same log computes. Then the single-active rules:
//! a worker aborted mid-stream resumes with nothing doubled or skipped, two
//! workers of one projection on one file (two pools, as two processes would
//! have) leave one active while the other waits, and a deposed owner's
//! checkpoint write is refused.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ai_secretary::{
    bus::tail::sqlite_commits,
    crypto::{MasterKey, random_master_key_hex},
    store::{
        AppendRequest, EventStore, NewEvent, Position, SqliteEventStore,
        postgres::CoalescingConfig, sealed::Keyring, sqlite,
    },
};
use ai_secretary_contract::decode;
use ai_secretary_projections::{
    ALL, Db, Opener, SqliteDb,
    cache::Cache,
    checkpoint,
    executor::sqlite::decode_row,
    lease::{self, Lease},
    log,
    ops::{Type, Value as Typed},
    projections::Fold,
    worker::{self, Feed, Source, WorkerError},
};
use chrono::{DateTime, Duration as Span, Utc};
use futures::future::join_all;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, SqlitePool};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a test waits for the workers to reach the head before failing:
/// far above what the workloads here take (a few seconds at most in a debug
/// build), so only a worker that is stuck or skipping trips it.
const CATCH_UP: Duration = Duration::from_secs(90);

/// The embedded database of one test: a SQLite file in a temporary directory
/// (removed, with its WAL and lock files, when the test ends), the event store
/// over it, and the read side's handle on it.
struct Embedded {
    store: SqliteEventStore,
    db: Db,
    pool: SqlitePool,
    opener: Arc<dyn Opener>,
    path: std::path::PathBuf,
    // Last: the directory goes after everything that has the file open.
    _dir: tempfile::TempDir,
}

impl Embedded {
    async fn new() -> Embedded {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        let pool = sqlite::connect(path.to_str().unwrap(), 4).await.unwrap();
        let store = SqliteEventStore::new(pool.clone(), CoalescingConfig::default());
        // The service's own opener: the events here carry nothing sealed, so
        // it passes each payload through as the keyring does for such events.
        let master = MasterKey::from_hex(&random_master_key_hex()).unwrap();
        let opener = Arc::new(Keyring::new(master, Arc::new(store.clone())));
        Embedded {
            db: Db::Sqlite(SqliteDb::new(pool.clone())),
            store,
            pool,
            opener,
            path,
            _dir: dir,
        }
    }

    /// A second handle on the same file, with pools and a checkpoint signal of
    /// its own, as a second process on the same `DATA_DIR` would have.
    async fn second_process(&self) -> Db {
        let pool = sqlite::connect(self.path.to_str().unwrap(), 2)
            .await
            .unwrap();
        Db::Sqlite(SqliteDb::new(pool))
    }

    /// Append the workload round by round: the appends of one round go to
    /// different streams and are sent at once, so the store coalesces them
    /// into shared transactions (several events under one `transaction_id`).
    async fn append(&self, rounds: Vec<Vec<AppendRequest>>) {
        for round in rounds {
            for appended in join_all(round.into_iter().map(|r| self.store.append(r))).await {
                appended.expect("every append of the workload is valid");
            }
        }
    }

    async fn head(&self) -> Position {
        self.store
            .head()
            .await
            .unwrap()
            .expect("events were appended")
    }

    /// Workers for `names`, fed by tailing this store and woken by its
    /// commits, each in a task of its own.
    fn start(
        &self,
        db: &Db,
        names: &[&str],
        stop: &CancellationToken,
    ) -> Vec<JoinHandle<Result<(), WorkerError>>> {
        let (commits, forwarder) = sqlite_commits(self.store.committed(), stop.clone());
        // The forwarder ends with `stop` (or with the store).
        drop(forwarder);
        start_workers(
            db,
            Feed::StoreTail(commits),
            self.opener.clone(),
            names,
            stop,
        )
    }

    /// Wait until every checkpoint of `names` is at `head`.
    async fn caught_up(&self, names: &[&str], head: Position) {
        let started = Instant::now();
        loop {
            let all = checkpoint::all(&self.db).await.unwrap();
            let behind: Vec<_> = names
                .iter()
                .filter(|n| !all.iter().any(|c| c.name == **n && c.position == head))
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                started.elapsed() < CATCH_UP,
                "{behind:?} did not reach {head} in {CATCH_UP:?}: {all:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every event of the log, in commit order, with its payload text.
    async fn log(&self) -> Vec<(ai_secretary_contract::EventEnvelope, String)> {
        let mut all = Vec::new();
        let mut after = Position::default();
        loop {
            let events = log::read_committed(&self.db, after, 1_000).await.unwrap();
            let Some((last, _)) = events.last() else {
                return all;
            };
            after = last.position();
            all.extend(events);
        }
    }

    /// Each of `names`' tables as the worker wrote it equals the fold of the
    /// whole log; none of them is empty (or the comparison proves nothing).
    async fn assert_read_models_are_the_fold(&self, names: &[&str]) {
        let log = self.log().await;
        for name in names {
            let mut fold = Fold::new(name).unwrap();
            for (envelope, data) in &log {
                if let Ok(event) =
                    decode(&envelope.event_type, envelope.schema_version, data.as_str())
                {
                    fold.apply(envelope, &event);
                }
            }
            for (table, folded) in fold.tables().iter().zip(&fold.tables) {
                let types: Vec<Type> = table.columns.iter().map(|c| c.ty).collect();
                let columns: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
                let live: Vec<Vec<Typed>> = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {} FROM {}",
                    columns.join(", "),
                    table.name
                )))
                .fetch_all(&self.pool)
                .await
                .unwrap()
                .iter()
                .map(|row| decode_row(row, &types).unwrap())
                .collect();
                let expected: Vec<Vec<Typed>> =
                    folded.rows.iter().map(|(_, row)| row.clone()).collect();
                assert!(
                    !live.is_empty(),
                    "{}: no rows, the comparison proves nothing",
                    table.name
                );
                assert_eq!(
                    sorted(live),
                    sorted(expected),
                    "{}: the worker's rows are not the fold's",
                    table.name
                );
            }
        }
    }

    /// `events` of every checkpoint of `names`: each applied event counts once.
    async fn applied(&self, names: &[&str]) -> Vec<(String, i64)> {
        let all = checkpoint::all(&self.db).await.unwrap();
        names
            .iter()
            .map(|n| {
                let c = all.iter().find(|c| c.name == *n).expect("a checkpoint row");
                (c.name.clone(), c.events)
            })
            .collect()
    }
}

fn start_workers(
    db: &Db,
    feed: Feed,
    opener: Arc<dyn Opener>,
    names: &[&str],
    stop: &CancellationToken,
) -> Vec<JoinHandle<Result<(), WorkerError>>> {
    let cache = Cache::local(Duration::from_secs(3600));
    let source = Source {
        stream: String::new(),
        subject_prefix: String::new(),
        opener,
        decoded: Default::default(),
    };
    ALL.iter()
        .filter(|p| names.contains(&p.name))
        .map(|p| {
            tokio::spawn(worker::run(
                db.clone(),
                feed.clone(),
                source.clone(),
                (p.live)(&cache),
                stop.clone(),
            ))
        })
        .collect()
}

fn sorted(mut rows: Vec<Vec<Typed>>) -> Vec<Vec<Typed>> {
    rows.sort_by_cached_key(|row| format!("{row:?}"));
    rows
}

fn request(
    stream_type: &'static str,
    stream: Uuid,
    version: i64,
    events: Vec<(&str, Value)>,
) -> AppendRequest {
    AppendRequest {
        stream_id: stream,
        stream_type,
        expected_version: version,
        events: events
            .into_iter()
            .map(|(event_type, data)| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: event_type.to_owned(),
                schema_version: 1,
                data,
                metadata: json!({}),
            })
            .collect(),
        reservation: None,
        idempotency: None,
        user_key: None,
    }
}

fn at(base: DateTime<Utc>, minutes: i64) -> String {
    (base + Span::minutes(minutes)).to_rfc3339()
}

/// A workload in which every projection has work: `users` users, each with an
/// assistant (created, then renamed), a conversation and `messages` messages,
/// each message asking for a reply that completes (or, one in five, fails) in
/// a stream of its own; times spread over several UTC days. The first user is
/// forgotten at the end, and one event that no projection can decode (an
/// `AssistantCreated` without its fields) is parked in `dead_letters`.
///
/// In rounds: the k-th append of every user, then the (k+1)-th, so that the
/// appends of a round touch different streams and may share a transaction.
fn workload(users: usize, messages: usize) -> Vec<Vec<AppendRequest>> {
    let base: DateTime<Utc> = "2026-11-29T20:00:00Z".parse().unwrap();
    let mut per_user: Vec<Vec<AppendRequest>> = Vec::new();
    let mut forget = None;
    for u in 0..users {
        let (user, assistant, conversation) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let minute = (u * 7) as i64;
        let mut appends = vec![
            request("user", user, 0, vec![("UserRegistered", json!({}))]),
            request(
                "assistant",
                assistant,
                0,
                vec![(
                    "AssistantCreated",
                    json!({
                "owner_id": user, "name": format!("assistant {u}"), "role": "r",
                "instructions": "i", "model": "m", "temperature": 0.5,
                "metadata": {"n": u}, "created_at": at(base, minute)}),
                )],
            ),
            request(
                "assistant",
                assistant,
                1,
                vec![(
                    "AssistantUpdated",
                    json!({
                "name": format!("renamed {u}"), "updated_at": at(base, minute + 1)}),
                )],
            ),
            request(
                "conversation",
                conversation,
                0,
                vec![(
                    "ConversationStarted",
                    json!({
                "owner_id": user, "assistant_id": assistant, "title": format!("talk {u}"),
                "started_at": at(base, minute + 2)}),
                )],
            ),
        ];
        for m in 0..messages {
            let (message, reply) = (Uuid::now_v7(), Uuid::now_v7());
            // Every hour or so of simulated time: replies land on several days.
            let t = minute + 3 + (m as i64) * 97;
            appends.push(request(
                "conversation",
                conversation,
                1 + 2 * m as i64,
                vec![
                    (
                        "MessagePosted",
                        json!({"message_id": message, "content": format!("hello {m}"),
                    "posted_at": at(base, t)}),
                    ),
                    (
                        "ReplyRequested",
                        json!({"reply_id": reply, "reply_to": message,
                    "assistant_id": assistant, "requested_at": at(base, t)}),
                    ),
                ],
            ));
            appends.push(request(
                "reply",
                reply,
                0,
                vec![(
                    "ReplyStarted",
                    json!({
                "reply_id": reply, "conversation_id": conversation, "attempt": 1,
                "started_at": at(base, t + 1)}),
                )],
            ));
            let ending = if (u + m) % 5 == 4 {
                (
                    "ReplyFailed",
                    json!({"reply_id": reply, "conversation_id": conversation,
                    "error": "down", "failed_at": at(base, t + 2)}),
                )
            } else {
                (
                    "ReplyCompleted",
                    json!({"reply_id": reply, "conversation_id": conversation,
                    "content": format!("answer {m}"), "model": "m", "finish_reason": "stop",
                    "usage": {"prompt_tokens": m + 1, "completion_tokens": u + 1,
                              "total_tokens": m + u + 2},
                    "completed_at": at(base, t + 2)}),
                )
            };
            appends.push(request("reply", reply, 1, vec![ending]));
        }
        if u == 0 {
            forget = Some(request("user", user, 1, vec![("UserForgotten", json!({}))]));
        }
        per_user.push(appends);
    }
    let longest = per_user.iter().map(Vec::len).max().unwrap_or(0);
    let mut rounds: Vec<Vec<AppendRequest>> = (0..longest).map(|_| Vec::new()).collect();
    for appends in per_user {
        for (k, append) in appends.into_iter().enumerate() {
            rounds[k].push(append);
        }
    }
    let poison = request(
        "assistant",
        Uuid::now_v7(),
        0,
        vec![("AssistantCreated", json!({"name": 5}))],
    );
    rounds.push(vec![poison]);
    rounds.extend(forget.map(|f| vec![f]));
    rounds
}

/// Every projection, on SQLite, fed by tailing the store: some events are in
/// the log before the workers start, the rest arrive while they run; at the
/// head, each table equals the fold of the log, every checkpoint counted each
/// event once, and the undecodable event is parked once per projection.
#[tokio::test]
async fn every_projection_on_sqlite_tailing_the_store_holds_what_the_fold_computes() {
    let embedded = Embedded::new().await;
    let names: Vec<&str> = ALL.iter().map(|p| p.name).collect();
    let mut rounds = workload(12, 6);
    let later = rounds.split_off(rounds.len() / 2);
    embedded.append(rounds).await;

    let stop = CancellationToken::new();
    let workers = embedded.start(&embedded.db, &names, &stop);
    embedded.append(later).await;
    let head = embedded.head().await;
    embedded.caught_up(&names, head).await;
    stop.cancel();
    for worker in join_all(workers).await {
        worker.unwrap().expect("a worker ends cleanly on shutdown");
    }

    embedded.assert_read_models_are_the_fold(&names).await;
    let events = embedded.log().await.len() as i64;
    for (name, applied) in embedded.applied(&names).await {
        assert_eq!(
            applied, events,
            "{name} counted {applied} of {events} events"
        );
    }
    let parked: Vec<(String, String)> =
        sqlx::query_as("SELECT projection, subject FROM dead_letters ORDER BY projection")
            .fetch_all(&embedded.pool)
            .await
            .unwrap();
    let mut expected: Vec<(String, String)> = names
        .iter()
        .map(|n| (n.to_string(), "(event store)".to_owned()))
        .collect();
    expected.sort();
    assert_eq!(parked, expected, "the poison event, once per projection");
}

/// Workers aborted (their tasks dropped, as a killed process's would be) in the
/// middle of the log, then started again: they resume from their checkpoints,
/// and the tables equal the fold, so no event was applied twice (the counters
/// would show it) or skipped.
#[tokio::test]
async fn workers_aborted_mid_stream_resume_with_nothing_doubled_or_skipped() {
    let embedded = Embedded::new().await;
    let names: Vec<&str> = ALL.iter().map(|p| p.name).collect();
    // Several batches of the worker's 500 events each, so the abort falls
    // between batches of a projection that has committed some and not all.
    embedded.append(workload(60, 12)).await;
    let head = embedded.head().await;

    let stop = CancellationToken::new();
    let workers = embedded.start(&embedded.db, &names, &stop);
    let started = Instant::now();
    loop {
        let all = checkpoint::all(&embedded.db).await.unwrap();
        if all.iter().any(|c| c.position > Position::default()) {
            break;
        }
        assert!(started.elapsed() < CATCH_UP, "no worker committed a batch");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for worker in &workers {
        worker.abort();
    }
    for worker in join_all(workers).await {
        assert!(worker.unwrap_err().is_cancelled());
    }
    let at_abort = checkpoint::all(&embedded.db).await.unwrap();
    assert!(
        at_abort
            .iter()
            .any(|c| c.position > Position::default() && c.position < head),
        "the abort did not fall mid-stream: {at_abort:?}"
    );

    // Started again on the same file: the aborted tasks' leases went with them.
    let stop = CancellationToken::new();
    let workers = embedded.start(&embedded.db, &names, &stop);
    embedded.caught_up(&names, head).await;
    stop.cancel();
    for worker in join_all(workers).await {
        worker.unwrap().unwrap();
    }
    embedded.assert_read_models_are_the_fold(&names).await;
    let events = embedded.log().await.len() as i64;
    for (name, applied) in embedded.applied(&names).await {
        assert_eq!(applied, events, "{name}: each event counted once");
    }
}

/// Two workers of one projection on one file, from two pools as two processes
/// would have: one takes the lease (the lock file beside the database) and
/// applies; the other waits without touching the checkpoint. When the first
/// is stopped, the second takes over (a new epoch) and goes on from its
/// checkpoint; the rows still equal the fold.
#[tokio::test]
async fn two_workers_of_one_projection_on_one_file_one_active_the_other_waits() {
    let embedded = Embedded::new().await;
    let name = "conversations";
    let mut rounds = workload(8, 4);
    let later = rounds.split_off(rounds.len() / 2);
    embedded.append(rounds).await;

    let first_stop = CancellationToken::new();
    let first = embedded.start(&embedded.db, &[name], &first_stop);
    embedded.caught_up(&[name], embedded.head().await).await;
    let owner = checkpoint::all(&embedded.db).await.unwrap();
    assert_eq!(owner[0].epoch, 1);

    // The second process: its own pools, no commit signal from the first's
    // store (its sender is gone at once: it polls).
    let second_db = embedded.second_process().await;
    let (_, commits) = watch::channel(());
    let second_stop = CancellationToken::new();
    let second = start_workers(
        &second_db,
        Feed::StoreTail(commits),
        embedded.opener.clone(),
        &[name],
        &second_stop,
    );
    assert!(
        lease::lock_file(
            match &embedded.db {
                Db::Sqlite(db) => db,
                Db::Postgres(_) => unreachable!(),
            },
            name
        )
        .unwrap()
        .exists()
    );
    // More than two of the standby's tries at the lock file.
    tokio::time::sleep(lease::CHECK_EVERY * 2 + Duration::from_millis(500)).await;
    let now = checkpoint::all(&embedded.db).await.unwrap();
    assert_eq!(
        (now[0].epoch, now[0].owner_since),
        (1, owner[0].owner_since),
        "the second worker took the lease while the first held it"
    );
    embedded.append(later).await;
    let head = embedded.head().await;
    embedded.caught_up(&[name], head).await;
    assert_eq!(checkpoint::all(&embedded.db).await.unwrap()[0].epoch, 1);

    // The first stops; the second takes over within its next tries.
    first_stop.cancel();
    for worker in join_all(first).await {
        worker.unwrap().unwrap();
    }
    let started = Instant::now();
    while checkpoint::all(&embedded.db).await.unwrap()[0].epoch != 2 {
        assert!(
            started.elapsed() < lease::CHECK_EVERY * 5,
            "the standby did not take over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    embedded.append(workload(3, 2)).await;
    embedded.caught_up(&[name], embedded.head().await).await;
    second_stop.cancel();
    for worker in join_all(second).await {
        worker.unwrap().unwrap();
    }
    embedded.assert_read_models_are_the_fold(&[name]).await;
}

/// A deposed owner's write is refused on SQLite as on Postgres: a fence taken
/// under one lease fails once another holder took the lease over (the epoch
/// moved), and leaves the row as it was; the new holder's fence passes. And a
/// holder whose epoch is bumped under it sees its lease lost.
#[tokio::test]
async fn a_deposed_owners_save_fails_on_sqlite() {
    let embedded = Embedded::new().await;
    let db = &embedded.db;
    let stop = CancellationToken::new();
    let name = "fenced";
    let to = |gp: i64| Position {
        transaction_id: gp,
        global_position: gp,
    };
    let one_more = |fence, to| checkpoint::Move {
        fence,
        to,
        applied: 1,
        stream_sequence: None,
    };
    let save = |fence: checkpoint::Fence, target: Position| async move {
        let mut tx = db.begin_write().await.unwrap();
        let moved = checkpoint::save(&mut tx, name, one_more(fence, target))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        moved
    };
    // The move of a batch with nothing else to write: one statement.
    let save_alone = |fence: checkpoint::Fence, target: Position| async move {
        checkpoint::save_alone(db, name, one_more(fence, target))
            .await
            .unwrap()
    };

    let first = Lease::acquire(db, "unused on sqlite", name, &stop)
        .await
        .unwrap()
        .unwrap();
    assert!(save(first.fence(Position::default()), to(1)).await);
    let stale = first.fence(to(1));
    // While the first holds it, a second acquisition waits.
    assert!(
        tokio::time::timeout(
            lease::CHECK_EVERY * 2,
            Lease::acquire(db, "unused on sqlite", name, &stop)
        )
        .await
        .is_err(),
        "a second holder took the lease while the first held it"
    );
    drop(first);
    let second = Lease::acquire(db, "unused on sqlite", name, &stop)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.epoch, stale.epoch + 1);

    assert!(
        !save(stale, to(2)).await,
        "the deposed owner's save went through"
    );
    assert!(
        !save_alone(stale, to(2)).await,
        "the deposed owner's save went through alone"
    );
    let row = checkpoint::current(db, name).await.unwrap();
    assert_eq!((row.position, row.epoch), (to(1), second.epoch));
    assert!(save(second.fence(to(1)), to(2)).await);
    assert_eq!(checkpoint::current(db, name).await.unwrap().position, to(2));
    assert!(
        !save_alone(second.fence(to(1)), to(3)).await,
        "from a stale position"
    );
    assert!(save_alone(second.fence(to(2)), to(3)).await);
    assert_eq!(checkpoint::current(db, name).await.unwrap().position, to(3));

    // An epoch moved under a holder (what a takeover does): its watcher sees it.
    sqlx::query("UPDATE checkpoints SET epoch = epoch + 1 WHERE name = $1")
        .bind(name)
        .execute(&embedded.pool)
        .await
        .unwrap();
    tokio::time::timeout(lease::CHECK_EVERY * 3, second.lost().cancelled())
        .await
        .expect("the holder did not see its lease lost");
    assert!(!save(second.fence(to(3)), to(4)).await);
    assert!(!save_alone(second.fence(to(3)), to(4)).await);
}

/// The bus is fed by the relay, which reads Postgres: a worker asked to consume
/// it with the read side on SQLite refuses at once, saying why.
#[tokio::test]
async fn a_bus_fed_worker_on_sqlite_is_refused_with_a_clear_error() {
    let embedded = Embedded::new().await;
    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect("nats://127.0.0.1:1")
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let workers = start_workers(
        &embedded.db,
        Feed::Bus(Box::new(async_nats::jetstream::new(nats))),
        embedded.opener.clone(),
        &["assistants"],
        &stop,
    );
    for worker in join_all(workers).await {
        let error = worker.unwrap().unwrap_err();
        assert!(matches!(error, WorkerError::BusNeedsPostgres("assistants")));
        assert!(error.to_string().contains("store tail"), "{error}");
    }
}
