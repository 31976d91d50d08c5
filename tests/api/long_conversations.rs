//! Long and busy conversations: the user and the replier writing one
//! conversation at once, replies in streams of their own, a state cache that
//! stays right with several processes, bounded prompt history, and events
//! stored before replies had streams still read as they were.

use std::{sync::Arc, time::Duration};

use ai_secretary::{
    app::{
        CommandContext, Commands, Expected, StateCache,
        replies::{ReplyRequest, TakenUp},
    },
    domain::{
        conversation::{ConversationCommand, ConversationDecider, ConversationEvent, Usage},
        reply::{ReplyCommand, ReplyDecider, ReplyError, ReplyEvent},
    },
    store::{
        AppendError, AppendRequest, Appended, Behind, EventMetadata, EventStore, IdempotencyRecord,
        PgEventStore, Position, RecordedEvent, SqliteEventStore, StoreError, StoredPayload,
        StoredResponse, codec, postgres::CoalescingConfig,
    },
};
use chrono::Utc;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{EventLog, TestApp, Topology, eventually_every};

/// The event store on the test's database, whichever it is (a second writer
/// beside the service's, as another process would be).
fn event_store(db: &ai_secretary_projections::Db) -> Arc<dyn EventStore> {
    match db {
        ai_secretary_projections::Db::Postgres(pool) => {
            Arc::new(PgEventStore::new(pool.clone(), CoalescingConfig::default()))
        }
        ai_secretary_projections::Db::Sqlite(lite) => Arc::new(SqliteEventStore::new(
            lite.pool.clone(),
            CoalescingConfig::default(),
        )),
    }
}

/// A process of the service on `store`, with a state cache of its own.
fn process(store: Arc<dyn EventStore>, db: &ai_secretary_projections::Db) -> Commands {
    Commands::new(
        store,
        StateCache::new(1 << 20),
        crate::helpers::keyring(db).as_ref().clone(),
    )
}

/// Start conversation `id` of `owner`'s, with an assistant that is not in
/// the store, as another process would: straight in the store.
async fn start_in_store(store: &dyn EventStore, id: Uuid, owner: Uuid, title: &str) {
    let start = ConversationEvent::ConversationStarted {
        conversation_id: id,
        owner_id: owner,
        assistant_id: Uuid::now_v7(),
        title: title.into(),
        started_at: Utc::now(),
    };
    append(store, id, "conversation", 0, &[start]).await;
}

/// Every reply's endings and starts in the store: (endings, distinct replies
/// ended, replies started more than once or not on attempt 1).
async fn reply_counts<D: EventLog>(app: &TestApp<D>) -> (i64, i64, i64) {
    crate::on_db!(app.read_side().await, |pool| sqlx::query_as(
        "SELECT
             (SELECT count(*) FROM events WHERE event_type IN ('ReplyCompleted', 'ReplyFailed')),
             (SELECT count(DISTINCT data ->> 'reply_id') FROM events
              WHERE event_type IN ('ReplyCompleted', 'ReplyFailed')),
             (SELECT count(*) FROM (
                  SELECT data ->> 'reply_id' FROM events WHERE event_type = 'ReplyStarted'
                  GROUP BY 1
                  HAVING count(*) > 1 OR min(CAST(data ->> 'attempt' AS INTEGER)) <> 1) again)",
    )
    .fetch_one(pool)
    .await
    .unwrap())
}

crate::on_both!(the_user_and_the_replier_write_one_conversation_at_once);
async fn the_user_and_the_replier_write_one_conversation_at_once<D: EventLog>(app: TestApp<D>) {
    const MESSAGES: usize = 200;
    let token = app.signed_up("busy@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let conversation = app.conversation(&token, &assistant["id"]).await;
    let path = format!(
        "/conversations/{}/messages",
        conversation["id"].as_str().unwrap()
    );

    // The user posts one message after another, as a person does, while the
    // replier (eight replies at once) answers the earlier ones.
    let mut statuses = Vec::new();
    for n in 0..MESSAGES {
        let posted = app
            .post(
                &path,
                &token,
                json!({ "content": format!("Task {n}: call the bank") }),
            )
            .await;
        statuses.push(posted.status());
    }
    assert!(
        statuses.iter().all(|s| *s == StatusCode::ACCEPTED),
        "{statuses:?}"
    );
    let counts = eventually_every(Duration::from_millis(200), "every reply ends", async || {
        let counts = reply_counts(&app).await;
        (counts.1 == MESSAGES as i64)
            .then_some(counts)
            .ok_or(format!("{counts:?}"))
    })
    .await;
    // Each reply ended once, and was taken up once: no retries ran out (that
    // would have put the request back, and started it again).
    assert_eq!(counts, (MESSAGES as i64, MESSAGES as i64, 0));
    // The replier wrote only to the replies' own streams.
    let by_stream: Vec<(String, i64)> = crate::on_db!(app.read_side().await, |pool| {
        sqlx::query_as(
        "SELECT stream_type, count(*) FROM events WHERE stream_type IN ('conversation', 'reply')
         GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    });
    assert_eq!(
        by_stream,
        [
            ("conversation".to_owned(), 1 + 2 * MESSAGES as i64),
            ("reply".to_owned(), 2 * MESSAGES as i64)
        ]
    );
}

fn metadata() -> EventMetadata {
    EventMetadata {
        correlation_id: "test".into(),
        ..Default::default()
    }
}

/// Append `events` to a stream at `after` (its current version), as a writer
/// before this version of the service would have.
async fn append<E: Serialize>(
    store: &dyn EventStore,
    stream_id: Uuid,
    stream_type: &'static str,
    after: i64,
    events: &[E],
) {
    store
        .append(AppendRequest {
            stream_id,
            stream_type,
            expected_version: after,
            events: events
                .iter()
                .map(|e| codec::encode(e, &metadata()))
                .collect::<Result<_, _>>()
                .unwrap(),
            reservation: None,
            idempotency: None,
            user_key: None,
        })
        .await
        .unwrap();
}

fn legacy_completion(reply_id: Uuid, content: &str) -> ConversationEvent {
    ConversationEvent::ReplyCompleted {
        reply_id,
        content: content.into(),
        model: "m".into(),
        finish_reason: "STOP".into(),
        usage: Usage {
            prompt_tokens: 4,
            completion_tokens: 6,
            total_tokens: 10,
            ..Usage::default()
        },
        latency_ms: 5,
        completed_at: Utc::now(),
    }
}

crate::on_both!(reply_events_stored_in_the_conversation_are_still_read);
async fn reply_events_stored_in_the_conversation_are_still_read<D: EventLog>(app: TestApp<D>) {
    let token = app.signed_up("legacy@example.com").await;
    let assistant = app.assistant(&token, "Mika").await;
    let me: Value = app
        .send(Method::GET, "/api/v1/users/me", Some(&token), None)
        .await
        .json()
        .await
        .unwrap();
    let owner: Uuid = me["id"].as_str().unwrap().parse().unwrap();
    let assistant_id: Uuid = assistant["id"].as_str().unwrap().parse().unwrap();

    // A conversation as the service wrote it before replies had streams: one
    // reply answered in the conversation, one taken up there and never ended.
    let db = app.read_side().await;
    let store = event_store(&db);
    let store = &*store;
    let id = Uuid::now_v7();
    let (m1, r1, m2, r2) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let post = |message_id, reply_id, content: &str| {
        [
            ConversationEvent::MessagePosted {
                message_id,
                content: content.into(),
                posted_at: Utc::now(),
            },
            ConversationEvent::ReplyRequested {
                reply_id,
                reply_to: message_id,
                assistant_id,
                requested_at: Utc::now(),
            },
        ]
    };
    let started = ConversationEvent::ConversationStarted {
        conversation_id: id,
        owner_id: owner,
        assistant_id,
        title: "Before".into(),
        started_at: Utc::now(),
    };
    let first_answer = [
        ConversationEvent::ReplyStarted {
            reply_id: r1,
            attempt: 1,
            started_at: Utc::now(),
        },
        legacy_completion(r1, "An old answer"),
    ];
    let second_started = [ConversationEvent::ReplyStarted {
        reply_id: r2,
        attempt: 1,
        started_at: Utc::now(),
    }];
    // In one commit, as it would be there before this version starts: in
    // separate ones, the replier could take `r1` up between its request and
    // its legacy answer, and answer it a second time.
    let legacy: Vec<ConversationEvent> = [started]
        .into_iter()
        .chain(post(m1, r1, "First"))
        .chain(first_answer)
        .chain(post(m2, r2, "Second"))
        .chain(second_started)
        .collect();
    append(store, id, "conversation", 0, &legacy).await;

    // The replier answers the open one (in its own stream) and leaves the
    // answered one alone; the read side shows both, and the conversation's
    // version is still its own.
    let messages = eventually_every(
        Duration::from_millis(100),
        "both replies listed as ended",
        async || {
            let list: Value = app
                .send(
                    Method::GET,
                    &format!("/api/v1/conversations/{id}/messages"),
                    Some(&token),
                    None,
                )
                .await
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let statuses: Vec<&str> = list["data"]
                .as_array()
                .map(|d| d.iter().filter_map(|m| m["status"].as_str()).collect())
                .unwrap_or_default();
            (statuses == ["completed", "completed", "completed", "completed"])
                .then(|| list.clone())
                .ok_or(list.to_string())
        },
    )
    .await;
    assert_eq!(messages["data"][1]["content"], "An old answer");
    assert!(
        messages["data"][3]["content"]
            .as_str()
            .unwrap()
            .contains("Second")
    );
    let endings: Vec<(String, String)> = crate::on_db!(db, |pool| sqlx::query_as(
        "SELECT stream_type, data ->> 'reply_id' FROM events
         WHERE event_type IN ('ReplyCompleted', 'ReplyFailed') ORDER BY global_position",
    )
    .fetch_all(pool)
    .await
    .unwrap());
    assert_eq!(
        endings,
        [
            ("conversation".to_owned(), r1.to_string()),
            ("reply".to_owned(), r2.to_string())
        ]
    );
    let conversation: Value = eventually_every(
        Duration::from_millis(100),
        "the conversation counts both answers",
        async || {
            let c: Value = app
                .send(
                    Method::GET,
                    &format!("/api/v1/conversations/{id}"),
                    Some(&token),
                    None,
                )
                .await
                .json()
                .await
                .map_err(|e| e.to_string())?;
            (c["usage"]["total_tokens"].as_i64() > Some(10))
                .then(|| c.clone())
                .ok_or(c.to_string())
        },
    )
    .await;
    assert_eq!(conversation["version"], 8);
    assert_eq!(conversation["message_count"], 4);

    // A new message is decided on the folded legacy stream.
    let posted = app
        .post(
            &format!("/conversations/{id}/messages"),
            &token,
            json!({ "content": "Third" }),
        )
        .await;
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    let (report, clean) = eventually_every(
        Duration::from_millis(200),
        "the read side is verified clean",
        async || {
            let (report, clean) =
                ai_secretary::recovery::verify_report(&db, &crate::helpers::master_key(), &[])
                    .await
                    .map_err(|e| e.to_string())?;
            let (_, ended, _) = reply_counts(&app).await;
            (clean && ended == 3)
                .then_some((report.clone(), clean))
                .ok_or(report)
        },
    )
    .await;
    assert!(clean, "{report}");
}

crate::on_both!(state_caches_in_two_processes_stay_right, spawns);
/// Two processes on one store, each with its own state cache: each sees the
/// other's writes, on its next load or as a conflict whose retry reads the tail.
async fn state_caches_in_two_processes_stay_right<D: Topology>() {
    let data = D::fresh().await;
    let db = data.read_side().await;
    let store = event_store(&db);
    let one = process(store.clone(), &db);
    let two = process(store.clone(), &db);
    let (owner, context) = crate::helpers::registered(&one).await;
    let id = Uuid::now_v7();
    start_in_store(&*store, id, owner, "Shared").await;
    let post = |n: u32| ConversationCommand::PostMessage {
        actor: owner,
        message_id: Uuid::now_v7(),
        reply_id: Uuid::now_v7(),
        content: format!("message {n}"),
        at: Utc::now(),
    };
    // Both cache version 1; then each writes in turn on a state the other moved.
    assert_eq!(
        one.load::<ConversationDecider>(id).await.unwrap().version,
        1
    );
    assert_eq!(
        two.load::<ConversationDecider>(id).await.unwrap().version,
        1
    );
    for n in 0..3 {
        let writer = if n % 2 == 0 { &one } else { &two };
        let done = writer
            .execute::<ConversationDecider>(id, Expected::Any, &post(n), &context, None, None)
            .await
            .unwrap();
        assert_eq!(done.version, 3 + 2 * i64::from(n));
    }
    for commands in [&one, &two] {
        let loaded = commands.load::<ConversationDecider>(id).await.unwrap();
        assert_eq!(loaded.version, 7);
        let ai_secretary::domain::conversation::ConversationState::Live(c) = loaded.state else {
            panic!("the conversation is live")
        };
        assert_eq!(c.message_count, 6);
    }
    // A decision to change nothing is not taken on a cache that may be behind:
    // `one` still has the first title, which `two` has since changed.
    let rename = |title: &str| ConversationCommand::Rename {
        actor: owner,
        title: title.into(),
        at: Utc::now(),
    };
    two.execute::<ConversationDecider>(id, Expected::Any, &rename("Renamed"), &context, None, None)
        .await
        .unwrap();
    let back = one
        .execute::<ConversationDecider>(id, Expected::Any, &rename("Shared"), &context, None, None)
        .await
        .unwrap();
    assert_eq!(back.version, 9, "renamed back, not left as it was");
    let ai_secretary::domain::conversation::ConversationState::Live(c) =
        two.load::<ConversationDecider>(id).await.unwrap().state
    else {
        panic!("the conversation is live")
    };
    assert_eq!(c.title, "Shared");
    // Nor is a refusal: `one` found this stream empty, and another writer has
    // started it since.
    let later = Uuid::now_v7();
    assert_eq!(
        one.load::<ConversationDecider>(later)
            .await
            .unwrap()
            .version,
        0
    );
    start_in_store(&*store, later, owner, "Later").await;
    let posted = one
        .execute::<ConversationDecider>(later, Expected::Any, &post(9), &context, None, None)
        .await
        .unwrap();
    assert_eq!(posted.version, 3);
    // If-Match on a version only the other process has seen is judged on the store.
    let archive = ConversationCommand::Archive {
        actor: owner,
        at: Utc::now(),
    };
    let stale = one
        .execute::<ConversationDecider>(id, Expected::Exactly(7), &archive, &context, None, None)
        .await;
    assert!(
        matches!(
            stale,
            Err(ai_secretary::app::AppError::PreconditionFailed { current: 9 })
        ),
        "{stale:?}"
    );
}

crate::on_both!(
    ten_writers_whose_caches_are_all_behind_all_get_through,
    spawns
);
/// Ten writers at once on one conversation, in two processes whose caches
/// another writer has left behind: every first decision, made on the cache,
/// conflicts, and still none of them is refused as contended (a conflict on
/// the cache is not one of the ten races a command may lose).
async fn ten_writers_whose_caches_are_all_behind_all_get_through<D: Topology>() {
    let data = D::fresh().await;
    let db = data.read_side().await;
    let store = event_store(&db);
    let processes = [process(store.clone(), &db), process(store.clone(), &db)];
    let (owner, context) = crate::helpers::registered(&processes[0]).await;
    let id = Uuid::now_v7();
    start_in_store(&*store, id, owner, "Busy").await;
    let post = move |n: usize| ConversationCommand::PostMessage {
        actor: owner,
        message_id: Uuid::now_v7(),
        reply_id: Uuid::now_v7(),
        content: format!("message {n}"),
        at: Utc::now(),
    };
    for commands in &processes {
        commands.load::<ConversationDecider>(id).await.unwrap();
    }
    // A third process moves the stream on: both caches are now behind.
    process(store.clone(), &db)
        .execute::<ConversationDecider>(id, Expected::Any, &post(0), &context, None, None)
        .await
        .unwrap();
    let writers = (1..=10).map(|n| {
        let commands = processes[n % 2].clone();
        let context = context.clone();
        tokio::spawn(async move {
            commands
                .execute::<ConversationDecider>(id, Expected::Any, &post(n), &context, None, None)
                .await
                .map(|done| done.version)
        })
    });
    let mut versions = Vec::new();
    for writer in futures::future::join_all(writers).await {
        versions.push(writer.unwrap().expect("every writer gets through"));
    }
    versions.sort_unstable();
    assert_eq!(versions, (5..=23).step_by(2).collect::<Vec<i64>>());
}

crate::on_both!(reply_history_is_the_tail_that_fits_the_budget, spawns);
/// The prompt's history is read backwards from the request and stops once the
/// budget is spent; an answer sits where it was requested, and one recorded
/// after the request is not part of it.
async fn reply_history_is_the_tail_that_fits_the_budget<D: Topology>() {
    let data = D::fresh().await;
    let db = data.read_side().await;
    let store = event_store(&db);
    let commands = process(store.clone(), &db);
    let (id, assistant) = (Uuid::now_v7(), Uuid::now_v7());
    let (owner, context) = crate::helpers::registered(&commands).await;
    let start = ConversationEvent::ConversationStarted {
        conversation_id: id,
        owner_id: owner,
        assistant_id: assistant,
        title: "Long".into(),
        started_at: Utc::now(),
    };
    append(&*store, id, "conversation", 0, &[start]).await;
    let mut requests = Vec::new();
    for n in 0..300u32 {
        let (message_id, reply_id) = (Uuid::now_v7(), Uuid::now_v7());
        let events = [
            ConversationEvent::MessagePosted {
                message_id,
                content: format!("question {n:03}"), // 12 characters
                posted_at: Utc::now(),
            },
            ConversationEvent::ReplyRequested {
                reply_id,
                reply_to: message_id,
                assistant_id: assistant,
                requested_at: Utc::now(),
            },
        ];
        let version = 1 + 2 * i64::from(n);
        append(&*store, id, "conversation", version, &events).await;
        let request = ReplyRequest {
            conversation_id: id,
            version: version + 2,
            reply_id,
            reply_to: message_id,
        };
        requests.push(request);
        // Each is answered before the next message, but for the last two: 298
        // is answered only after 299 was requested, 299 not at all.
        if n < 298 {
            answer(&commands, &context, &request, n).await;
        }
    }
    answer(&commands, &context, &requests[298], 298).await;
    let last = requests[299];
    // A second ending is refused by its decider, by variant.
    let again = ReplyCommand::Fail {
        reply_id: requests[0].reply_id,
        error: "late".into(),
        retryable: false,
        attempts: 1,
        at: Utc::now(),
    };
    assert!(
        !commands
            .end_reply(requests[0].reply_id, &again, &context)
            .await
            .unwrap()
    );
    assert!(matches!(
        commands
            .execute::<ReplyDecider>(
                requests[0].reply_id,
                Expected::Any,
                &again,
                &context,
                None,
                None
            )
            .await,
        Err(ai_secretary::app::AppError::Domain(
            ReplyError::AlreadyEnded
        ))
    ));

    let history = commands.reply_history(&last, 100).await.unwrap();
    let texts: Vec<&str> = history
        .iter()
        .map(|e| match e {
            ConversationEvent::MessagePosted { content, .. }
            | ConversationEvent::ReplyCompleted { content, .. } => content.as_str(),
            other => panic!("not a turn: {other:?}"),
        })
        .collect();
    // Read newest first until past 100 characters: "question 299" (12),
    // "question 298" (12; its answer came too late), then answer/question
    // pairs of 22, the last of which passes the budget (the prompt drops it).
    assert_eq!(
        texts,
        [
            "question 294",
            "answer 294",
            "question 295",
            "answer 295",
            "question 296",
            "answer 296",
            "question 297",
            "answer 297",
            "question 298",
            "question 299"
        ]
    );
    // A reply that ended is not taken up again; one the store never had is skipped.
    assert_eq!(
        commands
            .take_up_reply(&requests[0], 2, Utc::now(), &context)
            .await
            .unwrap(),
        TakenUp::AlreadyEnded
    );
    let unknown = ReplyRequest {
        reply_id: Uuid::now_v7(),
        ..requests[5]
    };
    assert_eq!(
        commands
            .take_up_reply(&unknown, 1, Utc::now(), &context)
            .await
            .unwrap(),
        TakenUp::NotInStore
    );
    // Reply events name their conversation.
    let opened = ai_secretary::store::sealed::SealedStore::new(
        store.clone(),
        crate::helpers::keyring(&db).as_ref().clone(),
    );
    let stored = opened.read_stream(requests[0].reply_id).await.unwrap();
    assert!(matches!(
        codec::decode::<ReplyEvent>(&stored[1]).unwrap(),
        ReplyEvent::ReplyCompleted { conversation_id, .. } if conversation_id == id
    ));
}

/// Take `request` up and complete it with "answer NNN" (10 characters).
async fn answer(commands: &Commands, context: &CommandContext, request: &ReplyRequest, n: u32) {
    let complete = ReplyCommand::Complete {
        reply_id: request.reply_id,
        content: format!("answer {n:03}"),
        model: "m".into(),
        finish_reason: "STOP".into(),
        usage: Default::default(),
        latency_ms: 1,
        at: Utc::now(),
    };
    take_up_and_end(commands, context, request, &complete).await;
}

/// Take `request` up and fail it.
async fn fail(commands: &Commands, context: &CommandContext, request: &ReplyRequest) {
    let fail = ReplyCommand::Fail {
        reply_id: request.reply_id,
        error: "the model is away".into(),
        retryable: false,
        attempts: 1,
        at: Utc::now(),
    };
    take_up_and_end(commands, context, request, &fail).await;
}

/// Take `request` up, then end it with `ending`, as the replier does.
async fn take_up_and_end(
    commands: &Commands,
    context: &CommandContext,
    request: &ReplyRequest,
    ending: &ReplyCommand,
) {
    assert_eq!(
        commands
            .take_up_reply(request, 1, Utc::now(), context)
            .await
            .unwrap(),
        TakenUp::Started
    );
    assert!(
        commands
            .end_reply(request.reply_id, ending, context)
            .await
            .unwrap()
    );
}

crate::on_both!(a_kept_history_reads_as_the_store_does, spawns);
/// The replier keeps what each prompt read of its conversation for the next
/// one. Every history it gives must equal what a process with nothing kept
/// reads from the store: with answers recorded late, failures, replies never
/// answered, an older request delivered again, and, once the owner is
/// forgotten, the store's `[forgotten]` rather than what was kept.
async fn a_kept_history_reads_as_the_store_does<D: Topology>() {
    let data = D::fresh().await;
    let db = data.read_side().await;
    let store = event_store(&db);
    let warm = process(store.clone(), &db);
    let (owner, context) = crate::helpers::registered(&warm).await;
    let id = Uuid::now_v7();
    start_in_store(&*store, id, owner, "Kept").await;
    // What a process that kept nothing reads (a new one each time).
    let cold = |request: ReplyRequest| {
        let commands = process(store.clone(), &db);
        async move { commands.reply_history(&request, 120).await.unwrap() }
    };
    let mut requests: Vec<ReplyRequest> = Vec::new();
    let mut late: Vec<(ReplyRequest, u32)> = Vec::new();
    for n in 0..60u32 {
        let (message_id, reply_id) = (Uuid::now_v7(), Uuid::now_v7());
        let post = ConversationCommand::PostMessage {
            actor: owner,
            message_id,
            reply_id,
            // 10 to 19 characters: the 120-character budget moves its start
            // by a varying number of events from one request to the next.
            content: format!("q{n:02}{}", "-".repeat((n as usize * 7) % 10 + 7)),
            at: Utc::now(),
        };
        let done = warm
            .execute::<ConversationDecider>(id, Expected::Any, &post, &context, None, None)
            .await
            .unwrap();
        let request = ReplyRequest {
            conversation_id: id,
            version: done.version,
            reply_id,
            reply_to: message_id,
        };
        // Answers come late (after the next request, or two), fail, or
        // never come; most come at once. Each history is taken right after
        // its request, before the answers due then, as the replier would.
        if n < 59 {
            let history = warm.reply_history(&request, 120).await.unwrap();
            assert_eq!(history, cold(request).await, "request {n}");
        }
        for (earlier, m) in std::mem::take(&mut late) {
            answer(&warm, &context, &earlier, m).await;
        }
        match n % 7 {
            0 => late.push((request, n)),
            3 => fail(&warm, &context, &request).await,
            5 => {} // never answered
            _ => answer(&warm, &context, &request, n).await,
        }
        requests.push(request);
    }
    // Older requests delivered again read as they did.
    for request in [requests[20], requests[57], requests[58]] {
        assert_eq!(
            warm.reply_history(&request, 120).await.unwrap(),
            cold(request).await
        );
    }
    let kept = warm.reply_history(&requests[58], 120).await.unwrap();
    assert!(
        kept.iter().any(|e| matches!(
            e,
            ConversationEvent::MessagePosted { content, .. } if content.starts_with("q58")
        )),
        "{kept:?}"
    );

    // Forgotten while the last request waited: what was kept up to the one
    // before it is not read any more, only what the store says now.
    warm.forget(owner, Utc::now(), &context).await.unwrap();
    let after = warm.reply_history(&requests[59], 120).await.unwrap();
    assert_eq!(after, cold(requests[59]).await);
    assert!(
        after.iter().all(|e| matches!(
            e,
            ConversationEvent::MessagePosted { content, .. }
            | ConversationEvent::ReplyCompleted { content, .. }
                if content == ai_secretary::store::sealed::FORGOTTEN
        )),
        "{after:?}"
    );
}

crate::on_both!(
    a_command_on_a_stream_this_process_knows_reads_nothing_first,
    spawns
);
/// A command on a stream in this process's state cache is decided on it and
/// appended at once: the store's answer to the append is the only check. The
/// replier's take-up reads the reply stream and the request, and nothing after.
async fn a_command_on_a_stream_this_process_knows_reads_nothing_first<D: Topology>() {
    let data = D::fresh().await;
    let db = data.read_side().await;
    let store = Arc::new(ReadCounting::new(event_store(&db)));
    let commands = process(store.clone(), &db);
    let (owner, context) = crate::helpers::registered(&commands).await;
    let id = Uuid::now_v7();
    start_in_store(&*store, id, owner, "Known").await;
    commands.load::<ConversationDecider>(id).await.unwrap();
    let reads = store.reads();
    let mut requests = Vec::new();
    for n in 0..3 {
        let (message_id, reply_id) = (Uuid::now_v7(), Uuid::now_v7());
        let post = ConversationCommand::PostMessage {
            actor: owner,
            message_id,
            reply_id,
            content: format!("message {n}"),
            at: Utc::now(),
        };
        let done = commands
            .execute::<ConversationDecider>(id, Expected::Any, &post, &context, None, None)
            .await
            .unwrap();
        requests.push(ReplyRequest {
            conversation_id: id,
            version: done.version,
            reply_id,
            reply_to: message_id,
        });
    }
    assert_eq!(store.reads() - reads, 0, "messages posted without a read");
    for (n, request) in (0..).zip(&requests) {
        let reads = store.reads();
        answer(&commands, &context, request, n).await;
        assert_eq!(
            store.reads() - reads,
            2,
            "a take-up reads the reply stream and its request; its start and end read nothing"
        );
    }
    assert_eq!(reply_ends(&*store, &requests).await, 3);
}

crate::on_both!(
    a_start_asks_for_its_assistant_once_a_recheck_and_again_before_refusing,
    spawns
);
/// Starting a conversation reads its assistant from the store at most once per
/// `ASSISTANT_RECHECK` in a process that has it; another process's archive is
/// seen within that bound, and a refusal is never made on the cached state
/// alone (an assistant made elsewhere a moment ago is found).
async fn a_start_asks_for_its_assistant_once_a_recheck_and_again_before_refusing<D: Topology>() {
    use ai_secretary::{
        app::conversations::ASSISTANT_RECHECK,
        domain::{
            assistant::{AssistantCommand, AssistantDecider, AssistantFields},
            conversation::ConversationError,
        },
    };
    let data = D::fresh().await;
    let db = data.read_side().await;
    let store = event_store(&db);
    let counted = Arc::new(ReadCounting::new(store.clone()));
    let one = process(counted.clone(), &db);
    let two = process(store.clone(), &db);
    let (owner, context) = crate::helpers::registered(&two).await;
    // What the other process does to an assistant.
    let change = |assistant_id: Uuid, command: AssistantCommand| {
        let (two, context) = (&two, &context);
        async move {
            two.execute::<AssistantDecider>(
                assistant_id,
                Expected::Any,
                &command,
                context,
                None,
                None,
            )
            .await
            .unwrap();
        }
    };
    let create = |assistant_id| AssistantCommand::Create {
        assistant_id,
        owner_id: owner,
        fields: AssistantFields {
            name: Some("Aide".into()),
            ..Default::default()
        },
        at: Utc::now(),
    };
    let start = |assistant_id| {
        let (one, context) = (&one, &context);
        async move {
            one.start_conversation(
                Uuid::now_v7(),
                owner,
                assistant_id,
                None,
                Utc::now(),
                context,
                None,
            )
            .await
        }
    };

    // Made by the other process: the first start asks the store, the next
    // ones, within the bound, do not.
    let aide = Uuid::now_v7();
    change(aide, create(aide)).await;
    let reads = counted.reads();
    start(aide).await.unwrap();
    assert_eq!(
        counted.reads() - reads,
        1,
        "the first start reads its assistant"
    );
    let reads = counted.reads();
    for _ in 0..3 {
        start(aide).await.unwrap();
    }
    assert_eq!(counted.reads() - reads, 0, "the next starts read nothing");

    // Archived by the other process: seen once the bound has passed.
    let archive = AssistantCommand::Archive {
        actor: owner,
        at: Utc::now(),
    };
    change(aide, archive).await;
    tokio::time::sleep(ASSISTANT_RECHECK + Duration::from_millis(50)).await;
    let refused = start(aide).await;
    assert!(
        matches!(
            refused,
            Err(ai_secretary::app::AppError::Domain(
                ConversationError::AssistantArchived
            ))
        ),
        "{refused:?}"
    );

    // Found absent a moment ago, made by the other process since: the
    // refusal on the cached state is asked again of the store.
    let later = Uuid::now_v7();
    one.load::<AssistantDecider>(later).await.unwrap();
    change(later, create(later)).await;
    let reads = counted.reads();
    start(later).await.unwrap();
    assert_eq!(counted.reads() - reads, 1, "asked again before refusing");
}

/// How many of `requests` have ended in their own streams, as the store has
/// them (the event types: the store's payloads are sealed).
async fn reply_ends(store: &dyn EventStore, requests: &[ReplyRequest]) -> usize {
    let mut ended = 0;
    for request in requests {
        let stored = store.read_stream(request.reply_id).await.unwrap();
        ended += stored
            .iter()
            .filter(|r| r.event_type == "ReplyCompleted" || r.event_type == "ReplyFailed")
            .count();
    }
    ended
}

/// The real event store, counting the reads of streams made through it.
struct ReadCounting {
    inner: Arc<dyn EventStore>,
    reads: std::sync::atomic::AtomicUsize,
}

impl ReadCounting {
    fn new(inner: Arc<dyn EventStore>) -> Self {
        ReadCounting {
            inner,
            reads: Default::default(),
        }
    }

    fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn read(&self) {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl EventStore for ReadCounting {
    async fn append(&self, request: AppendRequest) -> Result<Appended, AppendError> {
        self.inner.append(request).await
    }

    async fn read_stream_from(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read();
        self.inner.read_stream_from(stream_id, after_version).await
    }

    async fn read_payloads_from(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<StoredPayload>, StoreError> {
        self.read();
        self.inner
            .read_payloads_from(stream_id, after_version)
            .await
    }

    async fn read_stream_backwards(
        &self,
        stream_id: Uuid,
        before_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read();
        self.inner
            .read_stream_backwards(stream_id, before_version, limit)
            .await
    }

    async fn read_streams(&self, stream_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read();
        self.inner.read_streams(stream_ids).await
    }

    async fn read_conversation_feed(
        &self,
        conversation_id: Uuid,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read();
        self.inner
            .read_conversation_feed(conversation_id, after, limit)
            .await
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        self.inner.head().await
    }

    async fn behind(&self, after: Position, limit: i64) -> Result<Behind, StoreError> {
        self.inner.behind(after, limit).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read();
        self.inner.read_all(after, limit).await
    }

    async fn find_user_key(&self, user: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.find_user_key(user).await
    }

    async fn find_reservation(
        &self,
        scope: &'static str,
        value: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.inner.find_reservation(scope, value).await
    }

    async fn find_idempotency(
        &self,
        owner_id: Uuid,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredResponse)>, StoreError> {
        self.inner.find_idempotency(owner_id, key).await
    }

    async fn remember_idempotency(&self, record: IdempotencyRecord) -> Result<bool, StoreError> {
        self.inner.remember_idempotency(record).await
    }

    async fn expire_idempotency_keys(&self) -> Result<u64, StoreError> {
        self.inner.expire_idempotency_keys().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
