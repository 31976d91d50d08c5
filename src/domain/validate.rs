//! Field rules shared by the deciders, collected so one refusal lists every problem.

use std::collections::BTreeMap;

use serde::Serialize;

/// One broken rule, addressed by a JSON pointer into the request body (RFC 6901).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"pointer": "/name", "detail": "must be between 1 and 100 characters (got 0)"}))]
pub struct FieldError {
    /// Where: `/name`, `/metadata/team`; an empty string is the whole body.
    pub pointer: String,
    pub detail: String,
}

/// Collects field errors; `finish` refuses the command if any were found.
#[derive(Debug, Default)]
pub(crate) struct Violations(Vec<FieldError>);

impl Violations {
    pub fn add(&mut self, pointer: &str, detail: impl Into<String>) {
        self.0.push(FieldError {
            pointer: pointer.to_owned(),
            detail: detail.into(),
        });
    }

    /// Length in characters (not bytes), inclusive bounds.
    pub fn chars(&mut self, pointer: &str, value: &str, min: usize, max: usize) {
        let n = value.chars().count();
        if n < min || n > max {
            let detail = if min == 0 {
                format!("must be at most {max} characters (got {n})")
            } else {
                format!("must be between {min} and {max} characters (got {n})")
            };
            self.add(pointer, detail);
        }
    }

    /// A name or title: one line, so no tab or line break (other control
    /// characters never get this far: the HTTP layer refuses them everywhere).
    pub fn single_line(&mut self, pointer: &str, value: &str) {
        if value.contains(['\t', '\n', '\r']) {
            self.add(pointer, "must be one line: no tabs or line breaks");
        }
    }

    /// Text that must have something besides whitespace.
    pub fn not_blank(&mut self, pointer: &str, value: &str) {
        if !value.is_empty() && value.trim().is_empty() {
            self.add(pointer, "must not be blank");
        }
    }

    pub fn temperature(&mut self, pointer: &str, value: f64) {
        if !(0.0..=2.0).contains(&value) {
            self.add(pointer, "must be between 0 and 2");
        }
    }

    pub fn model(&mut self, pointer: &str, value: &str) {
        let ok = !value.is_empty()
            && value.len() <= 100
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/'));
        if !ok {
            self.add(
                pointer,
                "must be 1 to 100 characters of letters, digits, '-', '.', '_' or '/'",
            );
        }
    }

    /// OpenAI-style metadata: at most 16 string pairs, keys ≤ 64 and values ≤ 512 chars.
    pub fn metadata(&mut self, pointer: &str, value: &BTreeMap<String, String>) {
        if value.len() > METADATA_MAX_PAIRS {
            self.add(
                pointer,
                format!(
                    "must have at most {METADATA_MAX_PAIRS} pairs (got {})",
                    value.len()
                ),
            );
        }
        for (k, v) in value {
            let at = format!("{pointer}/{}", escape_pointer(k));
            if k.is_empty() || k.chars().count() > 64 {
                self.add(&at, "keys must be between 1 and 64 characters");
            }
            if v.chars().count() > 512 {
                self.add(&at, "values must be at most 512 characters");
            }
        }
    }

    /// Every broken rule, or nothing; each decider wraps them in its own error.
    pub fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

pub const METADATA_MAX_PAIRS: usize = 16;

/// RFC 6901: `~` → `~0`, `/` → `~1`.
fn escape_pointer(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}
