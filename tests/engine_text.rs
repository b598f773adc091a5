//! Output text through the engine on SmolLM2 (CPU runner): stop strings split across tokens,
//! an emoji split across byte-level tokens, `min_tokens` over an early EOS, and `n = 3` with a
//! seed — each with its exact text and finish reason.

use std::sync::Arc;

use tpuserve_engine::{
    EngineConfig, EngineCore, EngineRequest, FinalOutput, FinishReason, SamplingParams, StopParams,
    StopReason,
};
use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_api::TokenId;
use tpuserve_suite::engine_support::{assert_no_leak, cpu_runner, engine, greedy, run_alone};
use tpuserve_suite::goldens::{Case, Goldens};
use tpuserve_suite::{fixtures_dir, smollm2_gguf};

struct Fixture {
    model: Arc<LoadedModel>,
    goldens: Goldens,
    core: EngineCore,
}

fn fixture() -> Fixture {
    let model = Arc::new(load_model(&smollm2_gguf()).unwrap());
    let core = engine(&model, cpu_runner(&model, 256), EngineConfig::new(2048));
    Fixture {
        goldens: Goldens::load(&fixtures_dir().join("smollm2/goldens.json")),
        model,
        core,
    }
}

/// Runs one request, returning its streamed (token count, text) deltas and the final output.
fn stream(core: &mut EngineCore, r: EngineRequest) -> (Vec<(usize, String)>, FinalOutput) {
    let mut s = core.add_request(r).unwrap();
    core.run_until_idle();
    let mut deltas = Vec::new();
    let mut out = FinalOutput::new(s.id);
    while let Some(ev) = s.blocking_next() {
        for d in &ev.seqs {
            deltas.push((d.token_ids.len(), d.text.clone()));
        }
        out.apply(ev);
    }
    assert!(out.finished);
    assert_no_leak(core);
    (deltas, out)
}

fn token_texts(model: &LoadedModel, ids: &[TokenId]) -> Vec<String> {
    ids.iter()
        .map(|&t| model.tokenizer.decode(&[t], false).unwrap())
        .collect()
}

fn golden_greedy(c: &Case) -> EngineRequest {
    greedy(c.prompt_token_ids.clone(), c.completion_token_ids.len())
}

#[test]
fn stop_strings_split_across_tokens() {
    let mut f = fixture();
    let c = f.goldens.case("short_english");
    assert_eq!(
        c.completion_text,
        " Paris.\n\nThe answer is: 2018-01-22 12:1"
    );
    let pieces = token_texts(&f.model, &c.completion_token_ids);
    // (stop string, include it, expected text, tokens generated)
    let cases = [
        ("answer is", false, " Paris.\n\nThe "),
        ("answer is", true, " Paris.\n\nThe answer is"),
        // Starts and ends inside tokens.
        ("swer i", false, " Paris.\n\nThe an"),
        ("\n\nThe", false, " Paris."),
    ];
    for (stop, include, expect) in cases {
        assert!(
            pieces.iter().all(|p| !p.contains(stop)),
            "`{stop}` must span tokens: {pieces:?}"
        );
        let mut r = golden_greedy(c);
        r.stop.stop = vec!["never appears".into(), stop.to_string()];
        r.stop.include_stop_str_in_output = include;
        let (deltas, out) = stream(&mut f.core, r);
        let o = &out.outputs[0];
        assert_eq!(o.text, expect, "stop {stop:?}");
        let streamed: String = deltas.iter().map(|d| d.1.as_str()).collect();
        assert_eq!(streamed, expect, "streamed text, stop {stop:?}");
        let f2 = o.finish.clone().unwrap();
        assert_eq!(f2.reason, FinishReason::Stop);
        assert_eq!(f2.stop_reason, Some(StopReason::String(stop.to_string())));
        // Generation ends with the token that completes the stop string.
        let full: String = pieces[..o.token_ids.len()].concat();
        let before: String = pieces[..o.token_ids.len() - 1].concat();
        assert!(full.contains(stop) && !before.contains(stop));
        assert_eq!(o.token_ids, c.completion_token_ids[..o.token_ids.len()]);
    }
}

#[test]
fn emoji_split_across_tokens_comes_out_whole() {
    let mut f = fixture();
    let c = f.goldens.case("unicode_emoji");
    let expect = " \"👍🏽\"\n\n👍🏽 is a Japanese-style emoji that";
    assert_eq!(c.completion_text_skip_special, expect);
    // The emoji's bytes are spread over several tokens.
    let pieces = token_texts(&f.model, &c.completion_token_ids);
    assert!(pieces.iter().filter(|p| p.contains('\u{FFFD}')).count() >= 2);

    let (deltas, out) = stream(&mut f.core, golden_greedy(c));
    let o = &out.outputs[0];
    assert_eq!(o.token_ids, c.completion_token_ids);
    assert_eq!(o.text, expect);
    assert_eq!(o.finish.as_ref().unwrap().reason, FinishReason::Length);
    assert!(deltas.iter().all(|d| !d.1.contains('\u{FFFD}')));
    // Some tokens produced no text until the character was complete.
    assert!(deltas.iter().any(|d| d.0 > 0 && d.1.is_empty()));
    assert!(deltas.iter().any(|d| d.1.contains('👍')));
    assert_eq!(
        deltas.iter().map(|d| d.1.as_str()).collect::<String>(),
        expect
    );
}

#[test]
fn min_tokens_overrides_an_early_eos() {
    let mut f = fixture();
    let c = f.goldens.case("chat_single_turn");
    let eos = f.model.eos_token_ids.clone();
    let eos_at = c
        .completion_token_ids
        .iter()
        .position(|t| eos.contains(t))
        .expect("the golden answer ends with EOS");

    let mut r = golden_greedy(c);
    r.stop.ignore_eos = false;
    let (_, out) = stream(&mut f.core, r);
    let o = &out.outputs[0];
    assert_eq!(o.text, "The capital of France is Paris.");
    assert_eq!(o.token_ids, c.completion_token_ids[..=eos_at]);
    assert_eq!(o.finish.as_ref().unwrap().reason, FinishReason::Stop);
    assert_eq!(o.finish.as_ref().unwrap().stop_reason, None);

    let min_tokens = eos_at + 6;
    let mut r = golden_greedy(c);
    r.stop.ignore_eos = false;
    r.stop.min_tokens = min_tokens;
    r.stop.max_tokens = Some(40);
    let (_, out) = stream(&mut f.core, r);
    let o = &out.outputs[0];
    println!(
        "min_tokens text: {:?} {:?} {:?}",
        o.text, o.finish, o.token_ids
    );
    assert_eq!(o.token_ids[..eos_at], c.completion_token_ids[..eos_at]);
    assert!(o.token_ids[..min_tokens].iter().all(|t| !eos.contains(t)));
    assert!(o.token_ids.len() >= min_tokens);
    assert!(o.text.starts_with("The capital of France is Paris."));
}

#[test]
fn n_3_with_a_seed_gives_each_child_its_own_seed() {
    let mut f = fixture();
    let prompt = f
        .model
        .tokenizer
        .encode("Once upon a time, there was a", false)
        .unwrap();
    let req = |n: usize, seed: u64| {
        let mut r = EngineRequest::new(
            prompt.clone(),
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                seed: Some(seed),
                ..SamplingParams::default()
            },
            StopParams {
                max_tokens: Some(10),
                ..Default::default()
            },
        );
        r.n = n;
        r
    };
    let (_, out) = stream(&mut f.core, req(3, 7));
    assert_eq!(out.outputs.len(), 3);
    let singles = run_alone(&mut f.core, (0..3).map(|i| req(1, 7 + i)).collect());
    let expect = [
        " person named Maria Ramirez. Maria was born",
        " woman named Ereba, who was a wise",
        " mysterious figure who was trying to communicate with the universe",
    ];
    for (i, o) in out.outputs.iter().enumerate() {
        assert_eq!(o.index, i);
        assert_eq!(o.text, expect[i], "child {i}");
        assert_eq!(o.token_ids.len(), 10);
        assert_eq!(o.finish.as_ref().unwrap().reason, FinishReason::Length);
        assert_eq!(o.token_ids, singles[i].outputs[0].token_ids, "child {i}");
        assert_eq!(o.text, singles[i].outputs[0].text, "child {i}");
    }
    assert_eq!(out.prompt.num_prompt_tokens, prompt.len());
}
