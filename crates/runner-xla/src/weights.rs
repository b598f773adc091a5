//! Uploads the model's weights as the stacked, sharded device buffers the step programs take.
//! Each weight is read one tensor at a time from the source (mmap or dequantized), sliced per
//! device as it is read, and each device receives only its shard.

use half::bf16;
use tpuserve_model::{LlamaConfig, WeightSource};
use tpuserve_pjrt::{Buffer, Client, Device, ElementType};
use tpuserve_runner_api::RunnerError;

use crate::program::{arg, WeightElem};

fn werr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Weights(e.to_string())
}

fn derr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Device(e.to_string())
}

/// Host bytes per device being assembled for one argument.
struct Shards {
    elem: WeightElem,
    per_device: Vec<Vec<u8>>,
}

impl Shards {
    fn new(elem: WeightElem, n: usize) -> Self {
        Shards {
            elem,
            per_device: vec![Vec::new(); n],
        }
    }

    fn push(&mut self, d: usize, values: &[f32]) {
        let out = &mut self.per_device[d];
        match self.elem {
            WeightElem::F32 => {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            WeightElem::BF16 => {
                for v in values {
                    out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        }
    }

    /// Appends a `[rows, cols]` matrix split across devices by rows (`axis = 0`) or columns.
    fn push_matrix(&mut self, m: &[f32], rows: usize, cols: usize, axis: usize) {
        let n = self.per_device.len();
        for d in 0..n {
            if axis == 0 {
                let r = rows / n;
                self.push(d, &m[d * r * cols..(d + 1) * r * cols]);
            } else {
                let c = cols / n;
                for row in 0..rows {
                    let start = row * cols + d * c;
                    self.push(d, &m[start..start + c]);
                }
            }
        }
    }

    fn upload(
        self,
        client: &Client,
        devices: &[Device],
        dims: &[i64],
        split_axis: Option<usize>,
    ) -> Result<Vec<Buffer>, RunnerError> {
        let ty = match self.elem {
            WeightElem::F32 => ElementType::F32,
            WeightElem::BF16 => ElementType::BF16,
        };
        let n = devices.len() as i64;
        let mut shard_dims = dims.to_vec();
        if let Some(a) = split_axis {
            shard_dims[a] /= n;
        }
        self.per_device
            .iter()
            .zip(devices)
            .map(|(bytes, dev)| {
                Buffer::from_host(client, bytes, ty, &shard_dims, dev).map_err(derr)
            })
            .collect()
    }
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

fn replicated(
    client: &Client,
    devices: &[Device],
    values: &[f32],
    dims: &[i64],
) -> Result<Vec<Buffer>, RunnerError> {
    devices
        .iter()
        .map(|d| Buffer::from_slice(client, values, dims, d).map_err(derr))
        .collect()
}

/// Every weight argument of the step program, as `[argument][device]`.
pub fn upload(
    client: &Client,
    devices: &[Device],
    src: &dyn WeightSource,
    cfg: &LlamaConfig,
    elem: WeightElem,
) -> Result<Vec<Vec<Buffer>>, RunnerError> {
    let n = devices.len();
    let (h, qs, kvs, inter, vocab, layers) = (
        cfg.hidden_size,
        cfg.q_size(),
        cfg.kv_size(),
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_hidden_layers,
    );
    let load = |name: &str, shape: &[usize]| -> Result<Vec<f32>, RunnerError> {
        Ok(src.expect(name, shape).map_err(werr)?.to_f32())
    };
    let mut out: Vec<Vec<Buffer>> = Vec::with_capacity(arg::NUM_WEIGHTS);

    let embed = {
        let m = load("model.embed_tokens.weight", &[vocab, h])?;
        let mut s = Shards::new(elem, n);
        s.push_matrix(&m, vocab, h, 0);
        s.upload(client, devices, &[vocab as i64, h as i64], Some(0))?
    };
    out.push(embed);
    out.push(replicated(
        client,
        devices,
        &load("model.norm.weight", &[h])?,
        &[h as i64],
    )?);
    let head = if src.contains("lm_head.weight") {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    };
    let lm_head = {
        let m = transpose(&load(head, &[vocab, h])?, vocab, h);
        let mut s = Shards::new(elem, n);
        s.push_matrix(&m, h, vocab, 1);
        s.upload(client, devices, &[h as i64, vocab as i64], Some(1))?
    };
    out.push(lm_head);

    let stacked_norm = |suffix: &str| -> Result<Vec<Buffer>, RunnerError> {
        let mut all = Vec::with_capacity(layers * h);
        for l in 0..layers {
            all.extend(load(&format!("model.layers.{l}.{suffix}"), &[h])?);
        }
        replicated(client, devices, &all, &[layers as i64, h as i64])
    };
    // (name, HF rows = out, HF cols = in, split axis in HF layout); stored transposed
    // [in, out], the layout XLA's dot consumes without a transpose.
    let stacked =
        |suffix: &str, rows: usize, cols: usize, axis: usize| -> Result<Vec<Buffer>, RunnerError> {
            let mut s = Shards::new(elem, n);
            for l in 0..layers {
                let m = load(&format!("model.layers.{l}.{suffix}"), &[rows, cols])?;
                s.push_matrix(&transpose(&m, rows, cols), cols, rows, 1 - axis);
            }
            s.upload(
                client,
                devices,
                &[layers as i64, cols as i64, rows as i64],
                Some(2 - axis),
            )
        };
    out.push(stacked_norm("input_layernorm.weight")?);
    out.push(stacked("self_attn.q_proj.weight", qs, h, 0)?);
    out.push(stacked("self_attn.k_proj.weight", kvs, h, 0)?);
    out.push(stacked("self_attn.v_proj.weight", kvs, h, 0)?);
    out.push(stacked("self_attn.o_proj.weight", h, qs, 1)?);
    out.push(stacked_norm("post_attention_layernorm.weight")?);
    out.push(stacked("mlp.gate_proj.weight", inter, h, 0)?);
    out.push(stacked("mlp.up_proj.weight", inter, h, 0)?);
    out.push(stacked("mlp.down_proj.weight", h, inter, 1)?);
    let inv = cfg.rope_inv_freq();
    out.push(replicated(client, devices, &inv, &[inv.len() as i64])?);
    debug_assert_eq!(out.len(), arg::NUM_WEIGHTS);
    Ok(out)
}

/// A zeroed KV cache `[rows, width]`, split by columns (KV heads) across devices.
pub fn zero_cache(
    client: &Client,
    devices: &[Device],
    rows: usize,
    kv_heads: usize,
    head_dim: usize,
    elem: WeightElem,
) -> Result<Vec<Buffer>, RunnerError> {
    let n = devices.len();
    let (ty, size) = match elem {
        WeightElem::F32 => (ElementType::F32, 4),
        WeightElem::BF16 => (ElementType::BF16, 2),
    };
    // Each device holds its KV heads: [rows, kv_heads / n, head_dim].
    let heads = kv_heads / n;
    let zeros = vec![0u8; rows * heads * head_dim * size];
    let dims = [rows as i64, heads as i64, head_dim as i64];
    devices
        .iter()
        .map(|d| Buffer::from_host(client, &zeros, ty, &dims, d).map_err(derr))
        .collect()
}
