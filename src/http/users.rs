//! Accounts: register, exchange credentials for a bearer token, read one's
//! profile, be forgotten.

use ai_secretary_projections::{
    cache::{CachedJson, Kind},
    projections::cache::PROJECTION as CACHE,
};
use axum::{Json, extract::State, http::StatusCode, response::Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    command::Invocation,
    error::{ApiError, Problem},
    extract::{ApiJson, AuthUser, CorrelationId, SignedIn},
    idempotency::IdempotencyKey,
    openapi::IdempotencyParam,
    reply::Reply,
};
use crate::{
    app::{self, logins::LoginError},
    domain::user::{User as Account, UserDecider, UserState},
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(me, forget_me))
        .routes(routes!(token))
}

/// A new account.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "email": "ada@example.com", "password": "correct horse battery", "display_name": "Ada"
}))]
struct Registration {
    /// The account's email (its login): unique, compared case-insensitively.
    #[serde(default)]
    #[schema(required, format = "email")]
    email: String,
    /// 8 to 128 characters, not easily guessed.
    #[serde(default)]
    #[schema(required, min_length = 8, max_length = 128)]
    password: String,
    /// How the assistants address the user: one line.
    #[serde(default)]
    #[schema(required)]
    display_name: String,
}

/// An account.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({
    "id": "0193a5bf-1c2d-7e3f-8a9b-0c1d2e3f4a5b", "object": "user", "email": "ada@example.com",
    "display_name": "Ada", "created_at": "2026-11-30T09:00:00Z", "version": 1
}))]
struct User {
    id: Uuid,
    /// Always `user`.
    #[schema(example = "user")]
    object: &'static str,
    email: String,
    display_name: String,
    created_at: DateTime<Utc>,
    /// The account's version (its ETag).
    version: i64,
}

fn user_json(state: &UserState, version: i64) -> Value {
    match state {
        UserState::Registered(u) => serde_json::to_value(User {
            id: u.id,
            object: "user",
            email: u.email.clone(),
            display_name: u.display_name.clone(),
            created_at: u.created_at,
            version,
        })
        .unwrap_or(Value::Null),
        UserState::Unregistered | UserState::Forgotten => Value::Null,
    }
}

/// Register an account.
#[utoipa::path(
    post,
    path = "/users",
    tag = "users",
    params(IdempotencyParam),
    request_body = Registration,
    responses(
        (status = 201, description = "The account", body = User, headers(
            ("ETag" = String, description = "The account's version, quoted"),
            ("Location" = String, description = "/api/v1/users/me"),
        )),
        (status = 409, description = "An account with this email exists", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
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

/// An account's email and password.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "ada@example.com", "password": "correct horse battery"}))]
struct Credentials {
    #[serde(default)]
    #[schema(required)]
    email: String,
    #[serde(default)]
    #[schema(required)]
    password: String,
}

/// A bearer token for the API.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"access_token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOi4uLn0.c2lnbmF0dXJl",
                          "token_type": "Bearer", "expires_in": 3600}))]
struct AccessToken {
    /// Sent as `Authorization: Bearer <access_token>`.
    access_token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    token_type: &'static str,
    /// Seconds until it expires.
    expires_in: u64,
}

const BAD_CREDENTIALS: ApiError = ApiError::Unauthorized("the email or password is wrong");

/// A login, with the lockout of repeated failures (`app::logins`).
async fn login(state: &AppState, email: &str, password: String) -> Result<Account, ApiError> {
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

/// The proof that the caller is the account's owner right now. Optional: a
/// token issued in the last five minutes needs none.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"password": "correct horse battery"}))]
struct Reauthentication {
    /// The account's password, checked as a login is (the lockout included).
    #[serde(default)]
    password: Option<String>,
}

/// Forget the caller ("forget me").
///
/// Their data key is destroyed, so what they wrote reads as forgotten
/// everywhere; read models and caches drop it; their email may register
/// again; their tokens stop working. Asks for the password again, or a token
/// issued in the last five minutes.
#[utoipa::path(
    delete,
    path = "/users/me",
    tag = "users",
    security(("bearer" = [])),
    params(IdempotencyParam),
    request_body(
        content = Option<Reauthentication>,
        description = "The password, unless the token is under five minutes old",
        example = json!({"password": "correct horse battery"}),
    ),
    responses(
        (status = 204, description = "Forgotten"),
        (status = 401, description = "No proof (the password, or a recent token), or a wrong password",
            body = Problem, content_type = "application/problem+json"),
    ),
)]
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

/// Exchange an email and password for a bearer token.
///
/// Repeated wrong passwords lock the account's logins for a while (429 with
/// `Retry-After`), doubling each time.
#[utoipa::path(
    post,
    path = "/auth/token",
    tag = "users",
    request_body = Credentials,
    responses(
        (status = 200, description = "A token", body = AccessToken),
        (status = 401, description = "The email or password is wrong", body = Problem,
            content_type = "application/problem+json"),
    ),
)]
async fn token(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Json<AccessToken>, ApiError> {
    let user = login(&state, &body.email, body.password).await?;
    let access_token = state.tokens.issue(user.id, Utc::now())?;
    Ok(Json(AccessToken {
        access_token,
        token_type: "Bearer",
        expires_in: state.tokens.lifetime().as_secs(),
    }))
}

/// The caller's profile.
///
/// From the cache, else from their own stream (always current, so no
/// consistency token is needed).
#[utoipa::path(
    get,
    path = "/users/me",
    tag = "users",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's account", body = User, headers(
            ("ETag" = String, description = "The account's version, quoted"),
        )),
    ),
)]
async fn me(State(state): State<AppState>, AuthUser(user_id): AuthUser) -> Result<Reply, ApiError> {
    let cache = &state.read.cache;
    // As current as the cache's invalidations are known to be; nothing the
    // caller did waits on them (the stream below is read if this misses).
    let invalidated = state.read.progress.position(CACHE.name);
    if let Some(json) = cache
        .get_current(Kind::User, user_id, user_id, invalidated, invalidated)
        .await
    {
        return Ok(Reply::found(json));
    }
    let loaded = state.commands.load::<UserDecider>(user_id).await?;
    if matches!(loaded.state, UserState::Unregistered) {
        return Err(ApiError::Unauthorized("the token's account does not exist"));
    }
    let json = CachedJson::of(&user_json(&loaded.state, loaded.version));
    if let Some(at) = loaded.position {
        cache.fill(Kind::User, user_id, user_id, at, &json).await;
    }
    Ok(Reply::found(json))
}
