//! `tpuserve bench serve`: a streaming load generator for any OpenAI-compatible server, in the
//! spirit of `vllm bench serve` (same flags where they exist, same result table, JSON with the
//! same field names), so figures from tpuserve, vLLM and llama.cpp's `llama-server` line up.

pub mod args;
pub mod client;
pub mod dataset;
pub mod report;
pub mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tpuserve_model::Tokenizer;

pub use args::BenchServeArgs;
pub use client::{Endpoint, RequestOutcome};
pub use dataset::BenchRequest;
pub use report::Report;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("dataset: {0}")]
    Dataset(String),
    #[error("invalid argument: {0}")]
    Argument(String),
    #[error("the initial test request failed, is the server up at {url}? {reason}")]
    Unreachable { url: String, reason: String },
    #[error("could not write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] tpuserve_model::ModelError),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Runs the benchmark: builds the prompts, sends one test request, then the timed run; returns
/// the report (printing and saving are the caller's).
pub fn run(args: &BenchServeArgs, tokenizer: &Tokenizer) -> Result<Report, BenchError> {
    args.validate()?;
    let requests = dataset::build(args, tokenizer)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run_async(args, requests))
}

async fn run_async(
    args: &BenchServeArgs,
    requests: Vec<BenchRequest>,
) -> Result<Report, BenchError> {
    let endpoint = Arc::new(client::Endpoint::new(args)?);
    if let Some(first) = requests.first() {
        let probe = BenchRequest {
            output_len: first.output_len.min(8),
            ..first.clone()
        };
        let out = endpoint.send(&probe).await;
        if let Some(reason) = out.error {
            return Err(BenchError::Unreachable {
                url: endpoint.url().to_string(),
                reason,
            });
        }
    }

    let permits = Arc::new(Semaphore::new(
        args.max_concurrency.unwrap_or(Semaphore::MAX_PERMITS),
    ));
    let mut arrivals = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let mut next_arrival = Duration::ZERO;
    let mut tasks = Vec::with_capacity(requests.len());
    for req in &requests {
        if let Some(rate) = args.request_rate.filter(|r| r.is_finite()) {
            tokio::time::sleep_until((started + next_arrival).into()).await;
            // Poisson process: exponential gaps with mean 1 / rate.
            let u: f64 = arrivals.random_range(f64::MIN_POSITIVE..1.0);
            next_arrival += Duration::from_secs_f64(-u.ln() / rate);
        }
        let (permits, endpoint, req) = (permits.clone(), endpoint.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            endpoint.send(&req).await
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(
            t.await
                .unwrap_or_else(|e| RequestOutcome::failed(e.to_string())),
        );
    }
    let duration = started.elapsed();
    Ok(Report::new(args, &requests, outcomes, duration))
}
