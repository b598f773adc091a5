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
        tile: 1,
        top_k: 0,
    };
    let err = r.ensure_compiled(odd).unwrap_err().to_string();
    assert!(err.contains("not compiled during warm-up"), "{err}");
    assert_eq!(r.stats().compilations_after_warmup, 1);
}

fn decode_plan(ctx: usize, token: u32) -> StepPlan {
    StepPlan {
        masks: None,
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

/// `[rows, cols]` (HF `[out, in]`) bf16 bytes → device `d` of `n`'s shard of the `[in, out]`
/// layout the program takes, element by element (the loader's tiled, parallel transpose is
/// checked against this plain definition).
fn transposed_shard(
    file: &[u8],
    rows: usize,
    cols: usize,
    split_out: bool,
    d: usize,
    n: usize,
) -> Vec<u8> {
    let (r0, r1, c0, c1) = if split_out {
        (d * rows / n, (d + 1) * rows / n, 0, cols)
    } else {
        (0, rows, d * cols / n, (d + 1) * cols / n)
    };
    let mut out = Vec::with_capacity((r1 - r0) * (c1 - c0) * 2);
    for c in c0..c1 {
        for r in r0..r1 {
            let s = (r * cols + c) * 2;
            out.extend_from_slice(&file[s..s + 2]);
        }
    }
    out
}

#[test]
fn bf16_checkpoint_lands_on_every_device_byte_for_byte_at_tp_1_and_8() {
    use tpuserve_runner_xla::program::arg;
    use tpuserve_runner_xla::weights::Layout;
    use tpuserve_runner_xla::WeightElem;
    let m = model();
    let c = &m.config;
    let (h, qs, kvs, inter, vocab, layers) = (
        c.hidden_size,
        c.q_size(),
        c.kv_size(),
        c.intermediate_size,
        c.vocab_size,
        c.num_hidden_layers,
    );
    let file = |name: &str| {
        let t = m.weights.tensor(name).unwrap();
        assert_eq!(
            t.dtype,
            tpuserve_model::DType::BF16,
            "{name}: the fixture is bf16"
        );
        t.bytes.into_owned()
    };
    // Host layout is what the XLA CPU plugin gets by default; the device-program layout is
    // what TPUs and GPUs get, run here on the CPU devices.
    // The f32 runs widen on the host / convert in the device program: exact for bf16 values.
    let (bf16, f32) = (WeightElem::BF16, WeightElem::F32);
    for (tp, layout, elem) in [
        (1usize, Layout::Host, bf16),
        (1, Layout::Device, bf16),
        (8, Layout::Host, bf16),
        (8, Layout::Device, bf16),
        (1, Layout::Host, f32),
        (8, Layout::Device, f32),
    ] {
        let as_elem = |b: Vec<u8>| -> Vec<u8> {
            if elem == f32 {
                b.chunks(2)
                    .flat_map(|x| {
                        half::bf16::from_le_bytes([x[0], x[1]])
                            .to_f32()
                            .to_le_bytes()
                    })
                    .collect()
            } else {
                b
            }
        };
        let r = XlaRunner::new(
            &m,
            XlaRunnerOptions {
                tensor_parallel_size: tp,
                cpu_device_count: 8,
                weight_layout: layout,
                weight_dtype: elem,
                compile_cache_dir: Some(shared_xla_cache()),
                ..small_opts(None)
            },
        )
        .unwrap();
        for d in [0, tp - 1] {
            let embed = file("model.embed_tokens.weight");
            let rows = vocab / tp * h * 2;
            assert!(
                r.weight_shard(arg::EMBED, d).unwrap()
                    == as_elem(embed[d * rows..(d + 1) * rows].to_vec()),
                "tp {tp} {layout:?} device {d}: embedding"
            );
            let head = as_elem(transposed_shard(
                &file("lm_head.weight"),
                vocab,
                h,
                true,
                d,
                tp,
            ));
            assert!(
                r.weight_shard(arg::LM_HEAD, d).unwrap() == head,
                "tp {tp} {layout:?} device {d}: lm_head"
            );
            for (index, suffix, rows, cols, split_out) in [
                (arg::WQ, "self_attn.q_proj.weight", qs, h, true),
                (arg::WK, "self_attn.k_proj.weight", kvs, h, true),
                (arg::WV, "self_attn.v_proj.weight", kvs, h, true),
                (arg::WO, "self_attn.o_proj.weight", h, qs, false),
                (arg::WG, "mlp.gate_proj.weight", inter, h, true),
                (arg::WU, "mlp.up_proj.weight", inter, h, true),
                (arg::WD, "mlp.down_proj.weight", h, inter, false),
            ] {
                let want: Vec<u8> = (0..layers)
                    .flat_map(|l| {
                        let f = file(&format!("model.layers.{l}.{suffix}"));
                        if index == arg::WQ {
                            // wq stays [out, in] as stored: device d holds its rows.
                            let n = f.len() / tp;
                            f[d * n..(d + 1) * n].to_vec()
                        } else {
                            transposed_shard(&f, rows, cols, split_out, d, tp)
                        }
                    })
                    .collect();
                let want = as_elem(want);
                let got = r.weight_shard(index, d).unwrap();
                assert!(
                    got == want,
                    "tp {tp} {layout:?} device {d}: {suffix} ({} vs {} bytes)",
                    got.len(),
                    want.len()
                );
            }
            // Norm weights are kept in f32 on every device: the bf16 values widened exactly.
            let norm: Vec<u8> = (0..layers)
                .flat_map(|l| file(&format!("model.layers.{l}.input_layernorm.weight")))
                .collect::<Vec<u8>>()
                .chunks(2)
                .flat_map(|b| {
                    half::bf16::from_le_bytes([b[0], b[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
            assert!(
                r.weight_shard(arg::IN_NORM, d).unwrap() == norm,
                "tp {tp}: norms"
            );
        }
    }
}
