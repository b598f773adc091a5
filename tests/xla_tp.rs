//! Tensor parallelism on the XLA CPU plugin with 8 devices: tiny-llama3 (16 heads / 8 KV heads)
//! at TP = 2, 4, 8 and SmolLM2 (9 / 3 heads) at TP = 3 reproduce the goldens; TP = 2 on
//! SmolLM2 and TP beyond the device count fail at start with the numbers in the message.
//!
//! Every TP size runs one staggered batch (prefill chunks and decode of several sequences at
//! once) of the cases that fit 512 tokens: the sharding does not depend on the context, and the
//! 2k-token context is covered at TP = 1 (`goldens_xla`) and, with every case alone at every
//! TP size, by the long test below (scripts/test-long.sh). The 8 virtual devices share this
//! machine's cores, so each extra pass costs minutes of CI.

use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_xla::program::SEQ_PARALLEL_ROWS;
use tpuserve_runner_xla::{XlaRunner, XlaRunnerOptions};
use tpuserve_suite::checks::{check_batch, check_case, request};
use tpuserve_suite::driver;
use tpuserve_suite::goldens::{Case, Goldens};
use tpuserve_suite::hlo_proto;
use tpuserve_suite::{fixtures_dir, golden_xla_options, smollm2_gguf, tiny_llama3_dir};

/// The goldens' options with attention chunks sized as on TPU, scaled down: one block the
/// least, grown for buckets with few query tiles within 128 KiB of f32 K and V a chip (a
/// token's are 512 / TP bytes a layer; at TP 2, decode 16 rows: 2 blocks, prompt buckets: 8
/// to 32; twice as many tokens at each doubling of TP), so that steps read several chunks
/// and buckets read chunks of different sizes.
fn opts(tp: usize, max_model_len: usize) -> XlaRunnerOptions {
    XlaRunnerOptions {
        kv_chunk_tokens: 16,
        kv_chunk_budget: Some(128 << 10),
        ..golden_xla_options(tp, max_model_len)
    }
}

/// The golden batch at one TP size, without the cases longer than `max_model_len`; with
/// `alone`, every such case by itself first.
fn goldens_at(model: &LoadedModel, goldens: &str, tp: usize, max_model_len: usize, alone: bool) {
    let mut r = XlaRunner::new(model, opts(tp, max_model_len)).unwrap();
    let g = Goldens::load(&fixtures_dir().join(goldens));
    let fits = |c: &Case| c.prompt_token_ids.len() + c.completion_token_ids.len() <= max_model_len;
    if alone {
        for c in g.cases.iter().filter(|c| fits(c)) {
            let res = driver::run(&mut r, vec![request(c, 0)], 64).remove(0);
            check_case(c, &res, true);
        }
    }
    check_batch(&mut r, &g.batch_within(max_model_len));
    assert_eq!(r.stats().compilations_after_warmup, 0);
}

#[test]
fn tiny_llama3_tp_2_4_8_match_goldens() {
    let m = load_model(&tiny_llama3_dir()).unwrap();
    for tp in [2, 4, 8] {
        goldens_at(&m, "tiny-llama3/goldens.json", tp, 512, false);
    }
}

#[test]
#[ignore = "long: scripts/test-long.sh (every golden case alone at TP 2, 4 and 8)"]
fn long_tiny_llama3_every_case_alone_at_tp_2_4_8() {
    let m = load_model(&tiny_llama3_dir()).unwrap();
    for tp in [2, 4, 8] {
        goldens_at(&m, "tiny-llama3/goldens.json", tp, 2304, true);
    }
}

#[test]
fn smollm2_tp3_matches_goldens_and_tp2_is_refused() {
    let m = load_model(&smollm2_gguf()).unwrap();
    let err = XlaRunner::new(&m, opts(2, 512))
        .err()
        .expect("TP=2 must fail")
        .to_string();
    assert!(
        err.contains("--tensor-parallel-size 2") && err.contains("attention heads (9)"),
        "{err}"
    );
    let err = XlaRunner::new(
        &m,
        XlaRunnerOptions {
            cpu_device_count: 3,
            ..opts(9, 512)
        },
    )
    .err()
    .expect("TP=9 on 3 devices must fail")
    .to_string();
    assert!(
        err.contains("needs 9 devices") && err.contains("exposes 3"),
        "{err}"
    );
    goldens_at(&m, "smollm2/goldens.json", 3, 512, false);
}

/// What GSPMD made of the TP-8 step: the KV cache stays sharded by KV head from the buffer to
/// the attention dot. No collective and no copy anywhere in any bucket's partitioned module
/// moves the cache, whole or reshaped (an array with one of the cache's distinctive
/// dimensions, or its element count). 3,001 blocks make those dimensions unlike any other
/// tensor's in the step.
#[test]
fn tp8_partitioned_step_never_gathers_or_copies_the_kv_cache() {
    let m = load_model(&tiny_llama3_dir()).unwrap();
    let blocks = 3001i64; // num_blocks + the runner's null block
    let r = XlaRunner::new(
        &m,
        XlaRunnerOptions {
            num_blocks: blocks as usize - 1,
            ..opts(8, 512)
        },
    )
    .unwrap();
    let c = &m.config;
    let (layers, kvh, d) = (
        c.num_hidden_layers as i64,
        c.num_key_value_heads as i64,
        c.head_dim as i64,
    );
    let slots = blocks * 16;
    let cache_dims = [layers * slots, layers * blocks, slots, blocks];
    let cache_elems = [layers * slots * kvh * d, layers * slots * (kvh / 8) * d];
    for b in r.buckets() {
        let p = r.optimized_program(*b).unwrap();
        assert_eq!(p.format, "hlo_with_config");
        let insts = hlo_proto::instructions(&p.code);
        // The reader sees the partitioned module: the per-device cache parameters and the
        // row-parallel all-reduces are there.
        let per_device = [layers * blocks, kvh / 8, 16, d];
        assert!(
            insts
                .iter()
                .any(|i| i.opcode == "parameter" && i.shapes.contains(&per_device.to_vec())),
            "{b:?}: no parameter of the per-device cache shape {per_device:?}"
        );
        assert!(
            insts.iter().any(|i| i.opcode == "all-reduce"),
            "{b:?}: no all-reduce in a TP-8 program"
        );
        // From SEQ_PARALLEL_ROWS rows the residual stream is split by rows: wo's and wd's
        // sums are scattered (the CPU compiler writes that as an all-reduce and a slice) and
        // the norms' rows leave by all-gather; below, nothing is gathered.
        let sp = b.tokens >= SEQ_PARALLEL_ROWS;
        assert_eq!(
            insts.iter().any(|i| i.opcode == "all-gather"),
            sp,
            "{b:?}: sequence parallel should be {sp}"
        );
        let bad: Vec<_> = insts
            .iter()
            .filter(|i| hlo_proto::MOVES.contains(&i.opcode.as_str()))
            .filter(|i| {
                i.shapes.iter().any(|s| {
                    s.iter().any(|x| cache_dims.contains(x))
                        || cache_elems.contains(&s.iter().product::<i64>())
                })
            })
            .collect();
        assert!(bad.is_empty(), "{b:?}: the KV cache is moved: {bad:#?}");
    }
}
