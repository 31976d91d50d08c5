//! `GET /conversations/{id}/stream`: Server-Sent Events of a conversation's new
//! messages and reply status changes, from the bus.
//!
//! Each SSE id is the event's version in the conversation stream, so a client
//! that reconnects with `Last-Event-ID` first gets what it missed (read from the
//! event store, which keeps everything) and then the live feed. The subscription
//! is opened before the store is read, and versions already sent are skipped, so
//! nothing falls between the two; a gap in the live feed (a slow consumer) is
//! filled from the store too. Comments keep idle connections alive.
//!
//! While the replier streams a reply, its text arrives as `message.delta` events
//! (no id: they are not stored, and the `message.completed` that follows is).

use std::{convert::Infallible, time::Duration};

use ai_secretary_projections::{Event as Fact, EventEnvelope};
use axum::{
    Router,
    extract::State,
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
    routing::get,
};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{
    AppState,
    error::ApiError,
    extract::{AuthUser, IdPath},
};
use crate::{
    bus::{live_subject, subject},
    domain::conversation::{ConversationDecider, ConversationState},
    store::EventStore,
};

pub fn router() -> Router<AppState> {
    Router::new().route("/conversations/{id}/stream", get(stream))
}

const KEEP_ALIVE: Duration = Duration::from_secs(15);

async fn stream(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    IdPath(id): IdPath,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Ownership from the write model: a conversation just started streams at once.
    let store = state.commands.store().clone();
    let conversation = state.commands.load::<ConversationDecider>(id).await?;
    if !matches!(&conversation.state, ConversationState::Live(c) if c.owner_id == user) {
        return Err(ApiError::NotFound("conversation"));
    }
    let resume_after: Option<i64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let nats = state.read.nats.clone();
    let topic = subject(&state.read.subject_prefix, "conversation", id);
    let unavailable = |e: async_nats::SubscribeError| {
        ApiError::Unavailable(format!("live updates are unavailable: {e}"))
    };
    let subscription = nats.subscribe(topic).await.map_err(unavailable)?;
    let mut deltas = nats
        .subscribe(live_subject(&state.read.subject_prefix, id))
        .await
        .map_err(unavailable)?;

    let (events, mut receiver) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut subscription = subscription;
        // Without Last-Event-ID, start from now; with it, replay what came after.
        let mut sent = resume_after.unwrap_or(conversation.version);
        if resume_after.is_some()
            && !send_from_store(&*store, id, &mut sent, i64::MAX, &events).await
        {
            return;
        }
        loop {
            let message = tokio::select! {
                // The client went away (or the stream ended for a shutdown): stop
                // now, not at the next event, which may never come.
                () = events.closed() => return,
                message = subscription.next() => message,
                Some(delta) = deltas.next() => {
                    // Text of a reply being written: passed on as is, without an id
                    // (it is not stored; the completion that follows is).
                    let Ok(data) = std::str::from_utf8(&delta.payload) else { continue };
                    if events.send(Event::default().event("message.delta").data(data)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Some(message) = message else { break };
            let Ok(envelope) = serde_json::from_slice::<EventEnvelope>(&message.payload) else {
                continue;
            };
            if envelope.version <= sent {
                continue;
            }
            if envelope.version > sent + 1
                && !send_from_store(&*store, id, &mut sent, envelope.version - 1, &events).await
            {
                return;
            }
            if !send(&envelope, &mut sent, &events).await {
                return; // the client went away
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
        .map(Ok)
        // Ends when the process begins to shut down (see `ReadSide::draining`).
        .take_until(state.read.draining.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Send the stored events after `sent` up to `until`; false once the client is gone.
async fn send_from_store(
    store: &dyn EventStore,
    id: Uuid,
    sent: &mut i64,
    until: i64,
    events: &mpsc::Sender<Event>,
) -> bool {
    let Ok(history) = store.read_stream(id).await else {
        return !events.is_closed();
    };
    let from = *sent;
    for recorded in history
        .iter()
        .filter(|r| r.version > from && r.version <= until)
    {
        if !send(&EventEnvelope::from(recorded), sent, events).await {
            return false;
        }
    }
    true
}

/// Send one event if clients care about it; false once the client is gone.
async fn send(envelope: &EventEnvelope, sent: &mut i64, events: &mpsc::Sender<Event>) -> bool {
    *sent = envelope.version;
    let Some((name, data)) = sse_of(envelope) else {
        return true;
    };
    let event = Event::default()
        .id(envelope.version.to_string())
        .event(name)
        .data(data.to_string());
    events.send(event).await.is_ok()
}

/// The SSE name and data of an event, or `None` for events clients do not see.
fn sse_of(e: &EventEnvelope) -> Option<(&'static str, serde_json::Value)> {
    let conversation_id = e.stream_id;
    Some(match e.decode().ok()? {
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
