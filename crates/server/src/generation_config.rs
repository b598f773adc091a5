//! `--generation-config` / `--override-generation-config` (vLLM ≥ 0.10): the sampling
//! defaults a model's creator ships in `generation_config.json` apply to requests that leave
//! those fields out. `auto` (vLLM's default) reads the model folder's file, `vllm` uses
//! vLLM's neutral defaults, any other value is a folder holding a `generation_config.json`.
//! The override is a JSON object merged on top (alone with `vllm`). As vLLM's
//! `get_diff_sampling_param`, only `repetition_penalty`, `temperature`, `top_k`, `top_p`,
//! `min_p` and `max_new_tokens` (as `max_tokens`, which then caps every request) are read.

use std::path::Path;

use serde_json::{Map, Value};

use crate::cli::UsageError;
use crate::validate::SamplingDefaults;

const READ: &[&str] = &[
    "repetition_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
];

fn read_file(dir: &Path) -> Option<Map<String, Value>> {
    let text = std::fs::read_to_string(dir.join("generation_config.json")).ok()?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Some(m),
        _ => {
            tracing::warn!(
                "{}: not a JSON object, ignored",
                dir.join("generation_config.json").display()
            );
            None
        }
    }
}

/// The defaults for `model` (a folder or a .gguf file) under the two flags.
pub fn load(
    model: &Path,
    mode: &str,
    overrides: Option<&str>,
) -> Result<SamplingDefaults, UsageError> {
    let mut cfg = match mode {
        "vllm" => Map::new(),
        // A GGUF file carries no generation config.
        "auto" => model
            .is_dir()
            .then(|| read_file(model))
            .flatten()
            .unwrap_or_default(),
        folder => read_file(Path::new(folder)).ok_or_else(|| {
            UsageError(format!(
                "--generation-config {folder}: no readable generation_config.json there \
                 (use auto, vllm or a folder holding one)"
            ))
        })?,
    };
    if let Some(o) = overrides {
        match serde_json::from_str::<Value>(o) {
            Ok(Value::Object(m)) => cfg.extend(m),
            _ => {
                return Err(UsageError(format!(
                    "--override-generation-config must be a JSON object, got {o}"
                )))
            }
        }
    }
    let num = |k: &str| -> Result<Option<f64>, UsageError> {
        match cfg.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                UsageError(format!(
                    "generation config: `{k}` must be a number, got {v}"
                ))
            }),
        }
    };
    let int = |k: &str| -> Result<Option<i64>, UsageError> {
        num(k)?
            .map(|x| {
                if x.fract() == 0.0 && x.abs() < 9e15 {
                    Ok(x as i64)
                } else {
                    Err(UsageError(format!(
                        "generation config: `{k}` must be an integer, got {x}"
                    )))
                }
            })
            .transpose()
    };
    let d = SamplingDefaults {
        temperature: num("temperature")?,
        top_p: num("top_p")?,
        top_k: int("top_k")?,
        min_p: num("min_p")?,
        repetition_penalty: num("repetition_penalty")?,
        max_tokens: int("max_new_tokens")?,
    };
    let used: Vec<String> = READ
        .iter()
        .filter_map(|k| {
            cfg.get(*k)
                .filter(|v| !v.is_null())
                .map(|v| format!("{k}={v}"))
        })
        .collect();
    if !used.is_empty() {
        tracing::info!(
            "Default sampling parameters have been overridden by the generation config ({}); \
             to use vLLM's neutral defaults, relaunch with `--generation-config vllm`",
            used.join(", ")
        );
    }
    Ok(d)
}
