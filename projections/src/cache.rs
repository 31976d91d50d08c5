//! Redis caches of single resources (`<prefix>:user:<id>`, `:assistant:<id>`,
//! `:conversation:<id>`), each a hash holding the JSON a query returns (`json`),
//! its owner, and a stamp: the commit position it is current as of.
//!
//! The `cache` projection does not write values: on each event it stamps the
//! keys the event touches with the event's position and drops their JSON (a
//! tombstone). Queries read through: a hit is served; a miss or tombstone is read
//! from Postgres and filled only if the row is at least as new as the stamp. So a
//! query that read a row just before a projection moved it can never put the old
//! copy back, whatever order the two race in. With Redis down, every read is a
//! miss and queries answer from Postgres; `ping()` and the `cache_available` gauge say so.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{Script, aio::ConnectionManager};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    envelope::{Event, EventEnvelope, Position},
    projection::{Projection, ProjectionError},
};

/// Which kind of resource a key caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    User,
    Assistant,
    Conversation,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Assistant => "assistant",
            Kind::Conversation => "conversation",
        }
    }
}

/// Stamp a key with a position and drop its value, unless it is already newer.
const INVALIDATE: &str = r#"
local tx, gp = tonumber(redis.call('HGET', KEYS[1], 'tx') or '-1'), tonumber(redis.call('HGET', KEYS[1], 'gp') or '-1')
local ntx, ngp = tonumber(ARGV[1]), tonumber(ARGV[2])
if tx > ntx or (tx == ntx and gp >= ngp) then return 0 end
redis.call('HDEL', KEYS[1], 'json', 'owner')
redis.call('HSET', KEYS[1], 'tx', ARGV[1], 'gp', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// Store a value read at a position, unless the key is stamped newer.
const FILL: &str = r#"
local tx, gp = tonumber(redis.call('HGET', KEYS[1], 'tx') or '-1'), tonumber(redis.call('HGET', KEYS[1], 'gp') or '-1')
local ntx, ngp = tonumber(ARGV[1]), tonumber(ARGV[2])
if tx > ntx or (tx == ntx and gp > ngp) then return 0 end
redis.call('HSET', KEYS[1], 'tx', ARGV[1], 'gp', ARGV[2], 'json', ARGV[3], 'owner', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"#;

/// The cache as queries and the projection use it. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    client: Option<redis::Client>,
    /// The live connection, (re)made on demand at most every few seconds.
    connection: Arc<tokio::sync::Mutex<Connection>>,
    prefix: String,
    ttl: Duration,
    available: Arc<AtomicBool>,
    invalidate: Arc<Script>,
    fill: Arc<Script>,
}

#[derive(Default)]
struct Connection {
    manager: Option<ConnectionManager>,
    last_failure: Option<tokio::time::Instant>,
}

const RECONNECT_EVERY: Duration = Duration::from_secs(2);

impl Cache {
    /// A cache on `url`. Connecting happens on first use and again after a
    /// failure, so an unreachable Redis never stops the service from starting.
    pub fn new(url: &str, prefix: &str, ttl: Duration) -> Cache {
        let client = redis::Client::open(url)
            .inspect_err(
                |e| tracing::warn!(error = %e, "REDIS_URL is not usable; caching disabled"),
            )
            .ok();
        Cache {
            client,
            connection: Default::default(),
            prefix: prefix.to_owned(),
            ttl,
            available: Arc::new(AtomicBool::new(false)),
            invalidate: Arc::new(Script::new(INVALIDATE)),
            fill: Arc::new(Script::new(FILL)),
        }
    }

    /// The connection, or an error if Redis cannot be reached right now.
    async fn redis(&self) -> redis::RedisResult<ConnectionManager> {
        let unavailable =
            || redis::RedisError::from((redis::ErrorKind::Io, "redis is not reachable"));
        let client = self.client.clone().ok_or_else(unavailable)?;
        let mut connection = self.connection.lock().await;
        // After a failure, fail fast for a while instead of waiting on a dead server.
        if connection
            .last_failure
            .is_some_and(|at| at.elapsed() < RECONNECT_EVERY)
        {
            return Err(unavailable());
        }
        if let Some(manager) = &connection.manager {
            return Ok(manager.clone());
        }
        connection.last_failure = Some(tokio::time::Instant::now());
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            Duration::from_secs(1),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| unavailable())??;
        connection.manager = Some(manager.clone());
        connection.last_failure = None;
        Ok(manager)
    }

    /// Ask Redis whether it answers (for readiness checks).
    pub async fn ping(&self) -> bool {
        let Some(mut redis) = self.connection_or_none().await else {
            return false;
        };
        let pong: Option<String> = self
            .note(redis::cmd("PING").query_async(&mut redis).await)
            .await;
        pong.is_some()
    }

    pub fn key(&self, kind: Kind, id: Uuid) -> String {
        format!("{}:{}:{id}", self.prefix, kind.as_str())
    }

    /// The connection, or `None` while Redis is unreachable. Skipping a call here
    /// does not extend the fail-fast window: only a real failure does, so Redis is
    /// tried again at most a few seconds after it failed, however busy the cache.
    async fn connection_or_none(&self) -> Option<ConnectionManager> {
        match self.redis().await {
            Ok(redis) => Some(redis),
            Err(_) => {
                self.set_available(false);
                None
            }
        }
    }

    fn set_available(&self, up: bool) {
        self.available.store(up, Ordering::Relaxed);
        metrics::gauge!("cache_available").set(if up { 1.0 } else { 0.0 });
    }

    /// The outcome of a call made to Redis: a failure starts the fail-fast window.
    async fn note<T>(&self, result: redis::RedisResult<T>) -> Option<T> {
        match result {
            Ok(v) => {
                self.set_available(true);
                Some(v)
            }
            Err(e) => {
                self.connection.lock().await.last_failure = Some(tokio::time::Instant::now());
                if self.available.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "redis call failed; answering from Postgres");
                }
                metrics::gauge!("cache_available").set(0.0);
                None
            }
        }
    }

    /// The cached JSON of a resource, if present and owned by `owner`.
    pub async fn get(&self, kind: Kind, id: Uuid, owner: Uuid) -> Option<Value> {
        let mut redis = self.connection_or_none().await?;
        let (json, cached_owner): (Option<String>, Option<String>) = self
            .note(
                redis::cmd("HMGET")
                    .arg(self.key(kind, id))
                    .arg("json")
                    .arg("owner")
                    .query_async(&mut redis)
                    .await,
            )
            .await?;
        let hit = cached_owner
            .is_some_and(|o| o == owner.to_string())
            .then(|| json.and_then(|j| serde_json::from_str(&j).ok()))
            .flatten();
        let result = if hit.is_some() { "hit" } else { "miss" };
        metrics::counter!("cache_requests_total", "result" => result).increment(1);
        hit
    }

    /// Keep `json` (read from Postgres as of `at`) unless the key is stamped newer.
    pub async fn fill(&self, kind: Kind, id: Uuid, owner: Uuid, at: Position, json: &Value) {
        let Some(mut redis) = self.connection_or_none().await else {
            return;
        };
        let result: redis::RedisResult<i64> = self
            .fill
            .key(self.key(kind, id))
            .arg(at.transaction_id)
            .arg(at.global_position)
            .arg(json.to_string())
            .arg(owner.to_string())
            .arg(self.ttl.as_secs())
            .invoke_async(&mut redis)
            .await;
        self.note(result).await;
    }

    /// Stamp a key with an event's position, dropping the value it held. Fails
    /// when Redis is unreachable: an invalidation must never be skipped.
    pub async fn invalidate(&self, kind: Kind, id: Uuid, at: Position) -> redis::RedisResult<()> {
        let mut redis = match self.redis().await {
            Ok(redis) => redis,
            Err(e) => {
                self.set_available(false);
                return Err(e);
            }
        };
        let result: redis::RedisResult<i64> = self
            .invalidate
            .key(self.key(kind, id))
            .arg(at.transaction_id)
            .arg(at.global_position)
            .arg(self.ttl.as_secs())
            .invoke_async(&mut redis)
            .await;
        match result {
            Ok(_) => {
                self.note(Ok(())).await;
                Ok(())
            }
            Err(e) => {
                self.connection.lock().await.last_failure = Some(tokio::time::Instant::now());
                self.set_available(false);
                Err(e)
            }
        }
    }
}

impl Cache {
    /// Drop every key under this instance's prefix (after a rebuild swapped read
    /// models in: their rows may differ from what was cached). Queries fill the
    /// keys again through `fill`. Fails when Redis is unreachable.
    pub async fn forget_all(&self) -> redis::RedisResult<u64> {
        let mut redis = self.redis().await?;
        let pattern = format!("{}:*", self.prefix);
        let mut cursor: u64 = 0;
        let mut dropped = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut redis)
                .await?;
            if !keys.is_empty() {
                dropped += keys.len() as u64;
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut redis)
                    .await?;
            }
            if next == 0 {
                return Ok(dropped);
            }
            cursor = next;
        }
    }
}

/// Projection `cache`: tombstones the keys each event touches.
pub struct CacheInvalidation {
    pub cache: Cache,
}

#[async_trait::async_trait]
impl Projection for CacheInvalidation {
    fn name(&self) -> &'static str {
        "cache"
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        let at = e.position();
        match e.stream_type.as_str() {
            "user" => self.cache.invalidate(Kind::User, e.stream_id, at).await?,
            "assistant" => {
                self.cache
                    .invalidate(Kind::Assistant, e.stream_id, at)
                    .await?
            }
            // A reply's events (in streams of their own) change their conversation.
            "conversation" | "reply" => {
                let Some(conversation_id) = e.conversation_id(event) else {
                    return Ok(());
                };
                self.cache
                    .invalidate(Kind::Conversation, conversation_id, at)
                    .await?;
                // The assistant's counts and last activity move with its conversations.
                let assistant: Option<Uuid> = match event {
                    Event::ConversationStarted(c) => {
                        sqlx::query(
                            "INSERT INTO cache_conversations (conversation_id, assistant_id)
                             VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        )
                        .bind(conversation_id)
                        .bind(c.assistant_id)
                        .execute(&mut *tx)
                        .await?;
                        Some(c.assistant_id)
                    }
                    Event::MessagePosted(_)
                    | Event::ReplyRequested(_)
                    | Event::ReplyCompleted(_) => sqlx::query_scalar(
                        "SELECT assistant_id FROM cache_conversations WHERE conversation_id = $1",
                    )
                    .bind(conversation_id)
                    .fetch_optional(&mut *tx)
                    .await?,
                    _ => None,
                };
                if let Some(assistant) = assistant {
                    self.cache
                        .invalidate(Kind::Assistant, assistant, at)
                        .await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}
