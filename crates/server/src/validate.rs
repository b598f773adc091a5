//! The input gate (as TGI's `validation.rs`): every request field is range-checked here once,
//! and what leaves is a typed, already-valid engine request. Messages name the parameter and
//! the accepted range, like vLLM's.

use tpuserve_engine::{SamplingParams, StopParams};

use crate::error::ApiError;
use crate::numbers::bound_error;
use crate::protocol::SamplingFields;

/// Hard limits the gate enforces beyond the model's own (issue-level policy, configurable later).
pub const MAX_N: i64 = 128;
pub const MAX_STOP_STRINGS: usize = 64;
pub const MAX_STOP_STRING_LEN: usize = 1024;

pub struct Limits {
    pub vocab_size: usize,
    pub max_logprobs: usize,
    pub max_model_len: usize,
    /// `--enable-force-include-usage`: streams carry usage as if `include_usage` were set.
    pub force_include_usage: bool,
    /// `--generation-config`: defaults for fields a request leaves out.
    pub defaults: SamplingDefaults,
}

/// Sampling defaults from the model's generation config (see `generation_config.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// `max_new_tokens`: caps every request's `max_tokens`, as vLLM's `get_max_tokens`.
    pub max_tokens: Option<i64>,
}

/// `truncate_prompt_tokens` / `truncation_side`: how many prompt tokens to keep, from which end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    pub keep: usize,
    /// `left` (vLLM's default): drop from the start, keep the last `keep` tokens.
    pub left: bool,
}

impl Truncation {
    /// Cuts `ids` to at most `keep` tokens; true if anything was dropped.
    pub fn apply(&self, ids: &mut Vec<u32>) -> bool {
        if ids.len() <= self.keep {
            return false;
        }
        if self.left {
            ids.drain(..ids.len() - self.keep);
        } else {
            ids.truncate(self.keep);
        }
        true
    }
}

pub struct Validated {
    pub sampling: SamplingParams,
    pub stop: StopParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats` together with `include_usage` (vLLM ignores
    /// the former without the latter).
    pub continuous_usage: bool,
    /// `return_token_ids`: prompt and output token ids in the response.
    pub return_token_ids: bool,
    pub truncation: Option<Truncation>,
    /// `use_beam_search`: the search's settings (width = n).
    pub beam: Option<crate::beam::BeamParams>,
    /// Structured output asked for, and the request field it came from (for errors).
    pub constraint: Option<(tpuserve_engine::structured::ConstraintSpec, &'static str)>,
}

fn range_f(
    name: &str,
    v: Option<f64>,
    default: f64,
    ok: impl Fn(f64) -> bool,
    rule: &str,
) -> Result<f64, ApiError> {
    let v = v.unwrap_or(default);
    // Checked as the engine will use it, in f32: 1e39 is finite in f64 but infinite there,
    // and 1e-300 > 0 becomes 0 (a repetition penalty of 0 divides by zero).
    let engine_value = v as f32;
    if !engine_value.is_finite() || !ok(engine_value as f64) {
        return Err(ApiError::invalid_param(
            name,
            format!("{name} must be {rule}, got {v}."),
        ));
    }
    Ok(engine_value as f64)
}

pub fn token_id(name: &str, v: i64, vocab: usize) -> Result<u32, ApiError> {
    if v < 0 || v as u64 >= vocab as u64 {
        return Err(ApiError::invalid_param(
            name,
            format!("token id {v} is out of vocabulary (0..{vocab})"),
        ));
    }
    Ok(v as u32)
}

/// Checks the shared sampling fields. `logprobs` is the number of top alternatives the
/// endpoint asked for (completions' int, chat's `top_logprobs` when `logprobs` is true).
pub fn sampling(
    model: &str,
    f: &SamplingFields,
    max_tokens: Option<i64>,
    logprobs: Option<i64>,
    default_temperature: f64,
    lim: &Limits,
) -> Result<Validated, ApiError> {
    f.unimplemented.check()?;
    let n = f.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid_param(
            "n",
            format!("n must be between 1 and {MAX_N}, got {n}."),
        ));
    }
    if let Some(b) = f.best_of {
        if b != n {
            return Err(ApiError::invalid_param(
                "best_of",
                format!("best_of ({b}) different from n ({n}) is not supported."),
            ));
        }
    }
    let d = &lim.defaults;
    let temperature = range_f(
        "temperature",
        f.temperature.or(d.temperature),
        default_temperature,
        |v| v >= 0.0,
        "non-negative",
    )?;
    let top_p = range_f(
        "top_p",
        f.top_p.or(d.top_p),
        1.0,
        |v| v > 0.0 && v <= 1.0,
        "in (0, 1]",
    )?;
    let min_p = range_f(
        "min_p",
        f.min_p.or(d.min_p),
        0.0,
        |v| (0.0..=1.0).contains(&v),
        "in [0, 1]",
    )?;
    let presence = range_f(
        "presence_penalty",
        f.presence_penalty,
        0.0,
        |v| (-2.0..=2.0).contains(&v),
        "in [-2, 2]",
    )?;
    let frequency = range_f(
        "frequency_penalty",
        f.frequency_penalty,
        0.0,
        |v| (-2.0..=2.0).contains(&v),
        "in [-2, 2]",
    )?;
    let repetition = range_f(
        "repetition_penalty",
        f.repetition_penalty.or(d.repetition_penalty),
        1.0,
        |v| v > 0.0 && v <= 2.0,
        "in (0, 2]",
    )?;
    let top_k = f.top_k.or(d.top_k).unwrap_or(-1);
    if top_k < -1 || top_k > lim.vocab_size as i64 {
        return Err(ApiError::invalid_param(
            "top_k",
            format!(
                "top_k must be -1 (disable), 0 or in [1, {}], got {top_k}.",
                lim.vocab_size
            ),
        ));
    }
    let lp = match logprobs {
        None => None,
        Some(v) if v < 0 || v as usize > lim.max_logprobs => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!(
                    "logprobs must be between 0 and {}, got {v}.",
                    lim.max_logprobs
                ),
            ))
        }
        Some(v) => Some(v as usize),
    };
    let prompt_lp = match f.prompt_logprobs {
        None => None,
        Some(v) if v < 0 || v as usize > lim.max_logprobs => {
            return Err(ApiError::invalid_param(
                "prompt_logprobs",
                format!(
                    "prompt_logprobs must be between 0 and {}, got {v}.",
                    lim.max_logprobs
                ),
            ))
        }
        Some(v) => Some(v as usize),
    };
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    if stream && prompt_lp.is_some() {
        return Err(ApiError::invalid_param(
            "prompt_logprobs",
            "`prompt_logprobs` are not available when `stream=True`.",
        ));
    }
    let max_tokens = match (max_tokens, d.max_tokens) {
        (Some(m), Some(cap)) => Some(m.min(cap)),
        (m, cap) => m.or(cap),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!("max_tokens must be at least 1, got {m}."),
            ))
        }
        // The client's value, bounded only against overflow: a request over max_model_len is
        // rejected naming the max_tokens it asked for, as vLLM's message does.
        Some(m) => Some(m.min(u32::MAX as i64) as usize),
    };
    let min_tokens = f.min_tokens.unwrap_or(0);
    if min_tokens < 0 || max_tokens.is_some_and(|m| min_tokens as usize > m) {
        return Err(ApiError::invalid_param(
            "min_tokens",
            format!("min_tokens must be between 0 and max_tokens, got {min_tokens}."),
        ));
    }
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings are allowed."),
        ));
    }
    if stop
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_STOP_STRING_LEN)
    {
        return Err(ApiError::invalid_param(
            "stop",
            format!("stop strings must be non-empty and at most {MAX_STOP_STRING_LEN} bytes."),
        ));
    }
    let stop_token_ids = f
        .stop_token_ids
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|t| token_id("stop_token_ids", t, lim.vocab_size))
        .collect::<Result<Vec<_>, _>>()?;
    let mut logit_bias = Vec::new();
    for (k, &v) in f.logit_bias.iter().flatten() {
        let id: i64 = k.parse().map_err(|_| {
            ApiError::invalid_param(
                "logit_bias",
                format!("logit_bias key `{k}` is not a token id"),
            )
        })?;
        if !v.is_finite() {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "logit_bias values must be finite",
            ));
        }
        logit_bias.push((
            token_id("logit_bias", id, lim.vocab_size)?,
            v.clamp(-100.0, 100.0) as f32,
        ));
    }
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k: top_k.max(0) as i32,
        top_p: top_p as f32,
        min_p: min_p as f32,
        presence_penalty: presence as f32,
        frequency_penalty: frequency as f32,
        repetition_penalty: repetition as f32,
        logit_bias,
        banned_tokens: Vec::new(),
        seed: f.seed.map(|s| s as u64),
        logprobs: lp,
        prompt_logprobs: prompt_lp,
    };
    let stop = StopParams {
        max_tokens,
        min_tokens: min_tokens as usize,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        stop_token_ids,
        stop,
        include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        spaces_between_special_tokens: f.spaces_between_special_tokens.unwrap_or(true),
    };
    let truncation = truncation(model, f, lim)?;
    let opts = f.stream_options.clone().unwrap_or_default();
    // vLLM's `should_include_usage`: the server flag forces the final usage chunk; continuous
    // usage still needs the request's `continuous_usage_stats`.
    let include_usage = opts.include_usage.unwrap_or(false) || lim.force_include_usage;
    let constraint = f.structured.spec()?;
    Ok(Validated {
        sampling,
        stop,
        n: n as usize,
        stream,
        include_usage,
        continuous_usage: include_usage && opts.continuous_usage_stats.unwrap_or(false),
        return_token_ids: f.return_token_ids.unwrap_or(false),
        truncation,
        beam: beam(
            f,
            n as usize,
            max_tokens,
            stream,
            constraint.as_ref().map(|c| c.1),
        )?,
        constraint,
    })
}

/// `use_beam_search`: what vLLM's `BeamSearchParams` take; fields the search cannot honour
/// are refused by name rather than dropped.
fn beam(
    f: &SamplingFields,
    width: usize,
    max_tokens: Option<usize>,
    stream: bool,
    constraint_field: Option<&'static str>,
) -> Result<Option<crate::beam::BeamParams>, ApiError> {
    let u = &f.unimplemented;
    if u.use_beam_search != Some(true) {
        return Ok(None);
    }
    let refuse = |field: &str| {
        Err(ApiError::invalid_param(
            field,
            format!("{field} is not supported together with use_beam_search by tpuserve"),
        ))
    };
    if stream {
        return refuse("stream");
    }
    if f.stop
        .as_ref()
        .is_some_and(|s| !s.clone().into_vec().is_empty())
    {
        return refuse("stop");
    }
    if f.stop_token_ids.as_ref().is_some_and(|s| !s.is_empty()) {
        return refuse("stop_token_ids");
    }
    if f.min_tokens.is_some_and(|m| m > 0) {
        return refuse("min_tokens");
    }
    if f.prompt_logprobs.is_some() {
        return refuse("prompt_logprobs");
    }
    if let Some(field) = constraint_field {
        return refuse(field);
    }
    let length_penalty = u.length_penalty.unwrap_or(1.0);
    if !length_penalty.is_finite() {
        return Err(ApiError::invalid_param(
            "length_penalty",
            "length_penalty must be finite",
        ));
    }
    Ok(Some(crate::beam::BeamParams {
        width,
        max_tokens: max_tokens.unwrap_or(usize::MAX),
        length_penalty,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
    }))
}

/// vLLM's bounds: `truncate_prompt_tokens` in [-1, int64] (-1: `max_model_len`) and at most
/// `max_model_len`; `truncation_side` `left` or `right` (default left: keep the prompt's end).
fn truncation(
    model: &str,
    f: &SamplingFields,
    lim: &Limits,
) -> Result<Option<Truncation>, ApiError> {
    let left = match f.truncation_side.as_deref() {
        None | Some("left") => true,
        Some("right") => false,
        Some(other) => {
            return Err(bound_error(
                model,
                "truncation_side",
                "Input should be 'left' or 'right'",
                "literal_error",
                &format!("'{other}'"),
            ))
        }
    };
    let keep = match f.truncate_prompt_tokens {
        None => return Ok(None),
        Some(-1) => lim.max_model_len,
        Some(t) if t < -1 => {
            return Err(bound_error(
                model,
                "truncate_prompt_tokens",
                "Input should be greater than or equal to -1",
                "greater_than_equal",
                &t.to_string(),
            ))
        }
        Some(t) if t as u64 > lim.max_model_len as u64 => {
            return Err(ApiError::invalid_param(
                "truncate_prompt_tokens",
                format!(
                    "truncate_prompt_tokens value ({t}) is greater than max_model_len ({}). \
                     Please, select a smaller truncation size.",
                    lim.max_model_len
                ),
            ))
        }
        Some(t) => t as usize,
    };
    Ok(Some(Truncation { keep, left }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: SamplingFields) -> Result<Validated, ApiError> {
        sampling(
            "CompletionRequest",
            &f,
            Some(16),
            None,
            1.0,
            &Limits {
                vocab_size: 100,
                max_logprobs: 5,
                max_model_len: 64,
                force_include_usage: false,
                defaults: SamplingDefaults::default(),
            },
        )
    }

    /// Found by `tests/fuzz.rs`: values that pass in f64 but break in the engine's f32.
    #[test]
    fn values_are_range_checked_as_the_engine_holds_them() {
        let tiny = check(SamplingFields {
            repetition_penalty: Some(3.2e-288),
            ..Default::default()
        });
        assert!(tiny.is_err_and(|e| e.message.contains("repetition_penalty")));
        let huge = check(SamplingFields {
            temperature: Some(1e39),
            ..Default::default()
        });
        assert!(huge.is_err_and(|e| e.message.contains("temperature")));
        let ok = check(SamplingFields {
            temperature: Some(1e30),
            repetition_penalty: Some(1e-30),
            ..Default::default()
        })
        .unwrap();
        assert!(ok.sampling.temperature.is_finite() && ok.sampling.repetition_penalty > 0.0);
    }
}
