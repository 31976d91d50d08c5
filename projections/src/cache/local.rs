//! The in-process backend of [`Cache`](super::Cache), for the embedded
//! topology (one process runs the `cache` projection and the API): three moka
//! caches, each entry living one TTL after its last write, as in Redis.
//!
//! - `values`: key → owner and JSON, bounded by weight ([`VALUE_BYTES`]).
//!   Losing a value to the bound only costs a miss.
//! - `stamps`: key → the position it is current as of. Kept apart from the
//!   values so that the memory bound evicts values (harmless) long before the
//!   stamps that make fills safe. Bounded by count ([`STAMPS`]).
//! - `forgotten`: owner → mark, refusing their fills for one TTL.
//!
//! The rules are `super::rules`. Redis runs each script atomically; here the
//! writes that read before they write (invalidate, fill, forget) take one
//! mutex, held for a few map operations (a batch's, for an invalidation: a
//! few hundred, in memory) and never across an await, so they happen one at
//! a time just as the scripts do. Reads (`get`) take no lock.
//!
//! The owner needs no set of keys here: each value carries its owner, and a
//! forget scans the values (forgets are rare; the scan is in memory).
//!
//! If the bound ever evicts a stamp set within [`FILL_WINDOW`] (or a forgotten
//! mark), the fact it recorded is gone while a fill that read before it may
//! still be on its way; so every fill is refused for `FILL_WINDOW` (misses,
//! never stale values). The Redis backend has no such case: its keys are not
//! evicted before their TTL.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use ai_secretary_contract::Position;
use moka::{notification::RemovalCause, sync::Cache as Moka};
use uuid::Uuid;

use super::{
    CachedJson, Invalidations, Kind, Write,
    rules::{may_fill, may_invalidate},
};

/// Most bytes of cached JSON (plus [`ENTRY_OVERHEAD`] a value). A resource's
/// JSON is 0.5–2 KiB, so 64 MiB holds some 30–100 thousand resources: more
/// than the working set of the single-node install the embedded topology is
/// for, and small beside the memory such a machine has.
pub const VALUE_BYTES: u64 = 64 << 20;

/// What an entry costs besides its JSON (key, owner, moka's own bookkeeping),
/// counted so that many tiny values cannot exceed the bound.
const ENTRY_OVERHEAD: u32 = 128;

/// Most stamps. A stamp is some 150 bytes with moka's bookkeeping, so at most
/// ~15 MiB; 100 000 keys touched within one TTL (3600 s by default) is an
/// event touching a new key every 36 ms for a whole hour, beyond what one
/// embedded process sustains. Past it the bound evicts, and `FILL_WINDOW` keeps
/// that safe.
pub const STAMPS: u64 = 100_000;

/// Most forgotten marks: forgets are rare (far fewer than 10 000 an hour).
const FORGOTTEN: u64 = 10_000;

/// Longest a fill can follow the read it carries: the read side fills right
/// after its query returns, in the same task, so a minute is far beyond any
/// real gap. A stamp set earlier than this can be evicted without risk.
pub const FILL_WINDOW: Duration = Duration::from_secs(60);

/// moka refuses TTLs over 1000 years; nobody means more than a century.
pub(super) const LONGEST_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

type Key = (Kind, Uuid);

#[derive(Clone)]
struct Filled {
    owner: Uuid,
    json: CachedJson,
}

#[derive(Clone, Copy)]
struct Stamp {
    at: Position,
    /// When it was set, to tell whether its eviction can matter.
    set: Instant,
}

/// The bounds, constants in production and small in tests.
#[derive(Clone, Copy)]
struct Limits {
    value_bytes: u64,
    stamps: u64,
    forgotten: u64,
    fill_window: Duration,
}

const LIMITS: Limits = Limits {
    value_bytes: VALUE_BYTES,
    stamps: STAMPS,
    forgotten: FORGOTTEN,
    fill_window: FILL_WINDOW,
};

/// The in-process cache. Cheap to clone (clones share it).
#[derive(Clone)]
pub struct LocalCache {
    inner: Arc<Inner>,
}

struct Inner {
    /// Taken by every write that reads first (see the module doc).
    writes: Mutex<()>,
    values: Moka<Key, Filled>,
    stamps: Moka<Key, Stamp>,
    forgotten: Moka<Uuid, ()>,
    /// Until when every fill is refused, after a lost stamp or mark.
    fills_closed: Arc<FillsClosed>,
}

/// The writes of [`LocalCache::invalidate`], each called with `writes` held.
impl Inner {
    /// `INVALIDATE`: stamp the key and drop its value, if `rules::may_invalidate`.
    fn stamp(&self, key: Key, at: Position) {
        if may_invalidate(self.stamps.get(&key).map(|s| s.at), at) {
            self.stamps.insert(
                key,
                Stamp {
                    at,
                    set: Instant::now(),
                },
            );
            self.values.invalidate(&key);
        }
    }

    /// `FORGET_OWNER`: mark the owner forgotten for a TTL, drop their values.
    fn forget_owner(&self, owner: Uuid) {
        self.forgotten.insert(owner, ());
        let theirs: Vec<Arc<Key>> = self
            .values
            .iter()
            .filter(|(_, filled)| filled.owner == owner)
            .map(|(key, _)| key)
            .collect();
        for key in theirs {
            self.values.invalidate(&*key);
        }
    }
}

/// Shared with the eviction listeners, which run inside moka's calls (while a
/// write holds `writes`), so it has a lock of its own.
struct FillsClosed {
    window: Duration,
    until: Mutex<Option<Instant>>,
}

impl FillsClosed {
    fn close(&self) {
        *lock(&self.until) = Some(Instant::now() + self.window);
        tracing::warn!(
            window = ?self.window,
            "the local cache's bound evicted a recent stamp; refusing fills for a while"
        );
    }

    fn closed(&self) -> bool {
        lock(&self.until).is_some_and(|until| Instant::now() < until)
    }
}

/// The data behind these locks is valid whatever a panicking holder did.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalCache {
    pub fn new(ttl: Duration) -> LocalCache {
        LocalCache::with_limits(ttl, LIMITS)
    }

    fn with_limits(ttl: Duration, limits: Limits) -> LocalCache {
        let ttl = ttl.min(LONGEST_TTL);
        let fills_closed = Arc::new(FillsClosed {
            window: limits.fill_window,
            until: Mutex::new(None),
        });
        let values = Moka::builder()
            .max_capacity(limits.value_bytes)
            .weigher(|_, filled: &Filled| {
                u32::try_from(filled.json.text().len())
                    .unwrap_or(u32::MAX)
                    .saturating_add(ENTRY_OVERHEAD)
            })
            .time_to_live(ttl)
            .build();
        let stamps = Moka::builder()
            .max_capacity(limits.stamps)
            .time_to_live(ttl)
            .eviction_listener({
                let fills_closed = fills_closed.clone();
                move |_, stamp: Stamp, cause| {
                    if cause == RemovalCause::Size && stamp.set.elapsed() < fills_closed.window {
                        fills_closed.close();
                    }
                }
            })
            .build();
        let forgotten = Moka::builder()
            .max_capacity(limits.forgotten)
            .time_to_live(ttl)
            .eviction_listener({
                let fills_closed = fills_closed.clone();
                move |_, (), cause| {
                    if cause == RemovalCause::Size {
                        fills_closed.close();
                    }
                }
            })
            .build();
        // Nothing to connect to: available from the start.
        metrics::gauge!("cache_available").set(1.0);
        LocalCache {
            inner: Arc::new(Inner {
                writes: Mutex::new(()),
                values,
                stamps,
                forgotten,
                fills_closed,
            }),
        }
    }

    /// Always answers.
    pub fn ping(&self) -> bool {
        metrics::gauge!("cache_available").set(1.0);
        true
    }

    pub fn get(&self, kind: Kind, id: Uuid, owner: Uuid) -> Option<CachedJson> {
        let filled = self.inner.values.get(&(kind, id))?;
        (filled.owner == owner).then_some(filled.json)
    }

    /// `FILL`: refused for a forgotten owner and when `rules::may_fill` says no.
    pub fn fill(&self, kind: Kind, id: Uuid, owner: Uuid, at: Position, json: &CachedJson) {
        let key = (kind, id);
        let inner = &*self.inner;
        let _writing = lock(&inner.writes);
        if inner.fills_closed.closed()
            || inner.forgotten.contains_key(&owner)
            || !may_fill(inner.stamps.get(&key).map(|s| s.at), at)
        {
            return;
        }
        // `may_fill` allowed it, so this never moves the stamp backwards.
        inner.stamps.insert(
            key,
            Stamp {
                at,
                set: Instant::now(),
            },
        );
        inner.values.insert(
            key,
            Filled {
                owner,
                json: json.clone(),
            },
        );
    }

    /// A batch's writes, in order, under one lock (as one pipeline on Redis):
    /// `INVALIDATE` per stamp, `FORGET_OWNER` per forget.
    pub fn invalidate(&self, batch: &Invalidations) {
        let inner = &*self.inner;
        let _writing = lock(&inner.writes);
        for write in batch.writes() {
            match write {
                Write::Stamp(kind, id, at) => inner.stamp((kind, id), at),
                Write::Forget(owner) => inner.forget_owner(owner),
            }
        }
    }

    /// Drop every value; how many there were. The stamps and forgotten marks
    /// stay: they are facts about the log, true of the rebuilt read models too.
    pub fn forget_all(&self) -> u64 {
        let inner = &*self.inner;
        let _writing = lock(&inner.writes);
        let dropped = inner.values.iter().count() as u64;
        inner.values.invalidate_all();
        dropped
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A fresh id (the crate has no uuid generator of its own).
    fn id() -> Uuid {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Uuid::from_u128(NEXT.fetch_add(1, Ordering::Relaxed) as u128)
    }

    fn at(gp: i64) -> Position {
        Position {
            transaction_id: gp,
            global_position: gp,
        }
    }

    /// Losing a recent stamp to the bound refuses every fill for the window
    /// (a fill that read before the lost stamp's event could be on its way),
    /// and fills resume after it.
    #[test]
    fn an_evicted_recent_stamp_closes_fills_for_the_window() {
        let window = Duration::from_millis(300);
        let cache = LocalCache::with_limits(
            Duration::from_secs(60),
            Limits {
                stamps: 4,
                fill_window: window,
                ..LIMITS
            },
        );
        let owner = id();
        let mut batch = Invalidations::default();
        for gp in 1..=50 {
            batch.stamp(Kind::Assistant, id(), at(gp));
        }
        cache.invalidate(&batch);
        cache.inner.stamps.run_pending_tasks();
        assert!(cache.inner.stamps.entry_count() <= 4, "the bound holds");
        let id = id();
        let value = CachedJson::of(&json!({"v": 1}));
        cache.fill(Kind::Assistant, id, owner, at(100), &value);
        assert_eq!(cache.get(Kind::Assistant, id, owner), None, "fills closed");
        std::thread::sleep(window + Duration::from_millis(50));
        cache.fill(Kind::Assistant, id, owner, at(100), &value);
        assert_eq!(
            cache.get(Kind::Assistant, id, owner),
            Some(value),
            "open again after the window"
        );
    }

    /// The values' bound is in bytes: many large values do not grow past it,
    /// and evicting values (unlike stamps) does not close fills.
    #[test]
    fn values_stay_within_their_byte_bound() {
        let bound = 64 * 1024;
        let cache = LocalCache::with_limits(
            Duration::from_secs(60),
            Limits {
                value_bytes: bound,
                ..LIMITS
            },
        );
        let (owner, big) = (id(), "x".repeat(4096));
        for gp in 1..=200 {
            cache.fill(
                Kind::Conversation,
                id(),
                owner,
                at(gp),
                &CachedJson::of(&json!({ "body": big })),
            );
        }
        cache.inner.values.run_pending_tasks();
        assert!(cache.inner.values.weighted_size() <= bound);
        assert!(cache.inner.values.entry_count() > 0);
        assert!(!cache.inner.fills_closed.closed());
    }
}
