//! `--load-format dummy` (as in vLLM): weights of the config's shapes with no checkpoint read,
//! so a server can be started and benchmarked at 8B / 70B shapes from a `config.json` alone.
//! Values are small deterministic pseudo-random numbers in ±1e-3 (vLLM's dummy range).
//! Device runners fill their buffers on the device instead of asking for these host tensors.

use std::borrow::Cow;

use half::bf16;

use crate::config::LlamaConfig;
use crate::loader::required_weight_names;
use crate::tensor::{DType, HostTensor, WeightSource};
use crate::ModelError;

/// Half-width of the uniform range the dummy weights are drawn from.
pub const DUMMY_SCALE: f32 = 1e-3;

pub struct DummyWeights {
    cfg: LlamaConfig,
    names: Vec<String>,
}

impl DummyWeights {
    pub fn new(cfg: &LlamaConfig) -> Self {
        DummyWeights {
            cfg: cfg.clone(),
            names: required_weight_names(cfg),
        }
    }

    /// The HF-layout shape of a weight this model needs, `None` for an unknown name.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let c = &self.cfg;
        let (h, qs, kvs, inter) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        let suffix = name
            .rsplit_once("layers.")
            .map_or(name, |(_, s)| s.split_once('.').map_or(s, |(_, rest)| rest));
        Some(match suffix {
            "model.embed_tokens.weight" | "lm_head.weight" => vec![c.vocab_size, h],
            "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => {
                vec![h]
            }
            "self_attn.q_proj.weight" => vec![qs, h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kvs, h],
            "self_attn.o_proj.weight" => vec![h, qs],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![inter, h],
            "mlp.down_proj.weight" => vec![h, inter],
            _ => return None,
        })
    }
}

/// A 32-bit mix of an element index and a seed (the same integer steps a device program
/// can run), mapped to a uniform value in `[-scale, scale)`.
pub fn dummy_value(index: u32, seed: u32, scale: f32) -> f32 {
    let mut x = index.wrapping_mul(0x9E37_79B1).wrapping_add(seed);
    x ^= x >> 15;
    x = x.wrapping_mul(0x2C1B_3C6D);
    x ^= x >> 12;
    let unit = (x >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
    (unit * 2.0 - 1.0) * scale
}

/// A stable seed per weight name (FNV-1a), so every tensor gets different values.
pub fn dummy_seed(name: &str) -> u32 {
    name.bytes().fold(0x811C_9DC5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

impl WeightSource for DummyWeights {
    fn describe(&self) -> String {
        "dummy weights (--load-format dummy)".into()
    }

    fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    fn tensor(&self, name: &str) -> Result<HostTensor<'_>, ModelError> {
        let shape = self
            .shape_of(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                source_desc: self.describe(),
            })?;
        let n: usize = shape.iter().product();
        let seed = dummy_seed(name);
        let mut bytes = Vec::with_capacity(n * 2);
        for i in 0..n {
            let v = bf16::from_f32(dummy_value(i as u32, seed, DUMMY_SCALE));
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        Ok(HostTensor {
            shape,
            dtype: DType::BF16,
            bytes: Cow::Owned(bytes),
        })
    }

    fn tensor_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn is_dummy(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_stay_in_range_and_differ_between_tensors() {
        let a: Vec<f32> = (0..10_000)
            .map(|i| dummy_value(i, 1, DUMMY_SCALE))
            .collect();
        assert!(a.iter().all(|v| v.abs() <= DUMMY_SCALE));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 1e-4, "mean {mean}");
        let distinct: std::collections::HashSet<u32> = a.iter().map(|v| v.to_bits()).collect();
        assert!(distinct.len() > 9_000);
        assert_ne!(dummy_seed("a.weight"), dummy_seed("b.weight"));
        assert_ne!(dummy_value(7, 1, 1.0), dummy_value(7, 2, 1.0));
    }
}
