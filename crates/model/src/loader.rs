//! Resolves a local model path (a Hugging Face folder or a `.gguf` file) into everything a
//! runner and the server need.

use std::path::{Path, PathBuf};

use crate::chat_template::{template_from_tokenizer_config, ChatTemplate};
use crate::config::{generation_eos_ids, LlamaConfig};
use crate::dummy::DummyWeights;
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

/// vLLM's `--load-format`: where the weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// safetensors in a folder with `config.json`, else a `.gguf` file (or a folder holding one).
    #[default]
    Auto,
    Safetensors,
    Gguf,
    /// Config, tokenizer and shapes only; weights filled with small random values.
    Dummy,
}

/// vLLM load formats that tpuserve does not read, refused by name rather than loaded some
/// other way.
const UNSUPPORTED_LOAD_FORMATS: &[&str] = &[
    "pt",
    "npcache",
    "tensorizer",
    "sharded_state",
    "bitsandbytes",
    "mistral",
    "runai_streamer",
    "runai_streamer_sharded",
    "fastsafetensors",
];

impl std::str::FromStr for LoadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LoadFormat::Auto),
            "safetensors" => Ok(LoadFormat::Safetensors),
            "gguf" => Ok(LoadFormat::Gguf),
            "dummy" => Ok(LoadFormat::Dummy),
            other if UNSUPPORTED_LOAD_FORMATS.contains(&other) => Err(format!(
                "load format `{other}` is not supported by tpuserve (supported: auto, \
                 safetensors, gguf, dummy)"
            )),
            other => Err(format!(
                "unknown load format `{other}` (supported: auto, safetensors, gguf, dummy)"
            )),
        }
    }
}

/// Loads a model from a `.gguf` file, or a folder holding `config.json` + safetensors (or a
/// single `.gguf`).
pub fn load_model(path: &Path) -> Result<LoadedModel, ModelError> {
    load_model_with(path, LoadFormat::Auto)
}

/// [`load_model`] with an explicit `--load-format`. `dummy` reads the config and tokenizer
/// (from `config.json` + `tokenizer.json`, or a GGUF's metadata) and no tensor data.
pub fn load_model_with(path: &Path, format: LoadFormat) -> Result<LoadedModel, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let wrong = |reason: &str| ModelError::Config {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let dummy = format == LoadFormat::Dummy;
    if path.is_file() {
        if format == LoadFormat::Safetensors {
            return Err(wrong(
                "--load-format safetensors needs a folder with config.json and *.safetensors",
            ));
        }
        return load_gguf(path, dummy);
    }
    if path.join("config.json").exists() && format != LoadFormat::Gguf {
        return load_hf_dir(path, dummy);
    }
    if format == LoadFormat::Safetensors {
        return Err(wrong(
            "--load-format safetensors: the folder has no config.json",
        ));
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| ModelError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => load_gguf(one, dummy),
        _ if format == LoadFormat::Gguf => Err(wrong(
            "--load-format gguf needs a .gguf file or a folder with exactly one",
        )),
        _ => Err(wrong(
            "folder has neither config.json nor exactly one .gguf file",
        )),
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

fn load_gguf(path: &Path, dummy: bool) -> Result<LoadedModel, ModelError> {
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
    let weights: Box<dyn WeightSource> = if dummy {
        Box::new(DummyWeights::new(&config))
    } else {
        let w = GgufWeights::new(file, &config);
        check_weights(&w, &config)?;
        Box::new(w)
    };
    Ok(LoadedModel {
        path: path.to_path_buf(),
        format: ModelFormat::Gguf,
        config,
        weights,
        tokenizer,
        chat_template,
        eos_token_ids,
    })
}

fn load_hf_dir(dir: &Path, dummy: bool) -> Result<LoadedModel, ModelError> {
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
    let weights: Box<dyn WeightSource> = if dummy {
        Box::new(DummyWeights::new(&config))
    } else {
        let w = SafetensorsWeights::open_dir(dir)?;
        check_weights(&w, &config)?;
        Box::new(w)
    };
    Ok(LoadedModel {
        path: dir.to_path_buf(),
        format: ModelFormat::Safetensors,
        config,
        weights,
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
