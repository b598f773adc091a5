//! Issue 9: `tpuserve bench serve`, the load generator, against a real `tpuserve serve` (its
//! token counts must agree with the server's `usage` and Prometheus counters) and against a
//! server with llama.cpp's habits (closes the socket after every stream although the response
//! allows keep-alive; sends no `usage`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;
use tpuserve_suite::server::{metric, tpuserve_bin, Server};
use tpuserve_suite::smollm2_gguf;

fn bench(args: &[&str]) -> Output {
    Command::new(tpuserve_bin())
        .args(["bench", "serve"])
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("run tpuserve bench serve")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn table_value(stdout: &str, key: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key:?} in the table:\n{stdout}"));
    line[key.len()..].trim().parse().unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn counter(server: &Server, name: &str) -> f64 {
    metric(&server.metrics(), name, &[])
}

#[test]
fn counts_agree_with_the_servers_usage_and_metrics() {
    let server = Server::start(&["--served-model-name", "smol", "--max-num-seqs", "4"]);
    let gen0 = counter(&server, "vllm:generation_tokens_total");
    let prompt0 = counter(&server, "vllm:prompt_tokens_total");
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("r.json");
    let out = bench(&[
        "--base-url",
        &server.url(""),
        "--model",
        "smol",
        "--num-prompts",
        "6",
        "--max-concurrency",
        "3",
        "--random-input-len",
        "24",
        "--random-output-len",
        "5",
        "--ignore-eos",
        "--seed",
        "7",
        "--result-file",
        result.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout.contains("============ Serving Benchmark Result ============"));
    assert_eq!(table_value(&stdout, "Successful requests:"), 6.0);
    assert_eq!(table_value(&stdout, "Failed requests:"), 0.0);
    assert_eq!(table_value(&stdout, "Total generated tokens:"), 30.0);
    for key in [
        "Median TTFT (ms):",
        "Median TPOT (ms):",
        "Median ITL (ms):",
        "Median E2EL (ms):",
    ] {
        assert!(table_value(&stdout, key) > 0.0, "{key}\n{stdout}");
    }

    let r = read_json(&result);
    assert_eq!(r["completed"], 6);
    assert_eq!(r["failed"], 0);
    assert_eq!(r["output_tokens_from_usage"], true);
    let d = &r["details"];
    assert!(d["output_lens"].as_array().unwrap().iter().all(|n| n == 5));
    // ignore_eos and 5 tokens: 4 gaps per request
    assert!(d["itls"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i.as_array().unwrap().len() == 4));
    let input_lens: Vec<u64> = d["input_lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let total_in = r["total_input_tokens"].as_u64().unwrap();
    assert_eq!(total_in, input_lens.iter().sum::<u64>());

    // The server saw the same tokens, plus the initial test request (the first prompt, at
    // most 8 tokens out). Its counters are updated off the response path: poll briefly.
    let probe_in = input_lens[0] as f64;
    let ok = tpuserve_suite::server::poll(std::time::Duration::from_secs(5), || {
        let gen = counter(&server, "vllm:generation_tokens_total") - gen0;
        let prompt = counter(&server, "vllm:prompt_tokens_total") - prompt0;
        (gen == 35.0 && prompt == total_in as f64 + probe_in).then_some(())
    });
    assert!(
        ok.is_some(),
        "server counted {} generated / {} prompt tokens; bench: 30 + 5, {total_in} + {probe_in}",
        counter(&server, "vllm:generation_tokens_total") - gen0,
        counter(&server, "vllm:prompt_tokens_total") - prompt0
    );
}

/// llama.cpp's `llama-server` habits, byte for byte at the HTTP level: a chunked event
/// stream whose headers say nothing about closing (so HTTP/1.1 keep-alive applies), then the
/// socket is closed shortly after the last chunk — late enough that a client reusing pooled
/// connections sends its next request into it. No `usage` chunk; `max_tokens` one-word chunks.
fn spawn_closing_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || serve_one_then_close(conn, &counter));
        }
    });
    (addr, requests)
}

fn serve_one_then_close(conn: TcpStream, counter: &AtomicUsize) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    counter.fetch_add(1, Ordering::SeqCst);
    let req: Value = serde_json::from_slice(&body).unwrap();
    let n = req["max_tokens"].as_u64().unwrap_or(1);
    let mut out = conn;
    let mut chunked = String::new();
    let mut send = |data: &str| chunked.push_str(&format!("{:x}\r\n{data}\r\n", data.len()));
    for i in 0..n {
        send(&format!(
            "data: {{\"choices\":[{{\"index\":0,\"text\":\" w{i}\",\"finish_reason\":null}}]}}\n\n"
        ));
    }
    send("data: [DONE]\n\n");
    let _ = out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let _ = out.write_all(chunked.as_bytes());
    let _ = out.write_all(b"0\r\n\r\n");
    let _ = out.flush();
    std::thread::sleep(std::time::Duration::from_millis(100));
    // dropped: the socket closes although the response promised keep-alive
}

#[test]
fn works_against_a_server_that_closes_each_stream_and_sends_no_usage() {
    let (addr, requests) = spawn_closing_server();
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("r.json");
    let out = bench(&[
        "--base-url",
        &format!("http://{addr}"),
        "--model",
        "m",
        "--tokenizer",
        smollm2_gguf().to_str().unwrap(),
        "--num-prompts",
        "20",
        "--max-concurrency",
        "4",
        "--random-input-len",
        "16",
        "--random-output-len",
        "6",
        "--random-range-ratio",
        "0.5",
        "--result-file",
        result.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let r = read_json(&result);
    assert_eq!(r["completed"], 20, "{}", text(&out));
    assert_eq!(r["output_tokens_from_usage"], false);
    // Without usage, one token per text chunk: the fake streams exactly max_tokens chunks,
    // lengths drawn from [3, 9].
    let outs: Vec<u64> = r["details"]["output_lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(outs.iter().all(|&n| (3..=9).contains(&n)), "{outs:?}");
    assert!(
        outs.iter().any(|&n| n != outs[0]),
        "range ratio varies lengths"
    );
    assert_eq!(r["total_output_tokens"], outs.iter().sum::<u64>());
    assert_eq!(
        requests.load(Ordering::SeqCst),
        21,
        "20 + the initial test request"
    );
}

#[test]
fn sharegpt_file_gives_prompts_and_reference_output_lengths() {
    let (addr, _) = spawn_closing_server();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sharegpt.json");
    let answer = "The quick brown fox jumps over the lazy dog near the river bank today.";
    let convs: Vec<Value> = (0..5)
        .map(|i| {
            serde_json::json!({"id": i.to_string(), "conversations": [
                {"from": "human", "value": format!("Question number {i}: tell me about foxes and dogs.")},
                {"from": "gpt", "value": answer}
            ]})
        })
        .chain([serde_json::json!({"conversations": [{"from": "human", "value": "one turn only"}]})])
        .collect();
    std::fs::write(&data, serde_json::to_string(&convs).unwrap()).unwrap();
    let result = dir.path().join("r.json");
    let gguf = smollm2_gguf();
    let args = |n: &str| {
        vec![
            "--base-url".to_string(),
            format!("http://{addr}"),
            "--model".into(),
            "m".into(),
            "--tokenizer".into(),
            gguf.to_str().unwrap().into(),
            "--dataset-name".into(),
            "sharegpt".into(),
            "--dataset-path".into(),
            data.to_str().unwrap().into(),
            "--num-prompts".into(),
            n.into(),
            "--result-file".into(),
            result.to_str().unwrap().into(),
        ]
    };
    let a = args("5");
    let out = bench(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    let r = read_json(&result);
    assert_eq!(r["completed"], 5);
    let tok = tpuserve_model::load_model(&gguf).unwrap().tokenizer;
    let expected = tok.encode(answer, false).unwrap().len() as u64;
    assert!(r["details"]["output_lens"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n.as_u64() == Some(expected)));

    // Asking for more conversations than the file holds is an error, not a short run.
    let a = args("6");
    let out = bench(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("holds 5 usable conversations"),
        "{}",
        text(&out)
    );
}

#[test]
fn random_prompts_have_the_exact_length_and_change_with_the_seed() {
    let tok = tpuserve_model::load_model(&smollm2_gguf())
        .unwrap()
        .tokenizer;
    let a = tpuserve_bench::dataset::random(&tok, 16, 88, 64, 0.0, 1).unwrap();
    let again = tpuserve_bench::dataset::random(&tok, 16, 88, 64, 0.0, 1).unwrap();
    let other = tpuserve_bench::dataset::random(&tok, 16, 88, 64, 0.0, 2).unwrap();
    for r in &a {
        assert_eq!(tok.encode(&r.prompt, false).unwrap().len(), 88);
        assert_eq!(r.prompt_len, 88);
        assert_eq!(r.output_len, 64);
    }
    let texts = |v: &[tpuserve_bench::BenchRequest]| -> Vec<String> {
        v.iter().map(|r| r.prompt.clone()).collect()
    };
    assert_eq!(texts(&a), texts(&again));
    let distinct: std::collections::HashSet<_> = texts(&a).into_iter().collect();
    assert_eq!(distinct.len(), 16, "every request gets its own prompt");
    assert!(texts(&a).iter().zip(texts(&other)).all(|(x, y)| *x != y));
}

#[test]
fn bad_arguments_and_an_unreachable_server_fail_clearly() {
    let gguf = smollm2_gguf();
    let g = gguf.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--num-prompts", "0"],
            "--num-prompts must be at least 1",
        ),
        (
            vec!["--max-concurrency", "0"],
            "--max-concurrency must be at least 1",
        ),
        (
            vec!["--request-rate", "0"],
            "--request-rate must be a positive",
        ),
        (vec!["--random-range-ratio", "1.5"], "--random-range-ratio"),
        (vec!["--dataset-name", "sharegpt"], "needs --dataset-path"),
    ] {
        let mut full = vec!["--model", "m", "--tokenizer", g];
        full.extend(args);
        let out = bench(&full);
        assert!(!out.status.success());
        assert!(text(&out).contains(expect), "{expect}: {}", text(&out));
    }
    let port = tpuserve_suite::server::free_port();
    let out = bench(&[
        "--base-url",
        &format!("http://127.0.0.1:{port}"),
        "--model",
        "m",
        "--tokenizer",
        g,
        "--num-prompts",
        "2",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is the server up"), "{}", text(&out));
}
