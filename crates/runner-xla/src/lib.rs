//! The production runner: the Llama step as StableHLO programs compiled by a PJRT plugin
//! (libtpu on TPU, the CUDA plugin on GPU, the XLA CPU plugin in CI), run on device-resident
//! weights with a donated, in-place KV cache. Only token ids and requested logprobs come back.
//!
//! Compilation is its own concern here: every shape bucket is compiled (or loaded from the
//! persistent cache) before serving; a step never compiles after warm-up unless that is
//! explicitly allowed, and each such event is counted.

pub mod compile_cache;
pub mod device;
pub mod deviceless;
pub mod hlo;
pub mod plan;
pub mod program;
pub mod weights;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tpuserve_model::LoadedModel;
use tpuserve_pjrt::{Buffer, Client, CompileOptions, Device, LoadedExecutable, Plugin};
use tpuserve_runner_api::{
    sampler::seeded_uniform, validate_plan, CompileCounters, KvCacheShape, ModelRunner,
    RunnerError, SampledToken, SamplingParams, SamplingSupport, SeqOutput, StepOutput, StepPlan,
    TokenLogprobs,
};

use crate::compile_cache::{CacheKey, CompileCache, Lookup};
pub use crate::device::DeviceKind;
pub use crate::program::WeightElem;
use crate::program::{arg, out, Bucket, ProgramConfig};

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
    pub max_model_len: usize,
    /// Top logprobs computed on device when a request asks for any (vLLM's `max_logprobs`).
    pub max_logprobs: usize,
    pub weight_dtype: WeightElem,
    /// `VLLM_XLA_CACHE_PATH`: where compiled executables persist across restarts and pods.
    pub compile_cache_dir: Option<PathBuf>,
    /// Upper bound on (tokens × gathered context) per execution; bigger steps are split.
    pub gather_budget: usize,
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
}

impl Default for XlaRunnerOptions {
    fn default() -> Self {
        XlaRunnerOptions {
            device: DeviceKind::XlaCpu,
            plugin_path: None,
            tensor_parallel_size: 1,
            num_blocks: 256,
            block_size: 16,
            max_num_batched_tokens: 256,
            max_model_len: 2048,
            max_logprobs: 20,
            weight_dtype: WeightElem::F32,
            compile_cache_dir: None,
            gather_budget: 1 << 16,
            strict_no_recompile: false,
            cpu_device_count: 0,
            kv_memory_utilization: None,
            weight_layout: weights::Layout::Auto,
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
    scratch_block: u32,
    unseeded_counter: u64,
}

fn derr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Device(e.to_string())
}

fn pow2_at_least(n: usize, min: usize) -> usize {
    n.max(min).next_power_of_two()
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
        if opts.device == DeviceKind::Tpu
            && !device::tpu_chips_present()
            && !deviceless::network_interfaces().is_empty()
        {
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

        let mut cfg =
            ProgramConfig::for_model(c, tp, opts.weight_dtype, opts.num_blocks, opts.block_size);
        let (weights, report) = if model.weights.is_dummy() {
            weights::dummy(&client, &devices, c, &cfg)?
        } else {
            weights::upload(
                &client,
                &devices,
                model.weights.as_ref(),
                c,
                opts.weight_dtype,
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
        tracing::info!(
            "weights ({}) on {} device(s): {}{rss}",
            model.weights.describe(),
            devices.len(),
            report.summary()
        );
        // PJRT checks only byte sizes at execution: catch a layout mix-up here, by name.
        let expected = cfg.arg_types(Bucket {
            tokens: 16,
            blocks: 1,
            top_k: 0,
        });
        for (i, per_device) in weights.iter().enumerate() {
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
            let elem = if opts.weight_dtype == WeightElem::F32 {
                4
            } else {
                2
            };
            let per_token = (2 * c.num_hidden_layers * c.kv_size() * elem / tp) as f64;
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
                opts.weight_dtype,
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
            "KV cache: {} blocks of {} ({:.2} GB over {} device(s)) zeroed on device in {:.2}s; \
             weights and KV ready {:.1}s after start",
            opts.num_blocks,
            opts.block_size,
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
            unseeded_counter: 0,
        };
        runner.warm_up()?;
        Ok(runner)
    }

    /// Token buckets 16, 32, … up to `max_num_batched_tokens`; context buckets by powers of 4
    /// blocks up to `max_model_len`; combinations over the gather budget are dropped except at
    /// the smallest token bucket, so any context can still decode.
    pub fn bucket_set(opts: &XlaRunnerOptions) -> Vec<Bucket> {
        let max_t = pow2_at_least(opts.max_num_batched_tokens, 16);
        let max_b = pow2_at_least(opts.max_model_len.div_ceil(opts.block_size), 1);
        let mut bs = BTreeSet::new();
        let mut b = 1;
        while b < max_b {
            bs.insert(b);
            b *= 4;
        }
        bs.insert(max_b);
        let mut out = Vec::new();
        let mut t = 16;
        while t <= max_t {
            for &b in &bs {
                let fits = t * b * opts.block_size <= opts.gather_budget.max(16 * opts.block_size);
                if fits || t == 16 {
                    for k in [0, opts.max_logprobs] {
                        let bucket = Bucket {
                            tokens: t as i64,
                            blocks: b as i64,
                            top_k: k as i64,
                        };
                        if !out.contains(&bucket) {
                            out.push(bucket);
                        }
                    }
                }
            }
            t *= 2;
        }
        out
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
            .weights
            .get(index)
            .and_then(|w| w.get(device))
            .ok_or_else(|| derr(format!("no weight argument {index} on device {device}")))?;
        b.to_host().map_err(derr)
    }

    pub fn compile_cache_dir(&self) -> Option<&std::path::Path> {
        self.cache.as_ref().map(|c| c.dir())
    }

    fn compile_options(&self) -> CompileOptions {
        if self.cfg.tp > 1 {
            CompileOptions::spmd(self.cfg.tp)
        } else {
            CompileOptions::default()
        }
    }

    fn warm_up(&mut self) -> Result<(), RunnerError> {
        let t0 = Instant::now();
        let n = self.buckets.len();
        // Compile on several threads: XLA compiles one program mostly on one core, and a
        // TPU host has many.
        let workers = std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let todo: Vec<Bucket> = self.buckets.clone();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicUsize::new(0);
        let ctx = CompileCtx {
            client: &self.client,
            cache: self.cache.as_ref(),
            environment: &self.environment,
            cfg: &self.cfg,
            options: self.compile_options(),
        };
        let results: Vec<Result<(Bucket, Compiled), RunnerError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let Some(&b) = todo.get(i) else { break };
                            let r = ctx.compile(b);
                            let k = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                            if let Ok(c) = &r {
                                tracing::info!(
                                    "compiling {k}/{n}: tokens={} blocks={} top_k={} ({}, {:.2}s)",
                                    b.tokens,
                                    b.blocks,
                                    b.top_k,
                                    c.how,
                                    c.seconds
                                );
                            }
                            let failed = r.is_err();
                            out.push(r.map(|c| (b, c)));
                            if failed {
                                break;
                            }
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(RunnerError::Device("compile thread panicked".into()))]
                    })
                })
                .collect()
        });
        for r in results {
            let (b, c) = r?;
            self.record(&c);
            self.executables.insert(b, c.exe);
        }
        self.warmed_up = true;
        tracing::info!(
            "{n} programs ready in {:.1}s ({} compiled, {} from cache)",
            t0.elapsed().as_secs_f64(),
            self.stats.compilations,
            self.stats.cache_hits
        );
        Ok(())
    }

    fn record(&mut self, c: &Compiled) {
        let bump = |a: &std::sync::atomic::AtomicU64, n: u64| {
            a.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        match c.how {
            "cache hit" => {
                self.stats.cache_hits += 1;
                bump(&self.counters.cache_hits, 1);
            }
            _ => {
                self.stats.compilations += 1;
                self.stats.compile_seconds += c.seconds;
                bump(&self.counters.compilations, 1);
                bump(&self.counters.compile_micros, (c.seconds * 1e6) as u64);
                if self.cache.is_some() {
                    self.stats.cache_misses += 1;
                    bump(&self.counters.cache_misses, 1);
                }
            }
        }
    }

    /// Compiles a bucket's program or loads it from the persistent cache. After warm-up this
    /// is a recompilation: counted, and an error in strict mode.
    pub fn ensure_compiled(&mut self, b: Bucket) -> Result<&'static str, RunnerError> {
        if self.executables.contains_key(&b) {
            return Ok("ready");
        }
        if self.warmed_up {
            self.stats.compilations_after_warmup += 1;
            self.counters
                .after_warmup
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("compiling {b:?} after warm-up: this shape was not precompiled");
            if self.opts.strict_no_recompile {
                return Err(RunnerError::Recompilation(format!("{b:?}")));
            }
        }
        let ctx = CompileCtx {
            client: &self.client,
            cache: self.cache.as_ref(),
            environment: &self.environment,
            cfg: &self.cfg,
            options: self.compile_options(),
        };
        let c = ctx.compile(b)?;
        let how = c.how;
        self.record(&c);
        self.executables.insert(b, c.exe);
        Ok(how)
    }

    /// The smallest bucket holding `tokens` rows and `blocks` context blocks.
    fn pick_bucket(&self, tokens: usize, blocks: usize, top_k: bool) -> Option<Bucket> {
        self.buckets
            .iter()
            .filter(|b| {
                b.tokens as usize >= tokens
                    && b.blocks as usize >= blocks
                    && (b.top_k > 0) == (top_k && self.opts.max_logprobs > 0)
            })
            .min_by_key(|b| (b.tokens * b.blocks, b.tokens))
            .copied()
    }

    fn rng_key(&mut self, p: &SamplingParams, step: u64) -> u32 {
        let u = match p.seed {
            Some(seed) => seeded_uniform(seed, step),
            None => {
                self.unseeded_counter += 1;
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                seeded_uniform(nanos ^ self.unseeded_counter, step)
            }
        };
        (u * 4_294_967_296.0) as u32
    }

    fn run_chunk(
        &mut self,
        plan: &StepPlan,
        rows: &[usize],
        row_seq: &[usize],
        want_top: bool,
    ) -> Result<ChunkResult, RunnerError> {
        let bs = self.opts.block_size;
        let need_blocks = rows
            .iter()
            .map(|&r| (plan.positions[r] as usize + 1).div_ceil(bs))
            .max()
            .unwrap_or(1);
        let bucket = self
            .pick_bucket(rows.len(), need_blocks, want_top)
            .ok_or_else(|| {
                RunnerError::InvalidPlan(format!(
                    "no bucket for {} tokens with {need_blocks} context blocks",
                    rows.len()
                ))
            })?;
        self.ensure_compiled(bucket)?;
        let (t, nb) = (bucket.tokens as usize, bucket.blocks as usize);
        let scratch = self.scratch_block;
        let mut tokens = vec![0i32; t];
        let mut positions = vec![0i32; t];
        let mut slots = vec![(scratch as usize * bs) as i32; t];
        let mut blocks = vec![scratch as i32; t * nb];
        let mut targets = vec![-1i32; t];
        let mut temperature = vec![0f32; t];
        let mut keys = vec![0u32; t];
        let mut top_k = vec![0i32; t];
        let mut top_p = vec![1f32; t];
        let mut min_p = vec![0f32; t];
        let mut logit_rows = vec![0i32; t];
        let mut logit_index = HashMap::new();
        for (j, &r) in rows.iter().enumerate() {
            let s = &plan.seqs[row_seq[r]];
            tokens[j] = plan.token_ids[r] as i32;
            positions[j] = plan.positions[r] as i32;
            slots[j] = plan.slot_mapping[r] as i32;
            for (k, &blk) in s.block_table.iter().take(nb).enumerate() {
                blocks[j * nb + k] = blk as i32;
            }
            let local = r - s.query_start;
            if let Some(&tg) = s.prompt_logprob_targets.get(local) {
                targets[j] = tg as i32;
            }
            let samples_here = s.sample && local + 1 == s.query_len;
            if samples_here && !s.sampling.is_greedy() {
                temperature[j] = s.sampling.temperature;
                keys[j] = self.rng_key(&s.sampling, s.output_tokens.len() as u64);
                top_k[j] = s.sampling.top_k.max(0);
                top_p[j] = s.sampling.top_p;
                min_p[j] = s.sampling.min_p;
            }
            if samples_here || local < s.prompt_logprob_targets.len() {
                logit_rows[logit_index.len()] = j as i32;
                logit_index.insert(r, logit_index.len());
            }
        }
        let num_logit_rows = logit_index.len() as i32;
        let upload_i32 =
            |v: &[i32], dims: &[i64], c: &Client, d: &Device| Buffer::from_slice(c, v, dims, d);
        let mut step_inputs: Vec<Vec<Buffer>> = Vec::new();
        for d in &self.devices {
            let c = &self.client;
            step_inputs.push(vec![
                upload_i32(&tokens, &[t as i64], c, d).map_err(derr)?,
                upload_i32(&positions, &[t as i64], c, d).map_err(derr)?,
                upload_i32(&slots, &[t as i64], c, d).map_err(derr)?,
                upload_i32(&blocks, &[t as i64, nb as i64], c, d).map_err(derr)?,
                upload_i32(&targets, &[t as i64], c, d).map_err(derr)?,
                Buffer::from_slice(c, &temperature, &[t as i64], d).map_err(derr)?,
                Buffer::from_slice(c, &keys, &[t as i64], d).map_err(derr)?,
                upload_i32(&logit_rows, &[t as i64], c, d).map_err(derr)?,
                upload_i32(&[num_logit_rows], &[], c, d).map_err(derr)?,
                upload_i32(&top_k, &[t as i64], c, d).map_err(derr)?,
                Buffer::from_slice(c, &top_p, &[t as i64], d).map_err(derr)?,
                Buffer::from_slice(c, &min_p, &[t as i64], d).map_err(derr)?,
            ]);
        }
        let args: Vec<Vec<&Buffer>> = (0..self.devices.len())
            .map(|d| {
                let mut a: Vec<&Buffer> = self.weights.iter().map(|w| &w[d]).collect();
                a.push(&self.k_cache[d]);
                a.push(&self.v_cache[d]);
                a.extend(step_inputs[d].iter());
                debug_assert_eq!(a.len(), arg::COUNT);
                a
            })
            .collect();
        let exe = self
            .executables
            .get(&bucket)
            .ok_or_else(|| RunnerError::Recompilation(format!("{bucket:?}")))?;
        let mut outputs = exe.execute(&args).map_err(derr)?;
        self.stats.executions += 1;
        // The caches were donated: the outputs are the same memory, updated in place.
        let mut new_k = Vec::with_capacity(outputs.len());
        let mut new_v = Vec::with_capacity(outputs.len());
        let mut first: Vec<Buffer> = Vec::new();
        for (d, outs) in outputs.iter_mut().enumerate() {
            let mut it = std::mem::take(outs).into_iter();
            new_k.push(it.next().ok_or_else(|| derr("missing K cache output"))?);
            new_v.push(it.next().ok_or_else(|| derr("missing V cache output"))?);
            if d == 0 {
                first = it.collect();
            }
        }
        self.k_cache = new_k;
        self.v_cache = new_v;
        let mut fetch_i32 = |i: usize| -> Result<Vec<i32>, RunnerError> {
            let b = first
                .get(i - out::SAMPLED)
                .ok_or_else(|| derr("missing output"))?;
            let v = b.to_vec::<i32>().map_err(derr)?;
            self.stats.bytes_to_host += (v.len() * 4) as u64;
            Ok(v)
        };
        let sampled = fetch_i32(out::SAMPLED)?;
        let sampled_rank = fetch_i32(out::SAMPLED_RANK)?;
        let target_rank = fetch_i32(out::TARGET_RANK)?;
        let top_ids = if bucket.top_k > 0 {
            fetch_i32(out::TOP_IDS)?
        } else {
            Vec::new()
        };
        let mut fetch_f32 = |i: usize| -> Result<Vec<f32>, RunnerError> {
            let b = first
                .get(i - out::SAMPLED)
                .ok_or_else(|| derr("missing output"))?;
            let v = b.to_vec::<f32>().map_err(derr)?;
            self.stats.bytes_to_host += (v.len() * 4) as u64;
            Ok(v)
        };
        let sampled_lp = fetch_f32(out::SAMPLED_LOGPROB)?;
        let target_lp = fetch_f32(out::TARGET_LOGPROB)?;
        let top_lp = if bucket.top_k > 0 {
            fetch_f32(out::TOP_LOGPROBS)?
        } else {
            Vec::new()
        };
        Ok(ChunkResult {
            logit_index,
            k: bucket.top_k as usize,
            sampled,
            sampled_lp,
            sampled_rank,
            target_lp,
            target_rank,
            top_ids,
            top_lp,
        })
    }
}

struct Compiled {
    exe: LoadedExecutable,
    how: &'static str,
    seconds: f64,
}

/// Everything needed to compile one bucket, shareable across compile threads.
struct CompileCtx<'a> {
    client: &'a Client,
    cache: Option<&'a CompileCache>,
    environment: &'a str,
    cfg: &'a ProgramConfig,
    options: CompileOptions,
}

impl CompileCtx<'_> {
    fn compile(&self, b: Bucket) -> Result<Compiled, RunnerError> {
        let t = Instant::now();
        let text = self.cfg.emit(b);
        if let Some(dir) = std::env::var_os("TPUSERVE_DUMP_HLO") {
            let path = PathBuf::from(dir).join(format!(
                "step-t{}-b{}-k{}.mlir",
                b.tokens, b.blocks, b.top_k
            ));
            if let Err(e) = std::fs::write(&path, &text) {
                tracing::warn!("cannot dump {}: {e}", path.display());
            }
        }
        let key = CacheKey::new(self.environment, &text, &self.options.encode());
        if let Some(cache) = self.cache {
            match cache.get(&key) {
                Lookup::Hit(bytes) => match self.client.deserialize_and_load(&bytes) {
                    Ok(exe) => {
                        return Ok(Compiled {
                            exe,
                            how: "cache hit",
                            seconds: t.elapsed().as_secs_f64(),
                        })
                    }
                    Err(e) => tracing::warn!("compile cache entry unusable ({e}); recompiling"),
                },
                Lookup::Invalid(why) => tracing::warn!("compile cache: {why}; recompiling"),
                Lookup::Miss => {}
            }
        }
        let exe = self
            .client
            .compile(&text, &self.options)
            .map_err(|e| RunnerError::Device(format!("compiling {b:?}: {e}")))?;
        if let Some(cache) = self.cache {
            match exe.serialize() {
                Ok(bytes) => {
                    if let Err(e) = cache.put(&key, &bytes) {
                        tracing::warn!("cannot write compile cache entry: {e}");
                    }
                }
                Err(e) => tracing::warn!("plugin cannot serialize executables ({e}); not cached"),
            }
        }
        Ok(Compiled {
            exe,
            how: "compiled",
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}

struct ChunkResult {
    /// Global row → index in the per-row outputs.
    logit_index: HashMap<usize, usize>,
    k: usize,
    sampled: Vec<i32>,
    sampled_lp: Vec<f32>,
    sampled_rank: Vec<i32>,
    target_lp: Vec<f32>,
    target_rank: Vec<i32>,
    top_ids: Vec<i32>,
    top_lp: Vec<f32>,
}

impl ChunkResult {
    fn top(&self, j: usize, n: usize) -> Vec<(u32, f32)> {
        (0..n.min(self.k))
            .map(|i| {
                (
                    self.top_ids[j * self.k + i] as u32,
                    self.top_lp[j * self.k + i],
                )
            })
            .collect()
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

impl ModelRunner for XlaRunner {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, RunnerError> {
        validate_plan(plan, self.kv_cache_shape())?;
        let vocab = self.cfg.dims.vocab as usize;
        if let Some(bad) = plan.token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(RunnerError::InvalidPlan(format!(
                "token id {bad} outside the vocabulary ({vocab})"
            )));
        }
        for s in &plan.seqs {
            if s.sample {
                if let Some(what) = unsupported_sampling(&s.sampling) {
                    return Err(RunnerError::InvalidPlan(format!(
                        "{what} is not supported by the XLA runner yet"
                    )));
                }
            }
        }
        let mut row_seq = vec![0usize; plan.num_tokens()];
        for (i, s) in plan.seqs.iter().enumerate() {
            row_seq[s.query_start..s.query_start + s.query_len].fill(i);
        }
        let want_top = plan.seqs.iter().any(|s| {
            (s.sample && s.sampling.logprobs.unwrap_or(0) > 0)
                || (!s.prompt_logprob_targets.is_empty()
                    && s.sampling.prompt_logprobs.unwrap_or(0) > 0)
        });
        // Split into executions that fit a bucket, keeping token order (KV of earlier
        // positions is written before later ones read it).
        let bs = self.opts.block_size;
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut cur_need = 0usize;
        for r in 0..plan.num_tokens() {
            let need = (plan.positions[r] as usize + 1).div_ceil(bs);
            let n2 = cur_need.max(need);
            if self.pick_bucket(cur.len() + 1, n2, want_top).is_some() {
                cur.push(r);
                cur_need = n2;
            } else {
                if cur.is_empty() {
                    return Err(RunnerError::InvalidPlan(format!(
                        "position {} exceeds the compiled context ({} tokens)",
                        plan.positions[r], self.opts.max_model_len
                    )));
                }
                chunks.push(std::mem::take(&mut cur));
                cur.push(r);
                cur_need = need;
            }
        }
        if !cur.is_empty() {
            chunks.push(cur);
        }
        let mut row_at: HashMap<usize, (usize, usize)> = HashMap::new();
        let mut results = Vec::with_capacity(chunks.len());
        for (ci, rows) in chunks.iter().enumerate() {
            let res = self.run_chunk(plan, rows, &row_seq, want_top)?;
            for (&r, &j) in &res.logit_index {
                row_at.insert(r, (ci, j));
            }
            results.push(res);
        }
        let seqs = plan
            .seqs
            .iter()
            .map(|s| {
                let mut o = SeqOutput::default();
                let n_prompt = s.sampling.prompt_logprobs.unwrap_or(0);
                for (j, &target) in s.prompt_logprob_targets.iter().enumerate() {
                    let (ci, row) = row_at[&(s.query_start + j)];
                    let c = &results[ci];
                    o.prompt_logprobs.push(TokenLogprobs {
                        token: target,
                        logprob: c.target_lp[row],
                        rank: c.target_rank[row].max(1) as usize,
                        top: c.top(row, n_prompt),
                    });
                }
                if s.sample {
                    let (ci, row) = row_at[&(s.query_start + s.query_len - 1)];
                    let c = &results[ci];
                    let token = c.sampled[row] as u32;
                    let logprobs = s.sampling.logprobs.map(|n| TokenLogprobs {
                        token,
                        logprob: c.sampled_lp[row],
                        rank: c.sampled_rank[row].max(1) as usize,
                        top: c.top(row, n),
                    });
                    o.sampled = Some(SampledToken { token, logprobs });
                }
                o
            })
            .collect();
        Ok(StepOutput { seqs })
    }

    fn sampling_support(&self) -> SamplingSupport {
        SamplingSupport::OnDevice
    }

    fn compile_counters(&self) -> Option<Arc<CompileCounters>> {
        Some(self.counters.clone())
    }

    fn kv_cache_shape(&self) -> KvCacheShape {
        KvCacheShape {
            num_blocks: self.opts.num_blocks,
            block_size: self.opts.block_size,
        }
    }

    fn vocab_size(&self) -> usize {
        self.cfg.dims.vocab as usize
    }

    fn describe(&self) -> String {
        format!(
            "xla ({:?}, {} device(s), {:?})",
            self.opts.device,
            self.devices.len(),
            self.opts.weight_dtype
        )
    }
}
