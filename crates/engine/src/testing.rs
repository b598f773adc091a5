//! Test doubles: a runner that checks the KV bookkeeping of every plan (each position a
//! sequence attends to must hold that sequence's token) and returns tokens that depend only on
//! the sequence's own tokens, and a byte-level tokenizer.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use tpuserve_runner_api::{
    validate_plan, KvCacheShape, ModelRunner, RunnerError, SampledToken, SeqOutput, SeqPlan,
    StepOutput, StepPlan, TokenId, TokenLogprobs,
};

pub use crate::detokenizer::tests::{byte_tokens, ByteDecoder};

/// Generated tokens are printable ASCII in `FIRST..FIRST + SPAN`.
pub const FIRST: TokenId = 97;
pub const SPAN: u64 = 26;
/// `z`: ends a sequence when it is configured as EOS.
pub const EOS: TokenId = 122;

#[derive(Debug, Clone, Copy, Default)]
pub struct StepRecord {
    pub num_tokens: usize,
    pub num_seqs: usize,
}

pub struct FakeRunner {
    kv: KvCacheShape,
    /// What each slot holds: (token, position).
    slots: Vec<Option<(TokenId, u32)>>,
    pub steps: Arc<Mutex<Vec<StepRecord>>>,
    /// Steps (0-based) that fail with a device error.
    pub fail_steps: Vec<usize>,
    step: usize,
}

impl FakeRunner {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        FakeRunner {
            kv: KvCacheShape {
                num_blocks,
                block_size,
                committed_on_write: false,
            },
            slots: vec![None; num_blocks * block_size],
            steps: Arc::default(),
            fail_steps: Vec::new(),
            step: 0,
        }
    }

    fn slot(&self, s: &SeqPlan, pos: usize) -> usize {
        let bs = self.kv.block_size;
        s.block_table[pos / bs] as usize * bs + pos % bs
    }
}

/// The token following `context` (a pure function of the sequence, as a greedy model is).
pub fn next_token(context: &[TokenId], banned: &[TokenId]) -> TokenId {
    let mut h = DefaultHasher::new();
    context.hash(&mut h);
    let mut t = FIRST + (h.finish() % SPAN) as TokenId;
    while banned.contains(&t) {
        t = FIRST + ((t - FIRST + 1) as u64 % SPAN) as TokenId;
    }
    t
}

impl ModelRunner for FakeRunner {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, RunnerError> {
        validate_plan(plan, self.kv)?;
        let step = self.step;
        self.step += 1;
        if let Ok(mut s) = self.steps.lock() {
            s.push(StepRecord {
                num_tokens: plan.num_tokens(),
                num_seqs: plan.seqs.len(),
            });
        }
        if self.fail_steps.contains(&step) {
            return Err(RunnerError::Device(format!(
                "injected failure at step {step}"
            )));
        }
        for (i, (&t, &slot)) in plan.token_ids.iter().zip(&plan.slot_mapping).enumerate() {
            self.slots[slot as usize] = Some((t, plan.positions[i]));
        }
        let mut out = StepOutput::default();
        for s in &plan.seqs {
            let all: Vec<TokenId> = s
                .prompt_tokens
                .iter()
                .chain(s.output_tokens.iter())
                .copied()
                .collect();
            for (pos, &tok) in all.iter().enumerate().take(s.context_len) {
                let got = self.slots[self.slot(s, pos)];
                if got != Some((tok, pos as u32)) {
                    return Err(RunnerError::InvalidPlan(format!(
                        "seq {} position {pos}: KV holds {got:?}, expected {tok}",
                        s.seq_id
                    )));
                }
            }
            let mut o = SeqOutput::default();
            for (j, &target) in s.prompt_logprob_targets.iter().enumerate() {
                let pos = s.context_len - s.query_len + j;
                o.prompt_logprobs.push(TokenLogprobs {
                    token: target,
                    logprob: -(pos as f32),
                    rank: 1,
                    top: Vec::new(),
                });
            }
            if s.sample {
                let token = next_token(&all[..s.context_len], &s.sampling.banned_tokens);
                o.sampled = Some(SampledToken {
                    token,
                    logprobs: s.sampling.logprobs.map(|_| TokenLogprobs {
                        token,
                        logprob: -1.0,
                        rank: 1,
                        top: Vec::new(),
                    }),
                });
            }
            out.seqs.push(o);
        }
        Ok(out)
    }

    fn kv_cache_shape(&self) -> KvCacheShape {
        self.kv
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn describe(&self) -> String {
        "fake".into()
    }
}
