//! Incremental detokenization of a 256-token completion with SmolLM2's tokenizer (the real
//! byte-level BPE from the GGUF): per-token cost of turning ids into streamed text.
//! Run: `cargo bench -p tpuserve-engine --bench detokenizer` (needs scripts/setup.sh's model).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tpuserve_engine::{DetokenizeOptions, IncrementalDetokenizer};

fn bench(c: &mut Criterion) {
    let path = tpuserve_model::locate::smollm2_gguf()
        .expect("SmolLM2 GGUF not found: run scripts/setup.sh");
    let model = tpuserve_model::load_model(&path).expect("load SmolLM2");
    let tok = &model.tokenizer;
    let text = "The quick brown fox jumps over the lazy dog. Ünïcödé, emoji 🦊🐕 and \
                numbers 3.14159 mix with code: fn main() { println!(\"hi\"); } "
        .repeat(8);
    let ids = tok.encode(&text, false).unwrap();
    let ids = &ids[..ids.len().min(256)];
    let prompt = tok.encode("Tell me a story about a fox.", true).unwrap();
    let opts = DetokenizeOptions {
        skip_special_tokens: true,
        spaces_between_special_tokens: true,
    };
    c.bench_function("detokenize_256_tokens", |b| {
        b.iter(|| {
            let mut d = IncrementalDetokenizer::new(&prompt, opts);
            let mut out = String::new();
            for &t in ids {
                out.push_str(&d.push(tok, t).unwrap());
            }
            out.push_str(&d.flush(tok).unwrap());
            black_box(out)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
