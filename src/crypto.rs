//! Crypto-shredding: each user's personal fields are encrypted with a key of
//! their own, and forgetting the user destroys the key. The events (which are
//! never deleted) keep only ciphertext, so what was theirs becomes unreadable
//! everywhere at once: in the store, on the bus, and in every backup of either.
//!
//! - **Keys.** A user's data key is 32 random bytes, kept *wrapped* (encrypted)
//!   under a key derived from `ENCRYPTION_KEY`, with the user's id as associated
//!   data, outside the event log (`user_keys`). Unwrapping needs both the row and
//!   the master key; destroying the row destroys the key.
//! - **Fields.** A personal field's string value is replaced by a sealed value,
//!   `{"enc": "v1", "key": "<user id>", "ct": "<base64url of nonce ‖ ciphertext>"}`,
//!   XChaCha20-Poly1305 with the event id and the field's path as associated
//!   data: a sealed value copied into another event or field does not open.
//!   Plaintext strings are never objects, so sealed and plain values cannot be
//!   mistaken for each other (events written before encryption read as they are).
//! - **Lookups.** Email uniqueness and sign-in use a keyed hash of the normalized
//!   email (HMAC-SHA256 under another key derived from `ENCRYPTION_KEY`), never
//!   the email itself.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chacha20poly1305::{
    Key, XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, KeyInit, OsRng, Payload, rand_core::RngCore},
};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;
use uuid::Uuid;

/// The version tag of sealed values (and of the wrapping of keys).
const VERSION: &str = "v1";
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("ENCRYPTION_KEY must be 32 bytes written as 64 hex characters")]
    BadMasterKey,
    /// Tampered with, sealed for another event, field or user, or under another
    /// master key.
    #[error("sealed data does not open")]
    DoesNotOpen,
    #[error("not a sealed value")]
    NotSealed,
}

/// What `ENCRYPTION_KEY` is used for: wrapping users' keys, and keyed hashes
/// of lookups. Each purpose has its own key, derived with HKDF-SHA256.
#[derive(Clone)]
pub struct MasterKey {
    wrapping: Key,
    lookups: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(…)")
    }
}

impl MasterKey {
    /// From `ENCRYPTION_KEY`: 64 hex characters.
    pub fn from_hex(hex_key: &str) -> Result<MasterKey, CryptoError> {
        let bytes = hex::decode(hex_key.trim()).map_err(|_| CryptoError::BadMasterKey)?;
        if bytes.len() != 32 {
            return Err(CryptoError::BadMasterKey);
        }
        let hkdf = hkdf::Hkdf::<Sha256>::new(Some(b"ai-secretary"), &bytes);
        let mut wrapping = [0u8; 32];
        let mut lookups = [0u8; 32];
        hkdf.expand(b"user key wrapping v1", &mut wrapping)
            .and_then(|()| hkdf.expand(b"lookup hashes v1", &mut lookups))
            .map_err(|_| CryptoError::BadMasterKey)?;
        Ok(MasterKey {
            wrapping: wrapping.into(),
            lookups,
        })
    }

    /// A new user's data key, wrapped for storage.
    pub fn new_user_key(&self, user: Uuid) -> (UserKey, Vec<u8>) {
        let key = UserKey(XChaCha20Poly1305::generate_key(&mut OsRng));
        let wrapped = self.wrap(user, &key);
        (key, wrapped)
    }

    /// A data key as stored: nonce ‖ ciphertext, the user's id as associated data.
    pub fn wrap(&self, user: Uuid, key: &UserKey) -> Vec<u8> {
        seal_bytes(&self.wrapping, key.0.as_ref(), &wrapping_aad(user))
    }

    pub fn unwrap(&self, user: Uuid, wrapped: &[u8]) -> Result<UserKey, CryptoError> {
        let bytes = open_bytes(&self.wrapping, wrapped, &wrapping_aad(user))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::DoesNotOpen)?;
        Ok(UserKey(key.into()))
    }

    /// The keyed hash an email (already normalized) is looked up by: the same
    /// email always gives the same hash, and without the master key nobody can
    /// tell which email a hash stands for.
    pub fn email_lookup(&self, normalized_email: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.lookups)
            .expect("HMAC takes a key of any length");
        mac.update(b"email:");
        mac.update(normalized_email.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

fn wrapping_aad(user: Uuid) -> Vec<u8> {
    let mut aad = format!("ai-secretary user key {VERSION} ").into_bytes();
    aad.extend_from_slice(user.as_bytes());
    aad
}

/// One user's data key. Never stored unwrapped; never logged.
#[derive(Clone)]
pub struct UserKey(Key);

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserKey(…)")
    }
}

impl UserKey {
    /// The sealed form of `plaintext`, the value of field `path` of event `event_id`.
    pub fn seal(&self, user: Uuid, event_id: Uuid, path: &str, plaintext: &str) -> Value {
        let blob = seal_bytes(&self.0, plaintext.as_bytes(), &field_aad(event_id, path));
        json!({ "enc": VERSION, "key": user, "ct": URL_SAFE_NO_PAD.encode(blob) })
    }

    /// The plaintext of a sealed value of field `path` of event `event_id`.
    pub fn open(&self, event_id: Uuid, path: &str, sealed: &Sealed) -> Result<String, CryptoError> {
        let blob = URL_SAFE_NO_PAD
            .decode(&sealed.ciphertext)
            .map_err(|_| CryptoError::DoesNotOpen)?;
        let bytes = open_bytes(&self.0, &blob, &field_aad(event_id, path))?;
        String::from_utf8(bytes).map_err(|_| CryptoError::DoesNotOpen)
    }
}

fn field_aad(event_id: Uuid, path: &str) -> Vec<u8> {
    let mut aad = event_id.as_bytes().to_vec();
    aad.push(b'/');
    aad.extend_from_slice(path.as_bytes());
    aad
}

/// A sealed value, read from a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Whose key sealed it.
    pub user: Uuid,
    ciphertext: String,
}

impl Sealed {
    /// The sealed value `value` is, if it is one.
    pub fn read(value: &Value) -> Option<Sealed> {
        let Value::Object(fields) = value else {
            return None;
        };
        if fields.get("enc")? != VERSION {
            return None;
        }
        Some(Sealed {
            user: fields.get("key")?.as_str()?.parse().ok()?,
            ciphertext: fields.get("ct")?.as_str()?.to_owned(),
        })
    }
}

/// Every sealed value in a payload, with its path (`content`,
/// `metadata/<key>`), depth first: for opening them without knowing the event.
pub fn sealed_fields(data: &Value) -> Vec<(String, Sealed)> {
    fn walk(value: &Value, path: &mut String, out: &mut Vec<(String, Sealed)>) {
        if let Some(sealed) = Sealed::read(value) {
            out.push((path.clone(), sealed));
            return;
        }
        if let Value::Object(fields) = value {
            for (name, field) in fields {
                let len = path.len();
                if !path.is_empty() {
                    path.push('/');
                }
                path.push_str(name);
                walk(field, path, out);
                path.truncate(len);
            }
        }
    }
    let mut out = Vec::new();
    walk(data, &mut String::new(), &mut out);
    out
}

/// Replace the value at `path` (`a/b`) of `data` with `value`.
pub fn replace_at(data: &mut Value, path: &str, value: Value) {
    let mut at = data;
    for part in path.split('/') {
        let Some(next) = at.as_object_mut().and_then(|o| o.get_mut(part)) else {
            return;
        };
        at = next;
    }
    *at = value;
}

/// The object of a payload's fields, for sealing in place.
pub fn fields_mut(data: &mut Value) -> Option<&mut Map<String, Value>> {
    data.as_object_mut()
}

fn seal_bytes(key: &Key, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let sealed = XChaCha20Poly1305::new(key)
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("encrypting into a Vec cannot fail");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    out
}

fn open_bytes(key: &Key, blob: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if blob.len() < NONCE_LEN {
        return Err(CryptoError::DoesNotOpen);
    }
    let (nonce, sealed) = blob.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::DoesNotOpen)?;
    XChaCha20Poly1305::new(key)
        .decrypt(&XNonce::from(nonce), Payload { msg: sealed, aad })
        .map_err(|_| CryptoError::DoesNotOpen)
}

/// 32 random bytes as 64 hex characters: a new `ENCRYPTION_KEY`.
pub fn random_master_key_hex() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::from_hex(&"ab".repeat(32)).unwrap()
    }

    #[test]
    fn a_sealed_field_opens_only_for_its_event_field_and_key() {
        let master = master();
        let (user, other) = (Uuid::now_v7(), Uuid::now_v7());
        let (key, wrapped) = master.new_user_key(user);
        let event = Uuid::now_v7();
        let sealed = key.seal(user, event, "content", "meet at 3pm, Tuesday");
        let text = sealed.to_string();
        assert!(!text.contains("meet"), "{text}");
        let read = Sealed::read(&sealed).unwrap();
        assert_eq!(read.user, user);
        assert_eq!(
            key.open(event, "content", &read).unwrap(),
            "meet at 3pm, Tuesday"
        );
        // Another event, another field: it does not open.
        assert_eq!(
            key.open(Uuid::now_v7(), "content", &read),
            Err(CryptoError::DoesNotOpen)
        );
        assert_eq!(
            key.open(event, "title", &read),
            Err(CryptoError::DoesNotOpen)
        );
        // The key round-trips through its wrapping, for its user only.
        let unwrapped = master.unwrap(user, &wrapped).unwrap();
        assert_eq!(
            unwrapped.open(event, "content", &read).unwrap(),
            "meet at 3pm, Tuesday"
        );
        assert!(master.unwrap(other, &wrapped).is_err());
        // Under another master key, nothing opens.
        let elsewhere = MasterKey::from_hex(&"cd".repeat(32)).unwrap();
        assert!(elsewhere.unwrap(user, &wrapped).is_err());
        // Tampering is found.
        let mut tampered = sealed.clone();
        let ct = tampered["ct"].as_str().unwrap().to_owned();
        let flipped = if ct.ends_with('A') { "B" } else { "A" };
        tampered["ct"] = json!(format!("{}{flipped}", &ct[..ct.len() - 1]));
        assert!(
            key.open(event, "content", &Sealed::read(&tampered).unwrap())
                .is_err()
        );
    }

    #[test]
    fn plain_values_are_never_taken_for_sealed_ones() {
        for plain in [
            json!("enc:v1:whatever"),
            json!({"enc": "v2"}),
            json!(3),
            json!(null),
        ] {
            assert_eq!(Sealed::read(&plain), None, "{plain}");
        }
    }

    #[test]
    fn sealed_fields_are_found_with_their_paths() {
        let master = master();
        let user = Uuid::now_v7();
        let (key, _) = master.new_user_key(user);
        let event = Uuid::now_v7();
        let mut data = json!({
            "name": "Mika",
            "metadata": {"team": "sales", "size": 3},
            "temperature": 0.7,
        });
        for path in ["name", "metadata/team"] {
            let plain = path
                .split('/')
                .fold(&data, |v, p| &v[p])
                .as_str()
                .unwrap()
                .to_owned();
            replace_at(&mut data, path, key.seal(user, event, path, &plain));
        }
        let found = sealed_fields(&data);
        let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["name", "metadata/team"]);
        assert_eq!(
            key.open(event, "metadata/team", &found[1].1).unwrap(),
            "sales"
        );
        assert_eq!(data["temperature"], 0.7);
    }

    #[test]
    fn email_lookups_are_stable_keyed_and_say_nothing_of_the_email() {
        let master = master();
        let a = master.email_lookup("ada@example.com");
        assert_eq!(a, master.email_lookup("ada@example.com"));
        assert_ne!(a, master.email_lookup("bob@example.com"));
        assert!(!a.contains("ada"));
        let elsewhere = MasterKey::from_hex(&"cd".repeat(32)).unwrap();
        assert_ne!(a, elsewhere.email_lookup("ada@example.com"));
        assert_eq!(
            MasterKey::from_hex("abc").unwrap_err(),
            CryptoError::BadMasterKey
        );
    }
}
