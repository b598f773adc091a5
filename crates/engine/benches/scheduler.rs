//! One scheduling step with 256 running sequences (plan building included), and the block
//! manager's allocate / free / prefix lookup. Criterion prints the time per iteration
//! (= µs per step). Run: `cargo bench -p tpuserve-engine --bench scheduler`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tpuserve_engine::block_manager::{BlockHash, BlockManager};
use tpuserve_engine::request::RequestId;
use tpuserve_engine::scheduler::{Scheduler, SchedulerConfig};
use tpuserve_engine::sequence::NewSeq;
use tpuserve_runner_api::{SamplingParams, TokenId};

const BLOCK: usize = 16;

fn prompt(i: usize, len: usize) -> Vec<TokenId> {
    (0..len)
        .map(|p| ((p * 7919 + i * 104_729) % 50_000) as TokenId)
        .collect()
}

/// 256 sequences with 512-token prompts, all past prefill and decoding.
fn decoding_scheduler(caching: bool) -> Scheduler {
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            policy: Default::default(),
            max_prefill_tokens: None,
            split_bursts: None,
        },
        BlockManager::new(256 * 64, BLOCK, caching),
    );
    for i in 0..256 {
        s.add(NewSeq {
            request_id: RequestId(i as u64),
            index: 0,
            prompt: Arc::new(prompt(i, 512)),
            sampling: Arc::new(SamplingParams::greedy()),
            banned_until_min_tokens: vec![2],
            min_tokens: 0,
            prompt_logprobs: false,
            wait_for: None,
            hash_root: None,
            priority: 0,
        });
    }
    // Prefill everything (8192 tokens per step = 16 prompts), then one decode step.
    while s.schedule_once_for_setup() || s.num_waiting() > 0 {}
    s
}

trait Setup {
    fn schedule_once_for_setup(&mut self) -> bool;
}

impl Setup for Scheduler {
    /// Runs one step as the engine would (every sampled sequence gets token 1); false once
    /// all sequences are decoding.
    fn schedule_once_for_setup(&mut self) -> bool {
        let b = self.schedule();
        let prefill = b.scheduled.iter().any(|x| x.num_tokens > 1);
        for x in &b.scheduled {
            self.complete(x);
            if x.sample {
                self.append_token(x.seq_id, 1);
            }
        }
        prefill
    }
}

fn step(s: &mut Scheduler) -> usize {
    let b = s.schedule();
    let n = b.plan.num_tokens();
    drop(b.plan);
    for x in &b.scheduled {
        s.complete(x);
        if x.sample {
            s.append_token(x.seq_id, 1);
        }
    }
    n
}

fn bench_scheduler(c: &mut Criterion) {
    for caching in [true, false] {
        let base = decoding_scheduler(caching);
        assert_eq!(base.num_running(), 256);
        let name = format!(
            "scheduler step, 256 decoding seqs (prefix caching {})",
            if caching { "on" } else { "off" }
        );
        c.bench_function(&name, |b| {
            b.iter_batched_ref(
                || base.clone(),
                |s| black_box(step(s)),
                BatchSize::LargeInput,
            )
        });
    }
}

fn bench_block_manager(c: &mut Criterion) {
    let tokens = prompt(0, 2048);
    c.bench_function("block hashes of a 2048-token prompt", |b| {
        b.iter(|| {
            let mut h = Vec::new();
            BlockHash::extend_chain(&mut h, None, black_box(&tokens), BLOCK);
            h
        })
    });

    let mut m = BlockManager::new(16_384, BLOCK, true);
    c.bench_function("allocate + release 128 blocks", |b| {
        b.iter(|| {
            let t = m.allocate(black_box(128)).unwrap_or_default();
            m.release(&t);
        })
    });

    let mut m = BlockManager::new(16_384, BLOCK, true);
    let mut hashes = Vec::new();
    BlockHash::extend_chain(&mut hashes, None, &tokens, BLOCK);
    let t = m.allocate(hashes.len()).unwrap_or_default();
    for (&blk, &h) in t.iter().zip(&hashes) {
        m.register(blk, h);
    }
    m.release(&t);
    c.bench_function("prefix lookup of 128 cached blocks + release", |b| {
        b.iter(|| {
            let hit = m.acquire_cached(black_box(&hashes));
            assert_eq!(hit.len(), 128);
            m.release(&hit);
        })
    });
}

criterion_group!(benches, bench_scheduler, bench_block_manager);
criterion_main!(benches);
