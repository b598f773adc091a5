//! Locating the XLA CPU PJRT plugin installed by `scripts/setup.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

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
///    `<dir>/*/pjrt_c_api_cpu_plugin.so`, for each site-packages directory that `python3`
///    reports (the package is not imported). `$PYTHON` selects another interpreter.
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
    let dirs = python_site_dirs();
    dirs.iter()
        .map(|d| d.join(CPU_PLUGIN_PACKAGE_DIR).join(CPU_PLUGIN_FILE))
        .find(|p| p.is_file())
        .or_else(|| dirs.iter().find_map(|d| scan_one_level(d)))
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

/// site-packages directories of the Python interpreter (`$PYTHON` or `python3`), asked without
/// importing anything but `site` and `sysconfig`.
/// The site-packages directories `python3` (or `$PYTHON`) reports, without importing anything.
pub fn python_site_dirs() -> Vec<PathBuf> {
    const SCRIPT: &str = "import site, sysconfig\n\
        dirs = list(site.getsitepackages())\n\
        dirs.append(site.getusersitepackages())\n\
        paths = sysconfig.get_paths()\n\
        dirs += [paths.get('purelib', ''), paths.get('platlib', '')]\n\
        print('\\n'.join(d for d in dirs if d))\n";
    let python = std::env::var_os("PYTHON")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "python3".into());
    let output = match Command::new(&python).arg("-c").arg(SCRIPT).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            tracing::debug!(
                "{:?} failed listing site-packages: {}",
                python,
                String::from_utf8_lossy(&o.stderr)
            );
            return Vec::new();
        }
        Err(e) => {
            tracing::debug!("cannot run {python:?}: {e}");
            return Vec::new();
        }
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let dir = PathBuf::from(line.trim());
        if !line.trim().is_empty() && !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}
