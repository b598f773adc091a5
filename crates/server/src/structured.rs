//! Structured-output request fields — `response_format`, vLLM's `structured_outputs`, and the
//! older `guided_*` extras — turned into one [`ConstraintSpec`], compiled (bounded in time,
//! cached by text) before the request reaches the engine, so a bad schema is a 400 before any
//! token.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use tpuserve_engine::structured::{
    model_tok_env, Constraint, ConstraintError, ConstraintSpec, GrammarCompiler, GrammarKind,
};
use tpuserve_model::Tokenizer;

use crate::error::ApiError;

/// The request fields (both routes).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct StructuredFields {
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {name, schema, strict}}`.
    pub response_format: Option<Value>,
    /// vLLM's `StructuredOutputsParams`.
    pub structured_outputs: Option<Value>,
    /// Older vLLM extras (removed from vLLM 0.32, which now ignores them: honoured here, as
    /// the same constraints, rather than dropped).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub guided_decoding_backend: Option<Value>,
    pub guided_whitespace_pattern: Option<Value>,
}

fn bad(field: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid_param(field, msg.into())
}

/// A JSON schema given as an object or as its text.
fn schema_value(field: &str, v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| bad(field, format!("{field} is not valid JSON: {e}"))),
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(bad(
            field,
            format!("{field} must be a JSON schema (an object or its text)"),
        )),
    }
}

fn string_field(field: &str, v: &Value) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(field, format!("{field} must be a string")))
}

fn choices(field: &str, v: &Value) -> Result<Vec<String>, ApiError> {
    let items = v
        .as_array()
        .ok_or_else(|| bad(field, format!("{field} must be a list of strings")))?;
    if items.is_empty() {
        return Err(bad(field, format!("{field} must not be empty")));
    }
    items
        .iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(field, format!("{field} must be a list of strings")))
        })
        .collect()
}

/// Backends vLLM knows; any of them is served by llguidance here (same constraint semantics).
const BACKENDS: &[&str] = &[
    "auto",
    "guidance",
    "llguidance",
    "xgrammar",
    "outlines",
    "lm-format-enforcer",
];

impl StructuredFields {
    /// The one constraint the fields ask for, if any, and the request field it came from
    /// (what a later error names).
    pub fn spec(&self) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
        let mut spec = self
            .structured_outputs_spec()?
            .map(|s| (s, "structured_outputs"));
        // response_format overrides the kind, keeping structured_outputs' options (vLLM's
        // `structured_outputs_from_response_format`).
        if let Some(kind) = self.response_format_kind()? {
            let s = match spec {
                Some((mut s, _)) => {
                    s.kind = kind;
                    s
                }
                None => ConstraintSpec::new(kind),
            };
            spec = Some((s, "response_format"));
        }
        let guided = self.guided_spec()?;
        match (spec, guided) {
            (Some(_), Some(_)) => Err(bad(
                "guided_json",
                "the guided_* fields and structured_outputs / response_format ask for two \
                 constraints; use one",
            )),
            (s, g) => Ok(s.or(g)),
        }
    }

    fn response_format_kind(&self) -> Result<Option<GrammarKind>, ApiError> {
        let field = "response_format";
        let Some(rf) = self.response_format.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let ty = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
            bad(
                field,
                "response_format needs a `type`: 'text', 'json_object' or 'json_schema'",
            )
        })?;
        match ty {
            "text" => Ok(None),
            "json_object" => Ok(Some(GrammarKind::JsonObject)),
            "json_schema" => {
                let js = rf.get("json_schema").filter(|v| !v.is_null()).ok_or_else(|| {
                    ApiError::vllm(
                        field,
                        "When response_format type is 'json_schema', the 'json_schema' field \
                         must be provided.",
                        None,
                    )
                })?;
                if !js.get("name").is_some_and(Value::is_string) {
                    return Err(bad(field, "response_format.json_schema.name must be a string"));
                }
                // vLLM turns a json_schema without `schema` into a constraint of no kind,
                // which its validation refuses.
                match js.get("schema").filter(|v| !v.is_null()) {
                    Some(s) => Ok(Some(GrammarKind::JsonSchema(schema_value(
                        "response_format.json_schema.schema",
                        s,
                    )?))),
                    None => Err(bad(
                        field,
                        "You must use one kind of structured outputs constraint but none are \
                         specified (response_format.json_schema has no `schema`)",
                    )),
                }
            }
            "structural_tag" => Err(bad(
                field,
                "response_format type 'structural_tag' is not supported by tpuserve",
            )),
            other => Err(bad(
                field,
                format!("response_format type '{other}' is not one of 'text', 'json_object', 'json_schema'"),
            )),
        }
    }

    fn structured_outputs_spec(&self) -> Result<Option<ConstraintSpec>, ApiError> {
        let field = "structured_outputs";
        let Some(so) = self.structured_outputs.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let obj = so
            .as_object()
            .ok_or_else(|| bad(field, "structured_outputs must be an object"))?;
        let mut kinds = Vec::new();
        let mut opts = (false, false, None);
        for (k, v) in obj {
            if v.is_null() {
                continue;
            }
            let f = format!("structured_outputs.{k}");
            match k.as_str() {
                "json" => kinds.push(GrammarKind::JsonSchema(schema_value(&f, v)?)),
                "regex" => kinds.push(GrammarKind::Regex(string_field(&f, v)?)),
                "choice" => kinds.push(GrammarKind::Choice(choices(&f, v)?)),
                "grammar" => kinds.push(GrammarKind::Grammar(string_field(&f, v)?)),
                "json_object" => match v.as_bool() {
                    Some(true) => kinds.push(GrammarKind::JsonObject),
                    Some(false) => {}
                    None => return Err(bad(&f, format!("{f} must be a boolean"))),
                },
                "structural_tag" => {
                    return Err(bad(&f, format!("{f} is not supported by tpuserve")))
                }
                "disable_any_whitespace" => opts.0 = bool_field(&f, v)?,
                "disable_additional_properties" => opts.1 = bool_field(&f, v)?,
                "whitespace_pattern" => opts.2 = Some(string_field(&f, v)?),
                "disable_fallback" => {
                    bool_field(&f, v)?;
                }
                "backend" => check_backend(&f, v)?,
                other => {
                    return Err(bad(
                        field,
                        format!("structured_outputs has no field `{other}`"),
                    ))
                }
            }
        }
        if kinds.len() > 1 {
            return Err(bad(
                field,
                "You can only use one kind of structured outputs constraint but multiple are \
                 specified",
            ));
        }
        let Some(kind) = kinds.pop() else {
            return Err(bad(
                field,
                "You must use one kind of structured outputs constraint but none are specified",
            ));
        };
        Ok(Some(with_opts(ConstraintSpec::new(kind), opts)))
    }

    fn guided_spec(&self) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
        let set = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
        let mut kinds = Vec::new();
        if let Some(v) = set(&self.guided_json) {
            kinds.push((
                GrammarKind::JsonSchema(schema_value("guided_json", &v)?),
                "guided_json",
            ));
        }
        if let Some(v) = set(&self.guided_regex) {
            kinds.push((
                GrammarKind::Regex(string_field("guided_regex", &v)?),
                "guided_regex",
            ));
        }
        if let Some(v) = set(&self.guided_choice) {
            kinds.push((
                GrammarKind::Choice(choices("guided_choice", &v)?),
                "guided_choice",
            ));
        }
        if let Some(v) = set(&self.guided_grammar) {
            kinds.push((
                GrammarKind::Grammar(string_field("guided_grammar", &v)?),
                "guided_grammar",
            ));
        }
        if let Some(v) = set(&self.guided_decoding_backend) {
            check_backend("guided_decoding_backend", &v)?;
        }
        let ws = set(&self.guided_whitespace_pattern)
            .map(|v| string_field("guided_whitespace_pattern", &v))
            .transpose()?;
        if kinds.len() > 1 {
            return Err(bad(
                "guided_json",
                "You can only use one kind of guided decoding ('guided_json', 'guided_regex', \
                 'guided_choice', 'guided_grammar').",
            ));
        }
        Ok(kinds
            .pop()
            .map(|(k, field)| (with_opts(ConstraintSpec::new(k), (false, false, ws)), field)))
    }
}

fn bool_field(field: &str, v: &Value) -> Result<bool, ApiError> {
    v.as_bool()
        .ok_or_else(|| bad(field, format!("{field} must be a boolean")))
}

fn check_backend(field: &str, v: &Value) -> Result<(), ApiError> {
    let name = string_field(field, v)?;
    if BACKENDS.contains(&name.as_str()) {
        Ok(())
    } else {
        Err(bad(
            field,
            format!(
                "{field} '{name}' is not a structured-output backend ({})",
                BACKENDS.join(", ")
            ),
        ))
    }
}

fn with_opts(mut s: ConstraintSpec, opts: (bool, bool, Option<String>)) -> ConstraintSpec {
    s.disable_any_whitespace = opts.0;
    s.disable_additional_properties = opts.1;
    s.whitespace_pattern = opts.2;
    s
}

/// `--structured-outputs-config`: settings every request's constraint gets (a request can
/// only add to them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerDefaults {
    pub disable_any_whitespace: bool,
    pub disable_additional_properties: bool,
    /// `backend` `guidance`: JSON objects take properties their schema does not list, unless
    /// `disable_additional_properties`. vLLM's other backends (its default `auto` picks
    /// xgrammar, whose strict mode is on) close every object with `properties`.
    pub open_objects: bool,
}

impl ServerDefaults {
    /// Checks the flag's JSON as vLLM's `StructuredOutputsConfig` would take it; settings
    /// that need what tpuserve lacks (a reasoning parser) are refused by name.
    pub fn from_config(c: &serde_json::Map<String, Value>) -> Result<Self, String> {
        let flag = "--structured-outputs-config";
        let mut d = ServerDefaults::default();
        let boolean = |k: &str, v: &Value| {
            v.as_bool()
                .ok_or_else(|| format!("{flag}: `{k}` must be true or false"))
        };
        for (k, v) in c {
            match k.as_str() {
                "backend" => {
                    let b = v.as_str().unwrap_or_default();
                    if !BACKENDS.contains(&b) {
                        return Err(format!(
                            "{flag}: backend '{b}' is not one of {}",
                            BACKENDS.join(", ")
                        ));
                    }
                    d.open_objects = b == "guidance" || b == "llguidance";
                    if b != "auto" && b != "guidance" && b != "llguidance" {
                        tracing::info!(
                            "{flag}: backend '{b}' requested; llguidance serves every                              structured-output request (the same constraints)"
                        );
                    }
                }
                "disable_any_whitespace" => d.disable_any_whitespace = boolean(k, v)?,
                "disable_additional_properties" => d.disable_additional_properties = boolean(k, v)?,
                // Fallback between backends: there is one backend, nothing to fall back to.
                "disable_fallback" => {
                    boolean(k, v)?;
                }
                "enable_in_reasoning" => {
                    if boolean(k, v)? {
                        return Err(format!(
                            "{flag}: enable_in_reasoning needs a reasoning parser, which                              tpuserve does not have"
                        ));
                    }
                }
                "reasoning_parser" | "reasoning_parser_plugin" => {
                    if v.as_str() != Some("") {
                        return Err(format!(
                            "{flag}: {k} is not supported by tpuserve (no reasoning parsers)"
                        ));
                    }
                }
                other => return Err(format!("{flag}: unknown setting `{other}`")),
            }
        }
        Ok(d)
    }
}

/// A grammar that takes longer than this to compile is refused.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's grammar compiler, built on first use (or ahead, in the background, at
/// start-up) so that serving starts without waiting for it.
pub struct Grammars {
    defaults: ServerDefaults,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos: Vec<u32>,
    compiler: OnceLock<Result<Arc<GrammarCompiler>, String>>,
}

impl Grammars {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
        eos: Vec<u32>,
        defaults: ServerDefaults,
    ) -> Arc<Self> {
        Arc::new(Grammars {
            defaults,
            tokenizer,
            vocab_size,
            eos,
            compiler: OnceLock::new(),
        })
    }

    /// Builds the compiler on a background thread (token trie and lexer slices: a fraction
    /// of a second for a 128k vocabulary).
    pub fn warm_in_background(self: &Arc<Self>) {
        let me = self.clone();
        std::thread::spawn(move || {
            let _ = me.compiler();
        });
    }

    fn compiler(&self) -> Result<Arc<GrammarCompiler>, String> {
        self.compiler
            .get_or_init(|| {
                let env = model_tok_env(self.tokenizer.clone(), self.vocab_size, &self.eos)
                    .map_err(|e| e.to_string())?;
                let c = GrammarCompiler::new(&env).map_err(|e| e.to_string())?;
                Ok(Arc::new(c))
            })
            .clone()
    }

    /// Compiles `spec` off the async runtime, within [`COMPILE_TIMEOUT`].
    pub async fn compile(
        self: &Arc<Self>,
        field: &str,
        mut spec: ConstraintSpec,
    ) -> Result<Constraint, ApiError> {
        spec.disable_any_whitespace |= self.defaults.disable_any_whitespace;
        spec.disable_additional_properties |=
            self.defaults.disable_additional_properties || !self.defaults.open_objects;
        let me = self.clone();
        let job = tokio::task::spawn_blocking(move || {
            let c = me.compiler().map_err(ConstraintError::Tokenizer)?;
            c.compile(&spec)
        });
        match tokio::time::timeout(COMPILE_TIMEOUT, job).await {
            Err(_) => Err(bad(
                field,
                format!(
                    "the grammar did not compile within {} s",
                    COMPILE_TIMEOUT.as_secs()
                ),
            )),
            Ok(Err(e)) => Err(ApiError::internal(format!(
                "grammar compilation failed: {e}"
            ))),
            Ok(Ok(Err(ConstraintError::Invalid(m)))) if field == "tools" => Err(bad(
                field,
                format!(
                    "Invalid tools specification: {}",
                    crate::tools::tags::grammar_error(&m)
                ),
            )),
            Ok(Ok(Err(ConstraintError::Invalid(m)))) => {
                Err(bad(field, format!("Invalid {field} specification: {m}")))
            }
            Ok(Ok(Err(e @ ConstraintError::Tokenizer(_)))) => Err(bad(field, e.to_string())),
            Ok(Ok(Ok((c, _cached)))) => Ok(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> StructuredFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn each_form_maps_to_its_kind() {
        let s = fields(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}}),
        );
        assert_eq!(
            s.spec().unwrap().unwrap().0.kind,
            GrammarKind::JsonSchema(json!({"type": "integer"}))
        );
        let s = fields(json!({"response_format": {"type": "json_object"}}));
        assert_eq!(s.spec().unwrap().unwrap().0.kind, GrammarKind::JsonObject);
        assert!(fields(json!({"response_format": {"type": "text"}}))
            .spec()
            .unwrap()
            .is_none());
        let s =
            fields(json!({"structured_outputs": {"regex": "a+", "disable_any_whitespace": true}}));
        let (spec, _) = s.spec().unwrap().unwrap();
        assert_eq!(spec.kind, GrammarKind::Regex("a+".into()));
        assert!(spec.disable_any_whitespace);
        let s = fields(json!({"structured_outputs": {"json": "{\"type\": \"string\"}"}}));
        assert_eq!(
            s.spec().unwrap().unwrap().0.kind,
            GrammarKind::JsonSchema(json!({"type": "string"}))
        );
        let s = fields(json!({"guided_choice": ["a", "b"], "guided_decoding_backend": "xgrammar"}));
        assert_eq!(
            s.spec().unwrap().unwrap().0.kind,
            GrammarKind::Choice(vec!["a".into(), "b".into()])
        );
        let s =
            fields(json!({"guided_grammar": "root ::= \"x\"", "guided_whitespace_pattern": " "}));
        let (spec, _) = s.spec().unwrap().unwrap();
        assert_eq!(spec.whitespace_pattern.as_deref(), Some(" "));
    }

    #[test]
    fn the_spec_names_the_field_it_came_from() {
        for (v, field) in [
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
                "response_format",
            ),
            (
                json!({"structured_outputs": {"regex": "a"}}),
                "structured_outputs",
            ),
            (json!({"guided_grammar": "start: \"a\""}), "guided_grammar"),
            (
                json!({"guided_choice": ["a"], "guided_json": null}),
                "guided_choice",
            ),
        ] {
            assert_eq!(fields(v.clone()).spec().unwrap().unwrap().1, field, "{v}");
        }
    }

    #[test]
    fn conflicts_and_bad_values_are_400s() {
        for v in [
            json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            json!({"structured_outputs": {}}),
            json!({"structured_outputs": {"bogus": 1}}),
            json!({"structured_outputs": {"structural_tag": "{}"}}),
            json!({"response_format": {"type": "json_schema"}}),
            json!({"response_format": {"type": "yaml"}}),
            json!({"guided_json": {"type": "string"}, "guided_regex": "a"}),
            json!({"guided_json": "{not json"}),
            json!({"guided_choice": []}),
            json!({"guided_regex": "a", "guided_decoding_backend": "magic"}),
            json!({"guided_regex": "a", "structured_outputs": {"regex": "b"}}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            json!({"structured_outputs": {"choice": ["a", 1]}}),
        ] {
            let e = fields(v.clone()).spec().unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{v}");
        }
    }
}
