//! The `huggingface_hub` cache layout: `models--org--name/{blobs,snapshots,refs}`, and the
//! lock-free ways to write into it (temp file or temp link, then an atomic rename).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{HubError, Result};

/// `models--org--name`.
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// A 40-hex-digit git commit id.
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A 64-hex-digit sha256 (the etag of an LFS file).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One repository's folder in a cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub root: PathBuf,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo_id: &str) -> RepoCache {
        RepoCache {
            root: cache_dir.join(repo_folder_name(repo_id)),
        }
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.blobs().join(etag)
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn ref_path(&self, revision: &str) -> PathBuf {
        self.root.join("refs").join(revision)
    }

    /// The commit a revision names: itself if it is a commit hash, else `refs/<revision>`.
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_string());
        }
        let c = std::fs::read_to_string(self.ref_path(revision)).ok()?;
        let c = c.trim();
        (!c.is_empty()).then(|| c.to_string())
    }

    /// Records `refs/<revision>` = `commit` (temp file + rename).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.ref_path(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
            return Ok(());
        }
        let dir = path.parent().expect("ref path has a parent");
        create_dir_all(dir)?;
        let tmp = dir.join(format!(".{}.tmp", unique_suffix()));
        std::fs::write(&tmp, commit).map_err(|e| HubError::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            HubError::io("renaming into", &path, e)
        })
    }

    /// `snapshots/<commit>/<file>` → `blobs/<etag>` as a relative symlink (as huggingface_hub
    /// makes it), created under a temporary name and renamed into place. Where symlinks are not
    /// supported the blob is copied instead.
    pub fn link_snapshot_file(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let dest = self.snapshot(commit).join(file);
        let depth = file.split('/').count() + 1; // <commit>/<dirs...>/ back up to the repo root
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        if std::fs::read_link(&dest).is_ok_and(|t| t == target) {
            return Ok(dest);
        }
        let dir = dest.parent().expect("snapshot file has a parent");
        create_dir_all(dir)?;
        let name = dest.file_name().unwrap().to_string_lossy().into_owned();
        let tmp = dir.join(format!(".{name}.{}.tmp", unique_suffix()));
        let linked = std::os::unix::fs::symlink(&target, &tmp);
        if let Err(e) = linked {
            tracing::warn!(
                "cannot create a symlink in {} ({e}); copying the blob instead",
                dir.display()
            );
            std::fs::copy(self.blob(etag), &tmp)
                .map_err(|e| HubError::io("copying to", &tmp, e))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            HubError::io("renaming into", &dest, e)
        })?;
        Ok(dest)
    }
}

/// A snapshot folder tpuserve can load: a config, and weights (every shard an index names, or
/// some `*.safetensors` / `*.gguf`).
pub fn snapshot_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        return match std::fs::read(&index)
            .ok()
            .and_then(|b| crate::download::index_shards(&b).ok())
        {
            Some(shards) => !shards.is_empty() && shards.iter().all(|s| dir.join(s).is_file()),
            None => false,
        };
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        (n.ends_with(".safetensors") || n.ends_with(".gguf")) && e.path().is_file()
    })
}

/// The complete snapshot of `repo_id` at `revision` already in `cache_dir`, if any.
pub fn cached_snapshot(cache_dir: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo = RepoCache::new(cache_dir, repo_id);
    let commit = repo.commit_for(revision)?;
    let snap = repo.snapshot(&commit);
    snapshot_complete(&snap).then_some(snap)
}

pub(crate) fn create_dir_all(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| HubError::io("creating", dir, e))
}

/// `<pid>-<nanos>-<counter>`: unique among processes and calls.
pub(crate) fn unique_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct; `c` is a valid NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names() {
        assert_eq!(
            repo_folder_name("meta-llama/Llama-3.1-70B"),
            "models--meta-llama--Llama-3.1-70B"
        );
        assert!(is_commit_hash(&"a".repeat(40)));
        assert!(!is_commit_hash("main"));
    }

    #[test]
    fn snapshot_links_are_relative_and_atomic() {
        let d = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(d.path(), "org/x");
        let commit = "c".repeat(40);
        std::fs::create_dir_all(repo.blobs()).unwrap();
        std::fs::write(repo.blob("e1"), b"hello").unwrap();
        let p = repo
            .link_snapshot_file(&commit, "config.json", "e1")
            .unwrap();
        assert_eq!(
            std::fs::read_link(&p).unwrap(),
            PathBuf::from("../../blobs/e1")
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        let p = repo.link_snapshot_file(&commit, "a/b.json", "e1").unwrap();
        assert_eq!(
            std::fs::read_link(&p).unwrap(),
            PathBuf::from("../../../blobs/e1")
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        // Linking again (another process) replaces the link without error.
        repo.link_snapshot_file(&commit, "config.json", "e1")
            .unwrap();
        repo.write_ref("main", &commit).unwrap();
        assert_eq!(repo.commit_for("main").unwrap(), commit);
    }

    #[test]
    fn enospc_is_disk_full() {
        let e = HubError::io(
            "writing",
            "/tmp/x",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(e, HubError::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("no space left"), "{e}");
    }
}
