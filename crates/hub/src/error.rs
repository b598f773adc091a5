//! Everything a download can fail with, worded for the person reading `kubectl logs`.

use std::path::PathBuf;

/// Errors of model resolution and download. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{0}` is not a valid Hugging Face repository id (expected `org/name`)")]
    InvalidRepoId(String),

    #[error("model path `{}` does not exist", .0.display())]
    LocalPathMissing(PathBuf),

    #[error(
        "access to `{repo}` was refused by {endpoint} (HTTP {status}{detail}): the repository is \
         gated or private and no token was sent. Set HF_TOKEN to a Hugging Face access token of \
         an account that has been granted access to the model"
    )]
    TokenMissing {
        repo: String,
        endpoint: String,
        status: u16,
        detail: String,
    },

    #[error(
        "access to `{repo}` was refused by {endpoint} (HTTP {status}{detail}): the token from \
         {source_var} is invalid, expired, or its account has not been granted access to this \
         gated model. Set HF_TOKEN to a valid token of an account with access"
    )]
    TokenRejected {
        repo: String,
        endpoint: String,
        status: u16,
        detail: String,
        source_var: String,
    },

    #[error(
        "repository `{repo}` was not found on {endpoint} (HTTP {status}): check the model id; \
         a private repository also needs HF_TOKEN"
    )]
    RepoNotFound {
        repo: String,
        endpoint: String,
        status: u16,
    },

    #[error("revision `{revision}` was not found in `{repo}` on {endpoint} (HTTP 404)")]
    RevisionNotFound {
        repo: String,
        revision: String,
        endpoint: String,
    },

    #[error("file `{file}` was not found in `{repo}` at revision {revision} (HTTP 404)")]
    EntryNotFound {
        repo: String,
        revision: String,
        file: String,
    },

    #[error("{url} answered HTTP {status}{detail}")]
    Http {
        url: String,
        status: u16,
        detail: String,
    },

    #[error("request to {url} failed: {message}")]
    Network { url: String, message: String },

    #[error(
        "HF_HUB_OFFLINE is set and `{repo}` (revision {revision}) is not in the cache at {}",
        cache.display()
    )]
    Offline {
        repo: String,
        revision: String,
        cache: PathBuf,
    },

    #[error(
        "`{repo}` has no safetensors weights (tpuserve loads *.safetensors from the hub, or a \
         local .gguf file)"
    )]
    NoWeights { repo: String },

    #[error("{}: malformed {what}: {message}", path.display())]
    Malformed {
        path: PathBuf,
        what: &'static str,
        message: String,
    },

    #[error(
        "no space left on device in {}: {needed} bytes still to download, {available} bytes \
         free. Free space there or point --download-dir at a larger volume",
        dir.display()
    )]
    DiskFull {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },

    #[error(
        "checksum mismatch for `{file}`: sha256 {actual}, the hub says {expected} (the partial \
         file was removed; the next start downloads it again)"
    )]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },

    #[error("size mismatch for `{file}`: got {actual} bytes, the hub says {expected}")]
    Size {
        file: String,
        expected: u64,
        actual: u64,
    },

    #[error("the hub gave no {what} for `{file}` ({url})")]
    MissingHeader {
        what: &'static str,
        file: String,
        url: String,
    },

    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("download interrupted")]
    Aborted,
}

impl HubError {
    /// An I/O error at `path`; "no space left" becomes [`HubError::DiskFull`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> HubError {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            let dir = path
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| path.clone());
            let available = crate::cache::free_bytes(&dir).unwrap_or(0);
            return HubError::DiskFull {
                dir,
                needed: 0,
                available,
            };
        }
        HubError::Io {
            action,
            path,
            source,
        }
    }

    /// Worth another try with the same request (connection trouble, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::Network { .. } => true,
            HubError::Http { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// The hub could not be asked at all or failed (a cached snapshot may be used instead).
    pub fn hub_unavailable(&self) -> bool {
        self.is_transient()
            || matches!(
                self,
                HubError::TokenMissing { .. } | HubError::TokenRejected { .. }
            )
    }
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;
