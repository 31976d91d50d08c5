//! The replier: answers every ReplyRequested with exactly one ReplyCompleted or
//! ReplyFailed, appended to the reply's own stream through its decider (so it
//! never races the user for the conversation's next version).
//!
//! It is a durable JetStream consumer of the conversation subjects. A message is
//! acked only once its reply has ended in the store, so a crash anywhere (before
//! the model answered, or after it answered but before the append) leaves the
//! message unacked, and JetStream hands it out again after `ack_wait`. Exactly one
//! ending per reply comes from the decider, which refuses a second one: a redelivery,
//! a restart or a second replier that finds the reply ended acks and moves on.
//! The prompt's history is read backwards from the request, only as far as
//! `LLM_HISTORY_CHARS` needs (`app::replies`).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use ai_secretary_contract::{CONVERSATION, Event as Fact, EventEnvelope, subjects};
use ai_secretary_projections::{
    Db, checkpoint,
    lease::{self, Lease},
};
use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use chrono::Utc;
use futures_util::StreamExt;
use tokio::{
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    app::{
        CommandContext, Commands,
        replies::{ReplyRequest, TakenUp},
    },
    bus::{self, BusConfig},
    domain::{
        assistant::{AssistantDecider, AssistantState},
        reply::ReplyCommand,
    },
    llm::{self, Prompt, Provider, RetryPolicy},
    store::{EventStore, Position, RecordedEvent},
};

/// Whether a message from the bus is an event that asks nothing of the
/// replier: one that reads as an envelope whose `event_type` is not
/// `ReplyRequested`. Only the type is read (the rest of the envelope is
/// scanned, not built); anything else, such as a payload that is not an
/// envelope, goes the whole way (`Replier::handle`), which logs it.
fn asks_nothing(payload: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(borrow)]
        event_type: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Typed>(payload).is_ok_and(|t| t.event_type != REPLY_REQUESTED)
}

/// The one event type the replier answers.
const REPLY_REQUESTED: &str = "ReplyRequested";

/// Pause before answering again a request whose reply failed to record.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The durable consumer's name on the events stream.
pub const CONSUMER: &str = "replier";

/// The replier's checkpoint and lease, when it tails the store (`Feed::StoreTail`).
pub const CHECKPOINT: &str = "replier";
const LOCK_KEY: &str = "ai_secretary.replier";

/// Where the replier reads the reply requests from.
#[derive(Clone)]
pub enum Feed {
    /// A durable JetStream consumer of the conversation subjects (any number of
    /// repliers share it).
    Bus,
    /// The event store itself, in commit order below the read horizon, woken by
    /// each commit: no relay or NATS in between. One replier is active (a
    /// lease); its checkpoint is the position below which every request has
    /// ended, so a crash answers the unfinished ones again, and the decider's
    /// one ending per reply absorbs what had in fact ended.
    StoreTail {
        /// Where its checkpoint and lease are: the store's own database.
        db: Db,
        /// The store as it is (sealed): requests carry no personal field.
        store: Arc<dyn EventStore>,
        commits: watch::Receiver<()>,
    },
}

#[derive(Clone)]
pub struct Replier {
    pub commands: Commands,
    pub provider: Arc<dyn Provider>,
    pub policy: RetryPolicy,
    pub history_chars: usize,
    pub concurrency: usize,
    /// How long JetStream waits for an ack before handing a message out again:
    /// how soon a reply abandoned by a crash is picked up.
    pub ack_wait: Duration,
    /// The bus's JetStream, for the requests when the feed is the bus.
    pub nats: Option<async_nats::Client>,
    /// Where streamed reply text (not stored) goes when `stream` is on: NATS,
    /// or this process's hub.
    pub live: crate::bus::live::Live,
    pub stream: bool,
    pub bus: BusConfig,
    pub feed: Feed,
}

/// What became of one delivered message.
#[derive(Debug, PartialEq)]
enum Handled {
    /// Done with it (answered, already answered, or nothing to answer): ack.
    Done,
    /// Shutting down mid-reply: leave it unacked for the next replier.
    Abandoned,
}

impl Replier {
    /// Answer requests until `stop`; in-flight replies are abandoned (not acked)
    /// on shutdown and answered after the restart.
    pub async fn run(&self, stop: &CancellationToken) -> anyhow::Result<()> {
        match &self.feed {
            Feed::Bus => self.consume(stop).await,
            Feed::StoreTail { db, store, commits } => {
                lease::zero_metrics(CHECKPOINT);
                while !stop.is_cancelled() {
                    let Some(lease) = Lease::acquire(db, LOCK_KEY, CHECKPOINT, stop).await? else {
                        break;
                    };
                    self.tail(db, store.as_ref(), commits.clone(), &lease, stop)
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// Answer the requests read from the bus until `stop`.
    async fn consume(&self, stop: &CancellationToken) -> anyhow::Result<()> {
        let nats = self
            .nats
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the replier's bus feed needs NATS_URL"))?;
        let jetstream = jetstream::new(nats);
        bus::ensure_stream(&jetstream, &self.bus).await?;
        let stream = jetstream.get_stream(&self.bus.stream).await?;
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    // One filter subject: plural filters are ignored by NATS 2.9.
                    filter_subject: subjects::of_type(&self.bus.subject_prefix, CONVERSATION),
                    // From the start: a request never answered is answered now.
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_ack_pending: (self.concurrency * 4) as i64,
                    ..Default::default()
                },
            )
            .await?;
        let mut messages = consumer.messages().await?;
        let slots = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut working = JoinSet::new();
        tracing::info!(provider = self.provider.name(), "replier active");
        let result = loop {
            // Reap finished replies so the set does not grow.
            while working.try_join_next().is_some() {}
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit?,
                () = stop.cancelled() => break Ok(()),
            };
            let message = tokio::select! {
                next = messages.next() => next,
                () = stop.cancelled() => break Ok(()),
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(e)) => break Err(anyhow::anyhow!("replier consumer: {e}")),
                None => break Err(anyhow::anyhow!("the replier's message stream ended")),
            };
            if asks_nothing(&message.payload) {
                // Most events on the conversation subjects are not requests:
                // acked here, without a task, a decode or a wait for the
                // server's confirmation. A lost ack only brings the event
                // back after `ack_wait`, to be acked again.
                if let Err(e) = message.ack().await {
                    tracing::debug!(error = %e, "could not ack an event that asks nothing; it will come again");
                }
                continue;
            }
            let (this, stop) = (self.clone(), stop.clone());
            working.spawn(async move {
                let _permit = permit;
                this.deliver(message, &stop).await;
            });
        };
        // Replies in flight see `stop` and leave their messages unacked.
        while working.join_next().await.is_some() {}
        result
    }

    /// Handle one message and ack it when done; log what could not be.
    async fn deliver(&self, message: jetstream::Message, stop: &CancellationToken) {
        let keepalive = async {
            // Tell JetStream we are still on it, so a slow model is not redelivered.
            let mut tick = tokio::time::interval(self.ack_wait / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = message.ack_with(AckKind::Progress).await;
            }
        };
        let attempt = message.info().map_or(1, |i| i.delivered.max(1) as u32);
        let handled = tokio::select! {
            handled = self.handle(&message.payload, attempt) => handled,
            () = keepalive => unreachable!("the keepalive never ends"),
            () = stop.cancelled() => Ok(Handled::Abandoned),
        };
        match handled {
            Ok(Handled::Done) => {
                if let Err(e) = message.double_ack().await {
                    tracing::warn!(error = %e, "could not ack a reply request; it will come again");
                }
            }
            Ok(Handled::Abandoned) => {}
            Err(e) => {
                // Store trouble: try again a little later, from the start.
                tracing::warn!(error = format!("{e:#}"), "reply failed to record; retrying");
                let _ = message.ack_with(AckKind::Nak(Some(RETRY_AFTER))).await;
            }
        }
    }

    /// Answer the requests committed after the checkpoint while `lease` is
    /// held: up to `concurrency` at once, the checkpoint moving (fenced) over
    /// each prefix of the log whose requests have all ended.
    async fn tail(
        &self,
        db: &Db,
        store: &dyn EventStore,
        mut commits: watch::Receiver<()>,
        lease: &Lease,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut saved = checkpoint::ensure(db, CHECKPOINT).await?.position;
        let mut read_to = saved;
        // Every event read and not yet passed by the checkpoint, in commit
        // order: `None` once done (a request answered, or no request), else the
        // request and how many times it was tried.
        let mut pending: BTreeMap<Position, Option<(RecordedEvent, u32)>> = BTreeMap::new();
        let mut working: JoinSet<(Position, anyhow::Result<Handled>)> = JoinSet::new();
        tracing::info!(checkpoint = %saved, provider = self.provider.name(), "replier active (store tail)");
        loop {
            // Move the checkpoint over the prefix that is done.
            let mut to = saved;
            while let Some(entry) = pending.first_entry() {
                if entry.get().is_some() {
                    break;
                }
                to = *entry.key();
                entry.remove();
            }
            if to != saved {
                // One statement, its own transaction; a refused move writes
                // nothing. Its commit does not wait for the disk: a server
                // crash that loses it makes this replier take those requests
                // up again, and each finds its reply ended (`take_up_reply`).
                let m = checkpoint::Move {
                    fence: lease.fence(saved),
                    to,
                    applied: 0,
                    stream_sequence: None,
                };
                if !checkpoint::save_alone(db, CHECKPOINT, m).await? {
                    lease.fenced();
                    return Ok(());
                }
                db.checkpoint_moved();
                saved = to;
            }
            commits.borrow_and_update();
            let slots = self.concurrency.max(1);
            let room = (slots * 4).saturating_sub(pending.len());
            let events = if room > 0 && working.len() < slots {
                store.read_all(read_to, room as i64).await?
            } else {
                vec![]
            };
            let read_some = !events.is_empty();
            for event in events {
                read_to = event.position;
                if event.event_type == REPLY_REQUESTED {
                    self.answer_later(&mut working, &event, 1, Duration::ZERO, stop);
                    pending.insert(event.position, Some((event, 1)));
                } else {
                    pending.insert(event.position, None);
                }
            }
            if read_some {
                continue; // more may be there, and a done prefix may be savable
            }
            let finished = tokio::select! {
                finished = working.join_next(), if !working.is_empty() => finished,
                _ = commits.changed() => None,
                () = tokio::time::sleep(ai_secretary_projections::worker::TAIL_POLL) => None,
                () = lease.lost().cancelled() => return Ok(()),
                () = stop.cancelled() => return Ok(()),
            };
            let Some(finished) = finished else { continue };
            let (at, handled) = finished?;
            match handled {
                Ok(Handled::Done) => {
                    pending.insert(at, None);
                }
                Ok(Handled::Abandoned) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "reply failed to record; retrying");
                    if let Some(Some((event, attempt))) = pending.get_mut(&at) {
                        *attempt += 1;
                        self.answer_later(&mut working, event, *attempt, RETRY_AFTER, stop);
                    }
                }
            }
        }
    }

    /// Answer one request read from the store, after `pause`, in the set.
    fn answer_later(
        &self,
        working: &mut JoinSet<(Position, anyhow::Result<Handled>)>,
        event: &RecordedEvent,
        attempt: u32,
        pause: Duration,
        stop: &CancellationToken,
    ) {
        let (this, stop, at) = (self.clone(), stop.clone(), event.position);
        let payload = serde_json::to_vec(&EventEnvelope::from(event));
        working.spawn(async move {
            let payload = match payload {
                Ok(payload) => payload,
                Err(e) => return (at, Err(e.into())),
            };
            let handled = tokio::select! {
                handled = async {
                    tokio::time::sleep(pause).await;
                    this.handle(&payload, attempt).await
                } => handled,
                () = stop.cancelled() => Ok(Handled::Abandoned),
            };
            (at, handled)
        });
    }

    async fn handle(&self, payload: &[u8], attempt: u32) -> anyhow::Result<Handled> {
        let envelope: EventEnvelope = match serde_json::from_slice(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::error!(error = %e, "not an event envelope; skipped by the replier");
                return Ok(Handled::Done);
            }
        };
        let Ok(Fact::ReplyRequested(request)) = envelope.decode() else {
            return Ok(Handled::Done);
        };
        let conversation_id = envelope.stream_id;
        // The request's correlation id carries on into the reply's events.
        let correlation_id = envelope
            .metadata
            .get("correlation_id")
            .and_then(|c| c.as_str())
            .unwrap_or_default();
        let span = tracing::info_span!(
            "reply",
            %conversation_id,
            reply_id = %request.reply_id,
            correlation_id,
            attempt,
        );
        // The reply is the conversation owner's data: its content is sealed
        // under their key. The request names them (its poster); a request
        // written before requests did is asked of the conversation.
        let named = envelope
            .metadata
            .get("user_id")
            .and_then(|u| u.as_str())
            .and_then(|u| u.parse().ok());
        let owner = match named {
            Some(owner) => Some(owner),
            None => self.commands.conversation_owner(conversation_id).await?,
        };
        let context = CommandContext {
            correlation_id: correlation_id.to_owned(),
            causation_id: Some(envelope.event_id),
            user_id: owner,
            idempotency_key: None,
        };
        let reply = Reply {
            replier: self,
            request: ReplyRequest {
                conversation_id,
                version: envelope.version,
                reply_id: request.reply_id,
                reply_to: request.reply_to,
            },
            context,
        };
        tracing::Instrument::instrument(reply.answer(request.assistant_id, attempt), span).await
    }
}

/// One reply being worked on.
struct Reply<'a> {
    replier: &'a Replier,
    request: ReplyRequest,
    context: CommandContext,
}

impl Reply<'_> {
    async fn answer(&self, assistant_id: Uuid, attempt: u32) -> anyhow::Result<Handled> {
        let commands = &self.replier.commands;
        match commands
            .take_up_reply(&self.request, attempt, Utc::now(), &self.context)
            .await?
        {
            TakenUp::Started => {}
            TakenUp::AlreadyEnded => {
                tracing::debug!("already answered");
                return Ok(Handled::Done);
            }
            TakenUp::NotInStore => {
                // A restore from an older backup: the bus still had the request.
                tracing::warn!("reply request not in the store; skipped");
                return Ok(Handled::Done);
            }
        }
        let assistant = match commands.load::<AssistantDecider>(assistant_id).await?.state {
            AssistantState::Live(assistant) => assistant,
            _ => {
                self.end(ReplyCommand::Fail {
                    reply_id: self.request.reply_id,
                    error: "the assistant no longer exists".into(),
                    retryable: false,
                    attempts: 0,
                    at: Utc::now(),
                })
                .await?;
                return Ok(Handled::Done);
            }
        };
        let history = commands
            .reply_history(&self.request, self.replier.history_chars)
            .await?;
        let prompt = Prompt::build(
            &assistant,
            &history,
            self.request.reply_to,
            self.replier.history_chars,
        );
        let asked = std::time::Instant::now();
        let _in_flight = InFlight::start();
        let outcome = if self.replier.stream {
            let (sink, forwarding) = self.forward_deltas();
            let send = move |attempt: u32, piece: &str| {
                let _ = sink.send((attempt, piece.to_owned()));
            };
            let outcome = llm::complete(
                self.replier.provider.as_ref(),
                &prompt,
                &self.replier.policy,
                Some(&send),
            )
            .await;
            drop(send);
            // Every delta is out before the ending is appended (and then relayed).
            let _ = forwarding.await;
            outcome
        } else {
            llm::complete(
                self.replier.provider.as_ref(),
                &prompt,
                &self.replier.policy,
                None,
            )
            .await
        };
        let latency_ms = asked.elapsed().as_millis() as u64;
        let command = match outcome {
            Ok((completion, attempts)) => {
                tracing::info!(
                    attempts,
                    latency_ms,
                    total_tokens = completion.usage.total_tokens,
                    "reply completed"
                );
                metrics::counter!("replies_total", "outcome" => "completed").increment(1);
                ReplyCommand::Complete {
                    reply_id: self.request.reply_id,
                    content: completion.content,
                    model: completion.model,
                    finish_reason: completion.finish_reason,
                    usage: completion.usage,
                    latency_ms,
                    at: Utc::now(),
                }
            }
            Err(failure) => {
                tracing::warn!(
                    attempts = failure.attempts,
                    reason = %failure.last.reason,
                    error = %failure.last.message,
                    "reply failed"
                );
                metrics::counter!("replies_total", "outcome" => "failed").increment(1);
                ReplyCommand::Fail {
                    reply_id: self.request.reply_id,
                    error: failure.last.to_string(),
                    retryable: failure.retryable,
                    attempts: failure.attempts,
                    at: Utc::now(),
                }
            }
        };
        self.end(command).await?;
        Ok(Handled::Done)
    }

    /// A channel whose pieces of text are published, in order, as `message.delta`
    /// updates on the conversation's live subject; the task ends when it closes.
    fn forward_deltas(
        &self,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<(u32, String)>,
        tokio::task::JoinHandle<()>,
    ) {
        let (sink, mut pieces) = tokio::sync::mpsc::unbounded_channel::<(u32, String)>();
        let live = self.replier.live.clone();
        let (reply_id, conversation_id) = (self.request.reply_id, self.request.conversation_id);
        let forwarding = tokio::spawn(async move {
            let mut index = 0u64;
            let mut current = 0;
            while let Some((attempt, delta)) = pieces.recv().await {
                if attempt != current {
                    (current, index) = (attempt, 0);
                }
                let update = serde_json::json!({
                    "id": reply_id, "object": "message.delta", "conversation_id": conversation_id,
                    "attempt": attempt, "index": index, "delta": delta,
                });
                index += 1;
                live.publish_delta(conversation_id, update.to_string())
                    .await;
            }
            if !live.flush().await {
                tracing::debug!("the server did not confirm a reply's deltas in time");
            }
        });
        (sink, forwarding)
    }

    /// Append the reply's ending; one that finds it ended already (a redelivery
    /// or another replier got there first) is success too.
    async fn end(&self, command: ReplyCommand) -> anyhow::Result<()> {
        let commands = &self.replier.commands;
        if !commands
            .end_reply(self.request.reply_id, &command, &self.context)
            .await?
        {
            tracing::info!("reply already ended elsewhere; nothing to add");
        }
        Ok(())
    }
}

/// `llm_replies_in_flight` up while a reply is being worked on.
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics::gauge!("llm_replies_in_flight").increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("llm_replies_in_flight").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::asks_nothing;

    #[test]
    fn only_an_envelope_of_another_type_is_acked_without_a_look() {
        let envelope = |event_type: &str| {
            serde_json::json!({
                "event_id": "0192d3f0-0000-7000-8000-000000000001",
                "event_type": event_type,
                "data": { "reply_id": "0192d3f0-0000-7000-8000-000000000002", "nested": [1, {"a": "\u{0}"}] },
                "metadata": { "user_id": "0192d3f0-0000-7000-8000-000000000003" },
            })
            .to_string()
        };
        assert!(asks_nothing(envelope("ConversationStarted").as_bytes()));
        assert!(asks_nothing(envelope("MessagePosted").as_bytes()));
        assert!(!asks_nothing(envelope("ReplyRequested").as_bytes()));
        // An escaped name is read as its text.
        assert!(!asks_nothing(
            envelope("ReplyRequested")
                .replace("ReplyRequested", "Reply\\u0052equested")
                .as_bytes()
        ));
        // Whatever does not read as an envelope goes the whole way (and is logged there).
        for odd in [
            "",
            "null",
            "{}",
            "{\"event_type\": 7}",
            "not json",
            "{\"event_type\": \"Reply",
        ] {
            assert!(!asks_nothing(odd.as_bytes()), "{odd:?}");
        }
    }
}
