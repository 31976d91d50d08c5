//! What queries share: the read models' database (Postgres or SQLite), the cache, read-your-writes on
//! `X-Consistency-Token`, and the list parameters (`limit`, `after`, `before`,
//! `order`).

use std::{collections::HashMap, time::Duration};

use ai_secretary_projections::{
    Db,
    cache::{Cache, CachedJson, Kind},
    projections::cache::PROJECTION as CACHE,
    read::{Page, Stamped},
};
use axum::{
    extract::{FromRequestParts, Query},
    http::request::Parts,
};
use serde::Serialize;
use uuid::Uuid;

use super::{AppState, CONSISTENCY_TOKEN, error::ApiError, reply::Reply};
use crate::{
    bus::relay::CHECKPOINT as RELAY,
    progress::Progress,
    store::{Position, retrying},
};

#[derive(Clone)]
pub struct ReadSide {
    /// The read models' database: Postgres, or the embedded SQLite file.
    pub db: Db,
    pub cache: Cache,
    pub progress: Progress,
    /// Longest a query waits for its consistency token.
    pub wait_limit: Duration,
    /// For live updates (SSE): NATS subscriptions, or this process's commits.
    pub live: crate::bus::live::Live,
    /// Cancelled when the process begins to shut down: live streams end, so
    /// that they do not hold the graceful shutdown open (clients reconnect,
    /// with `Last-Event-ID`, to another instance).
    pub draining: tokio_util::sync::CancellationToken,
}

impl ReadSide {
    /// Wait until `projections` have applied the command named by `token`.
    pub async fn catch_up(
        &self,
        token: &ConsistencyToken,
        projections: &[&str],
    ) -> Result<(), ApiError> {
        let Some(at) = token.0 else {
            return Ok(());
        };
        if self.progress.wait(projections, at, self.wait_limit).await {
            Ok(())
        } else {
            Err(ApiError::Unavailable(
                "the read side has not caught up with X-Consistency-Token yet; retry shortly"
                    .into(),
            ))
        }
    }

    /// One of the owner's resources through the cache, after waiting for the
    /// projection that serves it to pass `token`.
    ///
    /// The cache is read only when its invalidations are as current as the read
    /// model: past the token if there is one, else at least where the projection
    /// is (and the Redis cache answers from this process's copy only when it can
    /// tell that copy is that current too: `cache::near`). It is never waited for, so a Redis that is down or stalled (or back
    /// with copies from before an outage, not yet tombstoned) costs a query
    /// nothing but the database read. A hit is served as cached; a miss is read
    /// by `load` and kept, unless a newer change has been announced since;
    /// nothing is 404.
    pub async fn one<'a, T, Fut>(
        &'a self,
        token: &ConsistencyToken,
        (kind, projection, what): (Kind, &str, &'static str),
        id: Uuid,
        owner: Uuid,
        load: impl Fn(&'a Db) -> Fut,
    ) -> Result<Reply, ApiError>
    where
        T: Serialize + Stamped,
        Fut: Future<Output = Result<Option<T>, sqlx::Error>>,
    {
        self.catch_up(token, &[projection]).await?;
        let through = token
            .0
            .unwrap_or_else(|| self.progress.position(projection));
        let invalidated = self.progress.position(CACHE.name);
        if invalidated >= through
            && let Some(json) = (self.cache)
                .get_current(kind, id, owner, through, invalidated)
                .await
        {
            return Ok(Reply::found(json));
        }
        let view = self.query(load).await?.ok_or(ApiError::NotFound(what))?;
        let json = CachedJson::of(&serde_json::to_value(&view).map_err(anyhow::Error::from)?);
        self.cache.fill(kind, id, owner, view.stamp(), &json).await;
        Ok(Reply::found(json))
    }
}

impl ReadSide {
    /// Run a read-model query, again while its connection fails under it (a
    /// restart, a failover, a killed backend), as often as the pool can hold
    /// dead connections; then 503 with `Retry-After` (`ApiError` from a
    /// transient error). Queries are reads: repeating one is always safe.
    pub async fn query<'a, T, Fut>(&'a self, read: impl Fn(&'a Db) -> Fut) -> Result<T, ApiError>
    where
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let max_connections = match &self.db {
            Db::Postgres(pool) => pool.options().get_max_connections(),
            Db::Sqlite(lite) => lite.pool.options().get_max_connections(),
        };
        Ok(retrying(max_connections + 1, || read(&self.db)).await?)
    }
}

/// The `X-Consistency-Token` a client sent back, if any.
pub struct ConsistencyToken(pub Option<Position>);

impl FromRequestParts<AppState> for ConsistencyToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(CONSISTENCY_TOKEN) else {
            return Ok(ConsistencyToken(None));
        };
        let not_issued =
            || ApiError::BadRequest("X-Consistency-Token must be a token this API returned".into());
        let at: Position = value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(not_issued)?;
        // A position past the store's last event was never issued (or names
        // events a restore took away): no wait would reach it. Asked only
        // while the relay has not passed the token, so a query after an older
        // command costs nothing more.
        if !state.read.progress.reached(&[RELAY], at)
            && state.commands.head().await?.is_none_or(|head| at > head)
        {
            return Err(not_issued());
        }
        Ok(ConsistencyToken(Some(at)))
    }
}

/// `?limit&after&before&order` of a list, validated.
pub struct ListParams(pub Page);

impl<S: Send + Sync> FromRequestParts<S> for ListParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(raw) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        ListParams::parse(&raw, true)
    }
}

impl ListParams {
    /// `descending` is the list's default order.
    pub fn parse(raw: &HashMap<String, String>, descending: bool) -> Result<Self, ApiError> {
        let limit = match raw.get("limit") {
            None => 20,
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=100).contains(l))
                .ok_or_else(|| {
                    ApiError::invalid_field("/limit", "must be an integer from 1 to 100")
                })?,
        };
        let cursor = |name: &str| -> Result<Option<Uuid>, ApiError> {
            raw.get(name)
                .map(|v| {
                    v.parse().map_err(|_| {
                        ApiError::invalid_field(&format!("/{name}"), "must be an id from this list")
                    })
                })
                .transpose()
        };
        let descending = match raw.get("order").map(String::as_str) {
            None => descending,
            Some("desc") => true,
            Some("asc") => false,
            Some(_) => return Err(ApiError::invalid_field("/order", "must be asc or desc")),
        };
        Ok(ListParams(Page {
            limit,
            after: cursor("after")?,
            before: cursor("before")?,
            descending,
        }))
    }
}

/// Query parameters as given, for handlers that take more than a page.
pub struct RawQuery(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for RawQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|Query(raw)| RawQuery(raw))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}
