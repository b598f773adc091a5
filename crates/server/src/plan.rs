//! `tpuserve plan`: what a model needs on a device type (no weights read).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tpuserve_model::{gguf::GgufFile, LlamaConfig};
use tpuserve_runner_xla::plan::{device_spec, plan, DEVICES};

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
}

fn positive_gbps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s} is not a positive rate in GB/s")),
    }
}

fn config(path: &std::path::Path) -> anyhow::Result<LlamaConfig> {
    if path.is_dir() {
        return Ok(LlamaConfig::from_hf_json(&path.join("config.json"))?);
    }
    if path.extension().is_some_and(|e| e == "gguf") {
        return Ok(GgufFile::open(path)?.llama_config()?);
    }
    Ok(LlamaConfig::from_hf_json(path)?)
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let c = config(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
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
    let p = plan(
        &c,
        dev,
        a.tensor_parallel_size,
        bytes,
        a.max_model_len.unwrap_or(c.max_position_embeddings),
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
    Ok(())
}
