//! The read side's cache of single resources (a user, an assistant, a
//! conversation), each held as the JSON a query returns, its owner, and a
//! stamp: the commit position it is current as of. Two backends behind one
//! [`Cache`]: Redis (`redis_cache`, shared by every process of the production
//! topology, each of which keeps what it read in memory while Redis's client
//! tracking says it holds: `near`) and in process (`local`, moka, for the
//! embedded topology in which one process runs the projections and the API).
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
mod near;
mod redis_cache;
mod rules;

use std::{collections::HashMap, time::Duration};

use ai_secretary_contract::Position;
use bytes::Bytes;
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

/// A cached resource as a query answers it: its JSON text, sent as it is, and
/// its `version` (the response's ETag), read from the text once, when it was
/// kept. Cheap to clone (the text is shared), so a hit copies nothing: no
/// parse, no deep copy, no serializing again.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedJson {
    text: Bytes,
    version: Option<i64>,
}

impl CachedJson {
    /// A resource read from the read models, to keep and to answer with.
    pub fn of(json: &Value) -> CachedJson {
        CachedJson {
            text: Bytes::from(json.to_string()),
            version: json.get("version").and_then(Value::as_i64),
        }
    }

    /// Text the cache held, if it is JSON (anything else is a miss).
    fn parse(text: impl Into<Bytes>) -> Option<CachedJson> {
        let text = text.into();
        let json: Value = serde_json::from_slice(&text).ok()?;
        Some(CachedJson {
            version: json.get("version").and_then(Value::as_i64),
            text,
        })
    }

    /// The JSON text.
    pub fn text(&self) -> &Bytes {
        &self.text
    }

    /// The resource's `version`, if it has one.
    pub fn version(&self) -> Option<i64> {
        self.version
    }

    /// The JSON, parsed (for tests and tools; queries send the text).
    pub fn to_value(&self) -> Value {
        serde_json::from_slice(&self.text).expect("a CachedJson holds JSON")
    }
}

/// What a batch of events asks of the cache, in commit order: keys to stamp
/// with a position, owners to forget. [`Cache::invalidate`] makes all of it
/// in one round trip.
///
/// A key touched many times is stamped once, at its newest position: a stamp
/// only moves forwards (`rules::may_invalidate`, and `INVALIDATE` in Lua), so
/// stamping at p and then at q > p leaves q, as stamping at q alone does. That
/// one stamp is written where the key's last event put it, after every forget
/// that came before that event: a forget drops the keys its owner filled (on
/// Redis, their stamps too), so a stamp moved before it could be lost.
#[derive(Debug, Default)]
pub struct Invalidations {
    /// In order; `None` where a later stamp of the same key took the place.
    writes: Vec<Option<Write>>,
    /// Where each key's stamp is in `writes`.
    stamps: HashMap<(Kind, Uuid), usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Stamp(Kind, Uuid, Position),
    Forget(Uuid),
}

impl Invalidations {
    /// Stamp a key with an event's position, dropping the value it held.
    pub fn stamp(&mut self, kind: Kind, id: Uuid, at: Position) {
        let here = self.writes.len();
        let at = match self.stamps.insert((kind, id), here) {
            // In commit order `at` is the newer; `max` keeps the newer anyway.
            Some(earlier) => match self.writes[earlier].take() {
                Some(Write::Stamp(.., was)) => was.max(at),
                _ => at,
            },
            None => at,
        };
        self.writes.push(Some(Write::Stamp(kind, id, at)));
    }

    /// Drop every value cached for `owner`, and refuse new ones for a TTL.
    pub fn forget_owner(&mut self, owner: Uuid) {
        self.writes.push(Some(Write::Forget(owner)));
    }

    fn writes(&self) -> impl Iterator<Item = Write> + '_ {
        self.writes.iter().flatten().copied()
    }

    /// (A superseded stamp always has a later one, so no `None` is alone.)
    fn is_empty(&self) -> bool {
        self.writes.is_empty()
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

    /// The cached JSON of a resource, if present and owned by `owner`, as the
    /// cache holds it now (from Redis, not from a copy in this process).
    pub async fn get(&self, kind: Kind, id: Uuid, owner: Uuid) -> Option<CachedJson> {
        let hit = match self {
            Cache::Redis(redis) => redis.get(kind, id, owner).await,
            Cache::Local(local) => local.get(kind, id, owner),
        };
        Self::count(hit)
    }

    /// The cached JSON of a resource, if present and owned by `owner`, for a
    /// query that needs it current through `through`, asked when the `cache`
    /// projection's checkpoint was last seen at `invalidated` (at or past
    /// `through`: the cache is asked only when its invalidations are as
    /// current as what the query needs). The Redis backend answers from this
    /// process's copy when it can tell no invalidation through `through` is
    /// still on its way (its `near` module); the local cache is always current.
    pub async fn get_current(
        &self,
        kind: Kind,
        id: Uuid,
        owner: Uuid,
        through: Position,
        invalidated: Position,
    ) -> Option<CachedJson> {
        let hit = match self {
            Cache::Redis(redis) => {
                redis
                    .get_current(kind, id, owner, through, invalidated)
                    .await
            }
            Cache::Local(local) => local.get(kind, id, owner),
        };
        Self::count(hit)
    }

    fn count(hit: Option<CachedJson>) -> Option<CachedJson> {
        let result = if hit.is_some() { "hit" } else { "miss" };
        metrics::counter!("cache_requests_total", "result" => result).increment(1);
        hit
    }

    /// Keep `json` (read from the read models as of `at`) unless the key is
    /// stamped newer or its owner is forgotten. Best effort: a fill that does
    /// not happen is a later miss.
    pub async fn fill(&self, kind: Kind, id: Uuid, owner: Uuid, at: Position, json: &CachedJson) {
        match self {
            Cache::Redis(redis) => redis.fill(kind, id, owner, at, json).await,
            Cache::Local(local) => local.fill(kind, id, owner, at, json),
        }
    }

    /// Make a batch's invalidations (and forgets), in order, in one round
    /// trip. Fails when the cache is unreachable or any of them failed: an
    /// invalidation must never be skipped, so the projection retries the
    /// whole batch (each write is stamped or idempotent, so safe to repeat).
    pub async fn invalidate(&self, batch: &Invalidations) -> Result<(), CacheError> {
        match self {
            Cache::Redis(redis) => Ok(redis.invalidate(batch).await?),
            Cache::Local(local) => {
                local.invalidate(batch);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(gp: i64) -> Position {
        Position {
            transaction_id: gp,
            global_position: gp,
        }
    }

    /// Each key is written once, at its newest position, where its last event
    /// put it: after the forget between its events, never before it.
    #[test]
    fn a_batch_stamps_each_key_once_at_its_last_position_in_order() {
        let (a, b, c, owner) = (
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Uuid::from_u128(3),
            Uuid::from_u128(4),
        );
        let mut batch = Invalidations::default();
        assert!(batch.is_empty());
        batch.stamp(Kind::Conversation, a, at(1));
        batch.stamp(Kind::User, b, at(2));
        batch.forget_owner(owner);
        batch.stamp(Kind::Conversation, a, at(3));
        batch.stamp(Kind::Assistant, c, at(4));
        batch.stamp(Kind::Conversation, a, at(5));
        // Another kind is another key.
        batch.stamp(Kind::Assistant, a, at(6));
        assert_eq!(
            batch.writes().collect::<Vec<_>>(),
            [
                Write::Stamp(Kind::User, b, at(2)),
                Write::Forget(owner),
                Write::Stamp(Kind::Assistant, c, at(4)),
                Write::Stamp(Kind::Conversation, a, at(5)),
                Write::Stamp(Kind::Assistant, a, at(6)),
            ]
        );
    }
}
