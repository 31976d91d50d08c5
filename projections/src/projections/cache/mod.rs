//! Projection `cache`: tombstones the Redis keys each event touches
//! (`crate::cache` describes the cache), and keeps the conversation → assistant
//! lookup (`cache_conversations`) it needs to find an assistant's key.

mod fold;
mod live;

pub use fold::CacheFold;
pub use live::CacheInvalidation;

use super::Fold;
use super::{Registered, table};
use crate::{cache::Cache, projection::Projection};

pub const PROJECTION: Registered = Registered {
    name: "cache",
    tables: &[table("cache_conversations", &["conversation_id"])],
    live,
    fold,
};

fn live(cache: &Cache) -> std::sync::Arc<dyn Projection> {
    std::sync::Arc::new(CacheInvalidation {
        cache: cache.clone(),
    })
}

fn fold() -> Fold {
    Fold::Cache(Default::default())
}
