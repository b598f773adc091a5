//! Integer request fields as vLLM's pydantic models read them. The typed bodies hold `i64`
//! (vLLM bounds `seed` to int64, `_LONG_INFO`), so a JSON decoder error is all a client would
//! get for `seed: -1e19` or `n: 2.0`. When a body fails to decode, [`retry`] looks at its
//! integer fields the way pydantic's lax mode does: an integral float is that integer, a
//! fraction is `int_from_float`, a value outside int64 is `greater_than_equal` /
//! `less_than_equal` naming the limit — in pydantic's own message layout, as vLLM returns it.
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

/// One field's violation, as pydantic reports it.
struct Violation {
    field: String,
    message: String,
    kind: &'static str,
    input: String,
}

/// Checks `n` (at `field`); an integral float inside int64 becomes that integer.
fn check(field: &str, n: &Number) -> Result<Option<i64>, Violation> {
    if n.is_i64() {
        return Ok(None);
    }
    let bad = |message: String, kind| Violation {
        field: field.to_string(),
        message,
        kind,
        input: n.to_string(),
    };
    let x = match (n.as_u64(), n.as_f64()) {
        (Some(_), _) => {
            return Err(bad(
                format!("Input should be less than or equal to {}", i64::MAX),
                "less_than_equal",
            ))
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
        ));
    }
    // An integer literal just below i64::MIN (e.g. -9223372036854775809) is read as a float
    // that rounds to exactly -2^63; i64::MIN itself written as an integer never gets here
    // (it is an i64), so -2^63 as a float is taken as out of range.
    if x <= -9_223_372_036_854_775_808.0 {
        return Err(bad(
            format!("Input should be greater than or equal to {}", i64::MIN),
            "greater_than_equal",
        ));
    }
    Ok(Some(x as i64))
}

/// Walks `v` (a number or nested lists of numbers), normalising integral floats.
fn walk(field: &str, v: &mut Value, out: &mut Vec<Violation>, changed: &mut bool) {
    match v {
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
                walk(&format!("{field}.{i}"), item, out, changed);
            }
        }
        _ => {}
    }
}

/// A bound-check failure in pydantic's layout: "1 validation error for Model\nfield\n  Input
/// should be … [type=…, input_value=…]".
pub fn bound_error(model: &str, field: &str, message: &str, kind: &str, input: &str) -> ApiError {
    let top = field.split('.').next().unwrap_or(field);
    ApiError::invalid_param(
        top,
        format!(
            "1 validation error for {model}\n{field}\n  {message} [type={kind}, input_value={input}]"
        ),
    )
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
    let (mut violations, mut changed) = (Vec::new(), false);
    for &f in INT_FIELDS {
        if let Some(v) = obj.get_mut(f) {
            walk(f, v, &mut violations, &mut changed);
        }
    }
    let model = std::any::type_name::<T>()
        .rsplit("::")
        .next()
        .unwrap_or("Request");
    if let Some(first) = violations.first() {
        let mut e = bound_error(
            model,
            &first.field,
            &first.message,
            first.kind,
            &first.input,
        );
        if violations.len() > 1 {
            e.message = e.message.replacen(
                "1 validation error",
                &format!("{} validation errors", violations.len()),
                1,
            );
            for v in &violations[1..] {
                e.message.push_str(&format!(
                    "\n{}\n  {} [type={}, input_value={}]",
                    v.field, v.message, v.kind, v.input
                ));
            }
        }
        return Err(e);
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
        let e = parse(r#"{"seed": "x"}"#).unwrap_err();
        assert_eq!(
            e.message,
            "invalid request body: seed: invalid type: string \"x\", expected i64"
        );
        assert_eq!(e.param.as_deref(), Some("seed"));
        // Two bad fields: neither alone is the culprit; serde's message as it is.
        let e = parse(r#"{"seed": "x", "prompt": "y"}"#).unwrap_err();
        assert!(
            e.message.starts_with("invalid request body: invalid type"),
            "{}",
            e.message
        );
    }
}
