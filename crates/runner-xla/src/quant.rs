//! int8 weight-only quantisation (`--quantization int8`): every projection matrix and the LM
//! head is held on the devices as int8 with one f32 scale per output channel (symmetric,
//! scale = max |w| / 127 over the channel's inputs), quantised on the host at load from
//! whatever the checkpoint holds (f32, bf16, f16, or a GGUF type the model crate dequantised
//! to f32). The step program converts the int8 matrix to the activation dtype inside the dot
//! and multiplies the dot's f32 result by the scales, so a decode step reads half the weight
//! bytes of bf16. The embedding table (a gather, not read whole per step) and the norms stay
//! as they are.

use rayon::prelude::*;
use tpuserve_model::HostTensor;

use crate::hlo::Elem;

/// How the projection matrices and the LM head are stored on the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Quantization {
    /// In the weight dtype (`--dtype`).
    #[default]
    None,
    /// int8 with per-output-channel f32 scales, dequantised inside each dot.
    Int8,
}

impl Quantization {
    /// The method named on the command line (`--quantization`), if tpuserve implements it.
    pub fn from_flag(s: &str) -> Option<Quantization> {
        match s.trim().to_ascii_lowercase().as_str() {
            // tpu_int8 is vLLM's name for the same scheme on TPU (weight-only int8).
            "int8" | "tpu_int8" => Some(Quantization::Int8),
            _ => None,
        }
    }

    pub fn is_int8(self) -> bool {
        self == Quantization::Int8
    }
}

/// The KV cache's element type (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvCacheDtype {
    /// The activations' dtype (`--dtype`).
    #[default]
    Auto,
    /// fp8 e4m3 (vLLM's `fp8` / `fp8_e4m3`), no scale (vLLM's default scale of 1.0): half
    /// the bytes of a bf16 cache, so twice the tokens and half the page reads per step.
    Fp8E4m3,
    /// fp8 e5m2: more range, less precision.
    Fp8E5m2,
}

impl KvCacheDtype {
    /// The value named on the command line, if tpuserve implements it.
    pub fn from_flag(s: &str) -> Option<KvCacheDtype> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(KvCacheDtype::Auto),
            "fp8" | "fp8_e4m3" => Some(KvCacheDtype::Fp8E4m3),
            "fp8_e5m2" => Some(KvCacheDtype::Fp8E5m2),
            _ => None,
        }
    }

    /// The cache's element type when the activations are `w`.
    pub fn elem(self, w: Elem) -> Elem {
        match self {
            KvCacheDtype::Auto => w,
            KvCacheDtype::Fp8E4m3 => Elem::F8E4M3FN,
            KvCacheDtype::Fp8E5m2 => Elem::F8E5M2,
        }
    }

    pub fn is_fp8(self) -> bool {
        self != KvCacheDtype::Auto
    }
}

/// A `[rows, cols]` matrix (one row per output channel) as int8 and its per-row scales:
/// element `(r, c)` is `value(r * cols + c) as f32 * scales[r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// The int8 values as two's-complement bytes, the form a device buffer takes.
    pub bytes: Vec<u8>,
    pub scales: Vec<f32>,
}

impl Quantized {
    pub fn value(&self, i: usize) -> i8 {
        self.bytes[i] as i8
    }
}

/// Quantises each row of a `[rows, cols]` tensor (HF layout: rows are output channels).
/// The rounding is to nearest, ties to even, so a value sits within half a step of its
/// dequantised form; an all-zero row gets scale 0 (it dequantises to zeros exactly).
pub fn quantize_rows(t: &HostTensor<'_>, rows: usize, cols: usize) -> Quantized {
    let es = t.dtype.size_bytes();
    debug_assert_eq!(t.bytes.len(), rows * cols * es);
    let mut bytes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows];
    bytes
        .par_chunks_mut(cols.max(1))
        .zip(scales.par_iter_mut())
        .enumerate()
        .for_each_init(
            || vec![0f32; cols],
            |row, (r, (q, scale))| {
                let src = &t.bytes[r * cols * es..(r + 1) * cols * es];
                for (x, c) in row.iter_mut().zip(src.chunks_exact(es)) {
                    *x = crate::weights::widen(t.dtype, c);
                }
                *scale = quantize_row(row, q);
            },
        );
    Quantized { bytes, scales }
}

/// One channel: its scale, and `q` filled with the rounded, clamped quotients.
fn quantize_row(row: &[f32], q: &mut [u8]) -> f32 {
    let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let scale = amax / 127.0;
    for (o, &x) in q.iter_mut().zip(row) {
        // x / scale is within ±127 up to one rounding step; the clamp keeps it there.
        *o = (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8 as u8;
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpuserve_model::DType;

    /// Deterministic values with a spread of magnitudes per row (a few outliers, a zero row).
    fn sample(rows: usize, cols: usize) -> Vec<f32> {
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..rows * cols)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                let row = i / cols;
                if row == 3 {
                    return 0.0;
                }
                let outlier = if i % 97 == 5 { 40.0 } else { 1.0 };
                (u * outlier * (1.0 + row as f64 * 0.37)) as f32
            })
            .collect()
    }

    /// Against an f64 reference: the scale is max |w| / 127, every value dequantises within
    /// half a step (scale / 2) of the original, and the quotient is the reference's rounding
    /// (off by one only where f32 and f64 land on opposite sides of a tie).
    #[test]
    fn int8_rows_match_an_f64_reference_within_half_a_step() {
        for (rows, cols) in [(1, 1), (5, 3), (7, 33), (13, 257), (4, 1000)] {
            let vals = sample(rows, cols);
            let t = HostTensor::from_f32(vec![rows, cols], vals.clone());
            let q = quantize_rows(&t, rows, cols);
            assert_eq!(q.bytes.len(), rows * cols);
            for r in 0..rows {
                let row = &vals[r * cols..(r + 1) * cols];
                let amax = row.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                let scale = q.scales[r] as f64;
                assert!(
                    (scale - amax / 127.0).abs() <= 1e-7 * amax,
                    "{rows}x{cols} row {r}: scale {scale} vs {}",
                    amax / 127.0
                );
                for (c, &x) in row.iter().enumerate() {
                    let v = q.value(r * cols + c);
                    assert!((-127..=127).contains(&v));
                    let err = (v as f64 * scale - x as f64).abs();
                    assert!(
                        err <= scale / 2.0 * (1.0 + 1e-5),
                        "{rows}x{cols} [{r},{c}]: {x} → {v} × {scale}: error {err}"
                    );
                    if amax > 0.0 {
                        let reference = (x as f64 / (amax / 127.0)).round();
                        assert!((v as f64 - reference).abs() <= 1.0);
                    }
                }
                if amax > 0.0 {
                    // The largest magnitude maps to ±127: the whole int8 range is used.
                    assert!(row.iter().enumerate().any(|(c, &x)| {
                        (x as f64).abs() == amax && q.value(r * cols + c).unsigned_abs() == 127
                    }));
                } else {
                    assert_eq!(scale, 0.0);
                }
            }
        }
    }

    #[test]
    fn bf16_input_quantises_like_its_f32_values() {
        let (rows, cols) = (6, 45);
        let vals: Vec<f32> = sample(rows, cols)
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect();
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        let t = HostTensor {
            shape: vec![rows, cols],
            dtype: DType::BF16,
            bytes: bytes.into(),
        };
        let f = HostTensor::from_f32(vec![rows, cols], vals);
        assert_eq!(quantize_rows(&t, rows, cols), quantize_rows(&f, rows, cols));
    }

    #[test]
    fn flag_values() {
        assert_eq!(Quantization::from_flag("int8"), Some(Quantization::Int8));
        assert_eq!(Quantization::from_flag("INT8"), Some(Quantization::Int8));
        assert_eq!(Quantization::from_flag("fp8"), None);
    }
}
