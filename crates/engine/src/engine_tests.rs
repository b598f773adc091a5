//! Engine behaviour against the fake runner: outputs independent of batching, caching and
//! preemption; stop conditions; errors, aborts, streams, stats; and a property test over
//! random add / step / abort sequences.

use std::sync::Arc;

use proptest::prelude::*;
use tpuserve_runner_api::{SamplingParams, TokenId};

use crate::engine::{EngineConfig, EngineCore};
use crate::handle::EngineHandle;
use crate::output::{FinalOutput, RequestStream};
use crate::request::{EngineRequest, FinishReason, StopParams, StopReason};
use crate::testing::{byte_tokens, next_token, ByteDecoder, FakeRunner, EOS};

struct Setup {
    blocks: usize,
    block_size: usize,
    budget: usize,
    max_seqs: usize,
    caching: bool,
    eos: Vec<TokenId>,
    max_model_len: usize,
    max_prefill_tokens: Option<usize>,
    split_bursts: Option<usize>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            blocks: 256,
            block_size: 4,
            budget: 64,
            max_seqs: 16,
            caching: true,
            eos: Vec::new(),
            max_model_len: 1024,
            max_prefill_tokens: None,
            split_bursts: None,
        }
    }
}

impl Setup {
    fn core_with(&self, runner: FakeRunner) -> EngineCore {
        EngineCore::new(
            Box::new(runner),
            Arc::new(ByteDecoder),
            self.eos.clone(),
            EngineConfig {
                max_model_len: self.max_model_len,
                max_num_batched_tokens: self.budget,
                max_num_seqs: self.max_seqs,
                enable_prefix_caching: self.caching,
                max_logprobs: 20,
                scheduling_policy: Default::default(),
                max_prefill_tokens: self.max_prefill_tokens,
                split_bursts: self.split_bursts,
                seed: None,
            },
        )
        .unwrap()
    }

    fn core(&self) -> EngineCore {
        self.core_with(FakeRunner::new(self.blocks, self.block_size))
    }
}

fn request(prompt: &str, max_tokens: usize) -> EngineRequest {
    EngineRequest::new(
        byte_tokens(prompt),
        SamplingParams::greedy(),
        StopParams {
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
    )
}

/// The tokens the fake model produces for `prompt` (what any correct engine must return).
fn reference(
    prompt: &[TokenId],
    max_tokens: usize,
    eos: &[TokenId],
    min_tokens: usize,
) -> Vec<TokenId> {
    let mut all = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let banned = if out.len() < min_tokens { eos } else { &[] };
        let t = next_token(&all, banned);
        all.push(t);
        out.push(t);
        if eos.contains(&t) && out.len() >= min_tokens {
            break;
        }
    }
    out
}

fn run_all(core: &mut EngineCore, reqs: Vec<EngineRequest>) -> Vec<FinalOutput> {
    let streams: Vec<RequestStream> = reqs
        .into_iter()
        .map(|r| core.add_request(r).unwrap())
        .collect();
    core.run_until_idle();
    streams.into_iter().map(|s| s.collect_blocking()).collect()
}

fn prompts() -> Vec<String> {
    let base = "the quick brown fox jumps over the lazy dog ".repeat(3);
    (0..12)
        .map(|i| format!("{}{}", &base[..10 + i * 9], i))
        .collect()
}

#[test]
fn outputs_do_not_depend_on_batching_caching_or_preemption() {
    let make = || {
        prompts()
            .into_iter()
            .enumerate()
            .map(|(i, p)| request(&p, 5 + i * 3))
            .collect::<Vec<_>>()
    };
    let alone: Vec<FinalOutput> = make()
        .into_iter()
        .map(|r| run_all(&mut Setup::default().core(), vec![r]).remove(0))
        .collect();
    for (r, a) in make().iter().zip(&alone) {
        assert_eq!(
            a.outputs[0].token_ids,
            reference(&r.prompt_token_ids, r.stop.max_tokens.unwrap(), &[], 0)
        );
    }
    for caching in [true, false] {
        let setup = Setup {
            blocks: 40,
            budget: 24,
            caching,
            max_model_len: 160,
            ..Default::default()
        };
        let mut core = setup.core();
        let together = run_all(&mut core, make());
        assert!(
            core.scheduler().num_preemptions() > 0,
            "the cache was meant to overflow"
        );
        for (a, b) in alone.iter().zip(&together) {
            assert_eq!(a.outputs, b.outputs);
        }
        let bm = core.scheduler().block_manager();
        assert_eq!(bm.num_free_blocks(), bm.num_blocks());
    }
}

#[test]
fn stop_string_across_tokens_is_cut_from_text() {
    let prompt = byte_tokens("hello");
    let expect = reference(&prompt, 12, &[], 0);
    let text: String = expect.iter().map(|&t| t as u8 as char).collect();
    let stop = text[3..6].to_string();
    let mut r = request("hello", 12);
    r.stop.stop = vec!["NOPE".into(), stop.clone()];
    let first = text.find(&stop).unwrap();
    let out = run_all(&mut Setup::default().core(), vec![r]).remove(0);
    let o = &out.outputs[0];
    assert_eq!(o.text, text[..first]);
    let f = o.finish.clone().unwrap();
    assert_eq!(f.reason, FinishReason::Stop);
    assert_eq!(f.stop_reason, Some(StopReason::String(stop.clone())));
    // Generation stops at the token that completes the stop string.
    assert_eq!(o.token_ids.len(), first + stop.len());
}

#[test]
fn min_tokens_bans_eos_until_met() {
    let setup = Setup {
        eos: vec![EOS],
        ..Default::default()
    };
    for (prompt, min_tokens) in [("abc", 0), ("abc", 30), ("hello", 40)] {
        let mut r = request(prompt, 200);
        r.stop.min_tokens = min_tokens;
        let expect = reference(&r.prompt_token_ids, 200, &[EOS], min_tokens);
        let out = run_all(&mut setup.core(), vec![r]).remove(0);
        let o = &out.outputs[0];
        assert_eq!(o.token_ids, expect);
        assert!(o.token_ids.len() > min_tokens);
        assert_eq!(o.token_ids.last(), Some(&EOS));
        assert_eq!(o.finish.as_ref().unwrap().reason, FinishReason::Stop);
        assert_eq!(o.finish.as_ref().unwrap().stop_reason, None);
        // EOS is not part of the text.
        assert_eq!(o.text.len(), o.token_ids.len() - 1);
    }
}

#[test]
fn stop_token_ids_report_the_token() {
    let prompt = byte_tokens("abc");
    let expect = reference(&prompt, 30, &[], 0);
    let mut r = request("abc", 30);
    r.stop.stop_token_ids = vec![expect[4]];
    let stop_at = expect.iter().position(|&t| t == expect[4]).unwrap();
    let o = run_all(&mut Setup::default().core(), vec![r])
        .remove(0)
        .outputs
        .remove(0);
    assert_eq!(o.token_ids, expect[..=stop_at]);
    assert_eq!(
        o.finish.unwrap().stop_reason,
        Some(StopReason::Token(expect[4]))
    );
}

#[test]
fn max_model_len_ends_with_length() {
    let setup = Setup {
        max_model_len: 20,
        ..Default::default()
    };
    let mut r = request("0123456789", 5);
    r.stop.max_tokens = None;
    let o = run_all(&mut setup.core(), vec![r])
        .remove(0)
        .outputs
        .remove(0);
    assert_eq!(o.token_ids.len(), 10);
    assert_eq!(o.finish.unwrap().reason, FinishReason::Length);
}

#[test]
fn prompt_logprobs_survive_chunking_and_come_first() {
    let setup = Setup {
        budget: 7,
        max_seqs: 4,
        ..Default::default()
    };
    let mut core = setup.core();
    let mut r = request("abcdefghijklmnopqrstuvwxyz", 3);
    r.sampling.prompt_logprobs = Some(1);
    r.sampling.logprobs = Some(0);
    let prompt = r.prompt_token_ids.clone();
    let mut s = core.add_request(r).unwrap();
    core.run_until_idle();
    let first = s.blocking_next().unwrap();
    let info = first.prompt.unwrap();
    assert_eq!(info.num_prompt_tokens, 26);
    let lps = info.prompt_logprobs.unwrap();
    assert_eq!(lps.len(), 26);
    assert!(lps[0].is_none());
    for (i, lp) in lps.iter().enumerate().skip(1) {
        let lp = lp.as_ref().unwrap();
        assert_eq!(lp.token, prompt[i]);
        assert_eq!(lp.logprob, -((i - 1) as f32));
    }
    assert_eq!(first.seqs[0].token_ids.len(), 1);
    assert_eq!(first.seqs[0].logprobs.as_ref().unwrap().len(), 1);
}

#[test]
fn runner_error_fails_that_steps_requests_and_the_engine_goes_on() {
    let setup = Setup::default();
    let mut runner = FakeRunner::new(setup.blocks, setup.block_size);
    runner.fail_steps = vec![1];
    let mut core = setup.core_with(runner);
    let a = core.add_request(request("first", 10)).unwrap();
    core.step();
    let b = core.add_request(request("second", 10)).unwrap();
    core.step();
    let c = core.add_request(request("third", 4)).unwrap();
    core.run_until_idle();
    for s in [a, b] {
        let o = s.collect_blocking();
        assert_eq!(
            o.outputs[0].finish.as_ref().unwrap().reason,
            FinishReason::Error
        );
        assert!(o.error.unwrap().contains("injected failure"));
    }
    let o = c.collect_blocking();
    assert_eq!(
        o.outputs[0].token_ids,
        reference(&byte_tokens("third"), 4, &[], 0)
    );
    let bm = core.scheduler().block_manager();
    assert_eq!(bm.num_free_blocks(), bm.num_blocks());
}

#[test]
fn abort_and_dropped_streams_free_blocks() {
    let setup = Setup::default();
    let mut core = setup.core();
    let a = core.add_request(request("aborted by id", 50)).unwrap();
    let b = core.add_request(request("stream dropped", 50)).unwrap();
    core.step();
    core.step();
    core.abort_request(a.id);
    drop(b);
    assert!(core.scheduler().block_manager().num_free_blocks() < setup.blocks);
    core.step();
    assert!(!core.has_unfinished());
    let bm = core.scheduler().block_manager();
    assert_eq!(bm.num_free_blocks(), bm.num_blocks());
    let o = a.collect_blocking();
    assert_eq!(
        o.outputs[0].finish.as_ref().unwrap().reason,
        FinishReason::Abort
    );
    assert_eq!(o.outputs[0].token_ids.len(), 2);
}

#[test]
fn n_children_share_the_prompt_blocks() {
    let mut core = Setup::default().core();
    let mut r = request("a prompt that spans several blocks", 6);
    r.n = 3;
    r.sampling.seed = Some(5);
    let out = run_all(&mut core, vec![r]).remove(0);
    assert_eq!(out.outputs.len(), 3);
    for o in &out.outputs {
        assert_eq!(o.token_ids, out.outputs[0].token_ids);
        assert_eq!(o.finish.as_ref().unwrap().reason, FinishReason::Length);
    }
    // Two siblings each found the prompt's 8 full blocks in the cache.
    assert_eq!(core.scheduler().block_manager().counters().hits, 2 * 32);
}

#[test]
fn handle_runs_requests_on_its_thread_and_gives_the_core_back() {
    let mut core = Setup {
        blocks: 40,
        budget: 16,
        max_model_len: 160,
        ..Default::default()
    }
    .core();
    let mut stats = core.subscribe_stats();
    let engine = EngineHandle::spawn(core).unwrap();
    let reqs: Vec<EngineRequest> = prompts().iter().map(|p| request(p, 20)).collect();
    let expect: Vec<Vec<TokenId>> = reqs
        .iter()
        .map(|r| reference(&r.prompt_token_ids, 20, &[], 0))
        .collect();
    let streams: Vec<RequestStream> = reqs
        .into_iter()
        .map(|r| engine.add(engine.validate(r).unwrap()).unwrap())
        .collect();
    assert!(engine.validate(request("", 3)).is_err());
    for (s, e) in streams.into_iter().zip(&expect) {
        assert_eq!(&s.collect_blocking().outputs[0].token_ids, e);
    }
    assert!(engine.is_running());
    let core = engine.shutdown().unwrap();
    let bm = core.scheduler().block_manager();
    assert_eq!(bm.num_free_blocks(), bm.num_blocks());
    let mut all = Vec::new();
    while let Ok(s) = stats.try_recv() {
        all.push(s);
    }
    let finished: Vec<_> = all.iter().flat_map(|s| s.finished.iter()).collect();
    assert_eq!(finished.len(), 12);
    assert!(finished
        .iter()
        .all(|f| f.finish_reason == FinishReason::Length
            && f.num_generation_tokens == 20
            && f.queue_time().is_some()
            && f.decode_time().is_some()));
    let generated: usize = all.iter().map(|s| s.num_generation_tokens).sum();
    assert_eq!(generated, 12 * 20);
    let itl: usize = all.iter().map(|s| s.inter_token_latencies.len()).sum();
    assert_eq!(itl, 12 * 19);
    assert!(all.iter().map(|s| s.num_preemptions).sum::<usize>() > 0);
    assert!(all.iter().all(|s| s.num_scheduled_tokens <= 16));
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        prompt_len: usize,
        shared_prefix: bool,
        max_tokens: usize,
        min_tokens: usize,
        n: usize,
    },
    Step,
    Abort(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..40, any::<bool>(), 1usize..16, 0usize..4, 1usize..3).prop_map(
            |(prompt_len, shared_prefix, max_tokens, min_tokens, n)| Op::Add {
                prompt_len,
                shared_prefix,
                max_tokens,
                min_tokens: min_tokens.min(max_tokens),
                n,
            }
        ),
        6 => Just(Op::Step),
        1 => (0usize..64).prop_map(Op::Abort),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_traffic_keeps_every_invariant(
        ops in prop::collection::vec(op(), 1..80),
        blocks in 24usize..64,
        extra_budget in 0usize..40,
        max_seqs in 1usize..8,
        caching in any::<bool>(),
        prefill_cap in prop::option::of(0usize..24),
        split_bursts in prop::option::of(1usize..16),
    ) {
        let budget = max_seqs + extra_budget;
        let setup = Setup {
            blocks,
            block_size: 2,
            budget,
            max_seqs,
            caching,
            eos: vec![EOS],
            max_model_len: 48,
            max_prefill_tokens: prefill_cap,
            split_bursts,
        };
        let runner = FakeRunner::new(blocks, 2);
        let steps = runner.steps.clone();
        let mut core = setup.core_with(runner);
        let mut live: Vec<(RequestStream, EngineRequest)> = Vec::new();
        let mut aborted = std::collections::HashSet::new();
        let check = |core: &EngineCore| -> Result<(), TestCaseError> {
            core.scheduler().check_invariants().map_err(TestCaseError::fail)?;
            if let Some(last) = steps.lock().unwrap().last() {
                prop_assert!(last.num_tokens <= budget);
                prop_assert!(last.num_seqs <= max_seqs);
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Add { prompt_len, shared_prefix, max_tokens, min_tokens, n } => {
                    let prompt: Vec<TokenId> = (0..prompt_len)
                        .map(|i| if shared_prefix { 65 + (i % 7) as TokenId } else { 65 + ((i * 31 + live.len() * 7) % 26) as TokenId })
                        .collect();
                    let mut r = EngineRequest::new(prompt, SamplingParams::greedy(), StopParams {
                        max_tokens: Some(max_tokens),
                        min_tokens,
                        ..Default::default()
                    });
                    r.n = n;
                    // As vLLM, the answer may run to the end of the context: max_tokens
                    // is capped there.
                    let room = 48usize.saturating_sub(prompt_len);
                    r.stop.max_tokens = Some(max_tokens.min(room));
                    match core.add_request(r.clone()) {
                        Ok(s) => live.push((s, r)),
                        Err(_) => prop_assert!(room == 0 || min_tokens > room),
                    }
                }
                Op::Step => {
                    core.step();
                }
                Op::Abort(k) => {
                    if let Some((s, _)) = live.get(k % live.len().max(1)) {
                        aborted.insert(s.id);
                        core.abort_request(s.id);
                    }
                }
            }
            check(&core)?;
        }
        let mut guard = 0;
        while core.has_unfinished() {
            core.step();
            check(&core)?;
            guard += 1;
            prop_assert!(guard < 10_000, "requests never finished");
        }
        let bm = core.scheduler().block_manager();
        prop_assert_eq!(bm.num_free_blocks(), bm.num_blocks());
        for (s, r) in live {
            let out = s.collect_blocking();
            prop_assert!(out.finished);
            prop_assert_eq!(out.outputs.len(), r.n);
            if aborted.contains(&r.id) {
                continue;
            }
            let expect = reference(&r.prompt_token_ids, r.stop.max_tokens.unwrap_or(0), &[EOS], r.stop.min_tokens);
            for o in &out.outputs {
                prop_assert_eq!(&o.token_ids, &expect);
            }
        }
    }
}
