//! The host runner: a Llama forward whose matmuls run through candle and whose attention reads
//! keys and values from a paged cache through each sequence's block table. It is the numerical
//! reference the XLA runner is checked against.

pub mod activation;
pub mod actquant;
#[doc(hidden)]
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod attention_avx2;
#[cfg(target_arch = "x86_64")]
pub mod attention_avx512;
pub mod bf16dot;
pub mod fp8;
pub mod matvec;
pub mod qmatvec;
mod weights;

use candle_core::{Device, Tensor};
use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use rayon::prelude::*;
use tpuserve_model::{LlamaConfig, LoadedModel};
use tpuserve_runner_api::{
    sampler, validate_plan, KvCacheShape, ModelRunner, RunnerError, SampledToken, SeqOutput,
    StepOutput, StepPlan,
};

pub use crate::fp8::Fp8;
use crate::weights::{GateUp, LayerWeights, Matrix, ModelWeights};

/// The form the runner keeps weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuWeights {
    /// The checkpoint's own form: GGUF Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL blocks,
    /// repacked at load into the `qmatvec` kernels' 16-row panels (same bytes per weight; the
    /// K-quants and IQ4_XS as 32-value blocks with their scale codes and f32 super-block
    /// scales, see `qmatvec::QMatrix`) and computed on with int8 activations; bf16 matrices
    /// kept as bf16 (with AVX-512 BF16, multiplied by bf16-rounded activations in `bf16dot`;
    /// otherwise widened in registers: the same values as f32); everything else dequantised /
    /// widened to f32.
    #[default]
    Native,
    /// Every matrix as bf16 (`--dtype bfloat16`): a bf16 checkpoint as stored, f32 / f16
    /// rounded to bf16, GGUF blocks dequantised and rounded. Activations stay f32 between
    /// matmuls (rounded to bf16 at a matmul's input where `bf16dot` runs).
    Bf16,
    /// Every weight dequantised to f32: the numerical reference.
    F32,
}

impl CpuWeights {
    /// Bytes of one K or V element in the cache [`CpuRunner::new`] makes: one with `kv_fp8`;
    /// else f16 beside the checkpoint's own weights (half the memory a sequence holds and half
    /// the bytes attention reads), f32 beside the f32 reference, whose results stay those of
    /// an all-f32 forward.
    pub fn kv_bytes(self, kv_fp8: Option<Fp8>) -> usize {
        match (kv_fp8, self) {
            (Some(_), _) => 1,
            (None, CpuWeights::Native | CpuWeights::Bf16) => 2,
            (None, CpuWeights::F32) => 4,
        }
    }
}

/// A layer's K and V caches, `[slots, kv_heads, head_dim]`, in the element type the weights'
/// form chooses ([`CpuWeights::kv_bytes`]), or fp8 bytes (`--kv-cache-dtype fp8`).
enum KvCache {
    F32(Vec<f32>, Vec<f32>),
    F16(Vec<half::f16>, Vec<half::f16>),
    Fp8(Vec<u8>, Vec<u8>, Fp8),
}

/// What every layer of one step reads.
#[derive(Clone, Copy)]
struct StepCtx<'a> {
    plan: &'a StepPlan,
    /// Each row's rotary cosines and sines (`head_dim / 2` a row).
    cos: &'a [f32],
    sin: &'a [f32],
    /// Each row's sequence (index into `plan.seqs`).
    token_seq: &'a [usize],
    /// No two rows write the same cache slot (rows may write theirs in parallel).
    slots_distinct: bool,
}

/// A layer's K and V caches as raw places, for rows that write their own slots in parallel.
#[derive(Clone, Copy)]
enum KvPlaces {
    F32(*mut f32, *mut f32, usize),
    F16(*mut half::f16, *mut half::f16, usize),
    Fp8(*mut u8, *mut u8, usize, Fp8),
}

// SAFETY: shared only by rows that write distinct slots (`KvPlaces::write`'s contract).
unsafe impl Send for KvPlaces {}
unsafe impl Sync for KvPlaces {}

impl KvPlaces {
    fn of(cache: &mut KvCache) -> KvPlaces {
        match cache {
            KvCache::F32(k, v) => KvPlaces::F32(k.as_mut_ptr(), v.as_mut_ptr(), k.len()),
            KvCache::F16(k, v) => KvPlaces::F16(k.as_mut_ptr(), v.as_mut_ptr(), k.len()),
            KvCache::Fp8(k, v, f) => KvPlaces::Fp8(k.as_mut_ptr(), v.as_mut_ptr(), k.len(), *f),
        }
    }

    /// Slot `slot`'s K and V rows (`k.len()` values each); f16 rounded to nearest even, as
    /// a cast to f16 does; fp8 as [`Fp8::encode`] (nearest even, saturating).
    ///
    /// # Safety
    /// The cache these places came from is alive and not otherwise borrowed, and no other
    /// thread touches `slot` meanwhile.
    unsafe fn write(self, slot: usize, k: &[f32], v: &[f32]) {
        let n = k.len();
        assert!(
            v.len() == n && (slot + 1) * n <= self.len(),
            "cache slot {slot}"
        );
        match self {
            KvPlaces::F32(kc, vc, _) => {
                std::slice::from_raw_parts_mut(kc.add(slot * n), n).copy_from_slice(k);
                std::slice::from_raw_parts_mut(vc.add(slot * n), n).copy_from_slice(v);
            }
            KvPlaces::F16(kc, vc, _) => {
                std::slice::from_raw_parts_mut(kc.add(slot * n), n).convert_from_f32_slice(k);
                std::slice::from_raw_parts_mut(vc.add(slot * n), n).convert_from_f32_slice(v);
            }
            KvPlaces::Fp8(kc, vc, _, f) => {
                f.encode_slice(k, std::slice::from_raw_parts_mut(kc.add(slot * n), n));
                f.encode_slice(v, std::slice::from_raw_parts_mut(vc.add(slot * n), n));
            }
        }
    }

    fn len(self) -> usize {
        match self {
            KvPlaces::F32(.., n) | KvPlaces::F16(.., n) | KvPlaces::Fp8(.., n, _) => n,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CpuRunnerOptions {
    pub num_blocks: usize,
    pub block_size: usize,
    pub weights: CpuWeights,
    /// `--kv-cache-dtype fp8` (`fp8_e4m3`, `fp8_e5m2`): K and V stored as one byte each
    /// whatever the weights' form; `None`: the weights' form decides ([`CpuWeights::kv_bytes`]).
    pub kv_fp8: Option<Fp8>,
}

impl Default for CpuRunnerOptions {
    fn default() -> Self {
        CpuRunnerOptions {
            num_blocks: 512,
            block_size: tpuserve_runner_api::sizing::DEFAULT_BLOCK_SIZE,
            weights: CpuWeights::Native,
            kv_fp8: None,
        }
    }
}

pub struct CpuRunner {
    cfg: LlamaConfig,
    w: ModelWeights,
    inv_freq: Vec<f32>,
    /// Per layer.
    kv_cache: Vec<KvCache>,
    kv: KvCacheShape,
    /// Every step's parallel work: one thread per CPU the process may use.
    pool: std::sync::Arc<rayon::ThreadPool>,
}

/// Rows below which the element-wise row loops stay on one thread (a decode step's rows:
/// waking the other worker costs more than the work).
const PAR_MIN_ROWS: usize = 64;
/// Rows per task of the rotary embedding and cache write: a 32-row decode step's rows
/// (~25 µs a layer on one thread) go on both.
const ROPE_MIN_ROWS: usize = 16;

fn werr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Weights(e.to_string())
}

/// Up to this many rows (a decode step's batch, short prefill chunks) go through the
/// unpacked kernel of `matvec`; longer prefills through candle's packed GEMM, which reuses
/// each packed panel across many rows.
pub(crate) const MATVEC_MAX_ROWS: usize = 64;

/// `x [rows, in] · wᵀ` with `w [out, in]`. Block-quantised and bf16 weights always go
/// through their unpacked kernels (which chunk long prefills themselves): there is no f32
/// copy to hand a GEMM.
fn linear(x: &[f32], rows: usize, w: &Matrix) -> Result<Vec<f32>, RunnerError> {
    if let Some(ps) = w.quant_parts() {
        let a = qmatvec::quantize_acts(x, rows, ps[0].cols);
        return Ok(qmatvec::qmatmul_parts(&a, ps));
    }
    let w = match w {
        Matrix::Bf16(m) => return Ok(m.matmul_wt(x, rows)),
        Matrix::F32(t) => t,
        Matrix::Quant(_) | Matrix::QuantParts(_) => unreachable!("taken above"),
    };
    let (out, inner) = w.dims2().map_err(werr)?;
    if rows <= MATVEC_MAX_ROWS {
        let (storage, layout) = w.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(matvec::matmul_wt(x, rows, &v[a..b], out, inner));
        }
    }
    let xt = Tensor::from_slice(x, (rows, inner), &Device::Cpu).map_err(werr)?;
    let y = xt.matmul(&w.t().map_err(werr)?).map_err(werr)?;
    y.flatten_all().and_then(|t| t.to_vec1()).map_err(werr)
}

/// `(silu(g) · u) · downᵀ` for `gu` rows holding `g` then `u` (`inter` each). Quantised
/// weights take the product straight into their int8 activations (`quantize_swiglu`).
fn swiglu_down(
    gu: &[f32],
    rows: usize,
    inter: usize,
    down: &Matrix,
) -> Result<Vec<f32>, RunnerError> {
    if let Matrix::Quant(q) = down {
        return Ok(qmatvec::qmatmul_acts(
            &qmatvec::quantize_swiglu(gu, rows, inter),
            q,
        ));
    }
    let mut act = vec![0f32; rows * inter];
    act.par_chunks_mut(inter)
        .zip(gu.par_chunks(2 * inter))
        .for_each(|(a, row)| {
            let (g, u) = row.split_at(inter);
            activation::silu_mul(g, u, a);
        });
    linear(&act, rows, down)
}

/// `x += y`, rows in parallel (a prompt step's residual stream is megabytes; a decode step's
/// few rows stay on the calling thread).
fn add_rows(x: &mut [f32], y: &[f32], width: usize) {
    x.par_chunks_mut(width)
        .zip(y.par_chunks(width))
        .with_min_len(PAR_MIN_ROWS)
        .for_each(|(x, y)| {
            for (a, b) in x.iter_mut().zip(y) {
                *a += b;
            }
        });
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(h * PAR_MIN_ROWS)
        .zip(x.par_chunks(h * PAR_MIN_ROWS))
        .for_each(|(o, xs)| {
            let mut inv = vec![0f32; xs.len() / h];
            actquant::inv_rms_rows(xs, h, eps, &mut inv);
            for ((o, r), &inv) in o.chunks_exact_mut(h).zip(xs.chunks_exact(h)).zip(&inv) {
                actquant::scale_row(r, w, inv, o);
            }
        });
    out
}

/// `rms_norm(x) · wᵀ`. Quantised weights take the normed rows straight into their int8
/// activations (`quantize_rms_norm`: the same bytes, never written out as f32).
fn norm_linear(x: &[f32], gain: &[f32], eps: f32, w: &Matrix) -> Result<Vec<f32>, RunnerError> {
    if let Some(ps) = w.quant_parts() {
        let a = qmatvec::quantize_rms_norm(x, gain, eps);
        return Ok(qmatvec::qmatmul_parts(&a, ps));
    }
    linear(&rms_norm(x, gain, eps), x.len() / gain.len(), w)
}

/// A prompt step's activations are tens of MB (SmolLM2, 2,048 rows: gate/up 25 MB). glibc
/// served them from the step thread's own arena, whose 64 MB heaps it unmaps as soon as one
/// empties (the trim threshold does not stop that), so every step faulted its buffers in
/// again and the kernel zeroed them: ~200k minor faults and ~15 % of a 2,024-row step. With
/// one arena (the main heap), the largest mmap threshold glibc accepts and a high trim
/// threshold, the same buffers are reused from step to step and resident memory stays at the
/// largest step's working set. A prompt step of 23 × 88 tokens (stepbench) went from ~1.6 s
/// to ~1.1 s.
///
/// Process-wide, and effective only before other threads have made arenas of their own: the
/// server calls it first thing when it will run this runner; [`CpuRunner::new`] calls it too.
pub fn keep_step_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only sets allocator parameters; called before the runner's
            // threads allocate, and glibc serialises it with its own locks either way.
            let ok = unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1) == 1
                    && libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20) == 1
            };
            if !ok {
                tracing::debug!("mallopt refused the step-buffer thresholds");
            }
        });
    }
}

impl CpuRunner {
    pub fn new(model: &LoadedModel, opts: CpuRunnerOptions) -> Result<Self, RunnerError> {
        keep_step_buffers();
        let cfg = model.config.clone();
        let w = ModelWeights::load(model.weights.as_ref(), &cfg, opts.weights)?;
        let slots = opts.num_blocks * opts.block_size;
        let per_layer = slots * cfg.kv_size();
        Ok(CpuRunner {
            inv_freq: cfg.rope_inv_freq(),
            kv_cache: (0..cfg.num_hidden_layers)
                .map(|_| match (opts.kv_fp8, opts.weights) {
                    // Zeroed bytes from the allocator, untouched until written (as below).
                    (Some(f), _) => KvCache::Fp8(vec![0u8; per_layer], vec![0u8; per_layer], f),
                    // Zeroed u16 bits reinterpreted: `vec![0u16; n]` asks the allocator for
                    // zeroed pages, which stay untouched until a block is written, where
                    // `vec![f16::ZERO; n]` wrote every element (a 1 GiB cache resident at
                    // start, +1 GB RSS and +0.6 s).
                    (None, CpuWeights::Native | CpuWeights::Bf16) => KvCache::F16(
                        vec![0u16; per_layer].reinterpret_into(),
                        vec![0u16; per_layer].reinterpret_into(),
                    ),
                    (None, CpuWeights::F32) => {
                        KvCache::F32(vec![0f32; per_layer], vec![0f32; per_layer])
                    }
                })
                .collect(),
            kv: KvCacheShape {
                num_blocks: opts.num_blocks,
                block_size: opts.block_size,
                // The cache is zeroed pages from the allocator (see `KvCache`).
                committed_on_write: true,
            },
            pool: std::sync::Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .thread_name(|i| format!("tpuserve-cpu-{i}"))
                    .build()
                    .map_err(werr)?,
            ),
            cfg,
            w,
        })
    }

    fn rope_tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    /// One decoder layer over the step's rows. With `keep`, the rows past the attention (its
    /// output, the o projection, the MLP) are only those listed: every row's K and V are
    /// still written, and the other rows of `x` are left as they were.
    fn layer(
        &mut self,
        li: usize,
        x: &mut [f32],
        step: &StepCtx<'_>,
        keep: Option<&[usize]>,
    ) -> Result<(), RunnerError> {
        let StepCtx {
            plan,
            cos,
            sin,
            token_seq,
            slots_distinct,
        } = *step;
        let cfg = &self.cfg;
        let t = plan.num_tokens();
        let (h, qs, kvs, hd) = (cfg.hidden_size, cfg.q_size(), cfg.kv_size(), cfg.head_dim);
        let lw: &LayerWeights = &self.w.layers[li];
        let eps = cfg.rms_norm_eps as f32;

        let mut qkv = norm_linear(x, &lw.input_norm, eps, &lw.qkv)?;
        let width = qs + 2 * kvs;
        // Rotary embedding of every row's q (into `q`) and k (in place) and the row's K and V
        // written to its cache slot, rows in parallel (a 2,024-row prompt step zeroed `q`
        // and wrote the cache on one core while the other waited). Rows write in parallel
        // only where every slot of the step is distinct (`slots_distinct`); else one after
        // another below.
        let places = KvPlaces::of(&mut self.kv_cache[li]);
        let mut q: Vec<f32> = Vec::with_capacity(t * qs);
        q.spare_capacity_mut()[..t * qs]
            .par_chunks_mut(qs)
            .zip(qkv.par_chunks_mut(width))
            .enumerate()
            .with_min_len(ROPE_MIN_ROWS)
            .for_each(|(i, (qo, row))| {
                let (c, s) = (
                    &cos[i * hd / 2..(i + 1) * hd / 2],
                    &sin[i * hd / 2..(i + 1) * hd / 2],
                );
                for (d, &v) in qo.iter_mut().zip(&row[..qs]) {
                    d.write(v);
                }
                // SAFETY: every element of `qo` was written just above.
                let qo = unsafe { std::slice::from_raw_parts_mut(qo.as_mut_ptr().cast(), qs) };
                attention::rope_in_place(qo, hd, c, s);
                attention::rope_in_place(&mut row[qs..qs + kvs], hd, c, s);
                if slots_distinct {
                    let (k, v) = row[qs..].split_at(kvs);
                    // SAFETY: this row's slot is no other row's (`slots_distinct`), and
                    // nothing reads the cache until the rows are done.
                    unsafe { places.write(plan.slot_mapping[i] as usize, k, v) };
                }
            });
        // SAFETY: the tasks wrote every row of `q` (t rows of `qs`).
        unsafe { q.set_len(t * qs) };
        if !slots_distinct {
            for (row, &slot) in qkv.chunks_exact(width).zip(&plan.slot_mapping) {
                let (k, v) = row[qs..].split_at(kvs);
                // SAFETY: one row at a time on this thread.
                unsafe { places.write(slot as usize, k, v) };
            }
        }
        let kv = match &self.kv_cache[li] {
            KvCache::F32(kc, vc) => attention::KvRef::F32(kc, vc),
            KvCache::F16(kc, vc) => attention::KvRef::F16(kc, vc),
            KvCache::Fp8(kc, vc, Fp8::E4m3) => attention::KvRef::E4m3(fp8::view(kc), fp8::view(vc)),
            KvCache::Fp8(kc, vc, Fp8::E5m2) => attention::KvRef::E5m2(fp8::view(kc), fp8::view(vc)),
        };
        if keep.is_some_and(<[usize]>::is_empty) {
            // A prompt chunk whose rows nobody reads: its K and V were all it had to give.
            return Ok(());
        }
        let (heads, kv_heads, bs) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            self.kv.block_size,
        );
        let attn =
            attention::paged_attention(&q, kv, plan, token_seq, heads, kv_heads, hd, bs, keep);
        // The kept rows of the residual stream, gathered (all rows: `x` itself), and put back
        // at the end.
        let mut kept: Vec<f32> = Vec::new();
        if let Some(rows) = keep {
            kept.reserve(rows.len() * h);
            for &r in rows {
                kept.extend_from_slice(&x[r * h..(r + 1) * h]);
            }
        }
        let xr: &mut [f32] = if keep.is_some() { &mut kept } else { &mut *x };
        let t = xr.len() / h;
        let o = linear(&attn, t, &lw.o_proj)?;
        add_rows(xr, &o, h);

        let d = match (&lw.gate_up, &lw.down) {
            (GateUp::Paired(gu), Matrix::Quant(down)) => qmatvec::qmatmul_acts(
                &gu.quantized_product(&qmatvec::quantize_rms_norm(xr, &lw.post_norm, eps)),
                down,
            ),
            (GateUp::Paired(_), _) => {
                return Err(RunnerError::Weights(
                    "interleaved gate/up weights without a block-quantised down projection".into(),
                ))
            }
            (GateUp::Stacked(gate_up), down) => {
                let gu = norm_linear(xr, &lw.post_norm, eps, gate_up)?;
                swiglu_down(&gu, t, cfg.intermediate_size, down)?
            }
        };
        add_rows(xr, &d, h);
        if let Some(rows) = keep {
            for (k, &r) in rows.iter().enumerate() {
                x[r * h..(r + 1) * h].copy_from_slice(&kept[k * h..(k + 1) * h]);
            }
        }
        Ok(())
    }
}

impl ModelRunner for CpuRunner {
    /// The step runs on one of the pool's threads, so each of its ~150 parallel sections
    /// (every projection, attention, the LM head) forks and joins inside the pool. Called
    /// from the engine's thread directly, each section was injected into the pool from
    /// outside and the caller slept on a futex until woken at its end (SmolLM2 Q4_1, one
    /// stream, 2-core EPYC: a fifth of the profile in wake-ups and sched_yield).
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, RunnerError> {
        let pool = self.pool.clone();
        pool.install(|| self.step(plan))
    }

    fn kv_cache_shape(&self) -> KvCacheShape {
        self.kv
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn describe(&self) -> String {
        let kv = match self.kv_cache.first() {
            Some(KvCache::F16(..)) => ", f16 KV cache",
            Some(KvCache::Fp8(_, _, Fp8::E4m3)) => ", fp8 e4m3 KV cache",
            Some(KvCache::Fp8(_, _, Fp8::E5m2)) => ", fp8 e5m2 KV cache",
            _ => ", f32 KV cache",
        };
        format!("cpu ({}{kv})", self.w.describe())
    }
}

impl CpuRunner {
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, RunnerError> {
        validate_plan(plan, self.kv)?;
        let t = plan.num_tokens();
        if t == 0 {
            return Ok(StepOutput::default());
        }
        let h = self.cfg.hidden_size;
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = plan.token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(RunnerError::InvalidPlan(format!(
                "token id {bad} outside the vocabulary ({vocab})"
            )));
        }
        let mut token_seq = vec![0usize; t];
        for (si, s) in plan.seqs.iter().enumerate() {
            token_seq[s.query_start..s.query_start + s.query_len].fill(si);
        }
        let mut x = self.w.embed_rows(&plan.token_ids)?;
        let (cos, sin) = self.rope_tables(&plan.positions);
        let slots_distinct = {
            let mut s = plan.slot_mapping.clone();
            s.sort_unstable();
            s.windows(2).all(|w| w[0] != w[1])
        };
        let ctx = StepCtx {
            plan,
            cos: &cos,
            sin: &sin,
            token_seq: &token_seq,
            slots_distinct,
        };
        // Only rows someone asked for go through the final norm and the LM head, and through
        // the last layer past its K/V write: a prompt step reads one row a sequence, and the
        // other rows' attention output, o projection and MLP there were ~1/30 of its work.
        let mut rows: Vec<usize> = Vec::new();
        for s in &plan.seqs {
            rows.extend(s.query_start..s.query_start + s.prompt_logprob_targets.len());
            if s.sample || s.return_logits {
                rows.push(s.query_start + s.query_len - 1);
            }
        }
        rows.sort_unstable();
        rows.dedup();
        let layers = self.cfg.num_hidden_layers;
        for li in 0..layers {
            let keep = (li + 1 == layers && rows.len() < t).then_some(&rows[..]);
            self.layer(li, &mut x, &ctx, keep)?;
        }
        let mut selected = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            selected.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let logits = if rows.is_empty() {
            Vec::new()
        } else {
            let eps = self.cfg.rms_norm_eps as f32;
            norm_linear(&selected, &self.w.final_norm, eps, self.w.lm_head())?
        };
        let row_logits = |r: usize| -> &[f32] {
            let i = rows.binary_search(&r).expect("row was selected");
            &logits[i * vocab..(i + 1) * vocab]
        };

        // Structured-output masks were computed while the layers ran.
        let masks = plan.masks.as_ref().map(|m| m.wait());
        let outputs = plan
            .seqs
            .par_iter()
            .enumerate()
            .map(|(si, s)| {
                let mut out = SeqOutput::default();
                let n_lp = s.sampling.prompt_logprobs.unwrap_or(0);
                for (j, &target) in s.prompt_logprob_targets.iter().enumerate() {
                    let l = row_logits(s.query_start + j);
                    out.prompt_logprobs
                        .push(sampler::token_logprobs(l, target, n_lp));
                }
                let last = s.query_start + s.query_len - 1;
                if s.sample {
                    let mask = masks.as_ref().and_then(|m| m.get(si)?.as_deref());
                    let (token, logprobs) = sampler::sample_masked(
                        row_logits(last),
                        mask,
                        &s.sampling,
                        &s.prompt_tokens,
                        &s.output_tokens,
                        s.output_tokens.len() as u64,
                    );
                    out.sampled = Some(SampledToken { token, logprobs });
                }
                if s.return_logits {
                    out.logits = Some(row_logits(last).to_vec());
                }
                out
            })
            .collect();
        Ok(StepOutput { seqs: outputs })
    }
}
