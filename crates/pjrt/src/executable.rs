//! Compiled programs (`PJRT_LoadedExecutable` / `PJRT_Executable`).

use std::fmt;
use std::ptr;

use crate::api::{self, pjrt_call, Api, Args};
use crate::buffer::Buffer;
use crate::client::{Client, Device};
use crate::error::{Error, Result};
use crate::sys;

/// Per-call execution options.
#[derive(Debug, Clone, Default)]
pub struct ExecuteOptions {
    /// Argument indices that must not be donated even if the program aliases them to an output
    /// (`tf.aliasing_output` / `jax.buffer_donor`): the input stays alive and XLA copies.
    pub non_donatable_input_indices: Vec<i64>,
    /// Non-zero identifies this launch across hosts of a multi-host program.
    pub launch_id: i32,
}

/// The optimized program of an executable (`PJRT_Executable_OptimizedProgram`).
#[derive(Debug, Clone)]
pub struct OptimizedProgram {
    /// Format reported by the plugin; the XLA plugins report `"hlo_with_config"`, a serialized
    /// `xla.HloModuleProtoWithConfig` (binary protobuf, not text; op and instruction names are
    /// visible as strings in it).
    pub format: String,
    pub code: Vec<u8>,
}

/// A program compiled and loaded on a client's devices.
pub struct LoadedExecutable {
    client: Client,
    raw: *mut sys::PJRT_LoadedExecutable,
    /// `PJRT_LoadedExecutable_GetExecutable`, owned (destroyed in Drop).
    exe: *mut sys::PJRT_Executable,
    num_outputs: usize,
}

// SAFETY: PJRT_LoadedExecutable wraps XLA's PjRtLoadedExecutable, whose Execute and queries are
// thread-safe (frameworks execute one executable from many threads). The C wrapper's
// PJRT_Executable computes its lazily cached values (output types, dimensions, memory kinds...)
// under its own mutex, and its fingerprint at construction. Both pointers are owned by this
// struct and destroyed exactly once.
unsafe impl Send for LoadedExecutable {}
// SAFETY: see `Send`.
unsafe impl Sync for LoadedExecutable {}

impl Drop for LoadedExecutable {
    fn drop(&mut self) {
        let api = self.client.api();
        if !self.exe.is_null() {
            let mut args = sys::PJRT_Executable_Destroy_Args::new();
            args.executable = self.exe;
            // SAFETY: owned, live, destroyed once.
            if let Err(e) = unsafe { pjrt_call!(api, PJRT_Executable_Destroy, &mut args) } {
                tracing::warn!("{e}");
            }
        }
        let mut args = sys::PJRT_LoadedExecutable_Destroy_Args::new();
        args.executable = self.raw;
        // SAFETY: owned, live, destroyed once.
        if let Err(e) = unsafe { pjrt_call!(api, PJRT_LoadedExecutable_Destroy, &mut args) } {
            tracing::warn!("{e}");
        }
    }
}

impl fmt::Debug for LoadedExecutable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedExecutable")
            .field("name", &self.name().ok())
            .field("num_outputs", &self.num_outputs)
            .finish()
    }
}

impl LoadedExecutable {
    /// Takes ownership of a loaded executable returned by `what`.
    pub(crate) fn from_raw(
        client: &Client,
        raw: *mut sys::PJRT_LoadedExecutable,
        what: &str,
    ) -> Result<LoadedExecutable> {
        if raw.is_null() {
            return Err(Error::Unexpected(format!(
                "{what} returned a null executable"
            )));
        }
        let mut this = LoadedExecutable {
            client: client.clone(),
            raw,
            exe: ptr::null_mut(),
            num_outputs: 0,
        };
        let mut args = sys::PJRT_LoadedExecutable_GetExecutable_Args::new();
        args.loaded_executable = raw;
        // SAFETY: live loaded executable.
        unsafe { pjrt_call!(this.api(), PJRT_LoadedExecutable_GetExecutable, &mut args) }?;
        if args.executable.is_null() {
            return Err(Error::Unexpected(
                "PJRT_LoadedExecutable_GetExecutable returned null".into(),
            ));
        }
        this.exe = args.executable;
        let mut args = sys::PJRT_Executable_NumOutputs_Args::new();
        args.executable = this.exe;
        // SAFETY: live executable.
        unsafe { pjrt_call!(this.api(), PJRT_Executable_NumOutputs, &mut args) }?;
        this.num_outputs = args.num_outputs;
        Ok(this)
    }

    fn api(&self) -> &Api {
        self.client.api()
    }

    /// The client this executable is loaded on.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Number of outputs per device.
    pub fn num_outputs(&self) -> usize {
        self.num_outputs
    }

    /// The executable's name (the module name).
    pub fn name(&self) -> Result<String> {
        let mut args = sys::PJRT_Executable_Name_Args::new();
        args.executable = self.exe;
        // SAFETY: live executable.
        unsafe { pjrt_call!(self.api(), PJRT_Executable_Name, &mut args) }?;
        // SAFETY: the name has the lifetime of the executable.
        Ok(unsafe { api::lossy_string(args.executable_name, args.executable_name_size) })
    }

    pub fn num_replicas(&self) -> Result<usize> {
        let mut args = sys::PJRT_Executable_NumReplicas_Args::new();
        args.executable = self.exe;
        // SAFETY: live executable.
        unsafe { pjrt_call!(self.api(), PJRT_Executable_NumReplicas, &mut args) }?;
        Ok(args.num_replicas)
    }

    pub fn num_partitions(&self) -> Result<usize> {
        let mut args = sys::PJRT_Executable_NumPartitions_Args::new();
        args.executable = self.exe;
        // SAFETY: live executable.
        unsafe { pjrt_call!(self.api(), PJRT_Executable_NumPartitions, &mut args) }?;
        Ok(args.num_partitions)
    }

    /// Size of the generated machine code, in bytes.
    pub fn size_of_generated_code(&self) -> Result<i64> {
        let mut args = sys::PJRT_Executable_SizeOfGeneratedCodeInBytes_Args::new();
        args.executable = self.exe;
        // SAFETY: live executable.
        unsafe {
            pjrt_call!(
                self.api(),
                PJRT_Executable_SizeOfGeneratedCodeInBytes,
                &mut args
            )
        }?;
        Ok(args.size_in_bytes)
    }

    /// The devices this executable runs on, in the order of the per-device argument lists.
    pub fn addressable_devices(&self) -> Result<Vec<Device>> {
        let mut args = sys::PJRT_LoadedExecutable_AddressableDevices_Args::new();
        args.executable = self.raw;
        // SAFETY: live executable.
        unsafe {
            pjrt_call!(
                self.api(),
                PJRT_LoadedExecutable_AddressableDevices,
                &mut args
            )
        }?;
        // SAFETY: the array has the lifetime of the executable; copied immediately.
        let raw = unsafe { api::slice(args.addressable_devices, args.num_addressable_devices) };
        Ok(self.client.wrap_devices(raw))
    }

    /// Runs the program. `args[d]` are the arguments for the `d`-th addressable device of the
    /// executable (for SPMD programs, each device's shard); returns `outputs[d][k]`.
    ///
    /// Inputs that the program donates (`tf.aliasing_output` / `jax.buffer_donor`) report
    /// [`Buffer::is_deleted`] afterwards; drop them.
    pub fn execute<'b, A>(&self, args: &[A]) -> Result<Vec<Vec<Buffer>>>
    where
        A: AsRef<[&'b Buffer]>,
    {
        self.execute_with_options(args, &ExecuteOptions::default())
    }

    /// [`LoadedExecutable::execute`] with options (e.g. non-donatable inputs).
    pub fn execute_with_options<'b, A>(
        &self,
        args: &[A],
        options: &ExecuteOptions,
    ) -> Result<Vec<Vec<Buffer>>>
    where
        A: AsRef<[&'b Buffer]>,
    {
        let num_devices = args.len();
        if num_devices == 0 {
            return Err(Error::InvalidArgument(
                "execute needs an argument list for at least one device".into(),
            ));
        }
        let num_args = args[0].as_ref().len();
        let mut arg_ptrs: Vec<Vec<*mut sys::PJRT_Buffer>> = Vec::with_capacity(num_devices);
        for (d, list) in args.iter().enumerate() {
            let list = list.as_ref();
            if list.len() != num_args {
                return Err(Error::InvalidArgument(format!(
                    "device 0 has {num_args} arguments but device {d} has {}",
                    list.len()
                )));
            }
            if let Some(i) = list.iter().position(|b| !b.client.same_as(&self.client)) {
                return Err(Error::InvalidArgument(format!(
                    "argument {i} of device {d} belongs to another client"
                )));
            }
            arg_ptrs.push(list.iter().map(|b| b.raw).collect());
        }
        let arg_lists: Vec<*const *mut sys::PJRT_Buffer> =
            arg_ptrs.iter().map(|l| l.as_ptr()).collect();

        let mut out_ptrs: Vec<Vec<*mut sys::PJRT_Buffer>> =
            vec![vec![ptr::null_mut(); self.num_outputs]; num_devices];
        let out_lists: Vec<*mut *mut sys::PJRT_Buffer> =
            out_ptrs.iter_mut().map(|l| l.as_mut_ptr()).collect();
        let mut events: Vec<*mut sys::PJRT_Event> = vec![ptr::null_mut(); num_devices];

        let mut exec_options = sys::PJRT_ExecuteOptions::new();
        exec_options.launch_id = options.launch_id;
        exec_options.non_donatable_input_indices = options.non_donatable_input_indices.as_ptr();
        exec_options.num_non_donatable_input_indices = options.non_donatable_input_indices.len();

        let mut exec_args = sys::PJRT_LoadedExecutable_Execute_Args::new();
        exec_args.executable = self.raw;
        exec_args.options = &mut exec_options;
        exec_args.argument_lists = arg_lists.as_ptr();
        exec_args.num_devices = num_devices;
        exec_args.num_args = num_args;
        exec_args.output_lists = out_lists.as_ptr();
        exec_args.device_complete_events = events.as_mut_ptr();
        exec_args.execute_device = ptr::null_mut();
        // SAFETY: live executable; the argument lists point to live buffers of this client
        // (borrowed for the call); the output lists have `num_devices` x `num_outputs` slots and
        // the events `num_devices` slots, all alive across the call; options outlive the call.
        unsafe { pjrt_call!(self.api(), PJRT_LoadedExecutable_Execute, &mut exec_args) }?;

        // Take ownership of every output first so that all are destroyed on any error below.
        let mut outputs: Vec<Vec<Buffer>> = Vec::with_capacity(num_devices);
        let mut missing = false;
        for list in out_ptrs {
            let mut device_outputs = Vec::with_capacity(list.len());
            for raw in list {
                match Buffer::from_raw(&self.client, raw, "PJRT_LoadedExecutable_Execute") {
                    Ok(b) => device_outputs.push(b),
                    Err(_) => missing = true,
                }
            }
            outputs.push(device_outputs);
        }
        let mut first_err = None;
        for event in events {
            // SAFETY: each event is ours; awaited and destroyed once.
            let r = unsafe {
                self.api().await_and_destroy_event(
                    event,
                    "PJRT_LoadedExecutable_Execute (device_complete_event)",
                )
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if missing {
            return Err(Error::Unexpected(
                "PJRT_LoadedExecutable_Execute left an output null".into(),
            ));
        }
        Ok(outputs)
    }

    /// Serializes the compiled executable (load it back with [`Client::deserialize_and_load`]
    /// on the same plugin build).
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let mut args = sys::PJRT_Executable_Serialize_Args::new();
        args.executable = self.exe;
        // SAFETY: live executable; outputs only.
        unsafe { pjrt_call!(self.api(), PJRT_Executable_Serialize, &mut args) }?;
        // SAFETY: the bytes live as long as `serialized_executable`, freed just below.
        let bytes = unsafe { api::bytes(args.serialized_bytes.cast(), args.serialized_bytes_size) }
            .to_vec();
        if !args.serialized_executable.is_null() {
            match args.serialized_executable_deleter {
                // SAFETY: the header's contract: call the deleter once on the backing object.
                Some(deleter) => unsafe { deleter(args.serialized_executable) },
                None => tracing::warn!(
                    "PJRT_Executable_Serialize gave no deleter; leaking the serialized copy"
                ),
            }
        }
        Ok(bytes)
    }

    /// Fingerprint of the compiled executable (same program + options + compiler ⇒ same
    /// fingerprint), if the plugin implements it.
    pub fn fingerprint(&self) -> Result<Option<String>> {
        let mut args = sys::PJRT_Executable_Fingerprint_Args::new();
        args.executable = self.exe;
        // SAFETY: live executable; outputs only.
        match unsafe { pjrt_call!(self.api(), PJRT_Executable_Fingerprint, &mut args) } {
            Ok(()) => {}
            Err(Error::Unimplemented(_)) => return Ok(None),
            Err(e) if e.code() == Some(crate::ErrorCode::Unimplemented) => return Ok(None),
            Err(e) => return Err(e),
        }
        // SAFETY: the fingerprint has the lifetime of the executable; copied immediately.
        Ok(Some(unsafe {
            api::lossy_string(
                args.executable_fingerprint,
                args.executable_fingerprint_size,
            )
        }))
    }

    /// The optimized (post-compilation) program.
    pub fn optimized_program(&self) -> Result<OptimizedProgram> {
        // SAFETY: live executable of this client's plugin.
        unsafe { optimized_program_of(self.api(), self.exe) }
    }
}

/// `PJRT_Executable_OptimizedProgram`, asked twice (size, then bytes).
///
/// # Safety
/// `exe` must be a live executable of the plugin behind `api`.
pub(crate) unsafe fn optimized_program_of(
    api: &Api,
    exe: *mut sys::PJRT_Executable,
) -> Result<OptimizedProgram> {
    let mut program = sys::PJRT_Program::new();
    program.code = ptr::null_mut();
    let mut args = sys::PJRT_Executable_OptimizedProgram_Args::new();
    args.executable = exe;
    args.program = &mut program;
    // SAFETY: live executable (caller); with a null `code` the plugin only reports the size.
    unsafe { pjrt_call!(api, PJRT_Executable_OptimizedProgram, &mut args) }?;
    let size = program.code_size;
    let mut code = vec![0u8; size.max(1)];
    program.code = code.as_mut_ptr().cast();
    program.code_size = size;
    let mut args = sys::PJRT_Executable_OptimizedProgram_Args::new();
    args.executable = exe;
    args.program = &mut program;
    // SAFETY: `code` has `size` writable bytes and outlives the call.
    unsafe { pjrt_call!(api, PJRT_Executable_OptimizedProgram, &mut args) }?;
    code.truncate(size);
    // SAFETY: the format string is owned by the plugin (static); copied immediately.
    let format = unsafe { api::lossy_string(program.format, program.format_size) };
    Ok(OptimizedProgram { format, code })
}
