//! Each message off the bus decoded once per process, not once per projection.
//!
//! Every projection worker reads the whole stream through a consumer of its
//! own (`worker`), so in the all-in-one process the same message arrives five
//! times. Reading it is the same work each time: parse the envelope, open its
//! sealed fields (a key lookup and a decryption per field), decode the
//! payload. A profile of the closed loop put that at some 13 % of the
//! service's CPU (docs/benchmarks.md). The first worker to read a message
//! keeps what it made of it here; the others, a few milliseconds behind, take
//! it as it is.
//!
//! - **Bounded and cheap.** A fixed number of slots, a message's place given
//!   by its stream sequence (direct-mapped: a newer message takes an older
//!   one's slot). Nothing is ordered or aged; a worker further behind than
//!   [`SLOTS`] messages reads for itself, as it did before.
//! - **Exact.** A slot answers only for the same sequence *and* the same bytes
//!   (a copy of the payload is kept beside what was made of it): a stream
//!   deleted and created again restarts its sequences, and a slot must never
//!   answer for another message.
//! - **Only what reads the same for everyone.** A payload that is not an
//!   envelope, or does not decode, is not kept (each worker parks its own
//!   dead letter); a sealed field that does not open fails the batch before
//!   anything is kept.
//! - **Forgetting.** Opened values are personal data. When a worker meets a
//!   `UserForgotten`, every slot is emptied ([`DecodeCache::forget_all`]), so no
//!   plaintext of theirs outlives the event here; what is read after it opens
//!   to the placeholder, as it would have without the cache. A message opened
//!   while the slots were being emptied is not kept: each keep names the
//!   cache's generation from before its opening began, and a forgetting
//!   moves the generation on.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use crate::projection::Decoded;

/// Slots kept. Workers of one process stay within a batch or two of each
/// other (a batch is at most 500 messages, usually far fewer under load); a
/// slot holds a message's decoded form (about 1–2 KiB) and a copy of its
/// payload, so the whole cache stays within a few MiB at most.
pub const SLOTS: usize = 1024;

/// What the process's workers made of the last [`SLOTS`] messages they read
/// (see the module's documentation). Cloning shares it.
#[derive(Clone)]
pub struct DecodeCache {
    slots: Arc<[Mutex<Option<Slot>>]>,
    /// Moved on by every [`DecodeCache::forget_all`].
    generation: Arc<AtomicU64>,
}

struct Slot {
    sequence: u64,
    payload: Box<[u8]>,
    decoded: Arc<Decoded>,
}

impl Default for DecodeCache {
    fn default() -> DecodeCache {
        DecodeCache {
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
            generation: Arc::default(),
        }
    }
}

impl DecodeCache {
    /// What was made of the message at stream `sequence` with exactly
    /// `payload`, if a worker kept it.
    pub fn get(&self, sequence: u64, payload: &[u8]) -> Option<Arc<Decoded>> {
        let slot = self.slot(sequence);
        match &*slot {
            Some(kept) if kept.sequence == sequence && *kept.payload == *payload => {
                Some(kept.decoded.clone())
            }
            _ => None,
        }
    }

    /// The generation to name when keeping what is about to be opened.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Keep what was made of the message at `sequence` with `payload`,
    /// opened from [`generation`](DecodeCache::generation) `since` on; not
    /// kept if a user was forgotten since then.
    pub fn keep(&self, sequence: u64, payload: &[u8], decoded: &Arc<Decoded>, since: u64) {
        let mut slot = self.slot(sequence);
        // Checked under the slot's lock: a forgetting moves the generation
        // before it empties this slot, so either it comes after this keep
        // and empties it, or this keep sees the new generation.
        if self.generation() == since {
            *slot = Some(Slot {
                sequence,
                payload: payload.into(),
                decoded: decoded.clone(),
            });
        }
    }

    /// Empty every slot: a user was forgotten, and their opened values must
    /// not stay in memory.
    pub fn forget_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for slot in self.slots.iter() {
            *lock(slot) = None;
        }
    }

    fn slot(&self, sequence: u64) -> std::sync::MutexGuard<'_, Option<Slot>> {
        lock(&self.slots[(sequence % SLOTS as u64) as usize])
    }
}

/// A slot's lock. Nothing can panic while one is held (a comparison, a
/// clone, a move), but were one poisoned, its slot is still whole: take it.
fn lock(slot: &Mutex<Option<Slot>>) -> std::sync::MutexGuard<'_, Option<Slot>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ai_secretary_contract::{Event, EventEnvelope};
    use serde_json::json;

    fn decoded(global_position: i64) -> Arc<Decoded> {
        Arc::new(Decoded {
            envelope: EventEnvelope {
                event_id: uuid::Uuid::nil(),
                stream_id: uuid::Uuid::nil(),
                stream_type: "user".into(),
                version: 1,
                event_type: "UserForgotten".into(),
                schema_version: 1,
                transaction_id: 1,
                global_position,
                recorded_at: chrono::DateTime::UNIX_EPOCH,
                data: json!({}),
                metadata: json!({}),
                previous: None,
            },
            event: Event::UserForgotten,
        })
    }

    #[test]
    fn a_kept_message_answers_only_for_its_sequence_and_its_bytes() {
        let cache = DecodeCache::default();
        let kept = decoded(7);
        cache.keep(7, b"seven", &kept, 0);

        let found = cache.get(7, b"seven").expect("kept");
        assert!(Arc::ptr_eq(&found, &kept));
        // Another message at the same sequence (a stream created again).
        assert!(cache.get(7, b"seven!").is_none());
        assert!(cache.get(7, b"").is_none());
        // The same bytes at another sequence, in the same slot or not.
        assert!(cache.get(7 + SLOTS as u64, b"seven").is_none());
        assert!(cache.get(8, b"seven").is_none());
    }

    #[test]
    fn a_newer_message_takes_an_older_ones_slot() {
        let cache = DecodeCache::default();
        cache.keep(3, b"old", &decoded(3), 0);
        let newer = decoded(3 + SLOTS as i64);
        cache.keep(3 + SLOTS as u64, b"new", &newer, 0);

        assert!(cache.get(3, b"old").is_none());
        let found = cache.get(3 + SLOTS as u64, b"new").expect("kept");
        assert!(Arc::ptr_eq(&found, &newer));
    }

    #[test]
    fn forgetting_empties_every_slot() {
        let cache = DecodeCache::default();
        for sequence in 0..(2 * SLOTS as u64) {
            cache.keep(sequence, b"x", &decoded(sequence as i64), 0);
        }
        cache.forget_all();
        assert!((0..(2 * SLOTS as u64)).all(|s| cache.get(s, b"x").is_none()));
    }

    #[test]
    fn what_was_opened_before_a_forgetting_is_not_kept_after_it() {
        let cache = DecodeCache::default();
        let since = cache.generation();
        cache.forget_all();
        cache.keep(1, b"opened before", &decoded(1), since);
        assert!(cache.get(1, b"opened before").is_none());

        // Opened after it: kept.
        cache.keep(1, b"opened after", &decoded(1), cache.generation());
        assert!(cache.get(1, b"opened after").is_some());
    }
}
