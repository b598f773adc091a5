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
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            let mut files: Vec<String> = Vec::new();
            for (name, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| bad(format!("weight_map entry `{name}` is not a file name")))?;
                if file.contains('/') || file.contains("..") {
                    return Err(bad(format!(
                        "weight_map entry `{name}` points outside the model folder"
                    )));
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
            }
            files.sort();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            let s = Self::open_files(&paths, index.display().to_string())?;
            for name in map.keys() {
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
            let bad = |reason: String| ModelError::Safetensors {
                path: path.clone(),
                reason,
            };
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                    use safetensors::SafeTensorError as E;
                    bad(match e {
                        E::MetadataIncompleteBuffer | E::HeaderTooSmall => {
                            format!("file is truncated ({} bytes): {e}", mmap.len())
                        }
                        other => other.to_string(),
                    })
                })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    StDtype::F32 => DType::F32,
                    StDtype::F16 => DType::F16,
                    StDtype::BF16 => DType::BF16,
                    other => {
                        return Err(ModelError::UnsupportedTensorType {
                            path: path.clone(),
                            tensor: name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let (s, e) = info.data_offsets;
                let (start, end) = (base + s, base + e);
                let numel: usize = info.shape.iter().product();
                if end > mmap.len() || end - start != numel * dtype.size_bytes() {
                    return Err(bad(format!(
                        "tensor `{name}` data [{start}, {end}) does not fit the file ({} bytes; truncated?)",
                        mmap.len()
                    )));
                }
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
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

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }
}
