//! SSE framing of `/v1/completions` and `/v1/chat/completions` as vLLM frames it: every
//! chunk carries exactly one choice (clients read `choices[0]`), each choice ends with its own
//! chunk carrying `finish_reason`, and the usage chunk comes last with `choices: []`. With
//! `stream_options.continuous_usage_stats` (and `include_usage`) every chunk also carries the
//! usage so far of its choice: the prompt's tokens and the tokens that choice generated.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc::Sender;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tpuserve_engine::{RequestStream, SeqDelta, TokenLogprobs};

use crate::app::{chat_logprobs, completion_logprobs, finish_fields, sse_json};
use crate::error::ApiError;
use crate::protocol::{CompletionChoice, CompletionResponse, Usage, SYSTEM_FINGERPRINT};
use crate::state::SharedState;

/// What every chunk of one streamed response shares.
pub struct StreamHead {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Choices per prompt.
    pub n: usize,
    /// Usage chunk at the end (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Usage on every chunk (`continuous_usage_stats`, only together with `include_usage`,
    /// as vLLM's `should_include_usage`).
    pub continuous_usage: bool,
    /// Top alternatives were asked for: deltas carry logprobs.
    pub want_logprobs: bool,
    /// `return_token_ids`: the prompt's ids on the first chunk, each chunk's new ids.
    pub return_token_ids: bool,
    /// `return_tokens_as_token_ids` (or the server's flag): logprob tokens as `token_id:<id>`.
    pub tokens_as_ids: bool,
    /// `--enable-prompt-tokens-details`: cached prompt tokens in the final usage.
    pub prompt_tokens_details: bool,
    /// Chat: how tool calls are read from the answer (`None`: plain content).
    pub tool_mode: Option<crate::tools::ToolMode>,
    /// `stream_interval`: tokens gathered into each chunk (see [`Gather`]).
    pub interval: usize,
}

/// vLLM's `stream_interval`: a choice's first delta and its last go out as they come, the
/// others are held until `interval` tokens have gathered since the last chunk (then sent as
/// one chunk: the tokens, text and logprobs of the deltas, in order).
struct Gather {
    interval: usize,
    /// Per choice: what is held back, and whether anything was sent yet.
    held: Vec<Option<SeqDelta>>,
    sent: Vec<bool>,
}

impl Gather {
    fn new(interval: usize, choices: usize) -> Self {
        Gather {
            interval,
            held: vec![None; choices],
            sent: vec![false; choices],
        }
    }

    /// The chunk to send for choice `index` now that `d` came, if any.
    fn push(&mut self, index: usize, d: SeqDelta) -> Option<SeqDelta> {
        if self.interval <= 1 {
            return Some(d);
        }
        let d = match self.held[index].take() {
            Some(mut held) => {
                held.token_ids.extend_from_slice(&d.token_ids);
                held.text.push_str(&d.text);
                match (&mut held.logprobs, d.logprobs) {
                    (Some(a), Some(b)) => a.extend(b),
                    (a @ None, b) => *a = b,
                    (Some(_), None) => {}
                }
                held.finish = d.finish;
                held
            }
            None => d,
        };
        if d.finish.is_some() || !self.sent[index] || d.token_ids.len() >= self.interval {
            self.sent[index] |= !d.token_ids.is_empty();
            Some(d)
        } else {
            self.held[index] = Some(d);
            None
        }
    }
}

/// The prompts of one streamed response.
pub struct Prompts {
    pub lens: Vec<usize>,
    /// Each prompt's ids (filled when `return_token_ids` asked for them).
    pub ids: Vec<Vec<u32>>,
    /// With `echo`: each prompt's text, prepended to its choices' first chunk.
    pub echo_texts: Option<Vec<String>>,
    /// `echo` with `logprobs` (the number of alternatives): the first chunk's logprobs cover
    /// the prompt (its logprobs come with the prompt info).
    pub echo_logprobs: Option<usize>,
}

/// Per-choice token counts (index = prompt × n + choice).
struct Counts {
    prompt: Vec<usize>,
    /// Prompt tokens found in the prefix cache, per prompt.
    cached: Vec<usize>,
    generated: Vec<usize>,
}

impl Counts {
    fn new(prompt_lens: &[usize], n: usize) -> Self {
        Counts {
            prompt: prompt_lens.to_vec(),
            cached: vec![0; prompt_lens.len()],
            generated: vec![0; prompt_lens.len() * n],
        }
    }

    /// The usage of one choice so far (`prompt` = its prompt's index).
    fn choice(&self, prompt: usize, choice: usize) -> Usage {
        Usage::new(self.prompt[prompt], self.generated[choice])
    }

    /// The whole response: each prompt once, every choice's tokens.
    fn total(&self, details: bool) -> Usage {
        Usage::new(self.prompt.iter().sum(), self.generated.iter().sum())
            .with_cached(details, self.cached.iter().sum())
    }
}

/// A response whose body is fed by `task` through the channel it is given.
fn sse_response<F>(task: impl FnOnce(Sender<Result<Event, Infallible>>) -> F) -> Response
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(task(tx));
    Sse::new(ReceiverStream::new(rx)).into_response()
}

async fn send_error(tx: &Sender<Result<Event, Infallible>>, e: &str) {
    let _ = tx
        .send(sse_json(&ApiError::internal(e.to_string()).body()))
        .await;
}

/// Streams a completion: `streams[p]` generates prompt `p`. `guard` lives as long as the
/// stream.
pub fn completions(
    st: SharedState,
    head: StreamHead,
    streams: Vec<RequestStream>,
    prompts: Prompts,
    guard: impl Send + 'static,
) -> Response {
    sse_response(move |tx| async move {
        let _guard = guard;
        let n = head.n;
        let mut counts = Counts::new(&prompts.lens, n);
        let np = streams.len();
        let mut gather = Gather::new(head.interval, np * n);
        // Per prompt: first chunk of each choice still to come, text sent so far per choice
        // (where the next chunk's logprob offsets start), and its prompt logprobs.
        let mut first = vec![vec![true; n]; np];
        let mut sent = vec![vec![0usize; n]; np];
        let mut prompt_lps: Vec<Vec<Option<TokenLogprobs>>> = vec![Vec::new(); np];
        // The prompts' events interleave as the engine produces them (vLLM merges its
        // generators the same way): a later prompt's first tokens do not wait for the
        // earlier prompts to finish.
        let mut merged = tokio_stream::StreamMap::new();
        for (pi, stream) in streams.into_iter().enumerate() {
            merged.insert(
                pi,
                tokio_stream::wrappers::UnboundedReceiverStream::new(stream.receiver),
            );
        }
        while let Some((pi, ev)) = merged.next().await {
            if let Some(p) = ev.prompt {
                counts.cached[pi] = p.num_cached_tokens;
                prompt_lps[pi] = p.prompt_logprobs.unwrap_or_default();
            }
            if let Some(e) = &ev.error {
                send_error(&tx, e).await;
            }
            for d in ev.seqs {
                let index = pi * n + d.index;
                let Some(d) = gather.push(index, d) else {
                    continue;
                };
                counts.generated[index] += d.token_ids.len();
                let mut text = String::new();
                let is_first = std::mem::take(&mut first[pi][d.index]);
                if let (true, Some(t)) = (is_first, &prompts.echo_texts) {
                    text.push_str(&t[pi]);
                }
                text.push_str(&d.text);
                let mut choice = completion_choice(&st, &head, index, text, &d, sent[pi][d.index]);
                if let (true, Some(k), Some(l)) = (
                    is_first,
                    prompts.echo_logprobs,
                    d.logprobs.as_ref().filter(|_| head.want_logprobs),
                ) {
                    choice.logprobs = Some(crate::echo::prompt_then_output(
                        &st,
                        &prompts.ids[pi],
                        &prompt_lps[pi],
                        l,
                        k,
                        0,
                        head.tokens_as_ids,
                    ));
                }
                sent[pi][d.index] += choice.text.len();
                // vLLM sends the prompt's ids on a choice's first chunk with `echo` too.
                if is_first && (head.return_token_ids || prompts.echo_texts.is_some()) {
                    choice.prompt_token_ids = Some(prompts.ids[pi].clone());
                }
                let chunk = CompletionResponse {
                    id: head.id.clone(),
                    object: "text_completion",
                    created: head.created,
                    model: head.model.clone(),
                    choices: vec![choice],
                    usage: head.continuous_usage.then(|| counts.choice(pi, index)),
                    // vLLM: on a choice's finishing chunk when no usage chunk follows.
                    system_fingerprint: (d.finish.is_some() && !head.include_usage)
                        .then_some(SYSTEM_FINGERPRINT),
                    tail: None,
                };
                if tx.send(sse_json(&chunk)).await.is_err() {
                    return; // client gone: dropping the receivers aborts the requests
                }
            }
        }
        if head.include_usage {
            let chunk = json!({"id": head.id, "object": "text_completion",
                "created": head.created, "model": head.model, "choices": [],
                "usage": counts.total(head.prompt_tokens_details),
                "system_fingerprint": SYSTEM_FINGERPRINT});
            let _ = tx.send(sse_json(&chunk)).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    })
}

fn completion_choice(
    st: &SharedState,
    head: &StreamHead,
    index: usize,
    text: String,
    d: &SeqDelta,
    offset0: usize,
) -> CompletionChoice {
    let (finish_reason, stop_reason) = finish_fields(&d.finish);
    CompletionChoice {
        index,
        text,
        logprobs: d
            .logprobs
            .as_ref()
            .filter(|_| head.want_logprobs)
            .map(|l| completion_logprobs(st, l, offset0, head.tokens_as_ids)),
        finish_reason,
        stop_reason: Some(stop_reason),
        prompt_logprobs: None,
        prompt_token_ids: None,
        token_ids: head.return_token_ids.then(|| d.token_ids.clone()),
        routed_experts: None,
    }
}

/// Streams a chat completion: first one role chunk per choice, then one chunk per choice and
/// step, each choice closing with its `finish_reason`.
pub fn chat(
    st: SharedState,
    head: StreamHead,
    mut stream: RequestStream,
    prompts: Prompts,
    role: String,
    echo: Option<String>,
    guard: impl Send + 'static,
) -> Response {
    sse_response(move |tx| async move {
        let _guard = guard;
        let tool_mode = head.tool_mode.clone();
        let mut counts = Counts::new(&prompts.lens, head.n);
        // One tool-call extractor per choice (they keep state across deltas).
        let mut extractors: Vec<_> = (0..head.n)
            .map(|_| tool_mode.as_ref().map(|m| m.streamer()))
            .collect();
        let mut tools_streamed = vec![false; head.n];
        let mut gather = Gather::new(head.interval, head.n);
        let chunk = |choice: Value, usage: Option<Usage>| {
            let mut c = json!({"id": head.id, "object": "chat.completion.chunk",
                "created": head.created, "model": head.model, "choices": [choice]});
            if let Some(u) = usage {
                c["usage"] = json!(u);
            }
            c
        };
        for i in 0..head.n {
            let mut first = chunk(
                json!({"index": i, "delta": {"role": role, "content": ""}, "logprobs": null,
                    "finish_reason": null}),
                head.continuous_usage.then(|| counts.choice(0, i)),
            );
            if i == 0 {
                // vLLM sends the prompt's ids once, on the stream's first chunk (`null`
                // without `return_token_ids`), with its `prompt_text` (`null`).
                first["prompt_token_ids"] = json!(head.return_token_ids.then(|| &prompts.ids[0]));
                first["prompt_text"] = Value::Null;
            }
            if tx.send(sse_json(&first)).await.is_err() {
                return;
            }
        }
        // Chat `echo`: the continued message's text first, one chunk per choice (vLLM).
        for i in (0..head.n).filter(|_| echo.is_some()) {
            let c = chunk(
                json!({"index": i, "delta": {"content": echo}, "logprobs": null,
                    "finish_reason": null}),
                head.continuous_usage.then(|| counts.choice(0, i)),
            );
            if tx.send(sse_json(&c)).await.is_err() {
                return;
            }
        }
        while let Some(ev) = stream.next().await {
            if let Some(p) = &ev.prompt {
                counts.prompt[0] = p.num_prompt_tokens;
                counts.cached[0] = p.num_cached_tokens;
            }
            if let Some(e) = &ev.error {
                send_error(&tx, e).await;
            }
            for d in ev.seqs {
                let Some(d) = gather.push(d.index, d) else {
                    continue;
                };
                counts.generated[d.index] += d.token_ids.len();
                let (mut fr, sr) = finish_fields(&d.finish);
                let logprobs = d
                    .logprobs
                    .as_ref()
                    .filter(|_| head.want_logprobs)
                    .map(|l| chat_logprobs(&st, l, head.tokens_as_ids));
                let delta = match (extractors[d.index].as_mut(), &tool_mode) {
                    (Some(x), Some(m)) => {
                        let mut out = x.push(&d.text);
                        if let Some(o) = out.as_mut() {
                            if o["tool_calls"].as_array().is_some_and(|c| !c.is_empty()) {
                                tools_streamed[d.index] = true;
                            }
                            m.filter_delta(o);
                        }
                        // vLLM: "tool_calls" replaces "stop" once calls were streamed,
                        // except for a named function.
                        let named = matches!(m.choice, crate::tools::choice::Choice::Named(_));
                        if tools_streamed[d.index] && !named && fr.as_deref() == Some("stop") {
                            fr = Some("tool_calls".into());
                        }
                        match out {
                            Some(o) => o,
                            // Nothing to show yet (a call still being read): no chunk,
                            // unless it must carry the finish, logprobs or token ids.
                            None if fr.is_none()
                                && logprobs.is_none()
                                && !head.return_token_ids =>
                            {
                                continue
                            }
                            None => json!({}),
                        }
                    }
                    _ if d.text.is_empty() && fr.is_some() => json!({}),
                    _ => json!({"content": d.text}),
                };
                let mut choice = json!({"index": d.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": fr});
                // vLLM: `stop_reason` on the choice's last chunk only; `token_ids` on each
                // (`null` without `return_token_ids`).
                if fr.is_some() {
                    choice["stop_reason"] = sr;
                }
                choice["token_ids"] = json!(head.return_token_ids.then_some(&d.token_ids));
                let mut c = chunk(
                    choice,
                    head.continuous_usage.then(|| counts.choice(0, d.index)),
                );
                // vLLM: on a choice's finishing chunk when no usage chunk follows.
                if fr.is_some() && !head.include_usage {
                    c["system_fingerprint"] = json!(SYSTEM_FINGERPRINT);
                }
                if tx.send(sse_json(&c)).await.is_err() {
                    return;
                }
            }
        }
        if head.include_usage {
            let u = json!({"id": head.id, "object": "chat.completion.chunk",
                "created": head.created, "model": head.model, "choices": [],
                "usage": counts.total(head.prompt_tokens_details),
                "system_fingerprint": SYSTEM_FINGERPRINT});
            let _ = tx.send(sse_json(&u)).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpuserve_engine::{Finish, FinishReason};

    fn delta(index: usize, token: u32, finish: bool) -> SeqDelta {
        SeqDelta {
            index,
            token_ids: vec![token],
            text: format!("<{token}>"),
            logprobs: Some(vec![TokenLogprobs {
                token,
                logprob: -(token as f32),
                rank: 1,
                top: Vec::new(),
            }]),
            finish: finish.then(|| Finish::new(FinishReason::Length)),
        }
    }

    #[test]
    fn gather_sends_the_first_token_then_whole_intervals_then_the_rest() {
        let mut g = Gather::new(3, 2);
        let mut sent: Vec<(usize, Vec<u32>, String, usize, bool)> = Vec::new();
        // Two choices, interleaved as the engine's steps produce them; choice 1 ends early.
        for t in 0..8u32 {
            for i in 0..2 {
                let last = (i == 0 && t == 7) || (i == 1 && t == 4);
                if i == 1 && t > 4 {
                    continue;
                }
                if let Some(d) = g.push(i, delta(i, t, last)) {
                    let lps = d.logprobs.as_ref().map_or(0, |l| l.len());
                    sent.push((i, d.token_ids, d.text, lps, d.finish.is_some()));
                }
            }
        }
        let of = |i: usize| -> Vec<_> { sent.iter().filter(|s| s.0 == i).collect() };
        let ids: Vec<Vec<u32>> = of(0).iter().map(|s| s.1.clone()).collect();
        assert_eq!(ids, vec![vec![0], vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        let ids: Vec<Vec<u32>> = of(1).iter().map(|s| s.1.clone()).collect();
        assert_eq!(ids, vec![vec![0], vec![1, 2, 3], vec![4]]);
        for s in &sent {
            // Text and logprobs travel with their tokens; only the last chunk finishes.
            let text: String = s.1.iter().map(|t| format!("<{t}>")).collect();
            assert_eq!((&s.2, s.3), (&text, s.1.len()));
            assert_eq!(s.4, s.1.contains(&7) || (s.0 == 1 && s.1.contains(&4)));
        }
    }

    #[test]
    fn gather_of_one_passes_every_delta_through() {
        let mut g = Gather::new(1, 1);
        for t in 0..4 {
            assert_eq!(g.push(0, delta(0, t, false)).unwrap().token_ids, vec![t]);
        }
    }

    #[test]
    fn a_finish_without_tokens_releases_what_is_held() {
        let mut g = Gather::new(4, 1);
        assert!(g.push(0, delta(0, 0, false)).is_some());
        assert!(g.push(0, delta(0, 1, false)).is_none());
        let mut end = delta(0, 0, true);
        end.token_ids.clear();
        end.text.clear();
        end.logprobs = Some(Vec::new());
        let d = g.push(0, end).unwrap();
        assert_eq!((d.token_ids, d.text.as_str()), (vec![1], "<1>"));
        assert!(d.finish.is_some());
    }
}
