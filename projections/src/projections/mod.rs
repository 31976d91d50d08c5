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

use crate::{cache::Cache, fold::Fold, projection::Projection};

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

#[cfg(test)]
mod tests {
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
}
