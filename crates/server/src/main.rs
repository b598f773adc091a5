//! `tpuserve`: the command-line entry point.

use tpuserve::{bench, cli, generate, plan, serve};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    Plan(Box<plan::PlanArgs>),
    /// Benchmarks (as `vllm bench`).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .init();
    let cli = parse_command_line();
    match cli.command {
        Command::Generate(args) => {
            tpuserve_runner_cpu::keep_step_buffers();
            generate::run(args)
        }
        Command::Plan(args) => plan::run(*args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Serve(args) => {
            if serve::runs_on_host(&args) {
                tpuserve_runner_cpu::keep_step_buffers();
            }
            let result = args
                .check_sizes()
                .and_then(|()| args.check_vllm_flags())
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    tokio::runtime::Builder::new_multi_thread()
                        .enable_all()
                        .build()?
                        .block_on(serve::run(*args))
                });
            match result {
                Err(e) if e.downcast_ref::<cli::UsageError>().is_some() => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
                other => other,
            }
        }
    }
}

/// clap's parse of the (vLLM-normalised) command line, with `vllm serve`'s flags that
/// tpuserve does not implement added to `serve` and recorded in its arguments.
fn parse_command_line() -> Cli {
    let argv = tpuserve::vllm_flags::normalize_args(std::env::args_os().collect());
    let cmd = Cli::command().mut_subcommand("serve", tpuserve::vllm_flags::augment);
    let matches = cmd.get_matches_from(argv);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Serve(args), Some(m)) = (&mut cli.command, matches.subcommand_matches("serve"))
    {
        args.vllm_given = tpuserve::vllm_flags::given(m);
    }
    cli
}
