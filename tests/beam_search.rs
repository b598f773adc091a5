//! Issue 18 item 8: `use_beam_search` through the real server against a brute-force reference
//! on tiny-llama3. The reference runs the CPU runner directly: for each live hypothesis the
//! full next-token distribution (all 128,256 tokens), every extension scored by cumulative
//! logprob, the best `width` kept — so it shares no code with the server's search.

use std::sync::Arc;

use serde_json::json;
use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_api::{sampler::log_softmax, ModelRunner, SamplingParams, SeqPlan, StepPlan};
use tpuserve_suite::engine_support::cpu_runner;
use tpuserve_suite::server::Server;
use tpuserve_suite::tiny_llama3_dir;

/// Log-probabilities of every next token after `tokens` (the whole sequence prefilled).
fn next_logprobs(runner: &mut dyn ModelRunner, tokens: &[u32]) -> Vec<f64> {
    let n = tokens.len();
    let bs = runner.kv_cache_shape().block_size;
    let plan = StepPlan {
        token_ids: tokens.to_vec(),
        positions: (0..n as u32).collect(),
        slot_mapping: (0..n as u32).collect(),
        seqs: vec![SeqPlan {
            seq_id: 0,
            query_start: 0,
            query_len: n,
            context_len: n,
            block_table: (0..n.div_ceil(bs) as u32).collect(),
            sample: false,
            prompt_logprob_targets: Vec::new(),
            return_logits: true,
            sampling: Arc::new(SamplingParams::greedy()),
            output_tokens: Arc::new(Vec::new()),
            prompt_tokens: Arc::new(Vec::new()),
        }],
        masks: None,
    };
    let out = runner.execute(&plan).expect("step");
    log_softmax(out.seqs[0].logits.as_ref().expect("logits"))
}

/// The best `width` continuations of `steps` tokens by cumulative logprob, searched as beam
/// search defines it (each step: every extension of every live beam, keep the best `width`).
fn brute_force(
    model: &LoadedModel,
    prompt: &[u32],
    width: usize,
    steps: usize,
) -> Vec<(Vec<u32>, f64)> {
    let mut runner = cpu_runner(model, 64);
    let mut beams: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
    for _ in 0..steps {
        let mut cand: Vec<(Vec<u32>, f64)> = Vec::new();
        for (toks, cum) in &beams {
            let seq: Vec<u32> = prompt.iter().chain(toks).copied().collect();
            let lps = next_logprobs(runner.as_mut(), &seq);
            // Only the best `width` of one beam can be among the best `width` overall.
            let mut order: Vec<usize> = (0..lps.len()).collect();
            order.sort_by(|&a, &b| lps[b].total_cmp(&lps[a]).then(a.cmp(&b)));
            for &t in &order[..width] {
                let mut next = toks.clone();
                next.push(t as u32);
                cand.push((next, cum + lps[t]));
            }
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        cand.truncate(width);
        beams = cand;
    }
    beams
}

#[test]
fn beam_search_matches_a_brute_force_reference_on_tiny_llama3() {
    let dir = tiny_llama3_dir();
    let model = load_model(&dir).expect("tiny-llama3");
    let prompt = model.tokenizer.encode("The quick brown fox", true).unwrap();
    let steps = 3;
    let server = Server::start(&[
        "--model",
        dir.to_str().unwrap(),
        "--max-model-len",
        "256",
        "--generation-config",
        "vllm",
    ]);
    for width in 2..=4 {
        let want = brute_force(&model, &prompt, width, steps);
        let r = server.post_ok(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": steps, "n": width, "use_beam_search": true,
                    "ignore_eos": true, "logprobs": 1, "return_token_ids": true}),
        );
        let choices = r["choices"].as_array().unwrap();
        assert_eq!(choices.len(), width, "{r}");
        for (i, (c, (toks, cum))) in choices.iter().zip(&want).enumerate() {
            let got: Vec<u32> = serde_json::from_value(c["token_ids"].clone()).unwrap();
            assert_eq!(&got, toks, "width {width}, hypothesis {i}: {r}");
            // The hypothesis' cumulative logprob is the sum of its token logprobs.
            let lps: Vec<f64> =
                serde_json::from_value(c["logprobs"]["token_logprobs"].clone()).unwrap();
            assert_eq!(lps.len(), steps);
            let sum: f64 = lps.iter().sum();
            assert!(
                (sum - cum).abs() < 1e-3,
                "width {width}, hypothesis {i}: {sum} vs {cum}"
            );
        }
    }
}
