//! The plugin's function table, argument-struct construction, error conversion and events.

use std::ptr;

use crate::error::{Error, ErrorCode, Result};
use crate::sys;

/// A copy of the plugin's `PJRT_Api` table.
///
/// The plugin may be built against a newer header (a longer table) or an older one (a shorter
/// table). We copy `min(plugin struct_size, our struct size)` bytes into a zeroed table of our
/// header's layout, so every function the plugin does not provide reads as `None`.
pub(crate) struct Api {
    fns: sys::PJRT_Api,
    plugin_struct_size: usize,
}

// SAFETY: the table is plain data (integers and C function pointers) and is never mutated after
// `Api::from_raw`. The PJRT C API functions themselves are thread-safe: XLA's C API contract has
// frameworks (JAX, PyTorch/XLA) call them from many threads at once.
unsafe impl Send for Api {}
// SAFETY: see `Send` above; `&Api` only allows reading the immutable table.
unsafe impl Sync for Api {}

/// Argument structs of the C API: all start with `struct_size`, which must be set to the
/// `*_STRUCT_SIZE` of the header this crate was generated from.
pub(crate) trait Args: Sized {
    const STRUCT_SIZE: usize;
    /// A zeroed struct with `struct_size` set.
    fn new() -> Self;
}

macro_rules! impl_args {
    ($($ty:ident => $size:ident),* $(,)?) => {$(
        impl Args for sys::$ty {
            const STRUCT_SIZE: usize = sys::$size as usize;
            fn new() -> Self {
                // SAFETY: bindgen generated these structs from C structs made only of integers,
                // bools, C enums (plain integer aliases), raw pointers, unions of those and
                // `Option<extern fn>`; the all-zero bit pattern is valid for each of them
                // (0, false, null, None).
                let mut args: Self = unsafe { std::mem::zeroed() };
                args.struct_size = <Self as Args>::STRUCT_SIZE;
                args
            }
        }
    )*};
}

impl_args!(
    PJRT_Error_Destroy_Args => PJRT_Error_Destroy_Args_STRUCT_SIZE,
    PJRT_Error_Message_Args => PJRT_Error_Message_Args_STRUCT_SIZE,
    PJRT_Error_GetCode_Args => PJRT_Error_GetCode_Args_STRUCT_SIZE,
    PJRT_NamedValue => PJRT_NamedValue_STRUCT_SIZE,
    PJRT_Plugin_Initialize_Args => PJRT_Plugin_Initialize_Args_STRUCT_SIZE,
    PJRT_Plugin_Attributes_Args => PJRT_Plugin_Attributes_Args_STRUCT_SIZE,
    PJRT_Event_Destroy_Args => PJRT_Event_Destroy_Args_STRUCT_SIZE,
    PJRT_Event_Await_Args => PJRT_Event_Await_Args_STRUCT_SIZE,
    PJRT_Client_Create_Args => PJRT_Client_Create_Args_STRUCT_SIZE,
    PJRT_Client_Destroy_Args => PJRT_Client_Destroy_Args_STRUCT_SIZE,
    PJRT_Client_PlatformName_Args => PJRT_Client_PlatformName_Args_STRUCT_SIZE,
    PJRT_Client_PlatformVersion_Args => PJRT_Client_PlatformVersion_Args_STRUCT_SIZE,
    PJRT_Client_ProcessIndex_Args => PJRT_Client_ProcessIndex_Args_STRUCT_SIZE,
    PJRT_Client_Devices_Args => PJRT_Client_Devices_Args_STRUCT_SIZE,
    PJRT_Client_AddressableDevices_Args => PJRT_Client_AddressableDevices_Args_STRUCT_SIZE,
    PJRT_Client_LookupDevice_Args => PJRT_Client_LookupDevice_Args_STRUCT_SIZE,
    PJRT_Program => PJRT_Program_STRUCT_SIZE,
    PJRT_Client_Compile_Args => PJRT_Client_Compile_Args_STRUCT_SIZE,
    PJRT_Client_BufferFromHostBuffer_Args => PJRT_Client_BufferFromHostBuffer_Args_STRUCT_SIZE,
    PJRT_DeviceDescription_Id_Args => PJRT_DeviceDescription_Id_Args_STRUCT_SIZE,
    PJRT_DeviceDescription_ProcessIndex_Args => PJRT_DeviceDescription_ProcessIndex_Args_STRUCT_SIZE,
    PJRT_DeviceDescription_Attributes_Args => PJRT_DeviceDescription_Attributes_Args_STRUCT_SIZE,
    PJRT_DeviceDescription_Kind_Args => PJRT_DeviceDescription_Kind_Args_STRUCT_SIZE,
    PJRT_DeviceDescription_DebugString_Args => PJRT_DeviceDescription_DebugString_Args_STRUCT_SIZE,
    PJRT_DeviceDescription_ToString_Args => PJRT_DeviceDescription_ToString_Args_STRUCT_SIZE,
    PJRT_Device_GetDescription_Args => PJRT_Device_GetDescription_Args_STRUCT_SIZE,
    PJRT_Device_MemoryStats_Args => PJRT_Device_MemoryStats_Args_STRUCT_SIZE,
    PJRT_Device_IsAddressable_Args => PJRT_Device_IsAddressable_Args_STRUCT_SIZE,
    PJRT_Device_LocalHardwareId_Args => PJRT_Device_LocalHardwareId_Args_STRUCT_SIZE,
    PJRT_Executable_Destroy_Args => PJRT_Executable_Destroy_Args_STRUCT_SIZE,
    PJRT_Executable_Name_Args => PJRT_Executable_Name_Args_STRUCT_SIZE,
    PJRT_Executable_NumReplicas_Args => PJRT_Executable_NumReplicas_Args_STRUCT_SIZE,
    PJRT_Executable_NumPartitions_Args => PJRT_Executable_NumPartitions_Args_STRUCT_SIZE,
    PJRT_Executable_NumOutputs_Args => PJRT_Executable_NumOutputs_Args_STRUCT_SIZE,
    PJRT_Executable_SizeOfGeneratedCodeInBytes_Args => PJRT_Executable_SizeOfGeneratedCodeInBytes_Args_STRUCT_SIZE,
    PJRT_Executable_Fingerprint_Args => PJRT_Executable_Fingerprint_Args_STRUCT_SIZE,
    PJRT_Executable_OptimizedProgram_Args => PJRT_Executable_OptimizedProgram_Args_STRUCT_SIZE,
    PJRT_Executable_Serialize_Args => PJRT_Executable_Serialize_Args_STRUCT_SIZE,
    PJRT_Executable_DeserializeAndLoad_Args => PJRT_Executable_DeserializeAndLoad_Args_STRUCT_SIZE,
    PJRT_LoadedExecutable_Destroy_Args => PJRT_LoadedExecutable_Destroy_Args_STRUCT_SIZE,
    PJRT_LoadedExecutable_GetExecutable_Args => PJRT_LoadedExecutable_GetExecutable_Args_STRUCT_SIZE,
    PJRT_LoadedExecutable_AddressableDevices_Args => PJRT_LoadedExecutable_AddressableDevices_Args_STRUCT_SIZE,
    PJRT_ExecuteOptions => PJRT_ExecuteOptions_STRUCT_SIZE,
    PJRT_LoadedExecutable_Execute_Args => PJRT_LoadedExecutable_Execute_Args_STRUCT_SIZE,
    PJRT_Buffer_Destroy_Args => PJRT_Buffer_Destroy_Args_STRUCT_SIZE,
    PJRT_Buffer_ElementType_Args => PJRT_Buffer_ElementType_Args_STRUCT_SIZE,
    PJRT_Buffer_Dimensions_Args => PJRT_Buffer_Dimensions_Args_STRUCT_SIZE,
    PJRT_Buffer_ToHostBuffer_Args => PJRT_Buffer_ToHostBuffer_Args_STRUCT_SIZE,
    PJRT_Buffer_OnDeviceSizeInBytes_Args => PJRT_Buffer_OnDeviceSizeInBytes_Args_STRUCT_SIZE,
    PJRT_Buffer_Delete_Args => PJRT_Buffer_Delete_Args_STRUCT_SIZE,
    PJRT_Buffer_IsDeleted_Args => PJRT_Buffer_IsDeleted_Args_STRUCT_SIZE,
    PJRT_Buffer_CopyToDevice_Args => PJRT_Buffer_CopyToDevice_Args_STRUCT_SIZE,
    PJRT_Buffer_Device_Args => PJRT_Buffer_Device_Args_STRUCT_SIZE,
    PJRT_Buffer_ReadyEvent_Args => PJRT_Buffer_ReadyEvent_Args_STRUCT_SIZE,
    PJRT_Buffer_UnsafePointer_Args => PJRT_Buffer_UnsafePointer_Args_STRUCT_SIZE,
    PJRT_TopologyDescription_Create_Args => PJRT_TopologyDescription_Create_Args_STRUCT_SIZE,
    PJRT_TopologyDescription_Destroy_Args => PJRT_TopologyDescription_Destroy_Args_STRUCT_SIZE,
    PJRT_TopologyDescription_PlatformName_Args => PJRT_TopologyDescription_PlatformName_Args_STRUCT_SIZE,
    PJRT_Compile_Args => PJRT_Compile_Args_STRUCT_SIZE,
    PJRT_Executable_GetCostAnalysis_Args => PJRT_Executable_GetCostAnalysis_Args_STRUCT_SIZE,
    PJRT_Executable_GetCompiledMemoryStats_Args => PJRT_Executable_GetCompiledMemoryStats_Args_STRUCT_SIZE,
);

/// Calls one function of the table: `unsafe { pjrt_call!(api, PJRT_Foo, &mut args) }`.
///
/// Evaluates to `Result<()>`: `Err(Error::Unimplemented)` when the plugin's table lacks the
/// function, `Err(Error::Pjrt)` when it returns a `PJRT_Error` (which is consumed and destroyed).
/// Unsafe because the caller vouches that every pointer inside `args` is valid for the call.
macro_rules! pjrt_call {
    ($api:expr, $func:ident, $args:expr) => {
        $api.call($api.raw().$func, stringify!($func), $args)
    };
}
pub(crate) use pjrt_call;

impl Api {
    /// Copies the plugin's table.
    ///
    /// # Safety
    /// `raw` must be the non-null pointer returned by the plugin's `GetPjrtApi`, pointing to a
    /// `PJRT_Api` whose first field is its `struct_size` and that stays valid while the plugin
    /// library is loaded.
    pub(crate) unsafe fn from_raw(raw: *const sys::PJRT_Api) -> Result<Self, String> {
        // SAFETY: the caller guarantees `raw` points to a PJRT_Api, whose first field is a size_t.
        let plugin_struct_size = unsafe { ptr::read(raw.cast::<usize>()) };
        let min_size = std::mem::offset_of!(sys::PJRT_Api, pjrt_api_version)
            + std::mem::size_of::<sys::PJRT_Api_Version>();
        if plugin_struct_size < min_size {
            return Err(format!(
                "PJRT_Api.struct_size is {plugin_struct_size}, too small to hold the API version"
            ));
        }
        // SAFETY: all-zero is a valid PJRT_Api (sizes, null pointers, `None` function pointers).
        let mut fns: sys::PJRT_Api = unsafe { std::mem::zeroed() };
        let n = plugin_struct_size.min(std::mem::size_of::<sys::PJRT_Api>());
        // SAFETY: the plugin's table is at least `plugin_struct_size >= n` bytes long, our local
        // table is `size_of::<PJRT_Api>() >= n` bytes long, and they do not overlap. Every prefix
        // of the table ends on a field boundary (the table is size_t, a struct of sizes/ints
        // and then pointers, all 8-byte aligned on the LP64 targets PJRT supports).
        unsafe {
            ptr::copy_nonoverlapping(raw.cast::<u8>(), ptr::addr_of_mut!(fns).cast::<u8>(), n);
        }
        Ok(Self {
            fns,
            plugin_struct_size,
        })
    }

    /// The copied table (functions the plugin lacks are `None`).
    pub(crate) fn raw(&self) -> &sys::PJRT_Api {
        &self.fns
    }

    /// `PJRT_Api.struct_size` as reported by the plugin.
    pub(crate) fn plugin_struct_size(&self) -> usize {
        self.plugin_struct_size
    }

    /// (major, minor) version the plugin reports.
    pub(crate) fn version(&self) -> (i32, i32) {
        (
            self.fns.pjrt_api_version.major_version,
            self.fns.pjrt_api_version.minor_version,
        )
    }

    /// Calls `func(args)` and converts its returned `PJRT_Error*`.
    ///
    /// # Safety
    /// Every pointer inside `args` must be valid as the C API documents for `func`.
    pub(crate) unsafe fn call<A>(
        &self,
        func: Option<unsafe extern "C" fn(*mut A) -> *mut sys::PJRT_Error>,
        name: &'static str,
        args: &mut A,
    ) -> Result<()> {
        let Some(func) = func else {
            return Err(Error::Unimplemented(name));
        };
        // SAFETY: `func` comes from the plugin's table for this argument type; the caller
        // guarantees the pointers inside `args`.
        let err = unsafe { func(args) };
        self.check(err, name)
    }

    /// Converts a `PJRT_Error*` returned by `function` (null = success), destroying it.
    pub(crate) fn check(&self, err: *mut sys::PJRT_Error, function: &'static str) -> Result<()> {
        if err.is_null() {
            Ok(())
        } else {
            Err(self.take_error(err, function))
        }
    }

    fn take_error(&self, err: *mut sys::PJRT_Error, function: &'static str) -> Error {
        let mut message = String::new();
        if let Some(f) = self.fns.PJRT_Error_Message {
            let mut args = sys::PJRT_Error_Message_Args::new();
            args.error = err;
            // SAFETY: `err` is a live error returned by the plugin.
            unsafe { f(&mut args) };
            // SAFETY: the message has the lifetime of `err`, which is destroyed below.
            message = unsafe { lossy_string(args.message, args.message_size) };
        }
        let mut code = ErrorCode::Unknown;
        if let Some(f) = self.fns.PJRT_Error_GetCode {
            let mut args = sys::PJRT_Error_GetCode_Args::new();
            args.error = err;
            // SAFETY: `err` is a live error returned by the plugin.
            let code_err = unsafe { f(&mut args) };
            if code_err.is_null() {
                code = ErrorCode::from_raw(args.code);
            } else {
                self.destroy_error(code_err);
            }
        }
        self.destroy_error(err);
        Error::Pjrt {
            function,
            code,
            message,
        }
    }

    fn destroy_error(&self, err: *mut sys::PJRT_Error) {
        if let Some(f) = self.fns.PJRT_Error_Destroy {
            let mut args = sys::PJRT_Error_Destroy_Args::new();
            args.error = err;
            // SAFETY: `err` is a live error returned by the plugin, destroyed exactly once.
            unsafe { f(&mut args) };
        }
    }

    /// Waits for `event` and destroys it. `function` names the call that produced the event.
    ///
    /// # Safety
    /// `event` must be null or a live event returned by this plugin that nobody else destroys.
    pub(crate) unsafe fn await_and_destroy_event(
        &self,
        event: *mut sys::PJRT_Event,
        function: &'static str,
    ) -> Result<()> {
        if event.is_null() {
            return Ok(());
        }
        let result = match self.fns.PJRT_Event_Await {
            Some(f) => {
                let mut args = sys::PJRT_Event_Await_Args::new();
                args.event = event;
                // SAFETY: `event` is live (caller's guarantee).
                let err = unsafe { f(&mut args) };
                self.check(err, function)
            }
            None => Err(Error::Unimplemented("PJRT_Event_Await")),
        };
        // SAFETY: `event` is live and ours to destroy.
        unsafe { self.destroy_event(event) };
        result
    }

    /// # Safety
    /// `event` must be null or a live event that nobody else destroys.
    pub(crate) unsafe fn destroy_event(&self, event: *mut sys::PJRT_Event) {
        if event.is_null() {
            return;
        }
        let mut args = sys::PJRT_Event_Destroy_Args::new();
        args.event = event;
        // SAFETY: forwarded from the caller.
        if let Err(e) = unsafe { pjrt_call!(self, PJRT_Event_Destroy, &mut args) } {
            tracing::warn!("PJRT_Event_Destroy: {e}");
        }
    }
}

/// Copies a (pointer, length) string from the plugin, replacing invalid UTF-8.
///
/// # Safety
/// `ptr` must be null or valid for reads of `len` bytes.
pub(crate) unsafe fn lossy_string(ptr: *const std::os::raw::c_char, len: usize) -> String {
    // SAFETY: forwarded from the caller.
    String::from_utf8_lossy(unsafe { bytes(ptr.cast(), len) }).into_owned()
}

/// Views a (pointer, length) byte range from the plugin; empty for a null pointer.
///
/// # Safety
/// `ptr` must be null or valid for reads of `len` bytes for the returned lifetime.
pub(crate) unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// Views a (pointer, count) array from the plugin; empty for a null pointer.
///
/// # Safety
/// `ptr` must be null or valid for reads of `len` elements for the returned lifetime.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}
