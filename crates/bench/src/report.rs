//! The result: vLLM's printed table and its JSON field names (times in ms), plus which
//! token counts came from the servers' `usage`.

use std::time::Duration;

use serde::Serialize;

use crate::args::BenchServeArgs;
use crate::client::RequestOutcome;
use crate::dataset::BenchRequest;
use crate::stats::{summarize, Summary};
use crate::BenchError;

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub endpoint: String,
    pub model_id: String,
    pub num_prompts: usize,
    pub request_rate: String,
    pub max_concurrency: Option<usize>,
    pub duration: f64,
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    /// Whether every completed request reported `usage` (else chunks were counted).
    pub output_tokens_from_usage: bool,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub mean_ttft_ms: f64,
    pub median_ttft_ms: f64,
    pub std_ttft_ms: f64,
    pub p90_ttft_ms: f64,
    pub p99_ttft_ms: f64,
    pub mean_tpot_ms: f64,
    pub median_tpot_ms: f64,
    pub std_tpot_ms: f64,
    pub p90_tpot_ms: f64,
    pub p99_tpot_ms: f64,
    pub mean_itl_ms: f64,
    pub median_itl_ms: f64,
    pub std_itl_ms: f64,
    pub p90_itl_ms: f64,
    pub p99_itl_ms: f64,
    pub mean_e2el_ms: f64,
    pub median_e2el_ms: f64,
    pub std_e2el_ms: f64,
    pub p90_e2el_ms: f64,
    pub p99_e2el_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Serialize)]
pub struct Details {
    pub input_lens: Vec<usize>,
    pub output_lens: Vec<usize>,
    pub ttfts: Vec<f64>,
    pub itls: Vec<Vec<f64>>,
    pub errors: Vec<String>,
}

fn ms(s: Summary) -> Summary {
    Summary {
        mean: s.mean * 1e3,
        median: s.median * 1e3,
        std: s.std * 1e3,
        p90: s.p90 * 1e3,
        p99: s.p99 * 1e3,
    }
}

impl Report {
    pub fn new(
        args: &BenchServeArgs,
        requests: &[BenchRequest],
        outcomes: Vec<RequestOutcome>,
        duration: Duration,
    ) -> Self {
        let ok: Vec<(&BenchRequest, &RequestOutcome)> = requests
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| o.ok())
            .collect();
        let input_lens: Vec<usize> = ok
            .iter()
            .map(|(r, o)| o.usage_prompt_tokens.unwrap_or(r.prompt_len))
            .collect();
        let output_lens: Vec<usize> = ok.iter().map(|(_, o)| o.output_tokens()).collect();
        let total_input_tokens = input_lens.iter().sum();
        let total_output_tokens: usize = output_lens.iter().sum();
        let secs = duration.as_secs_f64().max(1e-9);
        let ttft = ms(summarize(
            &ok.iter().map(|(_, o)| o.ttft).collect::<Vec<_>>(),
        ));
        let tpot = ms(summarize(
            &ok.iter()
                .filter(|(_, o)| o.output_tokens() > 1)
                .map(|(_, o)| (o.latency - o.ttft) / (o.output_tokens() - 1) as f64)
                .collect::<Vec<_>>(),
        ));
        let itl = ms(summarize(
            &ok.iter()
                .flat_map(|(_, o)| o.itl.iter().copied())
                .collect::<Vec<_>>(),
        ));
        let e2e = ms(summarize(
            &ok.iter().map(|(_, o)| o.latency).collect::<Vec<_>>(),
        ));
        let details = (!args.no_per_request_details).then(|| Details {
            input_lens: input_lens.clone(),
            output_lens: output_lens.clone(),
            ttfts: outcomes.iter().map(|o| o.ttft).collect(),
            itls: outcomes.iter().map(|o| o.itl.clone()).collect(),
            errors: outcomes
                .iter()
                .map(|o| o.error.clone().unwrap_or_default())
                .collect(),
        });
        Report {
            date: chrono::Local::now().format("%Y%m%d-%H%M%S").to_string(),
            endpoint: format!("{}{}", args.base_url.trim_end_matches('/'), args.endpoint),
            model_id: args.model.clone(),
            num_prompts: requests.len(),
            request_rate: args
                .request_rate
                .filter(|r| r.is_finite())
                .map_or("inf".into(), |r| r.to_string()),
            max_concurrency: args.max_concurrency,
            duration: secs,
            completed: ok.len(),
            failed: outcomes.len() - ok.len(),
            total_input_tokens,
            total_output_tokens,
            output_tokens_from_usage: ok.iter().all(|(_, o)| o.usage_completion_tokens.is_some()),
            request_throughput: ok.len() as f64 / secs,
            output_throughput: total_output_tokens as f64 / secs,
            total_token_throughput: (total_input_tokens + total_output_tokens) as f64 / secs,
            mean_ttft_ms: ttft.mean,
            median_ttft_ms: ttft.median,
            std_ttft_ms: ttft.std,
            p90_ttft_ms: ttft.p90,
            p99_ttft_ms: ttft.p99,
            mean_tpot_ms: tpot.mean,
            median_tpot_ms: tpot.median,
            std_tpot_ms: tpot.std,
            p90_tpot_ms: tpot.p90,
            p99_tpot_ms: tpot.p99,
            mean_itl_ms: itl.mean,
            median_itl_ms: itl.median,
            std_itl_ms: itl.std,
            p90_itl_ms: itl.p90,
            p99_itl_ms: itl.p99,
            mean_e2el_ms: e2e.mean,
            median_e2el_ms: e2e.median,
            std_e2el_ms: e2e.std,
            p90_e2el_ms: e2e.p90,
            p99_e2el_ms: e2e.p99,
            details,
        }
    }

    /// The first error message, for a run with failures.
    pub fn first_error(&self) -> Option<&str> {
        self.details
            .as_ref()
            .and_then(|d| d.errors.iter().find(|e| !e.is_empty()))
            .map(String::as_str)
    }

    /// vLLM's result table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<40} {v:<10}\n"));
        let head = |t: &str| format!("{t:=^50}\n");
        let sect = |t: &str| format!("{t:-^50}\n");
        let mut out = head(" Serving Benchmark Result ");
        line("Successful requests:", self.completed.to_string());
        line("Failed requests:", self.failed.to_string());
        if let Some(c) = self.max_concurrency {
            line("Maximum request concurrency:", c.to_string());
        }
        line("Request rate configured (RPS):", self.request_rate.clone());
        line("Benchmark duration (s):", format!("{:.2}", self.duration));
        line("Total input tokens:", self.total_input_tokens.to_string());
        line(
            "Total generated tokens:",
            self.total_output_tokens.to_string(),
        );
        line(
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput),
        );
        line(
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_throughput),
        );
        line(
            "Total Token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput),
        );
        out.push_str(&s);
        for (title, name, m) in [
            (
                "Time to First Token",
                "TTFT",
                [self.mean_ttft_ms, self.median_ttft_ms, self.p99_ttft_ms],
            ),
            (
                "Time per Output Token (excl. 1st token)",
                "TPOT",
                [self.mean_tpot_ms, self.median_tpot_ms, self.p99_tpot_ms],
            ),
            (
                "Inter-token Latency",
                "ITL",
                [self.mean_itl_ms, self.median_itl_ms, self.p99_itl_ms],
            ),
            (
                "End-to-end Latency",
                "E2EL",
                [self.mean_e2el_ms, self.median_e2el_ms, self.p99_e2el_ms],
            ),
        ] {
            out.push_str(&sect(title));
            for (stat, v) in ["Mean", "Median", "P99"].iter().zip(m) {
                out.push_str(&format!(
                    "{:<40} {:<10.2}\n",
                    format!("{stat} {name} (ms):"),
                    v
                ));
            }
        }
        out.push_str(&"=".repeat(50));
        out.push('\n');
        out
    }

    pub fn save(&self, path: &std::path::Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self).expect("plain data serialises");
        std::fs::write(path, text).map_err(|source| BenchError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}
