//! Continuous batching in the style of vLLM V1: one token budget per step, filled first with
//! the running sequences (decode tokens, or the next chunk of a prefill) in admission order,
//! then with waiting sequences in FCFS order, as long as `max_num_seqs` allows. Prefill and
//! decode are one code path: a sequence simply asks for `num_tokens - num_computed` tokens.
//! When the KV cache runs out, the most recently admitted sequence is preempted by recompute.
//!
//! The output is the runner's flat [`StepPlan`] plus what the engine needs to update its
//! requests afterwards ([`ScheduledSeq`]).

use std::collections::{HashMap, VecDeque};

use tpuserve_runner_api::{SeqPlan, StepPlan};

use crate::block_manager::BlockManager;
use crate::request::{SeqId, SeqStatus};
use crate::sequence::{NewSeq, Sequence};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub policy: SchedulingPolicy,
    /// Prompt tokens one step takes while more than one sequence is running or waiting
    /// (decode tokens are not counted); `None` or 0: only the step's budget limits them. A burst
    /// of prompts is then answered prompt by prompt instead of all at the end of one long
    /// step: on a runner whose per-token cost does not fall with larger steps (the host
    /// runner) the first tokens come sooner for the same total work.
    pub max_prefill_tokens: Option<usize>,
    /// Without a cap: a burst of waiting prompts is answered in halves, the first half's
    /// prompts (whole, in queue order) in one step and the rest in the next ones, when each
    /// half holds at least this many tokens. All at once, every prompt of the burst gets its
    /// first token at the end of one long step; in halves, half of them get it in about half
    /// the time (the burst's mean time to first token falls by ~a quarter, its last one comes
    /// one step's fixed cost later). For runners whose cost per token does not fall with
    /// larger steps (the host runner); `None`: the budget alone limits a burst (vLLM's).
    pub split_bursts: Option<usize>,
}

/// `--scheduling-policy`: the order waiting sequences are admitted in and which running one a
/// full cache preempts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SchedulingPolicy {
    /// Arrival order; the last admitted is preempted first.
    #[default]
    Fcfs,
    /// vLLM's `priority`: by (priority, arrival), lower first; the running sequence with the
    /// highest (priority, arrival) is preempted first.
    Priority,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    pub num_tokens: usize,
    /// The step samples a token for it (its known tokens will all be computed).
    pub sample: bool,
    /// Of `num_tokens`, how many are prompt tokens (the rest recompute generated tokens or
    /// are the decode token).
    pub num_prompt_tokens: usize,
}

#[derive(Debug, Default)]
pub struct ScheduledBatch {
    pub plan: StepPlan,
    /// In plan order.
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences that lost their blocks this step (now at the front of the waiting queue).
    pub preempted: Vec<SeqId>,
    /// Sequences scheduled for the first time ever.
    pub first_scheduled: Vec<SeqId>,
}

impl ScheduledBatch {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// Cloneable so benchmarks and tests can replay a step from the same state.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// In admission order: the last one is preempted first.
    running: Vec<SeqId>,
    next_seq: u64,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            cfg,
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_seq: 0,
            num_preemptions: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Preemptions since start.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn seq(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Queues a new sequence at the back of the waiting queue (`Priority`: in its place).
    pub fn add(&mut self, new: NewSeq) -> SeqId {
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        let seq = Sequence::new(id, new, self.blocks.block_size());
        self.seqs.insert(id, seq);
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_back(id),
            SchedulingPolicy::Priority => self.insert_waiting(id),
        }
        id
    }

    /// The order of `Priority`: lower priority values first, then earlier arrivals (sequence
    /// ids are given in arrival order and kept through preemptions).
    fn rank(&self, id: SeqId) -> (i64, SeqId) {
        (self.seqs.get(&id).map_or(i64::MAX, |s| s.priority), id)
    }

    fn insert_waiting(&mut self, id: SeqId) {
        let key = self.rank(id);
        let at = self.waiting.partition_point(|&w| self.rank(w) < key);
        self.waiting.insert(at, id);
    }

    /// Puts `id` back at the head of the waiting queue (`Priority`: in its place).
    fn requeue(&mut self, id: SeqId) {
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_front(id),
            SchedulingPolicy::Priority => self.insert_waiting(id),
        }
    }

    pub fn schedule(&mut self) -> ScheduledBatch {
        let mut batch = ScheduledBatch::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        // A lone sequence keeps the whole budget: there is nobody whose first token it delays.
        // A cap of 0 is no cap (it would stall every prompt while two sequences exist).
        let mut prefill_budget = match self.cfg.max_prefill_tokens {
            Some(cap) if cap > 0 && self.running.len() + self.waiting.len() > 1 => cap,
            _ => usize::MAX,
        };
        // `Priority`: the running sequences in rank order, so that the budget goes to the
        // most urgent first and `pop` below takes the one vLLM preempts (the highest rank),
        // which this step has not scheduled yet.
        if self.cfg.policy == SchedulingPolicy::Priority {
            let mut running = std::mem::take(&mut self.running);
            running.sort_by_cached_key(|&id| self.rank(id));
            self.running = running;
        }
        if prefill_budget == usize::MAX {
            if let Some(half) = self
                .cfg
                .split_bursts
                .and_then(|min| self.burst_half(min, budget))
            {
                prefill_budget = half;
            }
        }

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let remaining = self.remaining(id);
            // More than one token left: a prompt chunk (or a recompute), not a decode.
            let prefill = remaining > 1;
            let mut n = remaining.min(budget);
            if prefill {
                n = n.min(prefill_budget);
            }
            if n == 0 {
                i += 1;
                continue;
            }
            let mut fits = true;
            while !self.grow(id, n) {
                let Some(victim) = self.running.pop() else {
                    fits = false;
                    break;
                };
                self.preempt(victim);
                batch.preempted.push(victim);
                if victim == id {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            budget -= n;
            if prefill {
                prefill_budget -= n;
            }
            self.push_plan(&mut batch, id, n);
            i += 1;
        }

        // Like vLLM, admit nothing in a step that had to preempt: the cache is under pressure.
        if batch.preempted.is_empty() {
            self.admit_waiting(&mut batch, budget.min(prefill_budget));
        }
        batch
    }

    /// The prompt tokens of the first half of the prompts this step could take — the running
    /// sequences' unfinished prompts (or recomputes), then the waiting ones that `max_num_seqs`
    /// lets in, in order — rounded up to whole prompts; `None` (no split) for a single prompt,
    /// for a half under `min_part` tokens, or when the prompts fill two budgets anyway.
    fn burst_half(&self, min_part: usize, budget: usize) -> Option<usize> {
        let admissible = self.cfg.max_num_seqs.saturating_sub(self.running.len());
        let prompts: Vec<usize> = self
            .running
            .iter()
            .map(|&id| self.remaining(id))
            .filter(|&n| n > 1)
            .chain(
                self.waiting
                    .iter()
                    .take(admissible)
                    .map(|&id| self.remaining(id)),
            )
            .scan(0usize, |sum, n| {
                // Past two budgets a split changes nothing: stop reading the queue.
                (*sum < 2 * budget).then(|| {
                    *sum += n;
                    n
                })
            })
            .collect();
        let total: usize = prompts.iter().sum();
        if prompts.len() < 2 || total >= 2 * budget {
            return None;
        }
        let mut half = 0;
        for n in prompts {
            half += n;
            if 2 * half >= total {
                break;
            }
        }
        (half >= min_part && total - half >= min_part).then_some(half)
    }

    fn admit_waiting(&mut self, batch: &mut ScheduledBatch, mut budget: usize) {
        let mut gated = Vec::new();
        while self.running.len() < self.cfg.max_num_seqs && budget > 0 {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            if self.sibling_still_prefilling(id) {
                gated.push(id);
                continue;
            }
            let (queried, hit) = self.acquire_prefix(id);
            let n = self.remaining(id).min(budget);
            if !self.grow(id, n) {
                if let Some(seq) = self.seqs.get_mut(&id) {
                    self.blocks.release(&seq.blocks);
                    seq.blocks.clear();
                    seq.num_computed = 0;
                }
                self.requeue(id);
                break;
            }
            self.blocks.record_lookup(queried, hit);
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.status = SeqStatus::Running;
                if !seq.ever_scheduled {
                    seq.ever_scheduled = true;
                    seq.num_cached_tokens = hit;
                    batch.first_scheduled.push(id);
                }
            }
            self.running.push(id);
            budget -= n;
            self.push_plan(batch, id, n);
        }
        for id in gated.into_iter().rev() {
            self.requeue(id);
        }
    }

    /// Whether `id` waits for a sibling to compute the shared prompt (clears the gate once
    /// the sibling is done or gone).
    fn sibling_still_prefilling(&mut self, id: SeqId) -> bool {
        let Some(parent) = self.seqs.get(&id).and_then(|s| s.wait_for) else {
            return false;
        };
        let busy = self.blocks.prefix_caching()
            && self
                .seqs
                .get(&parent)
                .is_some_and(|p| p.num_computed < p.prompt_len());
        if !busy {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.wait_for = None;
            }
        }
        busy
    }

    /// Takes the cached prefix of a sequence that holds no blocks. Returns (queried, hit)
    /// in tokens. At least one token is left to compute, since the step must produce logits.
    fn acquire_prefix(&mut self, id: SeqId) -> (usize, usize) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return (0, 0);
        };
        if !seq.blocks.is_empty() || seq.prompt_logprobs_pending || !self.blocks.prefix_caching() {
            return (0, 0);
        }
        let bs = self.blocks.block_size();
        let usable = ((seq.num_tokens() - 1) / bs).min(seq.hashes.len());
        seq.blocks = self.blocks.acquire_cached(&seq.hashes[..usable]);
        seq.num_computed = seq.blocks.len() * bs;
        (seq.num_tokens(), seq.num_computed)
    }

    fn remaining(&self, id: SeqId) -> usize {
        self.seqs
            .get(&id)
            .map_or(0, |s| s.num_tokens() - s.num_computed)
    }

    /// Makes `id`'s block table cover `n` more tokens; false (nothing taken) if out of blocks.
    fn grow(&mut self, id: SeqId, n: usize) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        let need = (seq.num_computed + n).div_ceil(self.blocks.block_size());
        if need <= seq.blocks.len() {
            return true;
        }
        match self.blocks.allocate(need - seq.blocks.len()) {
            Some(new) => {
                seq.blocks.extend(new);
                true
            }
            None => false,
        }
    }

    /// Frees all of `id`'s blocks and queues it first to be recomputed. Its full blocks stay
    /// in the prefix cache, so the recompute usually starts from a hit.
    fn preempt(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        self.blocks.release(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.num_registered = 0;
        seq.status = SeqStatus::Waiting;
        seq.num_preemptions += 1;
        self.num_preemptions += 1;
        self.requeue(id);
    }

    fn push_plan(&mut self, batch: &mut ScheduledBatch, id: SeqId, n: usize) {
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        let bs = self.blocks.block_size();
        let plan = &mut batch.plan;
        let (start, end) = (seq.num_computed, seq.num_computed + n);
        let query_start = plan.token_ids.len();
        for p in start..end {
            plan.token_ids.push(seq.token_at(p));
            plan.positions.push(p as u32);
            plan.slot_mapping
                .push(seq.blocks[p / bs].0 * bs as u32 + (p % bs) as u32);
        }
        let prompt_logprob_targets = if seq.prompt_logprobs_pending {
            (start..end.min(seq.prompt_len().saturating_sub(1)))
                .map(|p| seq.prompt[p + 1])
                .collect()
        } else {
            Vec::new()
        };
        let sample = end == seq.num_tokens();
        plan.seqs.push(SeqPlan {
            seq_id: id.0,
            query_start,
            query_len: n,
            context_len: end,
            block_table: seq.blocks.iter().map(|b| b.0).collect(),
            sample,
            prompt_logprob_targets,
            return_logits: false,
            sampling: seq.step_sampling(),
            output_tokens: seq.output.clone(),
            prompt_tokens: seq.prompt.clone(),
        });
        batch.scheduled.push(ScheduledSeq {
            seq_id: id,
            num_tokens: n,
            sample,
            num_prompt_tokens: seq.prompt_len().saturating_sub(start).min(n),
        });
    }

    /// Records that a step computed `s.num_tokens` more tokens of `s.seq_id`, and offers the
    /// blocks that became full to the prefix cache (only now is their KV really there).
    pub fn complete(&mut self, s: &ScheduledSeq) {
        let Some(seq) = self.seqs.get_mut(&s.seq_id) else {
            return;
        };
        seq.num_computed += s.num_tokens;
        if seq.num_computed >= seq.prompt_len() {
            seq.prompt_logprobs_pending = false;
        }
        let bs = self.blocks.block_size();
        while seq.num_registered < seq.hashes.len()
            && (seq.num_registered + 1) * bs <= seq.num_computed
        {
            let k = seq.num_registered;
            self.blocks.register(seq.blocks[k], seq.hashes[k]);
            seq.num_registered += 1;
        }
    }

    /// Appends a sampled token to `id`'s output (its KV is computed in the next step).
    pub fn append_token(&mut self, id: SeqId, token: tpuserve_runner_api::TokenId) {
        let bs = self.blocks.block_size();
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.push_output(token, bs);
        }
    }

    /// Removes a finished or aborted sequence and frees its blocks; returns it.
    pub fn finish(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = self.seqs.remove(&id)?;
        match seq.status {
            SeqStatus::Running => self.running.retain(|&r| r != id),
            SeqStatus::Waiting => self.waiting.retain(|&w| w != id),
        }
        self.blocks.release(&seq.blocks);
        Some(seq)
    }

    /// Every structural invariant (for tests): block accounting and ownership, queue
    /// membership, `max_num_seqs`.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.blocks.check_invariants()?;
        let mut holders = vec![0u32; self.blocks.num_blocks()];
        for seq in self.seqs.values() {
            let mut seen = std::collections::HashSet::new();
            for b in &seq.blocks {
                if !seen.insert(*b) {
                    return Err(format!("{:?} holds block {} twice", seq.id, b.0));
                }
                holders[b.0 as usize] += 1;
            }
            if seq.blocks.len() * self.blocks.block_size() < seq.num_computed {
                return Err(format!("{:?}: computed tokens outside its blocks", seq.id));
            }
            let in_running = self.running.contains(&seq.id);
            let in_waiting = self.waiting.contains(&seq.id);
            let ok = match seq.status {
                SeqStatus::Running => in_running && !in_waiting,
                SeqStatus::Waiting => in_waiting && !in_running && seq.blocks.is_empty(),
            };
            if !ok {
                return Err(format!(
                    "{:?} is {:?} but queued wrongly",
                    seq.id, seq.status
                ));
            }
        }
        for (b, &h) in holders.iter().enumerate() {
            let rc = self.blocks.ref_count(crate::request::BlockId(b as u32));
            if rc != h {
                return Err(format!("block {b}: ref count {rc}, held by {h} sequences"));
            }
        }
        if self.running.len() + self.waiting.len() != self.seqs.len() {
            return Err("a queue holds an unknown sequence".into());
        }
        if self.running.len() > self.cfg.max_num_seqs {
            return Err(format!("{} running > max_num_seqs", self.running.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tpuserve_runner_api::SamplingParams;

    use super::*;
    use crate::request::RequestId;

    fn sched(blocks: usize, budget: usize, max_seqs: usize, caching: bool) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                policy: SchedulingPolicy::Fcfs,
                max_num_batched_tokens: budget,
                max_num_seqs: max_seqs,
                max_prefill_tokens: None,
                split_bursts: None,
            },
            BlockManager::new(blocks, 4, caching),
        )
    }

    fn seq(prompt: Vec<u32>, wait_for: Option<SeqId>) -> NewSeq {
        NewSeq {
            request_id: RequestId(0),
            index: 0,
            prompt: Arc::new(prompt),
            sampling: Arc::new(SamplingParams::greedy()),
            banned_until_min_tokens: Vec::new(),
            min_tokens: 0,
            prompt_logprobs: false,
            wait_for,
            hash_root: None,
            priority: 0,
        }
    }

    /// Completes a batch as a runner would, sampling token 7 where asked.
    fn run(s: &mut Scheduler) -> Vec<(SeqId, usize)> {
        let b = s.schedule();
        for x in &b.scheduled {
            s.complete(x);
            if x.sample {
                s.append_token(x.seq_id, 7);
            }
        }
        s.check_invariants().unwrap();
        b.scheduled
            .iter()
            .map(|x| (x.seq_id, x.num_tokens))
            .collect()
    }

    #[test]
    fn long_prompt_is_chunked_and_decode_goes_first() {
        let mut s = sched(100, 32, 8, false);
        let a = s.add(seq(vec![1; 70], None));
        assert_eq!(run(&mut s), [(a, 32)]);
        assert_eq!(run(&mut s), [(a, 32)]);
        let b = s.add(seq(vec![2; 50], None));
        // a's last 6 prompt tokens, then b gets the rest of the budget.
        assert_eq!(run(&mut s), [(a, 6), (b, 26)]);
        assert_eq!(run(&mut s), [(a, 1), (b, 24)]);
        assert_eq!(run(&mut s), [(a, 1), (b, 1)]);
    }

    #[test]
    fn the_prefill_cap_answers_a_burst_prompt_by_prompt_and_spares_decodes() {
        let mut s = sched(100, 64, 8, false);
        s.cfg.max_prefill_tokens = Some(10);
        // Alone, a prompt takes the whole budget: nobody waits on it.
        let a = s.add(seq(vec![1; 30], None));
        assert_eq!(run(&mut s), [(a, 30)]);
        // A burst of three: 10 prompt tokens a step, in arrival order, beside a's decode.
        let b = s.add(seq(vec![2; 6], None));
        let c = s.add(seq(vec![3; 6], None));
        let d = s.add(seq(vec![4; 6], None));
        assert_eq!(run(&mut s), [(a, 1), (b, 6), (c, 4)]);
        assert_eq!(run(&mut s), [(a, 1), (b, 1), (c, 2), (d, 6)]);
        assert_eq!(run(&mut s), [(a, 1), (b, 1), (c, 1), (d, 1)]);
    }

    #[test]
    fn without_a_prefill_cap_the_budget_alone_limits_a_burst() {
        for cap in [None, Some(0)] {
            let mut s = sched(100, 64, 8, false);
            s.cfg.max_prefill_tokens = cap;
            let a = s.add(seq(vec![1; 30], None));
            let b = s.add(seq(vec![2; 30], None));
            assert_eq!(run(&mut s), [(a, 30), (b, 30)], "{cap:?}");
        }
    }

    #[test]
    fn a_burst_is_answered_in_halves_of_whole_prompts() {
        let mut s = sched(100, 128, 16, false);
        s.cfg.split_bursts = Some(16);
        // Alone, a prompt is never split.
        let a = s.add(seq(vec![1; 40], None));
        assert_eq!(run(&mut s), [(a, 40)]);
        // Seven prompts of 8 tokens beside a's decode: the first four (32 of 56 tokens) in
        // one step; the last three (halves of 16 and 8 tokens) together in the next.
        let burst: Vec<SeqId> = (0..7).map(|i| s.add(seq(vec![i + 2; 8], None))).collect();
        let first: Vec<(SeqId, usize)> = [(a, 1)]
            .into_iter()
            .chain(burst[..4].iter().map(|&id| (id, 8)))
            .collect();
        assert_eq!(run(&mut s), first);
        let second: Vec<(SeqId, usize)> = [(a, 1)]
            .into_iter()
            .chain(burst[..4].iter().map(|&id| (id, 1)))
            .chain(burst[4..].iter().map(|&id| (id, 8)))
            .collect();
        assert_eq!(run(&mut s), second);
    }

    #[test]
    fn a_burst_half_rounds_up_to_whole_prompts_in_queue_order() {
        let mut s = sched(100, 128, 16, false);
        s.cfg.split_bursts = Some(8);
        // 30 of 50 tokens is the first half: the long prompt alone, then the four short ones.
        let long = s.add(seq(vec![1; 30], None));
        let short: Vec<SeqId> = (0..4).map(|i| s.add(seq(vec![i + 2; 5], None))).collect();
        assert_eq!(run(&mut s), [(long, 30)]);
        // 20 tokens left: halves of 10 and 10.
        assert_eq!(run(&mut s), [(long, 1), (short[0], 5), (short[1], 5)]);
    }

    #[test]
    fn no_split_for_small_halves_or_a_burst_of_two_budgets() {
        // Halves under the minimum: the budget alone limits the step.
        let mut s = sched(100, 128, 16, false);
        s.cfg.split_bursts = Some(16);
        let ids: Vec<SeqId> = (0..3).map(|i| s.add(seq(vec![i + 1; 10], None))).collect();
        assert_eq!(
            run(&mut s),
            ids.iter().map(|&id| (id, 10)).collect::<Vec<_>>()
        );
        // 2 × 20 tokens, at least two budgets of 20: split or not, the budget takes one at a
        // time, so vLLM's order stands (the first prompt, then the second).
        let mut s = sched(100, 20, 16, false);
        s.cfg.split_bursts = Some(1);
        let a = s.add(seq(vec![1; 20], None));
        let b = s.add(seq(vec![2; 20], None));
        assert_eq!(run(&mut s), [(a, 20)]);
        assert_eq!(run(&mut s), [(a, 1), (b, 19)]);
        // A cap wins over the split.
        let mut s = sched(100, 128, 16, false);
        s.cfg.split_bursts = Some(1);
        s.cfg.max_prefill_tokens = Some(6);
        let c = s.add(seq(vec![1; 4], None));
        let d = s.add(seq(vec![2; 4], None));
        assert_eq!(run(&mut s), [(c, 4), (d, 2)]);
    }

    #[test]
    fn max_num_seqs_limits_admission() {
        let mut s = sched(100, 64, 2, false);
        let ids: Vec<SeqId> = (0..3).map(|_| s.add(seq(vec![1; 3], None))).collect();
        assert_eq!(run(&mut s), [(ids[0], 3), (ids[1], 3)]);
        s.finish(ids[0]);
        assert_eq!(run(&mut s), [(ids[1], 1), (ids[2], 3)]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_requeues_it_first() {
        // 4 blocks of 4 tokens: two sequences of 8 tokens fill the cache.
        let mut s = sched(4, 64, 8, false);
        let a = s.add(seq(vec![1; 8], None));
        let b = s.add(seq(vec![2; 8], None));
        assert_eq!(run(&mut s), [(a, 8), (b, 8)]);
        // a's 9th token needs a fifth block: b is preempted, a continues.
        assert_eq!(run(&mut s), [(a, 1)]);
        assert_eq!(s.num_preemptions(), 1);
        assert_eq!(s.seq(b).unwrap().status, SeqStatus::Waiting);
        assert_eq!(s.seq(b).unwrap().num_computed(), 0);
        s.finish(a);
        // b is recomputed: prompt and its generated token.
        assert_eq!(run(&mut s), [(b, 9)]);
        s.finish(b);
        assert_eq!(s.block_manager().num_free_blocks(), 4);
    }

    fn prioritised(prompt: Vec<u32>, priority: i64) -> NewSeq {
        NewSeq {
            priority,
            ..seq(prompt, None)
        }
    }

    #[test]
    fn the_priority_policy_admits_by_rank_and_preempts_the_lowest() {
        let mut s = sched(100, 64, 2, false);
        s.cfg.policy = SchedulingPolicy::Priority;
        let a = s.add(prioritised(vec![1; 3], 5));
        let b = s.add(prioritised(vec![1; 3], -1));
        let c = s.add(prioritised(vec![1; 3], 5));
        let d = s.add(prioritised(vec![1; 3], 0));
        // Two at a time: the lowest values first, arrival among equals.
        assert_eq!(run(&mut s), [(b, 3), (d, 3)]);
        s.finish(b);
        s.finish(d);
        assert_eq!(run(&mut s), [(a, 3), (c, 3)]);

        // 5 blocks of 4: `low` (8 tokens and one generated) and `high` fill the cache; when
        // `high` needs a block the victim is `low` (FCFS would pop the newest: `high`).
        let mut s = sched(5, 64, 8, false);
        s.cfg.policy = SchedulingPolicy::Priority;
        let low = s.add(prioritised(vec![1; 8], 3));
        assert_eq!(run(&mut s), [(low, 8)]);
        let high = s.add(prioritised(vec![2; 8], 1));
        // `high` is admitted beside `low`; a step later `high` needs a block and `low` (the
        // higher rank) is preempted, `high` continues.
        assert_eq!(run(&mut s), [(low, 1), (high, 8)]);
        assert_eq!(run(&mut s), [(high, 1)]);
        assert_eq!(s.seq(low).unwrap().status, SeqStatus::Waiting);
        assert_eq!(s.seq(high).unwrap().num_preemptions, 0);
        // A waiting urgent sequence goes before the preempted one.
        let urgent = s.add(prioritised(vec![3; 2], 0));
        s.finish(high);
        assert_eq!(run(&mut s)[0], (urgent, 2));
    }

    #[test]
    fn a_lone_sequence_that_cannot_grow_preempts_itself() {
        let mut s = sched(2, 64, 8, false);
        let a = s.add(seq(vec![1; 8], None));
        assert_eq!(run(&mut s), [(a, 8)]);
        assert!(run(&mut s).is_empty());
        assert_eq!(s.seq(a).unwrap().status, SeqStatus::Waiting);
    }

    #[test]
    fn shared_prefix_hits_the_cache_but_leaves_one_token_to_compute() {
        let mut s = sched(20, 64, 8, true);
        let a = s.add(seq((0..10).collect(), None));
        run(&mut s);
        let b = s.add(seq((0..10).chain(50..53).collect(), None));
        // Two full blocks (8 tokens) of a's prompt are cached.
        assert_eq!(run(&mut s), [(a, 1), (b, 5)]);
        assert_eq!(s.seq(b).unwrap().num_cached_tokens(), 8);
        assert_eq!(s.block_manager().counters().hits, 8);
        assert_eq!(
            s.seq(a).unwrap().blocks()[..2],
            s.seq(b).unwrap().blocks()[..2]
        );
        // An identical 8-token prompt can use only the first block.
        let c = s.add(seq((0..8).collect(), None));
        assert_eq!(run(&mut s), [(a, 1), (b, 1), (c, 4)]);
    }

    #[test]
    fn siblings_wait_for_the_shared_prompt() {
        let mut s = sched(20, 8, 8, true);
        let a = s.add(seq((0..12).collect(), None));
        let b = s.add(seq((0..12).collect(), Some(a)));
        assert_eq!(run(&mut s), [(a, 8)]);
        assert_eq!(run(&mut s), [(a, 4)]);
        assert_eq!(run(&mut s), [(a, 1), (b, 4)]);
        assert_eq!(s.seq(b).unwrap().num_cached_tokens(), 8);
    }
}
