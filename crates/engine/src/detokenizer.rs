//! Incremental detokenization (vLLM / TGI prefix and read offsets): each new token is decoded
//! together with a few tokens before it, and only the text past the earlier decode is emitted.
//! Text ending in U+FFFD is held back, so a multi-byte character whose bytes are spread over
//! several byte-level BPE tokens comes out whole, once its last byte arrives.

use tpuserve_runner_api::TokenId;

/// Context tokens taken from the end of the prompt (vLLM's initial offset): tokenizers that
/// drop a leading space at the start of a decode need to see what came before.
const PROMPT_CONTEXT: usize = 5;

#[derive(Debug, thiserror::Error)]
#[error("detokenization failed: {0}")]
pub struct DecodeError(pub String);

/// What the engine needs from a tokenizer. Implemented for `tpuserve_model::Tokenizer`;
/// tests use small fakes.
pub trait TokenDecoder: Send + Sync {
    fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String, DecodeError>;
    /// The literal text of a special token, `None` for ordinary tokens.
    fn special_token_text(&self, id: TokenId) -> Option<String>;
}

impl TokenDecoder for tpuserve_model::Tokenizer {
    fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String, DecodeError> {
        tpuserve_model::Tokenizer::decode(self, ids, skip_special_tokens)
            .map_err(|e| DecodeError(e.to_string()))
    }

    fn special_token_text(&self, id: TokenId) -> Option<String> {
        if self.is_special(id) {
            self.id_to_token(id)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetokenizeOptions {
    pub skip_special_tokens: bool,
    /// `false`: two special tokens in a row are joined without any space a tokenizer's
    /// decoder might put between them (vLLM's fast-tokenizer semantics).
    pub spaces_between_special_tokens: bool,
}

#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    ids: Vec<TokenId>,
    prefix_offset: usize,
    read_offset: usize,
    opts: DetokenizeOptions,
    last_special: bool,
}

/// The part of `new` past `old`, tolerating an `old` that is not an exact prefix (when the
/// earlier window started in the middle of a character).
fn suffix_after<'a>(old: &str, new: &'a str) -> &'a str {
    if let Some(rest) = new.strip_prefix(old) {
        return rest;
    }
    let common = old
        .char_indices()
        .zip(new.chars())
        .find(|((_, a), b)| a != b)
        .map_or(old.len().min(new.len()), |((i, _), _)| i);
    new.get(common..).unwrap_or("")
}

impl IncrementalDetokenizer {
    pub fn new(prompt: &[TokenId], opts: DetokenizeOptions) -> Self {
        let ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        IncrementalDetokenizer {
            read_offset: ids.len(),
            prefix_offset: 0,
            ids,
            opts,
            last_special: false,
        }
    }

    /// Adds one token; returns the text it completes (possibly empty while a character is
    /// still incomplete or the token is a skipped special token).
    pub fn push(&mut self, dec: &dyn TokenDecoder, token: TokenId) -> Result<String, DecodeError> {
        self.ids.push(token);
        let special = if self.opts.spaces_between_special_tokens || self.opts.skip_special_tokens {
            None
        } else {
            dec.special_token_text(token)
        };
        let after_special = std::mem::replace(&mut self.last_special, special.is_some());
        let prefix = dec.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.opts.skip_special_tokens,
        )?;
        let full = dec.decode(
            &self.ids[self.prefix_offset..],
            self.opts.skip_special_tokens,
        )?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let mut delta = suffix_after(&prefix, &full).to_string();
        if let (Some(raw), true) = (special, after_special) {
            delta = raw;
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Whatever is still held back (an incomplete character at the very end), at finish.
    pub fn flush(&mut self, dec: &dyn TokenDecoder) -> Result<String, DecodeError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = dec.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.opts.skip_special_tokens,
        )?;
        let full = dec.decode(
            &self.ids[self.prefix_offset..],
            self.opts.skip_special_tokens,
        )?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(suffix_after(&prefix, &full).to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Byte-level fake: token ids < 256 are bytes, 1000+ are special tokens `<sN>`, and
    /// 300 + k is the two-byte token for word `k` of a small list.
    pub struct ByteDecoder;

    const WORDS: [&str; 4] = ["ab", "cd", " e", "f."];

    fn bytes_of(id: TokenId) -> Option<Vec<u8>> {
        match id {
            0..=255 => Some(vec![id as u8]),
            300..=303 => Some(WORDS[(id - 300) as usize].as_bytes().to_vec()),
            _ => None,
        }
    }

    impl TokenDecoder for ByteDecoder {
        fn decode(&self, ids: &[TokenId], skip: bool) -> Result<String, DecodeError> {
            let mut out = String::new();
            let mut bytes = Vec::new();
            for &id in ids {
                match bytes_of(id) {
                    Some(b) => bytes.extend(b),
                    None => {
                        out.push_str(&String::from_utf8_lossy(&bytes));
                        bytes.clear();
                        if !skip {
                            out.push_str(&format!("<s{id}>"));
                        }
                    }
                }
            }
            out.push_str(&String::from_utf8_lossy(&bytes));
            Ok(out)
        }

        fn special_token_text(&self, id: TokenId) -> Option<String> {
            (id >= 1000).then(|| format!("<s{id}>"))
        }
    }

    pub fn byte_tokens(s: &str) -> Vec<TokenId> {
        s.bytes().map(TokenId::from).collect()
    }

    fn run(ids: &[TokenId], skip: bool) -> Vec<String> {
        let mut d = IncrementalDetokenizer::new(
            &[104, 105],
            DetokenizeOptions {
                skip_special_tokens: skip,
                spaces_between_special_tokens: true,
            },
        );
        let mut out: Vec<String> = ids
            .iter()
            .map(|&t| d.push(&ByteDecoder, t).unwrap())
            .collect();
        out.push(d.flush(&ByteDecoder).unwrap());
        out
    }

    #[test]
    fn multibyte_character_comes_out_whole() {
        let ids = byte_tokens("a👍b");
        let deltas = run(&ids, true);
        assert_eq!(deltas.concat(), "a👍b");
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
        assert_eq!(deltas[1..4], ["", "", ""]);
        assert_eq!(deltas[4], "👍");
    }

    #[test]
    fn special_tokens_kept_or_skipped() {
        let ids = [300, 1001, 301];
        assert_eq!(run(&ids, false).concat(), "ab<s1001>cd");
        assert_eq!(run(&ids, true).concat(), "abcd");
    }

    #[test]
    fn trailing_incomplete_bytes_flush_at_finish() {
        let ids = &byte_tokens("x👍")[..3];
        let deltas = run(ids, true);
        assert_eq!(deltas[..3].concat(), "x");
        assert_eq!(deltas[3], "\u{FFFD}");
    }

    #[test]
    fn concatenated_deltas_equal_a_full_decode() {
        let ids: Vec<TokenId> = vec![300, 302, 240, 159, 152, 128, 303, 1002, 301];
        let whole = ByteDecoder.decode(&ids, false).unwrap();
        assert_eq!(run(&ids, false).concat(), whole);
    }
}
