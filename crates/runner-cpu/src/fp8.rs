//! One-byte floats for the KV cache (`--kv-cache-dtype fp8`, `fp8_e4m3`, `fp8_e5m2`, as
//! vLLM's CPU backend takes them): half the bytes of the f16 cache to hold and, what a decode
//! step waits on, to read. No scale (vLLM's default `k_scale` / `v_scale` of 1.0).
//!
//! Writing rounds each f32 to the nearest fp8 value, ties to even, and saturates at the
//! largest finite one (±448 for e4m3, ±57,344 for e5m2; vLLM's CUDA conversions saturate the
//! same way); NaN stays NaN. Reading is exact: e5m2 is the top byte of an f16, and e4m3's
//! exponent and mantissa bits placed in an f16 are its value ÷ 256 (normal and subnormal
//! alike), so both widen through F16C, e4m3 with one multiply by 256.

/// The two fp8 formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8 {
    /// 4 exponent bits (bias 7), 3 mantissa bits, no infinities (`float8_e4m3fn`): vLLM's
    /// `fp8` and `fp8_e4m3`.
    E4m3,
    /// 5 exponent bits (bias 15), 2 mantissa bits, IEEE-style infinities and NaNs.
    E5m2,
}

/// An e4m3 cache element (the attention kernels are generic over the element they read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct E4m3(pub u8);

/// An e5m2 cache element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct E5m2(pub u8);

/// `bytes` seen as `T`, a one-byte transparent wrapper of `u8`.
pub(crate) fn view<T: Fp8Elem>(bytes: &[u8]) -> &[T] {
    // SAFETY: `T` is `repr(transparent)` over `u8` (`Fp8Elem` is implemented only for such
    // types), so it has the size, alignment and validity of `u8`.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len()) }
}

/// The fp8 element types (crate-private: [`view`] relies on every implementor being a
/// transparent `u8`).
pub(crate) trait Fp8Elem: Copy {
    const FORMAT: Fp8;
    fn bits(self) -> u8;
}

impl Fp8Elem for E4m3 {
    const FORMAT: Fp8 = Fp8::E4m3;
    fn bits(self) -> u8 {
        self.0
    }
}

impl Fp8Elem for E5m2 {
    const FORMAT: Fp8 = Fp8::E5m2;
    fn bits(self) -> u8 {
        self.0
    }
}

/// Every code's value in format `f` ([`Fp8::decode`]), for the portable paths.
pub fn table(f: Fp8) -> &'static [f32; 256] {
    static TABLES: std::sync::OnceLock<[[f32; 256]; 2]> = std::sync::OnceLock::new();
    let t = TABLES
        .get_or_init(|| [Fp8::E4m3, Fp8::E5m2].map(|f| std::array::from_fn(|c| f.decode(c as u8))));
    &t[f as usize]
}

impl Fp8 {
    /// Largest finite value's f32 bits.
    const fn max_bits(self) -> u32 {
        match self {
            Fp8::E4m3 => 0x43E0_0000, // 448 = 1.75 · 2^8
            Fp8::E5m2 => 0x4760_0000, // 57,344 = 1.75 · 2^15
        }
    }

    /// The name vLLM's `--kv-cache-dtype` and its `cache_config_info` metric use.
    pub fn flag(self) -> &'static str {
        match self {
            Fp8::E4m3 => "fp8_e4m3",
            Fp8::E5m2 => "fp8_e5m2",
        }
    }

    /// `x` rounded to the nearest value of this format (ties to even), saturated at the
    /// largest finite value; NaN gives NaN. Branch-free, so that [`Fp8::encode_slice`]'s loop
    /// vectorises.
    #[inline(always)]
    pub fn encode(self, x: f32) -> u8 {
        // Mantissa bits dropped, and the f32 exponent that is the format's exponent 0.
        let (shift, rebias, min_normal, sub_scale, nan) = match self {
            // e4m3: f32 exponent 127 - 7 + 1 = 121 is its smallest normal (2^-6); below it a
            // value is a multiple of 2^-9.
            Fp8::E4m3 => (20u32, 120u32 << 3, 0x3C80_0000u32, 512.0f32, 0x7Fu32),
            // e5m2: smallest normal 2^-14, subnormals multiples of 2^-16.
            Fp8::E5m2 => (21, 112 << 2, 0x3880_0000, 65536.0, 0x7F),
        };
        let b = x.to_bits();
        let sign = (b >> 24) & 0x80;
        let is_nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
        let a = (b & 0x7FFF_FFFF).min(self.max_bits());
        // Normal: round the dropped mantissa bits to nearest even, letting a carry run into
        // the exponent, then rebias the exponent.
        let half = (1u32 << (shift - 1)) - 1;
        let normal = ((a + half + ((a >> shift) & 1)) >> shift).wrapping_sub(rebias);
        // Subnormal: the value in units of the smallest subnormal, rounded to an integer by
        // f32 addition (ties to even); 8 (or 4) is the smallest normal's code, as it should.
        let units = f32::from_bits(a) * sub_scale + 8_388_608.0;
        let sub = units.to_bits() - 0x4B00_0000;
        let mag = if a < min_normal { sub } else { normal };
        let mag = if is_nan { nan } else { mag };
        (sign | mag) as u8
    }

    /// The f32 value of code `c` (exact).
    pub fn decode(self, c: u8) -> f32 {
        let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
        let m = (c & 0x7F) as u32;
        match self {
            Fp8::E4m3 => {
                if m == 0x7F {
                    return f32::NAN;
                }
                let (e, f) = (m >> 3, m & 7);
                sign * if e == 0 {
                    f as f32 * (2f32).powi(-9)
                } else {
                    (1.0 + f as f32 / 8.0) * (2f32).powi(e as i32 - 7)
                }
            }
            // The top byte of an f16.
            Fp8::E5m2 => half::f16::from_bits((c as u16) << 8).to_f32(),
        }
    }

    /// `dst[i] = encode(src[i])`, compiled for the widest vectors the CPU has (a 2,024-row
    /// prompt step writes ~23 M elements).
    pub fn encode_slice(self, src: &[f32], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len(), "fp8 encode lengths");
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                // SAFETY: the features were just detected.
                return unsafe { encode_avx512(self, src, dst) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                return unsafe { encode_avx2(self, src, dst) };
            }
        }
        encode_loop(self, src, dst)
    }
}

/// One loop per format, so that each has its constants folded and vectorises.
#[inline(always)]
fn encode_loop(f: Fp8, src: &[f32], dst: &mut [u8]) {
    match f {
        Fp8::E4m3 => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &x)| *d = Fp8::E4m3.encode(x)),
        Fp8::E5m2 => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &x)| *d = Fp8::E5m2.encode(x)),
    }
}

/// # Safety
/// AVX-512F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn encode_avx512(f: Fp8, src: &[f32], dst: &mut [u8]) {
    encode_loop(f, src, dst)
}

/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_avx2(f: Fp8, src: &[f32], dst: &mut [u8]) {
    encode_loop(f, src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest finite code to `x` by brute force over every code (ties: the even
    /// mantissa), saturating: the definition `encode` must meet.
    fn nearest(f: Fp8, x: f32) -> u8 {
        let mut best: Option<(f64, u8)> = None;
        for c in 0..=255u8 {
            let v = f.decode(c);
            if !v.is_finite() || (v == 0.0 && v.is_sign_negative() != x.is_sign_negative()) {
                continue;
            }
            let d = (v as f64 - x as f64).abs();
            let better = match best {
                None => true,
                Some((bd, bc)) => d < bd || (d == bd && c & 1 == 0 && bc & 1 == 1),
            };
            if better {
                best = Some((d, c));
            }
        }
        best.unwrap().1
    }

    #[test]
    fn every_finite_code_round_trips() {
        for f in [Fp8::E4m3, Fp8::E5m2] {
            for c in 0..=255u8 {
                let v = f.decode(c);
                if v.is_finite() {
                    assert_eq!(f.encode(v), c, "{f:?} code {c:#04x} = {v}");
                }
            }
        }
    }

    #[test]
    fn decode_matches_the_formats_definitions() {
        let e4 = |c| Fp8::E4m3.decode(c);
        let e5 = |c| Fp8::E5m2.decode(c);
        assert_eq!(
            (e4(0x7E), e4(0xFE), e4(0x08), e4(0x01)),
            (448.0, -448.0, 2f32.powi(-6), 2f32.powi(-9))
        );
        assert!(e4(0x7F).is_nan() && e4(0xFF).is_nan());
        assert_eq!(
            (e5(0x7B), e5(0x04), e5(0x01)),
            (57344.0, 2f32.powi(-14), 2f32.powi(-16))
        );
        assert_eq!((e5(0x7C), e5(0xFC)), (f32::INFINITY, f32::NEG_INFINITY));
        assert!(e5(0x7D).is_nan());
        assert_eq!((e4(0x38), e5(0x3C)), (1.0, 1.0));
    }

    /// Values around every code (the midpoints, a hair either side, the subnormals, zero,
    /// beyond the largest value) and pseudo-random ones over the whole range: `encode` is the
    /// nearest code, ties to even, saturating; and the vectorised slice path agrees with it.
    #[test]
    fn encode_is_nearest_ties_to_even_and_saturates() {
        for f in [Fp8::E4m3, Fp8::E5m2] {
            let mut xs: Vec<f32> = vec![0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, f32::INFINITY];
            let mut finite: Vec<f32> = (0..=255u8)
                .map(|c| f.decode(c))
                .filter(|v| v.is_finite())
                .collect();
            finite.sort_by(f32::total_cmp);
            for w in finite.windows(2) {
                let (a, b) = (w[0], w[1]);
                if a < b {
                    let mid = (a + b) / 2.0;
                    let (up, down) = (mid.to_bits() + 1, mid.to_bits() - 1);
                    xs.extend([mid, f32::from_bits(up), f32::from_bits(down)]);
                }
                xs.push(a * 1.01);
            }
            let mut s = 0x2545_F491u32;
            for _ in 0..20_000 {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                // Exponents from 2^-20 to 2^17, either sign.
                let e = (s % 38) as i32 - 20;
                let m = 1.0 + (s >> 8) as f32 / (1u32 << 24) as f32;
                xs.push(if s & 1 == 0 { m } else { -m } * 2f32.powi(e));
            }
            for &x in &xs {
                let want = nearest(f, x.clamp(-1e9, 1e9));
                assert_eq!(f.encode(x), want, "{f:?} {x:e} ({:#010x})", x.to_bits());
            }
            let mut out = vec![0u8; xs.len()];
            f.encode_slice(&xs, &mut out);
            for (x, o) in xs.iter().zip(&out) {
                assert_eq!(*o, f.encode(*x), "{f:?} slice {x:e}");
            }
            assert_eq!(f.encode(f32::NAN) & 0x7F, 0x7F);
            assert!(f.decode(f.encode(f32::NAN)).is_nan());
        }
    }
}
