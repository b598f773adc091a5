//! Broken model files give errors that name the file and the problem, never a panic.

use tpuserve_model::{gguf::GgufFile, load_model, ModelError};
use tpuserve_suite::gguf_writer::{llama_meta, write, RawTensor};
use tpuserve_suite::{smollm2_gguf, tiny_llama3_dir};

fn err_of(path: &std::path::Path) -> String {
    load_model(path).expect_err("load must fail").to_string()
}

#[test]
fn missing_model_path_is_named() {
    let e = err_of(std::path::Path::new("/nonexistent/model.gguf"));
    assert!(
        e.contains("not found") && e.contains("/nonexistent/model.gguf"),
        "{e}"
    );
}

#[test]
fn truncated_gguf_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::read(smollm2_gguf()).unwrap();
    for cut in [3usize, 100, 4_000_000, real.len() - 1000] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &real[..cut]).unwrap();
        let e = err_of(&p);
        assert!(e.contains(&format!("cut{cut}.gguf")), "{e}");
        assert!(e.contains("truncated") || e.contains("too short"), "{e}");
    }
}

#[test]
fn corrupt_safetensors_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny_llama3_dir().join(f), dir.path().join(f)).unwrap();
    }
    let real = std::fs::read(tiny_llama3_dir().join("model.safetensors")).unwrap();
    let st = dir.path().join("model.safetensors");
    std::fs::write(&st, &real[..real.len() / 2]).unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let e = err_of(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );
}

#[test]
fn unsupported_architecture_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gpt2.gguf");
    std::fs::write(&p, write(&llama_meta("gpt2", 8, 2, 16), &[])).unwrap();
    let e = err_of(&p);
    assert!(
        e.contains("unsupported architecture `gpt2`") && e.contains("gpt2.gguf"),
        "{e}"
    );

    let hf = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny_llama3_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    cfg["architectures"] = serde_json::json!(["Qwen3MoeForCausalLM"]);
    std::fs::write(hf.path().join("config.json"), cfg.to_string()).unwrap();
    let e = err_of(hf.path());
    assert!(e.contains("Qwen3MoeForCausalLM"), "{e}");
}

#[test]
fn unsupported_quantization_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iq2.gguf");
    let t = RawTensor {
        name: "token_embd.weight".into(),
        dims: vec![256, 1],
        ggml_type: 16, // IQ2_XXS
        data: vec![0u8; 66],
    };
    std::fs::write(&p, write(&llama_meta("llama", 8, 2, 16), &[t])).unwrap();
    let e = match GgufFile::open(&p) {
        Err(e @ ModelError::UnsupportedTensorType { .. }) => e.to_string(),
        other => panic!(
            "expected unsupported tensor type, got {:?}",
            other.map(|_| ())
        ),
    };
    assert!(
        e.contains("IQ (importance-matrix) quantization (ggml type 16)")
            && e.contains("token_embd.weight")
            && e.contains("iq2.gguf"),
        "{e}"
    );
}

/// Every K-quant type, IQ4_NL and IQ4_XS against ggml's own Python dequantiser
/// (`gguf.quants.dequantize`, run by tests/data/make_kquant_blocks.py on 512 pseudo-random
/// values' blocks a type), through a GGUF file as a checkpoint carries them: the same f32
/// values, bit for bit.
#[test]
fn k_quant_and_iq4_types_dequantize_as_ggml_does() {
    let blocks: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kquant_blocks.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for (name, ggml_type) in [
        ("Q2_K", 10),
        ("Q3_K", 11),
        ("Q4_K", 12),
        ("Q5_K", 13),
        ("Q6_K", 14),
        ("IQ4_NL", 20),
        ("IQ4_XS", 23),
    ] {
        let case = &blocks[name];
        let hex = case["hex"].as_str().unwrap();
        let data: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.gguf");
        let t = RawTensor {
            name: "w".into(),
            dims: vec![256, 2],
            ggml_type,
            data,
        };
        std::fs::write(&p, write(&llama_meta("llama", 8, 2, 16), &[t])).unwrap();
        let f = GgufFile::open(&p).unwrap();
        let got = f.dequantize(&f.tensors["w"]).unwrap();
        assert_eq!(got.len(), 512, "{name}");
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} value {k}: {g} against ggml's {w}"
            );
        }
    }
}

#[test]
fn gguf_quant_types_dequantize_like_ggml() {
    use half::f16;
    // One Q4_0 row and one Q6_K row, checked against the ggml formulas evaluated by hand.
    let dir = tempfile::tempdir().unwrap();
    let mut q40 = f16::from_f32(0.25).to_bits().to_le_bytes().to_vec();
    q40.extend((0..16u8).map(|i| i | (15 - i) << 4));
    let mut q6k = vec![0u8; 210];
    for (i, b) in q6k[..128].iter_mut().enumerate() {
        *b = (i * 7 % 256) as u8;
    }
    for (i, b) in q6k[128..192].iter_mut().enumerate() {
        *b = (i * 13 % 256) as u8;
    }
    for (i, b) in q6k[192..208].iter_mut().enumerate() {
        *b = (i as i8 - 8) as u8;
    }
    q6k[208..210].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
    let tensors = [
        RawTensor {
            name: "a".into(),
            dims: vec![32],
            ggml_type: 2,
            data: q40,
        },
        RawTensor {
            name: "b".into(),
            dims: vec![256],
            ggml_type: 14,
            data: q6k.clone(),
        },
    ];
    let p = dir.path().join("q.gguf");
    std::fs::write(&p, write(&llama_meta("llama", 8, 2, 16), &tensors)).unwrap();
    let f = GgufFile::open(&p).unwrap();
    let a = f.dequantize(&f.tensors["a"]).unwrap();
    assert_eq!(a[0], (0 - 8) as f32 * 0.25);
    assert_eq!(a[16], (15 - 8) as f32 * 0.25);
    let b = f.dequantize(&f.tensors["b"]).unwrap();
    // element l=5 of the first half: q1 from ql[5] low nibble and qh[5] bits 0-1, scale sc[0]
    let (ql, qh, sc) = (&q6k[..128], &q6k[128..192], &q6k[192..208]);
    let q1 = ((ql[5] & 0xf) | ((qh[5] & 3) << 4)) as i32 - 32;
    assert_eq!(b[5], 0.5 * (sc[0] as i8) as f32 * q1 as f32);
    let q4 = ((ql[64 + 32 + 20] >> 4) | (((qh[32 + 20] >> 6) & 3) << 4)) as i32 - 32;
    assert_eq!(
        b[128 + 96 + 20],
        0.5 * (sc[8 + 1 + 6] as i8) as f32 * q4 as f32
    );
}
