//! One child sequence as the scheduler sees it: its tokens, how many of them have KV in the
//! cache, the blocks holding that KV and the prefix-cache hashes of its full blocks.

use std::sync::Arc;

use tpuserve_runner_api::{SamplingParams, TokenId};

use crate::block_manager::BlockHash;
use crate::request::{BlockId, RequestId, SeqId, SeqStatus};

/// What the engine hands the scheduler for each child of a new request.
#[derive(Debug, Clone)]
pub struct NewSeq {
    pub request_id: RequestId,
    pub index: usize,
    pub prompt: Arc<Vec<TokenId>>,
    pub sampling: Arc<SamplingParams>,
    /// Token ids banned while fewer than `min_tokens` tokens were generated (EOS, stop ids).
    pub banned_until_min_tokens: Vec<TokenId>,
    pub min_tokens: usize,
    /// Compute prompt logprobs (then the prompt never comes from the prefix cache, since
    /// every position needs its logits).
    pub prompt_logprobs: bool,
    /// Admit only once this sibling has computed the prompt, so the prompt's full blocks are
    /// shared through the prefix cache instead of computed `n` times.
    pub wait_for: Option<SeqId>,
    /// `cache_salt`'s chain root (see `BlockHash::root`).
    pub hash_root: Option<BlockHash>,
    /// vLLM's `priority` (lower first; used by `SchedulingPolicy::Priority`).
    pub priority: i64,
}

#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: SeqId,
    pub request_id: RequestId,
    pub index: usize,
    pub status: SeqStatus,
    pub(crate) prompt: Arc<Vec<TokenId>>,
    /// Shared with step plans (the runner reads it for penalties and seeded draws); appended
    /// to with `Arc::make_mut`, which copies only if a plan is still alive.
    pub(crate) output: Arc<Vec<TokenId>>,
    /// Tokens whose key/value are in the KV cache.
    pub(crate) num_computed: usize,
    /// Prompt tokens found in the prefix cache at first admission.
    pub(crate) num_cached_tokens: usize,
    pub(crate) blocks: Vec<BlockId>,
    /// Chained hashes of every full block of prompt + output.
    pub(crate) hashes: Vec<BlockHash>,
    /// What the first block's hash hangs from (`cache_salt`).
    hash_root: Option<BlockHash>,
    pub(crate) priority: i64,
    /// Leading blocks already offered to the prefix cache.
    pub(crate) num_registered: usize,
    sampling: Arc<SamplingParams>,
    sampling_min_tokens: Option<Arc<SamplingParams>>,
    min_tokens: usize,
    /// Prompt logprobs wanted and the prompt not yet complete (they are re-requested from the
    /// start if a preemption interrupts the prompt).
    pub(crate) prompt_logprobs_pending: bool,
    pub(crate) wait_for: Option<SeqId>,
    pub(crate) ever_scheduled: bool,
    pub num_preemptions: usize,
}

impl Sequence {
    pub(crate) fn new(id: SeqId, new: NewSeq, block_size: usize) -> Self {
        let sampling_min_tokens = (new.min_tokens > 0 && !new.banned_until_min_tokens.is_empty())
            .then(|| {
                let mut p = (*new.sampling).clone();
                p.banned_tokens.extend(&new.banned_until_min_tokens);
                Arc::new(p)
            });
        let mut seq = Sequence {
            id,
            request_id: new.request_id,
            index: new.index,
            status: SeqStatus::Waiting,
            prompt: new.prompt,
            output: Arc::new(Vec::new()),
            num_computed: 0,
            num_cached_tokens: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            hash_root: new.hash_root,
            priority: new.priority,
            num_registered: 0,
            sampling: new.sampling,
            sampling_min_tokens,
            min_tokens: new.min_tokens,
            prompt_logprobs_pending: new.prompt_logprobs,
            wait_for: new.wait_for,
            ever_scheduled: false,
            num_preemptions: 0,
        };
        seq.extend_hashes(block_size);
        seq
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    pub fn num_tokens(&self) -> usize {
        self.prompt.len() + self.output.len()
    }

    pub fn output(&self) -> &[TokenId] {
        &self.output
    }

    pub fn num_computed(&self) -> usize {
        self.num_computed
    }

    pub fn num_cached_tokens(&self) -> usize {
        self.num_cached_tokens
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub(crate) fn token_at(&self, pos: usize) -> TokenId {
        match pos.checked_sub(self.prompt.len()) {
            None => self.prompt[pos],
            Some(i) => self.output[i],
        }
    }

    /// The sampling settings for the next draw: EOS banned until `min_tokens` are out.
    pub(crate) fn step_sampling(&self) -> Arc<SamplingParams> {
        match &self.sampling_min_tokens {
            Some(p) if self.output.len() < self.min_tokens => p.clone(),
            _ => self.sampling.clone(),
        }
    }

    pub(crate) fn push_output(&mut self, token: TokenId, block_size: usize) {
        Arc::make_mut(&mut self.output).push(token);
        self.extend_hashes(block_size);
    }

    fn extend_hashes(&mut self, block_size: usize) {
        while (self.hashes.len() + 1) * block_size <= self.num_tokens() {
            let start = self.hashes.len() * block_size;
            let tokens: Vec<TokenId> = (start..start + block_size)
                .map(|p| self.token_at(p))
                .collect();
            let parent = self.hashes.last().copied().or(self.hash_root);
            self.hashes.push(BlockHash::of(parent, &tokens));
        }
    }
}
