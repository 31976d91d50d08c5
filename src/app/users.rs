//! Accounts: registration claims the email, signing in finds the account by it,
//! and an administrator is an account whose registered email is listed.

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
        let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
            .await
            .map_err(|e| AppError::Internal(e.into()))?
            .map_err(AppError::Internal)?;
        let UserCommand::Register { password, .. } = &mut command;
        password.hash = hash;
        self.register_command(command, context, remember).await
    }

    /// Register `command` (a [`UserCommand::Register`]), claiming its email.
    async fn register_command(
        &self,
        command: UserCommand,
        context: &CommandContext,
        remember: Option<Remember<'_, UserState>>,
    ) -> Result<Decided<UserState>, AppError<UserError>> {
        let UserCommand::Register { user_id, email, .. } = &command;
        let reservation = Reservation {
            scope: EMAIL_SCOPE,
            value: normalize_email(email),
        };
        self.execute::<UserDecider>(
            *user_id,
            Expected::New,
            &command,
            context,
            Some(reservation),
            remember,
        )
        .await
    }

    /// The account with this email and password, if both are right. An unknown
    /// email costs the same argon2 time as a wrong password, so timing tells
    /// nothing about who has an account.
    pub async fn authenticate(
        &self,
        email: &str,
        password: String,
    ) -> Result<Option<User>, ReadError> {
        let user = match self
            .store
            .find_reservation(EMAIL_SCOPE, &normalize_email(email))
            .await?
        {
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

    /// A registered user, as their own stream knows them.
    pub async fn user(&self, user_id: Uuid) -> Result<Option<User>, ReadError> {
        Ok(match self.load::<UserDecider>(user_id).await?.state {
            UserState::Registered(user) => Some(user),
            UserState::Unregistered => None,
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
