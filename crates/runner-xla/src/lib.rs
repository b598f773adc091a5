//! The production runner: the Llama step as StableHLO programs compiled by a PJRT plugin
//! (libtpu on TPU, the CUDA plugin on GPU, the XLA CPU plugin in CI), run on device-resident
//! weights with a donated, in-place KV cache. Only token ids and requested logprobs come back.
//!
//! Compilation is its own concern here: every shape bucket is compiled (or loaded from the
//! persistent cache) before serving; a step never compiles after warm-up unless that is
//! explicitly allowed, and each such event is counted.

mod attention_choice;
mod compilation;
pub mod compile_cache;
pub mod device;
pub mod deviceless;
pub mod hlo;
pub mod kernels;
pub mod pallas;
pub mod plan;
pub mod program;
pub mod quant;
mod step;
pub mod weights;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tpuserve_model::LoadedModel;
use tpuserve_pjrt::{Buffer, Client, CompileOptions, Device, LoadedExecutable, Plugin};
use tpuserve_runner_api::{
    sampler::seeded_uniform, sizing, validate_plan, CompileCounters, KvCacheShape, ModelRunner,
    RunnerError, SampledToken, SamplingParams, SamplingSupport, SeqOutput, StepOutput, StepPlan,
    TokenBitmask, TokenLogprobs,
};

pub use crate::attention_choice::{find_kernel_dir, AttentionBackend, IMAGE_KERNELS};
use crate::compile_cache::{CacheKey, CompileCache, Lookup};
pub use crate::device::DeviceKind;
pub use crate::program::WeightElem;
use crate::program::{arg, mask_words, out, Bucket, ProgramConfig};
pub use crate::quant::{KvCacheDtype, Quantization};

#[derive(Debug, Clone)]
pub struct XlaRunnerOptions {
    pub device: DeviceKind,
    /// Overrides the plugin found for `device`.
    pub plugin_path: Option<PathBuf>,
    pub tensor_parallel_size: usize,
    /// Usable KV blocks (one more is reserved as the write target of padding tokens).
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_batched_tokens: usize,
    /// `--max-num-seqs`: a decode execution has one row per running sequence, so no decode
    /// bucket is larger than this (rounded up to a power of two).
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    /// Top logprobs computed on device when a request asks for any (vLLM's `max_logprobs`).
    pub max_logprobs: usize,
    pub weight_dtype: WeightElem,
    /// `--quantization int8`: projections and LM head as int8 with per-channel scales.
    pub quantization: Quantization,
    /// `--kv-cache-dtype`: the activations' dtype (auto) or fp8.
    pub kv_cache_dtype: KvCacheDtype,
    /// `VLLM_XLA_CACHE_PATH`: where compiled executables persist across restarts and pods.
    pub compile_cache_dir: Option<PathBuf>,
    /// Query rows per attention tile of a prompt (rows of one sequence that share one read
    /// of its pages); decoding rows are tiles of one.
    pub attention_tile: usize,
    /// Context read per attention iteration, in tokens (rounded down to whole blocks); 0
    /// picks the platform's default.
    pub kv_chunk_tokens: usize,
    /// Buckets with few query tiles read bigger chunks, up to this many bytes of K and V
    /// gathered per chip an iteration (`ProgramConfig::chunk_blocks`); `None` picks the
    /// platform's default.
    pub kv_chunk_budget: Option<usize>,
    /// Make a compilation after warm-up an error instead of a counted event.
    pub strict_no_recompile: bool,
    /// Devices the XLA CPU plugin exposes (0 = as many as the tensor-parallel size).
    pub cpu_device_count: usize,
    /// Where the weights are laid out at start-up (auto: host cores for the XLA CPU plugin,
    /// a device program on accelerators); tests pin each to check both.
    pub weight_layout: weights::Layout,
    /// Size the KV cache from device memory instead of `num_blocks`: this share of each
    /// device's memory holds the weights and the cache (vLLM's `--gpu-memory-utilization`).
    pub kv_memory_utilization: Option<f64>,
    /// `--attention-backend`: the StableHLO attention or the Pallas kernel.
    pub attention_backend: AttentionBackend,
    /// `--attention-kernels`: the kernel's artifacts (`scripts/attention-kernels.sh`).
    pub attention_kernels: Option<PathBuf>,
}

impl Default for XlaRunnerOptions {
    fn default() -> Self {
        XlaRunnerOptions {
            device: DeviceKind::XlaCpu,
            plugin_path: None,
            tensor_parallel_size: 1,
            num_blocks: 256,
            block_size: sizing::DEFAULT_BLOCK_SIZE,
            // Smaller than serving's default: tests compile fewer buckets.
            max_num_batched_tokens: 256,
            max_num_seqs: 256,
            max_model_len: 2048,
            max_logprobs: sizing::DEFAULT_MAX_LOGPROBS,
            weight_dtype: WeightElem::F32,
            quantization: Quantization::None,
            kv_cache_dtype: KvCacheDtype::Auto,
            compile_cache_dir: None,
            attention_tile: 16,
            kv_chunk_tokens: 0,
            kv_chunk_budget: None,
            strict_no_recompile: false,
            cpu_device_count: 0,
            kv_memory_utilization: None,
            weight_layout: weights::Layout::Auto,
            attention_backend: AttentionBackend::Auto,
            attention_kernels: None,
        }
    }
}

/// Compilation and transfer counters (exported as `tpuserve:` metrics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XlaStats {
    pub compilations: usize,
    pub cache_hits: usize,
    pub cache_misses: usize,
    pub compile_seconds: f64,
    pub compilations_after_warmup: usize,
    pub executions: usize,
    /// Bytes copied device → host by step executions.
    pub bytes_to_host: u64,
    /// Structured-output mask bytes copied host → device (zero when no row is constrained).
    pub bytes_to_device: u64,
}

pub struct XlaRunner {
    client: Client,
    devices: Vec<Device>,
    cfg: ProgramConfig,
    buckets: Vec<Bucket>,
    executables: HashMap<Bucket, LoadedExecutable>,
    weights: Vec<Vec<Buffer>>,
    k_cache: Vec<Buffer>,
    v_cache: Vec<Buffer>,
    cache: Option<CompileCache>,
    environment: String,
    opts: XlaRunnerOptions,
    stats: XlaStats,
    counters: Arc<CompileCounters>,
    warmed_up: bool,
    /// What `choose_attention` decided, as logged.
    attention_line: String,
    scratch_block: u32,
    unseeded_counter: u64,
    /// Per token bucket, a mask input that is never read (steps without structured output
    /// pass it with the mask switched off, so nothing is uploaded for it).
    idle_masks: HashMap<usize, Vec<Buffer>>,
}

/// Context read per attention iteration when not set: a loop iteration costs little on the
/// XLA CPU plugin, so short contexts read little there; on accelerators fewer, bigger
/// iterations keep the loop overhead small against the step.
pub fn default_kv_chunk_tokens(platform: &str) -> usize {
    if platform == "cpu" {
        128
    } else {
        256
    }
}

/// Bytes of K and V an attention iteration may gather per chip when not set: none beyond
/// `kv_chunk_tokens` on the XLA CPU plugin (its iterations are cheap, and a bigger chunk
/// reads context a short sequence does not have); on accelerators 128 MiB, so fewer rows
/// read longer chunks in fewer iterations (see `ProgramConfig::chunk_blocks`).
pub fn default_kv_chunk_budget(platform: &str) -> usize {
    if platform == "cpu" {
        0
    } else {
        128 << 20
    }
}

/// How every step program is compiled: SPMD-partitioned over `tp` devices.
/// `platform`: the PJRT platform's name (`tpu`, `cpu`, `cuda`); its compiler's own options
/// go only to it.
pub(crate) fn compile_options(tp: i64, platform: &str) -> CompileOptions {
    if tp == 1 {
        return CompileOptions::default();
    }
    let mut options = CompileOptions::spmd(tp);
    if platform == "tpu" {
        // No windowed (collective) matmul for the sequence-parallel reduce-scatters: its loop
        // takes the layer's wd as a buffer of its own, and the compiler copied it out of the
        // stacked weights every layer (70B TP 8: 248k cycles a layer, half a 512-row layer's
        // matmul time, deviceless v6e).
        options.env_option_overrides.push((
            "xla_tpu_enable_windowed_einsum_for_reduce_scatter".into(),
            tpuserve_pjrt::OptionOverride::Bool(false),
        ));
    }
    options
}

fn derr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Device(e.to_string())
}

/// Why a request cannot run on this runner (sampling features not implemented on device).
pub fn unsupported_sampling(p: &SamplingParams) -> Option<&'static str> {
    SamplingSupport::OnDevice.unsupported(p, 0)
}

impl XlaRunner {
    pub fn new(model: &LoadedModel, mut opts: XlaRunnerOptions) -> Result<Self, RunnerError> {
        let t0 = Instant::now();
        let c = &model.config;
        let tp = opts.tensor_parallel_size.max(1);
        let path = match &opts.plugin_path {
            Some(p) => p.clone(),
            None => device::plugin_path(&opts.device).map_err(derr)?,
        };
        // libtpu started off a TPU queries the cloud metadata server; only `plan --cost`
        // loads it there, inside `unshare -n` with TPU_SKIP_MDS_QUERY=1 (see deviceless.rs).
        if opts.device == DeviceKind::Tpu && !device::tpu_chips_present() {
            return Err(RunnerError::Device(format!(
                "--device tpu: no TPU chips on this machine (no /dev/accel*, no /dev/vfio group); \
                 refusing to start libtpu ({}), which would query the cloud metadata server. \
                 To see what the TPU compiler makes of this model without a TPU, run \
                 `tpuserve plan --cost`",
                path.display()
            )));
        }
        let plugin = Plugin::load(&path).map_err(derr)?;
        let client = Client::new(
            &plugin,
            &device::client_options(
                &opts.device,
                if opts.cpu_device_count > 0 {
                    opts.cpu_device_count
                } else {
                    tp
                },
            ),
        )
        .map_err(derr)?;
        let all = client.addressable_devices().map_err(derr)?;
        if all.len() < tp {
            return Err(RunnerError::Device(format!(
                "--tensor-parallel-size {tp} needs {tp} devices but the {} plugin exposes {}",
                client.platform_name().unwrap_or_default(),
                all.len()
            )));
        }
        check_tp(c, tp)?;
        let devices: Vec<Device> = all.into_iter().take(tp).collect();
        let kind = devices[0].kind().unwrap_or_default();
        let environment = format!(
            "platform={} version={} kind={} devices={} api={:?}",
            client.platform_name().unwrap_or_default(),
            client.platform_version().unwrap_or_default(),
            kind,
            devices.len(),
            plugin.api_version()
        );
        tracing::info!("PJRT {environment} ({})", path.display());
        // What an operator checks on a real node: each chip's kind and place in the topology
        // (TPU plugins report `coords`, `core_on_chip`, … as attributes).
        for d in &devices {
            let attrs = d
                .attributes()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join(" ");
            tracing::info!(
                "device {} ({}): {attrs}",
                d.id().unwrap_or(-1),
                d.kind().unwrap_or_default()
            );
        }

        if opts.kv_chunk_tokens == 0 {
            opts.kv_chunk_tokens =
                default_kv_chunk_tokens(&client.platform_name().unwrap_or_default());
        }
        let mut cfg = ProgramConfig::for_model(
            c,
            tp,
            opts.weight_dtype,
            opts.num_blocks,
            opts.block_size,
            opts.max_model_len,
            opts.kv_chunk_tokens,
        )
        .with_kv_chunk_budget(opts.kv_chunk_budget.unwrap_or_else(|| {
            default_kv_chunk_budget(&client.platform_name().unwrap_or_default())
        }))
        .with_quantization(opts.quantization)
        .with_kv_cache(opts.kv_cache_dtype);
        let (weights, report) = if model.weights.is_dummy() {
            weights::dummy(&client, &devices, c, &cfg)?
        } else {
            weights::upload(
                &client,
                &devices,
                model.weights.as_ref(),
                c,
                (opts.weight_dtype, opts.quantization),
                opts.weight_layout,
            )?
        };
        let rss = weights::rss_kb()
            .map(|(peak, anon)| {
                format!(
                    "; host RSS peak {:.2} GB, anonymous now {:.2} GB",
                    peak as f64 / 1e6,
                    anon as f64 / 1e6
                )
            })
            .unwrap_or_default();
        let quantized = if opts.quantization.is_int8() {
            ", projections and LM head quantised to int8 per output channel"
        } else {
            ""
        };
        tracing::info!(
            "weights ({}{quantized}) on {} device(s): {}{rss}",
            model.weights.describe(),
            devices.len(),
            report.summary()
        );
        // PJRT checks only byte sizes at execution: catch a layout mix-up here, by name.
        let expected = cfg.arg_types(Bucket {
            tokens: 16,
            tile: 1,
            top_k: 0,
        });
        for (&i, per_device) in cfg.weight_args().iter().zip(&weights) {
            let full: i64 = expected[i].dims.iter().product();
            let sharded = program::arg_sharding(i, tp as i64) != "{replicated}";
            let want = if sharded { full / tp as i64 } else { full };
            let got: Vec<i64> = per_device[0].dims().map_err(derr)?;
            if got.iter().product::<i64>() != want || (tp == 1 && got != expected[i].dims) {
                return Err(RunnerError::Weights(format!(
                    "weight argument {i} has shape {got:?}, the program expects {:?}",
                    expected[i].dims
                )));
            }
        }
        if let Some(util) = opts.kv_memory_utilization {
            let limit = match devices[0].memory_limit() {
                Ok(Some(bytes)) => bytes as f64,
                _ => plan::device_spec_for_kind(&kind)
                    .map(|s| s.memory_bytes)
                    .ok_or_else(|| {
                        RunnerError::Device(format!(
                            "the plugin reports no memory size for device kind `{kind}`; \
                             size the KV cache with --kv-cache-space (GiB)"
                        ))
                    })?,
            };
            let weight_bytes = weights
                .iter()
                .map(|w| w[0].on_device_size().unwrap_or(0) as f64)
                .sum::<f64>();
            let per_token = (c.kv_bytes_per_token(cfg.cache_elem.bytes()) / tp) as f64;
            let blocks = plan::kv_blocks_in_memory(&plan::KvMemory {
                device_bytes: limit,
                utilization: util,
                weight_bytes,
                kv_bytes_per_token: per_token,
                block_size: opts.block_size,
                max_model_len: opts.max_model_len,
            })
            .map_err(|e| RunnerError::Device(e.to_string()))?;
            tracing::info!(
                "KV cache sized from device memory: {util} × {:.2} GB − {:.2} GB of weights → \
                 {blocks} blocks of {}",
                limit / 1e9,
                weight_bytes / 1e9,
                opts.block_size
            );
            opts.num_blocks = blocks - 1;
            cfg.num_blocks = blocks as i64;
        }
        let num_blocks = opts.num_blocks + 1;
        let block_rows = c.num_hidden_layers * num_blocks;
        let zero_cache = || {
            let (kv_heads, head_dim) = (c.num_key_value_heads, c.head_dim);
            weights::zero_cache(
                &client,
                &devices,
                block_rows,
                opts.block_size,
                kv_heads,
                head_dim,
                cfg.cache_elem,
            )
        };
        let t_kv = Instant::now();
        let (k_cache, v_cache) = (zero_cache()?, zero_cache()?);
        let kv_bytes: usize = k_cache
            .iter()
            .chain(&v_cache)
            .map(|b| b.on_device_size().unwrap_or(0))
            .sum();
        tracing::info!(
            "KV cache: {} blocks of {} in {} ({:.2} GB over {} device(s)) zeroed on device in \
             {:.2}s; weights and KV ready {:.1}s after start",
            opts.num_blocks,
            opts.block_size,
            cfg.cache_elem.mlir(),
            kv_bytes as f64 / 1e9,
            devices.len(),
            t_kv.elapsed().as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
        let cache = match &opts.compile_cache_dir {
            Some(d) => match CompileCache::new(d) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(
                        "compile cache {} unusable ({e}); compiling without it",
                        d.display()
                    );
                    None
                }
            },
            None => None,
        };
        let mut runner = XlaRunner {
            client,
            devices,
            buckets: Self::bucket_set(&opts),
            cfg,
            executables: HashMap::new(),
            weights,
            k_cache,
            v_cache,
            cache,
            environment,
            scratch_block: opts.num_blocks as u32,
            opts,
            stats: XlaStats::default(),
            counters: Arc::default(),
            warmed_up: false,
            attention_line: String::new(),
            unseeded_counter: 0,
            idle_masks: HashMap::new(),
        };
        runner.choose_attention();
        if let Err(e) = runner.warm_up() {
            if runner.cfg.attention_kernels.is_none() {
                return Err(e);
            }
            runner.attention_line = format!(
                "attention: StableHLO, not the Pallas kernel: a step program with the kernel \
                 failed to compile ({e})"
            );
            tracing::warn!("{}", runner.attention_line);
            runner.cfg.attention_kernels = None;
            runner.executables.clear();
            runner.warm_up()?;
        }
        Ok(runner)
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    pub fn stats(&self) -> XlaStats {
        self.stats.clone()
    }

    /// What the compiler made of a bucket's step program: the optimized, partitioned module
    /// as the plugin returns it (`hlo_with_config`, a serialized `HloModuleProtoWithConfig`).
    /// For checking the partitioned HLO (collectives, copies of the KV cache) in tests.
    pub fn optimized_program(
        &self,
        b: Bucket,
    ) -> Result<tpuserve_pjrt::OptimizedProgram, RunnerError> {
        self.executables
            .get(&b)
            .ok_or_else(|| RunnerError::Device(format!("bucket {b:?} is not compiled")))?
            .optimized_program()
            .map_err(derr)
    }

    /// The bytes device `device` holds for weight argument `index` (see [`program::arg`]), read
    /// back from the device: how a test proves the weights landed exactly.
    pub fn weight_shard(&self, index: usize, device: usize) -> Result<Vec<u8>, RunnerError> {
        let b = self
            .cfg
            .weight_args()
            .iter()
            .position(|&i| i == index)
            .and_then(|slot| self.weights.get(slot))
            .and_then(|w| w.get(device))
            .ok_or_else(|| derr(format!("no weight argument {index} on device {device}")))?;
        b.to_host().map_err(derr)
    }

    pub fn compile_cache_dir(&self) -> Option<&std::path::Path> {
        self.cache.as_ref().map(|c| c.dir())
    }
}

/// Tensor parallelism must split heads, KV heads and the vocabulary evenly.
pub fn check_tp(c: &tpuserve_model::LlamaConfig, tp: usize) -> Result<(), RunnerError> {
    let bad = |what: &str, n: usize| {
        Err(RunnerError::Device(format!(
            "--tensor-parallel-size {tp} does not divide the model's {what} ({n})"
        )))
    };
    if !c.num_attention_heads.is_multiple_of(tp) {
        return bad("attention heads", c.num_attention_heads);
    }
    if !c.num_key_value_heads.is_multiple_of(tp) {
        return bad("KV heads", c.num_key_value_heads);
    }
    if !c.vocab_size.is_multiple_of(tp) {
        return bad("vocabulary size", c.vocab_size);
    }
    if !c.intermediate_size.is_multiple_of(tp) {
        return bad("MLP size", c.intermediate_size);
    }
    Ok(())
}
