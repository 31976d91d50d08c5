//! The one place where domain events become stored payloads and back.
//!
//! A domain event serializes as `{"type": "AssistantCreated", ...fields}`; the
//! store keeps `type` in `event_type` and the rest in `data`, with the schema
//! version it was written in. Reading goes through [`upcast`] first, so an old
//! payload is brought to today's shape before serde sees it. Personal fields are
//! sealed and opened around it, by the sealing store (`super::sealed`): the
//! codec only ever sees plaintext.

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{EventMetadata, NewEvent, RecordedEvent, StoredPayload};

/// The schema version every event is written in today.
pub const SCHEMA_VERSION: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("event {event_type} v{schema_version} does not decode: {source}")]
    Decode {
        event_type: String,
        schema_version: i32,
        source: serde_json::Error,
    },
    #[error("event does not encode as a tagged JSON object")]
    Encode,
}

/// Turn a domain event into a row to append.
pub fn encode<E: Serialize>(event: &E, metadata: &EventMetadata) -> Result<NewEvent, CodecError> {
    let Ok(Value::Object(mut data)) = serde_json::to_value(event) else {
        return Err(CodecError::Encode);
    };
    let Some(Value::String(event_type)) = data.remove("type") else {
        return Err(CodecError::Encode);
    };
    Ok(NewEvent {
        event_id: Uuid::now_v7(),
        event_type,
        schema_version: SCHEMA_VERSION,
        data: Value::Object(data),
        metadata: serde_json::to_value(metadata).map_err(|_| CodecError::Encode)?,
    })
}

/// Turn a stored row back into a domain event.
pub fn decode<E: DeserializeOwned>(recorded: &RecordedEvent) -> Result<E, CodecError> {
    decode_parts(
        &recorded.event_type,
        recorded.schema_version,
        recorded.data.clone(),
    )
}

/// [`decode`], taking the row: its payload is moved into the event instead of
/// copied (what a fold of thousands of events wants).
pub fn decode_owned<E: DeserializeOwned>(recorded: RecordedEvent) -> Result<E, CodecError> {
    decode_parts(&recorded.event_type, recorded.schema_version, recorded.data)
}

/// [`decode`] from a payload's JSON text, as a fold reads it. Today's shape is
/// parsed once, straight into the event (the `type` tag spliced in front of
/// the payload's fields); an older schema version goes through [`upcast`].
pub fn decode_payload<E: DeserializeOwned>(payload: &StoredPayload) -> Result<E, CodecError> {
    let error = |source| CodecError::Decode {
        event_type: payload.event_type.clone(),
        schema_version: payload.schema_version,
        source,
    };
    if payload.schema_version != SCHEMA_VERSION {
        let data = serde_json::from_str(&payload.data).map_err(error)?;
        return decode_parts(&payload.event_type, payload.schema_version, data);
    }
    let tag = serde_json::to_string(&payload.event_type).map_err(error)?;
    let fields = payload.data.trim_start().strip_prefix('{').unwrap_or("}");
    let tagged = if fields.trim_start().starts_with('}') {
        format!("{{\"type\":{tag}}}")
    } else {
        format!("{{\"type\":{tag},{fields}")
    };
    serde_json::from_str(&tagged).map_err(error)
}

fn decode_parts<E: DeserializeOwned>(
    event_type: &str,
    schema_version: i32,
    data: Value,
) -> Result<E, CodecError> {
    let mut data = match upcast(event_type, schema_version, data) {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    data.insert("type".into(), Value::String(event_type.to_owned()));
    serde_json::from_value(Value::Object(data)).map_err(|source| CodecError::Decode {
        event_type: event_type.to_owned(),
        schema_version,
        source,
    })
}

/// Bring a payload written in an older schema version to the current one.
/// Every event is still at version 1, so there is nothing to do yet; a change of
/// shape adds a `(event_type, version)` arm here rather than touching the domain.
fn upcast(_event_type: &str, _schema_version: i32, data: Value) -> Value {
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::conversation::ConversationEvent;
    use crate::store::Position;

    #[test]
    fn round_trip_keeps_the_event_and_splits_its_type() {
        let event = ConversationEvent::ConversationRenamed {
            title: "Trip".into(),
            renamed_at: "2026-01-01T00:00:00Z".parse().unwrap(),
        };
        let meta = EventMetadata {
            correlation_id: "c-1".into(),
            ..Default::default()
        };
        let new = encode(&event, &meta).unwrap();
        assert_eq!(new.event_type, "ConversationRenamed");
        assert!(new.data.get("type").is_none());
        assert_eq!(new.metadata["correlation_id"], "c-1");
        let recorded = RecordedEvent {
            position: Position::START,
            event_id: new.event_id,
            stream_id: Uuid::nil(),
            stream_type: "conversation".into(),
            version: 1,
            event_type: new.event_type,
            schema_version: new.schema_version,
            data: new.data,
            metadata: new.metadata,
            recorded_at: Default::default(),
        };
        assert_eq!(decode::<ConversationEvent>(&recorded).unwrap(), event);
        let payload = StoredPayload {
            event_id: recorded.event_id,
            version: 1,
            stream_type: "conversation".into(),
            position: Position::START,
            event_type: recorded.event_type.clone(),
            schema_version: SCHEMA_VERSION,
            data: recorded.data.to_string(),
        };
        assert_eq!(
            decode_payload::<ConversationEvent>(&payload).unwrap(),
            event
        );
    }

    #[test]
    fn a_payload_without_fields_or_of_the_wrong_shape_decodes_or_fails_cleanly() {
        use crate::domain::user::UserEvent;
        let payload = |event_type: &str, data: &str| StoredPayload {
            event_id: Uuid::nil(),
            version: 1,
            stream_type: "user".into(),
            position: Position::START,
            event_type: event_type.into(),
            schema_version: SCHEMA_VERSION,
            data: data.into(),
        };
        assert!(decode_payload::<UserEvent>(&payload("UserRegistered", "{}")).is_err());
        assert!(decode_payload::<UserEvent>(&payload("UserRegistered", "[1]")).is_err());
        assert!(matches!(
            decode_payload::<ConversationEvent>(&payload("Nope", "{ }")),
            Err(CodecError::Decode { event_type, .. }) if event_type == "Nope"
        ));
    }
}
