//! The model's tokenizer as llguidance sees it: every token id's bytes in a trie, the end
//! tokens, and the tokenizer for text the grammar forces.
//!
//! `toktrie_hf_tokenizers` does the same for its own `tokenizers` release (0.21); the model
//! crate is on 0.22, so the bytes come from llguidance's reader of `tokenizer.json` instead,
//! fed the serialised tokenizer (GGUF-built ones included).

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use tpuserve_model::Tokenizer;

use super::ConstraintError;

struct ModelTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for ModelTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text, false).unwrap_or_default()
        })
    }
}

/// Builds the token environment for a model whose logits have `vocab_size` rows (at least
/// the tokenizer's vocabulary; rows past it are padding that no grammar allows) and whose
/// generation ends on any of `eos`.
pub fn model_tok_env(
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos: &[u32],
) -> Result<TokEnv, ConstraintError> {
    let bad = |m: String| ConstraintError::Tokenizer(m);
    let json = serde_json::to_value(tokenizer.inner()).map_err(|e| bad(e.to_string()))?;
    let mut words =
        llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| bad(format!("{e:#}")))?;
    if words.len() > vocab_size {
        return Err(bad(format!(
            "the tokenizer has {} tokens but the model only {vocab_size} logits",
            words.len()
        )));
    }
    while words.len() < vocab_size {
        // Padding rows: a special marker makes them unreachable from any grammar.
        let mut name = format!(".<[pad{}]>", words.len()).into_bytes();
        name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
        words.push(name);
    }
    let first_eos = *eos
        .first()
        .ok_or_else(|| bad("the model has no end-of-sequence token".into()))?;
    let info = TokRxInfo::new(vocab_size as u32, first_eos);
    let mut trie = TokTrie::from(&info, &words);
    if eos.len() > 1 {
        trie = trie.with_eos_tokens(eos);
    }
    Ok(Arc::new(ModelTokEnv { trie, tokenizer }))
}
