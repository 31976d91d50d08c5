//! The read side's cache of single resources (a user, an assistant, a
//! conversation), each held as the JSON a query returns, its owner, and a
//! stamp: the commit position it is current as of. Two backends behind one
//! [`Cache`]: Redis (`redis_cache`, shared by every process of the production
//! topology) and in process (`local`, moka, for the embedded topology in which
//! one process runs the projections and the API).
//!
//! The `cache` projection does not write values: on each event it stamps the
//! keys the event touches with the event's position and drops their values (a
//! tombstone). Queries read through: a hit is served; a miss or tombstone is read
//! from the read models and filled only if the row is at least as new as the
//! stamp. So a query that read a row just before a projection moved it can
//! never put the old copy back, whatever order the two race in. The rules are
//! written once, in `rules`.
//!
//! A forgotten user's values go with them: on `UserForgotten` the projection
//! drops every value the user owns and marks them forgotten for one TTL, during
//! which fills of theirs are refused, so no query racing the read models'
//! deletion can put a copy back. Every entry (value, stamp, mark) lives one
//! TTL after it was last written.

mod breaker;
mod local;
mod redis_cache;
mod rules;

use std::time::Duration;

use ai_secretary_contract::Position;
use serde_json::Value;
use uuid::Uuid;

pub use local::LocalCache;
pub use redis_cache::RedisCache;

/// Which kind of resource a key caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Why a write the projection must not skip (an invalidation, a forget) did
/// not happen. Only the Redis backend fails; the projection retries.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The cache as queries, the `cache` projection and rebuilds use it. Cheap to
/// clone (clones share the cache).
///
/// An enum rather than a trait: there are exactly two backends, each method is
/// one `match`, and the metrics every backend reports are counted here once.
#[derive(Clone)]
pub enum Cache {
    /// Boxed: it is some 30 times the size of the local one's handle.
    Redis(Box<RedisCache>),
    Local(LocalCache),
}

impl Cache {
    /// The Redis cache on `url`, its keys under `prefix`. Connecting happens on
    /// first use, so an unreachable Redis never stops the service from
    /// starting. Queries give Redis at most `query_timeout` per call.
    pub fn new(url: &str, prefix: &str, ttl: Duration, query_timeout: Duration) -> Cache {
        Cache::Redis(Box::new(RedisCache::new(url, prefix, ttl, query_timeout)))
    }

    /// A cache in this process's memory (bounded: see `local`). Only the
    /// process's own `cache` projection invalidates it, so it serves queries
    /// only in a process that also runs that projection (the embedded
    /// topology). Each call makes a new, empty cache: it is its own namespace.
    pub fn local(ttl: Duration) -> Cache {
        Cache::Local(LocalCache::new(ttl))
    }

    /// Whether the cache answers (for readiness checks). The local cache
    /// always does.
    pub async fn ping(&self) -> bool {
        match self {
            Cache::Redis(redis) => redis.ping().await,
            Cache::Local(local) => local.ping(),
        }
    }

    /// The cached JSON of a resource, if present and owned by `owner`.
    pub async fn get(&self, kind: Kind, id: Uuid, owner: Uuid) -> Option<Value> {
        let hit = match self {
            Cache::Redis(redis) => redis.get(kind, id, owner).await,
            Cache::Local(local) => local.get(kind, id, owner),
        };
        let result = if hit.is_some() { "hit" } else { "miss" };
        metrics::counter!("cache_requests_total", "result" => result).increment(1);
        hit
    }

    /// Keep `json` (read from the read models as of `at`) unless the key is
    /// stamped newer or its owner is forgotten. Best effort: a fill that does
    /// not happen is a later miss.
    pub async fn fill(&self, kind: Kind, id: Uuid, owner: Uuid, at: Position, json: &Value) {
        match self {
            Cache::Redis(redis) => redis.fill(kind, id, owner, at, json).await,
            Cache::Local(local) => local.fill(kind, id, owner, at, json),
        }
    }

    /// Stamp a key with an event's position, dropping the value it held.
    /// Fails when the cache is unreachable: an invalidation must never be
    /// skipped.
    pub async fn invalidate(&self, kind: Kind, id: Uuid, at: Position) -> Result<(), CacheError> {
        match self {
            Cache::Redis(redis) => Ok(redis.invalidate(kind, id, at).await?),
            Cache::Local(local) => {
                local.invalidate(kind, id, at);
                Ok(())
            }
        }
    }

    /// Drop every value cached for `owner`, and refuse new ones for a TTL.
    /// Fails when the cache is unreachable (the projection retries).
    pub async fn forget_owner(&self, owner: Uuid) -> Result<(), CacheError> {
        match self {
            Cache::Redis(redis) => Ok(redis.forget_owner(owner).await?),
            Cache::Local(local) => {
                local.forget_owner(owner);
                Ok(())
            }
        }
    }

    /// Drop every cached value (after a rebuild swapped read models in: their
    /// rows may differ from what was cached); queries fill them again. Returns
    /// how many keys went.
    pub async fn forget_all(&self) -> Result<u64, CacheError> {
        match self {
            Cache::Redis(redis) => Ok(redis.forget_all().await?),
            Cache::Local(local) => Ok(local.forget_all()),
        }
    }
}
