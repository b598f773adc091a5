//! Device buffers (`PJRT_Buffer`).

use std::fmt;
use std::ptr;

use crate::api::{self, pjrt_call, Api, Args};
use crate::client::{Client, Device};
use crate::error::{Error, Result};
use crate::sys;

/// Element type of a buffer (`PJRT_Buffer_Type`). Only types with a whole-byte element size are
/// listed; sub-byte types (S4, U4, S2, U2, F4E2M1FN) are reported as [`Error::Unexpected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElementType {
    /// Boolean, one byte per element (0 or 1).
    Pred,
    S8,
    S16,
    S32,
    S64,
    U8,
    U16,
    U32,
    U64,
    F16,
    F32,
    F64,
    /// bfloat16: raw bits, 2 bytes per element.
    BF16,
    C64,
    C128,
    F8E5M2,
    F8E4M3FN,
    F8E4M3B11FNUZ,
    F8E5M2FNUZ,
    F8E4M3FNUZ,
    F8E4M3,
    F8E3M4,
    F8E8M0FNU,
}

impl ElementType {
    /// Bytes per element.
    pub fn byte_size(self) -> usize {
        use ElementType::*;
        match self {
            Pred | S8 | U8 | F8E5M2 | F8E4M3FN | F8E4M3B11FNUZ | F8E5M2FNUZ | F8E4M3FNUZ
            | F8E4M3 | F8E3M4 | F8E8M0FNU => 1,
            S16 | U16 | F16 | BF16 => 2,
            S32 | U32 | F32 => 4,
            S64 | U64 | F64 | C64 => 8,
            C128 => 16,
        }
    }

    pub(crate) fn to_raw(self) -> sys::PJRT_Buffer_Type {
        use ElementType::*;
        match self {
            Pred => sys::PJRT_Buffer_Type_PRED,
            S8 => sys::PJRT_Buffer_Type_S8,
            S16 => sys::PJRT_Buffer_Type_S16,
            S32 => sys::PJRT_Buffer_Type_S32,
            S64 => sys::PJRT_Buffer_Type_S64,
            U8 => sys::PJRT_Buffer_Type_U8,
            U16 => sys::PJRT_Buffer_Type_U16,
            U32 => sys::PJRT_Buffer_Type_U32,
            U64 => sys::PJRT_Buffer_Type_U64,
            F16 => sys::PJRT_Buffer_Type_F16,
            F32 => sys::PJRT_Buffer_Type_F32,
            F64 => sys::PJRT_Buffer_Type_F64,
            BF16 => sys::PJRT_Buffer_Type_BF16,
            C64 => sys::PJRT_Buffer_Type_C64,
            C128 => sys::PJRT_Buffer_Type_C128,
            F8E5M2 => sys::PJRT_Buffer_Type_F8E5M2,
            F8E4M3FN => sys::PJRT_Buffer_Type_F8E4M3FN,
            F8E4M3B11FNUZ => sys::PJRT_Buffer_Type_F8E4M3B11FNUZ,
            F8E5M2FNUZ => sys::PJRT_Buffer_Type_F8E5M2FNUZ,
            F8E4M3FNUZ => sys::PJRT_Buffer_Type_F8E4M3FNUZ,
            F8E4M3 => sys::PJRT_Buffer_Type_F8E4M3,
            F8E3M4 => sys::PJRT_Buffer_Type_F8E3M4,
            F8E8M0FNU => sys::PJRT_Buffer_Type_F8E8M0FNU,
        }
    }

    pub(crate) fn from_raw(raw: sys::PJRT_Buffer_Type) -> Option<Self> {
        use ElementType::*;
        Some(match raw {
            sys::PJRT_Buffer_Type_PRED => Pred,
            sys::PJRT_Buffer_Type_S8 => S8,
            sys::PJRT_Buffer_Type_S16 => S16,
            sys::PJRT_Buffer_Type_S32 => S32,
            sys::PJRT_Buffer_Type_S64 => S64,
            sys::PJRT_Buffer_Type_U8 => U8,
            sys::PJRT_Buffer_Type_U16 => U16,
            sys::PJRT_Buffer_Type_U32 => U32,
            sys::PJRT_Buffer_Type_U64 => U64,
            sys::PJRT_Buffer_Type_F16 => F16,
            sys::PJRT_Buffer_Type_F32 => F32,
            sys::PJRT_Buffer_Type_F64 => F64,
            sys::PJRT_Buffer_Type_BF16 => BF16,
            sys::PJRT_Buffer_Type_C64 => C64,
            sys::PJRT_Buffer_Type_C128 => C128,
            sys::PJRT_Buffer_Type_F8E5M2 => F8E5M2,
            sys::PJRT_Buffer_Type_F8E4M3FN => F8E4M3FN,
            sys::PJRT_Buffer_Type_F8E4M3B11FNUZ => F8E4M3B11FNUZ,
            sys::PJRT_Buffer_Type_F8E5M2FNUZ => F8E5M2FNUZ,
            sys::PJRT_Buffer_Type_F8E4M3FNUZ => F8E4M3FNUZ,
            sys::PJRT_Buffer_Type_F8E4M3 => F8E4M3,
            sys::PJRT_Buffer_Type_F8E3M4 => F8E3M4,
            sys::PJRT_Buffer_Type_F8E8M0FNU => F8E8M0FNU,
            _ => return None,
        })
    }
}

/// Rust scalar types that map 1:1 onto an [`ElementType`]; used by the typed conveniences
/// [`Buffer::from_slice`] and [`Buffer::to_vec`]. For bf16/f16 use raw `u16` bits with
/// [`Buffer::from_host`].
pub trait NativeType: Copy + Sized {
    const ELEMENT_TYPE: ElementType;
    const SIZE: usize;
    fn write_ne(self, out: &mut Vec<u8>);
    fn read_ne(bytes: &[u8]) -> Self;
}

macro_rules! native_type {
    ($($t:ty => $e:ident),* $(,)?) => {$(
        impl NativeType for $t {
            const ELEMENT_TYPE: ElementType = ElementType::$e;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn write_ne(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_ne_bytes());
            }
            fn read_ne(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_ne_bytes(a)
            }
        }
    )*};
}
native_type!(
    i8 => S8, i16 => S16, i32 => S32, i64 => S64,
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    f32 => F32, f64 => F64,
);

/// An array on a device. Destroyed (`PJRT_Buffer_Destroy`) on drop; keeps its client alive.
pub struct Buffer {
    pub(crate) client: Client,
    pub(crate) raw: *mut sys::PJRT_Buffer,
    /// Host memory the plugin may be using as the buffer itself ([`Buffer::from_host_owned`]).
    host: Option<HostBacking>,
}

/// Host bytes aligned for the XLA CPU plugin to adopt without a copy (it needs 64-byte
/// alignment, which a `Vec<u8>` does not promise).
pub struct AlignedBytes {
    blocks: Vec<Align64>,
    len: usize,
}

#[repr(C, align(64))]
struct Align64([u8; 64]);

impl AlignedBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBytes {
        let n = len.div_ceil(64);
        let blocks = if n == 0 {
            Vec::new()
        } else {
            let layout = std::alloc::Layout::array::<Align64>(n).expect("allocation size");
            // SAFETY: a non-zero-sized layout; all-zero bytes are a valid `Align64`; the
            // pointer, length and capacity describe exactly this allocation of this layout.
            // (`alloc_zeroed` gets pages the kernel zeroes lazily, instead of a write pass.)
            unsafe {
                let ptr = std::alloc::alloc_zeroed(layout).cast::<Align64>();
                if ptr.is_null() {
                    std::alloc::handle_alloc_error(layout);
                }
                Vec::from_raw_parts(ptr, n, n)
            }
        };
        AlignedBytes { blocks, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `blocks` holds at least `len` initialised bytes, contiguous (repr(C) arrays).
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast(), self.len) }
    }
}

/// Keeps adopted host memory alive until the plugin says it is done with it.
struct HostBacking {
    done: *mut sys::PJRT_Event,
    _bytes: AlignedBytes,
}

// SAFETY: PJRT_Buffer wraps XLA's PjRtBuffer, whose methods are thread-safe. The C wrapper also
// lazily caches a few values (unpadded dimensions, dynamic dimension indices, memory layout)
// without a lock; this crate never calls those functions, and everything it does call only
// reads the wrapper. The pointer is owned by this struct and destroyed exactly once.
unsafe impl Send for Buffer {}
// SAFETY: see `Send`: every `&self` method calls a thread-safe, non-mutating C API function.
unsafe impl Sync for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut args = sys::PJRT_Buffer_Destroy_Args::new();
        args.buffer = self.raw;
        // SAFETY: we own the live buffer; destroyed exactly once.
        if let Err(e) = unsafe { pjrt_call!(self.api(), PJRT_Buffer_Destroy, &mut args) } {
            tracing::warn!("{e}");
        }
        if let Some(host) = self.host.take() {
            // The plugin signals when it no longer reads the adopted bytes (at the latest once
            // the buffer is gone); only then may they be freed.
            // SAFETY: the event is ours; awaited and destroyed once.
            let r = unsafe {
                self.client
                    .api()
                    .await_and_destroy_event(host.done, "done_with_host_buffer")
            };
            if let Err(e) = r {
                tracing::warn!("{e}");
            }
        }
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("element_type", &self.element_type().ok())
            .field("dims", &self.dims().ok())
            .finish()
    }
}

fn element_count(dims: &[i64]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d)
            .map_err(|_| Error::InvalidArgument(format!("negative dimension in {dims:?}")))?;
        acc.checked_mul(d)
            .ok_or_else(|| Error::InvalidArgument(format!("dimensions {dims:?} overflow")))
    })
}

impl Buffer {
    fn api(&self) -> &Api {
        self.client.api()
    }

    /// Wraps an owned buffer pointer returned by the plugin.
    pub(crate) fn from_raw(
        client: &Client,
        raw: *mut sys::PJRT_Buffer,
        what: &str,
    ) -> Result<Buffer> {
        if raw.is_null() {
            return Err(Error::Unexpected(format!("{what} returned a null buffer")));
        }
        Ok(Buffer {
            client: client.clone(),
            raw,
            host: None,
        })
    }

    /// `PJRT_Client_BufferFromHostBuffer` after checking `data` against `dims`: the new
    /// buffer and its "done with host buffer" event (the caller's to await and destroy).
    ///
    /// # Safety
    /// `data` must stay alive and unmodified until that event has fired.
    unsafe fn from_host_with(
        client: &Client,
        data: &[u8],
        element_type: ElementType,
        dims: &[i64],
        device: &Device,
        semantics: sys::PJRT_HostBufferSemantics,
    ) -> Result<(Buffer, *mut sys::PJRT_Event)> {
        if !device.client.same_as(client) {
            return Err(Error::InvalidArgument(
                "the device belongs to another client".into(),
            ));
        }
        let expected = element_count(dims)?
            .checked_mul(element_type.byte_size())
            .ok_or_else(|| Error::InvalidArgument(format!("dimensions {dims:?} overflow")))?;
        if data.len() != expected {
            return Err(Error::InvalidArgument(format!(
                "{element_type:?}{dims:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        let mut args = sys::PJRT_Client_BufferFromHostBuffer_Args::new();
        args.client = client.inner.raw;
        // A zero-length slice may have a dangling pointer; the plugin never reads it then.
        args.data = data.as_ptr().cast();
        args.type_ = element_type.to_raw();
        args.dims = dims.as_ptr();
        args.num_dims = dims.len();
        args.byte_strides = ptr::null();
        args.num_byte_strides = 0;
        args.host_buffer_semantics = semantics;
        args.device = device.raw;
        args.memory = ptr::null_mut();
        args.device_layout = ptr::null_mut();
        // SAFETY: live client and device; `dims` is read during the call only, `data` until
        // the returned event fires (the caller's guarantee).
        unsafe { pjrt_call!(client.api(), PJRT_Client_BufferFromHostBuffer, &mut args) }?;
        let done = args.done_with_host_buffer;
        match Buffer::from_raw(client, args.buffer, "PJRT_Client_BufferFromHostBuffer") {
            Ok(b) => Ok((b, done)),
            Err(e) => {
                // SAFETY: the event is ours; awaited and destroyed once.
                let _ = unsafe {
                    client
                        .api()
                        .await_and_destroy_event(done, "done_with_host_buffer")
                };
                Err(e)
            }
        }
    }

    /// Copies `data` (dense, row-major, native-endian elements of `element_type`) to `device`.
    ///
    /// Uses `kImmutableUntilTransferCompletes` and waits for the plugin's "done with host
    /// buffer" event before returning, so `data` is free to reuse afterwards.
    pub fn from_host(
        client: &Client,
        data: &[u8],
        element_type: ElementType,
        dims: &[i64],
        device: &Device,
    ) -> Result<Buffer> {
        // SAFETY: `data` stays borrowed until the event has been awaited below.
        let (buffer, done) = unsafe {
            Self::from_host_with(
                client,
                data,
                element_type,
                dims,
                device,
                sys::PJRT_HostBufferSemantics_kImmutableUntilTransferCompletes,
            )
        }?;
        // SAFETY: the event is ours; awaited and destroyed once.
        unsafe {
            client.api().await_and_destroy_event(
                done,
                "PJRT_Client_BufferFromHostBuffer (done_with_host_buffer)",
            )
        }?;
        Ok(buffer)
    }

    /// Hands `data` to `device` with `kImmutableZeroCopy`: a plugin whose device memory is host
    /// memory (XLA CPU) may use the bytes as the buffer itself instead of copying them; others
    /// copy. The buffer owns `data` and frees it after the plugin reports it done with it.
    pub fn from_host_owned(
        client: &Client,
        data: AlignedBytes,
        element_type: ElementType,
        dims: &[i64],
        device: &Device,
    ) -> Result<Buffer> {
        // SAFETY: `data` moves into the returned buffer, which keeps it alive and unmodified
        // until the event has fired (see `Drop`).
        let (mut buffer, done) = unsafe {
            Self::from_host_with(
                client,
                data.as_slice(),
                element_type,
                dims,
                device,
                sys::PJRT_HostBufferSemantics_kImmutableZeroCopy,
            )
        }?;
        buffer.host = Some(HostBacking { done, _bytes: data });
        Ok(buffer)
    }

    /// Typed convenience for [`Buffer::from_host`].
    pub fn from_slice<T: NativeType>(
        client: &Client,
        data: &[T],
        dims: &[i64],
        device: &Device,
    ) -> Result<Buffer> {
        let mut bytes = Vec::with_capacity(data.len() * T::SIZE);
        for &x in data {
            x.write_ne(&mut bytes);
        }
        Buffer::from_host(client, &bytes, T::ELEMENT_TYPE, dims, device)
    }

    /// The client this buffer belongs to.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Copies the buffer to host memory (dense, row-major) and waits for the copy.
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let mut args = sys::PJRT_Buffer_ToHostBuffer_Args::new();
        args.src = self.raw;
        args.host_layout = ptr::null_mut();
        args.dst = ptr::null_mut();
        // SAFETY: live buffer; with a null `dst` the call only reports the size.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_ToHostBuffer, &mut args) }?;
        let size = args.dst_size;
        let mut out = vec![0u8; size];
        let mut args = sys::PJRT_Buffer_ToHostBuffer_Args::new();
        args.src = self.raw;
        args.host_layout = ptr::null_mut();
        // `dst` must be non-null for the copy; a 1-byte dummy serves empty arrays.
        let mut dummy = [0u8; 1];
        args.dst = if size == 0 {
            dummy.as_mut_ptr().cast()
        } else {
            out.as_mut_ptr().cast()
        };
        args.dst_size = size;
        // SAFETY: live buffer; `out` (or `dummy`) has `size` writable bytes and is not touched
        // until the event has been awaited below (also on the error path: the event is awaited
        // before `out` can be dropped).
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_ToHostBuffer, &mut args) }?;
        // SAFETY: the event is ours; awaited and destroyed once.
        unsafe {
            self.api()
                .await_and_destroy_event(args.event, "PJRT_Buffer_ToHostBuffer")
        }?;
        Ok(out)
    }

    /// Typed convenience for [`Buffer::to_host`]; fails if the element type differs.
    pub fn to_vec<T: NativeType>(&self) -> Result<Vec<T>> {
        let ty = self.element_type()?;
        if ty != T::ELEMENT_TYPE {
            return Err(Error::InvalidArgument(format!(
                "buffer holds {ty:?}, not {:?}",
                T::ELEMENT_TYPE
            )));
        }
        let bytes = self.to_host()?;
        Ok(bytes.chunks_exact(T::SIZE).map(T::read_ne).collect())
    }

    /// Array dimensions.
    pub fn dims(&self) -> Result<Vec<i64>> {
        let mut args = sys::PJRT_Buffer_Dimensions_Args::new();
        args.buffer = self.raw;
        // SAFETY: live buffer.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_Dimensions, &mut args) }?;
        // SAFETY: the dims have the lifetime of the buffer; copied immediately.
        Ok(unsafe { api::slice(args.dims, args.num_dims) }.to_vec())
    }

    /// Element type.
    pub fn element_type(&self) -> Result<ElementType> {
        let mut args = sys::PJRT_Buffer_ElementType_Args::new();
        args.buffer = self.raw;
        // SAFETY: live buffer.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_ElementType, &mut args) }?;
        ElementType::from_raw(args.type_).ok_or_else(|| {
            Error::Unexpected(format!("unsupported PJRT_Buffer_Type {}", args.type_))
        })
    }

    /// Bytes of device storage.
    pub fn on_device_size(&self) -> Result<usize> {
        let mut args = sys::PJRT_Buffer_OnDeviceSizeInBytes_Args::new();
        args.buffer = self.raw;
        // SAFETY: live buffer.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_OnDeviceSizeInBytes, &mut args) }?;
        Ok(args.on_device_size_in_bytes)
    }

    /// True once the buffer was deleted ([`Buffer::delete`]) or donated to an execution.
    pub fn is_deleted(&self) -> Result<bool> {
        let mut args = sys::PJRT_Buffer_IsDeleted_Args::new();
        args.buffer = self.raw;
        // SAFETY: live buffer handle (valid even after deletion/donation).
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_IsDeleted, &mut args) }?;
        Ok(args.is_deleted)
    }

    /// Frees the device memory now (the handle stays valid for `is_deleted`).
    pub fn delete(&self) -> Result<()> {
        let mut args = sys::PJRT_Buffer_Delete_Args::new();
        args.buffer = self.raw;
        // SAFETY: live buffer handle.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_Delete, &mut args) }
    }

    /// The device holding the buffer.
    pub fn device(&self) -> Result<Device> {
        let mut args = sys::PJRT_Buffer_Device_Args::new();
        args.buffer = self.raw;
        // SAFETY: live buffer.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_Device, &mut args) }?;
        self.client
            .device_from_raw(args.device)
            .ok_or_else(|| Error::Unexpected("PJRT_Buffer_Device returned null".into()))
    }

    /// Copies the buffer to another device of the same client.
    pub fn copy_to_device(&self, device: &Device) -> Result<Buffer> {
        if !device.client.same_as(&self.client) {
            return Err(Error::InvalidArgument(
                "the device belongs to another client".into(),
            ));
        }
        let mut args = sys::PJRT_Buffer_CopyToDevice_Args::new();
        args.buffer = self.raw;
        args.dst_device = device.raw;
        // SAFETY: live buffer and device of the same client.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_CopyToDevice, &mut args) }?;
        Buffer::from_raw(&self.client, args.dst_buffer, "PJRT_Buffer_CopyToDevice")
    }

    /// Waits until the buffer's data is ready (or reports the error that prevented it).
    pub fn block_until_ready(&self) -> Result<()> {
        let mut args = sys::PJRT_Buffer_ReadyEvent_Args::new();
        args.buffer = self.raw;
        // SAFETY: live buffer.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_ReadyEvent, &mut args) }?;
        // SAFETY: the event is ours; awaited and destroyed once.
        unsafe {
            self.api()
                .await_and_destroy_event(args.event, "PJRT_Buffer_ReadyEvent")
        }
    }

    /// Platform-dependent address of the data (for checking in-place updates; never
    /// dereference it).
    pub fn unsafe_pointer(&self) -> Result<usize> {
        let mut args = sys::PJRT_Buffer_UnsafePointer_Args::new();
        args.buffer = self.raw;
        // SAFETY: live buffer.
        unsafe { pjrt_call!(self.api(), PJRT_Buffer_UnsafePointer, &mut args) }?;
        Ok(args.buffer_pointer)
    }
}
