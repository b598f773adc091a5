//! `mistral`: text, then `[TOOL_CALLS]` and the calls. Tokenizers before v11 (no `[ARGS]`
//! token) write a JSON array `[{"name": ..., "arguments": ...}]`; v11 and later write
//! `[TOOL_CALLS]name[ARGS]{...}` (or `name{...}`), one marker per call. Ids are Mistral's
//! 9-character alphanumeric ones.

use serde_json::Value;

use super::llama::{scan_array, CallsSent};
use super::{
    args_delta, calls_message, content_message, mistral_call_id, pyjson, start_delta, Extracted,
    ToolCall,
};

pub const BOT: &str = "[TOOL_CALLS]";
pub const ARGS: &str = "[ARGS]";

/// vLLM's `_pre_v11_function_calls`: one object or a list; entries that are not call
/// objects are skipped, a missing or non-string name is "", string arguments are kept.
fn pre_v11_finish(obj: &Value) -> (Option<String>, Option<String>) {
    let name = obj.get("name").and_then(Value::as_str).unwrap_or_default();
    let args = match obj.get("arguments") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => pyjson::dumps(v),
    };
    (Some(name.to_string()), Some(args))
}

fn pre_v11_calls(parsed: &Value) -> Vec<ToolCall> {
    let items = match parsed {
        Value::Object(_) => std::slice::from_ref(parsed),
        Value::Array(a) => a.as_slice(),
        _ => &[],
    };
    items
        .iter()
        .filter(|t| t.get("name").is_some() || t.get("arguments").is_some())
        .filter(|t| t.is_object())
        .map(|t| {
            let (name, args) = pre_v11_finish(t);
            ToolCall {
                id: mistral_call_id(),
                name: name.unwrap_or_default(),
                arguments: args.unwrap_or_default(),
            }
        })
        .collect()
}

pub fn extract(text: &str, v11: bool) -> Extracted {
    if !text.contains(BOT) {
        return Extracted::content(text);
    }
    let mut parts = text.split(BOT);
    let content = parts.next().unwrap_or_default();
    let content = (!content.trim().is_empty()).then(|| content.to_string());
    if v11 {
        return extract_v11(text, content);
    }
    // Repeated markers with nothing between count as one; text after a later one is
    // trailing output (vLLM's `_legacy_extract_tool_calls`).
    let body = parts
        .map(str::trim)
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    let parsed = pyjson::raw_decode(body).map(|(v, _)| v).or_else(|| {
        // vLLM's fallback regex `\[{.*}\]`: the first `[{` to the last `}]`.
        let start = body.find("[{")?;
        let end = body.rfind("}]")?;
        (end >= start)
            .then(|| serde_json::from_str(&body[start..end + 2]).ok())
            .flatten()
    });
    let calls = parsed.as_ref().map(pre_v11_calls).unwrap_or_default();
    if calls.is_empty() {
        return Extracted::content(body);
    }
    Extracted { content, calls }
}

/// The first JSON value of a v11 call's argument text (vLLM's `_extract_args_json`): "{}"
/// when empty, the text itself when it is not JSON.
fn v11_args(raw: &str) -> String {
    let s = raw.trim();
    if s.is_empty() {
        return "{}".into();
    }
    match pyjson::raw_decode(s) {
        Some((_, end)) => s[..end].to_string(),
        None => s.to_string(),
    }
}

/// A v11 call segment: its name (up to `[ARGS]` or the arguments' `{`) and raw arguments.
fn v11_split(seg: &str) -> Option<(&str, &str)> {
    if let Some(i) = seg.find(ARGS) {
        return Some((&seg[..i], &seg[i + ARGS.len()..]));
    }
    seg.find('{').map(|i| (&seg[..i], &seg[i..]))
}

fn extract_v11(text: &str, content: Option<String>) -> Extracted {
    let calls: Vec<ToolCall> = text
        .split(BOT)
        .skip(1)
        .filter_map(v11_split)
        .map(|(name, args)| ToolCall {
            id: mistral_call_id(),
            name: name.trim().to_string(),
            arguments: v11_args(args),
        })
        .collect();
    if calls.is_empty() {
        return Extracted::content(text);
    }
    Extracted { content, calls }
}

/// Content until the first `[TOOL_CALLS]` (a marker arriving in pieces is held back), then
/// the calls as they grow.
pub struct Stream {
    v11: bool,
    text: String,
    content_sent: usize,
    calls: CallsSent,
    v11_sent: Vec<String>,
}

impl Stream {
    pub fn new(v11: bool) -> Self {
        Stream {
            v11,
            text: String::new(),
            content_sent: 0,
            calls: CallsSent::default(),
            v11_sent: Vec::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> Option<Value> {
        self.text.push_str(delta);
        let t = self.text.as_str();
        let Some(at) = t.find(BOT) else {
            let hold = (1..BOT.len().min(t.len() + 1))
                .rev()
                .find(|&k| t.ends_with(&BOT[..k]))
                .unwrap_or(0);
            let end = t.len() - hold;
            if end <= self.content_sent {
                return None;
            }
            let new = t[self.content_sent..end].to_string();
            self.content_sent = end;
            return Some(content_message(new));
        };
        let mut out = serde_json::Map::new();
        if at > self.content_sent {
            out.insert("content".into(), t[self.content_sent..at].into());
            self.content_sent = at;
        }
        let deltas = if self.v11 {
            self.step_v11(at)
        } else {
            let body = t[at + BOT.len()..].trim_start_matches(BOT);
            self.calls
                .step(scan_array(body, pre_v11_finish), mistral_call_id)
        };
        if let Some(Value::Object(m)) = calls_message(deltas) {
            out.extend(m);
        }
        (!out.is_empty()).then_some(Value::Object(out))
    }

    fn step_v11(&mut self, at: usize) -> Vec<Value> {
        let mut deltas = Vec::new();
        let t = &self.text[at..];
        let segs: Vec<&str> = t.split(BOT).skip(1).collect();
        let last = segs.len().saturating_sub(1);
        for (i, seg) in segs.iter().enumerate() {
            let Some((name, raw)) = v11_split(seg) else {
                break;
            };
            if i >= self.v11_sent.len() {
                deltas.push(start_delta(i, mistral_call_id(), name.trim(), None));
                self.v11_sent.push(String::new());
            }
            let raw = raw.trim_start();
            let target = match pyjson::container_end(raw) {
                Some(end) => raw[..end].to_string(),
                // Not finished: its text so far, unless a later marker closed it.
                None if i < last => v11_args(raw),
                None => raw.to_string(),
            };
            let sent = &mut self.v11_sent[i];
            if target.len() > sent.len() && target.starts_with(sent.as_str()) {
                deltas.push(args_delta(i, target[sent.len()..].to_string()));
                *sent = target;
            }
        }
        deltas
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{calls, check_streaming};
    use super::super::ParserKind;
    use super::*;

    const PRE: ParserKind = ParserKind::Mistral { v11: false };
    const V11: ParserKind = ParserKind::Mistral { v11: true };

    #[test]
    fn pre_v11_json_array() {
        let text = r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 3.5, "b": 1}}]"#;
        let e = extract(text, false);
        assert_eq!(e.content, None);
        assert_eq!(
            calls(&e),
            [
                ("get_weather", r#"{"city": "Paris"}"#),
                ("add", r#"{"a": 3.5, "b": 1}"#)
            ]
        );
        let id = &e.calls[0].id;
        assert!(id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()));
        check_streaming(PRE, text);
        let with_text = r#"Checking.[TOOL_CALLS][{"name": "f", "arguments": {}}]"#;
        let e = extract(with_text, false);
        assert_eq!(e.content.as_deref(), Some("Checking."));
        assert_eq!(calls(&e), [("f", "{}")]);
        check_streaming(PRE, with_text);
    }

    #[test]
    fn pre_v11_odd_shapes() {
        // A bare object is one call; string arguments are kept; no arguments is "{}".
        let e = extract(
            r#"[TOOL_CALLS]{"name": "f", "arguments": "{\"x\":1}"}"#,
            false,
        );
        assert_eq!(calls(&e), [("f", r#"{"x":1}"#)]);
        let e = extract(r#"[TOOL_CALLS][{"name": "f"}] trailing"#, false);
        assert_eq!(calls(&e), [("f", "{}")]);
        // Not JSON: the text after the marker is the content.
        let e = extract("Hi [TOOL_CALLS] [{oops", false);
        assert_eq!(e, Extracted::content("[{oops"));
        assert_eq!(extract("plain", false), Extracted::content("plain"));
        check_streaming(PRE, "plain answer [TOOL but no call");
    }

    #[test]
    fn v11_calls() {
        let text = r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{"a": 1, "b": [2]}"#;
        let e = extract(text, true);
        assert_eq!(
            calls(&e),
            [
                ("get_weather", r#"{"city": "Paris"}"#),
                ("add", r#"{"a": 1, "b": [2]}"#)
            ]
        );
        check_streaming(V11, text);
        let text = r#"Sure.[TOOL_CALLS]f{"q": "x"} thanks"#;
        let e = extract(text, true);
        assert_eq!(e.content.as_deref(), Some("Sure."));
        assert_eq!(calls(&e), [("f", r#"{"q": "x"}"#)]);
        check_streaming(V11, text);
    }
}
