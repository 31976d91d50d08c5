//! Writes a live batch holds back, so that a batch of events costs a statement
//! per table and row it changes rather than one per op.
//!
//! A projection's rules make ops one event at a time; many of a batch's ops
//! land on the same table, often on the same row (every conversation started
//! with an assistant adds one to that assistant's count). Two kinds of op can
//! wait, and are gathered while they wait:
//!
//! - **inserts that leave a taken key alone** (`ON CONFLICT DO NOTHING`) into
//!   one table: the executor writes them in one statement, in their order, so
//!   the first row for a key still wins;
//! - **updates of one row by its key** (the filter is the table's one key
//!   column, equal to a value): the updates of a row are folded into one, where
//!   their changes compose ([`then`]: a counter's increments add up, the later
//!   `To` wins, `GREATEST` of the greatest, the later non-NULL of a `COALESCE`).
//!   Updates of different rows are independent of each other.
//!
//! What is held for a table is written before anything else reads or writes
//! that table (a lookup, a delete, another kind of op) and when the batch
//! commits. Ops on other tables do not wait for it: no read-model table has a
//! foreign key or trigger, so a table's rows depend only on the ops on that
//! table, taken in order. Hence a batch's transaction ends with the same rows
//! as when each op ran at once, and the same rows as the fold's
//! (`crate::fold`), which `verify` checks.

use indexmap::IndexMap;

use crate::ops::{Cond, OnConflict, Op, Set, Table, Value};

/// A write to make now.
#[derive(Debug)]
pub enum Write {
    /// One op, as the rules made it.
    Op(Op),
    /// Rows for `table`, each inserted unless its key is taken, in order: one
    /// statement (its rows are whole, in the table's column order).
    Inserts {
        table: &'static Table,
        rows: Vec<Vec<Value>>,
    },
}

impl Write {
    /// The table it writes.
    pub fn table(&self) -> &'static Table {
        match self {
            Write::Op(op) => op.table(),
            Write::Inserts { table, .. } => table,
        }
    }
}

/// What a batch holds back, per table (see the module's doc).
#[derive(Debug, Default)]
pub struct Deferred {
    held: Vec<Held>,
}

#[derive(Debug)]
enum Held {
    Inserts {
        table: &'static Table,
        rows: Vec<Vec<Value>>,
    },
    Updates {
        table: &'static Table,
        /// Each row's folded change by the value of the table's one key
        /// column, in the order the rows were first changed.
        rows: IndexMap<Value, Vec<(&'static str, Set)>>,
    },
}

impl Held {
    fn table(&self) -> &'static Table {
        match self {
            Held::Inserts { table, .. } | Held::Updates { table, .. } => table,
        }
    }

    fn release(self, now: &mut Vec<Write>) {
        match self {
            Held::Inserts { table, rows } => now.push(Write::Inserts { table, rows }),
            Held::Updates { table, rows } => now.extend(
                rows.into_iter()
                    .map(|(value, set)| Write::Op(update(table, value, set))),
            ),
        }
    }
}

/// The update of the row whose key is `value` (a table with one key column).
fn update(table: &'static Table, value: Value, set: Vec<(&'static str, Set)>) -> Op {
    Op::Update {
        table,
        filter: vec![Cond::Eq(table.key[0], value)],
        set,
    }
}

impl Deferred {
    /// Take `op` in: hold it if it can wait, and add to `now` what must be
    /// written before anything after it, in order.
    pub fn push(&mut self, op: Op, now: &mut Vec<Write>) {
        match op {
            Op::Insert {
                table,
                row,
                on_conflict: OnConflict::Nothing,
            } => match self.held_mut(table) {
                Some(Held::Inserts { rows, .. }) => rows.push(row),
                _ => {
                    self.release(table, now);
                    self.held.push(Held::Inserts {
                        table,
                        rows: vec![row],
                    });
                }
            },
            Op::Update { table, filter, set } => match key_of(table, &filter) {
                Some(value) => self.hold_update(table, value, set, now),
                None => {
                    self.release(table, now);
                    now.push(Write::Op(Op::Update { table, filter, set }));
                }
            },
            op => {
                self.release(op.table(), now);
                now.push(Write::Op(op));
            }
        }
    }

    /// Add to `now` everything held for `table` (before something reads it).
    pub fn release(&mut self, table: &Table, now: &mut Vec<Write>) {
        if let Some(i) = self.held.iter().position(|h| h.table().name == table.name) {
            self.held.remove(i).release(now);
        }
    }

    /// Add to `now` everything held (before the batch commits).
    pub fn release_all(&mut self, now: &mut Vec<Write>) {
        for held in self.held.drain(..) {
            held.release(now);
        }
    }

    fn held_mut(&mut self, table: &Table) -> Option<&mut Held> {
        self.held.iter_mut().find(|h| h.table().name == table.name)
    }

    fn hold_update(
        &mut self,
        table: &'static Table,
        value: Value,
        set: Vec<(&'static str, Set)>,
        now: &mut Vec<Write>,
    ) {
        if !matches!(self.held_mut(table), Some(Held::Updates { .. })) {
            self.release(table, now);
            self.held.push(Held::Updates {
                table,
                rows: IndexMap::new(),
            });
        }
        let Some(Held::Updates { rows, .. }) = self.held_mut(table) else {
            unreachable!("held just above");
        };
        match rows.get_mut(&value) {
            None => {
                rows.insert(value, set);
            }
            Some(earlier) => match composed(earlier, &set) {
                Some(both) => *earlier = both,
                // Changes that do not compose: the row's earlier change is
                // written now, and this one waits in its place.
                None => {
                    let before = std::mem::replace(earlier, set);
                    now.push(Write::Op(update(table, value, before)));
                }
            },
        }
    }
}

/// The key's value, if `filter` picks one row by the table's one key column.
fn key_of(table: &Table, filter: &[Cond]) -> Option<Value> {
    match (table.key, filter) {
        ([key], [Cond::Eq(column, value)]) if column == key && !value.is_null() => {
            Some(value.clone())
        }
        _ => None,
    }
}

/// One row's changes `before`, then `after`, as one change; `None` if some
/// column's two changes do not compose.
fn composed(
    before: &[(&'static str, Set)],
    after: &[(&'static str, Set)],
) -> Option<Vec<(&'static str, Set)>> {
    let mut both = before.to_vec();
    for (column, set) in after {
        match both.iter_mut().find(|(c, _)| c == column) {
            None => both.push((column, set.clone())),
            Some((_, earlier)) => *earlier = then(earlier, set)?,
        }
    }
    Some(both)
}

/// One column's change `a`, then `b`, as one change, where SQL gives the same
/// column for both: `col = b(a(col))`.
fn then(a: &Set, b: &Set) -> Option<Set> {
    Some(match (a, b) {
        (_, Set::To(v)) => Set::To(v.clone()),
        // NULL + n stays NULL either way.
        (Set::Add(x), Set::Add(y)) => Set::Add(x.checked_add(*y)?),
        (Set::To(v), Set::Add(n)) => Set::To(match v {
            Value::I64(v) => Value::I64(v.checked_add(*n)?),
            Value::Null => Value::Null,
            _ => return None,
        }),
        (Set::Coalesce(v), Set::Coalesce(w)) => Set::Coalesce(later_non_null(v, w)),
        (Set::To(v), Set::Coalesce(w)) => Set::To(later_non_null(v, w)),
        (Set::Greatest(v), Set::Greatest(w)) => Set::Greatest(greatest(v, w)?),
        (Set::To(v), Set::Greatest(w)) => Set::To(greatest(v, w)?),
        _ => return None,
    })
}

fn later_non_null(earlier: &Value, later: &Value) -> Value {
    if later.is_null() { earlier } else { later }.clone()
}

/// `GREATEST(a, b)` as Postgres answers it (NULLs ignored), for the kinds
/// whose order Rust and both databases agree on; `None` for the others (text
/// sorts by the database's collation; NaN sorts above every float in Postgres).
fn greatest(a: &Value, b: &Value) -> Option<Value> {
    Some(match (a, b) {
        (Value::Null, v) | (v, Value::Null) => v.clone(),
        (Value::I64(x), Value::I64(y)) => Value::I64(*x.max(y)),
        (Value::Timestamp(x), Value::Timestamp(y)) => Value::Timestamp(*x.max(y)),
        (Value::Date(x), Value::Date(y)) => Value::Date(*x.max(y)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::{
        fold::TableRows,
        ops::eq,
        projections::{assistants, conversations},
    };

    fn at(second: u32) -> Value {
        Utc.with_ymd_and_hms(2026, 12, 3, 10, 0, second)
            .unwrap()
            .into()
    }

    fn activity(assistant: Uuid, count: i64, when: Value, gp: i64) -> Op {
        Op::update(
            &assistants::ASSISTANTS,
            vec![eq("id", assistant)],
            [
                ("conversation_count", Set::Add(count)),
                ("last_activity_at", Set::Greatest(when)),
                ("last_gp", Set::To(gp.into())),
            ],
        )
    }

    fn link(conversation: Uuid, assistant: Uuid) -> Op {
        Op::insert(
            &assistants::CONVERSATIONS,
            [
                ("conversation_id", conversation.into()),
                ("assistant_id", assistant.into()),
            ],
        )
    }

    /// Every write, in order: what the batch would write at its commit.
    fn deferring(ops: Vec<Op>) -> Vec<Write> {
        let mut deferred = Deferred::default();
        let mut now = Vec::new();
        for op in ops {
            deferred.push(op, &mut now);
        }
        deferred.release_all(&mut now);
        now
    }

    /// The rows of `tables` after `writes`, applied by the fold (an insert of
    /// many rows as one insert each, in order).
    fn rows_after(writes: Vec<Write>) -> Vec<Vec<String>> {
        let mut a = TableRows::new(&assistants::ASSISTANTS);
        let mut links = TableRows::new(&assistants::CONVERSATIONS);
        let mut apply = |op: Op| match op.table().name {
            "assistants" => a.apply(op),
            _ => links.apply(op),
        };
        for write in writes {
            match write {
                Write::Op(op) => apply(op),
                Write::Inserts { table, rows } => rows.into_iter().for_each(|row| {
                    apply(Op::Insert {
                        table,
                        row,
                        on_conflict: OnConflict::Nothing,
                    })
                }),
            }
        }
        [a, links]
            .iter()
            .map(|t| {
                let mut rows: Vec<String> =
                    t.rows.iter().map(|(_, row)| format!("{row:?}")).collect();
                rows.sort();
                rows
            })
            .collect()
    }

    fn created(assistant: Uuid) -> Op {
        Op::insert(
            &assistants::ASSISTANTS,
            [
                ("id", assistant.into()),
                ("owner_id", Uuid::nil().into()),
                ("name", "A".into()),
                ("role", "r".into()),
                ("instructions", "i".into()),
                ("model", "m".into()),
                ("temperature", 0.5f64.into()),
                ("metadata", serde_json::json!({}).into()),
                ("status", "active".into()),
                ("conversation_count", 0i64.into()),
                ("message_count", 0i64.into()),
                ("last_activity_at", Value::Null),
                ("created_at", at(0)),
                ("updated_at", at(0)),
                ("version", 1i64.into()),
                ("last_tx", 1i64.into()),
                ("last_gp", 1i64.into()),
            ],
        )
    }

    #[test]
    fn a_rows_updates_fold_into_one_and_inserts_into_one_statement() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ops = vec![
            created(a),
            created(b),
            link(Uuid::from_u128(10), a),
            activity(a, 1, at(3), 3),
            link(Uuid::from_u128(11), b),
            activity(b, 1, at(1), 4),
            link(Uuid::from_u128(12), a),
            activity(a, 1, at(2), 5),
            // A key taken earlier in the batch: the first row stays.
            link(Uuid::from_u128(10), b),
            activity(a, 1, Value::Null, 6),
        ];
        let one_by_one: Vec<Write> = ops.iter().cloned().map(Write::Op).collect();
        let writes = deferring(ops);
        // The two created rows, the links, and one update per assistant.
        let shapes: Vec<String> = writes
            .iter()
            .map(|w| match w {
                Write::Op(op) => format!("op {}", op.table().name),
                Write::Inserts { table, rows } => format!("{} × {}", rows.len(), table.name),
            })
            .collect();
        assert_eq!(
            shapes,
            [
                "2 × assistants",
                "4 × assistants_conversations",
                "op assistants",
                "op assistants",
            ]
        );
        let Write::Op(Op::Update { set, .. }) = &writes[2] else {
            panic!("{writes:?}");
        };
        assert!(matches!(set[0], ("conversation_count", Set::Add(3))));
        assert_eq!(rows_after(writes), rows_after(one_by_one));
    }

    #[test]
    fn changes_that_do_not_compose_are_written_in_order() {
        let a = Uuid::from_u128(1);
        let status = |s: &str| {
            Op::update(
                &assistants::ASSISTANTS,
                vec![eq("id", a)],
                [("name", Set::Coalesce(s.into()))],
            )
        };
        let greatest_name = Op::update(
            &assistants::ASSISTANTS,
            vec![eq("id", a)],
            [("name", Set::Greatest("zz".into()))],
        );
        let ops = vec![
            created(a),
            status("B"),
            greatest_name,
            status("C"),
            Op::update(
                &assistants::ASSISTANTS,
                vec![eq("id", a)],
                [("conversation_count", Set::Add(2))],
            ),
            Op::update(
                &assistants::ASSISTANTS,
                vec![eq("id", a)],
                [("conversation_count", Set::To(7i64.into()))],
            ),
            Op::update(
                &assistants::ASSISTANTS,
                vec![eq("id", a)],
                [("conversation_count", Set::Add(1))],
            ),
        ];
        let one_by_one: Vec<Write> = ops.iter().cloned().map(Write::Op).collect();
        let writes = deferring(ops);
        // The insert; `B`; the text's GREATEST; `C` with the counter set to 8.
        assert_eq!(writes.len(), 4, "{writes:?}");
        assert_eq!(rows_after(writes), rows_after(one_by_one));
    }

    #[test]
    fn a_read_or_another_op_on_the_table_writes_what_it_held_first() {
        let a = Uuid::from_u128(1);
        let mut deferred = Deferred::default();
        let mut now = Vec::new();
        deferred.push(link(Uuid::from_u128(10), a), &mut now);
        deferred.push(activity(a, 1, at(1), 2), &mut now);
        assert!(now.is_empty());
        // Another table's ops do not wait.
        deferred.release(&conversations::CONVERSATIONS, &mut now);
        assert!(now.is_empty());
        deferred.push(
            Op::delete(&assistants::ASSISTANTS, vec![eq("owner_id", a)]),
            &mut now,
        );
        assert!(
            matches!(
                &now[..],
                [Write::Op(Op::Update { .. }), Write::Op(Op::Delete { .. })]
            ),
            "{now:?}"
        );
        now.clear();
        deferred.release(&assistants::CONVERSATIONS, &mut now);
        assert!(matches!(&now[..], [Write::Inserts { rows, .. }] if rows.len() == 1));
        now.clear();
        deferred.release_all(&mut now);
        assert!(now.is_empty());
    }
}
