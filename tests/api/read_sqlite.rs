//! The read side's queries (`ai_secretary_projections::read`) on SQLite answer
//! exactly what they answer on Postgres: the same events, run through the same
//! projection rules by each database's executor, then every query asked of
//! both, its answers compared as the JSON the API sends (and the cache stamps,
//! which the JSON does not carry). Lists are paged every way (limit, after,
//! before, both orders), filtered, and scoped to their owner; usage is grouped
//! by day, assistant and model over ranges, absurd ones included.
//!
//! And the read side's progress on SQLite: woken by `checkpoint_moves()` for a
//! move made in the process, by its poll for one made by another process.

use std::time::{Duration, Instant};

use ai_secretary::progress::Progress;
use ai_secretary_contract::{Event, EventEnvelope, Position};
use ai_secretary_projections::{
    ALL, Db, SqliteDb,
    read::{self, ConversationFilter, GroupBy, List, Page, Stamped},
};
use chrono::NaiveDate;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{read_models::apply_as_one_batch, support::TestDb};

/// A history of two owners' work: envelopes in commit order.
struct History {
    next: i64,
    events: Vec<EventEnvelope>,
}

impl History {
    fn push(&mut self, stream_type: &str, stream: Uuid, event_type: &str, data: Value) {
        self.next += 1;
        let version = self.events.iter().filter(|e| e.stream_id == stream).count() as i64 + 1;
        self.events.push(EventEnvelope {
            event_id: Uuid::now_v7(),
            stream_id: stream,
            stream_type: stream_type.into(),
            version,
            event_type: event_type.into(),
            schema_version: 1,
            transaction_id: 5000 + self.next,
            global_position: self.next,
            recorded_at: "2026-11-29T10:00:00Z".parse().unwrap(),
            data,
            metadata: json!({}),
            previous: None,
        });
    }
}

/// One owner's ids, as the history made them.
#[derive(Debug, Default)]
struct Owned {
    user: Uuid,
    assistants: Vec<Uuid>,
    conversations: Vec<Uuid>,
    /// The conversation with many messages, and its messages' ids in order.
    busy: Uuid,
    busy_messages: Vec<Uuid>,
}

/// Owner `a` builds a team of five assistants (one updated, one archived),
/// starts conversations with three of them (one renamed, one archived), and
/// talks in one at length: messages, replies completed on two days with two
/// models, one failed, one still queued. Owner `b` has an assistant and a
/// conversation of their own, with a completed reply the same day as `a`'s.
fn history() -> (History, Owned, Owned) {
    let mut h = History {
        next: 0,
        events: vec![],
    };
    let mut a = Owned {
        user: Uuid::now_v7(),
        ..Owned::default()
    };
    let mut b = Owned {
        user: Uuid::now_v7(),
        ..Owned::default()
    };
    h.push("user", a.user, "UserRegistered", json!({}));
    h.push("user", b.user, "UserRegistered", json!({}));
    for (i, name) in ["Ada", "Grace", "Edsger", "Barbara", "Ken"]
        .into_iter()
        .enumerate()
    {
        let id = Uuid::now_v7();
        h.push(
            "assistant",
            id,
            "AssistantCreated",
            json!({"owner_id": a.user, "name": name, "role": "secretary",
                   "instructions": format!("Keep {name}'s diary."), "model": "gemini-2.5-flash",
                   "temperature": 0.1 * i as f64,
                   // Keys out of jsonb's order: the JSON compared is a value, keys unordered.
                   "metadata": {"team": "sales", "desk": i},
                   "created_at": format!("2026-11-2{i}T09:00:00.123456Z")}),
        );
        a.assistants.push(id);
    }
    let theirs = Uuid::now_v7();
    h.push(
        "assistant",
        theirs,
        "AssistantCreated",
        json!({"owner_id": b.user, "name": "Theirs", "role": "r", "instructions": "i",
               "model": "offline", "temperature": 1.0, "metadata": {},
               "created_at": "2026-11-28T09:00:00Z"}),
    );
    b.assistants.push(theirs);
    h.push(
        "assistant",
        a.assistants[1],
        "AssistantUpdated",
        json!({"name": "Grace H.", "temperature": 0.25, "metadata": {"team": "ops"},
               // Nanoseconds: both databases keep the microseconds.
               "updated_at": "2026-11-29T10:01:00.123456789Z"}),
    );
    h.push(
        "assistant",
        a.assistants[3],
        "AssistantArchived",
        json!({"archived_at": "2026-11-29T10:02:00Z"}),
    );

    let start = |h: &mut History, owner: Uuid, assistant: Uuid, title: &str, at: &str| {
        let id = Uuid::now_v7();
        h.push(
            "conversation",
            id,
            "ConversationStarted",
            json!({"owner_id": owner, "assistant_id": assistant, "title": title, "started_at": at}),
        );
        id
    };
    for (assistant, title) in [
        (0, "Planning the week"),
        (0, "Travel"),
        (1, "Budget"),
        (2, "Hiring"),
        (0, "Offsite"),
        (1, "Reading list"),
    ] {
        let id = start(
            &mut h,
            a.user,
            a.assistants[assistant],
            title,
            "2026-11-29T11:00:00Z",
        );
        a.conversations.push(id);
    }
    b.conversations.push(start(
        &mut h,
        b.user,
        theirs,
        "Their talk",
        "2026-11-29T11:30:00Z",
    ));
    h.push(
        "conversation",
        a.conversations[1],
        "ConversationRenamed",
        json!({"title": "Travel to Lisbon", "renamed_at": "2026-11-29T11:01:00Z"}),
    );
    h.push(
        "conversation",
        a.conversations[3],
        "ConversationArchived",
        json!({"archived_at": "2026-11-29T11:02:00Z"}),
    );

    // A long talk in a's first conversation: each message gets a reply that
    // completes (on the 29th or the 30th, with one model or the other), fails,
    // or is still queued.
    a.busy = a.conversations[0];
    let (conversation, assistant) = (a.busy, a.assistants[0]);
    let outcomes = [
        ("2026-11-29T12:00:00Z", Some(("gemini-2.5-flash", 10))),
        ("2026-11-29T12:10:00Z", Some(("Gemini-Pro", 20))),
        ("2026-11-29T23:59:59.999999Z", Some(("gemini-2.5-flash", 5))),
        ("2026-11-30T00:00:00Z", Some(("gemini-2.5-flash", 7))),
        ("2026-11-30T08:00:00Z", None),
        ("2026-11-30T09:00:00Z", Some(("offline", 1))),
    ];
    for (i, (at, completion)) in outcomes.into_iter().enumerate() {
        let (message, reply) = (Uuid::now_v7(), Uuid::now_v7());
        h.push(
            "conversation",
            conversation,
            "MessagePosted",
            json!({"message_id": message, "content": format!("message {i}"), "posted_at": at}),
        );
        h.push(
            "conversation",
            conversation,
            "ReplyRequested",
            json!({"reply_id": reply, "reply_to": message, "assistant_id": assistant,
                   "requested_at": at}),
        );
        a.busy_messages.extend([message, reply]);
        h.push(
            "reply",
            reply,
            "ReplyStarted",
            json!({"reply_id": reply, "conversation_id": conversation, "attempt": 1,
                   "started_at": at}),
        );
        match completion {
            Some((model, tokens)) => h.push(
                "reply",
                reply,
                "ReplyCompleted",
                json!({"reply_id": reply, "conversation_id": conversation,
                       "content": format!("answer {i}"), "model": model, "finish_reason": "stop",
                       "usage": {"prompt_tokens": tokens, "completion_tokens": 2,
                                 "total_tokens": tokens + 2},
                       "completed_at": at}),
            ),
            None => h.push(
                "reply",
                reply,
                "ReplyFailed",
                json!({"reply_id": reply, "conversation_id": conversation,
                       "error": "the model is down", "failed_at": at}),
            ),
        }
    }
    // The last message's reply is still queued.
    let (message, reply) = (Uuid::now_v7(), Uuid::now_v7());
    h.push(
        "conversation",
        conversation,
        "MessagePosted",
        json!({"message_id": message, "content": "and one more", "posted_at": "2026-11-30T10:00:00Z"}),
    );
    h.push(
        "conversation",
        conversation,
        "ReplyRequested",
        json!({"reply_id": reply, "reply_to": message, "assistant_id": assistant,
               "requested_at": "2026-11-30T10:00:00Z"}),
    );
    a.busy_messages.extend([message, reply]);
    // A message in a's second conversation with another assistant's reply.
    let (message, reply) = (Uuid::now_v7(), Uuid::now_v7());
    h.push(
        "conversation",
        a.conversations[2],
        "MessagePosted",
        json!({"message_id": message, "content": "numbers?", "posted_at": "2026-11-29T14:00:00Z"}),
    );
    h.push(
        "conversation",
        a.conversations[2],
        "ReplyRequested",
        json!({"reply_id": reply, "reply_to": message, "assistant_id": a.assistants[1],
               "requested_at": "2026-11-29T14:00:00Z"}),
    );
    h.push(
        "reply",
        reply,
        "ReplyCompleted",
        json!({"reply_id": reply, "conversation_id": a.conversations[2], "content": "42",
               "model": "offline", "finish_reason": "stop",
               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
               "completed_at": "2026-11-29T14:00:01Z"}),
    );

    // b's talk: one message and its reply, the same day as a's.
    let (message, reply) = (Uuid::now_v7(), Uuid::now_v7());
    h.push(
        "conversation",
        b.conversations[0],
        "MessagePosted",
        json!({"message_id": message, "content": "mine", "posted_at": "2026-11-29T12:00:00Z"}),
    );
    h.push(
        "conversation",
        b.conversations[0],
        "ReplyRequested",
        json!({"reply_id": reply, "reply_to": message, "assistant_id": theirs,
               "requested_at": "2026-11-29T12:00:00Z"}),
    );
    h.push(
        "reply",
        reply,
        "ReplyCompleted",
        json!({"reply_id": reply, "conversation_id": b.conversations[0], "content": "yours",
               "model": "offline", "finish_reason": "stop",
               "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
               "completed_at": "2026-11-29T12:00:01Z"}),
    );
    b.busy = b.conversations[0];
    b.busy_messages.extend([message, reply]);
    (h, a, b)
}

/// The same history in a fresh Postgres database and a fresh SQLite file,
/// each through its own executor of every projection's rules.
struct Both {
    postgres: Db,
    sqlite: Db,
    _pg: TestDb,
    _dir: tempfile::TempDir,
}

async fn both(history: &History) -> Both {
    let decoded: Vec<(&EventEnvelope, Event)> = history
        .events
        .iter()
        .map(|e| (e, e.decode().expect("every event of the history decodes")))
        .collect();

    let pg = TestDb::new().await;
    let postgres = Db::Postgres(pg.pool.clone());
    apply_as_one_batch(&postgres, &ALL, &decoded).await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("read.db");
    let pool = ai_secretary::store::sqlite::connect(path.to_str().unwrap(), 4)
        .await
        .unwrap();
    let sqlite = Db::Sqlite(SqliteDb::new(pool));
    apply_as_one_batch(&sqlite, &ALL, &decoded).await;

    Both {
        postgres,
        sqlite,
        _pg: pg,
        _dir: dir,
    }
}

/// An answer as the API sends it, plus what the JSON leaves out that a
/// caller still uses: each item's cache stamp.
fn seen<T: Serialize>(answer: &T, stamps: Vec<Position>) -> Value {
    json!({
        "json": serde_json::to_value(answer).unwrap(),
        "stamps": stamps.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
    })
}

/// The cache stamp of a list's item, where it has one (a message has none).
trait MaybeStamped {
    fn maybe_stamp(&self) -> Option<Position>;
}

impl MaybeStamped for read::AssistantView {
    fn maybe_stamp(&self) -> Option<Position> {
        Some(self.stamp())
    }
}

impl MaybeStamped for read::ConversationView {
    fn maybe_stamp(&self) -> Option<Position> {
        Some(self.stamp())
    }
}

impl MaybeStamped for read::MessageView {
    fn maybe_stamp(&self) -> Option<Position> {
        None
    }
}

fn list_seen<T: Serialize + MaybeStamped>(list: &List<T>) -> Value {
    seen(list, list.data.iter().filter_map(T::maybe_stamp).collect())
}

fn one_seen<T: Serialize + Stamped>(one: &Option<T>) -> Value {
    seen(one, one.iter().map(Stamped::stamp).collect())
}

/// Ask `query` of both databases; they must agree. The Postgres answer.
macro_rules! agree {
    ($both:expr, $what:expr, |$db:ident| $query:expr, $seen:expr) => {{
        let on_postgres = {
            let $db = &$both.postgres;
            $query.await.unwrap()
        };
        let on_sqlite = {
            let $db = &$both.sqlite;
            $query.await.unwrap()
        };
        let (p, s) = ($seen(&on_postgres), $seen(&on_sqlite));
        assert_eq!(s, p, "{}: SQLite (left) ≠ Postgres (right)", $what);
        on_postgres
    }};
}

fn page(limit: i64, descending: bool) -> Page {
    Page {
        limit,
        after: None,
        before: None,
        descending,
    }
}

/// Every page of a list, walked forward by `after` and back by `before`, in
/// both orders and at several limits, agrees on both databases; the walk
/// forward visits `expected` (ascending) once each, in the order asked.
async fn walk<T, F, Fut>(both: &Both, what: &str, expected: &[Uuid], list: F)
where
    T: Serialize + MaybeStamped + read::Item,
    F: Fn(Db, Page) -> Fut,
    Fut: Future<Output = Result<List<T>, sqlx::Error>>,
{
    assert!(expected.len() >= 3, "{what}: too short a list to page");
    for descending in [false, true] {
        for limit in [1, 2, 3, 100] {
            let mut visited = Vec::new();
            let mut p = page(limit, descending);
            loop {
                let at = format!("{what} forward, limit {limit}, descending {descending}");
                let got = agree!(both, at, |db| list(db.clone(), p), list_seen);
                visited.extend(got.data.iter().map(read::Item::id));
                if !got.has_more {
                    break;
                }
                p.after = got.last_id;
            }
            let mut in_order = expected.to_vec();
            if descending {
                in_order.reverse();
            }
            assert_eq!(visited, in_order, "{what}: the walk forward");

            // Back from the end, page by page, to the start.
            let mut p = page(limit, descending);
            p.before = visited.last().copied();
            let mut back = vec![visited.last().copied().unwrap()];
            loop {
                let at = format!("{what} backward, limit {limit}, descending {descending}");
                let got = agree!(both, at, |db| list(db.clone(), p), list_seen);
                let ids: Vec<Uuid> = got.data.iter().map(read::Item::id).collect();
                back.splice(0..0, ids);
                if !got.has_more {
                    break;
                }
                p.before = got.first_id;
            }
            assert_eq!(back, visited, "{what}: the walk backward");
        }
    }
    // Limits out of the API's range answer alike and never panic: none, or
    // none on a negative limit, or everything.
    for limit in [0, -1, i64::MIN, i64::MAX] {
        let got = agree!(
            both,
            format!("{what}, limit {limit}"),
            |db| list(db.clone(), page(limit, false)),
            list_seen
        );
        let expected_len = if limit > 0 { expected.len() } else { 0 };
        assert_eq!(got.data.len(), expected_len, "{what}, limit {limit}");
    }
    // A cursor that names nothing in the list.
    let mut p = page(5, false);
    p.after = Some(Uuid::now_v7());
    agree!(
        both,
        format!("{what} after an unknown id"),
        |db| list(db.clone(), p),
        list_seen
    );
}

// Server-only: compares SQLite's answers with Postgres'.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn every_read_query_answers_the_same_on_sqlite_as_on_postgres() {
    let (history, a, b) = history();
    let both = both(&history).await;

    // Assistants: each one alone; another owner's, or an unknown id, is none.
    for id in &a.assistants {
        let got = agree!(
            both,
            "assistant_of",
            |db| read::assistant_of(db, a.user, *id),
            one_seen
        );
        assert!(got.is_some(), "a's assistant {id} is missing");
    }
    let grace = agree!(
        both,
        "updated assistant",
        |db| read::assistant_of(db, a.user, a.assistants[1]),
        one_seen
    )
    .unwrap();
    assert_eq!(
        (grace.name.as_str(), grace.temperature, grace.message_count),
        ("Grace H.", 0.25, 2)
    );
    assert_eq!(
        grace.updated_at.to_rfc3339(),
        "2026-11-29T10:01:00.123456+00:00"
    );
    for (owner, id) in [
        (b.user, a.assistants[0]),
        (a.user, b.assistants[0]),
        (a.user, Uuid::now_v7()),
    ] {
        let got = agree!(
            both,
            "another owner's assistant",
            |db| read::assistant_of(db, owner, id),
            one_seen
        );
        assert!(got.is_none(), "{owner} sees assistant {id}");
    }
    let mut expected = a.assistants.clone();
    expected.sort();
    walk(&both, "assistants_of(a)", &expected, |db, p| async move {
        read::assistants_of(&db, a.user, p).await
    })
    .await;
    let theirs = agree!(
        both,
        "assistants_of(b)",
        |db| read::assistants_of(db, b.user, page(20, true)),
        list_seen
    );
    assert_eq!(
        theirs.data.iter().map(|x| x.id).collect::<Vec<_>>(),
        b.assistants
    );

    // Conversations: alone, listed, filtered, scoped.
    for id in &a.conversations {
        let got = agree!(
            both,
            "conversation_of",
            |db| read::conversation_of(db, a.user, *id),
            one_seen
        );
        assert!(got.is_some());
    }
    let busy = agree!(
        both,
        "the busy conversation",
        |db| read::conversation_of(db, a.user, a.busy),
        one_seen
    )
    .unwrap();
    assert_eq!(busy.message_count, 14);
    assert_eq!(busy.usage.total_tokens, 10 + 20 + 5 + 7 + 1 + 5 * 2);
    for (owner, id) in [(b.user, a.busy), (a.user, b.busy), (a.user, Uuid::now_v7())] {
        let got = agree!(
            both,
            "another owner's conversation",
            |db| read::conversation_of(db, owner, id),
            one_seen
        );
        assert!(got.is_none());
    }
    let all = ConversationFilter::default();
    let mut expected = a.conversations.clone();
    expected.sort();
    walk(&both, "conversations_of(a)", &expected, |db, p| {
        let all = all.clone();
        async move { read::conversations_of(&db, a.user, &all, p).await }
    })
    .await;
    let of_ada = ConversationFilter {
        assistant_id: Some(a.assistants[0]),
        status: None,
    };
    let mut expected = vec![a.conversations[0], a.conversations[1], a.conversations[4]];
    expected.sort();
    walk(
        &both,
        "conversations_of(a, assistant Ada)",
        &expected,
        |db, p| {
            let filter = of_ada.clone();
            async move { read::conversations_of(&db, a.user, &filter, p).await }
        },
    )
    .await;
    for (filter, expected) in [
        (
            ConversationFilter {
                assistant_id: None,
                status: Some("archived".into()),
            },
            vec![a.conversations[3]],
        ),
        (
            ConversationFilter {
                assistant_id: Some(a.assistants[0]),
                status: Some("active".into()),
            },
            expected.clone(),
        ),
        // Another owner's assistant, a status nobody has, a NUL byte: nothing.
        (
            ConversationFilter {
                assistant_id: Some(b.assistants[0]),
                status: None,
            },
            vec![],
        ),
        (
            ConversationFilter {
                assistant_id: None,
                status: Some("deleted".into()),
            },
            vec![],
        ),
        (
            ConversationFilter {
                assistant_id: None,
                status: Some("active\0".into()),
            },
            vec![],
        ),
    ] {
        let got = agree!(
            both,
            format!("conversations_of(a, {filter:?})"),
            |db| read::conversations_of(db, a.user, &filter, page(20, false)),
            list_seen
        );
        let ids: Vec<Uuid> = got.data.iter().map(|c| c.id).collect();
        assert_eq!(ids, expected, "{filter:?}");
    }

    // Messages: in the conversation's order (not the ids'), paged by cursor;
    // another owner's conversation is none; a cursor from another
    // conversation names no place in this one.
    walk(
        &both,
        "messages_of(a, busy)",
        &a.busy_messages,
        |db, p| async move {
            Ok(read::messages_of(&db, a.user, a.busy, p)
                .await?
                .expect("a's conversation"))
        },
    )
    .await;
    let messages = |list: &Option<List<read::MessageView>>| match list {
        Some(list) => list_seen(list),
        None => Value::Null,
    };
    let first = agree!(
        both,
        "messages_of(a, busy), all",
        |db| read::messages_of(db, a.user, a.busy, page(100, false)),
        messages
    )
    .unwrap();
    let statuses: Vec<&str> = first.data.iter().map(|m| m.status.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "completed",
            "completed",
            "completed",
            "completed",
            "completed",
            "completed",
            "completed",
            "completed",
            "completed",
            "failed",
            "completed",
            "completed",
            "completed",
            "queued"
        ]
    );
    assert_eq!(
        serde_json::to_value(&first.data[1]).unwrap()["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
    );
    for (owner, conversation) in [(b.user, a.busy), (a.user, b.busy), (a.user, Uuid::now_v7())] {
        let got = agree!(
            both,
            "another owner's messages",
            |db| read::messages_of(db, owner, conversation, page(20, false)),
            messages
        );
        assert!(got.is_none());
    }
    let mut elsewhere = page(20, false);
    elsewhere.after = Some(b.busy_messages[0]);
    let got = agree!(
        both,
        "messages after another conversation's message",
        |db| read::messages_of(db, a.user, a.busy, elsewhere),
        messages
    )
    .unwrap();
    assert!(got.data.is_empty() && !got.has_more);

    // Usage, grouped every way, over ranges that take all, part, or nothing.
    let day = |s: &str| s.parse::<NaiveDate>().unwrap();
    let ymd = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap();
    let usage = |rows: &Vec<read::UsageRow>| serde_json::to_value(rows).unwrap();
    let by = |group_by| {
        let both = &both;
        async move {
            agree!(
                both,
                format!("usage_of(a, {group_by:?})"),
                |db| read::usage_of(db, a.user, day("2026-11-01"), day("2026-11-30"), group_by),
                usage
            )
        }
    };
    assert_eq!(
        usage(&by(GroupBy::Day).await),
        json!([
            {"day": "2026-11-29", "messages": 4, "prompt_tokens": 38, "completion_tokens": 7,
             "total_tokens": 45},
            {"day": "2026-11-30", "messages": 2, "prompt_tokens": 8, "completion_tokens": 4,
             "total_tokens": 12},
        ])
    );
    let mut assistants = vec![a.assistants[0], a.assistants[1]];
    assistants.sort();
    let by_assistant: Vec<Uuid> = by(GroupBy::Assistant)
        .await
        .iter()
        .map(|r| r.assistant_id.unwrap())
        .collect();
    assert_eq!(by_assistant, assistants, "assistants in uuid order");
    let models: Vec<String> = by(GroupBy::Model)
        .await
        .into_iter()
        .map(|r| r.model.unwrap())
        .collect();
    assert_eq!(
        models,
        ["Gemini-Pro", "gemini-2.5-flash", "offline"],
        "models by the bytes of their names"
    );
    let b_usage = agree!(
        both,
        "usage_of(b)",
        |db| read::usage_of(
            db,
            b.user,
            day("2026-11-29"),
            day("2026-11-29"),
            GroupBy::Model
        ),
        usage
    );
    assert_eq!(
        usage(&b_usage),
        json!([{"model": "offline", "messages": 1, "prompt_tokens": 100,
                "completion_tokens": 50, "total_tokens": 150}])
    );
    for (from, to, expected_groups) in [
        (day("2026-11-30"), day("2026-11-30"), 1),
        (day("2026-11-29"), day("2026-11-29"), 1),
        (day("2026-12-01"), day("2026-12-31"), 0),
        // Reversed: nothing.
        (day("2026-11-30"), day("2026-11-29"), 0),
        // Absurd ends: cut to the days both can name, so the same days.
        (NaiveDate::MIN, NaiveDate::MAX, 2),
        (day("0000-01-01"), day("9999-12-31"), 2),
        (NaiveDate::MIN, ymd(-1, 12, 31), 0),
        (ymd(10000, 1, 1), NaiveDate::MAX, 0),
    ] {
        for group_by in [GroupBy::Day, GroupBy::Assistant, GroupBy::Model] {
            let got = agree!(
                both,
                format!("usage_of(a, {from}..={to}, {group_by:?})"),
                |db| read::usage_of(db, a.user, from, to, group_by),
                usage
            );
            if group_by == GroupBy::Day {
                assert_eq!(got.len(), expected_groups, "{from}..={to}");
            }
        }
    }
}

/// Progress on SQLite: a checkpoint move this process signals is seen at once
/// (well before the poll), one made without the signal (as by another
/// process on the same file) by the poll. (SQLite only: it needs no server.)
#[tokio::test]
async fn progress_on_sqlite_follows_the_signal_and_the_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progress.db");
    let pool = ai_secretary::store::sqlite::connect(path.to_str().unwrap(), 2)
        .await
        .unwrap();
    let db = SqliteDb::new(pool.clone());
    let stop = CancellationToken::new();
    let (progress, task) = Progress::start(Db::Sqlite(db.clone()), None, stop.clone());
    let set = async |name: &str, global_position: i64| {
        sqlx::query(
            "INSERT INTO checkpoints (name, transaction_id, global_position, updated_at)
             VALUES ($1, $2, $2, 0)
             ON CONFLICT (name) DO UPDATE SET transaction_id = excluded.transaction_id,
                                              global_position = excluded.global_position",
        )
        .bind(name)
        .bind(global_position)
        .execute(&pool)
        .await
        .unwrap();
    };
    let at = |p: i64| Position {
        transaction_id: p,
        global_position: p,
    };

    // Moved and signalled: seen long before the poll would see it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    set("messages", 7).await;
    let started = Instant::now();
    db.checkpoint_moved();
    assert!(
        progress
            .wait(&["messages"], at(7), Duration::from_secs(5))
            .await
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "woken by the poll, not the signal: {:?}",
        started.elapsed()
    );
    assert!(progress.reached(&["messages"], at(7)));
    assert!(!progress.reached(&["messages"], at(8)));

    // Moved with no signal: found by the poll.
    set("messages", 9).await;
    set("usage_daily", 9).await;
    assert!(
        progress
            .wait(&["messages", "usage_daily"], at(9), Duration::from_secs(5))
            .await,
        "a move made elsewhere is never seen"
    );
    assert!(progress.position("messages") >= progress.position("usage_daily"));
    // Not yet reached: the wait ends on its timeout, false.
    assert!(
        !progress
            .wait(&["messages"], at(10), Duration::from_millis(50))
            .await
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("progress stops on shutdown")
        .unwrap();
}
