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
    extract::{ApiJson, AuthUser, CorrelationId, SignedIn},
    idempotency::IdempotencyKey,
    reply::Reply,
};
use crate::{
    app::{self, logins::LoginError},
    domain::user::{User, UserDecider, UserState},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", post(register))
        .route("/users/me", get(me).delete(forget_me))
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
        UserState::Unregistered | UserState::Forgotten => Value::Null,
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

/// A login, with the lockout of repeated failures (`app::logins`).
async fn login(state: &AppState, email: &str, password: String) -> Result<User, ApiError> {
    match state.logins.login(email, password).await {
        Ok(user) => Ok(user),
        Err(LoginError::BadCredentials) => Err(BAD_CREDENTIALS),
        Err(LoginError::LockedOut { retry_after }) => Err(ApiError::TooManyRequests {
            detail: "too many failed logins for this account; try again later".into(),
            retry_after,
        }),
        Err(LoginError::Read(e)) => Err(e.into()),
    }
}

/// How recent a token must be to forget its account without the password.
const RECENT_SIGN_IN: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// `DELETE /users/me`'s proof that the caller is the account's owner right now.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reauthentication {
    #[serde(default)]
    password: Option<String>,
}

/// Forget the caller ("forget me"): their key is destroyed, so what they wrote
/// reads as forgotten everywhere, read models and caches drop it, their email
/// may register again, and their tokens stop working. Asks for the password
/// again (a body `{"password": …}`, checked as a login is, lockout included),
/// or a token issued in the last five minutes.
async fn forget_me(
    State(state): State<AppState>,
    SignedIn { user, issued_at }: SignedIn,
    CorrelationId(correlation_id): CorrelationId,
    key: IdempotencyKey,
    body: Option<ApiJson<Reauthentication>>,
) -> Result<Response, ApiError> {
    match body.and_then(|ApiJson(b)| b.password) {
        Some(password) => {
            let email = match state.commands.user(user).await? {
                Some(account) => account.email,
                None => return Err(ApiError::Unauthorized("the token's account does not exist")),
            };
            if login(&state, &email, password).await?.id != user {
                return Err(BAD_CREDENTIALS);
            }
        }
        None if Utc::now() - issued_at <= RECENT_SIGN_IN => {}
        None => {
            return Err(ApiError::Unauthorized(
                "forgetting an account needs its password ({\"password\": …}) or a token issued in the last 5 minutes",
            ));
        }
    }
    let commands = state.commands.clone();
    Invocation::by_owner(&state, user, correlation_id, &key)
        .run(
            |_: &UserState, _| Reply::no_content(),
            move |context, _remember| {
                Box::pin(async move { commands.forget(user, Utc::now(), context).await })
            },
        )
        .await
}
async fn token(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Json<Value>, ApiError> {
    let user = login(&state, &body.email, body.password).await?;
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
        cache.fill(Kind::User, user_id, user_id, at, &json).await;
    }
    Ok(Reply::found(json))
}
