//! One query row's attention with AVX-512, straight from the paged cache: the structure of
//! [`crate::attention_avx2::query_row_grouped`] (the heads sharing a KV head side by side,
//! eight positions' scores at a time, prefetches ahead) on 16-lane vectors. Each cache chunk
//! is widened 16 values at a time and each score is 4 FMAs a 64-dim head instead of 8, so a
//! row costs about half the instructions: a decode step's attention was bound by them, not
//! by memory (two cores stream ~45 GB/s from the last-level cache here; the AVX2 kernel
//! read K/V at ~19).
//!
//! Its own arithmetic, not the AVX2 kernel's bits: a score is sixteen FMA chains over the
//! head dims (lane `l` takes dims `l, l + 16, …`) summed by one fixed tree ([`sums8`]); each
//! output dim is one FMA chain over the positions in order. Every row of every step goes
//! through these same operations on this kernel, whatever it is batched with and however
//! its prompt was chunked, so a row's bits depend only on its query, context and cache.

use crate::attention_avx2::{
    prefetch_next, prefetch_start, softmax_heads, CacheElem, Shape, PV_POSITIONS,
};
use std::arch::x86_64::*;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    crate::attention_avx2::available()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// Head dims the kernel takes: whole 16-lane vectors.
pub fn takes_head_dim(hd: usize) -> bool {
    hd > 0 && hd.is_multiple_of(16)
}

/// The sums of `a[0..8]`'s sixteen lanes each, in order. Each sum is one tree: the 128-bit
/// quarters `(q0 + q2) + (q1 + q3)`, then that quarter's four floats `(f0 + f1) + (f2 + f3)`.
#[inline(always)]
unsafe fn sums8(a: &[__m512; 8]) -> __m256 {
    // [a.q0 + a.q2, a.q1 + a.q3, b.q0 + b.q2, b.q1 + b.q3]
    let halves = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4(a, b, 0b01_00_01_00),
            _mm512_shuffle_f32x4(a, b, 0b11_10_11_10),
        )
    };
    // From two of those: [a's quarter sum, b's, c's, d's], four partial floats each.
    let quarters = |s: __m512, t: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4(s, t, 0b10_00_10_00),
            _mm512_shuffle_f32x4(s, t, 0b11_01_11_01),
        )
    };
    let u = quarters(halves(a[0], a[1]), halves(a[2], a[3]));
    let w = quarters(halves(a[4], a[5]), halves(a[6], a[7]));
    // Quarter i: [u.f0 + u.f1, u.f2 + u.f3, w.f0 + w.f1, w.f2 + w.f3] (u: a[i], w: a[i + 4]).
    let r = _mm512_add_ps(
        _mm512_shuffle_ps(u, w, 0b10_00_10_00),
        _mm512_shuffle_ps(u, w, 0b11_01_11_01),
    );
    // Each pair's two halves added (in either lane of the pair: the same sum).
    let r = _mm512_add_ps(r, _mm512_shuffle_ps(r, r, 0b10_11_00_01));
    let order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps256(_mm512_permutexvar_ps(order, r))
}

/// The scores of the (up to) eight positions whose K rows are `rows` for heads
/// `h0 .. h0 + NH` (KV head offset `b`), times `scale`, into `sc` at `j` for each head
/// (`n` scores a head); only the first `valid` are stored (the rest are padding).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores8<E: CacheElem, const NH: usize>(
    q: *const f32,
    rows: &[*const E; 8],
    b: usize,
    h0: usize,
    hd: usize,
    (sc, n, j, valid): (*mut f32, usize, usize, usize),
    scale: __m256,
) {
    let mut acc = [[_mm512_setzero_ps(); 8]; NH];
    let mut c = 0;
    while c < hd {
        let qc: [__m512; NH] = std::array::from_fn(|t| _mm512_loadu_ps(q.add((h0 + t) * hd + c)));
        for (p, r) in rows.iter().enumerate() {
            let kv = E::load16(r.add(b + c));
            for t in 0..NH {
                acc[t][p] = _mm512_fmadd_ps(qc[t], kv, acc[t][p]);
            }
        }
        c += 16;
    }
    let mask: __mmask8 = if valid >= 8 { 0xff } else { (1u8 << valid) - 1 };
    for (t, a) in acc.iter().enumerate() {
        _mm256_mask_storeu_ps(
            sc.add((h0 + t) * n + j),
            mask,
            _mm256_mul_ps(sums8(a), scale),
        );
    }
}

/// P·V over positions `j0 .. j1` for heads `h0 .. h0 + NH` (KV head offset `b`), 64 output
/// dims at a time (then 16), continued from `out` after the first run: each output dim is
/// one FMA chain over the positions in order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<E: CacheElem, const NH: usize>(
    v: *const E,
    slots: &[usize],
    kvs: usize,
    b: usize,
    h0: usize,
    hd: usize,
    (sc, n): (*const f32, usize),
    (j0, j1): (usize, usize),
    out: *mut f32,
) {
    let mut c0 = 0;
    while c0 < hd {
        // Four vectors while they fit the head, then one.
        if c0 + 64 <= hd {
            pv_dims::<E, NH, 4>(v, slots, kvs, b + c0, h0, hd, c0, (sc, n), (j0, j1), out);
            c0 += 64;
        } else {
            pv_dims::<E, NH, 1>(v, slots, kvs, b + c0, h0, hd, c0, (sc, n), (j0, j1), out);
            c0 += 16;
        }
    }
}

/// [`pv`] for the `16 · U` output dims from `c0` (their cache offset `bc`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_dims<E: CacheElem, const NH: usize, const U: usize>(
    v: *const E,
    slots: &[usize],
    kvs: usize,
    bc: usize,
    h0: usize,
    hd: usize,
    c0: usize,
    (sc, n): (*const f32, usize),
    (j0, j1): (usize, usize),
    out: *mut f32,
) {
    let at = |t: usize, u: usize| out.add((h0 + t) * hd + c0 + 16 * u);
    let mut acc: [[__m512; U]; NH] = std::array::from_fn(|t| {
        std::array::from_fn(|u| {
            if j0 == 0 {
                _mm512_setzero_ps()
            } else {
                _mm512_loadu_ps(at(t, u))
            }
        })
    });
    for (jj, &slot) in slots.iter().enumerate().take(j1).skip(j0) {
        let r = v.add(slot * kvs + bc);
        let vv: [__m512; U] = std::array::from_fn(|u| E::load16(r.add(16 * u)));
        for (t, a) in acc.iter_mut().enumerate() {
            let w = _mm512_set1_ps(*sc.add((h0 + t) * n + jj));
            for (x, vu) in a.iter_mut().zip(&vv) {
                *x = _mm512_fmadd_ps(w, *vu, *x);
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        for (u, x) in a.iter().enumerate() {
            _mm512_storeu_ps(at(t, u), *x);
        }
    }
}

/// `out[h] = softmax(q[h]·Kᵀ·scale)·V` for every head `h` of one query row, over the
/// positions whose cache slots `slots` lists (`k` / `v`: the layer's caches, `[slots,
/// kv_heads, head_dim]`); `scores` holds `heads × slots.len()` values of scratch. Only the
/// first `cold` positions (those in the cache before this step) are prefetched: the step
/// wrote the others' K and V a moment ago (a prompt's rows, whose prefetches were ~9 % of
/// their attention, `attnbench`). The heads
/// of each KV group go together ([`GROUP_PASS`] at a time) so that each K and V chunk is
/// read and widened once per group (`Shape::passes`).
///
/// # Safety
/// [`available`]; [`takes_head_dim`]; `heads % kv_heads == 0`; `q` and `out` hold
/// `heads × head_dim` values; every slot is inside `k` and `v`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
pub unsafe fn query_row<E: CacheElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    (slots, cold): (&[usize], usize),
    shape: Shape,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (heads, hd) = (shape.heads, shape.head_dim);
    debug_assert!(takes_head_dim(hd));
    let n = slots.len();
    let (kvs, _) = shape.check(q, out, scores, n);
    let scale = _mm256_set1_ps(E::SCALE / (hd as f32).sqrt());
    let sc = scores.as_mut_ptr();
    let qp = q.as_ptr();
    let passes = || shape.passes();

    let cold = &slots[..cold.min(n)];
    prefetch_start(k, cold, kvs);
    let mut j = 0;
    while j < n {
        // A last group short of eight repeats its last position (scored, not stored).
        let rows: [*const E; 8] =
            std::array::from_fn(|p| k.as_ptr().add(slots[(j + p).min(n - 1)] * kvs));
        if j < cold.len() {
            prefetch_next(k, v, cold, kvs, j);
        }
        let at = (sc, n, j, n - j);
        for (b, h0, nh) in passes() {
            match nh {
                3 => scores8::<E, 3>(qp, &rows, b, h0, hd, at, scale),
                2 => scores8::<E, 2>(qp, &rows, b, h0, hd, at, scale),
                _ => scores8::<E, 1>(qp, &rows, b, h0, hd, at, scale),
            }
        }
        j += 8;
    }
    softmax_heads(sc, heads, n, E::SCALE);

    let (vp, op) = (v.as_ptr(), out.as_mut_ptr());
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + PV_POSITIONS).min(n);
        for (b, h0, nh) in passes() {
            let s = (sc as *const f32, n);
            match nh {
                3 => pv::<E, 3>(vp, slots, kvs, b, h0, hd, s, (j0, j1), op),
                2 => pv::<E, 2>(vp, slots, kvs, b, h0, hd, s, (j0, j1), op),
                _ => pv::<E, 1>(vp, slots, kvs, b, h0, hd, s, (j0, j1), op),
            }
        }
        j0 = j1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of [`sums8`]'s eight sums is the tree its doc names, bit for bit, on values whose
    /// sums round differently in other orders.
    #[test]
    fn sums8_adds_each_vector_by_its_tree() {
        if !available() {
            return;
        }
        let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e3 - 8e3;
        let lanes: Vec<[f32; 16]> = (0..8)
            .map(|p| std::array::from_fn(|l| val(p * 16 + l) * (1.0 + (l % 5) as f32 * 1e4)))
            .collect();
        let tree = |x: &[f32; 16]| {
            let f: [f32; 4] = std::array::from_fn(|i| (x[i] + x[8 + i]) + (x[4 + i] + x[12 + i]));
            (f[0] + f[1]) + (f[2] + f[3])
        };
        let flat: Vec<f32> = lanes.iter().map(|x| x.iter().sum()).collect();
        let want: Vec<f32> = lanes.iter().map(tree).collect();
        assert_ne!(flat, want, "the values should tell the orders apart");
        let mut got = [0f32; 8];
        // SAFETY: AVX-512F/VL checked above; the loads and the store are of whole arrays.
        unsafe {
            #[target_feature(enable = "avx512f,avx512vl")]
            unsafe fn run(l: &[[f32; 16]], out: &mut [f32; 8]) {
                let a: [__m512; 8] = std::array::from_fn(|p| _mm512_loadu_ps(l[p].as_ptr()));
                _mm256_storeu_ps(out.as_mut_ptr(), sums8(&a));
            }
            run(&lanes, &mut got);
        }
        assert_eq!(got.to_vec(), want);
    }
}
