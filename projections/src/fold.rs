//! The batch path of the read side: each projection's rules as a fold of events
//! into rows held in memory, for rebuilding and verifying read models at the
//! speed of a sequential read (no round trip per event).
//!
//! These rules restate, row for row, what each projection's incremental `apply`
//! does in SQL (same insert-if-absent, same COALESCE, same GREATEST ignoring
//! NULL, same counters). `verify` folds the store here and diffs the result with
//! the rows the incremental path wrote: any divergence between the two is drift,
//! so a rule changed in one place and not the other cannot go unnoticed.

use ai_secretary_contract::{Event, EventEnvelope, Position};
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::{assistants, conversations, messages};

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

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let row = self.rows.get_mut(key)?;
        if let Some(changed) = &mut self.changed {
            changed.insert(key.clone());
        }
        Some(row)
    }

    /// `INSERT … ON CONFLICT DO NOTHING`.
    fn insert_if_absent(&mut self, key: K, make: impl FnOnce() -> V) {
        if self.rows.contains_key(&key) {
            return;
        }
        if let Some(changed) = &mut self.changed {
            changed.insert(key.clone());
        }
        self.rows.insert(key, make());
    }

    fn entry_or(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if let Some(changed) = &mut self.changed {
            changed.insert(key.clone());
        }
        self.rows.entry(key).or_insert_with(make)
    }

    /// `DELETE … WHERE`: every row `doomed` picks.
    fn remove_where(&mut self, doomed: impl Fn(&K, &V) -> bool) {
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

    fn remove(&mut self, key: &K) {
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
fn stamp(e: &EventEnvelope) -> (i64, i64) {
    (e.transaction_id, e.global_position)
}

/// Postgres `GREATEST`: NULL arguments are ignored.
fn greatest(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(a.map_or(b, |a| a.max(b)))
}

// ---------------------------------------------------------------- assistants

#[derive(Debug, Clone, PartialEq)]
pub struct AssistantRow {
    pub owner_id: Uuid,
    pub name: String,
    pub role: String,
    pub instructions: String,
    pub model: String,
    pub temperature: f64,
    pub metadata: Value,
    pub status: String,
    pub conversation_count: i64,
    pub message_count: i64,
    pub last_activity_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    pub last_tx: i64,
    pub last_gp: i64,
}

/// Projection `assistants`: tables `assistants` and `assistants_conversations`.
#[derive(Debug, Default)]
pub struct AssistantsFold {
    pub assistants: Rows<Uuid, AssistantRow>,
    /// conversation id → assistant id.
    pub conversations: Rows<Uuid, Uuid>,
}

impl AssistantsFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        let (last_tx, last_gp) = stamp(e);
        match event {
            Event::UserForgotten => {
                let user = e.stream_id;
                let theirs: HashSet<Uuid> = self
                    .assistants
                    .iter()
                    .filter(|(_, a)| a.owner_id == user)
                    .map(|(id, _)| *id)
                    .collect();
                self.conversations
                    .remove_where(|_, assistant| theirs.contains(assistant));
                self.assistants.remove_where(|_, a| a.owner_id == user);
            }
            Event::AssistantCreated(a) => {
                self.assistants
                    .insert_if_absent(e.stream_id, || AssistantRow {
                        owner_id: a.owner_id,
                        name: a.name.clone(),
                        role: a.role.clone(),
                        instructions: a.instructions.clone(),
                        model: a.model.clone(),
                        temperature: a.temperature,
                        metadata: a.metadata.clone(),
                        status: "active".into(),
                        conversation_count: 0,
                        message_count: 0,
                        last_activity_at: None,
                        created_at: a.created_at,
                        updated_at: a.created_at,
                        version: e.version,
                        last_tx,
                        last_gp,
                    })
            }
            Event::AssistantUpdated(u) => {
                if let Some(row) = self.assistants.get_mut(&e.stream_id) {
                    if let Some(v) = &u.name {
                        row.name.clone_from(v);
                    }
                    if let Some(v) = &u.role {
                        row.role.clone_from(v);
                    }
                    if let Some(v) = &u.instructions {
                        row.instructions.clone_from(v);
                    }
                    if let Some(v) = &u.model {
                        row.model.clone_from(v);
                    }
                    if let Some(v) = u.temperature {
                        row.temperature = v;
                    }
                    // A JSON null is SQL NULL here too: COALESCE keeps the old value.
                    if let Some(v) = u.metadata.as_ref().filter(|v| !v.is_null()) {
                        row.metadata.clone_from(v);
                    }
                    row.updated_at = u.updated_at;
                    row.version = e.version;
                    (row.last_tx, row.last_gp) = (last_tx, last_gp);
                }
            }
            Event::AssistantStatus { status, at } => {
                if let Some(row) = self.assistants.get_mut(&e.stream_id) {
                    row.status = (*status).into();
                    row.updated_at = *at;
                    row.version = e.version;
                    (row.last_tx, row.last_gp) = (last_tx, last_gp);
                }
            }
            Event::AssistantDeleted => self.assistants.remove(&e.stream_id),
            Event::ConversationStarted(c) => {
                self.conversations
                    .insert_if_absent(e.stream_id, || c.assistant_id);
                if let Some(row) = self.assistants.get_mut(&c.assistant_id) {
                    row.conversation_count += 1;
                    row.last_activity_at = greatest(row.last_activity_at, c.started_at);
                    (row.last_tx, row.last_gp) = (last_tx, last_gp);
                }
            }
            _ => {
                let Some((counted, at)) = assistants::activity(event) else {
                    return;
                };
                let Some(assistant) = e
                    .conversation_id(event)
                    .and_then(|c| self.conversations.get(&c).copied())
                else {
                    return;
                };
                if let Some(row) = self.assistants.get_mut(&assistant) {
                    row.message_count += counted;
                    row.last_activity_at = greatest(row.last_activity_at, at);
                    (row.last_tx, row.last_gp) = (last_tx, last_gp);
                }
            }
        }
    }
}

// ------------------------------------------------------------- conversations

#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRow {
    pub owner_id: Uuid,
    pub assistant_id: Uuid,
    pub title: String,
    pub status: String,
    pub message_count: i64,
    pub last_message_at: Option<DateTime<Utc>>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    pub last_tx: i64,
    pub last_gp: i64,
}

/// Projection `conversations`: table `conversations`.
#[derive(Debug, Default)]
pub struct ConversationsFold {
    pub conversations: Rows<Uuid, ConversationRow>,
}

impl ConversationsFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        let (last_tx, last_gp) = stamp(e);
        if let Event::UserForgotten = event {
            let user = e.stream_id;
            self.conversations.remove_where(|_, c| c.owner_id == user);
            return;
        }
        if let Event::ConversationStarted(c) = event {
            self.conversations
                .insert_if_absent(e.stream_id, || ConversationRow {
                    owner_id: c.owner_id,
                    assistant_id: c.assistant_id,
                    title: c.title.clone(),
                    status: "active".into(),
                    message_count: 0,
                    last_message_at: None,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    total_tokens: 0,
                    created_at: c.started_at,
                    updated_at: c.started_at,
                    version: e.version,
                    last_tx,
                    last_gp,
                });
            return;
        }
        let Some(conversations::Change {
            title,
            status,
            counted,
            last_message_at,
            usage,
            at,
        }) = conversations::change(event)
        else {
            return;
        };
        let Some(conversation_id) = e.conversation_id(event) else {
            return;
        };
        if let Some(row) = self.conversations.get_mut(&conversation_id) {
            if let Some(title) = title {
                title.clone_into(&mut row.title);
            }
            if let Some(status) = status {
                row.status = status.into();
            }
            row.message_count += counted;
            row.last_message_at = last_message_at.or(row.last_message_at);
            row.prompt_tokens += usage.prompt_tokens;
            row.completion_tokens += usage.completion_tokens;
            row.total_tokens += usage.total_tokens;
            row.updated_at = at;
            // A reply's events leave the conversation's own version alone.
            row.version = e.conversation_version().unwrap_or(row.version);
            (row.last_tx, row.last_gp) = (last_tx, last_gp);
        }
    }
}

// ------------------------------------------------------------------ messages

#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub conversation_id: Uuid,
    pub owner_id: Uuid,
    pub seq: i64,
    pub role: &'static str,
    pub content: Option<String>,
    pub status: &'static str,
    pub reply_to: Option<Uuid>,
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Projection `messages`: tables `messages` and `messages_conversations`.
#[derive(Debug, Default)]
pub struct MessagesFold {
    pub messages: Rows<Uuid, MessageRow>,
    /// conversation id → owner id.
    pub conversations: Rows<Uuid, Uuid>,
}

impl MessagesFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        match event {
            Event::UserForgotten => {
                let user = e.stream_id;
                self.messages.remove_where(|_, m| m.owner_id == user);
                self.conversations.remove_where(|_, owner| *owner == user);
            }
            Event::ConversationStarted(c) => {
                self.conversations
                    .insert_if_absent(e.stream_id, || c.owner_id);
            }
            Event::ReplyStarted(r) => {
                // As the live projection: only a reply still waiting moves.
                if let Some(row) = self.messages.get_mut(&r.reply_id)
                    && matches!(row.status, "queued" | "in_progress")
                {
                    row.status = "in_progress";
                    row.updated_at = r.started_at;
                }
            }
            Event::ReplyCompleted(r) => {
                if let Some(row) = self.messages.get_mut(&r.reply_id) {
                    row.content = Some(r.content.clone());
                    row.status = "completed";
                    row.model = Some(r.model.clone());
                    row.finish_reason = Some(r.finish_reason.clone());
                    row.prompt_tokens = Some(r.usage.prompt_tokens);
                    row.completion_tokens = Some(r.usage.completion_tokens);
                    row.total_tokens = Some(r.usage.total_tokens);
                    row.updated_at = r.completed_at;
                }
            }
            Event::ReplyFailed(f) => {
                if let Some(row) = self.messages.get_mut(&f.reply_id) {
                    row.status = "failed";
                    row.error = Some(f.error.clone());
                    row.updated_at = f.failed_at;
                }
            }
            _ => {
                let Some(messages::NewMessage {
                    id,
                    role,
                    content,
                    status,
                    reply_to,
                    at,
                }) = messages::new_message(event)
                else {
                    return;
                };
                let Some(owner_id) = self.conversations.get(&e.stream_id).copied() else {
                    return;
                };
                self.messages.insert_if_absent(id, || MessageRow {
                    conversation_id: e.stream_id,
                    owner_id,
                    seq: e.version,
                    role,
                    content: content.cloned(),
                    status,
                    reply_to,
                    model: None,
                    finish_reason: None,
                    prompt_tokens: None,
                    completion_tokens: None,
                    total_tokens: None,
                    error: None,
                    created_at: at,
                    updated_at: at,
                });
            }
        }
    }
}

// --------------------------------------------------------------- usage_daily

/// `(owner_id, day, assistant_id, model)`.
pub type UsageKey = (Uuid, NaiveDate, Uuid, String);

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UsageRow {
    pub messages: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

/// Projection `usage_daily`: tables `usage_daily` and `usage_conversations`.
#[derive(Debug, Default)]
pub struct UsageFold {
    pub usage: Rows<UsageKey, UsageRow>,
    /// conversation id → (owner id, assistant id).
    pub conversations: Rows<Uuid, (Uuid, Uuid)>,
}

impl UsageFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        match event {
            Event::UserForgotten => {
                let user = e.stream_id;
                self.usage.remove_where(|(owner, ..), _| *owner == user);
                self.conversations
                    .remove_where(|_, (owner, _)| *owner == user);
            }
            Event::ConversationStarted(c) => {
                self.conversations
                    .insert_if_absent(e.stream_id, || (c.owner_id, c.assistant_id));
            }
            Event::ReplyCompleted(r) => {
                let Some((owner, assistant)) = e
                    .conversation_id(event)
                    .and_then(|c| self.conversations.get(&c).copied())
                else {
                    return;
                };
                // `($2::timestamptz AT TIME ZONE 'UTC')::date`
                let day = r.completed_at.date_naive();
                let row = self
                    .usage
                    .entry_or((owner, day, assistant, r.model.clone()), UsageRow::default);
                row.messages += 1;
                row.prompt_tokens += r.usage.prompt_tokens;
                row.completion_tokens += r.usage.completion_tokens;
                row.total_tokens += r.usage.total_tokens;
            }
            _ => {}
        }
    }
}

// --------------------------------------------------------------------- cache

/// Projection `cache`: its Postgres lookup `cache_conversations` (the Redis
/// values are not folded: a rebuild drops them and queries fill them again).
#[derive(Debug, Default)]
pub struct CacheFold {
    /// conversation id → assistant id.
    pub conversations: Rows<Uuid, Uuid>,
}

impl CacheFold {
    pub fn apply(&mut self, e: &EventEnvelope, event: &Event) {
        if let (Event::ConversationStarted(c), "conversation") = (event, e.stream_type.as_str()) {
            self.conversations
                .insert_if_absent(e.stream_id, || c.assistant_id);
        }
    }
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

/// The projections with a batch path, in the order operators see them.
pub const NAMES: [&str; 5] = [
    "assistants",
    "conversations",
    "messages",
    "usage_daily",
    "cache",
];

impl Fold {
    /// An empty fold for the projection `name`, if there is one.
    pub fn new(name: &str) -> Option<Fold> {
        Some(match name {
            "assistants" => Fold::Assistants(Default::default()),
            "conversations" => Fold::Conversations(Default::default()),
            "messages" => Fold::Messages(Default::default()),
            "usage_daily" => Fold::UsageDaily(Default::default()),
            "cache" => Fold::Cache(Default::default()),
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Fold::Assistants(_) => "assistants",
            Fold::Conversations(_) => "conversations",
            Fold::Messages(_) => "messages",
            Fold::UsageDaily(_) => "usage_daily",
            Fold::Cache(_) => "cache",
        }
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
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};

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
