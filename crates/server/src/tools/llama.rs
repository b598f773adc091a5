//! `llama3_json` (and its alias `llama4_json`): an optional `<|python_tag|>`, then JSON
//! objects `{"name": ..., "parameters" | "arguments": ...}`, several separated by `;`.

use serde_json::Value;

use super::partial::{self, Stop};
use super::{
    args_delta, calls_message, content_message, pyjson, random_call_id, start_delta, Extracted,
    ToolCall,
};

pub const BOT: &str = "<|python_tag|>";

/// One call object read from a whole answer: name and Python-style arguments, or `None`
/// when vLLM would give up on the whole answer (missing key, name not a string).
fn call_of(obj: &Value) -> Option<(String, String)> {
    let name = obj.get("name")?.as_str()?.to_string();
    let args = obj.get("arguments").or_else(|| obj.get("parameters"))?;
    Some((name, pyjson::dumps(args)))
}

/// vLLM's `Llama3JsonToolParser.extract_tool_calls`: every `{` not inside an object read
/// before must start a valid call object, or the whole answer is content; surrounding text
/// is dropped when calls were found.
pub fn extract(text: &str) -> Extracted {
    if !(text.contains(BOT) || text.contains('{')) {
        return Extracted::content(text);
    }
    let mut end: Option<usize> = None;
    let mut calls = Vec::new();
    for (start, _) in text.match_indices('{') {
        // vLLM's `start_index <= end_index`: a `{` right after a call is skipped too.
        if end.is_some_and(|e| start <= e) {
            continue;
        }
        let Some((obj, len)) = pyjson::raw_decode(&text[start..]) else {
            return Extracted::content(text);
        };
        end = Some(start + len);
        let Some((name, arguments)) = call_of(&obj) else {
            return Extracted::content(text);
        };
        calls.push(ToolCall {
            id: random_call_id(),
            name,
            arguments,
        });
    }
    if calls.is_empty() {
        return Extracted::content(text);
    }
    Extracted {
        content: None,
        calls,
    }
}

/// What is known so far of one call object in a stream.
#[derive(Default)]
pub(super) struct Partial {
    name: Option<String>,
    /// The certain prefix of the arguments' final text.
    args: String,
    /// The object is complete: its arguments as the whole-output parse gives them.
    done: Option<Option<String>>,
}

/// Reads the call objects of `s` (after the optional tag) as far as they go.
fn scan(s: &str, finish: Finish) -> Vec<Partial> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        // Calls are separated by `;` (vLLM expects "; "); whitespace around is skipped.
        let rest = &s[pos..];
        let skip = rest.len() - rest.trim_start_matches([' ', '\n', '\t', '\r', ';']).len();
        pos += skip;
        if pos >= s.len() || !s[pos..].starts_with('{') {
            return out;
        }
        let (p, end) = object(&s[pos..], finish);
        out.push(p);
        match end {
            Some(e) => pos += e,
            None => return out,
        }
    }
}

/// A complete call object's name and arguments as the whole-output parse reads them.
pub(super) type Finish = fn(&Value) -> (Option<String>, Option<String>);

fn llama_finish(obj: &Value) -> (Option<String>, Option<String>) {
    let name = obj.get("name").and_then(Value::as_str).map(str::to_string);
    let args = obj
        .get("arguments")
        .or_else(|| obj.get("parameters"))
        .map(pyjson::dumps);
    (name, args)
}

/// One call object at the start of `s`: what is known, and its end when complete.
fn object(s: &str, finish: Finish) -> (Partial, Option<usize>) {
    let mut p = Partial::default();
    if let Some((obj, end)) = pyjson::raw_decode(s) {
        let (name, args) = finish(&obj);
        p.name = name;
        p.args = args.clone().unwrap_or_default();
        p.done = Some(args);
        return (p, Some(end));
    }
    let mut r = partial::Reader {
        s,
        pos: 1,
        out: String::new(),
    };
    let _ = members(&mut r, &mut p);
    (p, None)
}

/// The members of an unfinished object, filling `p` until the text runs out.
fn members(r: &mut partial::Reader, p: &mut Partial) -> Result<(), Stop> {
    let mut args_key: Option<String> = None;
    loop {
        r.ws();
        let (key, len) = partial::string_at(&r.s[r.pos..])?;
        r.pos += len;
        r.ws();
        if !r.s[r.pos..].starts_with(':') {
            return Err(Stop::Incomplete);
        }
        r.pos += 1;
        r.ws();
        let n = partial::normalize(&r.s[r.pos..]);
        if n.invalid {
            return Err(Stop::Invalid);
        }
        let is_args = (key == "arguments" || key == "parameters")
            && args_key
                .as_ref()
                .is_none_or(|k| *k == key || key == "arguments");
        if key == "name" {
            if n.end.is_some() {
                p.name = serde_json::from_str::<Value>(&n.out)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string));
            }
        } else if is_args {
            args_key = Some(key);
            p.args = n.out;
        }
        let end = n.end.ok_or(Stop::Incomplete)?;
        r.pos += end;
        r.ws();
        if !r.s[r.pos..].starts_with(',') {
            return Err(Stop::Incomplete);
        }
        r.pos += 1;
    }
}

/// Streaming as vLLM's parser: an answer that does not start with the tag or `{` is
/// content; otherwise each call is announced (id, name) once its name is complete, then
/// its arguments follow as they become certain.
#[derive(Default)]
pub struct Stream {
    text: String,
    content_sent: usize,
    calls: CallsSent,
}

impl Stream {
    pub fn push(&mut self, delta: &str) -> Option<Value> {
        self.text.push_str(delta);
        let t = &self.text;
        let calls_mode = t.starts_with(BOT) || t.starts_with('{');
        if !calls_mode {
            // The tag may still be arriving in pieces.
            if self.content_sent == 0 && BOT.starts_with(t.as_str()) {
                return None;
            }
            let new = t[self.content_sent..].to_string();
            self.content_sent = t.len();
            return (!new.is_empty()).then(|| content_message(new));
        }
        let body = t.strip_prefix(BOT).unwrap_or(t);
        let parts = scan(body, llama_finish);
        calls_message(self.calls.step(parts, random_call_id))
    }
}

/// Per call: whether it was announced and the arguments sent so far.
#[derive(Default)]
pub(super) struct CallsSent {
    args_sent: Vec<String>,
}

impl CallsSent {
    /// The deltas that bring the client up to `parts`: calls announced in order once their
    /// name is known, then the arguments' new certain text.
    pub(super) fn step(&mut self, parts: Vec<Partial>, id: fn() -> String) -> Vec<Value> {
        let mut deltas = Vec::new();
        for (i, p) in parts.into_iter().enumerate() {
            if i >= self.args_sent.len() {
                let Some(name) = &p.name else { break };
                deltas.push(start_delta(i, id(), name, None));
                self.args_sent.push(String::new());
            }
            let target = match p.done {
                Some(args) => args.unwrap_or_default(),
                None => p.args,
            };
            let sent = &mut self.args_sent[i];
            if target.len() > sent.len() && target.starts_with(sent.as_str()) {
                deltas.push(args_delta(i, target[sent.len()..].to_string()));
                *sent = target;
            }
        }
        deltas
    }
}

/// The call objects of a JSON array (or one object) at the start of `s`, as far as they go.
pub(super) fn scan_array(s: &str, finish: Finish) -> Vec<Partial> {
    let s = s.trim_start();
    if s.starts_with('{') {
        let (p, _) = object(s, finish);
        return vec![p];
    }
    let Some(inner) = s.strip_prefix('[') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &inner[pos..];
        pos += rest.len() - rest.trim_start_matches([' ', '\n', '\t', '\r', ',']).len();
        if !inner[pos..].starts_with('{') {
            return out;
        }
        let (p, end) = object(&inner[pos..], finish);
        out.push(p);
        match end {
            Some(e) => pos += e,
            None => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{calls, check_streaming};
    use super::super::ParserKind;
    use super::*;

    #[test]
    fn single_call_with_and_without_the_tag() {
        for text in [
            r#"{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}"#,
            r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}"#,
            r#"{"name":"get_weather","arguments":{"city":"Paris","days":3}}"#,
        ] {
            let e = extract(text);
            assert_eq!(e.content, None);
            assert_eq!(
                calls(&e),
                [("get_weather", r#"{"city": "Paris", "days": 3}"#)]
            );
            assert!(e.calls[0].id.starts_with("chatcmpl-tool-"));
            assert_eq!(e.calls[0].id.len(), "chatcmpl-tool-".len() + 32);
            check_streaming(ParserKind::Llama3Json, text);
        }
    }

    #[test]
    fn several_calls_separated_by_semicolons() {
        let text = "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": [1.50, \"é\\n\"]}}; \
                    {\"name\": \"b\", \"parameters\": {}}";
        let e = extract(text);
        assert_eq!(calls(&e), [("a", r#"{"x": [1.5, "é\n"]}"#), ("b", "{}")]);
        check_streaming(ParserKind::Llama3Json, text);
    }

    #[test]
    fn surrounding_text_is_dropped_when_calls_are_found() {
        // vLLM's whole-output parse finds the object anywhere and drops the text around it
        // (its streaming parse treats an answer not starting with `{` as content).
        let text = r#"Sure! {"name": "f", "parameters": {"a": 1}} done"#;
        let e = extract(text);
        assert_eq!(
            (e.content.clone(), calls(&e)),
            (None, vec![("f", r#"{"a": 1}"#)])
        );
        let mut s = ParserKind::Llama3Json.streamer();
        let d: Vec<Value> = text
            .chars()
            .filter_map(|c| s.push(&c.to_string()))
            .collect();
        let (content, calls) = super::super::testutil::assemble(&d);
        assert_eq!((content.as_str(), calls.len()), (text, 0));
    }

    #[test]
    fn invalid_json_or_missing_keys_are_content() {
        for text in [
            r#"{"name": "f", "parameters": {"a": 1}"#,
            r#"{"name": "f"}"#,
            r#"{"parameters": {}}"#,
            r#"{"name": 3, "parameters": {}}"#,
            "A set {1, 2} and {\"name\": \"f\", \"parameters\": {}}",
            "plain answer",
        ] {
            assert_eq!(extract(text), Extracted::content(text), "{text}");
        }
        check_streaming(ParserKind::Llama3Json, "plain answer, no call");
    }
}
