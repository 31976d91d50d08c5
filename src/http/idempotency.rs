//! `Idempotency-Key` on POST: a retry gets the first response back, the same key
//! with another request gets 422, and a retry while the first is still running gets
//! 409. The first response is written in the same transaction as the command's
//! events (see `store::AppendRequest::idempotency`), so a key can never append twice,
//! even across replicas: the loser of that race replays the winner's response.
//!
//! Only successful responses are kept; a refused command (4xx) can be retried with
//! the same key and is decided again.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{FromRequestParts, Request},
    http::{HeaderMap, Method, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{AppState, BODY_LIMIT, error::ApiError, reply::Reply};
use crate::store::IdempotencyRecord;

const HEADER: &str = "idempotency-key";

/// sha256 of method, path and body, computed by [`fingerprint`] for keyed requests.
#[derive(Clone)]
struct Fingerprint(Vec<u8>);

/// Middleware: buffer the body of a keyed POST once and fingerprint it.
pub async fn fingerprint(request: Request, next: Next) -> Response {
    if request.method() != Method::POST || !request.headers().contains_key(HEADER) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return ApiError::PayloadTooLarge { limit: BODY_LIMIT }.into_response();
    };
    let mut hash = Sha256::new();
    hash.update(parts.method.as_str());
    hash.update(b"\n");
    hash.update(parts.uri.path());
    hash.update(b"\n");
    hash.update(&bytes);
    parts
        .extensions
        .insert(Fingerprint(hash.finalize().to_vec()));
    next.run(Request::from_parts(parts, bytes.into())).await
}

/// Keys of requests being executed by this process.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Mutex<HashSet<(Uuid, String)>>>);

/// The request's idempotency key, if it has one.
pub struct IdempotencyKey(Option<Keyed>);

pub struct Keyed {
    key: String,
    fingerprint: Vec<u8>,
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // The protocol is for POST; other methods are idempotent by nature.
        if parts.method != Method::POST {
            return Ok(IdempotencyKey(None));
        }
        let Some(key) = key_of(&parts.headers)? else {
            return Ok(IdempotencyKey(None));
        };
        let fingerprint = parts
            .extensions
            .get::<Fingerprint>()
            .map(|f| f.0.clone())
            .unwrap_or_default();
        Ok(IdempotencyKey(Some(Keyed { key, fingerprint })))
    }
}

fn key_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        )),
    }
}

impl IdempotencyKey {
    pub fn key(&self) -> Option<&str> {
        self.0.as_ref().map(|k| k.key.as_str())
    }

    /// The recorder a command uses to keep its response, if the request is keyed.
    /// The record keeps the response for `ttl` (`IDEMPOTENCY_KEY_TTL_SECONDS`).
    pub fn recorder<'a, S>(
        &'a self,
        owner: Uuid,
        ttl: std::time::Duration,
        render: &'a (impl Fn(&S, i64) -> Reply + Sync),
    ) -> Option<impl Fn(&S, i64) -> IdempotencyRecord + Send + Sync + 'a> {
        let keyed = self.0.as_ref()?;
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        Some(move |state: &S, version: i64| IdempotencyRecord {
            owner_id: owner,
            key: keyed.key.clone(),
            request_hash: keyed.fingerprint.clone(),
            response: render(state, version).to_stored(),
            expires_at: chrono::Utc::now()
                .checked_add_signed(ttl)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
        })
    }

    /// Run a keyed command at most once; an unkeyed one simply runs.
    pub async fn run(
        &self,
        state: &AppState,
        owner: Uuid,
        command: impl AsyncFnOnce() -> Result<Response, ApiError>,
    ) -> Result<Response, ApiError> {
        let Some(keyed) = &self.0 else {
            return command().await;
        };
        if let Some(replay) = replay(state, owner, keyed).await? {
            return Ok(replay);
        }
        let entry = (owner, keyed.key.clone());
        if !lock(&state.in_flight).insert(entry.clone()) {
            return Err(ApiError::IdempotencyKeyTaken);
        }
        let _done = Release(&state.in_flight, entry);
        match command().await {
            // Another replica committed this key first: answer as it did.
            Err(ApiError::IdempotencyKeyTaken) => replay(state, owner, keyed)
                .await?
                .ok_or(ApiError::IdempotencyKeyTaken),
            other => other,
        }
    }
}

async fn replay(
    state: &AppState,
    owner: Uuid,
    keyed: &Keyed,
) -> Result<Option<Response>, ApiError> {
    let Some((hash, stored)) = state.commands.find_idempotency(owner, &keyed.key).await? else {
        return Ok(None);
    };
    if hash != keyed.fingerprint {
        return Err(ApiError::invalid_field(
            "",
            "this Idempotency-Key was used with a different request",
        ));
    }
    Ok(Some(Reply::replay(stored)))
}

fn lock(in_flight: &InFlight) -> std::sync::MutexGuard<'_, HashSet<(Uuid, String)>> {
    // A panic while holding this lock cannot leave the set inconsistent.
    in_flight.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes a key from the in-flight set when the request ends, however it ends.
struct Release<'a>(&'a InFlight, (Uuid, String));

impl Drop for Release<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}
