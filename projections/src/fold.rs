//! The batch path of the read side: each projection's rules as a fold of events
//! into rows held in memory, for rebuilding and verifying read models at the
//! speed of a sequential read (no round trip per event).
//!
//! Each projection's fold (its `fold.rs`, beside its `live.rs`) restates, row
//! for row, what its incremental `apply` does in SQL (same insert-if-absent,
//! same COALESCE, same GREATEST ignoring NULL, same counters). `verify` folds the store here and diffs the result with
//! the rows the incremental path wrote: any divergence between the two is drift,
//! so a rule changed in one place and not the other cannot go unnoticed.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use ai_secretary_contract::{Event, EventEnvelope, Position};
use chrono::{DateTime, Utc};

use crate::projections::{
    self, Table,
    assistants::{self, AssistantsFold},
    cache::{self, CacheFold},
    conversations::{self, ConversationsFold},
    messages::{self, MessagesFold},
    usage_daily::{self, UsageFold},
};

/// Rows by key, remembering (once `track_changes` is on) which keys changed, so
/// the small tail folded after a bulk write is written row by row.
#[derive(Debug)]
pub struct Rows<K, V> {
    rows: HashMap<K, V>,
    changed: Option<HashSet<K>>,
}

impl<K: Eq + Hash + Clone, V> Default for Rows<K, V> {
    fn default() -> Self {
        Rows {
            rows: HashMap::new(),
            changed: None,
        }
    }
}

impl<K: Eq + Hash + Clone, V> Rows<K, V> {
    pub fn get(&self, key: &K) -> Option<&V> {
        self.rows.get(key)
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let row = self.rows.get_mut(key)?;
        if let Some(changed) = &mut self.changed {
            changed.insert(key.clone());
        }
        Some(row)
    }

    /// `INSERT … ON CONFLICT DO NOTHING`.
    pub(crate) fn insert_if_absent(&mut self, key: K, make: impl FnOnce() -> V) {
        if self.rows.contains_key(&key) {
            return;
        }
        if let Some(changed) = &mut self.changed {
            changed.insert(key.clone());
        }
        self.rows.insert(key, make());
    }

    pub(crate) fn entry_or(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if let Some(changed) = &mut self.changed {
            changed.insert(key.clone());
        }
        self.rows.entry(key).or_insert_with(make)
    }

    /// `DELETE … WHERE`: every row `doomed` picks.
    pub(crate) fn remove_where(&mut self, doomed: impl Fn(&K, &V) -> bool) {
        let keys: Vec<K> = self
            .rows
            .iter()
            .filter(|(k, v)| doomed(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            self.remove(key);
        }
    }

    pub(crate) fn remove(&mut self, key: &K) {
        if self.rows.remove(key).is_some()
            && let Some(changed) = &mut self.changed
        {
            changed.insert(key.clone());
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.rows.iter()
    }

    /// From now on, remember which keys change.
    pub fn track_changes(&mut self) {
        self.changed = Some(HashSet::new());
    }

    /// The keys changed since the last call, and forget them.
    pub fn take_changed(&mut self) -> Vec<K> {
        self.changed
            .as_mut()
            .map(|c| c.drain().collect())
            .unwrap_or_default()
    }
}

/// The positions every row of an aggregate projection carries.
pub(crate) fn stamp(e: &EventEnvelope) -> (i64, i64) {
    (e.transaction_id, e.global_position)
}

/// Postgres `GREATEST`: NULL arguments are ignored.
pub(crate) fn greatest(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(a.map_or(b, |a| a.max(b)))
}

// ------------------------------------------------------------------ together

/// The fold of one projection, by name.
#[derive(Debug)]
pub enum Fold {
    Assistants(AssistantsFold),
    Conversations(ConversationsFold),
    Messages(MessagesFold),
    UsageDaily(UsageFold),
    Cache(CacheFold),
}

impl Fold {
    /// An empty fold for the projection `name`, if there is one.
    pub fn new(name: &str) -> Option<Fold> {
        projections::find(name).map(|p| (p.fold)())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Fold::Assistants(_) => assistants::PROJECTION.name,
            Fold::Conversations(_) => conversations::PROJECTION.name,
            Fold::Messages(_) => messages::PROJECTION.name,
            Fold::UsageDaily(_) => usage_daily::PROJECTION.name,
            Fold::Cache(_) => cache::PROJECTION.name,
        }
    }

    /// The tables its rows go to.
    pub fn tables(&self) -> &'static [Table] {
        projections::tables_of(self.name())
    }

    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        match self {
            Fold::Assistants(f) => f.apply(e, event),
            Fold::Conversations(f) => f.apply(e, event),
            Fold::Messages(f) => f.apply(e, event),
            Fold::UsageDaily(f) => f.apply(e, event),
            Fold::Cache(f) => f.apply(e, event),
        }
    }

    /// From now on, remember which rows change (after the bulk write).
    pub fn track_changes(&mut self) {
        match self {
            Fold::Assistants(f) => {
                f.assistants.track_changes();
                f.conversations.track_changes();
            }
            Fold::Conversations(f) => f.conversations.track_changes(),
            Fold::Messages(f) => {
                f.messages.track_changes();
                f.conversations.track_changes();
            }
            Fold::UsageDaily(f) => {
                f.usage.track_changes();
                f.conversations.track_changes();
            }
            Fold::Cache(f) => f.conversations.track_changes(),
        }
    }
}

/// Fold one event (its envelope and its decoded payload) into each fold whose
/// limit it does not pass. Undecodable events are skipped, as the worker skips
/// them (into `dead_letters`). Returns false for such an event.
pub fn apply_all(
    folds: &mut [(Fold, Position)],
    envelope: &EventEnvelope,
    event: Result<Event, String>,
) -> bool {
    let Ok(event) = event else {
        return false;
    };
    let at = envelope.position();
    for (fold, limit) in folds.iter_mut() {
        if at <= *limit {
            fold.apply(envelope, &event);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::sync::atomic::{AtomicU64, Ordering};
    use uuid::Uuid;

    /// A fresh id (the crate has no uuid generator of its own).
    fn id() -> Uuid {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Uuid::from_u128(NEXT.fetch_add(1, Ordering::Relaxed) as u128)
    }

    fn envelope(
        stream: Uuid,
        version: i64,
        gp: i64,
        event_type: &str,
        data: Value,
    ) -> EventEnvelope {
        EventEnvelope {
            event_id: id(),
            stream_id: stream,
            stream_type: if event_type.starts_with("Assistant") {
                "assistant".into()
            } else {
                "conversation".into()
            },
            version,
            event_type: event_type.into(),
            schema_version: 1,
            transaction_id: 100 + gp,
            global_position: gp,
            recorded_at: "2026-11-29T10:00:00Z".parse().unwrap(),
            data,
            metadata: json!({}),
            previous: None,
        }
    }

    #[test]
    fn a_conversation_counts_messages_and_tokens_and_keeps_the_last_message_time() {
        let (owner, assistant, conversation) = (id(), id(), id());
        let (message, reply) = (id(), id());
        let events = [
            envelope(
                assistant,
                1,
                1,
                "AssistantCreated",
                json!({"owner_id": owner, "name": "A", "role": "r", "instructions": "i", "model": "m", "temperature": 0.7, "metadata": {}, "created_at": "2026-11-29T10:00:00Z"}),
            ),
            envelope(
                conversation,
                1,
                2,
                "ConversationStarted",
                json!({"owner_id": owner, "assistant_id": assistant, "title": "t", "started_at": "2026-11-29T10:01:00Z"}),
            ),
            envelope(
                conversation,
                2,
                3,
                "MessagePosted",
                json!({"message_id": message, "content": "hi", "posted_at": "2026-11-29T10:02:00Z"}),
            ),
            envelope(
                conversation,
                3,
                4,
                "ReplyRequested",
                json!({"reply_id": reply, "reply_to": message, "assistant_id": assistant, "requested_at": "2026-11-29T10:02:00Z"}),
            ),
            envelope(
                conversation,
                4,
                5,
                "ReplyCompleted",
                json!({"reply_id": reply, "content": "hello", "model": "m", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, "completed_at": "2026-11-29T23:59:59Z"}),
            ),
        ];
        let mut folds: Vec<(Fold, Position)> = projections::NAMES
            .iter()
            .map(|n| {
                (
                    Fold::new(n).unwrap(),
                    Position {
                        transaction_id: i64::MAX,
                        global_position: i64::MAX,
                    },
                )
            })
            .collect();
        for e in &events {
            assert!(apply_all(&mut folds, e, e.decode()));
        }
        let Fold::Conversations(c) = &folds[1].0 else {
            panic!()
        };
        let row = c.conversations.get(&conversation).unwrap();
        assert_eq!(
            (row.message_count, row.total_tokens, row.version),
            (2, 7, 4)
        );
        assert_eq!(
            row.last_message_at,
            Some("2026-11-29T23:59:59Z".parse().unwrap())
        );
        let Fold::Assistants(a) = &folds[0].0 else {
            panic!()
        };
        let row = a.assistants.get(&assistant).unwrap();
        assert_eq!(
            (row.conversation_count, row.message_count, row.last_gp),
            (1, 2, 5)
        );
        let Fold::Messages(m) = &folds[2].0 else {
            panic!()
        };
        assert_eq!(m.messages.get(&reply).unwrap().status, "completed");
        let Fold::UsageDaily(u) = &folds[3].0 else {
            panic!()
        };
        let day = "2026-11-29".parse().unwrap();
        assert_eq!(
            u.usage
                .get(&(owner, day, assistant, "m".into()))
                .unwrap()
                .total_tokens,
            7
        );
    }

    /// A fold stops at its limit, and `track_changes` (what the swap's tail
    /// write relies on: only the rows the tail touched are written) records
    /// exactly the keys changed after it was turned on, once.
    #[test]
    fn a_limit_stops_a_fold_and_changes_are_tracked_only_when_asked() {
        let owner = id();
        let created = |assistant: Uuid, gp: i64| {
            envelope(
                assistant,
                1,
                gp,
                "AssistantCreated",
                json!({"owner_id": owner, "name": "A", "role": "r", "instructions": "i", "model": "m", "temperature": 0.5, "metadata": {}, "created_at": "2026-11-29T10:00:00Z"}),
            )
        };
        let renamed = |assistant: Uuid, gp: i64, name: &str| {
            envelope(
                assistant,
                2,
                gp,
                "AssistantUpdated",
                json!({"name": name, "updated_at": "2026-11-29T10:05:00Z"}),
            )
        };
        let (untouched, touched) = (id(), id());
        let before = [created(untouched, 1), created(touched, 2)];
        let tail = renamed(touched, 3, "B");
        let past_the_limit = renamed(untouched, 4, "C");
        let mut folds = vec![(Fold::new("assistants").unwrap(), tail.position())];
        for e in &before {
            assert!(apply_all(&mut folds, e, e.decode()));
        }
        folds[0].0.track_changes();
        for e in [&tail, &past_the_limit] {
            assert!(apply_all(&mut folds, e, e.decode()));
        }
        let Fold::Assistants(a) = &mut folds[0].0 else {
            panic!()
        };
        assert_eq!(a.assistants.get(&touched).unwrap().name, "B");
        assert_eq!(
            a.assistants.get(&untouched).unwrap().name,
            "A",
            "an event past the fold's limit was applied"
        );
        assert_eq!(
            a.assistants.take_changed(),
            [touched],
            "only the row changed after track_changes is tracked"
        );
        assert!(a.assistants.take_changed().is_empty(), "taken once");
    }
}
