//! Persistent cache of compiled executables in `VLLM_XLA_CACHE_PATH`, shared by every pod that
//! mounts the same bucket: entries are keyed by everything that changes the binary (plugin
//! platform and version, device kind and count, program text, compile options), written to a
//! temporary file and renamed into place (no locks: GCS FUSE does not honour them), and a
//! damaged or mismatched entry is ignored with a warning and recompiled.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"TPUSXLA1";

pub struct CompileCache {
    dir: PathBuf,
}

/// What identifies one executable.
pub struct CacheKey {
    pub hex: String,
}

impl CacheKey {
    pub fn new(environment: &str, program: &str, options: &[u8]) -> CacheKey {
        let mut h = Sha256::new();
        for part in [environment.as_bytes(), program.as_bytes(), options] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        CacheKey {
            hex: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit(Vec<u8>),
    Miss,
    /// Present but unusable (truncated, foreign, other key): recompile and overwrite.
    Invalid(String),
}

impl CompileCache {
    pub fn new(dir: &Path) -> std::io::Result<CompileCache> {
        std::fs::create_dir_all(dir)?;
        Ok(CompileCache {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn entry_path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("tpuserve-{}.xla", key.hex))
    }

    pub fn get(&self, key: &CacheKey) -> Lookup {
        let path = self.entry_path(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Invalid(format!("cannot read {}: {e}", path.display())),
        };
        let header = MAGIC.len() + 64 + 8;
        if bytes.len() < header || &bytes[..MAGIC.len()] != MAGIC {
            return Lookup::Invalid(format!("{} is not a tpuserve cache entry", path.display()));
        }
        if &bytes[MAGIC.len()..MAGIC.len() + 64] != key.hex.as_bytes() {
            return Lookup::Invalid(format!("{} belongs to another key", path.display()));
        }
        let len_bytes: [u8; 8] = bytes[MAGIC.len() + 64..header].try_into().expect("8 bytes");
        let len = u64::from_le_bytes(len_bytes) as usize;
        if bytes.len() != header + len {
            return Lookup::Invalid(format!("{} is truncated", path.display()));
        }
        Lookup::Hit(bytes[header..].to_vec())
    }

    /// Writes atomically: a unique temp file in the same directory, then rename.
    pub fn put(&self, key: &CacheKey, payload: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(
            ".tpuserve-{}.{}.{}.tmp",
            key.hex,
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(key.hex.as_bytes())?;
            f.write_all(&(payload.len() as u64).to_le_bytes())?;
            f.write_all(payload)?;
            f.sync_all()?;
        }
        let res = std::fs::rename(&tmp, self.entry_path(key));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let c = CompileCache::new(dir.path()).unwrap();
        let k = CacheKey::new("cpu 1", "module {}", b"opts");
        assert_eq!(c.get(&k), Lookup::Miss);
        c.put(&k, b"payload").unwrap();
        assert_eq!(c.get(&k), Lookup::Hit(b"payload".to_vec()));
        let p = c.entry_path(&k);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 2);
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(c.get(&k), Lookup::Invalid(m) if m.contains("truncated")));
        let other = CacheKey::new("cpu 2", "module {}", b"opts");
        assert_ne!(other.hex, k.hex);
        std::fs::copy(&p, c.entry_path(&other)).unwrap();
        assert!(matches!(c.get(&other), Lookup::Invalid(m) if m.contains("another key")));
    }
}
