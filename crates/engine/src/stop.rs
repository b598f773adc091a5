//! Stop conditions of one child sequence, and the output text they shape: EOS ids of the
//! model, `stop_token_ids`, stop strings matched across token boundaries, `max_tokens` and
//! `max_model_len`. Text that could still turn out to be the start of a stop string is held
//! back from the stream until it is decided.

use std::sync::Arc;

use tpuserve_runner_api::TokenId;

use crate::request::{Finish, FinishReason, StopParams, StopReason};

#[derive(Debug, Clone)]
pub struct StopChecker {
    params: Arc<StopParams>,
    eos: Arc<[TokenId]>,
    /// `max_tokens`, capped by what `max_model_len` leaves after the prompt.
    max_tokens: usize,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    longest_stop: usize,
    /// The output's tokens, kept only for `repetition_detection`.
    tokens: Vec<TokenId>,
}

/// Largest char boundary of `s` at or below `i`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl StopChecker {
    pub fn new(
        params: Arc<StopParams>,
        eos: Arc<[TokenId]>,
        prompt_len: usize,
        max_model_len: usize,
    ) -> Self {
        let room = max_model_len.saturating_sub(prompt_len);
        StopChecker {
            max_tokens: params.max_tokens.map_or(room, |m| m.min(room)),
            longest_stop: params.stop.iter().map(String::len).max().unwrap_or(0),
            params,
            eos,
            text: String::new(),
            emitted: 0,
            tokens: Vec::new(),
        }
    }

    pub fn params(&self) -> &StopParams {
        &self.params
    }

    /// The output text so far (truncated at a matched stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Token-level stop for the `num_output`-th generated token: EOS (unless `ignore_eos`)
    /// or a stop token id, once `min_tokens` are out.
    pub fn check_token(&self, token: TokenId, num_output: usize) -> Option<Finish> {
        if num_output < self.params.min_tokens {
            return None;
        }
        if !self.params.ignore_eos && self.eos.contains(&token) {
            return Some(Finish::new(FinishReason::Stop));
        }
        if self.params.stop_token_ids.contains(&token) {
            return Some(Finish {
                reason: FinishReason::Stop,
                stop_reason: Some(StopReason::Token(token)),
            });
        }
        None
    }

    /// Whether the text of a token that ended the sequence by EOS / stop id is part of the
    /// output (vLLM: only with `include_stop_str_in_output`).
    pub fn keeps_stop_token_text(&self) -> bool {
        self.params.include_stop_str_in_output
    }

    pub fn check_length(&self, num_output: usize) -> Option<Finish> {
        (num_output >= self.max_tokens).then(|| Finish::new(FinishReason::Length))
    }

    /// Records the `num_output`-th generated token for `repetition_detection`; a stop when
    /// the output now ends in a repeated pattern, once `min_tokens` are out (vLLM checks it
    /// last, after the length).
    pub fn check_repetition(&mut self, token: TokenId, num_output: usize) -> Option<Finish> {
        let rep = self.params.repetition?;
        self.tokens.push(token);
        (num_output >= self.params.min_tokens && rep.detects(&self.tokens)).then_some(Finish {
            reason: FinishReason::Repetition,
            stop_reason: Some(StopReason::Repetition),
        })
    }

    /// Appends text without looking for stop strings (the sequence already stopped).
    pub fn append_text(&mut self, delta: &str) {
        self.text.push_str(delta);
    }

    /// Appends decoded text; if it completes a stop string (once `min_tokens` are out),
    /// truncates the text there and reports the stop.
    pub fn push_text(&mut self, delta: &str, num_output: usize) -> Option<Finish> {
        let old_len = self.text.len();
        self.text.push_str(delta);
        if delta.is_empty() || self.params.stop.is_empty() || num_output < self.params.min_tokens {
            return None;
        }
        // Only a match that ends in the new text is new. When the stop string is cut from the
        // output, a match cannot start in text already streamed (held-back text guarantees
        // that, except for matches completed before `min_tokens`, which do not count).
        let mut from = old_len.saturating_sub(self.longest_stop.saturating_sub(1));
        if !self.params.include_stop_str_in_output {
            from = from.max(self.emitted);
        }
        let from = floor_boundary(&self.text, from);
        let (at, stop) = self
            .params
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| (from + i, s)))
            .min_by_key(|(i, _)| *i)?;
        let cut = if self.params.include_stop_str_in_output {
            at + stop.len()
        } else {
            at
        };
        self.text.truncate(cut);
        Some(Finish {
            reason: FinishReason::Stop,
            stop_reason: Some(StopReason::String(stop.clone())),
        })
    }

    /// Text that can be streamed now: everything when finished, otherwise all but the last
    /// `longest stop string − 1` characters, vLLM's fixed hold-back (`stop_buffer_length` of
    /// its incremental detokenizer): the same text in the same chunks as vLLM streams it.
    /// Holding back only a tail that could begin a stop string sent the same text in other
    /// chunks (" 4" where vLLM sends " ", then "4").
    pub fn take_text(&mut self, finished: bool) -> String {
        let end = if finished || self.params.include_stop_str_in_output {
            self.text.len()
        } else {
            self.text.len() - self.held_back()
        };
        if end <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    /// Bytes of the last `longest stop − 1` characters of the text (all of it when shorter).
    fn held_back(&self) -> usize {
        let keep = self
            .params
            .stop
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
            .saturating_sub(1);
        if keep == 0 {
            return 0;
        }
        match self.text.char_indices().rev().nth(keep - 1) {
            Some((i, _)) => self.text.len() - i,
            None => self.text.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(p: StopParams) -> StopChecker {
        StopChecker::new(Arc::new(p), Arc::from(vec![2u32, 7]), 10, 100)
    }

    fn stops(s: &[&str]) -> StopParams {
        StopParams {
            stop: s.iter().map(|x| x.to_string()).collect(),
            max_tokens: None,
            ..Default::default()
        }
    }

    /// Feeds text pieces one token at a time; returns the streamed text and the finish.
    fn stream(c: &mut StopChecker, pieces: &[&str]) -> (Vec<String>, Option<Finish>) {
        let mut out = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let f = c.push_text(p, i + 1);
            out.push(c.take_text(f.is_some()));
            if f.is_some() {
                return (out, f);
            }
        }
        (out, None)
    }

    #[test]
    fn stop_string_across_tokens_is_held_back_then_cut() {
        let mut c = checker(stops(&["STOP"]));
        let (out, f) = stream(&mut c, &["hello S", "T", "OP and more"]);
        // vLLM's chunks: the last three characters held back until decided.
        assert_eq!(out, ["hell", "o", " "]);
        assert_eq!(out.concat(), "hello ");
        assert_eq!(
            f.unwrap().stop_reason,
            Some(StopReason::String("STOP".into()))
        );
    }

    #[test]
    fn false_start_is_released() {
        let mut c = checker(stops(&["STOP"]));
        let (out, f) = stream(&mut c, &["a ST", "ay"]);
        assert!(f.is_none());
        assert_eq!(out, ["a", " S"]);
        assert_eq!(c.take_text(true), "Tay");
    }

    #[test]
    fn include_stop_str_keeps_it_and_drops_the_rest() {
        let mut p = stops(&["\n\n"]);
        p.include_stop_str_in_output = true;
        let mut c = checker(p);
        let (out, f) = stream(&mut c, &["one\n", "\ntwo"]);
        assert!(f.is_some());
        assert_eq!(out.concat(), "one\n\n");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_stops_work() {
        let mut c = checker(stops(&["é!", "b"]));
        let (out, f) = stream(&mut c, &["aé", "!b"]);
        assert_eq!(out.concat(), "a");
        assert_eq!(
            f.unwrap().stop_reason,
            Some(StopReason::String("é!".into()))
        );
    }

    #[test]
    fn token_stops_respect_min_tokens_and_ignore_eos() {
        let mut p = stops(&[]);
        p.min_tokens = 3;
        p.stop_token_ids = vec![9];
        let c = checker(p.clone());
        assert!(c.check_token(2, 2).is_none());
        assert_eq!(c.check_token(7, 3), Some(Finish::new(FinishReason::Stop)));
        assert_eq!(
            c.check_token(9, 4).unwrap().stop_reason,
            Some(StopReason::Token(9))
        );
        p.ignore_eos = true;
        assert!(checker(p).check_token(2, 5).is_none());
    }

    #[test]
    fn length_is_capped_by_max_model_len() {
        let c = checker(StopParams {
            max_tokens: Some(500),
            ..Default::default()
        });
        assert!(c.check_length(89).is_none());
        assert_eq!(c.check_length(90).unwrap().reason, FinishReason::Length);
    }

    #[test]
    fn repetition_detection_follows_vllms_rule() {
        use crate::request::RepetitionDetection;
        let rep = |max, min, count| RepetitionDetection {
            max_pattern_size: max,
            min_pattern_size: min,
            min_count: count,
        };
        // "abcabc" is "abc" twice; "xabcab" is not.
        assert!(rep(3, 0, 2).detects(&[9, 1, 2, 3, 1, 2, 3]));
        assert!(!rep(3, 0, 2).detects(&[9, 1, 2, 3, 1, 2]));
        assert!(!rep(3, 0, 3).detects(&[9, 1, 2, 3, 1, 2, 3]));
        assert!(rep(3, 0, 3).detects(&[1, 2, 3, 1, 2, 3, 1, 2, 3]));
        // A run of one token is a pattern of every length up to max.
        assert!(rep(1, 0, 4).detects(&[5, 7, 7, 7, 7]));
        assert!(!rep(1, 0, 4).detects(&[7, 7, 7, 5]));
        // min_pattern_size skips the shorter patterns (the run of 7s is also 7 7 7 7 as
        // pairs only with 4 more).
        assert!(!rep(2, 2, 2).detects(&[1, 7, 7, 7]));
        assert!(rep(2, 2, 2).detects(&[7, 7, 7, 7]));
        // vLLM stops at the first length whose repeats do not fit in the output.
        assert!(!rep(4, 0, 2).detects(&[1, 2]));
        assert!(!rep(usize::MAX, 0, usize::MAX).detects(&[1, 1, 1]));
        // Disabled forms.
        assert!(!rep(0, 0, 2).detects(&[1, 1, 1]));
        assert!(!rep(2, 0, 1).detects(&[1, 1, 1]));

        let mut c = checker(StopParams {
            min_tokens: 5,
            repetition: Some(rep(1, 0, 3)),
            ..Default::default()
        });
        // Three equal tokens, but min_tokens holds the stop until the fifth.
        for n in 1..=4 {
            assert_eq!(c.check_repetition(7, n), None, "{n}");
        }
        let f = c.check_repetition(7, 5).expect("a stop");
        assert_eq!(f.reason, FinishReason::Repetition);
        assert_eq!(f.stop_reason, Some(StopReason::Repetition));
    }
}
