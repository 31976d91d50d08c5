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

use super::{AppError, CommandContext, Commands, Expected, ReadError};
use crate::{
    domain::{
        conversation::{ConversationDecider, ConversationEvent, ConversationState},
        reply::{ReplyCommand, ReplyDecider, ReplyError, ReplyEvent, ReplyState},
    },
    store::{Position, RecordedEvent, codec},
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
    pub async fn reply_history(
        &self,
        request: &ReplyRequest,
        budget_chars: usize,
    ) -> Result<Vec<ConversationEvent>, ReadError> {
        let mut newest_first: Vec<ConversationEvent> = Vec::new();
        let mut spent = 0;
        // The first page starts at the request itself: its position is the
        // cut-off for answers recorded later.
        let mut before = request.version + 1;
        let mut requested_at: Option<Position> = None;
        while spent <= budget_chars && before > 1 {
            let page = self
                .store
                .read_stream_backwards(request.conversation_id, before, HISTORY_PAGE)
                .await?;
            let Some(oldest) = page.last() else { break };
            before = oldest.version;
            requested_at = requested_at.or(page.first().map(|r| r.position));
            let answers = self.answers(&page, requested_at).await?;
            for recorded in page {
                let event = codec::decode_owned::<ConversationEvent>(recorded)?;
                let text = match &event {
                    ConversationEvent::MessagePosted { content, .. }
                    | ConversationEvent::ReplyCompleted { content, .. } => Some(content),
                    _ => None,
                };
                let answer = match &event {
                    ConversationEvent::ReplyRequested { reply_id, .. } => answers.get(reply_id),
                    _ => None,
                };
                if let Some(answer) = answer {
                    spent += chars(answer);
                    newest_first.push(answer.clone());
                }
                if let Some(text) = text {
                    spent += text.chars().count();
                    newest_first.push(event);
                }
                if spent > budget_chars {
                    break;
                }
            }
        }
        newest_first.reverse();
        Ok(newest_first)
    }

    /// The answers (as the prompt reads them) to the replies requested on
    /// `page`, recorded before `cut_off`, by reply id.
    async fn answers(
        &self,
        page: &[RecordedEvent],
        cut_off: Option<Position>,
    ) -> Result<HashMap<Uuid, ConversationEvent>, ReadError> {
        let requested: Vec<Uuid> = page
            .iter()
            .filter(|r| r.event_type == "ReplyRequested")
            .map(|r| r.data["reply_id"].as_str().and_then(|id| id.parse().ok()))
            .collect::<Option<_>>()
            .unwrap_or_default();
        let mut answers = HashMap::new();
        for recorded in self.store.read_streams(&requested).await? {
            if cut_off.is_some_and(|c| recorded.position >= c) {
                continue;
            }
            if let ReplyEvent::ReplyCompleted {
                reply_id,
                content,
                model,
                finish_reason,
                usage,
                latency_ms,
                completed_at,
                ..
            } = codec::decode_owned::<ReplyEvent>(recorded)?
            {
                answers.insert(
                    reply_id,
                    ConversationEvent::ReplyCompleted {
                        reply_id,
                        content,
                        model,
                        finish_reason,
                        usage,
                        latency_ms,
                        completed_at,
                    },
                );
            }
        }
        Ok(answers)
    }
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
