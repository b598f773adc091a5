//! Host-side sampling in vLLM's order: logit bias and penalties on the logits, logprobs from the
//! raw logits, then temperature → min-p → top-k → top-p → draw. Used by the CPU runner and as the
//! reference for the on-device sampler.

use rand::Rng;

use crate::TokenId;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 or -1 means off.
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Token ids that may not be sampled yet (EOS while `min_tokens` is unmet).
    pub banned_tokens: Vec<TokenId>,
    /// `allowed_token_ids`: when not empty, the only tokens that may be sampled.
    pub allowed_tokens: Vec<TokenId>,
    /// `bad_words`, tokenised: a word's last token may not follow the output's tokens when
    /// they end with the word's other tokens (vLLM's rule; a one-token word never).
    pub bad_words: Vec<Vec<TokenId>>,
    pub seed: Option<u64>,
    /// Number of top alternatives to report with each sampled token (`logprobs`).
    pub logprobs: Option<usize>,
    /// vLLM's `logprob_token_ids`: with `logprobs`, each sampled token reports these tokens'
    /// logprobs instead of the top alternatives (see [`listed_logprobs`]).
    pub logprob_token_ids: Vec<TokenId>,
    /// Number of top alternatives to report for each prompt position (`prompt_logprobs`).
    pub prompt_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            banned_tokens: Vec::new(),
            allowed_tokens: Vec::new(),
            bad_words: Vec::new(),
            seed: None,
            logprobs: None,
            logprob_token_ids: Vec::new(),
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// Whether [`apply_processors`] can change any logit.
    fn has_processors(&self) -> bool {
        !self.allowed_tokens.is_empty()
            || !self.bad_words.is_empty()
            || !self.logit_bias.is_empty()
            || !self.banned_tokens.is_empty()
            || self.has_penalties()
    }
}

/// A token's logprob under the raw model distribution, its rank (1 = most likely) and the top-n.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: TokenId,
    pub logprob: f32,
    pub rank: usize,
    pub top: Vec<(TokenId, f32)>,
}

/// log-softmax in f64 for accuracy over large vocabularies.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Indices of the `n` largest values, largest first (ties by lower index).
pub fn top_n(values: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| {
        values[*b]
            .partial_cmp(&values[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_by(cmp);
    idx
}

/// The index of the largest value, the lowest such index on ties (as `top_n(values, 1)`):
/// greedy decoding's pick, where `top_n` would index and partition the whole vocabulary for
/// every sampled row. NaNs are skipped; 0 when there is nothing else.
///
/// Two passes that vectorise (the largest value in 16 lanes, then its first index): the
/// one-pass scan with its index kept was a compare and branch a value, ~2 % of a 32-row
/// greedy decode step over SmolLM2's 49,152 logits a row.
pub fn argmax(values: &[f32]) -> usize {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = values.chunks_exact(L);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            // `v > m` is false for a NaN, so NaNs are skipped (`maxps` in the vector form).
            *m = if v > *m { v } else { *m };
        }
    }
    let mut top = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        if v > top {
            top = v;
        }
    }
    // The first value equal to the largest; none (all NaN, or empty) gives 0.
    values.iter().position(|&v| v == top).unwrap_or(0)
}

/// `token`'s logprob and rank under the raw logits, with `alternatives` (ids) beside it.
fn logprobs_with(
    logits: &[f32],
    token: TokenId,
    alternatives: impl IntoIterator<Item = TokenId>,
) -> TokenLogprobs {
    let lsm = log_softmax(logits);
    let chosen = logits[token as usize];
    TokenLogprobs {
        token,
        logprob: lsm[token as usize] as f32,
        rank: 1 + logits.iter().filter(|&&l| l > chosen).count(),
        top: alternatives
            .into_iter()
            .map(|i| (i, lsm[i as usize] as f32))
            .collect(),
    }
}

/// The logprob, rank and top-`n` of `token` under the raw logits.
pub fn token_logprobs(logits: &[f32], token: TokenId, n: usize) -> TokenLogprobs {
    logprobs_with(
        logits,
        token,
        top_n(logits, n).into_iter().map(|i| i as TokenId),
    )
}

/// `token`'s logprob and rank under the raw logits, with `ids` as its alternatives, as vLLM
/// reports `logprob_token_ids`: the sampled token first, then each listed id once in the
/// order given (the sampled one is not repeated).
pub fn listed_logprobs(logits: &[f32], token: TokenId, ids: &[TokenId]) -> TokenLogprobs {
    let mut listed = vec![token];
    for &id in ids {
        if !listed.contains(&id) {
            listed.push(id);
        }
    }
    logprobs_with(logits, token, listed)
}

/// Applies `allowed_token_ids`, `bad_words`, logit bias, banned tokens and presence /
/// frequency / repetition penalties in place (the first two only ever set -inf, so their order
/// with the others does not matter).
pub fn apply_processors(
    logits: &mut [f32],
    p: &SamplingParams,
    prompt: &[TokenId],
    output: &[TokenId],
) {
    if !p.allowed_tokens.is_empty() {
        // The allowed few kept, everything else -inf.
        let kept: Vec<(usize, f32)> = p
            .allowed_tokens
            .iter()
            .filter_map(|&t| logits.get(t as usize).map(|&l| (t as usize, l)))
            .collect();
        logits.fill(f32::NEG_INFINITY);
        for (i, l) in kept {
            logits[i] = l;
        }
    }
    for word in &p.bad_words {
        let Some((&last, prefix)) = word.split_last() else {
            continue;
        };
        if output.ends_with(prefix) {
            if let Some(l) = logits.get_mut(last as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    for &(t, b) in &p.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    for &t in &p.banned_tokens {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    if !p.has_penalties() {
        return;
    }
    let mut counts = std::collections::HashMap::<TokenId, u32>::new();
    for &t in output {
        *counts.entry(t).or_default() += 1;
    }
    if p.repetition_penalty != 1.0 {
        let mut seen: std::collections::HashSet<TokenId> = prompt.iter().copied().collect();
        seen.extend(counts.keys().copied());
        for t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    for (&t, &c) in &counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
        }
    }
}

/// The probabilities the random sampler draws from, after temperature, min-p, top-k and top-p,
/// as (token, probability) sorted by decreasing probability. Exposed for tests.
pub fn filtered_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(TokenId, f64)> {
    let t = p.temperature.max(1e-5);
    let scaled: Vec<f32> = logits.iter().map(|&l| l / t).collect();
    let mut keep: Vec<usize> = (0..scaled.len())
        .filter(|&i| scaled[i].is_finite())
        .collect();
    if keep.is_empty() {
        return Vec::new();
    }
    let softmax_of = |ids: &[usize]| -> Vec<f64> {
        let m = ids.iter().fold(f32::NEG_INFINITY, |a, &i| a.max(scaled[i])) as f64;
        let e: Vec<f64> = ids.iter().map(|&i| (scaled[i] as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    };
    if p.min_p > 0.0 {
        let probs = softmax_of(&keep);
        let max = probs.iter().cloned().fold(0.0, f64::max);
        let thresh = p.min_p as f64 * max;
        keep = keep
            .into_iter()
            .zip(probs)
            .filter(|(_, pr)| *pr >= thresh)
            .map(|(i, _)| i)
            .collect();
    }
    if p.top_k > 0 && (p.top_k as usize) < keep.len() {
        let vals: Vec<f32> = keep.iter().map(|&i| scaled[i]).collect();
        let kth = vals[top_n(&vals, p.top_k as usize)[p.top_k as usize - 1]];
        keep.retain(|&i| scaled[i] >= kth);
    }
    // Ascending by logit: top-p drops the low tail whose cumulative mass is <= 1 - top_p.
    keep.sort_by(|&a, &b| {
        scaled[a]
            .partial_cmp(&scaled[b])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.cmp(&a))
    });
    let mut probs = softmax_of(&keep);
    if p.top_p < 1.0 {
        let limit = 1.0 - p.top_p as f64;
        let mut cum = 0.0;
        let mut first_kept = 0;
        for (j, pr) in probs.iter().enumerate() {
            cum += pr;
            if cum <= limit && j + 1 < probs.len() {
                first_kept = j + 1;
            } else {
                break;
            }
        }
        keep.drain(..first_kept);
        probs = softmax_of(&keep);
    }
    let mut out: Vec<(TokenId, f64)> = keep.into_iter().map(|i| i as TokenId).zip(probs).collect();
    out.reverse();
    out
}

/// A uniform number in [0, 1) that depends only on (seed, step): a seeded request draws the
/// same numbers whatever else shares its batch.
pub fn seeded_uniform(seed: u64, step: u64) -> f64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..2 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Picks the next token. `step` is the number of tokens this sequence generated before.
pub fn sample(
    raw_logits: &[f32],
    p: &SamplingParams,
    prompt: &[TokenId],
    output: &[TokenId],
    step: u64,
) -> (TokenId, Option<TokenLogprobs>) {
    sample_masked(raw_logits, None, p, prompt, output, step)
}

/// [`sample`] under a structured-output mask. As in vLLM, the mask applies to the logits the
/// sampler and the logprobs see. When bans (`min_tokens`) leave the grammar no token, the
/// grammar wins: the bans are dropped for this draw.
pub fn sample_masked(
    raw_logits: &[f32],
    mask: Option<&[u32]>,
    p: &SamplingParams,
    prompt: &[TokenId],
    output: &[TokenId],
    step: u64,
) -> (TokenId, Option<TokenLogprobs>) {
    let masked;
    let raw_logits = match mask {
        Some(m) => {
            let mut l = raw_logits.to_vec();
            crate::masks::apply_mask(&mut l, m);
            masked = l;
            &masked[..]
        }
        None => raw_logits,
    };
    // A copy only when a processor changes the logits (greedy rows without any read them in
    // place: copying 49,152 logits a row was most of their sampling time).
    let processed;
    let logits = if p.has_processors() {
        let mut l = raw_logits.to_vec();
        apply_processors(&mut l, p, prompt, output);
        if mask.is_some() && !l.iter().any(|l| l.is_finite()) {
            l.copy_from_slice(raw_logits);
            let unbanned = SamplingParams {
                banned_tokens: Vec::new(),
                ..p.clone()
            };
            apply_processors(&mut l, &unbanned, prompt, output);
        }
        processed = l;
        &processed[..]
    } else {
        raw_logits
    };
    let token = if p.is_greedy() {
        argmax(logits) as TokenId
    } else {
        let dist = filtered_distribution(logits, p);
        let u = match p.seed {
            Some(seed) => seeded_uniform(seed, step),
            None => rand::rng().random::<f64>(),
        };
        let mut cum = 0.0;
        let mut chosen = dist.last().map(|d| d.0).unwrap_or(0);
        for &(t, pr) in &dist {
            cum += pr;
            if u < cum {
                chosen = t;
                break;
            }
        }
        chosen
    };
    let lp = p.logprobs.map(|n| match p.logprob_token_ids.as_slice() {
        [] => token_logprobs(raw_logits, token, n),
        ids => listed_logprobs(raw_logits, token, ids),
    });
    (token, lp)
}

#[cfg(test)]
mod tests {
    #[test]
    fn argmax_is_top_n_of_one() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for n in [1usize, 2, 7, 100, 49_152] {
            let mut v: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Few distinct values, so that ties are common.
                    ((x % 11) as f32 - 5.0) * 0.5
                })
                .collect();
            assert_eq!(argmax(&v), top_n(&v, 1)[0], "n={n}");
            v[n / 2] = f32::INFINITY;
            assert_eq!(argmax(&v), n / 2);
            v[0] = f32::NAN;
            assert_eq!(argmax(&v), n / 2);
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NAN, -1.0, 3.0, 3.0]), 2);
        assert_eq!(argmax(&[]), 0);
    }

    use super::*;

    #[test]
    fn greedy_takes_argmax_and_reports_raw_logprobs() {
        let logits = [1.0, 3.0, 2.0];
        let p = SamplingParams {
            logprobs: Some(2),
            ..Default::default()
        };
        let (t, lp) = sample(&logits, &p, &[], &[], 0);
        assert_eq!(t, 1);
        let lp = lp.unwrap();
        assert_eq!(lp.rank, 1);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let expect = 3.0 - (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((lp.logprob as f64 - expect).abs() < 1e-6);
    }

    #[test]
    fn logprob_token_ids_replace_the_top_alternatives() {
        let logits = [1.0, 3.0, 2.0, 0.5];
        let lsm = log_softmax(&logits);
        let p = SamplingParams {
            logprobs: Some(1),
            logprob_token_ids: vec![3, 0, 1, 3],
            ..Default::default()
        };
        let (t, lp) = sample(&logits, &p, &[], &[], 0);
        assert_eq!(t, 1);
        let lp = lp.unwrap();
        // The sampled token first, then each listed id once (the sampled one not again).
        let ids: Vec<u32> = lp.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 3, 0]);
        for &(id, v) in &lp.top {
            assert!((v as f64 - lsm[id as usize]).abs() < 1e-6);
        }
        assert_eq!((lp.token, lp.rank), (1, 1));
        // A sampled token outside the list keeps its true rank.
        let p = SamplingParams {
            logprobs: Some(0),
            logprob_token_ids: vec![3],
            logit_bias: vec![(2, 10.0)],
            ..Default::default()
        };
        let (t, lp) = sample(&logits, &p, &[], &[], 0);
        let lp = lp.unwrap();
        assert_eq!((t, lp.rank), (2, 2));
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn top_k_and_top_p_trim_the_tail() {
        let logits = [0.0, 1.0, 2.0, 3.0, 4.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 0.8,
            ..Default::default()
        };
        let d = filtered_distribution(&logits, &p);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 3]);
        assert!((d.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn allowed_tokens_keep_only_those_and_logprobs_stay_raw() {
        let logits = [5.0, 1.0, 3.0, 2.0, 4.0];
        let p = SamplingParams {
            allowed_tokens: vec![1, 3],
            logprobs: Some(1),
            ..Default::default()
        };
        let (t, lp) = sample(&logits, &p, &[], &[], 0);
        assert_eq!(t, 3);
        // vLLM's raw logprobs: the model's distribution, not the restricted one.
        assert_eq!(lp.unwrap().rank, 4);
        let random = SamplingParams {
            temperature: 1.0,
            ..p.clone()
        };
        for step in 0..200 {
            let (t, _) = sample(
                &logits,
                &SamplingParams {
                    seed: Some(9),
                    ..random.clone()
                },
                &[],
                &[],
                step,
            );
            assert!(t == 1 || t == 3, "{t}");
        }
        let d = filtered_distribution(
            &{
                let mut l = logits.to_vec();
                apply_processors(&mut l, &random, &[], &[]);
                l
            },
            &random,
        );
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 1]);
    }

    #[test]
    fn bad_words_ban_their_last_token_after_their_prefix() {
        let p = SamplingParams {
            bad_words: vec![vec![2], vec![7, 8, 4]],
            ..Default::default()
        };
        let logits = |out: &[TokenId]| {
            let mut l = vec![0.0f32; 10];
            apply_processors(&mut l, &p, &[], out);
            l
        };
        // A one-token word: never.
        assert_eq!(logits(&[])[2], f32::NEG_INFINITY);
        // A longer word: its last token only after the rest of it, in the output.
        assert!(logits(&[])
            .iter()
            .enumerate()
            .all(|(i, &l)| i == 2 || l == 0.0));
        assert_eq!(logits(&[7, 8])[4], f32::NEG_INFINITY);
        assert_eq!(logits(&[1, 7, 8])[4], f32::NEG_INFINITY);
        assert_eq!(logits(&[8, 7])[4], 0.0);
        assert_eq!(logits(&[7, 8, 1])[4], 0.0);
        assert_eq!(logits(&[8])[4], 0.0);
    }

    #[test]
    fn seeded_draws_repeat() {
        assert_eq!(seeded_uniform(7, 3), seeded_uniform(7, 3));
        assert_ne!(seeded_uniform(7, 3), seeded_uniform(7, 4));
    }

    #[test]
    fn penalties_follow_vllm_semantics() {
        let mut l = vec![2.0, -2.0, 1.0];
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..Default::default()
        };
        apply_processors(&mut l, &p, &[0], &[1, 1]);
        assert_eq!(l, vec![1.0, -4.0 - 1.0 - 0.25, 1.0]);
    }
}
