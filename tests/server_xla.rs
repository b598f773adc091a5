//! The HTTP server on the XLA runner: the golden completion through `--device xla-cpu`,
//! tensor parallel 8 on 8 XLA CPU devices end to end with no compilation after warm-up
//! (VLLM_XLA_CHECK_RECOMPILATION=1 makes one fatal), and a clear start-up error for a TPU
//! that is not there.

use std::process::Command;

use serde_json::json;
use tpuserve_suite::goldens::Goldens;
use tpuserve_suite::server::{free_port, metric, tpuserve_bin, Server};
use tpuserve_suite::{fixtures_dir, shared_xla_cache, tiny_llama3_dir};

/// A small server: short contexts, small steps, few sequences, no logprobs.
const SMALL: [&str; 8] = [
    "--max-model-len",
    "256",
    "--max-num-batched-tokens",
    "32",
    "--max-num-seqs",
    "4",
    "--max-logprobs",
    "0",
];

fn spawn_xla(model: &str, extra: &[&str]) -> Server {
    let port = free_port();
    let mut args: Vec<String> = [
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--device",
        "xla-cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let cache = shared_xla_cache();
    Server::spawn(
        &args,
        &[
            ("VLLM_XLA_CACHE_PATH", cache.to_str().unwrap()),
            ("VLLM_XLA_CHECK_RECOMPILATION", "1"),
        ],
        port,
    )
}

fn check_golden_cases(s: &Server, goldens: &str, names: &[&str]) {
    let g = Goldens::load(&fixtures_dir().join(goldens));
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            let c = g.case(n);
            let body = json!({"prompt": c.prompt_token_ids, "max_tokens": c.completion_token_ids.len(),
                "temperature": 0, "ignore_eos": true, "skip_special_tokens": false, "logprobs": 1});
            let (url, client) = (s.url("/v1/completions"), s.client.clone());
            std::thread::spawn(move || client.post(url).json(&body).send().unwrap().json::<serde_json::Value>().unwrap())
        })
        .collect();
    for (n, h) in names.iter().zip(handles) {
        let c = g.case(n);
        let v = h.join().unwrap();
        assert_eq!(v["choices"][0]["text"], c.completion_text, "{n}: {v}");
        assert_eq!(
            v["usage"]["completion_tokens"],
            c.completion_token_ids.len(),
            "{n}"
        );
        let lps = v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        for (lp, step) in lps.iter().zip(&c.steps) {
            assert!(
                (lp.as_f64().unwrap() - step.logprob).abs() < 1e-3,
                "{n}: {lp} vs {}",
                step.logprob
            );
        }
    }
}

#[test]
fn smollm2_golden_completions_on_xla_cpu() {
    let s = spawn_xla(
        tpuserve_suite::smollm2_gguf().to_str().unwrap(),
        &[
            "--max-model-len",
            "512",
            "--max-num-batched-tokens",
            "64",
            "--max-num-seqs",
            "16",
            "--max-logprobs",
            "5",
            "--kv-cache-space",
            "0.25",
        ],
    );
    check_golden_cases(
        &s,
        "smollm2/goldens.json",
        &["short_english", "code_python", "numbers_list"],
    );
    assert!(s.log().contains("programs ready"), "warm-up is logged");
    // Compile events are exported: every warmed-up program was compiled or loaded from the
    // cache, and none was compiled afterwards.
    let programs: f64 = regex::Regex::new(r"(\d+) programs ready")
        .unwrap()
        .captures(&s.log())
        .unwrap()[1]
        .parse()
        .unwrap();
    let m = s.metrics();
    let compiled = metric(&m, "tpuserve:xla_compilations_total", &[]);
    let loaded = metric(&m, "tpuserve:xla_compile_cache_hits_total", &[]);
    assert_eq!(compiled + loaded, programs, "{m}");
    assert_eq!(
        metric(&m, "tpuserve:xla_compile_cache_misses_total", &[]),
        compiled
    );
    assert_eq!(
        metric(&m, "tpuserve:xla_compilations_after_warmup_total", &[]),
        0.0
    );
    assert!(m.contains("# TYPE tpuserve:xla_compile_seconds_total counter"));

    // Filters run on device; penalties are refused up front with the parameter's name, and a
    // batch-mate of the refused request is unaffected.
    let v = s.post_ok(
        "/v1/completions",
        &serde_json::json!({"prompt": "Once upon a time", "max_tokens": 8,
                "temperature": 0.9, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "seed": 7}),
    );
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
    let (status, e) = s.post(
        "/v1/completions",
        &serde_json::json!({"prompt": "Once upon a time", "max_tokens": 8,
                "presence_penalty": 0.5}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "presence_penalty", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("XLA"),
        "{e}"
    );
    // The device sampler returns the top alternatives only: explicit ids are refused.
    let (status, e) = s.post(
        "/v1/completions",
        &serde_json::json!({"prompt": "Once upon a time", "max_tokens": 2, "logprobs": 1,
                "logprob_token_ids": [5]}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "logprob_token_ids", "{e}");
}

#[test]
fn tiny_llama3_tensor_parallel_8_over_http() {
    // 320 KV blocks, as in tests/xla_tp.rs, so the compiled programs are shared via the cache.
    let s = spawn_xla(
        tiny_llama3_dir().to_str().unwrap(),
        &[
            "--tensor-parallel-size",
            "8",
            "--max-model-len",
            "2304",
            "--max-num-batched-tokens",
            "64",
            "--max-num-seqs",
            "16",
            "--max-logprobs",
            "5",
            "--kv-cache-space",
            "0.0048828125",
            // vLLM's own kernel names are logged as ignored.
            "--attention-backend",
            "FLASH_ATTN",
        ],
    );
    assert!(s.log().contains("8 device(s)"), "{}", s.log_tail(20));
    let log = s.log();
    assert!(
        log.contains("--attention-backend FLASH_ATTN ignored: a vLLM kernel name")
            && log.contains("attention: StableHLO (--attention-backend auto"),
        "{}",
        s.log_tail(40)
    );
    check_golden_cases(
        &s,
        "tiny-llama3/goldens.json",
        &[
            "single_token",
            "short_english",
            "chat_multi_turn",
            "long_paragraph",
            "numbers",
        ],
    );
    assert!(
        !s.log().contains("after warm-up"),
        "no compilation after warm-up"
    );
}

#[test]
fn tpu_device_without_libtpu_is_a_clear_error() {
    let serve_tpu = || {
        let mut c = Command::new(tpuserve_bin());
        c.args([
            "serve",
            "--device",
            "tpu",
            "--port",
            &free_port().to_string(),
        ]);
        c
    };
    let out = serve_tpu()
        .env("TPU_LIBRARY_PATH", "/nonexistent/libtpu.so")
        .env("PYTHON", "/bin/false")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("libtpu not found") && err.contains("TPU_LIBRARY_PATH"),
        "{err}"
    );
    // libtpu itself present (scripts/setup.sh --test installs it) but no TPU chips: refused
    // before libtpu starts, which would query the cloud metadata server for minutes.
    let t = std::time::Instant::now();
    let out = serve_tpu().env_remove("TPU_LIBRARY_PATH").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no TPU chips on this machine") && err.contains("plan --cost"),
        "{err}"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(30), "{err}");
}

/// Two pods starting together on one bucket: both servers compile into the same empty
/// `VLLM_XLA_CACHE_PATH` at once, both serve, and a third start loads every program from what
/// they left (no entry torn or half-written).
#[test]
fn fresh_cache_two_servers_fill_one_compile_cache_at_once() {
    let cache = tempfile::tempdir().unwrap();
    let model = tiny_llama3_dir();
    let start = |cache: &std::path::Path| {
        let port = free_port();
        let args: Vec<String> = [
            "serve",
            model.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--device",
            "xla-cpu",
            "--max-model-len",
            "64",
            "--max-num-batched-tokens",
            "16",
            "--max-num-seqs",
            "4",
            "--max-logprobs",
            "0",
            "--kv-cache-space",
            "0.05",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Server::spawn(
            &args,
            &[("VLLM_XLA_CACHE_PATH", cache.to_str().unwrap())],
            port,
        )
    };
    let complete = |s: &Server| {
        let v = s.post_ok(
            "/v1/completions",
            &json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
        );
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    // Each server lives and dies on the thread that spawned it (see `Server::spawn`).
    let (a, b) = std::thread::scope(|sc| {
        let runs: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    let s = start(cache.path());
                    (complete(&s), s.log())
                })
            })
            .collect();
        let mut out = runs.into_iter().map(|h| h.join().unwrap());
        (out.next().unwrap(), out.next().unwrap())
    });
    assert_eq!(a.0, b.0, "both servers answer alike");
    for log in [&a.1, &b.1] {
        assert!(log.contains("programs ready"), "{log}");
    }
    let third = start(cache.path());
    let log = third.log();
    let ready =
        regex::Regex::new(r"(\d+) programs ready in [0-9.]+s \((\d+) compiled, (\d+) from cache\)")
            .unwrap();
    let c = ready.captures(&log).unwrap_or_else(|| panic!("{log}"));
    assert_eq!(&c[2], "0", "third start compiles nothing:\n{log}");
    assert_eq!(c[1], c[3]);
    assert_eq!(complete(&third), a.0);
    let leftovers: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp") || n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// `--load-format dummy` (vLLM's): a folder with `config.json` and the tokenizer but no
/// weights starts and serves, at TP 1 and 8, with the weights filled on the devices; without
/// the flag the same folder fails naming the missing file; vLLM formats tpuserve does not
/// read are refused by name with exit 2.
#[test]
fn load_format_dummy_serves_a_config_folder_at_tp_1_and_8() {
    let dir = config_folder();
    let folder = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| {
        Command::new(tpuserve_bin())
            .args(["serve", folder, "--device", "xla-cpu", "--port", "1"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("model.safetensors"),
        "{err}"
    );
    let out = run(&["--load-format", "pt"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("load format `pt` is not supported"), "{err}");

    let mut texts = Vec::new();
    for tp in ["1", "8"] {
        let s = spawn_xla(
            folder,
            &[
                "--load-format",
                "dummy",
                "--tensor-parallel-size",
                tp,
                "--max-model-len",
                "128",
                "--max-num-batched-tokens",
                "32",
                "--max-num-seqs",
                "4",
                "--kv-cache-space",
                "0.01",
            ],
        );
        let v = s.post_ok(
            "/v1/completions",
            &json!({"prompt": "Hello there", "max_tokens": 5, "ignore_eos": true, "temperature": 0}),
        );
        assert_eq!(v["usage"]["completion_tokens"], 5, "tp {tp}: {v}");
        let log = s.log();
        assert!(
            log.contains("weights (dummy weights (--load-format dummy)) on"),
            "tp {tp}: {log}"
        );
        assert!(
            log.contains(&format!("on {tp} device(s)")),
            "tp {tp}: {log}"
        );
        texts.push(v["choices"][0]["text"].clone());
    }
    // Each value is a function of its element's index in the whole tensor, so the shards the
    // eight devices fill make up the same weights as one device: the same greedy text.
    assert_eq!(texts[0], texts[1]);
}

/// `--quantization int8` (here spelled as vLLM's `-q int8`) serves on an XLA device: a golden
/// case whose top-1 / top-2 gap is at least 0.1 at every step comes back whole, and the log
/// says what was quantised. `--load-format dummy` fills int8 weights and their scales on the
/// devices at TP 2. On the CPU runner the flag is a usage error naming it (exit 2), before
/// anything loads.
#[test]
fn quantization_int8_serves_on_xla_and_is_refused_on_cpu() {
    let out = Command::new(tpuserve_bin())
        .args([
            "serve",
            "/nonexistent",
            "--device",
            "cpu",
            "--quantization",
            "int8",
        ])
        .args(["--port", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--quantization int8 needs an XLA device"),
        "{err}"
    );

    let g = Goldens::load(&fixtures_dir().join("smollm2/goldens.json"));
    let c = g.case("single_token");
    assert!(c.min_margin_top1_top2 >= 0.1);
    let mut args = vec!["-q", "int8", "--kv-cache-space", "0.05"];
    args.extend(SMALL);
    let s = spawn_xla(tpuserve_suite::smollm2_gguf().to_str().unwrap(), &args);
    let v = s.post_ok(
        "/v1/completions",
        &json!({"prompt": c.prompt_token_ids, "max_tokens": c.completion_token_ids.len(),
            "temperature": 0, "ignore_eos": true, "skip_special_tokens": false}),
    );
    assert_eq!(v["choices"][0]["text"], c.completion_text, "{v}");
    let log = s.log();
    assert!(
        log.contains("projections and LM head quantised to int8 per output channel"),
        "{log}"
    );
    assert!(!log.contains("ignoring vLLM flag --quantization"), "{log}");
    drop(s);

    let dir = config_folder();
    let mut args = vec![
        "--load-format",
        "dummy",
        "--quantization",
        "int8",
        "--tensor-parallel-size",
        "2",
        "--kv-cache-space",
        "0.05",
    ];
    args.extend(SMALL);
    let s = spawn_xla(dir.path().to_str().unwrap(), &args);
    let v = s.post_ok(
        "/v1/completions",
        &json!({"prompt": "Hello there", "max_tokens": 5, "ignore_eos": true, "temperature": 0}),
    );
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
}

/// tiny-llama3's config and tokenizer files in a folder of their own, without weights.
fn config_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(tiny_llama3_dir().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// `--kv-cache-dtype fp8` (vLLM's flag): K and V stored as fp8 on XLA devices, so the same
/// `--kv-cache-space` holds twice the blocks of a bf16 cache, and requests complete; refused
/// (exit 2, naming the flag) for cache types tpuserve does not have, on either runner (the
/// CPU runner's fp8: `server_metrics::kv_cache_dtype_fp8_halves_the_cpu_cache`).
#[test]
fn kv_cache_dtype_fp8_serves_on_xla_and_unknown_types_are_refused() {
    for (device, value, want) in [
        (
            "cpu",
            "float16",
            "--kv-cache-dtype float16: tpuserve stores",
        ),
        (
            "xla-cpu",
            "float16",
            "--kv-cache-dtype float16: tpuserve stores",
        ),
        (
            "xla-cpu",
            "nvfp4",
            "--kv-cache-dtype nvfp4: tpuserve stores",
        ),
    ] {
        let out = Command::new(tpuserve_bin())
            .args(["serve", "/nonexistent", "--device", device])
            .args(["--kv-cache-dtype", value, "--port", "1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{device} {value}: {err}");
        assert!(err.contains(want), "{device} {value}: {err}");
    }
    let model = tiny_llama3_dir();
    let blocks = |kv: &str| -> (u64, String) {
        let mut args = vec!["--dtype", "bfloat16", "--kv-cache-dtype", kv];
        args.extend(["--kv-cache-space", "0.01"]);
        args.extend(SMALL);
        let s = spawn_xla(model.to_str().unwrap(), &args);
        let v = s.post_ok(
            "/v1/completions",
            &json!({"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0,
                "ignore_eos": true}),
        );
        assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        let log = s.log();
        let n = regex::Regex::new(r"KV cache: (\d+) blocks of 16 in (\w+)")
            .unwrap()
            .captures(&log)
            .unwrap_or_else(|| panic!("{log}"));
        (n[1].parse().unwrap(), n[2].to_string())
    };
    let (bf16, bf16_elem) = blocks("auto");
    let (fp8, fp8_elem) = blocks("fp8");
    assert_eq!(
        (bf16_elem.as_str(), fp8_elem.as_str()),
        ("bf16", "f8E4M3FN")
    );
    // One block is reserved on both sides.
    assert!(
        (fp8 + 1).abs_diff(2 * (bf16 + 1)) <= 1,
        "fp8 {fp8} blocks vs bf16 {bf16}"
    );
}
