//! Structured outputs: a request's JSON schema, regex, choice or grammar compiled by
//! llguidance into a parser; each constrained child sequence holds a [`Matcher`] advanced by
//! every token it accepts, and before each of its draws the engine hands the runner the
//! packed mask of tokens the grammar allows.

mod gbnf;
mod tok_env;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::TokEnv;
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde::Serialize;
use serde_json::{json, Value};
use tpuserve_runner_api::TokenBitmask;

pub use tok_env::model_tok_env;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConstraintError {
    /// The schema, regex or grammar cannot be used (a 400 naming the problem).
    #[error("{0}")]
    Invalid(String),
    #[error("structured outputs are unavailable: {0}")]
    Tokenizer(String),
}

/// Whitespace between JSON tokens when the request does not say: up to 20 characters per
/// gap, enough for pretty-printed JSON several levels deep. Unbounded whitespace (JSON's own
/// rule) lets a small model emit newlines until `max_tokens` and return a truncated
/// document; whitespace never changes the value, so the bound costs nothing valid.
pub const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,20}";

/// What the output must match (vLLM's `StructuredOutputsParams`, one kind at a time).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum GrammarKind {
    JsonSchema(Value),
    /// Any JSON object (`json_object` / `response_format: json_object`).
    JsonObject,
    Regex(String),
    Choice(Vec<String>),
    /// Lark, or GBNF / EBNF (`rule ::= ...`).
    Grammar(String),
    /// Either the tool calls that the Lark rules `calls` describes (their start rule is
    /// `calls`) or the structured output `output` (a JSON schema, any JSON object or a
    /// choice): vLLM 0.32's `OrFormat` of a tools structural tag and a response format.
    ToolsOr {
        calls: String,
        output: Box<GrammarKind>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConstraintSpec {
    pub kind: GrammarKind,
    /// JSON only: no whitespace between tokens (vLLM's `disable_any_whitespace`).
    pub disable_any_whitespace: bool,
    /// JSON only: objects with `properties` get `additionalProperties: false` unless they say.
    pub disable_additional_properties: bool,
    /// JSON only: the regex whitespace between tokens must match.
    pub whitespace_pattern: Option<String>,
}

impl ConstraintSpec {
    pub fn new(kind: GrammarKind) -> Self {
        ConstraintSpec {
            kind,
            disable_any_whitespace: false,
            disable_additional_properties: false,
            whitespace_pattern: None,
        }
    }

    /// `schema` with this spec's JSON options applied (closed objects, whitespace).
    fn json_value(&self, mut schema: Value) -> Result<Value, ConstraintError> {
        {
            if self.disable_additional_properties {
                close_objects(&mut schema);
            }
            match &mut schema {
                Value::Object(map) => {
                    // A schema's own `x-guidance` settings win over the request-level ones.
                    if !map.contains_key("x-guidance") {
                        let mut opts = json!({"whitespace_flexible": !self.disable_any_whitespace});
                        let pattern = match &self.whitespace_pattern {
                            Some(p) => Some(p.as_str()),
                            None if !self.disable_any_whitespace => Some(JSON_WHITESPACE),
                            None => None,
                        };
                        if let Some(p) = pattern {
                            opts["whitespace_pattern"] = p.into();
                        }
                        map.insert("x-guidance".into(), opts);
                    }
                }
                Value::Bool(_) => {}
                _ => {
                    return Err(ConstraintError::Invalid(
                        "a JSON schema must be an object or a boolean".into(),
                    ))
                }
            }
            Ok(schema)
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        let json_schema = |schema: Value| -> Result<TopLevelGrammar, ConstraintError> {
            Ok(TopLevelGrammar::from_json_schema(self.json_value(schema)?))
        };
        let lark_choice = |c: &[String]| -> Result<String, ConstraintError> {
            if c.is_empty() {
                return Err(ConstraintError::Invalid("choice must not be empty".into()));
            }
            let alts: Vec<String> = c
                .iter()
                .map(|s| Value::from(s.as_str()).to_string())
                .collect();
            Ok(alts.join(" | "))
        };
        match &self.kind {
            GrammarKind::ToolsOr { calls, output } => {
                let output =
                    match output.as_ref() {
                        GrammarKind::JsonSchema(s) => {
                            // `%json` takes an object: `true` is any JSON, `false` nothing.
                            let s = match s {
                                Value::Bool(true) => json!({}),
                                Value::Bool(false) => {
                                    return Err(ConstraintError::Invalid(
                                        "the JSON schema `false` allows no output".into(),
                                    ))
                                }
                                s => s.clone(),
                            };
                            format!("%json {}", self.json_value(s)?)
                        }
                        GrammarKind::JsonObject => {
                            format!("%json {}", self.json_value(json!({"type": "object"}))?)
                        }
                        GrammarKind::Choice(c) => lark_choice(c)?,
                        _ => return Err(ConstraintError::Invalid(
                            "only a JSON schema, a JSON object or a choice can be combined with \
                             constrained tool calls"
                                .into(),
                        )),
                    };
                Ok(TopLevelGrammar::from_lark(format!(
                    "start: calls | output\noutput: {output}\n{calls}"
                )))
            }
            GrammarKind::JsonSchema(s) => json_schema(s.clone()),
            GrammarKind::JsonObject => json_schema(json!({"type": "object"})),
            GrammarKind::Regex(r) => Ok(TopLevelGrammar::from_regex(r)),
            GrammarKind::Choice(c) => Ok(TopLevelGrammar::from_lark(format!(
                "start: {}",
                lark_choice(c)?
            ))),
            GrammarKind::Grammar(g) => {
                if g.trim().is_empty() {
                    return Err(ConstraintError::Invalid("the grammar is empty".into()));
                }
                if gbnf::is_gbnf(g) {
                    let lark = gbnf::to_lark(g)
                        .map_err(|e| ConstraintError::Invalid(format!("grammar: {e}")))?;
                    Ok(TopLevelGrammar::from_lark(lark))
                } else {
                    TopLevelGrammar::from_lark_or_grammar_list(g)
                        .map_err(|e| ConstraintError::Invalid(format!("grammar: {e}")))
                }
            }
        }
    }

    /// The cache key: the spec's canonical text.
    fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `additionalProperties: false` on every object schema with properties that does not set it
/// (vLLM's `disable_additional_properties` walk).
pub fn close_objects(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, sub) in map.iter_mut() {
                if k != "enum" && k != "const" && k != "default" && k != "examples" {
                    close_objects(sub);
                }
            }
            let has_props = map.get("properties").is_some_and(Value::is_object)
                || map.get("patternProperties").is_some_and(Value::is_object);
            if has_props && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// A compiled grammar; each constrained sequence gets its own [`Constraint::matcher`].
#[derive(Clone)]
pub struct Constraint {
    parser: TokenParser,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    pub fn matcher(&self) -> Matcher {
        Matcher::new(Ok(self.parser.clone()))
    }
}

/// Compiled grammars are kept by their text, newest last, this many at most.
const CACHE_ENTRIES: usize = 256;

/// Compiles constraint specs for one model's tokenizer, with bounded work per grammar and a
/// cache of compiled grammars.
pub struct GrammarCompiler {
    factory: ParserFactory,
    cache: Mutex<(HashMap<String, Constraint>, VecDeque<String>)>,
}

impl GrammarCompiler {
    pub fn new(env: &TokEnv) -> Result<Self, ConstraintError> {
        let mut factory = ParserFactory::new_simple(env)
            .map_err(|e| ConstraintError::Tokenizer(e.to_string()))?;
        factory.quiet();
        // Bounds on compile and per-token work so a hostile schema cannot stall the engine:
        // llguidance's defaults, with a smaller grammar (its default admits megabytes).
        *factory.limits_mut() = ParserLimits {
            max_grammar_size: 200_000,
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(GrammarCompiler {
            factory,
            cache: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    /// Compiles `spec` (or finds it in the cache). Returns whether it was cached.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<(Constraint, bool), ConstraintError> {
        let key = spec.key();
        if let Some(c) = self.cache.lock().unwrap().0.get(&key) {
            return Ok((c.clone(), true));
        }
        let grammar = spec.grammar()?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Invalid(first_line(&format!("{e:#}"))))?;
        let constraint = Constraint { parser };
        // The first mask is where many errors surface (an unsatisfiable schema, a lexer that
        // runs out of fuel): better a 400 now than an error after the request was accepted.
        let mut m = constraint.matcher();
        m.compute_mask()
            .map_err(|e| ConstraintError::Invalid(first_line(&format!("{e:#}"))))?;
        let mut cache = self.cache.lock().unwrap();
        if cache.0.insert(key.clone(), constraint.clone()).is_none() {
            cache.1.push_back(key);
            while cache.1.len() > CACHE_ENTRIES {
                if let Some(old) = cache.1.pop_front() {
                    cache.0.remove(&old);
                }
            }
        }
        Ok((constraint, false))
    }
}

/// llguidance errors span lines (a regex error points at the column below the pattern): one
/// line, bounded, for an HTTP error message.
fn first_line(s: &str) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > 600 {
        let mut end = 600;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &line[..end])
    } else {
        line
    }
}

/// The packed mask of what `m` allows next; `None` with the error if the matcher failed.
pub fn next_mask(m: &mut Matcher) -> Result<TokenBitmask, String> {
    let vob = m
        .compute_mask_or_eos()
        .map_err(|e| first_line(&e.to_string()))?;
    Ok(vob.as_slice().into())
}

#[cfg(test)]
mod tests;
