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
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// ggml's IQ4_NL: blocks of 32, an f16 scale and 4-bit indices into [`IQ4_VALUES`].
    IQ4NL,
    /// ggml's IQ4_XS: super-blocks of 256, an f16 scale, a 6-bit scale per 32 values (less
    /// 32) and 4-bit indices into [`IQ4_VALUES`].
    IQ4XS,
}

/// The sixteen values IQ4_NL's and IQ4_XS's 4-bit indices stand for (ggml's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Names of ggml types tpuserve recognises but cannot dequantize, for clear errors.
pub fn ggml_type_name(raw: u32) -> String {
    let name = match raw {
        9 => "Q8_1",
        15 => "Q8_K",
        16..=19 | 21 | 22 | 29 => "IQ (importance-matrix) quantization",
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
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            20 => GgmlType::IQ4NL,
            23 => GgmlType::IQ4XS,
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
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::IQ4NL => (32, 18),
            GgmlType::IQ4XS => (256, 136),
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
        GgmlType::Q5K => {
            for b in data.chunks_exact(bs) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (q, scales) = (q5_k_values(b), &b[4..16]);
                for (t, q) in q.chunks_exact(32).enumerate() {
                    let (sc, m) = scale_min_k4(t, scales);
                    let (dl, ml) = (d * sc as f32, dmin * m as f32);
                    out.extend(q.iter().map(|&v| dl * v as f32 - ml));
                }
            }
        }
        GgmlType::Q2K => {
            for b in data.chunks_exact(bs) {
                let (scales, d, dmin) = (&b[..16], f16_at(b, 80), f16_at(b, 82));
                for (k, v) in q2_k_values(b).into_iter().enumerate() {
                    let sc = scales[k / 16];
                    let (dl, ml) = (d * (sc & 0x0f) as f32, dmin * (sc >> 4) as f32);
                    out.push(dl * v as f32 - ml);
                }
            }
        }
        GgmlType::Q3K => {
            for b in data.chunks_exact(bs) {
                let (d, scales) = (f16_at(b, 108), q3_k_scales(b));
                for (k, v) in q3_k_values(b).into_iter().enumerate() {
                    out.push(d * scales[k / 16] as f32 * (v as i32 - 4) as f32);
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
        GgmlType::IQ4NL => {
            for b in data.chunks_exact(bs) {
                let d = f16_at(b, 0);
                out.extend(iq4_indices(&b[2..18]).map(|i| d * IQ4_VALUES[i as usize] as f32));
            }
        }
        GgmlType::IQ4XS => {
            for b in data.chunks_exact(bs) {
                let d = f16_at(b, 0);
                for (t, sc) in iq4_xs_scales(b).into_iter().enumerate() {
                    let dl = d * sc as f32;
                    let q = iq4_indices(&b[8 + 16 * t..24 + 16 * t]);
                    out.extend(q.map(|i| dl * IQ4_VALUES[i as usize] as f32));
                }
            }
        }
    }
    Ok(out)
}

/// A 32-value block's 4-bit indices in order from its 16 bytes: the low nibbles are the first
/// 16 values, the high nibbles the second (Q4_0's order).
pub fn iq4_indices(qs: &[u8]) -> [u8; 32] {
    std::array::from_fn(|k| {
        if k < 16 {
            qs[k] & 0x0f
        } else {
            qs[k - 16] >> 4
        }
    })
}

/// An IQ4_XS super-block's eight 6-bit block scales less 32: the low four bits of scale `t`
/// in byte `4 + t / 2` (low nibble for even `t`), its high two at bit `2t` of the u16 at 2.
pub fn iq4_xs_scales(b: &[u8]) -> [i8; 8] {
    let high = u16::from_le_bytes([b[2], b[3]]);
    std::array::from_fn(|t| {
        let low = (b[4 + t / 2] >> (4 * (t % 2))) & 0x0f;
        (low | ((((high >> (2 * t)) & 3) as u8) << 4)) as i8 - 32
    })
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

/// A Q5_K super-block's 256 values in order (0..32): sub-block `t`'s 32 are the low (even
/// `t`) or high (odd `t`) nibbles of `qs[32·(t/2) ..]`, each with bit `t` of its `qh` byte as
/// the fifth bit.
pub fn q5_k_values(b: &[u8]) -> [u8; 256] {
    let (qh, qs) = (&b[16..48], &b[48..176]);
    std::array::from_fn(|k| {
        let (t, l) = (k / 32, k % 32);
        let byte = qs[32 * (t / 2) + l];
        let nibble = if t % 2 == 0 { byte & 0x0f } else { byte >> 4 };
        nibble | (((qh[l] >> t) & 1) << 4)
    })
}

/// The 2-bit values (0..4) of Q2_K's and Q3_K's 64 bytes, in order: each 128-value half is
/// four 32-value runs, run `s` taking bits `2s, 2s + 1` of that half's 32 bytes.
fn crumbs(qs: &[u8]) -> [u8; 256] {
    std::array::from_fn(|k| {
        let (half, s, l) = (k / 128, (k % 128) / 32, k % 32);
        (qs[32 * half + l] >> (2 * s)) & 3
    })
}

/// A Q2_K super-block's 256 values in order (0..4; the value is `d·sc·q − dmin·m` with its
/// 16-value group's 4-bit scale `sc` and min `m`, the low and high nibbles of byte `k / 16`).
pub fn q2_k_values(b: &[u8]) -> [u8; 256] {
    crumbs(&b[16..80])
}

/// A Q3_K super-block's 256 values in order, unsigned (0..8; the value is `q − 4` times `d`
/// and its 16-value group's scale): the 2-bit value plus 4 where its `hmask` bit is set (a
/// clear bit takes 4 off the 2-bit value).
pub fn q3_k_values(b: &[u8]) -> [u8; 256] {
    let (hmask, low) = (&b[..32], crumbs(&b[32..96]));
    std::array::from_fn(|k| low[k] | (((hmask[k % 32] >> (k / 32)) & 1) << 2))
}

/// A Q3_K super-block's sixteen 6-bit scales less 32, from its 12 bytes at 96: the low four
/// bits of scale `j` in byte `j % 8` (low nibble for `j < 8`, high after), its high two in
/// byte `8 + j % 4` at bit `2·(j / 4)`.
pub fn q3_k_scales(b: &[u8]) -> [i32; 16] {
    let b = &b[96..108];
    std::array::from_fn(|j| {
        let low = (b[j % 8] >> (4 * (j / 8))) & 0x0f;
        let high = (b[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    })
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
