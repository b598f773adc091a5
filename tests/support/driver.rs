//! A minimal stand-in for the engine: runs several sequences through a runner with mixed
//! prefill (in chunks) and decode steps, blocks handed out in order. Enough to check the
//! runner's numerics in batches; scheduling itself is the engine's job and tested there.

use std::sync::Arc;

use tpuserve_runner_api::{ModelRunner, SamplingParams, SeqPlan, StepPlan, TokenId, TokenLogprobs};

pub struct SeqRequest {
    pub prompt: Vec<TokenId>,
    pub max_new_tokens: usize,
    pub logprobs: usize,
    pub prompt_logprobs: Option<usize>,
    /// Steps to wait before this sequence joins (staggered arrivals).
    pub arrive_at_step: usize,
}

#[derive(Debug, Default, Clone)]
pub struct SeqResult {
    pub tokens: Vec<TokenId>,
    pub logprobs: Vec<TokenLogprobs>,
    /// Entry i = logprob of prompt token i+1.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    pub last_prompt_logits: Option<Vec<f32>>,
}

struct State {
    req: SeqRequest,
    blocks: Vec<u32>,
    computed: usize,
    res: SeqResult,
}

/// Runs all requests to completion; each prompt is fed at most `chunk` tokens per step.
pub fn run(runner: &mut dyn ModelRunner, reqs: Vec<SeqRequest>, chunk: usize) -> Vec<SeqResult> {
    let kv = runner.kv_cache_shape();
    let bs = kv.block_size;
    let mut next_block = 0u32;
    let mut states: Vec<State> = reqs
        .into_iter()
        .map(|req| {
            let need = (req.prompt.len() + req.max_new_tokens).div_ceil(bs);
            let blocks = (next_block..next_block + need as u32).collect();
            next_block += need as u32;
            State {
                req,
                blocks,
                computed: 0,
                res: SeqResult::default(),
            }
        })
        .collect();
    assert!(
        next_block as usize <= kv.num_blocks,
        "KV cache too small for the test"
    );
    let mut step = 0;
    loop {
        let mut plan = StepPlan::default();
        let mut members = Vec::new();
        for (i, s) in states.iter().enumerate() {
            if step < s.req.arrive_at_step || s.res.tokens.len() >= s.req.max_new_tokens {
                continue;
            }
            let all: Vec<TokenId> = s.req.prompt.iter().chain(&s.res.tokens).copied().collect();
            let plen = s.req.prompt.len();
            let n = if s.computed < plen {
                chunk.min(plen - s.computed)
            } else {
                1
            };
            let start = plan.token_ids.len();
            for (p, &tok) in all.iter().enumerate().skip(s.computed).take(n) {
                plan.token_ids.push(tok);
                plan.positions.push(p as u32);
                plan.slot_mapping
                    .push(s.blocks[p / bs] * bs as u32 + (p % bs) as u32);
            }
            let end = s.computed + n;
            let targets: Vec<TokenId> = if s.req.prompt_logprobs.is_some() && s.computed < plen {
                (s.computed + 1..(end + 1).min(plen))
                    .map(|j| s.req.prompt[j])
                    .collect()
            } else {
                Vec::new()
            };
            plan.seqs.push(SeqPlan {
                seq_id: i as u64,
                query_start: start,
                query_len: n,
                context_len: end,
                block_table: s.blocks.clone(),
                sample: end >= plen,
                prompt_logprob_targets: targets,
                return_logits: end == plen,
                sampling: Arc::new(SamplingParams {
                    logprobs: Some(s.req.logprobs),
                    prompt_logprobs: s.req.prompt_logprobs,
                    ..SamplingParams::greedy()
                }),
                output_tokens: Arc::new(s.res.tokens.clone()),
                prompt_tokens: Arc::new(s.req.prompt.clone()),
            });
            members.push(i);
        }
        if members.is_empty() {
            if states
                .iter()
                .all(|s| s.res.tokens.len() >= s.req.max_new_tokens)
            {
                break;
            }
            step += 1;
            continue;
        }
        let out = runner.execute(&plan).expect("runner step failed");
        for (k, &i) in members.iter().enumerate() {
            let s = &mut states[i];
            let o = &out.seqs[k];
            s.computed += plan.seqs[k].query_len;
            s.res
                .prompt_logprobs
                .extend(o.prompt_logprobs.iter().cloned());
            if let Some(l) = &o.logits {
                if s.res.last_prompt_logits.is_none() {
                    s.res.last_prompt_logits = Some(l.clone());
                }
            }
            if let Some(t) = &o.sampled {
                s.res.tokens.push(t.token);
                if let Some(lp) = &t.logprobs {
                    s.res.logprobs.push(lp.clone());
                }
            }
        }
        step += 1;
    }
    states.into_iter().map(|s| s.res).collect()
}
