//! Locating the XLA CPU PJRT plugin installed by `scripts/setup.sh`.

use std::path::{Path, PathBuf};

/// Environment variable that overrides [`find_cpu_plugin`].
pub const CPU_PLUGIN_ENV: &str = "TPUSERVE_PJRT_CPU_PLUGIN";

/// File name of the XLA CPU plugin.
pub const CPU_PLUGIN_FILE: &str = "pjrt_c_api_cpu_plugin.so";

/// Python package (installed by `scripts/setup.sh`) that ships the CPU plugin.
pub const CPU_PLUGIN_PACKAGE_DIR: &str = "lammps_jax_pjrt_cpu";

/// Finds the XLA CPU PJRT plugin.
///
/// 1. `$TPUSERVE_PJRT_CPU_PLUGIN`, if set and non-empty: that path if it is a file, else `None`
///    (an explicit override is never silently replaced by another plugin).
/// 2. `<dir>/lammps_jax_pjrt_cpu/pjrt_c_api_cpu_plugin.so`, then any
///    `<dir>/*/pjrt_c_api_cpu_plugin.so`, for each site-packages folder of the project venv
///    `scripts/setup.sh` installs into, `$PYTHON` and `python3` (see `tpuserve_pyenv`; no
///    package is imported).
pub fn find_cpu_plugin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CPU_PLUGIN_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Some(path);
        }
        tracing::warn!(
            "{CPU_PLUGIN_ENV}={} is not a file; not searching elsewhere",
            path.display()
        );
        return None;
    }
    tpuserve_pyenv::find_with(|dir| {
        let packaged = dir.join(CPU_PLUGIN_PACKAGE_DIR).join(CPU_PLUGIN_FILE);
        if packaged.is_file() {
            Some(packaged)
        } else {
            scan_one_level(dir)
        }
    })
}

fn scan_one_level(dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(CPU_PLUGIN_FILE))
        .filter(|p| p.is_file())
        .collect();
    candidates.sort();
    candidates.into_iter().next()
}
