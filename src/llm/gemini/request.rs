//! The `GenerateContentRequest` body: the assistant as `systemInstruction`, the
//! conversation as `contents`, and its settings as `generationConfig`
//! (ai.google.dev/api/generate-content#generationconfig).
//!
//! Thinking models spend thinking tokens out of `maxOutputTokens`
//! (ai.google.dev/gemini-api/docs/thinking). An assistant's `max_output_tokens`
//! is the answer's room, so the thinking budget is added on top of it: with
//! `max_output_tokens` 256 and a budget of 1024 the request says
//! `maxOutputTokens: 1280`, and the answer is never starved by the thinking.

use serde_json::{Value, json};

use crate::llm::{Prompt, Role, prompt::Thinking};

/// The thinking budget of a model that thinks by default when the assistant
/// caps its answer and says nothing about thinking: enough for a secretary's
/// planning, and a known amount to add to `maxOutputTokens`.
pub(super) const DEFAULT_THINKING_BUDGET: u32 = 1024;

pub(super) fn body(prompt: &Prompt) -> Value {
    let contents: Vec<Value> = prompt
        .turns
        .iter()
        .map(|t| {
            json!({
                "role": match t.role { Role::User => "user", Role::Model => "model" },
                "parts": [{ "text": t.text }],
            })
        })
        .collect();
    let mut generation = json!({ "temperature": prompt.temperature });
    if let Some(top_p) = prompt.top_p {
        generation["topP"] = json!(top_p);
    }
    let thinking = thinking(prompt);
    if let Some(answer) = prompt.max_output_tokens {
        let room = thinking.map_or(0, |t| t.reserved_tokens());
        generation["maxOutputTokens"] = json!(answer.saturating_add(room));
    }
    match thinking {
        Some(Thinking::Budget(budget)) => {
            generation["thinkingConfig"] = json!({ "thinkingBudget": budget });
        }
        Some(Thinking::Level(level)) => {
            generation["thinkingConfig"] = json!({ "thinkingLevel": level });
        }
        None => {}
    }
    json!({
        "systemInstruction": { "parts": [{ "text": prompt.system }] },
        "contents": contents,
        "generationConfig": generation,
    })
}

/// The assistant's thinking setting, or the default: a model that thinks by
/// default, asked for an answer of bounded length, gets
/// [`DEFAULT_THINKING_BUDGET`]. Otherwise nothing is sent: models before 2.5
/// refuse `thinkingConfig` ("thinking_config is not supported"), and without a
/// cap the model's own output limit leaves room enough.
fn thinking(prompt: &Prompt) -> Option<Thinking> {
    prompt.thinking.or_else(|| {
        (prompt.max_output_tokens.is_some() && thinks_by_default(&prompt.model))
            .then_some(Thinking::Budget(DEFAULT_THINKING_BUDGET as i32))
    })
}

impl Thinking {
    /// Tokens to add to `maxOutputTokens` for the thinking: a fixed budget's
    /// size; a dynamic budget (-1) or a level has no known size, and shares the
    /// assistant's cap with the answer.
    fn reserved_tokens(self) -> u32 {
        match self {
            Thinking::Budget(budget) => budget.max(0) as u32,
            Thinking::Level(_) => 0,
        }
    }
}

/// Gemini 2.5 Pro and Flash and the Gemini 3 family think unless told not to
/// (2.5 Flash-Lite does not, and earlier models cannot). Gemini 3 prefers a
/// `thinkingLevel` but accepts a budget "for backwards compatibility"
/// (ai.google.dev/gemini-api/docs/thinking). A name this does not know (a tuned
/// model, an alias such as `gemini-flash-latest`) gets no default, and neither
/// do the image, speech and live variants, which are not text models that think.
fn thinks_by_default(model: &str) -> bool {
    let id = model.strip_prefix("models/").unwrap_or(model);
    let gemini_2_5 = id.starts_with("gemini-2.5-pro")
        || (id.starts_with("gemini-2.5-flash") && !id.starts_with("gemini-2.5-flash-lite"));
    let not_text = ["image", "tts", "audio", "live"]
        .iter()
        .any(|variant| id.contains(variant));
    (gemini_2_5 || id.starts_with("gemini-3")) && !not_text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Turn;

    fn prompt(model: &str, max_output_tokens: Option<u32>, thinking: Option<Thinking>) -> Prompt {
        Prompt {
            model: model.into(),
            system: "You are Mika.".into(),
            turns: vec![
                Turn {
                    role: Role::User,
                    text: "hi".into(),
                },
                Turn {
                    role: Role::Model,
                    text: "hello".into(),
                },
                Turn {
                    role: Role::User,
                    text: "book it".into(),
                },
            ],
            temperature: 0.3,
            top_p: Some(0.9),
            max_output_tokens,
            thinking,
            assistant_name: "Mika".into(),
            assistant_role: "secretary".into(),
        }
    }

    #[test]
    fn the_request_carries_the_assistant_and_its_settings() {
        assert_eq!(
            body(&prompt("gemini-2.0-flash", Some(256), None)),
            json!({
                "systemInstruction": { "parts": [{ "text": "You are Mika." }] },
                "contents": [
                    { "role": "user", "parts": [{ "text": "hi" }] },
                    { "role": "model", "parts": [{ "text": "hello" }] },
                    { "role": "user", "parts": [{ "text": "book it" }] },
                ],
                "generationConfig": { "temperature": 0.3, "topP": 0.9, "maxOutputTokens": 256 },
            })
        );
    }

    fn generation(model: &str, max: Option<u32>, thinking: Option<Thinking>) -> Value {
        body(&prompt(model, max, thinking))["generationConfig"].clone()
    }

    #[test]
    fn a_capped_answer_from_a_thinking_model_keeps_its_room() {
        for model in [
            "gemini-2.5-flash",
            "models/gemini-2.5-pro",
            "gemini-3-flash-preview",
        ] {
            assert_eq!(
                generation(model, Some(256), None),
                json!({ "temperature": 0.3, "topP": 0.9, "maxOutputTokens": 1280,
                        "thinkingConfig": { "thinkingBudget": 1024 } }),
                "{model}"
            );
        }
        // No cap: the model's own limit leaves room, and thinking is its default.
        assert_eq!(
            generation("gemini-2.5-flash", None, None),
            json!({ "temperature": 0.3, "topP": 0.9 })
        );
        // Models that do not think by default, or that we do not know, get no config.
        for model in [
            "gemini-2.5-flash-lite",
            "gemini-2.5-flash-image",
            "gemini-2.0-flash",
            "tunedModels/mika-1",
        ] {
            assert_eq!(
                generation(model, Some(256), None)["thinkingConfig"],
                Value::Null,
                "{model}"
            );
        }
    }

    #[test]
    fn the_assistants_own_thinking_setting_is_sent_as_given() {
        assert_eq!(
            generation("gemini-2.5-flash", Some(256), Some(Thinking::Budget(0))),
            json!({ "temperature": 0.3, "topP": 0.9, "maxOutputTokens": 256,
                    "thinkingConfig": { "thinkingBudget": 0 } })
        );
        assert_eq!(
            generation("gemini-2.5-pro", Some(256), Some(Thinking::Budget(4096)))["maxOutputTokens"],
            4352
        );
        assert_eq!(
            generation("gemini-2.5-pro", Some(256), Some(Thinking::Budget(-1))),
            json!({ "temperature": 0.3, "topP": 0.9, "maxOutputTokens": 256,
                    "thinkingConfig": { "thinkingBudget": -1 } })
        );
        assert_eq!(
            generation("gemini-3-pro-preview", None, Some(Thinking::Level("LOW"))),
            json!({ "temperature": 0.3, "topP": 0.9, "thinkingConfig": { "thinkingLevel": "LOW" } })
        );
    }
}
