//! Server-sent events cut out of `streamGenerateContent?alt=sse`'s body. Each
//! event's `data:` is one partial `GenerateContentResponse`, or `{"error": …}`.
//! Events end at a blank line (`\r\n\r\n` as Google sends them, or `\n\n`).

#[derive(Default)]
pub(super) struct Events {
    pending: Vec<u8>,
}

impl Events {
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete event, `None` until a blank line ends one.
    pub(super) fn next_event(&mut self) -> Option<String> {
        let lf = find(&self.pending, b"\n\n").map(|at| (at, 2));
        let crlf = find(&self.pending, b"\r\n\r\n").map(|at| (at, 4));
        let (at, len) = match (lf, crlf) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let raw: Vec<u8> = self.pending.drain(..at + len).collect();
        Some(payload(&String::from_utf8_lossy(&raw[..at])))
    }

    /// What is left when the body ends: an event the server did not close with
    /// a blank line, which is read like any other rather than dropped.
    pub(super) fn rest(self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.pending);
        (!text.trim().is_empty()).then(|| payload(&text))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An event's `data:` lines joined. An event with none that is bare JSON is
/// taken whole: Google's own SDK reads error bodies sent into the stream that
/// way (googleapis/python-genai `_api_client.py`). Comments and other fields
/// give an empty payload, which is skipped.
fn payload(event: &str) -> String {
    let data: Vec<&str> = event
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if !data.is_empty() {
        return data.join("\n");
    }
    let bare = event.trim();
    if bare.starts_with('{') {
        bare.to_owned()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_at_blank_lines_whichever_line_ending() {
        let mut events = Events::default();
        events.push(b"data: {\"a\":1}\r\n\r\ndata: {\"b\":");
        assert_eq!(events.next_event().as_deref(), Some("{\"a\":1}"));
        assert_eq!(events.next_event(), None);
        events.push(b"2}\n\n: keep-alive\n\n");
        assert_eq!(events.next_event().as_deref(), Some("{\"b\":2}"));
        assert_eq!(events.next_event().as_deref(), Some(""));
        assert!(events.rest().is_none());
    }

    #[test]
    fn an_unterminated_last_event_and_bare_json_are_read_too() {
        let mut events = Events::default();
        events.push(b"{\n  \"error\": {\n    \"code\": 500\n  }\n}\n");
        assert_eq!(events.next_event(), None);
        assert_eq!(
            events.rest().as_deref(),
            Some("{\n  \"error\": {\n    \"code\": 500\n  }\n}")
        );
    }
}
