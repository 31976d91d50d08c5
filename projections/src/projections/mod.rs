//! Every projection, registered once: its name (its checkpoint row and durable
//! consumer), the tables it owns, its live path and its fold. The worker, the
//! rebuild, `verify`, the service's roles and the operator commands all read
//! this list, and only this list.
//!
//! One folder per projection: `mod.rs` holds its registration and the rules its
//! live path and its fold share, `live.rs` applies each event in SQL, `fold.rs`
//! folds events into rows in memory (`crate::fold`).

pub mod assistants;
pub mod cache;
pub mod conversations;
pub mod messages;
pub mod usage_daily;

use std::sync::Arc;

use ai_secretary_contract::{Event, EventEnvelope, Position};

use self::{
    assistants::AssistantsFold, cache::CacheFold, conversations::ConversationsFold,
    messages::MessagesFold, usage_daily::UsageFold,
};
use crate::{cache::Cache, projection::Projection};

/// A read-model table and the columns of its key, as in the migrations.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    pub key: &'static [&'static str],
}

const fn table(name: &'static str, key: &'static [&'static str]) -> Table {
    Table { name, key }
}

/// One projection as the rest of the read side knows it.
#[derive(Clone, Copy)]
pub struct Registered {
    pub name: &'static str,
    /// The tables it owns, all rebuilt, swapped and verified together.
    pub tables: &'static [Table],
    /// Its live path (the cache's needs the Redis cache it tombstones).
    pub live: fn(&Cache) -> Arc<dyn Projection>,
    /// An empty fold of its rows.
    pub fold: fn() -> Fold,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("name", &self.name)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

/// Every projection, in the order operators see them.
pub const ALL: [Registered; 5] = [
    assistants::PROJECTION,
    conversations::PROJECTION,
    messages::PROJECTION,
    usage_daily::PROJECTION,
    cache::PROJECTION,
];

/// The names of [`ALL`], in its order.
pub const NAMES: [&str; ALL.len()] = {
    let mut names = [""; ALL.len()];
    let mut i = 0;
    while i < ALL.len() {
        names[i] = ALL[i].name;
        i += 1;
    }
    names
};

/// The projection named `name`, if there is one.
pub fn find(name: &str) -> Option<&'static Registered> {
    ALL.iter().find(|p| p.name == name)
}

/// The tables of the projection named `name` (none for an unknown name).
pub fn tables_of(name: &str) -> &'static [Table] {
    find(name).map_or(&[], |p| p.tables)
}

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
        find(name).map(|p| (p.fold)())
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
        tables_of(self.name())
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
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::*;

    /// Each part of a projection answers to the name it is registered under, and
    /// no two projections share a name or a table (a rebuild swaps by table).
    #[test]
    fn every_part_of_a_projection_carries_its_registered_name() {
        let cache = Cache::new(
            "redis://127.0.0.1:1",
            "t",
            Default::default(),
            Default::default(),
        );
        let mut tables = std::collections::HashSet::new();
        for (p, name) in ALL.iter().zip(NAMES) {
            assert_eq!(p.name, name);
            assert_eq!((p.live)(&cache).name(), name);
            assert_eq!((p.fold)().name(), name);
            assert_eq!(
                find(name).map(|found| found.tables.len()),
                Some(p.tables.len())
            );
            assert!(!p.tables.is_empty(), "{name} owns no table");
            for table in p.tables {
                assert!(tables.insert(table.name), "{} is owned twice", table.name);
            }
        }
        assert!(find("nope").is_none() && tables_of("nope").is_empty());
    }

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
        let mut folds: Vec<(Fold, Position)> = NAMES
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
