//! ggml tensor types and their exact dequantization to f32, following the reference
//! formulas of ggml (block layouts documented per type).

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q6K,
}

/// Names of ggml types tpuserve recognises but cannot dequantize, for clear errors.
pub fn ggml_type_name(raw: u32) -> String {
    let name = match raw {
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        13 => "Q5_K",
        15 => "Q8_K",
        16..=23 | 29 => "IQ (importance-matrix) quantization",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        34 | 35 => "TQ (ternary) quantization",
        _ => "unknown",
    };
    format!("{name} (ggml type {raw})")
}

impl GgmlType {
    pub fn from_u32(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q6K => (256, 210),
        }
    }

    pub fn byte_len(self, numel: usize) -> Option<usize> {
        let (per, bytes) = self.block();
        if !numel.is_multiple_of(per) {
            return None;
        }
        (numel / per).checked_mul(bytes)
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantizes `numel` values of type `ty` from `data`.
pub fn dequantize(ty: GgmlType, data: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    let expected = ty
        .byte_len(numel)
        .ok_or_else(|| format!("{numel} elements is not a whole number of {ty:?} blocks"))?;
    if data.len() != expected {
        return Err(format!(
            "{ty:?} data is {} bytes, expected {expected}",
            data.len()
        ));
    }
    let mut out = Vec::with_capacity(numel);
    let (_, bs) = ty.block();
    match ty {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            data.chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(bs) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
                out.extend_from_slice(&y);
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(bs) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0f) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
                out.extend_from_slice(&y);
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let q51 = ty == GgmlType::Q5_1;
            for b in data.chunks_exact(bs) {
                let d = f16_at(b, 0);
                let (m, hoff) = if q51 { (f16_at(b, 2), 4) } else { (0.0, 2) };
                let qh = u32::from_le_bytes([b[hoff], b[hoff + 1], b[hoff + 2], b[hoff + 3]]);
                let qs = &b[hoff + 4..hoff + 20];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                    let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                    let x0 = ((qs[j] & 0x0f) | xh0) as i32;
                    let x1 = ((qs[j] >> 4) | xh1) as i32;
                    if q51 {
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 - 16) as f32 * d;
                        y[j + 16] = (x1 - 16) as f32 * d;
                    }
                }
                out.extend_from_slice(&y);
            }
        }
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(bs) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
        }
        GgmlType::Q4K => {
            for b in data.chunks_exact(bs) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                let mut is = 0;
                for chunk in 0..4 {
                    let q = &qs[chunk * 32..chunk * 32 + 32];
                    let (sc1, m1) = scale_min_k4(is, scales);
                    let (sc2, m2) = scale_min_k4(is + 1, scales);
                    let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                    out.extend(q.iter().map(|&v| d1 * (v & 0x0f) as f32 - mm1));
                    out.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - mm2));
                    is += 2;
                }
            }
        }
        GgmlType::Q6K => {
            for b in data.chunks_exact(bs) {
                let (q, sc, d) = (q6_k_values(b), &b[192..208], f16_at(b, 208));
                out.extend(
                    q.iter()
                        .enumerate()
                        .map(|(k, &v)| d * (sc[k / 16] as i8) as f32 * (v as i32 - 32) as f32),
                );
            }
        }
    }
    Ok(out)
}

/// A Q6_K super-block's 256 values in order, unsigned (0..64; the value is `q − 32` times
/// its 16-value group's scale): four 32-value runs a 128-value half, from the low and high
/// nibbles of `ql` and two bits each of `qh`.
pub fn q6_k_values(b: &[u8]) -> [u8; 256] {
    let mut q = [0u8; 256];
    for n in 0..2 {
        let (ql, qh, y) = (&b[n * 64..128], &b[128 + n * 32..192], &mut q[n * 128..]);
        for l in 0..32 {
            y[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

/// Sub-block `j`'s (scale, min) of a Q4_K super-block's 12 packed 6-bit pairs.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut b = f16b(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);
    }

    #[test]
    fn q4_1_block() {
        let mut b = f16b(2.0).to_vec();
        b.extend(f16b(-1.0));
        b.extend((0..16).map(|i| (i as u8) | (((15 - i) as u8) << 4)));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[3], 2.0 * 3.0 - 1.0);
        assert_eq!(y[16 + 3], 2.0 * 12.0 - 1.0);
    }

    #[test]
    fn wrong_length_is_an_error() {
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], 32).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31).is_err());
    }
}
