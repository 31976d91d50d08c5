//! What a model is asked: the assistant as a system instruction, and the
//! conversation so far as alternating user/model turns, within a budget.
//!
//! Built only from events up to the reply's request, so the same request always
//! gives the same prompt, whenever (and however often) it is answered.

use uuid::Uuid;

use crate::domain::{
    assistant::{Assistant, Metadata},
    conversation::ConversationEvent,
};

/// Metadata keys of an assistant that tune generation beyond `temperature`.
pub const TOP_P_KEY: &str = "top_p";
pub const MAX_OUTPUT_TOKENS_KEY: &str = "max_output_tokens";
/// Tokens the model may think before answering: `-1` lets it decide, `0` turns
/// thinking off (where the model allows it).
pub const THINKING_BUDGET_KEY: &str = "thinking_budget";
/// Gemini 3's coarser control: `minimal`, `low`, `medium` or `high`.
pub const THINKING_LEVEL_KEY: &str = "thinking_level";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Model,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

/// An assistant's thinking setting. The two are exclusive (Gemini refuses a
/// request with both); a level, when valid, wins over a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thinking {
    /// At most this many thinking tokens; `-1` is the model's choice, `0` none.
    Budget(i32),
    /// Gemini 3's thinking level, in the API's spelling (`LOW`…).
    Level(&'static str),
}

impl Thinking {
    /// From an assistant's metadata; an invalid value is ignored, as for `top_p`.
    fn from_metadata(metadata: &Metadata) -> Option<Thinking> {
        let level = metadata.get(THINKING_LEVEL_KEY).and_then(|v| {
            ["MINIMAL", "LOW", "MEDIUM", "HIGH"]
                .into_iter()
                .find(|l| l.eq_ignore_ascii_case(v.trim()))
        });
        let budget = metadata
            .get(THINKING_BUDGET_KEY)
            .and_then(|v| v.trim().parse::<i32>().ok())
            .filter(|b| *b >= -1);
        level.map(Thinking::Level).or(budget.map(Thinking::Budget))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub model: String,
    /// Who the assistant is: name, role and the owner's instructions.
    pub system: String,
    /// Oldest first; starts and ends with a user turn, roles alternate.
    pub turns: Vec<Turn>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    /// The longest answer, in tokens, thinking not included.
    pub max_output_tokens: Option<u32>,
    /// How much the model may think, when the assistant says; `None` leaves it
    /// to the provider's defaults.
    pub thinking: Option<Thinking>,
    /// The assistant's name and role, for providers that speak as it.
    pub assistant_name: String,
    pub assistant_role: String,
}

impl Prompt {
    /// The prompt for the reply to `reply_to`. `history` is the conversation's
    /// events before the reply was requested; turns are kept newest first until
    /// `budget_chars` is spent (the message being answered is always kept).
    pub fn build(
        assistant: &Assistant,
        history: &[ConversationEvent],
        reply_to: Uuid,
        budget_chars: usize,
    ) -> Prompt {
        let mut turns: Vec<Turn> = Vec::new();
        let mut answered = None;
        for event in history {
            match event {
                ConversationEvent::MessagePosted {
                    message_id,
                    content,
                    ..
                } => {
                    if *message_id == reply_to {
                        answered = Some(content.clone());
                        break;
                    }
                    turns.push(Turn {
                        role: Role::User,
                        text: content.clone(),
                    });
                }
                ConversationEvent::ReplyCompleted { content, .. } => turns.push(Turn {
                    role: Role::Model,
                    text: content.clone(),
                }),
                _ => {}
            }
        }
        let current = answered.unwrap_or_default();
        let mut spent = current.chars().count();
        let mut kept = Vec::new();
        for turn in turns.into_iter().rev() {
            spent += turn.text.chars().count();
            if spent > budget_chars {
                break;
            }
            kept.push(turn);
        }
        kept.reverse();
        kept.push(Turn {
            role: Role::User,
            text: current,
        });
        Prompt {
            model: assistant.model.clone(),
            system: system_instruction(assistant),
            turns: alternate(kept),
            temperature: assistant.temperature,
            top_p: assistant
                .metadata
                .get(TOP_P_KEY)
                .and_then(|v| v.parse().ok())
                .filter(|p: &f64| (0.0..=1.0).contains(p)),
            max_output_tokens: assistant
                .metadata
                .get(MAX_OUTPUT_TOKENS_KEY)
                .and_then(|v| v.parse().ok())
                .filter(|n: &u32| *n > 0),
            thinking: Thinking::from_metadata(&assistant.metadata),
            assistant_name: assistant.name.clone(),
            assistant_role: assistant.role.clone(),
        }
    }

    /// The message being answered.
    pub fn last_user_text(&self) -> &str {
        self.turns.last().map_or("", |t| t.text.as_str())
    }
}

fn system_instruction(assistant: &Assistant) -> String {
    let mut system = format!("You are {}, a {}.", assistant.name, assistant.role);
    if !assistant.instructions.trim().is_empty() {
        system.push('\n');
        system.push_str(assistant.instructions.trim());
    }
    system
}

/// Models want user and model turns to alternate, starting with the user: a
/// failed reply leaves two user turns in a row, a budget cut may leave a model
/// turn first. Merge the first, drop the second.
fn alternate(turns: Vec<Turn>) -> Vec<Turn> {
    let mut out: Vec<Turn> = Vec::with_capacity(turns.len());
    for turn in turns {
        if out.is_empty() && turn.role == Role::Model {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.role == turn.role => {
                last.text.push_str("\n\n");
                last.text.push_str(&turn.text);
            }
            _ => out.push(turn),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::{assistant::AssistantStatus, conversation::Usage};

    fn assistant() -> Assistant {
        Assistant {
            id: Uuid::nil(),
            owner_id: Uuid::nil(),
            name: "Mika".into(),
            role: "travel secretary".into(),
            instructions: "Answer briefly.".into(),
            model: "gemini-2.5-flash".into(),
            temperature: 0.2,
            metadata: [("top_p".to_string(), "0.9".to_string())].into(),
            status: AssistantStatus::Active,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    fn posted(n: u128, text: &str) -> ConversationEvent {
        ConversationEvent::MessagePosted {
            message_id: Uuid::from_u128(n),
            content: text.into(),
            posted_at: Utc::now(),
        }
    }

    fn answered(text: &str) -> ConversationEvent {
        ConversationEvent::ReplyCompleted {
            reply_id: Uuid::new_v4(),
            content: text.into(),
            model: "m".into(),
            finish_reason: "STOP".into(),
            usage: Usage::default(),
            latency_ms: 1,
            completed_at: Utc::now(),
        }
    }

    #[test]
    fn history_becomes_alternating_turns_ending_with_the_message_answered() {
        let history = [
            posted(1, "first"),
            answered("one"),
            posted(2, "failed to answer"),
            posted(3, "now"),
            posted(4, "later, not part of this prompt"),
        ];
        let prompt = Prompt::build(&assistant(), &history, Uuid::from_u128(3), 10_000);
        let roles: Vec<Role> = prompt.turns.iter().map(|t| t.role).collect();
        assert_eq!(roles, [Role::User, Role::Model, Role::User]);
        assert_eq!(prompt.turns[2].text, "failed to answer\n\nnow");
        assert_eq!(prompt.last_user_text(), "failed to answer\n\nnow");
        assert_eq!(
            prompt.system,
            "You are Mika, a travel secretary.\nAnswer briefly."
        );
        assert_eq!(prompt.top_p, Some(0.9));
        assert_eq!(prompt.max_output_tokens, None);
    }

    #[test]
    fn thinking_comes_from_metadata_and_invalid_values_are_ignored() {
        let thinking = |pairs: &[(&str, &str)]| {
            let mut mika = assistant();
            mika.metadata = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Prompt::build(&mika, &[posted(1, "hi")], Uuid::from_u128(1), 100).thinking
        };
        assert_eq!(thinking(&[]), None);
        assert_eq!(
            thinking(&[("thinking_budget", "512")]),
            Some(Thinking::Budget(512))
        );
        assert_eq!(
            thinking(&[("thinking_budget", "-1")]),
            Some(Thinking::Budget(-1))
        );
        assert_eq!(
            thinking(&[("thinking_budget", "0")]),
            Some(Thinking::Budget(0))
        );
        assert_eq!(thinking(&[("thinking_budget", "-2")]), None);
        assert_eq!(thinking(&[("thinking_budget", "lots")]), None);
        assert_eq!(
            thinking(&[("thinking_level", " Low ")]),
            Some(Thinking::Level("LOW"))
        );
        assert_eq!(thinking(&[("thinking_level", "extreme")]), None);
        assert_eq!(
            thinking(&[("thinking_level", "high"), ("thinking_budget", "512")]),
            Some(Thinking::Level("HIGH"))
        );
    }

    #[test]
    fn the_oldest_turns_go_first_when_over_budget() {
        let history = [
            posted(1, &"a".repeat(50)),
            answered(&"b".repeat(50)),
            posted(2, &"c".repeat(50)),
            answered(&"d".repeat(50)),
            posted(3, "now"),
        ];
        let prompt = Prompt::build(&assistant(), &history, Uuid::from_u128(3), 120);
        // "now" + d + c fit in 120 characters; b and a do not.
        let texts: Vec<&str> = prompt.turns.iter().map(|t| &t.text[..1]).collect();
        assert_eq!(texts, ["c", "d", "n"]);
        // A budget too small for any history still keeps the message answered.
        let tiny = Prompt::build(&assistant(), &history, Uuid::from_u128(3), 1);
        assert_eq!(tiny.turns.len(), 1);
        assert_eq!(tiny.turns[0].text, "now");
    }
}
