//! Folded aggregate states kept between commands, so that a command on a
//! stream this process has seen reads nothing before it appends, and a load
//! reads only the events after the cached version instead of the whole stream.
//!
//! The cache is only a head start, never the truth. A command decided on it
//! appends with the cached version as the expected one, so a cache that fell
//! behind (another process wrote) is a version conflict, decided again after
//! reading the new tail; a decision that appends nothing is always made again
//! on a fresh load (`Commands::execute`). Every load still reads the stream's
//! tail from the store (one indexed query, usually empty), so another
//! process's writes are always seen by queries. An entry is replaced only by a
//! newer version of the same stream; a stream a load found empty is kept at
//! version 0. Bounded by memory ([moka], weighed by an estimate of each
//! state's size; its admission policy keeps ids seen once, such as a flood of
//! unknown ones, from pushing out the streams in use); an evicted stream is
//! simply folded again from the start on its next load.
//!
//! Each entry also knows when the store last showed it current (a load that
//! found nothing newer, or this process's own append): a read of another
//! stream that may be a little late, such as the assistant a new conversation
//! names, takes an entry checked recently enough without asking the store
//! ([`StateCache::checked_within`]).

use std::{
    any::Any,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::{ops::compute::Op, sync::Cache};
use uuid::Uuid;

use super::Loaded;
use crate::{
    domain::{
        assistant::AssistantState, conversation::ConversationState, reply::ReplyState,
        user::UserState,
    },
    store::Position,
};

/// The default bound: 12,000 to 17,000 conversations' states by their
/// estimate (about 240 bytes each with a short title, `ENTRY_OVERHEAD` included).
/// The whole process is meant to stay within 64 MiB resident under load
/// (docs/decisions.md, "The state cache's default bound"); at 64 MiB the
/// cache alone could have taken all of it, and at 8 MiB, filled by some 2,500
/// new conversations a second, it took the process past 64 MiB in four
/// rounds of six.
pub const DEFAULT_BYTES: u64 = 4 * 1024 * 1024;

/// How many bytes a state holds, roughly: what the cache is bounded by.
pub trait Weigh {
    fn weigh(&self) -> usize;
}

impl Weigh for UserState {
    fn weigh(&self) -> usize {
        size_of::<Self>()
            + match self {
                UserState::Registered(u) => {
                    u.email.len() + u.display_name.len() + u.password_hash.len()
                }
                UserState::Unregistered | UserState::Forgotten => 0,
            }
    }
}

impl Weigh for AssistantState {
    fn weigh(&self) -> usize {
        size_of::<Self>()
            + match self {
                AssistantState::Live(a) => {
                    a.name.len()
                        + a.role.len()
                        + a.instructions.len()
                        + a.model.len()
                        + a.metadata
                            .iter()
                            .map(|(k, v)| k.len() + v.len() + 48)
                            .sum::<usize>()
                }
                AssistantState::Absent | AssistantState::Deleted { .. } => 0,
            }
    }
}

impl Weigh for ConversationState {
    fn weigh(&self) -> usize {
        size_of::<Self>()
            + match self {
                ConversationState::Live(c) => c.title.len(),
                ConversationState::Absent => 0,
            }
    }
}

impl Weigh for ReplyState {
    fn weigh(&self) -> usize {
        size_of::<Self>()
    }
}

/// One stream's folded state, of whichever decider owns the stream.
struct Entry {
    state: Box<dyn Any + Send + Sync>,
    version: i64,
    position: Option<Position>,
    weight: u32,
    /// When the store last showed this version current ([`Asked`]'s µs).
    checked: AtomicU64,
}

impl Entry {
    /// Its state as a load gives it, if it is one of type `S`.
    fn loaded<S: Clone + 'static>(&self) -> Option<Loaded<S>> {
        Some(Loaded {
            state: self.state.downcast_ref::<S>()?.clone(),
            version: self.version,
            position: self.position,
        })
    }
}

/// When the store was asked (or appended to), as µs since the cache began:
/// taken *before* the question, so that what it answered was current at
/// least from then on.
#[derive(Debug, Clone, Copy)]
pub struct Asked(u64);

/// What the cache adds to each entry's own weight (key, bookkeeping).
const ENTRY_OVERHEAD: usize = 96;

/// Cheap to clone: clones share one cache.
#[derive(Clone)]
pub struct StateCache {
    entries: Cache<Uuid, Arc<Entry>>,
    began: Instant,
}

impl StateCache {
    /// A cache holding about `max_bytes` of states (0 keeps nothing).
    pub fn new(max_bytes: u64) -> StateCache {
        StateCache {
            entries: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, entry: &Arc<Entry>| entry.weight)
                .build(),
            began: Instant::now(),
        }
    }

    /// Now, for a question about to be asked of the store.
    pub fn asking(&self) -> Asked {
        Asked(self.began.elapsed().as_micros() as u64)
    }

    /// The cached state of a stream, if there is one of this type and the
    /// store showed it current no longer than `within` ago.
    pub fn checked_within<S: Clone + Send + Sync + 'static>(
        &self,
        stream_id: Uuid,
        within: Duration,
    ) -> Option<Loaded<S>> {
        let entry = self.entries.get(&stream_id)?;
        let age = self
            .asking()
            .0
            .saturating_sub(entry.checked.load(Ordering::Relaxed));
        if u128::from(age) > within.as_micros() {
            return None;
        }
        entry.loaded()
    }

    /// The store, asked at `asked`, had nothing after `version` of the
    /// stream: if that version is the one cached, it is current from then.
    pub fn confirm(&self, stream_id: Uuid, version: i64, asked: Asked) {
        if let Some(entry) = self.entries.get(&stream_id)
            && entry.version == version
        {
            entry.checked.fetch_max(asked.0, Ordering::Relaxed);
        }
    }

    /// The cached state of a stream, if there is one of this type.
    pub fn get<S: Clone + Send + Sync + 'static>(&self, stream_id: Uuid) -> Option<Loaded<S>> {
        self.entries.get(&stream_id)?.loaded()
    }

    /// Remember a stream's state at `loaded.version`, current as of `asked`,
    /// unless a newer version is already cached (two commands on one stream
    /// may finish in either order; the same version is only marked current).
    /// Version 0 is a stream the store had no event of.
    pub fn put<S: Weigh + Clone + Send + Sync + 'static>(
        &self,
        stream_id: Uuid,
        loaded: &Loaded<S>,
        asked: Asked,
    ) {
        let weight = u32::try_from(loaded.state.weigh() + ENTRY_OVERHEAD).unwrap_or(u32::MAX);
        let fresh = Arc::new(Entry {
            state: Box::new(loaded.state.clone()),
            version: loaded.version,
            position: loaded.position,
            weight,
            checked: AtomicU64::new(asked.0),
        });
        self.entries
            .entry(stream_id)
            .and_compute_with(|cached| match cached {
                Some(c) if c.value().version >= fresh.version => {
                    if c.value().version == fresh.version {
                        c.value().checked.fetch_max(asked.0, Ordering::Relaxed);
                    }
                    Op::Nop
                }
                _ => Op::Put(fresh),
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        Decider,
        reply::{ReplyDecider, ReplyEvent},
    };

    fn started(conversation: u128) -> Loaded<ReplyState> {
        let event = ReplyEvent::ReplyStarted {
            reply_id: Uuid::nil(),
            conversation_id: Uuid::from_u128(conversation),
            attempt: 1,
            started_at: chrono::Utc::now(),
        };
        Loaded {
            state: ReplyDecider::fold([&event]),
            version: 1,
            position: None,
        }
    }

    #[test]
    fn only_a_newer_version_replaces_an_entry() {
        let cache = StateCache::new(1 << 20);
        let id = Uuid::from_u128(7);
        let mut newer = started(1);
        newer.version = 3;
        cache.put(id, &newer, cache.asking());
        cache.put(id, &started(2), cache.asking()); // version 1: older, ignored
        let cached = cache.get::<ReplyState>(id).unwrap();
        assert_eq!((cached.version, cached.state), (3, newer.state));
        // Another type under the same id is a miss, not a panic.
        assert!(cache.get::<ConversationState>(id).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let cache = StateCache::new(10_000);
        for i in 0..1_000 {
            cache.put(Uuid::from_u128(i), &started(1), cache.asking());
        }
        cache.entries.run_pending_tasks();
        assert!(cache.entries.weighted_size() <= 10_000);
        assert!(cache.entries.entry_count() < 1_000);
    }

    #[test]
    fn an_entry_is_as_recent_as_the_store_last_showed_it() {
        let cache = StateCache::new(1 << 20);
        let id = Uuid::from_u128(9);
        let long_ago = Asked(0);
        let now = cache.asking();
        std::thread::sleep(Duration::from_millis(20));
        cache.put(id, &started(1), long_ago);
        let within = Duration::from_millis(10);
        assert!(cache.checked_within::<ReplyState>(id, within).is_none());

        // Another version is not confirmed by a question about this one.
        cache.confirm(id, 2, cache.asking());
        assert!(cache.checked_within::<ReplyState>(id, within).is_none());
        // An older question moves nothing back; a recent one makes it current.
        cache.confirm(id, 1, now);
        assert!(cache.checked_within::<ReplyState>(id, within).is_none());
        cache.confirm(id, 1, cache.asking());
        let recent = cache.checked_within::<ReplyState>(id, within).unwrap();
        assert_eq!(recent.version, 1);
        assert!(
            cache
                .checked_within::<ConversationState>(id, within)
                .is_none()
        );

        // So does a put of the same version; a newer one replaces it, as of
        // its own question.
        let other = Uuid::from_u128(10);
        cache.put(other, &started(1), long_ago);
        cache.put(other, &started(1), cache.asking());
        assert!(cache.checked_within::<ReplyState>(other, within).is_some());
        let mut newer = started(1);
        newer.version = 2;
        cache.put(other, &newer, long_ago);
        assert!(cache.checked_within::<ReplyState>(other, within).is_none());
        assert_eq!(cache.get::<ReplyState>(other).unwrap().version, 2);
    }
}
