//! `x · Wᵀ` for the few rows of a decode step. A general GEMM packs W into panels on every
//! call — for a handful of rows that packing re-reads and re-writes the whole weight matrix,
//! and it was 38 % of the CPU runner's decode profile. Here each output is a dot product
//! along a contiguous row of W (`[out, in]`, the stored layout), so W streams from memory
//! once, unpacked, and (with AVX-512) four activation rows share every weight load. The
//! per-row arithmetic does not depend on how many rows are in the batch (batch-invariant).
//!
//! W is f32 or bf16. bf16 rows are widened to f32 in registers (a shift: exact), so a bf16
//! matrix computes what its f32 widening would, reading half the bytes.

use half::bf16;
use rayon::prelude::*;

/// Output rows of W per parallel task.
const TASK_ROWS: usize = 64;

/// Portable path: one activation row at a time, `LANES` independent accumulators (LLVM
/// vectorises this for the baseline target).
const LANES: usize = 32;

/// A weight element the kernels read.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    /// One task of [`matmul_wt_with`] on `isa`'s kernel for this element.
    ///
    /// # Safety
    /// `isa` must be one of [`available_isas`]; `x` holds `rows × inner`, `w` the weight
    /// rows `j0 .. j0 + yt.len() / rows` of length `inner`.
    #[doc(hidden)]
    unsafe fn task(
        isa: Isa,
        x: &[f32],
        rows: usize,
        inner: usize,
        w: &[Self],
        j0: usize,
        yt: &mut [f32],
    );
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    unsafe fn task(
        isa: Isa,
        x: &[f32],
        rows: usize,
        inner: usize,
        w: &[f32],
        j0: usize,
        yt: &mut [f32],
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::task(x, rows, inner, w, j0, yt),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::task(x, rows, inner, w, j0, yt),
            _ => task_portable(x, rows, inner, w, j0, yt),
        }
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    unsafe fn task(
        isa: Isa,
        x: &[f32],
        rows: usize,
        inner: usize,
        w: &[bf16],
        j0: usize,
        yt: &mut [f32],
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512_bf16::task(x, rows, inner, w, j0, yt),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2_bf16::task(x, rows, inner, w, j0, yt),
            _ => task_portable(x, rows, inner, w, j0, yt),
        }
    }
}

fn dot_portable<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    let n = w.len();
    let body = n - n % LANES;
    let mut acc = [0f32; LANES];
    for (xc, wc) in x[..body]
        .chunks_exact(LANES)
        .zip(w[..body].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += xc[k] * wc[k].widen();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for j in body..n {
        s += x[j] * w[j].widen();
    }
    s
}

fn task_portable<W: WeightElem>(
    x: &[f32],
    rows: usize,
    inner: usize,
    w: &[W],
    j0: usize,
    yt: &mut [f32],
) {
    for (jj, out) in yt.chunks_mut(rows).enumerate() {
        let wj = &w[(j0 + jj) * inner..(j0 + jj + 1) * inner];
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_portable(&x[r * inner..(r + 1) * inner], wj);
        }
    }
}

/// One x86 SIMD flavour of the kernel: `tile` computes the `R × J` dot products of `R`
/// activation rows with `J` weight rows, one FMA accumulator per pair, so every loaded vector
/// is used `J` or `R` times and both operands stream once per tile. A pair's operations are
/// the same for every `R` and `J`, so a row's result does not depend on the batch.
macro_rules! simd_kernel {
    ($feature:literal, $vec:ty, $lanes:literal, $tile_j:literal,
     $zero:path, $load:path, $fma:path, $hsum:path;
     $($name:ident: $wty:ty = $wload:path),+ $(,)?) => {$(
        #[cfg(target_arch = "x86_64")]
        mod $name {
            #[allow(unused_imports)]
            use super::WeightElem;
            #[allow(unused_imports)]
            use std::arch::x86_64::*;

            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn tile<const R: usize, const J: usize>(
                xs: [*const f32; R],
                ws: [*const $wty; J],
                n: usize,
            ) -> [[f32; J]; R] {
                let body = n - n % $lanes;
                let mut a: [[$vec; J]; R] = [[$zero(); J]; R];
                let mut i = 0;
                while i < body {
                    let mut wv: [$vec; J] = [$zero(); J];
                    for j in 0..J {
                        wv[j] = $wload(ws[j].add(i));
                    }
                    for r in 0..R {
                        let xv = $load(xs[r].add(i));
                        for j in 0..J {
                            a[r][j] = $fma(xv, wv[j], a[r][j]);
                        }
                    }
                    i += $lanes;
                }
                let mut out = [[0f32; J]; R];
                for r in 0..R {
                    for j in 0..J {
                        let mut s = $hsum(a[r][j]);
                        for t in body..n {
                            s = (*xs[r].add(t)).mul_add((*ws[j].add(t)).widen(), s);
                        }
                        out[r][j] = s;
                    }
                }
                out
            }

            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn rows_for<const J: usize>(
                x: &[f32],
                rows: usize,
                inner: usize,
                ws: [*const $wty; J],
                out: &mut [f32],
            ) {
                let xp = |r: usize| x.as_ptr().add(r * inner);
                let mut r = 0;
                while r + 4 <= rows {
                    let d = tile([xp(r), xp(r + 1), xp(r + 2), xp(r + 3)], ws, inner);
                    for (dr, rr) in d.iter().zip(r..) {
                        for (j, v) in dr.iter().enumerate() {
                            out[j * rows + rr] = *v;
                        }
                    }
                    r += 4;
                }
                while r < rows {
                    let d = tile([xp(r)], ws, inner);
                    for (j, v) in d[0].iter().enumerate() {
                        out[j * rows + r] = *v;
                    }
                    r += 1;
                }
            }

            /// # Safety
            /// The CPU must support the module's features; `x` holds `rows × inner`, `w` holds
            /// the weight rows `j0 .. j0 + yt.len() / rows` of length `inner`.
            #[target_feature(enable = $feature)]
            pub unsafe fn task(
                x: &[f32],
                rows: usize,
                inner: usize,
                w: &[$wty],
                j0: usize,
                yt: &mut [f32],
            ) {
                const TJ: usize = $tile_j;
                let wp = |j: usize| w.as_ptr().add(j * inner);
                let count = yt.len() / rows;
                let mut jj = 0;
                while jj + TJ <= count {
                    let ws: [*const $wty; TJ] = std::array::from_fn(|t| wp(j0 + jj + t));
                    rows_for(x, rows, inner, ws, &mut yt[jj * rows..(jj + TJ) * rows]);
                    jj += TJ;
                }
                while jj < count {
                    rows_for(
                        x,
                        rows,
                        inner,
                        [wp(j0 + jj)],
                        &mut yt[jj * rows..(jj + 1) * rows],
                    );
                    jj += 1;
                }
            }
        }
    )+};
}

/// Horizontal sum of 8 lanes in a fixed order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Eight bf16 weights widened to f32 (bf16 is f32's upper half: a shift, exact).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_bf16x8(p: *const bf16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

/// Sixteen bf16 weights widened to f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn load_bf16x16(p: *const bf16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let h = _mm256_loadu_si256(p as *const __m256i);
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
}

// AVX-512: 32 registers hold 4 × 4 accumulators plus operands. AVX2: 16 registers, 4 × 2.
// One module per weight element: f32 loaded as is, bf16 widened in registers.
simd_kernel!(
    "avx512f,fma",
    __m512,
    16,
    4,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_reduce_add_ps;
    avx512: f32 = _mm512_loadu_ps,
    avx512_bf16: half::bf16 = super::load_bf16x16,
);
simd_kernel!(
    "avx2,fma",
    __m256,
    8,
    2,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    super::hsum256;
    avx2: f32 = _mm256_loadu_ps,
    avx2_bf16: half::bf16 = super::load_bf16x8,
);

/// A kernel flavour (instruction set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// Every kernel this CPU can run, best first.
pub fn available_isas() -> Vec<Isa> {
    isas().to_vec()
}

fn isas() -> &'static [Isa] {
    static ISAS: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
    ISAS.get_or_init(detect)
}

fn detect() -> Vec<Isa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") {
            v.push(Isa::Avx512);
        }
        if has!("avx2") && has!("fma") {
            v.push(Isa::Avx2);
        }
    }
    v.push(Isa::Portable);
    v
}

fn best_isa() -> Isa {
    isas()[0]
}

/// `y [rows, out] = x [rows, inner] · wᵀ` with `w [out, inner]` row-major.
pub fn matmul_wt<W: WeightElem>(
    x: &[f32],
    rows: usize,
    w: &[W],
    out: usize,
    inner: usize,
) -> Vec<f32> {
    matmul_wt_with(best_isa(), x, rows, w, out, inner)
}

/// [`matmul_wt`] on a chosen kernel (one of [`available_isas`]).
pub fn matmul_wt_with<W: WeightElem>(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &[W],
    out: usize,
    inner: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * inner, "activation shape");
    assert_eq!(w.len(), out * inner, "weight shape");
    assert!(isas().contains(&isa), "{isa:?} is not available here");
    let mut yt = vec![0f32; out * rows];
    yt.par_chunks_mut(TASK_ROWS * rows)
        .enumerate()
        // SAFETY: `isa` is available (checked above); shapes checked above.
        .for_each(|(t, chunk)| unsafe { W::task(isa, x, rows, inner, w, t * TASK_ROWS, chunk) });
    let mut y = vec![0f32; rows * out];
    for j in 0..out {
        for r in 0..rows {
            y[r * out + j] = yt[j * rows + r];
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference<W: WeightElem>(
        x: &[f32],
        rows: usize,
        w: &[W],
        out: usize,
        inner: usize,
    ) -> Vec<f64> {
        let mut y = vec![0f64; rows * out];
        for r in 0..rows {
            for j in 0..out {
                y[r * out + j] = (0..inner)
                    .map(|k| x[r * inner + k] as f64 * w[j * inner + k].widen() as f64)
                    .sum();
            }
        }
        y
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                ((h >> 8) as f32 / (1u32 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn bf16s(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 1, 1),
        (1, 70, 33),
        (3, 130, 64),
        (5, 64, 576),
        (8, 200, 1536),
        (9, 3, 31),
        (70, 65, 47),
    ];

    fn check<W: WeightElem>(isa: Isa, wconv: impl Fn(&[f32]) -> Vec<W>) {
        for &(rows, out, inner) in &SHAPES {
            let x = data(rows * inner, 1);
            let w = wconv(&data(out * inner, 2));
            let y = matmul_wt_with(isa, &x, rows, &w, out, inner);
            let r = reference(&x, rows, &w, out, inner);
            for (i, (a, b)) in y.iter().zip(&r).enumerate() {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{isa:?} {rows}x{out}x{inner} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_for_every_shape_and_tail() {
        let isas = available_isas();
        assert_eq!(isas.last(), Some(&Isa::Portable));
        for isa in isas {
            check(isa, |v| v.to_vec());
            check(isa, bf16s);
        }
    }

    #[test]
    fn bf16_weights_compute_what_their_f32_widening_does() {
        let (rows, out, inner) = (5, 77, 203);
        let x = data(rows * inner, 5);
        let wb = bf16s(&data(out * inner, 6));
        let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        for isa in available_isas() {
            assert_eq!(
                matmul_wt_with(isa, &x, rows, &wb, out, inner),
                matmul_wt_with(isa, &x, rows, &wf, out, inner),
                "{isa:?}"
            );
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_any_batch() {
        let (out, inner) = (96, 576);
        let w = data(out * inner, 3);
        let wb = bf16s(&w);
        let x = data(7 * inner, 4);
        for isa in available_isas() {
            let alone = matmul_wt_with(isa, &x[2 * inner..3 * inner], 1, &w, out, inner);
            let alone_b = matmul_wt_with(isa, &x[2 * inner..3 * inner], 1, &wb, out, inner);
            for rows in [3, 4, 5, 7] {
                let y = matmul_wt_with(isa, &x[..rows * inner], rows, &w, out, inner);
                assert_eq!(&y[2 * out..3 * out], &alone[..], "{isa:?} batch of {rows}");
                let y = matmul_wt_with(isa, &x[..rows * inner], rows, &wb, out, inner);
                assert_eq!(
                    &y[2 * out..3 * out],
                    &alone_b[..],
                    "{isa:?} bf16 batch of {rows}"
                );
            }
        }
    }
}
