//! `vllm:`-named Prometheus metrics with vLLM's types, labels and buckets (both the names the
//! GKE tutorial and HPA use and the current ones), fed from the engine's per-step stats by a
//! task of their own so the engine never waits on a scrape, plus the 5-second stats log line.
//!
//! A scrape first waits (briefly, bounded) until every step the engine has published is
//! applied: the engine publishes a step's stats before releasing its outputs, so a response a
//! client already holds is always counted in the next scrape, as in vLLM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tpuserve_engine::StepStats;
use tpuserve_runner_api::CompileCounters;

use crate::state::SharedState;

const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_SECONDS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const ITERATION_TOKENS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
const PARAMS_N: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];

/// vLLM's `build_1_2_5_buckets(max)`: 1, 2, 5, 10, 20, 50, … up to `max`.
pub fn buckets_1_2_5(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            let v = m * scale;
            if v > max as f64 {
                return out;
            }
            out.push(v);
        }
        scale *= 10.0;
    }
}

pub struct Metrics {
    registry: Registry,
    labels: [String; 2],
    running: GaugeVec,
    waiting: GaugeVec,
    kv_usage: GaugeVec,
    gpu_kv_usage: GaugeVec,
    avg_prompt: GaugeVec,
    avg_gen: GaugeVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    preemptions: IntCounterVec,
    success: IntCounterVec,
    prefix_queries: IntCounterVec,
    prefix_hits: IntCounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    tpot: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    prefill: HistogramVec,
    decode: HistogramVec,
    inference: HistogramVec,
    req_prompt: HistogramVec,
    req_gen: HistogramVec,
    iteration: HistogramVec,
    params_n: HistogramVec,
    params_max: HistogramVec,
    compile: Option<CompileMetrics>,
    /// Bumped after every update; a scrape re-encodes only when it moved (see `render`).
    version: AtomicU64,
    page: Mutex<Option<CachedPage>>,
    /// The engine's counter of published step stats ([`StepStats::seq`]), once attached.
    published: OnceLock<Arc<AtomicU64>>,
    /// The highest [`StepStats::seq`] applied so far.
    observed: AtomicU64,
    /// Woken after every applied step (scrapes waiting to catch up).
    caught_up: tokio::sync::Notify,
}

/// How long a scrape waits for the stats task to apply steps already published. The task only
/// bumps counters, so this is never reached unless the runtime is starved; then the page is
/// served as it is rather than holding the scrape.
const CATCH_UP_LIMIT: Duration = Duration::from_millis(500);

/// The last encoded exposition and the state it shows. Encoding the ~25 KB page costs ~0.8 ms
/// of CPU, while the state changes at most once per engine step; a dashboard, Prometheus and a
/// curl loop scraping faster than the engine steps share one encoding.
struct CachedPage {
    version: u64,
    compile_fingerprint: u64,
    text: axum::body::Bytes,
}

/// `tpuserve:` series for what vLLM has no name for: XLA compilations and the compile cache.
/// The runner counts in atomics; a scrape copies them into the Prometheus counters.
struct CompileMetrics {
    source: Arc<CompileCounters>,
    compilations: IntCounterVec,
    cache_hits: IntCounterVec,
    cache_misses: IntCounterVec,
    after_warmup: IntCounterVec,
    seconds: prometheus::CounterVec,
}

impl CompileMetrics {
    fn fingerprint(&self) -> u64 {
        let c = &self.source;
        [
            &c.compilations,
            &c.cache_hits,
            &c.cache_misses,
            &c.after_warmup,
            &c.compile_micros,
        ]
        .iter()
        .fold(0u64, |acc, a| {
            acc.wrapping_mul(1_000_003)
                .wrapping_add(a.load(Ordering::Relaxed))
        })
    }

    fn sync(&self, l: &[&str; 2]) {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        for (c, v) in [
            (&self.compilations, load(&self.source.compilations)),
            (&self.cache_hits, load(&self.source.cache_hits)),
            (&self.cache_misses, load(&self.source.cache_misses)),
            (&self.after_warmup, load(&self.source.after_warmup)),
        ] {
            let c = c.with_label_values(l);
            c.inc_by(v.saturating_sub(c.get()));
        }
        let s = self.seconds.with_label_values(l);
        let total = load(&self.source.compile_micros) as f64 / 1e6;
        if total > s.get() {
            s.inc_by(total - s.get());
        }
    }
}

/// KV cache geometry and settings shown as labels of `vllm:cache_config_info`.
pub struct CacheInfo {
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub gpu_memory_utilization: f64,
    pub enable_prefix_caching: bool,
    /// `--kv-cache-dtype` as given (`auto` when absent).
    pub cache_dtype: String,
}

impl Metrics {
    pub fn new(
        model_name: &str,
        max_model_len: usize,
        cache: &CacheInfo,
        compile: Option<Arc<CompileCounters>>,
    ) -> Arc<Metrics> {
        let registry = Registry::new();
        let lab = &["model_name", "engine"];
        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), lab).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique name");
            g
        };
        let counter = |name: &str, help: &str, extra: &[&str]| {
            let mut l = lab.to_vec();
            l.extend_from_slice(extra);
            let c = IntCounterVec::new(Opts::new(name, help), &l).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique name");
            c
        };
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), lab)
                .expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique name");
            h
        };
        let compile = compile.map(|source| CompileMetrics {
            source,
            compilations: counter(
                "tpuserve:xla_compilations_total",
                "XLA programs compiled (not loaded from the compile cache).",
                &[],
            ),
            cache_hits: counter(
                "tpuserve:xla_compile_cache_hits_total",
                "XLA programs loaded from the persistent compile cache.",
                &[],
            ),
            cache_misses: counter(
                "tpuserve:xla_compile_cache_misses_total",
                "XLA programs not found in the persistent compile cache.",
                &[],
            ),
            after_warmup: counter(
                "tpuserve:xla_compilations_after_warmup_total",
                "XLA programs compiled after warm-up (a shape missed by the buckets).",
                &[],
            ),
            seconds: {
                let c = prometheus::CounterVec::new(
                    Opts::new(
                        "tpuserve:xla_compile_seconds_total",
                        "Seconds spent compiling XLA programs.",
                    ),
                    lab,
                )
                .expect("valid counter");
                registry.register(Box::new(c.clone())).expect("unique name");
                c
            },
        });
        let tokens = buckets_1_2_5(max_model_len);
        let info = GaugeVec::new(
            Opts::new(
                "vllm:cache_config_info",
                "Information of the LLMEngine CacheConfig",
            ),
            &[
                "block_size",
                "num_gpu_blocks",
                "gpu_memory_utilization",
                "enable_prefix_caching",
                "cache_dtype",
            ],
        )
        .expect("valid info gauge");
        registry
            .register(Box::new(info.clone()))
            .expect("unique name");
        info.with_label_values(&[
            &cache.block_size.to_string(),
            &cache.num_gpu_blocks.to_string(),
            &cache.gpu_memory_utilization.to_string(),
            &cache.enable_prefix_caching.to_string(),
            &cache.cache_dtype,
        ])
        .set(1.0);
        let m = Metrics {
            labels: [model_name.to_string(), "0".to_string()],
            running: gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
            ),
            waiting: gauge(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
            ),
            kv_usage: gauge(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
            ),
            gpu_kv_usage: gauge(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage.",
            ),
            avg_prompt: gauge(
                "vllm:avg_prompt_throughput_toks_per_s",
                "Average prefill throughput in tokens/s.",
            ),
            avg_gen: gauge(
                "vllm:avg_generation_throughput_toks_per_s",
                "Average generation throughput in tokens/s.",
            ),
            prompt_tokens: counter(
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
                &[],
            ),
            generation_tokens: counter(
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                &[],
            ),
            preemptions: counter(
                "vllm:num_preemptions_total",
                "Cumulative number of preemption from the engine.",
                &[],
            ),
            success: counter(
                "vllm:request_success_total",
                "Count of successfully processed requests.",
                &["finished_reason"],
            ),
            prefix_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                &[],
            ),
            prefix_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                &[],
            ),
            ttft: hist(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT.to_vec(),
            ),
            itl: hist(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL.to_vec(),
            ),
            tpot: hist(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                ITL.to_vec(),
            ),
            e2e: hist(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                REQUEST_SECONDS.to_vec(),
            ),
            queue: hist(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                REQUEST_SECONDS.to_vec(),
            ),
            prefill: hist(
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                REQUEST_SECONDS.to_vec(),
            ),
            decode: hist(
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                REQUEST_SECONDS.to_vec(),
            ),
            inference: hist(
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                REQUEST_SECONDS.to_vec(),
            ),
            req_prompt: hist(
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                tokens.clone(),
            ),
            req_gen: hist(
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                tokens.clone(),
            ),
            iteration: hist(
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                ITERATION_TOKENS.to_vec(),
            ),
            params_n: hist(
                "vllm:request_params_n",
                "Histogram of the n request parameter.",
                PARAMS_N.to_vec(),
            ),
            params_max: hist(
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                tokens,
            ),
            registry,
            compile,
            version: AtomicU64::new(0),
            published: OnceLock::new(),
            observed: AtomicU64::new(0),
            caught_up: tokio::sync::Notify::new(),
            page: Mutex::new(None),
        };
        // Series exist from the start (dashboards and the HPA see zeros, not gaps).
        let l = m.l();
        for g in [
            &m.running,
            &m.waiting,
            &m.kv_usage,
            &m.gpu_kv_usage,
            &m.avg_prompt,
            &m.avg_gen,
        ] {
            g.with_label_values(&l).set(0.0);
        }
        for c in [
            &m.prompt_tokens,
            &m.generation_tokens,
            &m.preemptions,
            &m.prefix_queries,
            &m.prefix_hits,
        ] {
            c.with_label_values(&l).inc_by(0);
        }
        for r in ["stop", "length", "abort", "error", "repetition"] {
            m.success.with_label_values(&[l[0], l[1], r]).inc_by(0);
        }
        Arc::new(m)
    }

    fn l(&self) -> [&str; 2] {
        [&self.labels[0], &self.labels[1]]
    }

    pub fn observe(&self, s: &StepStats) {
        let l = self.l();
        self.running.with_label_values(&l).set(s.num_running as f64);
        self.waiting.with_label_values(&l).set(s.num_waiting as f64);
        self.kv_usage.with_label_values(&l).set(s.kv_cache_usage);
        self.gpu_kv_usage
            .with_label_values(&l)
            .set(s.kv_cache_usage);
        self.prompt_tokens
            .with_label_values(&l)
            .inc_by(s.num_prompt_tokens as u64);
        self.generation_tokens
            .with_label_values(&l)
            .inc_by(s.num_generation_tokens as u64);
        self.preemptions
            .with_label_values(&l)
            .inc_by(s.num_preemptions as u64);
        self.prefix_queries
            .with_label_values(&l)
            .inc_by(s.prefix_cache_queries);
        self.prefix_hits
            .with_label_values(&l)
            .inc_by(s.prefix_cache_hits);
        if s.num_scheduled_tokens > 0 {
            self.iteration
                .with_label_values(&l)
                .observe(s.num_scheduled_tokens as f64);
        }
        for t in &s.time_to_first_token {
            self.ttft.with_label_values(&l).observe(t.as_secs_f64());
        }
        for t in &s.inter_token_latencies {
            self.itl.with_label_values(&l).observe(t.as_secs_f64());
            self.tpot.with_label_values(&l).observe(t.as_secs_f64());
        }
        for f in &s.finished {
            self.success
                .with_label_values(&[l[0], l[1], f.finish_reason.as_str()])
                .inc();
            self.e2e
                .with_label_values(&l)
                .observe(f.e2e_latency().as_secs_f64());
            let obs = |h: &HistogramVec, d: Option<Duration>| {
                if let Some(d) = d {
                    h.with_label_values(&l).observe(d.as_secs_f64());
                }
            };
            obs(&self.queue, f.queue_time());
            obs(&self.prefill, f.prefill_time());
            obs(&self.decode, f.decode_time());
            obs(&self.inference, f.inference_time());
            self.req_prompt
                .with_label_values(&l)
                .observe(f.num_prompt_tokens as f64);
            self.req_gen
                .with_label_values(&l)
                .observe(f.num_generation_tokens as f64);
            if f.index == 0 {
                self.params_n.with_label_values(&l).observe(f.n as f64);
                if let Some(m) = f.max_tokens {
                    self.params_max.with_label_values(&l).observe(m as f64);
                }
            }
        }
        self.changed();
        self.observed.fetch_max(s.seq, Ordering::AcqRel);
        self.caught_up.notify_waiters();
    }

    /// Makes scrapes wait for every step the engine published (`EngineCore::stats_published`).
    pub fn follow_engine(&self, published: Arc<AtomicU64>) {
        let _ = self.published.set(published);
    }

    /// Returns once every step published so far has been applied, or after `limit`.
    pub async fn catch_up(&self, limit: Duration) {
        let Some(published) = self.published.get() else {
            return;
        };
        let target = published.load(Ordering::Acquire);
        let _ = tokio::time::timeout(limit, async {
            loop {
                let woken = self.caught_up.notified();
                tokio::pin!(woken);
                // Registered before the check, so an update between the two is not missed.
                woken.as_mut().enable();
                if self.observed.load(Ordering::Acquire) >= target {
                    return;
                }
                woken.await;
            }
        })
        .await;
    }

    pub fn set_window_throughput(&self, prompt: f64, generation: f64) {
        let l = self.l();
        self.avg_prompt.with_label_values(&l).set(prompt);
        self.avg_gen.with_label_values(&l).set(generation);
        self.changed();
    }

    fn changed(&self) {
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The exposition text. Re-encoded only when an update landed since the last scrape, so
    /// a page is never stale: the version is read before gathering, and an update racing with
    /// the encoding leaves the stored version behind, forcing the next scrape to encode again.
    pub fn render(&self) -> axum::body::Bytes {
        let version = self.version.load(Ordering::Acquire);
        let compile_fingerprint = self.compile.as_ref().map_or(0, |c| c.fingerprint());
        let mut page = self.page.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = page.as_ref() {
            if p.version == version && p.compile_fingerprint == compile_fingerprint {
                return p.text.clone();
            }
        }
        if let Some(c) = &self.compile {
            c.sync(&self.l());
        }
        let mut buf = Vec::with_capacity(page.as_ref().map_or(32 << 10, |p| p.text.len() + 1024));
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return axum::body::Bytes::new();
        }
        let text = axum::body::Bytes::from(buf);
        *page = Some(CachedPage {
            version,
            compile_fingerprint,
            text: text.clone(),
        });
        text
    }
}

pub async fn scrape(State(st): State<SharedState>) -> impl IntoResponse {
    st.metrics.catch_up(CATCH_UP_LIMIT).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
}

/// Consumes the engine's step stats as they come (a task on the server's runtime): updates the
/// metrics and, every 5 s while there is work, logs vLLM's stats line (unless `log_stats` is
/// off).
pub fn spawn_stats_consumer(
    metrics: Arc<Metrics>,
    mut rx: UnboundedReceiver<StepStats>,
    log_stats: bool,
) {
    tokio::spawn(async move {
        let interval = Duration::from_secs(5);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut window = StatsWindow::new();
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(s) => {
                        metrics.observe(&s);
                        window.add(&s);
                    }
                    None => return,
                },
                _ = tick.tick() => {}
            }
            if window.start.elapsed() >= interval {
                window.close(&metrics, log_stats);
            }
        }
    });
}

/// What the 5-second log line and the average-throughput gauges sum over.
struct StatsWindow {
    start: Instant,
    prompt: usize,
    gen: usize,
    running: usize,
    waiting: usize,
    kv: f64,
    queries: u64,
    hits: u64,
    preempt: usize,
}

impl StatsWindow {
    fn new() -> Self {
        StatsWindow {
            start: Instant::now(),
            prompt: 0,
            gen: 0,
            running: 0,
            waiting: 0,
            kv: 0.0,
            queries: 0,
            hits: 0,
            preempt: 0,
        }
    }

    fn add(&mut self, s: &StepStats) {
        self.prompt += s.num_prompt_tokens;
        self.gen += s.num_generation_tokens;
        self.preempt += s.num_preemptions;
        self.queries += s.prefix_cache_queries;
        self.hits += s.prefix_cache_hits;
        (self.running, self.waiting, self.kv) = (s.num_running, s.num_waiting, s.kv_cache_usage);
    }

    /// Sets the throughput gauges, logs the line if there was work, and starts a new window
    /// (the gauges of the last step carry over).
    fn close(&mut self, metrics: &Metrics, log_stats: bool) {
        let secs = self.start.elapsed().as_secs_f64();
        let (pt, gt) = (self.prompt as f64 / secs, self.gen as f64 / secs);
        metrics.set_window_throughput(pt, gt);
        let busy = self.prompt + self.gen > 0 || self.running + self.waiting > 0;
        if log_stats && busy {
            let hit = if self.queries > 0 {
                100.0 * self.hits as f64 / self.queries as f64
            } else {
                0.0
            };
            let pre = if self.preempt > 0 {
                format!("Preemptions: {}, ", self.preempt)
            } else {
                String::new()
            };
            tracing::info!(
                "Engine 000: Avg prompt throughput: {pt:.1} tokens/s, Avg generation throughput: {gt:.1} tokens/s, Running: {} reqs, Waiting: {} reqs, {pre}GPU KV cache usage: {:.1}%, Prefix cache hit rate: {hit:.1}%",
                self.running,
                self.waiting,
                self.kv * 100.0
            );
        }
        *self = StatsWindow {
            running: self.running,
            waiting: self.waiting,
            kv: self.kv,
            ..StatsWindow::new()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(generated: usize) -> StepStats {
        StepStats {
            seq: 1,
            at: Instant::now(),
            execute_time: Duration::from_millis(1),
            num_running: 1,
            num_waiting: 0,
            kv_cache_usage: 0.5,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            num_prompt_tokens: 0,
            num_generation_tokens: generated,
            num_scheduled_tokens: generated,
            num_preemptions: 0,
            time_to_first_token: Vec::new(),
            inter_token_latencies: Vec::new(),
            finished: Vec::new(),
        }
    }

    fn generation_total(page: &[u8]) -> u64 {
        let text = std::str::from_utf8(page).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("vllm:generation_tokens_total{"))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn scrapes_share_one_encoding_until_an_update_lands() {
        let cache = CacheInfo {
            block_size: 16,
            num_gpu_blocks: 8,
            gpu_memory_utilization: 0.9,
            enable_prefix_caching: true,
            cache_dtype: "fp8".into(),
        };
        let counters = Arc::new(CompileCounters::default());
        let m = Metrics::new("m", 512, &cache, Some(counters.clone()));
        let a = m.render();
        let info = std::str::from_utf8(&a)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("vllm:cache_config_info{"))
            .unwrap()
            .to_string();
        assert!(info.contains(r#"cache_dtype="fp8""#), "{info}");
        let b = m.render();
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "an unchanged state is not re-encoded"
        );
        assert_eq!(generation_total(&a), 0);

        m.observe(&step(7));
        let c = m.render();
        assert_ne!(a.as_ptr(), c.as_ptr());
        assert_eq!(generation_total(&c), 7);

        counters.compilations.fetch_add(3, Ordering::Relaxed);
        let d = m.render();
        let text = std::str::from_utf8(&d).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("tpuserve:xla_compilations_total{") && l.ends_with(" 3")),
            "a compile counted by the runner shows at the next scrape"
        );
        assert_eq!(m.render().as_ptr(), d.as_ptr());
    }
}
