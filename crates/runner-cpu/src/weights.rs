//! Host weights in the layout the forward wants: fused QKV and gate/up projections as candle
//! tensors, norms as plain vectors.

use candle_core::{Device, Tensor};
use tpuserve_model::{LlamaConfig, WeightSource};
use tpuserve_runner_api::RunnerError;

pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    /// [q + 2 kv, hidden]
    pub qkv: Tensor,
    pub o_proj: Tensor,
    pub post_norm: Vec<f32>,
    /// [2 intermediate, hidden]
    pub gate_up: Tensor,
    pub down: Tensor,
}

pub struct ModelWeights {
    pub embed: Tensor,
    lm_head: Option<Tensor>,
    pub final_norm: Vec<f32>,
    pub layers: Vec<LayerWeights>,
}

fn werr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Weights(e.to_string())
}

fn load(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<f32>, RunnerError> {
    Ok(src.expect(name, shape).map_err(werr)?.to_f32())
}

fn matrix(rows: Vec<Vec<f32>>, cols: usize) -> Result<Tensor, RunnerError> {
    let n: usize = rows.iter().map(|r| r.len()).sum();
    let data: Vec<f32> = rows.into_iter().flatten().collect();
    Tensor::from_vec(data, (n / cols, cols), &Device::Cpu).map_err(werr)
}

impl ModelWeights {
    pub fn load(src: &dyn WeightSource, cfg: &LlamaConfig) -> Result<Self, RunnerError> {
        let (h, qs, kvs, inter, vocab) = (
            cfg.hidden_size,
            cfg.q_size(),
            cfg.kv_size(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = |s: &str| format!("model.layers.{l}.{s}");
            let qkv = matrix(
                vec![
                    load(src, &n("self_attn.q_proj.weight"), &[qs, h])?,
                    load(src, &n("self_attn.k_proj.weight"), &[kvs, h])?,
                    load(src, &n("self_attn.v_proj.weight"), &[kvs, h])?,
                ],
                h,
            )?;
            let gate_up = matrix(
                vec![
                    load(src, &n("mlp.gate_proj.weight"), &[inter, h])?,
                    load(src, &n("mlp.up_proj.weight"), &[inter, h])?,
                ],
                h,
            )?;
            layers.push(LayerWeights {
                input_norm: load(src, &n("input_layernorm.weight"), &[h])?,
                qkv,
                o_proj: matrix(
                    vec![load(src, &n("self_attn.o_proj.weight"), &[h, qs])?],
                    qs,
                )?,
                post_norm: load(src, &n("post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down: matrix(
                    vec![load(src, &n("mlp.down_proj.weight"), &[h, inter])?],
                    inter,
                )?,
            });
        }
        let embed = matrix(
            vec![load(src, "model.embed_tokens.weight", &[vocab, h])?],
            h,
        )?;
        let lm_head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            None
        } else {
            Some(matrix(vec![load(src, "lm_head.weight", &[vocab, h])?], h)?)
        };
        Ok(ModelWeights {
            embed,
            lm_head,
            final_norm: load(src, "model.norm.weight", &[h])?,
            layers,
        })
    }

    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>, RunnerError> {
        let idx = Tensor::from_slice(ids, ids.len(), &Device::Cpu).map_err(werr)?;
        self.embed
            .index_select(&idx, 0)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(werr)
    }
}
