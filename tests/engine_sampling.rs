//! The sampler on real SmolLM2 logits: filtered distributions against
//! `smollm2/sampling.json` (1e-4), 20,000 seeded draws against them (chi-square), and a seeded
//! request giving the same tokens alone and inside a batch of 16.

use std::sync::Arc;

use serde_json::Value;
use tpuserve_engine::{EngineConfig, EngineRequest, SamplingParams, StopParams};
use tpuserve_model::load_model;
use tpuserve_runner_api::sampler::{filtered_distribution, sample, seeded_uniform};
use tpuserve_runner_api::TokenId;
use tpuserve_suite::driver::{self, SeqRequest};
use tpuserve_suite::engine_support::{assert_no_leak, cpu_runner, engine, run_alone, run_together};
use tpuserve_suite::{fixtures_dir, smollm2_gguf};

const DRAWS: u64 = 20_000;

/// ln Γ(x) (Lanczos, g = 7), accurate to ~1e-15 for x > 0.
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let t = x + 7.5;
    let s: f64 = C[0] + (1..9).map(|i| C[i] / (x + i as f64)).sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

/// Upper regularized incomplete gamma Q(a, x): the chi-square survival function is
/// Q(df / 2, stat / 2).
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let front = (-x + a * x.ln() - ln_gamma(a)).exp();
    if x < a + 1.0 {
        // Series for P(a, x).
        let (mut sum, mut term, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * front
    } else {
        // Continued fraction for Q(a, x) (modified Lentz).
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        front * h
    }
}

#[test]
fn chi_square_helper_is_right() {
    // Known quantiles: P(chi2_1 > 3.841) = 0.05, P(chi2_10 > 23.209) = 0.01.
    assert!((gamma_q(0.5, 3.841_459 / 2.0) - 0.05).abs() < 1e-5);
    assert!((gamma_q(5.0, 23.209_25 / 2.0) - 0.01).abs() < 1e-5);
}

/// The token at cumulative probability `u` (the sampler's walk; the last token if rounding
/// leaves `u` past the total).
fn draw(dist: &[(TokenId, f64)], u: f64) -> TokenId {
    let mut cum = 0.0;
    for &(t, p) in dist {
        cum += p;
        if u < cum {
            return t;
        }
    }
    dist.last().map_or(0, |d| d.0)
}

fn params(cfg: &Value) -> SamplingParams {
    SamplingParams {
        temperature: cfg["temperature"].as_f64().unwrap() as f32,
        top_k: cfg["top_k"].as_i64().unwrap_or(0) as i32,
        top_p: cfg["top_p"].as_f64().unwrap_or(1.0) as f32,
        ..SamplingParams::default()
    }
}

#[test]
fn smollm2_sampling_distributions_and_seeded_draws_match_the_fixture() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("smollm2/sampling.json")).unwrap(),
    )
    .unwrap();
    let prompt: Vec<TokenId> = serde_json::from_value(fixture["prompt_token_ids"].clone()).unwrap();
    let model = load_model(&smollm2_gguf()).unwrap();
    // The f32 reference: the fixture's distributions come from the f32 logits.
    let opts = tpuserve_runner_cpu::CpuRunnerOptions {
        weights: tpuserve_runner_cpu::CpuWeights::F32,
        kv_fp8: None,
        ..Default::default()
    };
    let mut runner = tpuserve_runner_cpu::CpuRunner::new(&model, opts).unwrap();
    let logits = driver::run(
        &mut runner,
        vec![SeqRequest {
            prompt,
            max_new_tokens: 1,
            logprobs: 0,
            prompt_logprobs: None,
            arrive_at_step: 0,
        }],
        4096,
    )
    .remove(0)
    .last_prompt_logits
    .unwrap();

    for cfg in fixture["configs"].as_array().unwrap() {
        let name = cfg["name"].as_str().unwrap();
        let p = params(cfg);
        let dist = filtered_distribution(&logits, &p);
        assert_eq!(
            dist.len() as u64,
            cfg["num_tokens_with_nonzero_prob"].as_u64().unwrap(),
            "{name}: support size"
        );
        let listed: Vec<(TokenId, f64)> =
            serde_json::from_value(cfg["probs_top50"].clone()).unwrap();
        for &(tok, want) in &listed {
            let got = dist.iter().find(|d| d.0 == tok).map_or(0.0, |d| d.1);
            assert!(
                (got - want).abs() <= 1e-4,
                "{name}: token {tok} p = {got}, fixture {want}"
            );
        }

        // 20,000 seeded draws, one seed each. A draw is the sampler's inverse-CDF walk over
        // this distribution with its seeded uniform; `sample` itself (which refilters the
        // whole vocabulary per call, too slow for 100,000 calls in CI) must agree on a subset.
        let mut counts = std::collections::HashMap::<TokenId, u64>::new();
        for seed in 0..DRAWS {
            let t = draw(&dist, seeded_uniform(seed, 0));
            if seed < 100 {
                let p = SamplingParams {
                    seed: Some(seed),
                    ..p.clone()
                };
                assert_eq!(sample(&logits, &p, &[], &[], 0).0, t, "{name}: seed {seed}");
            }
            *counts.entry(t).or_default() += 1;
        }
        // Bins: listed tokens expected at least 5 times, plus the rest of the mass.
        let n = DRAWS as f64;
        let (mut stat, mut bins, mut binned_mass, mut binned_count) = (0.0, 0, 0.0, 0u64);
        for &(tok, prob) in listed.iter().filter(|(_, pr)| pr * n >= 5.0) {
            let obs = *counts.get(&tok).unwrap_or(&0) as f64;
            stat += (obs - prob * n).powi(2) / (prob * n);
            bins += 1;
            binned_mass += prob;
            binned_count += obs as u64;
        }
        let rest = (1.0 - binned_mass) * n;
        if rest >= 5.0 {
            stat += ((DRAWS - binned_count) as f64 - rest).powi(2) / rest;
            bins += 1;
        } else {
            assert!(DRAWS - binned_count <= 25, "{name}: draws outside the bins");
        }
        let p_value = gamma_q((bins - 1) as f64 / 2.0, stat / 2.0);
        assert!(
            p_value > 0.001,
            "{name}: chi-square {stat:.1} over {bins} bins, p = {p_value:.2e}"
        );
    }
}

fn seeded(prompt: Vec<TokenId>, seed: Option<u64>, temperature: f32) -> EngineRequest {
    EngineRequest::new(
        prompt,
        SamplingParams {
            temperature,
            top_k: 50,
            top_p: 0.95,
            seed,
            ..SamplingParams::default()
        },
        StopParams {
            max_tokens: Some(16),
            ignore_eos: true,
            ..Default::default()
        },
    )
}

#[test]
fn smollm2_seeded_request_is_the_same_alone_and_in_a_batch_of_16() {
    let model = Arc::new(load_model(&smollm2_gguf()).unwrap());
    let enc = |s: &str| model.tokenizer.encode(s, false).unwrap();
    let target = || seeded(enc("Once upon a time, there was a"), Some(42), 0.9);

    let mut core = engine(&model, cpu_runner(&model, 512), EngineConfig::new(2048));
    let alone = run_alone(&mut core, vec![target()]).remove(0);

    let others = [
        "The capital of France is",
        "def fibonacci(n):",
        "My favourite colour is",
        "1, 2, 3, 5, 8,",
    ];
    let mut batch = vec![target()];
    for i in 0..15 {
        let prompt = enc(&format!("{} {}", others[i % others.len()], i));
        batch.push(match i % 3 {
            0 => seeded(prompt, Some(1000 + i as u64), 1.0),
            1 => seeded(prompt, None, 0.7),
            _ => seeded(prompt, None, 0.0),
        });
    }
    let outs = run_together(&mut core, batch);
    assert_eq!(outs[0].outputs[0].token_ids, alone.outputs[0].token_ids);
    assert_eq!(outs[0].outputs[0].text, alone.outputs[0].text);
    assert_eq!(alone.outputs[0].token_ids.len(), 16);
    assert_no_leak(&core);
}
