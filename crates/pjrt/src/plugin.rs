//! Loading a PJRT plugin shared library.

use std::collections::HashMap;
use std::fmt;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::api::{self, pjrt_call, Api, Args};
use crate::error::{Error, Result};
use crate::sys;

/// A value of a named option or attribute (`PJRT_NamedValue`).
#[derive(Debug, Clone, PartialEq)]
pub enum NamedValue {
    Str(String),
    I64(i64),
    I64List(Vec<i64>),
    F32(f32),
    Bool(bool),
}

impl From<i64> for NamedValue {
    fn from(v: i64) -> Self {
        Self::I64(v)
    }
}
impl From<bool> for NamedValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}
impl From<f32> for NamedValue {
    fn from(v: f32) -> Self {
        Self::F32(v)
    }
}
impl From<&str> for NamedValue {
    fn from(v: &str) -> Self {
        Self::Str(v.to_owned())
    }
}
impl From<String> for NamedValue {
    fn from(v: String) -> Self {
        Self::Str(v)
    }
}
impl From<Vec<i64>> for NamedValue {
    fn from(v: Vec<i64>) -> Self {
        Self::I64List(v)
    }
}

/// Builds the C array for a list of options. The returned structs point into `options`, which
/// must outlive every use of them.
pub(crate) fn named_values_to_c(options: &[(&str, NamedValue)]) -> Vec<sys::PJRT_NamedValue> {
    options
        .iter()
        .map(|(name, value)| {
            let mut nv = sys::PJRT_NamedValue::new();
            nv.name = name.as_ptr().cast();
            nv.name_size = name.len();
            match value {
                NamedValue::Str(s) => {
                    nv.type_ = sys::PJRT_NamedValue_kString;
                    nv.__bindgen_anon_1.string_value = s.as_ptr().cast();
                    nv.value_size = s.len();
                }
                NamedValue::I64(v) => {
                    nv.type_ = sys::PJRT_NamedValue_kInt64;
                    nv.__bindgen_anon_1.int64_value = *v;
                    nv.value_size = 1;
                }
                NamedValue::I64List(v) => {
                    nv.type_ = sys::PJRT_NamedValue_kInt64List;
                    nv.__bindgen_anon_1.int64_array_value = v.as_ptr();
                    nv.value_size = v.len();
                }
                NamedValue::F32(v) => {
                    nv.type_ = sys::PJRT_NamedValue_kFloat;
                    nv.__bindgen_anon_1.float_value = *v;
                    nv.value_size = 1;
                }
                NamedValue::Bool(v) => {
                    nv.type_ = sys::PJRT_NamedValue_kBool;
                    nv.__bindgen_anon_1.bool_value = *v;
                    nv.value_size = 1;
                }
            }
            nv
        })
        .collect()
}

/// Copies a C array of named values returned by the plugin. Entries of unknown type are skipped.
///
/// # Safety
/// `ptr` must be null or point to `len` valid `PJRT_NamedValue`s whose strings/arrays are valid.
pub(crate) unsafe fn named_values_from_c(
    ptr: *const sys::PJRT_NamedValue,
    len: usize,
) -> Vec<(String, NamedValue)> {
    // SAFETY: forwarded from the caller.
    let values = unsafe { api::slice(ptr, len) };
    values
        .iter()
        .filter_map(|nv| {
            // SAFETY: the caller guarantees the name and the union member selected by `type_`.
            unsafe {
                let name = api::lossy_string(nv.name, nv.name_size);
                let value = match nv.type_ {
                    sys::PJRT_NamedValue_kString => NamedValue::Str(api::lossy_string(
                        nv.__bindgen_anon_1.string_value,
                        nv.value_size,
                    )),
                    sys::PJRT_NamedValue_kInt64 => NamedValue::I64(nv.__bindgen_anon_1.int64_value),
                    sys::PJRT_NamedValue_kInt64List => NamedValue::I64List(
                        api::slice(nv.__bindgen_anon_1.int64_array_value, nv.value_size).to_vec(),
                    ),
                    sys::PJRT_NamedValue_kFloat => NamedValue::F32(nv.__bindgen_anon_1.float_value),
                    sys::PJRT_NamedValue_kBool => NamedValue::Bool(nv.__bindgen_anon_1.bool_value),
                    other => {
                        tracing::debug!("skipping named value {name:?} of unknown type {other}");
                        return None;
                    }
                };
                Some((name, value))
            }
        })
        .collect()
}

/// A loaded PJRT plugin (`dlopen` + `GetPjrtApi` + `PJRT_Plugin_Initialize`).
///
/// Cheap to clone. Loading the same path twice returns the same plugin: a plugin is initialized
/// once per process and is never unloaded (XLA plugins start threads and register globals that
/// do not survive `dlclose`).
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

pub(crate) struct PluginInner {
    pub(crate) api: Api,
    path: PathBuf,
    /// Kept loaded for the life of the process: never `dlclose`d.
    _library: ManuallyDrop<libloading::Library>,
}

// `Plugin` is Send + Sync: `Api` is (immutable table of thread-safe functions), `PathBuf` is,
// and `libloading::Library` is Send + Sync.

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.api_version();
        f.debug_struct("Plugin")
            .field("path", &self.inner.path)
            .field("api_version", &format_args!("{major}.{minor}"))
            .finish()
    }
}

fn loaded_plugins() -> &'static Mutex<HashMap<PathBuf, Plugin>> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Plugin>>> = OnceLock::new();
    LOADED.get_or_init(|| Mutex::new(HashMap::new()))
}

impl Plugin {
    /// Loads the plugin at `path`, checks its API version and initializes it.
    pub fn load(path: impl AsRef<Path>) -> Result<Plugin> {
        let path = path.as_ref();
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        // Held across the load so that two threads cannot initialize the same plugin twice.
        let mut loaded = loaded_plugins()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(plugin) = loaded.get(&key) {
            return Ok(plugin.clone());
        }
        let plugin = Self::load_uncached(&key)?;
        loaded.insert(key, plugin.clone());
        Ok(plugin)
    }

    fn load_uncached(path: &Path) -> Result<Plugin> {
        let load_err = |source| Error::Load {
            path: path.to_path_buf(),
            source,
        };
        let incompatible = |reason: String| Error::IncompatiblePlugin {
            path: path.to_path_buf(),
            reason,
        };
        // SAFETY: loading a shared library runs its initializers; a PJRT plugin is meant to be
        // dlopen'ed this way by frameworks.
        let library = unsafe { libloading::Library::new(path) }.map_err(load_err)?;
        let raw_api = {
            // SAFETY: `GetPjrtApi` is declared by the PJRT plugin interface as
            // `const PJRT_Api* GetPjrtApi(void)`.
            let get_api: libloading::Symbol<unsafe extern "C" fn() -> *const sys::PJRT_Api> =
                unsafe { library.get(b"GetPjrtApi\0") }.map_err(load_err)?;
            // SAFETY: see above; takes no arguments.
            unsafe { get_api() }
        };
        if raw_api.is_null() {
            return Err(incompatible("GetPjrtApi returned null".into()));
        }
        // SAFETY: non-null result of GetPjrtApi; the library stays loaded forever.
        let api = unsafe { Api::from_raw(raw_api) }.map_err(incompatible)?;
        let (major, minor) = api.version();
        let (our_major, our_minor) = (sys::PJRT_API_MAJOR as i32, sys::PJRT_API_MINOR as i32);
        tracing::info!(
            plugin = %path.display(),
            "PJRT plugin API version {major}.{minor} (bindings built for {our_major}.{our_minor}, \
             PJRT_Api struct_size {} vs ours {})",
            api.plugin_struct_size(),
            std::mem::size_of::<sys::PJRT_Api>(),
        );
        if major != our_major {
            return Err(incompatible(format!(
                "PJRT C API major version {major} is not supported (bindings are for \
                 {our_major}.{our_minor})"
            )));
        }
        if minor < our_minor {
            tracing::warn!(
                "PJRT plugin {} implements C API {major}.{minor}, older than the bindings' \
                 {our_major}.{our_minor}; calls it does not know may fail",
                path.display()
            );
        }
        // Functions this crate relies on for cleanup and waiting: without them errors, events
        // and buffers could not be released safely.
        let f = api.raw();
        let required = [
            ("PJRT_Error_Destroy", f.PJRT_Error_Destroy.is_some()),
            ("PJRT_Error_Message", f.PJRT_Error_Message.is_some()),
            ("PJRT_Error_GetCode", f.PJRT_Error_GetCode.is_some()),
            ("PJRT_Event_Await", f.PJRT_Event_Await.is_some()),
            ("PJRT_Event_Destroy", f.PJRT_Event_Destroy.is_some()),
        ];
        if let Some((name, _)) = required.iter().find(|(_, present)| !present) {
            return Err(incompatible(format!("the PJRT_Api table lacks {name}")));
        }
        let inner = PluginInner {
            api,
            path: path.to_path_buf(),
            _library: ManuallyDrop::new(library),
        };
        if inner.api.raw().PJRT_Plugin_Initialize.is_some() {
            let mut args = sys::PJRT_Plugin_Initialize_Args::new();
            // SAFETY: no pointers in the arguments.
            unsafe { pjrt_call!(inner.api, PJRT_Plugin_Initialize, &mut args) }?;
        }
        Ok(Plugin {
            inner: Arc::new(inner),
        })
    }

    /// The path the plugin was loaded from (canonicalized when possible).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// (major, minor) PJRT C API version the plugin implements.
    pub fn api_version(&self) -> (i32, i32) {
        self.inner.api.version()
    }

    /// Plugin attributes such as `xla_version`, `stablehlo_current_version`.
    pub fn attributes(&self) -> Result<Vec<(String, NamedValue)>> {
        let api = &self.inner.api;
        let mut args = sys::PJRT_Plugin_Attributes_Args::new();
        // SAFETY: output-only arguments.
        unsafe { pjrt_call!(api, PJRT_Plugin_Attributes, &mut args) }?;
        // SAFETY: the attributes have the lifetime of the process.
        Ok(unsafe { named_values_from_c(args.attributes, args.num_attributes) })
    }

    pub(crate) fn api(&self) -> &Api {
        &self.inner.api
    }
}
