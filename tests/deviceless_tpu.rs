//! The TPU compiler's own view of the step programs, with no TPU: `tpuserve plan --cost`
//! compiles every bucket with libtpu for a v6e topology (deviceless; the command re-runs
//! itself inside `unshare -n` so libtpu cannot reach the cloud metadata server) and prints the
//! compiler's memory and cost figures. Llama-3.1-70B shapes at TP 8 (`v6e:2x4`) and 8B at TP 1
//! (`v6e:1x1`), two layers each (the layer loop's body is the same for 80), each at two KV
//! cache sizes about 3× apart: every bucket compiles, fits, and its HBM temporaries do not
//! grow with the cache (no copy of it anywhere), and the partitioned TP-8 modules hold no
//! collective or copy of a cache-shaped array. libtpu is installed by `scripts/setup.sh
//! --test`; these tests fail, never skip, without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use tpuserve_suite::server::tpuserve_bin;
use tpuserve_suite::{fixtures_dir, hlo_proto};

const HBM: f64 = 32e9;

#[derive(Debug, Clone, PartialEq)]
struct Row {
    tokens: i64,
    context: i64,
    top_k: i64,
    args_gb: f64,
    temp_gb: f64,
}

/// A copy of a fixture config with `layers` layers.
fn config(name: &str, layers: usize, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixtures_dir().join("configs").join(name)).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["num_hidden_layers"] = layers.into();
    let path = dir.join(name);
    std::fs::write(&path, v.to_string()).unwrap();
    path
}

/// Runs `plan --cost` and returns the table's rows and the number of KV blocks.
fn plan_cost(cfg: &Path, tp: usize, util: &str, dump: &Path) -> (Vec<Row>, u64, String) {
    let out = Command::new(tpuserve_bin())
        .args(["plan", "--cost", "--model"])
        .arg(cfg)
        .args(["--tensor-parallel-size", &tp.to_string()])
        .args(["--max-model-len", "64", "--max-num-seqs", "128"])
        .args(["--max-num-batched-tokens", "32", "--max-logprobs", "0"])
        .args(["--gpu-memory-utilization", util, "--dump-hlo"])
        .arg(dump)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "plan --cost failed:\n{text}\n{err}");
    assert!(text.contains("TPU compiler (libtpu, tpu v6e:"), "{text}");
    assert!(text.contains("not a measurement"), "{text}");
    let blocks: u64 = regex::Regex::new(r"per chip, (\d+) KV blocks")
        .unwrap()
        .captures(&text)
        .unwrap_or_else(|| panic!("{text}"))[1]
        .parse()
        .unwrap();
    let rows: Vec<Row> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 12 || f[0].parse::<i64>().is_err() {
                return None;
            }
            Some(Row {
                tokens: f[0].parse().ok()?,
                context: f[1].parse().ok()?,
                top_k: f[2].parse().ok()?,
                args_gb: f[7].parse().ok()?,
                temp_gb: f[9].parse().ok()?,
            })
        })
        .collect();
    assert!(!rows.is_empty(), "{text}");
    (rows, blocks, text)
}

fn check(name: &str, tp: usize) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(name, 2, dir.path());
    let (small_dump, big_dump) = (dir.path().join("small"), dir.path().join("big"));
    let (small, small_blocks, _) = plan_cost(&cfg, tp, "0.3", &small_dump);
    let (big, big_blocks, text) = plan_cost(&cfg, tp, "0.9", &big_dump);
    assert!(
        big_blocks > 2 * small_blocks,
        "{small_blocks} vs {big_blocks}"
    );
    assert_eq!(small.len(), big.len());
    // Buckets: 16 and 32 tokens × 1 and 4 blocks of context.
    assert_eq!(big.len(), 4, "{text}");
    for (s, b) in small.iter().zip(&big) {
        assert_eq!(
            (s.tokens, s.context, s.top_k),
            (b.tokens, b.context, b.top_k)
        );
        assert!(
            b.args_gb > s.args_gb + 5.0,
            "the big cache is bigger: {s:?} {b:?}"
        );
        // Two-decimal GB in the table: equal temporaries whatever the cache size.
        assert!(
            (b.temp_gb - s.temp_gb).abs() <= 0.002,
            "{name} TP {tp}: temporaries grow with the KV cache: {s:?} vs {b:?}\n{text}"
        );
        assert!(b.temp_gb * 1e9 <= 0.1 * HBM, "{name} TP {tp}: {b:?}");
    }
    // What the compiler made of it: no collective and no copy of anything cache-shaped (the
    // cache's block count is a dimension no other array has).
    let cache_rows = 2 * (big_blocks as i64 + 1);
    let mut seen = 0;
    for f in std::fs::read_dir(&big_dump).unwrap() {
        let code = std::fs::read(f.unwrap().path()).unwrap();
        let insts = hlo_proto::instructions(&code);
        assert!(
            insts.iter().any(|i| i.opcode == "parameter"
                && i.shapes.iter().any(|s| s.first() == Some(&cache_rows))),
            "{name}: no cache parameter with {cache_rows} block rows"
        );
        let bad: Vec<_> = insts
            .iter()
            .filter(|i| hlo_proto::MOVES.contains(&i.opcode.as_str()))
            .filter(|i| i.shapes.iter().any(|s| s.contains(&cache_rows)))
            .collect();
        assert!(
            bad.is_empty(),
            "{name} TP {tp}: the KV cache is moved: {bad:#?}"
        );
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn tpu_v6e_2x4_llama_70b_shapes_tp8_cache_is_never_copied_or_gathered() {
    check("llama-3.1-70b.config.json", 8);
}

#[test]
fn tpu_v6e_1x1_llama_8b_shapes_tp1_cache_is_never_copied() {
    check("llama-3.1-8b.config.json", 1);
}
