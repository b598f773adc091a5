//! The engine's gate: every request is checked against the engine's limits (model length,
//! vocabulary, max logprobs, what the sampler implements) and the sampling ranges, and comes
//! out as a [`ValidatedRequest`] — the only thing the engine queues. Nothing a client sends
//! can then make a step fail for the other requests in it. The server only converts JSON
//! into an [`EngineRequest`]; the rules and their (vLLM-worded) messages live here, once.

use tpuserve_runner_api::{SamplingParams, SamplingSupport, TokenId};

use crate::error::RequestError;
use crate::pyfmt::{py_f32, py_ints, vllm_suffix};
use crate::request::{EngineRequest, RequestId};
use crate::structured::Constraint;

/// Most samples one request may ask for (`n`; vLLM's `VLLM_MAX_N_SEQUENCES` policy).
pub const MAX_N: usize = 128;
/// Most stop strings one request may carry (each is matched against every new token's text).
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string, in bytes.
pub const MAX_STOP_STRING_LEN: usize = 1024;

/// What a request is checked against; cheap to copy to the server's side of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Most alternatives `logprobs` / `prompt_logprobs` may ask for (vLLM's `max_logprobs`).
    pub max_logprobs: usize,
    /// What the runner's sampler implements (XLA devices: no penalties or logit bias).
    pub sampling: SamplingSupport,
}

/// A request that passed [`RequestLimits::validate`]. Its fields are private and it has no
/// other constructor, so holding one proves the checks ran (values are also normalised:
/// `top_k` -1 is stored as 0, "off").
#[derive(Debug, Clone)]
pub struct ValidatedRequest(EngineRequest);

impl ValidatedRequest {
    pub fn request(&self) -> &EngineRequest {
        &self.0
    }

    pub fn id(&self) -> RequestId {
        self.0.id
    }

    /// Attaches a compiled structured-output constraint. Allowed after validation because a
    /// [`Constraint`] is built by the engine's own grammar compiler over the model's
    /// tokenizer: it holds no value the limits bound.
    pub fn with_constraint(mut self, constraint: Option<Constraint>) -> Self {
        self.0.constraint = constraint;
        self
    }

    pub(crate) fn into_inner(self) -> EngineRequest {
        self.0
    }
}

fn invalid(param: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError::InvalidParameter {
        param,
        reason: reason.into(),
    }
}

/// A refusal vLLM gives without a parameter (`param: null`).
fn unnamed(field: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError::Unnamed {
        field,
        reason: reason.into(),
    }
}

/// vLLM's message for `param` with its `VLLMValidationError` ending (see `pyfmt`).
fn invalid_named(
    param: &'static str,
    reason: impl std::fmt::Display,
    value: Option<&str>,
) -> RequestError {
    invalid(param, format!("{reason}{}", vllm_suffix(param, value)))
}

/// How [`range`] words its refusal, as vLLM does for that field.
#[derive(Clone, Copy)]
enum Words {
    /// The message alone, naming no parameter.
    Plain,
    /// A value that is not finite is named as such first (`temperature`,
    /// `repetition_penalty`); elsewhere it fails the range like any other value.
    FiniteFirst,
    /// `FiniteFirst`, with the `(parameter=…, value=…)` ending (`temperature`).
    Named,
}

/// `{name} must be {rule}, got {v}.` unless `ok(v)`, `v` printed as Python prints it.
fn range(
    name: &'static str,
    v: f32,
    ok: impl Fn(f32) -> bool,
    rule: &str,
    words: Words,
) -> Result<(), RequestError> {
    let named = matches!(words, Words::Named);
    let msg = |what: &str| {
        let text = format!("{name} must be {what}, got {}.", py_f32(v));
        if named {
            invalid_named(name, text, Some(&py_f32(v)))
        } else {
            unnamed(name, text)
        }
    };
    if !v.is_finite() && !matches!(words, Words::Plain) {
        return Err(msg("a finite number"));
    }
    if !ok(v) {
        return Err(msg(rule));
    }
    Ok(())
}

impl RequestLimits {
    /// A token id as a client may send it (any integer) checked against the vocabulary;
    /// `param` names the field in the error.
    pub fn token(&self, param: &'static str, v: i64) -> Result<TokenId, RequestError> {
        match TokenId::try_from(v) {
            Ok(t) if (t as usize) < self.vocab_size => Ok(t),
            _ => Err(RequestError::TokenOutOfRange {
                param,
                token: v,
                vocab_size: self.vocab_size,
            }),
        }
    }

    /// Token ids a client sent for `param` (`stop_token_ids`, `logit_bias`,
    /// `allowed_token_ids`, `logprob_token_ids`), as vLLM 0.32 checks them: every id outside
    /// the vocabulary named at once, in vLLM's words.
    pub fn token_list(
        &self,
        param: &'static str,
        ids: &[i64],
    ) -> Result<Vec<TokenId>, RequestError> {
        let vocab = self.vocab_size as i64;
        let bad: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|&t| t < 0 || t >= vocab)
            .collect();
        if bad.is_empty() {
            return Ok(ids.iter().map(|&t| t as TokenId).collect());
        }
        let list = py_ints(&bad);
        let text = if param == "allowed_token_ids" {
            "allowed_token_ids contains out-of-vocab token id!".to_string()
        } else {
            format!(
                "token_id(s) {list} in {param} contain out-of-vocab token ids. Vocabulary \
                 size: {vocab}"
            )
        };
        Err(invalid_named(param, text, Some(&list)))
    }

    fn tokens(&self, param: &'static str, ids: &[TokenId]) -> Result<(), RequestError> {
        match ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(&t) if param == "prompt" => Err(RequestError::TokenOutOfRange {
                param,
                token: t.into(),
                vocab_size: self.vocab_size,
            }),
            Some(_) => {
                let wide: Vec<i64> = ids.iter().map(|&t| t.into()).collect();
                self.token_list(param, &wide).map(|_| ())
            }
            None => Ok(()),
        }
    }

    /// The engine's gate: every rule a request must meet before it may be queued.
    pub fn validate(&self, mut req: EngineRequest) -> Result<ValidatedRequest, RequestError> {
        let prompt_len = req.prompt_token_ids.len();
        if prompt_len == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        self.tokens("prompt", &req.prompt_token_ids)?;
        if req.n < 1 {
            return Err(unnamed(
                "n",
                format!("n must be at least 1, got {}.", req.n),
            ));
        }
        if req.n > MAX_N {
            return Err(unnamed(
                "n",
                format!("n must be at most {MAX_N}, got {}.", req.n),
            ));
        }
        if let Some(b) = req.best_of.filter(|&b| b != req.n) {
            // vLLM V1 dropped best_of; only the value that changes nothing is accepted.
            return Err(invalid(
                "best_of",
                format!(
                    "best_of ({b}) different from n ({}) is not supported.",
                    req.n
                ),
            ));
        }
        self.validate_sampling(&mut req.sampling)?;
        req.stop.max_tokens = Some(self.max_tokens(&req)?);
        self.validate_stop(&req)?;
        if let Some(param) = self
            .sampling
            .unsupported(&req.sampling, req.stop.min_tokens)
        {
            return Err(invalid(
                param,
                format!(
                    "{param} is not supported on XLA devices (TPU, GPU, xla-cpu) yet; use \
                     --device cpu for it"
                ),
            ));
        }
        Ok(ValidatedRequest(req))
    }

    /// The tokens the request may generate, as vLLM 0.32 (`get_max_tokens`): a prompt longer
    /// than the context is refused (`input_tokens`), a `max_tokens` beyond the context too, and
    /// otherwise the answer may run to the end of the context — `max_tokens` (none: no limit)
    /// capped there, the answer then ending with `length`.
    fn max_tokens(&self, req: &EngineRequest) -> Result<usize, RequestError> {
        let (prompt_len, ctx) = (req.prompt_token_ids.len(), self.max_model_len);
        if let Some(m) = req.stop.max_tokens.filter(|&m| m > ctx) {
            return Err(invalid_named(
                "max_tokens",
                format!(
                    "max_tokens={m} cannot be greater than max_model_len={ctx}. Please request \
                     fewer output tokens."
                ),
                Some(&m.to_string()),
            ));
        }
        if req.stop.max_tokens == Some(0) {
            return Err(invalid_named(
                "max_tokens",
                "max_tokens must be at least 1, got 0.",
                Some("0"),
            ));
        }
        if prompt_len > ctx {
            return Err(invalid_named(
                "input_tokens",
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your prompt \
                     contains {prompt_len} input tokens, which exceeds this limit even without \
                     any output tokens. Please reduce the length of the input prompt."
                ),
                Some(&prompt_len.to_string()),
            ));
        }
        if prompt_len == ctx {
            // vLLM 0.32's input processor: no room for even one output token.
            return Err(invalid(
                "input_tokens",
                format!(
                    "The decoder prompt (length {prompt_len}) plus the number of requested \
                     output tokens (at least 1) is longer than the maximum model length of \
                     {ctx}. Make sure that `max_model_len` is no smaller than the number of \
                     text tokens (prompt + requested output tokens)."
                ),
            ));
        }
        Ok(req.stop.max_tokens.unwrap_or(ctx).min(ctx - prompt_len))
    }

    fn validate_stop(&self, req: &EngineRequest) -> Result<(), RequestError> {
        let stop = &req.stop;
        if let Some(m) = stop.max_tokens.filter(|&m| stop.min_tokens > m) {
            return Err(unnamed(
                "min_tokens",
                format!(
                    "min_tokens must be less than or equal to max_tokens={m}, got {}.",
                    stop.min_tokens
                ),
            ));
        }
        if stop.stop.len() > MAX_STOP_STRINGS {
            return Err(invalid(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings are allowed."),
            ));
        }
        if stop
            .stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_STRING_LEN)
        {
            return Err(invalid(
                "stop",
                format!("stop strings must be non-empty and at most {MAX_STOP_STRING_LEN} bytes."),
            ));
        }
        self.tokens("stop_token_ids", &stop.stop_token_ids)
    }

    fn validate_sampling(&self, p: &mut SamplingParams) -> Result<(), RequestError> {
        // vLLM 0.32's `SamplingParams._verify_args`, in its order and words.
        for (name, v) in [
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
        ] {
            range(
                name,
                v,
                |v| (-2.0..=2.0).contains(&v),
                "in [-2, 2]",
                Words::Plain,
            )?;
        }
        range(
            "repetition_penalty",
            p.repetition_penalty,
            |v| v > 0.0,
            "greater than zero",
            Words::FiniteFirst,
        )?;
        let t = p.temperature;
        range("temperature", t, |v| v >= 0.0, "non-negative", Words::Named)?;
        range("temperature", t, |v| v <= 2.0, "in [0, 2]", Words::Named)?;
        // vLLM names top_p's value but has no finiteness check of its own for it.
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            let v = py_f32(p.top_p);
            return Err(invalid_named(
                "top_p",
                format!("top_p must be in (0, 1], got {v}."),
                Some(&v),
            ));
        }
        if p.top_k < -1 {
            return Err(unnamed(
                "top_k",
                format!("top_k must be 0 (disable), or at least 1, got {}.", p.top_k),
            ));
        }
        range(
            "min_p",
            p.min_p,
            |v| (0.0..=1.0).contains(&v),
            "in [0, 1]",
            Words::Plain,
        )?;
        // -1 and 0 both mean off, and so does a k that keeps the whole vocabulary (vLLM
        // takes any k); the samplers see one spelling.
        if p.top_k < 0 || p.top_k as i64 >= self.vocab_size as i64 {
            p.top_k = 0;
        }
        // vLLM 0.32's words (`SamplingParams._validate_logprobs`).
        for (name, what, n) in [
            ("logprobs", "sample", p.logprobs),
            ("prompt_logprobs", "prompt", p.prompt_logprobs),
        ] {
            if let Some(n) = n.filter(|&n| n > self.max_logprobs) {
                return Err(invalid_named(
                    name,
                    format!(
                        "Requested {what} logprobs of {n}, which is greater than max allowed: {}",
                        self.max_logprobs
                    ),
                    Some(&n.to_string()),
                ));
            }
        }
        if let Some(&(t, b)) = p.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return Err(invalid(
                "logit_bias",
                format!("logit_bias values must be finite (token {t}: {b})"),
            ));
        }
        let biased: Vec<TokenId> = p.logit_bias.iter().map(|&(t, _)| t).collect();
        self.tokens("logit_bias", &biased)?;
        self.tokens("allowed_token_ids", &p.allowed_tokens)?;
        self.tokens("logprob_token_ids", &p.logprob_token_ids)?;
        let words: Vec<TokenId> = p.bad_words.iter().flatten().copied().collect();
        self.tokens("bad_words", &words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::StopParams;

    const LIMITS: RequestLimits = RequestLimits {
        max_model_len: 100,
        vocab_size: 50,
        max_logprobs: 20,
        sampling: SamplingSupport::Full,
    };

    fn check(l: &RequestLimits, r: &EngineRequest) -> Result<(), RequestError> {
        l.validate(r.clone()).map(|_| ())
    }

    fn req(prompt_len: usize, max_tokens: Option<usize>) -> EngineRequest {
        EngineRequest::new(
            vec![1; prompt_len],
            SamplingParams::greedy(),
            StopParams {
                max_tokens,
                ..Default::default()
            },
        )
    }

    /// vLLM 0.32's `get_max_tokens`: the answer may run to the end of the context.
    #[test]
    fn max_tokens_is_capped_at_the_context_as_vllm() {
        let max = |p, m| {
            LIMITS
                .validate(req(p, m))
                .map(|v| v.0.stop.max_tokens)
                .map_err(|e| match e {
                    RequestError::InvalidParameter { param, reason } => (param, reason),
                    other => panic!("{other:?}"),
                })
        };
        assert_eq!(max(90, Some(10)), Ok(Some(10)));
        assert_eq!(max(90, Some(11)), Ok(Some(10)));
        assert_eq!(max(90, None), Ok(Some(10)));
        assert_eq!(max(99, Some(100)), Ok(Some(1)));
        let (param, msg) = max(101, Some(1)).unwrap_err();
        assert_eq!(param, "input_tokens");
        assert!(msg.starts_with("This model's maximum context length is 100 tokens. However, your prompt contains 101 input tokens"), "{msg}");
        assert!(
            msg.ends_with(" (parameter=input_tokens, value=101)"),
            "{msg}"
        );
        // A prompt that fills the context leaves no room for one token (vLLM's input
        // processor's words, without a parameter ending).
        let (param, msg) = max(100, None).unwrap_err();
        assert_eq!(param, "input_tokens");
        assert!(msg.starts_with("The decoder prompt (length 100) plus the number of requested output tokens (at least 1)"), "{msg}");
        let (param, msg) = max(3, Some(101)).unwrap_err();
        assert_eq!(param, "max_tokens");
        assert_eq!(msg, "max_tokens=101 cannot be greater than max_model_len=100. Please request fewer output tokens. (parameter=max_tokens, value=101)");
        assert_eq!(
            max(3, Some(0)).unwrap_err().1,
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
        );
    }

    #[test]
    fn device_samplers_refuse_what_they_cannot_honour_by_name() {
        let device = RequestLimits {
            sampling: SamplingSupport::OnDevice,
            ..LIMITS
        };
        let mut r = req(3, Some(4));
        r.sampling.temperature = 0.8;
        r.sampling.top_k = 5;
        r.sampling.top_p = 0.9;
        r.sampling.min_p = 0.05;
        assert!(check(&device, &r).is_ok());
        let param = |r: &EngineRequest| match check(&device, r) {
            Err(RequestError::InvalidParameter { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        let mut p = r.clone();
        p.sampling.frequency_penalty = 0.5;
        assert_eq!(param(&p), "frequency_penalty");
        let mut p = r.clone();
        p.sampling.logit_bias = vec![(3, 1.0)];
        assert_eq!(param(&p), "logit_bias");
        let mut p = r.clone();
        p.sampling.allowed_tokens = vec![3];
        assert_eq!(param(&p), "allowed_token_ids");
        let mut p = r.clone();
        p.sampling.logprob_token_ids = vec![3];
        assert_eq!(param(&p), "logprob_token_ids");
        p.sampling.logprob_token_ids = vec![1_000_000];
        assert!(check(&LIMITS, &p).is_err(), "ids of the vocabulary");
        let mut p = r.clone();
        p.sampling.bad_words = vec![vec![3, 4]];
        assert_eq!(param(&p), "bad_words");
        assert!(check(&LIMITS, &p).is_ok());
        p.sampling.bad_words = vec![vec![3, 1_000_000]];
        assert!(
            check(&LIMITS, &p).is_err(),
            "bad words are token ids of the vocabulary"
        );
        let mut p = r.clone();
        p.stop.min_tokens = 2;
        assert_eq!(param(&p), "min_tokens");
        assert!(check(&LIMITS, &p).is_ok(), "the host sampler has them all");
    }

    /// The rules the server used to hold alone (issue 18: one gate, in the engine).
    #[test]
    fn the_engine_owns_every_limit_rule() {
        let refused = |f: &dyn Fn(&mut EngineRequest)| {
            let mut r = req(3, Some(4));
            f(&mut r);
            check(&LIMITS, &r).is_err()
        };
        assert!(refused(&|r| r.n = 129), "n above the policy maximum");
        assert!(refused(&|r| r.sampling.top_k = -2), "top_k below -1");
        assert!(
            refused(&|r| r.sampling.repetition_penalty = 0.0),
            "repetition_penalty not above 0"
        );
        assert!(
            !refused(&|r| r.sampling.repetition_penalty = 3.0),
            "repetition_penalty has no upper bound in vLLM 0.32"
        );
        assert!(
            refused(&|r| r.sampling.temperature = 2.5),
            "temperature above 2 (vLLM 0.32)"
        );
        assert!(
            refused(&|r| r.stop.stop = vec!["x".into(); 65]),
            "too many stop strings"
        );
        assert!(
            refused(&|r| r.stop.stop = vec!["x".repeat(1025)]),
            "a stop string too long"
        );
        assert!(
            refused(&|r| r.stop.stop_token_ids = vec![50]),
            "stop token out of vocab"
        );
        assert!(refused(&|r| r.best_of = Some(2)), "best_of other than n");
        assert!(
            refused(&|r| r.sampling.temperature = f32::INFINITY),
            "temperature overflowed"
        );
        assert!(
            !refused(&|r| r.best_of = Some(1)),
            "best_of equal to n changes nothing"
        );
        let top_k = |k| {
            let mut r = req(3, Some(4));
            r.sampling.top_k = k;
            LIMITS.validate(r).unwrap().request().sampling.top_k
        };
        assert_eq!(top_k(-1), 0, "-1 (off) is normalised to 0");
        assert_eq!(top_k(49), 49);
        assert_eq!(top_k(50), 0, "a k that keeps the whole vocabulary is off");
        assert_eq!(top_k(1_000_000), 0, "vLLM takes any k");
        assert_eq!(
            LIMITS.token("prompt", -1),
            Err(RequestError::TokenOutOfRange {
                param: "prompt",
                token: -1,
                vocab_size: 50
            })
        );
        assert_eq!(LIMITS.token("prompt", 49), Ok(49));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert_eq!(
            check(&LIMITS, &req(0, None)),
            Err(RequestError::EmptyPrompt)
        );
        let mut r = req(3, Some(4));
        r.prompt_token_ids[1] = 50;
        assert!(matches!(
            check(&LIMITS, &r),
            Err(RequestError::TokenOutOfRange { token: 50, .. })
        ));
        let mut r = req(3, Some(4));
        r.sampling.top_p = 0.0;
        assert!(check(&LIMITS, &r).is_err());
        let mut r = req(3, Some(4));
        r.sampling.logprobs = Some(21);
        assert!(check(&LIMITS, &r).is_err());
        let mut r = req(3, Some(4));
        r.stop.min_tokens = 5;
        assert!(check(&LIMITS, &r).is_err());
        let mut r = req(3, Some(4));
        r.n = 0;
        assert!(check(&LIMITS, &r).is_err());
    }

    /// vLLM 0.32's messages, values printed as Python prints them, with its
    /// `VLLMValidationError` ending where vLLM raises one.
    #[test]
    fn refusals_are_worded_as_vllm_words_them() {
        let msg = |f: &dyn Fn(&mut EngineRequest)| {
            let mut r = req(3, Some(4));
            f(&mut r);
            check(&LIMITS, &r).unwrap_err().to_string()
        };
        type Edit = dyn Fn(&mut EngineRequest);
        let cases: [(&Edit, &str); 11] = [
            (
                &|r| r.sampling.temperature = -1.0,
                "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)",
            ),
            (
                &|r| r.sampling.temperature = 2.5,
                "temperature must be in [0, 2], got 2.5. (parameter=temperature, value=2.5)",
            ),
            (
                &|r| r.sampling.temperature = f32::INFINITY,
                "temperature must be a finite number, got inf. (parameter=temperature, value=inf)",
            ),
            (
                &|r| r.sampling.top_p = 0.0,
                "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)",
            ),
            (
                &|r| r.sampling.presence_penalty = 3.0,
                "presence_penalty must be in [-2, 2], got 3.0.",
            ),
            (
                &|r| r.sampling.repetition_penalty = -0.5,
                "repetition_penalty must be greater than zero, got -0.5.",
            ),
            (
                &|r| r.sampling.min_p = 1.5,
                "min_p must be in [0, 1], got 1.5.",
            ),
            (
                &|r| r.sampling.top_k = -3,
                "top_k must be 0 (disable), or at least 1, got -3.",
            ),
            (
                &|r| r.sampling.logprobs = Some(21),
                "Requested sample logprobs of 21, which is greater than max allowed: 20 \
             (parameter=logprobs, value=21)",
            ),
            (
                &|r| r.stop.stop_token_ids = vec![50, 3, 60],
                "token_id(s) [50, 60] in stop_token_ids contain out-of-vocab token ids. Vocabulary \
             size: 50 (parameter=stop_token_ids, value=[50, 60])",
            ),
            (
                &|r| r.sampling.allowed_tokens = vec![70],
                "allowed_token_ids contains out-of-vocab token id! (parameter=allowed_token_ids, \
             value=[70])",
            ),
        ];
        for (f, want) in cases {
            assert_eq!(msg(f), want);
        }
        assert_eq!(
            LIMITS
                .token_list("logit_bias", &[-1, 4, 50])
                .unwrap_err()
                .to_string(),
            "token_id(s) [-1, 50] in logit_bias contain out-of-vocab token ids. Vocabulary \
             size: 50 (parameter=logit_bias, value=[-1, 50])"
        );
        assert_eq!(LIMITS.token_list("logit_bias", &[0, 49]), Ok(vec![0, 49]));
        assert_eq!(
            msg(&|r| r.prompt_token_ids[0] = 99),
            "Token id 99 is out of vocabulary"
        );
    }
}
