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
use sqlx::{PgPool, Row, SqlitePool};
use uuid::Uuid;

use super::StoreError;
use crate::crypto::{MasterKey, Sealed};

/// What a rotation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    pub keys: u64,
    pub reservations: u64,
}

/// One user's share of a rotation: their key wrapped under the new master,
/// and their email's lookup under it (when their `UserRegistered` seals one;
/// one registered before emails were sealed is reserved in plaintext).
struct Rewrapped {
    wrapped: Vec<u8>,
    email_lookup: Option<String>,
}

/// Unwrap `wrapped` with `old` (failing unless `old` is the key in use, which
/// rolls everything back) and rewrap it, and the email lookup, with `new`.
fn rewrap(
    old: &MasterKey,
    new: &MasterKey,
    user: Uuid,
    wrapped: &[u8],
    registered: Option<(Uuid, &str)>,
) -> Result<Rewrapped, StoreError> {
    let key = old.unwrap(user, wrapped)?;
    let mut email_lookup = None;
    if let Some((event_id, data)) = registered {
        let data: Value = serde_json::from_str(data)
            .map_err(|e| StoreError::Sqlx(sqlx::Error::Decode(e.into())))?;
        if let Some(sealed) = data.get("email").and_then(Sealed::read) {
            email_lookup = Some(new.email_lookup(&key.open(event_id, "email", &sealed)?));
        }
    }
    Ok(Rewrapped {
        wrapped: new.wrap(user, &key),
        email_lookup,
    })
}

/// The user's `UserRegistered` (its id and payload as JSON text). Postgres
/// keeps the payload as jsonb, SQLite as text; both answer text here.
const REGISTERED_POSTGRES: &str = "SELECT event_id, data::text FROM events
     WHERE stream_id = $1 AND event_type = 'UserRegistered'";
const REGISTERED_SQLITE: &str = "SELECT event_id, data FROM events
     WHERE stream_id = $1 AND event_type = 'UserRegistered'";
/// Portable: the same text on both.
const SET_WRAPPED: &str = "UPDATE user_keys SET wrapped = $2 WHERE user_id = $1";
const SET_LOOKUP: &str = "UPDATE reservations SET value = $3 WHERE scope = $1 AND stream_id = $2";

/// Re-wrap every user key and re-hash every email reservation (those of
/// `email_scope`) from `old` to `new`, on Postgres.
pub async fn rotate_master_key(
    pool: &PgPool,
    old: &MasterKey,
    new: &MasterKey,
    email_scope: &str,
) -> Result<Rotated, StoreError> {
    let mut tx = pool.begin().await?;
    // FOR UPDATE: a key written meanwhile (a sign-up) waits for the rotation.
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
        let registered: Option<(Uuid, String)> = sqlx::query_as(REGISTERED_POSTGRES)
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?;
        let next = rewrap(
            old,
            new,
            user,
            &wrapped,
            registered.as_ref().map(|(id, data)| (*id, data.as_str())),
        )?;
        sqlx::query(SET_WRAPPED)
            .bind(user)
            .bind(next.wrapped)
            .execute(&mut *tx)
            .await?;
        rotated.keys += 1;
        if let Some(lookup) = next.email_lookup {
            let moved = sqlx::query(SET_LOOKUP)
                .bind(email_scope)
                .bind(user)
                .bind(lookup)
                .execute(&mut *tx)
                .await?;
            rotated.reservations += moved.rows_affected();
        }
    }
    tx.commit().await?;
    Ok(rotated)
}

/// [`rotate_master_key`] on the embedded SQLite database: the same steps in
/// one `BEGIN IMMEDIATE` transaction (which holds every writer off, as Postgres'
/// FOR UPDATE does).
pub async fn rotate_master_key_sqlite(
    pool: &SqlitePool,
    old: &MasterKey,
    new: &MasterKey,
    email_scope: &str,
) -> Result<Rotated, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let keys: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT user_id, wrapped FROM user_keys ORDER BY user_id")
            .fetch_all(&mut *tx)
            .await?;
    let mut rotated = Rotated {
        keys: 0,
        reservations: 0,
    };
    for (user, wrapped) in keys {
        let registered: Option<(Uuid, String)> = sqlx::query_as(REGISTERED_SQLITE)
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?;
        let next = rewrap(
            old,
            new,
            user,
            &wrapped,
            registered.as_ref().map(|(id, data)| (*id, data.as_str())),
        )?;
        sqlx::query(SET_WRAPPED)
            .bind(user)
            .bind(next.wrapped)
            .execute(&mut *tx)
            .await?;
        rotated.keys += 1;
        if let Some(lookup) = next.email_lookup {
            let moved = sqlx::query(SET_LOOKUP)
                .bind(email_scope)
                .bind(user)
                .bind(lookup)
                .execute(&mut *tx)
                .await?;
            rotated.reservations += moved.rows_affected();
        }
    }
    tx.commit().await?;
    Ok(rotated)
}
