//! `--quantization int8` on the XLA CPU plugin: the projections and LM head held as int8 with
//! per-output-channel scales, quantised at load, dequantised inside each dot, with bf16
//! activations (as on TPU).
//!
//! Quantisation moves the logprobs, so the goldens are followed, not matched exactly. Every
//! golden case runs twice. Free-running greedy: a case whose golden top-1 / top-2 gap is at
//! least `GAP` (0.1 nats) at every step must reproduce all its tokens. Teacher-forced (the
//! prompt plus the golden completion as one prompt, with prompt logprobs): at every golden
//! step, given the golden prefix, the golden token's |Δ logprob| is measured (its mean printed
//! and bounded), the golden token must still be the top-1 wherever the golden gap is at least
//! `SAFE_GAP`, and may swap with its runner-up at no more than `MAX_SWAPS` of the steps with a
//! gap of at least `GAP`. tiny-llama3 (bf16 checkpoint, random weights: no case keeps a gap of
//! 0.1 throughout, so its check is the teacher-forced one) at TP 1 and 2, SmolLM2 (Q4_1 GGUF,
//! dequantised then requantised per channel) at TP 1. The weights themselves are checked to
//! land as the host quantiser makes them, through both layout paths (host cores for the CPU
//! plugin, a device program for accelerators), sharded at TP 2.
//!
//! `--kv-cache-dtype fp8` is followed the same way with a looser [`Tolerance`]: fp8 keeps 3
//! (e4m3) or 2 (e5m2) mantissa bits of every K and V element, far coarser than int8 weights
//! with a scale per channel.

use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_xla::program::arg;
use tpuserve_runner_xla::quant::quantize_rows;
use tpuserve_runner_xla::weights::Layout;
use tpuserve_runner_xla::{KvCacheDtype, Quantization, WeightElem, XlaRunner, XlaRunnerOptions};
use tpuserve_suite::checks::{agreeing_prefix, request};
use tpuserve_suite::driver::{self, SeqRequest};
use tpuserve_suite::goldens::{Case, Goldens};
use tpuserve_suite::{fixtures_dir, golden_xla_options, smollm2_gguf, tiny_llama3_dir};

/// Golden top-1 / top-2 gap (nats) of the steps whose greedy choice int8 should keep.
const GAP: f64 = 0.1;
/// A gap no int8 error seen here comes near (the largest |Δ logprob| is about 0.3 nats):
/// these steps must all keep their top-1.
const SAFE_GAP: f64 = 0.5;
/// How far a lossy storage may move the greedy choices.
#[derive(Clone, Copy)]
struct Tolerance {
    /// A free-running case whose golden gap is at least this at every step must reproduce
    /// all its tokens.
    whole_case_gap: f64,
    /// Share of the steps with a gap of at least `GAP` whose top two may swap.
    max_swaps: f64,
}

/// int8 weights (measured: 1 swap in 185 steps on tiny-llama3, 2 in 185 on SmolLM2, each at
/// a gap under 0.25).
const INT8: Tolerance = Tolerance {
    whole_case_gap: GAP,
    max_swaps: 0.03,
};

/// fp8 e4m3 KV cache (measured: tiny-llama3 11 swaps in 185 steps, mean |Δ logprob| 0.060;
/// SmolLM2 4 in 185, 0.054).
const FP8_E4M3_KV: Tolerance = Tolerance {
    whole_case_gap: SAFE_GAP,
    max_swaps: 0.1,
};

/// fp8 e5m2 KV cache, 2 mantissa bits (measured on tiny-llama3: 31 swaps in 166 steps, mean
/// |Δ logprob| 0.146).
const FP8_E5M2_KV: Tolerance = Tolerance {
    whole_case_gap: SAFE_GAP,
    max_swaps: 0.25,
};

fn opts(tp: usize, max_model_len: usize) -> XlaRunnerOptions {
    XlaRunnerOptions {
        weight_dtype: WeightElem::BF16,
        quantization: Quantization::Int8,
        ..golden_xla_options(tp, max_model_len)
    }
}

/// Runs every golden case that fits `max_model_len` (see the top of the file); returns the
/// mean |Δ logprob| of the golden tokens over every golden step.
fn follow_goldens(
    model: &LoadedModel,
    goldens: &str,
    o: XlaRunnerOptions,
    tol: Tolerance,
    label: &str,
) -> f64 {
    let max_model_len = o.max_model_len;
    let mut r = XlaRunner::new(model, o).unwrap();
    let g = Goldens::load(&fixtures_dir().join(goldens));
    let fits = |c: &Case| c.prompt_token_ids.len() + c.completion_token_ids.len() < max_model_len;
    let (mut sum, mut steps, mut worst) = (0f64, 0usize, 0f64);
    let (mut clear, mut swaps, mut safe, mut whole_cases) = (0usize, 0usize, 0usize, 0usize);
    for c in g.cases.iter().filter(|c| fits(c)) {
        let gap = |k: usize| {
            let top = &c.steps[k].top;
            if top.len() > 1 {
                top[0].1 - top[1].1
            } else {
                f64::INFINITY
            }
        };
        let res = driver::run(&mut r, vec![request(c, 0)], 64).remove(0);
        let same = agreeing_prefix(&res.tokens, &c.completion_token_ids);
        if c.min_margin_top1_top2 >= tol.whole_case_gap {
            assert_eq!(
                res.tokens, c.completion_token_ids,
                "{label} {}: every golden gap is at least {}, yet the greedy tokens differ",
                c.name, tol.whole_case_gap
            );
            whole_cases += 1;
        }

        let mut forced = c.prompt_token_ids.clone();
        forced.extend(&c.completion_token_ids);
        let p = c.prompt_token_ids.len();
        let req = SeqRequest {
            prompt: forced,
            max_new_tokens: 1,
            logprobs: 0,
            prompt_logprobs: Some(1),
            arrive_at_step: 0,
        };
        let res = driver::run(&mut r, vec![req], 64).remove(0);
        let mut top1 = 0;
        for (k, st) in c.steps.iter().enumerate() {
            // Prompt logprobs start at position 1: entry i is token i + 1 given tokens ..=i.
            let mine = &res.prompt_logprobs[p - 1 + k];
            assert_eq!(mine.token, c.completion_token_ids[k]);
            let d = (mine.logprob as f64 - st.logprob).abs();
            sum += d;
            steps += 1;
            worst = worst.max(d);
            top1 += (mine.rank == 1) as usize;
            if gap(k) >= SAFE_GAP {
                assert_eq!(
                    mine.rank,
                    1,
                    "{label} {} step {k}: the golden token (gap {:.3}) is no longer the top-1",
                    c.name,
                    gap(k)
                );
                safe += 1;
            }
            if gap(k) >= GAP {
                clear += 1;
                if mine.rank != 1 {
                    swaps += 1;
                    eprintln!(
                        "{label} {} step {k}: the golden top two (gap {:.3}) swapped; the \
                         golden token moved by {d:.3}",
                        c.name,
                        gap(k)
                    );
                }
            }
        }
        eprintln!(
            "{label} {}: free-running, {same}/{} greedy tokens as the goldens (whole-case min \
             gap {:.3}); given the golden prefix, the golden token is the top-1 at {top1}/{} \
             steps",
            c.name,
            c.steps.len(),
            c.min_margin_top1_top2,
            c.steps.len(),
        );
    }
    assert_eq!(r.stats().compilations_after_warmup, 0);
    let mean = sum / steps as f64;
    eprintln!(
        "{label}: vs the f32 goldens: mean |Δ logprob| {mean:.4} over {steps} golden steps \
         (max {worst:.4}); top two swapped at {swaps} of the {clear} steps with a golden gap of \
         at least {GAP}, none of the {safe} with at least {SAFE_GAP}; {whole_cases} cases with \
         every gap at least {} reproduced whole",
        tol.whole_case_gap
    );
    assert!(safe >= 40, "{label}: too few steps checked: {safe}");
    assert!(
        swaps as f64 <= tol.max_swaps * clear as f64,
        "{label}: {swaps} of {clear} steps swapped"
    );
    mean
}

#[test]
fn tiny_llama3_int8_follows_the_goldens_at_tp_1_and_2() {
    let m = load_model(&tiny_llama3_dir()).unwrap();
    for (tp, len) in [(1, 2304), (2, 512)] {
        let label = format!("tiny-llama3 TP {tp}");
        let mean = follow_goldens(&m, "tiny-llama3/goldens.json", opts(tp, len), INT8, &label);
        // Measured 0.024 (bf16 without int8: 0.008).
        assert!(mean < 0.05, "{label}: mean |Δ logprob| {mean}");
    }
}

#[test]
fn smollm2_int8_follows_the_goldens() {
    let m = load_model(&smollm2_gguf()).unwrap();
    let mean = follow_goldens(
        &m,
        "smollm2/goldens.json",
        opts(1, 512),
        INT8,
        "SmolLM2 TP 1",
    );
    // Measured 0.048 (bf16 without int8: 0.010).
    assert!(mean < 0.08, "SmolLM2: mean |Δ logprob| {mean}");
}

fn fp8_kv(tp: usize, max_model_len: usize, kv: KvCacheDtype) -> XlaRunnerOptions {
    XlaRunnerOptions {
        weight_dtype: WeightElem::BF16,
        kv_cache_dtype: kv,
        ..golden_xla_options(tp, max_model_len)
    }
}

/// `--kv-cache-dtype fp8`: K and V stored as fp8 (e4m3 at TP 1 and 2, e5m2 at TP 1),
/// widened inside the attention's dots; bf16 weights and activations.
#[test]
fn tiny_llama3_fp8_kv_cache_follows_the_goldens_at_tp_1_and_2() {
    let m = load_model(&tiny_llama3_dir()).unwrap();
    for (tp, len, kv, tol, bound) in [
        (1, 2304, KvCacheDtype::Fp8E4m3, FP8_E4M3_KV, 0.1),
        (2, 512, KvCacheDtype::Fp8E4m3, FP8_E4M3_KV, 0.1),
        (1, 512, KvCacheDtype::Fp8E5m2, FP8_E5M2_KV, 0.25),
    ] {
        let label = format!("tiny-llama3 TP {tp} KV {kv:?}");
        let mean = follow_goldens(
            &m,
            "tiny-llama3/goldens.json",
            fp8_kv(tp, len, kv),
            tol,
            &label,
        );
        assert!(mean < bound, "{label}: mean |Δ logprob| {mean}");
    }
}

/// SmolLM2 with an fp8 e4m3 KV cache: minutes on the CPU plugin, which emulates fp8.
#[test]
#[ignore = "long: scripts/test-long.sh (fp8 is emulated on the CPU plugin: ~7 minutes)"]
fn long_smollm2_fp8_kv_cache_follows_the_goldens() {
    let m = load_model(&smollm2_gguf()).unwrap();
    let o = fp8_kv(1, 512, KvCacheDtype::Fp8E4m3);
    let mean = follow_goldens(
        &m,
        "smollm2/goldens.json",
        o,
        FP8_E4M3_KV,
        "SmolLM2 TP 1 KV fp8",
    );
    assert!(mean < 0.1, "SmolLM2 KV fp8: mean |Δ logprob| {mean}");
}

/// The int8 arguments are the host quantiser's output, transposed to `[in, out]`, stacked
/// and sharded, and the scales follow their matrix's output axis: through the host layout
/// (the CPU plugin's) and the device layout program (the accelerators'), at TP 1 and 2.
#[test]
fn int8_weights_and_scales_land_as_quantised_on_both_layout_paths() {
    let m = load_model(&tiny_llama3_dir()).unwrap();
    let c = &m.config;
    let (h, qs, vocab, layers) = (c.hidden_size, c.q_size(), c.vocab_size, c.num_hidden_layers);
    let quantised = |name: &str, rows: usize, cols: usize| {
        quantize_rows(&m.weights.tensor(name).unwrap(), rows, cols)
    };
    let head = quantised("lm_head.weight", vocab, h);
    let wo: Vec<_> = (0..layers)
        .map(|l| quantised(&format!("model.layers.{l}.self_attn.o_proj.weight"), h, qs))
        .collect();
    let wq: Vec<_> = (0..layers)
        .map(|l| quantised(&format!("model.layers.{l}.self_attn.q_proj.weight"), qs, h))
        .collect();
    // `[rows, cols]` int8 (HF layout) → device d's `[in, out]` shard.
    let transposed = |q: &[u8], rows: usize, cols: usize, split_out: bool, d: usize, n: usize| {
        let (r0, r1, c0, c1) = if split_out {
            (d * rows / n, (d + 1) * rows / n, 0, cols)
        } else {
            (0, rows, d * cols / n, (d + 1) * cols / n)
        };
        let mut out = Vec::new();
        for cc in c0..c1 {
            for r in r0..r1 {
                out.push(q[r * cols + cc]);
            }
        }
        out
    };
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks(4)
            .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
            .collect()
    };
    for (tp, layout) in [
        (1usize, Layout::Host),
        (2, Layout::Host),
        (2, Layout::Device),
    ] {
        let r = XlaRunner::new(
            &m,
            XlaRunnerOptions {
                weight_layout: layout,
                max_num_batched_tokens: 16,
                max_model_len: 64,
                max_logprobs: 0,
                num_blocks: 8,
                ..opts(tp, 64)
            },
        )
        .unwrap();
        let at = format!("TP {tp} {layout:?}");
        for d in 0..tp {
            assert!(
                r.weight_shard(arg::LM_HEAD, d).unwrap()
                    == transposed(&head.bytes, vocab, h, true, d, tp),
                "{at} device {d}: LM head"
            );
            let want = &head.scales[d * vocab / tp..(d + 1) * vocab / tp];
            assert_eq!(
                f32s(r.weight_shard(arg::S_LM_HEAD, d).unwrap()),
                want,
                "{at}"
            );
            // Column-parallel: the output axis and its scales split (wq kept [out, in]: its
            // rows split).
            let want: Vec<u8> = wq
                .iter()
                .flat_map(|q| q.bytes[d * qs / tp * h..(d + 1) * qs / tp * h].to_vec())
                .collect();
            assert!(r.weight_shard(arg::WQ, d).unwrap() == want, "{at} wq");
            let want: Vec<f32> = wq
                .iter()
                .flat_map(|q| q.scales[d * qs / tp..(d + 1) * qs / tp].to_vec())
                .collect();
            assert_eq!(f32s(r.weight_shard(arg::S_WQ, d).unwrap()), want, "{at}");
            // Row-parallel: the input axis split, the output axis (and scales) whole.
            let want: Vec<u8> = wo
                .iter()
                .flat_map(|q| transposed(&q.bytes, h, qs, false, d, tp))
                .collect();
            assert!(r.weight_shard(arg::WO, d).unwrap() == want, "{at} wo");
            let want: Vec<f32> = wo.iter().flat_map(|q| q.scales.clone()).collect();
            assert_eq!(f32s(r.weight_shard(arg::S_WO, d).unwrap()), want, "{at}");
        }
        // The embedding is not quantised.
        assert_eq!(
            r.weight_shard(arg::EMBED, 0).unwrap().len(),
            vocab / tp * h * 2,
            "{at}"
        );
    }
}
