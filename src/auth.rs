//! Credentials: argon2id password hashes and HS256 access tokens.

use std::time::Duration;

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Hash a password with argon2id (the crate's OWASP-recommended defaults).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

/// Check a password against a PHC hash; a malformed hash never verifies.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash of no one's password, to spend the same time on unknown emails as on
/// wrong passwords (so login timing does not reveal who has an account).
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("decoy password, never valid").unwrap_or_default())
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    iat: i64,
    exp: i64,
    iss: String,
}

const ISSUER: &str = "ai-secretary";

/// Seconds a token is still taken after its `exp`: clocks of the machines
/// that issue and check tokens may differ by that much.
const LEEWAY: i64 = 5;

/// Most tokens remembered as verified. An entry is its token's text and a
/// few dozen bytes, some 400 bytes in all, so at most about 4 MiB: the
/// signed-in clients of a busy instance within one token lifetime. Past it,
/// a token is only verified again.
const VERIFIED_TOKENS: u64 = 10_000;

/// Issues and checks bearer tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    lifetime: Duration,
    /// Tokens this process verified, by their exact text. A client sends its
    /// token with every request, and checking it (base64, JSON, HMAC) was a
    /// tenth of a cached GET's CPU (docs/benchmarks.md, issue 15's eleventh
    /// stop). Only a token that passed the whole check is kept, and any other
    /// text (a changed byte, another signature) is not found here, so it is
    /// checked in full. Its expiry is checked on every use.
    verified: moka::sync::Cache<String, Verified>,
}

/// What a verified token says.
#[derive(Clone, Copy)]
struct Verified {
    user: Uuid,
    issued_at: chrono::DateTime<chrono::Utc>,
    expires: i64,
}

impl Tokens {
    pub fn new(secret: &str, lifetime: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = LEEWAY as u64;
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            lifetime,
            // No token outlives its lifetime (and the leeway) after it was
            // issued, which is before it was first verified; and a day is
            // plenty (moka refuses a TTL of centuries).
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_TOKENS)
                .time_to_live(
                    lifetime.min(Duration::from_secs(24 * 3600))
                        + Duration::from_secs(LEEWAY as u64),
                )
                .build(),
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    pub fn issue(
        &self,
        user_id: Uuid,
        now: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<String> {
        let claims = Claims {
            sub: user_id,
            iat: now.timestamp(),
            exp: now.timestamp() + self.lifetime.as_secs() as i64,
            iss: ISSUER.into(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    /// The user a token speaks for, if it is ours, intact and unexpired.
    pub fn verify(&self, token: &str) -> Option<Uuid> {
        self.verify_issued(token).map(|(user, _)| user)
    }

    /// [`verify`](Tokens::verify), with when the token was issued.
    pub fn verify_issued(&self, token: &str) -> Option<(Uuid, chrono::DateTime<chrono::Utc>)> {
        self.verify_issued_at(token, chrono::Utc::now().timestamp())
    }

    /// [`verify_issued`](Tokens::verify_issued) as of `now` (Unix seconds)
    /// for a token verified before; a new one is checked on the system clock,
    /// as `jsonwebtoken` does.
    fn verify_issued_at(
        &self,
        token: &str,
        now: i64,
    ) -> Option<(Uuid, chrono::DateTime<chrono::Utc>)> {
        let verified = match self.verified.get(token) {
            Some(verified) => verified,
            None => {
                let claims =
                    jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
                        .ok()?
                        .claims;
                let verified = Verified {
                    user: claims.sub,
                    issued_at: chrono::DateTime::from_timestamp(claims.iat, 0)?,
                    expires: claims.exp,
                };
                self.verified.insert(token.to_owned(), verified);
                verified
            }
        };
        // `jsonwebtoken`'s own rule: expired once `exp` is more than the
        // leeway in the past.
        (verified.expires >= now - LEEWAY).then_some((verified.user, verified.issued_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let tokens = Tokens::new("k1", Duration::from_secs(60));
        let user = Uuid::now_v7();
        let token = tokens.issue(user, chrono::Utc::now()).unwrap();
        assert_eq!(tokens.verify(&token), Some(user));
        assert_eq!(
            Tokens::new("k2", Duration::from_secs(60)).verify(&token),
            None
        );
        let expired = tokens
            .issue(user, chrono::Utc::now() - chrono::Duration::seconds(120))
            .unwrap();
        assert_eq!(tokens.verify(&expired), None);
    }

    /// A token verified once is looked up by its text afterwards, and still
    /// expires; any other text is checked in full.
    #[test]
    fn a_remembered_token_still_expires_and_nothing_else_is_taken_for_it() {
        let lifetime = Duration::from_secs(60);
        let tokens = Tokens::new("k1", lifetime);
        let (user, now) = (Uuid::now_v7(), chrono::Utc::now());
        let token = tokens.issue(user, now).unwrap();
        let issued = chrono::DateTime::from_timestamp(now.timestamp(), 0);
        assert_eq!(tokens.verify_issued(&token).map(|(u, _)| u), Some(user));
        assert_eq!(tokens.verify_issued(&token).map(|(_, at)| at), issued);

        // Remembered: a later clock is read from the entry, not the token.
        let exp = now.timestamp() + lifetime.as_secs() as i64;
        assert!(tokens.verify_issued_at(&token, exp + LEEWAY).is_some());
        assert_eq!(tokens.verify_issued_at(&token, exp + LEEWAY + 1), None);

        // A changed signature, or the same claims signed with another key,
        // is not the remembered text, and fails the full check.
        // (Not the last character: some of its bits are padding.)
        let mut tampered = token.clone().into_bytes();
        let i = tampered.len() - 10;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(tokens.verify(&tampered), None);
        let foreign = Tokens::new("k2", lifetime).issue(user, now).unwrap();
        assert_eq!(tokens.verify(&foreign), None);
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
    }
}
