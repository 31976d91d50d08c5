//! Every projection, registered once: its name (its checkpoint row and durable
//! consumer), the tables it owns, its rules and its live path. The worker, the
//! rebuild, `verify`, the service's roles and the operator commands all read
//! this list, and only this list.
//!
//! One folder per projection: its `mod.rs` declares its tables and its rules,
//! pure functions from an event to typed read-model operations (`crate::ops`).
//! The live path ([`Live`]) runs them in SQL with the executor of its database
//! (Postgres or SQLite), the rebuild's [`Fold`] on rows in memory: one set of
//! rules, three executors.

pub mod assistants;
pub mod cache;
pub mod conversations;
pub mod messages;
pub mod usage_daily;

use std::sync::Arc;

use ai_secretary_contract::{Event, EventEnvelope, Position};

pub use crate::ops::Table;
use crate::{
    cache::Cache,
    fold::TableRows,
    ops::{Found, Rules},
    projection::{Batch, Projection, ProjectionError},
};

/// One projection as the rest of the read side knows it.
#[derive(Clone, Copy)]
pub struct Registered {
    pub name: &'static str,
    /// The tables it owns, all rebuilt, swapped and verified together.
    pub tables: &'static [&'static Table],
    /// What it makes of each event.
    pub rules: Rules,
    /// Its live path (the cache's needs the Redis cache it tombstones).
    pub live: fn(&Cache) -> Arc<dyn Projection>,
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
pub fn tables_of(name: &str) -> &'static [&'static Table] {
    find(name).map_or(&[], |p| p.tables)
}

/// The live path of a projection whose every write is a read-model op: each
/// event's lookup and ops run in the batch's transaction.
pub struct Live {
    pub name: &'static str,
    pub rules: Rules,
}

#[async_trait::async_trait]
impl Projection for Live {
    fn name(&self) -> &'static str {
        self.name
    }

    fn touches(&self, e: &EventEnvelope, event: &Event) -> bool {
        self.rules.touches(e, event)
    }

    async fn apply(
        &self,
        batch: &mut Batch,
        e: &EventEnvelope,
        event: &Event,
    ) -> Result<(), ProjectionError> {
        batch.apply_rules(&self.rules, e, event).await
    }
}

/// The fold of one projection: its rules applied to its tables' rows in memory.
#[derive(Debug)]
pub struct Fold {
    projection: &'static Registered,
    /// One per table, in the order of `Registered::tables`.
    pub tables: Vec<TableRows>,
}

impl Fold {
    /// An empty fold for the projection `name`, if there is one.
    pub fn new(name: &str) -> Option<Fold> {
        find(name).map(Fold::empty)
    }

    fn empty(projection: &'static Registered) -> Fold {
        Fold {
            projection,
            tables: projection
                .tables
                .iter()
                .map(|t| TableRows::new(t))
                .collect(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.projection.name
    }

    /// This fold's rows, leaving an empty fold of the same projection in
    /// their place (a fold is moved to the thread or transaction that
    /// continues it, and comes back).
    pub fn take(&mut self) -> Fold {
        let empty = Fold {
            projection: self.projection,
            tables: self
                .projection
                .tables
                .iter()
                .map(|t| TableRows::new(t))
                .collect(),
        };
        std::mem::replace(self, empty)
    }

    /// The tables its rows go to.
    pub fn tables(&self) -> &'static [&'static Table] {
        self.projection.tables
    }

    /// The rows of its table `name`.
    pub fn table(&self, name: &str) -> Option<&TableRows> {
        self.tables.iter().find(|t| t.table.name == name)
    }

    fn table_mut(&mut self, name: &str) -> &mut TableRows {
        self.tables
            .iter_mut()
            .find(|t| t.table.name == name)
            .unwrap_or_else(|| panic!("{} has no table {name}", self.projection.name))
    }

    /// Apply one event: the rules' lookup answered from these rows, then their ops.
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        let rules = self.projection.rules;
        let found = match (rules.lookup)(e, event) {
            Some(lookup) => self.table_mut(lookup.table.name).read(&lookup),
            None => Found::default(),
        };
        for op in (rules.ops)(e, event, &found) {
            self.table_mut(op.table().name).apply(op);
        }
    }

    /// From now on, remember which rows change (after the bulk write).
    pub fn track_changes(&mut self) {
        for table in &mut self.tables {
            table.rows.track_changes();
        }
    }
}

/// Fold one event (its envelope and its decoded payload) into each fold whose
/// limit it does not pass. Undecodable events are skipped, as the worker skips
/// them (into `dead_letters`). Returns false for such an event.
pub fn apply_all(
    folds: &mut [(Fold, Position)],
    envelope: &EventEnvelope,
    event: Result<&Event, &String>,
) -> bool {
    let Ok(event) = event else {
        return false;
    };
    let at = envelope.position();
    for (fold, limit) in folds.iter_mut() {
        if at <= *limit {
            fold.apply(envelope, event);
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
            assert_eq!(Fold::new(name).map(|f| f.name()), Some(name));
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
            assert!(apply_all(&mut folds, e, e.decode().as_ref()));
        }
        // Column `column` of the row of `table` keyed `key`, in fold `i`.
        let value = |i: usize, table: &str, key: Vec<crate::ops::Value>, column: &str| {
            let rows = folds[i].0.table(table).unwrap();
            let row = rows.get(&key).expect("the row is there");
            rows.value(row, column).clone()
        };
        let conversation_row =
            |column| value(1, "conversations", vec![conversation.into()], column);
        assert_eq!(
            ["message_count", "total_tokens", "version"].map(|c| conversation_row(c).as_i64()),
            [Some(2), Some(7), Some(4)]
        );
        assert_eq!(
            conversation_row("last_message_at").as_timestamp(),
            Some("2026-11-29T23:59:59Z".parse().unwrap())
        );
        let assistant_row = |column| value(0, "assistants", vec![assistant.into()], column);
        assert_eq!(
            ["conversation_count", "message_count", "last_gp"].map(|c| assistant_row(c).as_i64()),
            [Some(1), Some(2), Some(5)]
        );
        assert_eq!(
            value(2, "messages", vec![reply.into()], "status").as_str(),
            Some("completed")
        );
        let day: chrono::NaiveDate = "2026-11-29".parse().unwrap();
        let usage_key = vec![owner.into(), day.into(), assistant.into(), "m".into()];
        assert_eq!(
            value(3, "usage_daily", usage_key, "total_tokens").as_i64(),
            Some(7)
        );
    }

    /// Which of a conversation's events each projection touches: a batch of
    /// only events it does not touch has nothing to write but the checkpoint's
    /// move, which the worker then makes as one statement. What each answers
    /// comes from its rules (`Rules::touches`), through its live path.
    #[test]
    fn a_projection_touches_only_the_events_its_rules_read_or_write_for() {
        let (owner, assistant, conversation) = (id(), id(), id());
        let (message, reply) = (id(), id());
        let at = "2026-12-03T10:00:00Z";
        let events = [
            ("ConversationStarted", json!({"owner_id": owner, "assistant_id": assistant, "title": "t", "started_at": at})),
            ("MessagePosted", json!({"message_id": message, "content": "hi", "posted_at": at})),
            ("ReplyRequested", json!({"reply_id": reply, "reply_to": message, "assistant_id": assistant, "requested_at": at})),
            ("ReplyStarted", json!({"reply_id": reply, "conversation_id": conversation, "attempt": 1, "started_at": at})),
            ("ReplyCompleted", json!({"reply_id": reply, "conversation_id": conversation, "content": "hello", "model": "m", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, "completed_at": at})),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (kind, data))| envelope(conversation, i as i64 + 1, i as i64 + 1, kind, data))
        .collect::<Vec<_>>();
        let cache = Cache::new(
            "redis://127.0.0.1:1",
            "t",
            Default::default(),
            Default::default(),
        );
        let touched: Vec<(&str, Vec<&str>)> = ALL
            .iter()
            .map(|p| {
                let live = (p.live)(&cache);
                let kinds = events
                    .iter()
                    .filter(|e| live.touches(e, &e.decode().unwrap()))
                    .map(|e| e.event_type.as_str())
                    .collect();
                (p.name, kinds)
            })
            .collect();
        let all = vec![
            "ConversationStarted",
            "MessagePosted",
            "ReplyRequested",
            "ReplyStarted",
            "ReplyCompleted",
        ];
        assert_eq!(
            touched,
            [
                // Counts and last activity; a reply starting changes neither.
                (
                    "assistants",
                    vec![
                        "ConversationStarted",
                        "MessagePosted",
                        "ReplyRequested",
                        "ReplyCompleted"
                    ]
                ),
                ("conversations", all.clone()),
                ("messages", all),
                // Its conversation's owner and assistant, then the usage.
                ("usage_daily", vec!["ConversationStarted", "ReplyCompleted"]),
                // Its table is the conversation → assistant lookup alone; its
                // Redis work is in `prepare`, for every batch.
                ("cache", vec!["ConversationStarted"]),
            ]
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
            assert!(apply_all(&mut folds, e, e.decode().as_ref()));
        }
        folds[0].0.track_changes();
        for e in [&tail, &past_the_limit] {
            assert!(apply_all(&mut folds, e, e.decode().as_ref()));
        }
        let assistants = &mut folds[0].0.tables[0];
        let name = |rows: &TableRows, id: Uuid| {
            let row = rows.get(&[id.into()]).unwrap();
            rows.value(row, "name").as_str().unwrap().to_owned()
        };
        assert_eq!(name(assistants, touched), "B");
        assert_eq!(
            name(assistants, untouched),
            "A",
            "an event past the fold's limit was applied"
        );
        assert_eq!(
            assistants.rows.take_changed(),
            [vec![touched.into()]],
            "only the row changed after track_changes is tracked"
        );
        assert!(assistants.rows.take_changed().is_empty(), "taken once");
    }
}
