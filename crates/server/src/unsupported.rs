//! Request fields vLLM accepts that tpuserve does not implement are refused by name (400)
//! when set to anything but their neutral value, so a client never gets a 200 that quietly
//! did something else; fields neither vLLM nor tpuserve knows are logged as ignored, as
//! vLLM's `OpenAIBaseModel` does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use schemars::JsonSchema;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// vLLM's extras without an implementation here (both routes).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct Unimplemented {
    /// Beam search (see `beam.rs`); listed here because vLLM has it among its extras.
    pub use_beam_search: Option<bool>,
    /// Beam search's length penalty (vLLM uses it nowhere else).
    pub length_penalty: Option<f64>,
    pub logits_processors: Option<Value>,
    pub kv_transfer_params: Option<Value>,
    pub vllm_xargs: Option<Value>,
    pub prompt_embeds: Option<Value>,
    pub mm_processor_kwargs: Option<Value>,
    pub media_io_kwargs: Option<Value>,
    pub thinking_token_budget: Option<Value>,
    /// Groups related requests for vLLM's KV connectors and tracing; it never changes an
    /// answer, and nothing here groups requests: accepted (a string, as vLLM types it).
    pub session_id: Option<String>,
    pub watermarking: Option<bool>,
    pub return_token_offsets: Option<Value>,
    pub routed_experts_prompt_start: Option<Value>,
    /// What multimodal payload the response carries: `tensors` (vLLM's default) or `none`;
    /// a text-only model has none to return either way, so both are honoured as they are.
    pub mm_payload: Option<Value>,
    pub return_mm_kwargs: Option<Value>,
    pub ec_transfer_params: Option<Value>,
}

/// Null, false, 0, "" and empty lists / objects ask for nothing.
fn neutral(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Bool(true) => false,
    }
}

fn refuse(field: &str, why: &str) -> ApiError {
    ApiError::invalid_param(
        field,
        format!("{field} is not supported by tpuserve: {why}"),
    )
}

impl Unimplemented {
    pub fn check(&self) -> Result<(), ApiError> {
        let generic: [(&str, &Option<Value>, &str); 6] = [
            (
                "logits_processors",
                &self.logits_processors,
                "custom logits processors cannot be loaded",
            ),
            (
                "kv_transfer_params",
                &self.kv_transfer_params,
                "there is no KV transfer",
            ),
            ("vllm_xargs", &self.vllm_xargs, "there are no vLLM plug-ins"),
            (
                "prompt_embeds",
                &self.prompt_embeds,
                "prompts are token ids or text",
            ),
            (
                "mm_processor_kwargs",
                &self.mm_processor_kwargs,
                "the models are text-only",
            ),
            (
                "media_io_kwargs",
                &self.media_io_kwargs,
                "the models are text-only",
            ),
        ];
        for (field, value, why) in generic {
            if value.as_ref().is_some_and(|v| !neutral(v)) {
                return Err(refuse(field, why));
            }
        }
        if self.watermarking == Some(true) {
            return Err(refuse("watermarking", "there is no output watermarking"));
        }
        if let Some(v) = self.mm_payload.as_ref().filter(|v| !v.is_null()) {
            if v != "tensors" && v != "none" {
                return Err(ApiError::invalid_param(
                    "mm_payload",
                    format!("mm_payload must be 'tensors' or 'none', got {v}"),
                ));
            }
        }
        let more: [(&str, &Option<Value>, &str); 4] = [
            (
                "return_token_offsets",
                &self.return_token_offsets,
                "not implemented",
            ),
            (
                "routed_experts_prompt_start",
                &self.routed_experts_prompt_start,
                "no expert routing is reported (dense models)",
            ),
            (
                "return_mm_kwargs",
                &self.return_mm_kwargs,
                "the models are text-only",
            ),
            (
                "ec_transfer_params",
                &self.ec_transfer_params,
                "there is no encoder-cache transfer",
            ),
        ];
        for (field, value, why) in more {
            if value.as_ref().is_some_and(|v| !neutral(v)) {
                return Err(refuse(field, why));
            }
        }
        if self
            .thinking_token_budget
            .as_ref()
            .is_some_and(|v| !neutral(v))
        {
            return Err(refuse(
                "thinking_token_budget",
                "there is no reasoning parser",
            ));
        }
        Ok(())
    }
}

/// The top-level field names `T`'s schema declares (flattened parts included).
fn known_fields<T: JsonSchema>() -> BTreeSet<String> {
    let schema = serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null);
    let mut out = BTreeSet::new();
    collect_properties(&schema, &mut out);
    out
}

fn collect_properties(v: &Value, out: &mut BTreeSet<String>) {
    if let Some(p) = v.get("properties").and_then(Value::as_object) {
        out.extend(p.keys().cloned());
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for sub in v.get(key).and_then(Value::as_array).into_iter().flatten() {
            collect_properties(sub, out);
        }
    }
}

/// Logs, as vLLM does, the body fields that `T` does not know (they have no effect). Only
/// the keys are read: values are skipped without being built.
pub fn log_unknown<T: JsonSchema>(known: &'static OnceLock<BTreeSet<String>>, body: &[u8]) {
    let known = known.get_or_init(known_fields::<T>);
    let Ok(keys) = serde_json::from_slice::<BTreeMap<String, IgnoredAny>>(body) else {
        return;
    };
    let unknown: Vec<&str> = keys
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        tracing::warn!("The following fields were present in the request but ignored: {unknown:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_mm_payload(v: Value) -> Result<(), ApiError> {
        Unimplemented {
            mm_payload: Some(v),
            ..Default::default()
        }
        .check()
    }

    /// vLLM's default (`tensors`) and `none` ask a text-only model for nothing.
    #[test]
    fn mm_payload_takes_vllms_values_only() {
        assert!(with_mm_payload("tensors".into()).is_ok());
        assert!(with_mm_payload("none".into()).is_ok());
        assert!(with_mm_payload(Value::Null).is_ok());
        let e = with_mm_payload("pixels".into()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("mm_payload"));
    }
}
