//! The offline provider, the default: a secretary-like answer built from the
//! message and the assistant, with no network and no randomness. It acknowledges
//! the request, restates it, and lists the dates and times the message mentions,
//! in Japanese when the message is Japanese. The same prompt always gives the same
//! answer and the same token counts, so tests and demos can rely on it.

use std::sync::LazyLock;

use regex::Regex;

use super::{AttemptError, Completion, Deltas, Prompt, Provider};
use crate::domain::conversation::Usage;

pub struct Offline;

/// The `model` of its answers: the assistant's model, marked as simulated.
pub const MODEL_SUFFIX: &str = "+offline";

/// Longest restatement of the request, in characters.
const RESTATE_CHARS: usize = 160;

#[async_trait::async_trait]
impl Provider for Offline {
    fn name(&self) -> &'static str {
        "offline"
    }

    async fn attempt(&self, prompt: &Prompt) -> Result<Completion, AttemptError> {
        Ok(answer(prompt))
    }

    /// The same answer, a few words at a time, as a streaming model sends it.
    async fn attempt_streaming(
        &self,
        prompt: &Prompt,
        deltas: Deltas<'_>,
    ) -> Result<Completion, AttemptError> {
        let completion = answer(prompt);
        for piece in pieces(&completion.content) {
            deltas(piece);
        }
        Ok(completion)
    }
}

/// Words per streamed piece.
const WORDS_PER_PIECE: usize = 4;

/// The text cut after every few words; the pieces concatenate back to it.
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut words) = (0, 0);
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            words += 1;
            if words == WORDS_PER_PIECE {
                let end = i + c.len_utf8();
                out.push(&text[start..end]);
                (start, words) = (end, 0);
            }
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// The whole answer, a pure function of the prompt.
pub fn answer(prompt: &Prompt) -> Completion {
    let message = prompt.last_user_text();
    let request = restate(message);
    let when = dates_and_times(message);
    let content = if is_japanese(message) {
        let mut s = format!(
            "{}（{}）です。承知しました。「{}」について対応いたします。",
            prompt.assistant_name, prompt.assistant_role, request
        );
        if !when.is_empty() {
            s.push_str(&format!("\n日時: {}", when.join("、")));
        }
        s.push_str("\n進捗はこの会話でご報告します。");
        s
    } else {
        let mut s = format!(
            "This is {}, your {}. Understood: you would like me to take care of \"{}\".",
            prompt.assistant_name, prompt.assistant_role, request
        );
        if !when.is_empty() {
            s.push_str(&format!("\nDates and times noted: {}.", when.join(", ")));
        }
        s.push_str("\nI will report back in this conversation.");
        s
    };
    let prompt_tokens = count_tokens(&prompt.system)
        + prompt
            .turns
            .iter()
            .map(|t| count_tokens(&t.text))
            .sum::<u64>();
    let completion_tokens = count_tokens(&content);
    Completion {
        content,
        model: format!("{}{MODEL_SUFFIX}", prompt.model),
        finish_reason: "STOP".into(),
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            ..Usage::default()
        },
    }
}

/// Tokens as the offline model counts them: one per CJK character, and one per
/// four characters (rounded up) of every other run of non-blank characters.
pub fn count_tokens(text: &str) -> u64 {
    let mut tokens = 0;
    let mut run = 0u64;
    for c in text.chars() {
        if c.is_whitespace() || is_cjk(c) {
            tokens += run.div_ceil(4);
            run = 0;
            if is_cjk(c) {
                tokens += 1;
            }
        } else {
            run += 1;
        }
    }
    tokens + run.div_ceil(4)
}

/// The request in a line: blanks collapsed, cut at a word (or character) boundary.
fn restate(message: &str) -> String {
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    let line = line.trim_end_matches(['.', '!', '?', '。', '！', '？']);
    if line.chars().count() <= RESTATE_CHARS {
        return line.to_owned();
    }
    let cut: String = line.chars().take(RESTATE_CHARS).collect();
    let cut = match cut.rfind(' ') {
        Some(space) if space > RESTATE_CHARS / 2 => &cut[..space],
        _ => &cut,
    };
    format!("{cut}…")
}

static WHEN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?xi)
        \b\d{4}-\d{1,2}-\d{1,2}\b                                   # 2026-12-01
      | \b\d{1,2}/\d{1,2}(?:/\d{2,4})?\b                           # 12/1, 12/1/2026
      | \b\d{1,2}:\d{2}(?:\s?[ap]\.?m\.?)?                          # 15:00, 3:30 pm
      | \b\d{1,2}\s?[ap]\.?m\b\.?                                   # 3pm
      | \b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s\d{1,2}(?:st|nd|rd|th)?\b
      | \b\d{1,2}(?:st|nd|rd|th)?\s(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\b
      | \b(?:today|tonight|tomorrow|yesterday)\b
      | \b(?:next|this)\s(?:week|month|year|morning|afternoon|evening|monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b
      | \b(?:on\s)?(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b
      | \d{1,4}年\d{1,2}月\d{1,2}日 | \d{1,2}月\d{1,2}日                # 12月1日
      | (?:午前|午後)?\d{1,2}時(?:\d{1,2}分|半)?                     # 午後3時半
      | 明後日|明日|今日|今夜|今晩|昨日|来週|今週|来月|今月
      | [月火水木金土日]曜日?
        ",
    )
    .expect("the date and time pattern compiles")
});

/// Dates and times the message mentions, in order, each once.
pub fn dates_and_times(message: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for m in WHEN.find_iter(message) {
        let text = m.as_str().trim().to_owned();
        // A lone weekday kanji (月, 日…) is too often something else; keep 曜 forms.
        if text.chars().count() == 1 {
            continue;
        }
        if !found.iter().any(|f| f.eq_ignore_ascii_case(&text)) {
            found.push(text);
        }
    }
    found
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF   // hiragana, katakana
        | 0x3400..=0x4DBF // CJK extension A
        | 0x4E00..=0x9FFF // CJK unified ideographs
        | 0xFF66..=0xFF9F // half-width katakana
    )
}

/// Kana or kanji anywhere: answer in Japanese.
fn is_japanese(text: &str) -> bool {
    text.chars().any(is_cjk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Role, Turn};

    fn prompt(message: &str) -> Prompt {
        Prompt {
            model: "gemini-2.5-flash".into(),
            system: "You are Mika, a secretary.".into(),
            turns: vec![Turn {
                role: Role::User,
                text: message.into(),
            }],
            temperature: 0.7,
            top_p: None,
            max_output_tokens: None,
            thinking: None,
            assistant_name: "Mika".into(),
            assistant_role: "secretary".into(),
        }
    }

    #[test]
    fn the_same_prompt_gives_the_same_answer_and_counts() {
        let p = prompt("Book a table for four tomorrow at 7:30 pm, and remind me on Friday.");
        let first = answer(&p);
        assert_eq!(first, answer(&p));
        assert_eq!(
            first.content,
            "This is Mika, your secretary. Understood: you would like me to take care of \
             \"Book a table for four tomorrow at 7:30 pm, and remind me on Friday\".\n\
             Dates and times noted: tomorrow, 7:30 pm, on Friday.\n\
             I will report back in this conversation."
        );
        assert_eq!(first.model, "gemini-2.5-flash+offline");
        // "You(1) are(1) Mika,(2) a(1) secretary.(3)" + the message's 18.
        assert_eq!(first.usage.prompt_tokens, 8 + 18);
        assert_eq!(
            first.usage.total_tokens,
            first.usage.prompt_tokens + first.usage.completion_tokens
        );
    }

    #[test]
    fn japanese_gets_a_japanese_answer_with_its_dates() {
        let c = answer(&prompt("12月3日の午後3時に会議室を予約してください。"));
        assert!(
            c.content
                .starts_with("Mika（secretary）です。承知しました。")
        );
        assert!(
            c.content.contains("日時: 12月3日、午後3時"),
            "{}",
            c.content
        );
    }

    #[test]
    fn dates_and_times_are_found_in_order_once() {
        assert_eq!(
            dates_and_times("Move 2026-12-01 to 12/3, 9am; TOMORROW or tomorrow, next week."),
            ["2026-12-01", "12/3", "9am", "TOMORROW", "next week"]
        );
        assert!(dates_and_times("Write a summary of the report").is_empty());
    }

    #[test]
    fn tokens_are_counted_by_runs_and_cjk_characters() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("a bb ccccc"), 1 + 1 + 2);
        assert_eq!(count_tokens("予約ok"), 3);
    }

    #[test]
    fn streamed_pieces_concatenate_to_the_answer() {
        let c = answer(&prompt(
            "Call the plumber tomorrow at 9am about the leaking sink.",
        ));
        let pieces = pieces(&c.content);
        assert!(pieces.len() > 3);
        assert_eq!(pieces.concat(), c.content);
        let japanese = answer(&prompt("明日の午前9時に電話してください"));
        assert_eq!(super::pieces(&japanese.content).concat(), japanese.content);
    }

    #[test]
    fn a_long_request_is_cut_at_a_word() {
        let long = format!("{} end", "word ".repeat(60));
        let r = restate(&long);
        assert!(r.ends_with("word…"), "{r}");
        assert!(r.chars().count() <= RESTATE_CHARS + 1);
    }
}
