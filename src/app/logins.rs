//! Signing in, with a lockout per account: after `max_failures` wrong passwords
//! within a lockout's length, the account refuses every login (the right
//! password included) until the lockout ends; each further round locks it for
//! twice as long, up to a day. A success forgives everything; a day of quiet
//! does too.
//!
//! Accounts are keyed by normalized email, whether or not an account has it, so
//! the lockout behaves the same for every email and tells nothing about who has
//! an account. A locked login is refused before the password is checked: no
//! argon2 time is spent on it. The record lives in this process (per replica,
//! like the rate limits; nginx and the per-address login limit sit in front).

use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::{Commands, ReadError};
use crate::domain::user::{User, normalize_email};

/// The longest a lockout grows to.
const LONGEST_LOCKOUT: Duration = Duration::from_secs(24 * 3600);
/// Accounts tracked at once (each a few dozen bytes); the oldest go first.
const TRACKED: u64 = 100_000;

/// How a login ended.
#[derive(Debug)]
pub enum LoginError {
    /// Unknown email or wrong password (indistinguishable, on purpose).
    BadCredentials,
    /// Too many failures: no login until `retry_after` has passed.
    LockedOut {
        retry_after: Duration,
    },
    Read(ReadError),
}

impl From<ReadError> for LoginError {
    fn from(e: ReadError) -> Self {
        LoginError::Read(e)
    }
}

/// One account's recent failures.
#[derive(Debug, Clone, Default)]
struct Failures {
    /// Failures since the last lockout (or since tracking began), within the window.
    recent: Vec<Instant>,
    /// Lockouts so far: the next one lasts `base × 2^rounds`.
    rounds: u32,
    locked_until: Option<Instant>,
}

/// The lockout's settings and its records. Cheap to clone.
#[derive(Clone)]
pub struct Logins {
    commands: Commands,
    /// 0 turns the lockout off.
    max_failures: u32,
    /// The first lockout's length, and the window failures are counted in.
    base: Duration,
    records: Cache<String, Failures>,
}

impl Logins {
    pub fn new(commands: Commands, max_failures: u32, base: Duration) -> Logins {
        Logins {
            commands,
            max_failures,
            base,
            records: Cache::builder()
                .max_capacity(TRACKED)
                .time_to_idle(LONGEST_LOCKOUT)
                .build(),
        }
    }

    /// The account with this email and password, unless the account is locked
    /// out or either is wrong.
    pub async fn login(&self, email: &str, password: String) -> Result<User, LoginError> {
        let key = normalize_email(email);
        if self.max_failures == 0 {
            return self
                .commands
                .authenticate(email, password)
                .await?
                .ok_or(LoginError::BadCredentials);
        }
        let now = Instant::now();
        if let Some(until) = self.records.get(&key).and_then(|r| r.locked_until)
            && until > now
        {
            metrics::counter!("rate_limited_total", "limit" => "login lockout").increment(1);
            return Err(LoginError::LockedOut {
                retry_after: until - now,
            });
        }
        match self.commands.authenticate(email, password).await? {
            Some(user) => {
                self.records.invalidate(&key);
                Ok(user)
            }
            None => {
                self.failed(key, Instant::now());
                Err(LoginError::BadCredentials)
            }
        }
    }

    fn failed(&self, key: String, at: Instant) {
        let mut record = self.records.get(&key).unwrap_or_default();
        record.recent.retain(|t| at.duration_since(*t) < self.base);
        record.recent.push(at);
        if record.recent.len() >= self.max_failures as usize {
            let lockout = self
                .base
                .saturating_mul(2u32.saturating_pow(record.rounds))
                .min(LONGEST_LOCKOUT);
            record.rounds += 1;
            record.locked_until = Some(at + lockout);
            record.recent.clear();
            metrics::counter!("login_lockouts_total").increment(1);
            tracing::warn!(
                rounds = record.rounds,
                seconds = lockout.as_secs(),
                "an account was locked out after repeated failed logins"
            );
        }
        self.records.insert(key, record);
    }
}
