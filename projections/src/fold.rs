//! The batch path of the read side: each projection's rules as a fold of events
//! into rows held in memory, for rebuilding and verifying read models at the
//! speed of a sequential read (no round trip per event).
//!
//! Each projection's fold (its `fold.rs`, beside its `live.rs`) restates, row
//! for row, what its incremental `apply` does in SQL (same insert-if-absent,
//! same COALESCE, same GREATEST ignoring NULL, same counters). `verify` folds the store here and diffs the result with
//! the rows the incremental path wrote: any divergence between the two is drift,
//! so a rule changed in one place and not the other cannot go unnoticed.
//!
//! This module is what the folds share and knows no projection; the `Fold` of
//! each, by name, is in the registry (`crate::projections`).

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use ai_secretary_contract::EventEnvelope;
use chrono::{DateTime, Utc};

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
