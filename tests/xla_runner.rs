//! The XLA runner's compilation discipline on the CPU plugin: persistent compile cache (reuse,
//! damaged and foreign entries, concurrent writers), the recompilation guard, no compilation
//! for a stream of mixed requests after warm-up, and device→host traffic per step that does
//! not grow with the context.

use std::path::Path;
use std::sync::Arc;

use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_api::{ModelRunner, SamplingParams, SeqPlan, StepPlan};
use tpuserve_runner_xla::program::Bucket;
use tpuserve_runner_xla::{XlaRunner, XlaRunnerOptions};
use tpuserve_suite::driver::{self, SeqRequest};
use tpuserve_suite::{shared_xla_cache, tiny_llama3_dir};

fn small_opts(cache: Option<&Path>) -> XlaRunnerOptions {
    XlaRunnerOptions {
        num_blocks: 64,
        block_size: 16,
        max_num_batched_tokens: 32,
        max_model_len: 256,
        max_logprobs: 5,
        compile_cache_dir: cache.map(Path::to_path_buf),
        strict_no_recompile: true,
        ..Default::default()
    }
}

fn model() -> LoadedModel {
    load_model(&tiny_llama3_dir()).unwrap()
}

#[test]
fn fresh_cache_reuse_damage_and_concurrent_writers() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    // Two runners filling the same empty cache at once (separate PJRT clients, as two pods).
    let stats: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    XlaRunner::new(&m, small_opts(Some(dir.path())))
                        .unwrap()
                        .stats()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let n = XlaRunner::bucket_set(&small_opts(None)).len();
    for s in &stats {
        assert_eq!(s.compilations + s.cache_hits, n);
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        entries.len(),
        n,
        "one entry per program, no temp files left: {entries:?}"
    );

    // Second start: everything from the cache.
    let warm = XlaRunner::new(&m, small_opts(Some(dir.path())))
        .unwrap()
        .stats();
    assert_eq!((warm.compilations, warm.cache_hits), (0, n));

    // A truncated entry and an entry from another plugin version (other key) are recompiled.
    let mut files: Vec<_> = entries
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "xla"))
        .collect();
    files.sort();
    let bytes = std::fs::read(files[0]).unwrap();
    std::fs::write(files[0], &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(files[2], files[1]).unwrap();
    let healed = XlaRunner::new(&m, small_opts(Some(dir.path())))
        .unwrap()
        .stats();
    assert_eq!((healed.compilations, healed.cache_hits), (2, n - 2));
    let again = XlaRunner::new(&m, small_opts(Some(dir.path())))
        .unwrap()
        .stats();
    assert_eq!(
        (again.compilations, again.cache_hits),
        (0, n),
        "rewritten entries are valid"
    );
}

#[test]
fn no_compilation_after_warm_up_and_the_guard_fires() {
    let m = model();
    let mut r = XlaRunner::new(&m, small_opts(Some(&shared_xla_cache()))).unwrap();
    let before = r.stats().compilations;
    // 200 requests of random lengths, in waves of random size.
    let mut seed = 7u64;
    let mut rnd = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut done = 0;
    while done < 200 {
        let wave = (1 + rnd(12) as usize).min(200 - done);
        let reqs = (0..wave)
            .map(|_| SeqRequest {
                prompt: (0..1 + rnd(100)).map(|_| rnd(128000) as u32).collect(),
                max_new_tokens: 1 + rnd(8) as usize,
                logprobs: rnd(2) as usize * 5,
                prompt_logprobs: None,
                arrive_at_step: rnd(3) as usize,
            })
            .collect();
        let res = driver::run(&mut r, reqs, 32);
        assert_eq!(res.len(), wave);
        done += wave;
    }
    let s = r.stats();
    assert_eq!(s.compilations, before);
    assert_eq!(s.compilations_after_warmup, 0);
    let odd = Bucket {
        tokens: 48,
        blocks: 3,
        top_k: 0,
    };
    let err = r.ensure_compiled(odd).unwrap_err().to_string();
    assert!(err.contains("not compiled during warm-up"), "{err}");
    assert_eq!(r.stats().compilations_after_warmup, 1);
}

fn decode_plan(ctx: usize, token: u32) -> StepPlan {
    StepPlan {
        token_ids: vec![token],
        positions: vec![ctx as u32 - 1],
        slot_mapping: vec![ctx as u32 - 1],
        seqs: vec![SeqPlan {
            seq_id: 1,
            query_start: 0,
            query_len: 1,
            context_len: ctx,
            block_table: (0..16).collect(),
            sample: true,
            prompt_logprob_targets: Vec::new(),
            return_logits: false,
            sampling: Arc::new(SamplingParams::greedy()),
            output_tokens: Arc::new(Vec::new()),
            prompt_tokens: Arc::new(Vec::new()),
        }],
    }
}

#[test]
fn device_to_host_bytes_per_step_do_not_grow_with_context() {
    let m = model();
    let mut r = XlaRunner::new(&m, small_opts(Some(&shared_xla_cache()))).unwrap();
    let mut per_step = Vec::new();
    for ctx in [4usize, 40, 250] {
        let b0 = r.stats().bytes_to_host;
        r.execute(&decode_plan(ctx, 1000)).unwrap();
        per_step.push(r.stats().bytes_to_host - b0);
    }
    assert!(per_step.iter().all(|&b| b == per_step[0]), "{per_step:?}");
    // One 16-row bucket: sampled id, its logprob and rank, target logprob and rank.
    assert_eq!(per_step[0], 16 * 5 * 4);
}
