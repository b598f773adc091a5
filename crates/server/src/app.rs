//! The OpenAI-compatible routes. Handlers parse and validate, hand typed requests to the engine,
//! and turn its per-request events into JSON or SSE. A client that goes away drops its
//! request stream, which aborts the request in the engine.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tpuserve_engine::{
    FinalOutput, Finish, RequestStream, StopReason, TokenLogprobs, ValidatedRequest,
};

use crate::chat::{self, ChatPromptOptions};
use crate::error::ApiError;
use crate::gate;
use crate::protocol::*;
use crate::state::{now_secs, SharedState};
use crate::streaming;
use crate::unsupported;
use crate::validate;

/// Limits on reading a request body.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// The whole body must arrive within this long of the request head, so a client that
    /// trickles its body byte by byte cannot hold a handler open.
    pub timeout: Duration,
}

pub fn router(state: SharedState, body: BodyLimits) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/version", get(version))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(crate::metrics::scrape))
        .route("/load", get(load))
        .route("/invocations", post(invocations))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/openapi.json", get(crate::openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(body, read_body_within))
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        // `read_body_within` owns the limit (413 in the OpenAI shape); the extractors then get
        // bodies already within it, so their own default 2 MB cap must not apply.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Route list logged at start-up, as vLLM does.
pub const ROUTES: &[(&str, &str)] = &[
    ("/v1/completions", "POST"),
    ("/v1/chat/completions", "POST"),
    ("/v1/models", "GET"),
    ("/health", "GET"),
    ("/ping", "GET, POST"),
    ("/version", "GET"),
    ("/tokenize", "POST"),
    ("/detokenize", "POST"),
    ("/metrics", "GET"),
    ("/load", "GET"),
    ("/invocations", "POST"),
    ("/openapi.json", "GET"),
];

async fn not_found() -> ApiError {
    ApiError::not_found("Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

/// API key on `/v1/*` (constant-time compare).
async fn gate(State(st): State<SharedState>, req: Request, next: Next) -> Response {
    if !st.api_keys.is_empty()
        && req.uri().path().starts_with("/v1")
        && req.method() != axum::http::Method::OPTIONS
    {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Every key is compared (constant time each), so timing tells nothing of which.
        let ok = st
            .api_keys
            .iter()
            .fold(subtle::Choice::from(0), |acc, key| {
                acc | given.as_bytes().ct_eq(key.as_bytes())
            });
        let ok: bool = ok.into();
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Reads the whole body under `BodyLimits` before any handler sees it: 408 when it does not
/// arrive in time, 413 when it is too large.
async fn read_body_within(State(lim): State<BodyLimits>, req: Request, next: Next) -> Response {
    // No early answer from Content-Length alone: a client still writing its body would get a
    // broken pipe instead of the 413. Reading stops at the limit either way.
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(lim.timeout, read_limited(body, lim.max_bytes)).await {
        Err(_) => {
            let mut resp = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    lim.timeout.as_secs_f64()
                ),
            )
            .into_response();
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            resp
        }
        Ok(Err(BodyError::TooLarge(rest))) => {
            linger(rest).await;
            let mut resp = too_large(lim.max_bytes);
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            resp
        }
        Ok(Err(BodyError::Broken)) => {
            ApiError::bad_request("the request body could not be read").into_response()
        }
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
    }
}

enum BodyError {
    /// Over the limit; the unread rest of the body.
    TooLarge(axum::body::Body),
    Broken,
}

/// The whole body if it is at most `max` bytes.
async fn read_limited(mut body: axum::body::Body, max: usize) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Broken)?.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > max {
            return Err(BodyError::TooLarge(body));
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

/// How much of an oversized body is still read and dropped, and for how long, before the 413.
/// A client that writes its whole body before reading (urllib, requests) would otherwise see
/// its connection reset instead of the answer — nginx's lingering close solves the same
/// problem. Past either bound the connection is closed anyway.
const LINGER_BYTES: usize = 1 << 30;
const LINGER_TIME: Duration = Duration::from_secs(10);

async fn linger(mut rest: axum::body::Body) {
    use http_body_util::BodyExt;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut dropped = 0usize;
        while let Some(Ok(frame)) = rest.frame().await {
            dropped += frame.data_ref().map_or(0, |d| d.len());
            if dropped > LINGER_BYTES {
                break;
            }
        }
    })
    .await;
}

/// `/v1/completions` with `use_beam_search`: `n` beams per prompt, best first.
async fn beam_completion(
    st: &SharedState,
    id: String,
    prompts: Vec<(ValidatedRequest, String)>,
    bp: crate::beam::BeamParams,
    v: &validate::Validated,
    echo: bool,
) -> Result<Response, ApiError> {
    let (mut pt, mut ct) = (0, 0);
    let mut choices = Vec::new();
    for (pi, (req, text)) in prompts.iter().enumerate() {
        // The request passed the gate; the search asks the engine with its own requests.
        let ids = &req.request().prompt_token_ids;
        let beams = crate::beam::search(st, ids, bp, v).await?;
        pt += ids.len();
        // Completions show a step's first `logprobs + 1` dict entries (vLLM's
        // `num_output_top_logprobs >= i`).
        let shown = crate::beam::show(
            st,
            beams,
            v.stop.skip_special_tokens,
            v.sampling.logprobs.map(|k| k + 1),
        );
        for (i, b) in shown.into_iter().enumerate() {
            ct += b.token_ids.len();
            let prefix = if echo { text.as_str() } else { "" };
            choices.push(CompletionChoice {
                index: pi * bp.width + i,
                text: format!("{prefix}{}", b.text),
                logprobs: b.logprobs.as_ref().map(|l| {
                    completion_logprobs_with(st, l, prefix.len(), v.tokens_as_ids, ranked)
                }),
                finish_reason: Some(b.finish_reason.to_string()),
                stop_reason: Some(b.stop_reason),
                prompt_logprobs: Some(None),
                prompt_token_ids: v.return_token_ids.then(|| ids.clone()),
                token_ids: v.return_token_ids.then_some(b.token_ids),
                routed_experts: Some(None),
            });
        }
    }
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created: now_secs(),
        model: st.served_name().to_string(),
        choices,
        usage: Some(Usage::new(pt, ct).whole()),
        system_fingerprint: Some(SYSTEM_FINGERPRINT),
        tail: Some(ResponseTail::default()),
    })
    .into_response())
}

/// `/v1/chat/completions` with `use_beam_search`.
async fn beam_chat(
    st: &SharedState,
    id: String,
    ids: Vec<u32>,
    bp: crate::beam::BeamParams,
    v: &validate::Validated,
    role: String,
    echo: Option<String>,
) -> Result<Response, ApiError> {
    let beams = crate::beam::search(st, &ids, bp, v).await?;
    let shown = crate::beam::show(
        st,
        beams,
        v.stop.skip_special_tokens,
        // Chat asks for alternatives with `logprobs: true` + `top_logprobs` (the gate's `k`).
        v.sampling.logprobs,
    );
    let ct = shown.iter().map(|b| b.token_ids.len()).sum();
    let choices = shown
        .into_iter()
        .enumerate()
        .map(|(i, b)| ChatChoice {
            index: i,
            message: ChatMessageOut::new(
                role.clone(),
                Some(format!("{}{}", echo.as_deref().unwrap_or(""), b.text)),
                Vec::new(),
            ),
            logprobs: b
                .logprobs
                .as_ref()
                .map(|l| chat_logprobs_with(st, l, v.tokens_as_ids, ranked)),
            finish_reason: Some(b.finish_reason.to_string()),
            stop_reason: Some(b.stop_reason),
            token_ids: v.return_token_ids.then_some(b.token_ids),
            routed_experts: None,
        })
        .collect();
    Ok(Json(ChatCompletionResponse {
        id,
        object: "chat.completion",
        created: now_secs(),
        model: st.served_name().to_string(),
        choices,
        usage: Usage::new(ids.len(), ct).whole(),
        prompt_logprobs: None,
        prompt_token_ids: v.return_token_ids.then_some(ids),
        prompt_text: None,
        system_fingerprint: SYSTEM_FINGERPRINT,
        tail: Some(ResponseTail::default()),
    })
    .into_response())
}

fn too_large(max: usize) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body too large (limit {max} bytes, --max-body-bytes)"),
    )
    .into_response()
}

fn parse_body<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, ApiError> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.trim_start().starts_with("application/json") {
        // vLLM 0.32 answers 400 here (a validation error), not 415.
        return Err(ApiError::bad_request(format!(
            "Unsupported Media Type: Only 'application/json' is allowed, got `{ct}`"
        )));
    }
    serde_json::from_slice(body).or_else(|e| crate::numbers::retry(body, e))
}

fn check_model(st: &SharedState, model: Option<&str>) -> Result<(), ApiError> {
    if st.model_matches(model) {
        Ok(())
    } else {
        let mut e = ApiError::not_found(format!(
            "The model `{}` does not exist. Valid aliases: {}.",
            model.unwrap_or_default(),
            st.served_model_names.join(", ")
        ));
        e.param = Some("model".into());
        Err(e)
    }
}

/// The response id, as vLLM's `_base_request_id`: the `X-Request-Id` header, else the body's
/// `request_id`, else random; after the route's prefix.
fn request_id(prefix: &str, headers: &HeaderMap, field: Option<&str>) -> String {
    let given = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .or(field)
        .filter(|s| !s.is_empty());
    match given {
        Some(g) => format!("{prefix}-{g}"),
        None => format!("{prefix}-{:032x}", rand::random::<u128>()),
    }
}

/// Counts a request as in flight until dropped (SIGTERM drain waits for zero) and refuses
/// it when `--max-waiting-requests` would be exceeded.
struct InFlight(SharedState);

impl InFlight {
    fn new(st: &SharedState) -> Result<Self, ApiError> {
        if st.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let before = st.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(st.clone());
        if let Some(limit) = st.admission_limit {
            if before >= limit {
                drop(guard);
                tracing::debug!("refused a request: {limit} in flight");
                return Err(ApiError {
                    retry_after: Some(1),
                    ..ApiError::unavailable(format!(
                        "the server is at capacity ({limit} requests in flight: --max-num-seqs \
                         running plus --max-waiting-requests waiting); retry later"
                    ))
                });
            }
        }
        Ok(guard)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn finish_fields(f: &Option<Finish>) -> (Option<String>, Value) {
    match f {
        None => (None, Value::Null),
        Some(f) => (
            Some(f.reason.as_str().to_string()),
            match &f.stop_reason {
                Some(StopReason::Token(t)) => json!(t),
                Some(StopReason::String(s)) => json!(s),
                Some(StopReason::Repetition) => json!("repetition_detected"),
                None => Value::Null,
            },
        ),
    }
}

fn token_text(st: &SharedState, id: u32) -> String {
    st.tokenizer.decode(&[id], false).unwrap_or_default()
}

/// A token as logprobs show it: its text, or `token_id:<id>` with `return_tokens_as_token_ids`
/// (vLLM's placeholder: a token that is not valid UTF-8 alone stays identifiable).
pub(crate) fn shown_token(st: &SharedState, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        token_text(st, id)
    }
}

/// Completions' logprobs; text offsets advance by each shown token's length (the placeholder's
/// with `as_ids`, as vLLM counts them).
/// A logprob as vLLM shows it: the f32 widened exactly (vLLM's Python floats print all of its
/// digits, and a value printed once as f32 and once as f64 would not compare equal), and at
/// least -9999 (OpenAI's stand-in for -inf, which JSON cannot carry: a token a grammar
/// excludes).
pub(crate) fn shown_logprob(v: f32) -> f64 {
    (v as f64).max(-9999.0)
}

/// A sampled token's alternatives in vLLM's order: the token itself, then the other entries
/// of `top` (vLLM builds each position's dict from `[sampled, top…]`; completions show all of
/// it, the sampled token included when it is not among the top, chat its first `top.len()`
/// entries — so a token sampled outside the top comes first and pushes the last one out).
fn alternatives(lp: &TokenLogprobs) -> impl Iterator<Item = (u32, f32)> + '_ {
    std::iter::once((lp.token, lp.logprob)).chain(
        lp.top
            .iter()
            .copied()
            .filter(move |&(id, _)| id != lp.token),
    )
}

pub(crate) fn completion_logprobs(
    st: &SharedState,
    lps: &[TokenLogprobs],
    offset0: usize,
    as_ids: bool,
) -> CompletionLogprobs {
    completion_logprobs_with(st, lps, offset0, as_ids, |lp| alternatives(lp).collect())
}

/// A beam's alternatives as vLLM 0.32 shows them: the first entries of the step's dict, which
/// is the step's top candidates in rank order (its 1-token request is greedy), whichever
/// token the beam took — `beam::show` keeps as many as the endpoint shows.
fn ranked(lp: &TokenLogprobs) -> Vec<(u32, f32)> {
    lp.top.clone()
}

fn completion_logprobs_with(
    st: &SharedState,
    lps: &[TokenLogprobs],
    offset0: usize,
    as_ids: bool,
    alts: impl Fn(&TokenLogprobs) -> Vec<(u32, f32)>,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = offset0;
    for lp in lps {
        let tok = shown_token(st, lp.token, as_ids);
        out.text_offset.push(offset);
        offset += tok.len();
        out.token_logprobs.push(Some(shown_logprob(lp.logprob)));
        let top = alts(lp)
            .into_iter()
            .map(|(id, v)| (shown_token(st, id, as_ids), json!(shown_logprob(v))))
            .collect();
        out.top_logprobs.push(Some(top));
        out.tokens.push(tok);
    }
    out
}

fn prompt_logprobs_json(st: &SharedState, p: &Option<Vec<Option<TokenLogprobs>>>) -> Option<Value> {
    p.as_ref().map(|v| {
        Value::Array(
            v.iter()
                .map(|e| match e {
                    None => Value::Null,
                    Some(lp) => {
                        let mut m = serde_json::Map::new();
                        m.insert(
                            lp.token.to_string(),
                            json!({"logprob": lp.logprob, "rank": lp.rank, "decoded_token": token_text(st, lp.token)}),
                        );
                        for (i, &(id, v)) in lp.top.iter().enumerate() {
                            m.entry(id.to_string()).or_insert(
                                json!({"logprob": v, "rank": i + 1, "decoded_token": token_text(st, id)}),
                            );
                        }
                        Value::Object(m)
                    }
                })
                .collect(),
        )
    })
}

pub fn sse_json(v: &impl serde::Serialize) -> Result<Event, Infallible> {
    Ok(Event::default().data(serde_json::to_string(v).unwrap_or_else(|_| "{}".into())))
}

struct Submitted {
    streams: Vec<RequestStream>,
    prompt_texts: Vec<String>,
    prompt_lens: Vec<usize>,
    /// Each prompt's ids when `return_token_ids` asked for them (else empty).
    prompt_ids: Vec<Vec<u32>>,
}

/// `keep_ids`: keep each prompt's ids for the response (`return_token_ids`, echoed logprobs).
/// A request that failed after it was accepted. A grammar that exceeds the matcher's limits
/// only mid-answer (llguidance builds its lexer lazily) is the request's fault: a 400.
fn generation_error(e: String) -> ApiError {
    if e.starts_with("structured output:") {
        ApiError::bad_request(format!("Invalid structured output specification: {e}"))
    } else {
        ApiError::internal(format!("generation failed: {e}"))
    }
}

/// Compiles the request's structured-output constraint, if any (a 400 for a bad one).
async fn constraint(
    st: &SharedState,
    v: &validate::Validated,
) -> Result<Option<tpuserve_engine::structured::Constraint>, ApiError> {
    match &v.constraint {
        None => Ok(None),
        Some((spec, field)) => Ok(Some(st.grammars.compile(field, spec.clone()).await?)),
    }
}

async fn submit(
    st: &SharedState,
    prompts: Vec<(ValidatedRequest, String)>,
    v: &validate::Validated,
    user: Option<&str>,
    keep_ids: bool,
) -> Result<Submitted, ApiError> {
    let constraint = constraint(st, v).await?;
    let mut s = Submitted {
        streams: Vec::new(),
        prompt_texts: Vec::new(),
        prompt_lens: Vec::new(),
        prompt_ids: Vec::new(),
    };
    for (req, text) in prompts {
        let ids = &req.request().prompt_token_ids;
        s.prompt_lens.push(ids.len());
        s.prompt_ids
            .push(if keep_ids { ids.clone() } else { Vec::new() });
        if st.log_requests {
            // Token counts and parameters only: prompts may be sensitive.
            tracing::info!(
                "Received request {:?}: {} prompt tokens, n={}, max_tokens={:?}, temperature={}, user={:?}",
                req.id(),
                ids.len(),
                v.n,
                v.stop.max_tokens,
                v.sampling.temperature,
                user
            );
        }
        s.streams
            .push(st.engine.add(req.with_constraint(constraint.clone()))?);
        s.prompt_texts.push(text);
    }
    Ok(s)
}

async fn completions(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let guard = InFlight::new(&st)?;
    let req: CompletionRequest = parse_body(&headers, &body)?;
    static KNOWN: OnceLock<BTreeSet<String>> = OnceLock::new();
    unsupported::log_unknown::<CompletionRequest>(&KNOWN, &body);
    check_model(&st, req.model.as_deref())?;
    // Echo with logprobs covers the prompt: the gate has the engine compute its logprobs
    // too (the response shows `prompt_logprobs` only when the request asked for them).
    let gate::CompletionInput {
        prompts,
        params: v,
        echo_logprobs: echo_k,
        show_prompt_logprobs: show_prompt_lps,
    } = gate::completion(&st.gate(), &req)?;
    let echo = req.echo.unwrap_or(false);
    if let Some(bp) = v.beam {
        let id = request_id("cmpl", &headers, req.sampling.request_id.as_deref());
        let res = beam_completion(&st, id, prompts, bp, &v, echo).await;
        drop(guard);
        return res;
    }
    // A streamed echo sends the prompt's ids on its first chunk, as vLLM.
    let keep_ids = v.return_token_ids || echo_k.is_some() || (echo && v.stream);
    let sub = submit(&st, prompts, &v, req.sampling.user.as_deref(), keep_ids).await?;
    let id = request_id("cmpl", &headers, req.sampling.request_id.as_deref());
    let created = now_secs();
    let model = st.served_name().to_string();
    let n = v.n;
    let want_lp = v.sampling.logprobs.is_some();
    if v.stream {
        let head = streaming::StreamHead {
            id,
            created,
            model,
            n,
            include_usage: v.include_usage,
            continuous_usage: v.continuous_usage,
            want_logprobs: want_lp,
            return_token_ids: v.return_token_ids,
            tokens_as_ids: v.tokens_as_ids,
            prompt_tokens_details: st.prompt_tokens_details,
            tool_mode: None,
            interval: v.stream_interval,
        };
        let prompts = streaming::Prompts {
            lens: sub.prompt_lens,
            ids: sub.prompt_ids,
            echo_texts: echo.then_some(sub.prompt_texts),
            echo_logprobs: echo_k,
        };
        return Ok(streaming::completions(
            st,
            head,
            sub.streams,
            prompts,
            guard,
        ));
    }
    let mut choices = Vec::new();
    let (mut pt, mut ct, mut cached) = (0, 0, 0);
    for (pi, stream) in sub.streams.into_iter().enumerate() {
        let fin: FinalOutput = stream.collect().await;
        if let Some(e) = fin.error {
            return Err(generation_error(e));
        }
        pt += fin.prompt.num_prompt_tokens;
        cached += fin.prompt.num_cached_tokens;
        let plp =
            prompt_logprobs_json(&st, &fin.prompt.prompt_logprobs).filter(|_| show_prompt_lps);
        for o in fin.outputs {
            ct += o.token_ids.len();
            let mut text = String::new();
            if echo {
                text.push_str(&sub.prompt_texts[pi]);
            }
            let offset0 = text.len();
            text.push_str(&o.text);
            let (fr, sr) = finish_fields(&o.finish);
            choices.push(CompletionChoice {
                index: pi * n + o.index,
                text,
                logprobs: match (echo_k, o.logprobs.as_ref().filter(|_| want_lp)) {
                    (Some(k), Some(l)) => Some(crate::echo::prompt_then_output(
                        &st,
                        &sub.prompt_ids[pi],
                        fin.prompt.prompt_logprobs.as_deref().unwrap_or(&[]),
                        l,
                        k,
                        0,
                        v.tokens_as_ids,
                    )),
                    (None, Some(l)) => Some(completion_logprobs(&st, l, offset0, v.tokens_as_ids)),
                    (_, None) => None,
                },
                finish_reason: fr,
                stop_reason: Some(sr),
                prompt_logprobs: Some(plp.clone()),
                prompt_token_ids: v.return_token_ids.then(|| sub.prompt_ids[pi].clone()),
                token_ids: v.return_token_ids.then(|| o.token_ids.clone()),
                routed_experts: Some(None),
            });
        }
    }
    drop(guard);
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model: st.served_name().to_string(),
        choices,
        usage: Some(
            Usage::new(pt, ct)
                .with_cached(st.prompt_tokens_details, cached)
                .whole(),
        ),
        system_fingerprint: Some(SYSTEM_FINGERPRINT),
        tail: Some(ResponseTail::default()),
    })
    .into_response())
}

/// Chat's logprobs. With `as_ids` a token shows as `token_id:<id>`; the chosen token's `bytes`
/// stay its text's, the alternatives' are the shown string's (as vLLM fills them).
pub(crate) fn chat_logprobs(st: &SharedState, lps: &[TokenLogprobs], as_ids: bool) -> ChatLogprobs {
    chat_logprobs_with(st, lps, as_ids, |lp| {
        alternatives(lp).take(lp.top.len()).collect()
    })
}

fn chat_logprobs_with(
    st: &SharedState,
    lps: &[TokenLogprobs],
    as_ids: bool,
    alts: impl Fn(&TokenLogprobs) -> Vec<(u32, f32)>,
) -> ChatLogprobs {
    let top = |id: u32, v: f32| {
        let t = shown_token(st, id, as_ids);
        TopLogprob {
            bytes: t.as_bytes().to_vec(),
            token: t,
            logprob: shown_logprob(v),
        }
    };
    ChatLogprobs {
        content: lps
            .iter()
            .map(|lp| {
                let t = token_text(st, lp.token);
                ChatTokenLogprob {
                    bytes: t.as_bytes().to_vec(),
                    token: if as_ids {
                        shown_token(st, lp.token, true)
                    } else {
                        t
                    },
                    logprob: shown_logprob(lp.logprob),
                    top_logprobs: alts(lp).into_iter().map(|(id, v)| top(id, v)).collect(),
                }
            })
            .collect(),
    }
}

async fn chat_completions(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let guard = InFlight::new(&st)?;
    let req: ChatCompletionRequest = parse_body(&headers, &body)?;
    static KNOWN: OnceLock<BTreeSet<String>> = OnceLock::new();
    unsupported::log_unknown::<ChatCompletionRequest>(&KNOWN, &body);
    check_model(&st, req.model.as_deref())?;
    let gate::ChatInput {
        request,
        text,
        params: v,
        logprobs: lp,
        tool_mode,
    } = gate::chat(&st.gate(), &req)?;
    if let Some(bp) = v.beam {
        let role = chat::response_role(&req, &st.response_role);
        let id = request_id("chatcmpl", &headers, req.sampling.request_id.as_deref());
        let echo = chat::echo_text(&req, &role);
        let ids = request.request().prompt_token_ids.clone();
        let res = beam_chat(&st, id, ids, bp, &v, role, echo).await;
        drop(guard);
        return res;
    }
    let sub = submit(
        &st,
        vec![(request, text)],
        &v,
        req.sampling.user.as_deref(),
        v.return_token_ids,
    )
    .await?;
    let role = chat::response_role(&req, &st.response_role);
    let echo = chat::echo_text(&req, &role);
    let id = request_id("chatcmpl", &headers, req.sampling.request_id.as_deref());
    let created = now_secs();
    let model = st.served_name().to_string();
    let want_lp = lp.is_some();
    let mut streams = sub.streams;
    let stream = streams.remove(0);
    let prompt_ids = sub.prompt_ids.into_iter().next().unwrap_or_default();
    if v.stream {
        let head = streaming::StreamHead {
            id,
            created,
            model,
            n: v.n,
            include_usage: v.include_usage,
            continuous_usage: v.continuous_usage,
            want_logprobs: want_lp,
            return_token_ids: v.return_token_ids,
            tokens_as_ids: v.tokens_as_ids,
            prompt_tokens_details: st.prompt_tokens_details,
            tool_mode: tool_mode.clone(),
            interval: v.stream_interval,
        };
        let prompts = streaming::Prompts {
            lens: sub.prompt_lens,
            ids: vec![prompt_ids],
            echo_texts: None,
            echo_logprobs: None,
        };
        return Ok(streaming::chat(
            st,
            head,
            stream,
            prompts,
            role.clone(),
            echo,
            guard,
        ));
    }
    let fin = stream.collect().await;
    drop(guard);
    if let Some(e) = fin.error {
        return Err(generation_error(e));
    }
    let ct: usize = fin.outputs.iter().map(|o| o.token_ids.len()).sum();
    let choices = fin
        .outputs
        .iter()
        .map(|o| {
            let (mut fr, sr) = finish_fields(&o.finish);
            let echoed = |c: Option<String>| match (&echo, c) {
                (Some(e), c) => Some(format!("{e}{}", c.unwrap_or_default())),
                (None, c) => c,
            };
            let (content, tool_calls) = match &tool_mode {
                None => (echoed(Some(o.text.clone())), Vec::new()),
                Some(m) => {
                    let a = m.answer(&o.text);
                    fr = fr.map(|f| m.finish_reason(!a.calls.is_empty(), &f));
                    (
                        echoed(a.content),
                        a.calls
                            .iter()
                            .map(crate::tools::ToolCall::to_json)
                            .collect(),
                    )
                }
            };
            ChatChoice {
                index: o.index,
                message: ChatMessageOut::new(role.clone(), content, tool_calls),
                logprobs: o
                    .logprobs
                    .as_ref()
                    .filter(|_| want_lp)
                    .map(|l| chat_logprobs(&st, l, v.tokens_as_ids)),
                finish_reason: fr,
                stop_reason: Some(sr),
                token_ids: v.return_token_ids.then(|| o.token_ids.clone()),
                routed_experts: None,
            }
        })
        .collect();
    Ok(Json(ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model: st.served_name().to_string(),
        choices,
        usage: Usage::new(fin.prompt.num_prompt_tokens, ct)
            .with_cached(st.prompt_tokens_details, fin.prompt.num_cached_tokens)
            .whole(),
        prompt_logprobs: prompt_logprobs_json(&st, &fin.prompt.prompt_logprobs),
        prompt_token_ids: v.return_token_ids.then_some(prompt_ids),
        prompt_text: None,
        system_fingerprint: SYSTEM_FINGERPRINT,
        tail: Some(ResponseTail::default()),
    })
    .into_response())
}

async fn models(State(st): State<SharedState>) -> Json<Value> {
    let data: Vec<Value> = st
        .served_model_names
        .iter()
        .map(|name| {
            json!({"id": name, "object": "model", "created": st.created, "owned_by": "vllm",
                "root": st.model_root, "parent": null, "max_model_len": st.limits().max_model_len,
                "permission": [{"id": format!("modelperm-{:032x}", rand::random::<u128>()),
                    "object": "model_permission", "created": st.created, "allow_create_engine": false,
                    "allow_sampling": true, "allow_logprobs": true, "allow_search_indices": false,
                    "allow_view": true, "allow_fine_tuning": false, "organization": "*", "group": null,
                    "is_blocking": false}]})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn health(State(st): State<SharedState>) -> Response {
    if st.engine.is_running() {
        StatusCode::OK.into_response()
    } else {
        ApiError::unavailable("the engine has stopped").into_response()
    }
}

/// vLLM's `/load`: completion and chat requests in flight, counted only with
/// `--enable-server-load-tracking` (0 otherwise, as vLLM).
async fn load(State(st): State<SharedState>) -> Json<Value> {
    let n = if st.server_load_tracking {
        st.in_flight.load(Ordering::SeqCst)
    } else {
        0
    };
    Json(json!({ "server_load": n }))
}

/// SageMaker's `/invocations`: a chat body (`messages`) or a completion body (`prompt`) goes to
/// that route's handler, as vLLM's dispatch by request type.
async fn invocations(
    st: State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let v: Value = parse_body(&headers, &body)?;
    let has = |k: &str| v.get(k).is_some();
    if has("messages") {
        chat_completions(st, headers, body).await
    } else if has("prompt") {
        completions(st, headers, body).await
    } else {
        Err(ApiError::bad_request(
            "Cannot find suitable handler for request: /invocations takes a chat completion \
             body (with `messages`) or a completion body (with `prompt`)",
        ))
    }
}

/// `/tokenizer_info`, only with `--enable-tokenizer-info-endpoint` (else 404, as vLLM does not
/// register the route).
async fn tokenizer_info(State(st): State<SharedState>) -> Result<Json<Value>, ApiError> {
    st.tokenizer_info
        .clone()
        .map(Json)
        .ok_or_else(|| ApiError::not_found("Not Found"))
}

async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

async fn tokenize(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse_body(&headers, &body)?;
    let (ids, strs) = match &req {
        TokenizeRequest::Text {
            model,
            prompt,
            add_special_tokens,
            return_token_strs,
        } => {
            check_model(&st, model.as_deref())?;
            let ids = st
                .tokenizer
                .encode(prompt, add_special_tokens.unwrap_or(true))
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            (ids, return_token_strs.unwrap_or(false))
        }
        TokenizeRequest::Chat {
            model,
            messages,
            add_generation_prompt,
            continue_final_message,
            add_special_tokens,
            chat_template_kwargs,
            return_token_strs,
            tools,
            chat_template,
            mm_processor_kwargs,
            media_io_kwargs,
        } => {
            check_model(&st, model.as_deref())?;
            for (field, v) in [
                ("mm_processor_kwargs", mm_processor_kwargs),
                ("media_io_kwargs", media_io_kwargs),
            ] {
                if v.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(ApiError::invalid_param(
                        field,
                        format!("{field} is not supported by tpuserve: the model is text-only"),
                    ));
                }
            }
            if *continue_final_message == Some(true) && *add_generation_prompt == Some(true) {
                return Err(ApiError::bad_request(
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                ));
            }
            let own = match chat_template {
                None => None,
                Some(_) if !st.trust_request_chat_template => {
                    return Err(ApiError::invalid_param(
                        "chat_template",
                        "Chat template is passed with request, but --trust-request-chat-template \
                         is not set. Refused request with untrusted chat template.",
                    ))
                }
                Some(src) => Some(
                    tpuserve_model::ChatTemplate::new(
                        src,
                        st.tokenizer.bos_token.as_deref().unwrap_or(""),
                        st.tokenizer.eos_token.as_deref().unwrap_or(""),
                    )
                    .map_err(|e| ApiError::invalid_param("chat_template", e.to_string()))?,
                ),
            };
            let text = chat::render(
                own.as_ref().or(st.chat_template.as_ref()),
                messages,
                &ChatPromptOptions {
                    add_generation_prompt: *add_generation_prompt,
                    continue_final_message: *continue_final_message,
                    kwargs: crate::gate::template_kwargs(
                        st.default_chat_template_kwargs.as_ref(),
                        chat_template_kwargs.as_ref(),
                        None,
                    )
                    .as_deref(),
                    tools: tools.as_ref().filter(|t| !t.is_null()),
                    documents: None,
                },
            )?;
            let ids = st
                .tokenizer
                .encode(&text, add_special_tokens.unwrap_or(false))
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            (ids, return_token_strs.unwrap_or(false))
        }
    };
    // The vocabulary's own pieces (HF's convert_ids_to_tokens), as vLLM returns them.
    let token_strs = strs.then(|| {
        ids.iter()
            .map(|&id| st.tokenizer.id_to_token(id).unwrap_or_default())
            .collect::<Vec<_>>()
    });
    Ok(Json(
        json!({"count": ids.len(), "max_model_len": st.limits().max_model_len, "tokens": ids, "token_strs": token_strs}),
    ))
}

async fn detokenize(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse_body(&headers, &body)?;
    check_model(&st, req.model.as_deref())?;
    let ids = req
        .tokens
        .iter()
        .map(|&t| validate::token_id("tokens", t, &st.limits()))
        .collect::<Result<Vec<_>, _>>()?;
    let text = st
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(json!({"prompt": text})))
}
