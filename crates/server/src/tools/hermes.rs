//! `hermes` (Hermes 2 Pro, Qwen 2.5/3 and others): calls as
//! `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, text before the first call is
//! content.

use serde_json::Value;

use super::{args_delta, pyjson, random_call_id, start_delta, Extracted, ToolCall};

const START: &str = "<tool_call>";
const END: &str = "</tool_call>";

/// The bodies vLLM's regex `<tool_call>(.*?)</tool_call>|<tool_call>(.*)` finds.
fn bodies(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(s) = text[pos..].find(START) {
        let body_start = pos + s + START.len();
        match text[body_start..].find(END) {
            Some(e) => {
                out.push(&text[body_start..body_start + e]);
                pos = body_start + e + END.len();
            }
            None => {
                out.push(&text[body_start..]);
                break;
            }
        }
    }
    out
}

/// vLLM's `Hermes2ProToolParser.extract_tool_calls`: every body must be a JSON object with
/// a string `name` and an `arguments` key, or the whole answer is content.
pub fn extract(text: &str) -> Extracted {
    let Some(first) = text.find(START) else {
        return Extracted::content(text);
    };
    let mut calls = Vec::new();
    for body in bodies(text) {
        let Ok(v) = serde_json::from_str::<Value>(body) else {
            return Extracted::content(text);
        };
        let (Some(name), Some(args)) = (v.get("name").and_then(Value::as_str), v.get("arguments"))
        else {
            return Extracted::content(text);
        };
        calls.push(ToolCall {
            id: random_call_id(),
            name: name.to_string(),
            arguments: pyjson::dumps(args),
        });
    }
    let content = &text[..first];
    Extracted {
        content: (!content.is_empty()).then(|| content.to_string()),
        calls,
    }
}

/// The longest prefix of `tag` that `text` ends with (a tag that may be arriving).
fn tag_overlap(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.ends_with(&tag[..k]))
        .unwrap_or(0)
}

/// vLLM's `_extract_tool_name`: the first `"name": "..."` in the body.
fn name_in(body: &str) -> Option<String> {
    let i = body.find("\"name\"")?;
    let rest = body[i + 6..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    (end > 0).then(|| rest[..end].to_string())
}

/// vLLM's `_extract_tool_args`: the raw text after `"arguments":`, without the object's
/// closing brace once the body is complete.
fn args_in(body: &str, complete: bool) -> Option<String> {
    let i = body.find("\"arguments\"")?;
    let rest = body[i + 11..].trim_start();
    let mut raw = rest.strip_prefix(':')?.trim_start();
    if complete {
        raw = raw.trim_end();
        if let Some(r) = raw.strip_suffix('}') {
            raw = r.trim_end();
        }
    }
    Some(raw.to_string())
}

/// Streaming as vLLM's parser: content up to the first `<tool_call>` (holding back a tag
/// that may be arriving), then per call its name once complete and the raw argument text
/// as it grows. As in vLLM, the streamed arguments are the model's own text, which equals
/// the whole-output arguments when the model spaces JSON as Python does.
#[derive(Default)]
pub struct Stream {
    text: String,
    content_sent: usize,
    names: Vec<String>,
    args_sent: Vec<String>,
}

impl Stream {
    pub fn push(&mut self, delta: &str) -> Option<Value> {
        self.text.push_str(delta);
        let t = self.text.as_str();
        let sendable = t
            .find(START)
            .unwrap_or_else(|| t.len() - tag_overlap(t, START));
        let content =
            (sendable > self.content_sent).then(|| t[self.content_sent..sendable].to_string());
        self.content_sent = self.content_sent.max(sendable);
        let mut deltas = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while let Some(s) = t[pos..].find(START) {
            let body_start = pos + s + START.len();
            let (body, complete, next) = match t[body_start..].find(END) {
                Some(e) => (
                    t[body_start..body_start + e].trim(),
                    true,
                    Some(body_start + e + END.len()),
                ),
                None => {
                    let raw = &t[body_start..];
                    let raw = &raw[..raw.len() - tag_overlap(raw, END)];
                    let body = raw.trim();
                    let complete = !body.is_empty() && serde_json::from_str::<Value>(body).is_ok();
                    (body, complete, None)
                }
            };
            if i >= self.names.len() {
                let Some(name) = name_in(body) else { break };
                deltas.push(start_delta(i, random_call_id(), &name, None));
                self.names.push(name);
                self.args_sent.push(String::new());
            }
            if let Some(args) = args_in(body, complete) {
                let sent = &mut self.args_sent[i];
                if args.len() > sent.len() {
                    deltas.push(args_delta(i, args[sent.len()..].to_string()));
                    *sent = args;
                }
            }
            i += 1;
            match next {
                Some(n) => pos = n,
                None => break,
            }
        }
        // vLLM 0.32 sends text alone as `{"content"}` and calls with `"content": null`
        // (or the text before them), never an empty `tool_calls` (checked side by side:
        // `benches/vllm_diff`); a client testing `if (delta.tool_calls)` took `[]` for a call.
        match (content, deltas.is_empty()) {
            (None, true) => None,
            (Some(c), true) => Some(serde_json::json!({ "content": c })),
            (c, false) => Some(serde_json::json!({"content": c, "tool_calls": deltas})),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{calls, check_streaming};
    use super::super::ParserKind;
    use super::*;

    #[test]
    fn single_and_parallel_calls() {
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let e = extract(one);
        assert_eq!(e.content, None);
        assert_eq!(calls(&e), [("get_weather", r#"{"city": "Paris"}"#)]);
        check_streaming(ParserKind::Hermes, one);
        let two = format!(
            "{one}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{\"tz\": \"CET\", \"n\": [1, 2]}}}}\n</tool_call>"
        );
        let e = extract(&two);
        assert_eq!(
            calls(&e),
            [
                ("get_weather", r#"{"city": "Paris"}"#),
                ("get_time", r#"{"tz": "CET", "n": [1, 2]}"#)
            ]
        );
        check_streaming(ParserKind::Hermes, &two);
    }

    #[test]
    fn streamed_text_is_content_alone_and_calls_carry_null_content() {
        let mut s = ParserKind::Hermes.streamer();
        assert_eq!(
            s.push("Hello"),
            Some(serde_json::json!({"content": "Hello"}))
        );
        assert_eq!(s.push("<tool_"), None);
        let d = s
            .push("call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>")
            .unwrap();
        assert_eq!(d.get("content"), Some(&Value::Null), "{d}");
        assert_eq!(d["tool_calls"][0]["function"]["name"], "f", "{d}");
    }

    #[test]
    fn content_before_the_call_and_an_unclosed_call() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"ü\"}}";
        let e = extract(text);
        assert_eq!(e.content.as_deref(), Some("Let me check.\n"));
        assert_eq!(calls(&e), [("f", r#"{"q": "ü"}"#)]);
        check_streaming(ParserKind::Hermes, text);
    }

    #[test]
    fn whole_output_normalises_arguments_streaming_keeps_the_models_text() {
        let text = "<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":1.50}}</tool_call>";
        assert_eq!(calls(&extract(text)), [("f", r#"{"a": 1.5}"#)]);
        let mut s = ParserKind::Hermes.streamer();
        let d: Vec<Value> = text
            .chars()
            .filter_map(|c| s.push(&c.to_string()))
            .collect();
        let (_, streamed) = super::super::testutil::assemble(&d);
        assert_eq!(streamed[0].2, r#"{"a":1.50}"#);
    }

    #[test]
    fn invalid_bodies_are_content() {
        for text in [
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": }</tool_call>",
            "<tool_call>{\"name\": \"f\"}</tool_call>",
            "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call><tool_call>oops</tool_call>",
            "no call here",
        ] {
            assert_eq!(extract(text), Extracted::content(text), "{text}");
        }
        check_streaming(
            ParserKind::Hermes,
            "no call here, < or <tool but not a call",
        );
    }
}
