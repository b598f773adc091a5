//! `x · Wᵀ` for bf16 weights with AVX-512 BF16 (`vdpbf16ps`): the activations are rounded to
//! bf16 (nearest, ties to even) once a call, and each instruction multiplies 32 bf16 pairs
//! exactly and adds them into 16 f32 lanes (two products a lane) — twice the multiply-adds
//! of an f32 FMA a cycle, where widening W to f32 kept the prefill at the FMA rate. This is
//! the arithmetic of a bf16 model on an accelerator (bf16 operands, f32 accumulation); the
//! widening kernels of `matvec` (f32 activations) remain for CPUs without the instructions.
//!
//! Each output is one dot product along a row of W (`[out, in]`, as stored): a fixed chain of
//! `vdpbf16ps` over the row in order, a masked last chunk for the tail, and one horizontal
//! sum. A row's result depends only on its own activations, whatever the batch or the tile
//! it falls in, so rows are batch-invariant at every batch size (the f32 GEMM the widening
//! path uses for prompts is not).

use crate::qmatvec::Out;
use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Rows of W and activation rows a parallel task covers.
const TASK_W_ROWS: usize = 64;
const TASK_X_ROWS: usize = 64;

/// Whether this CPU has the instructions (AVX-512 F, BW and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| has!("avx512f") && has!("avx512bw") && has!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x` rounded to bf16 (nearest, ties to even), as `half` rounds.
pub fn round_acts(x: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| o.convert_from_f32_slice(x));
    out
}

/// `y [rows, out] = x [rows, inner] · wᵀ` with `w [out, inner]` row-major bf16; `x` rounded
/// to bf16 first. Panics when the CPU lacks the instructions ([`available`]).
pub fn matmul_wt(x: &[f32], rows: usize, w: &[bf16], out: usize, inner: usize) -> Vec<f32> {
    assert!(available(), "this CPU has no AVX-512 BF16");
    assert_eq!(x.len(), rows * inner, "activation shape");
    assert_eq!(w.len(), out * inner, "weight shape");
    let xb = round_acts(x);
    let mut y: Vec<f32> = Vec::with_capacity(rows * out);
    let o = Out::whole(y.as_mut_ptr(), out);
    let wt = out.div_ceil(TASK_W_ROWS);
    (0..rows.div_ceil(TASK_X_ROWS) * wt)
        .into_par_iter()
        .for_each(|i| {
            let (c, t) = (i / wt, i % wt);
            let rs = c * TASK_X_ROWS..((c + 1) * TASK_X_ROWS).min(rows);
            let js = t * TASK_W_ROWS..((t + 1) * TASK_W_ROWS).min(out);
            // SAFETY: the features were checked (`available`); rows `rs` of `xb` and rows `js`
            // of `w` hold `inner` values each; the task writes only its block of `y`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::block(&xb, rs, w, js, inner, o)
            };
        });
    // SAFETY: the tasks cover every (row, column) of `y` once (row chunks × column chunks),
    // so all `rows × out` values are written.
    unsafe { y.set_len(rows * out) };
    y
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::qmatvec::Out;
    use half::bf16;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// 32 bf16 values from `p`, the first `n` of them (the rest zero) when `n < 32`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load32(p: *const bf16, n: usize) -> __m512bh {
        let v = if n >= 32 {
            _mm512_loadu_si512(p as *const __m512i)
        } else {
            _mm512_maskz_loadu_epi16(((1u64 << n) - 1) as __mmask32, p as *const i16)
        };
        std::mem::transmute::<__m512i, __m512bh>(v)
    }

    /// The `R × J` dot products of activation rows `xs` with weight rows `ws` over `n`
    /// values, one accumulator per pair.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile<const R: usize, const J: usize>(
        xs: [*const bf16; R],
        ws: [*const bf16; J],
        n: usize,
    ) -> [[f32; J]; R] {
        let mut a = [[_mm512_setzero_ps(); J]; R];
        let mut i = 0;
        while i < n {
            let m = n - i;
            let wv: [__m512bh; J] = std::array::from_fn(|j| load32(ws[j].add(i), m));
            for r in 0..R {
                let xv = load32(xs[r].add(i), m);
                for j in 0..J {
                    a[r][j] = _mm512_dpbf16_ps(a[r][j], xv, wv[j]);
                }
            }
            i += 32;
        }
        let mut out = [[0f32; J]; R];
        for r in 0..R {
            for j in 0..J {
                out[r][j] = _mm512_reduce_add_ps(a[r][j]);
            }
        }
        out
    }

    /// Activation rows `rs` × weight rows `js` into `o`, in tiles of 4 × 4 (then 1 × 4,
    /// 4 × 1, 1 × 1 at the edges): every pair gets the same chain whatever its tile.
    ///
    /// # Safety
    /// AVX-512 F, BW and BF16; `x` holds rows `rs` and `w` rows `js` of `inner` values; `o`
    /// has room for those rows and columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn block(
        x: &[bf16],
        rs: Range<usize>,
        w: &[bf16],
        js: Range<usize>,
        inner: usize,
        o: Out,
    ) {
        let xp = |r: usize| x.as_ptr().add(r * inner);
        let wp = |j: usize| w.as_ptr().add(j * inner);
        let put = |r: usize, j: usize, v: f32| *o.y.add(r * o.stride + j) = v;
        let mut j = js.start;
        while j < js.end {
            let wide = js.end - j >= 4;
            let mut r = rs.start;
            while r < rs.end {
                let tall = rs.end - r >= 4;
                match (tall, wide) {
                    (true, true) => {
                        let d = tile::<4, 4>(
                            std::array::from_fn(|k| xp(r + k)),
                            std::array::from_fn(|k| wp(j + k)),
                            inner,
                        );
                        for (k, dr) in d.iter().enumerate() {
                            for (l, &v) in dr.iter().enumerate() {
                                put(r + k, j + l, v);
                            }
                        }
                    }
                    (false, true) => {
                        let d = tile::<1, 4>([xp(r)], std::array::from_fn(|k| wp(j + k)), inner);
                        for (l, &v) in d[0].iter().enumerate() {
                            put(r, j + l, v);
                        }
                    }
                    (true, false) => {
                        let d = tile::<4, 1>(std::array::from_fn(|k| xp(r + k)), [wp(j)], inner);
                        for (k, dr) in d.iter().enumerate() {
                            put(r + k, j, dr[0]);
                        }
                    }
                    (false, false) => put(r, j, tile::<1, 1>([xp(r)], [wp(j)], inner)[0][0]),
                }
                r += if tall { 4 } else { 1 };
            }
            j += if wide { 4 } else { 1 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 8;
                h as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// f64 dot products of the bf16-rounded activations with the bf16 weights.
    fn reference(x: &[f32], rows: usize, w: &[bf16], out: usize, inner: usize) -> Vec<(f64, f64)> {
        let xb = round_acts(x);
        let mut y = Vec::with_capacity(rows * out);
        for r in 0..rows {
            for j in 0..out {
                let (mut s, mut m) = (0f64, 0f64);
                for k in 0..inner {
                    let p = xb[r * inner + k].to_f64() * w[j * inner + k].to_f64();
                    s += p;
                    m += p.abs();
                }
                y.push((s, m));
            }
        }
        y
    }

    #[test]
    fn follows_the_f64_reference_over_odd_shapes_and_tails() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: nothing to check");
            return;
        }
        for &(out, inner) in &[
            (1, 1),
            (3, 31),
            (5, 32),
            (9, 33),
            (70, 100),
            (67, 576),
            (130, 64),
        ] {
            for rows in [1, 2, 3, 4, 5, 7, 9, 64, 67, 130] {
                let x = data(rows * inner, rows as u32);
                let w: Vec<bf16> = data(out * inner, 77)
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect();
                let y = matmul_wt(&x, rows, &w, out, inner);
                for (i, (a, &(b, m))) in y
                    .iter()
                    .zip(&reference(&x, rows, &w, out, inner))
                    .enumerate()
                {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-5 * (1.0 + m),
                        "{rows}x{out}x{inner} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_any_batch() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: nothing to check");
            return;
        }
        let (out, inner) = (70, 100);
        let w: Vec<bf16> = data(out * inner, 5)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let x = data(131 * inner, 9);
        let all = matmul_wt(&x, 131, &w, out, inner);
        for r in [0, 3, 4, 63, 64, 65, 130] {
            let alone = matmul_wt(&x[r * inner..(r + 1) * inner], 1, &w, out, inner);
            assert_eq!(alone, all[r * out..(r + 1) * out], "row {r}");
        }
    }
}
