//! The read models' typed operations against the real Postgres (and SQLite):
//! the tables as the rules declare them are the tables the migrations make, and
//! the executors of the same rules (the live path's SQL on Postgres, the same
//! text on SQLite, and the fold in memory written by the bulk writer) end with
//! the same rows for a history that takes every rule, edge cases included.

use std::time::Duration;

use ai_secretary_contract::{Event, EventEnvelope, Position};
use ai_secretary_projections::{
    ALL, Batch, Db, Registered, SqliteDb,
    cache::Cache,
    checkpoint::{self, Fence, Move},
    db::Conn,
    executor::{
        deferred::Deferred,
        known::Known,
        postgres::{self, Moving},
        sqlite,
    },
    ops::{Type, Value as Typed},
    projections::Fold,
    tables,
};
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::support::TestDb;

/// Every registered table has the migrations' columns, in their order, of the
/// declared types: the bulk writer copies every column by its declared type,
/// and an insert names every column.
// Server-only: Postgres' catalog; SQLite's tables get the same check in
// `the_sqlite_executor_and_the_fold_hold_the_same_rows`.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn every_read_model_table_is_declared_as_migrated() {
    let db = TestDb::new().await;
    for projection in ALL {
        for table in projection.tables {
            let migrated: Vec<(String, String)> = sqlx::query_as(
                "SELECT column_name::text, udt_name::text FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            )
            .bind(table.name)
            .fetch_all(&db.pool)
            .await
            .unwrap();
            let declared: Vec<(String, String)> = table
                .columns
                .iter()
                .map(|c| {
                    let udt = match c.ty {
                        Type::Uuid => "uuid",
                        Type::Text => "text",
                        Type::I64 => "int8",
                        Type::F64 => "float8",
                        Type::Json => "jsonb",
                        Type::Timestamp => "timestamptz",
                        Type::Date => "date",
                    };
                    (c.name.to_owned(), udt.to_owned())
                })
                .collect();
            assert_eq!(declared, migrated, "table {}", table.name);
            let key: Vec<String> = sqlx::query_scalar(
                "SELECT a.attname::text FROM pg_index x
                 JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey)
                 WHERE x.indrelid = to_regclass($1) AND x.indisprimary
                 ORDER BY array_position(x.indkey::int2[], a.attnum)",
            )
            .bind(table.name)
            .fetch_all(&db.pool)
            .await
            .unwrap();
            assert_eq!(key, table.key, "primary key of {}", table.name);
        }
    }
}

/// A history in which every rule acts, in order: envelopes with their payloads.
struct History {
    next: i64,
    events: Vec<EventEnvelope>,
}

impl History {
    fn push(
        &mut self,
        stream_type: &str,
        stream: Uuid,
        version: i64,
        event_type: &str,
        data: Value,
    ) {
        self.next += 1;
        self.events.push(EventEnvelope {
            event_id: Uuid::new_v4(),
            stream_id: stream,
            stream_type: stream_type.into(),
            version,
            event_type: event_type.into(),
            schema_version: 1,
            transaction_id: 1000 + self.next,
            global_position: self.next,
            recorded_at: "2026-11-29T10:00:00Z".parse().unwrap(),
            data,
            metadata: json!({}),
            previous: None,
        });
    }
}

fn history(kept: Uuid, forgotten: Uuid) -> History {
    let mut h = History {
        next: 0,
        events: vec![],
    };
    let created = |name: &str, owner: Uuid| {
        json!({"owner_id": owner, "name": name, "role": "r", "instructions": "i", "model": "m",
               "temperature": 0.7, "metadata": {"team": name}, "created_at": "2026-11-29T10:00:00Z"})
    };
    let (a1, a2, gone) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    h.push("user", kept, 1, "UserRegistered", json!({}));
    h.push(
        "assistant",
        a1,
        1,
        "AssistantCreated",
        created("first", kept),
    );
    // A second creation of the same id changes nothing (insert unless taken).
    h.push(
        "assistant",
        a1,
        1,
        "AssistantCreated",
        created("again", kept),
    );
    // Only what the update carries changes; a JSON null keeps the metadata.
    h.push("assistant", a1, 2, "AssistantUpdated",
        json!({"name": "renamed", "temperature": 0.25, "metadata": null, "updated_at": "2026-11-29T10:01:00Z"}));
    h.push(
        "assistant",
        a1,
        3,
        "AssistantArchived",
        json!({"archived_at": "2026-11-29T10:02:00Z"}),
    );
    h.push(
        "assistant",
        a1,
        4,
        "AssistantRestored",
        json!({"restored_at": "2026-11-29T10:03:00Z"}),
    );
    h.push(
        "assistant",
        gone,
        1,
        "AssistantCreated",
        created("gone", kept),
    );
    h.push(
        "assistant",
        gone,
        2,
        "AssistantDeleted",
        json!({"deleted_at": "2026-11-29T10:04:00Z"}),
    );
    h.push(
        "assistant",
        a2,
        1,
        "AssistantCreated",
        created("theirs", forgotten),
    );

    let c1 = Uuid::new_v4();
    let started = |assistant: Uuid, owner: Uuid, at: &str| json!({"owner_id": owner, "assistant_id": assistant, "title": "t", "started_at": at});
    h.push(
        "conversation",
        c1,
        1,
        "ConversationStarted",
        started(a1, kept, "2026-11-29T11:00:00Z"),
    );
    h.push(
        "conversation",
        c1,
        2,
        "ConversationRenamed",
        json!({"title": "named", "renamed_at": "2026-11-29T11:01:00Z"}),
    );
    let (m1, r1, r2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    h.push(
        "conversation",
        c1,
        3,
        "MessagePosted",
        json!({"message_id": m1, "content": "hi", "posted_at": "2026-11-29T11:02:00Z"}),
    );
    h.push("conversation", c1, 4, "ReplyRequested",
        json!({"reply_id": r1, "reply_to": m1, "assistant_id": a1, "requested_at": "2026-11-29T11:02:00Z"}));
    // A reply in a stream of its own changes its conversation, not its version.
    h.push("reply", r1, 1, "ReplyStarted",
        json!({"reply_id": r1, "conversation_id": c1, "attempt": 1, "started_at": "2026-11-29T11:02:01Z"}));
    let completed = |reply: Uuid, at: &str, tokens: i64| {
        json!({"reply_id": reply, "conversation_id": c1, "content": "hello", "model": "m",
               "finish_reason": "stop", "usage": {"prompt_tokens": tokens, "completion_tokens": 1,
               "total_tokens": tokens + 1}, "completed_at": at})
    };
    h.push(
        "reply",
        r1,
        2,
        "ReplyCompleted",
        completed(r1, "2026-11-29T11:02:05Z", 3),
    );
    // A late start never reopens a reply that ended.
    h.push("reply", r1, 3, "ReplyStarted",
        json!({"reply_id": r1, "conversation_id": c1, "attempt": 2, "started_at": "2026-11-29T11:02:06Z"}));
    h.push("conversation", c1, 5, "ReplyRequested",
        json!({"reply_id": r2, "reply_to": m1, "assistant_id": a1, "requested_at": "2026-11-29T11:03:00Z"}));
    h.push("reply", r2, 1, "ReplyFailed",
        json!({"reply_id": r2, "conversation_id": c1, "error": "down", "failed_at": "2026-11-29T11:03:01Z"}));
    // A second completion the same UTC day adds to the day's usage (upsert);
    // one just before midnight counts on its own day.
    let r3 = Uuid::new_v4();
    h.push("conversation", c1, 6, "ReplyRequested",
        json!({"reply_id": r3, "reply_to": m1, "assistant_id": a1, "requested_at": "2026-11-29T23:59:00Z"}));
    h.push(
        "reply",
        r3,
        1,
        "ReplyCompleted",
        completed(r3, "2026-11-29T23:59:59.999999Z", 10),
    );
    let r4 = Uuid::new_v4();
    h.push("conversation", c1, 7, "ReplyRequested",
        json!({"reply_id": r4, "reply_to": m1, "assistant_id": a1, "requested_at": "2026-11-30T00:00:00Z"}));
    h.push(
        "reply",
        r4,
        1,
        "ReplyCompleted",
        completed(r4, "2026-11-30T00:00:00Z", 5),
    );
    // An older activity leaves the last activity where it is (GREATEST).
    h.push("conversation", c1, 8, "MessagePosted",
        json!({"message_id": Uuid::new_v4(), "content": "late", "posted_at": "2026-11-28T00:00:00Z"}));
    h.push(
        "conversation",
        c1,
        9,
        "ConversationArchived",
        json!({"archived_at": "2026-11-30T01:00:00Z"}),
    );
    // A message in a conversation never seen to start is not listed anywhere.
    h.push("conversation", Uuid::new_v4(), 2, "MessagePosted",
        json!({"message_id": Uuid::new_v4(), "content": "orphan", "posted_at": "2026-11-29T12:00:00Z"}));

    // The forgotten user's conversation, then the forgetting.
    let c2 = Uuid::new_v4();
    h.push(
        "conversation",
        c2,
        1,
        "ConversationStarted",
        started(a2, forgotten, "2026-11-29T13:00:00Z"),
    );
    h.push("conversation", c2, 2, "MessagePosted",
        json!({"message_id": Uuid::new_v4(), "content": "secret", "posted_at": "2026-11-29T13:01:00Z"}));
    let r5 = Uuid::new_v4();
    h.push("conversation", c2, 3, "ReplyRequested",
        json!({"reply_id": r5, "reply_to": m1, "assistant_id": a2, "requested_at": "2026-11-29T13:02:00Z"}));
    h.push("reply", r5, 1, "ReplyCompleted",
        json!({"reply_id": r5, "conversation_id": c2, "content": "x", "model": "m", "finish_reason": "stop",
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
               "completed_at": "2026-11-29T13:03:00Z"}));
    h.push("user", forgotten, 2, "UserForgotten", json!({}));
    // Late events of the forgotten user's conversation (commands that raced
    // the forgetting): nothing of them is kept either, though the lookups of
    // their conversation found it before (`executor::known` forgets them).
    h.push("conversation", c2, 4, "MessagePosted",
        json!({"message_id": Uuid::new_v4(), "content": "late", "posted_at": "2026-11-29T13:04:00Z"}));
    let r6 = Uuid::new_v4();
    h.push("reply", r6, 1, "ReplyCompleted",
        json!({"reply_id": r6, "conversation_id": c2, "content": "late", "model": "m", "finish_reason": "stop",
               "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
               "completed_at": "2026-11-29T13:05:00Z"}));
    // An event of a type this version does not know changes nothing.
    h.push("conversation", c1, 10, "SomethingNew", json!({}));
    h
}

/// Rows of `table` as JSON, whole, sorted: what `verify` compares.
/// `projections`' rules applied to `events` in `db` as one live batch each:
/// the executor holds writes back and gathers them, then writes what it held
/// as the batch moves the projection's checkpoint.
pub async fn apply_as_one_batch(
    db: &Db,
    projections: &[Registered],
    events: &[(&EventEnvelope, Event)],
) {
    for projection in projections {
        apply_in_batches(db, projection, events, events.len()).await;
    }
}

/// `projection`'s rules applied to `events` in `db` in batches of `per_batch`
/// events, as a worker makes them: each batch moves the projection's
/// checkpoint with its writes, and what the lookups found is kept from one
/// batch to the next.
async fn apply_in_batches(
    db: &Db,
    projection: &Registered,
    events: &[(&EventEnvelope, Event)],
    per_batch: usize,
) {
    // Only the lookups of the `cache` projection's tables are made here.
    let live = (projection.live)(&Cache::new(
        "redis://127.0.0.1:1",
        "t",
        Default::default(),
        Default::default(),
    ));
    let start = checkpoint::ensure(db, projection.name).await.unwrap();
    let mut from = start.position;
    let mut known = Known::default();
    for batch_of in events.chunks(per_batch) {
        let to = batch_of.last().unwrap().0.position();
        let moving = Move {
            fence: Fence {
                epoch: start.epoch,
                from,
            },
            to,
            applied: batch_of.len() as i64,
            stream_sequence: None,
        };
        let mut batch = Batch::new(db, projection.name, moving, known);
        for (e, event) in batch_of {
            live.apply(&mut batch, e, event).await.unwrap();
        }
        known = batch.commit().await.unwrap();
        from = to;
    }
}

async fn rows_of(conn: &mut sqlx::PgConnection, table: &str) -> Vec<Value> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT to_jsonb(t) FROM {table} t ORDER BY to_jsonb(t)::text"
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap()
}

/// The live path (each event's lookup and ops in SQL, in a transaction) and
/// the fold (the same ops in memory, then the bulk writer) end with equal rows,
/// and those rows are what the rules say.
// Server-only: the Postgres executor and bulk writer; the SQLite executor has
// `the_sqlite_executor_and_the_fold_hold_the_same_rows`.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn the_live_executor_and_the_fold_write_the_same_rows() {
    /// Events per batch: several batches, each with gathered writes.
    const BATCH: usize = 4;
    let db = TestDb::new().await;
    let (kept, forgotten) = (Uuid::new_v4(), Uuid::new_v4());
    let history = history(kept, forgotten);
    let decoded: Vec<(&EventEnvelope, Event)> = history
        .events
        .iter()
        .map(|e| (e, e.decode().expect("every event of the history decodes")))
        .collect();
    let mut conn = db.pool.acquire().await.unwrap();
    let pg = Db::Postgres(db.pool.clone());
    for projection in ALL {
        // Batches of a few events, as a worker makes them: the executor holds
        // writes back and gathers them within a batch, and what the lookups
        // found is kept from one batch to the next. Some batches commit as one
        // statement with their checkpoint's move, some (those with a lookup
        // the worker did not know) in a transaction.
        apply_in_batches(&pg, &projection, &decoded, BATCH).await;

        let mut fold = Fold::new(projection.name).unwrap();
        for (e, event) in &decoded {
            fold.apply(e, event);
        }
        for table in projection.tables {
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE {t}__expected (LIKE {t} INCLUDING DEFAULTS)",
                t = table.name
            )))
            .execute(&mut *conn)
            .await
            .unwrap();
        }
        tables::write_all(&mut Conn::Postgres(&mut conn), &fold, "__expected")
            .await
            .unwrap();
        for table in projection.tables {
            let live_rows = rows_of(&mut conn, table.name).await;
            let folded = rows_of(&mut conn, &format!("{}__expected", table.name)).await;
            assert!(
                !live_rows.is_empty(),
                "{} is empty: the test proves nothing",
                table.name
            );
            assert_eq!(live_rows, folded, "{}: live ≠ fold", table.name);
        }
    }

    // What the rules say, read from the live rows.
    let one = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Value>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let assistants = one(
        "SELECT jsonb_agg(jsonb_build_array(name, temperature, metadata, status,
                              conversation_count, message_count,
                              last_activity_at = '2026-11-30T00:00:00Z') ORDER BY name)
                          FROM assistants",
    )
    .await;
    assert_eq!(
        assistants,
        json!([["renamed", 0.25, {"team": "first"}, "active", 1, 6, true]]),
        "the deleted and the forgotten user's assistants are gone; counts and GREATEST hold"
    );
    let conversations = one(
        "SELECT jsonb_agg(jsonb_build_array(title, status, message_count,
                                 prompt_tokens, total_tokens, version) ORDER BY title)
                             FROM conversations",
    )
    .await;
    assert_eq!(conversations, json!([["named", "archived", 6, 18, 21, 9]]));
    let replies =
        one("SELECT jsonb_agg(status ORDER BY seq) FROM messages WHERE role = 'assistant'").await;
    assert_eq!(
        replies,
        json!(["completed", "failed", "completed", "completed"])
    );
    let usage = one(
        "SELECT jsonb_agg(jsonb_build_array(day, messages, total_tokens) ORDER BY day)
                     FROM usage_daily",
    )
    .await;
    assert_eq!(usage, json!([["2026-11-29", 2, 15], ["2026-11-30", 1, 6]]));
    for (table, column) in [
        ("assistants", "owner_id"),
        ("conversations", "owner_id"),
        ("messages", "owner_id"),
        ("messages_conversations", "owner_id"),
        ("usage_daily", "owner_id"),
        ("usage_conversations", "owner_id"),
    ] {
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {column} = $1"
        )))
        .bind(forgotten)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(left, 0, "{table} still holds the forgotten user's rows");
    }
    let links: i64 = sqlx::query_scalar("SELECT count(*) FROM assistants_conversations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        links, 1,
        "the forgotten user's assistant's conversation link is gone"
    );
}

/// The SQLite executor runs the same rules and the same statement text (but
/// for its dialect's points) to the same rows as the fold, on the tables
/// `migrations/sqlite` makes (STRICT: a value bound as the wrong storage type
/// is refused, not stored). First, every declared table is what that migration
/// made: its columns in order, of the executor's storage type, and its key.
/// (SQLite only: it needs no server.)
#[tokio::test]
async fn the_sqlite_executor_and_the_fold_hold_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("read.db");
    let pool = ai_secretary::store::sqlite::connect(path.to_str().unwrap(), 1)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap().detach();
    for projection in ALL {
        for table in projection.tables {
            let migrated: Vec<(String, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT name, type, pk FROM pragma_table_info('{}') ORDER BY cid",
                table.name
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let declared: Vec<(String, String, i64)> = table
                .columns
                .iter()
                .map(|c| {
                    let key = table.key.iter().position(|k| *k == c.name);
                    (
                        c.name.to_owned(),
                        sqlite::storage_type(c.ty).to_owned(),
                        key.map_or(0, |i| i as i64 + 1),
                    )
                })
                .collect();
            assert_eq!(migrated, declared, "{} as migrated", table.name);
        }
    }
    let (kept, forgotten) = (Uuid::new_v4(), Uuid::new_v4());
    let history = history(kept, forgotten);
    let decoded: Vec<(&EventEnvelope, Event)> = history
        .events
        .iter()
        .map(|e| (e, e.decode().expect("every event of the history decodes")))
        .collect();
    let sorted = |mut rows: Vec<Vec<Typed>>| {
        rows.sort_by_cached_key(|row| format!("{row:?}"));
        rows
    };
    let lite = Db::Sqlite(SqliteDb::new(pool.clone()));
    for projection in ALL {
        apply_as_one_batch(&lite, &[projection], &decoded).await;
        let mut fold = Fold::new(projection.name).unwrap();
        for (e, event) in &decoded {
            fold.apply(e, event);
        }
        for (table, folded) in projection.tables.iter().zip(&fold.tables) {
            let types: Vec<Type> = table.columns.iter().map(|c| c.ty).collect();
            let names: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
            let live: Vec<Vec<Typed>> = sqlx::query(AssertSqlSafe(format!(
                "SELECT {} FROM {}",
                names.join(", "),
                table.name
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|row| sqlite::decode_row(row, &types).unwrap())
            .collect();
            let expected: Vec<Vec<Typed>> = folded.rows.iter().map(|(_, r)| r.clone()).collect();
            assert!(
                !live.is_empty(),
                "{} is empty: the test proves nothing",
                table.name
            );
            assert_eq!(
                sorted(live),
                sorted(expected),
                "{}: sqlite ≠ fold",
                table.name
            );
        }
    }
    let forgotten_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE owner_id = $1")
            .bind(forgotten)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(forgotten_rows, 0);
}

/// A batch that reads nothing the worker does not know commits its writes
/// with its checkpoint's move as one statement (`write_moving`): together or
/// not at all, fenced like the move alone, and never waiting for the
/// checkpoint's row, which a rebuild's swap holds while it waits for the
/// tables. A batch whose row is held then commits in a transaction, which
/// waits for the row.
// Server-only: the one statement is Postgres'.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn one_statement_moves_and_writes_together_or_not_at_all_and_never_waits_for_the_row() {
    let db = TestDb::new().await;
    let pg = Db::Postgres(db.pool.clone());
    let (kept, forgotten) = (Uuid::new_v4(), Uuid::new_v4());
    let history = history(kept, forgotten);
    // Conversations started: no lookup, and writes that all wait for the end.
    let started: Vec<(&EventEnvelope, Event)> = history
        .events
        .iter()
        .filter(|e| e.event_type == "ConversationStarted")
        .map(|e| (e, e.decode().unwrap()))
        .collect();
    assert!(started.len() >= 2, "the history starts conversations");
    let assistants = ALL.iter().find(|p| p.name == "assistants").unwrap();
    let mut deferred = Deferred::default();
    let mut writes = Vec::new();
    for (e, event) in &started {
        for op in (assistants.rules.ops)(e, event, &Default::default()) {
            deferred.push(op, &mut writes);
        }
    }
    assert!(
        writes.is_empty(),
        "nothing had to be written before the end"
    );
    deferred.release_all(&mut writes);
    assert!(postgres::fit_one_statement(&writes), "{writes:?}");

    let start = checkpoint::ensure(&pg, assistants.name).await.unwrap();
    let to = started.last().unwrap().0.position();
    let moving = |epoch, from| Move {
        fence: Fence { epoch, from },
        to,
        applied: started.len() as i64,
        stream_sequence: None,
    };
    let links = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM assistants_conversations")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let write = |m| postgres::write_moving(&db.pool, assistants.name, m, &writes);
    // The checkpoint's row locked by another transaction, as a swap locks it.
    let hold_the_row = || async {
        let mut holder = db.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM checkpoints WHERE name = $1 FOR UPDATE")
            .bind(assistants.name)
            .execute(&mut *holder)
            .await
            .unwrap();
        holder
    };

    // The row held (as a swap holds it): refused at once, nothing written.
    let holder = hold_the_row().await;
    let busy = tokio::time::timeout(
        Duration::from_secs(5),
        write(moving(start.epoch, start.position)),
    )
    .await
    .expect("it does not wait for the row")
    .unwrap();
    assert_eq!(busy, Moving::RowBusy);
    holder.rollback().await.unwrap();
    assert_eq!(links().await, 0);

    // Another epoch's fence: not moved, nothing written.
    let deposed = write(moving(start.epoch + 1, start.position))
        .await
        .unwrap();
    assert_eq!(deposed, Moving::NotMoved);
    assert_eq!(links().await, 0);
    assert_eq!(
        checkpoint::current(&pg, assistants.name).await.unwrap(),
        start
    );

    // The right fence: moved and written together.
    let moved = write(moving(start.epoch, start.position)).await.unwrap();
    assert_eq!(moved, Moving::Moved);
    assert_eq!(links().await, started.len() as i64);
    let after = checkpoint::current(&pg, assistants.name).await.unwrap();
    assert_eq!(after.position, to);

    // The same move again: its fence no longer holds; nothing doubles.
    let again = write(moving(start.epoch, start.position)).await.unwrap();
    assert_eq!(again, Moving::NotMoved);
    assert_eq!(links().await, started.len() as i64);
    assert_eq!(
        checkpoint::current(&pg, assistants.name).await.unwrap(),
        after
    );

    // A batch whose row is held waits for it in a transaction, then commits.
    let holder = hold_the_row().await;
    let next = Position {
        transaction_id: to.transaction_id + 1,
        global_position: to.global_position + 1,
    };
    let batch = Batch::new(
        &pg,
        assistants.name,
        Move {
            fence: Fence {
                epoch: start.epoch,
                from: to,
            },
            to: next,
            applied: 1,
            stream_sequence: None,
        },
        Known::default(),
    );
    let mut commit = tokio::spawn(batch.commit());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut commit)
            .await
            .is_err(),
        "the batch waits for the row"
    );
    holder.commit().await.unwrap();
    commit.await.unwrap().unwrap();
    assert_eq!(
        checkpoint::current(&pg, assistants.name)
            .await
            .unwrap()
            .position,
        next
    );
}
