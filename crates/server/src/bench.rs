//! `tpuserve bench serve`: resolves the tokenizer the way `serve` resolves a model, runs the
//! load (crate `tpuserve-bench`), prints vLLM's table and optionally saves the JSON.

use anyhow::Context;
use clap::Subcommand;
use tpuserve_bench::BenchServeArgs;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Streaming load against an OpenAI-compatible server (as `vllm bench serve`).
    Serve(Box<BenchServeArgs>),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let BenchCommand::Serve(args) = cmd;
    let path = match &args.tokenizer {
        None => crate::generate::default_model()?,
        Some(t) => {
            let cfg = tpuserve_hub::HubConfig::from_env(None);
            tpuserve_hub::resolve_model(t, None, &cfg)?
        }
    };
    let model = tpuserve_model::load_model(&path)
        .with_context(|| format!("loading the tokenizer from {}", path.display()))?;
    println!(
        "Benchmarking {} ({} prompts, concurrency {}, rate {})",
        args.base_url,
        args.num_prompts,
        args.max_concurrency
            .map_or("unlimited".into(), |c| c.to_string()),
        args.request_rate.map_or("inf".into(), |r| r.to_string()),
    );
    let report = tpuserve_bench::run(&args, &model.tokenizer)?;
    print!("{}", report.table());
    if let Some(path) = &args.result_file {
        report.save(path)?;
        println!("Saved the result to {}", path.display());
    }
    if report.completed == 0 {
        anyhow::bail!(
            "every request failed; first error: {}",
            report.first_error().unwrap_or("unknown")
        );
    }
    if let Some(e) = report.first_error() {
        eprintln!("{} requests failed; first error: {e}", report.failed);
    }
    Ok(())
}
