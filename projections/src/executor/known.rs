//! What a live worker's lookups found, kept from one batch to the next for as
//! long as nothing it writes could change the answer.
//!
//! Most lookups ask a link table for a conversation's owner or assistant: one
//! for every message, request and reply event, in four projections, with an
//! answer that never changes once the conversation started (only forgetting
//! the user deletes it). Asked again, such an answer comes from here instead
//! of a query, and the writes held for its table may keep waiting.
//!
//! **Why an answer kept here is still the table's.** A projection's tables are
//! written by its lease holder alone, and this is that holder's memory:
//!
//! - every op the worker makes forgets what was found in the op's table
//!   ([`Known::written`]), except that an insert which leaves a taken key
//!   alone keeps the answers that found a row by the table's key (that key
//!   is taken, and no new row matches it);
//! - it lives in the worker's batch and goes back to the worker only when the
//!   batch commits: a batch that fails or is refused drops it, with whatever
//!   the rolled-back transaction had shown it;
//! - the worker starts a fresh one whenever its checkpoint is not where its
//!   last batch left it (after any failure, a rebuild's swap, a takeover).
//!
//! A rebuild's swap that leaves the checkpoint where it was (the rebuild stopped
//! at the same position) swaps in the rows of the same events, so the answers
//! still hold.

use std::collections::HashMap;

use crate::ops::{Cond, Found, Lookup, OnConflict, Op};

/// Answers kept, at most: past it they are all dropped (a worker follows the
/// conversations that are active now; a few thousand are plenty, and a
/// conversation's answer is a row of a few ids).
const MAX_ANSWERS: usize = 4_096;

/// Lookups' answers by table (see the module's doc).
#[derive(Debug, Default)]
pub struct Known {
    tables: HashMap<&'static str, Answers>,
}

#[derive(Debug, Default)]
struct Answers {
    /// A row found by the table's one key column: no insert can change it.
    by_key: HashMap<Question, Found>,
    /// Every other answer (nothing found, or another filter).
    other: HashMap<Question, Found>,
}

/// A lookup's filter and asked columns (its table is the outer map's key).
type Question = (Cond, &'static [&'static str]);

impl Known {
    /// What `lookup` found last time, if nothing written since could change it.
    pub fn get(&self, lookup: &Lookup) -> Option<&Found> {
        let answers = self.tables.get(lookup.table.name)?;
        let question = (lookup.filter.clone(), lookup.columns);
        answers
            .by_key
            .get(&question)
            .or_else(|| answers.other.get(&question))
    }

    /// Keep what `lookup` found (read in the batch's transaction, after every
    /// write held for its table).
    pub fn keep(&mut self, lookup: &Lookup, found: &Found) {
        if self.len() >= MAX_ANSWERS {
            *self = Known::default();
        }
        let answers = self.tables.entry(lookup.table.name).or_default();
        let by_key = matches!(&lookup.filter, Cond::Eq(column, _) if lookup.table.key == [*column])
            && !found.rows.is_empty();
        let map = if by_key {
            &mut answers.by_key
        } else {
            &mut answers.other
        };
        map.insert((lookup.filter.clone(), lookup.columns), found.clone());
    }

    /// Answers kept (a projection owns a table or two, so this is short).
    fn len(&self) -> usize {
        self.tables
            .values()
            .map(|a| a.by_key.len() + a.other.len())
            .sum()
    }

    /// `op` is about to be written: forget the answers it could change.
    pub fn written(&mut self, op: &Op) {
        let Some(answers) = self.tables.get_mut(op.table().name) else {
            return;
        };
        answers.other.clear();
        if !matches!(
            op,
            Op::Insert {
                on_conflict: OnConflict::Nothing,
                ..
            }
        ) {
            answers.by_key.clear();
        }
    }

    #[cfg(test)]
    fn table(&self, table: &crate::ops::Table) -> usize {
        self.tables
            .get(table.name)
            .map_or(0, |a| a.by_key.len() + a.other.len())
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::{
        ops::{Set, Value, eq},
        projections::{assistants, messages},
    };

    fn link_of(conversation: Uuid) -> Lookup {
        Lookup {
            table: &assistants::CONVERSATIONS,
            filter: eq("conversation_id", conversation),
            columns: &["assistant_id"],
        }
    }

    fn found(assistant: Uuid) -> Found {
        Found {
            rows: vec![vec![assistant.into()]],
        }
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

    #[test]
    fn a_row_found_by_its_key_outlives_inserts_and_nothing_found_does_not() {
        let (a, b, assistant) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(9));
        let mut known = Known::default();
        known.keep(&link_of(a), &found(assistant));
        known.keep(&link_of(b), &Found::default());
        assert_eq!(known.get(&link_of(a)).unwrap().uuid(), Some(assistant));
        assert!(known.get(&link_of(b)).unwrap().rows.is_empty());

        // Another conversation starts: the answer that found nothing may now
        // be wrong; the row found by its key cannot be.
        known.written(&link(b, assistant));
        assert!(known.get(&link_of(b)).is_none());
        assert_eq!(known.get(&link_of(a)).unwrap().uuid(), Some(assistant));

        // Writes to other tables change nothing here.
        known.written(&Op::update(
            &assistants::ASSISTANTS,
            vec![eq("id", assistant)],
            [("message_count", Set::Add(1))],
        ));
        known.written(&Op::delete(
            &messages::CONVERSATIONS,
            vec![eq("owner_id", assistant)],
        ));
        assert_eq!(known.table(&assistants::CONVERSATIONS), 1);

        // A delete in the table (a user forgotten) forgets all of it.
        known.written(&Op::delete(
            &assistants::CONVERSATIONS,
            vec![Cond::In("assistant_id", vec![Value::from(assistant)])],
        ));
        assert!(known.get(&link_of(a)).is_none());
        assert_eq!(known.len(), 0);
    }

    #[test]
    fn it_holds_a_bounded_number_of_answers() {
        let mut known = Known::default();
        for n in 0..(MAX_ANSWERS as u128 + 10) {
            known.keep(&link_of(Uuid::from_u128(n)), &found(Uuid::nil()));
            assert!(known.len() <= MAX_ANSWERS);
        }
        assert_eq!(known.len(), 10, "dropped once, when full");
    }
}
