//! The TPU compiler's own view of the step programs, with no TPU: `tpuserve plan --cost`
//! compiles every bucket with libtpu for a v6e topology (deviceless; the command re-runs
//! itself inside `unshare -n` so libtpu cannot reach the cloud metadata server) and prints the
//! compiler's memory and cost figures. Llama-3.1-70B shapes at TP 8 (`v6e:2x4`) and TP 4
//! (`v6e:2x2`, 2 KV heads per chip) and 8B at TP 1 (`v6e:1x1`), two layers each (the layer
//! loop's body is the same for 80), each at two KV cache sizes about 3× apart: every bucket
//! compiles, fits, and its HBM temporaries do not
//! grow with the cache (no copy of it anywhere), and the partitioned TP-8 modules hold no
//! collective or copy of a cache-shaped array. The step model `plan --cost` builds from
//! straight-line variants (rest, one layer, one more KV chunk) shows what a step reads: a
//! layer about its weights, a KV chunk about its pages (hand counts), pages that grow with
//! the sequences, and a prompt's pages read once per tile of rows, not once per row. libtpu is
//! installed by `scripts/setup.sh --test`; these tests fail, never skip, without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use tpuserve_suite::server::tpuserve_bin;
use tpuserve_suite::{fixtures_dir, hlo_proto};

const HBM: f64 = 32e9;

#[derive(Debug, Clone, PartialEq)]
struct Row {
    tokens: i64,
    tile: i64,
    top_k: i64,
    gb_read: f64,
    args_gb: f64,
    temp_gb: f64,
    kern_ms: f64,
    greedy_ms: f64,
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
fn plan_cost(
    cfg: &Path,
    tp: usize,
    util: &str,
    dump: &Path,
    model: bool,
    extra: &[&str],
) -> (Vec<Row>, u64, String) {
    let mut cmd = Command::new(tpuserve_bin());
    cmd.args(["plan", "--cost", "--model"])
        .arg(cfg)
        .args(["--tensor-parallel-size", &tp.to_string()])
        .args(["--max-model-len", "1024", "--max-num-seqs", "128"])
        .args(["--max-num-batched-tokens", "32", "--max-logprobs", "0"])
        .args(["--gpu-memory-utilization", util, "--dump-hlo"])
        .arg(dump)
        .args(extra)
        .env("RUST_BACKTRACE", "0");
    if !model {
        cmd.arg("--no-step-model");
    }
    let out = cmd.output().unwrap();
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
            if f.len() != 15 || f[0].parse::<i64>().is_err() {
                return None;
            }
            Some(Row {
                tokens: f[0].parse().ok()?,
                tile: f[1].parse().ok()?,
                top_k: f[2].parse().ok()?,
                gb_read: f[4].parse().ok()?,
                kern_ms: f[7].parse().ok()?,
                greedy_ms: f[8].parse().ok()?,
                args_gb: f[9].parse().ok()?,
                temp_gb: f[11].parse().ok()?,
            })
        })
        .collect();
    assert!(!rows.is_empty(), "{text}");
    // The clock the code generator's cycle estimates imply, from its weight-streaming and
    // matmul probes: both a TPU's clock (GHz), within 1.5× of each other.
    let clocks =
        regex::Regex::new(r"at (\S+) TB/s: (\S+) GHz; a large matmul at \S+ TFLOP/s: (\S+) GHz")
            .unwrap()
            .captures(&text)
            .unwrap_or_else(|| panic!("{text}"));
    let (hbm, mxu): (f64, f64) = (clocks[2].parse().unwrap(), clocks[3].parse().unwrap());
    assert!(
        (0.5..5.0).contains(&hbm) && (0.5..5.0).contains(&mxu),
        "{text}"
    );
    assert!(hbm.max(mxu) / hbm.min(mxu) < 1.5, "{text}");
    (rows, blocks, text)
}

/// `model`: also build the step model (three straight-line variants per modelled bucket);
/// `extra`: more `plan` flags.
fn check(name: &str, tp: usize, model: bool, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    // Eight layers where the model is checked: with two, a layer's whole weight stack fits
    // on chip and the compiler places it differently in each variant (the parts' differences
    // then say little); eight layers' stacks stay in HBM, as the full model's do.
    let layers = if model { 8 } else { 2 };
    let cfg = config(name, layers, dir.path());
    let (small_dump, big_dump) = (dir.path().join("small"), dir.path().join("big"));
    let (small, small_blocks, _) = plan_cost(&cfg, tp, "0.3", &small_dump, false, extra);
    let (big, big_blocks, text) = plan_cost(&cfg, tp, "0.9", &big_dump, model, extra);
    assert!(
        big_blocks > 2 * small_blocks,
        "{small_blocks} vs {big_blocks}"
    );
    assert_eq!(small.len(), big.len());
    // Buckets: 16 and 32 tokens × decode rows (tiles of 1) and prompt rows (tiles of 16).
    assert_eq!(big.len(), 4, "{text}");
    for (s, b) in small.iter().zip(&big) {
        assert_eq!((s.tokens, s.tile, s.top_k), (b.tokens, b.tile, b.top_k));
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
        // Nor what its kernels cost, loops counted by their trips.
        assert!(
            b.kern_ms > 0.0 && (b.kern_ms - s.kern_ms).abs() <= 0.02 * s.kern_ms + 0.002,
            "{name} TP {tp}: kernel estimates grow with the KV cache: {s:?} vs {b:?}\n{text}"
        );
        // A greedy step skips the sampling tail's conditional work (random sampling, the
        // filters' bisections over the vocabulary, the token mask): its kernels cost less
        // than the same step with every option on, never more.
        assert!(
            b.greedy_ms > 0.0 && b.greedy_ms < b.kern_ms,
            "{name} TP {tp}: greedy {} ms vs every option on {} ms: {b:?}\n{text}",
            b.greedy_ms,
            b.kern_ms
        );
        // What a step reads does not depend on how big the cache is.
        assert!(
            (b.gb_read - s.gb_read).abs() <= 0.02 * s.gb_read + 0.01,
            "{name} TP {tp}: bytes accessed grow with the KV cache: {s:?} vs {b:?}\n{text}"
        );
    }
    // What the compiler made of it: no collective and no copy of anything cache-shaped (the
    // cache's block count is a dimension no other array has).
    let cache_rows = layers as i64 * (big_blocks as i64 + 1);
    let mut seen = 0;
    for f in std::fs::read_dir(&big_dump).unwrap() {
        let path = f.unwrap().path();
        // The step programs; the model's straight-line variants are checked below.
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("step-")
        {
            continue;
        }
        let code = std::fs::read(path).unwrap();
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
    if !model {
        return;
    }
    // The model's parts, hand-checked on the mission's configuration. (At TP 1 the compiler
    // fuses differently in the one- and two-chunk variants, and the differences are not a
    // per-chunk cost; the table above still checks every bucket.)
    let model = parts(&text);
    assert_eq!(model.len(), 3, "{text}");
    // A step whose context fits one KV chunk (512 tokens; chunks of 1,024 here) is modelled
    // as the rest, the layers and no extra chunk: the kernels of the bucket's own program,
    // which the table prices. (The model once left the first chunk of every layer out.)
    for (kind, rows, bucket) in [
        ("decode", 1, (16, 1)),
        ("decode", 32, (32, 1)),
        ("prefill", 32, (32, 16)),
    ] {
        let modelled = model_greedy_ms(&text, kind, rows, 512);
        let b = big
            .iter()
            .find(|r| (r.tokens, r.tile) == bucket)
            .unwrap_or_else(|| panic!("no bucket {bucket:?}:\n{text}"));
        assert!(
            (modelled - b.greedy_ms).abs() <= 0.005 * b.greedy_ms + 0.002,
            "{name} TP {tp}: {kind} {rows} × 512 modelled at {modelled} ms, its program at {} ms\n{text}",
            b.greedy_ms
        );
    }
    if tp == 8 {
        check_model(name, tp, &model, &text);
    }
}

/// The step model's greedy ms for `kind` (decode / prefill) at `rows` rows and `ctx` tokens
/// of context (the row's twelfth column).
fn model_greedy_ms(text: &str, kind: &str, rows: i64, ctx: i64) -> f64 {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| {
            f.len() == 13 && f[0] == kind && f[1].parse() == Ok(rows) && f[2].parse() == Ok(ctx)
        })
        .unwrap_or_else(|| panic!("no modelled {kind} {rows} × {ctx}:\n{text}"))[11]
        .parse()
        .unwrap()
}

/// `parts tokens=T tile=R: rest A GB B GFLOP …; layer C GB D GFLOP …; chunk E GB F GFLOP …`.
#[derive(Debug, Clone, Copy)]
struct Parts {
    tokens: i64,
    tile: i64,
    layer_gb: f64,
    layer_launches: f64,
    chunk_gb: f64,
}

fn parts(text: &str) -> Vec<Parts> {
    let re = regex::Regex::new(
        r"parts tokens=(\d+) tile=(\d+): rest \S+ GB \S+ GFLOP[^;]*; layer (\S+) GB \S+ GFLOP \S+ kcycles \(\S+ greedy\) (\S+) launches; chunk (\S+) GB",
    )
    .unwrap();
    re.captures_iter(text)
        .map(|c| Parts {
            tokens: c[1].parse().unwrap(),
            tile: c[2].parse().unwrap(),
            layer_gb: c[3].parse().unwrap(),
            layer_launches: c[4].parse().unwrap(),
            chunk_gb: c[5].parse().unwrap(),
        })
        .collect()
}

/// Decode at 1 and 32 sequences (buckets of 16 and 32 rows) and a 32-row prompt chunk.
fn check_model(name: &str, tp: usize, big: &[Parts], text: &str) {
    let find = |t: i64, r: i64| {
        *big.iter()
            .find(|p| p.tokens == t && p.tile == r)
            .unwrap_or_else(|| panic!("no parts for {t} rows, tile {r}:\n{text}"))
    };
    let (d16, d32, p32) = (find(16, 1), find(32, 1), find(32, 16));
    // A layer reads its weights (hand count from the config, bf16, this chip's shard) and
    // not much more: no copy of the stacked weights per layer.
    let text_cfg = std::fs::read_to_string(fixtures_dir().join("configs").join(name)).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text_cfg).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap() as f64;
    let (h, heads, kvh, inter) = (
        n("hidden_size"),
        n("num_attention_heads"),
        n("num_key_value_heads"),
        n("intermediate_size"),
    );
    let d = h / heads;
    let weights =
        (2.0 * h * heads * d + 2.0 * h * kvh * d + 3.0 * h * inter) * 2.0 / tp as f64 / 1e9;
    for p in [d16, d32, p32] {
        let ratio = p.layer_gb / weights;
        assert!(
            (1.0..=2.0).contains(&ratio),
            "{name} TP {tp}: a layer reads {ratio:.2}× its weights ({weights:.3} GB): {p:?}\n{text}"
        );
    }
    // The pages one chunk reads: tiles × 256 tokens (the chunk at --max-model-len 1024) × K
    // and V of this chip's KV heads (8 of 128 dims, bf16) — the hand count.
    let kv_heads_per_chip = 8 / tp as i64;
    let pages = |tiles: i64| (tiles * 256 * 2 * kv_heads_per_chip * 128 * 2) as f64 / 1e9;
    for p in [d16, d32] {
        let ratio = p.chunk_gb / pages(p.tokens);
        assert!(
            (1.0..=8.0).contains(&ratio),
            "{name} TP {tp}: a decode chunk reads {ratio:.2}× its pages: {p:?}\n{text}"
        );
    }
    // A layer launches as many kernels for 32 rows as for 16: nothing in it is a loop over
    // the rows (the TPU compiler made one of a scatter of single token rows: 4 kernels a row,
    // K and V, +128 launches at 32 rows).
    assert!(
        d32.layer_launches <= d16.layer_launches + 8.0
            && p32.layer_launches <= d16.layer_launches + 8.0,
        "{name} TP {tp}: a layer's kernels grow with its rows: {d16:?} {d32:?} {p32:?}\n{text}"
    );
    // Reads grow with the sequences: twice the rows, about twice the bytes.
    let grow = d32.chunk_gb / d16.chunk_gb;
    assert!((1.6..=2.4).contains(&grow), "{name}: {grow:.2}\n{text}");
    // A prompt's 32 rows in two tiles read their pages twice, not 32 times.
    assert!(
        p32.chunk_gb * 2.0 < d32.chunk_gb,
        "{name} TP {tp}: prompt rows re-read their pages: {p32:?} vs {d32:?}\n{text}"
    );
}

#[test]
fn tpu_v6e_2x4_llama_70b_shapes_tp8_cache_is_never_copied_or_gathered() {
    check("llama-3.1-70b.config.json", 8, true, &[]);
}

/// `--kv-cache-dtype fp8`: the fp8 cache compiles for TPU, is written in place and read
/// without a copy, at two cache sizes.
#[test]
fn tpu_v6e_2x4_llama_70b_shapes_tp8_fp8_kv_cache_is_never_copied() {
    check(
        "llama-3.1-70b.config.json",
        8,
        false,
        &["--kv-cache-dtype", "fp8"],
    );
}

/// 70B at TP 4 holds 2 KV heads per chip: the layout where the compiler once copied the
/// whole cache into the attention dots' layout after every KV write (temporaries 3.2 GB).
#[test]
fn tpu_v6e_2x2_llama_70b_shapes_tp4_two_kv_heads_per_chip_cache_is_never_copied() {
    check("llama-3.1-70b.config.json", 4, false, &[]);
}

#[test]
fn tpu_v6e_1x1_llama_8b_shapes_tp1_cache_is_never_copied() {
    check("llama-3.1-8b.config.json", 1, true, &[]);
}

/// The tpu-recipes setting for 70B on v6e-8 (`--max-num-batched-tokens 2048`): its 2,048-row
/// prompt bucket and its largest decode bucket (`plan --bucket`; the smaller ones are those
/// of the default budget, compiled above) compile and fit. The 2,048-row prompt bucket once scored
/// 134 MB a KV chunk and the TPU compiler refused it ("Too many buffers are colored in the
/// alternate memory"); its chunk now keeps the scores within half the chunk budget.
#[test]
fn tpu_v6e_2x4_llama_70b_2048_token_steps_compile() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("llama-3.1-70b.config.json", 2, dir.path());
    let out = Command::new(tpuserve_bin())
        .args(["plan", "--cost", "--no-step-model", "--model"])
        .arg(&cfg)
        .args(["--tensor-parallel-size", "8", "--max-model-len", "4096"])
        .args(["--max-num-seqs", "128", "--max-num-batched-tokens", "2048"])
        .arg("--dump-hlo")
        .arg(dir.path().join("hlo"))
        .args([
            "--max-logprobs",
            "0",
            "--bucket",
            "2048:16",
            "--bucket",
            "128:1",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "plan --cost failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(i64, i64, f64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 15 && f[0].parse::<i64>().is_ok()).then(|| {
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[11].parse().unwrap(),
                )
            })
        })
        .collect();
    assert_eq!(rows.len(), 2, "only the buckets asked for:\n{text}");
    for (tokens, tile) in [(2048, 16), (128, 1)] {
        assert!(
            rows.iter().any(|&(t, r, _)| t == tokens && r == tile),
            "no {tokens}-row bucket of tile {tile}:\n{text}"
        );
    }
    for &(t, r, temp_gb) in &rows {
        assert!(
            temp_gb * 1e9 <= 0.1 * HBM,
            "tokens {t} tile {r}: {temp_gb} GB of temporaries\n{text}"
        );
    }
    // The step model's collective traffic, hand-counted: sequence parallel, each of the 2
    // layers reduce-scatters wo's and wd's sums (each chip keeps 256 of the 2,048 rows of
    // 8,192, bf16) and all-gathers both norms' rows; outside them, the vocabulary-split
    // embedding's rows are reduce-scattered and the final norm's all-gathered. The compiler
    // writes each reduce-scatter as a fusion of an all-reduce and a slice (the model once
    // missed those, half of a prompt step's ICI traffic).
    for (tokens, tile) in [(2048, 16), (128, 1)] {
        let program = std::fs::read(
            dir.path()
                .join("hlo")
                .join(format!("step-t{tokens}-r{tile}-k0.hlo.pb")),
        )
        .unwrap();
        let s = tpuserve_runner_xla::kernels::kernel_sums(&program).unwrap();
        let collectives = 2.0 * 2.0 + 1.0;
        let rows = tokens as f64;
        assert_eq!(
            (s.reduce_scatter_bytes, s.all_gather_bytes),
            (
                collectives * rows / 8.0 * 8192.0 * 2.0,
                collectives * rows * 8192.0 * 2.0,
            ),
            "{tokens} rows, tile {tile}: {s:?}"
        );
        // Besides, only the sampling tail's reductions over the vocabulary's shards (a few
        // values a row), never a row of activations.
        assert!(
            s.all_reduce_bytes < 64.0 * 1024.0,
            "{tokens} rows, tile {tile}: {s:?}"
        );
    }
    // A decode execution holds one row per running sequence: no decode bucket is larger
    // than --max-num-seqs (128).
    let out = Command::new(tpuserve_bin())
        .args(["plan", "--cost", "--no-step-model", "--model"])
        .arg(&cfg)
        .args(["--tensor-parallel-size", "8", "--max-model-len", "4096"])
        .args(["--max-num-seqs", "128", "--max-num-batched-tokens", "2048"])
        .args(["--bucket", "256:1"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--bucket 256:1 is not a bucket"),
        "{err}"
    );
}
