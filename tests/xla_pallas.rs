//! The Pallas paged-attention kernel spliced into the XLA runner's step programs, run end to
//! end on the XLA CPU plugin: the kernel lowered through Pallas' HLO interpreter (`cpu`
//! artifacts, plain StableHLO) stands in for the Mosaic call a TPU compiles, so everything
//! around it — queries regrouped by KV head, the layer's pages, each tile's context and
//! positions, the manual-sharding region at TP 2 — meets the goldens, and the start-up
//! self-check and its fallbacks run for real.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_api::ModelRunner;
use tpuserve_runner_xla::{
    find_kernel_dir, AttentionBackend, KvCacheDtype, XlaRunner, XlaRunnerOptions,
};
use tpuserve_suite::checks::{check_batch, close, request};
use tpuserve_suite::goldens::Goldens;
use tpuserve_suite::{fixtures_dir, golden_xla_options, manifest_dir, tiny_llama3_dir};

fn opts(tp: usize) -> XlaRunnerOptions {
    XlaRunnerOptions {
        // Several chunks per context, and buckets of different chunk sizes.
        kv_chunk_tokens: 16,
        kv_chunk_budget: Some(128 << 10),
        ..golden_xla_options(tp, 512)
    }
}

/// The kernels tool's Python (`scripts/setup.sh --test` makes its venv; the suite fails
/// without it).
fn kernels_python() -> PathBuf {
    let venv = std::env::var_os("TPUSERVE_KERNELS_VENV")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/tpuserve/kernels-venv")
        });
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "{} missing: run scripts/setup.sh --test (it makes the kernels tool's venv)",
        py.display()
    );
    py
}

/// Writes the artifacts of `runner`'s kernel shapes for `target` into `dir`.
fn lower(runner: &XlaRunner, target: &str, dir: &Path) {
    let shapes = serde_json::to_string(&runner.attention_shapes().unwrap()).unwrap();
    let mut child = Command::new(kernels_python())
        .args([
            "-m",
            "tpuserve_kernels",
            "paged-attention",
            "--shapes",
            "-",
            "--out-dir",
        ])
        .arg(dir)
        .args(["--target", target])
        .current_dir(manifest_dir().join("kernels"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(shapes.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "lowering the kernels failed"
    );
}

fn with_kernels(tp: usize, dir: &Path) -> XlaRunnerOptions {
    XlaRunnerOptions {
        attention_backend: AttentionBackend::Pallas,
        attention_kernels: Some(dir.to_path_buf()),
        ..opts(tp)
    }
}

/// The golden batch (cases within 512 tokens) on `r`.
fn goldens_on(r: &mut XlaRunner) {
    let g = Goldens::load(&fixtures_dir().join("tiny-llama3/goldens.json"));
    check_batch(r, &g.batch_within(512));
    assert_eq!(r.stats().compilations_after_warmup, 0);
}

fn model() -> LoadedModel {
    load_model(&tiny_llama3_dir()).unwrap()
}

#[test]
fn the_spliced_kernel_follows_the_goldens_at_tp_1_and_2() {
    let m = model();
    for tp in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let plain = XlaRunner::new(&m, opts(tp)).unwrap();
        assert_eq!(
            plain.attention_kernels_in_use(),
            0,
            "auto: the StableHLO attention"
        );
        // No artifacts in --attention-kernels or the image's folder: `auto` says so.
        assert!(
            plain
                .attention()
                .starts_with("attention: StableHLO (--attention-backend auto: no Pallas"),
            "{}",
            plain.attention()
        );
        let shapes = plain.attention_shapes().unwrap();
        lower(&plain, "cpu", dir.path());
        drop(plain);
        let mut r = XlaRunner::new(&m, with_kernels(tp, dir.path())).unwrap();
        assert_eq!(
            r.attention_kernels_in_use(),
            shapes.len(),
            "tp {tp}: every shape passed its self-check and runs the kernel"
        );
        assert!(
            r.attention().starts_with("attention: the Pallas kernel"),
            "{}",
            r.attention()
        );
        assert!(
            r.describe().ends_with(", Pallas attention)"),
            "{}",
            r.describe()
        );
        goldens_on(&mut r);
    }
}

/// `--kv-cache-dtype fp8` with the kernel: the pages stay fp8 through the copies and are
/// widened in the kernel. The self-check passes, and the golden batch (greedy, chunked
/// prompts, staggered arrivals) gives what the StableHLO attention gives over the same fp8
/// cache: the same tokens, logprobs within the goldens' tolerance (both read the same fp8
/// values; they sum in another order).
#[test]
fn the_kernel_reads_an_fp8_cache_as_the_stablehlo_attention_does() {
    let m = model();
    let fp8 = || XlaRunnerOptions {
        kv_cache_dtype: KvCacheDtype::Fp8E4m3,
        ..opts(1)
    };
    let g = Goldens::load(&fixtures_dir().join("tiny-llama3/goldens.json"));
    let cases = g.batch_within(512);
    let reqs = || {
        cases
            .iter()
            .enumerate()
            .map(|(i, c)| request(c, i))
            .collect::<Vec<_>>()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut plain = XlaRunner::new(&m, fp8()).unwrap();
    let shapes = plain.attention_shapes().unwrap();
    assert!(
        shapes
            .iter()
            .all(|s| s.cache_dtype.as_deref() == Some("float8_e4m3fn")),
        "{shapes:?}"
    );
    lower(&plain, "cpu", dir.path());
    let want = tpuserve_suite::driver::run(&mut plain, reqs(), 64);
    drop(plain);
    let mut r = XlaRunner::new(
        &m,
        XlaRunnerOptions {
            attention_backend: AttentionBackend::Pallas,
            attention_kernels: Some(dir.path().to_path_buf()),
            ..fp8()
        },
    )
    .unwrap();
    assert_eq!(
        r.attention_kernels_in_use(),
        shapes.len(),
        "{}",
        r.attention()
    );
    let got = tpuserve_suite::driver::run(&mut r, reqs(), 64);
    assert_eq!(got.len(), want.len());
    for (c, (a, b)) in cases.iter().zip(got.iter().zip(&want)) {
        assert_eq!(a.tokens, b.tokens, "{}", c.name);
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            close(x.logprob as f64, y.logprob as f64, &c.name);
        }
    }
    assert_eq!(r.stats().compilations_after_warmup, 0);
}

#[test]
fn a_kernel_that_cannot_run_or_is_wrong_falls_back_to_the_stablehlo_attention() {
    let m = model();
    let plain = XlaRunner::new(&m, opts(1)).unwrap();
    let shapes = plain.attention_shapes().unwrap();

    // Artifacts lowered for a v6e, on the CPU plugin: refused by their target.
    let tpu = tempfile::tempdir().unwrap();
    lower(&plain, "TPU v6 lite", tpu.path());
    // The kernel answering zeros: its self-check fails.
    let wrong = tempfile::tempdir().unwrap();
    lower(&plain, "cpu", wrong.path());
    drop(plain);
    for s in &shapes {
        let path = wrong.path().join(s.file_name());
        let mut art: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let module = art["module"].as_str().unwrap().to_string();
        // main comes first: its `return` is the module's first.
        let ret = module.find("\n    return %").expect("main's return") + 1;
        let line_end = ret + module[ret..].find('\n').unwrap();
        let ty = module[ret..line_end]
            .rsplit(" : ")
            .next()
            .unwrap()
            .to_string();
        let zeros =
            format!("    %zeros = stablehlo.constant dense<0.0> : {ty}\n    return %zeros : {ty}");
        art["module"] = format!("{}{zeros}{}", &module[..ret], &module[line_end..]).into();
        std::fs::write(&path, art.to_string()).unwrap();
    }
    // No artifacts at all.
    let empty = tempfile::tempdir().unwrap();
    for (dir, why) in [
        (
            tpu.path(),
            "was lowered for `TPU v6 lite`, this device is `cpu`",
        ),
        (wrong.path(), "max |kernel − StableHLO|"),
        (empty.path(), "no usable artifact"),
    ] {
        let mut r = XlaRunner::new(&m, with_kernels(1, dir)).unwrap();
        assert_eq!(r.attention_kernels_in_use(), 0, "{}", dir.display());
        assert!(
            r.attention()
                .starts_with("attention: StableHLO, not the Pallas kernel")
                && r.attention().contains(why),
            "{}",
            r.attention()
        );
        goldens_on(&mut r);
    }
}

/// `--attention-backend auto` (the default): the kernel for the prompt tiles an artifact for
/// this device exists for, the StableHLO attention for decode (tpuserve's cost model prices
/// the kernel's decode slower); `find_kernel_dir` picks the folder of a configuration from
/// a folder of them (the TPU image's layout) by the device the artifacts were lowered for.
#[test]
fn auto_runs_the_kernel_for_prompt_tiles_and_finds_the_folder_for_this_device() {
    let m = model();
    let plain = XlaRunner::new(&m, opts(1)).unwrap();
    let shapes = plain.attention_shapes().unwrap();
    let prompt: Vec<_> = shapes.iter().filter(|s| s.rows > 1).cloned().collect();
    assert!(
        !prompt.is_empty() && prompt.len() < shapes.len(),
        "this configuration has prompt and decode shapes: {shapes:?}"
    );
    let root = tempfile::tempdir().unwrap();
    let (cpu, tpu) = (root.path().join("b-cpu"), root.path().join("a-v6e"));
    lower(&plain, "cpu", &cpu);
    lower(&plain, "TPU v6 lite", &tpu);
    drop(plain);
    assert_eq!(
        find_kernel_dir(root.path(), &prompt, "cpu"),
        Some(cpu.clone())
    );
    assert_eq!(
        find_kernel_dir(root.path(), &prompt, "TPU v6 lite"),
        Some(tpu.clone())
    );
    assert_eq!(find_kernel_dir(root.path(), &prompt, "TPU v5 lite"), None);
    assert_eq!(
        find_kernel_dir(&root.path().join("absent"), &prompt, "cpu"),
        None
    );

    let mut r = XlaRunner::new(
        &m,
        XlaRunnerOptions {
            attention_backend: AttentionBackend::Auto,
            attention_kernels: Some(cpu.clone()),
            ..opts(1)
        },
    )
    .unwrap();
    assert_eq!(
        r.attention_kernels_in_use(),
        prompt.len(),
        "{}",
        r.attention()
    );
    assert!(
        r.attention().starts_with("attention: the Pallas kernel (")
            && r.attention().contains("prompt-tile shapes")
            && r.attention()
                .contains("decode keeps the StableHLO attention"),
        "{}",
        r.attention()
    );
    goldens_on(&mut r);

    // Artifacts for another device under `auto`: the StableHLO attention, with the reason.
    let r = XlaRunner::new(
        &m,
        XlaRunnerOptions {
            attention_backend: AttentionBackend::Auto,
            attention_kernels: Some(tpu),
            ..opts(1)
        },
    )
    .unwrap();
    assert_eq!(r.attention_kernels_in_use(), 0);
    assert!(
        r.attention()
            .contains("was lowered for `TPU v6 lite`, this device is `cpu`"),
        "{}",
        r.attention()
    );
}
