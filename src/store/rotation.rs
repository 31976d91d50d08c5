//! Rotating `ENCRYPTION_KEY` (`ai-secretary rotate-encryption-key`, with the
//! service stopped: docs/operations.md).
//!
//! The master key seals no event: it wraps each user's data key and keys the
//! email lookups. So a rotation rewrites two small things and never the log:
//! every user's key is unwrapped with the old master and wrapped with the new
//! one, and every email reservation is re-hashed under the new lookup key (the
//! email is read back from the user's own `UserRegistered`, opened with their
//! key). All in one transaction: it ends rotated, or as it was.

use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::StoreError;
use crate::crypto::{MasterKey, Sealed};

/// What a rotation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    pub keys: u64,
    pub reservations: u64,
}

/// Re-wrap every user key and re-hash every email reservation (those of
/// `email_scope`) from `old` to `new`.
pub async fn rotate_master_key(
    pool: &PgPool,
    old: &MasterKey,
    new: &MasterKey,
    email_scope: &str,
) -> Result<Rotated, StoreError> {
    let mut tx = pool.begin().await?;
    let keys = sqlx::query("SELECT user_id, wrapped FROM user_keys ORDER BY user_id FOR UPDATE")
        .fetch_all(&mut *tx)
        .await?;
    let mut rotated = Rotated {
        keys: 0,
        reservations: 0,
    };
    for row in keys {
        let user: Uuid = row.try_get("user_id")?;
        let wrapped: Vec<u8> = row.try_get("wrapped")?;
        // Fails (and rolls everything back) unless `old` is the key in use.
        let key = old.unwrap(user, &wrapped)?;
        sqlx::query("UPDATE user_keys SET wrapped = $2 WHERE user_id = $1")
            .bind(user)
            .bind(new.wrap(user, &key))
            .execute(&mut *tx)
            .await?;
        rotated.keys += 1;
        let registered: Option<(Uuid, Value)> = sqlx::query_as(
            "SELECT event_id, data FROM events
             WHERE stream_id = $1 AND event_type = 'UserRegistered'",
        )
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((event_id, data)) = registered else {
            continue;
        };
        let Some(sealed) = data.get("email").and_then(Sealed::read) else {
            continue; // registered before emails were sealed: reserved in plaintext
        };
        let email = key.open(event_id, "email", &sealed)?;
        let moved =
            sqlx::query("UPDATE reservations SET value = $3 WHERE scope = $1 AND stream_id = $2")
                .bind(email_scope)
                .bind(user)
                .bind(new.email_lookup(&email))
                .execute(&mut *tx)
                .await?;
        rotated.reservations += moved.rows_affected();
    }
    tx.commit().await?;
    Ok(rotated)
}
