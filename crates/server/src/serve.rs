//! `tpuserve serve`: load the model, build the runner and warm it up (every XLA program
//! compiled or loaded from the cache), start the engine, and only then open the port — the
//! GKE readiness probe is a TCP check. SIGTERM drains in-flight requests and exits 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tpuserve_engine::{EngineConfig, EngineCore, EngineHandle, TokenDecoder};
use tpuserve_model::{load_model_with, ChatTemplate, LoadedModel};
use tpuserve_runner_api::{sizing, ModelRunner};
use tpuserve_runner_cpu::{CpuRunner, CpuRunnerOptions, CpuWeights, Fp8};
use tpuserve_runner_xla::{
    AttentionBackend, DeviceKind, KvCacheDtype, WeightElem, XlaRunner, XlaRunnerOptions,
};

use crate::cli::ServeArgs;
use crate::metrics::{self, CacheInfo, Metrics};
use crate::state::{now_secs, AppState};
use crate::{app, fault_injection, http_server};

/// Where a model argument points, as vLLM resolves it: a local folder or `.gguf` file, or a
/// hub id (`org/name`, `--revision`) found in or downloaded into `--download-dir` (else the
/// standard Hugging Face cache) in the huggingface_hub layout. Blocking (downloads).
pub fn resolve_model(args: &ServeArgs) -> anyhow::Result<PathBuf> {
    let Some(m) = args.model_arg() else {
        return crate::generate::default_model();
    };
    let cfg = tpuserve_hub::HubConfig::from_env(args.download_dir.as_deref());
    Ok(tpuserve_hub::resolve_model(
        m,
        args.revision.as_deref(),
        &cfg,
    )?)
}

enum Backend {
    Cpu,
    Xla(DeviceKind),
}

/// Whether `serve` will run the host runner (which then tunes the allocator before any other
/// thread starts: `tpuserve_runner_cpu::keep_step_buffers`).
pub fn runs_on_host(args: &ServeArgs) -> bool {
    matches!(backend(args), Ok(Backend::Cpu))
}

fn backend(args: &ServeArgs) -> anyhow::Result<Backend> {
    Ok(match args.device.as_str() {
        "cpu" => Backend::Cpu,
        "auto" => {
            if tpuserve_runner_xla::device::plugin_path(&DeviceKind::Tpu).is_ok()
                && tpuserve_runner_xla::device::tpu_chips_present()
            {
                Backend::Xla(DeviceKind::Tpu)
            } else if args.tensor_parallel_size > 1 {
                Backend::Xla(DeviceKind::XlaCpu)
            } else {
                Backend::Cpu
            }
        }
        other => Backend::Xla(other.parse().map_err(|e: String| anyhow::anyhow!(e))?),
    })
}

/// KV blocks for a cache of `bytes_per_elem` elements split over `tp` devices: the size
/// `--num-gpu-blocks-override` / `--kv-cache-memory-bytes` ask for, else `--kv-cache-space`
/// (the CPU runner's and the XLA CPU plugin's budget; accelerators size from their memory).
fn kv_blocks(
    model: &LoadedModel,
    args: &ServeArgs,
    bytes_per_elem: usize,
    tp: usize,
) -> anyhow::Result<usize> {
    let per_token = model.config.kv_bytes_per_token(bytes_per_elem);
    if let Some(size) = args.kv_size()? {
        let n = size.blocks(per_token / tp.max(1), args.block_size);
        tracing::info!(
            "KV cache: {n} blocks of {} tokens ({})",
            args.block_size,
            size.flag()
        );
        return Ok(n);
    }
    let budget = (args.kv_cache_space * (1u64 << 30) as f64) as u64;
    Ok(sizing::kv_blocks_in_budget(
        budget,
        per_token,
        args.block_size,
    ))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    for given in args.vllm_given.iter().filter(|g| !g.refused) {
        tracing::warn!("{}", given.ignored_line());
    }
    let (quantization, ignored) = args.quantization();
    if let Some(line) = ignored {
        tracing::warn!("{line}");
    }
    // Certificate files are read before the model loads: a bad one fails at once.
    let tls = match (&args.ssl_keyfile, &args.ssl_certfile) {
        (Some(keyfile), Some(certfile)) => Some(crate::tls::acceptor(&crate::tls::TlsFiles {
            keyfile,
            certfile,
            ca_certs: args.ssl_ca_certs.as_deref(),
            cert_reqs: args.ssl_cert_reqs,
        })?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let path = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || resolve_model(&args)).await??
    };
    // The config alone (no weights) settles the sizes that depend on the model.
    let model_max = crate::plan::read_config(&path)
        .with_context(|| format!("reading the config of {}", path.display()))?
        .max_position_embeddings;
    let max_model_len = args.check_model_len(model_max)?;
    let sampling_defaults = crate::generation_config::load(
        &path,
        &args.generation_config,
        args.override_generation_config.as_deref(),
    )?;
    tracing::info!("loading model from {}", path.display());
    let model = load_model_with(&path, args.load_format)
        .with_context(|| format!("loading {}", path.display()))?;
    let backend = backend(&args)?;
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        bail!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            args.gpu_memory_utilization
        );
    }
    let runner: Box<dyn ModelRunner> = match &backend {
        Backend::Cpu => {
            // `--device auto` may land here: the same usage error as `--device cpu`.
            args.check_quantization_on_cpu()?;
            // `auto`: the checkpoint's own form (GGUF blocks and bf16 in place); `bfloat16`:
            // every matrix as bf16; `float32`: every weight dequantised to f32, the
            // numerical reference.
            let weights = match args.dtype.as_str() {
                "float32" | "float" | "fp32" => CpuWeights::F32,
                "bfloat16" | "bf16" => CpuWeights::Bf16,
                "float16" | "half" | "fp16" => {
                    tracing::warn!(
                        "--dtype {}: the CPU runner has no float16 kernels; running bfloat16 \
                         weights (f32 activations) instead",
                        args.dtype
                    );
                    CpuWeights::Bf16
                }
                "auto" => CpuWeights::Native,
                other => bail!("unknown --dtype `{other}` (auto, float32, bfloat16, float16)"),
            };
            if args.tensor_parallel_size > 1 {
                bail!("--tensor-parallel-size > 1 needs an XLA device (--device xla-cpu, tpu or cuda)");
            }
            if args.attention_backend.is_some() || args.attention_kernels.is_some() {
                tracing::warn!(
                    "--attention-backend / --attention-kernels ignored: they choose the XLA \
                     runner's attention, and the CPU runner has its own"
                );
            }
            let kv_fp8 = match args.kv_cache_dtype()? {
                KvCacheDtype::Auto => None,
                KvCacheDtype::Fp8E4m3 => Some(Fp8::E4m3),
                KvCacheDtype::Fp8E5m2 => Some(Fp8::E5m2),
            };
            let num_blocks = kv_blocks(&model, &args, weights.kv_bytes(kv_fp8), 1)?;
            Box::new(CpuRunner::new(
                &model,
                CpuRunnerOptions {
                    num_blocks,
                    block_size: args.block_size,
                    weights,
                    kv_fp8,
                },
            )?)
        }
        Backend::Xla(kind) => {
            let weight_dtype = match (args.dtype.as_str(), kind) {
                ("float32" | "float" | "fp32", _) => WeightElem::F32,
                ("bfloat16" | "bf16" | "float16" | "half" | "fp16", _) => WeightElem::BF16,
                ("auto", DeviceKind::XlaCpu) => WeightElem::F32,
                ("auto", _) => WeightElem::BF16,
                (other, _) => bail!("unknown --dtype `{other}` (auto, float32, bfloat16, float16)"),
            };
            let kv_cache_dtype = args.kv_cache_dtype()?;
            // The runner sizes a device-memory cache by the same element.
            let elem_bytes = kv_cache_dtype.elem(weight_dtype.elem()).bytes();
            let cache_dir = std::env::var_os("VLLM_XLA_CACHE_PATH")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vllm/xla_cache"))
                });
            Box::new(XlaRunner::new(
                &model,
                XlaRunnerOptions {
                    device: kind.clone(),
                    plugin_path: args.pjrt_plugin.clone(),
                    tensor_parallel_size: args.tensor_parallel_size,
                    num_blocks: kv_blocks(&model, &args, elem_bytes, args.tensor_parallel_size)?,
                    block_size: args.block_size,
                    max_num_batched_tokens: args.batched_tokens(true),
                    max_num_seqs: args.max_num_seqs,
                    max_model_len,
                    max_logprobs: args.max_logprobs,
                    weight_dtype,
                    quantization,
                    kv_cache_dtype,
                    compile_cache_dir: cache_dir,
                    strict_no_recompile: std::env::var("VLLM_XLA_CHECK_RECOMPILATION")
                        .is_ok_and(|v| v == "1"),
                    // Accelerators size the cache from their memory, like vLLM; the XLA CPU
                    // plugin (no memory report) uses --kv-cache-space as the CPU runner does.
                    // --num-gpu-blocks-override / --kv-cache-memory-bytes size it instead.
                    kv_memory_utilization: (*kind != DeviceKind::XlaCpu
                        && args.kv_size()?.is_none())
                    .then_some(args.gpu_memory_utilization),
                    attention_backend: attention_backend(&args),
                    attention_kernels: args.attention_kernels.clone(),
                    ..Default::default()
                },
            )?)
        }
    };
    let runner: Box<dyn ModelRunner> = match std::env::var(fault_injection::ENV) {
        Ok(spec) if !spec.is_empty() => {
            let faults = fault_injection::parse(&spec).map_err(anyhow::Error::msg)?;
            tracing::warn!(
                "{}={spec}: these engine steps will fail on purpose (fault testing only)",
                fault_injection::ENV
            );
            Box::new(fault_injection::FaultyRunner::new(runner, faults))
        }
        _ => runner,
    };
    let kv = runner.kv_cache_shape();
    let runner_desc = runner.describe();
    let compile_counters = runner.compile_counters();
    let LoadedModel {
        tokenizer,
        chat_template,
        eos_token_ids,
        config,
        ..
    } = model;
    let (tokenizer, chat_template, tokenizer_dir) = match &args.tokenizer {
        Some(t) => {
            let (tok, tmpl, dir) = load_tokenizer(t, &args).await?;
            if tok.vocab_size() > config.vocab_size {
                return Err(crate::cli::UsageError(format!(
                    "--tokenizer {t}: its vocabulary ({}) is larger than the model's ({})",
                    tok.vocab_size(),
                    config.vocab_size
                ))
                .into());
            }
            tracing::info!("tokenizer from {}", dir.display());
            (tok, tmpl, dir)
        }
        None => (tokenizer, chat_template, path.clone()),
    };
    let tokenizer = Arc::new(tokenizer);
    // As vLLM, the parser exists only with auto tool choice on, and is checked against the
    // tokenizer at start-up (its marker tokens must be in the vocabulary).
    let tool_parser = match (&args.tool_call_parser, args.enable_auto_tool_choice) {
        (Some(name), true) => {
            let model = args
                .model_arg()
                .map_or_else(|| path.display().to_string(), str::to_string);
            let kind =
                crate::tools::ParserKind::new(name, &model, |t| tokenizer.token_to_id(t).is_some())
                    .map_err(|e| crate::cli::UsageError(e.to_string()))?;
            tracing::info!("\"auto\" tool choice has been enabled (--tool-call-parser {name})");
            Some(kind)
        }
        _ => None,
    };
    if args.tool_strict_level != crate::tools::tags::StrictLevel::Auto
        && !crate::tools::tags::level_applies(tool_parser)
    {
        tracing::warn!(
            "--tool-strict-level is ignored: it constrains the calls of the hermes and \
             llama3_json parsers with --enable-auto-tool-choice (vLLM's structural tags), and \
             {} (as in vLLM)",
            if tool_parser.is_some() {
                "this parser has none"
            } else {
                "no parser is enabled"
            }
        );
    }
    let chat_template = match &args.chat_template {
        Some(p) => {
            let src =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(ChatTemplate::new(
                &src,
                tokenizer.bos_token.as_deref().unwrap_or(""),
                tokenizer.eos_token.as_deref().unwrap_or(""),
            )?)
        }
        None => chat_template,
    };
    if kv.num_blocks * kv.block_size < max_model_len {
        tracing::warn!(
            "max_model_len {max_model_len} is more than the KV cache's {} tokens: a sequence \
             is limited to {} tokens",
            kv.num_blocks * kv.block_size,
            kv.num_blocks * kv.block_size
        );
    }
    let scheduling_policy = match args.scheduling_policy.as_str() {
        "priority" => tpuserve_engine::SchedulingPolicy::Priority,
        _ => tpuserve_engine::SchedulingPolicy::Fcfs,
    };
    let engine_cfg = EngineConfig {
        max_model_len: max_model_len.min(kv.num_blocks * kv.block_size),
        max_num_batched_tokens: args.batched_tokens(matches!(backend, Backend::Xla(_))),
        max_num_seqs: args.max_num_seqs,
        enable_prefix_caching: args.prefix_caching(),
        max_logprobs: args.max_logprobs,
        scheduling_policy,
        // 0 is no cap (the scheduler's reading).
        max_prefill_tokens: args.max_num_prefill_tokens,
        split_bursts: args.split_bursts(matches!(backend, Backend::Cpu)),
        seed: Some(args.seed),
    };
    let effective_len = engine_cfg.max_model_len;
    let decoder: Arc<dyn TokenDecoder> = tokenizer.clone();
    let beam_eos = eos_token_ids.clone();
    let mut core = EngineCore::new(runner, decoder, eos_token_ids, engine_cfg)?;
    let stats_rx = core.subscribe_stats();
    let stats_published = core.stats_published();
    let engine = EngineHandle::spawn(core)?;
    let served_model_names = if args.served_model_name.is_empty() {
        vec![args
            .model_arg()
            .map(str::to_string)
            .unwrap_or_else(|| "SmolLM2-135M-Instruct".into())]
    } else {
        args.served_model_name.clone()
    };
    let metrics = Metrics::new(
        &served_model_names[0],
        effective_len,
        &CacheInfo {
            block_size: kv.block_size,
            num_gpu_blocks: kv.num_blocks,
            gpu_memory_utilization: args.gpu_memory_utilization,
            enable_prefix_caching: args.prefix_caching(),
            // As given (vLLM's CacheConfig keeps the flag's string).
            cache_dtype: args.kv_cache_dtype.clone().unwrap_or_else(|| "auto".into()),
        },
        compile_counters,
    );
    metrics.follow_engine(stats_published);
    metrics::spawn_stats_consumer(metrics.clone(), stats_rx, !args.disable_log_stats);
    let tokenizer_info = args.enable_tokenizer_info_endpoint.then(|| {
        crate::tokenizer_info::build(
            &tokenizer_dir,
            &tokenizer,
            chat_template.as_ref().map(|t| t.source.as_str()),
        )
    });
    let so_defaults = match &args.structured_outputs_config {
        Some(c) => crate::structured::ServerDefaults::from_config(c).map_err(anyhow::Error::msg)?,
        None => Default::default(),
    };
    let grammars = crate::structured::Grammars::new(
        tokenizer.clone(),
        config.vocab_size,
        beam_eos.clone(),
        so_defaults,
    );
    grammars.warm_in_background();
    let state = Arc::new(AppState {
        grammars,
        engine,
        tokenizer,
        chat_template,
        served_model_names,
        model_root: path.display().to_string(),
        api_keys: args
            .api_key
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect(),
        log_requests: args.enable_log_requests && !args.disable_log_requests,
        created: now_secs(),
        metrics,
        in_flight: AtomicUsize::new(0),
        admission_limit: args
            .max_waiting_requests
            .map(|w| args.max_num_seqs.saturating_add(w)),
        draining: AtomicBool::new(false),
        server_load_tracking: args.enable_server_load_tracking,
        tokenizer_info,
        prompt_tokens_details: args.enable_prompt_tokens_details,
        force_include_usage: args.enable_force_include_usage,
        return_tokens_as_token_ids: args.return_tokens_as_token_ids,
        stream_interval: args.stream_interval as usize,
        priority_scheduling: scheduling_policy == tpuserve_engine::SchedulingPolicy::Priority,
        response_role: args.response_role.clone(),
        sampling_defaults,
        eos_token_ids: beam_eos,
        trust_request_chat_template: args.trust_request_chat_template,
        default_chat_template_kwargs: args.default_chat_template_kwargs.clone(),
        tool_parser,
        exclude_tools_when_tool_choice_none: args.exclude_tools_when_tool_choice_none,
        tool_strict_level: args.tool_strict_level,
    });
    let host = args.host.clone().unwrap_or_else(|| "0.0.0.0".into());
    let addr = format!("{host}:{}", args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    for (route, methods) in app::ROUTES {
        tracing::info!("Route: {route}, Methods: {methods}");
    }
    tracing::info!(
        "tpuserve {} ready on {scheme}://{addr} in {:.1}s: {} ({runner_desc}), max_model_len {effective_len}, KV cache {} blocks of {}",
        env!("CARGO_PKG_VERSION"),
        t0.elapsed().as_secs_f64(),
        state.served_name(),
        kv.num_blocks,
        kv.block_size
    );
    let router = app::router(
        state.clone(),
        app::BodyLimits {
            max_bytes: args.max_body_bytes,
            timeout: Duration::from_secs_f64(args.body_read_timeout),
        },
    );
    let cors = Arc::new(crate::cors::Cors {
        origins: args.allowed_origins.0.clone(),
        methods: args.allowed_methods.0.clone(),
        headers: args.allowed_headers.0.clone(),
        credentials: args.allow_credentials,
    });
    // Outermost, as vLLM's CORSMiddleware: errors (401, 404, 413) carry the headers too.
    let router = router.layer(axum::middleware::from_fn_with_state(
        cors,
        crate::cors::layer,
    ));
    let limits = http_server::ConnectionLimits {
        header_timeout: Duration::from_secs_f64(args.timeout_keep_alive),
        root_path: args
            .root_path
            .as_deref()
            .map(|p| p.trim_end_matches('/'))
            .filter(|p| !p.is_empty())
            .map(Arc::from),
        tls,
    };
    let drain_state = state.clone();
    let timeout = Duration::from_secs(args.shutdown_timeout);
    let server = http_server::serve(listener, router, limits, async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        drain_state.draining.store(true, Ordering::SeqCst);
    });
    let drained = tokio::spawn(server);
    // After the signal, give in-flight requests `timeout` to finish, then exit regardless.
    let watchdog = {
        let st = state.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if st.draining.load(Ordering::SeqCst) {
                    break;
                }
            }
            tokio::time::sleep(timeout).await;
            tracing::warn!(
                "shutdown timeout ({}s) reached with {} request(s) in flight",
                timeout.as_secs(),
                st.in_flight.load(Ordering::SeqCst)
            );
        }
    };
    tokio::select! {
        r = drained => { r??; }
        _ = watchdog => {}
    }
    tracing::info!("bye");
    Ok(())
}

/// `--tokenizer`: a folder (or hub id) with `tokenizer.json` and, optionally, a chat template
/// (`chat_template.jinja` or `tokenizer_config.json`'s), or a `tokenizer.json` file. Used
/// instead of the model's; `--chat-template` still wins.
async fn load_tokenizer(
    spec: &str,
    args: &ServeArgs,
) -> anyhow::Result<(tpuserve_model::Tokenizer, Option<ChatTemplate>, PathBuf)> {
    let local = PathBuf::from(spec);
    let path = if local.exists() {
        local
    } else {
        let cfg = tpuserve_hub::HubConfig::from_env(args.download_dir.as_deref());
        let spec = spec.to_string();
        tokio::task::spawn_blocking(move || tpuserve_hub::resolve_model(&spec, None, &cfg))
            .await??
    };
    let (file, dir) = if path.is_dir() {
        (path.join("tokenizer.json"), path.clone())
    } else {
        let dir = path.parent().map(PathBuf::from).unwrap_or_default();
        (path.clone(), dir)
    };
    let tok = tpuserve_model::Tokenizer::from_file(&file)
        .with_context(|| format!("--tokenizer {}", file.display()))?;
    let src = std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| {
            std::fs::read_to_string(dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .and_then(|v| tpuserve_model::chat_template::template_from_tokenizer_config(&v))
        });
    let tmpl = src
        .map(|s| {
            ChatTemplate::new(
                &s,
                tok.bos_token.as_deref().unwrap_or(""),
                tok.eos_token.as_deref().unwrap_or(""),
            )
        })
        .transpose()?;
    Ok((tok, tmpl, dir))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// `--attention-backend`: tpuserve's `auto` / `xla` / `pallas` (any case; vLLM's empty or
/// `None` is `auto`); vLLM's own backend names choose GPU / CPU kernels, logged as ignored.
fn attention_backend(args: &ServeArgs) -> AttentionBackend {
    let v = args.attention_backend.as_deref().unwrap_or("auto");
    let backend = match v.to_ascii_lowercase().as_str() {
        "auto" | "none" | "" => AttentionBackend::Auto,
        "xla" => AttentionBackend::Xla,
        "pallas" => AttentionBackend::Pallas,
        _ => {
            tracing::warn!(
                "--attention-backend {v} ignored: a vLLM kernel name; tpuserve runs the \
                 StableHLO attention or its Pallas kernel (auto, xla, pallas)"
            );
            AttentionBackend::Auto
        }
    };
    if backend == AttentionBackend::Xla && args.attention_kernels.is_some() {
        tracing::warn!(
            "--attention-kernels unused: --attention-backend xla runs the StableHLO attention"
        );
    }
    backend
}
