//! An AI secretary: its name, role, instructions and model settings, and its
//! lifecycle (active ⇄ archived → deleted). Only its owner may see or change it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Decider, DomainError, ErrorKind, FieldError, validate::Violations};

pub const DEFAULT_ROLE: &str = "secretary";
pub const DEFAULT_MODEL: &str = "gemini-2.5-flash";
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
pub const INSTRUCTIONS_MAX_CHARS: usize = 20_000;

pub type Metadata = BTreeMap<String, String>;

/// Settings as a request gives them: absent fields take defaults (create) or stay
/// as they are (update).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AssistantFields {
    pub name: Option<String>,
    pub role: Option<String>,
    pub instructions: Option<String>,
    pub model: Option<String>,
    pub temperature: Option<f64>,
    pub metadata: Option<Metadata>,
}

#[derive(Debug, Clone)]
pub enum AssistantCommand {
    Create {
        assistant_id: Uuid,
        owner_id: Uuid,
        fields: AssistantFields,
        at: DateTime<Utc>,
    },
    Update {
        actor: Uuid,
        fields: AssistantFields,
        at: DateTime<Utc>,
    },
    Archive {
        actor: Uuid,
        at: DateTime<Utc>,
    },
    Restore {
        actor: Uuid,
        at: DateTime<Utc>,
    },
    Delete {
        actor: Uuid,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AssistantEvent {
    AssistantCreated {
        assistant_id: Uuid,
        owner_id: Uuid,
        name: String,
        role: String,
        instructions: String,
        model: String,
        temperature: f64,
        metadata: Metadata,
        created_at: DateTime<Utc>,
    },
    /// Carries only the fields that changed.
    AssistantUpdated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instructions: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        temperature: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Metadata>,
        updated_at: DateTime<Utc>,
    },
    AssistantArchived {
        archived_at: DateTime<Utc>,
    },
    AssistantRestored {
        restored_at: DateTime<Utc>,
    },
    AssistantDeleted {
        deleted_at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AssistantStatus {
    Active,
    Archived,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum AssistantState {
    #[default]
    Absent,
    Live(Assistant),
    Deleted {
        owner_id: Uuid,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Assistant {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub role: String,
    pub instructions: String,
    pub model: String,
    pub temperature: f64,
    pub metadata: Metadata,
    pub status: AssistantStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl AssistantState {
    /// The assistant if it exists, is not deleted, and belongs to `actor`.
    pub fn owned_by(&self, actor: Uuid) -> Result<&Assistant, AssistantError> {
        match self {
            AssistantState::Live(a) if a.owner_id == actor => Ok(a),
            _ => Err(AssistantError::NotFound),
        }
    }
}

/// Why an assistant command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AssistantError {
    #[error("the request has invalid fields")]
    Invalid(Vec<FieldError>),
    /// Absent, deleted, or someone else's: the same answer for all three.
    #[error("assistant not found")]
    NotFound,
    #[error("assistant already exists")]
    AlreadyExists,
}

impl DomainError for AssistantError {
    fn kind(&self) -> ErrorKind {
        match self {
            AssistantError::Invalid(_) => ErrorKind::Invalid,
            AssistantError::NotFound => ErrorKind::NotFound,
            AssistantError::AlreadyExists => ErrorKind::Conflict,
        }
    }

    fn field_errors(&self) -> &[FieldError] {
        match self {
            AssistantError::Invalid(errors) => errors,
            _ => &[],
        }
    }
}

pub struct AssistantDecider;

impl Decider for AssistantDecider {
    type Command = AssistantCommand;
    type Event = AssistantEvent;
    type State = AssistantState;
    type Error = AssistantError;
    const STREAM_TYPE: &'static str = ai_secretary_contract::ASSISTANT;

    fn decide(
        command: &AssistantCommand,
        state: &AssistantState,
    ) -> Result<Vec<AssistantEvent>, AssistantError> {
        use AssistantCommand as C;
        use AssistantEvent as E;
        match command {
            C::Create {
                assistant_id,
                owner_id,
                fields,
                at,
            } => {
                if !matches!(state, AssistantState::Absent) {
                    return Err(AssistantError::AlreadyExists);
                }
                let name = fields.name.as_deref().unwrap_or_default().trim().to_owned();
                let role = fields.role.as_deref().unwrap_or(DEFAULT_ROLE).trim();
                let instructions = fields.instructions.clone().unwrap_or_default();
                let model = fields.model.as_deref().unwrap_or(DEFAULT_MODEL);
                let temperature = fields.temperature.unwrap_or(DEFAULT_TEMPERATURE);
                let metadata = fields.metadata.clone().unwrap_or_default();
                let mut v = Violations::default();
                v.chars("/name", &name, 1, 100);
                v.single_line("/name", &name);
                v.chars("/role", role, 0, 100);
                v.single_line("/role", role);
                v.chars("/instructions", &instructions, 0, INSTRUCTIONS_MAX_CHARS);
                v.model("/model", model);
                v.temperature("/temperature", temperature);
                v.metadata("/metadata", &metadata);
                v.finish().map_err(AssistantError::Invalid)?;
                Ok(vec![E::AssistantCreated {
                    assistant_id: *assistant_id,
                    owner_id: *owner_id,
                    name,
                    role: role.to_owned(),
                    instructions,
                    model: model.to_owned(),
                    temperature,
                    metadata,
                    created_at: *at,
                }])
            }
            C::Update { actor, fields, at } => {
                let current = state.owned_by(*actor)?;
                let mut v = Violations::default();
                let name = fields.name.as_deref().map(str::trim);
                let role = fields.role.as_deref().map(str::trim);
                if let Some(name) = name {
                    v.chars("/name", name, 1, 100);
                    v.single_line("/name", name);
                }
                if let Some(role) = role {
                    v.chars("/role", role, 0, 100);
                    v.single_line("/role", role);
                }
                if let Some(instructions) = &fields.instructions {
                    v.chars("/instructions", instructions, 0, INSTRUCTIONS_MAX_CHARS);
                }
                if let Some(model) = &fields.model {
                    v.model("/model", model);
                }
                if let Some(t) = fields.temperature {
                    v.temperature("/temperature", t);
                }
                if let Some(m) = &fields.metadata {
                    v.metadata("/metadata", m);
                }
                v.finish().map_err(AssistantError::Invalid)?;
                // Only what differs from the current settings becomes part of the fact.
                fn changed<T: PartialEq + ?Sized + ToOwned>(
                    new: Option<&T>,
                    old: &T,
                ) -> Option<T::Owned> {
                    new.filter(|n| *n != old).map(ToOwned::to_owned)
                }
                let name = changed(name, current.name.as_str());
                let role = changed(role, current.role.as_str());
                let instructions = changed(
                    fields.instructions.as_deref(),
                    current.instructions.as_str(),
                );
                let model = changed(fields.model.as_deref(), current.model.as_str());
                let temperature = fields.temperature.filter(|t| *t != current.temperature);
                let metadata = changed(fields.metadata.as_ref(), &current.metadata);
                let nothing_changed = name.is_none()
                    && role.is_none()
                    && instructions.is_none()
                    && model.is_none()
                    && temperature.is_none()
                    && metadata.is_none();
                if nothing_changed {
                    return Ok(vec![]);
                }
                Ok(vec![E::AssistantUpdated {
                    name,
                    role,
                    instructions,
                    model,
                    temperature,
                    metadata,
                    updated_at: *at,
                }])
            }
            // Archiving what is archived (or restoring what is active) changes nothing
            // and is not an error: the user's intent already holds.
            C::Archive { actor, at } => Ok(match state.owned_by(*actor)?.status {
                AssistantStatus::Archived => vec![],
                AssistantStatus::Active => vec![E::AssistantArchived { archived_at: *at }],
            }),
            C::Restore { actor, at } => Ok(match state.owned_by(*actor)?.status {
                AssistantStatus::Active => vec![],
                AssistantStatus::Archived => vec![E::AssistantRestored { restored_at: *at }],
            }),
            C::Delete { actor, at } => {
                state.owned_by(*actor)?;
                Ok(vec![E::AssistantDeleted { deleted_at: *at }])
            }
        }
    }

    fn evolve(state: AssistantState, event: &AssistantEvent) -> AssistantState {
        use AssistantEvent as E;
        match (state, event) {
            (
                _,
                E::AssistantCreated {
                    assistant_id,
                    owner_id,
                    name,
                    role,
                    instructions,
                    model,
                    temperature,
                    metadata,
                    created_at,
                },
            ) => AssistantState::Live(Assistant {
                id: *assistant_id,
                owner_id: *owner_id,
                name: name.clone(),
                role: role.clone(),
                instructions: instructions.clone(),
                model: model.clone(),
                temperature: *temperature,
                metadata: metadata.clone(),
                status: AssistantStatus::Active,
                created_at: *created_at,
                updated_at: *created_at,
            }),
            (
                AssistantState::Live(mut a),
                E::AssistantUpdated {
                    name,
                    role,
                    instructions,
                    model,
                    temperature,
                    metadata,
                    updated_at,
                },
            ) => {
                fn apply<T: Clone>(field: &mut T, new: &Option<T>) {
                    if let Some(new) = new {
                        field.clone_from(new);
                    }
                }
                apply(&mut a.name, name);
                apply(&mut a.role, role);
                apply(&mut a.instructions, instructions);
                apply(&mut a.model, model);
                apply(&mut a.temperature, temperature);
                apply(&mut a.metadata, metadata);
                a.updated_at = *updated_at;
                AssistantState::Live(a)
            }
            (AssistantState::Live(mut a), E::AssistantArchived { archived_at: at })
            | (AssistantState::Live(mut a), E::AssistantRestored { restored_at: at }) => {
                a.status = if matches!(event, E::AssistantArchived { .. }) {
                    AssistantStatus::Archived
                } else {
                    AssistantStatus::Active
                };
                a.updated_at = *at;
                AssistantState::Live(a)
            }
            (AssistantState::Live(a), E::AssistantDeleted { .. }) => AssistantState::Deleted {
                owner_id: a.owner_id,
            },
            // A fact that does not fit the state cannot have been accepted by `decide`;
            // keep the state rather than invent one.
            (state, _) => state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::given_when;

    const OWNER: Uuid = Uuid::from_u128(1);
    const STRANGER: Uuid = Uuid::from_u128(2);
    const ID: Uuid = Uuid::from_u128(10);

    fn at() -> DateTime<Utc> {
        "2026-03-04T05:06:07Z".parse().unwrap()
    }

    fn created() -> AssistantEvent {
        AssistantEvent::AssistantCreated {
            assistant_id: ID,
            owner_id: OWNER,
            name: "Mika".into(),
            role: DEFAULT_ROLE.into(),
            instructions: String::new(),
            model: DEFAULT_MODEL.into(),
            temperature: DEFAULT_TEMPERATURE,
            metadata: Metadata::new(),
            created_at: at(),
        }
    }

    fn create(fields: AssistantFields) -> AssistantCommand {
        AssistantCommand::Create {
            assistant_id: ID,
            owner_id: OWNER,
            fields,
            at: at(),
        }
    }

    fn update(actor: Uuid, fields: AssistantFields) -> AssistantCommand {
        AssistantCommand::Update {
            actor,
            fields,
            at: at(),
        }
    }

    fn pointers(err: AssistantError) -> Vec<String> {
        match err {
            AssistantError::Invalid(e) => e.into_iter().map(|e| e.pointer).collect(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn create_fills_defaults() {
        let fields = AssistantFields {
            name: Some(" Mika ".into()),
            ..Default::default()
        };
        assert_eq!(
            given_when::<AssistantDecider>(&[], &create(fields)),
            Ok(vec![created()])
        );
    }

    #[test]
    fn create_validates_every_field() {
        let fields = AssistantFields {
            name: Some("x".repeat(101)),
            role: Some("r".repeat(101)),
            instructions: Some("i".repeat(INSTRUCTIONS_MAX_CHARS + 1)),
            model: Some("bad model!".into()),
            temperature: Some(2.5),
            metadata: Some((0..17).map(|i| (format!("k{i}"), "v".into())).collect()),
        };
        let err = given_when::<AssistantDecider>(&[], &create(fields)).unwrap_err();
        assert_eq!(
            pointers(err),
            [
                "/name",
                "/role",
                "/instructions",
                "/model",
                "/temperature",
                "/metadata"
            ]
        );
    }

    #[test]
    fn create_requires_a_name() {
        let err = given_when::<AssistantDecider>(&[], &create(AssistantFields::default()));
        assert_eq!(pointers(err.unwrap_err()), ["/name"]);
    }

    #[test]
    fn boundaries_are_inclusive() {
        let fields = AssistantFields {
            name: Some("x".repeat(100)),
            instructions: Some("i".repeat(INSTRUCTIONS_MAX_CHARS)),
            temperature: Some(2.0),
            metadata: Some((0..16).map(|i| (format!("k{i}"), "v".into())).collect()),
            ..Default::default()
        };
        assert!(given_when::<AssistantDecider>(&[], &create(fields)).is_ok());
    }

    #[test]
    fn update_records_only_what_changed() {
        let fields = AssistantFields {
            name: Some("Mika".into()),
            temperature: Some(0.2),
            ..Default::default()
        };
        let events = given_when::<AssistantDecider>(&[created()], &update(OWNER, fields)).unwrap();
        assert_eq!(
            events,
            vec![AssistantEvent::AssistantUpdated {
                name: None,
                role: None,
                instructions: None,
                model: None,
                temperature: Some(0.2),
                metadata: None,
                updated_at: at(),
            }]
        );
        let state = AssistantDecider::fold(&[created(), events[0].clone()]);
        let AssistantState::Live(a) = state else {
            panic!()
        };
        assert_eq!((a.name.as_str(), a.temperature), ("Mika", 0.2));
    }

    #[test]
    fn update_without_change_appends_nothing() {
        let fields = AssistantFields {
            name: Some("Mika".into()),
            ..Default::default()
        };
        assert_eq!(
            given_when::<AssistantDecider>(&[created()], &update(OWNER, fields)),
            Ok(vec![])
        );
    }

    #[test]
    fn a_strangers_assistant_is_not_found() {
        let err = given_when::<AssistantDecider>(
            &[created()],
            &AssistantCommand::Archive {
                actor: STRANGER,
                at: at(),
            },
        );
        assert_eq!(err, Err(AssistantError::NotFound));
    }

    #[test]
    fn a_deleted_assistant_cannot_be_updated() {
        let deleted = AssistantEvent::AssistantDeleted { deleted_at: at() };
        let fields = AssistantFields {
            name: Some("New".into()),
            ..Default::default()
        };
        assert_eq!(
            given_when::<AssistantDecider>(&[created(), deleted], &update(OWNER, fields)),
            Err(AssistantError::NotFound)
        );
    }

    #[test]
    fn archive_and_restore_are_idempotent() {
        let archive = AssistantCommand::Archive {
            actor: OWNER,
            at: at(),
        };
        let restore = AssistantCommand::Restore {
            actor: OWNER,
            at: at(),
        };
        let archived = AssistantEvent::AssistantArchived { archived_at: at() };
        assert_eq!(
            given_when::<AssistantDecider>(&[created()], &archive),
            Ok(vec![archived.clone()])
        );
        assert_eq!(
            given_when::<AssistantDecider>(&[created(), archived.clone()], &archive),
            Ok(vec![])
        );
        assert_eq!(
            given_when::<AssistantDecider>(&[created()], &restore),
            Ok(vec![])
        );
        assert_eq!(
            given_when::<AssistantDecider>(&[created(), archived], &restore),
            Ok(vec![AssistantEvent::AssistantRestored {
                restored_at: at()
            }])
        );
    }
}
