//! Issue 11 acceptance: `tpuserve serve org/tiny --download-dir DIR` against a local fake
//! Hugging Face Hub (tests/support/fake_hub.rs) serving the tiny-llama3 fixture re-split into a
//! sharded safetensors repository: download + serve + goldens, the huggingface_hub cache layout
//! checked by the real `huggingface_hub` package (both directions), resume after a kill, two
//! concurrent downloads into one folder, and the gated-repo / 404 errors.

#[path = "support/fake_hub.rs"]
mod fake_hub;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fake_hub::{FakeHub, Logged, Repo, RepoFile};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tpuserve_suite::goldens::Goldens;
use tpuserve_suite::server::{free_port, poll, tpuserve_bin, Server};
use tpuserve_suite::{fixtures_dir, tiny_llama3_dir};

const REPO: &str = "org/tiny";
const GATED: &str = "org/gated";
const GATED_TOKEN: &str = "hf_FakeGatedAccessToken0123456789";

/// Files of the repo tpuserve must fetch (and nothing else).
const NEEDED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
];

fn commit() -> String {
    hex(&Sha256::digest(b"tiny-llama3 commit"))[..40].to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// tiny-llama3 as a hub repository: the fixture's small files, its weights re-split into
/// shards with an index, and files a download must skip (`original/`, README, .gitattributes).
fn repo_files() -> &'static Vec<RepoFile> {
    static FILES: OnceLock<Vec<RepoFile>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tiny_llama3_dir();
        let mut files = Vec::new();
        for name in [
            "config.json",
            "generation_config.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ] {
            files.push(RepoFile::new(
                name,
                std::fs::read(dir.join(name)).unwrap(),
                false,
            ));
        }
        files.push(RepoFile::new(
            "tokenizer.json",
            std::fs::read(dir.join("tokenizer.json")).unwrap(),
            true,
        ));
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let total: usize = tensors.iter().map(|(_, t)| t.data().len()).sum();
        let target = total / 3;
        let mut groups: Vec<Vec<(String, safetensors::tensor::TensorView)>> = vec![Vec::new()];
        let mut size = 0;
        for (name, view) in tensors {
            let n = view.data().len();
            if size > 0 && size + n > target {
                groups.push(Vec::new());
                size = 0;
            }
            size += n;
            groups.last_mut().unwrap().push((name, view));
        }
        assert!(groups.len() >= 2, "the fixture splits into shards");
        let n = groups.len();
        let mut weight_map = BTreeMap::new();
        for (i, g) in groups.into_iter().enumerate() {
            let shard = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            for (name, _) in &g {
                weight_map.insert(name.clone(), shard.clone());
            }
            let meta = [("format".to_string(), "pt".to_string())].into();
            let data = safetensors::serialize(g, Some(meta)).unwrap();
            files.push(RepoFile::new(&shard, data, true));
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        files.push(RepoFile::new(
            "model.safetensors.index.json",
            serde_json::to_vec_pretty(&index).unwrap(),
            false,
        ));
        files.push(RepoFile::new("README.md", b"# tiny\n".to_vec(), false));
        files.push(RepoFile::new(
            ".gitattributes",
            b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n".to_vec(),
            false,
        ));
        files.push(RepoFile::new(
            "original/consolidated.00.pth",
            vec![7u8; 4096],
            true,
        ));
        files.push(RepoFile::new("original/params.json", b"{}".to_vec(), false));
        files
    })
}

fn repo(id: &str, gated_token: Option<&str>) -> Repo {
    Repo {
        id: id.to_string(),
        commit: commit(),
        files: repo_files().clone(),
        gated_token: gated_token.map(str::to_string),
    }
}

fn needed_files(r: &Repo) -> BTreeSet<String> {
    r.files
        .iter()
        .map(|f| f.path.clone())
        .filter(|p| NEEDED.contains(&p.as_str()) || p.ends_with(".safetensors"))
        .collect()
}

fn shards(r: &Repo) -> Vec<&RepoFile> {
    let mut v: Vec<&RepoFile> = r
        .files
        .iter()
        .filter(|f| f.path.ends_with(".safetensors"))
        .collect();
    v.sort_by_key(|f| std::cmp::Reverse(f.data.len()));
    v
}

/// The environment of one tpuserve run: this hub, no token (unless given), nothing from the
/// user's own Hugging Face set-up.
fn hub_env<'a>(endpoint: &'a str, home: &'a Path, token: &'a str) -> Vec<(&'a str, String)> {
    vec![
        ("HF_ENDPOINT", endpoint.to_string()),
        ("HF_HOME", home.display().to_string()),
        ("HF_HUB_CACHE", String::new()),
        ("HF_TOKEN", token.to_string()),
        ("HUGGING_FACE_HUB_TOKEN", String::new()),
        ("HF_HUB_OFFLINE", "0".to_string()),
        ("NO_PROXY", "127.0.0.1,localhost".to_string()),
    ]
}

fn serve_args(model: &str, dir: &Path, port: u16, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "serve".into(),
        model.into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--device".into(),
        "cpu".into(),
        "--download-dir".into(),
        dir.display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn serve(model: &str, dir: &Path, env: &[(&str, String)], extra: &[&str]) -> Server {
    let port = free_port();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::spawn(&serve_args(model, dir, port, extra), &env, port)
}

/// Runs `tpuserve serve ...` expecting it to exit by itself within `timeout`: status and all
/// of its output.
fn serve_until_exit(
    model: &str,
    dir: &Path,
    env: &[(&str, String)],
    extra: &[&str],
    timeout: Duration,
) -> (ExitStatus, String) {
    let mut cmd = Command::new(tpuserve_bin());
    cmd.args(serve_args(model, dir, free_port(), extra))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tpuserve");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = poll(timeout, || child.try_wait().unwrap());
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "tpuserve did not exit within {timeout:?}:\n{}{}",
            t_out.join().unwrap(),
            t_err.join().unwrap()
        );
    };
    let text = format!("{}{}", t_out.join().unwrap(), t_err.join().unwrap());
    (status, text)
}

/// A golden case of tiny-llama3 through `/v1/completions` on the served model.
fn check_golden(s: &Server, served: &str) {
    let g = Goldens::load(&fixtures_dir().join("tiny-llama3/goldens.json"));
    let m = s.get_json("/v1/models");
    assert_eq!(m["data"][0]["id"], served, "{m}");
    for name in ["short_english", "code_python"] {
        let c = g.case(name);
        let v = s.post_ok(
            "/v1/completions",
            &json!({"model": served, "prompt": c.prompt_token_ids,
                "max_tokens": c.completion_token_ids.len(), "temperature": 0,
                "ignore_eos": true, "skip_special_tokens": false}),
        );
        let ch = &v["choices"][0];
        assert_eq!(ch["text"].as_str().unwrap(), c.completion_text, "{name}");
        assert_eq!(
            v["usage"]["completion_tokens"],
            json!(c.completion_token_ids.len())
        );
    }
}

fn repo_dir(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("models--{}", id.replace('/', "--")))
}

/// `DIR` is exactly the huggingface_hub layout: refs/main, relative snapshot links to blobs
/// named by etag, verified contents, no partial files, nothing that was not needed.
fn check_layout(dir: &Path, r: &Repo) {
    let root = repo_dir(dir, &r.id);
    let refm = std::fs::read_to_string(root.join("refs/main")).expect("refs/main");
    assert_eq!(refm.trim(), r.commit);
    let snap = root.join("snapshots").join(&r.commit);
    let mut found = BTreeSet::new();
    for e in std::fs::read_dir(&snap).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let link = std::fs::read_link(e.path())
            .unwrap_or_else(|_| panic!("{name} is not a symlink in {}", snap.display()));
        let f = r.file(&name);
        assert_eq!(
            link,
            PathBuf::from(format!("../../blobs/{}", f.etag())),
            "{name}"
        );
        let data = std::fs::read(e.path()).unwrap();
        assert!(data == *f.data, "{name}: content differs from the hub's");
        found.insert(name);
    }
    assert_eq!(found, needed_files(r), "snapshot files");
    for e in std::fs::read_dir(root.join("blobs")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".incomplete"), "partial file left: {name}");
        if name.len() == 64 {
            let got = hex(&Sha256::digest(std::fs::read(e.path()).unwrap()));
            assert_eq!(got, name, "blob sha256");
        }
    }
}

/// Bytes per second of the download, from tpuserve's summary log line.
fn logged_rate(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("downloaded org/") && l.contains("files,"))
        .map(|l| l.to_string())
}

fn requested(log: &[Logged], path_part: &str) -> Vec<Logged> {
    log.iter()
        .filter(|l| l.path.contains(path_part))
        .cloned()
        .collect()
}

fn python(script: &str, args: &[&str], env: &[(&str, String)]) -> String {
    // The project venv, where `scripts/setup.sh --test` installs huggingface_hub.
    let python = tpuserve_pyenv::python();
    let mut cmd = Command::new(&python);
    cmd.arg("-c").arg(script).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("{python:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{python:?} failed (is huggingface_hub installed? scripts/setup.sh --test):\n{text}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PY_CHECK_CACHE: &str = r#"
import json, os, sys
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
cache, repo, commit = sys.argv[1], sys.argv[2], sys.argv[3]
files = json.loads(sys.argv[4])
for f in files:
    p = try_to_load_from_cache(repo, f, cache_dir=cache)
    assert isinstance(p, str) and os.path.isfile(p), (f, p)
    p = try_to_load_from_cache(repo, f, cache_dir=cache, revision=commit)
    assert isinstance(p, str) and os.path.isfile(p), (f, p)
info = scan_cache_dir(cache)
assert not info.warnings, info.warnings
(r,) = [r for r in info.repos if r.repo_id == repo]
(rev,) = list(r.revisions)
assert rev.commit_hash == commit, rev.commit_hash
assert set(rev.refs) == {"main"}, rev.refs
names = sorted(f.file_name for f in rev.files)
assert names == sorted(files), names
print(json.dumps({"size_on_disk": r.size_on_disk, "nb_files": r.nb_files, "files": names}))
"#;

const PY_SNAPSHOT: &str = r#"
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1], cache_dir=sys.argv[2]))
"#;

fn py_env(endpoint: &str, home: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("HF_ENDPOINT", endpoint.to_string()),
        ("HF_HOME", home.display().to_string()),
        ("HF_HUB_DISABLE_TELEMETRY", "1".into()),
        ("HF_HUB_DISABLE_XET", "1".into()),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1".into()),
        ("HF_TOKEN", String::new()),
        ("NO_PROXY", "127.0.0.1,localhost".into()),
    ]
}

#[test]
fn serve_downloads_a_sharded_repo_in_the_huggingface_hub_layout() {
    let r = repo(REPO, None);
    let hub = FakeHub::start(vec![r.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let env = hub_env(&hub.endpoint, tmp.path(), "");
    {
        let s = serve(REPO, &dir, &env, &[]);
        check_golden(&s, REPO);
        let log = s.log();
        let rate = logged_rate(&log).unwrap_or_else(|| panic!("no download summary:\n{log}"));
        eprintln!("download: {rate}");
        assert!(
            log.contains("downloading org/tiny"),
            "progress lines:\n{log}"
        );
        assert!(!log.contains("Authorization"), "{log}");
    }
    check_layout(&dir, &r);
    // Only what is needed was asked for.
    let reqs = hub.log();
    for skipped in ["original/", "README.md", ".gitattributes"] {
        assert!(
            requested(&reqs, skipped).is_empty(),
            "{skipped} was requested: {reqs:?}"
        );
    }
    for sh in shards(&r) {
        let gets: Vec<Logged> = requested(&reqs, &format!("/blobs/{}", sh.sha256()))
            .into_iter()
            .filter(|l| l.method == "GET")
            .collect();
        assert_eq!(gets.len(), 1, "{}: {gets:?}", sh.path);
        assert!(
            !gets[0].authorized,
            "the token must not go to the blob host"
        );
    }
    // The real huggingface_hub finds every file in the cache tpuserve wrote.
    let files: Vec<String> = needed_files(&r).into_iter().collect();
    let out = python(
        PY_CHECK_CACHE,
        &[
            &dir.display().to_string(),
            REPO,
            &r.commit,
            &serde_json::to_string(&files).unwrap(),
        ],
        &py_env(&hub.endpoint, tmp.path()),
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["nb_files"], json!(files.len()), "{v}");
    // A restart finds everything in the cache: one repository-info request, no file traffic.
    hub.clear_log();
    {
        let s = serve(REPO, &dir, &env, &[]);
        check_golden(&s, REPO);
        assert!(s.log().contains("all files already in"), "{}", s.log());
    }
    let reqs = hub.log();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(reqs[0]
        .path
        .starts_with("/api/models/org/tiny/revision/main"));
}

#[test]
fn a_cache_written_by_huggingface_hub_is_served_offline() {
    let r = repo(REPO, None);
    let hub = FakeHub::start(vec![r.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bucket");
    let out = python(
        PY_SNAPSHOT,
        &[REPO, &dir.display().to_string()],
        &py_env(&hub.endpoint, tmp.path()),
    );
    let snap = PathBuf::from(out.trim().lines().last().unwrap());
    assert_eq!(
        snap,
        repo_dir(&dir, REPO).join("snapshots").join(&r.commit),
        "{out}"
    );
    hub.clear_log();
    let mut env = hub_env("http://127.0.0.1:9", tmp.path(), "");
    env.retain(|(k, _)| *k != "HF_HUB_OFFLINE");
    env.push(("HF_HUB_OFFLINE", "1".into()));
    let s = serve(REPO, &dir, &env, &[]);
    check_golden(&s, REPO);
    assert!(s.log().contains("HF_HUB_OFFLINE"), "{}", s.log());
    drop(s);
    assert!(hub.log().is_empty(), "no network: {:?}", hub.log());
    // Online against the hub, the same cache is complete: nothing is downloaded again.
    let env = hub_env(&hub.endpoint, tmp.path(), "");
    let s = serve(REPO, &dir, &env, &[]);
    assert!(s.log().contains("all files already in"), "{}", s.log());
    drop(s);
    assert!(
        hub.log().iter().all(|l| l.path.starts_with("/api/")),
        "{:?}",
        hub.log()
    );
}

fn partial_of(blobs: &Path, sha: &str) -> Option<(PathBuf, u64)> {
    std::fs::read_dir(blobs).ok()?.flatten().find_map(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        (n.starts_with(sha) && n.ends_with(".incomplete"))
            .then(|| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
    })
}

#[test]
fn a_killed_download_resumes_with_a_range_request() {
    let r = repo(REPO, None);
    let hub = FakeHub::start(vec![r.clone()]);
    let big = shards(&r)[0].clone();
    hub.throttle(&big.sha256(), Some(3 << 20));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let env = hub_env(&hub.endpoint, tmp.path(), "");
    let mut cmd = Command::new(tpuserve_bin());
    cmd.args(serve_args(REPO, &dir, free_port(), &[]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let blobs = repo_dir(&dir, REPO).join("blobs");
    let seen = poll(Duration::from_secs(300), || {
        partial_of(&blobs, &big.sha256()).filter(|(_, n)| *n >= 4 << 20)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, at_kill) = seen.expect("a partial file growing past 4 MiB");
    let (_, on_disk) = partial_of(&blobs, &big.sha256()).expect("partial file kept");
    assert!(on_disk >= at_kill && on_disk < big.data.len() as u64);
    assert!(!blobs.join(big.sha256()).exists());
    hub.throttle(&big.sha256(), None);
    hub.clear_log();
    let s = serve(REPO, &dir, &env, &[]);
    check_golden(&s, REPO);
    assert!(
        s.log().contains("resuming a partial download"),
        "{}",
        s.log()
    );
    drop(s);
    let gets = requested(&hub.log(), &format!("/blobs/{}", big.sha256()));
    let want = format!("bytes={on_disk}-");
    assert!(
        gets.iter().any(|l| l.method == "GET"
            && l.range.as_deref() == Some(want.as_str())
            && l.status == 206),
        "no resumed range request {want}: {gets:?}"
    );
    assert!(
        gets.iter().all(|l| l.range.is_some()),
        "the file was fetched again from the start: {gets:?}"
    );
    eprintln!(
        "resumed {} at byte {on_disk} of {}",
        big.path,
        big.data.len()
    );
    check_layout(&dir, &r);
}

#[test]
fn two_processes_downloading_into_one_folder_both_succeed() {
    let r = repo(REPO, None);
    let hub = FakeHub::start(vec![r.clone()]);
    // Slow enough that the two downloads overlap.
    for sh in shards(&r) {
        hub.throttle(&sh.sha256(), Some(8 << 20));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let env = hub_env(&hub.endpoint, tmp.path(), "");
    let barrier = std::sync::Barrier::new(2);
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let (dir, env, barrier) = (&dir, &env, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    let s = serve(REPO, dir, env, &[]);
                    check_golden(&s, REPO);
                    s.log()
                })
            })
            .collect();
        for h in hs {
            let log = h.join().unwrap();
            assert!(logged_rate(&log).is_some(), "both downloaded:\n{log}");
        }
    });
    eprintln!(
        "two concurrent downloads + starts: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let big = shards(&r)[0];
    let gets: Vec<Logged> = requested(&hub.log(), &format!("/blobs/{}", big.sha256()))
        .into_iter()
        .filter(|l| l.method == "GET")
        .collect();
    assert_eq!(gets.len(), 2, "each process downloaded: {gets:?}");
    check_layout(&dir, &r);
}

#[test]
fn gated_repo_errors_name_hf_token_and_never_print_it() {
    let r = repo(GATED, Some(GATED_TOKEN));
    let hub = FakeHub::start(vec![r.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let t = Duration::from_secs(120);
    // No token.
    let (st, out) = serve_until_exit(GATED, &dir, &hub_env(&hub.endpoint, tmp.path(), ""), &[], t);
    assert!(!st.success(), "{out}");
    assert!(out.contains("HF_TOKEN") && out.contains(GATED), "{out}");
    assert!(out.contains("no token was sent"), "{out}");
    // A wrong token: rejected, never printed.
    let wrong = "hf_WrongSecretValue_9f8e7d6c5b4a";
    let (st, out) = serve_until_exit(
        GATED,
        &dir,
        &hub_env(&hub.endpoint, tmp.path(), wrong),
        &[],
        t,
    );
    assert!(!st.success(), "{out}");
    assert!(out.contains("HF_TOKEN") && out.contains("401"), "{out}");
    assert!(!out.contains(wrong), "the token was printed:\n{out}");
    assert!(
        !out.contains("WrongSecret"),
        "part of the token was printed:\n{out}"
    );
    let gated_reqs = hub.log();
    assert!(gated_reqs.iter().any(|l| l.status == 401 && l.authorized));
    assert!(gated_reqs.iter().any(|l| l.status == 401 && !l.authorized));
    // The right token downloads and serves; it is not printed either.
    let s = serve(
        GATED,
        &dir,
        &hub_env(&hub.endpoint, tmp.path(), GATED_TOKEN),
        &[],
    );
    check_golden(&s, GATED);
    assert!(!s.log().contains(GATED_TOKEN), "the token was printed");
    drop(s);
    check_layout(&dir, &r);
}

#[test]
fn unknown_repo_or_revision_is_a_clear_error() {
    let hub = FakeHub::start(vec![repo(REPO, None)]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let env = hub_env(&hub.endpoint, tmp.path(), "");
    let t = Duration::from_secs(120);
    let (st, out) = serve_until_exit("org/nope", &dir, &env, &[], t);
    assert!(!st.success(), "{out}");
    assert!(
        out.contains("repository `org/nope` was not found") && out.contains("404"),
        "{out}"
    );
    let (st, out) = serve_until_exit(REPO, &dir, &env, &["--revision", "v9"], t);
    assert!(!st.success(), "{out}");
    assert!(out.contains("revision `v9` was not found"), "{out}");
    // Offline with nothing cached.
    let mut env = env;
    env.retain(|(k, _)| *k != "HF_HUB_OFFLINE");
    env.push(("HF_HUB_OFFLINE", "1".into()));
    let (st, out) = serve_until_exit(REPO, &dir, &env, &[], t);
    assert!(!st.success(), "{out}");
    assert!(out.contains("HF_HUB_OFFLINE"), "{out}");
    // A missing local path is not taken for a hub id.
    let (st, out) = serve_until_exit("/no/such/model.gguf", &dir, &env, &[], t);
    assert!(!st.success(), "{out}");
    assert!(out.contains("does not exist"), "{out}");
}
