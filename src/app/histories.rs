//! What the replier read of each conversation for its last prompt, kept for
//! the next one: a prompt then reads only the events after the last request
//! instead of the whole budget's worth again (`LLM_HISTORY_CHARS`, some
//! hundreds of events with short messages: most of a reply's CPU, profiled).
//!
//! Only facts that never change are kept, so a kept window answers exactly as
//! the store would:
//! - the conversation's events, decoded, as a run of consecutive versions (an
//!   event at a version never changes);
//! - how each reply requested in them ended, once it has ended (one ending per
//!   reply, never another); a reply not ended when read is asked for again.
//!
//! Whether an ending belongs to a given prompt (recorded before its request)
//! is still decided per prompt, from the ending's position.
//!
//! The content is personal data, opened: a window is used only while its
//! owner's key is still there (`Keyring::key`, the same test every read of
//! the store passes), so after "forget me" a prompt reads the store's
//! `[forgotten]` like any other reader. Bounded by memory ([`HISTORY_BYTES`]),
//! least recently used first out, and dropped after [`IDLE`] unused.

use std::{collections::HashMap, sync::Arc, time::Duration};

use uuid::Uuid;

use crate::{domain::conversation::ConversationEvent, store::Position};

/// The default bound: a window holds about `LLM_HISTORY_CHARS` (24,000 by
/// default) characters of turns plus their events' bookkeeping, some 30 to
/// 60 KB, so this keeps the conversations of about 100 users typing at once.
/// The process is meant to stay within 64 MiB resident under load (see the
/// state cache's bound).
pub const HISTORY_BYTES: u64 = 4 * 1024 * 1024;

/// A window unused this long is dropped: nobody is typing in that conversation.
const IDLE: Duration = Duration::from_secs(600);

/// A conversation event as the prompt reads it, with its place.
#[derive(Debug, Clone)]
pub struct Known {
    pub version: i64,
    pub position: Position,
    pub event: ConversationEvent,
}

/// How a requested reply ended: the answer as the prompt reads it (a
/// `ReplyCompleted`) and where it was recorded, or `None` for an ending
/// without one (a failure).
pub type Ending = Option<(Position, ConversationEvent)>;

/// The events of a conversation from some version up to the request a prompt
/// was last made for, and the endings known for the replies requested in them.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Consecutive versions, oldest first.
    pub events: Vec<Known>,
    pub endings: HashMap<Uuid, Ending>,
}

impl Window {
    /// The newest version held.
    pub fn last_version(&self) -> Option<i64> {
        self.events.last().map(|k| k.version)
    }

    fn weigh(&self) -> u32 {
        let text = |e: &ConversationEvent| match e {
            ConversationEvent::MessagePosted { content, .. }
            | ConversationEvent::ReplyCompleted { content, .. } => content.len(),
            ConversationEvent::ConversationStarted { title, .. }
            | ConversationEvent::ConversationRenamed { title, .. } => title.len(),
            ConversationEvent::ReplyFailed { error, .. } => error.len(),
            _ => 0,
        };
        let events: usize = self
            .events
            .iter()
            .map(|k| size_of::<Known>() + text(&k.event))
            .sum();
        let endings: usize = self
            .endings
            .values()
            .map(|e| 64 + e.as_ref().map_or(0, |(_, answer)| text(answer)))
            .sum();
        u32::try_from(events + endings).unwrap_or(u32::MAX)
    }
}

/// Windows by conversation. Cheap to clone: clones share one cache.
#[derive(Clone)]
pub struct Histories {
    windows: moka::sync::Cache<Uuid, Arc<Window>>,
}

impl Histories {
    pub fn new(max_bytes: u64) -> Histories {
        Histories {
            windows: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, window: &Arc<Window>| window.weigh())
                .time_to_idle(IDLE)
                .build(),
        }
    }

    pub fn get(&self, conversation: Uuid) -> Option<Arc<Window>> {
        self.windows.get(&conversation)
    }

    /// Keep `window` for `conversation`, unless one reaching a later version
    /// is kept already (two prompts of one conversation may finish in either
    /// order; either window is right, the later one is more use).
    pub fn put(&self, conversation: Uuid, window: Window) {
        let Some(last) = window.last_version() else {
            return;
        };
        self.windows
            .entry(conversation)
            .and_compute_with(|kept| match kept {
                Some(kept) if kept.value().last_version() > Some(last) => {
                    moka::ops::compute::Op::Nop
                }
                _ => moka::ops::compute::Op::Put(Arc::new(window)),
            });
    }

    pub fn forget(&self, conversation: Uuid) {
        self.windows.invalidate(&conversation);
    }
}
