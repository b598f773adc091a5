//! Issue 4 acceptance: the OpenAI-compatible HTTP surface of a real `tpuserve serve` process
//! (SmolLM2 on CPU, free loopback port per server): the GKE tutorial's curl, goldens through
//! the API (alone and as concurrent streams), vLLM's error shapes and statuses, API keys,
//! aborts on client disconnect, the GKE sample's argument list, and SIGTERM draining.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tpuserve_model::load_model;
use tpuserve_runner_cpu::{CpuRunner, CpuRunnerOptions, CpuWeights};
use tpuserve_suite::checks::TOL;
use tpuserve_suite::driver::{self, SeqRequest};
use tpuserve_suite::goldens::{Case, Goldens};
use tpuserve_suite::server::{free_port, metric, poll, tpuserve_bin, Server, SseEvent};
use tpuserve_suite::{fixtures_dir, smollm2_gguf};

fn goldens() -> Goldens {
    Goldens::load(&fixtures_dir().join("smollm2/goldens.json"))
}

fn served_name(s: &Server) -> String {
    let m = s.get_json("/v1/models");
    m["data"][0]["id"].as_str().expect("model id").to_string()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The OpenAI error body vLLM returns: `{"error": {"message", "type", "param", "code"}}`.
fn assert_error(status: u16, body: &Value, want: u16, what: &str) -> String {
    assert_eq!(status, want, "{what}: status (body {body})");
    assert_eq!(keys(body), set(&["error"]), "{what}: body {body}");
    let e = &body["error"];
    assert_eq!(
        keys(e),
        set(&["message", "type", "param", "code"]),
        "{what}: error keys in {body}"
    );
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "{what}: empty message in {body}");
    assert!(e["type"].is_string(), "{what}: type in {body}");
    assert!(
        e["param"].is_null() || e["param"].is_string(),
        "{what}: param in {body}"
    );
    assert_eq!(e["code"], json!(want), "{what}: code in {body}");
    msg.to_string()
}

/// Greedy continuation of `prompt` computed in-process with the CPU runner (the numerical
/// reference), stopped at EOS like the server: (token ids, text without special tokens).
fn cpu_greedy(prompt: &str, max_tokens: usize) -> (Vec<u32>, Vec<u32>, String) {
    let model = load_model(&smollm2_gguf()).unwrap();
    let ids = model.tokenizer.encode(prompt, true).unwrap();
    let mut runner = CpuRunner::new(
        &model,
        CpuRunnerOptions {
            num_blocks: 8,
            block_size: 16,
            weights: CpuWeights::F32,
            kv_fp8: None,
        },
    )
    .unwrap();
    let res = driver::run(
        &mut runner,
        vec![SeqRequest {
            prompt: ids.clone(),
            max_new_tokens: max_tokens,
            logprobs: 0,
            prompt_logprobs: None,
            arrive_at_step: 0,
        }],
        4096,
    )
    .remove(0);
    let mut toks = res.tokens;
    if let Some(p) = toks.iter().position(|t| model.eos_token_ids.contains(t)) {
        toks.truncate(p + 1);
    }
    let text = model.tokenizer.decode(&toks, true).unwrap();
    (ids, toks, text)
}

#[test]
fn tutorial_curl_has_vllm_shape_and_greedy_text() {
    let (prompt_ids, toks, want_text) = cpu_greedy("San Francisco is a", 7);
    let s = Server::start(&[]);
    let name = served_name(&s);
    let t0 = now();
    let v = s.post_ok(
        "/v1/completions",
        &json!({"model": name, "prompt": "San Francisco is a", "max_tokens": 7, "temperature": 0}),
    );
    // Exactly the keys of vLLM 0.32's response (checked side by side with it: a whole
    // response carries every field, `null` where unset).
    assert_eq!(
        keys(&v),
        set(&[
            "id",
            "object",
            "created",
            "model",
            "choices",
            "usage",
            "service_tier",
            "system_fingerprint",
            "kv_transfer_params",
            "ec_transfer_params",
            "metrics"
        ]),
        "{v}"
    );
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("cmpl-") && id.len() > 10, "id {id}");
    assert_eq!(v["object"], "text_completion");
    let created = v["created"].as_u64().expect("created is an integer");
    assert!(
        created + 5 >= t0 && created <= now() + 5,
        "created {created} vs now {t0}"
    );
    assert_eq!(v["model"], json!(name));
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1, "{v}");
    let c = &choices[0];
    let ck = keys(c);
    let all = set(&[
        "index",
        "text",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "token_ids",
        "prompt_logprobs",
        "prompt_token_ids",
        "routed_experts",
    ]);
    assert_eq!(ck, all, "choice keys");
    for k in [
        "token_ids",
        "prompt_logprobs",
        "prompt_token_ids",
        "routed_experts",
    ] {
        assert!(c[k].is_null(), "{k}: {c}");
    }
    assert_eq!(c["index"], 0);
    assert!(c["logprobs"].is_null());
    assert!(c["stop_reason"].is_null(), "{c}");
    let want_finish = if toks.len() == 7 { "length" } else { "stop" };
    assert_eq!(c["finish_reason"], want_finish, "{c}");
    assert_eq!(
        c["text"].as_str().unwrap(),
        want_text,
        "text vs the CPU runner's greedy continuation"
    );
    // usage: prompt tokens as /tokenize counts them, completion tokens as generated.
    let u = &v["usage"];
    let uk = keys(u);
    assert!(
        uk.is_superset(&set(&[
            "prompt_tokens",
            "total_tokens",
            "completion_tokens"
        ])),
        "usage keys {uk:?}"
    );
    let tok = s.post_ok(
        "/tokenize",
        &json!({"model": name, "prompt": "San Francisco is a"}),
    );
    assert_eq!(tok["count"], json!(prompt_ids.len()), "/tokenize {tok}");
    assert_eq!(tok["tokens"], json!(prompt_ids), "/tokenize ids");
    assert_eq!(u["prompt_tokens"], tok["count"], "{u}");
    assert_eq!(u["completion_tokens"], json!(toks.len()), "{u}");
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    // The same request without `model` (vLLM ≥ 0.8 makes it optional) gives the same text.
    let v2 = s.post_ok(
        "/v1/completions",
        &json!({"prompt": "San Francisco is a", "max_tokens": 7, "temperature": 0}),
    );
    assert_eq!(v2["choices"][0]["text"], c["text"]);
}

/// Checks one choice's legacy-completions `logprobs` against the golden steps.
fn check_logprobs(case: &Case, lp: &Value, texts: &dyn Fn(u32) -> String) {
    let token_lps = lp["token_logprobs"].as_array().expect("token_logprobs");
    let tops = lp["top_logprobs"].as_array().expect("top_logprobs");
    let tokens = lp["tokens"].as_array().expect("tokens");
    assert_eq!(
        token_lps.len(),
        case.steps.len(),
        "{}: logprob count",
        case.name
    );
    assert_eq!(tops.len(), case.steps.len());
    assert_eq!(tokens.len(), case.steps.len());
    for (i, step) in case.steps.iter().enumerate() {
        let got = token_lps[i].as_f64().expect("token logprob");
        assert!(
            (got - step.logprob).abs() <= TOL,
            "{} step {i}: logprob {got} vs golden {}",
            case.name,
            step.logprob
        );
        assert_eq!(
            tokens[i].as_str().unwrap(),
            texts(step.token_id),
            "{} step {i}: token text",
            case.name
        );
        let top = tops[i].as_object().expect("top_logprobs entry");
        let golden_keys: Vec<String> = step.top.iter().map(|&(id, _)| texts(id)).collect();
        let min_golden = step.top.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
        for (k, &(_, gv)) in step.top.iter().enumerate() {
            let key = &golden_keys[k];
            if golden_keys.iter().filter(|x| *x == key).count() > 1 {
                continue; // two ids that decode to the same text share one map entry
            }
            match top.get(key) {
                Some(v) => {
                    let v = v.as_f64().unwrap();
                    assert!(
                        (v - gv).abs() <= TOL,
                        "{} step {i} top {key:?}: {v} vs golden {gv}",
                        case.name
                    );
                }
                // Only a near-tie at the top-5 boundary may swap in another token.
                None => assert!(
                    gv - min_golden <= TOL,
                    "{} step {i}: golden top token {key:?} ({gv}) missing from {top:?}",
                    case.name
                ),
            }
        }
    }
}

#[test]
fn golden_cases_through_the_api_and_as_concurrent_streams() {
    let g = goldens();
    let model = load_model(&smollm2_gguf()).unwrap();
    let texts = |id: u32| model.tokenizer.decode(&[id], false).unwrap();
    let s = Server::start(&[]);
    let name = served_name(&s);
    let body = |c: &Case, stream: bool| {
        json!({"model": name, "prompt": c.prompt_token_ids, "max_tokens": c.completion_token_ids.len(),
            "temperature": 0, "ignore_eos": true, "logprobs": 5, "skip_special_tokens": false,
            "stream": stream})
    };
    // One at a time, every case: text, token count, finish reason, per-token logprobs.
    for c in &g.cases {
        let v = s.post_ok("/v1/completions", &body(c, false));
        let ch = &v["choices"][0];
        assert_eq!(
            ch["text"].as_str().unwrap(),
            c.completion_text,
            "{}: text",
            c.name
        );
        assert_eq!(ch["finish_reason"], "length", "{}", c.name);
        assert_eq!(v["usage"]["prompt_tokens"], json!(c.prompt_token_ids.len()));
        assert_eq!(
            v["usage"]["completion_tokens"],
            json!(c.completion_token_ids.len())
        );
        check_logprobs(c, &ch["logprobs"], &texts);
    }
    // The batch cases, submitted together as streams: each reproduces its golden.
    let cases: Vec<&Case> = g.batch.case_names.iter().map(|n| g.case(n)).collect();
    let barrier = Barrier::new(cases.len());
    let results: Vec<(String, Vec<f64>, Option<String>, Value)> = std::thread::scope(|sc| {
        let handles: Vec<_> = cases
            .iter()
            .map(|c| {
                let mut b = body(c, true);
                b["stream_options"] = json!({"include_usage": true});
                let s = &s;
                let barrier = &barrier;
                sc.spawn(move || {
                    barrier.wait();
                    let chunks = s.stream("/v1/completions", &b).collect_all();
                    let (mut text, mut lps, mut finish, mut usage) =
                        (String::new(), Vec::new(), None, Value::Null);
                    for ch in chunks {
                        assert_eq!(ch["object"], "text_completion", "{ch}");
                        assert!(ch["id"].as_str().unwrap().starts_with("cmpl-"));
                        if !ch["usage"].is_null() {
                            usage = ch["usage"].clone();
                        }
                        for choice in ch["choices"].as_array().unwrap() {
                            assert_eq!(choice["index"], 0);
                            text.push_str(choice["text"].as_str().unwrap());
                            if let Some(l) = choice["logprobs"]["token_logprobs"].as_array() {
                                lps.extend(l.iter().map(|x| x.as_f64().unwrap()));
                            }
                            if let Some(f) = choice["finish_reason"].as_str() {
                                assert!(finish.is_none(), "two finish reasons");
                                finish = Some(f.to_string());
                            }
                        }
                    }
                    (text, lps, finish, usage)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (c, (text, lps, finish, usage)) in cases.iter().zip(results) {
        assert_eq!(
            text, c.completion_text,
            "{} (concurrent stream): text",
            c.name
        );
        assert_eq!(finish.as_deref(), Some("length"), "{}", c.name);
        assert_eq!(lps.len(), c.steps.len(), "{}: streamed logprobs", c.name);
        for (i, (got, step)) in lps.iter().zip(&c.steps).enumerate() {
            assert!(
                (got - step.logprob).abs() <= TOL,
                "{} (stream) step {i}: {got} vs {}",
                c.name,
                step.logprob
            );
        }
        assert_eq!(
            usage["completion_tokens"],
            json!(c.completion_token_ids.len()),
            "{}: usage chunk {usage}",
            c.name
        );
    }
}

#[test]
fn errors_have_openai_shape_and_right_status() {
    let s = Server::start(&["--max-model-len", "256"]);
    let name = served_name(&s);
    let c = s.client.clone();

    // Wrong model → 404.
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"model": "no-such-model", "prompt": "hi", "max_tokens": 1}),
    );
    let msg = assert_error(st, &b, 404, "wrong model");
    assert!(msg.contains("no-such-model"), "{msg}");
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_error(st, &b, 404, "wrong model (chat)");

    // As vLLM 0.32: a prompt that fits may ask for more than the context has left (the answer
    // runs to its end); more than the whole context, or a prompt longer than it, is a 400
    // naming the field and the lengths.
    let long: Vec<u32> = (0..200).map(|i| 1000 + i).collect();
    let v = s.post_ok(
        "/v1/completions",
        &json!({"model": name, "prompt": long, "max_tokens": 100, "ignore_eos": true}),
    );
    assert_eq!(v["usage"]["completion_tokens"], 56, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"model": name, "prompt": long, "max_tokens": 1000}),
    );
    let msg = assert_error(st, &b, 400, "max_tokens over max_model_len");
    assert_eq!(b["error"]["param"], "max_tokens", "{b}");
    for n in ["256", "1000"] {
        assert!(msg.contains(n), "message lacks {n}: {msg}");
    }
    let longer: Vec<u32> = (0..300).map(|i| 1000 + i).collect();
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"model": name, "prompt": longer, "max_tokens": 1}),
    );
    let msg = assert_error(st, &b, 400, "prompt over max_model_len");
    assert_eq!(b["error"]["param"], "input_tokens", "{b}");
    for n in ["256", "300"] {
        assert!(msg.contains(n), "message lacks {n}: {msg}");
    }
    let words = "word ".repeat(400);
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": name, "messages": [{"role": "user", "content": words}]}),
    );
    let msg = assert_error(st, &b, 400, "too long (chat)");
    assert!(msg.contains("256"), "{msg}");

    // Out-of-range parameters → 400 naming the parameter.
    let bad: Vec<(&str, Value)> = vec![
        ("temperature", json!({"temperature": -0.5})),
        ("top_p", json!({"top_p": 0})),
        ("top_p", json!({"top_p": 1.5})),
        ("n", json!({"n": 0})),
        ("logprobs", json!({"logprobs": 21})),
        ("max_tokens", json!({"max_tokens": 0})),
        ("max_tokens", json!({"max_tokens": -3})),
        ("top_k", json!({"top_k": -2})),
        ("min_p", json!({"min_p": 1.5})),
        ("presence_penalty", json!({"presence_penalty": 3})),
        ("frequency_penalty", json!({"frequency_penalty": -3})),
        ("repetition_penalty", json!({"repetition_penalty": 0})),
    ];
    for (param, extra) in &bad {
        let mut body = json!({"model": name, "prompt": "hi", "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (st, b) = s.post("/v1/completions", &body);
        assert_error(st, &b, 400, &format!("{extra}"));
        let msg = b["error"]["message"].as_str().unwrap();
        assert!(
            b["error"]["param"] == json!(param) || msg.contains(param),
            "{extra}: error does not name {param}: {b}"
        );
    }
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": name, "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}),
    );
    assert_error(st, &b, 400, "chat top_logprobs 21");
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": name, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
    );
    assert_error(st, &b, 400, "chat temperature -1");

    // Malformed JSON → 400; wrong content type → 400 too (vLLM 0.32's status).
    for raw in [r#"{"model": "#, "not json", r#"{"prompt": "hi",}"#, ""] {
        let r = c
            .post(s.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .unwrap();
        let st = r.status().as_u16();
        let b: Value = r.json().expect("error body is JSON");
        assert_error(st, &b, 400, &format!("malformed {raw:?}"));
    }
    let r = c
        .post(s.url("/v1/completions"))
        .header("content-type", "text/plain")
        .body(json!({"model": name, "prompt": "hi"}).to_string())
        .send()
        .unwrap();
    let st = r.status().as_u16();
    let b: Value = r.json().unwrap();
    assert_error(st, &b, 400, "text/plain body");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("application/json"),
        "{b}"
    );

    // Unknown route → 404 in the same shape; wrong method → 405.
    let r = c.get(s.url("/v1/nope")).send().unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().unwrap(), 404, "unknown route");
    let r = c.get(s.url("/v1/completions")).send().unwrap();
    assert_eq!(r.status().as_u16(), 405);

    // Whatever the input, never a 5xx.
    let junk: Vec<Value> = vec![
        json!([]),
        json!(null),
        json!("prompt"),
        json!({}),
        json!({"model": name}),
        json!({"prompt": []}),
        json!({"prompt": [[]]}),
        json!({"prompt": ""}),
        json!({"prompt": [-1]}),
        json!({"prompt": [49152]}),
        json!({"prompt": [1.5]}),
        json!({"prompt": "hi", "n": "two"}),
        json!({"prompt": "hi", "max_tokens": 1e30}),
        json!({"prompt": "hi", "max_tokens": 9_223_372_036_854_775_807_i64}),
        json!({"prompt": "hi", "stop": [""]}),
        json!({"prompt": "hi", "stop": 5}),
        json!({"prompt": "hi", "logit_bias": {"abc": 1}}),
        json!({"prompt": "hi", "logit_bias": {"99999999": 1}}),
        json!({"prompt": "hi", "stop_token_ids": [-5]}),
        json!({"prompt": "hi", "stream_options": {"include_usage": true}}),
        json!({"prompt": "hi", "stream": true, "prompt_logprobs": 1}),
        json!({"prompt": "hi", "best_of": 3, "n": 1}),
        json!({"prompt": "hi", "min_tokens": 10, "max_tokens": 2}),
        json!({"prompt": "hi", "suffix": "x"}),
        json!({"prompt": "hi", "prompt_logprobs": 50}),
        json!({"prompt": "hi", "temperature": "hot"}),
        json!({"messages": "hi"}),
    ];
    for body in &junk {
        let (st, b) = s.post("/v1/completions", body);
        assert!(
            (400..500).contains(&st),
            "/v1/completions {body} → {st} {b}"
        );
        assert_error(st, &b, st, &format!("junk {body}"));
    }
    let chat_junk: Vec<Value> = vec![
        json!({}),
        json!({"messages": []}),
        json!({"messages": [{"content": "no role"}]}),
        json!({"messages": [{"role": "user", "content": 5}]}),
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
        json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}),
    ];
    for body in &chat_junk {
        let (st, b) = s.post("/v1/chat/completions", body);
        assert!(
            (400..500).contains(&st),
            "/v1/chat/completions {body} → {st} {b}"
        );
    }
    for (path, body) in [
        ("/tokenize", json!({"prompt": 5})),
        ("/tokenize", json!({"model": "nope", "prompt": "x"})),
        ("/detokenize", json!({"tokens": [-1]})),
        ("/detokenize", json!({"tokens": [49152]})),
    ] {
        let (st, b) = s.post(path, &body);
        assert!((400..500).contains(&st), "{path} {body} → {st} {b}");
    }
    // The server is still healthy and serving after all that.
    let (st, _) = s.get("/health");
    assert_eq!(st, 200);
    s.post_ok(
        "/v1/completions",
        &json!({"model": name, "prompt": "hi", "max_tokens": 2}),
    );
}

#[test]
fn api_key_guards_v1_routes_only() {
    let mut s = Server::start(&["--api-key", "secret"]);
    let c = s.client.clone();
    let body = json!({"prompt": "San Francisco is a", "max_tokens": 2, "temperature": 0});
    // Missing and wrong keys → 401 on every /v1 route.
    for (method, path) in [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ] {
        for key in [None, Some("wrong"), Some("secretx"), Some("")] {
            let mut rb = if method == "GET" {
                c.get(s.url(path))
            } else {
                c.post(s.url(path)).json(&body)
            };
            if let Some(k) = key {
                rb = rb.bearer_auth(k);
            }
            let r = rb.send().unwrap();
            assert_eq!(r.status().as_u16(), 401, "{method} {path} with key {key:?}");
            let b: Value = r.json().expect("401 body is JSON");
            assert!(b.get("error").is_some(), "{b}");
        }
    }
    let r = c
        .get(s.url("/v1/models"))
        .header("authorization", "secret")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "key without Bearer");
    // The right key works (Server sends it).
    let v = s.post_ok("/v1/completions", &body);
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(s.get("/v1/models").0, 200);
    // /health and /metrics stay open (probes and Prometheus carry no key).
    s.api_key = None;
    assert_eq!(s.get("/health").0, 200);
    let (st, text) = s.get("/metrics");
    assert_eq!(st, 200);
    assert!(text.contains("vllm:num_requests_waiting"));
    assert_eq!(s.get("/v1/models").0, 401);
}

#[test]
fn client_disconnect_mid_stream_frees_the_request_and_its_kv_blocks() {
    let s = Server::start(&[]);
    let name = served_name(&s);
    let gauges = |t: &str| {
        (
            metric(t, "vllm:num_requests_running", &[]),
            metric(t, "vllm:num_requests_waiting", &[]),
            metric(t, "vllm:kv_cache_usage_perc", &[]),
        )
    };
    // Long enough that it cannot finish by itself while the test runs.
    let body = json!({"model": name, "prompt": "Once upon a time", "max_tokens": 7000,
        "ignore_eos": true, "temperature": 0, "stream": true});
    let mut sse = s.stream("/v1/completions", &body);
    let mut chunks = 0;
    while chunks < 3 {
        match sse.next_event() {
            Some(SseEvent::Data(_)) => chunks += 1,
            other => panic!("stream ended early: {other:?}"),
        }
    }
    let busy = poll(Duration::from_secs(10), || {
        let (r, _, kv) = gauges(&s.metrics());
        (r == 1.0 && kv > 0.0).then_some(())
    });
    assert!(
        busy.is_some(),
        "metrics never showed the running request: {:?}",
        gauges(&s.metrics())
    );
    drop(sse); // the client goes away mid-stream
    let t0 = Instant::now();
    let aborted = |t: &str| {
        metric(
            t,
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
        )
    };
    let idle = poll(Duration::from_secs(20), || {
        let t = s.metrics();
        (gauges(&t) == (0.0, 0.0, 0.0) && aborted(&t) == 1.0).then_some(())
    });
    let t = s.metrics();
    assert!(
        idle.is_some(),
        "after disconnect: running/waiting/kv_cache_usage = {:?}, aborted {} after {:?}",
        gauges(&t),
        aborted(&t),
        t0.elapsed()
    );
    assert_eq!(
        metric(&t, "vllm:gpu_cache_usage_perc", &[]),
        0.0,
        "legacy gauge"
    );
    // Non-streaming too: a client that sends a request and hangs up.
    let mut raw = TcpStream::connect((Ipv4Addr::LOCALHOST, s.port)).unwrap();
    let b = json!({"model": name, "prompt": "Once upon a time", "max_tokens": 7000,
        "ignore_eos": true, "temperature": 0})
    .to_string();
    write!(
        raw,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let busy = poll(Duration::from_secs(10), || {
        (gauges(&s.metrics()).0 == 1.0).then_some(())
    });
    assert!(busy.is_some(), "the non-streaming request never ran");
    drop(raw);
    let idle = poll(Duration::from_secs(20), || {
        let t = s.metrics();
        (gauges(&t) == (0.0, 0.0, 0.0) && aborted(&t) == 2.0).then_some(())
    });
    let t = s.metrics();
    assert!(
        idle.is_some(),
        "after a non-streaming client hung up: running/waiting/kv_cache_usage = {:?}, aborted {}",
        gauges(&t),
        aborted(&t)
    );
    // And the server still answers.
    s.post_ok(
        "/v1/completions",
        &json!({"model": name, "prompt": "hi", "max_tokens": 2}),
    );
}

#[test]
fn gke_sample_argument_list_starts_the_server() {
    let model = smollm2_gguf();
    let model = model.to_str().unwrap();
    let dl = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    // The sample's args with TP=1 and the local model substituted for TP=8 and the 70B.
    let args: Vec<String> = [
        "serve".to_string(),
        "--host=0.0.0.0".into(),
        format!("--port={port}"),
        "--tensor-parallel-size=1".into(),
        "--max-model-len=4096".into(),
        format!("--model={model}"),
        format!("--download-dir={}", dl.path().display()),
        "--max-num-batched-tokens=512".into(),
        "--max-num-seqs=128".into(),
    ]
    .to_vec();
    let cache_path = cache.path().display().to_string();
    let s = Server::spawn(
        &args,
        &[
            ("VLLM_USE_V1", "1"),
            ("VLLM_XLA_CACHE_PATH", &cache_path),
            ("HUGGING_FACE_HUB_TOKEN", "hf_not_a_real_token"),
        ],
        port,
    );
    let m = s.get_json("/v1/models");
    assert_eq!(m["object"], "list");
    let data = m["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{m}");
    assert_eq!(
        data[0]["id"],
        json!(model),
        "served name = --model, as vLLM"
    );
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["max_model_len"], 4096, "{m}");
    assert_eq!(data[0]["owned_by"], "vllm");
    // The manifest's clients use the same name in requests.
    let v = s.post_ok(
        "/v1/completions",
        &json!({"model": model, "prompt": "San Francisco is a", "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[test]
fn unknown_flag_is_an_error_naming_it() {
    for flag in ["--definitely-not-a-flag", "--max-num-seqz=4"] {
        let mut child = std::process::Command::new(tpuserve_bin())
            .args(["serve", flag])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = poll(Duration::from_secs(60), || child.try_wait().unwrap());
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`tpuserve serve {flag}` did not exit (it should reject the flag)");
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success(), "{flag}: exit {status}");
        let name = flag.split('=').next().unwrap();
        assert!(
            err.contains(name),
            "{flag}: stderr does not name it:\n{err}"
        );
    }
}

#[test]
fn sigterm_drains_in_flight_streams_refuses_new_connections_and_exits_zero() {
    const N: usize = 8;
    const MAX_TOKENS: usize = 64;
    let mut s = Server::start(&[]);
    let name = served_name(&s);
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let finished = Arc::new(AtomicUsize::new(0));
    let results = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (s, name) = (&s, &name);
                let started = started_tx.clone();
                let finished = finished.clone();
                sc.spawn(move || {
                    let body = json!({"model": name, "prompt": format!("Story number {i}: once upon a time"),
                        "max_tokens": MAX_TOKENS, "ignore_eos": true, "temperature": 0, "stream": true,
                        "stream_options": {"include_usage": true}});
                    let mut sse = s.stream("/v1/completions", &body);
                    let mut first = true;
                    let (mut finish, mut usage, mut done) = (None, Value::Null, false);
                    loop {
                        match sse.next_event() {
                            Some(SseEvent::Data(v)) => {
                                if first {
                                    first = false;
                                    let _ = started.send(());
                                }
                                if !v["usage"].is_null() {
                                    usage = v["usage"].clone();
                                }
                                for c in v["choices"].as_array().unwrap() {
                                    if let Some(f) = c["finish_reason"].as_str() {
                                        finish = Some(f.to_string());
                                    }
                                }
                            }
                            Some(SseEvent::Done) => {
                                done = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                    (finish, usage, done)
                })
            })
            .collect();
        // All 8 are streaming: now SIGTERM.
        for _ in 0..N {
            started_rx
                .recv_timeout(Duration::from_secs(120))
                .expect("a stream never produced its first chunk");
        }
        // The gauges follow the engine's steps a moment later.
        let in_flight = poll(Duration::from_secs(10), || {
            let t = s.metrics();
            let n = metric(&t, "vllm:num_requests_running", &[])
                + metric(&t, "vllm:num_requests_waiting", &[]);
            (n == N as f64).then_some(n)
        });
        s.signal(libc::SIGTERM);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, s.port));
        let refused = poll(
            Duration::from_secs(10),
            || match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    Some(finished.load(Ordering::SeqCst))
                }
                _ => None,
            },
        );
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (in_flight, refused, results)
    });
    let (in_flight, refused, results) = results;
    assert_eq!(in_flight, Some(N as f64), "requests in flight at SIGTERM");
    let done_at_refusal = refused.expect("new connections were still accepted after SIGTERM");
    assert!(
        done_at_refusal < N,
        "the port closed only after every stream had finished"
    );
    for (i, (finish, usage, done)) in results.iter().enumerate() {
        assert!(done, "stream {i} ended without [DONE]");
        assert_eq!(finish.as_deref(), Some("length"), "stream {i}");
        assert_eq!(
            usage["completion_tokens"],
            json!(MAX_TOKENS),
            "stream {i}: {usage}"
        );
    }
    let status = s
        .wait_exit(Duration::from_secs(60))
        .expect("tpuserve did not exit after SIGTERM and draining");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

/// Issue 10: the API key (given through `VLLM_API_KEY`, as the manifests do) and the Hugging
/// Face token never reach the server's output, error bodies, `/metrics`, `/openapi.json` or
/// `--help`, with request logging on and debug logs, through good and bad requests and a
/// SIGTERM shutdown.
#[test]
fn secrets_never_reach_logs_errors_or_metrics() {
    const KEY: &str = "sk-test-7f3a9c2e51d84b06-apikey";
    const HF: &str = "hf_test_Zq81LmX0p4RkT6vYw2Nc";
    let port = free_port();
    let args: Vec<String> = [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--enable-log-requests",
        "--max-model-len",
        "512",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = [
        ("VLLM_API_KEY", KEY),
        ("HF_TOKEN", HF),
        ("HUGGING_FACE_HUB_TOKEN", HF),
        ("RUST_LOG", "debug"),
    ];
    let mut s = Server::spawn(&args, &env, port);
    s.api_key = Some(KEY.to_string());
    let mut seen = String::new();
    let good = json!({"prompt": "San Francisco is a", "max_tokens": 3, "temperature": 0});
    seen.push_str(&s.post_ok("/v1/completions", &good).to_string());
    for body in [
        json!({"prompt": "x", "max_tokens": -1}),
        json!({"prompt": "x", "max_tokens": 1, "temperature": "hot"}),
        json!({"messages": [{"role": "wizard", "content": "hi"}]}),
    ] {
        seen.push_str(&s.post("/v1/completions", &body).1.to_string());
        seen.push_str(&s.post("/v1/chat/completions", &body).1.to_string());
    }
    // Wrong keys, and the right key sent the wrong way.
    for auth in [
        "Bearer wrong".to_string(),
        format!("Basic {KEY}"),
        KEY.to_string(),
    ] {
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .header("authorization", auth)
            .json(&good)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        seen.push_str(&r.text().unwrap());
    }
    for path in [
        "/metrics",
        "/openapi.json",
        "/v1/models",
        "/version",
        "/health",
    ] {
        seen.push_str(&s.get(path).1);
    }
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(60)).is_some());
    seen.push_str(&s.log());
    let help = std::process::Command::new(tpuserve_bin())
        .args(["serve", "--help"])
        .env("VLLM_API_KEY", KEY)
        .output()
        .unwrap();
    seen.push_str(&String::from_utf8_lossy(&help.stdout));
    seen.push_str(&String::from_utf8_lossy(&help.stderr));

    assert!(
        s.log().contains("Received request"),
        "request logging was on"
    );
    for secret in [KEY, HF] {
        assert!(
            !seen.contains(secret),
            "{secret} leaked:\n{}",
            &seen[seen.find(secret).unwrap().saturating_sub(300)..]
        );
    }
}
