//! `tool_choice` on a chat request: which calls the answer may hold, the JSON schema that
//! forces "required" and named calls (vLLM's `get_json_schema_from_tools`), and reading the
//! calls back from the answer.

use serde_json::{json, Map, Value};

use super::{
    args_delta, calls_message_null_content, random_call_id, start_delta, ParserKind, ToolCall,
};
use crate::error::ApiError;

/// How the answer's tool calls are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// `tool_choice` "auto": the parser finds calls in free text.
    Auto(ParserKind),
    /// A named function: the whole (JSON-constrained) answer is its arguments.
    Named(String),
    /// "required": the answer is a JSON array of `{"name", "parameters"}`.
    Required,
}

/// The tool handling of one chat request (`None` on the request: plain content).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolMode {
    pub choice: Choice,
    /// `parallel_tool_calls: false`: only the first call is returned.
    pub single_call: bool,
    /// The JSON schema the answer must follow (named / required).
    pub schema: Option<Value>,
}

/// An answer read for tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `message.content` (`None`: null).
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
    /// `finish_reason` "tool_calls" instead of the engine's "stop".
    pub tool_calls_finish: bool,
}

impl ToolMode {
    /// The message of a whole answer, as vLLM's chat handler builds it: named / required
    /// give `content` "" (never null) and their calls; auto gives the parser's split.
    pub fn answer(&self, text: &str) -> Answer {
        let (content, mut calls, tool_calls_finish) = match &self.choice {
            Choice::Auto(p) => {
                let e = p.extract(text);
                let called = !e.calls.is_empty();
                let content = if called {
                    e.content.filter(|c| !c.trim().is_empty())
                } else {
                    e.content
                };
                (content, e.calls, called)
            }
            Choice::Named(name) => (Some(String::new()), named_calls(name, text), false),
            Choice::Required => (Some(String::new()), required_calls(text), true),
        };
        if self.single_call {
            calls.truncate(1);
        }
        Answer {
            content,
            calls,
            tool_calls_finish,
        }
    }

    /// "tool_calls" replaces a "stop" finish when calls were made (vLLM: for auto and
    /// required; a named call keeps "stop").
    pub fn finish_reason(&self, called: bool, engine: &str) -> String {
        match (&self.choice, called, engine) {
            (Choice::Named(_), _, _) => engine.to_string(),
            (Choice::Required, _, "stop") => "tool_calls".into(),
            (Choice::Auto(_), true, _) => "tool_calls".into(),
            _ => engine.to_string(),
        }
    }

    pub fn streamer(&self) -> super::Streamer {
        match &self.choice {
            Choice::Auto(p) => p.streamer(),
            Choice::Named(n) => super::Streamer::Named(NamedStream {
                name: n.clone(),
                started: false,
            }),
            Choice::Required => super::Streamer::Required(RequiredStream::default()),
        }
    }

    /// vLLM's `maybe_filter_parallel_tool_calls` on a streamed delta: only call 0 is kept.
    pub fn filter_delta(&self, delta: &mut Value) {
        if !self.single_call {
            return;
        }
        if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
            calls.retain(|c| c.get("index").and_then(Value::as_u64) == Some(0));
        }
    }
}

/// Named tool choice: the answer is the arguments (nothing when it is blank).
fn named_calls(name: &str, text: &str) -> Vec<ToolCall> {
    if text.trim().is_empty() {
        return Vec::new();
    }
    vec![ToolCall {
        id: random_call_id(),
        name: name.to_string(),
        arguments: text.to_string(),
    }]
}

/// "required": a JSON array of function definitions (vLLM's
/// `TypeAdapter(list[FunctionDefinition])`); anything else gives no calls.
fn required_calls(text: &str) -> Vec<ToolCall> {
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let mut calls = Vec::new();
    for it in &items {
        let Some(name) = it.get("name").and_then(Value::as_str) else {
            return Vec::new();
        };
        let params = it.get("parameters").unwrap_or(&Value::Null);
        if !(params.is_object() || params.is_null()) {
            return Vec::new();
        }
        calls.push(ToolCall {
            id: random_call_id(),
            name: name.to_string(),
            arguments: super::pyjson::dumps(params),
        });
    }
    calls
}

fn tools_error(message: impl Into<String>) -> ApiError {
    ApiError::invalid_param("tools", message)
}

/// The function definitions of `tools` (name, parameters), checked as vLLM's request model
/// checks them.
/// A function tool: its name and parameters schema.
pub type Function = (String, Option<Map<String, Value>>);

pub fn functions(tools: &Value) -> Result<Vec<Function>, ApiError> {
    let Value::Array(items) = tools else {
        return Err(tools_error("`tools` must be a list of tools"));
    };
    let mut out = Vec::new();
    for (i, t) in items.iter().enumerate() {
        if t.get("type").is_some_and(|ty| ty != "function") {
            return Err(tools_error(format!(
                "tools[{i}].type: Input should be 'function'"
            )));
        }
        let Some(f) = t.get("function").and_then(Value::as_object) else {
            return Err(tools_error(format!(
                "tools[{i}].function: Field required (an object with a `name`)"
            )));
        };
        let Some(name) = f.get("name").and_then(Value::as_str) else {
            return Err(tools_error(format!(
                "tools[{i}].function.name: Field required (a string)"
            )));
        };
        let params = match f.get("parameters") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => {
                return Err(tools_error(format!(
                    "tools[{i}].function.parameters: Input should be a valid dictionary"
                )))
            }
        };
        out.push((name.to_string(), params));
    }
    Ok(out)
}

/// An empty or missing parameters schema still makes the arguments an object.
fn params_or_empty_object(p: Option<Map<String, Value>>) -> Value {
    match p {
        Some(m) if !m.is_empty() => Value::Object(m),
        _ => json!({"type": "object", "properties": {}}),
    }
}

fn py_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// The JSON schema that forces the answer for `tool_choice` (vLLM's
/// `get_json_schema_from_tools`): a named function's parameters; for "required" an array
/// (at least one item, at most one when `parallel_tool_calls` is false) of
/// `{"name": <one of the tools>, "parameters": <its schema>}`, the tools' `$defs` hoisted
/// to the top. `None` for "none" / "auto" / no tools.
pub fn tool_choice_schema(tools: &Value, tool_choice: &Value) -> Result<Option<Value>, ApiError> {
    required_or_named_schema(tools, tool_choice, None)
}

pub fn required_or_named_schema(
    tools: &Value,
    tool_choice: &Value,
    parallel_tool_calls: Option<bool>,
) -> Result<Option<Value>, ApiError> {
    if tools.is_null() {
        return Ok(None);
    }
    match tool_choice {
        Value::Object(_) => {
            let want = tool_choice
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let found = functions(tools)?.into_iter().find(|(n, _)| n == want);
            match found {
                Some((_, params)) => Ok(Some(params_or_empty_object(params))),
                None => Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("Tool '{want}' has not been passed in `tools`."),
                )),
            }
        }
        Value::String(s) if s == "required" => {
            let fns = functions(tools)?;
            if fns.is_empty() {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "tool_choice requires a function call, but tools contains no function \
                     tool the model can call.",
                ));
            }
            let mut defs = Map::new();
            let mut any_of = Vec::new();
            for (name, params) in fns {
                let mut params = params;
                if let Some(p) = params.as_mut() {
                    match p.remove("$defs") {
                        None => {}
                        Some(Value::Object(d)) => {
                            for (k, v) in d {
                                if defs.get(&k).is_some_and(|old| *old != v) {
                                    return Err(tools_error(format!(
                                        "Tool definition '{k}' has multiple schemas, which \
                                         is not supported."
                                    )));
                                }
                                defs.insert(k, v);
                            }
                        }
                        Some(other) => {
                            return Err(tools_error(format!(
                                "`$defs` in the parameters of tool '{name}' must be an \
                                 object, got {}.",
                                py_type_name(&other)
                            )))
                        }
                    }
                }
                any_of.push(json!({
                    "properties": {
                        "name": {"type": "string", "enum": [name]},
                        "parameters": params_or_empty_object(params),
                    },
                    "required": ["name", "parameters"],
                }));
            }
            let mut schema = json!({
                "type": "array",
                "minItems": 1,
                "items": {"type": "object", "anyOf": any_of},
            });
            if parallel_tool_calls == Some(false) {
                schema["maxItems"] = json!(1);
            }
            if !defs.is_empty() {
                schema["$defs"] = Value::Object(defs);
            }
            Ok(Some(schema))
        }
        _ => Ok(None),
    }
}

/// Streaming a named call (vLLM's `extract_named_tool_call_streaming`): the first delta
/// announces the call with the text so far as arguments, later ones add their text.
pub struct NamedStream {
    name: String,
    started: bool,
}

impl NamedStream {
    pub fn push(&mut self, delta: &str) -> Option<Value> {
        let d = if self.started {
            args_delta(0, delta.to_string())
        } else {
            self.started = true;
            start_delta(0, random_call_id(), &self.name, Some(delta.to_string()))
        };
        calls_message_null_content(vec![d])
    }
}

/// Streaming "required" (vLLM's `extract_required_tool_call_streaming`): each element of
/// the array is announced once its name is complete and its parameters have begun; the
/// parameters' raw text follows.
#[derive(Default)]
pub struct RequiredStream {
    text: String,
    /// Per announced call, the offset up to which its arguments were sent.
    sent_to: Vec<usize>,
}

#[derive(Default, Debug)]
struct Span {
    name: Option<String>,
    args_start: Option<usize>,
    args_end: Option<usize>,
}

/// The calls of a (partial) "required" array: names once complete, parameter spans.
fn scan_required(text: &str) -> Vec<Span> {
    #[derive(PartialEq)]
    enum E {
        Key,
        Colon,
        Value,
        InString,
        InContainer,
        InScalar,
        After,
    }
    let mut spans: Vec<Span> = Vec::new();
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    let mut string_start = 0;
    let mut cur = false;
    let mut expect = E::Key;
    let mut key: Option<String> = None;
    let mut value_start = 0;
    let end_value =
        |spans: &mut Vec<Span>, key: &Option<String>, expect: &E, vs: usize, pos: usize| {
            let s = spans.last_mut().expect("a current element");
            if key.as_deref() == Some("parameters") {
                s.args_end = Some(pos);
            } else if key.as_deref() == Some("name") && *expect == E::InString {
                s.name = serde_json::from_str::<String>(&text[vs..pos]).ok();
            }
        };
    for (i, ch) in text.char_indices() {
        if in_str {
            if esc {
                esc = false;
            } else if ch == '\\' {
                esc = true;
            } else if ch == '"' {
                in_str = false;
                if depth == 2 && cur {
                    if expect == E::Key {
                        key = Some(text[string_start + 1..i].to_string());
                        expect = E::Colon;
                    } else if expect == E::InString {
                        end_value(&mut spans, &key, &expect, value_start, i + 1);
                        expect = E::After;
                    }
                }
            }
            continue;
        }
        match ch {
            '"' => {
                in_str = true;
                string_start = i;
                if depth == 2 && cur && expect == E::Value {
                    value_start = i;
                    if key.as_deref() == Some("parameters") {
                        spans.last_mut().unwrap().args_start = Some(i);
                    }
                    expect = E::InString;
                }
            }
            '{' | '[' => {
                if depth == 0 && ch != '[' || depth == 1 && ch != '{' {
                    return spans;
                }
                if depth == 1 {
                    spans.push(Span::default());
                    cur = true;
                    expect = E::Key;
                    key = None;
                } else if depth == 2 && cur && expect == E::Value {
                    value_start = i;
                    if key.as_deref() == Some("parameters") {
                        spans.last_mut().unwrap().args_start = Some(i);
                    }
                    expect = E::InContainer;
                }
                depth += 1;
            }
            '}' | ']' => {
                if depth == 2 && cur && expect == E::InScalar {
                    end_value(&mut spans, &key, &expect, value_start, i);
                    expect = E::After;
                }
                depth -= 1;
                if depth == 2 && cur && expect == E::InContainer {
                    end_value(&mut spans, &key, &expect, value_start, i + 1);
                    expect = E::After;
                } else if depth == 1 {
                    cur = false;
                } else if depth <= 0 {
                    return spans;
                }
            }
            _ if depth != 2 || !cur => {}
            ':' if expect == E::Colon => expect = E::Value,
            ':' => {}
            ',' => {
                if expect == E::InScalar {
                    end_value(&mut spans, &key, &expect, value_start, i);
                }
                expect = E::Key;
                key = None;
            }
            c if c.is_whitespace() && expect == E::InScalar => {
                end_value(&mut spans, &key, &expect, value_start, i);
                expect = E::After;
            }
            c if c.is_whitespace() => {}
            _ if expect == E::Value => {
                value_start = i;
                if key.as_deref() == Some("parameters") {
                    spans.last_mut().unwrap().args_start = Some(i);
                }
                expect = E::InScalar;
            }
            _ => {}
        }
    }
    spans
}

impl RequiredStream {
    pub fn push(&mut self, delta: &str) -> Option<Value> {
        self.text.push_str(delta);
        let spans = scan_required(&self.text);
        let mut deltas = Vec::new();
        for (i, s) in spans.iter().enumerate() {
            let (Some(name), Some(start)) = (&s.name, s.args_start) else {
                break;
            };
            let end = s.args_end.unwrap_or(self.text.len());
            if i < self.sent_to.len() {
                let from = self.sent_to[i];
                if end > from {
                    deltas.push(args_delta(i, self.text[from..end].to_string()));
                    self.sent_to[i] = end;
                }
            } else {
                deltas.push(start_delta(
                    i,
                    random_call_id(),
                    name,
                    Some(self.text[start..end].to_string()),
                ));
                self.sent_to.push(end);
            }
        }
        calls_message_null_content(deltas)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::assemble;
    use super::super::Streamer;
    use super::*;

    fn tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}},
                "$defs": {"City": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "now"}}
        ])
    }

    #[test]
    fn schemas_as_vllm_builds_them() {
        let named = json!({"type": "function", "function": {"name": "now"}});
        assert_eq!(
            tool_choice_schema(&tools(), &named).unwrap(),
            Some(json!({"type": "object", "properties": {}}))
        );
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let s = tool_choice_schema(&tools(), &named).unwrap().unwrap();
        assert_eq!(s["$defs"]["City"]["type"], "string");
        let r = required_or_named_schema(&tools(), &json!("required"), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            json!({"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
                {"properties": {"name": {"type": "string", "enum": ["get_weather"]},
                    "parameters": {"type": "object",
                        "properties": {"city": {"$ref": "#/$defs/City"}}}},
                 "required": ["name", "parameters"]},
                {"properties": {"name": {"type": "string", "enum": ["now"]},
                    "parameters": {"type": "object", "properties": {}}},
                 "required": ["name", "parameters"]}]},
                "maxItems": 1, "$defs": {"City": {"type": "string"}}})
        );
        for c in [json!("auto"), json!("none")] {
            assert_eq!(tool_choice_schema(&tools(), &c).unwrap(), None);
        }
        let missing = json!({"type": "function", "function": {"name": "nope"}});
        let e = tool_choice_schema(&tools(), &missing).unwrap_err();
        assert_eq!(e.message, "Tool 'nope' has not been passed in `tools`.");
        let clash = json!([
            {"function": {"name": "a", "parameters": {"$defs": {"X": {"type": "string"}}}}},
            {"function": {"name": "b", "parameters": {"$defs": {"X": {"type": "integer"}}}}}
        ]);
        let e = tool_choice_schema(&clash, &json!("required")).unwrap_err();
        assert!(
            e.message.contains("'X' has multiple schemas"),
            "{}",
            e.message
        );
        let bad = json!([{"function": {"parameters": {}}}]);
        assert_eq!(
            tool_choice_schema(&bad, &json!("required"))
                .unwrap_err()
                .param
                .as_deref(),
            Some("tools")
        );
    }

    fn mode(choice: Choice, single_call: bool) -> ToolMode {
        ToolMode {
            choice,
            single_call,
            schema: None,
        }
    }

    #[test]
    fn constrained_answers_become_calls() {
        let named = mode(Choice::Named("get_weather".into()), false);
        let a = named.answer(r#"{"city": "Paris"}"#);
        assert_eq!(a.content.as_deref(), Some(""));
        assert_eq!(
            (a.calls[0].name.as_str(), a.calls[0].arguments.as_str()),
            ("get_weather", r#"{"city": "Paris"}"#)
        );
        assert!(!a.tool_calls_finish);
        assert_eq!(named.finish_reason(true, "stop"), "stop");
        assert!(named.answer("  ").calls.is_empty());

        let text = r#"[{"name": "get_weather", "parameters": {"city":"Oslo"}}, {"name": "now", "parameters": {}}]"#;
        let req = mode(Choice::Required, false);
        let a = req.answer(text);
        assert_eq!(a.calls.len(), 2);
        assert_eq!(a.calls[0].arguments, r#"{"city": "Oslo"}"#);
        assert_eq!(req.finish_reason(true, "stop"), "tool_calls");
        assert_eq!(req.finish_reason(true, "length"), "length");
        assert_eq!(mode(Choice::Required, true).answer(text).calls.len(), 1);
        assert!(req.answer("[{\"name\": 3}]").calls.is_empty());
        assert!(req.answer("not json").calls.is_empty());
    }

    fn stream_all(m: &ToolMode, pieces: &[&str]) -> Vec<Value> {
        let mut s: Streamer = m.streamer();
        pieces.iter().filter_map(|p| s.push(p)).collect()
    }

    #[test]
    fn named_and_required_streams_assemble_into_the_calls() {
        let args = r#"{"city": "Paris"}"#;
        let named = mode(Choice::Named("get_weather".into()), false);
        for i in 0..args.len() {
            let d = stream_all(&named, &[&args[..i], &args[i..]]);
            let (_, calls) = assemble(&d);
            assert_eq!(
                (calls[0].1.as_str(), calls[0].2.as_str()),
                ("get_weather", args)
            );
        }
        let text = r#"[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "now", "parameters": {}}]"#;
        let req = mode(Choice::Required, false);
        let mut cuts: Vec<Vec<&str>> = (0..text.len())
            .map(|i| vec![&text[..i], &text[i..]])
            .collect();
        cuts.push(text.split_inclusive(|_| true).collect());
        for pieces in cuts {
            let (_, calls) = assemble(&stream_all(&req, &pieces));
            let got: Vec<(&str, &str)> =
                calls.iter().map(|c| (c.1.as_str(), c.2.as_str())).collect();
            assert_eq!(
                got,
                [("get_weather", r#"{"city": "Oslo"}"#), ("now", "{}")],
                "{pieces:?}"
            );
        }
    }
}
