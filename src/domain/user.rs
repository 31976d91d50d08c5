//! A user account: registration, and being forgotten. The password arrives already hashed (hashing
//! needs randomness); what the rules need to know of it (its length, how easily
//! it is guessed) was learned from the plaintext before, by [`assess_password`],
//! and travels beside the hash so the rules stay here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Decider, DomainError, ErrorKind, FieldError, validate::Violations};

pub const PASSWORD_MIN_CHARS: usize = 8;
pub const PASSWORD_MAX_CHARS: usize = 128;
/// The least zxcvbn score a password may have: 2 is "somewhat guessable"
/// (about 10^6 to 10^8 guesses); 0 and 1 are the common passwords, keyboard
/// walks, dictionary words and variations on the user's own email or name.
pub const PASSWORD_MIN_STRENGTH: u8 = 2;

/// A new password as the domain sees it: what was learned of it before it was
/// hashed, and its PHC hash.
#[derive(Debug, Clone)]
pub struct NewPassword {
    pub chars: usize,
    /// zxcvbn's score, 0 (too guessable) to 4 (very unguessable).
    pub strength: u8,
    pub hash: String,
}

/// What the rules need to know of a password, from its plaintext: its length
/// and how easily it is guessed, against common passwords, dictionaries,
/// patterns and the account's own `related` words (email, name). Pure, and
/// cheap enough to run before the (expensive) hash.
pub fn assess_password(password: &str, related: &[&str]) -> (usize, u8) {
    let chars = password.chars().count();
    // zxcvbn's cost grows with length; past 100 characters nothing is guessable.
    let head: String = password.chars().take(100).collect();
    let strength = if head.is_empty() {
        0
    } else {
        zxcvbn::zxcvbn(&head, related).score() as u8
    };
    (chars, strength)
}

#[derive(Debug, Clone)]
pub enum UserCommand {
    Register {
        user_id: Uuid,
        email: String,
        display_name: String,
        password: NewPassword,
        at: DateTime<Utc>,
    },
    /// Erase the account ("forget me"): from then on it does not exist. Its
    /// personal data is made unreadable by destroying its key (the store does
    /// that with this event); the event itself carries none.
    Forget { at: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum UserEvent {
    UserRegistered {
        user_id: Uuid,
        /// Normalized: trimmed and lower-cased.
        email: String,
        display_name: String,
        password_hash: String,
        registered_at: DateTime<Utc>,
    },
    UserForgotten {
        user_id: Uuid,
        forgotten_at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum UserState {
    #[default]
    Unregistered,
    Registered(User),
    /// Erased: nothing of the account is kept but that it was (its id can never
    /// be registered again).
    Forgotten,
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub display_name: String,
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
}

/// The form an email is compared and stored in.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Why a user command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UserError {
    #[error("the request has invalid fields")]
    Invalid(Vec<FieldError>),
    #[error("user already registered")]
    AlreadyRegistered,
    #[error("no such user")]
    NotRegistered,
}

impl DomainError for UserError {
    fn kind(&self) -> ErrorKind {
        match self {
            UserError::Invalid(_) => ErrorKind::Invalid,
            UserError::AlreadyRegistered => ErrorKind::Conflict,
            UserError::NotRegistered => ErrorKind::NotFound,
        }
    }

    fn field_errors(&self) -> &[FieldError] {
        match self {
            UserError::Invalid(errors) => errors,
            UserError::AlreadyRegistered | UserError::NotRegistered => &[],
        }
    }
}

pub struct UserDecider;

impl Decider for UserDecider {
    type Command = UserCommand;
    type Event = UserEvent;
    type State = UserState;
    type Error = UserError;
    const STREAM_TYPE: &'static str = ai_secretary_contract::USER;

    fn decide(command: &UserCommand, state: &UserState) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::Register {
                user_id,
                email,
                display_name,
                password,
                at,
            } => {
                if !matches!(state, UserState::Unregistered) {
                    return Err(UserError::AlreadyRegistered);
                }
                let email = normalize_email(email);
                let display_name = display_name.trim().to_owned();
                let mut v = Violations::default();
                if !is_plausible_email(&email) {
                    v.add("/email", "must be a valid email address");
                }
                v.chars("/display_name", &display_name, 1, 100);
                v.single_line("/display_name", &display_name);
                if !(PASSWORD_MIN_CHARS..=PASSWORD_MAX_CHARS).contains(&password.chars) {
                    v.add(
                        "/password",
                        format!(
                            "must be between {PASSWORD_MIN_CHARS} and {PASSWORD_MAX_CHARS} characters"
                        ),
                    );
                } else if password.strength < PASSWORD_MIN_STRENGTH {
                    v.add(
                        "/password",
                        "is too easy to guess (a common password, a word or pattern, or your \
                         email or name): use a longer phrase of unrelated words",
                    );
                }
                v.finish().map_err(UserError::Invalid)?;
                Ok(vec![UserEvent::UserRegistered {
                    user_id: *user_id,
                    email,
                    display_name,
                    password_hash: password.hash.clone(),
                    registered_at: *at,
                }])
            }
            UserCommand::Forget { at } => match state {
                UserState::Registered(user) => Ok(vec![UserEvent::UserForgotten {
                    user_id: user.id,
                    forgotten_at: *at,
                }]),
                // Forgetting twice changes nothing.
                UserState::Forgotten => Ok(vec![]),
                UserState::Unregistered => Err(UserError::NotRegistered),
            },
        }
    }

    fn evolve(_state: UserState, event: &UserEvent) -> UserState {
        match event {
            UserEvent::UserRegistered {
                user_id,
                email,
                display_name,
                password_hash,
                registered_at,
            } => UserState::Registered(User {
                id: *user_id,
                email: email.clone(),
                display_name: display_name.clone(),
                password_hash: password_hash.clone(),
                created_at: *registered_at,
            }),
            UserEvent::UserForgotten { .. } => UserState::Forgotten,
        }
    }
}

/// Deliberately loose (RFC 5322 is not worth parsing): one `@`, a non-empty local
/// part, a dotted domain, no spaces, at most 254 characters.
fn is_plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::given_when;

    fn at() -> DateTime<Utc> {
        "2026-01-02T03:04:05Z".parse().unwrap()
    }

    fn register(email: &str, name: &str, password_chars: usize) -> UserCommand {
        UserCommand::Register {
            user_id: Uuid::nil(),
            email: email.into(),
            display_name: name.into(),
            password: NewPassword {
                chars: password_chars,
                strength: 4,
                hash: "$argon2id$stub".into(),
            },
            at: at(),
        }
    }

    #[test]
    fn a_guessable_password_is_refused() {
        for password in [
            "password",
            "12345678",
            "qwertyuiop",
            "ada@example.com",
            "Ada12345",
        ] {
            let (chars, strength) = assess_password(password, &["ada@example.com", "Ada"]);
            let mut command = register("ada@example.com", "Ada", chars);
            if let UserCommand::Register { password: p, .. } = &mut command {
                p.strength = strength;
            }
            let err = given_when::<UserDecider>(&[], &command).unwrap_err();
            assert_eq!(err.field_errors()[0].pointer, "/password", "{password}");
        }
        let (_, strength) = assess_password("correct horse battery", &["ada@example.com"]);
        assert!(strength >= PASSWORD_MIN_STRENGTH);
    }

    #[test]
    fn registering_normalizes_the_email() {
        let events =
            given_when::<UserDecider>(&[], &register("  Ada@Example.COM ", " Ada ", 12)).unwrap();
        assert_eq!(
            events,
            vec![UserEvent::UserRegistered {
                user_id: Uuid::nil(),
                email: "ada@example.com".into(),
                display_name: "Ada".into(),
                password_hash: "$argon2id$stub".into(),
                registered_at: at(),
            }]
        );
    }

    #[test]
    fn every_invalid_field_is_reported() {
        let err = given_when::<UserDecider>(&[], &register("not-an-email", "", 3)).unwrap_err();
        let UserError::Invalid(errors) = err else {
            panic!("expected a validation error, got {err:?}")
        };
        let pointers: Vec<_> = errors.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(pointers, ["/email", "/display_name", "/password"]);
    }

    #[test]
    fn registering_twice_conflicts() {
        let given = given_when::<UserDecider>(&[], &register("a@b.co", "A", 8)).unwrap();
        let err = given_when::<UserDecider>(&given, &register("a@b.co", "A", 8)).unwrap_err();
        assert_eq!(err, UserError::AlreadyRegistered);
    }

    #[test]
    fn a_forgotten_account_is_gone_for_good_and_forgetting_twice_changes_nothing() {
        let registered = given_when::<UserDecider>(&[], &register("a@b.co", "A", 12)).unwrap();
        let forget = UserCommand::Forget { at: at() };
        let forgotten = given_when::<UserDecider>(&registered, &forget).unwrap();
        assert_eq!(
            forgotten,
            [UserEvent::UserForgotten {
                user_id: Uuid::nil(),
                forgotten_at: at(),
            }]
        );
        let history = [registered, forgotten].concat();
        assert_eq!(given_when::<UserDecider>(&history, &forget).unwrap(), []);
        // Its id is never registered again (the email is: under a new id).
        assert_eq!(
            given_when::<UserDecider>(&history, &register("a@b.co", "A", 12)).unwrap_err(),
            UserError::AlreadyRegistered
        );
        assert_eq!(
            given_when::<UserDecider>(&[], &forget).unwrap_err(),
            UserError::NotRegistered
        );
    }

    #[test]
    fn email_plausibility() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(is_plausible_email(ok), "{ok}");
        }
        for bad in [
            "", "a@", "@b.co", "a@b", "a b@c.de", "a@b@c.de", "a@.com", "a@com.",
        ] {
            assert!(!is_plausible_email(bad), "{bad}");
        }
    }
}
