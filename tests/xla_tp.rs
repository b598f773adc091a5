//! Tensor parallelism on the XLA CPU plugin with 8 devices: tiny-llama3 (16 heads / 8 KV heads)
//! at TP = 2, 4, 8 and SmolLM2 (9 / 3 heads) at TP = 3 reproduce the goldens; TP = 2 on
//! SmolLM2 and TP beyond the device count fail at start with the numbers in the message.
//!
//! Every TP runs the batched group (prefill chunks and decode of several sequences at once);
//! each case alone only at TP = 8, the production shape (TP = 1 alone is `goldens_xla`). The
//! 8 virtual devices share this machine's cores, so each extra pass costs minutes of CI.

use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_xla::{XlaRunner, XlaRunnerOptions};
use tpuserve_suite::checks::{check_case, request};
use tpuserve_suite::driver;
use tpuserve_suite::goldens::{Case, Goldens};
use tpuserve_suite::{fixtures_dir, shared_xla_cache, smollm2_gguf, tiny_llama3_dir};

fn opts(tp: usize, max_model_len: usize) -> XlaRunnerOptions {
    XlaRunnerOptions {
        tensor_parallel_size: tp,
        cpu_device_count: 8,
        num_blocks: 320,
        block_size: 16,
        max_num_batched_tokens: 64,
        max_model_len,
        max_logprobs: 5,
        strict_no_recompile: true,
        compile_cache_dir: Some(shared_xla_cache()),
        ..Default::default()
    }
}

fn goldens_at(model: &LoadedModel, goldens: &str, tp: usize, max_model_len: usize, alone: bool) {
    let mut r = XlaRunner::new(model, opts(tp, max_model_len)).unwrap();
    let g = Goldens::load(&fixtures_dir().join(goldens));
    if alone {
        for c in &g.cases {
            let res = driver::run(&mut r, vec![request(c, 0)], 64).remove(0);
            check_case(c, &res, true);
        }
    }
    let cases: Vec<&Case> = g.batch.case_names.iter().map(|n| g.case(n)).collect();
    let reqs = cases
        .iter()
        .enumerate()
        .map(|(i, c)| request(c, i))
        .collect();
    for (c, res) in cases.iter().zip(driver::run(&mut r, reqs, 64)) {
        check_case(c, &res, true);
    }
    assert_eq!(r.stats().compilations_after_warmup, 0);
}

#[test]
fn tiny_llama3_tp_2_4_8_match_goldens() {
    let m = load_model(&tiny_llama3_dir()).unwrap();
    for tp in [2, 4, 8] {
        goldens_at(&m, "tiny-llama3/goldens.json", tp, 2304, tp == 8);
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
