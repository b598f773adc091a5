//! One query row's attention with AVX2 + FMA, straight from the paged cache (f32, or f16
//! widened in registers by F16C): q·K scores eight positions at a time, each position's
//! products in its own FMA chain over the head dims and the eight chains added up by one
//! transpose tree; softmax with a vector exp; P·V with the head's output dims held in registers across
//! all positions. The portable path (`attention::query_row`) ran at ~20 GFLOP/s on two AVX2
//! cores: sixteen f32 lanes per position spilled the registers, and an f16 cache's rows were
//! widened into a buffer first.
//!
//! A row's result depends only on its own query, context and cache rows (never on the other
//! rows of the step), and each position's score goes through the same tree whether it falls
//! in a group of eight or in the tail: batch-invariant.
//!
//! Where the CPU has AVX-512VL, [`query_row_grouped`] does the same arithmetic with the heads
//! that share a KV head side by side (each K and V chunk read and widened once per group, not
//! once per head), which needs its 32 vector registers; it gives the same bits. Both prefetch
//! the cache rows they are about to read. `attnbench` on a 2-vCPU Xeon (AVX-512), 32 decoding
//! sequences at 152 positions, f16 cache, each of 30 layers' caches in turn (medians of three
//! alternating runs): 326 µs a layer before either change, 223 with the prefetch, 195 grouped
//! as well.

use std::arch::x86_64::*;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// The cache element the kernel reads: `f32`, or `f16` / fp8 widened in registers (exactly).
pub trait CacheElem: Copy {
    /// The power of two [`CacheElem::load8`]'s values are short of: the kernels put it into the
    /// scores' scale and the probabilities instead (exact either way), where it costs nothing.
    const SCALE: f32 = 1.0;

    /// Eight elements from `p` as f32, divided by [`CacheElem::SCALE`].
    ///
    /// # Safety
    /// AVX2, FMA and F16C; eight elements readable at `p`.
    unsafe fn load8(p: *const Self) -> __m256;

    /// Sixteen elements from `p` as f32, divided by [`CacheElem::SCALE`] (the same values
    /// as two [`CacheElem::load8`]).
    ///
    /// # Safety
    /// AVX-512F, AVX2 and F16C; sixteen elements readable at `p`.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl CacheElem for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

impl CacheElem for half::f16 {
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

impl CacheElem for crate::fp8::E5m2 {
    /// An e5m2 byte is the top byte of the f16 of the same value.
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        let b = _mm_loadl_epi64(p as *const __m128i);
        _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), b))
    }

    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        let b = _mm_loadu_si128(p as *const __m128i);
        _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8))
    }
}

impl CacheElem for crate::fp8::E4m3 {
    const SCALE: f32 = 256.0;

    /// Sign-extended to 16 bits and shifted left 7, an e4m3 byte's exponent and mantissa
    /// bits sit in an f16's (bit 14 cleared: a copy of the sign), which then holds the value
    /// ÷ 256, subnormals included.
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        let b = _mm_loadl_epi64(p as *const __m128i);
        _mm256_cvtph_ps(_mm_and_si128(
            _mm_slli_epi16(_mm_cvtepi8_epi16(b), 7),
            _mm_set1_epi16(0xBF80u16 as i16),
        ))
    }

    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        let b = _mm_loadu_si128(p as *const __m128i);
        _mm512_cvtph_ps(_mm256_and_si256(
            _mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7),
            _mm256_set1_epi16(0xBF80u16 as i16),
        ))
    }
}

/// The eight lane sums of `a[0..8]`, in order: pairs, then pairs of pairs within each
/// 128-bit half, then the two halves.
#[inline(always)]
unsafe fn sums8(a: &[__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps(u0, u1, 0x20),
        _mm256_permute2f128_ps(u0, u1, 0x31),
    )
}

/// The lane sum of `a` by the tree [`sums8`] uses for each of its inputs.
#[inline(always)]
unsafe fn sum1(a: __m256) -> f32 {
    let t = _mm256_hadd_ps(a, a);
    let u = _mm256_hadd_ps(t, t);
    _mm_cvtss_f32(_mm_add_ps(
        _mm256_castps256_ps128(u),
        _mm256_extractf128_ps(u, 1),
    ))
}

/// The largest lane of `a`.
#[inline(always)]
unsafe fn max1(a: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
}

/// `exp(x)` of eight lanes, x ≤ 0 (softmax's shifted scores): x = n·ln 2 + r with |r| ≤
/// ln 2 / 2, exp(r) by Cephes' degree-6 polynomial (about 1 ulp), times 2ⁿ by adding n to the
/// exponent bits. Below −87.3 (where exp underflows f32's normal range) it gives ~1e-38.
/// libm's scalar `expf` per score was a third of this kernel's time at 150 positions.
#[inline(always)]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // ln 2 split in two so that n·ln2_hi is exact.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), e))
}

/// `s ← factor · exp(s − max) / Σ exp(s − max)`, eight at a time (the tail through one
/// padded vector); the sum in lanes, then the lanes and the tail in order. `factor` is
/// [`CacheElem::SCALE`], a power of two: the same bits as the probabilities times it.
#[inline(always)]
unsafe fn softmax(scores: &mut [f32], max: f32, factor: f32) {
    let n = scores.len();
    let m = _mm256_set1_ps(max);
    let mut sumv = _mm256_setzero_ps();
    let mut j = 0;
    while j + 8 <= n {
        let p = scores.as_mut_ptr().add(j);
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), m));
        _mm256_storeu_ps(p, e);
        sumv = _mm256_add_ps(sumv, e);
        j += 8;
    }
    let mut sum = sum1(sumv);
    if j < n {
        let mut tail = [max; 8];
        tail[..n - j].copy_from_slice(&scores[j..]);
        let mut e = [0f32; 8];
        _mm256_storeu_ps(
            e.as_mut_ptr(),
            exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m)),
        );
        for (s, &x) in scores[j..].iter_mut().zip(&e) {
            *s = x;
            sum += x;
        }
    }
    let inv = _mm256_set1_ps(factor / sum);
    let mut j = 0;
    while j + 8 <= n {
        let p = scores.as_mut_ptr().add(j);
        _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), inv));
        j += 8;
    }
    let inv = factor / sum;
    for s in &mut scores[j..] {
        *s *= inv;
    }
}

/// Positions whose K rows are prefetched ahead of the eight being scored.
const PREFETCH_AHEAD: usize = 16;

/// Prefetches every cache line of the rows of `slots` in `cache`.
#[inline(always)]
unsafe fn prefetch_rows<E: CacheElem>(cache: &[E], slots: &[usize], kvs: usize) {
    let lines = (kvs * std::mem::size_of::<E>()).div_ceil(64);
    for &s in slots {
        let p = cache.as_ptr().add(s * kvs) as *const i8;
        for l in 0..lines {
            _mm_prefetch::<_MM_HINT_T0>(p.add(64 * l));
        }
    }
}

/// The first [`PREFETCH_AHEAD`] positions' K rows, before the scores start.
#[inline(always)]
pub(crate) unsafe fn prefetch_start<E: CacheElem>(k: &[E], slots: &[usize], kvs: usize) {
    prefetch_rows(k, &slots[..slots.len().min(PREFETCH_AHEAD)], kvs);
}

/// While positions `j .. j + 8` are scored: the K rows [`PREFETCH_AHEAD`] positions on, and
/// these positions' V rows (P·V reads them next). A decode step's 30 layers of caches come
/// from DRAM, and a row's run of consecutive slots is one block (16), too short for the
/// hardware's stream prefetch: the 32-sequence decode attention of `attnbench` (each layer's
/// cache in turn) read 11.5 GB/s of K/V without these, 16.8 GB/s with them.
#[inline(always)]
pub(crate) unsafe fn prefetch_next<E: CacheElem>(
    k: &[E],
    v: &[E],
    slots: &[usize],
    kvs: usize,
    j: usize,
) {
    let n = slots.len();
    prefetch_rows(
        k,
        &slots[(j + PREFETCH_AHEAD).min(n)..(j + 8 + PREFETCH_AHEAD).min(n)],
        kvs,
    );
    prefetch_rows(v, &slots[j.min(n)..(j + 8).min(n)], kvs);
}

/// The scores of positions `j0..` one at a time (past the last whole group of eight): each
/// head's FMA chain over the head dims and [`sum1`], times the scale.
#[inline(always)]
unsafe fn tail_scores<E: CacheElem>(
    q: &[f32],
    k: &[E],
    slots: &[usize],
    shape: Shape,
    j0: usize,
    sc: *mut f32,
) {
    let Shape {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let (kvs, group, n) = (kv_heads * hd, heads / kv_heads, slots.len());
    let scale = E::SCALE / (hd as f32).sqrt();
    for (j, &slot) in slots.iter().enumerate().skip(j0) {
        let r = k.as_ptr().add(slot * kvs);
        for h in 0..heads {
            let (qh, b) = (q.as_ptr().add(h * hd), (h / group) * hd);
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < hd {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(c)), E::load8(r.add(b + c)), acc);
                c += 8;
            }
            *sc.add(h * n + j) = sum1(acc) * scale;
        }
    }
}

/// Each head's `n` scores at `sc` (head after head): the maximum (whole vectors, then the
/// tail) and the softmax, times `factor` ([`softmax`]).
#[inline(always)]
pub(crate) unsafe fn softmax_heads(sc: *mut f32, heads: usize, n: usize, factor: f32) {
    for h in 0..heads {
        let hs = std::slice::from_raw_parts_mut(sc.add(h * n), n);
        let mut maxv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut j = 0;
        while j + 8 <= n {
            maxv = _mm256_max_ps(maxv, _mm256_loadu_ps(hs.as_ptr().add(j)));
            j += 8;
        }
        let mut max = max1(maxv);
        for &s in &hs[j..] {
            max = max.max(s);
        }
        softmax(hs, max, factor);
    }
}

/// The shapes of one call.
#[derive(Clone, Copy)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    /// A multiple of 8.
    pub head_dim: usize,
}

impl Shape {
    /// The passes over each KV group's heads, [`GROUP_PASS`] at a time: (the group's offset
    /// in a cache row, the pass's first head, heads in the pass).
    pub(crate) fn passes(self) -> impl Iterator<Item = (usize, usize, usize)> {
        let (hd, group) = (self.head_dim, self.heads / self.kv_heads);
        (0..self.kv_heads).flat_map(move |g| {
            (0..group)
                .step_by(GROUP_PASS)
                .map(move |t| (g * hd, g * group + t, (group - t).min(GROUP_PASS)))
        })
    }

    /// Checks one query row's buffers against the shape (`n` visible positions); returns
    /// (values in a cache row, query heads per KV head).
    pub(crate) fn check(&self, q: &[f32], out: &[f32], scores: &[f32], n: usize) -> (usize, usize) {
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);
        debug_assert!(hd.is_multiple_of(8) && heads.is_multiple_of(kv_heads));
        debug_assert!(q.len() >= heads * hd && out.len() >= heads * hd);
        assert!(scores.len() >= heads * n, "attention scratch");
        (kv_heads * hd, heads / kv_heads)
    }
}

/// Positions whose V rows one pass of P·V reads for every head (32 × 3 KV heads × 64 dims
/// of f16 = 12 KB, within L1).
pub(crate) const PV_POSITIONS: usize = 32;

/// `out[h] = softmax(q[h]·Kᵀ·scale)·V` for every head `h` of one query row, over the
/// positions whose cache slots `slots` lists (`k` / `v`: the layer's caches, `[slots,
/// kv_heads, head_dim]`); `scores` holds `heads × slots.len()` values of scratch.
///
/// Positions are the outer loop and heads the inner one: each slot's K row (every KV head)
/// is read once, for all heads, while it is in L1, and V likewise in runs of
/// [`PV_POSITIONS`]. Head by head, a decode step read each KV head's third of every slot in
/// a separate pass (two cache lines in six, three times over), which DRAM served at a third
/// of its streaming rate: 30 layers of 32 sequences at 152 tokens, whose caches do not stay
/// in L3, took ~380 µs a layer against ~160 µs cached (attnbench). Each score is the same
/// chain of FMAs and the same tree, and each output dim the same FMA chain over positions in
/// order (held in `out` between runs), so the bits are those of the head-by-head order.
///
/// # Safety
/// [`available`]; `shape.head_dim % 8 == 0`, `heads % kv_heads == 0`; `q` and `out` hold
/// `heads × head_dim` values; every slot is inside `k` and `v`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn query_row<E: CacheElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    slots: &[usize],
    shape: Shape,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (heads, hd, n) = (shape.heads, shape.head_dim, slots.len());
    let (kvs, group) = shape.check(q, out, scores, n);
    let scale = _mm256_set1_ps(E::SCALE / (hd as f32).sqrt());
    let base = |h: usize| (h / group) * hd;
    let sc = scores.as_mut_ptr();

    // Scores, eight positions at a time, every head.
    prefetch_start(k, slots, kvs);
    let mut j = 0;
    while j + 8 <= n {
        let rows: [*const E; 8] = std::array::from_fn(|p| k.as_ptr().add(slots[j + p] * kvs));
        prefetch_next(k, v, slots, kvs, j);
        for h in 0..heads {
            let (qh, b) = (q.as_ptr().add(h * hd), base(h));
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < hd {
                let qc = _mm256_loadu_ps(qh.add(c));
                for (a, r) in acc.iter_mut().zip(&rows) {
                    *a = _mm256_fmadd_ps(qc, E::load8(r.add(b + c)), *a);
                }
                c += 8;
            }
            _mm256_storeu_ps(sc.add(h * n + j), _mm256_mul_ps(sums8(&acc), scale));
        }
        j += 8;
    }
    tail_scores(q, k, slots, shape, j, sc);
    softmax_heads(sc, heads, n, E::SCALE);

    // P·V: runs of positions, every head; up to 64 output dims (eight vectors) in registers
    // over a run, kept in `out` from one run to the next.
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + PV_POSITIONS).min(n);
        for h in 0..heads {
            let (oh, b, ws) = (out.as_mut_ptr().add(h * hd), base(h), sc.add(h * n));
            let vp = |jj: usize| v.as_ptr().add(slots[jj] * kvs + b);
            let mut c0 = 0;
            while c0 + 64 <= hd {
                let mut acc: [__m256; 8] = std::array::from_fn(|t| {
                    if j0 == 0 {
                        _mm256_setzero_ps()
                    } else {
                        _mm256_loadu_ps(oh.add(c0 + 8 * t))
                    }
                });
                for jj in j0..j1 {
                    let (w, r) = (_mm256_set1_ps(*ws.add(jj)), vp(jj).add(c0));
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(w, E::load8(r.add(8 * t)), *a);
                    }
                }
                for (t, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(oh.add(c0 + 8 * t), *a);
                }
                c0 += 64;
            }
            while c0 < hd {
                let mut acc = if j0 == 0 {
                    _mm256_setzero_ps()
                } else {
                    _mm256_loadu_ps(oh.add(c0))
                };
                for jj in j0..j1 {
                    acc =
                        _mm256_fmadd_ps(_mm256_set1_ps(*ws.add(jj)), E::load8(vp(jj).add(c0)), acc);
                }
                _mm256_storeu_ps(oh.add(c0), acc);
                c0 += 8;
            }
        }
        j0 = j1;
    }
}

/// Whether this CPU runs [`query_row_grouped`]: the AVX2 kernel's features and AVX-512VL,
/// whose 32 vector registers the grouped loops need (24 score accumulators).
pub fn grouped_available() -> bool {
    available()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Heads of one KV group computed together (`NH` ≤ this): their 24 score accumulators fill
/// most of AVX-512's 32 vector registers.
pub(crate) const GROUP_PASS: usize = 3;

/// Eight positions' scores for heads `h0 .. h0 + NH` (all of KV head offset `b`): each K
/// chunk is widened once for the `NH` heads, where [`query_row`] widened it once per head
/// (an f16 cache's `vcvtph2ps` cost as much as the FMAs). Each score is the same FMA chain
/// over the head dims and the same [`sums8`] tree as there: the same bits.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores8<E: CacheElem, const NH: usize>(
    q: *const f32,
    rows: &[*const E; 8],
    b: usize,
    h0: usize,
    hd: usize,
    sc: *mut f32,
    n: usize,
    j: usize,
    scale: __m256,
) {
    let mut acc = [[_mm256_setzero_ps(); 8]; NH];
    let mut c = 0;
    while c < hd {
        let mut qc = [_mm256_setzero_ps(); NH];
        for (t, v) in qc.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(q.add((h0 + t) * hd + c));
        }
        for (p, r) in rows.iter().enumerate() {
            let kv = E::load8(r.add(b + c));
            for t in 0..NH {
                acc[t][p] = _mm256_fmadd_ps(qc[t], kv, acc[t][p]);
            }
        }
        c += 8;
    }
    for (t, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(sc.add((h0 + t) * n + j), _mm256_mul_ps(sums8(a), scale));
    }
}

/// P·V over positions `j0 .. j1` for heads `h0 .. h0 + NH` (KV head offset `b`), 32 output
/// dims at a time (then 8): each V chunk widened once for the `NH` heads. Each output dim is
/// the same FMA chain over positions in order as in [`query_row`], continued from `out`
/// between runs: the same bits.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<E: CacheElem, const NH: usize>(
    v: *const E,
    slots: &[usize],
    kvs: usize,
    b: usize,
    h0: usize,
    hd: usize,
    sc: *const f32,
    n: usize,
    (j0, j1): (usize, usize),
    out: *mut f32,
) {
    let mut c0 = 0;
    while c0 + 32 <= hd {
        let mut acc = [[_mm256_setzero_ps(); 4]; NH];
        if j0 > 0 {
            for (t, a) in acc.iter_mut().enumerate() {
                for (u, x) in a.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(out.add((h0 + t) * hd + c0 + 8 * u));
                }
            }
        }
        for (jj, &slot) in slots.iter().enumerate().take(j1).skip(j0) {
            let r = v.add(slot * kvs + b + c0);
            let vv: [__m256; 4] = [
                E::load8(r),
                E::load8(r.add(8)),
                E::load8(r.add(16)),
                E::load8(r.add(24)),
            ];
            for (t, a) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_ps(*sc.add((h0 + t) * n + jj));
                for (x, vu) in a.iter_mut().zip(&vv) {
                    *x = _mm256_fmadd_ps(w, *vu, *x);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            for (u, x) in a.iter().enumerate() {
                _mm256_storeu_ps(out.add((h0 + t) * hd + c0 + 8 * u), *x);
            }
        }
        c0 += 32;
    }
    while c0 < hd {
        let mut acc = [_mm256_setzero_ps(); NH];
        if j0 > 0 {
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(out.add((h0 + t) * hd + c0));
            }
        }
        for (jj, &slot) in slots.iter().enumerate().take(j1).skip(j0) {
            let vv = E::load8(v.add(slot * kvs + b + c0));
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_set1_ps(*sc.add((h0 + t) * n + jj)), vv, *a);
            }
        }
        for (t, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add((h0 + t) * hd + c0), *a);
        }
        c0 += 8;
    }
}

/// [`query_row`] with the heads of each KV group computed together ([`GROUP_PASS`] at a
/// time), so each K and V chunk is read and widened once per group instead of once per
/// head: the same arithmetic, value for value, so the same bits as [`query_row`] (tested).
///
/// # Safety
/// [`grouped_available`]; the rest as [`query_row`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub unsafe fn query_row_grouped<E: CacheElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    slots: &[usize],
    shape: Shape,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (heads, hd) = (shape.heads, shape.head_dim);
    let n = slots.len();
    let (kvs, _) = shape.check(q, out, scores, n);
    let scale = _mm256_set1_ps(E::SCALE / (hd as f32).sqrt());
    let sc = scores.as_mut_ptr();
    let qp = q.as_ptr();
    let passes = || shape.passes();

    prefetch_start(k, slots, kvs);
    let mut j = 0;
    while j + 8 <= n {
        let rows: [*const E; 8] = std::array::from_fn(|p| k.as_ptr().add(slots[j + p] * kvs));
        prefetch_next(k, v, slots, kvs, j);
        for (b, h0, nh) in passes() {
            match nh {
                3 => scores8::<E, 3>(qp, &rows, b, h0, hd, sc, n, j, scale),
                2 => scores8::<E, 2>(qp, &rows, b, h0, hd, sc, n, j, scale),
                _ => scores8::<E, 1>(qp, &rows, b, h0, hd, sc, n, j, scale),
            }
        }
        j += 8;
    }
    tail_scores(q, k, slots, shape, j, sc);
    softmax_heads(sc, heads, n, E::SCALE);

    let (vp, op) = (v.as_ptr(), out.as_mut_ptr());
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + PV_POSITIONS).min(n);
        for (b, h0, nh) in passes() {
            match nh {
                3 => pv::<E, 3>(vp, slots, kvs, b, h0, hd, sc, n, (j0, j1), op),
                2 => pv::<E, 2>(vp, slots, kvs, b, h0, hd, sc, n, (j0, j1), op),
                _ => pv::<E, 1>(vp, slots, kvs, b, h0, hd, sc, n, (j0, j1), op),
            }
        }
        j0 = j1;
    }
}
