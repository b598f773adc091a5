//! The synchronous engine core: `step()` = schedule → `runner.execute` → update requests,
//! blocks and stats, then one output event per request that made progress. It owns all
//! mutable engine state; [`crate::handle::EngineHandle`] runs it on its own thread.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tpuserve_runner_api::{sizing, ModelRunner, StepMasks, StepOutput, TokenId};

use crate::block_manager::{BlockManager, PrefixCacheCounters};
use crate::detokenizer::{DetokenizeOptions, IncrementalDetokenizer, TokenDecoder};
use crate::error::{EngineError, RequestError};
use crate::output::{PromptInfo, RequestOutput, RequestStream, SeqDelta};
use crate::request::{EngineRequest, Finish, FinishReason, RequestId, SeqId};
use crate::request_state::{Child, RequestState, StepAcc};
use crate::scheduler::{ScheduledBatch, Scheduler, SchedulerConfig};
use crate::sequence::NewSeq;
use crate::stats::StepStats;
use crate::stop::StopChecker;
use crate::validation::{RequestLimits, ValidatedRequest};

/// Engine settings (vLLM flag names in comments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// `--max-model-len`: prompt + output tokens of one sequence.
    pub max_model_len: usize,
    /// `--max-num-batched-tokens`: token budget of one step.
    pub max_num_batched_tokens: usize,
    /// `--max-num-seqs`: running sequences at most.
    pub max_num_seqs: usize,
    /// `--enable-prefix-caching` / `--no-enable-prefix-caching`.
    pub enable_prefix_caching: bool,
    /// `--max-logprobs`.
    pub max_logprobs: usize,
    /// `--scheduling-policy`.
    pub scheduling_policy: crate::scheduler::SchedulingPolicy,
    /// `--max-num-prefill-tokens` (tpuserve's): prompt tokens per step while others wait or
    /// run, 0 or `None`: no cap (see `SchedulerConfig::max_prefill_tokens`).
    pub max_prefill_tokens: Option<usize>,
    /// Without a cap, answer a burst of prompts in halves of at least this many tokens each
    /// (see `SchedulerConfig::split_bursts`); `None`: vLLM's scheduling.
    pub split_bursts: Option<usize>,
    /// `--seed`: requests without a seed get one drawn from this, in arrival order, so the
    /// same command and the same requests give the same samples (vLLM seeds its global RNG
    /// with it). `None`: unseeded requests draw fresh randomness.
    pub seed: Option<u64>,
}

impl EngineConfig {
    /// vLLM V1's defaults (the host runner's token budget) for everything but the model
    /// length.
    pub fn new(max_model_len: usize) -> Self {
        EngineConfig {
            max_model_len,
            max_num_batched_tokens: sizing::max_num_batched_tokens(
                None,
                false,
                sizing::DEFAULT_MAX_NUM_SEQS,
            ),
            max_num_seqs: sizing::DEFAULT_MAX_NUM_SEQS,
            enable_prefix_caching: true,
            max_logprobs: sizing::DEFAULT_MAX_LOGPROBS,
            scheduling_policy: Default::default(),
            max_prefill_tokens: None,
            split_bursts: None,
            seed: None,
        }
    }
}

pub struct EngineCore {
    runner: Box<dyn ModelRunner>,
    decoder: Arc<dyn TokenDecoder>,
    eos: Arc<[TokenId]>,
    cfg: EngineConfig,
    limits: RequestLimits,
    scheduler: Scheduler,
    requests: HashMap<RequestId, RequestState>,
    owners: HashMap<SeqId, (RequestId, usize)>,
    stats_subscribers: Vec<UnboundedSender<StepStats>>,
    /// Sequence number of the last [`StepStats`] sent to the subscribers; observers compare
    /// it with what they have applied (a `/metrics` scrape waits until it caught up).
    stats_published: Arc<AtomicU64>,
    /// Outputs of the current step (or abort), released only after its stats are published:
    /// a client that got its last token can already see it counted in the metrics.
    outbox: Vec<(UnboundedSender<RequestOutput>, RequestOutput)>,
    acc: StepAcc,
    last_counters: PrefixCacheCounters,
    last_preemptions: u64,
    /// Unseeded requests given a seed from `cfg.seed` so far.
    unseeded: u64,
}

impl EngineCore {
    /// `eos_token_ids`: every id that ends generation (`LoadedModel::eos_token_ids`).
    pub fn new(
        runner: Box<dyn ModelRunner>,
        decoder: Arc<dyn TokenDecoder>,
        eos_token_ids: Vec<TokenId>,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
        let kv = runner.kv_cache_shape();
        let capacity = kv.num_blocks * kv.block_size;
        if kv.block_size == 0 || kv.num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "the runner has an empty KV cache ({} blocks of {})",
                kv.num_blocks, kv.block_size
            )));
        }
        if cfg.max_model_len < 2 || cfg.max_num_batched_tokens == 0 || cfg.max_num_seqs == 0 {
            return Err(EngineError::Config(
                "max_model_len must be at least 2, max_num_batched_tokens and max_num_seqs \
                 at least 1"
                    .into(),
            ));
        }
        if cfg.max_num_batched_tokens < cfg.max_num_seqs {
            // As in vLLM: otherwise decoding sequences at the back of the running queue could
            // wait for budget step after step.
            return Err(EngineError::Config(format!(
                "max_num_batched_tokens ({}) must be greater than or equal to max_num_seqs ({})",
                cfg.max_num_batched_tokens, cfg.max_num_seqs
            )));
        }
        if cfg.max_model_len > capacity {
            return Err(EngineError::Config(format!(
                "the model's max seq len ({}) is larger than the maximum number of tokens that \
                 can be stored in the KV cache ({capacity}); decrease max_model_len or give \
                 the cache more memory",
                cfg.max_model_len
            )));
        }
        let limits = RequestLimits {
            max_model_len: cfg.max_model_len,
            vocab_size: runner.vocab_size(),
            max_logprobs: cfg.max_logprobs,
            sampling: runner.sampling_support(),
        };
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_num_seqs: cfg.max_num_seqs,
                policy: cfg.scheduling_policy,
                max_prefill_tokens: cfg.max_prefill_tokens,
                split_bursts: cfg.split_bursts,
            },
            BlockManager::new(kv.num_blocks, kv.block_size, cfg.enable_prefix_caching)
                .committed_on_write(kv.committed_on_write),
        );
        Ok(EngineCore {
            runner,
            decoder,
            eos: eos_token_ids.into(),
            cfg,
            limits,
            scheduler,
            requests: HashMap::new(),
            owners: HashMap::new(),
            stats_subscribers: Vec::new(),
            stats_published: Arc::new(AtomicU64::new(0)),
            outbox: Vec::new(),
            acc: StepAcc::default(),
            last_counters: PrefixCacheCounters::default(),
            last_preemptions: 0,
            unseeded: 0,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn runner(&self) -> &dyn ModelRunner {
        self.runner.as_ref()
    }

    /// Takes the runner back (e.g. to build another engine over the same loaded weights;
    /// a new block manager never reads what the old one left in the cache).
    pub fn into_runner(self) -> Box<dyn ModelRunner> {
        self.runner
    }

    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }

    pub fn num_unfinished(&self) -> usize {
        self.requests.len()
    }

    /// A new receiver of every following step's [`StepStats`].
    pub fn subscribe_stats(&mut self) -> UnboundedReceiver<StepStats> {
        let (tx, rx) = unbounded_channel();
        self.stats_subscribers.push(tx);
        rx
    }

    /// The sequence number ([`StepStats::seq`]) of the last stats sent to the subscribers.
    /// Outputs of a step are released only after it is set.
    pub fn stats_published(&self) -> Arc<AtomicU64> {
        self.stats_published.clone()
    }

    /// Passes `req` through the gate and queues it; its events arrive on the returned stream.
    pub fn add_request(&mut self, req: EngineRequest) -> Result<RequestStream, EngineError> {
        let req = self.limits.validate(req)?;
        self.add(req)
    }

    /// Queues a request that passed the gate; its events arrive on the returned stream.
    pub fn add(&mut self, req: ValidatedRequest) -> Result<RequestStream, EngineError> {
        if self.requests.contains_key(&req.id()) {
            return Err(RequestError::DuplicateId(req.id()).into());
        }
        let (tx, rx) = unbounded_channel();
        let id = req.id();
        self.insert(req, tx);
        Ok(RequestStream { id, receiver: rx })
    }

    /// Queues a validated request (the handle validates on the caller's thread).
    pub(crate) fn insert(&mut self, req: ValidatedRequest, tx: UnboundedSender<RequestOutput>) {
        let mut req = req.into_inner();
        if self.requests.contains_key(&req.id) {
            let _ = tx.send(RequestOutput {
                request_id: req.id,
                finished: true,
                error: Some(RequestError::DuplicateId(req.id).to_string()),
                ..Default::default()
            });
            return;
        }
        if let (None, Some(base)) = (req.sampling.seed, self.cfg.seed) {
            req.sampling.seed = Some(default_seed(base, self.unseeded));
            self.unseeded += 1;
        }
        let stop = Arc::new(req.stop.clone());
        let mut banned: Vec<TokenId> = stop.stop_token_ids.clone();
        if !stop.ignore_eos {
            banned.extend(self.eos.iter().copied());
        }
        let opts = DetokenizeOptions {
            skip_special_tokens: stop.skip_special_tokens,
            spaces_between_special_tokens: stop.spaces_between_special_tokens,
        };
        let prompt = Arc::new(req.prompt_token_ids.clone());
        let hash_root = crate::block_manager::BlockHash::root(req.cache_salt.as_deref());
        let mut children = Vec::with_capacity(req.n);
        let mut first: Option<SeqId> = None;
        for index in 0..req.n {
            let sampling = Arc::new(req.child_sampling(index));
            let seq_id = self.scheduler.add(NewSeq {
                request_id: req.id,
                index,
                prompt: prompt.clone(),
                prompt_logprobs: index == 0 && sampling.prompt_logprobs.is_some(),
                sampling,
                banned_until_min_tokens: banned.clone(),
                min_tokens: stop.min_tokens,
                wait_for: first,
                hash_root,
                priority: req.priority,
            });
            first.get_or_insert(seq_id);
            self.owners.insert(seq_id, (req.id, index));
            children.push(Child {
                seq_id,
                detok: IncrementalDetokenizer::new(&prompt, opts),
                stop: StopChecker::new(
                    stop.clone(),
                    self.eos.clone(),
                    prompt.len(),
                    self.cfg.max_model_len,
                ),
                finish: None,
                num_generated: 0,
                first_scheduled: None,
                first_token: None,
                last_token: None,
                delta: SeqDelta {
                    index,
                    ..Default::default()
                },
                dirty: false,
                matcher: req.constraint.as_ref().map(|c| c.matcher()),
            });
        }
        self.requests.insert(
            req.id,
            RequestState {
                tx,
                n: req.n,
                prompt_len: prompt.len(),
                max_tokens: req.stop.max_tokens,
                arrival: req.arrival,
                prompt_logprobs: req.sampling.prompt_logprobs.map(|_| vec![None]),
                num_cached_tokens: 0,
                prompt_sent: false,
                children,
            },
        );
    }

    /// Ends a request now (its blocks are free before the next step); no-op if unknown.
    /// Its stats are published before its final event is released.
    pub fn abort_request(&mut self, id: RequestId) {
        self.end_request(id, FinishReason::Abort, None);
        self.publish_stats(0, Duration::ZERO);
        self.flush();
    }

    /// Aborts every request (shutdown).
    pub fn abort_all(&mut self) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.end_request(id, FinishReason::Abort, None);
        }
        self.publish_stats(0, Duration::ZERO);
        self.flush();
    }

    /// Releases the outputs queued since the last flush, in order.
    fn flush(&mut self) {
        for (tx, out) in self.outbox.drain(..) {
            let _ = tx.send(out);
        }
    }

    /// Finishes every unfinished child of `id` with `reason` and sends the final event.
    fn end_request(&mut self, id: RequestId, reason: FinishReason, error: Option<String>) {
        let Some(mut req) = self.requests.remove(&id) else {
            return;
        };
        let now = Instant::now();
        for index in 0..req.children.len() {
            let child = &mut req.children[index];
            if child.finish.is_some() {
                continue;
            }
            self.scheduler.finish(child.seq_id);
            self.owners.remove(&child.seq_id);
            child.delta.text.push_str(&child.stop.take_text(true));
            child.set_finish(Finish::new(reason));
            self.acc.finished.push(req.finished_stats(id, index, now));
        }
        self.send(id, &mut req, error);
    }

    /// Queues the pending deltas of `req` as one event (released by [`Self::flush`]).
    /// Returns false if the receiver is gone.
    fn send(&mut self, id: RequestId, req: &mut RequestState, error: Option<String>) -> bool {
        let seqs: Vec<SeqDelta> = req
            .children
            .iter_mut()
            .filter_map(|c| std::mem::take(&mut c.dirty).then_some(c))
            .map(|c| {
                let index = c.delta.index;
                std::mem::replace(
                    &mut c.delta,
                    SeqDelta {
                        index,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let finished = req.children.iter().all(|c| c.finish.is_some());
        if seqs.is_empty() && !finished {
            return true;
        }
        let prompt = (!req.prompt_sent).then(|| {
            req.prompt_sent = true;
            if seqs.iter().any(|s| !s.token_ids.is_empty()) {
                self.acc.num_prompt_tokens += req.prompt_len;
            }
            PromptInfo {
                num_prompt_tokens: req.prompt_len,
                num_cached_tokens: req.num_cached_tokens,
                prompt_logprobs: req.prompt_logprobs.take(),
            }
        });
        self.outbox.push((
            req.tx.clone(),
            RequestOutput {
                request_id: id,
                prompt,
                seqs,
                finished,
                error,
            },
        ));
        !req.tx.is_closed()
    }

    /// Runs one step. Returns false when there was nothing to run.
    pub fn step(&mut self) -> bool {
        // A dropped output stream means the client is gone.
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.end_request(id, FinishReason::Abort, None);
        }

        let mut batch = self.scheduler.schedule();
        if batch.is_empty() {
            self.publish_stats(0, Duration::ZERO);
            self.flush();
            return false;
        }
        self.note_scheduling(&batch);
        // The plan shares each sequence's output vector; dropping it before the update lets
        // appends happen in place instead of copying.
        let mut plan = std::mem::take(&mut batch.plan);
        let num_tokens = plan.num_tokens();
        let t0 = Instant::now();
        let constrained = self.constrained_rows(&batch);
        let mut mask_errors = Vec::new();
        let result = if constrained.is_empty() {
            catch_unwind(AssertUnwindSafe(|| self.runner.execute(&plan)))
        } else {
            // The grammar masks are computed on another thread while the runner runs the
            // forward pass; the runner waits for them only when it samples.
            let masks = Arc::new(StepMasks::default());
            plan.masks = Some(masks.clone());
            let num_seqs = plan.seqs.len();
            let (runner, requests) = (&mut self.runner, &mut self.requests);
            std::thread::scope(|scope| {
                let worker = scope.spawn(|| {
                    let _fill = FillOnDrop(&masks, num_seqs);
                    compute_masks(requests, &constrained, num_seqs, &masks)
                });
                let r = catch_unwind(AssertUnwindSafe(|| runner.execute(&plan)));
                mask_errors = worker.join().unwrap_or_else(|_| {
                    constrained
                        .iter()
                        .map(|c| {
                            (
                                c.1,
                                "structured output: the mask computation panicked".into(),
                            )
                        })
                        .collect()
                });
                r
            })
        };
        let execute_time = t0.elapsed();
        drop(plan);
        let outcome = match result {
            Ok(Ok(out)) if out.seqs.len() == batch.scheduled.len() => Ok(out),
            Ok(Ok(out)) => Err(format!(
                "the runner returned {} outputs for {} sequences",
                out.seqs.len(),
                batch.scheduled.len()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(panic) => Err(panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .map_or("the runner panicked".into(), |m| {
                    format!("the runner panicked: {m}")
                })),
        };
        for (rid, msg) in mask_errors {
            self.end_request(rid, FinishReason::Error, Some(msg));
        }
        match outcome {
            Ok(out) => self.apply(&batch, out),
            Err(msg) => {
                tracing::error!("step failed, failing its requests: {msg}");
                let mut ids: Vec<RequestId> = batch
                    .scheduled
                    .iter()
                    .filter_map(|s| self.owners.get(&s.seq_id).map(|o| o.0))
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    self.end_request(id, FinishReason::Error, Some(msg.clone()));
                }
            }
        }
        self.publish_stats(num_tokens, execute_time);
        self.flush();
        tracing::debug!(
            tokens = num_tokens,
            seqs = batch.scheduled.len(),
            execute_ms = execute_time.as_secs_f64() * 1e3,
            step_ms = t0.elapsed().as_secs_f64() * 1e3,
            "step"
        );
        true
    }

    /// The rows of `batch` that sample under a grammar.
    fn constrained_rows(&self, batch: &ScheduledBatch) -> Vec<ConstrainedRow> {
        let mut rows = Vec::new();
        for (i, s) in batch.scheduled.iter().enumerate() {
            if !s.sample {
                continue;
            }
            let Some(&(rid, index)) = self.owners.get(&s.seq_id) else {
                continue;
            };
            let constrained = self
                .requests
                .get(&rid)
                .is_some_and(|r| r.children[index].matcher.is_some());
            if constrained {
                rows.push((i, rid, index));
            }
        }
        rows
    }

    /// Timestamps of first scheduling, cached-token counts, and prompt logprobs that a
    /// preemption made stale (they are computed again with the prompt).
    fn note_scheduling(&mut self, batch: &ScheduledBatch) {
        let now = Instant::now();
        for seq_id in &batch.first_scheduled {
            let Some(&(rid, index)) = self.owners.get(seq_id) else {
                continue;
            };
            let cached = self
                .scheduler
                .seq(*seq_id)
                .map_or(0, |s| s.num_cached_tokens());
            if let Some(req) = self.requests.get_mut(&rid) {
                req.children[index].first_scheduled = Some(now);
                if index == 0 {
                    req.num_cached_tokens = cached;
                }
            }
        }
        for seq_id in &batch.preempted {
            let Some(&(rid, 0)) = self.owners.get(seq_id) else {
                continue;
            };
            if let Some(req) = self.requests.get_mut(&rid) {
                if let (Some(lp), false) = (req.prompt_logprobs.as_mut(), req.prompt_sent) {
                    lp.truncate(1);
                }
            }
        }
    }

    fn apply(&mut self, batch: &ScheduledBatch, out: StepOutput) {
        let now = Instant::now();
        let mut touched = Vec::new();
        let mut failed = Vec::new();
        for (s, o) in batch.scheduled.iter().zip(out.seqs) {
            self.scheduler.complete(s);
            let Some(&(rid, index)) = self.owners.get(&s.seq_id) else {
                continue;
            };
            let Some(req) = self.requests.get_mut(&rid) else {
                continue;
            };
            if index == 0 && !req.prompt_sent {
                if let Some(lp) = req.prompt_logprobs.as_mut() {
                    lp.extend(o.prompt_logprobs.into_iter().map(Some));
                }
            }
            if !s.sample {
                continue;
            }
            let Some(sampled) = o.sampled else {
                failed.push((
                    rid,
                    "the runner returned no token for a sequence".to_string(),
                ));
                continue;
            };
            self.scheduler.append_token(s.seq_id, sampled.token);
            let arrival = req.arrival;
            let child = &mut req.children[index];
            if let Err(e) = child.advance_grammar(sampled.token, &self.eos) {
                failed.push((rid, e));
                continue;
            }
            match child.accept(self.decoder.as_ref(), sampled, now, arrival, &mut self.acc) {
                Ok(true) => {
                    self.scheduler.finish(s.seq_id);
                    self.owners.remove(&s.seq_id);
                    self.acc.finished.push(req.finished_stats(rid, index, now));
                }
                Ok(false) => {}
                Err(e) => failed.push((rid, e.to_string())),
            }
            touched.push(rid);
        }
        for (rid, msg) in failed {
            self.end_request(rid, FinishReason::Error, Some(msg));
        }
        touched.sort_unstable();
        touched.dedup();
        for rid in touched {
            let Some(mut req) = self.requests.remove(&rid) else {
                continue;
            };
            let delivered = self.send(rid, &mut req, None);
            if req.children.iter().any(|c| c.finish.is_none()) {
                self.requests.insert(rid, req);
                if !delivered {
                    self.end_request(rid, FinishReason::Abort, None);
                }
            }
        }
    }

    fn publish_stats(&mut self, num_scheduled_tokens: usize, execute_time: Duration) {
        let acc = std::mem::take(&mut self.acc);
        self.stats_subscribers.retain(|s| !s.is_closed());
        if self.stats_subscribers.is_empty()
            || (num_scheduled_tokens == 0 && acc.finished.is_empty())
        {
            return;
        }
        let counters = self.scheduler.block_manager().counters();
        let preemptions = self.scheduler.num_preemptions();
        let seq = self.stats_published.load(Ordering::Relaxed) + 1;
        let stats = StepStats {
            seq,
            at: Instant::now(),
            execute_time,
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            kv_cache_usage: self.scheduler.block_manager().usage(),
            prefix_cache_queries: counters.queries - self.last_counters.queries,
            prefix_cache_hits: counters.hits - self.last_counters.hits,
            num_prompt_tokens: acc.num_prompt_tokens,
            num_generation_tokens: acc.num_generation_tokens,
            num_scheduled_tokens,
            num_preemptions: (preemptions - self.last_preemptions) as usize,
            time_to_first_token: acc.ttft,
            inter_token_latencies: acc.itl,
            finished: acc.finished,
        };
        self.last_counters = counters;
        self.last_preemptions = preemptions;
        for s in &self.stats_subscribers {
            let _ = s.send(stats.clone());
        }
        // Release: an observer that reads `seq` here finds the stats in its channel.
        self.stats_published.store(seq, Ordering::Release);
    }

    /// Steps until every request is finished (tests and offline use).
    pub fn run_until_idle(&mut self) {
        while self.has_unfinished() {
            self.step();
        }
    }
}

/// Publishes empty masks if the worker ends without publishing (a panic), so the runner
/// never waits forever.
struct FillOnDrop<'a>(&'a StepMasks, usize);

impl Drop for FillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set(vec![None; self.1]);
    }
}

/// A constrained row of a step: (index in the plan, request, child).
type ConstrainedRow = (usize, RequestId, usize);

/// Computes and publishes the masks of `rows`; returns the requests whose grammar failed.
fn compute_masks(
    requests: &mut HashMap<RequestId, RequestState>,
    rows: &[ConstrainedRow],
    num_seqs: usize,
    out: &StepMasks,
) -> Vec<(RequestId, String)> {
    use rayon::prelude::*;
    let want: HashMap<(RequestId, usize), usize> = rows
        .iter()
        .map(|&(i, rid, index)| ((rid, index), i))
        .collect();
    // Each matcher is its own state: the rows' masks are independent work, spread over the
    // pool (a 128k-token vocabulary costs up to milliseconds a row).
    let mut jobs: Vec<(usize, RequestId, &mut llguidance::Matcher)> =
        Vec::with_capacity(rows.len());
    for (&rid, r) in requests.iter_mut() {
        for (index, c) in r.children.iter_mut().enumerate() {
            if let (Some(&i), Some(m)) = (want.get(&(rid, index)), c.matcher.as_mut()) {
                jobs.push((i, rid, m));
            }
        }
    }
    let results: Vec<(
        usize,
        RequestId,
        Result<tpuserve_runner_api::TokenBitmask, String>,
    )> = jobs
        .into_par_iter()
        .map(|(i, rid, m)| (i, rid, crate::structured::next_mask(m)))
        .collect();
    let mut masks = vec![None; num_seqs];
    let mut errors = Vec::new();
    for (i, rid, r) in results {
        match r {
            Ok(mask) => masks[i] = Some(mask),
            Err(e) => errors.push((rid, format!("structured output: {e}"))),
        }
    }
    out.set(masks);
    errors
}

/// The seed of the `k`-th unseeded request under `--seed base` (splitmix64: neighbouring
/// requests, and the per-child offsets `child_sampling` adds, land far apart).
fn default_seed(base: u64, k: u64) -> u64 {
    let mut z = base
        .wrapping_add(k.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
