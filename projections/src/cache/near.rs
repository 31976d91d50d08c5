//! The Redis backend's copy in process memory (a "near cache"): values this
//! process read from Redis, answered again without a round trip for as long
//! as Redis has not said they changed.
//!
//! **Redis says so itself** (client tracking). Every query's read goes through
//! one connection, in RESP3 with `CLIENT TRACKING ON`. Redis then pushes an
//! `invalidate` on that connection for every key the connection read and that
//! anything later writes:
//! - the `cache` projection's stamps and forgets;
//! - another process's fill;
//! - expiry and eviction;
//! - a flush (a push for every key at once).
//!
//! The push is handled in the connection's driver ([`NearCache::pushed`]),
//! before any reply that follows it on the wire.
//!
//! **When a held value may be served.** A query needs the cache current through a
//! position (its consistency token, or where the read model it would
//! otherwise read is). The `cache` projection commits its checkpoint only after
//! Redis ran the batch, so Redis had queued that batch's pushes before it ran
//! any request sent after the caller saw the checkpoint. A reply to such a
//! request therefore proves every push through that checkpoint has been
//! handled, and the reply moves `synced` there ([`NearCache::synced`]). A value
//! is answered from memory only when `synced` has reached the position the
//! query needs; otherwise the query asks Redis, and that round trip moves
//! `synced` on. So a quiet cache answers from memory, and a busy one pays a
//! round trip once per checkpoint move rather than once per query.
//!
//! **A reply racing the push that drops it.** A read leaves a ticket for its
//! key before it is sent. A push for the key (or a lost connection) takes the
//! ticket, and the reply is kept only if its ticket is still there
//! ([`NearCache::keep`]). The ticket check and the push both take `state`'s
//! lock, so the two can never interleave.
//!
//! **A lost connection.** Pushes may be lost with the connection, so a lost
//! connection forgets everything: values, tickets and `synced`. The next query
//! connects again, with tracking on, and starts empty. Values carry the
//! session (connection) they came through, and a ticket or sync from an older
//! session does nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use ai_secretary_contract::Position;
use moka::sync::Cache as Moka;
use redis::{PushInfo, PushKind, aio::MultiplexedConnection};
use uuid::Uuid;

use super::CachedJson;

/// Most bytes the held values take, as [`weight`] estimates them. Each API
/// process holds its own copy, so the bound stays small beside the 64 MiB a
/// process is meant to fit in: 8 MiB holds some 3,000–10,000 resources (0.5–2
/// KiB of JSON each), the hot set of a busy instance. Losing a value to the
/// bound only costs the round trip the process would pay without this cache.
pub const NEAR_BYTES: u64 = 8 << 20;

/// What a value costs besides its JSON text (key, owner, version, moka's
/// bookkeeping).
const ENTRY_OVERHEAD: u32 = 200;

/// The estimated bytes of a value whose JSON text is `json_len` long. A value
/// is held as the text Redis gave (a hit then sends it as it is: no parse, no
/// copy), so the text is most of it.
fn weight(json_len: usize) -> u32 {
    u32::try_from(json_len)
        .unwrap_or(u32::MAX)
        .saturating_add(ENTRY_OVERHEAD)
}

/// A value as Redis gave it: its owner, and its JSON text.
#[derive(Clone)]
struct Held {
    owner: Uuid,
    json: CachedJson,
    weight: u32,
}

/// The copies, and the connection whose pushes keep them true. Cheap to share
/// (`Arc`): the push handler and every query hold it.
pub(super) struct NearCache {
    /// Redis key → the value read through the current connection.
    values: Moka<String, Held>,
    state: Mutex<State>,
}

struct State {
    /// The connection of the current session; `None` until the first query
    /// connects, and again once it is lost.
    connection: Option<MultiplexedConnection>,
    /// The number of the latest connection. Only its pushes, tickets and syncs
    /// count.
    session: u64,
    /// Every push through this position has been handled in this session.
    /// `None`: nothing is known yet, so nothing is answered from memory.
    synced: Option<Position>,
    /// Reads on their way, by key: the ticket each left.
    tickets: HashMap<String, u64>,
    next_ticket: u64,
}

/// The data behind the lock is valid whatever a panicking holder did.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl NearCache {
    /// An empty cache whose values live at most `ttl` (Redis's own TTL, which
    /// also pushes an invalidation when it expires a key).
    pub(super) fn new(ttl: Duration, bytes: u64) -> Arc<NearCache> {
        let values = Moka::builder()
            .max_capacity(bytes)
            .weigher(|_, held: &Held| held.weight)
            .time_to_live(ttl.clamp(Duration::from_secs(1), super::local::LONGEST_TTL))
            .build();
        Arc::new(NearCache {
            values,
            state: Mutex::new(State {
                connection: None,
                session: 0,
                synced: None,
                tickets: HashMap::new(),
                next_ticket: 0,
            }),
        })
    }

    /// The tracking connection and its session, if one is up.
    pub(super) fn connection(&self) -> Option<(u64, MultiplexedConnection)> {
        let state = lock(&self.state);
        let connection = state.connection.clone()?;
        Some((state.session, connection))
    }

    /// Start a new session: forget everything the last one held. Returns its
    /// number, for the push handler of the connection about to be made.
    pub(super) fn begin_session(&self) -> u64 {
        let mut state = lock(&self.state);
        state.session += 1;
        Self::forget_everything(&mut state, &self.values);
        state.session
    }

    /// The connection of `session` is made and tracking is on.
    pub(super) fn connected(&self, session: u64, connection: MultiplexedConnection) {
        let mut state = lock(&self.state);
        if state.session == session {
            state.connection = Some(connection);
        }
    }

    fn forget_everything(state: &mut State, values: &Moka<String, Held>) {
        state.connection = None;
        state.synced = None;
        state.tickets.clear();
        values.invalidate_all();
    }

    /// A push on the connection of `session`, handled in its driver, in wire
    /// order: an invalidation drops the keys it names (all of them on a
    /// flush); a lost connection forgets everything.
    pub(super) fn pushed(&self, session: u64, push: PushInfo) {
        let mut state = lock(&self.state);
        if state.session != session {
            return;
        }
        match push.kind {
            PushKind::Invalidate => match push.data.first() {
                Some(redis::Value::Array(keys)) => {
                    for key in keys {
                        if let Ok(key) = redis::from_redis_value_ref::<String>(key) {
                            state.tickets.remove(&key);
                            self.values.invalidate(&key);
                        }
                    }
                }
                // After FLUSHALL or FLUSHDB Redis names no key: all of them.
                _ => {
                    state.tickets.clear();
                    self.values.invalidate_all();
                }
            },
            PushKind::Disconnection => {
                tracing::info!("the cache's tracking connection closed; its copies are dropped");
                Self::forget_everything(&mut state, &self.values);
            }
            _ => {}
        }
    }

    /// The value held for `key`, if every push through `through` has been
    /// handled (so none still on its way could drop it).
    pub(super) fn hit(&self, key: &str, owner: Uuid, through: Position) -> Option<CachedJson> {
        if lock(&self.state)
            .synced
            .is_none_or(|synced| synced < through)
        {
            return None;
        }
        let held = self.values.get(key)?;
        (held.owner == owner).then_some(held.json)
    }

    /// Leave a ticket for a read of `key` about to be sent on `session`'s
    /// connection. Dropping the ticket without [`NearCache::keep`] takes it
    /// back.
    pub(super) fn ticket<'a>(&'a self, session: u64, key: &'a str) -> Ticket<'a> {
        let mut state = lock(&self.state);
        state.next_ticket += 1;
        let number = state.next_ticket;
        if state.session == session {
            state.tickets.insert(key.to_owned(), number);
        }
        Ticket {
            near: self,
            session,
            key,
            number,
        }
    }

    /// Every push through `invalidated` has been handled on `session`'s
    /// connection: a reply came back to a request sent after the caller saw
    /// the `cache` projection's checkpoint there.
    pub(super) fn synced(&self, session: u64, invalidated: Position) {
        let mut state = lock(&self.state);
        if state.session == session && state.connection.is_some() {
            state.synced = Some(state.synced.map_or(invalidated, |s| s.max(invalidated)));
        }
    }
}

/// A read on its way (see the module doc). Taken back when dropped.
pub(super) struct Ticket<'a> {
    near: &'a NearCache,
    session: u64,
    key: &'a str,
    number: u64,
}

impl Ticket<'_> {
    /// Hold the value the read returned (its JSON as Redis keeps it, and its
    /// owner), unless a push took the ticket while it was on its way. `None`
    /// when the text is not JSON.
    pub(super) fn keep(self, owner: Uuid, json: Vec<u8>) -> Option<CachedJson> {
        let json = CachedJson::parse(json)?;
        let mut state = lock(&self.near.state);
        if state.session == self.session && state.tickets.get(self.key) == Some(&self.number) {
            state.tickets.remove(self.key);
            self.near.values.insert(
                self.key.to_owned(),
                Held {
                    owner,
                    weight: weight(json.text().len()),
                    json: json.clone(),
                },
            );
        }
        Some(json)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.near.state);
        if state.session == self.session && state.tickets.get(self.key) == Some(&self.number) {
            state.tickets.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The bookkeeping alone, pushes made by hand: what a reply keeps, given
    //! what was pushed while it was on its way. The tests against Redis are in
    //! the crate's `tests/cache.rs` and the service's `tests/api/near_cache.rs`.

    use serde_json::{Value, json};

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn invalidate(key: &str) -> PushInfo {
        PushInfo {
            kind: PushKind::Invalidate,
            data: vec![redis::Value::Array(vec![redis::Value::BulkString(
                key.as_bytes().to_vec(),
            )])],
        }
    }

    fn held(near: &NearCache, key: &str) -> Option<Value> {
        near.values.get(key).map(|held| held.json.to_value())
    }

    #[test]
    fn a_reply_is_kept_unless_its_key_was_pushed_while_it_was_on_its_way() {
        let near = NearCache::new(HOUR, NEAR_BYTES);
        let session = near.begin_session();
        let owner = Uuid::from_u128(1);

        // Given a read on its way, when a push for its key arrives before the
        // reply is kept, then the reply answers its query but is not held.
        let ticket = near.ticket(session, "k");
        near.pushed(session, invalidate("k"));
        assert_eq!(
            ticket
                .keep(owner, br#"{"v":1}"#.to_vec())
                .map(|json| json.to_value()),
            Some(json!({"v": 1}))
        );
        assert_eq!(held(&near, "k"), None);

        // A push for another key leaves it alone.
        let ticket = near.ticket(session, "k");
        near.pushed(session, invalidate("other"));
        ticket.keep(owner, br#"{"v":2}"#.to_vec());
        assert_eq!(held(&near, "k"), Some(json!({"v": 2})));

        // A push for a held key drops it.
        near.pushed(session, invalidate("k"));
        assert_eq!(held(&near, "k"), None);
    }

    #[test]
    fn a_lost_connection_or_a_new_session_keeps_nothing_of_the_old_one() {
        let near = NearCache::new(HOUR, NEAR_BYTES);
        let owner = Uuid::from_u128(1);
        let session = near.begin_session();
        near.ticket(session, "a").keep(owner, b"1".to_vec());
        assert_eq!(held(&near, "a"), Some(json!(1)));

        // The connection is lost: what it held goes, and so does a read on its way.
        let ticket = near.ticket(session, "b");
        let lost = PushInfo {
            kind: PushKind::Disconnection,
            data: vec![],
        };
        near.pushed(session, lost.clone());
        ticket.keep(owner, b"2".to_vec());
        assert_eq!((held(&near, "a"), held(&near, "b")), (None, None));

        // A read from the old session arriving in a new one is not kept, and
        // the old connection's pushes no longer count.
        let old = near.ticket(session, "c");
        let new = near.begin_session();
        old.keep(owner, b"3".to_vec());
        assert_eq!(held(&near, "c"), None);
        near.ticket(new, "c").keep(owner, b"4".to_vec());
        near.pushed(session, invalidate("c"));
        near.pushed(session, lost);
        assert_eq!(held(&near, "c"), Some(json!(4)));

        // A flush names no key: everything goes.
        near.pushed(
            new,
            PushInfo {
                kind: PushKind::Invalidate,
                data: vec![redis::Value::Nil],
            },
        );
        assert_eq!(held(&near, "c"), None);
    }
}
