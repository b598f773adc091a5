//! Errors returned by this crate.

use std::path::PathBuf;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Status code of a plugin error (`PJRT_Error_Code`, the absl status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
    /// A code this crate does not know (or `OK`, which a plugin should never attach to an error).
    Other(u32),
}

impl ErrorCode {
    pub(crate) fn from_raw(code: u32) -> Self {
        match code {
            1 => Self::Cancelled,
            2 => Self::Unknown,
            3 => Self::InvalidArgument,
            4 => Self::DeadlineExceeded,
            5 => Self::NotFound,
            6 => Self::AlreadyExists,
            7 => Self::PermissionDenied,
            8 => Self::ResourceExhausted,
            9 => Self::FailedPrecondition,
            10 => Self::Aborted,
            11 => Self::OutOfRange,
            12 => Self::Unimplemented,
            13 => Self::Internal,
            14 => Self::Unavailable,
            15 => Self::DataLoss,
            16 => Self::Unauthenticated,
            other => Self::Other(other),
        }
    }
}

/// Everything that can go wrong talking to a PJRT plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error reported by the plugin (a `PJRT_Error`), with the plugin's own message.
    #[error("{function} failed ({code:?}): {message}")]
    Pjrt {
        /// The C API function that returned the error (or whose event reported it).
        function: &'static str,
        code: ErrorCode,
        message: String,
    },
    /// `dlopen` of the plugin or the `GetPjrtApi` lookup failed.
    #[error("cannot load PJRT plugin {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: libloading::Error,
    },
    /// The plugin's `PJRT_Api` is unusable (null, truncated, or an incompatible major version).
    #[error("PJRT plugin {path}: {reason}")]
    IncompatiblePlugin { path: PathBuf, reason: String },
    /// The plugin's `PJRT_Api` table does not provide a function this crate needs.
    #[error("the PJRT plugin does not implement {0}")]
    Unimplemented(&'static str),
    /// A caller-side mistake detected before calling the plugin (sizes, shapes, mixed clients...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The plugin returned something this crate cannot represent (unknown element type, null
    /// output...).
    #[error("unexpected value from the PJRT plugin: {0}")]
    Unexpected(String),
}

impl Error {
    /// The plugin's status code, for [`Error::Pjrt`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Pjrt { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The plugin's message, for [`Error::Pjrt`].
    pub fn plugin_message(&self) -> Option<&str> {
        match self {
            Error::Pjrt { message, .. } => Some(message),
            _ => None,
        }
    }
}
