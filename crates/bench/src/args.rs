//! Flags of `tpuserve bench serve`, named as `vllm bench serve` names them.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::BenchError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    /// Prompts of random tokens of `--random-input-len` (fresh per `--seed`).
    Random,
    /// A ShareGPT-format JSON file (`--dataset-path`): first turn = prompt, second = the
    /// reference answer whose token count is the output length.
    Sharegpt,
}

#[derive(Args, Debug, Clone)]
pub struct BenchServeArgs {
    /// Server root, e.g. http://127.0.0.1:8000 (the endpoint path is added).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model name sent in each request.
    #[arg(long)]
    pub model: String,
    /// Tokenizer for building prompts and counting tokens: a .gguf file, a Hugging Face
    /// folder or hub id (default: the model `tpuserve serve` uses by default).
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long, value_enum, default_value = "random")]
    pub dataset_name: DatasetName,
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from [len × (1 − r), len × (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Overrides the output length of ShareGPT entries.
    #[arg(long)]
    pub sharegpt_output_len: Option<usize>,
    /// Requests per second of a Poisson arrival process (default: all at once).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Most requests in flight at once (default: unlimited).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Ask the server to ignore EOS so every request produces exactly its output length.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the result as JSON here (vLLM's field names).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// Keep per-request arrays (TTFTs, ITLs, lengths, errors) out of the JSON.
    #[arg(long)]
    pub no_per_request_details: bool,
    /// Seconds before a request without a response counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Bearer token (or set OPENAI_API_KEY); never printed.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Threads of the load generator itself.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
}

impl BenchServeArgs {
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::Argument(m.to_string()));
        if self.num_prompts == 0 {
            return bad("--num-prompts must be at least 1");
        }
        if self.max_concurrency == Some(0) {
            return bad("--max-concurrency must be at least 1");
        }
        if let Some(r) = self.request_rate {
            if r.is_nan() || r <= 0.0 {
                return bad("--request-rate must be a positive number (or inf)");
            }
        }
        if !(0.0..1.0).contains(&self.random_range_ratio) {
            return bad("--random-range-ratio must be in [0, 1)");
        }
        if self.dataset_name == DatasetName::Random
            && (self.random_input_len == 0 || self.random_output_len == 0)
        {
            return bad("--random-input-len and --random-output-len must be at least 1");
        }
        if self.dataset_name == DatasetName::Sharegpt && self.dataset_path.is_none() {
            return bad("--dataset-name sharegpt needs --dataset-path");
        }
        if !(self.request_timeout > 0.0 && self.request_timeout.is_finite()) {
            return bad("--request-timeout must be a positive number of seconds");
        }
        if !self.endpoint.starts_with('/') {
            return bad("--endpoint is a path such as /v1/completions");
        }
        Ok(())
    }
}
