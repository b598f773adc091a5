//! A real `tpuserve serve` process for the HTTP-level tests: the binary is built (or found
//! up to date) by `cargo build` in the same target folder and profile as the test itself, each
//! server gets a free loopback port, readiness is the TCP port opening (as the GKE probe
//! sees it), and the process is killed when the guard drops. Output (the tracing log, on
//! stdout and stderr) is kept for assertions and printed when a test fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a server may take from spawn to an open port (model load on a busy 2-core box).
pub const START_TIMEOUT: Duration = Duration::from_secs(900);

/// The `tpuserve` binary of the profile this test was built with. `TPUSERVE_BIN` overrides;
/// otherwise `cargo build -p tpuserve` runs once per test process (a no-op when up to date),
/// so a stale or missing binary is never used. Panics (never skips) if it cannot be built.
pub fn tpuserve_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TPUSERVE_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "TPUSERVE_BIN={} is not a file", p.display());
            return p;
        }
        // <target>/<profile>/deps/<test>-<hash>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let profile = profile_dir
            .file_name()
            .and_then(|s| s.to_str())
            .expect("profile dir name")
            .to_string();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "tpuserve", "--bin", "tpuserve"])
            .current_dir(crate::manifest_dir())
            .env("CARGO_TARGET_DIR", &target_dir);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("running cargo to build tpuserve: {e}"));
        assert!(status.success(), "cargo build -p tpuserve failed: {status}");
        let bin = profile_dir.join("tpuserve");
        assert!(bin.is_file(), "{} missing after cargo build", bin.display());
        bin
    })
    .clone()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A blocking HTTP client for loopback only (proxies from the environment are ignored).
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("http client")
}

/// `serve` on the CPU runner with no `--dtype` gets `--dtype float32`: the tests compare the
/// CPU runner with the f32 goldens exactly, and `auto` now keeps GGUF blocks in place (int8
/// activations, close to but not the goldens bit for bit). Other devices and an explicit
/// `--dtype` are left alone.
pub fn pin_cpu_reference(args: &[String]) -> Vec<String> {
    let mut out = args.to_vec();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name || a.starts_with(&format!("{name}=")))
    };
    let device = flag("--device").map(|i| {
        args[i]
            .strip_prefix("--device=")
            .map(str::to_string)
            .or_else(|| args.get(i + 1).cloned())
            .unwrap_or_default()
    });
    let on_cpu = matches!(device.as_deref(), None | Some("cpu") | Some("auto"));
    if args.first().map(String::as_str) == Some("serve") && on_cpu && flag("--dtype").is_none() {
        out.extend(["--dtype".to_string(), "float32".to_string()]);
    }
    out
}

/// A running `tpuserve serve`; killed on drop.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub exit: Option<ExitStatus>,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    pub client: reqwest::blocking::Client,
    pub api_key: Option<String>,
}

impl Server {
    /// `tpuserve serve --host 127.0.0.1 --port <free> <args>` (SmolLM2 on CPU unless `args`
    /// say otherwise); returns once the port accepts connections.
    pub fn start(args: &[&str]) -> Server {
        let port = free_port();
        let mut full: Vec<String> = vec![
            "serve".into(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        Self::spawn(&full, &[], port)
    }

    /// Spawns the binary with exactly `args` and `env` (plus `RUST_LOG=info`), and waits
    /// until `port` on 127.0.0.1 accepts a connection.
    pub fn spawn(args: &[String], env: &[(&str, &str)], port: u16) -> Server {
        let args = pin_cpu_reference(args);
        let mut cmd = Command::new(tpuserve_bin());
        cmd.args(&args)
            .env("RUST_LOG", "info")
            .env_remove("VLLM_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // If the test process dies without unwinding (killed by a CI timeout), the kernel
        // kills the server too. The signal follows the spawning thread, so a `Server` must
        // not outlive the test thread that started it (it never does here).
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn tpuserve");
        let log = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            }));
        }
        let api_key = args
            .iter()
            .position(|a| a == "--api-key")
            .and_then(|i| args.get(i + 1).cloned())
            .or_else(|| {
                args.iter()
                    .find_map(|a| a.strip_prefix("--api-key=").map(str::to_string))
            });
        let mut s = Server {
            child: Some(child),
            port,
            exit: None,
            log,
            readers,
            client: http(),
            api_key,
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let t0 = Instant::now();
        loop {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().expect("try_wait") {
                s.exit = Some(st);
                s.join_readers();
                panic!(
                    "tpuserve exited during start-up ({st}):\n{}",
                    s.log_tail(80)
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if t0.elapsed() > START_TIMEOUT {
                panic!(
                    "tpuserve did not open port {port} within {START_TIMEOUT:?}:\n{}",
                    s.log_tail(80)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything the server printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let l = self.log();
        let v: Vec<&str> = l.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    fn auth(&self, rb: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// POST a JSON body (with the server's API key, if any): status and parsed JSON body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .auth(self.client.post(self.url(path)))
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().expect("response body");
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {path} -> {status}: body is not JSON ({e}): {text}"));
        (status, v)
    }

    /// POST, asserting 200, returning the JSON body.
    pub fn post_ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post(path, body);
        assert_eq!(status, 200, "POST {path} {body}: {v}");
        v
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let resp = self
            .auth(self.client.get(self.url(path)))
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.text().expect("response body"))
    }

    pub fn get_json(&self, path: &str) -> Value {
        let (status, text) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {text}"))
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200, "GET /metrics: {text}");
        text
    }

    /// Starts a streaming POST (`"stream": true` must be in `body`); asserts 200 and an SSE
    /// content type.
    pub fn stream(&self, path: &str, body: &Value) -> Sse {
        let resp = self
            .auth(self.client.post(self.url(path)))
            .json(body)
            .send()
            .unwrap_or_else(|e| panic!("POST {path} (stream): {e}"));
        let status = resp.status().as_u16();
        if status != 200 {
            panic!(
                "POST {path} (stream) -> {status}: {}",
                resp.text().unwrap_or_default()
            );
        }
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(
            ct.starts_with("text/event-stream"),
            "stream content-type {ct}"
        );
        Sse {
            reader: BufReader::new(resp),
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the server process.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as i32;
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let st = poll(timeout, || child.try_wait().expect("try_wait"))?;
        self.exit = Some(st);
        self.child = None;
        self.join_readers();
        Some(st)
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.join_readers();
        if std::thread::panicking() {
            eprintln!(
                "---- tpuserve (port {}) output, last lines ----\n{}\n----",
                self.port,
                self.log_tail(60)
            );
        }
    }
}

/// One server-sent event of a streaming response.
#[derive(Debug)]
pub enum SseEvent {
    Data(Value),
    Done,
}

/// Reads `data: …` events from a streaming response.
pub struct Sse {
    reader: BufReader<reqwest::blocking::Response>,
}

impl Sse {
    /// The next event; `None` when the connection ends.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .expect("reading SSE stream");
            if n == 0 {
                return None;
            }
            let l = line.trim_end_matches(['\r', '\n']);
            let Some(data) = l.strip_prefix("data:") else {
                continue; // blank separators, comments, other fields
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                return Some(SseEvent::Done);
            }
            let v = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data}"));
            return Some(SseEvent::Data(v));
        }
    }

    /// All JSON chunks up to `[DONE]`; panics if the stream ends without it.
    pub fn collect_all(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            match self.next_event() {
                Some(SseEvent::Data(v)) => out.push(v),
                Some(SseEvent::Done) => return out,
                None => panic!("stream ended without [DONE] after {} chunks", out.len()),
            }
        }
    }
}

/// One sample line of a Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the sample lines of a Prometheus text exposition (comments skipped).
pub fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name_labels, value) = match line.rfind('}') {
            Some(close) => (&line[..=close], line[close + 1..].trim()),
            None => {
                let mut it = line.splitn(2, ' ');
                (it.next().unwrap(), it.next().unwrap_or("").trim())
            }
        };
        let value = value.split_whitespace().next().unwrap_or("");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value in `{line}`")),
        };
        let (name, labels) = match name_labels.find('{') {
            None => (name_labels.to_string(), BTreeMap::new()),
            Some(open) => {
                let body = &name_labels[open + 1..name_labels.len() - 1];
                (name_labels[..open].to_string(), parse_labels(body))
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut rest = body;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        assert!(
            after.starts_with('"'),
            "label value not quoted in {{{body}}}"
        );
        let mut val = String::new();
        let mut chars = after[1..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        val.push(match e {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => val.push(c),
            }
        }
        let end = end.expect("unterminated label value");
        m.insert(key, val);
        rest = &after[1 + end + 1..];
    }
    m
}

/// The value of the one sample named `name` whose labels include `labels`; panics if there is
/// none or more than one.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<Sample> = parse_samples(text)
        .into_iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected exactly one sample {name}{labels:?}, found {hits:?}"
    );
    hits[0].value
}
