//! Per-step and per-token costs on the HTTP side: feeding one engine step's stats (32 decoding
//! sequences, 4 finishing) into the Prometheus metrics, encoding the /metrics page, and
//! turning one streamed completion chunk into an SSE event.
//! Run: `cargo bench -p tpuserve --bench http_hot_paths`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tpuserve::metrics::{CacheInfo, Metrics};
use tpuserve::protocol::{CompletionChoice, CompletionResponse};
use tpuserve_engine::{FinishReason, FinishedSeqStats, RequestId, StepStats};

fn step(now: Instant) -> StepStats {
    let finished = (0..4)
        .map(|i| FinishedSeqStats {
            request_id: RequestId(i),
            index: 0,
            n: 1,
            finish_reason: FinishReason::Length,
            num_prompt_tokens: 88,
            num_generation_tokens: 64,
            max_tokens: Some(64),
            arrival: now - Duration::from_secs(3),
            first_scheduled: Some(now - Duration::from_millis(2900)),
            first_token: Some(now - Duration::from_millis(2700)),
            last_token: Some(now),
            finished: now,
        })
        .collect();
    StepStats {
        seq: 1,
        at: now,
        execute_time: Duration::from_millis(30),
        num_running: 32,
        num_waiting: 3,
        kv_cache_usage: 0.42,
        prefix_cache_queries: 88,
        prefix_cache_hits: 16,
        num_prompt_tokens: 88,
        num_generation_tokens: 32,
        num_scheduled_tokens: 120,
        num_preemptions: 0,
        time_to_first_token: vec![Duration::from_millis(180)],
        inter_token_latencies: vec![Duration::from_millis(31); 31],
        finished,
    }
}

fn bench(c: &mut Criterion) {
    let cache = CacheInfo {
        block_size: 16,
        num_gpu_blocks: 4096,
        gpu_memory_utilization: 0.9,
        enable_prefix_caching: true,
        cache_dtype: "auto".into(),
    };
    let m = Metrics::new("SmolLM2-135M-Instruct", 2048, &cache, None);
    let s = step(Instant::now());
    c.bench_function("metrics_observe_step_32_seqs", |b| {
        b.iter(|| m.observe(black_box(&s)))
    });
    c.bench_function("metrics_encode_page", |b| {
        b.iter(|| {
            m.observe(&s); // a new state each time: measures the encoding, not the cache
            black_box(m.render())
        })
    });
    c.bench_function("metrics_scrape_unchanged", |b| {
        b.iter(|| black_box(m.render()))
    });
    let chunk = CompletionResponse {
        id: "cmpl-0123456789abcdef0123456789abcdef".into(),
        object: "text_completion",
        created: 1_764_460_800,
        model: "SmolLM2-135M-Instruct".into(),
        choices: vec![CompletionChoice {
            index: 0,
            text: " jumps".into(),
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
            prompt_logprobs: None,
            prompt_token_ids: None,
            token_ids: None,
            routed_experts: None,
        }],
        usage: None,
        system_fingerprint: None,
        tail: None,
    };
    c.bench_function("sse_encode_completion_chunk", |b| {
        b.iter(|| black_box(tpuserve::app::sse_json(black_box(&chunk))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
