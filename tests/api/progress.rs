//! The read side's progress as the tests check it, on the kit's
//! `support::progress`: waiting for the head within the tests' deadline, and
//! each event applied exactly once.

use std::collections::BTreeMap;

use ai_secretary::startup::projection_names;

use crate::{
    helpers::DEADLINE,
    support::{
        AsDb,
        progress::{self, Checkpoint, checkpoints},
    },
};

pub async fn event_count(db: &impl AsDb) -> i64 {
    crate::on_db!(db.db(), |pool| sqlx::query_scalar(
        "SELECT count(*) FROM events"
    )
    .fetch_one(pool)
    .await
    .unwrap())
}

/// Wait until every one of `names` has reached the store's head; the test
/// fails if that takes longer than [`DEADLINE`].
pub async fn caught_up(db: &impl AsDb, names: &[impl AsRef<str>]) -> BTreeMap<String, Checkpoint> {
    progress::caught_up(db, names, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Exactly once: each projection applied every event of the store one time, and
/// none went to `dead_letters`.
pub async fn assert_each_event_applied_once(pool: &impl AsDb) {
    let events = event_count(pool).await;
    let all = checkpoints(pool).await.unwrap();
    for name in projection_names() {
        assert_eq!(
            all[&name].events, events,
            "projection {name} applied {} events; the store has {events}",
            all[&name].events
        );
    }
    let dead: Vec<(String, String)> = crate::on_db!(pool.db(), |pool| sqlx::query_as(
        "SELECT projection, reason FROM dead_letters ORDER BY id"
    )
    .fetch_all(pool)
    .await
    .unwrap());
    assert!(dead.is_empty(), "dead letters: {dead:?}");
}
