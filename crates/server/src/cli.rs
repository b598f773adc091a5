//! `tpuserve serve` arguments: the flag names and defaults of `vllm serve` /
//! `python -m vllm.entrypoints.openai.api_server`, so existing manifests work unchanged.

use std::path::PathBuf;

use clap::{ArgAction, Args};
use tpuserve_model::LoadFormat;
use tpuserve_runner_api::sizing;
use tpuserve_runner_xla::{KvCacheDtype, Quantization};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model: a local .gguf file, a Hugging Face folder, or a hub id (default: SmolLM2 from pip).
    #[arg(value_name = "MODEL")]
    pub model_tag: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name(s) clients use in requests; the first is reported and used in metrics.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Key(s) a client must send as `Authorization: Bearer` on /v1 (any one of them; vLLM
    /// 0.32 takes several, `nargs="+"`).
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true, num_args = 1..)]
    pub api_key: Vec<String>,
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Longest context (prompt + answer); `auto` / -1 or absent: the model's. Takes vLLM's
    /// human-readable numbers (`8k` = 8000, `8K` = 8192).
    #[arg(long, value_parser = parse_model_len)]
    pub max_model_len: Option<ModelLen>,
    /// Tokens per engine step (human-readable as --max-model-len).
    #[arg(long, value_parser = human_readable_int)]
    pub max_num_batched_tokens: Option<usize>,
    #[arg(long, default_value_t = sizing::DEFAULT_MAX_NUM_SEQS)]
    pub max_num_seqs: usize,
    /// tpuserve's: prompt tokens one step takes while other requests run or wait (decode
    /// tokens are not counted; a lone request keeps the whole budget), so a burst of prompts
    /// gets its first tokens prompt by prompt rather than all at the end of one long step.
    /// Absent: the CPU runner answers a burst of waiting prompts in halves of whole prompts
    /// (each half at least 256 tokens; XLA runners: no cap). 0: no cap and no halves, the
    /// budget alone (vLLM's scheduling). On the CPU runner, 192 lowers TTFT under bursts
    /// further (p50 at 32 streams ~900 → ~310 ms) for 5–7 % fewer tokens a second.
    #[arg(long, value_parser = human_readable_int)]
    pub max_num_prefill_tokens: Option<usize>,
    /// `fcfs` (arrival order), or `priority`: requests' `priority` (lower first, then
    /// arrival) orders the waiting queue and picks whom a full KV cache preempts, as vLLM.
    #[arg(long, value_parser = ["fcfs", "priority"], default_value = "fcfs")]
    pub scheduling_policy: String,
    #[arg(long, default_value_t = sizing::DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
    #[arg(long)]
    pub download_dir: Option<PathBuf>,
    /// auto | float32 | bfloat16 | float16 (float16 runs as bfloat16). On the CPU runner, auto
    /// keeps GGUF Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K blocks (8-bit
    /// activations) and bf16 checkpoints in place, bfloat16 holds every matrix as bf16 (f32
    /// activations), and float32 dequantises every weight (the reference).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// `int8` (XLA devices): projections and LM head held as int8 with one scale per output
    /// channel, quantised at load from any checkpoint (bf16, f32, GGUF) and dequantised inside
    /// each dot; half the weight bytes of bf16, and the memory freed goes to the KV cache.
    /// vLLM's other methods (fp8, awq, gptq, ...) are logged as ignored.
    #[arg(long)]
    pub quantization: Option<String>,
    /// `auto` (the activations' dtype; f16 on the CPU runner, f32 beside --dtype float32), or
    /// `fp8` / `fp8_e4m3` / `fp8_e5m2`: K and V stored as fp8 (no scale, vLLM's default of
    /// 1.0), rounded to nearest on write and widened inside the attention: twice the tokens
    /// in the same memory and half the page bytes each step reads. vLLM's other cache types
    /// are refused.
    #[arg(long)]
    pub kv_cache_dtype: Option<String>,
    /// XLA devices: `pallas` runs the Pallas paged-attention kernel of `kernels/` (artifacts
    /// from --attention-kernels, each checked against the StableHLO attention at start-up;
    /// anything missing or failing falls back to it with a warning), `xla` the StableHLO
    /// attention, `auto` (default) the kernel for prompt tiles where artifacts lowered for
    /// this device exist (--attention-kernels, else /opt/tpuserve/kernels in the TPU image)
    /// and pass the self-check, the StableHLO attention for decode and everywhere else.
    /// vLLM's backend names (FLASH_ATTN, …) are logged as ignored.
    #[arg(long)]
    pub attention_backend: Option<String>,
    /// The Pallas kernel's artifacts for this configuration (`scripts/attention-kernels.sh
    /// --out DIR` with the same flags).
    #[arg(long)]
    pub attention_kernels: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    #[arg(long, action = ArgAction::SetTrue)]
    pub no_enable_prefix_caching: bool,
    /// Share of device memory for weights + KV cache (on CPU: of a fixed host budget).
    #[arg(
        long,
        visible_alias = "device-memory-utilization",
        default_value_t = 0.9
    )]
    pub gpu_memory_utilization: f64,
    /// KV cache size for the CPU runner, GiB (vLLM's VLLM_CPU_KVCACHE_SPACE).
    #[arg(long, env = "VLLM_CPU_KVCACHE_SPACE", default_value_t = 1.0)]
    pub kv_cache_space: f64,
    /// KV cache bytes per device (e.g. 8G), in place of the share --gpu-memory-utilization
    /// (CPU: --kv-cache-space) gives it; `None` or empty: that share.
    #[arg(long, value_parser = optional_count, default_value = "None")]
    pub kv_cache_memory_bytes: OptionalCount,
    /// Exactly this many KV blocks of --block-size, whatever the memory would hold (as vLLM:
    /// over any other sizing flag); `None` or empty: sized from memory.
    #[arg(long, value_parser = optional_count, default_value = "None")]
    pub num_gpu_blocks_override: OptionalCount,
    #[arg(long, action = ArgAction::SetTrue)]
    pub disable_log_requests: bool,
    #[arg(long, action = ArgAction::SetTrue)]
    pub enable_log_requests: bool,
    #[arg(long, action = ArgAction::SetTrue)]
    pub disable_log_stats: bool,
    /// CORS: allowed origins, a JSON list as vLLM takes it (default: none, as vLLM 0.32:
    /// cross-origin browser access is off unless asked for; `'["*"]'` allows any).
    #[arg(long, default_value = "[]", value_parser = json_list)]
    pub allowed_origins: JsonList,
    /// CORS: allowed methods (JSON list).
    #[arg(long, default_value = r#"["*"]"#, value_parser = json_list)]
    pub allowed_methods: JsonList,
    /// CORS: allowed request headers (JSON list).
    #[arg(long, default_value = r#"["*"]"#, value_parser = json_list)]
    pub allowed_headers: JsonList,
    /// CORS: allow credentials.
    #[arg(long, action = ArgAction::SetTrue)]
    pub allow_credentials: bool,
    /// Let requests bring their own `chat_template` (refused otherwise, as vLLM).
    #[arg(long, action = ArgAction::SetTrue)]
    pub trust_request_chat_template: bool,
    /// `/load` counts the completion and chat requests in flight (else it reports 0).
    #[arg(long, action = ArgAction::SetTrue)]
    pub enable_server_load_tracking: bool,
    /// Serve `/tokenizer_info`.
    #[arg(long, action = ArgAction::SetTrue)]
    pub enable_tokenizer_info_endpoint: bool,
    /// `usage.prompt_tokens_details.cached_tokens`: prompt tokens found in the prefix cache.
    #[arg(long, action = ArgAction::SetTrue)]
    pub enable_prompt_tokens_details: bool,
    /// Streams end with a usage chunk even when `stream_options` did not ask for one.
    #[arg(long, action = ArgAction::SetTrue)]
    pub enable_force_include_usage: bool,
    /// Logprob tokens as `token_id:<id>` strings unless a request's
    /// `return_tokens_as_token_ids` says otherwise (tokens that are not valid UTF-8 alone
    /// stay identifiable).
    #[arg(long, action = ArgAction::SetTrue)]
    pub return_tokens_as_token_ids: bool,
    /// Tokens per streamed chunk, as vLLM: a choice's first and last chunks go out at once,
    /// the others once this many tokens have gathered. A request's `stream_interval` can
    /// raise it, not lower it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub stream_interval: u32,
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// `tool_choice` "auto" (the default when a request has tools): tool calls are read from
    /// the answer with --tool-call-parser.
    #[arg(long, action = ArgAction::SetTrue)]
    pub enable_auto_tool_choice: bool,
    /// How tool calls are read from answers: llama3_json (llama4_json), hermes or mistral.
    #[arg(long)]
    pub tool_call_parser: Option<String>,
    /// With `tool_choice: "none"` the tools are not given to the chat template.
    #[arg(long, action = ArgAction::SetTrue)]
    pub exclude_tools_when_tool_choice_none: bool,
    /// How far tool calls in `tool_choice: "auto"` answers are constrained (hermes and
    /// llama3_json parsers): `auto` (only for tools with `strict: true`), `function` (the
    /// call envelope always), `parameter` (also every tool's arguments to its schema).
    #[arg(long, default_value = "auto", value_parser = parse_strict_level)]
    pub tool_strict_level: crate::tools::tags::StrictLevel,
    /// `auto`: the model folder's generation_config.json sampling defaults apply to requests
    /// that leave them out (vLLM's default); `vllm`: neutral defaults; else a folder.
    #[arg(long, default_value = "auto")]
    pub generation_config: String,
    /// A JSON object of generation-config values merged on top (e.g. '{"temperature": 0.5}').
    #[arg(long)]
    pub override_generation_config: Option<String>,
    #[arg(long, default_value_t = sizing::DEFAULT_MAX_LOGPROBS)]
    pub max_logprobs: usize,
    #[arg(long)]
    pub revision: Option<String>,
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// cpu (candle), xla-cpu, tpu, cuda, or auto (tpu when libtpu and a TPU are present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Explicit PJRT plugin library for the XLA runner.
    #[arg(long)]
    pub pjrt_plugin: Option<PathBuf>,
    /// Seconds to finish in-flight requests after SIGTERM before exiting.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Largest request body accepted, bytes.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Seconds a connection may take to send a complete request head, counted from when it
    /// opens or from the end of its previous response; an idle keep-alive connection is closed
    /// after as long (vLLM's uvicorn closes idle ones after `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, 5 s).
    #[arg(long, env = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", default_value_t = 5.0, value_parser = positive_seconds)]
    pub timeout_keep_alive: f64,
    /// Seconds the whole request body may take to arrive after its head (else 408).
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    pub body_read_timeout: f64,
    /// Most requests allowed to wait beyond the `--max-num-seqs` that run; more get 503 with
    /// `Retry-After`, so a load balancer or client backs off instead of queueing without end
    /// (default: unbounded, as vLLM).
    #[arg(long)]
    pub max_waiting_requests: Option<usize>,
    /// Where the weights come from: `auto` (safetensors folder, else GGUF), `safetensors`,
    /// `gguf`, or `dummy` (config and tokenizer only, weights filled with small random values
    /// on the device: benchmark 8B / 70B shapes without a checkpoint). vLLM's other formats
    /// are refused by name.
    #[arg(long, default_value = "auto", value_parser = parse_load_format)]
    pub load_format: LoadFormat,
    /// The path prefix a proxy serves the API under (uvicorn's root_path): requests may come
    /// with or without it.
    #[arg(long)]
    pub root_path: Option<String>,
    /// The role of chat answers after a generation prompt.
    #[arg(long, default_value = "assistant")]
    pub response_role: String,
    /// Chat template variables (a JSON object) every chat gets under its own
    /// `chat_template_kwargs`, e.g. '{"enable_thinking": false}'.
    #[arg(long, value_parser = json_object)]
    pub default_chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Structured-output settings for every request (a JSON object, vLLM's
    /// `StructuredOutputsConfig`): `backend`, `disable_any_whitespace`,
    /// `disable_additional_properties`, `disable_fallback`. llguidance serves every backend.
    #[arg(long, value_parser = json_object)]
    pub structured_outputs_config: Option<serde_json::Map<String, serde_json::Value>>,
    /// `--hf-token`: the Hugging Face token for downloads (alone: the stored login token,
    /// which is already the default).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub hf_token: Option<String>,
    /// Serve HTTPS with this private key (PEM; with --ssl-certfile).
    #[arg(long)]
    pub ssl_keyfile: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM; with --ssl-keyfile).
    #[arg(long)]
    pub ssl_certfile: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against.
    #[arg(long)]
    pub ssl_ca_certs: Option<PathBuf>,
    /// Client certificates, as Python's ssl module numbers it: 0 not asked for, 1 optional
    /// (verified when sent), 2 required.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub ssl_cert_reqs: u8,
    /// The vLLM flags of `vllm_flags::VLLM_FLAGS` given on the command line (filled by `main`
    /// from the parsed matches).
    #[arg(skip)]
    pub vllm_given: Vec<crate::vllm_flags::Given>,
}

impl ServeArgs {
    pub fn model_arg(&self) -> Option<&str> {
        self.model.as_deref().or(self.model_tag.as_deref())
    }

    /// The scheduler's `split_bursts`: on the host runner without `--max-num-prefill-tokens`,
    /// halves of at least 256 tokens, so that a step's fixed cost (weights streamed once more,
    /// thread start-ups: ~4 ms on SmolLM2) stays under ~5 % of the work split off. The host
    /// runner's cost per token is flat from ~100 rows a step; XLA runners pad steps to
    /// buckets, so there (and with the flag given, 0 included) bursts are not split.
    pub fn split_bursts(&self, host_runner: bool) -> Option<usize> {
        (host_runner && self.max_num_prefill_tokens.is_none()).then_some(256)
    }

    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }

    /// The `--quantization` tpuserve applies (int8), or none (absent, or a vLLM method it
    /// does not have: that one is `ignored`, the line to log).
    pub fn quantization(&self) -> (Quantization, Option<String>) {
        let Some(v) = &self.quantization else {
            return (Quantization::None, None);
        };
        match Quantization::from_flag(v) {
            Some(q) => (q, None),
            None => {
                let given = crate::vllm_flags::Given {
                    flag: "--quantization".into(),
                    value: Some(v.clone()),
                    refused: false,
                    reason: "tpuserve implements only int8 (weight-only, per-channel scales, \
                             XLA devices); other methods run the weights in the checkpoint's \
                             dtype (or --dtype)",
                    invalid: None,
                };
                (Quantization::None, Some(given.ignored_line()))
            }
        }
    }

    /// `--kv-cache-dtype`: what tpuserve stores the KV cache as, or a usage error naming the
    /// value (exit 2).
    pub fn kv_cache_dtype(&self) -> Result<KvCacheDtype, UsageError> {
        let Some(v) = &self.kv_cache_dtype else {
            return Ok(KvCacheDtype::Auto);
        };
        // A value vLLM's argparse does not take is its error, as for every vLLM flag.
        if let Some(why) =
            crate::vllm_flags::ValueType::Choices(Self::VLLM_KV_CACHE_DTYPES).check(v, false)
        {
            return Err(UsageError(format!("argument --kv-cache-dtype: {why}")));
        }
        KvCacheDtype::from_flag(v).ok_or_else(|| {
            UsageError(format!(
                "--kv-cache-dtype {v}: tpuserve stores the KV cache in the activations' dtype \
                 (auto) or as fp8 (fp8, fp8_e4m3, fp8_e5m2)"
            ))
        })
    }

    /// `--quantization int8` on the CPU runner: a usage error naming the flag (the CPU runner
    /// runs GGUF blocks in place, or float32; it has no int8 path of this kind).
    pub fn check_quantization_on_cpu(&self) -> Result<(), UsageError> {
        if self.quantization().0.is_int8() {
            return Err(UsageError(
                "--quantization int8 needs an XLA device (--device xla-cpu, tpu or cuda); the \
                 CPU runner keeps GGUF blocks in place (--dtype auto) or runs float32"
                    .into(),
            ));
        }
        Ok(())
    }

    /// vLLM 0.32's `--kv-cache-dtype` choices.
    const VLLM_KV_CACHE_DTYPES: &[&str] = &[
        "auto",
        "float16",
        "bfloat16",
        "fp8",
        "fp8_e4m3",
        "fp8_e5m2",
        "fp8_inc",
        "fp8_ds_mla",
        "nvfp4_ds_mla",
        "turboquant_k8v4",
        "turboquant_4bit_nc",
        "turboquant_k3v4_nc",
        "turboquant_3bit_nc",
        "ultraquant_4bit",
        "int4_per_token_head",
        "int8_per_token_head",
        "fp8_per_token_head",
        "nvfp4",
        "nvfp4_4over6",
    ];

    /// The size flags that need no model: each bad value is a usage error naming its flag
    /// (checked before anything loads; a block size of 0 would divide by zero later).
    pub fn check_sizes(&self) -> Result<(), UsageError> {
        let bad = |m: String| Err(UsageError(m));
        if self.block_size == 0 {
            return bad("--block-size must be at least 1, got 0".into());
        }
        if self.max_num_seqs == 0 {
            return bad("--max-num-seqs must be at least 1, got 0".into());
        }
        self.kv_size()?;
        if let Some(b) = self.max_num_batched_tokens {
            if b < self.max_num_seqs {
                // As vLLM's SchedulerConfig: otherwise sequences at the back of a full batch
                // could wait for budget step after step.
                return bad(format!(
                    "--max-num-batched-tokens ({b}) must be greater than or equal to \
                     --max-num-seqs ({})",
                    self.max_num_seqs
                ));
            }
        }
        if !matches!(
            self.dtype.as_str(),
            "auto"
                | "float32"
                | "float"
                | "fp32"
                | "bfloat16"
                | "bf16"
                | "float16"
                | "half"
                | "fp16"
        ) {
            return bad(format!(
                "--dtype {}: expected auto, float32, bfloat16 or float16",
                self.dtype
            ));
        }
        if let Some(ModelLen::Tokens(0 | 1)) = self.max_model_len {
            return bad("--max-model-len must be at least 2".into());
        }
        Ok(())
    }

    /// The vLLM flags tpuserve refuses (the first one given is the error), then the TLS
    /// flags' pairing; applies `--hf-token` (before any download).
    pub fn check_vllm_flags(&self) -> Result<(), UsageError> {
        // argparse converts every value before anything else looks at them.
        if let Some(line) = self.vllm_given.iter().find_map(|g| g.invalid_line()) {
            return Err(UsageError(line));
        }
        if let Some(g) = self.vllm_given.iter().find(|g| g.refused) {
            return Err(UsageError(g.refused_line()));
        }
        self.kv_cache_dtype()?;
        if self.device == "cpu" {
            self.check_quantization_on_cpu()?;
        }
        if let Some(p) = &self.tool_call_parser {
            if !crate::tools::PARSERS.contains(&p.as_str()) {
                return Err(UsageError(
                    crate::tools::ParserError::Unsupported(p.clone()).to_string(),
                ));
            }
        }
        if let Some(c) = &self.structured_outputs_config {
            crate::structured::ServerDefaults::from_config(c).map_err(UsageError)?;
        }
        if self.enable_auto_tool_choice && self.tool_call_parser.is_none() {
            return Err(UsageError(
                "--enable-auto-tool-choice requires --tool-call-parser".into(),
            ));
        }
        if self.ssl_keyfile.is_some() != self.ssl_certfile.is_some() {
            return Err(UsageError(
                "--ssl-keyfile and --ssl-certfile must be given together".into(),
            ));
        }
        if self.ssl_keyfile.is_some() && self.ssl_cert_reqs > 0 && self.ssl_ca_certs.is_none() {
            // Python's ssl would then reject every client certificate (no trust anchors).
            return Err(UsageError(format!(
                "--ssl-cert-reqs {} needs --ssl-ca-certs (the CAs client certificates are \
                 verified against)",
                self.ssl_cert_reqs
            )));
        }
        if let Some(token) = self
            .hf_token
            .as_deref()
            .filter(|t| *t != "true" && !t.is_empty())
        {
            // As vLLM passes it to huggingface_hub; set before the runtime starts (one
            // thread), read by tpuserve-hub when it resolves the model.
            std::env::set_var("HF_TOKEN", token);
        }
        Ok(())
    }

    /// `--max-num-batched-tokens`, else the backend's default (see `sizing`).
    pub fn batched_tokens(&self, xla: bool) -> usize {
        sizing::max_num_batched_tokens(self.max_num_batched_tokens, xla, self.max_num_seqs)
    }

    /// The KV cache size the flags ask for, if not the memory share: `--num-gpu-blocks-override`
    /// over `--kv-cache-memory-bytes` (as vLLM), each at least one block.
    pub fn kv_size(&self) -> Result<Option<KvSize>, UsageError> {
        KvSize::from_flags(self.num_gpu_blocks_override.0, self.kv_cache_memory_bytes.0)
    }

    /// `--max-model-len` against the model's own maximum context (from its config).
    pub fn check_model_len(&self, model_max: usize) -> Result<usize, UsageError> {
        match self.max_model_len {
            None | Some(ModelLen::Auto) => Ok(model_max),
            Some(ModelLen::Tokens(m)) if m > model_max => Err(UsageError(format!(
                "--max-model-len {m} is larger than the model's maximum context ({model_max})"
            ))),
            Some(ModelLen::Tokens(m)) => Ok(m),
        }
    }
}

/// An optional count as vLLM's `optional_type(int)` / `human_readable_int` takes it: `None`
/// or an empty value is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OptionalCount(pub Option<usize>);

fn optional_count(s: &str) -> Result<OptionalCount, String> {
    let t = s.trim();
    if t.is_empty() || t == "None" {
        return Ok(OptionalCount(None));
    }
    human_readable_int(t).map(|n| OptionalCount(Some(n)))
}

/// A KV cache size chosen on the command line rather than from the memory share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSize {
    /// `--num-gpu-blocks-override`.
    Blocks(usize),
    /// `--kv-cache-memory-bytes`: each device's share of the cache.
    BytesPerDevice(u64),
}

impl KvSize {
    /// The size `--num-gpu-blocks-override` and `--kv-cache-memory-bytes` ask for (`serve`
    /// and `plan` alike): the block count wins over the bytes, as in vLLM; zero of either
    /// is refused.
    pub fn from_flags(
        blocks: Option<usize>,
        bytes_per_device: Option<usize>,
    ) -> Result<Option<KvSize>, UsageError> {
        let size = match (blocks, bytes_per_device) {
            (Some(n), _) => Some(KvSize::Blocks(n)),
            (None, Some(b)) => Some(KvSize::BytesPerDevice(b as u64)),
            (None, None) => None,
        };
        match size {
            Some(KvSize::Blocks(0)) => Err(UsageError(
                "--num-gpu-blocks-override must be at least 1".into(),
            )),
            Some(KvSize::BytesPerDevice(0)) => Err(UsageError(
                "--kv-cache-memory-bytes must be positive".into(),
            )),
            _ => Ok(size),
        }
    }

    /// Blocks of `block_size` tokens, at `bytes_per_token` per device (at least one).
    pub fn blocks(self, bytes_per_token: usize, block_size: usize) -> usize {
        match self {
            KvSize::Blocks(n) => n,
            KvSize::BytesPerDevice(b) => {
                ((b / (bytes_per_token * block_size).max(1) as u64) as usize).max(1)
            }
        }
    }

    /// The flag it came from, for log lines.
    pub fn flag(self) -> &'static str {
        match self {
            KvSize::Blocks(_) => "--num-gpu-blocks-override",
            KvSize::BytesPerDevice(_) => "--kv-cache-memory-bytes",
        }
    }
}

/// A command line that cannot work: `main` prints it as one line and exits 2, as a flag
/// parse error does.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A flag holding a JSON list of strings (vLLM parses these with `json.loads`); one flag
/// value, so a newtype (clap would read a bare `Vec` field as repeated values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonList(pub Vec<String>);

fn json_list(s: &str) -> Result<JsonList, String> {
    serde_json::from_str(s)
        .map(JsonList)
        .map_err(|e| format!("expected a JSON list of strings: {e}"))
}

fn json_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    serde_json::from_str(s).map_err(|e| format!("expected a JSON object: {e}"))
}

fn parse_load_format(s: &str) -> Result<LoadFormat, String> {
    s.parse()
}

/// A duration flag in seconds: finite and above zero (a zero timeout would refuse everything).
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        Ok(_) => Err(format!(
            "{s} is not between 0 (exclusive) and 86400 seconds"
        )),
        Err(e) => Err(format!("{s}: {e}")),
    }
}

/// `--max-model-len`: a number of tokens, or the model's own maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelLen {
    Auto,
    Tokens(usize),
}

fn parse_model_len(s: &str) -> Result<ModelLen, String> {
    let t = s.trim();
    if t == "-1" || t.eq_ignore_ascii_case("auto") {
        return Ok(ModelLen::Auto);
    }
    human_readable_int(t).map(ModelLen::Tokens)
}

/// vLLM's human-readable integers: `25.6k` = 25 600 (k, m, g, t: powers of 1000, decimals
/// allowed), `1K` = 1024 (K, M, G, T: powers of 1024, whole numbers only), else a plain integer.
pub fn human_readable_int(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let Some(last) = t.chars().last() else {
        return Err("expected an integer".into());
    };
    let (num, mult, decimal) = match last {
        'k' => (&t[..t.len() - 1], 1e3, true),
        'm' => (&t[..t.len() - 1], 1e6, true),
        'g' => (&t[..t.len() - 1], 1e9, true),
        't' => (&t[..t.len() - 1], 1e12, true),
        'K' => (&t[..t.len() - 1], 1024f64, false),
        'M' => (&t[..t.len() - 1], (1u64 << 20) as f64, false),
        'G' => (&t[..t.len() - 1], (1u64 << 30) as f64, false),
        'T' => (&t[..t.len() - 1], (1u64 << 40) as f64, false),
        _ => return t.parse::<usize>().map_err(|e| format!("{t}: {e}")),
    };
    let plain = !num.is_empty() && num.chars().all(|c| c.is_ascii_digit());
    let dec = num.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.chars().all(|c| c.is_ascii_digit())
            && b.chars().all(|c| c.is_ascii_digit())
    });
    if !(plain || (decimal && dec)) {
        return Err(format!("{t}: not a number like 8k, 25.6k or 8K"));
    }
    let v: f64 = num.parse().map_err(|e| format!("{t}: {e}"))?;
    let v = (v * mult).floor();
    if !(0.0..=usize::MAX as f64).contains(&v) {
        return Err(format!("{t}: out of range"));
    }
    Ok(v as usize)
}

fn parse_strict_level(s: &str) -> Result<crate::tools::tags::StrictLevel, String> {
    crate::tools::tags::StrictLevel::parse(s).ok_or_else(|| {
        format!(
            "Unknown tool strict level '{s}'; expected one of {}.",
            crate::tools::tags::StrictLevel::NAMES.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_readable_ints_as_vllm() {
        assert_eq!(human_readable_int("1k"), Ok(1000));
        assert_eq!(human_readable_int("1K"), Ok(1024));
        assert_eq!(human_readable_int("25.6k"), Ok(25_600));
        assert_eq!(human_readable_int("4096"), Ok(4096));
        assert!(human_readable_int("1.5K").is_err());
        assert!(human_readable_int("k").is_err());
        assert_eq!(parse_model_len("auto"), Ok(ModelLen::Auto));
        assert_eq!(parse_model_len("-1"), Ok(ModelLen::Auto));
        assert_eq!(parse_model_len("8K"), Ok(ModelLen::Tokens(8192)));
    }

    #[test]
    fn bursts_are_split_on_the_host_runner_unless_the_prefill_flag_is_given() {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        let args = |extra: &[&str]| {
            let argv = ["serve", "m.gguf"].iter().chain(extra).copied();
            <Serve as clap::Parser>::try_parse_from(argv).unwrap().args
        };
        assert_eq!(args(&[]).split_bursts(true), Some(256));
        assert_eq!(args(&[]).split_bursts(false), None);
        for flag in ["--max-num-prefill-tokens=0", "--max-num-prefill-tokens=192"] {
            assert_eq!(args(&[flag]).split_bursts(true), None, "{flag}");
        }
    }
}
