//! Continuous batching over tiny-llama3 on the CPU runner: batching, chunked prefill,
//! preemption by recompute and prefix caching never change a greedy request's output, and no
//! KV block leaks.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tpuserve_engine::{EngineConfig, EngineRequest, FinalOutput};
use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_api::TokenId;
use tpuserve_suite::engine_support::{
    assert_no_leak, cpu_runner, engine, greedy, run_alone, run_staggered, run_together,
};
use tpuserve_suite::tiny_llama3_dir;

const MAX_MODEL_LEN: usize = 1024;

fn model() -> Arc<LoadedModel> {
    Arc::new(load_model(&tiny_llama3_dir()).unwrap())
}

fn config(budget: usize, caching: bool) -> EngineConfig {
    config_len(MAX_MODEL_LEN, budget, caching)
}

fn config_len(max_model_len: usize, budget: usize, caching: bool) -> EngineConfig {
    let mut cfg = EngineConfig::new(max_model_len);
    cfg.max_num_batched_tokens = budget;
    cfg.enable_prefix_caching = caching;
    cfg
}

/// Random prompts of 1..=600 tokens (ids anywhere in the vocabulary) and `new_tokens` new
/// tokens, with top-2 logprobs so that a near-tie can be told from a real divergence.
fn random_requests(
    seed: u64,
    count: usize,
    vocab: usize,
    new_tokens: std::ops::RangeInclusive<usize>,
) -> Vec<EngineRequest> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let len = rng.random_range(1..=600);
            let prompt: Vec<TokenId> = (0..len)
                .map(|_| rng.random_range(0..vocab as TokenId))
                .collect();
            let mut r = greedy(prompt, rng.random_range(new_tokens.clone()));
            r.sampling.logprobs = Some(2);
            r
        })
        .collect()
}

/// `got` equals `want`, except that the two may part ways at a step whose top two logprobs
/// are within 1e-4 (floating-point noise between batch shapes may flip an exact tie).
fn assert_same(want: &FinalOutput, got: &FinalOutput, what: &str) {
    let (a, b) = (&want.outputs[0], &got.outputs[0]);
    assert_eq!(a.finish, b.finish, "{what}: finish");
    let (la, lb) = (a.logprobs.as_ref().unwrap(), b.logprobs.as_ref().unwrap());
    for (i, (x, y)) in a.token_ids.iter().zip(&b.token_ids).enumerate() {
        if x != y {
            let top = &la[i].top;
            assert!(
                top.len() == 2 && (top[0].1 - top[1].1).abs() < 1e-4,
                "{what}: token {i} differs ({x} vs {y}) without a near-tie: {top:?}"
            );
            return;
        }
        assert!(
            (la[i].logprob - lb[i].logprob).abs() < 1e-3,
            "{what}: logprob {i} {} vs {}",
            la[i].logprob,
            lb[i].logprob
        );
    }
    assert_eq!(a.token_ids.len(), b.token_ids.len(), "{what}: length");
}

#[test]
fn sixty_four_concurrent_requests_match_running_alone() {
    let model = model();
    let mut runner = cpu_runner(&model, 4096);
    let vocab = runner.vocab_size();
    let reqs = random_requests(7, 64, vocab, 1..=24);

    let mut core = engine(&model, runner, config(2048, false));
    let alone = run_alone(&mut core, reqs.clone());
    runner = core.into_runner();

    let mut core = engine(&model, runner, config(2048, true));
    let together = run_together(&mut core, reqs.clone());
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_same(a, t, &format!("request {i} together"));
    }
    assert_no_leak(&core);
    runner = core.into_runner();

    // Arrivals spread over time, small budget: decodes and prefill chunks mix in every step.
    let mut core = engine(&model, runner, config(384, true));
    let arrive: Vec<usize> = (0..reqs.len()).map(|i| i * 2).collect();
    let staggered = run_staggered(&mut core, reqs.clone(), &arrive);
    for (i, (a, s)) in alone.iter().zip(&staggered).enumerate() {
        assert_same(a, s, &format!("request {i} staggered"));
    }
    assert_no_leak(&core);
    runner = core.into_runner();

    // `--max-num-prefill-tokens 100`: the prompts go through in chunks of at most 100 tokens
    // a step, beside every decode; the answers are the same.
    let mut cfg = config(2048, true);
    cfg.max_prefill_tokens = Some(100);
    let mut core = engine(&model, runner, cfg);
    let mut stats = core.subscribe_stats();
    let capped = run_together(&mut core, reqs);
    for (i, (a, c)) in alone.iter().zip(&capped).enumerate() {
        assert_same(a, c, &format!("request {i} with the prefill cap"));
    }
    let mut steps = 0;
    while let Ok(st) = stats.try_recv() {
        // At most 100 prompt tokens beside one decode token of each of the 64.
        assert!(
            st.num_scheduled_tokens <= 100 + 64,
            "a step of {} tokens",
            st.num_scheduled_tokens
        );
        steps += 1;
    }
    assert!(steps > 64, "{steps} steps");
    assert_no_leak(&core);
}

#[test]
fn preemption_under_a_small_kv_cache_changes_nothing() {
    let model = model();
    let runner = cpu_runner(&model, 4096);
    let vocab = runner.vocab_size();
    let reqs = random_requests(11, 16, vocab, 48..=96);

    let mut core = engine(&model, runner, config(2048, true));
    let roomy = run_together(&mut core, reqs.clone());
    assert_eq!(core.scheduler().num_preemptions(), 0);

    for caching in [true, false] {
        // 48 blocks of 16 = 768 tokens: two or three of these requests at a time, and each
        // grows by 3 to 6 blocks while decoding.
        let cfg = config_len(768, 2048, caching);
        let mut core = engine(&model, cpu_runner(&model, 48), cfg);
        let tight = run_together(&mut core, reqs.clone());
        assert!(
            core.scheduler().num_preemptions() > 0,
            "the cache was meant to overflow"
        );
        for (i, (a, t)) in roomy.iter().zip(&tight).enumerate() {
            assert_same(a, t, &format!("request {i}, prefix caching {caching}"));
        }
        assert_no_leak(&core);
    }
}

#[test]
fn shared_prefixes_hit_the_cache_and_change_nothing() {
    let model = model();
    let mut runner = cpu_runner(&model, 1024);
    let vocab = runner.vocab_size() as TokenId;
    let prefix: Vec<TokenId> = (0..400).map(|i| (i * 7919 + 13) % vocab).collect();
    let reqs: Vec<EngineRequest> = (0..8)
        .map(|k| {
            let mut p = prefix.clone();
            p.extend((0..5 + k * 3).map(|i| (i * 104_729 + k * 31) % vocab));
            let mut r = greedy(p, 12);
            r.sampling.logprobs = Some(2);
            r
        })
        .collect();

    let mut outs = Vec::new();
    for caching in [false, true] {
        let mut core = engine(&model, runner, config(2048, caching));
        // The first request computes the prefix; the others arrive once it is cached.
        let arrive: Vec<usize> = (0..reqs.len())
            .map(|i| if i == 0 { 0 } else { 2 })
            .collect();
        outs.push(run_staggered(&mut core, reqs.clone(), &arrive));
        let hits = core.scheduler().block_manager().counters().hits;
        if caching {
            // 400 tokens = 25 full blocks, for each of the 7 later requests.
            assert_eq!(hits, 7 * 400);
            for o in &outs[1][1..] {
                assert_eq!(o.prompt.num_cached_tokens, 400);
            }
        } else {
            assert_eq!(hits, 0);
        }
        assert_no_leak(&core);
        runner = core.into_runner();
    }
    for (i, (off, on)) in outs[0].iter().zip(&outs[1]).enumerate() {
        assert_same(off, on, &format!("request {i} with prefix caching"));
    }
}

/// vLLM's `cache_salt`: cached blocks are shared only between requests with the same salt
/// (and unsalted ones only with each other), and the answers do not change.
#[test]
fn a_cache_salt_shares_the_prefix_cache_only_within_the_salt() {
    let model = model();
    let runner = cpu_runner(&model, 1024);
    let vocab = runner.vocab_size() as TokenId;
    let prompt: Vec<TokenId> = (0..100).map(|i| (i * 7919 + 13) % vocab).collect();
    let salts = [
        None,
        Some("tenant-a"),
        Some("tenant-b"),
        Some("tenant-a"),
        None,
    ];
    let reqs: Vec<EngineRequest> = salts
        .iter()
        .map(|s| {
            let mut r = greedy(prompt.clone(), 4);
            r.cache_salt = s.map(String::from);
            r.sampling.logprobs = Some(2);
            r
        })
        .collect();
    let mut core = engine(&model, runner, config(2048, true));
    // One after another: each arrives once the previous one's prompt is cached.
    let arrive: Vec<usize> = (0..reqs.len()).map(|i| 3 * i).collect();
    let outs = run_staggered(&mut core, reqs, &arrive);
    let cached: Vec<usize> = outs.iter().map(|o| o.prompt.num_cached_tokens).collect();
    // 100 tokens: 6 full blocks of 16.
    assert_eq!(cached, vec![0, 0, 0, 96, 96]);
    for o in &outs[1..] {
        assert_same(&outs[0], o, "a salted request");
    }
    assert_no_leak(&core);
}
