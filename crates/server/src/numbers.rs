//! Integer request fields as vLLM's pydantic models read them. The typed bodies hold `i64`
//! (vLLM bounds `seed` to int64, `_LONG_INFO`), so a JSON decoder error is all a client would
//! get for `seed: -1e19` or `n: 2.0`. When a body fails to decode, [`retry`] looks at its
//! integer fields the way pydantic's lax mode does: an integral float is that integer, a
//! fraction is `int_from_float`, a value outside int64 is `greater_than_equal` /
//! `less_than_equal` naming the limit, a string holding an integer is that integer — reported
//! as vLLM 0.32's handler for FastAPI's `RequestValidationError` reports them ([`FieldError`]).
//! Bodies that decode never pay for this.

use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

use crate::error::ApiError;

/// Top-level body fields that hold integers or lists (of lists) of integers, on any route.
const INT_FIELDS: &[&str] = &[
    "n",
    "best_of",
    "top_k",
    "seed",
    "min_tokens",
    "prompt_logprobs",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "truncate_prompt_tokens",
    "stop_token_ids",
    "allowed_token_ids",
    "prompt",
    "tokens",
    "priority",
    "stream_interval",
];

/// Top-level number fields: a string holding a number is that number (pydantic's lax mode).
const FLOAT_FIELDS: &[&str] = &[
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "length_penalty",
];

/// The fields of [`INT_FIELDS`] that hold lists of token ids (a string there is text).
const LIST_FIELDS: &[&str] = &["stop_token_ids", "allowed_token_ids", "prompt", "tokens"];

/// One request field's error as vLLM 0.32 reports it: pydantic's error dict with the field at
/// `body.<field>` and the input as `str()` gives it (see [`validation_error`]).
pub struct FieldError {
    /// Dotted path below the body (`n`, `prompt.1`).
    pub field: String,
    /// pydantic's error type (`int_from_float`, `greater_than_equal`, `missing`, …).
    pub kind: &'static str,
    pub msg: String,
    /// The offending value as Python's `str()` prints it (vLLM echoes it as a string).
    pub input: String,
    /// pydantic's `ctx`: the bound or the expected values, as `(key, Python repr)`.
    pub ctx: Option<(&'static str, String)>,
}

impl FieldError {
    /// A bound or literal error at a top-level field.
    pub fn new(
        field: &str,
        kind: &'static str,
        msg: impl Into<String>,
        input: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.to_string(),
            kind,
            msg: msg.into(),
            input: input.into(),
            ctx: None,
        }
    }

    pub fn with_ctx(self, key: &'static str, value: impl Into<String>) -> Self {
        FieldError {
            ctx: Some((key, value.into())),
            ..self
        }
    }

    /// The error dict as Python prints it, a long input cut as vLLM cuts it (200
    /// characters, then "...[truncated]").
    fn render(&self) -> String {
        use tpuserve_engine::pyfmt::py_str;
        const MAX_INPUT: usize = 200;
        let input = match self.input.char_indices().nth(MAX_INPUT) {
            Some((i, _)) => format!("{}...[truncated]", &self.input[..i]),
            None => self.input.clone(),
        };
        let mut s = format!(
            "{{'type': {}, 'loc': {}, 'msg': {}, 'input': {}",
            py_str(self.kind),
            py_str(&format!("body.{}", self.field)),
            py_str(&self.msg),
            py_str(&input)
        );
        if let Some((k, v)) = &self.ctx {
            s.push_str(&format!(", 'ctx': {{{}: {v}}}", py_str(k)));
        }
        s.push('}');
        s
    }
}

/// vLLM 0.32's answer to a body its request model refuses (FastAPI's `RequestValidationError`,
/// `validation_exception_handler`): "N validation error(s):" and each error dict on its own
/// line (at most 10, then how many more), `param` the first error's location, `type`
/// "Bad Request".
pub fn validation_error(errors: &[FieldError]) -> ApiError {
    const SHOWN: usize = 10;
    let n = errors.len();
    let label = if n == 1 { "error" } else { "errors" };
    let mut m = format!("{n} validation {label}:\n");
    for e in errors.iter().take(SHOWN) {
        m.push_str(&format!("  {}\n", e.render()));
    }
    if n > SHOWN {
        m.push_str(&format!("  ...and {} more {label}\n", n - SHOWN));
    }
    ApiError {
        param: errors.first().map(|e| format!("body.{}", e.field)),
        type_name: Some("Bad Request"),
        ..ApiError::bad_request(m.trim_end())
    }
}

/// A single field's bound failure (see [`validation_error`]).
pub fn bound_error(e: FieldError) -> ApiError {
    validation_error(&[e])
}

/// Checks `n` (at `field`); an integral float inside int64 becomes that integer.
// Runs only on a body that failed to decode; the error's size does not matter there.
#[allow(clippy::result_large_err)]
fn check(field: &str, n: &Number) -> Result<Option<i64>, FieldError> {
    if n.is_i64() {
        return Ok(None);
    }
    // Python's `str()` of the number pydantic was given.
    let input = match n.as_f64() {
        Some(x) if !n.is_u64() => tpuserve_engine::pyfmt::py_float(x),
        _ => n.to_string(),
    };
    let bad = |message: String, kind| FieldError::new(field, kind, message, input.clone());
    let x = match (n.as_u64(), n.as_f64()) {
        (Some(_), _) => {
            return Err(bad(
                format!("Input should be less than or equal to {}", i64::MAX),
                "less_than_equal",
            )
            .with_ctx("le", i64::MAX.to_string()))
        }
        (None, Some(x)) => x,
        (None, None) => return Ok(None),
    };
    if x.fract() != 0.0 || !x.is_finite() {
        return Err(bad(
            "Input should be a valid integer, got a number with a fractional part".into(),
            "int_from_float",
        ));
    }
    // 2^63 is exactly representable; every f64 at or above it is out of range.
    if x >= 9_223_372_036_854_775_808.0 {
        return Err(bad(
            format!("Input should be less than or equal to {}", i64::MAX),
            "less_than_equal",
        )
        .with_ctx("le", i64::MAX.to_string()));
    }
    // An integer literal just below i64::MIN (e.g. -9223372036854775809) is read as a float
    // that rounds to exactly -2^63; i64::MIN itself written as an integer never gets here
    // (it is an i64), so -2^63 as a float is taken as out of range.
    if x <= -9_223_372_036_854_775_808.0 {
        return Err(bad(
            format!("Input should be greater than or equal to {}", i64::MIN),
            "greater_than_equal",
        )
        .with_ctx("ge", i64::MIN.to_string()));
    }
    Ok(Some(x as i64))
}

/// Walks `v` (a number or nested lists of numbers), normalising integral floats; at a
/// scalar field (`top`), a string holding an integer is that integer (pydantic's lax mode).
fn walk(field: &str, v: &mut Value, out: &mut Vec<FieldError>, changed: &mut bool, top: bool) {
    match v {
        // pydantic's lax reading of a string as an integer is Python's `int()`.
        Value::String(t) if top => match tpuserve_engine::pyfmt::py_int(t) {
            Some(i) => {
                *v = Value::from(i);
                *changed = true;
            }
            // `logprobs` is a boolean in chat requests; every other field here is an integer.
            None if field != "logprobs" => out.push(FieldError::new(
                field,
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
                t.clone(),
            )),
            None => {}
        },
        Value::Number(n) => match check(field, n) {
            Ok(Some(i)) => {
                *v = Value::from(i);
                *changed = true;
            }
            Ok(None) => {}
            Err(e) => out.push(e),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(&format!("{field}.{i}"), item, out, changed, false);
            }
        }
        _ => {}
    }
}

/// Decodes `body` again after `first` (the typed decode's error) failed: integer fields are
/// read as pydantic would, and their violations are reported by name and bound; any other
/// problem keeps the decoder's message.
pub fn retry<T: DeserializeOwned>(body: &[u8], first: serde_json::Error) -> Result<T, ApiError> {
    let original = || ApiError::bad_request(format!("invalid request body: {first}"));
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return Err(original());
    };
    let Some(obj) = value.as_object_mut() else {
        return Err(original());
    };
    // vLLM 0.32's request models check these counts' JSON types before pydantic reads them.
    let counts: &[&str] = if std::any::type_name::<T>().contains("Chat") {
        &["prompt_logprobs", "top_logprobs"]
    } else {
        &["prompt_logprobs", "logprobs"]
    };
    for &f in counts {
        // Python's `isinstance(v, (int, float))`: booleans pass (they are ints there).
        let wrong = |v: &&Value| !(v.is_number() || v.is_null() || v.is_boolean());
        if let Some(v) = obj.get(f).filter(wrong) {
            let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            return Err(ApiError::vllm(
                f,
                format!("`{f}` must be an integer."),
                Some(&shown),
            ));
        }
    }
    let (mut violations, mut changed) = (Vec::new(), false);
    for &f in FLOAT_FIELDS {
        if let Some(Value::String(t)) = obj.get(f) {
            match t.trim().parse::<f64>() {
                // JSON holds no infinity: said here, as the engine's gate says it for numbers.
                Ok(x) if !x.is_finite() => {
                    return Err(ApiError::invalid_param(
                        f,
                        format!("{f} must be a finite number, got {t}."),
                    ))
                }
                Ok(x) => {
                    obj.insert(f.to_string(), Value::from(x));
                    changed = true;
                }
                Err(_) => violations.push(FieldError::new(
                    f,
                    "float_parsing",
                    "Input should be a valid number, unable to parse string as a number",
                    t.clone(),
                )),
            }
        }
    }
    for &f in INT_FIELDS {
        if let Some(v) = obj.get_mut(f) {
            walk(
                f,
                v,
                &mut violations,
                &mut changed,
                !LIST_FIELDS.contains(&f),
            );
        }
    }
    if !violations.is_empty() {
        return Err(validation_error(&violations));
    }
    // A required field left out: pydantic's `missing`, the body echoed by its size.
    if let Some(field) = first
        .to_string()
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
    {
        let input = format!("<dict of {} items>", obj.len());
        return Err(bound_error(FieldError::new(
            field,
            "missing",
            "Field required",
            input,
        )));
    }
    if !changed {
        return Err(culprit::<T>(obj).map_or_else(original, |f| named(f, &first)));
    }
    T::deserialize(&value).map_err(|e| match value.as_object().and_then(culprit::<T>) {
        Some(f) => named(f, &e),
        None => ApiError::bad_request(format!("invalid request body: {e}")),
    })
}

/// The top-level field whose value alone keeps `obj` from decoding (the body decodes without
/// it), so a type error names its field: serde's message has only a line and column, and the
/// request structs' flattened field groups hide the path. Runs only on a failed request.
fn culprit<T: DeserializeOwned>(obj: &serde_json::Map<String, Value>) -> Option<String> {
    obj.keys().find_map(|k| {
        let mut rest = obj.clone();
        rest.remove(k);
        serde_json::from_value::<T>(Value::Object(rest))
            .is_ok()
            .then(|| k.clone())
    })
}

fn named(field: String, e: &serde_json::Error) -> ApiError {
    // serde's "invalid type: …, expected …" without the position in the body.
    let what = e.to_string();
    let what = what.split(" at line ").next().unwrap_or(&what).to_string();
    ApiError::invalid_param(&field, format!("invalid request body: {field}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Body {
        seed: Option<i64>,
        prompt: Option<Vec<i64>>,
    }

    fn parse(text: &str) -> Result<Body, ApiError> {
        match serde_json::from_str::<Body>(text) {
            Ok(b) => Ok(b),
            Err(e) => retry(text.as_bytes(), e),
        }
    }

    #[test]
    fn integral_floats_are_integers_and_bounds_are_named() {
        let b = parse(r#"{"seed": 7.0, "prompt": [1, 2.0]}"#).unwrap();
        assert_eq!((b.seed, b.prompt), (Some(7), Some(vec![1, 2])));
        let e = parse(r#"{"seed": -1e19}"#).unwrap_err();
        assert!(e.message.contains("greater_than_equal"), "{}", e.message);
        assert!(e.message.contains("-9223372036854775808"), "{}", e.message);
        let e = parse(r#"{"seed": -9223372036854775809}"#).unwrap_err();
        assert!(e.message.contains("greater_than_equal"), "{}", e.message);
        let e = parse(r#"{"seed": 9223372036854775808}"#).unwrap_err();
        assert!(e.message.contains("less_than_equal"), "{}", e.message);
        let e = parse(r#"{"prompt": [1, 2.5]}"#).unwrap_err();
        assert!(e.message.contains("prompt.1") && e.message.contains("int_from_float"));
        // pydantic's lax mode: a string holding an integer is that integer, another string
        // is `int_parsing` (vLLM 0.32's words and layout).
        let b = parse(r#"{"seed": " 7"}"#).unwrap();
        assert_eq!(b.seed, Some(7));
        let e = parse(r#"{"seed": "x"}"#).unwrap_err();
        assert_eq!(
            e.message,
            "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.seed', 'msg': 'Input \
             should be a valid integer, unable to parse string as an integer', 'input': 'x'}"
        );
        assert_eq!(e.param.as_deref(), Some("body.seed"));
        assert_eq!(e.error_type(), "Bad Request");
        let long = "9".repeat(300) + "x";
        let e = parse(&format!(r#"{{"seed": "{long}"}}"#)).unwrap_err();
        assert!(
            e.message
                .ends_with(&format!("'input': '{}...[truncated]'}}", "9".repeat(200))),
            "{}",
            e.message
        );
        let e = parse(r#"{"seed": 1.5}"#).unwrap_err();
        assert_eq!(
            e.message,
            "1 validation error:\n  {'type': 'int_from_float', 'loc': 'body.seed', 'msg': \
             'Input should be a valid integer, got a number with a fractional part', 'input': \
             '1.5'}"
        );
        let e = parse(r#"{"seed": -1e19}"#).unwrap_err();
        assert!(
            e.message
                .ends_with("'input': '-1e+19', 'ctx': {'ge': -9223372036854775808}}"),
            "{}",
            e.message
        );
        let e = parse(r#"{"seed": 1.5, "prompt": [1, 2.5]}"#).unwrap_err();
        assert!(
            e.message.starts_with("2 validation errors:\n  {"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("'loc': 'body.prompt.1'"),
            "{}",
            e.message
        );
        // A required field left out (`Body` has none: a struct of its own).
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Needs {
            messages: Vec<i64>,
        }
        let text = r#"{"model": "m", "n": 1}"#;
        let e = serde_json::from_str::<Needs>(text)
            .map_err(|e| retry::<Needs>(text.as_bytes(), e).unwrap_err())
            .unwrap_err();
        assert_eq!(
            e.message,
            "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field \
             required', 'input': '<dict of 2 items>'}"
        );
        assert_eq!(e.param.as_deref(), Some("body.messages"));
        // Two bad fields: neither alone is the culprit; serde's message as it is.
        let e = parse(r#"{"seed": [1], "prompt": "y"}"#).unwrap_err();
        assert!(
            e.message.starts_with("invalid request body: invalid type"),
            "{}",
            e.message
        );
    }
}
