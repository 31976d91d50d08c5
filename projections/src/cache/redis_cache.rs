//! The Redis backend of [`Cache`](super::Cache): each resource a hash
//! (`<prefix>:user:<id>`, `:assistant:<id>`, `:conversation:<id>`) holding the
//! JSON a query returns (`json`), its owner, and its stamp (`tx`, `gp`).
//!
//! The rules (`super::rules`) run inside Lua scripts, which Redis runs
//! atomically: `INVALIDATE` and `FILL` are `may_invalidate` and `may_fill`.
//! A forgotten user's values go with them: each filled key is listed in its
//! owner's set (`<prefix>:owner:<id>`), and `FORGET_OWNER` drops every key of
//! the set and marks the owner forgotten (`<prefix>:forgotten:<id>`, for one
//! TTL), which `FILL` then refuses.
//!
//! Queries give Redis only a short timeout and stay away from it while the
//! circuit breaker (`super::breaker`) is open, so a stalled Redis costs them
//! little; with Redis down every read is a miss and queries answer from
//! Postgres, and `ping()` and the `cache_available` gauge say so.

use ai_secretary_contract::Position;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{
    AsyncConnectionConfig, PushInfo, Script,
    aio::{ConnectionManager, MultiplexedConnection},
};
use uuid::Uuid;

use super::{
    CachedJson, Invalidations, Kind, Write,
    breaker::Breaker,
    near::{NEAR_BYTES, NearCache},
};

/// Stamp a key with a position and drop its value, unless it is already newer:
/// `rules::may_invalidate`.
const INVALIDATE: &str = r#"
local tx, gp = tonumber(redis.call('HGET', KEYS[1], 'tx') or '-1'), tonumber(redis.call('HGET', KEYS[1], 'gp') or '-1')
local ntx, ngp = tonumber(ARGV[1]), tonumber(ARGV[2])
if tx > ntx or (tx == ntx and gp >= ngp) then return 0 end
redis.call('HDEL', KEYS[1], 'json', 'owner')
redis.call('HSET', KEYS[1], 'tx', ARGV[1], 'gp', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// Store a value read at a position, unless its owner is forgotten or the key
/// is stamped newer (`rules::may_fill`); list the key in its owner's set.
const FILL: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local tx, gp = tonumber(redis.call('HGET', KEYS[1], 'tx') or '-1'), tonumber(redis.call('HGET', KEYS[1], 'gp') or '-1')
local ntx, ngp = tonumber(ARGV[1]), tonumber(ARGV[2])
if tx > ntx or (tx == ntx and gp > ngp) then return 0 end
redis.call('HSET', KEYS[1], 'tx', ARGV[1], 'gp', ARGV[2], 'json', ARGV[3], 'owner', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"#;

/// Drop every key an owner's set lists, and the set; mark the owner forgotten
/// for a TTL (longer than any fill that read their rows can be in flight).
const FORGET_OWNER: &str = r#"
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
local keys = redis.call('SMEMBERS', KEYS[1])
for _, key in ipairs(keys) do redis.call('UNLINK', key) end
redis.call('UNLINK', KEYS[1])
return #keys
"#;

/// Most writes in one pipeline. A worker's batch (at most 500 events, two
/// keys each) goes in one; the long batch of a gap fill, or a rebuild's range
/// (`rebuild::invalidate_skipped`), goes in several, in order, so that no one
/// round trip nears the connection's response timeout ([`PROJECTION_TIMEOUT`];
/// Redis runs tens of thousands of these scripts a second).
const PIPELINE: usize = 2_000;

/// The Redis backend. Cheap to clone.
#[derive(Clone)]
pub struct RedisCache {
    client: Option<redis::Client>,
    /// The live connection, made on first use (it reconnects by itself).
    /// Once made it is read without a lock: every query clones it, and an
    /// async mutex in that path made concurrent GETs queue and wake each
    /// other in turn.
    connection: Arc<tokio::sync::OnceCell<ConnectionManager>>,
    /// The same server in RESP3, for the connection queries read through:
    /// Redis pushes invalidations only to RESP3 clients (see `near`).
    tracking_client: Option<redis::Client>,
    /// Held while the tracking connection is being made, so only one is.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// What queries read, kept in this process while Redis says it holds.
    near: Arc<NearCache>,
    prefix: String,
    ttl: Duration,
    /// Longest a query waits for Redis before reading Postgres instead.
    query_timeout: Duration,
    /// Whether queries ask Redis at all right now (see `breaker`).
    breaker: Arc<Breaker>,
    available: Arc<AtomicBool>,
    invalidate: Arc<Script>,
    fill: Arc<Script>,
    forget_owner: Arc<Script>,
}

/// Longest the projection (which must not skip an invalidation, and is not on a
/// request's path) waits for one Redis call, and for a connection.
const PROJECTION_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisCache {
    /// A cache on `url`. Connecting happens on first use, so an unreachable
    /// Redis never stops the service from starting. Queries give Redis at most
    /// `query_timeout` per call.
    pub fn new(url: &str, prefix: &str, ttl: Duration, query_timeout: Duration) -> RedisCache {
        let client = redis::Client::open(url)
            .inspect_err(
                |e| tracing::warn!(error = %e, "REDIS_URL is not usable; caching disabled"),
            )
            .ok();
        let tracking_client = client.as_ref().and_then(|client| {
            let info = client.get_connection_info().clone();
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            redis::Client::open(info.set_redis_settings(resp3)).ok()
        });
        RedisCache {
            client,
            connection: Default::default(),
            tracking_client,
            connecting: Default::default(),
            near: NearCache::new(ttl, NEAR_BYTES),
            prefix: prefix.to_owned(),
            ttl,
            query_timeout,
            breaker: Default::default(),
            available: Arc::new(AtomicBool::new(false)),
            invalidate: Arc::new(Script::new(INVALIDATE)),
            fill: Arc::new(Script::new(FILL)),
            forget_owner: Arc::new(Script::new(FORGET_OWNER)),
        }
    }

    /// The connection, made now if there is none yet.
    async fn redis(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(manager) = self.connection.get() {
            return Ok(manager.clone());
        }
        let client = self.client.clone().ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "REDIS_URL is not usable"))
        })?;
        // One caller makes it, the others wait for that; a failure leaves it
        // unmade, for the next call to try again.
        let manager = self
            .connection
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(PROJECTION_TIMEOUT))
                    .set_response_timeout(Some(PROJECTION_TIMEOUT))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(client, config).await
            })
            .await?;
        Ok(manager.clone())
    }

    /// Run a query's call to Redis, unless the breaker keeps queries away from
    /// it; at most `query_timeout`. `None` when skipped, failed or too slow.
    async fn query<T>(&self, call: impl AsyncFnOnce() -> redis::RedisResult<T>) -> Option<T> {
        if !self.breaker.allow() {
            return None;
        }
        let outcome = tokio::time::timeout(self.query_timeout, call()).await;
        match outcome {
            Ok(Ok(value)) => {
                self.succeeded();
                Some(value)
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("no answer within the query timeout");
                None
            }
        }
    }

    fn succeeded(&self) {
        self.breaker.succeeded();
        if !self.available.swap(true, Ordering::Relaxed) {
            tracing::info!("redis answers again; queries read through the cache");
        }
        metrics::gauge!("cache_available").set(1.0);
    }

    fn failed(&self, error: &str) {
        self.breaker.failed();
        if self.available.swap(false, Ordering::Relaxed) {
            tracing::warn!(error, "redis call failed; answering from Postgres");
        }
        metrics::gauge!("cache_available").set(0.0);
    }

    /// Ask Redis whether it answers (for readiness checks).
    pub async fn ping(&self) -> bool {
        let pong: Option<String> = self
            .query(async || {
                let (_, mut redis) = self.tracking().await?;
                redis::cmd("PING").query_async(&mut redis).await
            })
            .await;
        pong.is_some()
    }

    fn key(&self, kind: Kind, id: Uuid) -> String {
        format!("{}:{}:{id}", self.prefix, kind.as_str())
    }

    /// An owner's set of keys (`owner`), or their forgotten mark (`forgotten`).
    fn owner_key(&self, what: &str, owner: Uuid) -> String {
        format!("{}:{what}:{owner}", self.prefix)
    }

    /// The cached JSON of a resource, if present and owned by `owner`, as
    /// Redis holds it now.
    pub async fn get(&self, kind: Kind, id: Uuid, owner: Uuid) -> Option<CachedJson> {
        self.read(&self.key(kind, id), owner, None).await
    }

    /// The cached JSON of a resource, if present and owned by `owner`, current
    /// through `through`; from this process's memory when the near cache can
    /// tell it is (`near`), else from Redis. `invalidated` is where the caller
    /// last saw the `cache` projection's checkpoint.
    pub async fn get_current(
        &self,
        kind: Kind,
        id: Uuid,
        owner: Uuid,
        through: Position,
        invalidated: Position,
    ) -> Option<CachedJson> {
        let key = self.key(kind, id);
        if let Some(json) = self.near.hit(&key, owner, through) {
            return Some(json);
        }
        self.read(&key, owner, Some(invalidated)).await
    }

    /// Read `key` from Redis on the tracking connection, keep what it holds in
    /// the near cache, and, with `invalidated`, move the near cache's sync
    /// there (see `near`).
    async fn read(
        &self,
        key: &str,
        owner: Uuid,
        invalidated: Option<Position>,
    ) -> Option<CachedJson> {
        let (json, cached_owner) = self
            .query(async || {
                let (session, mut redis) = self.tracking().await?;
                let ticket = self.near.ticket(session, key);
                let (json, cached_owner): (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
                    .arg(key)
                    .arg("json")
                    .arg("owner")
                    .query_async(&mut redis)
                    .await?;
                if let Some(invalidated) = invalidated {
                    self.near.synced(session, invalidated);
                }
                let cached_owner = cached_owner.and_then(|o| o.parse::<Uuid>().ok());
                let json = match (json, cached_owner) {
                    (Some(json), Some(cached_owner)) => ticket.keep(cached_owner, json),
                    _ => None,
                };
                Ok((json, cached_owner))
            })
            .await?;
        (cached_owner == Some(owner)).then_some(json).flatten()
    }

    /// The connection queries read through, with client tracking on (see
    /// `near`), and its session; made now if there is none (or it was lost).
    async fn tracking(&self) -> redis::RedisResult<(u64, MultiplexedConnection)> {
        if let Some(connection) = self.near.connection() {
            return Ok(connection);
        }
        let client = self.tracking_client.clone().ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "REDIS_URL is not usable"))
        })?;
        // One caller connects; the others wait for it and take its connection.
        let _connecting = self.connecting.lock().await;
        if let Some(connection) = self.near.connection() {
            return Ok(connection);
        }
        let session = self.near.begin_session();
        let near = self.near.clone();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(PROJECTION_TIMEOUT))
            .set_response_timeout(Some(PROJECTION_TIMEOUT))
            .set_push_sender(move |push: PushInfo| {
                near.pushed(session, push);
                Ok::<(), std::convert::Infallible>(())
            });
        let mut redis = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .exec_async(&mut redis)
            .await?;
        self.near.connected(session, redis.clone());
        Ok((session, redis))
    }

    /// Keep `json` (read from Postgres as of `at`) unless the key is stamped newer.
    pub async fn fill(&self, kind: Kind, id: Uuid, owner: Uuid, at: Position, json: &CachedJson) {
        let key = self.key(kind, id);
        let _: Option<i64> = self
            .query(async || {
                let mut redis = self.redis().await?;
                self.fill
                    .key(&key)
                    .key(self.owner_key("owner", owner))
                    .key(self.owner_key("forgotten", owner))
                    .arg(at.transaction_id)
                    .arg(at.global_position)
                    .arg(&json.text()[..])
                    .arg(owner.to_string())
                    .arg(self.ttl.as_secs())
                    .invoke_async(&mut redis)
                    .await
            })
            .await;
    }

    /// Make a batch's writes in order, in one pipeline (a long one in a few,
    /// one after the other: [`PIPELINE`]): `INVALIDATE` per stamp,
    /// `FORGET_OWNER` per forget. Fails when Redis is unreachable or any
    /// script failed (Redis runs the rest of the pipeline regardless: the
    /// projection retries the batch, and every write is safe to repeat). Not
    /// held back by the breaker (the projection's retries are its probes).
    pub async fn invalidate(&self, batch: &Invalidations) -> redis::RedisResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let writes: Vec<Write> = batch.writes().collect();
        let result: redis::RedisResult<()> = async {
            let mut redis = self.redis().await?;
            for writes in writes.chunks(PIPELINE) {
                self.pipeline(writes).exec_async(&mut redis).await?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                self.succeeded();
                Ok(())
            }
            Err(e) => {
                self.failed(&e.to_string());
                Err(e)
            }
        }
    }

    fn pipeline(&self, writes: &[Write]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        // `EVALSHA` in a pipeline does not load a script Redis lacks (after a
        // restart or `SCRIPT FLUSH`) as `invoke_async` does; loading both first,
        // in the same round trip, costs Redis a hash lookup when they are there.
        pipe.load_script(&self.invalidate)
            .ignore()
            .load_script(&self.forget_owner)
            .ignore();
        let ttl = self.ttl.as_secs();
        for write in writes {
            match *write {
                Write::Stamp(kind, id, at) => pipe.invoke_script(
                    self.invalidate
                        .key(self.key(kind, id))
                        .arg(at.transaction_id)
                        .arg(at.global_position)
                        .arg(ttl),
                ),
                // A forgotten mark lives one TTL (at least a second: `SET … EX 0` is refused).
                Write::Forget(owner) => pipe.invoke_script(
                    self.forget_owner
                        .key(self.owner_key("owner", owner))
                        .key(self.owner_key("forgotten", owner))
                        .arg(ttl.max(1)),
                ),
            }
            .ignore();
        }
        pipe
    }
}

impl RedisCache {
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
