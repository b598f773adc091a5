//! One streamed request and what it measured. Every request gets its own connection:
//! llama.cpp's `llama-server` closes the socket after each stream although its response
//! says keep-alive, so a pooled connection fails the next request that picks it up
//! ("connection closed before message completed"). A loopback connect costs microseconds
//! against requests of hundreds of milliseconds.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::args::BenchServeArgs;
use crate::dataset::BenchRequest;
use crate::BenchError;

#[derive(Clone, Debug, Default)]
pub struct RequestOutcome {
    pub error: Option<String>,
    /// Seconds from sending to the first chunk carrying text.
    pub ttft: f64,
    /// Seconds between successive text chunks.
    pub itl: Vec<f64>,
    /// Seconds from sending to the end of the stream.
    pub latency: f64,
    /// Text chunks received.
    pub chunks: usize,
    /// `usage` of the final chunk, when the server sends it (`stream_options.include_usage`).
    pub usage_prompt_tokens: Option<usize>,
    pub usage_completion_tokens: Option<usize>,
    pub text_len: usize,
}

impl RequestOutcome {
    pub fn failed(reason: String) -> Self {
        Self {
            error: Some(reason),
            ..Self::default()
        }
    }

    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Generated tokens: the server's own count where it gives one, else one per chunk.
    pub fn output_tokens(&self) -> usize {
        self.usage_completion_tokens.unwrap_or(self.chunks)
    }
}

pub struct Endpoint {
    client: reqwest::Client,
    url: String,
    chat: bool,
    model: String,
    ignore_eos: bool,
    temperature: f64,
    api_key: Option<String>,
}

impl Endpoint {
    pub fn new(args: &BenchServeArgs) -> Result<Self, BenchError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(args.request_timeout))
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| BenchError::Argument(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            url: format!("{}{}", args.base_url.trim_end_matches('/'), args.endpoint),
            chat: args.endpoint.contains("chat"),
            model: args.model.clone(),
            ignore_eos: args.ignore_eos,
            temperature: args.temperature,
            api_key: args.api_key.clone(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn body(&self, req: &BenchRequest) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": req.output_len,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.chat {
            body["messages"] = json!([{"role": "user", "content": req.prompt}]);
        } else {
            body["prompt"] = json!(req.prompt);
        }
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        body
    }

    pub async fn send(&self, req: &BenchRequest) -> RequestOutcome {
        let started = Instant::now();
        let mut out = RequestOutcome::default();
        if let Err(e) = self.stream(req, started, &mut out).await {
            out.error = Some(e);
        }
        out.latency = started.elapsed().as_secs_f64();
        out
    }

    async fn stream(
        &self,
        req: &BenchRequest,
        started: Instant,
        out: &mut RequestOutcome,
    ) -> Result<(), String> {
        let mut http = self.client.post(&self.url).json(&self.body(req));
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key);
        }
        let mut resp = http.send().await.map_err(|e| describe(&e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", truncate(&body, 300)));
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut last = started;
        let mut done = false;
        while let Some(bytes) = resp.chunk().await.map_err(|e| describe(&e))? {
            let now = Instant::now();
            pending.extend_from_slice(&bytes);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim().strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data)
                    .map_err(|e| format!("bad stream chunk ({e}): {}", truncate(data, 200)))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("error in stream: {err}"));
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    let n = |k: &str| u.get(k).and_then(Value::as_u64).map(|x| x as usize);
                    out.usage_prompt_tokens = n("prompt_tokens");
                    out.usage_completion_tokens = n("completion_tokens");
                }
                let text = v
                    .get("choices")
                    .and_then(|c| c.get(0))
                    .and_then(|c| {
                        if self.chat {
                            c.get("delta").and_then(|d| d.get("content"))
                        } else {
                            c.get("text")
                        }
                    })
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if text.is_empty() {
                    continue;
                }
                if out.chunks == 0 {
                    out.ttft = (now - started).as_secs_f64();
                } else {
                    out.itl.push((now - last).as_secs_f64());
                }
                last = now;
                out.chunks += 1;
                out.text_len += text.len();
            }
        }
        if !done {
            return Err("the stream ended without data: [DONE]".into());
        }
        if out.chunks == 0 {
            return Err("the stream carried no text".into());
        }
        Ok(())
    }
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
