//! `PJRT_Client` and `PJRT_Device`.

use std::fmt;
use std::ptr;
use std::sync::Arc;

use crate::api::{self, pjrt_call, Api, Args};
use crate::compile_options::CompileOptions;
use crate::error::{Error, Result};
use crate::executable::LoadedExecutable;
use crate::plugin::{named_values_from_c, named_values_to_c, NamedValue, Plugin};
use crate::sys;

/// A PJRT client: owns the devices of one plugin instance.
///
/// Cheap to clone (shared handle). Buffers, executables and devices keep the client alive, so
/// the underlying `PJRT_Client` is destroyed only after the last of them is dropped.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    pub(crate) plugin: Plugin,
    pub(crate) raw: *mut sys::PJRT_Client,
}

// SAFETY: XLA's PjRtClient, which PJRT_Client wraps, is thread-safe (frameworks call one client
// from many threads); the C wrapper's own fields (device and memory lists) are built once at
// creation and only read afterwards. The pointer is owned by this struct and destroyed once.
unsafe impl Send for ClientInner {}
// SAFETY: see `Send`.
unsafe impl Sync for ClientInner {}

impl ClientInner {
    pub(crate) fn api(&self) -> &Api {
        self.plugin.api()
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        let mut args = sys::PJRT_Client_Destroy_Args::new();
        args.client = self.raw;
        // SAFETY: the client is live and, being the last reference, is destroyed exactly once;
        // every buffer/executable/device holds an Arc to us, so none outlives it.
        if let Err(e) = unsafe { pjrt_call!(self.api(), PJRT_Client_Destroy, &mut args) } {
            tracing::warn!("{e}");
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("platform", &self.platform_name().unwrap_or_default())
            .finish()
    }
}

impl Client {
    /// Creates a client. `options` are plugin-specific (for the XLA CPU plugin:
    /// `("cpu_device_count", NamedValue::I64(8))`).
    pub fn new(plugin: &Plugin, options: &[(&str, NamedValue)]) -> Result<Client> {
        let c_options = named_values_to_c(options);
        let mut args = sys::PJRT_Client_Create_Args::new();
        args.create_options = c_options.as_ptr();
        args.num_options = c_options.len();
        // SAFETY: the options array and the strings/arrays it points to (borrowed from `options`)
        // live across the call; no key-value store callbacks are given.
        unsafe { pjrt_call!(plugin.api(), PJRT_Client_Create, &mut args) }?;
        if args.client.is_null() {
            return Err(Error::Unexpected(
                "PJRT_Client_Create returned a null client".into(),
            ));
        }
        let client = Client {
            inner: Arc::new(ClientInner {
                plugin: plugin.clone(),
                raw: args.client,
            }),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                "PJRT client: platform {:?} version {:?}",
                client.platform_name().unwrap_or_default(),
                client.platform_version().unwrap_or_default()
            );
        }
        Ok(client)
    }

    pub(crate) fn api(&self) -> &Api {
        self.inner.api()
    }

    /// The plugin this client belongs to.
    pub fn plugin(&self) -> &Plugin {
        &self.inner.plugin
    }

    /// True when both handles refer to the same underlying client.
    pub fn same_as(&self, other: &Client) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// E.g. `"cpu"`, `"tpu"`.
    pub fn platform_name(&self) -> Result<String> {
        let mut args = sys::PJRT_Client_PlatformName_Args::new();
        args.client = self.inner.raw;
        // SAFETY: live client; outputs only.
        unsafe { pjrt_call!(self.api(), PJRT_Client_PlatformName, &mut args) }?;
        // SAFETY: the name is owned by the client, which we hold.
        Ok(unsafe { api::lossy_string(args.platform_name, args.platform_name_size) })
    }

    /// Platform-specific version string.
    pub fn platform_version(&self) -> Result<String> {
        let mut args = sys::PJRT_Client_PlatformVersion_Args::new();
        args.client = self.inner.raw;
        // SAFETY: live client; outputs only.
        unsafe { pjrt_call!(self.api(), PJRT_Client_PlatformVersion, &mut args) }?;
        // SAFETY: the string is owned by the client, which we hold.
        Ok(unsafe { api::lossy_string(args.platform_version, args.platform_version_size) })
    }

    /// Index of this process (0 unless multi-process).
    pub fn process_index(&self) -> Result<i32> {
        let mut args = sys::PJRT_Client_ProcessIndex_Args::new();
        args.client = self.inner.raw;
        // SAFETY: live client; outputs only.
        unsafe { pjrt_call!(self.api(), PJRT_Client_ProcessIndex, &mut args) }?;
        Ok(args.process_index)
    }

    /// All devices visible to the runtime, addressable or not.
    pub fn devices(&self) -> Result<Vec<Device>> {
        let mut args = sys::PJRT_Client_Devices_Args::new();
        args.client = self.inner.raw;
        // SAFETY: live client; outputs only.
        unsafe { pjrt_call!(self.api(), PJRT_Client_Devices, &mut args) }?;
        // SAFETY: the array is owned by the client, which we hold.
        let raw = unsafe { api::slice(args.devices, args.num_devices) };
        Ok(self.wrap_devices(raw))
    }

    /// Devices this client can issue work to, in the order executables expect per-device
    /// arguments.
    pub fn addressable_devices(&self) -> Result<Vec<Device>> {
        let mut args = sys::PJRT_Client_AddressableDevices_Args::new();
        args.client = self.inner.raw;
        // SAFETY: live client; outputs only.
        unsafe { pjrt_call!(self.api(), PJRT_Client_AddressableDevices, &mut args) }?;
        // SAFETY: the array is owned by the client, which we hold.
        let raw = unsafe { api::slice(args.addressable_devices, args.num_addressable_devices) };
        Ok(self.wrap_devices(raw))
    }

    /// The device with global id `id`.
    pub fn lookup_device(&self, id: i32) -> Result<Device> {
        let mut args = sys::PJRT_Client_LookupDevice_Args::new();
        args.client = self.inner.raw;
        args.id = id;
        // SAFETY: live client.
        unsafe { pjrt_call!(self.api(), PJRT_Client_LookupDevice, &mut args) }?;
        self.device_from_raw(args.device)
            .ok_or_else(|| Error::Unexpected(format!("no device returned for id {id}")))
    }

    pub(crate) fn wrap_devices(&self, raw: &[*mut sys::PJRT_Device]) -> Vec<Device> {
        raw.iter()
            .filter_map(|&d| self.device_from_raw(d))
            .collect()
    }

    pub(crate) fn device_from_raw(&self, raw: *mut sys::PJRT_Device) -> Option<Device> {
        (!raw.is_null()).then(|| Device {
            client: self.clone(),
            raw,
        })
    }

    /// Compiles a StableHLO/MHLO module given as MLIR text (or bytecode) — program format
    /// `"mlir"` — and loads it on the client's devices.
    ///
    /// `options.num_replicas` and `options.num_partitions` must be at least 1: the XLA CPU
    /// plugin aborts the whole process (`Check failed: replica_count > 0`) when compiling with
    /// `num_replicas = 0`, so this is rejected here with [`Error::InvalidArgument`].
    pub fn compile(&self, mlir: &str, options: &CompileOptions) -> Result<LoadedExecutable> {
        if options.num_replicas < 1 || options.num_partitions < 1 {
            return Err(Error::InvalidArgument(format!(
                "num_replicas ({}) and num_partitions ({}) must be >= 1",
                options.num_replicas, options.num_partitions
            )));
        }
        self.compile_raw(mlir.as_bytes(), "mlir", &options.encode())
    }

    /// Compiles `code` in program `format` (`"mlir"`, `"hlo"`, `"hlo_with_config"`) with an
    /// already-serialized `xla.CompileOptionsProto`.
    ///
    /// Caution: the options are passed through unchecked. An empty proto means
    /// `num_replicas = 0`, on which the XLA CPU plugin aborts the process (a failed C++ CHECK,
    /// not an error return); prefer [`Client::compile`] or [`CompileOptions::encode`].
    pub fn compile_raw(
        &self,
        code: &[u8],
        format: &str,
        serialized_compile_options: &[u8],
    ) -> Result<LoadedExecutable> {
        let mut program = sys::PJRT_Program::new();
        // The C field is `char*` because the same struct is an output elsewhere; Compile only
        // reads it.
        program.code = code.as_ptr().cast_mut().cast();
        program.code_size = code.len();
        program.format = format.as_ptr().cast();
        program.format_size = format.len();
        let mut args = sys::PJRT_Client_Compile_Args::new();
        args.client = self.inner.raw;
        args.program = &program;
        args.compile_options = serialized_compile_options.as_ptr().cast();
        args.compile_options_size = serialized_compile_options.len();
        // SAFETY: live client; program text, format and options outlive the call.
        unsafe { pjrt_call!(self.api(), PJRT_Client_Compile, &mut args) }?;
        LoadedExecutable::from_raw(self, args.executable, "PJRT_Client_Compile")
    }

    /// Loads an executable produced by [`LoadedExecutable::serialize`] with the same plugin
    /// build. Uses the compile options stored in the serialized executable.
    pub fn deserialize_and_load(&self, serialized: &[u8]) -> Result<LoadedExecutable> {
        let mut args = sys::PJRT_Executable_DeserializeAndLoad_Args::new();
        args.client = self.inner.raw;
        args.serialized_executable = serialized.as_ptr().cast();
        args.serialized_executable_size = serialized.len();
        args.overridden_serialized_compile_options = ptr::null();
        args.overridden_serialized_compile_options_size = 0;
        // SAFETY: live client; `serialized` outlives the call.
        unsafe { pjrt_call!(self.api(), PJRT_Executable_DeserializeAndLoad, &mut args) }?;
        LoadedExecutable::from_raw(
            self,
            args.loaded_executable,
            "PJRT_Executable_DeserializeAndLoad",
        )
    }
}

/// A device of a client (`PJRT_Device`). Keeps its client alive.
#[derive(Clone)]
pub struct Device {
    pub(crate) client: Client,
    pub(crate) raw: *mut sys::PJRT_Device,
}

// SAFETY: a PJRT_Device is owned by its client (which this handle keeps alive) and is
// immutable after client creation; its query functions only read it.
unsafe impl Send for Device {}
// SAFETY: see `Send`.
unsafe impl Sync for Device {}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl Eq for Device {}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id().ok())
            .field("kind", &self.kind().ok())
            .finish()
    }
}

impl Device {
    fn api(&self) -> &Api {
        self.client.api()
    }

    /// The client owning this device.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn description(&self) -> Result<*mut sys::PJRT_DeviceDescription> {
        let mut args = sys::PJRT_Device_GetDescription_Args::new();
        args.device = self.raw;
        // SAFETY: live device (client held).
        unsafe { pjrt_call!(self.api(), PJRT_Device_GetDescription, &mut args) }?;
        if args.device_description.is_null() {
            return Err(Error::Unexpected("null device description".into()));
        }
        Ok(args.device_description)
    }

    /// Global device id (unique among devices of this platform).
    pub fn id(&self) -> Result<i32> {
        let mut args = sys::PJRT_DeviceDescription_Id_Args::new();
        args.device_description = self.description()?;
        // SAFETY: live description owned by the device.
        unsafe { pjrt_call!(self.api(), PJRT_DeviceDescription_Id, &mut args) }?;
        Ok(args.id)
    }

    /// Index of the process this device belongs to.
    pub fn process_index(&self) -> Result<i32> {
        let mut args = sys::PJRT_DeviceDescription_ProcessIndex_Args::new();
        args.device_description = self.description()?;
        // SAFETY: live description owned by the device.
        unsafe { pjrt_call!(self.api(), PJRT_DeviceDescription_ProcessIndex, &mut args) }?;
        Ok(args.process_index)
    }

    /// Memory the device's allocator may use, in bytes, where the plugin reports it (TPU and
    /// GPU plugins do; the CPU plugin does not).
    pub fn memory_limit(&self) -> Result<Option<u64>> {
        let mut args = sys::PJRT_Device_MemoryStats_Args::new();
        args.device = self.raw;
        // SAFETY: live device (client held); the plugin fills plain integers.
        unsafe { pjrt_call!(self.api(), PJRT_Device_MemoryStats, &mut args) }?;
        Ok((args.bytes_limit_is_set && args.bytes_limit > 0).then_some(args.bytes_limit as u64))
    }

    /// Vendor-specific device kind, e.g. `"cpu"` or `"TPU v5 lite"`.
    pub fn kind(&self) -> Result<String> {
        let mut args = sys::PJRT_DeviceDescription_Kind_Args::new();
        args.device_description = self.description()?;
        // SAFETY: live description owned by the device.
        unsafe { pjrt_call!(self.api(), PJRT_DeviceDescription_Kind, &mut args) }?;
        // SAFETY: the string lives as long as the device.
        Ok(unsafe { api::lossy_string(args.device_kind, args.device_kind_size) })
    }

    /// Device-specific attributes (e.g. `coords`, `core_on_chip` on TPU).
    pub fn attributes(&self) -> Result<Vec<(String, NamedValue)>> {
        let mut args = sys::PJRT_DeviceDescription_Attributes_Args::new();
        args.device_description = self.description()?;
        // SAFETY: live description owned by the device.
        unsafe { pjrt_call!(self.api(), PJRT_DeviceDescription_Attributes, &mut args) }?;
        // SAFETY: the attributes live as long as the device.
        Ok(unsafe { named_values_from_c(args.attributes, args.num_attributes) })
    }

    /// Verbose description for logs.
    pub fn debug_string(&self) -> Result<String> {
        let mut args = sys::PJRT_DeviceDescription_DebugString_Args::new();
        args.device_description = self.description()?;
        // SAFETY: live description owned by the device.
        unsafe { pjrt_call!(self.api(), PJRT_DeviceDescription_DebugString, &mut args) }?;
        // SAFETY: the string lives as long as the device.
        Ok(unsafe { api::lossy_string(args.debug_string, args.debug_string_size) })
    }

    /// Terse description, e.g. `CpuDevice(id=0)`.
    pub fn to_display_string(&self) -> Result<String> {
        let mut args = sys::PJRT_DeviceDescription_ToString_Args::new();
        args.device_description = self.description()?;
        // SAFETY: live description owned by the device.
        unsafe { pjrt_call!(self.api(), PJRT_DeviceDescription_ToString, &mut args) }?;
        // SAFETY: the string lives as long as the device.
        Ok(unsafe { api::lossy_string(args.to_string, args.to_string_size) })
    }

    /// Whether the client can issue commands to this device.
    pub fn is_addressable(&self) -> Result<bool> {
        let mut args = sys::PJRT_Device_IsAddressable_Args::new();
        args.device = self.raw;
        // SAFETY: live device.
        unsafe { pjrt_call!(self.api(), PJRT_Device_IsAddressable, &mut args) }?;
        Ok(args.is_addressable)
    }

    /// Opaque hardware id (-1 if undefined).
    pub fn local_hardware_id(&self) -> Result<i32> {
        let mut args = sys::PJRT_Device_LocalHardwareId_Args::new();
        args.device = self.raw;
        // SAFETY: live device.
        unsafe { pjrt_call!(self.api(), PJRT_Device_LocalHardwareId, &mut args) }?;
        Ok(args.local_hardware_id)
    }
}
