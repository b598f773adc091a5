//! The engine's gate: every request is checked against the model's limits before it is
//! queued, so nothing a client sends can make a step fail for the other requests in it.

use tpuserve_runner_api::{SamplingParams, SamplingSupport};

use crate::error::RequestError;
use crate::request::EngineRequest;

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

fn invalid(param: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError::InvalidParameter {
        param,
        reason: reason.into(),
    }
}

impl RequestLimits {
    pub fn validate(&self, req: &EngineRequest) -> Result<(), RequestError> {
        let prompt_len = req.prompt_token_ids.len();
        if prompt_len == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        if let Some(&token) = req
            .prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(RequestError::TokenOutOfRange {
                token,
                vocab_size: self.vocab_size,
            });
        }
        if req.n == 0 {
            return Err(invalid("n", "must be at least 1"));
        }
        let stop = &req.stop;
        if stop.max_tokens == Some(0) {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        // At least one token must fit after the prompt.
        let max_tokens = stop.max_tokens.unwrap_or(1);
        if prompt_len + max_tokens > self.max_model_len {
            return Err(RequestError::ContextLengthExceeded {
                max_model_len: self.max_model_len,
                requested: prompt_len + max_tokens,
                prompt_tokens: prompt_len,
                max_tokens,
            });
        }
        if let Some(m) = stop.max_tokens.filter(|&m| stop.min_tokens > m) {
            return Err(invalid(
                "min_tokens",
                format!("{} is greater than max_tokens ({m})", stop.min_tokens),
            ));
        }
        if stop.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop strings must not be empty"));
        }
        self.validate_sampling(&req.sampling)?;
        if let Some(param) = self.sampling.unsupported(&req.sampling, stop.min_tokens) {
            return Err(invalid(
                param,
                "is not supported on XLA devices (TPU, GPU, xla-cpu) yet; use --device cpu \
                 for it",
            ));
        }
        Ok(())
    }

    fn validate_sampling(&self, p: &SamplingParams) -> Result<(), RequestError> {
        if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
            return Err(invalid("temperature", "must be a finite number >= 0"));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(invalid("top_p", "must be in (0, 1]"));
        }
        if p.top_k < -1 {
            return Err(invalid("top_k", "must be -1 (off), 0 (off) or positive"));
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return Err(invalid("min_p", "must be in [0, 1]"));
        }
        for (name, v) in [
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(invalid(name, "must be in [-2, 2]"));
            }
        }
        if !(p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite()) {
            return Err(invalid("repetition_penalty", "must be a finite number > 0"));
        }
        for (name, n) in [
            ("logprobs", p.logprobs),
            ("prompt_logprobs", p.prompt_logprobs),
        ] {
            if n.is_some_and(|n| n > self.max_logprobs) {
                return Err(invalid(
                    name,
                    format!("at most {} alternatives", self.max_logprobs),
                ));
            }
        }
        if let Some(&(t, b)) = p
            .logit_bias
            .iter()
            .find(|(t, b)| *t as usize >= self.vocab_size || !b.is_finite())
        {
            if !b.is_finite() {
                return Err(invalid("logit_bias", format!("bias for {t} is not finite")));
            }
            return Err(RequestError::TokenOutOfRange {
                token: t,
                vocab_size: self.vocab_size,
            });
        }
        Ok(())
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

    #[test]
    fn context_length_is_enforced_with_vllms_message() {
        assert!(LIMITS.validate(&req(90, Some(10))).is_ok());
        let e = LIMITS.validate(&req(90, Some(11))).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("This model's maximum context length is 100 tokens. However, you requested 101 tokens (90 in the messages, 11 in the completion)"));
        assert!(LIMITS.validate(&req(100, None)).is_err());
        assert!(LIMITS.validate(&req(99, None)).is_ok());
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
        assert!(device.validate(&r).is_ok());
        let param = |r: &EngineRequest| match device.validate(r) {
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
        p.stop.min_tokens = 2;
        assert_eq!(param(&p), "min_tokens");
        assert!(LIMITS.validate(&p).is_ok(), "the host sampler has them all");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert_eq!(
            LIMITS.validate(&req(0, None)),
            Err(RequestError::EmptyPrompt)
        );
        let mut r = req(3, Some(4));
        r.prompt_token_ids[1] = 50;
        assert!(matches!(
            LIMITS.validate(&r),
            Err(RequestError::TokenOutOfRange { token: 50, .. })
        ));
        let mut r = req(3, Some(4));
        r.sampling.top_p = 0.0;
        assert!(LIMITS.validate(&r).is_err());
        let mut r = req(3, Some(4));
        r.sampling.logprobs = Some(21);
        assert!(LIMITS.validate(&r).is_err());
        let mut r = req(3, Some(4));
        r.stop.min_tokens = 5;
        assert!(LIMITS.validate(&r).is_err());
        let mut r = req(3, Some(4));
        r.n = 0;
        assert!(LIMITS.validate(&r).is_err());
    }
}
