//! Compiling without devices: a plugin's topology description (e.g. libtpu's `v6e:2x4` on a
//! machine with no TPU) and the unloaded executables `PJRT_Compile` makes for it, with the
//! compiler's own cost analysis and memory statistics. Nothing here runs a program.

use std::ptr;

use crate::api::{self, pjrt_call, Args};
use crate::compile_options::CompileOptions;
use crate::error::{Error, Result};
use crate::executable::{optimized_program_of, OptimizedProgram};
use crate::plugin::{named_values_from_c, named_values_to_c, NamedValue, Plugin};
use crate::sys;

/// A device topology the plugin can compile for, with or without those devices attached.
pub struct Topology {
    plugin: Plugin,
    raw: *mut sys::PJRT_TopologyDescription,
}

// SAFETY: the topology is immutable after creation and PJRT's functions on it are thread-safe.
unsafe impl Send for Topology {}
// SAFETY: see `Send`.
unsafe impl Sync for Topology {}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut args = sys::PJRT_TopologyDescription_Destroy_Args::new();
        args.topology = self.raw;
        // SAFETY: owned, live, destroyed once.
        if let Err(e) = unsafe {
            pjrt_call!(
                self.plugin.api(),
                PJRT_TopologyDescription_Destroy,
                &mut args
            )
        } {
            tracing::warn!("{e}");
        }
    }
}

/// `PJRT_Executable_GetCompiledMemoryStats`, bytes per device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub generated_code: i64,
    pub arguments: i64,
    pub outputs: i64,
    /// Output bytes that alias (donated) arguments.
    pub aliased: i64,
    pub temporaries: i64,
    pub peak: i64,
}

impl Topology {
    /// `PJRT_TopologyDescription_Create` for `name` (libtpu: `v6e:2x4`, `v6e:1x1`, ...).
    pub fn create(plugin: &Plugin, name: &str, options: &[(&str, NamedValue)]) -> Result<Topology> {
        let opts = named_values_to_c(options);
        let mut args = sys::PJRT_TopologyDescription_Create_Args::new();
        args.topology_name = name.as_ptr().cast();
        args.topology_name_size = name.len();
        args.create_options = opts.as_ptr();
        args.num_options = opts.len();
        // SAFETY: the name and options (and the strings they point to) outlive the call.
        unsafe { pjrt_call!(plugin.api(), PJRT_TopologyDescription_Create, &mut args) }?;
        if args.topology.is_null() {
            return Err(Error::Unexpected(
                "PJRT_TopologyDescription_Create returned null".into(),
            ));
        }
        Ok(Topology {
            plugin: plugin.clone(),
            raw: args.topology,
        })
    }

    pub fn platform_name(&self) -> Result<String> {
        let mut args = sys::PJRT_TopologyDescription_PlatformName_Args::new();
        args.topology = self.raw;
        // SAFETY: live topology.
        unsafe {
            pjrt_call!(
                self.plugin.api(),
                PJRT_TopologyDescription_PlatformName,
                &mut args
            )
        }?;
        // SAFETY: owned by the topology, alive while it is; copied immediately.
        Ok(unsafe { api::lossy_string(args.platform_name, args.platform_name_size) })
    }

    /// `PJRT_Compile`: the MLIR program compiled for this topology, not loaded anywhere.
    pub fn compile(&self, mlir: &str, options: &CompileOptions) -> Result<Executable> {
        if options.num_replicas < 1 || options.num_partitions < 1 {
            return Err(Error::InvalidArgument(
                "num_replicas and num_partitions must be >= 1".into(),
            ));
        }
        let encoded = options.encode();
        let format = "mlir";
        let mut program = sys::PJRT_Program::new();
        program.code = mlir.as_ptr().cast_mut().cast();
        program.code_size = mlir.len();
        program.format = format.as_ptr().cast();
        program.format_size = format.len();
        let mut args = sys::PJRT_Compile_Args::new();
        args.topology = self.raw;
        args.program = &program;
        args.compile_options = encoded.as_ptr().cast();
        args.compile_options_size = encoded.len();
        args.client = ptr::null_mut();
        // SAFETY: live topology; program, format and options outlive the call; no client.
        unsafe { pjrt_call!(self.plugin.api(), PJRT_Compile, &mut args) }?;
        if args.executable.is_null() {
            return Err(Error::Unexpected("PJRT_Compile returned null".into()));
        }
        Ok(Executable {
            plugin: self.plugin.clone(),
            raw: args.executable,
        })
    }
}

/// A compiled, unloaded program.
pub struct Executable {
    plugin: Plugin,
    raw: *mut sys::PJRT_Executable,
}

// SAFETY: read-only queries on an immutable compiled program.
unsafe impl Send for Executable {}
// SAFETY: see `Send`.
unsafe impl Sync for Executable {}

impl Drop for Executable {
    fn drop(&mut self) {
        let mut args = sys::PJRT_Executable_Destroy_Args::new();
        args.executable = self.raw;
        // SAFETY: owned, live, destroyed once.
        if let Err(e) = unsafe { pjrt_call!(self.plugin.api(), PJRT_Executable_Destroy, &mut args) }
        {
            tracing::warn!("{e}");
        }
    }
}

impl Executable {
    /// The compiler's cost model per device: `flops`, `bytes accessed`, `optimal_seconds`,
    /// per-operand `bytes accessed{i}{}`, ...
    pub fn cost_analysis(&self) -> Result<Vec<(String, NamedValue)>> {
        let mut args = sys::PJRT_Executable_GetCostAnalysis_Args::new();
        args.executable = self.raw;
        // SAFETY: live executable.
        unsafe {
            pjrt_call!(
                self.plugin.api(),
                PJRT_Executable_GetCostAnalysis,
                &mut args
            )
        }?;
        // SAFETY: the properties live as long as the executable; copied immediately.
        Ok(unsafe { named_values_from_c(args.properties, args.num_properties) })
    }

    /// One figure of [`Executable::cost_analysis`] as f64 (absent → `None`).
    pub fn cost(&self, name: &str) -> Result<Option<f64>> {
        Ok(self
            .cost_analysis()?
            .into_iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| match v {
                NamedValue::F32(x) => Some(x as f64),
                NamedValue::I64(x) => Some(x as f64),
                _ => None,
            }))
    }

    pub fn memory_stats(&self) -> Result<MemoryStats> {
        let mut args = sys::PJRT_Executable_GetCompiledMemoryStats_Args::new();
        args.executable = self.raw;
        // SAFETY: live executable; output-only fields.
        unsafe {
            pjrt_call!(
                self.plugin.api(),
                PJRT_Executable_GetCompiledMemoryStats,
                &mut args
            )
        }?;
        Ok(MemoryStats {
            generated_code: args.generated_code_size_in_bytes,
            arguments: args.argument_size_in_bytes,
            outputs: args.output_size_in_bytes,
            aliased: args.alias_size_in_bytes,
            temporaries: args.temp_size_in_bytes,
            peak: args.peak_memory_in_bytes,
        })
    }

    /// The optimized, partitioned program (`hlo_with_config`).
    pub fn optimized_program(&self) -> Result<OptimizedProgram> {
        // SAFETY: live executable of this plugin.
        unsafe { optimized_program_of(self.plugin.api(), self.raw) }
    }
}
