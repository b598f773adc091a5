//! Host weights in the layout the forward wants: fused QKV and gate/up projections (in the
//! checkpoint's ggml blocks, as bf16, or as f32 candle tensors), norms as plain vectors.

use candle_core::{Device, Tensor};
use half::bf16;
use half::vec::HalfBitsVecExt;
use tpuserve_model::{DType, LlamaConfig, WeightSource};
use tpuserve_runner_api::RunnerError;

use crate::qmatvec::{QMatrix, QType, SwigluWeights};
use crate::CpuWeights;

/// A `[out, in]` weight matrix: f32, bf16, or ggml blocks in `qmatvec`'s panel layout (one
/// type, or a stack of parts in different types).
pub enum Matrix {
    F32(Tensor),
    Bf16(Bf16Matrix),
    Quant(QMatrix),
    QuantParts(Vec<QMatrix>),
}

impl Matrix {
    /// The block-quantised parts (one for a single type), or `None` for f32 / bf16.
    pub fn quant_parts(&self) -> Option<&[QMatrix]> {
        match self {
            Matrix::Quant(q) => Some(std::slice::from_ref(q)),
            Matrix::QuantParts(ps) => Some(ps),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        self.forms().join("+")
    }

    /// Its forms, each once, in order (a stack's parts may differ).
    fn forms(&self) -> Vec<String> {
        match self {
            Matrix::F32(_) => vec!["f32".into()],
            Matrix::Bf16(_) => vec!["bf16".into()],
            Matrix::Quant(q) => vec![format!("{:?}", q.ty)],
            Matrix::QuantParts(ps) => {
                let mut types: Vec<String> = ps.iter().map(|q| format!("{:?}", q.ty)).collect();
                types.dedup();
                types
            }
        }
    }
}

/// A row-major `[rows, cols]` bf16 matrix, computed on by `matvec`'s kernels.
pub struct Bf16Matrix {
    pub w: Vec<bf16>,
    pub rows: usize,
    pub cols: usize,
}

/// Output rows widened to f32 per GEMM call of a long prefill: the GEMM repacks the
/// activations once per call, so fewer than a few hundred outputs a call would spend more on
/// that than on the product.
const GEMM_OUT_BLOCK: usize = 512;

impl Bf16Matrix {
    /// `x [rows, cols] · Wᵀ`, `[rows, self.rows]`. With AVX-512 BF16, `bf16dot` (activations
    /// rounded to bf16, every batch size). Otherwise decode-sized batches stream W once through
    /// `matvec`'s kernels; longer prefills widen W block by block (exact) into a packed f32
    /// GEMM, which reuses every weight across all the rows (SmolLM2 bf16, 88-token prompts,
    /// AVX2 EPYC: TTFT at 1 stream 295 → 191 ms, 8 streams 105 → 122-137 tok/s).
    pub fn matmul_wt(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (out, inner) = (self.rows, self.cols);
        assert_eq!(x.len(), rows * inner, "activation shape");
        if crate::bf16dot::available() {
            return crate::bf16dot::matmul_wt(x, rows, &self.w, out, inner);
        }
        self.matmul_wt_widened(x, rows)
    }

    /// [`Self::matmul_wt`] without `bf16dot`: W widened to f32 (exact), f32 activations.
    fn matmul_wt_widened(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (out, inner) = (self.rows, self.cols);
        if rows <= crate::MATVEC_MAX_ROWS {
            return crate::matvec::matmul_wt(x, rows, &self.w, out, inner);
        }
        let mut y = vec![0f32; rows * out];
        let mut wide = Vec::with_capacity(GEMM_OUT_BLOCK.min(out) * inner);
        for j0 in (0..out).step_by(GEMM_OUT_BLOCK) {
            let n = GEMM_OUT_BLOCK.min(out - j0);
            wide.clear();
            wide.extend(
                self.w[j0 * inner..(j0 + n) * inner]
                    .iter()
                    .map(|v| v.to_f32()),
            );
            // SAFETY: dst is y's columns j0 .. j0 + n of `rows` rows (row stride `out`), lhs is
            // x `[rows, inner]`, rhs is `wide` `[n, inner]` read as its transpose; all in bounds.
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    inner,
                    y.as_mut_ptr().add(j0),
                    1,
                    out as isize,
                    false,
                    x.as_ptr(),
                    1,
                    inner as isize,
                    wide.as_ptr(),
                    inner as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                );
            }
        }
        y
    }
}

pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    /// [q + 2 kv, hidden]
    pub qkv: Matrix,
    pub o_proj: Matrix,
    pub post_norm: Vec<f32>,
    pub gate_up: GateUp,
    pub down: Matrix,
}

/// The MLP's gate and up projections.
pub enum GateUp {
    /// `[2 intermediate, hidden]`: the gate rows, then the up rows.
    Stacked(Matrix),
    /// ggml blocks beside a block-quantised down projection, interleaved so that each task
    /// quantises its block of the SwiGLU product straight from its tile
    /// (`SwigluWeights::quantized_product`).
    Paired(SwigluWeights),
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
/// they stay in their ggml blocks when all of them are stored in types the kernels know
/// (rows are whole blocks, so stacking one type is byte concatenation; parts in different
/// types stay apart, `Matrix::QuantParts`), and as bf16 when all are stored as bf16; under
/// `CpuWeights::Bf16` they become one bf16 matrix whatever they are stored as; otherwise,
/// and always under `CpuWeights::F32`, one f32 tensor (named in `expanded` when it replaces
/// ggml blocks).
fn matrix(
    src: &dyn WeightSource,
    parts: &[(String, usize)],
    cols: usize,
    form: CpuWeights,
    expanded: &mut Vec<String>,
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
        let types: Vec<Option<QType>> = quant
            .iter()
            .map(|q| QType::from_ggml(q.ggml_type))
            .collect();
        if quant.len() == parts.len() && types.iter().all(Option::is_some) {
            let mut ms = Vec::with_capacity(parts.len());
            for ((q, ty), (_, rows)) in quant.iter().zip(types).zip(parts) {
                let m = QMatrix::new(ty.expect("checked"), *rows, cols, q.bytes.to_vec());
                ms.push(m.map_err(werr)?);
            }
            return Ok(Matrix::QuantParts(ms));
        }
        if !quant.is_empty() {
            // Blocks the kernels do not take, or parts of a stack in different types.
            let types: Vec<String> = quant.iter().map(|q| format!("{:?}", q.ggml_type)).collect();
            expanded.push(format!("{} ({})", parts[0].0, types.join(" + ")));
        }
    }
    let all_bf16 = || -> Result<bool, RunnerError> {
        for (name, _) in parts {
            if src.tensor_dtype(name).map_err(werr)? != DType::BF16 {
                return Ok(false);
            }
        }
        Ok(true)
    };
    if form == CpuWeights::Bf16 || (form == CpuWeights::Native && all_bf16()?) {
        let mut bits: Vec<u16> = Vec::new();
        for (name, rows) in parts {
            let part = src
                .expect(name, &[*rows, cols])
                .map_err(werr)?
                .to_bf16_bits();
            // The first part is taken as is: no second copy of a lone matrix (embeddings).
            if bits.is_empty() {
                bits = part;
            } else {
                bits.extend(part);
            }
        }
        let rows = bits.len() / cols.max(1);
        return Ok(Matrix::Bf16(Bf16Matrix {
            w: bits.reinterpret_into(),
            rows,
            cols,
        }));
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
        let mut expanded = Vec::new();
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
                &mut expanded,
            )?;
            let gate_up = matrix(
                src,
                &[
                    (n("mlp.gate_proj.weight"), inter),
                    (n("mlp.up_proj.weight"), inter),
                ],
                h,
                form,
                &mut expanded,
            )?;
            let down = matrix(
                src,
                &[(n("mlp.down_proj.weight"), h)],
                inter,
                form,
                &mut expanded,
            )?;
            let gate_up = match (gate_up, &down) {
                (Matrix::Quant(q), Matrix::Quant(_)) => match SwigluWeights::new(q) {
                    Ok(p) => GateUp::Paired(p),
                    Err(q) => GateUp::Stacked(Matrix::Quant(*q)),
                },
                (m, _) => GateUp::Stacked(m),
            };
            layers.push(LayerWeights {
                input_norm: load(src, &n("input_layernorm.weight"), &[h])?,
                qkv,
                o_proj: matrix(
                    src,
                    &[(n("self_attn.o_proj.weight"), h)],
                    qs,
                    form,
                    &mut expanded,
                )?,
                post_norm: load(src, &n("post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down,
            });
        }
        let embed = matrix(
            src,
            &[("model.embed_tokens.weight".into(), vocab)],
            h,
            form,
            &mut expanded,
        )?;
        let lm_head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            None
        } else {
            Some(matrix(
                src,
                &[("lm_head.weight".into(), vocab)],
                h,
                form,
                &mut expanded,
            )?)
        };
        if let Some(first) = expanded.first() {
            // Said once: these cost 4 bytes a weight and the f32 kernels' speed.
            tracing::warn!(
                "{} weight matrices were dequantised to f32 (the CPU kernels compute Q4_0, Q4_1, \
                 Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS blocks in \
                 place), e.g. {first}",
                expanded.len()
            );
        }
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
            Matrix::Bf16(m) => {
                let mut out = Vec::with_capacity(ids.len() * m.cols);
                for &id in ids {
                    let id = id as usize;
                    let row = m.w.get(id * m.cols..(id + 1) * m.cols).ok_or_else(|| {
                        RunnerError::Weights(format!("token id {id} outside the embeddings"))
                    })?;
                    out.extend(row.iter().map(|v| v.to_f32()));
                }
                Ok(out)
            }
            Matrix::Quant(q) => {
                let mut out = vec![0f32; ids.len() * q.cols];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(q.cols)) {
                    q.dequant_row(id as usize, row);
                }
                Ok(out)
            }
            Matrix::QuantParts(_) => Err(RunnerError::Weights(
                "embeddings stacked from parts in different block types".into(),
            )),
        }
    }

    /// The weight forms in use, e.g. `Q4_1 layers, Q8_0 embeddings`; a layer's matrices in
    /// several forms are named each once (`Q4K+Q6K+Q5_0 layers`).
    pub fn describe(&self) -> String {
        let mut forms: Vec<String> = Vec::new();
        if let Some(l) = self.layers.first() {
            let gate_up = match &l.gate_up {
                GateUp::Stacked(m) => m.forms(),
                GateUp::Paired(p) => vec![format!("{:?}", p.ty())],
            };
            for f in [l.qkv.forms(), l.o_proj.forms(), gate_up, l.down.forms()].concat() {
                if !forms.contains(&f) {
                    forms.push(f);
                }
            }
        }
        let layers = forms.join("+");
        format!(
            "{layers} layers, {} embeddings, {} LM head",
            self.embed.describe(),
            self.lm_head().describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GEMM path of long prefills computes what the unpacked kernel does (to rounding:
    /// the GEMM sums in another order), over output blocks with a ragged last one.
    #[test]
    fn a_bf16_prefill_gemm_agrees_with_the_kernel() {
        let (out, inner) = (GEMM_OUT_BLOCK + 77, 97);
        let val =
            |i: usize, s: usize| ((i * 2_654_435_761 + s * 40_503) % 1000) as f32 / 1000.0 - 0.5;
        let m = Bf16Matrix {
            w: (0..out * inner)
                .map(|i| bf16::from_f32(val(i, 1)))
                .collect(),
            rows: out,
            cols: inner,
        };
        for rows in [crate::MATVEC_MAX_ROWS + 1, 130] {
            let x: Vec<f32> = (0..rows * inner).map(|i| val(i, 2)).collect();
            let y = m.matmul_wt_widened(&x, rows);
            let r = crate::matvec::matmul_wt(&x, rows, &m.w, out, inner);
            assert_eq!(y.len(), r.len());
            for (i, (a, b)) in y.iter().zip(&r).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{rows} rows [{i}]: {a} vs {b}"
                );
            }
        }
    }
}
