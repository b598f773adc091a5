//! Resolves a local model path (a Hugging Face folder or a `.gguf` file) into everything a
//! runner and the server need.

use std::path::{Path, PathBuf};

use crate::chat_template::{template_from_tokenizer_config, ChatTemplate};
use crate::config::{generation_eos_ids, LlamaConfig};
use crate::gguf::{GgufFile, GgufWeights};
use crate::safetensors_source::SafetensorsWeights;
use crate::tensor::WeightSource;
use crate::tokenizer::Tokenizer;
use crate::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

pub struct LoadedModel {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: LlamaConfig,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Every id that ends generation: config, generation config and tokenizer EOS together.
    pub eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Loads a model from a `.gguf` file, or a folder holding `config.json` + safetensors (or a
/// single `.gguf`).
pub fn load_model(path: &Path) -> Result<LoadedModel, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    if path.is_file() {
        return load_gguf(path);
    }
    if path.join("config.json").exists() {
        return load_hf_dir(path);
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| ModelError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => load_gguf(one),
        _ => Err(ModelError::Config {
            path: path.to_path_buf(),
            reason: "folder has neither config.json nor exactly one .gguf file".into(),
        }),
    }
}

fn merge_eos(mut ids: Vec<u32>, more: impl IntoIterator<Item = u32>) -> Vec<u32> {
    for id in more {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

fn load_gguf(path: &Path) -> Result<LoadedModel, ModelError> {
    let file = GgufFile::open(path)?;
    let config = file.llama_config()?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let chat_template = match file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        Some(src) => Some(ChatTemplate::new(
            src,
            tokenizer.bos_token.as_deref().unwrap_or(""),
            tokenizer.eos_token.as_deref().unwrap_or(""),
        )?),
        None => None,
    };
    let eos_token_ids = config.eos_token_ids.clone();
    let weights = GgufWeights::new(file, &config);
    check_weights(&weights, &config)?;
    Ok(LoadedModel {
        path: path.to_path_buf(),
        format: ModelFormat::Gguf,
        config,
        weights: Box::new(weights),
        tokenizer,
        chat_template,
        eos_token_ids,
    })
}

fn load_hf_dir(dir: &Path) -> Result<LoadedModel, ModelError> {
    let config = LlamaConfig::from_hf_json(&dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tok_cfg: Option<serde_json::Value> =
        std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    let template_src = std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| tok_cfg.as_ref().and_then(template_from_tokenizer_config));
    let chat_template = match template_src {
        Some(src) => Some(ChatTemplate::new(
            &src,
            tokenizer.bos_token.as_deref().unwrap_or(""),
            tokenizer.eos_token.as_deref().unwrap_or(""),
        )?),
        None => None,
    };
    let gen_eos = generation_eos_ids(&dir.join("generation_config.json")).unwrap_or_default();
    let eos_token_ids = merge_eos(config.eos_token_ids.clone(), gen_eos);
    let weights = SafetensorsWeights::open_dir(dir)?;
    check_weights(&weights, &config)?;
    Ok(LoadedModel {
        path: dir.to_path_buf(),
        format: ModelFormat::Safetensors,
        config,
        weights: Box::new(weights),
        tokenizer,
        chat_template,
        eos_token_ids,
    })
}

/// The weight names a Llama forward needs, in HF naming.
pub fn required_weight_names(cfg: &LlamaConfig) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for l in 0..cfg.num_hidden_layers {
        for s in [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("model.layers.{l}.{s}"));
        }
    }
    names
}

/// Fails early, naming the first missing weight, instead of in the middle of a forward.
fn check_weights(w: &dyn WeightSource, cfg: &LlamaConfig) -> Result<(), ModelError> {
    for name in required_weight_names(cfg) {
        if !w.contains(&name) {
            return Err(ModelError::MissingTensor {
                name,
                source_desc: w.describe(),
            });
        }
    }
    Ok(())
}
