//! Host weights in the layout the forward wants: fused QKV and gate/up projections (in the
//! checkpoint's ggml blocks, or as f32 candle tensors), norms as plain vectors.

use candle_core::{Device, Tensor};
use tpuserve_model::{LlamaConfig, WeightSource};
use tpuserve_runner_api::RunnerError;

use crate::qmatvec::{QMatrix, QType};
use crate::CpuWeights;

/// A `[out, in]` weight matrix: f32, or ggml blocks in `qmatvec`'s panel layout.
pub enum Matrix {
    F32(Tensor),
    Quant(QMatrix),
}

impl Matrix {
    fn describe(&self) -> String {
        match self {
            Matrix::F32(_) => "f32".into(),
            Matrix::Quant(q) => format!("{:?}", q.ty),
        }
    }
}

pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    /// [q + 2 kv, hidden]
    pub qkv: Matrix,
    pub o_proj: Matrix,
    pub post_norm: Vec<f32>,
    /// [2 intermediate, hidden]
    pub gate_up: Matrix,
    pub down: Matrix,
}

pub struct ModelWeights {
    pub embed: Matrix,
    lm_head: Option<Matrix>,
    pub final_norm: Vec<f32>,
    pub layers: Vec<LayerWeights>,
}

fn werr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Weights(e.to_string())
}

fn load(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<f32>, RunnerError> {
    Ok(src.expect(name, shape).map_err(werr)?.to_f32())
}

/// The named `[rows, cols]` matrices stacked by rows into one. Under `CpuWeights::Native`
/// they stay in their ggml blocks when all of them are stored in the same type the kernels
/// know (rows are whole blocks, so stacking is byte concatenation); otherwise, and always
/// under `CpuWeights::F32`, they are dequantised to one f32 tensor.
fn matrix(
    src: &dyn WeightSource,
    parts: &[(String, usize)],
    cols: usize,
    form: CpuWeights,
) -> Result<Matrix, RunnerError> {
    if form == CpuWeights::Native {
        let mut quant = Vec::with_capacity(parts.len());
        for (name, rows) in parts {
            match src.quantized(name).map_err(werr)? {
                Some(q) if q.shape == [*rows, cols] => quant.push(q),
                Some(q) => {
                    return Err(RunnerError::Weights(format!(
                        "`{name}` has shape {:?}, expected [{rows}, {cols}]",
                        q.shape
                    )))
                }
                None => break,
            }
        }
        let ty = quant.first().and_then(|q| QType::from_ggml(q.ggml_type));
        if let (Some(ty), true) = (
            ty,
            quant.len() == parts.len() && quant.iter().all(|q| q.ggml_type == quant[0].ggml_type),
        ) {
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let mut data = Vec::with_capacity(quant.iter().map(|q| q.bytes.len()).sum());
            for q in &quant {
                data.extend_from_slice(&q.bytes);
            }
            return Ok(Matrix::Quant(
                QMatrix::new(ty, rows, cols, data).map_err(werr)?,
            ));
        }
    }
    let mut data = Vec::new();
    for (name, rows) in parts {
        data.extend(load(src, name, &[*rows, cols])?);
    }
    let n = data.len() / cols;
    Ok(Matrix::F32(
        Tensor::from_vec(data, (n, cols), &Device::Cpu).map_err(werr)?,
    ))
}

impl ModelWeights {
    pub fn load(
        src: &dyn WeightSource,
        cfg: &LlamaConfig,
        form: CpuWeights,
    ) -> Result<Self, RunnerError> {
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
                src,
                &[
                    (n("self_attn.q_proj.weight"), qs),
                    (n("self_attn.k_proj.weight"), kvs),
                    (n("self_attn.v_proj.weight"), kvs),
                ],
                h,
                form,
            )?;
            let gate_up = matrix(
                src,
                &[
                    (n("mlp.gate_proj.weight"), inter),
                    (n("mlp.up_proj.weight"), inter),
                ],
                h,
                form,
            )?;
            layers.push(LayerWeights {
                input_norm: load(src, &n("input_layernorm.weight"), &[h])?,
                qkv,
                o_proj: matrix(src, &[(n("self_attn.o_proj.weight"), h)], qs, form)?,
                post_norm: load(src, &n("post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down: matrix(src, &[(n("mlp.down_proj.weight"), h)], inter, form)?,
            });
        }
        let embed = matrix(src, &[("model.embed_tokens.weight".into(), vocab)], h, form)?;
        let lm_head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            None
        } else {
            Some(matrix(src, &[("lm_head.weight".into(), vocab)], h, form)?)
        };
        Ok(ModelWeights {
            embed,
            lm_head,
            final_norm: load(src, "model.norm.weight", &[h])?,
            layers,
        })
    }

    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>, RunnerError> {
        match &self.embed {
            Matrix::F32(t) => {
                let idx = Tensor::from_slice(ids, ids.len(), &Device::Cpu).map_err(werr)?;
                t.index_select(&idx, 0)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .map_err(werr)
            }
            Matrix::Quant(q) => {
                let mut out = vec![0f32; ids.len() * q.cols];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(q.cols)) {
                    q.dequant_row(id as usize, row);
                }
                Ok(out)
            }
        }
    }

    /// The weight forms in use, e.g. `Q4_1 layers, Q8_0 embeddings`.
    pub fn describe(&self) -> String {
        let layers = self
            .layers
            .first()
            .map(|l| l.qkv.describe())
            .unwrap_or_default();
        format!(
            "{layers} layers, {} embeddings, {} LM head",
            self.embed.describe(),
            self.lm_head().describe()
        )
    }
}
