//! The sealing store: personal fields are encrypted on their way into the event
//! store and opened on their way out (crypto-shredding; the primitives are in
//! `crate::crypto`).
//!
//! [`SealedStore`] wraps the real store for everyone who reads events as the
//! domain does (commands, the replier, live streams): they see plaintext and
//! never know. The relay reads the store *unwrapped*, so the bus carries
//! ciphertext only, and the read side opens what it projects through the same
//! [`Keyring`] (it is the projections' `Opener`: see `crate::read_side`).
//!
//! Which fields are personal is decided here, by event type, in
//! [`personal_fields`] (docs/events.md lists them). Whose key seals them: the
//! user's own for their `user` stream, otherwise the user the event's metadata
//! names (`user_id`: the caller, or for the replier the owner it answers). An
//! event with personal fields and no user is refused rather than written in
//! plaintext.
//!
//! The key's lifecycle rides on the user's events: `UserRegistered` creates and
//! keeps it, `UserForgotten` destroys it, each in the same transaction as the
//! event (`UserKeyChange`). After that the user's sealed values open to
//! [`FORGOTTEN`], everywhere and for good.

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use uuid::Uuid;

use super::{
    AppendError, AppendRequest, Appended, Behind, EventStore, IdempotencyRecord, Position,
    RecordedEvent, StoreError, StoredPayload, StoredResponse, UserKeyChange,
};
use crate::crypto::{self, CryptoError, MasterKey, UserKey};

/// What a sealed value reads as once its user is forgotten.
pub const FORGOTTEN: &str = "[forgotten]";

/// How long an unwrapped key is kept in memory. A process that did not do the
/// forgetting itself learns of it at the latest this much later (the read side
/// forgets a key as soon as it meets the user's `UserForgotten`, see
/// [`Keyring::forget`]); within that window nothing new can be written for a
/// forgotten user anyway, since their tokens no longer authenticate.
const KEY_CACHE_TTL: Duration = Duration::from_secs(30);
/// Unwrapped keys kept at most (32 bytes each, plus moka's bookkeeping).
const KEY_CACHE_ENTRIES: u64 = 100_000;

/// The personal fields of an event type, as paths into its payload. A path
/// ending in `/*` means every value of that object (assistant `metadata`).
///
/// The password hash is sealed too: it is derived from the password, and a
/// forgotten account must not keep anything that could be checked against one.
pub fn personal_fields(event_type: &str) -> &'static [&'static str] {
    match event_type {
        "UserRegistered" => &["email", "display_name", "password_hash"],
        "AssistantCreated" | "AssistantUpdated" => &["name", "role", "instructions", "metadata/*"],
        "ConversationStarted" | "ConversationRenamed" => &["title"],
        "MessagePosted" | "ReplyCompleted" => &["content"],
        _ => &[],
    }
}

/// The user whose key seals the personal fields of an event of `stream_type`
/// `stream_id` with `metadata`.
fn owner_of(stream_type: &str, stream_id: Uuid, metadata: &Value) -> Option<Uuid> {
    if stream_type == "user" {
        return Some(stream_id);
    }
    metadata.get("user_id")?.as_str()?.parse().ok()
}

/// Users' data keys: made, found (unwrapped, and kept a little while), and
/// forgotten.
#[derive(Clone)]
pub struct Keyring {
    master: MasterKey,
    /// The store the wrapped keys live in (beside the events they seal).
    store: Arc<dyn EventStore>,
    keys: moka::sync::Cache<Uuid, UserKey>,
}

impl Keyring {
    pub fn new(master: MasterKey, store: Arc<dyn EventStore>) -> Keyring {
        Keyring {
            master,
            store,
            keys: moka::sync::Cache::builder()
                .max_capacity(KEY_CACHE_ENTRIES)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
        }
    }

    /// The keyed hash an email is reserved and looked up by.
    pub fn email_lookup(&self, normalized_email: &str) -> String {
        self.master.email_lookup(normalized_email)
    }

    /// A user's key; `None` once they are forgotten.
    pub async fn key(&self, user: Uuid) -> Result<Option<UserKey>, StoreError> {
        if let Some(key) = self.keys.get(&user) {
            return Ok(Some(key));
        }
        let Some(wrapped) = self.store.find_user_key(user).await? else {
            return Ok(None);
        };
        let key = self.master.unwrap(user, &wrapped)?;
        self.keys.insert(user, key.clone());
        Ok(Some(key))
    }

    /// Drop a forgotten user's key from memory (it is gone from the store).
    pub fn forget(&self, user: Uuid) {
        self.keys.invalidate(&user);
    }

    /// Seal the personal fields of a request's events, in place; make the key
    /// of a registration and destroy that of a forgetting, with the events.
    pub async fn seal(&self, request: &mut AppendRequest) -> Result<(), AppendError> {
        for event in &mut request.events {
            let owner = owner_of(request.stream_type, request.stream_id, &event.metadata);
            match event.event_type.as_str() {
                "UserRegistered" => {
                    let (key, wrapped) = self.master.new_user_key(request.stream_id);
                    self.keys.insert(request.stream_id, key);
                    request.user_key = Some(UserKeyChange::Create {
                        user: request.stream_id,
                        wrapped,
                    });
                }
                "UserForgotten" => {
                    request.user_key = Some(UserKeyChange::Destroy {
                        user: request.stream_id,
                    });
                }
                _ => {}
            }
            let fields = personal_fields(&event.event_type);
            if fields.is_empty() {
                continue;
            }
            let owner = owner.ok_or(AppendError::Unsealable {
                event_type: event.event_type.clone(),
            })?;
            let key = self
                .key(owner)
                .await?
                .ok_or(AppendError::OwnerForgotten { user: owner })?;
            for path in plain_paths(&event.data, fields) {
                let plaintext = at_path(&event.data, &path)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let sealed = key.seal(owner, event.event_id, &path, &plaintext);
                crypto::replace_at(&mut event.data, &path, sealed);
            }
        }
        Ok(())
    }

    /// Open the sealed values of an event's payload, in place: each to its
    /// plaintext, or to [`FORGOTTEN`] if its user's key is gone. A value that
    /// does not open under a key that exists is an error, never a placeholder:
    /// it means the wrong `ENCRYPTION_KEY` (or tampering), and must not be
    /// projected or answered as if the user were forgotten.
    pub async fn open(&self, event_id: Uuid, data: &mut Value) -> Result<(), StoreError> {
        for (path, sealed) in crypto::sealed_fields(data) {
            let plaintext = match self.key(sealed.user).await? {
                Some(key) => key.open(event_id, &path, &sealed)?,
                None => FORGOTTEN.to_owned(),
            };
            crypto::replace_at(data, &path, Value::String(plaintext));
        }
        Ok(())
    }

    /// [`open`](Keyring::open) on a payload's JSON text: the opened text, or
    /// `None` when it holds no sealed value (an event without personal fields:
    /// use it as it is; it is neither parsed nor copied).
    pub async fn open_text(
        &self,
        event_id: Uuid,
        text: &str,
    ) -> Result<Option<String>, StoreError> {
        if !may_hold_sealed(text) {
            return Ok(None);
        }
        let mut data: Value = serde_json::from_str(text).map_err(|_| CryptoError::NotSealed)?;
        self.open(event_id, &mut data).await?;
        Ok(Some(data.to_string()))
    }
}

/// Whether a payload's text could hold a sealed value (`{"enc": …}`): a cheap
/// test that lets most events skip parsing.
pub fn may_hold_sealed(text: &str) -> bool {
    text.contains("\"enc\"")
}

/// The paths of `fields` that hold a plain string in `data` (an optional field
/// absent from an update has none), with `metadata/*` spelled out by key.
fn plain_paths(data: &Value, fields: &[&str]) -> Vec<String> {
    let mut paths = Vec::new();
    for field in fields {
        if let Some(object) = field.strip_suffix("/*") {
            if let Some(Value::Object(values)) = data.get(object) {
                paths.extend(
                    values
                        .iter()
                        .filter(|(_, v)| v.is_string())
                        .map(|(k, _)| format!("{object}/{k}")),
                );
            }
        } else if data.get(*field).is_some_and(Value::is_string) {
            paths.push((*field).to_owned());
        }
    }
    paths
}

fn at_path<'v>(data: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('/').try_fold(data, |v, part| v.get(part))
}

/// The event store as the domain sees it: personal fields sealed on append and
/// opened on every read. See the module's documentation.
pub struct SealedStore {
    inner: Arc<dyn EventStore>,
    keyring: Keyring,
}

impl SealedStore {
    pub fn new(inner: Arc<dyn EventStore>, keyring: Keyring) -> SealedStore {
        SealedStore { inner, keyring }
    }

    async fn opened(
        &self,
        mut events: Vec<RecordedEvent>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        for event in &mut events {
            self.keyring.open(event.event_id, &mut event.data).await?;
        }
        Ok(events)
    }
}

#[async_trait::async_trait]
impl EventStore for SealedStore {
    async fn append(&self, mut request: AppendRequest) -> Result<Appended, AppendError> {
        self.keyring.seal(&mut request).await?;
        let forgotten = match request.user_key {
            Some(UserKeyChange::Destroy { user }) => Some(user),
            _ => None,
        };
        let appended = self.inner.append(request).await?;
        if let Some(user) = forgotten {
            self.keyring.forget(user);
        }
        Ok(appended)
    }

    async fn read_stream_from(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.opened(
            self.inner
                .read_stream_from(stream_id, after_version)
                .await?,
        )
        .await
    }

    async fn read_payloads_from(
        &self,
        stream_id: Uuid,
        after_version: i64,
    ) -> Result<Vec<StoredPayload>, StoreError> {
        let mut payloads = self
            .inner
            .read_payloads_from(stream_id, after_version)
            .await?;
        for payload in &mut payloads {
            if let Some(opened) = self
                .keyring
                .open_text(payload.event_id, &payload.data)
                .await?
            {
                payload.data = opened;
            }
        }
        Ok(payloads)
    }

    async fn read_stream_backwards(
        &self,
        stream_id: Uuid,
        before_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.opened(
            self.inner
                .read_stream_backwards(stream_id, before_version, limit)
                .await?,
        )
        .await
    }

    async fn read_streams(&self, stream_ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        self.opened(self.inner.read_streams(stream_ids).await?)
            .await
    }

    async fn read_conversation_feed(
        &self,
        conversation_id: Uuid,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.opened(
            self.inner
                .read_conversation_feed(conversation_id, after, limit)
                .await?,
        )
        .await
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        self.inner.head().await
    }

    async fn behind(&self, after: Position, limit: i64) -> Result<Behind, StoreError> {
        self.inner.behind(after, limit).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.opened(self.inner.read_all(after, limit).await?).await
    }

    async fn find_user_key(&self, user: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.find_user_key(user).await
    }

    async fn find_reservation(
        &self,
        scope: &'static str,
        value: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        self.inner.find_reservation(scope, value).await
    }

    async fn find_idempotency(
        &self,
        owner_id: Uuid,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredResponse)>, StoreError> {
        self.inner.find_idempotency(owner_id, key).await
    }

    async fn remember_idempotency(&self, record: IdempotencyRecord) -> Result<bool, StoreError> {
        self.inner.remember_idempotency(record).await
    }

    async fn expire_idempotency_keys(&self) -> Result<u64, StoreError> {
        self.inner.expire_idempotency_keys().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
