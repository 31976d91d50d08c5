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

/// Issues and checks bearer tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    lifetime: Duration,
}

impl Tokens {
    pub fn new(secret: &str, lifetime: Duration) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            lifetime,
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
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 5;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()?
            .claims;
        Some((claims.sub, chrono::DateTime::from_timestamp(claims.iat, 0)?))
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

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
    }
}
