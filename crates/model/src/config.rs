//! The Llama-family architecture description, read from a Hugging Face `config.json` or from
//! GGUF metadata, so that every runner sees one shape of truth.

use std::path::Path;

use serde::Deserialize;

use crate::ModelError;

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1 frequency-dependent scaling (`rope_type: llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Linear position interpolation (`rope_type: linear`).
    Linear {
        factor: f64,
    },
    /// Per-frequency divisors as stored by llama.cpp (`rope_freqs.weight`).
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype`), used for `--dtype auto`.
    pub torch_dtype: Option<String>,
}

impl LlamaConfig {
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Bytes of KV cache one token takes over all devices: K and V, every layer, at
    /// `elem_bytes` per value (a tensor-parallel device holds `1 / tp` of it).
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_hidden_layers * self.kv_size() * elem_bytes
    }

    /// Inverse rotary frequencies (length `head_dim / 2`) with the configured scaling applied,
    /// computed as Hugging Face transformers does.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                1.0 / (self.rope_theta as f32).powf(exponent) as f64
            })
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => base.iter().map(|&f| (f / factor) as f32).collect(),
            RopeScaling::Factors(factors) => base
                .iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(&f, &d)| (f / d as f64) as f32)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_wavelen = old_len / low_freq_factor;
                let high_wavelen = old_len / high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        let scaled = if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        };
                        scaled as f32
                    })
                    .collect()
            }
        }
    }

    pub fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err(bad(
                "hidden_size, num_hidden_layers and vocab_size must be > 0".into(),
            ));
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim ({}) must be even and > 0",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_str(&text, path)
    }

    pub fn from_hf_str(text: &str, path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let arch = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .unwrap_or_default();
        let supported = matches!(
            arch.as_str(),
            "LlamaForCausalLM" | "llama" | "MistralForCausalLM" | "mistral"
        );
        if !supported {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch,
            });
        }
        let heads = raw.num_attention_heads;
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size.checked_div(heads).unwrap_or(0));
        // transformers 5 writes RoPE as one `rope_parameters` object (theta, type and the
        // scaling fields together) in place of `rope_theta` + `rope_scaling`; reading only the
        // old keys would run such a checkpoint with the default theta, every answer quietly off.
        let (rope_theta, rope_scaling) = match raw.rope_parameters {
            Some(p) => (p.rope_theta.or(raw.rope_theta), Some(p.scaling)),
            None => (raw.rope_theta, raw.rope_scaling),
        };
        let rope_scaling = match rope_scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s.rope_type.or(s.kind).unwrap_or_default();
                match kind.as_str() {
                    "llama3" => RopeScaling::Llama3 {
                        factor: s
                            .factor
                            .ok_or_else(|| bad("rope_scaling.factor missing".into()))?,
                        low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .unwrap_or(8192.0),
                    },
                    "linear" => RopeScaling::Linear {
                        factor: s
                            .factor
                            .ok_or_else(|| bad("rope_scaling.factor missing".into()))?,
                    },
                    "default" | "" => RopeScaling::None,
                    other => return Err(bad(format!("unsupported rope_scaling type `{other}`"))),
                }
            }
        };
        let cfg = LlamaConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(|e| e.into_vec()).unwrap_or_default(),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// transformers 5's `rope_parameters`: the theta beside the fields of `rope_scaling`.
#[derive(Deserialize)]
struct HfRopeParameters {
    rope_theta: Option<f64>,
    #[serde(flatten)]
    scaling: HfRopeScaling,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    rope_parameters: Option<HfRopeParameters>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    /// transformers 5's name for `torch_dtype`.
    dtype: Option<String>,
}

/// Parses `generation_config.json` for the EOS ids a checkpoint stops on (Llama 3.1 lists three).
pub fn generation_eos_ids(path: &Path) -> Option<Vec<u32>> {
    #[derive(Deserialize)]
    struct Gen {
        eos_token_id: Option<OneOrMany>,
    }
    let text = std::fs::read_to_string(path).ok()?;
    let g: Gen = serde_json::from_str(&text).ok()?;
    g.eos_token_id.map(|e| e.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama31_rope_scaling_and_eos_list() {
        // The run-time value: a build cached from a checkout elsewhere bakes in a stale path.
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
        let p = Path::new(&dir).join("../../../shared/fixtures/configs/llama-3.1-70b.config.json");
        let c = LlamaConfig::from_hf_json(&p).unwrap();
        assert_eq!(c.num_hidden_layers, 80);
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.head_dim, 128);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.eos_token_ids, vec![128001]);
        // Llama 3 scaling leaves the highest frequencies alone and divides the lowest by 8.
        let base = LlamaConfig {
            rope_scaling: RopeScaling::None,
            ..c.clone()
        };
        let (s, b) = (c.rope_inv_freq(), base.rope_inv_freq());
        assert_eq!(s[0], b[0]);
        assert!((s[63] - b[63] / 8.0).abs() < 1e-12);
    }

    /// The same model written by transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`)
    /// and by transformers 5 (`rope_parameters`, `dtype`) reads the same.
    #[test]
    fn reads_transformers_5_rope_parameters() {
        let v4 = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4,
            "vocab_size":10,"rope_theta":500000.0,"torch_dtype":"bfloat16",
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let v5 = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4,
            "vocab_size":10,"dtype":"bfloat16",
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192}}"#;
        let p = Path::new("x/config.json");
        let (a, b) = (
            LlamaConfig::from_hf_str(v4, p).unwrap(),
            LlamaConfig::from_hf_str(v5, p).unwrap(),
        );
        assert_eq!(b.rope_theta, 500000.0);
        assert!(matches!(b.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(b.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(a.rope_inv_freq(), b.rope_inv_freq());
        // SmolLM2 as transformers 5 saves it: default RoPE, theta 100000 (not the 10000 a
        // config without any theta gets).
        let smol = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4,
            "vocab_size":10,"rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#;
        let c = LlamaConfig::from_hf_str(smol, p).unwrap();
        assert_eq!(c.rope_theta, 100000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::None));
    }

    #[test]
    fn rejects_unknown_architecture() {
        let text = r#"{"architectures":["GPT2LMHeadModel"],"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}"#;
        let err = LlamaConfig::from_hf_str(text, Path::new("x/config.json")).unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
    }
}
