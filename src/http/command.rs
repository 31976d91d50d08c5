//! Running a command for an HTTP request: the caller's identity and correlation id
//! become event metadata, the Idempotency-Key protocol wraps the execution, and
//! the resulting state is rendered once for the reply and for idempotent replay.

use futures_util::future::BoxFuture;

use axum::{
    extract::FromRequestParts,
    http::request::Parts,
    response::{IntoResponse, Response},
};
use uuid::Uuid;

use super::{
    AppState,
    error::ApiError,
    extract::{AuthUser, CorrelationId, IdPath, IfMatch},
    idempotency::IdempotencyKey,
    reply::Reply,
};
use crate::{
    app::{AppError, CommandContext, Decided, Expected, Remember, Weigh},
    domain::{Decider, DomainError},
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
        render: impl Fn(&D::State, i64) -> Reply + Sync,
    ) -> Result<Response, ApiError>
    where
        D::State: Weigh,
    {
        let commands = self.state.commands.clone();
        self.run(render, move |context, remember| {
            Box::pin(async move {
                commands
                    .execute::<D>(stream_id, expected, &command, context, None, remember)
                    .await
            })
        })
        .await
    }

    /// Run an app use case (`use_case(context, remember)`) as the caller and
    /// answer with `render` of the state it leaves, inside the Idempotency-Key
    /// protocol: `remember` keeps the rendered response with the events.
    pub async fn run<S, E: DomainError>(
        self,
        render: impl Fn(&S, i64) -> Reply + Sync,
        use_case: impl for<'c> FnOnce(
            &'c CommandContext,
            Option<Remember<'c, S>>,
        ) -> BoxFuture<'c, Result<Decided<S>, AppError<E>>>
        + Send,
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
                causation_id: None,
                user_id: Some(user_id),
                idempotency_key: key.key().map(Into::into),
            };
            let recorder = key.recorder(owner, state.idempotency_ttl, &render);
            let done = use_case(&context, recorder.as_ref().map(|f| f as _)).await?;
            Ok(render(&done.state, done.version)
                .at(done.position)
                .into_response())
        })
        .await
    }
}

/// A signed-in caller about to run a command: state, identity, correlation id and
/// idempotency key, taken from the request in one extractor.
pub struct Caller {
    state: AppState,
    pub user: Uuid,
    correlation_id: String,
    key: IdempotencyKey,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Only the account's own token, and only while the account exists.
        let AuthUser(user) = AuthUser::from_request_parts(parts, state).await?;
        let CorrelationId(correlation_id) = CorrelationId::from_request_parts(parts, state).await?;
        let key = IdempotencyKey::from_request_parts(parts, state).await?;
        Ok(Caller {
            state: state.clone(),
            user,
            correlation_id,
            key,
        })
    }
}

impl Caller {
    /// Run `command` on stream `stream_id` as the caller, answering with `render`.
    pub async fn execute<D: Decider>(
        self,
        stream_id: Uuid,
        expected: Expected,
        command: D::Command,
        render: impl Fn(&D::State, i64) -> Reply + Sync,
    ) -> Result<Response, ApiError>
    where
        D::State: Weigh,
    {
        self.invocation()
            .execute::<D>(stream_id, expected, command, render)
            .await
    }

    pub fn commands(&self) -> &crate::app::Commands {
        &self.state.commands
    }

    /// The caller's invocation of an app use case (see [`Invocation::run`]).
    pub fn invocation(&self) -> Invocation<'_> {
        Invocation::by_owner(
            &self.state,
            self.user,
            self.correlation_id.clone(),
            &self.key,
        )
    }
}

/// A caller's command on the resource named by the path's `{id}`, with the
/// version `If-Match` expects.
pub struct OnResource {
    caller: Caller,
    pub id: Uuid,
    expected: Expected,
}

impl FromRequestParts<AppState> for OnResource {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let IdPath(id) = IdPath::from_request_parts(parts, state).await?;
        let IfMatch(expected) = IfMatch::from_request_parts(parts, state).await?;
        Ok(OnResource {
            caller,
            id,
            expected,
        })
    }
}

impl OnResource {
    pub fn user(&self) -> Uuid {
        self.caller.user
    }

    pub async fn execute<D: Decider>(
        self,
        command: D::Command,
        render: impl Fn(&D::State, i64) -> Reply + Sync,
    ) -> Result<Response, ApiError>
    where
        D::State: Weigh,
    {
        self.caller
            .execute::<D>(self.id, self.expected, command, render)
            .await
    }
}
