//! Part 2's backlog: users, assistants and conversations with posts and
//! replies, appended through `PgEventStore` from the domain's events, then
//! relayed to JetStream by a relay-only instance.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use ai_secretary::{
    domain::{
        assistant::AssistantEvent,
        conversation::ConversationEvent,
        reply::{ReplyEvent, Usage},
        user::UserEvent,
    },
    startup::Roles,
    store::{
        AppendRequest, EventMetadata, EventStore, NewEvent, codec,
        postgres::{self, CoalescingConfig, PgEventStore},
    },
};
use anyhow::{Context, Result};
use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::{
    Settings, message_content,
    service::{Names, Service},
    support::progress::caught_up,
};

/// Posts per conversation in the backlog (each: 2 events, then the reply's 2).
pub const POSTS_PER_CONVERSATION: usize = 16;
const BACKLOG_USERS: usize = 20;
const ASSISTANTS_PER_USER: usize = 3;
pub const BACKLOG_WRITERS: usize = 16;

/// The backlog appended: its size and make-up, and how long it took to append and relay.
pub struct Backlog {
    pub events: usize,
    pub by_type: BTreeMap<String, i64>,
    pub conversations: usize,
    pub build: Duration,
    pub relay: Duration,
    pub data_bytes: f64,
}

/// Append the backlog, then relay it to JetStream with a relay-only instance.
pub async fn build_backlog(settings: &Settings, names: &Names, pool: &PgPool) -> Result<Backlog> {
    // The store gets a pool of its own: closing it closes that pool.
    let store_pool = postgres::connect(&names.db_url, 20)
        .await
        .context("the backlog writers' pool")?;
    let store = PgEventStore::new(store_pool, CoalescingConfig::default());
    let fixed = BACKLOG_USERS * (1 + ASSISTANTS_PER_USER);
    let per_conversation = 1 + 4 * POSTS_PER_CONVERSATION;
    let conversations = settings
        .events
        .saturating_sub(fixed)
        .div_ceil(per_conversation);
    eprintln!(
        "throughput: appending ~{} events ({conversations} conversations)",
        fixed + conversations * per_conversation
    );
    let started = Instant::now();

    let mut assistants = Vec::new();
    for u in 0..BACKLOG_USERS {
        let user = Uuid::now_v7();
        let at = Utc::now();
        append(
            &store,
            user,
            "user",
            0,
            &[UserEvent::UserRegistered {
                user_id: user,
                email: format!("user{u}@example.com"),
                display_name: format!("User {u}"),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$4xQ3b5Uq0kJ0n8h0d0Zr1Zb0ZKfJ0x0y0z0a0b0c0d0".into(),
                registered_at: at,
            }],
            user,
        )
        .await?;
        for a in 0..ASSISTANTS_PER_USER {
            let assistant = Uuid::now_v7();
            let metadata = BTreeMap::from([("team".to_owned(), format!("team-{a}"))]);
            append(
                &store,
                assistant,
                "assistant",
                0,
                &[AssistantEvent::AssistantCreated {
                    assistant_id: assistant,
                    owner_id: user,
                    name: format!("Assistant {a}"),
                    role: "Executive assistant".into(),
                    instructions:
                        "Keep my calendar tidy, draft replies to email, and remind me of deadlines."
                            .into(),
                    model: "gemini-2.0-flash".into(),
                    temperature: 0.7,
                    metadata,
                    created_at: Utc::now(),
                }],
                user,
            )
            .await?;
            assistants.push((user, assistant));
        }
    }

    let mut writers = JoinSet::new();
    for w in 0..BACKLOG_WRITERS {
        let store = store.clone();
        let mine: Vec<(Uuid, Uuid, Uuid)> = (0..conversations)
            .filter(|c| c % BACKLOG_WRITERS == w)
            .map(|c| {
                let (owner, assistant) = assistants[c % assistants.len()];
                (Uuid::now_v7(), owner, assistant)
            })
            .collect();
        writers.spawn(async move { conversation_writer(store, mine).await });
    }
    while let Some(joined) = writers.join_next().await {
        joined.context("a backlog writer panicked")??;
    }
    let build = started.elapsed();
    store.close().await;

    let by_type: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT event_type, count(*), avg(length(data::text))::float8 FROM events GROUP BY event_type",
    )
    .fetch_all(pool)
    .await
    .context("counting the backlog")?;
    let events: i64 = by_type.iter().map(|(_, n, _)| n).sum();
    let data_bytes =
        by_type.iter().map(|(_, n, b)| *n as f64 * b).sum::<f64>() / events.max(1) as f64;

    eprintln!("throughput: relaying {events} events to JetStream");
    let started = Instant::now();
    let relay = Service::start(&settings.servers(), names, Roles::only_relay()).await?;
    let waited = caught_up(pool, &["relay"], Duration::from_secs(600)).await;
    let relay_time = started.elapsed();
    relay.stop().await.context("stopping the relay")?;
    waited?;
    Ok(Backlog {
        events: events as usize,
        by_type: by_type.into_iter().map(|(t, n, _)| (t, n)).collect(),
        conversations,
        build,
        relay: relay_time,
        data_bytes,
    })
}

async fn append<E: Serialize>(
    store: &PgEventStore,
    stream_id: Uuid,
    stream_type: &'static str,
    expected_version: i64,
    events: &[E],
    user: Uuid,
) -> Result<i64> {
    let metadata = EventMetadata {
        correlation_id: Uuid::new_v4().to_string(),
        causation_id: None,
        user_id: Some(user),
        idempotency_key: None,
    };
    let events: Vec<NewEvent> = events
        .iter()
        .map(|e| codec::encode(e, &metadata))
        .collect::<Result<_, _>>()?;
    let appended = store
        .append(AppendRequest {
            stream_id,
            stream_type,
            expected_version,
            events,
            reservation: None,
            idempotency: None,
            user_key: None,
        })
        .await
        .with_context(|| format!("appending to {stream_type} {stream_id}"))?;
    Ok(appended.version)
}

/// A writer's conversations, interleaved: all started, then one post (and its
/// reply) in each per round, as concurrent users would produce them.
async fn conversation_writer(store: PgEventStore, mine: Vec<(Uuid, Uuid, Uuid)>) -> Result<()> {
    let mut versions = vec![0_i64; mine.len()];
    for (i, &(id, owner, assistant)) in mine.iter().enumerate() {
        versions[i] = append(
            &store,
            id,
            "conversation",
            0,
            &[ConversationEvent::ConversationStarted {
                conversation_id: id,
                owner_id: owner,
                assistant_id: assistant,
                title: format!("Planning week {}", i % 52 + 1),
                started_at: Utc::now(),
            }],
            owner,
        )
        .await?;
    }
    for post in 0..POSTS_PER_CONVERSATION {
        for (i, &(id, owner, assistant)) in mine.iter().enumerate() {
            let (message_id, reply_id, at) = (Uuid::now_v7(), Uuid::now_v7(), Utc::now());
            versions[i] = append(
                &store,
                id,
                "conversation",
                versions[i],
                &[
                    ConversationEvent::MessagePosted {
                        message_id,
                        content: message_content(post + i),
                        posted_at: at,
                    },
                    ConversationEvent::ReplyRequested {
                        reply_id,
                        reply_to: message_id,
                        assistant_id: assistant,
                        requested_at: at,
                    },
                ],
                owner,
            )
            .await?;
            // The reply's own stream, as the replier writes it: taken up, completed.
            let completion = 120 + (post * 7 + i) as u64 % 200;
            append(
                &store,
                reply_id,
                "reply",
                0,
                &[
                    ReplyEvent::ReplyStarted {
                        reply_id,
                        conversation_id: id,
                        attempt: 1,
                        started_at: at,
                    },
                    ReplyEvent::ReplyCompleted {
                        reply_id,
                        conversation_id: id,
                        content: reply_content(post + i),
                        model: "gemini-2.0-flash".into(),
                        finish_reason: "stop".into(),
                        usage: Usage {
                            prompt_tokens: 350,
                            completion_tokens: completion,
                            total_tokens: 350 + completion,
                            ..Usage::default()
                        },
                        latency_ms: 850,
                        completed_at: Utc::now(),
                    },
                ],
                owner,
            )
            .await?;
        }
    }
    Ok(())
}

fn reply_content(n: usize) -> String {
    format!(
        "Done. I moved the design review to Thursday at 15:00 and sent the updated agenda to \
         all six attendees; two have already accepted. Tomorrow morning you have the standup at \
         9:30 and a free slot from 10:00 to 11:00, which I held for the call with the bank. I \
         also drafted the reply to Anna thanking her for the proposal and promising a decision \
         by Friday; it is in your drafts for review. (#{n})"
    )
}
