//! Activation rows quantised per 32-block for the int8 kernels of `qmatvec`, straight from
//! what produces them: a plain f32 row, the MLP's `silu(g) · u`, or an RMS-normed row. The
//! last two are never written out as f32: a 2,024-row SmolLM2 prompt step wrote, zeroed and
//! read back 12.6 MB of SwiGLU products and two 4.7 MB normed copies in every layer.
//!
//! Every path gives the same bytes for the same values: `d = max|x| / 127`, `q = round(x /
//! d)` (ties to even) clamped to ±127, `s = d·Σq`, `c = 128·Σq`; the vector code rounds with
//! the conversion instruction, the portable code with `ROUND_MAGIC`. The fused sources
//! compute each value exactly as their unfused functions do (`activation::silu_mul`,
//! [`inv_rms_rows`] and [`scale_row`]), so a fused quantisation equals the unfused one, bit for bit.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Values per block.
pub const QK: usize = 32;

/// Activation rows quantised per 32-block: `q` int8 (in −127..=127), per block `d` (scale),
/// `s = d·Σq` and `c = −128·Σq` (where VNNI's Q8_0 and IQ4 kernels, which multiply `w + 128`
/// as unsigned bytes, start their integer sums, to end at the sums over `w`). Laid out in
/// chunks of [`CHUNK_ROWS`] rows, each chunk block by block with its rows' blocks side by
/// side ([`QActs::at`]): a kernel tile of rows finds every row's bytes and scales at fixed
/// offsets from one pointer. With rows apart (row-major), a 16-row tile kept a pointer per
/// row in general registers, spilled them and added strides between its `vpdpbusd`s: 16 %
/// of the kernel's time.
pub struct QActs {
    pub rows: usize,
    pub blocks: usize,
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub c: Vec<i32>,
    /// Per block, the sum of its first 16 values, made on first use ([`QActs::half_sums`]).
    pub h: std::sync::OnceLock<Vec<i32>>,
    /// Per block, each half's sum times −32 and times −4, made on first use
    /// ([`QActs::half_offsets`]).
    pub o: [std::sync::OnceLock<Vec<i32>>; 2],
}

/// Rows per layout chunk of [`QActs`]; the int8 kernels' row chunks are these.
pub const CHUNK_ROWS: usize = 64;

/// Where block `b` of row `r` is in a [`QActs`] of `rows` rows of `nb` blocks: its index in
/// `d`, `s`, `c` (and its bytes at 32 × that in `q`). Within a chunk, block `b` of the
/// chunk's rows are consecutive.
#[inline(always)]
pub fn block_at(rows: usize, nb: usize, r: usize, b: usize) -> usize {
    let c0 = r - r % CHUNK_ROWS;
    let n = (rows - c0).min(CHUNK_ROWS);
    c0 * nb + b * n + (r - c0)
}

impl QActs {
    /// Per block (in `d`'s order), the sum of its first 16 values: Q6_K's, Q3_K's and Q2_K's
    /// scales change every 16 values (`half_offsets`; Q2_K's min multiplies each half's sum).
    /// Made once, when such a matrix first reads these activations (the quantisers' loops for
    /// every model were ~12 % slower computing it for each block).
    pub fn half_sums(&self) -> &[i32] {
        self.h.get_or_init(|| {
            self.q
                .chunks_exact(QK)
                .map(|b| b[..16].iter().map(|&v| v as i32).sum())
                .collect()
        })
    }

    /// Per block (in `d`'s order), `−off·Σx` over its first and over its second 16 values,
    /// side by side, for the offsets 32 (Q6_K) and 4 (Q3_K): the kernels start each half's
    /// integer sum there, so that it ends as the sum over `q − off` with no subtraction
    /// after the products (two vector operations a row and block fewer), and load it
    /// broadcast from memory. Made once, on first use.
    pub fn half_offsets(&self, off: i32) -> &[i32] {
        assert!(off == 32 || off == 4, "offset {off}");
        self.o[usize::from(off == 4)].get_or_init(|| {
            self.half_sums()
                .iter()
                .zip(&self.c)
                .flat_map(|(&lo, &c)| [-off * lo, -off * (-c / 128 - lo)])
                .collect()
        })
    }

    /// See [`block_at`].
    #[inline(always)]
    pub fn at(&self, r: usize, b: usize) -> usize {
        block_at(self.rows, self.blocks, r, b)
    }

    /// Where row `r`'s block 0 is, and how far apart its consecutive blocks are (the rows in
    /// its chunk): block `b` of row `r + i` of the same chunk is at `start + b · step + i`.
    #[inline(always)]
    pub fn row_start(&self, r: usize) -> (usize, usize) {
        let c0 = r - r % CHUNK_ROWS;
        (self.at(r, 0), (self.rows - c0).min(CHUNK_ROWS))
    }

    /// Row `r`'s 32 bytes of block `b`.
    pub fn block_q(&self, r: usize, b: usize) -> &[i8] {
        let i = self.at(r, b) * QK;
        &self.q[i..i + QK]
    }
}

/// Rows quantised by one parallel task: a decode step's rows (at most this many) are one
/// task, run in place without a fork and join (four per layer).
pub(crate) const QUANT_ROWS: usize = CHUNK_ROWS;

/// The same for the SwiGLU source, whose rows cost ~40 × a plain row's (an exp and a division
/// a value): a 32-row decode step's product took ~25 µs a layer on one thread while the other
/// waited, so its rows go in tasks of this many.
const SWIGLU_ROWS: usize = 16;

/// Blocks the vector quantisers handle per pass (a row of up to this many, or as many short
/// rows as make it): enough independent blocks for each pass to overlap them.
const GROUP_BLOCKS: usize = 64;

/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude < 2²² to the nearest integer
/// (ties to even) in two plain additions, which vectorise; `f32::round` is a libm call per
/// value on the baseline target and was 2 % of a decode profile.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `1 / sqrt(mean(x²) + eps)` of each row of `x` (`cols` values a row) into `out`.
///
/// Each row's squares are summed one after another, in order (the bits every earlier version
/// of this runner had: the int8 path is sensitive enough that a different summation order
/// moves single logprobs by tenths of a nat, see `goldens_cpu`), but eight rows' chains are
/// interleaved: one chain waits on each add's latency, eight keep the adder busy. A decode
/// step's norms ran their rows one chain at a time on one thread, ~4 % of the step.
///
/// With AVX2 the eight rows' next eight values are transposed into eight vectors (value `k`
/// of every row in one), so each step of the chains is one vector multiply and add: the
/// compiled loop had loaded, multiplied and added each value on its own (2.2 % of a
/// 2,024-row prompt step).
pub fn inv_rms_rows(x: &[f32], cols: usize, eps: f32, out: &mut [f32]) {
    const R: usize = 8;
    assert_eq!(x.len(), cols * out.len(), "norm shape");
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    let mut rows = x.chunks_exact(cols * R);
    let mut outs = out.chunks_exact_mut(R);
    for (xs, o) in (&mut rows).zip(&mut outs) {
        let mut acc = [0f32; R];
        let mut k0 = 0;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 was detected; `xs` holds R rows of `cols` values.
            k0 = unsafe { x86::square_sums8(xs, cols, &mut acc) };
        }
        for k in k0..cols {
            for (r, a) in acc.iter_mut().enumerate() {
                let v = xs[r * cols + k];
                *a += v * v;
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o = 1.0 / (a / cols as f32 + eps).sqrt();
        }
    }
    for (xr, o) in rows
        .remainder()
        .chunks_exact(cols)
        .zip(outs.into_remainder())
    {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        *o = 1.0 / (ms + eps).sqrt();
    }
}

/// `out = w · (x · inv)`, one row of an RMS norm.
pub fn scale_row(x: &[f32], w: &[f32], inv: f32, out: &mut [f32]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// Where a quantisation's values come from (`cols` values a row).
#[derive(Clone, Copy)]
enum Src<'a> {
    /// `x[r·cols ..]`.
    Plain(&'a [f32]),
    /// `silu(g) · u` with each row of `gu` holding `g` then `u`.
    Swiglu(&'a [f32]),
    /// `x[r·cols ..]` RMS-normed (`inv_rms_rows`, `scale_row`) with gain `w`.
    Norm(&'a [f32], &'a [f32], f32),
}

impl Src<'_> {
    /// The RMS factors of rows `r0 .. r0 + inv.len()` for a `Norm` source into `inv`
    /// (zeros for the others).
    fn invs_into(&self, r0: usize, cols: usize, inv: &mut [f32]) {
        if let Src::Norm(x, _, eps) = *self {
            inv_rms_rows(&x[r0 * cols..(r0 + inv.len()) * cols], cols, eps, inv);
        } else {
            inv.fill(0.0);
        }
    }

    /// [`Self::invs_into`] into a new vector.
    fn invs(&self, r0: usize, n: usize, cols: usize) -> Vec<f32> {
        let mut inv = vec![0f32; n];
        self.invs_into(r0, cols, &mut inv);
        inv
    }

    /// Row `r`'s values (`inv`: its RMS norm's factor), written into `buf` where they must
    /// be computed.
    fn row<'b>(&'b self, r: usize, cols: usize, inv: f32, buf: &'b mut Vec<f32>) -> &'b [f32] {
        match *self {
            Src::Plain(x) => &x[r * cols..(r + 1) * cols],
            Src::Swiglu(gu) => {
                buf.resize(cols, 0.0);
                let (g, u) = gu[r * 2 * cols..(r + 1) * 2 * cols].split_at(cols);
                crate::activation::silu_mul(g, u, buf);
                buf
            }
            Src::Norm(x, w, _) => {
                buf.resize(cols, 0.0);
                scale_row(&x[r * cols..(r + 1) * cols], w, inv, buf);
                buf
            }
        }
    }
}

/// Where the quantising tasks write: the whole result's bytes (not yet written) and block
/// values, each task its own rows' blocks, wherever [`block_at`] puts them (a task's rows are
/// not one run of the arrays).
#[derive(Clone, Copy)]
struct Part {
    q: *mut i8,
    d: *mut f32,
    s: *mut f32,
    c: *mut i32,
    /// Of the whole result.
    rows: usize,
    nb: usize,
}

// SAFETY: tasks write disjoint rows' blocks through it, and the result outlives them.
unsafe impl Send for Part {}
unsafe impl Sync for Part {}

impl Part {
    /// The result's arrays: `d.len() / nb` rows of `nb` blocks (32 bytes each in `q`).
    fn new(
        q: &mut [MaybeUninit<i8>],
        d: &mut [f32],
        s: &mut [f32],
        c: &mut [i32],
        nb: usize,
    ) -> Self {
        let rows = d.len() / nb.max(1);
        assert!(q.len() == rows * nb * QK && s.len() == d.len() && c.len() == d.len());
        Part {
            q: q.as_mut_ptr() as *mut i8,
            d: d.as_mut_ptr(),
            s: s.as_mut_ptr(),
            c: c.as_mut_ptr(),
            rows,
            nb,
        }
    }

    /// Writes row `r`'s block `b`: its bytes through `bytes` (given where they go) and its
    /// `d`, `s`, `c` as it returns them.
    ///
    /// # Safety
    /// `r < rows`, `b < nb`; no other thread writes that block.
    #[inline(always)]
    unsafe fn put(&self, r: usize, b: usize, bytes: impl FnOnce(*mut i8) -> (f32, f32, i32)) {
        let j = block_at(self.rows, self.nb, r, b);
        let (d, s, c) = bytes(self.q.add(j * QK));
        (*self.d.add(j), *self.s.add(j), *self.c.add(j)) = (d, s, c);
    }
}

#[inline(always)]
fn quantize_block(xb: &[f32], qb: &mut [MaybeUninit<i8>; QK]) -> (f32, f32, i32) {
    let mut amax = [0f32; 8];
    for (i, &v) in xb.iter().enumerate() {
        let a = v.abs();
        if a > amax[i % 8] {
            amax[i % 8] = a;
        }
    }
    let amax = amax.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qb.iter_mut().zip(xb) {
        let r = ((v * inv + ROUND_MAGIC) - ROUND_MAGIC).clamp(-127.0, 127.0) as i32;
        q.write(r as i8);
        sum += r;
    }
    (scale, scale * sum as f32, -128 * sum)
}

/// Portable: each row's values (computed into a buffer where they must be), block by block.
///
/// # Safety
/// As [`quantize_part`].
unsafe fn quantize_portable(src: Src<'_>, r0: usize, n: usize, cols: usize, p: Part) {
    let mut buf = Vec::new();
    let invs = src.invs(r0, n, cols);
    for (i, &inv) in invs.iter().enumerate() {
        let x = src.row(r0 + i, cols, inv, &mut buf);
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            p.put(r0 + i, b, |q| {
                quantize_block(xb, &mut *(q as *mut [MaybeUninit<i8>; QK]))
            });
        }
    }
}

/// Which quantiser runs; tests call each one the machine has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantIsa {
    Avx512,
    Avx2,
    Portable,
}

/// Every quantiser this CPU can run, best first.
pub fn available() -> Vec<QuantIsa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = crate::attention_avx2::available();
        if avx2 && has!("avx512f") && has!("avx512bw") {
            v.push(QuantIsa::Avx512);
        }
        if avx2 {
            v.push(QuantIsa::Avx2);
        }
    }
    v.push(QuantIsa::Portable);
    v
}

fn best() -> QuantIsa {
    static BEST: std::sync::OnceLock<QuantIsa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| available()[0])
}

/// Quantises `rows × cols` activations (`cols` a multiple of 32), rows in parallel (each
/// row's bytes depend on that row alone).
pub fn quantize_acts(x: &[f32], rows: usize, cols: usize) -> QActs {
    assert_eq!(x.len(), rows * cols, "activation shape");
    quantize_rows(best(), Src::Plain(x), rows, cols)
}

/// The MLP's `silu(g) · u` (`gu`: each row's `g` then `u`, `cols` each), quantised as
/// [`quantize_acts`] quantises `activation::silu_mul`'s output, without writing it out.
pub fn quantize_swiglu(gu: &[f32], rows: usize, cols: usize) -> QActs {
    assert_eq!(gu.len(), rows * 2 * cols, "gate/up shape");
    quantize_rows(best(), Src::Swiglu(gu), rows, cols)
}

/// The RMS norm of each row of `x` (gain `w`), quantised as [`quantize_acts`] quantises
/// the normed rows (`inv_rms_rows`, `scale_row`), without writing them out.
pub fn quantize_rms_norm(x: &[f32], w: &[f32], eps: f32) -> QActs {
    let cols = w.len();
    assert!(cols > 0 && x.len().is_multiple_of(cols), "norm shape");
    quantize_rows(best(), Src::Norm(x, w, eps), x.len() / cols, cols)
}

/// Rows `r0 .. r0 + n` of `src` quantised on the calling thread into `part`.
///
/// # Safety
/// `isa` is one of [`available`]; the source has those rows of `cols` values, `part` holds
/// them (`cols / 32` blocks a row), and no other thread writes them.
unsafe fn quantize_part(isa: QuantIsa, src: Src<'_>, r0: usize, n: usize, cols: usize, part: Part) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        QuantIsa::Avx512 => x86::quantize::<true>(src, r0, n, cols, part),
        #[cfg(target_arch = "x86_64")]
        QuantIsa::Avx2 => x86::quantize::<false>(src, r0, n, cols, part),
        _ => quantize_portable(src, r0, n, cols, part),
    }
}

/// One 32-value block of `silu(g)·u` for each of `rows` rows of `tile` (a row: 32 values
/// of g, then the 32 of u), quantised on the calling thread with the best quantiser into
/// `q` (32 bytes a row) and each row's `d`, `s`, `c`: what [`quantize_swiglu`] gives for
/// that block of those rows.
pub(crate) fn quantize_swiglu_block(
    tile: &[f32],
    rows: usize,
    q: &mut [MaybeUninit<i8>],
    d: &mut [f32],
    s: &mut [f32],
    c: &mut [i32],
) {
    assert!(
        tile.len() >= rows * 2 * QK && q.len() == rows * QK && rows <= CHUNK_ROWS,
        "swiglu tile shape"
    );
    assert!(d.len() == rows && s.len() == rows && c.len() == rows);
    let src = Src::Swiglu(&tile[..rows * 2 * QK]);
    // One block a row, at most one chunk: the rows' blocks lie in row order.
    let part = Part::new(q, d, s, c, 1);
    // SAFETY: `best` is available; the tile has `rows` rows of one block and the part holds
    // them (asserted); this thread alone writes them.
    unsafe { quantize_part(best(), src, 0, rows, QK, part) }
}

/// Quantises rows in parallel tasks of up to [`QUANT_ROWS`] rows ([`SWIGLU_ROWS`] for the
/// SwiGLU source).
fn quantize_rows(isa: QuantIsa, src: Src<'_>, rows: usize, cols: usize) -> QActs {
    assert!(cols.is_multiple_of(QK), "activation width {cols}");
    let (x, per_row) = match src {
        Src::Plain(x) | Src::Norm(x, ..) => (x, cols),
        Src::Swiglu(gu) => (gu, 2 * cols),
    };
    assert_eq!(x.len(), rows * per_row, "activation shape");
    if let Src::Norm(_, w, _) = src {
        assert_eq!(w.len(), cols, "norm gain width");
    }
    let nb = rows * cols / QK;
    let mut q: Vec<i8> = Vec::with_capacity(rows * cols);
    let (mut d, mut s, mut c) = (vec![0f32; nb], vec![0f32; nb], vec![0i32; nb]);
    let task = match src {
        Src::Swiglu(_) => SWIGLU_ROWS,
        _ => QUANT_ROWS,
    };
    let part = Part::new(
        &mut q.spare_capacity_mut()[..rows * cols],
        &mut d,
        &mut s,
        &mut c,
        cols / QK,
    );
    (0..rows.div_ceil(task)).into_par_iter().for_each(|t| {
        let r0 = t * task;
        // SAFETY: `isa` is available (the callers take it from `available`); the source
        // holds `rows` rows (asserted above) and the part their blocks; task `t` alone
        // writes rows `r0 .. r0 + task`.
        unsafe { quantize_part(isa, src, r0, task.min(rows - r0), cols, part) }
    });
    // SAFETY: every task wrote every byte of its rows (each quantiser writes 32 a block).
    unsafe { q.set_len(rows * cols) };
    QActs {
        rows,
        blocks: cols / QK,
        q,
        d,
        s,
        c,
        h: std::sync::OnceLock::new(),
        o: Default::default(),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Part, Src, GROUP_BLOCKS, QK};
    use crate::activation::x86::{silu_mul16, silu_mul8};
    use std::arch::x86_64::*;

    /// `acc[r] += x² ` over the first `8 · ⌊cols / 8⌋` values of each of the 8 rows of `xs`
    /// (`cols` values a row), in order, a multiply then an add each (as the scalar loop):
    /// eight values of each row at a time, transposed so each vector holds one value of
    /// every row. Returns how many values of each row it summed.
    ///
    /// # Safety
    /// AVX2; `xs` holds 8 rows of `cols` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn square_sums8(xs: &[f32], cols: usize, acc: &mut [f32; 8]) -> usize {
        assert!(xs.len() >= 8 * cols);
        let p = xs.as_ptr();
        let mut a = _mm256_loadu_ps(acc.as_ptr());
        let mut k = 0;
        while k + 8 <= cols {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(i * cols + k)));
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (x, y) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(x, y)
                } else {
                    _mm256_unpackhi_ps(x, y)
                }
            });
            // s[4h + j]: value j (and 4 + j in the high half) of rows 4h .. 4h + 4.
            let s: [__m256; 8] = std::array::from_fn(|i| {
                let (h, j) = (i / 4, i % 4);
                let (x, y) = (t[4 * h + j / 2], t[4 * h + 2 + j / 2]);
                if j % 2 == 0 {
                    _mm256_shuffle_ps(x, y, 0x44)
                } else {
                    _mm256_shuffle_ps(x, y, 0xEE)
                }
            });
            for j in 0..8 {
                let c = if j < 4 {
                    _mm256_permute2f128_ps(s[j], s[4 + j], 0x20)
                } else {
                    _mm256_permute2f128_ps(s[j - 4], s[j], 0x31)
                };
                a = _mm256_add_ps(a, _mm256_mul_ps(c, c));
            }
            k += 8;
        }
        _mm256_storeu_ps(acc.as_mut_ptr(), a);
        k
    }

    /// One block's 32 values of row `r`, computed as the source's unfused function does.
    // Not `inline(always)` (not allowed with target features), but inlined into callers
    // with the same features; closures inside inherit them, which `inline(always)` alone
    // did not give (the intrinsics became calls).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block8(src: Src<'_>, r: usize, cols: usize, b: usize, inv: f32) -> [__m256; 4] {
        match src {
            Src::Plain(x) => {
                let p = x.as_ptr().add(r * cols + b * QK);
                std::array::from_fn(|k| _mm256_loadu_ps(p.add(8 * k)))
            }
            Src::Swiglu(gu) => {
                let g = gu.as_ptr().add(r * 2 * cols + b * QK);
                let u = g.add(cols);
                std::array::from_fn(|k| {
                    silu_mul8(_mm256_loadu_ps(g.add(8 * k)), _mm256_loadu_ps(u.add(8 * k)))
                })
            }
            Src::Norm(x, w, _) => {
                let p = x.as_ptr().add(r * cols + b * QK);
                let g = w.as_ptr().add(b * QK);
                let inv = _mm256_set1_ps(inv);
                std::array::from_fn(|k| {
                    _mm256_mul_ps(
                        _mm256_loadu_ps(g.add(8 * k)),
                        _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * k)), inv),
                    )
                })
            }
        }
    }

    /// As [`block8`] in two 16-lane vectors.
    // Not `inline(always)` (not allowed with target features), but inlined into callers
    // with the same features; closures inside inherit them, which `inline(always)` alone
    // did not give (the intrinsics became calls).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn block16(src: Src<'_>, r: usize, cols: usize, b: usize, inv: f32) -> [__m512; 2] {
        match src {
            Src::Plain(x) => {
                let p = x.as_ptr().add(r * cols + b * QK);
                [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
            }
            Src::Swiglu(gu) => {
                let g = gu.as_ptr().add(r * 2 * cols + b * QK);
                let u = g.add(cols);
                std::array::from_fn(|k| {
                    silu_mul16(
                        _mm512_loadu_ps(g.add(16 * k)),
                        _mm512_loadu_ps(u.add(16 * k)),
                    )
                })
            }
            Src::Norm(x, w, _) => {
                let p = x.as_ptr().add(r * cols + b * QK);
                let g = w.as_ptr().add(b * QK);
                let inv = _mm512_set1_ps(inv);
                std::array::from_fn(|k| {
                    _mm512_mul_ps(
                        _mm512_loadu_ps(g.add(16 * k)),
                        _mm512_mul_ps(_mm512_loadu_ps(p.add(16 * k)), inv),
                    )
                })
            }
        }
    }

    /// `d = max|x| / 127`, the reciprocal the values are scaled by (0 for an all-zero block).
    #[inline(always)]
    fn scales(amax: f32) -> (f32, f32) {
        let scale = amax / 127.0;
        (scale, if scale > 0.0 { 1.0 / scale } else { 0.0 })
    }

    /// AVX2: a block's values into `buf` and their max |x| (a vector max tree).
    // Not `inline(always)` (not allowed with target features), but inlined into callers
    // with the same features; closures inside inherit them, which `inline(always)` alone
    // did not give (the intrinsics became calls).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn amax_avx2(v: [__m256; 4], buf: *mut f32) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        for (k, v) in v.iter().enumerate() {
            _mm256_storeu_ps(buf.add(8 * k), *v);
        }
        let ab = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(ab[0], ab[1]), _mm256_max_ps(ab[2], ab[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        _mm_cvtss_f32(m)
    }

    /// AVX2: a block's values from `buf` scaled by `inv`, rounded to nearest even by
    /// `vcvtps2dq` (what `ROUND_MAGIC` does in the portable code) and packed to bytes;
    /// returns their integer sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quant_avx2(buf: *const f32, inv: f32, q: *mut i8) -> i32 {
        let lim = _mm256_set1_ps(127.0);
        let inv = _mm256_set1_ps(inv);
        let qi: [__m256i; 4] = std::array::from_fn(|k| {
            let t = _mm256_mul_ps(_mm256_loadu_ps(buf.add(8 * k)), inv);
            _mm256_cvtps_epi32(_mm256_max_ps(
                _mm256_min_ps(t, lim),
                _mm256_sub_ps(_mm256_setzero_ps(), lim),
            ))
        });
        let sum = _mm256_add_epi32(
            _mm256_add_epi32(qi[0], qi[1]),
            _mm256_add_epi32(qi[2], qi[3]),
        );
        let s = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(
                _mm256_packs_epi32(qi[0], qi[1]),
                _mm256_packs_epi32(qi[2], qi[3]),
            ),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        _mm256_storeu_si256(q as *mut __m256i, bytes);
        _mm_cvtsi128_si32(s)
    }

    /// AVX-512: [`amax_avx2`] on two 16-lane vectors (a max is exact in any order).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn amax_avx512(v: [__m512; 2], buf: *mut f32) -> f32 {
        _mm512_storeu_ps(buf, v[0]);
        _mm512_storeu_ps(buf.add(16), v[1]);
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])))
    }

    /// AVX-512: [`quant_avx2`]'s arithmetic on two 16-lane vectors (integer sums are exact
    /// in any order), bytes by saturating narrowing (the values are within ±127 already).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn quant_avx512(buf: *const f32, inv: f32, q: *mut i8) -> i32 {
        let lim = _mm512_set1_ps(127.0);
        let inv = _mm512_set1_ps(inv);
        let qi: [__m512i; 2] = std::array::from_fn(|k| {
            let t = _mm512_mul_ps(_mm512_loadu_ps(buf.add(16 * k)), inv);
            _mm512_cvtps_epi32(_mm512_max_ps(
                _mm512_min_ps(t, lim),
                _mm512_sub_ps(_mm512_setzero_ps(), lim),
            ))
        });
        _mm_storeu_si128(q as *mut __m128i, _mm512_cvtsepi32_epi8(qi[0]));
        _mm_storeu_si128(q.add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(qi[1]));
        _mm512_reduce_add_epi32(_mm512_add_epi32(qi[0], qi[1]))
    }

    /// Every row of the part in three passes over groups of rows (one row, or as many as
    /// make [`GROUP_BLOCKS`] blocks): each block's values (written to an L1 buffer) and max
    /// |x| through `values(row, block, inv, buf)`; every block's scale and reciprocal; each
    /// block quantised from the buffer through `quant(buf, inv, q)`, which writes the 32
    /// bytes and returns their integer sum. Done block by block, each block's two divisions
    /// waited on its max and its bytes on the divisions, one dependent chain after another
    /// (~3 cycles a value for the SwiGLU source); the blocks of a group are independent, so
    /// each pass overlaps them. The same bytes and values as one pass. Inlined into each
    /// instruction set's function below, and the closures it is given inherit its features.
    #[inline(always)]
    unsafe fn rows_with<V, Q>(
        src: Src<'_>,
        r0: usize,
        rows: usize,
        cols: usize,
        p: Part,
        values: V,
        quant: Q,
    ) where
        V: Fn(usize, usize, f32, *mut f32) -> f32,
        Q: Fn(*const f32, f32, *mut i8) -> i32,
    {
        let nb = cols / QK;
        let group = (GROUP_BLOCKS / nb.max(1)).clamp(1, rows.max(1));
        // The pass buffers are the thread's (`SCRATCH`): allocated per call they were ~3.5 %
        // of a 32-row decode step (a SwiGLU block is quantised ~1,400 times a step).
        // Taken out and put back rather than borrowed in a closure: the closures below must
        // stay inlined into this function's instruction-set callers.
        let mut sc = SCRATCH.take();
        {
            let Scratch {
                inv: invs,
                buf,
                scale,
                rcp,
            } = &mut sc;
            invs.resize(rows, 0.0);
            buf.resize(buf.len().max(group * cols), 0.0);
            scale.resize(scale.len().max(group * nb), 0.0);
            rcp.resize(rcp.len().max(group * nb), 0.0);
            src.invs_into(r0, cols, invs);
            let mut g0 = 0;
            while g0 < rows {
                let g1 = (g0 + group).min(rows);
                let n = (g1 - g0) * nb;
                for (i, &inv) in invs.iter().enumerate().take(g1).skip(g0) {
                    for b in 0..nb {
                        let k = (i - g0) * nb + b;
                        scale[k] = values(r0 + i, b, inv, buf.as_mut_ptr().add(k * QK));
                    }
                }
                for (d, r) in scale[..n].iter_mut().zip(&mut rcp[..n]) {
                    (*d, *r) = scales(*d);
                }
                for k in 0..n {
                    let (r, b) = (r0 + g0 + k / nb, k % nb);
                    p.put(r, b, |q| {
                        let sum = quant(buf.as_ptr().add(k * QK), rcp[k], q);
                        let d = scale[k];
                        (d, d * sum as f32, -128 * sum)
                    });
                }
                g0 = g1;
            }
        }
        SCRATCH.set(sc);
    }

    /// A thread's buffers for [`rows_with`]'s passes (each pass writes what it reads).
    #[derive(Default)]
    struct Scratch {
        inv: Vec<f32>,
        buf: Vec<f32>,
        scale: Vec<f32>,
        rcp: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_avx2(src: Src<'_>, r0: usize, rows: usize, cols: usize, p: Part) {
        rows_with(
            src,
            r0,
            rows,
            cols,
            p,
            |r, b, inv, buf| amax_avx2(block8(src, r, cols, b, inv), buf),
            |buf, inv, q| quant_avx2(buf, inv, q),
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn rows_avx512(src: Src<'_>, r0: usize, rows: usize, cols: usize, p: Part) {
        rows_with(
            src,
            r0,
            rows,
            cols,
            p,
            |r, b, inv, buf| amax_avx512(block16(src, r, cols, b, inv), buf),
            |buf, inv, q| quant_avx512(buf, inv, q),
        )
    }

    /// # Safety
    /// AVX2, FMA and F16C (and AVX-512 F/BW with `WIDE`); as `quantize_part` otherwise.
    pub(super) unsafe fn quantize<const WIDE: bool>(
        src: Src<'_>,
        r0: usize,
        rows: usize,
        cols: usize,
        p: Part,
    ) {
        if WIDE {
            rows_avx512(src, r0, rows, cols, p)
        } else {
            rows_avx2(src, r0, rows, cols, p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503))
                    .rotate_left(13)
                    .wrapping_mul(2_246_822_519);
                ((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 6.0
            })
            .collect()
    }

    fn same(a: &QActs, b: &QActs, what: &str) {
        assert_eq!((a.rows, a.blocks), (b.rows, b.blocks), "{what}");
        assert_eq!(a.q, b.q, "{what}: bytes");
        assert_eq!(a.d, b.d, "{what}: scales");
        assert_eq!(a.s, b.s, "{what}: sums");
        assert_eq!(a.c, b.c, "{what}: offsets");
    }

    #[test]
    fn activations_round_trip_within_half_a_step_on_every_quantiser() {
        eprintln!("quantisers on this CPU: {:?}", available());
        let x = data(5 * 64, 11);
        for isa in available() {
            let a = quantize_rows(isa, Src::Plain(&x), 5, 64);
            for (i, &v) in x.iter().enumerate() {
                let (r, b) = (i / 64, i % 64 / QK);
                let back = a.block_q(r, b)[i % QK] as f32 * a.d[a.at(r, b)];
                assert!(
                    (back - v).abs() <= a.d[a.at(r, b)] * 0.5 + 1e-7,
                    "{isa:?} {i}"
                );
            }
            for (b, &first) in a.half_sums().iter().enumerate() {
                let sum: i32 = a.q[b * QK..(b + 1) * QK].iter().map(|&q| q as i32).sum();
                assert_eq!(a.s[b], a.d[b] * sum as f32);
                assert_eq!(a.c[b], -128 * sum);
                let half: i32 = a.q[b * QK..b * QK + 16].iter().map(|&q| q as i32).sum();
                assert_eq!(first, half, "{isa:?} block {b}: first half's sum");
                for off in [32, 4] {
                    let o = &a.half_offsets(off)[2 * b..2 * b + 2];
                    assert_eq!(o, [-off * half, -off * (sum - half)], "{isa:?} block {b}");
                }
            }
            // Exact ties (scale 1) round to even.
            let mut tie = vec![0.5f32; 32];
            tie[..4].copy_from_slice(&[127.0, 2.5, -3.5, -0.5]);
            let t = quantize_rows(isa, Src::Plain(&tie), 1, 32);
            assert_eq!(&t.q[..5], &[127, 2, -4, 0, 0], "{isa:?}");
            let z = quantize_rows(isa, Src::Plain(&[0f32; 32]), 1, 32);
            assert_eq!((z.d[0], z.s[0], z.q[0]), (0.0, 0.0, 0), "{isa:?}");
        }
    }

    /// Every quantiser gives the portable one's bytes, and each fused source the bytes of its
    /// values written out and quantised, over more rows than one task holds.
    #[test]
    fn every_quantiser_and_source_gives_the_same_bytes() {
        for cols in [96, 576, 1536] {
            same_bytes(QUANT_ROWS + 5, cols);
        }
    }

    fn same_bytes(rows: usize, cols: usize) {
        let x = data(rows * cols, 3);
        let gu = data(rows * 2 * cols, 4);
        let w = data(cols, 5);
        let mut act = vec![0f32; rows * cols];
        for (a, row) in act.chunks_exact_mut(cols).zip(gu.chunks_exact(2 * cols)) {
            let (g, u) = row.split_at(cols);
            crate::activation::silu_mul(g, u, a);
        }
        let mut normed = vec![0f32; rows * cols];
        for (o, r) in normed.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / cols as f32;
            scale_row(r, &w, 1.0 / (ms + 1e-5).sqrt(), o);
        }
        let plain = quantize_rows(QuantIsa::Portable, Src::Plain(&x), rows, cols);
        let swiglu = quantize_acts(&act, rows, cols);
        let norm = quantize_acts(&normed, rows, cols);
        assert!(swiglu.d.iter().all(|&d| d > 0.0));
        for isa in available() {
            let got = quantize_rows(isa, Src::Plain(&x), rows, cols);
            same(&got, &plain, &format!("{isa:?} plain"));
            same(
                &quantize_rows(isa, Src::Norm(&x, &w, 1e-5), rows, cols),
                &norm,
                &format!("{isa:?} norm"),
            );
            same(
                &quantize_rows(isa, Src::Swiglu(&gu), rows, cols),
                &swiglu,
                &format!("{isa:?} swiglu"),
            );
        }
        same(&quantize_swiglu(&gu, rows, cols), &swiglu, "best swiglu");
        same(&quantize_rms_norm(&x, &w, 1e-5), &norm, "best norm");
    }

    #[test]
    fn the_layout_places_every_block_once_with_a_chunks_rows_side_by_side() {
        for (rows, nb) in [(1usize, 3usize), (5, 2), (64, 18), (69, 18), (130, 48)] {
            let mut seen = vec![false; rows * nb];
            for r in 0..rows {
                for b in 0..nb {
                    let j = block_at(rows, nb, r, b);
                    assert!(!seen[j], "{rows}x{nb}: ({r}, {b}) twice");
                    seen[j] = true;
                    if r % CHUNK_ROWS > 0 {
                        assert_eq!(
                            block_at(rows, nb, r - 1, b) + 1,
                            j,
                            "{rows}x{nb} ({r}, {b})"
                        );
                    }
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
    }

    /// The interleaved (and, with AVX2, transposed) sums of squares give each row the bits of
    /// its own chain in order: rows past the last group of 8, columns past the last 8.
    #[test]
    fn interleaved_norm_sums_have_the_bits_of_one_chain() {
        for (rows, cols) in [(1usize, 576usize), (7, 96), (8, 576), (19, 1536), (17, 100)] {
            let x = data(rows * cols, rows as u32);
            let mut got = vec![0f32; rows];
            inv_rms_rows(&x, cols, 1e-6, &mut got);
            for (r, g) in got.iter().enumerate() {
                let row = &x[r * cols..(r + 1) * cols];
                let ms = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
                assert_eq!(
                    g.to_bits(),
                    (1.0 / (ms + 1e-6).sqrt()).to_bits(),
                    "{rows}x{cols} {r}"
                );
            }
        }
    }
}
