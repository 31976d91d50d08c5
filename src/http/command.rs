//! Running a command for an HTTP request: the caller's identity and correlation id
//! become event metadata, the Idempotency-Key protocol wraps the execution, and
//! the resulting state is rendered once for the reply and for idempotent replay.

use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use super::{AppState, error::ApiError, idempotency::IdempotencyKey, reply::Reply};
use crate::{
    app::{CommandContext, Expected},
    domain::Decider,
    store::Reservation,
};

/// Who runs a command and how the request identified itself.
pub struct Invocation<'a> {
    pub state: &'a AppState,
    /// Whose idempotency keys these are (the nil id for anonymous requests).
    pub owner: Uuid,
    /// The user the events are attributed to.
    pub user_id: Uuid,
    pub correlation_id: String,
    pub key: &'a IdempotencyKey,
}

impl<'a> Invocation<'a> {
    /// A signed-in user acting on their own resources.
    pub fn by_owner(
        state: &'a AppState,
        user: Uuid,
        correlation_id: String,
        key: &'a IdempotencyKey,
    ) -> Self {
        Invocation {
            state,
            owner: user,
            user_id: user,
            correlation_id,
            key,
        }
    }

    /// Execute `command` on stream `stream_id` and answer with `render` of the result.
    pub async fn execute<D: Decider>(
        self,
        stream_id: Uuid,
        expected: Expected,
        command: D::Command,
        reservation: Option<Reservation>,
        render: impl Fn(&D::State, i64) -> Reply + Sync,
    ) -> Result<Response, ApiError> {
        let Invocation {
            state,
            owner,
            user_id,
            correlation_id,
            key,
        } = self;
        key.run(state, owner, async || {
            let context = CommandContext {
                correlation_id,
                user_id: Some(user_id),
                idempotency_key: key.key().map(Into::into),
            };
            let recorder = key.recorder(owner, &render);
            let done = state
                .commands
                .execute::<D>(
                    stream_id,
                    expected,
                    &command,
                    &context,
                    reservation,
                    recorder.as_ref().map(|f| f as _),
                )
                .await?;
            Ok(render(&done.state, done.version)
                .at(done.position)
                .into_response())
        })
        .await
    }
}
