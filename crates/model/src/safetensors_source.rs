//! safetensors weights: one file or a sharded set described by `model.safetensors.index.json`,
//! memory-mapped so tensors are borrowed from the page cache rather than copied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::Dtype as StDtype;

use crate::tensor::{DType, HostTensor, WeightSource};
use crate::ModelError;

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct SafetensorsWeights {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
    desc: String,
}

impl SafetensorsWeights {
    /// Opens every `*.safetensors` file named by the index in `dir`, or the single
    /// `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let bad = |reason: String| ModelError::Safetensors {
                path: index.clone(),
                reason,
            };
            let (files, names) = parse_index(&text).map_err(bad)?;
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            let s = Self::open_files(&paths, index.display().to_string())?;
            for name in &names {
                if !s.entries.contains_key(name) {
                    return Err(bad(format!("index names `{name}` but no shard holds it")));
                }
            }
            Ok(s)
        } else {
            let single = dir.join("model.safetensors");
            let desc = single.display().to_string();
            Self::open_files(&[single], desc)
        }
    }

    pub fn open_files(paths: &[PathBuf], desc: String) -> Result<Self, ModelError> {
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: read-only map of a weight file that is not modified while served.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            entries.extend(header_entries(&mmap, i, path)?);
            maps.push(mmap);
        }
        Ok(SafetensorsWeights {
            paths: paths.to_vec(),
            maps,
            entries,
            desc,
        })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.paths
    }
}

impl WeightSource for SafetensorsWeights {
    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn tensor(&self, name: &str) -> Result<HostTensor<'_>, ModelError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                source_desc: self.desc.clone(),
            })?;
        Ok(HostTensor {
            shape: e.shape.clone(),
            dtype: e.dtype,
            bytes: std::borrow::Cow::Borrowed(&self.maps[e.file][e.start..e.end]),
        })
    }

    fn tensor_dtype(&self, name: &str) -> Result<DType, ModelError> {
        self.entries
            .get(name)
            .map(|e| e.dtype)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                source_desc: self.desc.clone(),
            })
    }

    fn prefetch(&self, names: &[String]) {
        for e in names.iter().filter_map(|n| self.entries.get(n)) {
            // Advice only: a failure costs speed, never correctness.
            let _ =
                self.maps[e.file].advise_range(memmap2::Advice::WillNeed, e.start, e.end - e.start);
        }
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }
}

/// The shard files (sorted, deduplicated) and tensor names of a `model.safetensors.index.json`.
/// A file name that could leave the model folder is refused.
pub fn parse_index(text: &str) -> Result<(Vec<String>, Vec<String>), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| "no `weight_map` object".to_string())?;
    let mut files: Vec<String> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format!("weight_map entry `{name}` is not a file name"))?;
        if file.is_empty() || file.contains('/') || file.contains('\\') || file.contains("..") {
            return Err(format!(
                "weight_map entry `{name}` points outside the model folder"
            ));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok((files, map.keys().cloned().collect()))
}

/// Checks a safetensors file held in memory the way loading does; returns its tensor count.
pub fn check_header(buf: &[u8]) -> Result<usize, ModelError> {
    header_entries(buf, 0, Path::new("<memory>")).map(|e| e.len())
}

/// The tensors of one shard, each checked to lie inside the file with the size its dtype
/// and shape imply.
fn header_entries(
    buf: &[u8],
    file: usize,
    path: &Path,
) -> Result<HashMap<String, Entry>, ModelError> {
    let bad = |reason: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        reason,
    };
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(buf).map_err(|e| {
        use safetensors::SafeTensorError as E;
        bad(match e {
            E::MetadataIncompleteBuffer | E::HeaderTooSmall => {
                format!(
                    "file is truncated or has trailing bytes ({} bytes): {e}",
                    buf.len()
                )
            }
            other => other.to_string(),
        })
    })?;
    let base = 8 + header_len;
    let mut entries = HashMap::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::UnsupportedTensorType {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (s, e) = info.data_offsets;
        let bytes = info
            .shape
            .iter()
            .try_fold(dtype.size_bytes(), |a, &d| a.checked_mul(d));
        let span = base
            .checked_add(s)
            .zip(base.checked_add(e))
            .filter(|&(start, end)| start <= end && end <= buf.len());
        let (start, end) = match (span, bytes) {
            (Some((start, end)), Some(bytes)) if end - start == bytes => (start, end),
            _ => {
                return Err(bad(format!(
                    "tensor `{name}` data [{s}, {e}) after the header does not fit the file ({} bytes; truncated?) or its shape {:?}",
                    buf.len(),
                    info.shape
                )))
            }
        };
        entries.insert(
            name,
            Entry {
                file,
                dtype,
                shape: info.shape.clone(),
                start,
                end,
            },
        );
    }
    Ok(entries)
}
