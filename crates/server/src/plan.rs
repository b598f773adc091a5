//! `tpuserve plan`: what a model needs on a device type (no weights read).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tpuserve_model::{gguf::GgufFile, LlamaConfig};
use tpuserve_runner_xla::deviceless::{self, ProgramCost};
use tpuserve_runner_xla::plan::{device_spec, plan, Plan, DEVICES};
use tpuserve_runner_xla::program::ProgramConfig;
use tpuserve_runner_xla::{WeightElem, XlaRunner, XlaRunnerOptions};

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
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
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
    /// Token budget per step, as `serve --max-num-batched-tokens` (decides the buckets).
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
    /// As `serve --max-logprobs`: 0 leaves out the top-logprobs variant of every bucket.
    #[arg(long, default_value_t = 20)]
    max_logprobs: usize,
    /// With --cost: write each program's optimized, partitioned HLO (`hlo_with_config`) here.
    #[arg(long)]
    dump_hlo: Option<PathBuf>,
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

/// `--cost`: every bucket the server would compile, compiled for the TPU topology.
fn cost_table(a: &PlanArgs, c: &LlamaConfig, p: &Plan, max_model_len: usize) -> anyhow::Result<()> {
    let topology = match &a.topology {
        Some(t) => t.clone(),
        None => default_topology(a.tensor_parallel_size)?,
    };
    let topo = deviceless::open_topology(&topology)?;
    let elem = if p.dtype_bytes == 4 {
        WeightElem::F32
    } else {
        WeightElem::BF16
    };
    let cfg = ProgramConfig::for_model(
        c,
        a.tensor_parallel_size,
        elem,
        p.kv_blocks as usize,
        a.block_size,
    );
    let buckets = XlaRunner::bucket_set(&XlaRunnerOptions {
        max_num_batched_tokens: a.max_num_batched_tokens,
        max_model_len,
        block_size: a.block_size,
        max_logprobs: a.max_logprobs,
        ..Default::default()
    });
    let hbm = p.device.memory_bytes;
    let (bw, peak) = (p.device.bandwidth_bytes_per_s, p.device.bf16_flops_per_s);
    println!(
        "\nTPU compiler (libtpu, {} {topology}, deviceless), per chip, {} KV blocks of {}; the \
         compiler's cost model, not a measurement:",
        topo.platform_name()?,
        p.kv_blocks,
        a.block_size
    );
    println!(
        "{:>6} {:>7} {:>5} {:>9} {:>9} {:>10} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "tokens",
        "context",
        "top_k",
        "GFLOP",
        "GB read",
        "model ms",
        "roof ms",
        "args GB",
        "alias GB",
        "temp GB",
        "temp/HBM",
        "compile"
    );
    let mut worst: Option<ProgramCost> = None;
    for b in buckets {
        let r = deviceless::program_cost(&topo, &cfg, b)?;
        let roof = (r.bytes_accessed / bw).max(r.flops / peak);
        println!(
            "{:>6} {:>7} {:>5} {:>9.1} {:>9.2} {:>10.3} {:>9.3} {:>8.2} {:>8.2} {:>8.3} {:>8.1}% {:>7.1}s",
            b.tokens,
            b.blocks * a.block_size as i64,
            b.top_k,
            r.flops / 1e9,
            r.bytes_accessed / 1e9,
            r.optimal_seconds * 1e3,
            roof * 1e3,
            r.memory.arguments as f64 / 1e9,
            r.memory.aliased as f64 / 1e9,
            r.memory.temporaries as f64 / 1e9,
            100.0 * r.memory.temporaries as f64 / hbm,
            r.compile_seconds
        );
        if let Some(dir) = &a.dump_hlo {
            std::fs::create_dir_all(dir)?;
            let f = dir.join(format!(
                "step-t{}-b{}-k{}.hlo.pb",
                b.tokens, b.blocks, b.top_k
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
            "largest temporaries {:.3} GB ({:.1} % of {:.0} GB HBM) at tokens={} context={}; \
             arguments (weights + KV) {:.2} GB; fits: {}",
            w.memory.temporaries as f64 / 1e9,
            100.0 * w.memory.temporaries as f64 / hbm,
            hbm / 1e9,
            w.bucket.tokens,
            w.bucket.blocks * a.block_size as i64,
            w.memory.arguments as f64 / 1e9,
            if (total as f64) <= hbm { "yes" } else { "NO" }
        );
    }
    println!(
        "(XLA counts the body of the layer loop once: flops and bytes above are one layer's \
         plus everything outside the loop.)"
    );
    Ok(())
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
    let p = plan(
        &c,
        dev,
        a.tensor_parallel_size,
        bytes,
        max_model_len,
        a.max_num_seqs,
        a.gpu_memory_utilization,
        a.block_size,
    )?
    .with_read_gbps(a.read_gbps);
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
