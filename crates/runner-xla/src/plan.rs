//! Memory and throughput plan for a model on a device type: parameter count, weight and KV
//! bytes per device under tensor parallelism, how many tokens and full-length sequences fit,
//! and a decode roofline from HBM bandwidth. `tpuserve plan` prints it; the server sizes its
//! KV cache with the same arithmetic.

use serde::Serialize;
use tpuserve_model::LlamaConfig;

use crate::quant::Quantization;

/// Memory capacity and bandwidth of one device (decimal bytes, as vendors quote them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DeviceSpec {
    pub name: &'static str,
    pub memory_bytes: f64,
    pub bandwidth_bytes_per_s: f64,
    /// Dense bf16 matrix throughput (vendor peak).
    pub bf16_flops_per_s: f64,
    /// Chip-to-chip bandwidth a ring collective gets per device, one direction: what an
    /// all-reduce's traffic is charged. TPUs: the vendor's bidirectional figure over its
    /// ports, halved for one direction, times the two ports a ring through each chip uses
    /// (a v6e-8 is a 2 × 4 slice with no wraparound links: its corner chips have two).
    pub ici_bytes_per_s: f64,
}

pub const DEVICES: &[DeviceSpec] = &[
    DeviceSpec {
        name: "v6e",
        memory_bytes: 32e9,
        bandwidth_bytes_per_s: 1638e9,
        bf16_flops_per_s: 918e12,
        // 800 GB/s bidirectional over 4 ports (docs.cloud.google.com/tpu/docs/v6e).
        ici_bytes_per_s: 800e9 / 4.0 / 2.0 * 2.0,
    },
    DeviceSpec {
        name: "v5e",
        memory_bytes: 16e9,
        bandwidth_bytes_per_s: 819e9,
        bf16_flops_per_s: 197e12,
        // 400 GB/s bidirectional over 4 ports.
        ici_bytes_per_s: 400e9 / 4.0 / 2.0 * 2.0,
    },
    DeviceSpec {
        name: "v5p",
        memory_bytes: 95e9,
        bandwidth_bytes_per_s: 2765e9,
        bf16_flops_per_s: 459e12,
        // 1,200 GB/s bidirectional over 6 ports (3D torus).
        ici_bytes_per_s: 1200e9 / 6.0 / 2.0 * 2.0,
    },
    DeviceSpec {
        name: "H100",
        memory_bytes: 80e9,
        bandwidth_bytes_per_s: 3350e9,
        bf16_flops_per_s: 989e12,
        ici_bytes_per_s: 900e9 / 2.0,
    },
    DeviceSpec {
        name: "H200",
        memory_bytes: 141e9,
        bandwidth_bytes_per_s: 4800e9,
        bf16_flops_per_s: 989e12,
        ici_bytes_per_s: 900e9 / 2.0,
    },
    DeviceSpec {
        name: "CPU",
        memory_bytes: 24e9,
        bandwidth_bytes_per_s: 20e9,
        bf16_flops_per_s: 1e12,
        ici_bytes_per_s: 20e9,
    },
];

/// The spec of a PJRT device kind string (`TPU v6 lite`, `NVIDIA H200`, …), for plugins that
/// do not report their memory.
pub fn device_spec_for_kind(kind: &str) -> Option<DeviceSpec> {
    let k = kind.to_ascii_lowercase();
    let name = if k.contains("v6 lite") || k.contains("v6e") {
        "v6e"
    } else if k.contains("v5 lite") || k.contains("v5e") {
        "v5e"
    } else if k.contains("v5p") || k.contains("tpu v5") {
        "v5p"
    } else if k.contains("h200") {
        "H200"
    } else if k.contains("h100") {
        "H100"
    } else {
        return None;
    };
    device_spec(name)
}

/// What sizing the KV cache from device memory needs.
#[derive(Debug, Clone)]
pub struct KvMemory {
    pub device_bytes: f64,
    pub utilization: f64,
    pub weight_bytes: f64,
    pub kv_bytes_per_token: f64,
    pub block_size: usize,
    pub max_model_len: usize,
}

/// Scratch space XLA's programs need beside weights and cache (activations, logits, gathers).
pub fn workspace_reserve(device_bytes: f64) -> f64 {
    (0.04 * device_bytes).max(512.0 * 1024.0 * 1024.0)
}

/// Bytes per device left for the KV cache: `utilization` × device memory less the weights and
/// the workspace (the one rule both the runner and `plan` size the cache by; may be negative).
pub fn kv_budget_bytes(device_bytes: f64, utilization: f64, weight_bytes: f64) -> f64 {
    utilization * device_bytes - weight_bytes - workspace_reserve(device_bytes)
}

/// KV blocks per device (the one the runner reserves for padding included) that fit in
/// `utilization` × device memory after the weights and the workspace; an error naming the
/// numbers when not even one `max_model_len` sequence fits.
pub fn kv_blocks_in_memory(m: &KvMemory) -> Result<usize, PlanError> {
    let budget = m.utilization * m.device_bytes;
    let reserve = workspace_reserve(m.device_bytes);
    let kv = kv_budget_bytes(m.device_bytes, m.utilization, m.weight_bytes);
    let block_bytes = m.kv_bytes_per_token * m.block_size as f64;
    let blocks = if kv > 0.0 {
        (kv / block_bytes).floor() as usize
    } else {
        0
    };
    let needed = m.max_model_len.div_ceil(m.block_size) + 1;
    if blocks < needed {
        return Err(PlanError::NoRoomForKv {
            weights: m.weight_bytes / 1e9,
            reserve: reserve / 1e9,
            min_kv: needed as f64 * block_bytes / 1e9,
            max_model_len: m.max_model_len,
            budget: budget / 1e9,
            util: m.utilization,
            mem: m.device_bytes / 1e9,
        });
    }
    Ok(blocks)
}

pub fn device_spec(name: &str) -> Option<DeviceSpec> {
    DEVICES
        .iter()
        .find(|d| d.name.eq_ignore_ascii_case(name))
        .copied()
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub device: DeviceSpec,
    pub tensor_parallel_size: usize,
    /// Bytes per element of the activations, the KV cache and the unquantised weights.
    pub dtype_bytes: usize,
    /// `int8`: projections and LM head at one byte per parameter plus an f32 scale per
    /// output channel (the embedding and norms stay at `dtype_bytes`).
    pub quantization: Option<&'static str>,
    pub parameters: u64,
    /// Bytes the weights take on the devices (all of them).
    pub weight_bytes_total: f64,
    pub weight_bytes_per_device: f64,
    pub kv_bytes_per_token_total: u64,
    pub kv_bytes_per_token_per_device: u64,
    pub kv_budget_bytes_per_device: f64,
    pub kv_tokens: u64,
    pub kv_blocks: u64,
    pub block_size: usize,
    pub max_model_len: usize,
    pub max_full_length_sequences: u64,
    pub max_num_seqs: usize,
    /// Sequences decoding together in the roofline: min(max_num_seqs, what fits at half length).
    pub roofline_batch: u64,
    pub roofline_step_seconds: f64,
    pub roofline_tokens_per_s: f64,
    /// Storage read rate the start-up estimate assumes (`--read-gbps`), GB/s.
    pub read_gbps: f64,
    /// The checkpoint's bytes (at `dtype_bytes` per parameter: what placing the weights
    /// reads, quantised or not).
    pub checkpoint_bytes: f64,
    /// Seconds to place the weights when reading the checkpoint is the bound (conversion and
    /// uploads overlap the reads): the checkpoint's bytes at `read_gbps`.
    pub weight_load_seconds: f64,
}

/// A conservative read rate for a checkpoint on a GCS FUSE mount or a persistent disk, GB/s.
pub const DEFAULT_READ_GBPS: f64 = 1.0;

impl Plan {
    /// The start-up estimate at another storage read rate.
    pub fn with_read_gbps(mut self, gbps: f64) -> Plan {
        self.read_gbps = gbps;
        self.weight_load_seconds = self.checkpoint_bytes / (gbps * 1e9);
        self
    }
}

/// hidden, vocab, layers, q size, kv size, intermediate size.
fn dims(c: &LlamaConfig) -> [u64; 6] {
    [
        c.hidden_size as u64,
        c.vocab_size as u64,
        c.num_hidden_layers as u64,
        c.q_size() as u64,
        c.kv_size() as u64,
        c.intermediate_size as u64,
    ]
}

pub fn parameter_count(c: &LlamaConfig) -> u64 {
    let [h, v, l, qs, kvs, i] = dims(c);
    let per_layer = h * qs + 2 * h * kvs + qs * h + 3 * h * i + 2 * h;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    v * h + head + l * per_layer + h
}

/// Parameters of the matrices `--quantization int8` stores as int8 (every projection and the
/// LM head, counted as `parameter_count` counts it), and their output channels (one f32 scale
/// each).
pub fn quantized_counts(c: &LlamaConfig) -> (u64, u64) {
    let [h, v, l, qs, kvs, i] = dims(c);
    let head = if c.tie_word_embeddings { 0 } else { v };
    let params = l * (h * qs + 2 * h * kvs + qs * h + 3 * h * i) + head * h;
    let channels = l * (qs + 2 * kvs + h + 2 * i + h) + head;
    (params, channels)
}

/// Bytes of all the weights on the devices: `dtype_bytes` per parameter, or with int8 the
/// quantised matrices at one byte plus four per output channel.
pub fn weight_bytes(c: &LlamaConfig, dtype_bytes: usize, quant: Quantization) -> f64 {
    let all = parameter_count(c);
    match quant {
        Quantization::None => (all * dtype_bytes as u64) as f64,
        Quantization::Int8 => {
            let (q, channels) = quantized_counts(c);
            ((all - q) * dtype_bytes as u64 + q + 4 * channels) as f64
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("--tensor-parallel-size {tp} does not divide the model's {what} ({n})")]
    Indivisible {
        tp: usize,
        what: &'static str,
        n: usize,
    },
    #[error(
        "not enough device memory: {per_device:.2} GB of weights per device plus the minimum KV cache \
         ({min_kv:.3} GB for one {max_model_len}-token sequence) exceed {budget:.2} GB \
         ({util} × {mem:.1} GB of {device}); use more devices (--tensor-parallel-size) or a smaller --max-model-len"
    )]
    OutOfMemory {
        per_device: f64,
        min_kv: f64,
        max_model_len: usize,
        budget: f64,
        util: f64,
        mem: f64,
        device: &'static str,
    },
    #[error(
        "not enough device memory: {weights:.2} GB of weights per device, {reserve:.2} GB of \
         workspace and the minimum KV cache ({min_kv:.3} GB for one {max_model_len}-token \
         sequence) exceed {budget:.2} GB ({util} × {mem:.2} GB per device); raise \
         --gpu-memory-utilization, use more devices (--tensor-parallel-size) or lower --max-model-len"
    )]
    NoRoomForKv {
        weights: f64,
        reserve: f64,
        min_kv: f64,
        max_model_len: usize,
        budget: f64,
        util: f64,
        mem: f64,
    },
}

/// The plan with the KV cache in the weights' dtype.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    c: &LlamaConfig,
    device: DeviceSpec,
    tp: usize,
    dtype_bytes: usize,
    max_model_len: usize,
    max_num_seqs: usize,
    memory_utilization: f64,
    block_size: usize,
    quant: Quantization,
) -> Result<Plan, PlanError> {
    plan_with_kv(
        c,
        device,
        tp,
        (dtype_bytes, dtype_bytes),
        max_model_len,
        max_num_seqs,
        memory_utilization,
        block_size,
        quant,
    )
}

/// The plan with `(weight, KV cache)` bytes per element (`--kv-cache-dtype fp8`: 1).
#[allow(clippy::too_many_arguments)]
pub fn plan_with_kv(
    c: &LlamaConfig,
    device: DeviceSpec,
    tp: usize,
    (dtype_bytes, kv_elem_bytes): (usize, usize),
    max_model_len: usize,
    max_num_seqs: usize,
    memory_utilization: f64,
    block_size: usize,
    quant: Quantization,
) -> Result<Plan, PlanError> {
    for (what, n) in [
        ("attention heads", c.num_attention_heads),
        ("KV heads", c.num_key_value_heads),
    ] {
        if n % tp != 0 {
            return Err(PlanError::Indivisible { tp, what, n });
        }
    }
    let parameters = parameter_count(c);
    let weight_bytes_total = weight_bytes(c, dtype_bytes, quant);
    let weight_bytes_per_device = weight_bytes_total / tp as f64;
    let kv_total = c.kv_bytes_per_token(kv_elem_bytes) as u64;
    let kv_dev = kv_total / tp as u64;
    let budget = memory_utilization * device.memory_bytes;
    // The same rule the runner sizes its cache from device memory by.
    let kv_budget = kv_budget_bytes(
        device.memory_bytes,
        memory_utilization,
        weight_bytes_per_device,
    );
    let min_kv = (kv_dev * max_model_len as u64) as f64;
    if kv_budget < min_kv {
        return Err(PlanError::OutOfMemory {
            per_device: weight_bytes_per_device / 1e9,
            min_kv: min_kv / 1e9,
            max_model_len,
            budget: budget / 1e9,
            util: memory_utilization,
            mem: device.memory_bytes / 1e9,
            device: device.name,
        });
    }
    let kv_tokens = (kv_budget / kv_dev as f64).floor() as u64;
    let kv_blocks = kv_tokens / block_size as u64;
    let full = kv_tokens / max_model_len as u64;
    let avg_ctx = (max_model_len / 2).max(1) as u64;
    let batch = (max_num_seqs as u64).min(kv_tokens / avg_ctx).max(1);
    let step = (weight_bytes_per_device + (batch * avg_ctx * kv_dev) as f64)
        / device.bandwidth_bytes_per_s;
    Ok(Plan {
        device,
        tensor_parallel_size: tp,
        dtype_bytes,
        quantization: quant.is_int8().then_some("int8"),
        parameters,
        weight_bytes_total,
        weight_bytes_per_device,
        kv_bytes_per_token_total: kv_total,
        kv_bytes_per_token_per_device: kv_dev,
        kv_budget_bytes_per_device: kv_budget,
        kv_tokens,
        kv_blocks,
        block_size,
        max_model_len,
        max_full_length_sequences: full,
        max_num_seqs,
        roofline_batch: batch,
        roofline_step_seconds: step,
        roofline_tokens_per_s: batch as f64 / step,
        read_gbps: 0.0,
        checkpoint_bytes: (parameters * dtype_bytes as u64) as f64,
        weight_load_seconds: 0.0,
    }
    .with_read_gbps(DEFAULT_READ_GBPS))
}

impl Plan {
    /// The same plan with a KV cache of exactly `blocks` blocks per device (`serve
    /// --num-gpu-blocks-override`, `--kv-cache-memory-bytes`) instead of the memory share's.
    pub fn with_kv_blocks(mut self, blocks: u64) -> Plan {
        let kv_dev = self.kv_bytes_per_token_per_device;
        self.kv_blocks = blocks;
        self.kv_tokens = blocks * self.block_size as u64;
        self.kv_budget_bytes_per_device = (self.kv_tokens * kv_dev) as f64;
        self.max_full_length_sequences = self.kv_tokens / self.max_model_len.max(1) as u64;
        let avg_ctx = (self.max_model_len / 2).max(1) as u64;
        let batch = (self.max_num_seqs as u64)
            .min(self.kv_tokens / avg_ctx)
            .max(1);
        self.roofline_batch = batch;
        self.roofline_step_seconds = (self.weight_bytes_per_device
            + (batch * avg_ctx * kv_dev) as f64)
            / self.device.bandwidth_bytes_per_s;
        self.roofline_tokens_per_s = batch as f64 / self.roofline_step_seconds;
        self
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: f64| b / 1e9;
        writeln!(
            f,
            "device                      {} × {} ({:.0} GB, {:.0} GB/s each)",
            self.tensor_parallel_size,
            self.device.name,
            gb(self.device.memory_bytes),
            gb(self.device.bandwidth_bytes_per_s)
        )?;
        writeln!(
            f,
            "parameters                  {:.2} B",
            self.parameters as f64 / 1e9
        )?;
        let form = match self.quantization {
            Some(q) => format!(
                "{q} projections and LM head with per-channel scales, embedding at {} bytes/param",
                self.dtype_bytes
            ),
            None => format!("{} bytes/param", self.dtype_bytes),
        };
        writeln!(
            f,
            "weights                     {:.2} GB in all, {:.2} GB per device ({form})",
            gb(self.weight_bytes_total),
            gb(self.weight_bytes_per_device),
        )?;
        writeln!(
            f,
            "KV cache per token          {} bytes per device ({} in all)",
            self.kv_bytes_per_token_per_device, self.kv_bytes_per_token_total
        )?;
        writeln!(
            f,
            "KV budget per device        {:.2} GB → {} tokens, {} blocks of {}",
            gb(self.kv_budget_bytes_per_device),
            self.kv_tokens,
            self.kv_blocks,
            self.block_size
        )?;
        writeln!(
            f,
            "full-length sequences       {} × {} tokens",
            self.max_full_length_sequences, self.max_model_len
        )?;
        writeln!(f, "decode roofline             {:.0} tokens/s at batch {} (avg context {}), {:.1} ms/step", self.roofline_tokens_per_s, self.roofline_batch, self.max_model_len / 2, self.roofline_step_seconds * 1e3)?;
        write!(
            f,
            "weight placement            ~{:.0} s at {} GB/s storage reads ({:.1} GB; conversion \
             and uploads overlap the reads)",
            self.weight_load_seconds,
            self.read_gbps,
            gb(self.checkpoint_bytes)
        )
    }
}

#[cfg(test)]
mod kv_memory_tests {
    use super::*;

    #[test]
    fn kv_blocks_fill_what_the_weights_and_workspace_leave() {
        // 70B on v6e-8: 17.64 GB of weights and 40,960 KV bytes per token per chip.
        let m = KvMemory {
            device_bytes: 32e9,
            utilization: 0.9,
            weight_bytes: 17.64e9,
            kv_bytes_per_token: 40_960.0,
            block_size: 16,
            max_model_len: 4096,
        };
        let blocks = kv_blocks_in_memory(&m).unwrap();
        let kv = 0.9 * 32e9 - 17.64e9 - workspace_reserve(32e9);
        assert_eq!(blocks, (kv / (40_960.0 * 16.0)).floor() as usize);
        assert!(
            blocks * 16 / 4096 >= 10,
            "about ten full-length sequences fit"
        );
    }

    #[test]
    fn too_little_memory_names_the_numbers() {
        let m = KvMemory {
            device_bytes: 16e9,
            utilization: 0.9,
            weight_bytes: 17.64e9,
            kv_bytes_per_token: 40_960.0,
            block_size: 16,
            max_model_len: 4096,
        };
        let e = kv_blocks_in_memory(&m).unwrap_err().to_string();
        for part in [
            "17.64 GB of weights",
            "4096-token",
            "14.40 GB",
            "0.9 × 16.00 GB",
        ] {
            assert!(e.contains(part), "{part} missing from: {e}");
        }
    }

    #[test]
    fn device_kinds_map_to_specs() {
        assert_eq!(device_spec_for_kind("TPU v6 lite").unwrap().name, "v6e");
        assert_eq!(device_spec_for_kind("TPU v5 lite").unwrap().name, "v5e");
        assert_eq!(device_spec_for_kind("NVIDIA H200").unwrap().name, "H200");
        assert!(device_spec_for_kind("cpu").is_none());
    }
}
