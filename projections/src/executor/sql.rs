//! The SQL of each op, written once: `$N` placeholders (Postgres', and sqlx's
//! SQLite driver reads them too), `INSERT … ON CONFLICT (key) DO NOTHING | DO
//! UPDATE`, and every value bound from Rust (never `now()` or a cast in SQL), so
//! the same text serves both dialects but for the points [`Dialect`] names.
//!
//! A statement's text depends only on the op's shape (its table, columns and
//! kinds of change), never on its values, so each shape is prepared once per
//! connection by sqlx's statement cache.

use std::fmt::Write;

use crate::ops::{Cond, Lookup, OnConflict, Op, Set, Table, Type, Value};

/// What differs between the SQL dialects the read models run on.
///
/// Everything else is shared: placeholders (`$N`), upserts (`ON CONFLICT (key)
/// DO NOTHING | DO UPDATE SET`, the existing row named by its table), `COALESCE`.
/// Types differ in storage but not in text: values are bound typed by the
/// executor (a uuid as `uuid` in Postgres; as its executor stores it in SQLite),
/// so no statement carries a cast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// The larger of a column and a value, a NULL on either side ignored.
    /// Postgres' `GREATEST` ignores NULLs; SQLite's two-argument `MAX` answers
    /// NULL when either is, so the non-null one is taken after it.
    fn greatest(self, column: &str, value: &str) -> String {
        match self {
            Dialect::Postgres => format!("GREATEST({column}, {value})"),
            Dialect::Sqlite => format!("COALESCE(MAX({column}, {value}), {column}, {value})"),
        }
    }

    /// `column IN (…)` for a list bound from Rust: one array parameter in
    /// Postgres (`= ANY($N)`: one shape whatever the list's length), one
    /// parameter per element in SQLite, which has no array type.
    fn in_list<'a>(
        self,
        s: &mut Statement<'a>,
        column: &str,
        ty: Type,
        values: &'a [Value],
    ) -> String {
        match self {
            Dialect::Postgres => {
                let p = s.push(Arg::Array(ty, values));
                format!("{column} = ANY({p})")
            }
            Dialect::Sqlite if values.is_empty() => "FALSE".into(),
            Dialect::Sqlite => {
                let params: Vec<String> = values.iter().map(|v| s.push(Arg::One(ty, v))).collect();
                format!("{column} IN ({})", params.join(", "))
            }
        }
    }
}

/// A value to bind, with the type of its column (a NULL is bound as that type).
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    One(Type, &'a Value),
    /// A list, bound as one array (Postgres only).
    Array(Type, &'a [Value]),
    /// A counter's increment.
    I64(i64),
}

/// A statement's text and the values its placeholders stand for, in order.
#[derive(Debug)]
pub struct Statement<'a> {
    pub sql: String,
    pub args: Vec<Arg<'a>>,
    /// Parameters bound before this statement's own, when it is a part of a
    /// larger one ([`gated`]): its first placeholder is `$after + 1`.
    after: usize,
}

impl<'a> Statement<'a> {
    fn after(after: usize) -> Statement<'a> {
        Statement {
            sql: String::new(),
            args: Vec::new(),
            after,
        }
    }

    /// Add an argument; its placeholder.
    fn push(&mut self, arg: Arg<'a>) -> String {
        self.args.push(arg);
        format!("${}", self.after + self.args.len())
    }
}

/// The statement that runs `op`.
pub fn statement(dialect: Dialect, op: &Op) -> Statement<'_> {
    build(dialect, op, Statement::after(0), "")
}

/// `op` as a part of a larger statement (a data-modifying `WITH` query of
/// Postgres): its placeholders follow the `after` parameters bound before
/// it, and it changes nothing unless the query named `gate` has a row.
pub fn gated<'a>(dialect: Dialect, op: &'a Op, after: usize, gate: &str) -> Statement<'a> {
    build(dialect, op, Statement::after(after), &only_if(gate))
}

/// The condition that the query named `gate` has a row, to AND to a filter.
pub fn only_if(gate: &str) -> String {
    format!(" AND EXISTS (SELECT 1 FROM {gate})")
}

/// The insert-or-update-or-delete of `op`, its filter (or, for an insert,
/// the row it selects) ANDed with `and`, which is empty or starts with ` AND`.
fn build<'a>(dialect: Dialect, op: &'a Op, mut s: Statement<'a>, and: &str) -> Statement<'a> {
    match op {
        Op::Insert {
            table,
            row,
            on_conflict,
        } => {
            let columns: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
            let params: Vec<String> = table
                .columns
                .iter()
                .zip(row)
                .map(|(c, v)| s.push(Arg::One(c.ty, v)))
                .collect();
            let sets = match on_conflict {
                OnConflict::Nothing => "NOTHING".to_owned(),
                // The existing row is named by its table: `excluded` is the new one.
                OnConflict::Update(sets) => {
                    format!(
                        "UPDATE SET {}",
                        assignments(dialect, &mut s, table, sets, true)
                    )
                }
            };
            // `VALUES` alone; a row selected only where `and` holds otherwise.
            let row = match and {
                "" => format!("VALUES ({})", params.join(", ")),
                and => format!("SELECT {} WHERE TRUE{and}", params.join(", ")),
            };
            s.sql = format!(
                "INSERT INTO {t} ({}) {row} ON CONFLICT ({}) DO {sets}",
                columns.join(", "),
                table.key.join(", "),
                t = table.name,
            );
        }
        Op::Update { table, filter, set } => {
            let sets = assignments(dialect, &mut s, table, set, false);
            let filter = conditions(dialect, &mut s, table, filter);
            s.sql = format!("UPDATE {} SET {sets} WHERE {filter}{and}", table.name);
        }
        Op::Delete { table, filter } => {
            let filter = conditions(dialect, &mut s, table, filter);
            s.sql = format!("DELETE FROM {} WHERE {filter}{and}", table.name);
        }
    }
    s
}

/// The statement that answers `lookup`.
pub fn lookup(dialect: Dialect, lookup: &Lookup) -> Statement<'_> {
    let mut s = Statement::after(0);
    let filter = conditions(
        dialect,
        &mut s,
        lookup.table,
        std::slice::from_ref(&lookup.filter),
    );
    s.sql = format!(
        "SELECT {} FROM {} WHERE {filter}",
        lookup.columns.join(", "),
        lookup.table.name
    );
    s
}

/// `a = …, b = …`; `qualified` names the old value `table.column` (needed in
/// an upsert's update, where `excluded.column` is the new row's).
fn assignments<'a>(
    dialect: Dialect,
    s: &mut Statement<'a>,
    table: &Table,
    sets: &'a [(&'static str, Set)],
    qualified: bool,
) -> String {
    let mut out = String::new();
    for (i, (column, set)) in sets.iter().enumerate() {
        let ty = table.column(column).ty;
        let old = if qualified {
            format!("{}.{column}", table.name)
        } else {
            (*column).to_owned()
        };
        let expression = match set {
            Set::To(v) => s.push(Arg::One(ty, v)),
            Set::Add(n) => format!("{old} + {}", s.push(Arg::I64(*n))),
            Set::Coalesce(v) => format!("COALESCE({}, {old})", s.push(Arg::One(ty, v))),
            Set::Greatest(v) => {
                let p = s.push(Arg::One(ty, v));
                dialect.greatest(&old, &p)
            }
        };
        let separator = if i == 0 { "" } else { ", " };
        let _ = write!(out, "{separator}{column} = {expression}");
    }
    out
}

/// `a = … AND b IN (…)`.
fn conditions<'a>(
    dialect: Dialect,
    s: &mut Statement<'a>,
    table: &Table,
    filter: &'a [Cond],
) -> String {
    let conditions: Vec<String> = filter
        .iter()
        .map(|cond| {
            let ty = table.column(cond.column()).ty;
            match cond {
                Cond::Eq(column, v) => format!("{column} = {}", s.push(Arg::One(ty, v))),
                Cond::In(column, values) => dialect.in_list(s, column, ty, values),
            }
        })
        .collect();
    assert!(
        !conditions.is_empty(),
        "an op on {} without a filter",
        table.name
    );
    conditions.join(" AND ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{Op, Set, Value, eq};
    use crate::projections::{assistants, messages, usage_daily};
    use uuid::Uuid;

    /// The texts the dialects share and where they part, on real tables.
    #[test]
    fn one_text_for_both_dialects_but_greatest_and_lists() {
        let id = Uuid::nil();
        let activity = Op::update(
            &assistants::ASSISTANTS,
            vec![eq("id", id)],
            [
                ("message_count", Set::Add(1)),
                ("last_activity_at", Set::Greatest(Value::Null)),
            ],
        );
        assert_eq!(
            statement(Dialect::Postgres, &activity).sql,
            "UPDATE assistants SET message_count = message_count + $1, \
             last_activity_at = GREATEST(last_activity_at, $2) WHERE id = $3"
        );
        assert_eq!(
            statement(Dialect::Sqlite, &activity).sql,
            "UPDATE assistants SET message_count = message_count + $1, last_activity_at = \
             COALESCE(MAX(last_activity_at, $2), last_activity_at, $2) WHERE id = $3"
        );
        let waiting = Op::update(
            &messages::MESSAGES,
            vec![
                eq("id", id),
                Cond::In("status", vec!["queued".into(), "in_progress".into()]),
            ],
            [("status", Set::To("in_progress".into()))],
        );
        let pg = statement(Dialect::Postgres, &waiting);
        assert_eq!(
            pg.sql,
            "UPDATE messages SET status = $1 WHERE id = $2 AND status = ANY($3)"
        );
        assert_eq!(pg.args.len(), 3);
        let lite = statement(Dialect::Sqlite, &waiting);
        assert_eq!(
            lite.sql,
            "UPDATE messages SET status = $1 WHERE id = $2 AND status IN ($3, $4)"
        );
        assert_eq!(lite.args.len(), 4);
    }

    #[test]
    fn an_upsert_names_the_existing_row_by_its_table() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
        let op = Op::insert(
            &usage_daily::USAGE_DAILY,
            [
                ("owner_id", Uuid::nil().into()),
                ("day", day.into()),
                ("assistant_id", Uuid::nil().into()),
                ("model", "m".into()),
                ("messages", 1i64.into()),
                ("prompt_tokens", 2i64.into()),
                ("completion_tokens", 3i64.into()),
                ("total_tokens", 5i64.into()),
            ],
        )
        .or_update([("messages", Set::Add(1)), ("total_tokens", Set::Add(5))]);
        for dialect in [Dialect::Postgres, Dialect::Sqlite] {
            assert_eq!(
                statement(dialect, &op).sql,
                "INSERT INTO usage_daily (owner_id, day, assistant_id, model, messages, \
                 prompt_tokens, completion_tokens, total_tokens) VALUES ($1, $2, $3, $4, $5, $6, \
                 $7, $8) ON CONFLICT (owner_id, day, assistant_id, model) DO UPDATE SET \
                 messages = usage_daily.messages + $9, total_tokens = usage_daily.total_tokens + $10"
            );
        }
    }
}
