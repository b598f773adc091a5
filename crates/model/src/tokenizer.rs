//! Tokenizer: Hugging Face `tokenizer.json` through the `tokenizers` crate, or one rebuilt from
//! GGUF `tokenizer.ggml.*` metadata so a single `.gguf` file is a complete model.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value};

use crate::gguf::GgufFile;
use crate::ModelError;

/// The regex Llama 3's tokenizer splits words with before byte-level BPE.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special_ids: HashSet<u32>,
    /// `get_vocab_size(true)` builds the whole vocabulary map on every call: count it once.
    vocab_size: usize,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    fn from_inner(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        let special_ids = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        Tokenizer {
            vocab_size: inner.get_vocab_size(true),
            inner,
            special_ids,
            bos_token,
            eos_token,
        }
    }

    /// Loads `tokenizer.json`; BOS / EOS names come from `tokenizer_config.json` beside it.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_str(&text)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<Value>(&t).ok());
        let name = |key: &str| -> Option<String> {
            let v = cfg.as_ref()?.get(key)?;
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get("content")?.as_str().map(str::to_string))
        };
        Ok(Self::from_inner(
            inner,
            name("bos_token"),
            name("eos_token"),
        ))
    }

    /// Rebuilds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let path = file.path().display().to_string();
        let bad = |r: String| ModelError::Tokenizer(format!("{path}: {r}"));
        let model = file
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("metadata `tokenizer.ggml.model` is missing".into()))?;
        if model != "gpt2" {
            return Err(bad(format!(
                "GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2` is); \
                 put a tokenizer.json beside the model"
            )));
        }
        let tokens: Vec<&str> = file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("metadata `tokenizer.ggml.tokens` is missing".into()))?
            .iter()
            .map(|t| {
                t.as_str()
                    .ok_or_else(|| bad("a token is not a string".into()))
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<u64> = file
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let merges: Vec<&str> = file
            .get("tokenizer.ggml.merges")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("metadata `tokenizer.ggml.merges` is missing".into()))?
            .iter()
            .filter_map(|m| m.as_str())
            .collect();
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let id_of = |key: &str| file.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos = id_of("tokenizer.ggml.eos_token_id");
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);

        let mut vocab = serde_json::Map::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.to_string(), json!(i));
        }
        // Control (3) and user-defined (4) tokens are matched whole before BPE, as HF does.
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let llama3 = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
        let pre_tokenizer = if llama3 {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
        } else {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        };
        let bos_name = bos
            .and_then(|b| tokens.get(b as usize))
            .map(|s| s.to_string());
        let eos_name = eos
            .and_then(|e| tokens.get(e as usize))
            .map(|s| s.to_string());
        let post = match (&bos_name, add_bos) {
            (Some(b), true) => json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.as_str(): {"id": b, "ids": [bos], "tokens": [b]}}}),
            _ => Value::Null,
        };
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": llama3,
                      "vocab": vocab, "merges": merges}
        });
        let inner =
            tokenizers::Tokenizer::from_str(&doc.to_string()).map_err(|e| bad(e.to_string()))?;
        Ok(Self::from_inner(inner, bos_name, eos_name))
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        Ok(self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
