//! Tool calls constrained in `tool_choice: "auto"` answers, as vLLM 0.32's structural tags
//! constrain them for the hermes and llama3_json parsers (`vllm/tool_parsers/
//! structural_tag_registry.py`, xgrammar's `get_llama_structural_tag`): the answer is free
//! text, but once the parser's trigger appears (`<tool_call>`, `{"name": `) the rest of the
//! call must follow the parser's format, naming one of the tools, with arguments that are
//! JSON, held to the tool's `parameters` schema when the tool says `strict: true` (or the
//! server runs with `--tool-strict-level parameter`). Built as an llguidance Lark grammar.
//!
//! When vLLM applies one (`resolve_tool_strictness`): a tool says `strict: true`, or
//! `--tool-strict-level` is `function` / `parameter`, or `parallel_tool_calls` is false (which
//! raises the level to `function` unless the request also has structured outputs); with
//! `parallel_tool_calls` false the answer ends after its first call. `"required"` and named
//! choices keep their JSON-schema form (`choice.rs`), which holds every tool's arguments to
//! its schema: at least what a structural tag asks.

use serde_json::{json, Map, Value};

use super::ParserKind;
use crate::error::ApiError;

/// `--tool-strict-level` (vLLM's `ToolStrictLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum StrictLevel {
    /// Calls constrained when a tool says `strict: true`; arguments held to the schema only
    /// for such tools.
    #[default]
    Auto,
    /// The call envelope constrained for every request with tools.
    Function,
    /// As `Function`, with every tool's arguments held to its schema.
    Parameter,
}

impl StrictLevel {
    pub const NAMES: &'static [&'static str] = &["auto", "function", "parameter"];

    /// The level for a flag value (vLLM: trimmed, any case).
    pub fn parse(s: &str) -> Option<StrictLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(StrictLevel::Auto),
            "function" => Some(StrictLevel::Function),
            "parameter" => Some(StrictLevel::Parameter),
            _ => None,
        }
    }
}

/// The call formats vLLM 0.32 has structural tags for (a parser's `structural_tag_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>` (or without the
    /// newlines).
    Hermes,
    /// `{"name": "f", "parameters": {...}}`.
    Llama,
}

fn format_of(parser: ParserKind) -> Option<Format> {
    match parser {
        ParserKind::Hermes => Some(Format::Hermes),
        ParserKind::Llama3Json => Some(Format::Llama),
        ParserKind::Mistral { .. } => None,
    }
}

/// Whether `--tool-strict-level` can change anything with this parser (the mistral parser
/// has no structural tag in vLLM 0.32 either).
pub fn level_applies(parser: Option<ParserKind>) -> bool {
    parser.and_then(format_of).is_some()
}

/// What starts a llama3_json call (the rest of the call follows in the `call` rule).
const LLAMA_TRIGGER: &str = "{\"name\": ";

/// A JSON string literal: how names and fixed text enter the Lark grammar.
fn lit(s: &str) -> String {
    Value::from(s).to_string()
}

/// `s` as a regex matching itself (inside a Lark `/.../` literal).
fn regex_lit(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The Lark grammar that constrains an auto answer with `tools` (already checked by
/// `choice::functions`) and no structured output, or `None` where vLLM 0.32 leaves the
/// answer free. `parallel_tool_calls: false` raises the level to `function` (beside a
/// structured output it does not: [`required_calls`]).
pub fn auto_grammar(
    parser: ParserKind,
    tools: &Value,
    level: StrictLevel,
    single_call: bool,
) -> Result<Option<String>, ApiError> {
    let level = if single_call {
        level.max(StrictLevel::Function)
    } else {
        level
    };
    let Some(parts) = parts(parser, tools, level)? else {
        return Ok(None);
    };
    let start = if single_call {
        "start: TEXT | pre call"
    } else {
        "start: (pre call)* TEXT"
    };
    Ok(Some(format!("{start}\n{}", parts.rules)))
}

/// For an auto answer that also asks for structured outputs: the Lark rules (start rule
/// `calls`) of the tools' calls in the form vLLM 0.32 gives "required" (hermes: calls back to
/// back, nothing else; llama: a call first, then free text and calls), to be joined with the
/// structured output as one or the other (`GrammarKind::ToolsOr`); `None` where the calls
/// are left free (then the structured output alone applies, as in vLLM).
pub fn required_calls(
    parser: ParserKind,
    tools: &Value,
    level: StrictLevel,
    single_call: bool,
) -> Result<Option<String>, ApiError> {
    let Some(parts) = parts(parser, tools, level)? else {
        return Ok(None);
    };
    let calls = match (parts.format, single_call) {
        (Format::Hermes, false) => "calls: (\"<tool_call>\" call)+".to_string(),
        (Format::Hermes, true) => "calls: \"<tool_call>\" call".to_string(),
        // xgrammar's triggered tags with `at_least_one`: the answer opens with a call; after
        // it, free text and more calls as in an auto answer. The opening `{` is a lexeme of
        // its own, as the structured output's `{` is: the whole trigger as one lexeme had
        // the output's `{` as a prefix, and llguidance's lexer, extending the longer one,
        // refused `{"answer": 7}` (so did free text first, a lazy lexeme that swallowed it).
        (Format::Llama, single) => format!(
            "calls: \"{{\" {} call{}",
            lit(&LLAMA_TRIGGER[1..]),
            if single { "" } else { " (pre call)* TEXT" }
        ),
    };
    Ok(Some(format!("{calls}\n{}", parts.rules)))
}

/// The rules every tool grammar shares: `pre` (free text up to and including the trigger),
/// `TEXT` (free text without it), `call` (the rest of one call, after the trigger) and each
/// tool's arguments.
struct Parts {
    format: Format,
    rules: String,
}

/// The shared rules, or `None` where vLLM 0.32 applies no structural tag (a parser without
/// one; the level `auto` with no strict tool).
fn parts(parser: ParserKind, tools: &Value, level: StrictLevel) -> Result<Option<Parts>, ApiError> {
    let fns = functions(tools)?;
    let any_strict = fns.iter().any(|f| f.strict);
    let Some(format) = format_of(parser) else {
        if any_strict {
            // vLLM 0.32 has no structural tag for this parser either and serves such tools
            // unconstrained; said once, not per request.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "tools with `strict: true` are not enforced with this --tool-call-parser \
                     (as in vLLM 0.32, which has structural tags for hermes and llama3_json \
                     only): their calls are read from free text"
                )
            });
        }
        return Ok(None);
    };
    if (level == StrictLevel::Auto && !any_strict) || fns.is_empty() {
        return Ok(None);
    }
    let whitespace = json!({
        "whitespace_flexible": true,
        "whitespace_pattern": tpuserve_engine::structured::JSON_WHITESPACE,
    });
    let mut rules = Vec::new();
    let mut calls = Vec::new();
    for (i, f) in fns.iter().enumerate() {
        // vLLM's `get_function_parameters`: the schema for strict tools (any JSON when it
        // has none), any JSON otherwise.
        let mut schema = match (&f.parameters, f.strict || level == StrictLevel::Parameter) {
            (Some(p), true) => {
                // xgrammar's strict mode, which vLLM's tags compile with: objects that list
                // properties take no others unless they say.
                let mut v = Value::Object(p.clone());
                tpuserve_engine::structured::close_objects(&mut v);
                v
            }
            _ => json!({}),
        };
        if let Value::Object(m) = &mut schema {
            m.entry("x-guidance").or_insert_with(|| whitespace.clone());
        }
        rules.push(format!("args_{i}: %json {schema}"));
        match format {
            Format::Hermes => {
                let head = format!("{{\"name\": \"{}\", \"arguments\": ", f.name);
                calls.push(format!(
                    "{} args_{i} {} | {} args_{i} {}",
                    lit(&format!("\n{head}")),
                    lit("}\n</tool_call>"),
                    lit(&head),
                    lit("}</tool_call>"),
                ));
            }
            Format::Llama => {
                calls.push(format!(
                    "{} args_{i} {}",
                    lit(&format!("\"{}\", \"parameters\": ", f.name)),
                    lit("}"),
                ));
            }
        }
    }
    // Free text never holds the trigger (nor, for Llama, thinking tags: xgrammar's
    // `excludes`); `pre` is free text up to and including the first trigger.
    let (trigger, excluded): (&str, &[&str]) = match format {
        Format::Hermes => ("<tool_call>", &[]),
        Format::Llama => (LLAMA_TRIGGER, &["<think>", "</think>"]),
    };
    let not_in = |list: &[&str]| {
        list.iter()
            .map(|e| format!(" & ~/(?s:.*){}(?s:.*)/", regex_lit(e)))
            .collect::<String>()
    };
    let (pre_not_in, text_not_in) = (not_in(excluded), not_in(&[&[trigger], excluded].concat()));
    let rules = format!(
        "pre[lazy]: /(?s:.*){trigger}/{pre_not_in}\n\
         TEXT: /(?s:.*)/{text_not_in}\n\
         call: {calls}\n\
         {rules}\n",
        trigger = regex_lit(trigger),
        calls = calls.join("\n    | "),
        rules = rules.join("\n"),
    );
    Ok(Some(Parts { format, rules }))
}

/// llguidance's error for a grammar built here, without what only makes sense for its Lark
/// text: the `at line(column): ` prefix and the source lines quoted after the cause (" 3 |
/// TEXT: …"). What is left names the problem, e.g. "failed to compile JSON schema: Invalid
/// type: nonsense".
pub fn grammar_error(m: &str) -> String {
    let m = match m.strip_prefix("at ") {
        Some(rest) => match rest.split_once("): ") {
            Some((pos, cause)) if pos.chars().all(|c| c.is_ascii_digit() || c == '(') => cause,
            _ => m,
        },
        None => m,
    };
    // The quoted source starts at the first " <line> | ".
    let cut = m.match_indices(" | ").find_map(|(i, _)| {
        let head = &m[..i];
        let digits = head.len() - head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        (digits > 0 && head[..head.len() - digits].ends_with(' ')).then(|| head.len() - digits - 1)
    });
    m[..cut.unwrap_or(m.len())].trim_end().to_string()
}

/// A function tool as the grammar needs it.
struct Function {
    name: String,
    parameters: Option<Map<String, Value>>,
    strict: bool,
}

/// The tools' names, schemas and `strict` (a boolean or null, as vLLM's
/// `FunctionDefinition.strict`).
fn functions(tools: &Value) -> Result<Vec<Function>, ApiError> {
    let fns = super::choice::functions(tools)?;
    let items = tools.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut out = Vec::new();
    for (i, ((name, parameters), t)) in fns.into_iter().zip(items).enumerate() {
        let strict = match t.pointer("/function/strict") {
            None | Some(Value::Null) => false,
            Some(v) => lax_bool(v).ok_or_else(|| {
                ApiError::invalid_param(
                    "tools",
                    format!(
                        "tools[{i}].function.strict: Input should be a valid boolean, unable \
                         to interpret input"
                    ),
                )
            })?,
        };
        out.push(Function {
            name,
            parameters,
            strict,
        });
    }
    Ok(out)
}

/// A boolean as pydantic reads one in its default (lax) mode, as vLLM's request models do:
/// `true` / `false`, 0 / 1, and the strings "1", "on", "t", "true", "y", "yes" and "0", "off",
/// "f", "false", "n", "no" in any case ("yes" makes a tool strict there).
fn lax_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Some(false),
            Some(1.0) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
            "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(strict: Option<bool>) -> Value {
        let mut f = json!({
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
                "required": ["city"],
            },
        });
        if let Some(s) = strict {
            f["strict"] = s.into();
        }
        json!([{"type": "function", "function": f}, {"type": "function", "function": {"name": "now"}}])
    }

    #[test]
    fn levels_parse_as_vllm_reads_them() {
        assert_eq!(
            StrictLevel::parse(" Function "),
            Some(StrictLevel::Function)
        );
        assert_eq!(
            StrictLevel::parse("PARAMETER"),
            Some(StrictLevel::Parameter)
        );
        assert_eq!(StrictLevel::parse("auto"), Some(StrictLevel::Auto));
        assert_eq!(StrictLevel::parse("strict"), None);
    }

    #[test]
    fn auto_answers_are_free_unless_a_tool_is_strict_or_the_level_or_single_call_says() {
        let g = |strict, level, single, so| {
            if so {
                required_calls(ParserKind::Hermes, &tools(strict), level, single).unwrap()
            } else {
                auto_grammar(ParserKind::Hermes, &tools(strict), level, single).unwrap()
            }
        };
        assert_eq!(g(None, StrictLevel::Auto, false, false), None);
        assert_eq!(g(Some(false), StrictLevel::Auto, false, false), None);
        assert!(g(Some(true), StrictLevel::Auto, false, false).is_some());
        assert!(g(None, StrictLevel::Function, false, false).is_some());
        assert!(g(None, StrictLevel::Parameter, false, true).is_some());
        // parallel_tool_calls false raises the level, except beside structured outputs.
        assert!(g(None, StrictLevel::Auto, true, false).is_some());
        assert_eq!(g(None, StrictLevel::Auto, true, true), None);
        // The mistral parser has no structural tag.
        let mistral = ParserKind::Mistral { v11: true };
        let t = tools(Some(true));
        assert_eq!(
            auto_grammar(mistral, &t, StrictLevel::Parameter, true).unwrap(),
            None
        );
    }

    #[test]
    fn arguments_follow_the_schema_only_for_strict_tools_or_the_parameter_level() {
        let g = |strict, level| {
            auto_grammar(ParserKind::Llama3Json, &tools(strict), level, false)
                .unwrap()
                .unwrap()
        };
        assert!(g(Some(true), StrictLevel::Auto).contains("\"enum\":[\"Paris\",\"London\"]"));
        assert!(!g(None, StrictLevel::Function).contains("enum"));
        assert!(g(None, StrictLevel::Parameter).contains("enum"));
        assert!(g(None, StrictLevel::Function)
            .contains("\"\\\"get_weather\\\", \\\"parameters\\\": \""));
    }

    #[test]
    fn grammar_errors_lose_the_lark_positions_and_quoted_lines() {
        let m = "at 5(9): failed to compile JSON schema: Invalid type: nonsense 3 | TEXT: /x/ \
                 4 | call: \"a\" | \"b\"";
        assert_eq!(
            grammar_error(m),
            "failed to compile JSON schema: Invalid type: nonsense"
        );
        assert_eq!(grammar_error("no position | here"), "no position | here");
    }

    #[test]
    fn a_strict_field_that_is_not_a_boolean_is_refused() {
        let mut t = tools(None);
        for (v, strict) in [
            (json!("yes"), true),
            (json!("Off"), false),
            (json!(1), true),
        ] {
            t[0]["function"]["strict"] = v;
            let g = auto_grammar(ParserKind::Hermes, &t, StrictLevel::Auto, false);
            assert_eq!(g.unwrap().is_some(), strict);
        }
        t[0]["function"]["strict"] = json!("maybe");
        let e = auto_grammar(ParserKind::Hermes, &t, StrictLevel::Auto, false).unwrap_err();
        assert!(
            e.message.contains("tools[0].function.strict"),
            "{}",
            e.message
        );
        assert_eq!(e.param.as_deref(), Some("tools"));
    }

    /// The grammars compiled by the engine for the real SmolLM2 tokenizer: which answers
    /// they let through, token by token.
    mod answers {
        use super::*;
        use std::sync::{Arc, OnceLock};
        use tpuserve_engine::structured::{
            model_tok_env, ConstraintSpec, GrammarCompiler, GrammarKind,
        };
        use tpuserve_model::gguf::GgufFile;
        use tpuserve_model::Tokenizer;

        fn fixture() -> &'static (Arc<Tokenizer>, GrammarCompiler) {
            static F: OnceLock<(Arc<Tokenizer>, GrammarCompiler)> = OnceLock::new();
            F.get_or_init(|| {
                let path = tpuserve_model::locate::smollm2_gguf()
                    .expect("SmolLM2 GGUF not found: run scripts/setup.sh");
                let tok = Arc::new(Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap());
                let eos = tok.token_to_id("<|im_end|>").unwrap();
                let env = model_tok_env(tok.clone(), tok.vocab_size(), &[eos]).unwrap();
                (tok.clone(), GrammarCompiler::new(&env).unwrap())
            })
        }

        /// Whether the grammar takes `text` as a whole answer.
        fn takes(grammar: &str, text: &str) -> bool {
            let (tok, compiler) = fixture();
            let spec = ConstraintSpec::new(GrammarKind::Grammar(grammar.to_string()));
            let (c, _) = compiler.compile(&spec).expect("the grammar compiles");
            let mut m = c.matcher();
            let ids = tok.encode(text, false).unwrap();
            m.consume_tokens(&ids).is_ok() && m.is_accepting().unwrap_or(false)
        }

        /// The auto grammar for `tools(strict)` at the default level.
        fn grammar(parser: ParserKind, strict: Option<bool>, single_call: bool) -> String {
            auto_grammar(parser, &tools(strict), StrictLevel::Auto, single_call)
                .unwrap()
                .expect("constrained")
        }

        /// Whether the calls-or-output grammar (`required_calls` joined with a JSON schema
        /// output, as the gate joins them) takes `text`.
        fn takes_either(parser: ParserKind, single_call: bool, output: Value, text: &str) -> bool {
            let calls = required_calls(parser, &tools(Some(true)), StrictLevel::Auto, single_call)
                .unwrap()
                .expect("constrained");
            let (tok, compiler) = fixture();
            let spec = ConstraintSpec::new(GrammarKind::ToolsOr {
                calls,
                output: Box::new(GrammarKind::JsonSchema(output)),
            });
            let (c, _) = compiler.compile(&spec).expect("the grammar compiles");
            let mut m = c.matcher();
            let ids = tok.encode(text, false).unwrap();
            m.consume_tokens(&ids).is_ok() && m.is_accepting().unwrap_or(false)
        }

        #[test]
        fn beside_a_structured_output_the_answer_is_calls_or_that_output() {
            let out = json!({"type": "object", "properties": {"answer": {"type": "integer"}},
                             "required": ["answer"]});
            let call = |city: &str| {
                format!("<tool_call>{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}</tool_call>")
            };
            let h =
                |single, text: &str| takes_either(ParserKind::Hermes, single, out.clone(), text);
            assert!(h(false, r#"{"answer": 42}"#));
            assert!(h(false, &call("Paris")));
            assert!(h(false, &format!("{}{}", call("Paris"), call("London"))));
            assert!(!h(true, &format!("{}{}", call("Paris"), call("London"))));
            // Hermes' "required" form is calls alone; free text is neither.
            assert!(!h(false, &format!("Sure. {}", call("Paris"))));
            assert!(!h(false, "The answer is 42."));
            assert!(!h(false, r#"{"answer": "x"}"#));
            assert!(!h(false, &call("Rome")), "strict: the enum holds");
            let extra = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "x": 1}}</tool_call>"#;
            assert!(
                !h(false, extra),
                "strict: no properties beyond the schema's"
            );
            // Llama's "required" form (xgrammar's `at_least_one`): a call first, then free
            // text and calls; the output alone otherwise.
            let lcall = |city: &str| {
                format!(r#"{{"name": "get_weather", "parameters": {{"city": "{city}"}}}}"#)
            };
            let l = |single, text: &str| {
                takes_either(ParserKind::Llama3Json, single, out.clone(), text)
            };
            assert!(l(false, r#"{"answer": 42}"#));
            assert!(l(false, r#"{ "answer": 42 }"#));
            assert!(l(false, &lcall("Paris")));
            assert!(l(true, &lcall("Paris")));
            assert!(l(
                false,
                &format!("{} and {}", lcall("Paris"), lcall("London"))
            ));
            assert!(l(false, &format!("{}\nDone.", lcall("Paris"))));
            assert!(!l(true, &format!("{}\nDone.", lcall("Paris"))));
            assert!(!l(true, &format!("{}{}", lcall("Paris"), lcall("London"))));
            assert!(!l(false, &format!("Sure. {}", lcall("Paris"))));
            assert!(!l(false, "The answer is 42."));
            assert!(!l(false, r#"{"answer": "x"}"#));
            assert!(!l(false, &lcall("Rome")), "strict: the enum holds");
            assert!(!l(
                false,
                r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#
            ));
        }

        #[test]
        fn hermes_strict_calls_follow_the_schema_and_text_stays_free() {
            let g = grammar(ParserKind::Hermes, Some(true), false);
            let call = |args: &str| {
                format!("<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {args}}}\n</tool_call>")
            };
            assert!(takes(&g, "It is sunny."));
            assert!(takes(&g, ""));
            assert!(takes(&g, &call(r#"{"city": "Paris"}"#)));
            assert!(takes(
                &g,
                &format!("Let me look. {} Done.", call(r#"{"city": "London"}"#))
            ));
            assert!(takes(
                &g,
                &format!(
                    "{}{}",
                    call(r#"{"city": "Paris"}"#),
                    call(r#"{"city": "London"}"#)
                )
            ));
            assert!(takes(
                &g,
                r#"<tool_call>{"name": "now", "arguments": {"any": [1, 2]}}</tool_call>"#
            ));
            // Arguments off the strict schema, an unknown tool, a broken envelope.
            assert!(!takes(&g, &call(r#"{"city": "Rome"}"#)));
            assert!(!takes(&g, &call(r#""Paris""#)));
            assert!(!takes(
                &g,
                r#"<tool_call>{"name": "other", "arguments": {}}</tool_call>"#
            ));
            assert!(!takes(&g, r#"<tool_call>{"city": "Paris"}</tool_call>"#));
            assert!(!takes(&g, "<tool_call>"));
        }

        #[test]
        fn a_single_call_ends_the_answer() {
            let g = grammar(ParserKind::Hermes, None, true);
            let call = r#"<tool_call>{"name": "get_weather", "arguments": "Rome"}</tool_call>"#;
            assert!(takes(&g, call), "not strict: any JSON arguments");
            assert!(takes(&g, &format!("Sure. {call}")));
            assert!(!takes(&g, &format!("{call} More text.")));
            assert!(!takes(&g, &format!("{call}{call}")));
        }

        #[test]
        fn llama_calls_take_the_parameters_field() {
            let g = grammar(ParserKind::Llama3Json, Some(true), false);
            assert!(takes(
                &g,
                r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#
            ));
            assert!(takes(&g, "No call needed."));
            assert!(!takes(
                &g,
                r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#
            ));
            assert!(!takes(
                &g,
                r#"{"name": "get_weather", "parameters": {"city": "Oslo"}}"#
            ));
            assert!(!takes(&g, "<think>x</think>"));
            assert!(!takes(
                &g,
                r#"<think>x {"name": "get_weather", "parameters": {"city": "Paris"}}"#
            ));
        }
    }
}
