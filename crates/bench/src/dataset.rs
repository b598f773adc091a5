//! The prompts of a run: random-token prompts of an exact token length (fresh for each seed,
//! so no server answers from a prompt cache filled by an earlier run) or ShareGPT turns.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tpuserve_model::Tokenizer;

use crate::args::{BenchServeArgs, DatasetName};
use crate::BenchError;

#[derive(Clone, Debug)]
pub struct BenchRequest {
    pub prompt: String,
    /// Tokens of `prompt` by the benchmark's tokenizer (special tokens not added).
    pub prompt_len: usize,
    pub output_len: usize,
}

pub fn build(args: &BenchServeArgs, tok: &Tokenizer) -> Result<Vec<BenchRequest>, BenchError> {
    match args.dataset_name {
        DatasetName::Random => random(
            tok,
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.seed,
        ),
        DatasetName::Sharegpt => sharegpt(
            tok,
            args.dataset_path.as_deref().expect("validated"),
            args.num_prompts,
            args.sharegpt_output_len,
            args.seed,
        ),
    }
}

fn scaled(len: usize, ratio: f64, rng: &mut impl Rng) -> usize {
    if ratio == 0.0 {
        return len;
    }
    let lo = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as usize;
    let hi = ((len as f64) * (1.0 + ratio)).ceil() as usize;
    rng.random_range(lo..=hi)
}

/// Prompts of random non-special tokens. Decoding random ids and encoding the text again
/// does not give back the same ids (merges across the seams), so the ids are trimmed or
/// extended until the text encodes to exactly `len` tokens.
pub fn random(
    tok: &Tokenizer,
    n: usize,
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
    seed: u64,
) -> Result<Vec<BenchRequest>, BenchError> {
    let vocab: Vec<u32> = (0..tok.vocab_size() as u32)
        .filter(|&id| !tok.is_special(id))
        .collect();
    if vocab.is_empty() {
        return Err(BenchError::Dataset(
            "the tokenizer has no ordinary tokens".into(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let target = scaled(input_len, range_ratio, &mut rng);
            let out = scaled(output_len, range_ratio, &mut rng);
            let mut ids: Vec<u32> = (0..target)
                .map(|_| vocab[rng.random_range(0..vocab.len())])
                .collect();
            let mut text = tok.decode(&ids, true)?;
            for _ in 0..16 {
                let again = tok.encode(&text, false)?;
                if again.len() == target {
                    break;
                }
                ids = again;
                ids.truncate(target);
                while ids.len() < target {
                    ids.push(vocab[rng.random_range(0..vocab.len())]);
                }
                text = tok.decode(&ids, true)?;
            }
            let prompt_len = tok.encode(&text, false)?.len();
            Ok(BenchRequest {
                prompt: text,
                prompt_len,
                output_len: out,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct Conversation {
    #[serde(alias = "conversation", alias = "messages")]
    conversations: Vec<Turn>,
}

#[derive(Deserialize)]
struct Turn {
    #[serde(alias = "content")]
    value: String,
}

/// ShareGPT entries as vLLM samples them: the first two turns, skipping prompts or answers
/// under 4 tokens, prompts over 1024 and pairs over 2048 tokens; shuffled by the seed.
pub fn sharegpt(
    tok: &Tokenizer,
    path: &Path,
    n: usize,
    output_len: Option<usize>,
    seed: u64,
) -> Result<Vec<BenchRequest>, BenchError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BenchError::Dataset(format!("{}: {e}", path.display())))?;
    let mut entries: Vec<Conversation> = serde_json::from_str(&text).map_err(|e| {
        BenchError::Dataset(format!(
            "{}: not a ShareGPT JSON array of {{\"conversations\": [{{\"value\": …}}, …]}}: {e}",
            path.display()
        ))
    })?;
    entries.retain(|c| c.conversations.len() >= 2);
    entries.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut out = Vec::with_capacity(n);
    for c in entries {
        if out.len() == n {
            break;
        }
        let prompt = &c.conversations[0].value;
        let prompt_len = tok.encode(prompt, false)?.len();
        let answer_len = tok.encode(&c.conversations[1].value, false)?.len();
        let output = output_len.unwrap_or(answer_len);
        if prompt_len < 4 || output < 4 || prompt_len > 1024 || prompt_len + output > 2048 {
            continue;
        }
        out.push(BenchRequest {
            prompt: prompt.clone(),
            prompt_len,
            output_len: output,
        });
    }
    if out.len() < n {
        return Err(BenchError::Dataset(format!(
            "{} holds {} usable conversations, --num-prompts asks for {n}",
            path.display(),
            out.len()
        )));
    }
    Ok(out)
}
