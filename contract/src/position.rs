//! A place in commit order: the store's reads, the relay's and the projections'
//! checkpoints, cache stamps and consistency tokens all speak of this one type.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Where an event sits in commit order: its transaction, then its identity.
///
/// Identity values alone are not commit order (a transaction can take a lower
/// identity and commit later); readers of the whole log use this pair. On the
/// wire (an envelope's `previous`) it is an object of the two fields.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    pub transaction_id: i64,
    pub global_position: i64,
}

impl Position {
    /// Before the first event.
    pub const START: Position = Position {
        transaction_id: 0,
        global_position: 0,
    };
}

/// `<transaction_id>.<global_position>`: the `X-Consistency-Token` form, and
/// how logs and checkpoint notifications write a position.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.transaction_id, self.global_position)
    }
}

impl FromStr for Position {
    type Err = InvalidPosition;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tx, gp) = s.split_once('.').ok_or(InvalidPosition)?;
        let position = Position {
            transaction_id: tx.parse().map_err(|_| InvalidPosition)?,
            global_position: gp.parse().map_err(|_| InvalidPosition)?,
        };
        if position.transaction_id < 0 || position.global_position < 0 {
            return Err(InvalidPosition);
        }
        Ok(position)
    }
}

/// Text that is not `<transaction_id>.<global_position>` of two non-negative
/// integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidPosition;

impl fmt::Display for InvalidPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a consistency token")
    }
}

impl std::error::Error for InvalidPosition {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_as_the_position_it_was_written_from() {
        let p = Position {
            transaction_id: 734,
            global_position: 4,
        };
        assert_eq!(p.to_string(), "734.4");
        assert_eq!("734.4".parse(), Ok(p));
    }

    #[test]
    fn malformed_or_negative_tokens_are_refused() {
        for token in [
            "", "7", "7.", ".4", "a.4", "7.b", "-1.4", "7.-4", "7.4.1", "7,4",
        ] {
            assert_eq!(token.parse::<Position>(), Err(InvalidPosition), "{token:?}");
        }
    }

    #[test]
    fn on_the_wire_a_position_is_an_object_of_its_two_fields() {
        let p = Position {
            transaction_id: 9,
            global_position: 3,
        };
        let json = serde_json::to_value(p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"transaction_id": 9, "global_position": 3})
        );
        assert_eq!(serde_json::from_value::<Position>(json).unwrap(), p);
    }

    #[test]
    fn commit_order_is_the_transaction_first() {
        let a = Position {
            transaction_id: 1,
            global_position: 9,
        };
        let b = Position {
            transaction_id: 2,
            global_position: 1,
        };
        assert!(a < b && Position::START < a);
    }
}
