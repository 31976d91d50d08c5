//! Accounts: register, exchange credentials for a bearer token, read one's profile.

use ai_secretary_projections::cache::Kind;
use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::Response,
    routing::{get, post},
};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    AppState,
    command::Invocation,
    error::ApiError,
    extract::{ApiJson, AuthUser, CorrelationId},
    idempotency::IdempotencyKey,
    reply::Reply,
};
use crate::{
    app::{self, logins::LoginError},
    domain::user::{UserDecider, UserState},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", post(register))
        .route("/users/me", get(me))
        .route("/auth/token", post(token))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    display_name: String,
}

fn user_json(state: &UserState, version: i64) -> Value {
    match state {
        UserState::Registered(u) => json!({
            "id": u.id,
            "object": "user",
            "email": u.email,
            "display_name": u.display_name,
            "created_at": u.created_at,
            "version": version,
        }),
        UserState::Unregistered => Value::Null,
    }
}

async fn register(
    State(state): State<AppState>,
    CorrelationId(correlation_id): CorrelationId,
    key: IdempotencyKey,
    ApiJson(body): ApiJson<Registration>,
) -> Result<Response, ApiError> {
    let user_id = Uuid::now_v7();
    let registration = app::users::Registration {
        user_id,
        email: body.email,
        display_name: body.display_name,
        password: body.password,
        at: Utc::now(),
    };
    let render = |s: &UserState, v: i64| {
        Reply::new(StatusCode::CREATED, user_json(s, v))
            .version(v)
            .location("/api/v1/users/me".into())
    };
    let invocation = Invocation {
        state: &state,
        // Registration is anonymous: its idempotency keys live in the nil owner's space.
        owner: Uuid::nil(),
        user_id,
        correlation_id,
        key: &key,
    };
    let commands = state.commands.clone();
    invocation
        .run(render, move |context, remember| {
            Box::pin(async move { commands.register(registration, context, remember).await })
        })
        .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

const BAD_CREDENTIALS: ApiError = ApiError::Unauthorized("the email or password is wrong");

async fn token(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Json<Value>, ApiError> {
    let user = match state.logins.login(&body.email, body.password).await {
        Ok(user) => user,
        Err(LoginError::BadCredentials) => return Err(BAD_CREDENTIALS),
        Err(LoginError::LockedOut { retry_after }) => {
            return Err(ApiError::TooManyRequests {
                detail: "too many failed logins for this account; try again later".into(),
                retry_after,
            });
        }
        Err(LoginError::Read(e)) => return Err(e.into()),
    };
    let access_token = state.tokens.issue(user.id, Utc::now())?;
    Ok(Json(json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": state.tokens.lifetime().as_secs(),
    })))
}

/// The caller's profile: from the cache, else from their own stream (always
/// current, so no consistency token is needed).
async fn me(State(state): State<AppState>, AuthUser(user_id): AuthUser) -> Result<Reply, ApiError> {
    let cache = &state.read.cache;
    if let Some(json) = cache.get(Kind::User, user_id, user_id).await {
        return Ok(Reply::found(json));
    }
    let loaded = state.commands.load::<UserDecider>(user_id).await?;
    if matches!(loaded.state, UserState::Unregistered) {
        return Err(ApiError::Unauthorized("the token's account does not exist"));
    }
    let json = user_json(&loaded.state, loaded.version);
    if let Some(at) = loaded.position {
        cache
            .fill(Kind::User, user_id, user_id, at.into(), &json)
            .await;
    }
    Ok(Reply::found(json))
}
