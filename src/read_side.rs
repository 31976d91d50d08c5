//! The service's side of the read side's seams. The store knows nothing of the
//! projections crate; what the read side needs of it is lent here.

use ai_secretary_projections::Opener;
use serde_json::Value;
use uuid::Uuid;

use crate::store::sealed::Keyring;

/// The read side opens what it projects with the same keys.
#[async_trait::async_trait]
impl Opener for Keyring {
    async fn open(&self, event_id: Uuid, data: &mut Value) -> Result<(), String> {
        Keyring::open(self, event_id, data)
            .await
            .map_err(|e| e.to_string())
    }

    async fn open_text(&self, event_id: Uuid, text: &str) -> Result<Option<String>, String> {
        Keyring::open_text(self, event_id, text)
            .await
            .map_err(|e| e.to_string())
    }

    fn forget(&self, user: Uuid) {
        Keyring::forget(self, user);
    }
}
