//! Rotary embedding and attention over the paged KV cache.

use rayon::prelude::*;

use crate::fp8::{E4m3, E5m2, Fp8Elem};
use tpuserve_runner_api::StepPlan;

/// Rotates each head of `x` (HF half-split layout) by the per-frequency angles of one position.
pub fn rope_in_place(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos[i] - b * sin[i];
            head[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

/// Lanes of [`dot`]: a plain `.sum()` over products is one sequential chain the compiler
/// may not vectorise (float addition is not reassociated), and scores are the attention's
/// inner loop.
const L: usize = 16;

/// The `L` lane sums of the whole-`L` body of `a · b`.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> [f32; L] {
    let body = a.len() - a.len() % L;
    let mut acc = [0f32; L];
    for (ac, bc) in a[..body].chunks_exact(L).zip(b[..body].chunks_exact(L)) {
        for k in 0..L {
            acc[k] += ac[k] * bc[k];
        }
    }
    acc
}

/// `s` (the added-up lanes) plus the products past the body.
#[inline(always)]
fn dot_tail(a: &[f32], b: &[f32], mut s: f32) -> f32 {
    let body = a.len() - a.len() % L;
    for (x, y) in a[body..].iter().zip(&b[body..]) {
        s += x * y;
    }
    s
}

/// Dot product in `L` independent lanes, added up in lane order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_tail(a, b, dot_lanes(a, b).iter().sum())
}

/// `scores[j] = (qh · kh(j)) · scale` for every position, and their maximum. Eight positions
/// at a time: their lane sums are added up side by side (eight independent chains instead of
/// one), in [`dot`]'s order, so each score has the same bits as `dot` gives.
#[inline(always)]
fn head_scores<'k>(
    qh: &[f32],
    kh: impl Fn(usize) -> &'k [f32],
    scale: f32,
    scores: &mut [f32],
) -> f32 {
    let n = scores.len();
    let mut max = f32::NEG_INFINITY;
    let mut j = 0;
    while j + 8 <= n {
        // A plain loop, not `array::from_fn`: its closure was not inlined into the AVX2
        // caller and ran at the SSE2 baseline.
        let mut lanes = [[0f32; L]; 8];
        for (p, l) in lanes.iter_mut().enumerate() {
            *l = dot_lanes(qh, kh(j + p));
        }
        let mut sums = [-0.0f32; 8];
        for k in 0..L {
            for (s, l) in sums.iter_mut().zip(&lanes) {
                *s += l[k];
            }
        }
        for (p, s) in sums.into_iter().enumerate() {
            let v = dot_tail(qh, kh(j + p), s) * scale;
            scores[j + p] = v;
            max = max.max(v);
        }
        j += 8;
    }
    for (s, jj) in scores[j..].iter_mut().zip(j..) {
        *s = dot(qh, kh(jj)) * scale;
        max = max.max(*s);
    }
    max
}

/// A layer's K and V caches, `[slots, kv_heads, head_dim]`: f32 (the reference), f16 (half
/// the bytes to hold and to read) or fp8 (a quarter: `--kv-cache-dtype fp8`); each row
/// widened to f32 (exactly) before use.
#[derive(Clone, Copy)]
pub enum KvRef<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [half::f16], &'a [half::f16]),
    E4m3(&'a [E4m3], &'a [E4m3]),
    E5m2(&'a [E5m2], &'a [E5m2]),
}

/// Which attention kernel runs; tests call each one the machine has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// `attention_avx512::query_row` (16-lane vectors, head dims in multiples of 16; other
    /// head dims go to the grouped kernel).
    Avx512,
    /// `attention_avx2::query_row_grouped` (the AVX2 kernel with each KV group's heads
    /// together, in AVX-512VL's 32 registers; the same bits as `Avx2Fma`).
    Avx512Grouped,
    /// `attention_avx2` (AVX2 + FMA + F16C; head dims in multiples of 8).
    Avx2Fma,
    /// The portable loops (compiled for AVX2 where the CPU has it).
    Portable,
}

/// Every attention kernel this CPU can run, best first.
pub fn available_kernels() -> Vec<AttnKernel> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if crate::attention_avx512::available() {
        v.push(AttnKernel::Avx512);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::attention_avx2::grouped_available() {
        v.push(AttnKernel::Avx512Grouped);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::attention_avx2::available() {
        v.push(AttnKernel::Avx2Fma);
    }
    v.push(AttnKernel::Portable);
    v
}

fn best_kernel() -> AttnKernel {
    static BEST: std::sync::OnceLock<AttnKernel> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| available_kernels()[0])
}

/// Causal attention for every query token of the step (`rows` None), or for the rows listed
/// (ascending; `q` still holds every row's query), one output row each in that order: the
/// last layer of a prompt step needs no more than the rows whose logits are read. Keys and
/// values of position `j` of a sequence live in slot
/// `block_table[j / block_size] * block_size + j % block_size`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    kv: KvRef<'_>,
    plan: &StepPlan,
    token_seq: &[usize],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    rows: Option<&[usize]>,
) -> Vec<f32> {
    let dims = (heads, kv_heads, head_dim, block_size);
    attention_rows(best_kernel(), q, kv, plan, token_seq, dims, rows)
}

/// [`paged_attention`] on a chosen kernel (one of [`available_kernels`]; the AVX2 kernel
/// falls back to the portable one for head dims that are not a multiple of 8).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_with(
    kernel: AttnKernel,
    q: &[f32],
    kv: KvRef<'_>,
    plan: &StepPlan,
    token_seq: &[usize],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Vec<f32> {
    let dims = (heads, kv_heads, head_dim, block_size);
    attention_rows(kernel, q, kv, plan, token_seq, dims, None)
}

/// Every row of the step (`rows` None), or the listed ones; `dims`: heads, KV heads, head
/// dim, block size.
fn attention_rows(
    kernel: AttnKernel,
    q: &[f32],
    kv: KvRef<'_>,
    plan: &StepPlan,
    token_seq: &[usize],
    (heads, kv_heads, head_dim, block_size): (usize, usize, usize, usize),
    rows: Option<&[usize]>,
) -> Vec<f32> {
    assert!(
        available_kernels().contains(&kernel),
        "{kernel:?} is not available on this CPU"
    );
    let qs = heads * head_dim;
    let n_out = rows.map_or(q.len() / qs.max(1), <[usize]>::len);
    let mut out = vec![0f32; n_out * qs];
    let dims = Dims {
        heads,
        kv_heads,
        head_dim,
        block_size,
        #[cfg(target_arch = "x86_64")]
        f16c: std::arch::is_x86_feature_detected!("f16c"),
    };
    #[cfg(target_arch = "x86_64")]
    let wide = kernel == AttnKernel::Avx512 && crate::attention_avx512::takes_head_dim(head_dim);
    // The 16-lane kernel hands head dims it does not take to the grouped one (for every row
    // of the model alike).
    #[cfg(target_arch = "x86_64")]
    let grouped = kernel == AttnKernel::Avx512Grouped || kernel == AttnKernel::Avx512;
    #[cfg(target_arch = "x86_64")]
    let fast = (grouped || kernel == AttnKernel::Avx2Fma) && head_dim.is_multiple_of(8);
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    // Each sequence's slots once (a row sees a prefix of them), and each worker's scores
    // scratch reused from row to row: a 2,024-row prompt step had built every row's slot
    // list (a division and a remainder a position) and allocated both, in each layer.
    #[cfg(target_arch = "x86_64")]
    let all_slots: Vec<Vec<usize>> = if fast {
        plan.seqs.iter().map(|s| seq_slots(s, block_size)).collect()
    } else {
        Vec::new()
    };
    out.par_chunks_mut(qs)
        .enumerate()
        .for_each_init(Vec::new, |scores, (k, orow)| {
            // The step's row this output row is.
            let i = rows.map_or(k, |r| r[k]);
            #[cfg(target_arch = "x86_64")]
            if fast {
                let seq = &plan.seqs[token_seq[i]];
                let p = seq.context_len - seq.query_len + (i - seq.query_start);
                let slots = &all_slots[token_seq[i]][..=p];
                scores.resize(heads * slots.len(), 0.0);
                let shape = crate::attention_avx2::Shape {
                    heads,
                    kv_heads,
                    head_dim,
                };
                let qi = &q[i * qs..(i + 1) * qs];
                // SAFETY: the kernel's features were detected (`available_kernels`), head_dim is
                // a multiple of 8 (of 16 for the wide kernel: `wide`), and every visible slot
                // lies in the caches.
                unsafe {
                    use crate::attention_avx2::{query_row as ungrouped, query_row_grouped};
                    use crate::attention_avx512::query_row as wide_row;
                    macro_rules! run {
                        ($k:expr, $v:expr) => {
                            if wide {
                                let cold = seq.context_len - seq.query_len;
                                wide_row(qi, $k, $v, (slots, cold), shape, scores, orow)
                            } else if grouped {
                                query_row_grouped(qi, $k, $v, slots, shape, scores, orow)
                            } else {
                                ungrouped(qi, $k, $v, slots, shape, scores, orow)
                            }
                        };
                    }
                    match kv {
                        KvRef::F32(k, v) => run!(k, v),
                        KvRef::F16(k, v) => run!(k, v),
                        KvRef::E4m3(k, v) => run!(k, v),
                        KvRef::E5m2(k, v) => run!(k, v),
                    }
                }
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 was detected at run time.
                unsafe { query_row_avx2(q, kv, plan, token_seq, dims, i, orow) };
                return;
            }
            // The scratch serves the x86 kernel only.
            #[cfg(not(target_arch = "x86_64"))]
            let _ = &scores;
            query_row(q, kv, plan, token_seq, dims, i, orow);
        });
    out
}

/// The cache slots of a sequence's positions `0..context_len`, in order.
#[cfg(target_arch = "x86_64")]
fn seq_slots(seq: &tpuserve_runner_api::SeqPlan, block_size: usize) -> Vec<usize> {
    let mut v = Vec::with_capacity(seq.context_len);
    for &b in &seq.block_table {
        let b0 = b as usize * block_size;
        let n = block_size.min(seq.context_len - v.len());
        v.extend(b0..b0 + n);
        if v.len() == seq.context_len {
            break;
        }
    }
    assert_eq!(
        v.len(),
        seq.context_len,
        "block table shorter than the context"
    );
    v
}

/// The cache slots of the positions query token `i` sees (0..=its position), in order.
fn visible_slots(plan: &StepPlan, token_seq: &[usize], block_size: usize, i: usize) -> Vec<usize> {
    let seq = &plan.seqs[token_seq[i]];
    let p = seq.context_len - seq.query_len + (i - seq.query_start);
    (0..=p)
        .map(|j| seq.block_table[j / block_size] as usize * block_size + j % block_size)
        .collect()
}

#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// The CPU converts f16 with F16C (checked once a call, not per row).
    #[cfg(target_arch = "x86_64")]
    f16c: bool,
}

/// [`query_row`] compiled for AVX2 so that LLVM vectorises the score and value loops 8 wide
/// (the crate's baseline is SSE2; attention was ~10 % of a 32-stream decode profile). The
/// same operations in the same order (no FMA contraction): the same bits.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn query_row_avx2(
    q: &[f32],
    kv: KvRef<'_>,
    plan: &StepPlan,
    token_seq: &[usize],
    dims: Dims,
    i: usize,
    orow: &mut [f32],
) {
    query_row(q, kv, plan, token_seq, dims, i, orow)
}

/// Attention of query token `i` over its sequence's visible positions, into `orow`.
#[inline(always)]
fn query_row(
    q: &[f32],
    kv: KvRef<'_>,
    plan: &StepPlan,
    token_seq: &[usize],
    dims: Dims,
    i: usize,
    orow: &mut [f32],
) {
    let Dims {
        heads,
        kv_heads,
        head_dim,
        block_size,
        ..
    } = dims;
    let qs = heads * head_dim;
    let kvs = kv_heads * head_dim;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let slots = visible_slots(plan, token_seq, block_size, i);
    let n = slots.len();
    let mut scores = vec![0f32; n];
    let qh = |h: usize| &q[i * qs + h * head_dim..i * qs + (h + 1) * head_dim];
    match kv {
        KvRef::F32(k_cache, v_cache) => {
            for h in 0..heads {
                let base = (h / group) * head_dim;
                let at = |j: usize| slots[j] * kvs + base;
                let (a, b) = (h * head_dim, (h + 1) * head_dim);
                head_attend(
                    qh(h),
                    |j| &k_cache[at(j)..at(j) + head_dim],
                    |j| &v_cache[at(j)..at(j) + head_dim],
                    scale,
                    &mut scores,
                    &mut orow[a..b],
                );
            }
        }
        KvRef::F16(k, v) => widened_attend(dims, k, v, &slots, &mut scores, qh, orow, scale),
        KvRef::E4m3(k, v) => widened_attend(dims, k, v, &slots, &mut scores, qh, orow, scale),
        KvRef::E5m2(k, v) => widened_attend(dims, k, v, &slots, &mut scores, qh, orow, scale),
    }
}

/// [`query_row`] over a cache of `E`: each KV group's K and V rows widened once into f32
/// (exact), then read as the f32 cache is: the same operations on the same values as an f32
/// cache holding them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn widened_attend<'q, E: Widen>(
    dims: Dims,
    k_cache: &[E],
    v_cache: &[E],
    slots: &[usize],
    scores: &mut [f32],
    qh: impl Fn(usize) -> &'q [f32],
    orow: &mut [f32],
    scale: f32,
) {
    let Dims {
        heads,
        kv_heads,
        head_dim,
        ..
    } = dims;
    let (kvs, group, n) = (kv_heads * head_dim, heads / kv_heads, slots.len());
    let mut kw = vec![0f32; n * head_dim];
    let mut vw = vec![0f32; n * head_dim];
    for g in 0..kv_heads {
        for (j, &slot) in slots.iter().enumerate() {
            let at = slot * kvs + g * head_dim;
            let dst = j * head_dim..(j + 1) * head_dim;
            E::widen(dims, &k_cache[at..at + head_dim], &mut kw[dst.clone()]);
            E::widen(dims, &v_cache[at..at + head_dim], &mut vw[dst]);
        }
        for h in g * group..(g + 1) * group {
            let (a, b) = (h * head_dim, (h + 1) * head_dim);
            head_attend(
                qh(h),
                |j| &kw[j * head_dim..(j + 1) * head_dim],
                |j| &vw[j * head_dim..(j + 1) * head_dim],
                scale,
                scores,
                &mut orow[a..b],
            );
        }
    }
}

/// A cache element the portable path widens row by row.
trait Widen: Copy {
    /// `dst = src` as f32 (exact).
    fn widen(dims: Dims, src: &[Self], dst: &mut [f32]);
}

impl Widen for half::f16 {
    fn widen(dims: Dims, src: &[Self], dst: &mut [f32]) {
        widen(dims, src, dst)
    }
}

/// Through the format's table of 256 values.
fn widen_fp8<T: Fp8Elem>(src: &[T], dst: &mut [f32]) {
    let table = crate::fp8::table(T::FORMAT);
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = table[s.bits() as usize];
    }
}

impl Widen for E4m3 {
    fn widen(_: Dims, src: &[Self], dst: &mut [f32]) {
        widen_fp8(src, dst)
    }
}

impl Widen for E5m2 {
    fn widen(_: Dims, src: &[Self], dst: &mut [f32]) {
        widen_fp8(src, dst)
    }
}

/// `dst = src` widened to f32 (exact). With F16C, eight at a time in registers: `half`'s
/// slice conversion checks the CPU on every call, and a call per 64-value row made an f16
/// cache's attention 15–40 % slower than an f32 one's (attnbench).
#[inline(always)]
fn widen(dims: Dims, src: &[half::f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if dims.f16c {
        // SAFETY: F16C was detected at run time (`paged_attention`).
        unsafe { widen_f16c(src, dst) };
        return;
    }
    let _ = dims;
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// # Safety
/// The CPU must have F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "f16c,avx")]
unsafe fn widen_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for k in i..n {
        dst[k] = src[k].to_f32();
    }
}

/// One head's softmax(q·Kᵀ·scale)·V over positions `0..scores.len()`, added into `oh`;
/// `kh(j)` / `vh(j)`: position `j`'s key / value row of the head's KV group.
#[inline(always)]
fn head_attend<'k>(
    qh: &[f32],
    kh: impl Fn(usize) -> &'k [f32],
    vh: impl Fn(usize) -> &'k [f32],
    scale: f32,
    scores: &mut [f32],
    oh: &mut [f32],
) {
    let head_dim = qh.len();
    let max = head_scores(qh, kh, scale, scores);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
    // 32 output dims at a time held in registers across all positions (the loop over
    // positions inside re-loaded and re-stored the output row per position); each dim
    // still adds its terms in position order from zero: the same bits.
    const C: usize = 32;
    let mut c0 = 0;
    while c0 + C <= head_dim {
        let mut acc = [0f32; C];
        acc.copy_from_slice(&oh[c0..c0 + C]);
        for (j, &w) in scores.iter().enumerate() {
            let v = &vh(j)[c0..c0 + C];
            for k in 0..C {
                acc[k] += w * v[k];
            }
        }
        oh[c0..c0 + C].copy_from_slice(&acc);
        c0 += C;
    }
    for (j, &w) in scores.iter().enumerate() {
        for (o, &v) in oh[c0..].iter_mut().zip(&vh(j)[c0..]) {
            *o += w * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::Fp8;
    use tpuserve_runner_api::SeqPlan;

    /// An f16 cache gives the bits an f32 cache holding the same values gives: its rows are
    /// widened exactly and then read the same way. A decoding row and a prompt of several
    /// rows, heads in groups of 2, blocks spread over the cache, head dims with and without
    /// a tail past the 32-dim value tiles.
    #[test]
    fn an_f16_cache_attends_as_an_f32_cache_of_the_same_values() {
        let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7 - 0.8;
        let (heads, kv_heads, bs, blocks) = (4usize, 2usize, 4usize, 16usize);
        for hd in [8usize, 40, 64] {
            let slots = blocks * bs * kv_heads * hd;
            let k16: Vec<half::f16> = (0..slots).map(|i| half::f16::from_f32(val(i))).collect();
            let v16: Vec<half::f16> = (0..slots)
                .map(|i| half::f16::from_f32(val(i + 5)))
                .collect();
            let k32: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
            let v32: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
            let seq = SeqPlan::sampling;
            let plan = StepPlan {
                token_ids: vec![0; 6],
                positions: vec![0; 6],
                slot_mapping: vec![0; 6],
                seqs: vec![
                    seq(0, 0, 1, 11, vec![9, 2, 14]),
                    seq(1, 1, 5, 7, vec![5, 11]),
                ],
                masks: None,
            };
            let token_seq = [0, 1, 1, 1, 1, 1];
            let q: Vec<f32> = (0..6 * heads * hd).map(|i| val(i + 11)).collect();
            let run =
                |kv| paged_attention(&q, kv, &plan, &token_seq, heads, kv_heads, hd, bs, None);
            let want = run(KvRef::F32(&k32, &v32));
            assert_eq!(run(KvRef::F16(&k16, &v16)), want, "head_dim {hd}");
            assert!(want.iter().all(|x| x.is_finite() && *x != 0.0));
        }
    }

    /// An fp8 cache (e4m3 and e5m2; normal, subnormal, zero and negative codes) gives, on
    /// every kernel, the bits that kernel gives over an f32 cache holding the decoded values:
    /// the in-register widening is exact, and e4m3's factor of 256 (which the vector kernels
    /// put into the score scale and the probabilities) changes no bit.
    #[test]
    fn an_fp8_cache_attends_as_an_f32_cache_of_its_values_on_every_kernel() {
        let code = |i: usize| (((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8) & 0xBF;
        let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7 - 0.8;
        let (heads, kv_heads, bs, blocks) = (9usize, 3usize, 16usize, 8usize);
        for hd in [8usize, 40, 64] {
            let n = blocks * bs * kv_heads * hd;
            let (kb, vb): (Vec<u8>, Vec<u8>) = (0..n).map(|i| (code(i), code(i + n))).unzip();
            // Two sequences, the second a 3-token chunk: 9 + 21 positions over blocks spread.
            let plan = StepPlan {
                token_ids: vec![0; 4],
                positions: vec![0; 4],
                slot_mapping: vec![0; 4],
                seqs: vec![
                    SeqPlan::sampling(0, 0, 1, 9, vec![6]),
                    SeqPlan::sampling(1, 1, 3, 21, vec![3, 0]),
                ],
                masks: None,
            };
            let token_seq = [0, 1, 1, 1];
            let q: Vec<f32> = (0..4 * heads * hd).map(|i| val(i + 11)).collect();
            for f in [Fp8::E4m3, Fp8::E5m2] {
                let t = crate::fp8::table(f);
                let k32: Vec<f32> = kb.iter().map(|&c| t[c as usize]).collect();
                let v32: Vec<f32> = vb.iter().map(|&c| t[c as usize]).collect();
                // Subnormal codes among them: a zero exponent, a nonzero mantissa.
                let (exp, man) = match f {
                    Fp8::E4m3 => (0x78, 0x07),
                    Fp8::E5m2 => (0x7C, 0x03),
                };
                assert!(kb.iter().any(|c| c & exp == 0 && c & man != 0));
                let kv8 = match f {
                    Fp8::E4m3 => KvRef::E4m3(crate::fp8::view(&kb), crate::fp8::view(&vb)),
                    Fp8::E5m2 => KvRef::E5m2(crate::fp8::view(&kb), crate::fp8::view(&vb)),
                };
                for kernel in available_kernels() {
                    let run = |kv| {
                        paged_attention_with(
                            kernel, &q, kv, &plan, &token_seq, heads, kv_heads, hd, bs,
                        )
                    };
                    let want = run(KvRef::F32(&k32, &v32));
                    assert_eq!(run(kv8), want, "{f:?} {kernel:?} head_dim {hd}");
                    assert!(want.iter().all(|x| x.is_finite() && *x != 0.0));
                }
            }
        }
    }

    #[test]
    fn grouped_scores_have_the_bits_of_one_dot_at_a_time() {
        let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7 - 0.8;
        for hd in [8, 16, 64, 72] {
            for n in [1, 7, 8, 9, 17, 40] {
                let q: Vec<f32> = (0..hd).map(val).collect();
                let k: Vec<f32> = (0..n * hd).map(|i| val(i + 977)).collect();
                let kh = |j: usize| &k[j * hd..(j + 1) * hd];
                let mut scores = vec![0f32; n];
                let max = head_scores(&q, kh, 0.125, &mut scores);
                let want: Vec<f32> = (0..n).map(|j| dot(&q, kh(j)) * 0.125).collect();
                let simple: Vec<f32> = (0..n)
                    .map(|j| q.iter().zip(kh(j)).map(|(a, b)| a * b).sum::<f32>())
                    .collect();
                assert_eq!(scores, want, "head_dim {hd}, {n} positions");
                assert_eq!(max, want.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)));
                for (s, r) in scores.iter().zip(&simple) {
                    assert!((s / 0.125 - r).abs() < 1e-5, "{s} vs {r}");
                }
            }
        }
    }

    /// The grouped kernel computes each value as the AVX2 kernel does, so their bits agree:
    /// GQA groups of 1, 2, 3, 4 and 8 (passes of 3 + 1 and 3 + 3 + 2), head dims with and
    /// without a tail past 32, contexts with and without a tail past 8 and across runs of
    /// P·V positions, f32 and f16 caches.
    #[test]
    fn the_grouped_kernel_has_the_ungrouped_kernels_bits() {
        let kernels = available_kernels();
        if !kernels.contains(&AttnKernel::Avx512Grouped) {
            // Nothing to compare on this CPU: the grouped kernel is never chosen here.
            assert!(!crate::attention_avx2::grouped_available());
            return;
        }
        let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7 - 0.8;
        let (bs, blocks) = (4usize, 48usize);
        let table: Vec<u32> = (0..45).map(|b| (b * 7 + 3) % 48).collect();
        let seq = SeqPlan::sampling;
        let seqs = vec![
            seq(0, 0, 1, 1, vec![17]),
            seq(1, 1, 1, 8, vec![9, 2]),
            seq(2, 2, 3, 37, table[..10].to_vec()),
            seq(3, 5, 1, 177, table.clone()),
        ];
        let token_seq = [0, 1, 2, 2, 2, 3];
        let rows = token_seq.len();
        let plan = StepPlan {
            token_ids: vec![0; rows],
            positions: vec![0; rows],
            slot_mapping: vec![0; rows],
            seqs,
            masks: None,
        };
        for (heads, kv_heads) in [(3usize, 3usize), (4, 2), (9, 3), (8, 2), (16, 2)] {
            for hd in [8usize, 40, 64, 128] {
                let n = blocks * bs * kv_heads * hd;
                let k16: Vec<half::f16> = (0..n).map(|i| half::f16::from_f32(val(i))).collect();
                let v16: Vec<half::f16> = (0..n).map(|i| half::f16::from_f32(val(i + 5))).collect();
                let k32: Vec<f32> = (0..n).map(|i| val(i + 3)).collect();
                let v32: Vec<f32> = (0..n).map(|i| val(i + 9)).collect();
                let q: Vec<f32> = (0..rows * heads * hd).map(|i| 4.0 * val(i + 11)).collect();
                for kv in [KvRef::F32(&k32, &v32), KvRef::F16(&k16, &v16)] {
                    let run = |kernel| {
                        paged_attention_with(
                            kernel, &q, kv, &plan, &token_seq, heads, kv_heads, hd, bs,
                        )
                    };
                    let want = run(AttnKernel::Avx2Fma);
                    assert!(want.iter().all(|x| x.is_finite()));
                    assert_eq!(
                        run(AttnKernel::Avx512Grouped),
                        want,
                        "heads {heads}/{kv_heads} hd {hd}"
                    );
                }
            }
        }
    }

    /// f64 attention of every query row over the plan (the reference).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        plan: &StepPlan,
        token_seq: &[usize],
        heads: usize,
        kv_heads: usize,
        hd: usize,
        bs: usize,
    ) -> Vec<f64> {
        let (qs, kvs, group) = (heads * hd, kv_heads * hd, heads / kv_heads);
        let mut out = vec![0f64; q.len()];
        for i in 0..token_seq.len() {
            let slots = visible_slots(plan, token_seq, bs, i);
            for h in 0..heads {
                let base = (h / group) * hd;
                let qh = &q[i * qs + h * hd..i * qs + (h + 1) * hd];
                let s: Vec<f64> = slots
                    .iter()
                    .map(|&sl| {
                        let kr = &k[sl * kvs + base..sl * kvs + base + hd];
                        qh.iter()
                            .zip(kr)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (w, &sl) in e.iter().zip(&slots) {
                    for d in 0..hd {
                        out[i * qs + h * hd + d] += w / sum * v[sl * kvs + base + d] as f64;
                    }
                }
            }
        }
        out
    }

    /// Every kernel this CPU has against f64 over odd shapes: head dims with and without a
    /// tail past 64 (and not a multiple of 8: the AVX2 kernel hands those to the portable
    /// one; not of 16: the AVX-512 kernel hands those to the grouped one), GQA groups of 1, 3 and
    /// 8 (passes of 3 + 3 + 2 heads), contexts of 1 to 75 positions (tails past groups of 8),
    /// f32 and f16 caches (f16 values widened for the reference). And batch invariance: a
    /// sequence's rows alone give the bits they give among the others, and so does its last
    /// row as a query of its own.
    #[test]
    fn every_kernel_follows_f64_and_is_batch_invariant() {
        let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7 - 0.8;
        let (bs, blocks) = (4usize, 40usize);
        let long_table: Vec<u32> = (0..19).map(|b| (b * 7 + 3) % 40).collect();
        let seq = SeqPlan::sampling;
        let seqs = vec![
            seq(0, 0, 1, 1, vec![17]),
            seq(1, 1, 1, 9, vec![9, 2, 14]),
            seq(2, 2, 5, 17, vec![5, 11, 30, 31, 8]),
            seq(3, 7, 2, 75, long_table),
        ];
        let token_seq = [0, 1, 2, 2, 2, 2, 2, 3, 3];
        let rows = token_seq.len();
        for kernel in available_kernels() {
            for (heads, kv_heads) in [(4usize, 4usize), (6, 2), (8, 1)] {
                for hd in [8usize, 16, 24, 64, 72, 80, 128, 12] {
                    let slots = blocks * bs * kv_heads * hd;
                    let k16: Vec<half::f16> =
                        (0..slots).map(|i| half::f16::from_f32(val(i))).collect();
                    let v16: Vec<half::f16> = (0..slots)
                        .map(|i| half::f16::from_f32(val(i + 5)))
                        .collect();
                    let k32: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
                    let v32: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
                    // Queries large enough that the softmax is far from uniform.
                    let q: Vec<f32> = (0..rows * heads * hd).map(|i| 4.0 * val(i + 11)).collect();
                    let plan = StepPlan {
                        token_ids: vec![0; rows],
                        positions: vec![0; rows],
                        slot_mapping: vec![0; rows],
                        seqs: seqs.clone(),
                        masks: None,
                    };
                    let want =
                        reference(&q, &k32, &v32, &plan, &token_seq, heads, kv_heads, hd, bs);
                    let run = |kv, plan: &StepPlan, token_seq: &[usize], q: &[f32]| {
                        paged_attention_with(
                            kernel, q, kv, plan, token_seq, heads, kv_heads, hd, bs,
                        )
                    };
                    for (name, kv) in [
                        ("f32", KvRef::F32(&k32, &v32)),
                        ("f16", KvRef::F16(&k16, &v16)),
                    ] {
                        let got = run(kv, &plan, &token_seq, &q);
                        let err = got
                            .iter()
                            .zip(&want)
                            .map(|(&g, &w)| (g as f64 - w).abs())
                            .fold(0f64, f64::max);
                        assert!(
                            err < 2e-6,
                            "{kernel:?} {name} heads {heads}/{kv_heads} hd {hd}: max |Δ| {err:e}"
                        );
                        // Sequence 3's two rows alone (a step of one sequence).
                        let mut alone = seqs[3].clone();
                        alone.query_start = 0;
                        let plan1 = StepPlan {
                            token_ids: vec![0; 2],
                            positions: vec![0; 2],
                            slot_mapping: vec![0; 2],
                            seqs: vec![alone],
                            masks: None,
                        };
                        let qs = heads * hd;
                        let got1 = run(kv, &plan1, &[0, 0], &q[7 * qs..9 * qs]);
                        assert_eq!(got1, got[7 * qs..9 * qs], "{kernel:?} {name} hd {hd}");
                        // Its last row as a 1-row query (a prompt chunked differently, or
                        // a decode step): the same bits as inside the 2-row chunk.
                        let mut last = seqs[3].clone();
                        (last.query_start, last.query_len) = (0, 1);
                        let plan2 = StepPlan {
                            token_ids: vec![0],
                            positions: vec![0],
                            slot_mapping: vec![0],
                            seqs: vec![last],
                            masks: None,
                        };
                        let got2 = run(kv, &plan2, &[0], &q[8 * qs..9 * qs]);
                        assert_eq!(got2, got[8 * qs..9 * qs], "{kernel:?} {name} hd {hd}");
                    }
                }
            }
        }
    }
}
