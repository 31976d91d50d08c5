//! Projection `usage_daily`: completed replies and their tokens per owner, UTC
//! day, assistant and model, for `GET /stats/usage`.

mod fold;
mod live;

pub use fold::{UsageFold, UsageKey, UsageRow};
pub use live::UsageDaily;

use super::Fold;
use super::{Registered, table};
use crate::{cache::Cache, projection::Projection};

pub const PROJECTION: Registered = Registered {
    name: "usage_daily",
    tables: &[
        table("usage_daily", &["owner_id", "day", "assistant_id", "model"]),
        table("usage_conversations", &["conversation_id"]),
    ],
    live,
    fold,
};

fn live(_: &Cache) -> std::sync::Arc<dyn Projection> {
    std::sync::Arc::new(UsageDaily)
}

fn fold() -> Fold {
    Fold::UsageDaily(Default::default())
}
