//! `tpuserve plan`: what a model needs on a device type (no weights read).

use crate::cli::KvSize;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tpuserve_model::{gguf::GgufFile, LlamaConfig};
use tpuserve_runner_api::sizing;
use tpuserve_runner_xla::deviceless::{self, Figures, ProgramCost, StepParts};
use tpuserve_runner_xla::kernels::KernelSums;
use tpuserve_runner_xla::pallas::{attention_shapes, AttentionKernels, AttentionShape};
use tpuserve_runner_xla::plan::{device_spec, plan_with_kv, Plan, DEVICES};
use tpuserve_runner_xla::program::Bucket;
use tpuserve_runner_xla::program::ProgramConfig;
use tpuserve_runner_xla::{KvCacheDtype, Quantization, WeightElem, XlaRunner, XlaRunnerOptions};

#[derive(Args)]
pub struct PlanArgs {
    /// A config.json, a model folder holding one, or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    tensor_parallel_size: usize,
    /// v6e, v5e, v5p, H100, H200 or CPU.
    #[arg(long, default_value = "v6e")]
    device: String,
    #[arg(long, default_value = "bfloat16")]
    dtype: String,
    /// As `serve --quantization`: `int8` plans the projections and the LM head as int8 with
    /// per-channel scales (the KV cache gets the bytes they free).
    #[arg(long, value_parser = parse_quantization)]
    quantization: Option<Quantization>,
    /// As `serve --kv-cache-dtype`: `fp8` (`fp8_e4m3`, `fp8_e5m2`) plans a one-byte KV cache.
    #[arg(long, value_parser = parse_kv_cache_dtype, default_value = "auto")]
    kv_cache_dtype: KvCacheDtype,
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, default_value_t = sizing::DEFAULT_MAX_NUM_SEQS)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    #[arg(long, default_value_t = sizing::DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    /// As `serve --kv-cache-memory-bytes`: KV bytes per device (e.g. 8G) instead of the
    /// --gpu-memory-utilization share.
    #[arg(long, value_parser = crate::cli::human_readable_int)]
    kv_cache_memory_bytes: Option<usize>,
    /// As `serve --num-gpu-blocks-override`: exactly this many KV blocks (pins the cache shape,
    /// and with it the Pallas kernel's artifacts, whatever the memory).
    #[arg(long)]
    num_gpu_blocks_override: Option<usize>,
    /// Storage read rate (GB/s) for the weight-placement estimate: ~1 for GCS FUSE or a
    /// persistent disk, 2–7 for local NVMe.
    #[arg(long, default_value_t = tpuserve_runner_xla::plan::DEFAULT_READ_GBPS, value_parser = positive_gbps)]
    read_gbps: f64,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Also compile every step program the server would build for this configuration with
    /// the TPU compiler (libtpu, no TPU needed; run inside a network namespace of its own,
    /// which this command sets up with `unshare -n`) and print its cost and memory figures.
    #[arg(long)]
    cost: bool,
    /// TPU topology to compile for (default: v6e:1x1, v6e:2x2 or v6e:2x4 from
    /// --tensor-parallel-size 1, 4 or 8).
    #[arg(long)]
    topology: Option<String>,
    /// Token budget per step, as `serve --max-num-batched-tokens` (decides the buckets;
    /// absent: serve's default on XLA devices).
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// As `serve --max-logprobs`: 0 leaves out the top-logprobs variant of every bucket.
    #[arg(long, default_value_t = sizing::DEFAULT_MAX_LOGPROBS)]
    max_logprobs: usize,
    /// With --cost: leave out the modelled serving steps (each bucket it models compiles
    /// three more variants); the per-bucket table alone says whether everything fits.
    #[arg(long)]
    no_step_model: bool,
    /// With --cost: compile only these buckets (`TOKENS:TILE`, e.g. `2048:16`; as the table
    /// lists them), with no step model.
    #[arg(long = "bucket", value_parser = parse_bucket, requires = "no_step_model")]
    buckets: Vec<(i64, i64)>,
    /// With --cost: write each program's optimized, partitioned HLO (`hlo_with_config`) here.
    #[arg(long)]
    dump_hlo: Option<PathBuf>,
    /// With --cost: `pallas` compiles the programs with the Pallas paged-attention kernel
    /// (artifacts from --attention-kernels) in place of the StableHLO attention, and prices
    /// the kernel by tpuserve's own model (the compiler does not see inside it); `auto` as
    /// `serve --attention-backend auto` runs on a TPU: the kernel for prompt tiles only.
    #[arg(long, default_value = "xla", value_parser = ["xla", "pallas", "auto"])]
    attention_backend: String,
    /// The kernel artifacts (`scripts/attention-kernels.sh` writes them).
    #[arg(long)]
    attention_kernels: Option<PathBuf>,
    /// Print the Pallas attention kernel's shapes this configuration compiles (JSON, the
    /// input of `python -m tpuserve_kernels paged-attention --shapes`) and exit.
    #[arg(long, conflicts_with = "cost")]
    attention_shapes: bool,
}

/// The step's token budget `serve` would use on an XLA device with these flags.
fn batched_tokens(a: &PlanArgs) -> usize {
    sizing::max_num_batched_tokens(a.max_num_batched_tokens, true, a.max_num_seqs)
}

fn default_topology(tp: usize) -> anyhow::Result<String> {
    Ok(match tp {
        1 => "v6e:1x1",
        4 => "v6e:2x2",
        8 => "v6e:2x4",
        other => anyhow::bail!("no default v6e topology for {other} chips; pass --topology"),
    }
    .to_string())
}

const ISOLATED_MARK: &str = "TPUSERVE_PLAN_ISOLATED";

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Runs this same command again inside a new network namespace (only a down loopback
/// interface: libtpu cannot reach the cloud metadata server), with libtpu's topology
/// environment; returns its exit code.
fn rerun_isolated(topology: &str) -> anyhow::Result<i32> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new("unshare");
    if !running_as_root() {
        cmd.arg("--map-root-user");
    }
    cmd.arg("--net")
        .arg("--")
        .arg(exe)
        .args(std::env::args_os().skip(1));
    for (k, v) in deviceless::tpu_env(topology)? {
        cmd.env(k, v);
    }
    cmd.env(ISOLATED_MARK, "1");
    let status = cmd
        .status()
        .context("running `unshare --net` (util-linux) to isolate libtpu from the network")?;
    Ok(status.code().unwrap_or(1))
}

/// The step programs' configuration `serve` would build on a TPU with these flags.
fn program_config(a: &PlanArgs, c: &LlamaConfig, p: &Plan, max_model_len: usize) -> ProgramConfig {
    let elem = if p.dtype_bytes == 4 {
        WeightElem::F32
    } else {
        WeightElem::BF16
    };
    ProgramConfig::for_model(
        c,
        a.tensor_parallel_size,
        elem,
        p.kv_blocks as usize,
        a.block_size,
        max_model_len,
        tpuserve_runner_xla::default_kv_chunk_tokens("tpu"),
    )
    .with_kv_chunk_budget(tpuserve_runner_xla::default_kv_chunk_budget("tpu"))
    .with_quantization(a.quantization.unwrap_or_default())
    .with_kv_cache(a.kv_cache_dtype)
}

fn bucket_set(a: &PlanArgs, max_model_len: usize) -> Vec<Bucket> {
    XlaRunner::bucket_set(&XlaRunnerOptions {
        max_num_batched_tokens: batched_tokens(a),
        max_num_seqs: a.max_num_seqs,
        max_model_len,
        block_size: a.block_size,
        max_logprobs: a.max_logprobs,
        ..Default::default()
    })
}

/// `--cost`: every bucket the server would compile, compiled for the TPU topology.
fn cost_table(a: &PlanArgs, c: &LlamaConfig, p: &Plan, max_model_len: usize) -> anyhow::Result<()> {
    let topology = match &a.topology {
        Some(t) => t.clone(),
        None => default_topology(a.tensor_parallel_size)?,
    };
    let topo = deviceless::open_topology(&topology)?;
    let cfg = program_config(a, c, p, max_model_len);
    let mut buckets = bucket_set(a, max_model_len);
    if !a.buckets.is_empty() {
        for &(t, r) in &a.buckets {
            if !buckets.iter().any(|b| (b.tokens, b.tile) == (t, r)) {
                anyhow::bail!("--bucket {t}:{r} is not a bucket of this configuration");
            }
        }
        buckets.retain(|b| a.buckets.contains(&(b.tokens, b.tile)));
    }
    let cfg = if a.attention_backend != "xla" {
        let auto = a.attention_backend == "auto";
        let dir = a.attention_kernels.as_ref().with_context(|| {
            format!(
                "--attention-backend {} needs --attention-kernels DIR",
                a.attention_backend
            )
        })?;
        let mut shapes = attention_shapes(&cfg, &buckets)
            .map_err(|e| anyhow::anyhow!("no Pallas attention for this configuration: {e}"))?;
        if auto {
            // As serve's `auto`: the kernel for prompt tiles, the StableHLO attention for decode.
            shapes.retain(|s| s.rows > 1);
        }
        let (kernels, missing) = AttentionKernels::load(dir, &shapes);
        if let Some((_, why)) = missing.first() {
            anyhow::bail!(
                "{} of {} attention kernel artifacts missing or unusable (first: {why}); \
                 write them with scripts/attention-kernels.sh and the same flags",
                missing.len(),
                shapes.len()
            );
        }
        println!(
            "attention: the Pallas kernel ({} artifacts from {}){}",
            kernels.len(),
            dir.display(),
            if auto {
                "; decode buckets keep the StableHLO attention (auto)"
            } else {
                ""
            }
        );
        if let Some(why) = shapes.first().and_then(|s| s.tpu_layout_problem()) {
            println!(
                "warning: {why} (the temporaries below); serve keeps the StableHLO attention \
                 for such a model on TPU"
            );
        }
        cfg.with_attention_kernels(kernels)
    } else {
        cfg
    };
    let hbm = p.device.memory_bytes;
    let (bw, peak) = (p.device.bandwidth_bytes_per_s, p.device.bf16_flops_per_s);
    let clock = deviceless::clock(&topo, bw, peak)?;
    let mut kern = KernelModel {
        // The slower of the two clocks: the longer, more cautious step times.
        hz: clock.hbm_hz.min(clock.mxu_hz),
        ici: p.device.ici_bytes_per_s,
        tp: a.tensor_parallel_size as f64,
        compiled: Vec::new(),
    };
    println!(
        "\nTPU compiler (libtpu, {} {topology}, deviceless), per chip, {} KV blocks of {}; the \
         compiler's cost model, not a measurement:",
        topo.platform_name()?,
        p.kv_blocks,
        a.block_size
    );
    println!(
        "kern ms: the code generator's cycle estimates of every kernel a step launches (loops \
         whose bound is a constant × their trip count) at {:.2} GHz, the slower of the clocks \
         its own estimates imply (a weight-streaming matmul at {:.2} TB/s: {:.2} GHz; a large \
         matmul at {:.0} TFLOP/s: {:.2} GHz), plus collective traffic (ring all-reduces, \
         reduce-scatters, all-gathers) at {:.0} GB/s ICI; \
         conditionals at their costliest branch (every sampling option on: random sampling, \
         top-k / top-p / min-p, a token mask, prompt logprobs). greedy ms: the same at their \
         cheapest branch, a greedy step with none of those",
        kern.hz / 1e9,
        bw / 1e12,
        clock.hbm_hz / 1e9,
        peak / 1e12,
        clock.mxu_hz / 1e9,
        kern.ici / 1e9
    );
    println!(
        "{:>6} {:>7} {:>5} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>6}",
        "tokens",
        "tile",
        "top_k",
        "GFLOP",
        "GB read",
        "model ms",
        "roof ms",
        "kern ms",
        "greedy ms",
        "args GB",
        "alias GB",
        "temp GB",
        "temp/HBM",
        "compile",
        "gather"
    );
    let mut worst: Option<ProgramCost> = None;
    let mut any_offloaded = false;
    for b in buckets {
        let r = deviceless::program_cost(&topo, &cfg, b)?;
        kern.compiled.push((b, r.kernels));
        let roof = (r.bytes_accessed / bw).max(r.flops / peak);
        println!(
            "{:>6} {:>7} {:>5} {:>9.1} {:>9.2} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8.2} {:>8.3} {:>8.1}% {:>7.1}s {:>6}",
            b.tokens,
            b.tile,
            b.top_k,
            r.flops / 1e9,
            r.bytes_accessed / 1e9,
            // The compiler answered negative figures (−998 ms) for 2,048-row buckets.
            if r.optimal_seconds >= 0.0 {
                format!("{:.3}", r.optimal_seconds * 1e3)
            } else {
                "n/a".to_string()
            },
            roof * 1e3,
            kern.seconds(&r.kernels) * 1e3,
            kern.plain_seconds(&r.kernels) * 1e3,
            r.memory.arguments as f64 / 1e9,
            r.memory.aliased as f64 / 1e9,
            r.memory.temporaries as f64 / 1e9,
            100.0 * r.memory.temporaries as f64 / hbm,
            r.compile_seconds,
            if r.gather_offloaded { "SC" } else { "TC" }
        );
        any_offloaded |= r.gather_offloaded;
        if let Some(dir) = &a.dump_hlo {
            std::fs::create_dir_all(dir)?;
            let f = dir.join(format!(
                "step-t{}-r{}-k{}.hlo.pb",
                b.tokens, b.tile, b.top_k
            ));
            std::fs::write(&f, &r.optimized).with_context(|| format!("writing {}", f.display()))?;
        }
        if worst
            .as_ref()
            .is_none_or(|w| r.memory.temporaries > w.memory.temporaries)
        {
            worst = Some(r);
        }
    }
    if let Some(w) = worst {
        let total = w.memory.arguments + w.memory.temporaries + w.memory.generated_code;
        println!(
            "largest temporaries {:.3} GB ({:.1} % of {:.0} GB HBM) at tokens={} tile={}; \
             arguments (weights + KV) {:.2} GB; fits: {}",
            w.memory.temporaries as f64 / 1e9,
            100.0 * w.memory.temporaries as f64 / hbm,
            hbm / 1e9,
            w.bucket.tokens,
            w.bucket.tile,
            w.memory.arguments as f64 / 1e9,
            if (total as f64) <= hbm { "yes" } else { "NO" }
        );
    }
    if any_offloaded {
        println!(
            "gather SC: the compiler hands this bucket's page gathers to the SparseCores and \
             charges an offloaded gather the whole KV cache; its flops, GB read and ms are the \
             same program's compiled with the gathers on the TensorCore (same HBM traffic)"
        );
    }
    println!(
        "(XLA counts the body of a loop once: the figures above are one layer's reading one KV \
         chunk, plus everything outside the layers; the model below scales them.)"
    );
    if a.no_step_model {
        return Ok(());
    }
    step_model(&topo, &cfg, c, p, a, max_model_len, &kern)
}

/// Time from the code generator's cycle estimates: kernels back to back at `hz`, then each
/// collective's ring traffic at the ICI bandwidth, not overlapped with compute.
struct KernelModel {
    hz: f64,
    ici: f64,
    tp: f64,
    /// Each bucket's kernel sums as the table compiled it, so that the step model does not
    /// compile the same program again.
    compiled: Vec<(Bucket, KernelSums)>,
}

impl KernelModel {
    fn seconds(&self, k: &KernelSums) -> f64 {
        k.cycles / self.hz + self.ring_seconds(k)
    }

    /// The same with every conditional at its cheapest branch (a greedy step).
    fn plain_seconds(&self, k: &KernelSums) -> f64 {
        k.plain_cycles / self.hz + self.ring_seconds(k)
    }

    /// Ring traffic at the ICI bandwidth: an all-reduce sends 2 (n − 1) / n of its payload,
    /// a reduce-scatter (n − 1) / n of its input (n × its output), an all-gather (n − 1) / n
    /// of its output.
    fn ring_seconds(&self, k: &KernelSums) -> f64 {
        let n = self.tp;
        let bytes = 2.0 * (n - 1.0) / n * k.all_reduce_bytes
            + (n - 1.0) * k.reduce_scatter_bytes
            + (n - 1.0) / n * k.all_gather_bytes;
        bytes / self.ici
    }
}

/// One bucket's parts and the context it reads per attention iteration.
#[derive(Clone)]
struct Parts {
    s: StepParts,
    chunk: usize,
    layers: i64,
    /// With the Pallas kernel: its shape and the chip's rates (bytes/s, flop/s, Hz) it is
    /// priced at.
    kernel: Option<(AttentionShape, f64, f64, f64)>,
}

impl Parts {
    /// A step at `ctx` tokens of context: every layer reads the chunks that context needs.
    fn step(&self, ctx: usize) -> Figures {
        let mut f = self.s.step(self.layers, ctx.div_ceil(self.chunk) as i64);
        if let Some((k, bw, peak, hz)) = &self.kernel {
            let price = k.price(&Self::tile_contexts(k, ctx), *bw, *peak);
            let n = self.layers as f64;
            f.bytes += n * price.bytes;
            f.flops += n * price.flops;
            f.optimal_seconds += n * price.seconds;
            f.kernels.cycles += n * price.seconds * hz;
            f.kernels.plain_cycles += n * price.seconds * hz;
        }
        f
    }

    /// Each tile's context when the step's last row sits at `ctx`: decode rows all at
    /// `ctx`; a prompt chunk's tiles end `rows` apart.
    fn tile_contexts(k: &AttentionShape, ctx: usize) -> Vec<i64> {
        let ctx = ctx as i64;
        (0..k.tiles)
            .map(|i| (ctx - (k.tiles - 1 - i) * k.rows).max(1))
            .collect()
    }

    /// The Pallas kernel's time in a step of every layer at `ctx` (0 without it).
    fn kernel_seconds(&self, ctx: usize) -> f64 {
        self.kernel.as_ref().map_or(0.0, |(k, bw, peak, _)| {
            self.layers as f64 * k.price(&Self::tile_contexts(k, ctx), *bw, *peak).seconds
        })
    }
}

/// The step time the compiler's figures imply for serving shapes: each bucket's parts (see
/// `StepParts`) scaled to the model's layers and the KV chunks a context needs.
fn step_model(
    topo: &deviceless::Topology,
    cfg: &ProgramConfig,
    c: &LlamaConfig,
    p: &Plan,
    a: &PlanArgs,
    max_model_len: usize,
    kern: &KernelModel,
) -> anyhow::Result<()> {
    let opts = XlaRunnerOptions::default();
    let (bw, peak) = (p.device.bandwidth_bytes_per_s, p.device.bf16_flops_per_s);
    let layers = c.num_hidden_layers as i64;
    let max_t = batched_tokens(a).max(16).next_power_of_two();
    let roof = |f: &Figures| (f.bytes / bw).max(f.flops / peak);
    let bucket_of = |tokens: usize, tile: usize| Bucket {
        tokens: tokens.max(16).next_power_of_two() as i64,
        tile: tile as i64,
        top_k: 0,
    };
    // Each bucket reads its own chunk of context per attention iteration.
    let chunk_tokens =
        |tokens, tile| (cfg.chunk_blocks(bucket_of(tokens, tile)) * cfg.block_size) as usize;
    let mut parts: Vec<(Bucket, StepParts)> = Vec::new();
    let mut parts_of = |tokens: usize, tile: usize| -> anyhow::Result<Parts> {
        let b = bucket_of(tokens, tile);
        let chunk = chunk_tokens(tokens, tile);
        let kernel = cfg
            .kernel_for(b)
            .map(|k| (k.shape.clone(), bw, peak, kern.hz));
        if let Some((_, s)) = parts.iter().find(|(x, _)| *x == b) {
            return Ok(Parts {
                s: *s,
                chunk,
                layers,
                kernel,
            });
        }
        let whole = kern.compiled.iter().find(|(x, _)| *x == b).map(|(_, k)| *k);
        let s = deviceless::step_parts(topo, cfg, b, whole, a.dump_hlo.as_deref())?;
        parts.push((b, s));
        Ok(Parts {
            s,
            chunk,
            layers,
            kernel,
        })
    };
    // A prompt is prefilled in steps of the token budget, modelled up to 2,048 rows (the
    // tpu-recipes setting for 70B on v6e-8; serve's default budget gives 512).
    let chunk = max_t.min(2048);
    println!(
        "\nModelled steps per chip: the compiler's figures for the rest of the step, one layer \
         and one more KV chunk (decode rows 1 / 32 / 128: {} / {} / {} tokens; {chunk}-token \
         prompt chunks: {}), from straight-line variants of each program (kernels: a layer \
         from the step's own loop), × {layers} layers × chunks. roof = max(bytes / {:.2} TB/s, flops / {:.0} \
         TFLOP/s). The compiler's model, not a measurement.",
        chunk_tokens(1, 1),
        chunk_tokens(32, 1),
        chunk_tokens(128, 1),
        chunk_tokens(chunk, opts.attention_tile),
        bw / 1e12,
        peak / 1e12
    );
    if cfg.attention_kernels.is_some() {
        use tpuserve_runner_xla::pallas::{
            DMA_ISSUE_SECONDS, DMA_LATENCY_SECONDS, GRID_STEP_SECONDS,
        };
        println!(
            "Pallas attention: the compiler does not see inside the kernel (it charges the call \
             a flat estimate, left in), so every layer's call is priced by tpuserve's own \
             model, not the compiler's: per call (one grid step over every query tile) {:.2} µs fixed \
             + {:.2} µs exposed DMA latency (assumed), then per chunk of pages the slowest of \
             its bytes at {:.2} TB/s, its flops at {:.0} TFLOP/s and issuing its page DMAs (K \
             and V, all KV heads of a page in one) at {:.0} ns each (assumed). Not measured: \
             no TPU has run it.",
            GRID_STEP_SECONDS * 1e6,
            DMA_LATENCY_SECONDS * 1e6,
            bw / 1e12,
            peak / 1e12,
            DMA_ISSUE_SECONDS * 1e9
        );
    }
    println!(
        "{:>8} {:>6} {:>8} {:>9} {:>10} {:>9} {:>11} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10}",
        "step",
        "rows",
        "context",
        "GB read",
        "GFLOP",
        "roof ms",
        "compiler ms",
        "tok/s",
        "kern ms",
        "launches",
        "kern tok/s",
        "greedy ms",
        "greedy tok/s"
    );
    let contexts: Vec<usize> = [512, 2048, 8192]
        .into_iter()
        .filter(|&x| x <= max_model_len)
        .collect();
    let row = |kind: &str, rows: usize, ctx: usize, f: &Figures, toks: usize| {
        let compiler = if f.optimal_seconds > 0.0 {
            format!("{:.2}", f.optimal_seconds * 1e3)
        } else {
            "n/a".to_string()
        };
        let k = kern.seconds(&f.kernels);
        let g = kern.plain_seconds(&f.kernels);
        println!(
            "{kind:>8} {rows:>6} {ctx:>8} {:>9.2} {:>10.1} {:>9.2} {compiler:>11} {:>9.0} {:>9.2} {:>10.0} {:>9.0} {:>9.2} {:>10.0}",
            f.bytes / 1e9,
            f.flops / 1e9,
            roof(f) * 1e3,
            toks as f64 / roof(f),
            k * 1e3,
            f.kernels.launches,
            toks as f64 / k,
            g * 1e3,
            toks as f64 / g
        );
    };
    let mut decode_128 = None;
    for batch in [1usize, 32, 128].into_iter().filter(|&b| b <= max_t) {
        let s = parts_of(batch, 1)?;
        for &ctx in &contexts {
            row("decode", batch, ctx, &s.step(ctx), batch);
        }
        if batch == 128 {
            decode_128 = Some(s);
        }
    }
    let pre = parts_of(chunk, opts.attention_tile)?;
    for &ctx in contexts.iter().filter(|&&x| x >= chunk) {
        row("prefill", chunk, ctx, &pre.step(ctx), chunk);
    }
    // The issue's three goals, from the same parts.
    let tp = a.tensor_parallel_size as f64;
    if let (Some(d), true) = (decode_128, max_model_len >= 2048) {
        let f = d.step(2048);
        let live_kv = 128.0 * 2048.0 * p.kv_bytes_per_token_per_device as f64;
        println!(
            "decode 128 × 2,048: {:.2} GB read per chip = {:.2} × (weights {:.2} GB + live KV {:.2} GB)",
            f.bytes / 1e9,
            f.bytes / (p.weight_bytes_per_device + live_kv),
            p.weight_bytes_per_device / 1e9,
            live_kv / 1e9
        );
        // The same goal in time: what the kernels take against one read of weights and live
        // KV at the chip's bandwidth (the cost analysis' bytes count operands the code
        // generator keeps in VMEM as read from HBM).
        let once = (p.weight_bytes_per_device + live_kv) / bw;
        let g = kern.plain_seconds(&f.kernels);
        println!(
            "decode 128 × 2,048 from the kernels' cycle estimates: {:.2} ms greedy = {:.2} × \
             reading weights + live KV once ({:.2} ms at {:.2} TB/s)",
            g * 1e3,
            g / once,
            once * 1e3,
            bw / 1e12
        );
        let f = d.step(1800);
        let k = kern.seconds(&f.kernels);
        let g = kern.plain_seconds(&f.kernels);
        println!(
            "tutorial load (128 sequences, ~1,800-token contexts): {:.0} tok/s ({:.2} ms a step) \
             from bytes and flops; {:.0} tok/s ({:.2} ms, {:.0} kernel launches) from the \
             kernels' cycle estimates with every sampling option on, {:.0} tok/s ({:.2} ms) \
             greedy",
            128.0 / roof(&f),
            roof(&f) * 1e3,
            128.0 / k,
            k * 1e3,
            f.kernels.launches,
            128.0 / g,
            g * 1e3
        );
    }
    if max_model_len >= 2048 {
        let n = 2048 / chunk;
        let total: f64 = (1..=n).map(|i| roof(&pre.step(i * chunk))).sum();
        // The prompt's own flops: 2 per parameter per token, and causal attention
        // (QK and PV: 2 × 2 × heads × head_dim per visible key, half the square).
        let attn = 2.0 * (c.num_attention_heads * c.head_dim) as f64 * 2048f64.powi(2);
        let flops = (2.0 * p.parameters as f64 * 2048.0 + layers as f64 * attn) / tp;
        let kernels: f64 = (1..=n)
            .map(|i| kern.plain_seconds(&pre.step(i * chunk).kernels))
            .sum();
        let ring: f64 = (1..=n)
            .map(|i| kern.ring_seconds(&pre.step(i * chunk).kernels))
            .sum();
        // The attention's KV-chunk loop (page gathers, scores, softmax, values), every
        // iteration of every layer: what a fused attention kernel would replace; with the
        // Pallas kernel, the kernel's own price.
        let chunk_loop: f64 = (1..=n)
            .map(|i| {
                let chunks = (i * chunk).div_ceil(pre.chunk) as f64;
                pre.layers as f64 * chunks * pre.s.chunk.kernels.plain_cycles / kern.hz
                    + pre.kernel_seconds(i * chunk)
            })
            .sum();
        let attention = if pre.kernel.is_some() {
            "the Pallas attention kernel (tpuserve's own price, see above)"
        } else {
            "the attention's KV-chunk loop"
        };
        println!(
            "2,048-token prompt in {n} chunks of {chunk}: {:.1} ms; its flop bound {:.1} ms \
             ({:.2}×); from the kernels' cycle estimates, greedy, {:.1} ms ({:.2}×), of which \
             collective traffic {:.1} ms and {attention} {:.1} ms",
            total * 1e3,
            flops / peak * 1e3,
            total / (flops / peak),
            kernels * 1e3,
            kernels / (flops / peak),
            ring * 1e3,
            chunk_loop * 1e3
        );
    }
    let gb = |f: &Figures| {
        format!(
            "{:.4} GB {:.2} GFLOP {:.0} kcycles ({:.0} greedy) {:.0} launches",
            f.bytes / 1e9,
            f.flops / 1e9,
            f.kernels.cycles / 1e3,
            f.kernels.plain_cycles / 1e3,
            f.kernels.launches
        )
    };
    for (b, s) in &parts {
        println!(
            "parts tokens={} tile={}: rest {}; layer {}; chunk {}",
            b.tokens,
            b.tile,
            gb(&s.outside),
            gb(&s.layer),
            gb(&s.chunk)
        );
    }
    Ok(())
}

fn parse_quantization(s: &str) -> Result<Quantization, String> {
    Quantization::from_flag(s)
        .ok_or_else(|| format!("{s}: tpuserve plans only int8 (weight-only, per-channel scales)"))
}

fn parse_kv_cache_dtype(s: &str) -> Result<KvCacheDtype, String> {
    KvCacheDtype::from_flag(s)
        .ok_or_else(|| format!("{s}: tpuserve plans a KV cache of auto, fp8, fp8_e4m3 or fp8_e5m2"))
}

fn parse_bucket(s: &str) -> Result<(i64, i64), String> {
    let bad = || format!("{s}: a bucket is TOKENS:TILE, e.g. 2048:16");
    let (t, r) = s.split_once(':').ok_or_else(bad)?;
    Ok((t.parse().map_err(|_| bad())?, r.parse().map_err(|_| bad())?))
}

fn positive_gbps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s} is not a positive rate in GB/s")),
    }
}

/// A model's config without its weights: a config.json, a folder holding one, or a .gguf
/// file's metadata.
pub fn read_config(path: &std::path::Path) -> anyhow::Result<LlamaConfig> {
    if path.is_dir() {
        if path.join("config.json").exists() {
            return Ok(LlamaConfig::from_hf_json(&path.join("config.json"))?);
        }
        // A folder holding one .gguf (as the loader accepts it).
        let ggufs: Vec<_> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        if let [one] = ggufs.as_slice() {
            return Ok(GgufFile::open(one)?.llama_config()?);
        }
        anyhow::bail!(
            "{} has no config.json and not exactly one .gguf",
            path.display()
        );
    }
    if path.extension().is_some_and(|e| e == "gguf") {
        return Ok(GgufFile::open(path)?.llama_config()?);
    }
    Ok(LlamaConfig::from_hf_json(path)?)
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    // The re-run carries a marker so that it can never re-run itself again (if the
    // namespace did not take, it refuses instead).
    if a.cost
        && !deviceless::network_interfaces().is_empty()
        && std::env::var_os(ISOLATED_MARK).is_none()
    {
        let topology = match &a.topology {
            Some(t) => t.clone(),
            None => default_topology(a.tensor_parallel_size)?,
        };
        std::process::exit(rerun_isolated(&topology)?);
    }
    let c = read_config(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
    let dev = device_spec(&a.device).with_context(|| {
        let names: Vec<&str> = DEVICES.iter().map(|d| d.name).collect();
        format!(
            "unknown device `{}` (one of {})",
            a.device,
            names.join(", ")
        )
    })?;
    let bytes = match a.dtype.as_str() {
        "bfloat16" | "bf16" | "float16" | "half" | "fp16" | "auto" => 2,
        "float32" | "float" | "fp32" => 4,
        other => anyhow::bail!("unknown --dtype `{other}`"),
    };
    let max_model_len = a.max_model_len.unwrap_or(c.max_position_embeddings);
    let kv_bytes = if a.kv_cache_dtype.is_fp8() { 1 } else { bytes };
    let size = KvSize::from_flags(a.num_gpu_blocks_override, a.kv_cache_memory_bytes)?;
    let p = plan_with_kv(
        &c,
        dev,
        a.tensor_parallel_size,
        (bytes, kv_bytes),
        max_model_len,
        a.max_num_seqs,
        // A size of its own is checked against the whole memory below.
        if size.is_some() {
            1.0
        } else {
            a.gpu_memory_utilization
        },
        a.block_size,
        a.quantization.unwrap_or_default(),
    )?
    .with_read_gbps(a.read_gbps);
    let p = match size {
        None => p,
        Some(size) => {
            let per_token = p.kv_bytes_per_token_per_device as usize;
            let p = p.with_kv_blocks(size.blocks(per_token, a.block_size) as u64);
            let need = p.weight_bytes_per_device + p.kv_budget_bytes_per_device;
            if need > p.device.memory_bytes {
                anyhow::bail!(
                    "{}: weights {:.2} GB + KV {:.2} GB per device do not fit in {:.0} GB",
                    size.flag(),
                    p.weight_bytes_per_device / 1e9,
                    p.kv_budget_bytes_per_device / 1e9,
                    p.device.memory_bytes / 1e9
                );
            }
            p
        }
    };
    if a.attention_shapes {
        let cfg = program_config(&a, &c, &p, max_model_len);
        let shapes = attention_shapes(&cfg, &bucket_set(&a, max_model_len))
            .map_err(|e| anyhow::anyhow!("no Pallas attention for this configuration: {e}"))?;
        println!("{}", serde_json::to_string_pretty(&shapes)?);
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        println!("{p}");
    }
    if a.cost {
        cost_table(&a, &c, &p, max_model_len)?;
    }
    Ok(())
}
