//! `tpuserve`: the command-line entry point.

mod generate;

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
    /// Generate a completion for one prompt (greedy) and print it.
    Generate(generate::GenerateArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => generate::run(args),
    }
}
