//! JSON → typed request: the OpenAI-only fields (stream options, beam search, truncation,
//! structured-output spec, generation-config defaults) are checked here; every value the
//! engine bounds (ranges, model length, vocabulary, logprobs, n) is only converted to the
//! engine's types and checked by the engine's gate (`RequestLimits::validate`), once, with
//! vLLM's messages. A value too wide for the engine's type (a negative count, a token id
//! beyond 32 bits) is refused here, naming the field.

use tpuserve_engine::{EngineRequest, RequestLimits, SamplingParams, StopParams, ValidatedRequest};
use tpuserve_model::Tokenizer;

use crate::error::ApiError;
use crate::numbers::{bound_error, FieldError};
use crate::protocol::SamplingFields;
use tpuserve_engine::pyfmt::py_str;

pub use tpuserve_engine::validation::{MAX_N, MAX_STOP_STRINGS, MAX_STOP_STRING_LEN};

pub struct Limits {
    /// The engine's limits (model length, vocabulary, max logprobs, sampler support).
    pub engine: RequestLimits,
    /// `--enable-force-include-usage`: streams carry usage as if `include_usage` were set.
    pub force_include_usage: bool,
    /// `--return-tokens-as-token-ids`: what a request without `return_tokens_as_token_ids`
    /// gets.
    pub return_tokens_as_token_ids: bool,
    /// `--scheduling-policy priority`: requests may carry a `priority`.
    pub priority_scheduling: bool,
    /// `--stream-interval`: the fewest tokens a streamed chunk gathers.
    pub stream_interval: usize,
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

/// A request's fields, converted: what the engine gets for each prompt (`sampling`, `stop`,
/// `n`, `best_of`, checked by [`Validated::engine_request`]) and what only the server uses.
pub struct Validated {
    pub sampling: SamplingParams,
    pub stop: StopParams,
    pub n: usize,
    pub best_of: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats` together with `include_usage` (vLLM ignores
    /// the former without the latter).
    pub continuous_usage: bool,
    /// `return_token_ids`: prompt and output token ids in the response.
    pub return_token_ids: bool,
    /// Logprob tokens as `token_id:<id>` (the request's `return_tokens_as_token_ids`, else
    /// the server's flag).
    pub tokens_as_ids: bool,
    /// Tokens per streamed chunk: the request's `stream_interval`, raised to the server's.
    pub stream_interval: usize,
    /// `cache_salt`, checked as vLLM checks it.
    pub cache_salt: Option<String>,
    /// `priority` (0 unless `--scheduling-policy priority`).
    pub priority: i64,
    pub truncation: Option<Truncation>,
    /// `use_beam_search`: the search's settings (width = n).
    pub beam: Option<crate::beam::BeamParams>,
    /// Structured output asked for, and the request field it came from (for errors).
    pub constraint: Option<(tpuserve_engine::structured::ConstraintSpec, &'static str)>,
}

impl Validated {
    /// One prompt's engine request, through the engine's gate. The shared settings keep the
    /// gate's normalised values (`top_k` -1 → 0), so what the handlers read is what runs.
    pub fn engine_request(
        &mut self,
        limits: &RequestLimits,
        prompt: Vec<u32>,
    ) -> Result<ValidatedRequest, ApiError> {
        let mut req = EngineRequest::new(prompt, self.sampling.clone(), self.stop.clone());
        req.n = self.n;
        req.best_of = self.best_of;
        req.cache_salt = self.cache_salt.clone();
        req.priority = self.priority;
        let v = limits.validate(req)?;
        self.sampling = v.request().sampling.clone();
        Ok(v)
    }
}

/// A JSON count (`best_of`) as the engine's unsigned type.
fn count(name: &str, v: i64) -> Result<usize, ApiError> {
    usize::try_from(v).map_err(|_| {
        ApiError::invalid_param(name, format!("{name} must be non-negative, got {v}."))
    })
}

/// `n`: vLLM's `_verify_num_sequences` words for a value below 1 (the gate bounds the rest).
fn sample_count(v: i64) -> Result<usize, ApiError> {
    match usize::try_from(v) {
        Ok(n) if n >= 1 => Ok(n),
        // vLLM names no parameter here (`param: null`).
        _ => Err(ApiError::bad_request(format!(
            "n must be at least 1, got {v}."
        ))),
    }
}

/// `logprobs` / `prompt_logprobs` as vLLM 0.32 reads them: -1 asks for the whole vocabulary
/// (then bounded by `--max-logprobs` like any count), another negative value is refused.
fn logprob_count(name: &str, v: i64, vocab: usize) -> Result<usize, ApiError> {
    match v {
        -1 => Ok(vocab),
        v if v < 0 => Err(ApiError::vllm(
            name,
            format!("`{name}` must be a positive value or -1."),
            Some(&v.to_string()),
        )),
        v => Ok(usize::try_from(v).unwrap_or(usize::MAX)),
    }
}

/// A JSON token id as the engine's type, checked against the vocabulary by the engine's rule.
pub fn token_id(name: &'static str, v: i64, limits: &RequestLimits) -> Result<u32, ApiError> {
    Ok(limits.token(name, v)?)
}

/// Converts the shared sampling fields. `logprobs` is the number of top alternatives the
/// endpoint asked for (completions' int, chat's `top_logprobs` when `logprobs` is true).
pub fn sampling(
    model: &str,
    f: &SamplingFields,
    (max_tokens_field, max_tokens): (&'static str, Option<i64>),
    logprobs: Option<i64>,
    default_temperature: f64,
    lim: &Limits,
) -> Result<Validated, ApiError> {
    f.unimplemented.check()?;
    let n = sample_count(f.n.unwrap_or(1))?;
    let best_of = f.best_of.map(|b| count("best_of", b)).transpose()?;
    let d = &lim.defaults;
    // f32 is what the engine holds: a value beyond it becomes infinite and the gate says so.
    let temperature = f
        .temperature
        .or(d.temperature)
        .unwrap_or(default_temperature) as f32;
    let top_p = f.top_p.or(d.top_p).unwrap_or(1.0) as f32;
    let min_p = f.min_p.or(d.min_p).unwrap_or(0.0) as f32;
    let presence = f.presence_penalty.unwrap_or(0.0) as f32;
    let frequency = f.frequency_penalty.unwrap_or(0.0) as f32;
    let repetition = f.repetition_penalty.or(d.repetition_penalty).unwrap_or(1.0) as f32;
    let top_k = f.top_k.or(d.top_k).unwrap_or(-1);
    let top_k = i32::try_from(top_k).map_err(|_| {
        ApiError::invalid_param("top_k", format!("top_k must fit in 32 bits, got {top_k}."))
    })?;
    let vocab = lim.engine.vocab_size;
    let stream = f.stream.unwrap_or(false);
    // vLLM 0.32's request model, in its order: prompt logprobs with a stream (0 asks for
    // none), a negative count, then stream options without a stream.
    if let Some(p) = f.prompt_logprobs {
        if stream && (p > 0 || p == -1) {
            return Err(ApiError::vllm(
                "prompt_logprobs",
                "`prompt_logprobs` are not available when `stream=True`.",
                None,
            ));
        }
    }
    let prompt_lp = f
        .prompt_logprobs
        .map(|v| logprob_count("prompt_logprobs", v, vocab))
        .transpose()?;
    let lp = logprobs
        .map(|v| logprob_count("logprobs", v, vocab))
        .transpose()?;
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::vllm(
            "stream_options",
            "Stream options can only be defined when `stream=True`.",
            None,
        ));
    }
    let ctx = lim.engine.max_model_len;
    if let Some(m) = max_tokens.filter(|&m| m > ctx as i64) {
        return Err(ApiError::vllm(
            max_tokens_field,
            format!(
                "{max_tokens_field}={m} cannot be greater than max_model_len={ctx}. Please \
                 request fewer output tokens."
            ),
            Some(&m.to_string()),
        ));
    }
    // 0 goes on: an echo of the prompt alone is served, else the gate refuses it in these
    // words.
    if let Some(m) = max_tokens.filter(|&m| m < 0) {
        return Err(ApiError::vllm(
            "max_tokens",
            format!("max_tokens must be at least 1, got {m}."),
            Some(&m.to_string()),
        ));
    }
    let max_tokens = match (max_tokens, d.max_tokens) {
        (Some(m), Some(cap)) => Some(m.min(cap)),
        (m, cap) => m.or(cap),
    };
    // The engine caps what is left at the end of the context (vLLM's `get_max_tokens`).
    // Not negative here (checked above; the generation config's cap is positive).
    let max_tokens = max_tokens.map(|m| m.clamp(0, u32::MAX as i64) as usize);
    let min_tokens = f.min_tokens.unwrap_or(0);
    let min_tokens = usize::try_from(min_tokens).map_err(|_| {
        ApiError::bad_request(format!(
            "min_tokens must be greater than or equal to 0, got {min_tokens}."
        ))
    })?;
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    let stop_token_ids = lim.engine.token_list(
        "stop_token_ids",
        f.stop_token_ids.as_deref().unwrap_or_default(),
    )?;
    let logit_bias = logit_bias(f.logit_bias.as_ref(), &lim.engine)?;
    let sampling = SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        presence_penalty: presence,
        frequency_penalty: frequency,
        repetition_penalty: repetition,
        logit_bias,
        banned_tokens: Vec::new(),
        allowed_tokens: allowed_token_ids(f.allowed_token_ids.as_deref(), &lim.engine)?,
        logprob_token_ids: logprob_token_ids(model, f, lp, &lim.engine)?,
        // Tokenised by the gate (`bad_words`), which holds the tokenizer.
        bad_words: Vec::new(),
        seed: f.seed.map(|s| s as u64),
        logprobs: lp,
        prompt_logprobs: prompt_lp,
    };
    let stop = StopParams {
        max_tokens,
        min_tokens,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        stop_token_ids,
        stop,
        include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        spaces_between_special_tokens: f.spaces_between_special_tokens.unwrap_or(true),
        repetition: repetition_detection(f.repetition_detection.as_ref())?,
    };
    let truncation = truncation(f, lim)?;
    let opts = f.stream_options.clone().unwrap_or_default();
    // vLLM's `should_include_usage`: the server flag forces the final usage chunk; continuous
    // usage still needs the request's `continuous_usage_stats`.
    let include_usage = opts.include_usage.unwrap_or(false) || lim.force_include_usage;
    let constraint = f.structured.spec()?;
    let beam = beam(f, n, max_tokens, stream, constraint.as_ref().map(|c| c.1))?;
    if n > 1 && sampling.is_greedy() && beam.is_none() {
        // vLLM: n identical greedy answers are refused rather than computed.
        return Err(ApiError::bad_request(format!(
            "n must be 1 when using greedy sampling, got {n}."
        )));
    }
    Ok(Validated {
        sampling,
        stop,
        n,
        best_of,
        stream,
        include_usage,
        continuous_usage: include_usage && opts.continuous_usage_stats.unwrap_or(false),
        return_token_ids: f.return_token_ids.unwrap_or(false),
        tokens_as_ids: f
            .return_tokens_as_token_ids
            .unwrap_or(lim.return_tokens_as_token_ids),
        stream_interval: stream_interval(f.stream_interval, lim.stream_interval)?,
        cache_salt: cache_salt(f.cache_salt.as_deref())?,
        priority: match f.priority.unwrap_or(0) {
            p if p != 0 && !lim.priority_scheduling => {
                return Err(ApiError::invalid_param(
                    "priority",
                    "priority is not supported by tpuserve without --scheduling-policy \
                     priority: requests are scheduled first come, first served (vLLM refuses \
                     it too)",
                ))
            }
            p => p,
        },
        truncation,
        beam,
        constraint,
    })
}

/// `repetition_detection` as vLLM's `RepetitionDetectionParams` checks it; a disabled one
/// (`max_pattern_size` 0) is no detection.
fn repetition_detection(
    r: Option<&crate::protocol::RepetitionDetectionFields>,
) -> Result<Option<tpuserve_engine::RepetitionDetection>, ApiError> {
    let Some(r) = r else {
        return Ok(None);
    };
    let (max, min, count) = (
        r.max_pattern_size.unwrap_or(0),
        r.min_pattern_size.unwrap_or(0),
        r.min_count.unwrap_or(0),
    );
    let refuse = |m: &str| Err(ApiError::invalid_param("repetition_detection", m));
    if max < 0 || min < 0 || min > max {
        return refuse(
            "max_pattern_size, min_pattern_size must be >=0, with min_pattern_size <= \
             max_pattern_size. Set both to 0 to disable repetitive pattern detection.",
        );
    }
    if max > 0 && count < 2 {
        return refuse(
            "min_count must be >= 2 to detect repetitive patterns in engine output. If you do \
             not wish to detect repetitive patterns, set max_pattern_size to 0.",
        );
    }
    if max == 0 {
        return Ok(None);
    }
    let size = |v: i64| usize::try_from(v).unwrap_or(usize::MAX);
    Ok(Some(tpuserve_engine::RepetitionDetection {
        max_pattern_size: size(max),
        min_pattern_size: size(min),
        min_count: size(count),
    }))
}

/// vLLM's rule for `cache_salt`: a non-empty string of at most 128 characters without `@`,
/// `/`, `\\` or NUL.
fn cache_salt(s: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(s) = s else {
        return Ok(None);
    };
    if s.is_empty() {
        return Err(ApiError::vllm(
            "cache_salt",
            "Parameter 'cache_salt' must be a non-empty string if provided.",
            None,
        ));
    }
    if s.chars().count() > 128 || s.contains(['@', '/', '\\', '\0']) {
        return Err(ApiError::vllm(
            "cache_salt",
            "Parameter 'cache_salt' must be at most 128 characters and must not contain '@', \
             '/', '\\\\', or NUL.",
            None,
        ));
    }
    Ok(Some(s.to_string()))
}

/// `allowed_token_ids`: vLLM refuses an empty list and ids outside the vocabulary.
fn allowed_token_ids(ids: Option<&[i64]>, limits: &RequestLimits) -> Result<Vec<u32>, ApiError> {
    let Some(ids) = ids else {
        return Ok(Vec::new());
    };
    if ids.is_empty() {
        return Err(ApiError::vllm(
            "allowed_token_ids",
            "allowed_token_ids is not None and empty!",
            Some("[]"),
        ));
    }
    Ok(limits.token_list("allowed_token_ids", ids)?)
}

/// `logit_bias` as vLLM 0.32 reads it: keys as Python's `int()` reads them (every key that is
/// not one named at once), then every id outside the vocabulary named at once; biases
/// clamped to ±100 (non-finite ones stay so, and the gate refuses them).
fn logit_bias(
    bias: Option<&std::collections::BTreeMap<String, f64>>,
    limits: &RequestLimits,
) -> Result<Vec<(u32, f32)>, ApiError> {
    use tpuserve_engine::pyfmt::{py_int, py_strs};
    let entries: Vec<(&String, f64)> = bias.into_iter().flatten().map(|(k, &v)| (k, v)).collect();
    let bad: Vec<&str> = entries
        .iter()
        .filter(|(k, _)| py_int(k).is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    if !bad.is_empty() {
        let keys = py_strs(&bad);
        return Err(ApiError::vllm(
            "logit_bias",
            format!(
                "logit_bias contains key(s) that cannot be converted to integer token IDs: {keys}"
            ),
            Some(&keys),
        ));
    }
    let ids: Vec<i64> = entries.iter().filter_map(|(k, _)| py_int(k)).collect();
    let ids = limits.token_list("logit_bias", &ids)?;
    Ok(ids
        .into_iter()
        .zip(&entries)
        .map(|(id, &(_, v))| {
            let v = if v.is_finite() {
                v.clamp(-100.0, 100.0)
            } else {
                v
            };
            (id, v as f32)
        })
        .collect())
}

/// vLLM's most `logprob_token_ids` (`MAX_LOGPROB_TOKEN_IDS`).
const MAX_LOGPROB_TOKEN_IDS: usize = 128;

/// `logprob_token_ids` as vLLM checks it (an empty list asks for nothing): only with
/// `logprobs` (chat: `logprobs: true`), at most 128 ids, all in the vocabulary.
fn logprob_token_ids(
    model: &str,
    f: &SamplingFields,
    logprobs: Option<usize>,
    limits: &RequestLimits,
) -> Result<Vec<u32>, ApiError> {
    let ids = f.logprob_token_ids.as_deref().unwrap_or_default();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let refuse =
        |m: String, value: Option<&str>| Err(ApiError::vllm("logprob_token_ids", m, value));
    if logprobs.is_none() {
        let set = if model.starts_with("Chat") {
            "set to true"
        } else {
            "set"
        };
        return refuse(
            format!("when using `logprob_token_ids`, `logprobs` must be {set}."),
            None,
        );
    }
    let n = ids.len();
    if n > MAX_LOGPROB_TOKEN_IDS {
        return refuse(
            format!(
                "Requested logprob_token_ids of length {n}, which is greater than max allowed: \
                 {MAX_LOGPROB_TOKEN_IDS}"
            ),
            Some(&n.to_string()),
        );
    }
    Ok(limits.token_list("logprob_token_ids", ids)?)
}

/// vLLM's most bad words after tokenisation (`VLLM_MAX_NUM_BAD_WORDS`).
const MAX_BAD_WORDS: usize = 128;

/// `bad_words` as token sequences, as vLLM tokenises them: each word (duplicates once, its
/// leading whitespace dropped) alone, and with a leading space where that gives another first
/// token in as many tokens (the word in the middle of a text).
pub fn bad_words(
    words: Option<&[String]>,
    tokenizer: &Tokenizer,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let words = words.unwrap_or_default();
    let refuse = |m: String| Err(ApiError::invalid_param("bad_words", m));
    if words.iter().any(String::is_empty) {
        return refuse(format!(
            "bad_words cannot contain an empty string. Got bad_words={words:?}"
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<Vec<u32>> = Vec::new();
    for w in words.iter().filter(|w| seen.insert(w.as_str())) {
        let plain = tokenizer
            .encode(w.trim_start(), false)
            .map_err(|e| ApiError::invalid_param("bad_words", e.to_string()))?;
        if plain.is_empty() {
            return refuse("bad_words entries must tokenize to at least one token.".into());
        }
        let spaced = tokenizer
            .encode(&format!(" {}", w.trim_start()), false)
            .map_err(|e| ApiError::invalid_param("bad_words", e.to_string()))?;
        let extra = !spaced.is_empty() && spaced[0] != plain[0] && spaced.len() == plain.len();
        for ids in std::iter::once(plain).chain(extra.then_some(spaced)) {
            out.push(ids);
            if out.len() > MAX_BAD_WORDS {
                return refuse(format!(
                    "Too many bad words after tokenization: {}. The max number is \
                     {MAX_BAD_WORDS}.",
                    out.len()
                ));
            }
        }
    }
    Ok(out)
}

/// vLLM's `stream_interval` (an integer ≥ 1, checked whether or not the request streams),
/// raised to the server's `--stream-interval`.
fn stream_interval(asked: Option<i64>, server: usize) -> Result<usize, ApiError> {
    match asked {
        None => Ok(server),
        Some(v) if v >= 1 => Ok(usize::try_from(v).unwrap_or(usize::MAX).max(server)),
        Some(v) => Err(ApiError::vllm(
            "stream_interval",
            format!("stream_interval must be at least 1, got {v}."),
            Some(&v.to_string()),
        )),
    }
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
    // The search ranks beams by the model's own logprobs (vLLM's beam search drops these
    // fields without a word).
    if f.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return refuse("logit_bias");
    }
    if f.allowed_token_ids.is_some() {
        return refuse("allowed_token_ids");
    }
    if f.repetition_detection.is_some() {
        return refuse("repetition_detection");
    }
    if f.bad_words.as_ref().is_some_and(|w| !w.is_empty()) {
        return refuse("bad_words");
    }
    if f.logprob_token_ids.as_ref().is_some_and(|w| !w.is_empty()) {
        return refuse("logprob_token_ids");
    }
    for (name, v, neutral) in [
        ("presence_penalty", f.presence_penalty, 0.0),
        ("frequency_penalty", f.frequency_penalty, 0.0),
        ("repetition_penalty", f.repetition_penalty, 1.0),
    ] {
        if v.is_some_and(|v| v != neutral) {
            return refuse(name);
        }
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

/// vLLM's bounds: `truncate_prompt_tokens` in [-1, int64] (-1: the context less one token)
/// and at most `max_model_len`; `truncation_side` `left` or `right` (default left: keep the
/// prompt's end).
fn truncation(f: &SamplingFields, lim: &Limits) -> Result<Option<Truncation>, ApiError> {
    let left = match f.truncation_side.as_deref() {
        None | Some("left") => true,
        Some("right") => false,
        Some(other) => {
            return Err(bound_error(
                FieldError::new(
                    "truncation_side",
                    "literal_error",
                    "Input should be 'left' or 'right'",
                    other,
                )
                .with_ctx("expected", py_str("'left' or 'right'")),
            ))
        }
    };
    let keep = match f.truncate_prompt_tokens {
        None => return Ok(None),
        // vLLM 0.32's `max_truncation_tokens`: the context less one token for the answer.
        Some(-1) => lim.engine.max_model_len.saturating_sub(1),
        Some(t) if t < -1 => {
            return Err(bound_error(
                FieldError::new(
                    "truncate_prompt_tokens",
                    "greater_than_equal",
                    "Input should be greater than or equal to -1",
                    t.to_string(),
                )
                .with_ctx("ge", "-1"),
            ))
        }
        Some(t) if t as u64 > lim.engine.max_model_len as u64 => {
            return Err(ApiError::vllm(
                "truncate_prompt_tokens",
                format!(
                    "truncate_prompt_tokens={t} cannot be greater than max_model_len = {}. \
                     Please request a smaller truncation size.",
                    lim.engine.max_model_len
                ),
                Some(&t.to_string()),
            ))
        }
        Some(t) => t as usize,
    };
    Ok(Some(Truncation { keep, left }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpuserve_runner_api::SamplingSupport;

    const ENGINE: RequestLimits = RequestLimits {
        vocab_size: 100,
        max_logprobs: 5,
        max_model_len: 64,
        sampling: SamplingSupport::Full,
    };

    /// Converts `f` and passes it through the engine's gate, as the routes do.
    fn check(f: SamplingFields) -> Result<Validated, ApiError> {
        let mut v = sampling(
            "CompletionRequest",
            &f,
            ("max_tokens", Some(16)),
            None,
            1.0,
            &Limits {
                engine: ENGINE,
                force_include_usage: false,
                return_tokens_as_token_ids: false,
                stream_interval: 1,
                priority_scheduling: false,
                defaults: SamplingDefaults::default(),
            },
        )?;
        v.engine_request(&ENGINE, vec![1, 2, 3])?;
        Ok(v)
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
            temperature: Some(2.0),
            repetition_penalty: Some(1e-30),
            ..Default::default()
        })
        .unwrap();
        assert!(ok.sampling.temperature.is_finite() && ok.sampling.repetition_penalty > 0.0);
    }

    /// Values too wide for the engine's types are refused naming the field, not wrapped.
    #[test]
    fn negative_counts_and_wide_ids_are_refused_by_name() {
        for (f, param) in [
            (
                SamplingFields {
                    n: Some(-1),
                    ..Default::default()
                },
                "n must be",
            ),
            (
                SamplingFields {
                    min_tokens: Some(-1),
                    ..Default::default()
                },
                "min_tokens must be",
            ),
            (
                SamplingFields {
                    prompt_logprobs: Some(-2),
                    ..Default::default()
                },
                "prompt_logprobs",
            ),
            (
                SamplingFields {
                    top_k: Some(1 << 40),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingFields {
                    stop_token_ids: Some(vec![-1]),
                    ..Default::default()
                },
                "stop_token_ids",
            ),
            (
                SamplingFields {
                    stop_token_ids: Some(vec![1 << 33]),
                    ..Default::default()
                },
                "stop_token_ids",
            ),
        ] {
            let e = check(f).err().expect(param);
            // vLLM names no parameter for `n` and `min_tokens` (`param` null); the message
            // does.
            match param.strip_suffix(" must be") {
                Some(field) => {
                    assert_eq!(e.param, None, "{}", e.message);
                    assert!(e.message.starts_with(param), "{}", e.message);
                    assert!(e.message.contains(field));
                }
                None => assert_eq!(e.param.as_deref(), Some(param), "{}", e.message),
            }
        }
    }
}
