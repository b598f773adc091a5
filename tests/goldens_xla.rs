//! The XLA runner on the XLA CPU PJRT plugin against the HF goldens (f32), alone and batched,
//! with no compilation after warm-up.

use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_xla::{XlaRunner, XlaRunnerOptions};
use tpuserve_suite::checks::{check_case, prompt_ids, request};
use tpuserve_suite::driver;
use tpuserve_suite::goldens::{Case, Goldens};
use tpuserve_suite::{fixtures_dir, golden_xla_options, smollm2_gguf, tiny_llama3_dir};

pub fn xla_runner(model: &LoadedModel, tp: usize, max_model_len: usize) -> XlaRunner {
    // TPUSERVE_TEST_XLA_DEVICE=cuda runs the same goldens on a GPU host's PJRT plugin.
    let device = std::env::var("TPUSERVE_TEST_XLA_DEVICE")
        .unwrap_or_else(|_| "xla-cpu".into())
        .parse()
        .expect("TPUSERVE_TEST_XLA_DEVICE: tpu, cuda or xla-cpu");
    XlaRunner::new(
        model,
        XlaRunnerOptions {
            device,
            // As many devices as the TP size (0: the plugin's default).
            cpu_device_count: 0,
            ..golden_xla_options(tp, max_model_len)
        },
    )
    .expect("XLA runner on the CPU plugin (run scripts/setup.sh if the plugin is missing)")
}

fn run_goldens(model: &LoadedModel, runner: &mut XlaRunner, goldens: &str) {
    let g = Goldens::load(&fixtures_dir().join(goldens));
    for c in &g.cases {
        assert_eq!(prompt_ids(model, c), c.prompt_token_ids, "{}", c.name);
        let res = driver::run(runner, vec![request(c, 0)], 64).remove(0);
        check_case(c, &res, true);
    }
    let cases: Vec<&Case> = g.batch.case_names.iter().map(|n| g.case(n)).collect();
    let reqs = cases
        .iter()
        .enumerate()
        .map(|(i, c)| request(c, i * 2))
        .collect();
    let res = driver::run(runner, reqs, 64);
    for (c, r) in cases.iter().zip(&res) {
        check_case(c, r, true);
    }
    assert_eq!(runner.stats().compilations_after_warmup, 0);
}

#[test]
fn tiny_llama3_on_xla_cpu_matches_goldens() {
    let model = load_model(&tiny_llama3_dir()).unwrap();
    let mut r = xla_runner(&model, 1, 2304);
    run_goldens(&model, &mut r, "tiny-llama3/goldens.json");
}

#[test]
fn smollm2_on_xla_cpu_matches_goldens() {
    let model = load_model(&smollm2_gguf()).unwrap();
    let mut r = xla_runner(&model, 1, 512);
    run_goldens(&model, &mut r, "smollm2/goldens.json");
}
