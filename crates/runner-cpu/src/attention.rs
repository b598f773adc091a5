//! Rotary embedding and attention over the paged KV cache.

use rayon::prelude::*;
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

/// Dot product in 16 independent lanes: a plain `.sum()` over products is one sequential
/// chain the compiler may not vectorise (float addition is not reassociated), and scores
/// are the attention's inner loop.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let body = a.len() - a.len() % L;
    let mut acc = [0f32; L];
    for (ac, bc) in a[..body].chunks_exact(L).zip(b[..body].chunks_exact(L)) {
        for k in 0..L {
            acc[k] += ac[k] * bc[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[body..].iter().zip(&b[body..]) {
        s += x * y;
    }
    s
}

/// Causal attention for every query token of the step. Keys and values of position `j` of a
/// sequence live in slot `block_table[j / block_size] * block_size + j % block_size`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    plan: &StepPlan,
    token_seq: &[usize],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Vec<f32> {
    let qs = heads * head_dim;
    let mut out = vec![0f32; q.len()];
    let dims = Dims {
        heads,
        kv_heads,
        head_dim,
        block_size,
    };
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    out.par_chunks_mut(qs).enumerate().for_each(|(i, orow)| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 was detected at run time.
            unsafe { query_row_avx2(q, k_cache, v_cache, plan, token_seq, dims, i, orow) };
            return;
        }
        query_row(q, k_cache, v_cache, plan, token_seq, dims, i, orow);
    });
    out
}

#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

/// [`query_row`] compiled for AVX2 so that LLVM vectorises the score and value loops 8 wide
/// (the crate's baseline is SSE2; attention was ~10 % of a 32-stream decode profile). The
/// same operations in the same order (no FMA contraction): the same bits.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn query_row_avx2(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    plan: &StepPlan,
    token_seq: &[usize],
    dims: Dims,
    i: usize,
    orow: &mut [f32],
) {
    query_row(q, k_cache, v_cache, plan, token_seq, dims, i, orow)
}

/// Attention of query token `i` over its sequence's visible positions, into `orow`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn query_row(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
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
    } = dims;
    let qs = heads * head_dim;
    let kvs = kv_heads * head_dim;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let seq = &plan.seqs[token_seq[i]];
    // Positions 0..=p are visible to the query at position p.
    let p = seq.context_len - seq.query_len + (i - seq.query_start);
    let n = p + 1;
    let slots: Vec<usize> = (0..n)
        .map(|j| seq.block_table[j / block_size] as usize * block_size + j % block_size)
        .collect();
    let mut scores = vec![0f32; n];
    for h in 0..heads {
        let g = h / group;
        let qh = &q[i * qs + h * head_dim..i * qs + (h + 1) * head_dim];
        let mut max = f32::NEG_INFINITY;
        for (s, &slot) in scores.iter_mut().zip(&slots) {
            let kh = &k_cache[slot * kvs + g * head_dim..slot * kvs + (g + 1) * head_dim];
            *s = dot(qh, kh) * scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut orow[h * head_dim..(h + 1) * head_dim];
        for (s, &slot) in scores.iter().zip(&slots) {
            let w = s / sum;
            let vh = &v_cache[slot * kvs + g * head_dim..slot * kvs + (g + 1) * head_dim];
            for (o, &v) in oh.iter_mut().zip(vh) {
                *o += w * v;
            }
        }
    }
}
