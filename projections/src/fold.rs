//! The batch path of the read side: each projection's rules (`crate::ops`) run
//! on rows held in memory, for rebuilding and verifying read models at the
//! speed of a sequential read (no round trip per event).
//!
//! This is the other executor of the ops, beside the Postgres one: it applies
//! the very ops the live path runs in SQL, with the same meaning (insert unless
//! the key is taken, `COALESCE`, `GREATEST` ignoring NULL, counters, filters
//! never true on NULL). `verify` folds the store here and diffs the result with
//! the rows the live path wrote: a divergence between the two executors is
//! drift, and cannot come from the rules, which are one.
//!
//! This module knows no projection; the `Fold` of each, by name, is in the
//! registry (`crate::projections`).

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    hash::Hash,
};

use rustc_hash::FxBuildHasher;

use crate::ops::{Cond, Found, Lookup, OnConflict, Op, Set, Table, Value};

/// Rows by key, remembering (once `track_changes` is on) which keys changed, so
/// the small tail folded after a bulk write is written row by row.
///
/// Hashed with FxHash, not the standard SipHash: a rebuild hashes a key for
/// every op and rehashes every key each time a table grows (hashing was 9 % of
/// the fold's time with SipHash, profiled on 1M events). The keys are the
/// store's own ids, not an attacker's choice, so SipHash's resistance to
/// flooding buys nothing here.
#[derive(Debug)]
pub struct Rows<K, V> {
    rows: HashMap<K, V, FxBuildHasher>,
    changed: Option<HashSet<K, FxBuildHasher>>,
}

impl<K: Eq + Hash + Clone, V> Default for Rows<K, V> {
    fn default() -> Self {
        Rows {
            rows: HashMap::default(),
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

    /// `INSERT … ON CONFLICT DO NOTHING`; false if the key was taken.
    pub(crate) fn insert_if_absent(&mut self, key: K, make: impl FnOnce() -> V) -> bool {
        match self.rows.entry(key) {
            Entry::Occupied(_) => false,
            Entry::Vacant(vacant) => {
                if let Some(changed) = &mut self.changed {
                    changed.insert(vacant.key().clone());
                }
                vacant.insert(make());
                true
            }
        }
    }

    /// `UPDATE … WHERE`: `change` every row `picked` picks.
    pub(crate) fn update_where(
        &mut self,
        picked: impl Fn(&K, &V) -> bool,
        mut change: impl FnMut(&mut V),
    ) {
        for (key, row) in self.rows.iter_mut() {
            if picked(key, row) {
                change(row);
                if let Some(changed) = &mut self.changed {
                    changed.insert(key.clone());
                }
            }
        }
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
        self.changed = Some(HashSet::default());
    }

    /// The keys changed since the last call, and forget them.
    pub fn take_changed(&mut self) -> Vec<K> {
        self.changed
            .as_mut()
            .map(|c| c.drain().collect())
            .unwrap_or_default()
    }
}

/// A row: every column of its table, in the table's order.
pub type Row = Vec<Value>;
/// A row's key: its key columns, in the order of `Table::key`.
pub type Key = Vec<Value>;

/// The rows of one read-model table, in memory, and the ops applied to them.
#[derive(Debug)]
pub struct TableRows {
    pub table: &'static Table,
    /// The position in a row of each key column.
    key: Vec<usize>,
    pub rows: Rows<Key, Row>,
}

impl TableRows {
    pub fn new(table: &'static Table) -> TableRows {
        TableRows {
            table,
            key: table.key.iter().map(|c| table.index(c)).collect(),
            rows: Rows::default(),
        }
    }

    /// The row whose key is `key`.
    pub fn get(&self, key: &[Value]) -> Option<&Row> {
        self.rows.rows.get(key)
    }

    /// Column `column` of `row`.
    pub fn value<'r>(&self, row: &'r Row, column: &str) -> &'r Value {
        &row[self.table.index(column)]
    }

    fn key_of(&self, row: &Row) -> Key {
        self.key.iter().map(|&i| row[i].clone()).collect()
    }

    /// The key a filter names in full (an `=` on every key column), if it does.
    fn key_in(&self, filter: &[Cond]) -> Option<Key> {
        self.table
            .key
            .iter()
            .map(|k| {
                filter.iter().find_map(|c| match c {
                    Cond::Eq(column, v) if column == k && !v.is_null() => Some(v.clone()),
                    _ => None,
                })
            })
            .collect()
    }

    /// Apply one op (whose table is this one).
    pub fn apply(&mut self, op: Op) {
        debug_assert_eq!(op.table().name, self.table.name);
        let table = self.table;
        match op {
            // An insert moves its row in (the hot path of a rebuild: no copy).
            Op::Insert {
                row, on_conflict, ..
            } => {
                let key = self.key_of(&row);
                match on_conflict {
                    OnConflict::Nothing => {
                        self.rows.insert_if_absent(key, move || row);
                    }
                    OnConflict::Update(sets) => {
                        if !self.rows.insert_if_absent(key.clone(), move || row) {
                            let old = self.rows.get_mut(&key).expect("the key is taken");
                            assign(table, old, &sets);
                        }
                    }
                }
            }
            Op::Update { filter, set, .. } => match self.key_in(&filter) {
                Some(key) => {
                    if self.get(&key).is_some_and(|row| picks(table, &filter, row)) {
                        let row = self.rows.get_mut(&key).expect("just found");
                        assign(table, row, &set);
                    }
                }
                None => self.rows.update_where(
                    |_, row| picks(table, &filter, row),
                    |row| assign(table, row, &set),
                ),
            },
            Op::Delete { filter, .. } => match self.key_in(&filter) {
                Some(key) => {
                    if self.get(&key).is_some_and(|row| picks(table, &filter, row)) {
                        self.rows.remove(&key);
                    }
                }
                None => self.rows.remove_where(|_, row| picks(table, &filter, row)),
            },
        }
    }

    /// Answer a lookup on this table from its rows.
    pub fn read(&self, lookup: &Lookup) -> Found {
        let filter = std::slice::from_ref(&lookup.filter);
        let project = |row: &Row| -> Vec<Value> {
            lookup
                .columns
                .iter()
                .map(|c| row[self.table.index(c)].clone())
                .collect()
        };
        let rows = match self.key_in(filter) {
            Some(key) => self.get(&key).map(project).into_iter().collect(),
            None => self
                .rows
                .iter()
                .filter(|(_, row)| picks(self.table, filter, row))
                .map(|(_, row)| project(row))
                .collect(),
        };
        Found { rows }
    }
}

/// Whether `row` passes every condition of `filter` (SQL: NULL never equals).
fn picks(table: &Table, filter: &[Cond], row: &Row) -> bool {
    filter.iter().all(|cond| {
        let value = &row[table.index(cond.column())];
        !value.is_null()
            && match cond {
                Cond::Eq(_, v) => value == v,
                Cond::In(_, values) => values.contains(value),
            }
    })
}

/// `SET column = …, …` on one row, each right side read from the row before.
fn assign(table: &Table, row: &mut Row, sets: &[(&'static str, Set)]) {
    for (column, set) in sets {
        let old = &mut row[table.index(column)];
        let new = match set {
            Set::To(v) => v.clone(),
            // NULL + n is NULL, as in SQL.
            Set::Add(n) => match old {
                Value::I64(old) => Value::I64(*old + n),
                _ => Value::Null,
            },
            Set::Coalesce(v) if v.is_null() => continue,
            Set::Coalesce(v) => v.clone(),
            Set::Greatest(v) => greatest(old, v),
        };
        *old = new;
    }
}

/// Postgres `GREATEST` of two values of one column: NULLs are ignored.
fn greatest(a: &Value, b: &Value) -> Value {
    let larger = match (a, b) {
        (Value::Null, _) => b,
        (_, Value::Null) => a,
        (Value::Timestamp(x), Value::Timestamp(y)) => {
            if y > x {
                b
            } else {
                a
            }
        }
        (Value::I64(x), Value::I64(y)) => {
            if y > x {
                b
            } else {
                a
            }
        }
        (Value::Date(x), Value::Date(y)) => {
            if y > x {
                b
            } else {
                a
            }
        }
        (Value::Text(x), Value::Text(y)) => {
            if y > x {
                b
            } else {
                a
            }
        }
        (Value::F64(x), Value::F64(y)) => {
            if y > x {
                b
            } else {
                a
            }
        }
        // No rule asks the greatest of uuids or JSON (Postgres would not order
        // JSON by this rule either).
        _ => unreachable!("GREATEST of {a:?} and {b:?}"),
    };
    larger.clone()
}
