//! `tpuserve plan` arithmetic for Llama 3.1 70B on a v6e-8 node and 8B on one v6e chip,
//! checked against figures computed here from the config.json alone.

use tpuserve_model::LlamaConfig;
use tpuserve_runner_xla::plan::{device_spec, parameter_count, plan};
use tpuserve_runner_xla::Quantization;
use tpuserve_suite::fixtures_dir;

fn cfg(name: &str) -> (LlamaConfig, serde_json::Value) {
    let p = fixtures_dir().join("configs").join(name);
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    (LlamaConfig::from_hf_json(&p).unwrap(), raw)
}

fn u(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k}"))
}

#[test]
fn llama_70b_on_v6e_8() {
    let (c, raw) = cfg("llama-3.1-70b.config.json");
    // Independent arithmetic from the raw config.
    let (h, v, l, i) = (
        u(&raw, "hidden_size"),
        u(&raw, "vocab_size"),
        u(&raw, "num_hidden_layers"),
        u(&raw, "intermediate_size"),
    );
    let (nh, kvh) = (
        u(&raw, "num_attention_heads"),
        u(&raw, "num_key_value_heads"),
    );
    let d = h / nh;
    let params = 2.0 * v * h + l * (2.0 * h * h + 2.0 * h * kvh * d + 3.0 * h * i + 2.0 * h) + h;
    assert!((params / 1e9 - 70.55).abs() < 0.01, "{params}");
    assert_eq!(parameter_count(&c) as f64, params);

    let p = plan(
        &c,
        device_spec("v6e").unwrap(),
        8,
        2,
        4096,
        128,
        0.9,
        16,
        Quantization::None,
    )
    .unwrap();
    assert!(
        (p.weight_bytes_total / 1e9 - 141.1).abs() < 0.05,
        "{}",
        p.weight_bytes_total
    );
    assert!((p.weight_bytes_per_device / 1e9 - 17.64).abs() < 0.01);
    let kv_dev = 2.0 * l * (kvh / 8.0) * d * 2.0;
    assert_eq!(kv_dev, 40960.0);
    assert_eq!(p.kv_bytes_per_token_per_device, 40960);
    assert_eq!(p.kv_bytes_per_token_total, 327_680);
    // The server keeps 4 % of each chip (at least 512 MiB) for XLA's workspace.
    let fit_tokens = ((0.9 * 32e9 - params * 2.0 / 8.0 - 0.04 * 32e9) / kv_dev).floor();
    assert_eq!(p.kv_tokens as f64, fit_tokens);
    assert_eq!(
        p.max_full_length_sequences as f64,
        (fit_tokens / 4096.0).floor()
    );
    assert_eq!(p.max_full_length_sequences, 58);
    // Roofline: reading 17.6 GB of weights per step at 1.638 TB/s bounds a step near 11 ms.
    assert!(p.roofline_step_seconds > 17.64e9 / 1638e9);
    assert!(
        p.roofline_tokens_per_s > 2000.0,
        "the tutorial's ~2000 tok/s must be under the roofline"
    );
    // `--num-gpu-blocks-override 8192`: exactly 8,192 blocks, 5.37 GB a chip, the batch
    // the roofline takes bounded by the tokens they hold.
    let pinned = p.clone().with_kv_blocks(8192);
    assert_eq!((pinned.kv_blocks, pinned.kv_tokens), (8192, 131_072));
    assert_eq!(pinned.kv_budget_bytes_per_device, 131_072.0 * kv_dev);
    assert_eq!(pinned.max_full_length_sequences, 32);
    assert_eq!(pinned.roofline_batch, 64);
    assert!(pinned
        .to_string()
        .contains("→ 131072 tokens, 8192 blocks of 16"));
    // Start-up estimate: 141 GB of checkpoint at 2 GB/s is ~71 s of reads.
    let p = p.with_read_gbps(2.0);
    assert!((p.weight_load_seconds - params * 2.0 / 2e9).abs() < 1e-6);
    assert!(
        p.to_string()
            .contains("weight placement            ~71 s at 2 GB/s"),
        "{p}"
    );
}

#[test]
fn llama_8b_on_one_v6e_and_clear_errors() {
    let (c, _) = cfg("llama-3.1-8b.config.json");
    let p = plan(
        &c,
        device_spec("v6e").unwrap(),
        1,
        2,
        4096,
        128,
        0.9,
        16,
        Quantization::None,
    )
    .unwrap();
    assert!(
        (p.parameters as f64 / 1e9 - 8.03).abs() < 0.01,
        "{}",
        p.parameters
    );
    assert_eq!(p.kv_bytes_per_token_per_device, 2 * 32 * 8 * 128 * 2);
    // 70B does not fit one chip; TP=3 does not divide 64 heads.
    let (big, _) = cfg("llama-3.1-70b.config.json");
    let e = plan(
        &big,
        device_spec("v6e").unwrap(),
        1,
        2,
        4096,
        128,
        0.9,
        16,
        Quantization::None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("141.11 GB of weights per device") && e.contains("28.80 GB"),
        "{e}"
    );
    let e = plan(
        &big,
        device_spec("v6e").unwrap(),
        3,
        2,
        4096,
        128,
        0.9,
        16,
        Quantization::None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--tensor-parallel-size 3") && e.contains("attention heads (64)"),
        "{e}"
    );
}

/// `--quantization int8` on 70B at TP 8: the projections and the LM head at one byte per
/// parameter plus an f32 scale per output channel, the embedding still bf16 (hand count from
/// the raw config) — about half the bf16 bytes per chip; the memory freed goes to the KV
/// cache, a decode step's roofline reads less, and placing the weights still reads the whole
/// bf16 checkpoint.
#[test]
fn int8_halves_the_weight_bytes_of_70b_and_the_kv_cache_gets_them() {
    let (c, raw) = cfg("llama-3.1-70b.config.json");
    let (h, v, l, i) = (
        u(&raw, "hidden_size"),
        u(&raw, "vocab_size"),
        u(&raw, "num_hidden_layers"),
        u(&raw, "intermediate_size"),
    );
    let kvw = u(&raw, "num_key_value_heads") * h / u(&raw, "num_attention_heads");
    let v6e = device_spec("v6e").unwrap();
    let bf16 = plan(&c, v6e, 8, 2, 4096, 128, 0.9, 16, Quantization::None).unwrap();
    let int8 = plan(&c, v6e, 8, 2, 4096, 128, 0.9, 16, Quantization::Int8).unwrap();
    let matrices = l * (2.0 * h * h + 2.0 * h * kvw + 3.0 * h * i) + v * h;
    let channels = l * (2.0 * h + 2.0 * kvw + 2.0 * i + h) + v;
    let rest = v * h * 2.0 + l * 2.0 * h * 2.0 + h * 2.0;
    let want = matrices + 4.0 * channels + rest;
    assert!(
        (int8.weight_bytes_total - want).abs() < 1.0,
        "{} vs {want}",
        int8.weight_bytes_total
    );
    let ratio = int8.weight_bytes_per_device / bf16.weight_bytes_per_device;
    assert!(
        (0.5..0.53).contains(&ratio),
        "int8 / bf16 weight bytes {ratio}"
    );
    assert!(
        (int8.weight_bytes_per_device / 1e9 - 8.95).abs() < 0.01,
        "{}",
        int8.weight_bytes_per_device
    );
    // Every byte the weights free per chip holds KV (the budget is otherwise the same).
    let freed = bf16.weight_bytes_per_device - int8.weight_bytes_per_device;
    assert!(
        (int8.kv_budget_bytes_per_device - bf16.kv_budget_bytes_per_device - freed).abs() < 1.0
    );
    assert!(int8.max_full_length_sequences > bf16.max_full_length_sequences + 40);
    assert_eq!(
        int8.kv_bytes_per_token_per_device,
        bf16.kv_bytes_per_token_per_device
    );
    assert!(int8.roofline_tokens_per_s > bf16.roofline_tokens_per_s);
    assert_eq!(int8.weight_load_seconds, bf16.weight_load_seconds);
    let text = int8.to_string();
    assert!(text.contains("int8 projections and LM head"), "{text}");
    assert!(
        text.contains("(141.1 GB;"),
        "the checkpoint read is bf16: {text}"
    );
}

/// A KV chunk's gathered K and V stay within the chunk budget, and its f32 scores within half
/// of it: 70B at TP 8 (8 query heads and 512 bytes of K and V a token per chip), 128 MiB.
#[test]
fn attention_chunks_keep_kv_and_scores_within_the_budget() {
    use tpuserve_runner_xla::program::{Bucket, ProgramConfig};
    let (c, _) = cfg("llama-3.1-70b.config.json");
    let pc = ProgramConfig::for_model(
        &c,
        8,
        tpuserve_runner_xla::WeightElem::BF16,
        15_000,
        16,
        4096,
        tpuserve_runner_xla::default_kv_chunk_tokens("tpu"),
    )
    .with_kv_chunk_budget(128 << 20);
    let tokens = |t: i64, tile: i64| {
        pc.chunk_blocks(Bucket {
            tokens: t,
            tile,
            top_k: 0,
        }) * 16
    };
    // Decode rows: the K and V of 128 rows × 2,048 tokens are the budget exactly.
    assert_eq!(tokens(128, 1), 2048);
    assert_eq!(tokens(512, 1), 512);
    // 512-row prompt steps in tiles of 16: 32 MiB of scores at 2,048 tokens, within half.
    assert_eq!(tokens(512, 16), 2048);
    // 2,048-row steps: 128 tiles × 16 rows × 8 heads × 4 bytes = 64 KiB of scores a token:
    // 1,024 tokens are the half budget.
    assert_eq!(tokens(2048, 16), 1024);
    // 2,048 decode-style rows: the base chunk.
    assert_eq!(tokens(2048, 1), 256);
    for (t, tile) in [
        (128, 1),
        (512, 1),
        (512, 16),
        (1024, 16),
        (2048, 16),
        (2048, 1),
    ] {
        // Above the base chunk (256 tokens), which a chunk never goes below.
        let (n, tiles) = (tokens(t, tile), t / tile);
        assert!(
            n == 256 || tiles * n * 512 <= 128 << 20,
            "{t}×{tile}: K and V"
        );
        assert!(
            n == 256 || tiles * tile * 8 * 4 * n <= 64 << 20,
            "{t}×{tile}: scores"
        );
    }
}
