//! Which PJRT plugin to load for `--device`, and the client options each needs.

use std::path::PathBuf;

use tpuserve_pjrt::{find_cpu_plugin, NamedValue};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// Cloud TPU through libtpu.
    Tpu,
    /// NVIDIA GPU through the `jax-cuda*-pjrt` plugin.
    Cuda,
    /// The XLA CPU plugin (tests, CI, local work).
    XlaCpu,
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tpu" => Ok(DeviceKind::Tpu),
            "cuda" | "gpu" => Ok(DeviceKind::Cuda),
            "xla-cpu" => Ok(DeviceKind::XlaCpu),
            other => Err(format!("unknown XLA device `{other}` (tpu, cuda, xla-cpu)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PluginNotFound(pub String);

fn in_site_packages(relatives: &[&str]) -> Option<PathBuf> {
    tpuserve_pyenv::find_file(relatives)
}

/// The plugin library for a device kind.
pub fn plugin_path(kind: &DeviceKind) -> Result<PathBuf, PluginNotFound> {
    match kind {
        DeviceKind::XlaCpu => find_cpu_plugin().ok_or_else(|| {
            PluginNotFound(
                "XLA CPU PJRT plugin not found: run scripts/setup.sh (pip install --no-deps lammps-jax-pjrt-cpu==0.11.2) or set TPUSERVE_PJRT_CPU_PLUGIN".into(),
            )
        }),
        // A TPU_LIBRARY_PATH that names no file is an error, not a reason to load some other
        // libtpu found elsewhere.
        DeviceKind::Tpu => match std::env::var_os("TPU_LIBRARY_PATH").map(PathBuf::from) {
            Some(p) if p.is_file() => Ok(p),
            Some(p) => Err(PluginNotFound(format!(
                "libtpu not found: TPU_LIBRARY_PATH={} is not a file",
                p.display()
            ))),
            None => in_site_packages(&["libtpu/libtpu.so"]).ok_or_else(|| {
                PluginNotFound(
                    "libtpu not found: pip install libtpu, or set TPU_LIBRARY_PATH to libtpu.so".into(),
                )
            }),
        },
        DeviceKind::Cuda => in_site_packages(&[
            "jax_plugins/xla_cuda13/xla_cuda_plugin.so",
            "jax_plugins/xla_cuda12/xla_cuda_plugin.so",
        ])
        .ok_or_else(|| {
            PluginNotFound(
                "CUDA PJRT plugin not found: pip install jax-cuda13-pjrt (or jax-cuda12-pjrt), or pass --pjrt-plugin".into(),
            )
        }),
    }
}

/// Client-creation options for a device kind.
pub fn client_options(kind: &DeviceKind, devices_wanted: usize) -> Vec<(&'static str, NamedValue)> {
    match kind {
        DeviceKind::XlaCpu => vec![(
            "cpu_device_count",
            NamedValue::I64(devices_wanted.max(1) as i64),
        )],
        DeviceKind::Tpu | DeviceKind::Cuda => Vec::new(),
    }
}

/// Whether this machine has TPU chips attached (`/dev/accel*` on v2–v4, `/dev/vfio/<group>` on
/// v5e and later). Without them libtpu, loaded to run programs, spends minutes querying the
/// cloud metadata server; the runner refuses instead (compile-only work goes through
/// `tpuserve plan --cost`, which isolates libtpu from the network).
pub fn tpu_chips_present() -> bool {
    let accel = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("accel"))
        })
        .unwrap_or(false);
    let vfio = std::fs::read_dir("/dev/vfio")
        .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name() != "vfio"))
        .unwrap_or(false);
    accel || vfio
}
