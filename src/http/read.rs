//! What queries share: the read models' pool, the cache, read-your-writes on
//! `X-Consistency-Token`, and the list parameters (`limit`, `after`, `before`,
//! `order`).

use std::{collections::HashMap, time::Duration};

use ai_secretary_projections::{
    cache::{Cache, Kind},
    read::{Page, Stamped},
};
use axum::{
    extract::{FromRequestParts, Query},
    http::request::Parts,
};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{CONSISTENCY_TOKEN, error::ApiError, reply::Reply};
use crate::{progress::Progress, store::Position};

#[derive(Clone)]
pub struct ReadSide {
    pub pool: PgPool,
    pub cache: Cache,
    pub progress: Progress,
    /// Longest a query waits for its consistency token.
    pub wait_limit: Duration,
    /// For live updates (SSE): core NATS subscriptions on the event subjects.
    pub nats: async_nats::Client,
    pub subject_prefix: String,
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
    /// projection that serves it (and the cache's) to pass `token`. A hit is served
    /// as cached; a miss is read by `load` and kept, unless a newer change has been
    /// announced since; nothing is 404.
    pub async fn one<T, F>(
        &self,
        token: &ConsistencyToken,
        (kind, projection, what): (Kind, &str, &'static str),
        id: Uuid,
        owner: Uuid,
        load: F,
    ) -> Result<Reply, ApiError>
    where
        T: Serialize + Stamped,
        F: AsyncFnOnce() -> Result<Option<T>, sqlx::Error>,
    {
        self.catch_up(token, &[projection, "cache"]).await?;
        if let Some(json) = self.cache.get(kind, id, owner).await {
            return Ok(Reply::found(json));
        }
        let view = load().await?.ok_or(ApiError::NotFound(what))?;
        let json = serde_json::to_value(&view).map_err(anyhow::Error::from)?;
        self.cache.fill(kind, id, owner, view.stamp(), &json).await;
        Ok(Reply::found(json))
    }
}

/// The `X-Consistency-Token` a client sent back, if any.
pub struct ConsistencyToken(pub Option<Position>);

impl<S: Send + Sync> FromRequestParts<S> for ConsistencyToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(CONSISTENCY_TOKEN) else {
            return Ok(ConsistencyToken(None));
        };
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .map(|p| ConsistencyToken(Some(p)))
            .ok_or_else(|| {
                ApiError::BadRequest("X-Consistency-Token must be a token this API returned".into())
            })
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
