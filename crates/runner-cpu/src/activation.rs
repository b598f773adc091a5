//! The MLP's activation, `silu(g) · u` (SwiGLU), element by element over a step's rows. With
//! AVX2 + FMA, eight at a time through the attention kernel's vector exp: libm's scalar
//! `expf` here was ~3 % of a 32-stream step. Each element's result depends only on its own
//! inputs and its place in the row (the tail after the last whole vector goes through one
//! padded vector), so rows stay batch-invariant.

/// `out[i] = g[i] / (1 + exp(−g[i])) · u[i]` with the best code this CPU has.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    silu_mul_with(best(), g, u, out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW: the AVX2 arithmetic sixteen at a time (the same bits).
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Portable,
}

/// The variants this CPU runs, best first.
pub fn available() -> Vec<Isa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if crate::attention_avx2::available() {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") {
            v.push(Isa::Avx512);
        }
        v.push(Isa::Avx2Fma);
    }
    v.push(Isa::Portable);
    v
}

fn best() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| available()[0])
}

/// [`silu_mul`] with a chosen variant (one of [`available`]).
pub fn silu_mul_with(isa: Isa, g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(
        g.len() == u.len() && g.len() == out.len(),
        "silu_mul: lengths differ"
    );
    match isa {
        // SAFETY: `available` checked AVX2, FMA and F16C at run time; lengths are equal.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::silu_mul(g, u, out) },
        // SAFETY: as above, with AVX-512 F/BW.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::silu_mul_avx512(g, u, out) },
        Isa::Portable => {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use crate::attention_avx2::exp8;

    /// # Safety
    /// AVX2, FMA and F16C; `g`, `u` and `out` of one length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = g.len();
        let mut i = 0;
        while i + 8 <= n {
            let y = silu_mul8(
                _mm256_loadu_ps(g.as_ptr().add(i)),
                _mm256_loadu_ps(u.as_ptr().add(i)),
            );
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            i += 8;
        }
        if i < n {
            let (mut gt, mut ut, mut ot) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            gt[..n - i].copy_from_slice(&g[i..]);
            ut[..n - i].copy_from_slice(&u[i..]);
            let y = silu_mul8(_mm256_loadu_ps(gt.as_ptr()), _mm256_loadu_ps(ut.as_ptr()));
            _mm256_storeu_ps(ot.as_mut_ptr(), y);
            out[i..].copy_from_slice(&ot[..n - i]);
        }
    }

    /// # Safety
    /// AVX-512 F/BW, AVX2, FMA and F16C; `g`, `u` and `out` of one length.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn silu_mul_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = g.len();
        let mut i = 0;
        while i + 16 <= n {
            let y = silu_mul16(
                _mm512_loadu_ps(g.as_ptr().add(i)),
                _mm512_loadu_ps(u.as_ptr().add(i)),
            );
            _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u16 << (n - i)) - 1;
            let y = silu_mul16(
                _mm512_maskz_loadu_ps(m, g.as_ptr().add(i)),
                _mm512_maskz_loadu_ps(m, u.as_ptr().add(i)),
            );
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, y);
        }
    }

    /// [`exp8`] sixteen at a time: the same operations in the same order, so the same bits.
    #[inline(always)]
    pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.3));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let e = _mm512_slli_epi32::<23>(_mm512_cvtps_epi32(n));
        _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(y), e))
    }

    /// [`silu_mul8`] sixteen at a time (the same bits).
    #[inline(always)]
    pub(crate) unsafe fn silu_mul16(g: __m512, u: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.0));
        let e = exp16(x);
        let s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
        let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(g, _mm512_set1_ps(-88.0));
        _mm512_mask_blend_ps(tiny, _mm512_mul_ps(s, u), _mm512_set1_ps(-0.0))
    }

    #[inline(always)]
    pub(crate) unsafe fn silu_mul8(g: __m256, u: __m256) -> __m256 {
        // exp8 wants x ≤ 0 for softmax and clamps below; here −g can be large and positive,
        // so it is clamped at 88 (exp(88) ≈ 1.7e38, still finite) and silu(g < −88) (below
        // 1e-36, as libm's overflow to infinity gives) is −0.
        let x = _mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.0));
        let e = exp8(x);
        let s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(g, _mm256_set1_ps(-88.0));
        _mm256_blendv_ps(_mm256_mul_ps(s, u), _mm256_set1_ps(-0.0), tiny)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(g: f32, u: f32) -> f64 {
        let g = g as f64;
        g / (1.0 + (-g).exp()) * u as f64
    }

    #[test]
    fn every_variant_follows_f64_over_odd_lengths_and_extremes() {
        for isa in available() {
            for n in [1, 7, 8, 9, 15, 16, 17, 31, 1536] {
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 5.0)
                    .chain([
                        -1e4, -100.0, -88.5, -87.0, -1e-30, 0.0, 1e-30, 87.0, 100.0, 1e4,
                    ])
                    .take(n)
                    .collect();
                let u: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32 * 0.37).collect();
                let mut out = vec![f32::NAN; n];
                silu_mul_with(isa, &g, &u, &mut out);
                for i in 0..n {
                    let want = reference(g[i], u[i]);
                    let err = (out[i] as f64 - want).abs();
                    // Absolute 1e-35: silu(g < −88) is −0, far beneath what an f32 sum sees.
                    assert!(
                        err <= 4e-7 * want.abs() + 1e-35,
                        "{isa:?} n={n} g={} u={}: {} vs {want}",
                        g[i],
                        u[i],
                        out[i]
                    );
                }
            }
        }
    }

    #[test]
    fn the_vector_variants_give_the_same_bits() {
        let n = 1536 + 13;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 2000) as f32 - 1000.0) / 9.0)
            .collect();
        let u: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32 * 0.37).collect();
        let vector: Vec<Isa> = available()
            .into_iter()
            .filter(|&i| i != Isa::Portable)
            .collect();
        let mut first: Option<Vec<f32>> = None;
        for isa in vector {
            let mut out = vec![0f32; n];
            silu_mul_with(isa, &g, &u, &mut out);
            match &first {
                None => first = Some(out),
                Some(f) => assert!(
                    f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?}"
                ),
            }
        }
    }

    #[test]
    fn an_elements_result_does_not_depend_on_its_neighbours() {
        let g: Vec<f32> = (0..21).map(|i| i as f32 * 0.9 - 9.0).collect();
        let u = vec![1.5f32; 21];
        for isa in available() {
            let mut whole = vec![0f32; 21];
            silu_mul_with(isa, &g, &u, &mut whole);
            // The same row split at another boundary gives the same elements where they sit at
            // the same place in their vector.
            let mut parts = vec![0f32; 21];
            silu_mul_with(isa, &g[..16], &u[..16], &mut parts[..16]);
            silu_mul_with(isa, &g[16..], &u[16..], &mut parts[16..]);
            assert_eq!(whole, parts, "{isa:?}");
        }
    }
}
