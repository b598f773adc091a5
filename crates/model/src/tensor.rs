//! Host-side weight tensors and the trait every weight format implements.

use std::borrow::Cow;

use half::{bf16, f16};

use crate::dequant::{dequantize, GgmlType};
use crate::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A weight as stored on the host: borrowed straight from a memory map when the file's
/// layout already matches, owned when it had to be dequantized or rearranged.
#[derive(Debug, Clone)]
pub struct HostTensor<'a> {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> HostTensor<'a> {
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> HostTensor<'static> {
        let mut bytes = Vec::with_capacity(data.len() * 4);
        for v in data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        HostTensor {
            shape,
            dtype: DType::F32,
            bytes: Cow::Owned(bytes),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values widened to f32 (exact for every supported dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = &self.bytes;
        match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }

    /// The values as bf16 bits (round to nearest even from f32 / f16).
    pub fn to_bf16_bits(&self) -> Vec<u16> {
        match self.dtype {
            DType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
            _ => self
                .to_f32()
                .into_iter()
                .map(|v| bf16::from_f32(v).to_bits())
                .collect(),
        }
    }
}

/// A 2-D weight kept in a ggml block format (`Q4_0`, `Q4_1`, `Q8_0`, ...): `shape` is
/// `[rows, cols]` in HF order, each row is `cols / 32` whole blocks, rows in HF order (GGUF's
/// rotary permutation of q/k rows already undone). Runners with block kernels use these in
/// place instead of a dequantised f32 copy.
#[derive(Debug, Clone)]
pub struct QuantTensor<'a> {
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    pub bytes: Cow<'a, [u8]>,
}

impl QuantTensor<'_> {
    /// The values dequantised to f32 (the reference the block kernels are checked against).
    pub fn to_f32(&self) -> Result<Vec<f32>, String> {
        dequantize(self.ggml_type, &self.bytes, self.shape.iter().product())
    }
}

/// A source of named weights in Hugging Face Llama naming (`model.layers.0.self_attn.q_proj.weight`).
/// GGUF sources translate their names and layouts into this convention.
pub trait WeightSource: Send + Sync {
    /// A short human description (file path) used in error messages.
    fn describe(&self) -> String;
    fn contains(&self, name: &str) -> bool;
    fn tensor(&self, name: &str) -> Result<HostTensor<'_>, ModelError>;
    fn tensor_names(&self) -> Vec<String>;
    /// `--load-format dummy`: no checkpoint behind these tensors; a device runner fills its
    /// buffers on the device instead of asking for them.
    fn is_dummy(&self) -> bool {
        false
    }
    /// Starts reading these tensors' bytes in the background (the loader asks for the next
    /// argument's tensors while the current one uploads). A no-op where nothing is mapped.
    fn prefetch(&self, _names: &[String]) {}
    /// The dtype [`WeightSource::tensor`] returns for `name`. The default reads the tensor;
    /// sources that know it without reading (or dequantising) override this.
    fn tensor_dtype(&self, name: &str) -> Result<DType, ModelError> {
        Ok(self.tensor(name)?.dtype)
    }
    /// `name` in its stored block-quantised form, or `None` where the source does not store it
    /// quantised (float tensors, formats without blocks): then use [`WeightSource::tensor`].
    fn quantized(&self, _name: &str) -> Result<Option<QuantTensor<'_>>, ModelError> {
        Ok(None)
    }
}

impl dyn WeightSource + '_ {
    /// Fetches a tensor and checks its shape.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<HostTensor<'_>, ModelError> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                actual: t.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }
}
