//! Typed read-model operations: what a projection's rules make of one event.
//!
//! A projection's rules (`crate::projections::<name>`) are pure functions from an
//! event to a list of [`Op`]s over typed [`Value`]s: insert a row (on a key
//! conflict: nothing, or an update), update the rows a filter picks, delete
//! them. Two executors run the same ops: the Postgres one
//! (`crate::executor::postgres`, in the batch's transaction) and the fold
//! (`crate::fold`, on rows in memory, for rebuilds and `verify`). So the live
//! read model and the rebuild's cannot follow different rules: there is one.
//!
//! Every op names its [`Table`], whose columns and their [`Type`]s are declared
//! here in Rust as in the migrations: the executors bind a NULL as its column's
//! type, the bulk writer encodes each column by its type, and a rule that names
//! an unknown column or gives a value of the wrong type is refused when the op is
//! built (a bug in a rule, found by the first test that folds such an event).
//!
//! A rule that needs to read other rows (an assistant's activity needs the
//! conversation's assistant; a message its conversation's owner) says so with a
//! [`Lookup`] first; the live path reads it in the batch's transaction, the fold
//! from its own rows, and the rule gets the answer ([`Found`]) as an input.

use std::hash::{Hash, Hasher};

use ai_secretary_contract::{Event, EventEnvelope};
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

/// The type of a read-model column (and of the non-null values it holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Uuid,
    Text,
    I64,
    F64,
    Json,
    Timestamp,
    Date,
}

/// One value of a column, or an argument of an op.
#[derive(Debug, Clone)]
pub enum Value {
    /// SQL NULL (its type is its column's).
    Null,
    Uuid(Uuid),
    Text(String),
    I64(i64),
    F64(f64),
    /// Boxed: a `serde_json::Value` (an ordered map inside) is 80 bytes, and
    /// unboxed it made every `Value` that size. A rebuild holds every row of
    /// every table in memory (16 values a message, 643,220 messages for 1M
    /// events): boxed, a `Value` is 32 bytes and the rows take 60 % less
    /// memory to fault in, fill and free.
    Json(Box<serde_json::Value>),
    Timestamp(DateTime<Utc>),
    Date(NaiveDate),
}

impl Value {
    /// The type of a non-null value (`None` for NULL, which fits any column).
    pub fn ty(&self) -> Option<Type> {
        Some(match self {
            Value::Null => return None,
            Value::Uuid(_) => Type::Uuid,
            Value::Text(_) => Type::Text,
            Value::I64(_) => Type::I64,
            Value::F64(_) => Type::F64,
            Value::Json(_) => Type::Json,
            Value::Timestamp(_) => Type::Timestamp,
            Value::Date(_) => Type::Date,
        })
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn as_uuid(&self) -> Option<Uuid> {
        match self {
            Value::Uuid(u) => Some(*u),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::I64(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_timestamp(&self) -> Option<DateTime<Utc>> {
        match self {
            Value::Timestamp(v) => Some(*v),
            _ => None,
        }
    }
}

/// Equality as the fold needs it for keys and filters: by value, a float by its
/// bits (no NaN reaches a key; a filter on a float compares what was stored).
impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Uuid(a), Value::Uuid(b)) => a == b,
            (Value::Text(a), Value::Text(b)) => a == b,
            (Value::I64(a), Value::I64(b)) => a == b,
            (Value::F64(a), Value::F64(b)) => a.to_bits() == b.to_bits(),
            (Value::Json(a), Value::Json(b)) => a == b,
            (Value::Timestamp(a), Value::Timestamp(b)) => a == b,
            (Value::Date(a), Value::Date(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

/// Keys are uuids, dates and text; the other kinds hash by their kind only
/// (still consistent with `eq`).
impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Value::Uuid(v) => v.hash(state),
            Value::Text(v) => v.hash(state),
            Value::I64(v) => v.hash(state),
            Value::F64(v) => v.to_bits().hash(state),
            Value::Timestamp(v) => v.hash(state),
            Value::Date(v) => v.hash(state),
            Value::Null | Value::Json(_) => {}
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Value {
                Value::$variant(v)
            }
        }
        impl From<Option<$t>> for Value {
            fn from(v: Option<$t>) -> Value {
                v.map_or(Value::Null, Value::$variant)
            }
        }
    )*};
}

value_from! {
    Uuid => Uuid,
    String => Text,
    i64 => I64,
    f64 => F64,
    Box<serde_json::Value> => Json,
    DateTime<Utc> => Timestamp,
    NaiveDate => Date,
}

impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Value {
        Value::Json(Box::new(v))
    }
}

impl From<Option<serde_json::Value>> for Value {
    fn from(v: Option<serde_json::Value>) -> Value {
        v.map_or(Value::Null, Value::from)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}

impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Value {
        v.map_or(Value::Null, Value::from)
    }
}

/// A column of a read-model table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub ty: Type,
}

pub const fn column(name: &'static str, ty: Type) -> Column {
    Column { name, ty }
}

/// A read-model table: its name, the columns of its primary key, and every
/// column, in the order of the migrations (the bulk writer writes them all).
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    pub key: &'static [&'static str],
    pub columns: &'static [Column],
}

impl Table {
    /// The position of `column`; a name the table does not have is a bug in a rule.
    pub fn index(&self, column: &str) -> usize {
        self.columns
            .iter()
            .position(|c| c.name == column)
            .unwrap_or_else(|| panic!("{} has no column {column}", self.name))
    }

    pub fn column(&self, column: &str) -> &'static Column {
        &self.columns[self.index(column)]
    }

    /// Refuse a value whose type is not its column's (a bug in a rule).
    fn check(&self, column: &str, value: &Value) {
        self.check_at(self.index(column), value);
    }

    fn check_at(&self, i: usize, value: &Value) {
        let Column { name, ty: expected } = self.columns[i];
        if let Some(ty) = value.ty() {
            assert!(
                ty == expected,
                "{}.{name} is {expected:?}, given {ty:?}",
                self.name
            );
        }
    }
}

/// How an update changes one column (`col` is its value before).
#[derive(Debug, Clone)]
pub enum Set {
    /// `col = v`
    To(Value),
    /// `col = col + v` (counters).
    Add(i64),
    /// `col = COALESCE(v, col)`: `v` unless it is NULL.
    Coalesce(Value),
    /// `col = GREATEST(col, v)`, NULLs ignored as Postgres' GREATEST does.
    Greatest(Value),
}

impl Set {
    fn value(&self) -> Option<&Value> {
        match self {
            Set::To(v) | Set::Coalesce(v) | Set::Greatest(v) => Some(v),
            Set::Add(_) => None,
        }
    }
}

/// A condition on a row; a filter is the conjunction of its conditions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cond {
    /// `col = v` (never true for NULL, as in SQL).
    Eq(&'static str, Value),
    /// `col IN (v, …)`
    In(&'static str, Vec<Value>),
}

impl Cond {
    pub fn column(&self) -> &'static str {
        match self {
            Cond::Eq(c, _) | Cond::In(c, _) => c,
        }
    }
}

/// What an insert does when a row with its key is there already.
#[derive(Debug, Clone)]
pub enum OnConflict {
    /// `ON CONFLICT (key) DO NOTHING`: the first event to insert a row wins.
    Nothing,
    /// `ON CONFLICT (key) DO UPDATE SET …` on the row that is there.
    Update(Vec<(&'static str, Set)>),
}

/// One read-model operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert a whole row (`row` holds every column, in the table's order).
    Insert {
        table: &'static Table,
        row: Vec<Value>,
        on_conflict: OnConflict,
    },
    /// Update the rows `filter` picks.
    Update {
        table: &'static Table,
        filter: Vec<Cond>,
        set: Vec<(&'static str, Set)>,
    },
    /// Delete the rows `filter` picks.
    Delete {
        table: &'static Table,
        filter: Vec<Cond>,
    },
}

impl Op {
    /// An insert of a row given as (column, value) pairs, every column named
    /// once; a row whose key is taken is left as it is.
    pub fn insert<const N: usize>(table: &'static Table, values: [(&'static str, Value); N]) -> Op {
        assert!(
            N == table.columns.len(),
            "an insert into {} names {N} of its {} columns",
            table.name,
            table.columns.len()
        );
        let mut row = vec![Value::Null; N];
        let mut named = [false; N];
        for (given, (column, value)) in values.into_iter().enumerate() {
            // The rules name the columns in the table's order: a rebuild builds
            // an insert per event, so the search is only the fallback.
            let i = if table.columns[given].name == column {
                given
            } else {
                table.index(column)
            };
            assert!(!named[i], "{}.{column} is named twice", table.name);
            table.check_at(i, &value);
            named[i] = true;
            row[i] = value;
        }
        Op::Insert {
            table,
            row,
            on_conflict: OnConflict::Nothing,
        }
    }

    /// This insert, updating the row that holds its key instead of leaving it.
    pub fn or_update<const N: usize>(mut self, sets: [(&'static str, Set); N]) -> Op {
        if let Op::Insert {
            table, on_conflict, ..
        } = &mut self
        {
            check_sets(table, &sets);
            *on_conflict = OnConflict::Update(sets.into());
        }
        self
    }

    pub fn update<const N: usize>(
        table: &'static Table,
        filter: Vec<Cond>,
        set: [(&'static str, Set); N],
    ) -> Op {
        check_filter(table, &filter);
        check_sets(table, &set);
        Op::Update {
            table,
            filter,
            set: set.into(),
        }
    }

    pub fn delete(table: &'static Table, filter: Vec<Cond>) -> Op {
        check_filter(table, &filter);
        Op::Delete { table, filter }
    }

    pub fn table(&self) -> &'static Table {
        match self {
            Op::Insert { table, .. } | Op::Update { table, .. } | Op::Delete { table, .. } => table,
        }
    }
}

fn check_sets(table: &Table, sets: &[(&'static str, Set)]) {
    for (column, set) in sets {
        match set.value() {
            Some(value) => table.check(column, value),
            None => table.check(column, &Value::I64(0)),
        }
    }
}

fn check_filter(table: &Table, filter: &[Cond]) {
    for cond in filter {
        match cond {
            Cond::Eq(column, value) => table.check(column, value),
            Cond::In(column, values) => values.iter().for_each(|v| table.check(column, v)),
        }
    }
}

/// `col = v`
pub fn eq(column: &'static str, value: impl Into<Value>) -> Cond {
    Cond::Eq(column, value.into())
}

/// A read of other rows a rule needs before it can decide: `columns` of the
/// rows of `table` (one of the projection's own) that `filter` picks.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub table: &'static Table,
    pub filter: Cond,
    pub columns: &'static [&'static str],
}

impl Lookup {
    /// The declared types of the asked columns, in order: how an executor
    /// decodes the rows it found.
    pub fn column_types(&self) -> Vec<Type> {
        self.columns
            .iter()
            .map(|c| self.table.column(c).ty)
            .collect()
    }
}

/// The answer to a [`Lookup`]: the rows found, each with the asked columns in
/// order (no rows when nothing was asked).
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub rows: Vec<Vec<Value>>,
}

impl Found {
    /// The first column of the first row, as a uuid.
    pub fn uuid(&self) -> Option<Uuid> {
        self.rows.first()?.first()?.as_uuid()
    }

    /// The first column of every row, as uuids.
    pub fn uuids(&self) -> Vec<Uuid> {
        self.rows
            .iter()
            .filter_map(|r| r.first()?.as_uuid())
            .collect()
    }
}

/// A projection's rules: what it needs to read for an event, and the ops it
/// makes of the event and that answer. Both are pure.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub lookup: fn(&EventEnvelope, &Event) -> Option<Lookup>,
    pub ops: fn(&EventEnvelope, &Event, &Found) -> Vec<Op>,
}

impl Rules {
    /// Whether the rules read or write anything for this event: a lookup, or
    /// ops even with nothing found. Where this is `false` every executor does
    /// nothing for the event (no lookup means nothing is ever found), so a
    /// live batch of only such events has nothing to write but its
    /// checkpoint's move. Derived from the rules themselves, so it cannot
    /// disagree with them.
    pub fn touches(&self, e: &EventEnvelope, event: &Event) -> bool {
        (self.lookup)(e, event).is_some() || !(self.ops)(e, event, &Found::default()).is_empty()
    }
}
