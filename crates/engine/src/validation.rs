//! The engine's gate: every request is checked against the engine's limits (model length,
//! vocabulary, max logprobs, what the sampler implements) and the sampling ranges, and comes
//! out as a [`ValidatedRequest`] — the only thing the engine queues. Nothing a client sends
//! can then make a step fail for the other requests in it. The server only converts JSON
//! into an [`EngineRequest`]; the rules and their (vLLM-worded) messages live here, once.

use tpuserve_runner_api::{SamplingParams, SamplingSupport, TokenId};

use crate::error::RequestError;
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

/// `{name} must be {rule}, got {v}.` unless `ok(v)`; a value that is not finite (a JSON
/// number that overflowed the engine's f32) is named as such first.
fn range(
    name: &'static str,
    v: f32,
    ok: impl Fn(f32) -> bool,
    rule: &str,
) -> Result<(), RequestError> {
    if !v.is_finite() {
        return Err(invalid(
            name,
            format!("{name} must be a finite number, got {v}."),
        ));
    }
    if !ok(v) {
        return Err(invalid(name, format!("{name} must be {rule}, got {v}.")));
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

    fn tokens(&self, param: &'static str, ids: &[TokenId]) -> Result<(), RequestError> {
        match ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(&t) => Err(RequestError::TokenOutOfRange {
                param,
                token: t.into(),
                vocab_size: self.vocab_size,
            }),
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
            return Err(invalid(
                "n",
                format!("n must be at least 1, got {}.", req.n),
            ));
        }
        if req.n > MAX_N {
            return Err(invalid(
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
            return Err(invalid(
                "max_tokens",
                format!(
                    "max_tokens={m} cannot be greater than max_model_len={ctx}. Please request \
                     fewer output tokens."
                ),
            ));
        }
        if prompt_len > ctx {
            return Err(invalid(
                "input_tokens",
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your prompt \
                     contains {prompt_len} input tokens, which exceeds this limit even without \
                     any output tokens. Please reduce the length of the input prompt."
                ),
            ));
        }
        let m = req.stop.max_tokens.unwrap_or(ctx).min(ctx - prompt_len);
        if m < 1 {
            return Err(invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {m}."),
            ));
        }
        Ok(m)
    }

    fn validate_stop(&self, req: &EngineRequest) -> Result<(), RequestError> {
        let stop = &req.stop;
        if let Some(m) = stop.max_tokens.filter(|&m| stop.min_tokens > m) {
            return Err(invalid(
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
        range("temperature", p.temperature, |v| v >= 0.0, "non-negative")?;
        range("top_p", p.top_p, |v| v > 0.0 && v <= 1.0, "in (0, 1]")?;
        range("min_p", p.min_p, |v| (0.0..=1.0).contains(&v), "in [0, 1]")?;
        for (name, v) in [
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
        ] {
            range(name, v, |v| (-2.0..=2.0).contains(&v), "in [-2, 2]")?;
        }
        range(
            "repetition_penalty",
            p.repetition_penalty,
            |v| v > 0.0 && v <= 2.0,
            "in (0, 2]",
        )?;
        if p.top_k < -1 || p.top_k as i64 > self.vocab_size as i64 {
            return Err(invalid(
                "top_k",
                format!(
                    "top_k must be -1 (disable), 0 or in [1, {}], got {}.",
                    self.vocab_size, p.top_k
                ),
            ));
        }
        // -1 and 0 both mean off; the samplers see one spelling.
        p.top_k = p.top_k.max(0);
        // vLLM 0.32's words (`SamplingParams._validate_logprobs`).
        for (name, what, n) in [
            ("logprobs", "sample", p.logprobs),
            ("prompt_logprobs", "prompt", p.prompt_logprobs),
        ] {
            if let Some(n) = n.filter(|&n| n > self.max_logprobs) {
                return Err(invalid(
                    name,
                    format!(
                        "Requested {what} logprobs of {n}, which is greater than max allowed: {}",
                        self.max_logprobs
                    ),
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
        assert_eq!(max(100, None).unwrap_err().0, "max_tokens");
        let (param, msg) = max(3, Some(101)).unwrap_err();
        assert_eq!(param, "max_tokens");
        assert_eq!(msg, "max_tokens=101 cannot be greater than max_model_len=100. Please request fewer output tokens.");
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
        assert!(
            refused(&|r| r.sampling.top_k = 51),
            "top_k above the vocabulary"
        );
        assert!(
            refused(&|r| r.sampling.repetition_penalty = 3.0),
            "repetition_penalty > 2"
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
        assert!(
            !refused(&|r| r.sampling.top_k = 50),
            "top_k up to the vocabulary"
        );
        let mut r = req(3, Some(4));
        r.sampling.top_k = -1;
        let v = LIMITS.validate(r).unwrap();
        assert_eq!(v.request().sampling.top_k, 0, "-1 (off) is normalised to 0");
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
}
