//! Accounts: registration claims the email, signing in finds the account by it,
//! an administrator is an account whose registered email is listed, and an
//! account can be forgotten.
//!
//! The email is claimed and looked up by its keyed hash (`Keyring::email_lookup`),
//! never in plaintext: the reservations table says nothing of who registered.

use uuid::Uuid;

use super::{AppError, CommandContext, Commands, Decided, Expected, ReadError, Remember};
use crate::{
    auth,
    domain::{
        Decider,
        user::{
            NewPassword, User, UserCommand, UserDecider, UserError, UserState, assess_password,
            normalize_email,
        },
    },
    store::Reservation,
};

/// The reservation that keeps one account per email.
pub const EMAIL_SCOPE: &str = "user_email";

/// A sign-up as it arrives: the password still in plaintext.
#[derive(Debug, Clone)]
pub struct Registration {
    pub user_id: Uuid,
    pub email: String,
    pub display_name: String,
    pub password: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

impl Commands {
    /// Register an account, claiming its email.
    ///
    /// Every rule is checked before the password is hashed (argon2 costs about
    /// 19 MiB and tens of milliseconds: an invalid request must not get to spend
    /// them): the decider is asked once with a placeholder hash, then again, for
    /// real, with the hash.
    pub async fn register(
        &self,
        registration: Registration,
        context: &CommandContext,
        remember: Option<Remember<'_, UserState>>,
    ) -> Result<Decided<UserState>, AppError<UserError>> {
        let Registration {
            user_id,
            email,
            display_name,
            password,
            at,
        } = registration;
        let (chars, strength) = assess_password(&password, &[&email, &display_name]);
        let normalized = normalize_email(&email);
        let mut command = UserCommand::Register {
            user_id,
            email,
            display_name,
            password: NewPassword {
                chars,
                strength,
                hash: String::new(),
            },
            at,
        };
        UserDecider::decide(&command, &UserState::Unregistered).map_err(AppError::Domain)?;
        // An account registered before emails were hashed holds its email's
        // reservation in plaintext: it still counts.
        let legacy = self
            .store
            .find_reservation(EMAIL_SCOPE, &normalized)
            .await?;
        if legacy.is_some() {
            return Err(AppError::ReservationTaken { scope: EMAIL_SCOPE });
        }
        let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
            .await
            .map_err(|e| AppError::Internal(e.into()))?
            .map_err(AppError::Internal)?;
        if let UserCommand::Register { password, .. } = &mut command {
            password.hash = hash;
        }
        let reservation = Reservation {
            scope: EMAIL_SCOPE,
            value: self.keyring.email_lookup(&normalized),
        };
        // The new user's personal fields are sealed under their own key.
        let context = CommandContext {
            user_id: Some(user_id),
            ..context.clone()
        };
        self.execute::<UserDecider>(
            user_id,
            Expected::New,
            &command,
            &context,
            Some(reservation),
            remember,
        )
        .await
    }

    /// Forget an account: its key is destroyed (so everything of theirs in the
    /// events reads as forgotten), its email can register again, and every read
    /// model and cache drops what it holds of them when it meets the event.
    /// The caller has proved it is them (`DELETE /users/me`).
    pub async fn forget(
        &self,
        user_id: Uuid,
        at: chrono::DateTime<chrono::Utc>,
        context: &CommandContext,
    ) -> Result<Decided<UserState>, AppError<UserError>> {
        let forgotten = self
            .execute::<UserDecider>(
                user_id,
                Expected::Any,
                &UserCommand::Forget { at },
                context,
                None,
                None,
            )
            .await;
        // From now on this process opens nothing with their tokens.
        self.accounts.invalidate(&user_id);
        forgotten
    }

    /// The account with this email and password, if both are right. An unknown
    /// email costs the same argon2 time as a wrong password, so timing tells
    /// nothing about who has an account.
    pub async fn authenticate(
        &self,
        email: &str,
        password: String,
    ) -> Result<Option<User>, ReadError> {
        let email = normalize_email(email);
        let mut found = self
            .store
            .find_reservation(EMAIL_SCOPE, &self.keyring.email_lookup(&email))
            .await?;
        if found.is_none() {
            // Registered before emails were hashed.
            found = self.store.find_reservation(EMAIL_SCOPE, &email).await?;
        }
        let user = match found {
            Some(id) => self.user(id).await?,
            None => None,
        };
        let hash = user.as_ref().map_or_else(
            || auth::decoy_hash().to_owned(),
            |u| u.password_hash.clone(),
        );
        let verified = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        Ok(user.filter(|_| verified))
    }

    /// Whether `user_id` names an account that exists: what a signed-in
    /// request checks before anything else. The store is asked at most once per
    /// [`ACCOUNT_RECHECK`] for an account it said exists (every request asking
    /// cost a query each, most of what a cached read cost), and again at once
    /// after this process forgot it.
    pub async fn account_exists(&self, user_id: Uuid) -> Result<bool, ReadError> {
        if self.accounts.contains_key(&user_id) {
            return Ok(true);
        }
        let exists = self.user(user_id).await?.is_some();
        if exists {
            self.accounts.insert(user_id, ());
        }
        Ok(exists)
    }

    /// A registered user, as their own stream knows them.
    pub async fn user(&self, user_id: Uuid) -> Result<Option<User>, ReadError> {
        Ok(match self.load::<UserDecider>(user_id).await?.state {
            UserState::Registered(user) => Some(user),
            UserState::Unregistered | UserState::Forgotten => None,
        })
    }

    /// Whether `user_id` registered with one of `admin_emails` (normalized).
    pub async fn is_admin(
        &self,
        user_id: Uuid,
        admin_emails: &[String],
    ) -> Result<bool, ReadError> {
        if admin_emails.is_empty() {
            return Ok(false);
        }
        Ok(self
            .user(user_id)
            .await?
            .is_some_and(|u| admin_emails.contains(&u.email)))
    }
}

/// How long an account the store said exists is taken to exist without asking
/// again: how late, at most, another process sees that an account was
/// forgotten (this one sees it at once). Its tokens open nothing of the
/// forgotten data meanwhile: the account's key is gone with the event.
pub const ACCOUNT_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// Accounts remembered as existing, at most (one entry is a few dozen bytes).
const ACCOUNTS_REMEMBERED: u64 = 100_000;

/// The cache behind [`Commands::account_exists`].
pub(super) fn recently_seen_accounts() -> moka::sync::Cache<Uuid, ()> {
    moka::sync::Cache::builder()
        .max_capacity(ACCOUNTS_REMEMBERED)
        .time_to_live(ACCOUNT_RECHECK)
        .build()
}
