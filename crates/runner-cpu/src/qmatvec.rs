//! `x · Wᵀ` with W kept in the checkpoint's ggml blocks (Q4_0, Q4_1, Q8_0): a decode step
//! reads ~0.6 (Q4) or ~1.06 (Q8) bytes per weight instead of 4 for an f32 copy, and the CPU
//! runner is bound by that stream. As llama.cpp does, each activation row is first quantised
//! per 32-block to int8 with an f32 scale `d` and `s = d·Σq` (the term Q4's per-block offset
//! multiplies), so a block's dot product is one integer dot of 32 bytes:
//!
//! - Q4_1 (`w = dw·u + mw`, u in 0..16): `dw·dx·Σ u·q + mw·s`
//! - Q4_0 (`w = dw·(u − 8)`): the same with `mw = −8·dw`
//! - Q8_0 (`w = dw·q'`): `dw·dx·Σ q'·q`
//!
//! Integer dots use AVX-512 VNNI (`vpdpbusd`, two blocks per instruction) or AVX2
//! (`vpmaddubsw` + `vpmaddwd`), picked at run time, with a portable scalar path. Like
//! `matvec`, a tile of R activation rows × J weight rows shares every load, and one (row,
//! weight row) pair runs the same operations in the same order whatever R, J and the batch
//! are, so a row's result does not depend on what it is batched with.

use rayon::prelude::*;
use tpuserve_model::GgmlType;

/// Values per block, for every supported type.
pub const QK: usize = 32;

/// Output rows of W per parallel task.
const TASK_ROWS: usize = 64;

/// Activation rows quantised and computed together; longer prefills run chunk after chunk
/// (the chunk's int8 rows stay in cache while the weights stream past them).
const ROW_CHUNK: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q8_0,
}

// The kernels are generic over the weight type as a const parameter.
const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q8_0: u8 = 2;

const fn block_bytes(t: u8) -> usize {
    match t {
        T_Q4_0 => 18,
        T_Q4_1 => 20,
        _ => 34,
    }
}

impl QType {
    /// The ggml types these kernels compute on; others are dequantised at load.
    pub fn from_ggml(t: GgmlType) -> Option<QType> {
        match t {
            GgmlType::Q4_0 => Some(QType::Q4_0),
            GgmlType::Q4_1 => Some(QType::Q4_1),
            GgmlType::Q8_0 => Some(QType::Q8_0),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            QType::Q4_0 => T_Q4_0,
            QType::Q4_1 => T_Q4_1,
            QType::Q8_0 => T_Q8_0,
        }
    }

    pub fn block_bytes(self) -> usize {
        block_bytes(self.code())
    }
}

/// A weight matrix `[rows (out), cols (in)]`, each row `cols / 32` blocks in ggml layout.
pub struct QMatrix {
    pub ty: QType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

fn f16(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

impl QMatrix {
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if !cols.is_multiple_of(QK) {
            return Err(format!("{ty:?} rows of {cols} values are not whole blocks"));
        }
        if data.len() != rows * cols / QK * ty.block_bytes() {
            return Err(format!(
                "{ty:?} [{rows}, {cols}] needs {} bytes, got {}",
                rows * cols / QK * ty.block_bytes(),
                data.len()
            ));
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.ty.block_bytes()
    }

    /// Row `r` dequantised into `out` (embedding lookups).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let row = &self.data[r * rb..(r + 1) * rb];
        for (b, o) in row
            .chunks_exact(self.ty.block_bytes())
            .zip(out.chunks_exact_mut(QK))
        {
            match self.ty {
                QType::Q4_0 | QType::Q4_1 => {
                    let d = f16(b, 0);
                    let (m, qs) = if self.ty == QType::Q4_1 {
                        (f16(b, 2), &b[4..20])
                    } else {
                        (-8.0 * d, &b[2..18])
                    };
                    for j in 0..16 {
                        o[j] = (qs[j] & 0x0f) as f32 * d + m;
                        o[j + 16] = (qs[j] >> 4) as f32 * d + m;
                    }
                }
                QType::Q8_0 => {
                    let d = f16(b, 0);
                    for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                        *o = (q as i8) as f32 * d;
                    }
                }
            }
        }
    }
}

/// Activation rows quantised per 32-block: `q` int8 (in −127..=127), per block `d` (scale)
/// and `s = d·Σq`.
pub struct QActs {
    pub rows: usize,
    pub blocks: usize,
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

/// Quantises `rows × cols` activations (`cols` a multiple of 32), block by block:
/// `d = max|x| / 127`, `q = round(x / d)`.
pub fn quantize_acts(x: &[f32], rows: usize, cols: usize) -> QActs {
    assert!(cols.is_multiple_of(QK), "activation width {cols}");
    assert_eq!(x.len(), rows * cols, "activation shape");
    let nb = rows * cols / QK;
    let mut q = vec![0i8; rows * cols];
    let mut d = vec![0f32; nb];
    let mut s = vec![0f32; nb];
    for (((xb, qb), d), s) in x
        .chunks_exact(QK)
        .zip(q.chunks_exact_mut(QK))
        .zip(&mut d)
        .zip(&mut s)
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            let r = (v * inv).round().clamp(-127.0, 127.0) as i8;
            *q = r;
            sum += r as i32;
        }
        *d = scale;
        *s = scale * sum as f32;
    }
    QActs {
        rows,
        blocks: cols / QK,
        q,
        d,
        s,
    }
}

/// Which kernel runs; tests call each one the machine has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QIsa {
    Avx512Vnni,
    Avx2,
    Portable,
}

/// Every kernel this CPU can run, best first.
pub fn available_isas() -> Vec<QIsa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512vnni")
            && has!("fma")
            && has!("f16c")
        {
            v.push(QIsa::Avx512Vnni);
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            v.push(QIsa::Avx2);
        }
    }
    v.push(QIsa::Portable);
    v
}

fn best_isa() -> QIsa {
    static BEST: std::sync::OnceLock<QIsa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| available_isas()[0])
}

/// One activation row's pointers for the kernels.
#[derive(Clone, Copy)]
struct XRow {
    q: *const i8,
    d: *const f32,
    s: *const f32,
}

fn x_row(a: &QActs, r: usize) -> XRow {
    XRow {
        q: a.q[r * a.blocks * QK..].as_ptr(),
        d: a.d[r * a.blocks..].as_ptr(),
        s: a.s[r * a.blocks..].as_ptr(),
    }
}

/// Portable: one (row, weight row) pair at a time, exact integer block dots.
fn dot_portable<const T: u8>(a: &QActs, r: usize, w: &[u8]) -> f32 {
    let bb = block_bytes(T);
    let nb = a.blocks;
    let (mut acc, mut macc) = (0f32, 0f32);
    for b in 0..nb {
        let blk = &w[b * bb..(b + 1) * bb];
        let i = r * nb + b;
        let (xq, dx, sx) = (&a.q[i * QK..(i + 1) * QK], a.d[i], a.s[i]);
        let dw = f16(blk, 0);
        let isum: i32 = if T == T_Q8_0 {
            blk[2..34]
                .iter()
                .zip(xq)
                .map(|(&w, &q)| (w as i8) as i32 * q as i32)
                .sum()
        } else {
            let qs = if T == T_Q4_1 {
                &blk[4..20]
            } else {
                &blk[2..18]
            };
            (0..16)
                .map(|j| {
                    (qs[j] & 0x0f) as i32 * xq[j] as i32 + (qs[j] >> 4) as i32 * xq[j + 16] as i32
                })
                .sum()
        };
        acc += (dw * dx) * isum as f32;
        if T != T_Q8_0 {
            let mw = if T == T_Q4_1 { f16(blk, 2) } else { -8.0 * dw };
            macc += mw * sx;
        }
    }
    acc + macc
}

fn task_portable<const T: u8>(a: &QActs, w: &QMatrix, j0: usize, yt: &mut [f32]) {
    let rows = a.rows;
    let rb = w.row_bytes();
    for (jj, out) in yt.chunks_mut(rows).enumerate() {
        let wj = &w.data[(j0 + jj) * rb..(j0 + jj + 1) * rb];
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_portable::<T>(a, r, wj);
        }
    }
}

/// The tile driver shared by the SIMD kernels: `R`-row × `J`-weight-row tiles over a task's
/// output rows, then the leftovers one by one, every pair through the same `tile`.
macro_rules! tile_driver {
    ($feature:literal, $tj:literal, $tr:literal) => {
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn rows_for<const T: u8, const J: usize>(
            a: &super::QActs,
            ws: [*const u8; J],
            out: &mut [f32],
        ) {
            let rows = a.rows;
            let xr = |r: usize| super::x_row(a, r);
            let mut r = 0;
            while $tr == 8 && r + 8 <= rows {
                let d = tile::<T, 8, J>(std::array::from_fn(|i| xr(r + i)), ws, a.blocks);
                for (dr, rr) in d.iter().zip(r..) {
                    for (j, v) in dr.iter().enumerate() {
                        out[j * rows + rr] = *v;
                    }
                }
                r += 8;
            }
            while r + 4 <= rows {
                let d = tile::<T, 4, J>([xr(r), xr(r + 1), xr(r + 2), xr(r + 3)], ws, a.blocks);
                for (dr, rr) in d.iter().zip(r..) {
                    for (j, v) in dr.iter().enumerate() {
                        out[j * rows + rr] = *v;
                    }
                }
                r += 4;
            }
            while r < rows {
                let d = tile::<T, 1, J>([xr(r)], ws, a.blocks);
                for (j, v) in d[0].iter().enumerate() {
                    out[j * rows + r] = *v;
                }
                r += 1;
            }
        }

        /// # Safety
        /// The CPU must support the module's features; `w` holds at least the weight rows
        /// `j0 .. j0 + yt.len() / a.rows`, of `a.blocks` blocks each.
        #[target_feature(enable = $feature)]
        pub unsafe fn task<const T: u8>(
            a: &super::QActs,
            w: &super::QMatrix,
            j0: usize,
            yt: &mut [f32],
        ) {
            const TJ: usize = $tj;
            let rows = a.rows;
            let rb = w.row_bytes();
            let wp = |j: usize| w.data.as_ptr().add(j * rb);
            let count = yt.len() / rows;
            let mut jj = 0;
            while jj + TJ <= count {
                let ws: [*const u8; TJ] = std::array::from_fn(|t| wp(j0 + jj + t));
                rows_for::<T, TJ>(a, ws, &mut yt[jj * rows..(jj + TJ) * rows]);
                jj += TJ;
            }
            while jj < count {
                rows_for::<T, 1>(a, [wp(j0 + jj)], &mut yt[jj * rows..(jj + 1) * rows]);
                jj += 1;
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{block_bytes, XRow, QK, T_Q4_1, T_Q8_0};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn h2f(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// A weight block as 32 bytes for `vpmaddubsw` (Q4: the nibbles 0..16 in element order;
    /// Q8_0: the signed values, made unsigned per pair in `tile`), its scale and offset.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn decode<const T: u8>(p: *const u8) -> (__m256i, f32, f32) {
        let d = h2f(p);
        if T == T_Q8_0 {
            return (_mm256_loadu_si256(p.add(2) as *const __m256i), d, 0.0);
        }
        let (m, qs) = if T == T_Q4_1 {
            (h2f(p.add(2)), p.add(4))
        } else {
            (-8.0 * d, p.add(2))
        };
        let raw = _mm_loadu_si128(qs as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        (_mm256_set_m128i(hi, lo), d, m)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `v` in lane 0, zeros elsewhere: the Q4 offset term `mw·s` rides in the same vector
    /// accumulator as the block dots (one FMA instead of scalar work per pair).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lane0(v: f32) -> __m256 {
        _mm256_zextps128_ps256(_mm_set_ss(v))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: u8, const R: usize, const J: usize>(
        xs: [XRow; R],
        ws: [*const u8; J],
        nb: usize,
    ) -> [[f32; J]; R] {
        let bb = block_bytes(T);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); J]; R];
        for b in 0..nb {
            let mut wv = [_mm256_setzero_si256(); J];
            let mut wu = [_mm256_setzero_si256(); J];
            let mut dwv = [_mm256_setzero_ps(); J];
            let mut mwv = [_mm256_setzero_ps(); J];
            for j in 0..J {
                let (v, d, m) = decode::<T>(ws[j].add(b * bb));
                wv[j] = v;
                // Q8_0: |w| as the unsigned operand, the sign moved onto x below.
                wu[j] = if T == T_Q8_0 {
                    _mm256_sign_epi8(v, v)
                } else {
                    v
                };
                dwv[j] = _mm256_set1_ps(d);
                mwv[j] = lane0(m);
            }
            for r in 0..R {
                let x = _mm256_loadu_si256(xs[r].q.add(b * QK) as *const __m256i);
                let dxv = _mm256_set1_ps(*xs[r].d.add(b));
                let sxv = lane0(*xs[r].s.add(b));
                for j in 0..J {
                    let xv = if T == T_Q8_0 {
                        _mm256_sign_epi8(x, wv[j])
                    } else {
                        x
                    };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wu[j], xv), ones);
                    let scale = _mm256_mul_ps(dwv[j], dxv);
                    acc[r][j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[r][j]);
                    if T != T_Q8_0 {
                        acc[r][j] = _mm256_fmadd_ps(mwv[j], sxv, acc[r][j]);
                    }
                }
            }
        }
        let mut out = [[0f32; J]; R];
        for r in 0..R {
            for j in 0..J {
                out[r][j] = hsum(acc[r][j]);
            }
        }
        out
    }

    // 16 registers: 4 × 2 accumulators plus the operands.
    tile_driver!("avx2,fma,f16c", 2, 4);
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::avx2::decode;
    use super::{block_bytes, XRow, QK, T_Q8_0};
    use std::arch::x86_64::*;

    /// Two blocks side by side in one 512-bit register (the second zero past the last block).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn pair(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
    }

    /// `[a × 8, b × 8]`: one value per block of a pair.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn halves(a: f32, b: f32) -> __m512 {
        _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile<const T: u8, const R: usize, const J: usize>(
        xs: [XRow; R],
        ws: [*const u8; J],
        nb: usize,
    ) -> [[f32; J]; R] {
        let bb = block_bytes(T);
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        let mut b = 0;
        while b < nb {
            // The last block of an odd count pairs with zeros (weights, x and scales).
            let two = b + 1 < nb;
            let mut wu = [_mm512_setzero_si512(); J];
            let mut neg = [0u64; J];
            let mut dwv = [_mm512_setzero_ps(); J];
            let mut mwv = [_mm512_setzero_ps(); J];
            for j in 0..J {
                let (v0, d0, m0) = decode::<T>(ws[j].add(b * bb));
                let (v1, d1, m1) = if two {
                    decode::<T>(ws[j].add((b + 1) * bb))
                } else {
                    (_mm256_setzero_si256(), 0.0, 0.0)
                };
                let v = pair(v0, v1);
                dwv[j] = halves(d0, d1);
                // The Q4 offset term `mw·s` rides in lanes 0 and 8 of the same accumulator.
                mwv[j] = _mm512_maskz_mov_ps(0x0101, halves(m0, m1));
                if T == T_Q8_0 {
                    // |w| unsigned, the sign of w moved onto x below.
                    neg[j] = _mm512_movepi8_mask(v);
                    wu[j] = _mm512_abs_epi8(v);
                } else {
                    wu[j] = v;
                }
            }
            for r in 0..R {
                // A row's blocks are contiguous: one load for the pair (half of it for the
                // last block of an odd count, which must not read past the row).
                let xp = xs[r].q.add(b * QK);
                let x = if two {
                    _mm512_loadu_si512(xp as *const __m512i)
                } else {
                    _mm512_maskz_loadu_epi8(0xffff_ffff, xp)
                };
                let at = |p: *const f32| if two { *p.add(b + 1) } else { 0.0 };
                let dxv = halves(*xs[r].d.add(b), at(xs[r].d));
                let sxv = _mm512_maskz_mov_ps(0x0101, halves(*xs[r].s.add(b), at(xs[r].s)));
                for j in 0..J {
                    let xv = if T == T_Q8_0 {
                        _mm512_mask_sub_epi8(x, neg[j], _mm512_setzero_si512(), x)
                    } else {
                        x
                    };
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu[j], xv);
                    let scale = _mm512_mul_ps(dwv[j], dxv);
                    acc[r][j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(p), acc[r][j]);
                    if T != T_Q8_0 {
                        acc[r][j] = _mm512_fmadd_ps(mwv[j], sxv, acc[r][j]);
                    }
                }
            }
            b += 2;
        }
        let mut out = [[0f32; J]; R];
        for r in 0..R {
            for j in 0..J {
                out[r][j] = _mm512_reduce_add_ps(acc[r][j]);
            }
        }
        out
    }

    // 32 registers: 8 × 2 accumulators plus the operands (a weight block's decoding, the
    // costly part, is shared by 8 rows).
    tile_driver!("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c", 2, 8);
}

fn task(isa: QIsa, a: &QActs, w: &QMatrix, j0: usize, yt: &mut [f32]) {
    macro_rules! by_type {
        ($($f:ident)::+) => {
            match w.ty {
                QType::Q4_0 => $($f)::+::<T_Q4_0>(a, w, j0, yt),
                QType::Q4_1 => $($f)::+::<T_Q4_1>(a, w, j0, yt),
                QType::Q8_0 => $($f)::+::<T_Q8_0>(a, w, j0, yt),
            }
        };
    }
    match isa {
        // SAFETY: `isa` comes from `available_isas` (features detected at run time); the
        // task's rows lie inside `w` (`qmatmul_wt_with` sizes the chunks from `w.rows`).
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni => unsafe { by_type!(vnni::task) },
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 => unsafe { by_type!(avx2::task) },
        _ => by_type!(task_portable),
    }
}

/// `y [rows, w.rows] = x [rows, w.cols] · wᵀ` with the best kernel this CPU has.
pub fn qmatmul_wt(x: &[f32], rows: usize, w: &QMatrix) -> Vec<f32> {
    qmatmul_wt_with(best_isa(), x, rows, w)
}

/// [`qmatmul_wt`] on a chosen kernel (one of [`available_isas`]).
pub fn qmatmul_wt_with(isa: QIsa, x: &[f32], rows: usize, w: &QMatrix) -> Vec<f32> {
    assert!(
        available_isas().contains(&isa),
        "{isa:?} is not available on this CPU"
    );
    let (out, inner) = (w.rows, w.cols);
    assert_eq!(x.len(), rows * inner, "activation shape");
    let mut y = vec![0f32; rows * out];
    for (r0, ychunk) in (0..rows)
        .step_by(ROW_CHUNK)
        .zip(y.chunks_mut(ROW_CHUNK * out))
    {
        let n = ychunk.len() / out;
        let a = quantize_acts(&x[r0 * inner..(r0 + n) * inner], n, inner);
        let mut yt = vec![0f32; out * n];
        yt.par_chunks_mut(TASK_ROWS * n)
            .enumerate()
            .for_each(|(t, chunk)| task(isa, &a, w, t * TASK_ROWS, chunk));
        for j in 0..out {
            for r in 0..n {
                ychunk[r * out + j] = yt[j * n + r];
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: usize, seed: u32) -> u32 {
        (i as u32)
            .wrapping_mul(2_654_435_761)
            .wrapping_add(seed.wrapping_mul(40_503))
            .rotate_left(13)
            .wrapping_mul(2_246_822_519)
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((hash(i, seed) >> 8) as f32 / (1u32 << 24) as f32) - 0.5)
            .collect()
    }

    /// Random blocks of `ty`: scales around 0.01, Q4_1 offsets negative as real checkpoints'.
    fn matrix(ty: QType, rows: usize, cols: usize, seed: u32) -> QMatrix {
        let nb = rows * cols / QK;
        let mut bytes = Vec::with_capacity(nb * ty.block_bytes());
        let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        for b in 0..nb {
            let r = hash(b, seed);
            bytes.extend(h(0.002 + (r % 1000) as f32 * 2e-5));
            if ty == QType::Q4_1 {
                bytes.extend(h(-0.1 - (r % 777) as f32 * 1e-4));
            }
            let n = if ty == QType::Q8_0 { 32 } else { 16 };
            bytes.extend((0..n).map(|k| (hash(b * 64 + k, seed ^ 0x5555) >> 7) as u8));
        }
        QMatrix::new(ty, rows, cols, bytes).unwrap()
    }

    /// f64 dot products of the dequantised weights with the dequantised activations, and the
    /// sum of |terms| (the scale of f32 rounding).
    fn reference(a: &QActs, w: &QMatrix) -> Vec<(f64, f64)> {
        let mut wf = vec![0f32; w.cols];
        let mut y = vec![(0f64, 0f64); a.rows * w.rows];
        for j in 0..w.rows {
            w.dequant_row(j, &mut wf);
            for r in 0..a.rows {
                let (mut s, mut m) = (0f64, 0f64);
                for (k, &wv) in wf.iter().enumerate() {
                    let xv = a.q[r * w.cols + k] as f64 * a.d[r * a.blocks + k / QK] as f64;
                    s += wv as f64 * xv;
                    m += (wv as f64 * xv).abs();
                }
                y[r * w.rows + j] = (s, m);
            }
        }
        y
    }

    const TYPES: [QType; 3] = [QType::Q4_0, QType::Q4_1, QType::Q8_0];

    #[test]
    fn dequant_row_matches_the_model_crate() {
        for ty in TYPES {
            let w = matrix(ty, 3, 96, 7);
            let g = match ty {
                QType::Q4_0 => GgmlType::Q4_0,
                QType::Q4_1 => GgmlType::Q4_1,
                QType::Q8_0 => GgmlType::Q8_0,
            };
            let all = tpuserve_model::dequant::dequantize(g, &w.data, 3 * 96).unwrap();
            let mut row = vec![0f32; 96];
            for r in 0..3 {
                w.dequant_row(r, &mut row);
                assert_eq!(row, all[r * 96..(r + 1) * 96], "{ty:?} row {r}");
            }
        }
    }

    #[test]
    fn activations_round_trip_within_half_a_step() {
        let x = data(5 * 64, 11);
        let a = quantize_acts(&x, 5, 64);
        for (i, &v) in x.iter().enumerate() {
            let b = i / QK;
            let back = a.q[i] as f32 * a.d[b];
            assert!(
                (back - v).abs() <= a.d[b] * 0.5 + 1e-7,
                "{i}: {v} vs {back}"
            );
        }
        for b in 0..a.d.len() {
            let sum: i32 = a.q[b * QK..(b + 1) * QK].iter().map(|&q| q as i32).sum();
            assert_eq!(a.s[b], a.d[b] * sum as f32);
        }
        let z = quantize_acts(&[0f32; 32], 1, 32);
        assert_eq!((z.d[0], z.s[0]), (0.0, 0.0));
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_for_every_shape_and_tail() {
        eprintln!("kernels on this CPU: {:?}", available_isas());
        for isa in available_isas() {
            for ty in TYPES {
                for &(out, inner) in &[(1, 32), (3, 64), (70, 96), (130, 160), (67, 576)] {
                    for rows in 1..=9 {
                        let w = matrix(ty, out, inner, (out * 31 + inner) as u32);
                        let x = data(rows * inner, rows as u32);
                        let y = qmatmul_wt_with(isa, &x, rows, &w);
                        let r = reference(&quantize_acts(&x, rows, inner), &w);
                        for (i, (a, &(b, m))) in y.iter().zip(&r).enumerate() {
                            assert!(
                                (*a as f64 - b).abs() <= 1e-5 * (1.0 + m),
                                "{isa:?} {ty:?} {rows}x{out}x{inner} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_any_batch() {
        let inner = 160;
        for isa in available_isas() {
            for ty in TYPES {
                let w = matrix(ty, 131, inner, 3);
                let x = data(70 * inner, 4);
                for at in [2, 66] {
                    let alone = qmatmul_wt_with(isa, &x[at * inner..(at + 1) * inner], 1, &w);
                    for rows in [3, 4, 5, 7, 9, 67, 70] {
                        if rows <= at {
                            continue;
                        }
                        let y = qmatmul_wt_with(isa, &x[..rows * inner], rows, &w);
                        assert_eq!(
                            &y[at * 131..(at + 1) * 131],
                            &alone[..],
                            "{isa:?} {ty:?}: row {at} in a batch of {rows}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_agree_with_the_f32_path_on_dequantised_weights() {
        // The int8 activations cost a little accuracy, no more: within 1 % of the output scale.
        let (out, inner, rows) = (40, 576, 3);
        let x = data(rows * inner, 9);
        for ty in TYPES {
            let w = matrix(ty, out, inner, 5);
            let wf = w
                .data
                .chunks(w.row_bytes())
                .enumerate()
                .flat_map(|(j, _)| {
                    let mut r = vec![0f32; inner];
                    w.dequant_row(j, &mut r);
                    r
                })
                .collect::<Vec<_>>();
            let f = crate::matvec::matmul_wt(&x, rows, &wf, out, inner);
            let q = qmatmul_wt(&x, rows, &w);
            let scale = f.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in q.iter().zip(&f) {
                assert!((a - b).abs() <= 0.01 * scale, "{ty:?}: {a} vs {b}");
            }
        }
    }
}
