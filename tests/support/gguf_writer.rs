//! Writes small GGUF files for tests (metadata + raw tensor blocks).

pub enum Meta {
    Str(String),
    U32(u32),
    F32(f32),
}

pub struct RawTensor {
    pub name: String,
    /// GGUF order (innermost first).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

pub fn write(meta: &[(&str, Meta)], tensors: &[RawTensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        match v {
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ggml_type.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for t in tensors {
        out.extend(&t.data);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    }
    out
}

/// Metadata for a 1-layer llama with the given sizes (no tokenizer).
pub fn llama_meta(arch: &str, hidden: u32, heads: u32, ff: u32) -> Vec<(&'static str, Meta)> {
    vec![
        ("general.architecture", Meta::Str(arch.into())),
        ("llama.embedding_length", Meta::U32(hidden)),
        ("llama.block_count", Meta::U32(1)),
        ("llama.feed_forward_length", Meta::U32(ff)),
        ("llama.attention.head_count", Meta::U32(heads)),
        ("llama.attention.head_count_kv", Meta::U32(heads)),
        ("llama.vocab_size", Meta::U32(32)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
    ]
}
