//! `tpuserve`: the command-line entry point.

mod app;
mod chat;
mod cli;
mod error;
mod generate;
mod metrics;
mod openapi;
mod plan;
mod protocol;
mod serve;
mod state;
mod validate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tpuserve",
    version,
    about = "vLLM-compatible LLM server for TPU and CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (flags as `vllm serve`).
    Serve(Box<cli::ServeArgs>),
    /// Generate a completion for one prompt (greedy) and print it.
    Generate(generate::GenerateArgs),
    /// Memory and throughput plan for a model on a device type (reads only the config).
    Plan(plan::PlanArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve::run(*args)),
    }
}
