//! Models from the Hugging Face Hub, stored exactly as `huggingface_hub` (and so vLLM) stores
//! them: `<cache>/models--org--name/{blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>,
//! refs/<revision>}`. A cache written by vLLM is used as is, and vLLM can use one written here.
//!
//! Downloads fetch only what tpuserve loads (config, tokenizer, safetensors), several files at
//! once, resume partial files with HTTP ranges, verify sizes and sha256 etags, and publish each
//! file by an atomic rename — no file locks, so several processes (pods sharing a GCS FUSE bucket)
//! can download into one folder at the same time.
//!
//! Environment (as `huggingface_hub`): `HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN` (or the token file
//! under `HF_HOME`), `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HUB_CACHE` / `HF_HOME`.

pub mod cache;
mod client;
mod download;
mod error;
mod progress;

use std::path::{Path, PathBuf};

pub use download::{select_files, snapshot_download};
pub use error::{HubError, Result};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A hub token; `Debug` never shows it.
#[derive(Clone)]
pub struct Token {
    value: String,
    /// Where it came from (`HF_TOKEN`, a token file, ...), for error messages.
    pub source: String,
}

impl Token {
    pub fn new(value: impl Into<String>, source: impl Into<String>) -> Token {
        Token {
            value: value.into(),
            source: source.into(),
        }
    }

    pub(crate) fn secret(&self) -> &str {
        &self.value
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(<redacted> from {})", self.source)
    }
}

/// Where and how to download.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub's base URL, without a trailing slash.
    pub endpoint: String,
    pub token: Option<Token>,
    /// Never touch the network; use the cache only.
    pub offline: bool,
    /// The folder holding `models--org--name` folders.
    pub cache_dir: PathBuf,
    /// Files downloaded at the same time.
    pub max_workers: usize,
    /// Seconds since its last write after which someone else's partial file is taken over.
    pub stale_partial_secs: u64,
    /// Seconds between progress log lines.
    pub progress_every_secs: f64,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_true(name: &str) -> bool {
    env_nonempty(name).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = env_nonempty("HF_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = env_nonempty("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("huggingface");
    }
    let home = env_nonempty("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/huggingface")
}

/// The default hub cache: `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, else `<hf_home>/hub`.
pub fn default_cache_dir() -> PathBuf {
    env_nonempty("HF_HUB_CACHE")
        .or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// The token as `huggingface_hub` finds it: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, then the
/// token file (`HF_TOKEN_PATH`, else `<hf_home>/token`).
pub fn token_from_env() -> Option<Token> {
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Some(v) = env_nonempty(var) {
            return Some(Token::new(v.trim(), var));
        }
    }
    let path = env_nonempty("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("token"));
    let v = std::fs::read_to_string(&path).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| Token::new(v, format!("the token file {}", path.display())))
}

impl HubConfig {
    /// From the environment; `download_dir` (vLLM's `--download-dir`) replaces the cache dir.
    pub fn from_env(download_dir: Option<&Path>) -> HubConfig {
        HubConfig {
            endpoint: env_nonempty("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            token: token_from_env(),
            offline: env_true("HF_HUB_OFFLINE"),
            cache_dir: download_dir
                .map(Path::to_path_buf)
                .unwrap_or_else(default_cache_dir),
            max_workers: env_nonempty("TPUSERVE_HUB_MAX_WORKERS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(8),
            stale_partial_secs: 120,
            progress_every_secs: 2.0,
        }
    }
}

/// Whether `s` reads as a hub repository id: `name` or `org/name` with the hub's characters.
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.is_empty() || parts.len() > 2 {
        return false;
    }
    parts.iter().all(|p| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && !p.contains("--")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    })
}

/// vLLM's model argument: an existing local path (folder or `.gguf` file) is used as is;
/// otherwise a hub id is looked up in / downloaded into the cache, and the snapshot folder
/// returned.
pub fn resolve_model(model: &str, revision: Option<&str>, cfg: &HubConfig) -> Result<PathBuf> {
    let p = PathBuf::from(model);
    if p.exists() {
        return Ok(p);
    }
    let looks_local = model.starts_with(['/', '.', '~'])
        || model.ends_with(".gguf")
        || model.ends_with(".safetensors")
        || model.matches('/').count() > 1;
    if looks_local {
        return Err(HubError::LocalPathMissing(p));
    }
    if !is_repo_id(model) {
        return Err(HubError::InvalidRepoId(model.to_string()));
    }
    snapshot_download(cfg, model, revision.unwrap_or("main"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("meta-llama/Llama-3.1-70B"));
        assert!(is_repo_id("gpt2"));
        assert!(is_repo_id("org/tiny"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("org/../x"));
        assert!(!is_repo_id("org/"));
        assert!(!is_repo_id("org--x/y"));
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new("hf_abcdef", "HF_TOKEN");
        let s = format!("{t:?}");
        assert!(!s.contains("hf_abcdef"), "{s}");
    }

    #[test]
    fn missing_local_paths_are_not_hub_ids() {
        let cfg = HubConfig::from_env(Some(Path::new("/nonexistent")));
        let e = resolve_model("/no/such/model.gguf", None, &cfg).unwrap_err();
        assert!(matches!(e, HubError::LocalPathMissing(_)), "{e}");
    }
}
