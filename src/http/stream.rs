//! `GET /conversations/{id}/stream`: Server-Sent Events of a conversation's new
//! messages and reply status changes, from the bus or, without one, from the
//! store woken by each commit (`bus::live`).
//!
//! Each SSE id is the event's commit position, `<transaction_id>.<global_position>`
//! (the form of `X-Consistency-Token`): a conversation's events and its replies'
//! (streams of their own) are one sequence in commit order, which a version of
//! either stream alone cannot number. A client that reconnects with
//! `Last-Event-ID` first gets what it missed, read from the event store (which
//! keeps everything, and is read only after that position), then the live feed.
//! The subscription is opened before the store is read, and positions already
//! sent are skipped, so nothing falls between the two; a gap in the conversation's
//! versions on the live feed (a slow consumer) is filled from the store too. An
//! id from before positions (a bare conversation version) still resumes after
//! that version. Comments keep idle connections alive.
//!
//! While the replier streams a reply, its text arrives as `message.delta` events
//! (no id: they are not stored, and the `message.completed` that follows is).

use std::{convert::Infallible, time::Duration};

use ai_secretary_contract::{CONVERSATION, Event as Fact, EventEnvelope, subjects};
use axum::{
    extract::State,
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::{broadcast, mpsc, watch};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    error::ApiError,
    extract::{AuthUser, IdPath},
    openapi::IdParam,
};
use crate::{app::Commands, bus::live::Live, store::Position};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream))
}

/// One event of the stream (its fields as the SSE format sends them; comment
/// lines keep the connection alive and are not events).
#[derive(ToSchema)]
#[allow(dead_code)]
struct ServerSentEvent {
    /// The event's commit position, `<transaction_id>.<global_position>`
    /// (absent on `message.delta`, which is not stored).
    #[schema(example = "1042.877")]
    id: Option<String>,
    event: EventName,
    /// A JSON object: the message or conversation as changed.
    #[schema(
        example = r#"{"id":"0193a5c1-2eff-7a3b-b1c2-0d9e8f7a6b5b","object":"message","role":"user","status":"completed"}"#
    )]
    data: String,
}

/// The names of the stream's events.
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
enum EventName {
    #[serde(rename = "message.created")]
    MessageCreated,
    #[serde(rename = "message.updated")]
    MessageUpdated,
    #[serde(rename = "message.delta")]
    MessageDelta,
    #[serde(rename = "message.completed")]
    MessageCompleted,
    #[serde(rename = "message.failed")]
    MessageFailed,
    #[serde(rename = "conversation.updated")]
    ConversationUpdated,
}

/// Where a reconnecting client resumes.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct Resume {
    /// The `id` of the last event received: what came after it is sent
    /// first, from the event store, then the live feed.
    #[param(rename = "Last-Event-ID", example = "1042.877")]
    last_event_id: Option<String>,
}

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events read from the store per round trip when catching a client up.
const CATCH_UP_PAGE: i64 = 500;

/// A conversation's live events (Server-Sent Events).
///
/// Each stored event has an `id`, its commit position (`<transaction_id>.<global_position>`,
/// the form of `X-Consistency-Token`); `data` is a JSON object. The events:
///
/// - `message.created`: a user's message (`status` `completed`) or a requested
///   reply (`queued`), shaped as in the message list;
/// - `message.updated`: a reply taken up (`in_progress`);
/// - `message.delta`: a piece of a reply's text as it is written (`id` of the
///   reply, `attempt`, `index`, `delta`); the event has no SSE id: it is not
///   stored, the `message.completed` that follows is;
/// - `message.completed`: a reply with its `content`, `model`, `finish_reason` and `usage`;
/// - `message.failed`: a reply that failed, with its `error`;
/// - `conversation.updated`: the conversation renamed (`title`) or archived (`status`).
///
/// Comment lines keep an idle connection open (every 15 s). The stream ends
/// when the service shuts down; reconnect with `Last-Event-ID`.
#[utoipa::path(
    get,
    path = "/conversations/{id}/stream",
    tag = "conversations",
    security(("bearer" = [])),
    params(IdParam, Resume),
    responses(
        (status = 200, description = "The event stream (never ends by itself)",
            content_type = "text/event-stream", body = ServerSentEvent,
            example = "id: 1042.877\nevent: message.created\ndata: {\"id\":\"0193a5c1-2eff-7a3b-b1c2-0d9e8f7a6b5b\",\"object\":\"message\",\"role\":\"user\",\"status\":\"completed\"}\n\nid: 1043.878\nevent: message.completed\ndata: {\"id\":\"0193a5c1-2f00-7a3b-b1c2-0d9e8f7a6b5c\",\"object\":\"message\",\"role\":\"assistant\",\"status\":\"completed\",\"content\":\"Monday is free after 2 pm.\"}\n\n"),
    ),
)]
async fn stream(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdPath(id): IdPath,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // "From now on" for a client without Last-Event-ID: the store's head before
    // anything else. What commits after it is caught up from the store once the
    // subscription below is open, so nothing committed while this request was
    // loading and subscribing is lost (a conversation's own events would be
    // refilled by the version check; its replies', in streams of their own,
    // would not).
    let now = state.commands.head().await?.unwrap_or(Position::START);
    // Ownership from the write model: a conversation just started streams at once.
    let conversation = state.commands.conversation_of(user, id).await?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned());
    let resume_after = match &last_event_id {
        Some(last) => state.commands.feed_resume_point(id, last).await?,
        None => None,
    };
    // Listening starts before the store is read (see the module's comment).
    let listening = Listening::start(&state.read.live, id).await?;

    let commands = state.commands.clone();
    let (events, receiver) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        // Without Last-Event-ID, start from now; with it, replay what came after.
        let mut feed = Feed {
            commands,
            conversation_id: id,
            sent: resume_after.unwrap_or(now),
            version: conversation.version,
            events,
        };
        if !feed.catch_up(None).await {
            return;
        }
        match listening {
            Listening::Nats {
                subscription,
                deltas,
            } => feed.follow_bus(subscription, deltas).await,
            Listening::InProcess { commits, deltas } => feed.follow_commits(commits, deltas).await,
        }
    });
    let mut receiver = receiver;
    let stream = futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
        .map(Ok)
        // Ends when the process begins to shut down (see `ReadSide::draining`).
        .take_until(state.read.draining.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// What a stream listens to for news of its conversation (`bus::live`).
enum Listening {
    /// The conversation's event subject and its live subject.
    Nats {
        subscription: async_nats::Subscriber,
        deltas: async_nats::Subscriber,
    },
    /// Commits of this process (then the store is read), and its delta hub.
    InProcess {
        commits: watch::Receiver<()>,
        deltas: broadcast::Receiver<String>,
    },
}

impl Listening {
    async fn start(live: &Live, conversation: Uuid) -> Result<Listening, ApiError> {
        Ok(match live {
            Live::Nats {
                client,
                subject_prefix,
            } => {
                let unavailable = |e: async_nats::SubscribeError| {
                    ApiError::Unavailable(format!("live updates are unavailable: {e}"))
                };
                let topic = subjects::of_stream(subject_prefix, CONVERSATION, conversation);
                Listening::Nats {
                    subscription: client.subscribe(topic).await.map_err(unavailable)?,
                    deltas: client
                        .subscribe(subjects::live(subject_prefix, conversation))
                        .await
                        .map_err(unavailable)?,
                }
            }
            Live::InProcess { commits, deltas } => {
                let mut commits = commits.clone();
                // Seen now: only commits from here on wake the stream (the
                // catch-up that follows reads everything before).
                commits.borrow_and_update();
                Listening::InProcess {
                    commits,
                    deltas: deltas.subscribe(conversation),
                }
            }
        })
    }
}

/// How often a stream without NATS reads the store when no commit woke it: the
/// commits of another process on the same database (an operator's command) do
/// not move this process's signal.
const STORE_POLL: Duration = Duration::from_secs(1);

/// One client's feed: what it has been sent so far.
struct Feed {
    commands: Commands,
    conversation_id: Uuid,
    /// Position of the last event sent (or skipped as of no interest).
    sent: Position,
    /// The conversation's own version as of `sent`, to notice a gap on the bus.
    version: i64,
    events: mpsc::Sender<Event>,
}

impl Feed {
    /// Follow the bus until the client goes away: events as the relay
    /// publishes them (a gap in the conversation's versions is filled from the
    /// store), deltas as the replier publishes them.
    async fn follow_bus(
        &mut self,
        mut subscription: async_nats::Subscriber,
        mut deltas: async_nats::Subscriber,
    ) {
        loop {
            let message = tokio::select! {
                // In this order, not at random: the replier waits until the
                // server has routed a reply's deltas before it appends the
                // reply's ending (`Live::flush`), so they reach this
                // connection before the ending's event does, and a delta
                // already here goes out before an event already here.
                biased;
                // The client went away (or the stream ended for a shutdown): stop
                // now, not at the next event, which may never come.
                () = self.events.closed() => return,
                Some(delta) = deltas.next() => {
                    let Ok(data) = std::str::from_utf8(&delta.payload) else { continue };
                    if !self.send_delta(data).await {
                        return;
                    }
                    continue;
                }
                message = subscription.next() => message,
            };
            let Some(message) = message else { break };
            let Ok(mut envelope) = serde_json::from_slice::<EventEnvelope>(&message.payload) else {
                continue;
            };
            // The bus carries personal fields sealed; the client gets them open.
            if let Err(e) = self
                .commands
                .open(envelope.event_id, &mut envelope.data)
                .await
            {
                tracing::warn!(error = %e, event_id = %envelope.event_id, "a live event did not open; skipped");
                continue;
            }
            if envelope.position() <= self.sent {
                continue;
            }
            if envelope
                .conversation_version()
                .is_some_and(|v| v > self.version + 1)
                && !self.catch_up(Some(envelope.position())).await
            {
                return;
            }
            if !self.send(&envelope).await {
                return; // the client went away
            }
        }
    }

    /// Follow this process's commits until the client goes away: each wakes
    /// the stream, which sends what the store has after `sent`; deltas come
    /// from the in-process hub.
    async fn follow_commits(
        &mut self,
        mut commits: watch::Receiver<()>,
        mut deltas: broadcast::Receiver<String>,
    ) {
        loop {
            tokio::select! {
                () = self.events.closed() => return,
                changed = commits.changed() => {
                    if changed.is_err() {
                        // The signal's sender is gone (the process is stopping): poll.
                        tokio::time::sleep(STORE_POLL).await;
                    }
                }
                delta = deltas.recv() => {
                    match delta {
                        Ok(data) => if !self.send_delta(&data).await {
                            return;
                        },
                        // Fallen behind: those deltas are missed; the completion repairs them.
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    continue;
                }
                () = tokio::time::sleep(STORE_POLL) => {}
            }
            if !self.catch_up_with(None, Some(&mut deltas)).await {
                return;
            }
        }
    }

    /// Pass on a piece of a reply's text as is, without an id (it is not
    /// stored; the completion that follows is). False once the client is gone.
    async fn send_delta(&self, data: &str) -> bool {
        self.events
            .send(Event::default().event("message.delta").data(data))
            .await
            .is_ok()
    }

    /// Send the stored events after `sent` (and before `until`); false once the
    /// client is gone. A store that cannot be read leaves the gap to the bus.
    async fn catch_up(&mut self, until: Option<Position>) -> bool {
        self.catch_up_with(until, None).await
    }

    /// [`Feed::catch_up`], passing on first, before each reply's ending, the
    /// deltas already received in process. The replier publishes every delta
    /// of a reply before it appends the ending, so by the time the store shows
    /// the ending they are all waiting in `deltas`: sent first, a client sees a
    /// reply's text pieces before its completion even when one wake-up finds
    /// both the start and the end of a reply in the store.
    async fn catch_up_with(
        &mut self,
        until: Option<Position>,
        mut deltas: Option<&mut broadcast::Receiver<String>>,
    ) -> bool {
        loop {
            let Ok(page) = self
                .commands
                .conversation_feed(self.conversation_id, self.sent, CATCH_UP_PAGE)
                .await
            else {
                return !self.events.is_closed();
            };
            let full = page.len() as i64 == CATCH_UP_PAGE;
            for recorded in page {
                if until.is_some_and(|u| recorded.position >= u) {
                    return true;
                }
                let envelope = EventEnvelope::from(&recorded);
                if let Some(deltas) = deltas.as_deref_mut()
                    && ends_a_reply(&envelope)
                    && !self.send_waiting_deltas(deltas).await
                {
                    return false;
                }
                if !self.send(&envelope).await {
                    return false;
                }
            }
            if !full {
                return true;
            }
        }
    }

    /// Send the deltas already received; false once the client is gone.
    async fn send_waiting_deltas(&self, deltas: &mut broadcast::Receiver<String>) -> bool {
        loop {
            match deltas.try_recv() {
                Ok(data) => {
                    if !self.send_delta(&data).await {
                        return false;
                    }
                }
                // Fallen behind: those are missed; the ending repairs them.
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => return true,
            }
        }
    }

    /// Send one event if clients care about it; false once the client is gone.
    async fn send(&mut self, envelope: &EventEnvelope) -> bool {
        self.sent = envelope.position();
        if let Some(version) = envelope.conversation_version() {
            self.version = self.version.max(version);
        }
        let Some((name, data)) = sse_of(envelope) else {
            return true;
        };
        let event = Event::default()
            .id(self.sent.to_string())
            .event(name)
            .data(data.to_string());
        self.events.send(event).await.is_ok()
    }
}

/// Whether the event is a reply's completion or failure (its deltas come first).
fn ends_a_reply(e: &EventEnvelope) -> bool {
    matches!(
        e.decode(),
        Ok(Fact::ReplyCompleted(_) | Fact::ReplyFailed(_))
    )
}

/// The SSE name and data of an event, or `None` for events clients do not see.
fn sse_of(e: &EventEnvelope) -> Option<(&'static str, serde_json::Value)> {
    let event = e.decode().ok()?;
    let conversation_id = e.conversation_id(&event)?;
    Some(match event {
        Fact::MessagePosted(m) => (
            "message.created",
            json!({ "id": m.message_id, "object": "message", "conversation_id": conversation_id,
                    "role": "user", "content": m.content, "status": "completed", "created_at": m.posted_at }),
        ),
        Fact::ReplyRequested(r) => (
            "message.created",
            json!({ "id": r.reply_id, "object": "message", "conversation_id": conversation_id,
                    "role": "assistant", "content": null, "status": "queued", "reply_to": r.reply_to,
                    "created_at": r.requested_at }),
        ),
        Fact::ReplyStarted(r) => (
            "message.updated",
            json!({ "id": r.reply_id, "object": "message", "conversation_id": conversation_id,
                    "role": "assistant", "status": "in_progress", "updated_at": r.started_at }),
        ),
        Fact::ReplyCompleted(r) => (
            "message.completed",
            json!({ "id": r.reply_id, "object": "message", "conversation_id": conversation_id,
                    "role": "assistant", "content": r.content, "status": "completed", "model": r.model,
                    "finish_reason": r.finish_reason,
                    "usage": { "prompt_tokens": r.usage.prompt_tokens,
                               "completion_tokens": r.usage.completion_tokens,
                               "total_tokens": r.usage.total_tokens },
                    "updated_at": r.completed_at }),
        ),
        Fact::ReplyFailed(f) => (
            "message.failed",
            json!({ "id": f.reply_id, "object": "message", "conversation_id": conversation_id,
                    "role": "assistant", "status": "failed", "error": f.error, "updated_at": f.failed_at }),
        ),
        Fact::ConversationRenamed(r) => (
            "conversation.updated",
            json!({ "id": conversation_id, "object": "conversation", "title": r.title, "updated_at": r.renamed_at }),
        ),
        Fact::ConversationArchived { at } => (
            "conversation.updated",
            json!({ "id": conversation_id, "object": "conversation", "status": "archived", "updated_at": at }),
        ),
        _ => return None,
    })
}
