//! The cache's rules, written once as pure functions of a key's stamp and a
//! position: the in-process backend calls them, and the Redis backend's Lua
//! scripts (`redis_cache.rs`) are the same comparisons written in Lua (Redis
//! runs a script atomically, which a Rust function beside it could not be).
//!
//! A stamp is the commit position a key is current as of: set by an
//! invalidation (the event that changed the resource) or by a fill (the
//! position of the row that was read). `None` is a key with no stamp (never
//! touched, or expired after its TTL).

use ai_secretary_contract::Position;

/// May an event at `at` stamp the key and drop its value? Only if it is newer
/// than the stamp: a stamp never moves backwards, and an event the key is
/// already current as of (an equal stamp, e.g. a value filled from the row the
/// event produced, or the same batch prepared twice) changes nothing.
///
/// Redis: `INVALIDATE` returns 0 when `tx > ntx or (tx == ntx and gp >= ngp)`.
pub fn may_invalidate(stamp: Option<Position>, at: Position) -> bool {
    stamp.is_none_or(|stamp| at > stamp)
}

/// May a value read from a row at `row` be kept? Only if the row is at least as
/// new as the stamp: a query that read the row before an event moved it (and
/// fills after the event's invalidation) must not put the old copy back.
///
/// Redis: `FILL` returns 0 when `tx > ntx or (tx == ntx and gp > ngp)`.
/// (Both backends also refuse every fill for a forgotten owner, first.)
pub fn may_fill(stamp: Option<Position>, row: Position) -> bool {
    stamp.is_none_or(|stamp| row >= stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(transaction_id: i64, global_position: i64) -> Position {
        Position {
            transaction_id,
            global_position,
        }
    }

    #[test]
    fn an_invalidation_only_moves_a_stamp_forwards() {
        assert!(may_invalidate(None, at(5, 5)));
        assert!(may_invalidate(Some(at(5, 5)), at(5, 6)));
        assert!(
            may_invalidate(Some(at(5, 9)), at(6, 1)),
            "commit order first"
        );
        assert!(!may_invalidate(Some(at(5, 5)), at(5, 5)), "already current");
        assert!(!may_invalidate(Some(at(6, 1)), at(5, 9)));
    }

    #[test]
    fn a_fill_must_be_at_least_as_new_as_the_stamp() {
        assert!(may_fill(None, at(1, 1)));
        assert!(may_fill(Some(at(5, 5)), at(5, 5)), "the row the event made");
        assert!(may_fill(Some(at(5, 5)), at(6, 1)));
        assert!(!may_fill(Some(at(5, 5)), at(5, 4)), "read before the event");
        assert!(!may_fill(Some(at(6, 1)), at(5, 9)));
    }
}
