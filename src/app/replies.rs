//! The replier's use cases: take a requested reply up, read the history its
//! prompt is built from, end it once.
//!
//! A reply has a stream of its own (`domain::reply`), so these never append to
//! the conversation and never race its user. What they read of the conversation
//! is bounded: the history is read backwards from the request, page by page,
//! only until the prompt's budget is spent.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    AppError, CommandContext, Commands, Expected, ReadError,
    histories::{Ending, Known, Window},
};
use crate::{
    domain::{
        conversation::{ConversationDecider, ConversationEvent, ConversationState},
        reply::{ReplyCommand, ReplyDecider, ReplyError, ReplyEvent, ReplyState},
    },
    store::{RecordedEvent, codec},
};

/// Events read per page when walking a conversation backwards.
const HISTORY_PAGE: i64 = 64;

/// A `ReplyRequested` as the replier received it.
#[derive(Debug, Clone, Copy)]
pub struct ReplyRequest {
    pub conversation_id: Uuid,
    /// The request's version in the conversation stream.
    pub version: i64,
    pub reply_id: Uuid,
    /// The user message to answer.
    pub reply_to: Uuid,
}

/// What taking a reply up came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakenUp {
    /// `ReplyStarted` is recorded: ask the model.
    Started,
    /// It ended before (a redelivery, or another replier): nothing to do.
    AlreadyEnded,
    /// The store does not hold the request (restored from an older backup).
    NotInStore,
}

impl Commands {
    /// Record that attempt `attempt` at `request` begins, unless it has ended.
    ///
    /// A reply untouched in its own stream is first checked against the store:
    /// its request must be there (one event read), and, only in a conversation
    /// that holds reply events from before replies had streams, the events
    /// after the request are searched for such an older ending.
    pub async fn take_up_reply(
        &self,
        request: &ReplyRequest,
        attempt: u32,
        at: DateTime<Utc>,
        context: &CommandContext,
    ) -> Result<TakenUp, AppError<ReplyError>> {
        if self.load::<ReplyDecider>(request.reply_id).await?.state == ReplyState::Untouched {
            let stored = self
                .store
                .read_stream_backwards(request.conversation_id, request.version + 1, 1)
                .await?;
            match stored.first() {
                Some(r) if r.version == request.version && names_reply(r, request.reply_id) => {}
                _ => return Ok(TakenUp::NotInStore),
            }
            if self.ended_in_conversation(request).await? {
                return Ok(TakenUp::AlreadyEnded);
            }
        }
        let command = ReplyCommand::Start {
            reply_id: request.reply_id,
            conversation_id: request.conversation_id,
            attempt,
            at,
        };
        match self
            .record_reply(request.reply_id, &command, context)
            .await?
        {
            true => Ok(TakenUp::Started),
            false => Ok(TakenUp::AlreadyEnded),
        }
    }

    /// Whether `request` ended in its conversation's stream, as replies did
    /// before they had streams of their own. Only such conversations are
    /// searched (their state says so), from the request on.
    async fn ended_in_conversation(&self, request: &ReplyRequest) -> Result<bool, ReadError> {
        // No event written today marks a conversation legacy, so a cached state
        // that is not says so for good, without a read.
        let cached = self
            .states
            .get::<ConversationState>(request.conversation_id);
        if matches!(&cached.map(|l| l.state), Some(ConversationState::Live(c)) if !c.legacy_replies)
        {
            return Ok(false);
        }
        let conversation = self
            .load::<ConversationDecider>(request.conversation_id)
            .await?;
        if !matches!(&conversation.state, ConversationState::Live(c) if c.legacy_replies) {
            return Ok(false);
        }
        Ok(self
            .store
            .read_stream_from(request.conversation_id, request.version)
            .await?
            .iter()
            .any(|r| is_legacy_ending(r) && names_reply(r, request.reply_id)))
    }

    /// End a reply (`command` is `Complete` or `Fail`). `Ok(false)` when it had
    /// ended already: one ending per reply, whoever was first.
    pub async fn end_reply(
        &self,
        reply_id: Uuid,
        command: &ReplyCommand,
        context: &CommandContext,
    ) -> Result<bool, AppError<ReplyError>> {
        self.record_reply(reply_id, command, context).await
    }

    async fn record_reply(
        &self,
        reply_id: Uuid,
        command: &ReplyCommand,
        context: &CommandContext,
    ) -> Result<bool, AppError<ReplyError>> {
        match self
            .execute::<ReplyDecider>(reply_id, Expected::Any, command, context, None, None)
            .await
        {
            Ok(_) => Ok(true),
            Err(AppError::Domain(ReplyError::AlreadyEnded)) => Ok(false),
            // The conversation's owner was forgotten while the reply was being
            // written: nothing of theirs is recorded any more.
            Err(AppError::OwnerForgotten) => {
                tracing::info!(%reply_id, "the conversation's owner is forgotten; reply dropped");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The conversation before `request`, as the prompt needs it: user messages
    /// and the answers to them, oldest first, ending with the message answered.
    /// Read backwards from the request only until `budget_chars` characters of
    /// text are gathered. An answer is placed where it was requested, and only
    /// if it was recorded before this request: the same request always gets
    /// the same history.
    ///
    /// What the last prompt of the conversation read is kept (`histories`):
    /// then only the events after it are read, and the endings of the replies
    /// that had not ended yet.
    pub async fn reply_history(
        &self,
        request: &ReplyRequest,
        budget_chars: usize,
    ) -> Result<Vec<ConversationEvent>, ReadError> {
        let conversation = request.conversation_id;
        // A kept window that ends before the request, and the last version in
        // it (so it holds at least one event).
        let kept = self.histories.get(conversation).and_then(|w| {
            let last = w.last_version().filter(|&v| v < request.version)?;
            Some((w, last))
        });
        // The events newest first: from the request back to the kept window
        // (or one page without one), then the window's own.
        let mut newest_first: Vec<Known> = Vec::new();
        let mut owner = None;
        let mut before = request.version + 1;
        loop {
            let limit = match &kept {
                Some((_, last)) => (before - 1 - last).clamp(1, HISTORY_PAGE),
                None => HISTORY_PAGE,
            };
            let (page, named) = self.history_page(conversation, before, limit).await?;
            let Some(oldest) = page.last() else { break };
            before = oldest.version;
            owner = owner.or(named);
            newest_first.extend(page);
            match &kept {
                Some((_, last)) if before > last + 1 => continue,
                _ => break,
            }
        }
        // A window is personal data opened earlier: used only while the
        // owner's key is there, as every read of the store is.
        let mut endings = HashMap::new();
        if let Some((window, last)) = kept {
            let key = match owner {
                Some(owner) => self.keyring.key(owner).await?,
                None => None,
            };
            if key.is_none() {
                self.histories.forget(conversation);
            } else if last == before - 1 {
                newest_first.extend(window.events.iter().rev().cloned());
                before = window.events[0].version;
                endings = window.endings.clone();
            }
        }
        // The request itself is first: answers recorded from there on are not
        // part of its history.
        let cut_off = newest_first.first().map(|k| k.position);

        let mut history: Vec<ConversationEvent> = Vec::new();
        let mut spent = 0;
        let mut walked = 0;
        let mut looked_up = 0;
        while spent <= budget_chars {
            if walked == newest_first.len() {
                if before <= 1 {
                    break;
                }
                let (page, _) = self
                    .history_page(conversation, before, HISTORY_PAGE)
                    .await?;
                let Some(oldest) = page.last() else { break };
                before = oldest.version;
                newest_first.extend(page);
            }
            if walked == looked_up {
                let unknown: Vec<Uuid> = newest_first[walked..]
                    .iter()
                    .filter_map(|k| match &k.event {
                        ConversationEvent::ReplyRequested { reply_id, .. }
                            if !endings.contains_key(reply_id) =>
                        {
                            Some(*reply_id)
                        }
                        _ => None,
                    })
                    .collect();
                self.read_endings(&unknown, &mut endings).await?;
                looked_up = newest_first.len();
            }
            let event = &newest_first[walked].event;
            walked += 1;
            if let ConversationEvent::ReplyRequested { reply_id, .. } = event
                && let Some(Some((recorded_at, answer))) = endings.get(reply_id)
                && cut_off.is_some_and(|c| *recorded_at < c)
            {
                spent += chars(answer);
                history.push(answer.clone());
            }
            if let ConversationEvent::MessagePosted { content, .. }
            | ConversationEvent::ReplyCompleted { content, .. } = event
            {
                spent += content.chars().count();
                history.push(event.clone());
            }
        }
        history.reverse();

        // Keep what this prompt walked, for the next: the next request's
        // budget is spent no further back than this one's (its answers are a
        // superset, its events a longer tail).
        newest_first.truncate(walked);
        newest_first.reverse();
        let requested: std::collections::HashSet<Uuid> = newest_first
            .iter()
            .filter_map(|k| match &k.event {
                ConversationEvent::ReplyRequested { reply_id, .. } => Some(*reply_id),
                _ => None,
            })
            .collect();
        endings.retain(|id, _| requested.contains(id));
        self.histories.put(
            conversation,
            Window {
                events: newest_first,
                endings,
            },
        );
        Ok(history)
    }

    /// Up to `limit` events of `conversation` before version `before`, newest
    /// first and decoded, and the user the newest names as its owner.
    async fn history_page(
        &self,
        conversation: Uuid,
        before: i64,
        limit: i64,
    ) -> Result<(Vec<Known>, Option<Uuid>), ReadError> {
        let page = self
            .store
            .read_stream_backwards(conversation, before, limit)
            .await?;
        let owner = page.first().and_then(owner_named_by);
        Ok((decoded(page)?, owner))
    }

    /// How the replies `replies` ended, for those that have: added to `endings`.
    async fn read_endings(
        &self,
        replies: &[Uuid],
        endings: &mut HashMap<Uuid, Ending>,
    ) -> Result<(), ReadError> {
        if replies.is_empty() {
            return Ok(());
        }
        for recorded in self.store.read_streams(replies).await? {
            let position = recorded.position;
            match codec::decode_owned::<ReplyEvent>(recorded)? {
                ReplyEvent::ReplyCompleted {
                    reply_id,
                    content,
                    model,
                    finish_reason,
                    usage,
                    latency_ms,
                    completed_at,
                    ..
                } => {
                    let answer = ConversationEvent::ReplyCompleted {
                        reply_id,
                        content,
                        model,
                        finish_reason,
                        usage,
                        latency_ms,
                        completed_at,
                    };
                    endings.insert(reply_id, Some((position, answer)));
                }
                ReplyEvent::ReplyFailed { reply_id, .. } => {
                    endings.insert(reply_id, None);
                }
                ReplyEvent::ReplyStarted { .. } => {}
            }
        }
        Ok(())
    }
}

/// A page read from the store, decoded, with each event's place.
fn decoded(page: Vec<RecordedEvent>) -> Result<Vec<Known>, ReadError> {
    page.into_iter()
        .map(|recorded| {
            let (version, position) = (recorded.version, recorded.position);
            let event = codec::decode_owned::<ConversationEvent>(recorded)?;
            Ok(Known {
                version,
                position,
                event,
            })
        })
        .collect()
}

/// The user whose key sealed `recorded` (see `store::sealed`): the
/// conversation's owner, for the events a prompt reads.
fn owner_named_by(recorded: &RecordedEvent) -> Option<Uuid> {
    recorded.metadata.get("user_id")?.as_str()?.parse().ok()
}

fn chars(answer: &ConversationEvent) -> usize {
    match answer {
        ConversationEvent::ReplyCompleted { content, .. } => content.chars().count(),
        _ => 0,
    }
}

fn names_reply(recorded: &RecordedEvent, reply_id: Uuid) -> bool {
    recorded.data["reply_id"].as_str() == Some(&reply_id.to_string())
}

/// An ending appended to the conversation before replies had streams of their own.
fn is_legacy_ending(recorded: &RecordedEvent) -> bool {
    matches!(
        recorded.event_type.as_str(),
        "ReplyCompleted" | "ReplyFailed"
    )
}
