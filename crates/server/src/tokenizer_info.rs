//! `/tokenizer_info` (vLLM, only with `--enable-tokenizer-info-endpoint`): the tokenizer's
//! configuration as transformers holds it (`init_kwargs`: `tokenizer_config.json` without file
//! paths, special tokens as their text), its class, and the chat template the server uses.

use std::path::Path;

use serde_json::{json, Map, Value};
use tpuserve_model::Tokenizer;

/// Built once at start-up from the model folder (a GGUF carries no `tokenizer_config.json`:
/// then what the tokenizer itself knows).
pub fn build(model: &Path, tokenizer: &Tokenizer, chat_template: Option<&str>) -> Value {
    let dir = if model.is_dir() {
        Some(model)
    } else {
        model.parent()
    };
    let file = dir.map(|d| d.join("tokenizer_config.json"));
    let config = file
        .filter(|_| model.is_dir())
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let mut out = match config {
        Some(Value::Object(mut m)) => {
            m.remove("vocab_file");
            m.remove("merges_file");
            match plain(Value::Object(m)) {
                Value::Object(m) => m,
                _ => Map::new(),
            }
        }
        _ => {
            let mut m = Map::new();
            m.insert("bos_token".into(), json!(tokenizer.bos_token));
            m.insert("eos_token".into(), json!(tokenizer.eos_token));
            m
        }
    };
    // transformers' AutoTokenizer loads the fast class of what the config names; vLLM reports
    // the loaded object's class.
    let class = out
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .map(|c| {
            if c.ends_with("Fast") {
                c.to_string()
            } else {
                format!("{c}Fast")
            }
        })
        .unwrap_or_else(|| "PreTrainedTokenizerFast".into());
    out.insert("tokenizer_class".into(), json!(class));
    if let Some(t) = chat_template {
        out.insert("chat_template".into(), json!(t));
    }
    Value::Object(out)
}

/// Special-token objects (`{"content": …, "lstrip": …}`, transformers' AddedToken) become their
/// text, as vLLM's `_make_json_serializable` does.
fn plain(v: Value) -> Value {
    match v {
        Value::Object(m) => match m.get("content") {
            Some(c) => c.clone(),
            None => Value::Object(m.into_iter().map(|(k, v)| (k, plain(v))).collect()),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(plain).collect()),
        other => other,
    }
}
