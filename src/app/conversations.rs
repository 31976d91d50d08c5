//! Conversations: starting one needs its assistant's own stream (the authority
//! on whether it may take a new conversation), and reading one is for its owner
//! only.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{AppError, CommandContext, Commands, Decided, Expected, Loaded, ReadError, Remember};
use crate::{
    domain::{
        assistant::{AssistantDecider, AssistantState},
        conversation::{
            Conversation, ConversationCommand, ConversationDecider, ConversationError,
            ConversationState,
        },
    },
    store::{Position, RecordedEvent},
};

/// How long an assistant the store showed is taken as it was when starting
/// a conversation with it, without asking the store again: how late, at most,
/// a start in this process sees what another process did to the assistant
/// (archived or deleted it). This process's own changes are seen at once (its
/// appends go into the state cache). Asking on every start was a query per
/// command, some 8 % of the service's CPU under load (docs/benchmarks.md);
/// the same bound as `ACCOUNT_RECHECK`, for the same kind of fact.
pub const ASSISTANT_RECHECK: Duration = Duration::from_secs(1);

impl Commands {
    /// Start conversation `conversation_id` (just generated) with `assistant_id`,
    /// as the assistant's stream has it (at most [`ASSISTANT_RECHECK`] ago).
    /// The decider checks ownership and status; a concurrent archive of the
    /// assistant can slip between that read and the append (docs/decisions.md).
    #[allow(clippy::too_many_arguments)]
    pub async fn start_conversation(
        &self,
        conversation_id: Uuid,
        actor: Uuid,
        assistant_id: Uuid,
        title: Option<String>,
        at: DateTime<Utc>,
        context: &CommandContext,
        remember: Option<Remember<'_, ConversationState>>,
    ) -> Result<Decided<ConversationState>, AppError<ConversationError>> {
        let start = async |assistant, title| {
            let command = ConversationCommand::Start {
                conversation_id,
                actor,
                assistant,
                title,
                at,
            };
            self.execute::<ConversationDecider>(
                conversation_id,
                Expected::New,
                &command,
                context,
                None,
                remember,
            )
            .await
        };
        // First on the assistant as the store showed it within
        // `ASSISTANT_RECHECK`, if this process has it so. A refusal made on
        // that is made again on the store's answer: a cached state proves
        // nothing against a start (the assistant may have been made, or
        // unarchived, elsewhere since).
        if let Some(recent) = self
            .states
            .checked_within::<AssistantState>(assistant_id, ASSISTANT_RECHECK)
        {
            match start(recent.state, title.clone()).await {
                Err(AppError::Domain(_)) => {}
                started => return started,
            }
        }
        let assistant = self.load::<AssistantDecider>(assistant_id).await?.state;
        start(assistant, title).await
    }

    /// Who owns a conversation (whose key seals what is written in it).
    pub async fn conversation_owner(
        &self,
        conversation_id: Uuid,
    ) -> Result<Option<Uuid>, ReadError> {
        Ok(
            match self
                .load::<ConversationDecider>(conversation_id)
                .await?
                .state
            {
                ConversationState::Live(c) => Some(c.owner_id),
                ConversationState::Absent => None,
            },
        )
    }

    /// `actor`'s conversation as its stream has it now (always current, so a
    /// conversation just started can be followed at once); not found for anyone
    /// else.
    pub async fn conversation_of(
        &self,
        actor: Uuid,
        conversation_id: Uuid,
    ) -> Result<Loaded<Conversation>, AppError<ConversationError>> {
        let loaded = self.load::<ConversationDecider>(conversation_id).await?;
        let conversation = loaded
            .state
            .owned_by(actor)
            .map_err(AppError::Domain)?
            .clone();
        Ok(Loaded {
            state: conversation,
            version: loaded.version,
            position: loaded.position,
        })
    }

    /// The conversation's live feed after `after`: its own events and its
    /// replies', in commit order, at most `limit` (what a reconnecting client
    /// missed; see `EventStore::read_conversation_feed`).
    pub async fn conversation_feed(
        &self,
        conversation_id: Uuid,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        Ok(self
            .store
            .read_conversation_feed(conversation_id, after, limit)
            .await?)
    }

    /// Where a live client that last saw `last_event_id` resumes: that commit
    /// position, or, for an id from before positions (a bare conversation
    /// version), the position of that version's event. `None` for an id that is
    /// neither (the client starts from now).
    pub async fn feed_resume_point(
        &self,
        conversation_id: Uuid,
        last_event_id: &str,
    ) -> Result<Option<Position>, ReadError> {
        if let Ok(position) = last_event_id.parse::<Position>() {
            return Ok(Some(position));
        }
        let Ok(version) = last_event_id.parse::<i64>() else {
            return Ok(None);
        };
        if version < 1 {
            return Ok(Some(Position::START));
        }
        Ok(self
            .store
            .read_stream_backwards(conversation_id, version + 1, 1)
            .await?
            .first()
            .map(|r| r.position))
    }
}
