//! A local stand-in for the Hugging Face Hub, speaking the HTTP API that `huggingface_hub` and
//! tpuserve's downloader use:
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}`: `{"sha", "siblings": [{"rfilename"}]}`
//! - `GET /api/models/{org}/{name}/tree/{rev}`: the file list with sizes, oids and LFS info
//! - `HEAD|GET /{org}/{name}/resolve/{rev}/{file}`: small files served directly with a git-oid
//!   `ETag`; LFS files answered with a 302 to a blob URL on a second port (another origin, like
//!   the CDN) with `X-Linked-Etag` (the sha256) and `X-Linked-Size`; always `X-Repo-Commit`
//! - `GET|HEAD /blobs/{sha256}`: the bytes, with `Range` support (206 / `Content-Range`), and an
//!   optional per-file throttle so a test can interrupt a download half way
//! - 401 (`X-Error-Code: GatedRepo`) on a gated repo's files without the right bearer token;
//!   404 with `RepoNotFound` / `RevisionNotFound` / `EntryNotFound`.
//!
//! Every request is logged (method, path, `Range`, whether a token was sent) for assertions.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

/// One file of a fake repository.
#[derive(Clone)]
pub struct RepoFile {
    pub path: String,
    pub data: Arc<Vec<u8>>,
    /// Stored with git LFS (served by redirect, etag = sha256).
    pub lfs: bool,
}

impl RepoFile {
    pub fn new(path: &str, data: Vec<u8>, lfs: bool) -> RepoFile {
        RepoFile {
            path: path.to_string(),
            data: Arc::new(data),
            lfs,
        }
    }

    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(self.data.as_slice()))
    }

    /// Stands in for the git blob id (40 hex digits, like the real one).
    pub fn git_oid(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("blob {}\0", self.data.len()).as_bytes());
        h.update(self.data.as_slice());
        hex(&h.finalize())[..40].to_string()
    }

    /// The blob name huggingface_hub gives this file in its cache.
    pub fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            self.git_oid()
        }
    }
}

/// A fake repository: id, commit, files, and the token a gated repo requires.
#[derive(Clone)]
pub struct Repo {
    pub id: String,
    pub commit: String,
    pub files: Vec<RepoFile>,
    pub gated_token: Option<String>,
}

impl Repo {
    pub fn file(&self, path: &str) -> &RepoFile {
        self.files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("no file {path} in {}", self.id))
    }
}

/// One request the fake hub received.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorized: bool,
    pub status: u16,
}

struct Inner {
    repos: HashMap<String, Repo>,
    /// sha256 → bytes, for the blob port.
    blobs: HashMap<String, Arc<Vec<u8>>>,
    cdn_origin: String,
    log: Mutex<Vec<Logged>>,
    /// sha256 → bytes per second.
    throttle: Mutex<HashMap<String, u64>>,
}

/// The running fake hub; stops when dropped.
pub struct FakeHub {
    pub endpoint: String,
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn std_listener() -> std::net::TcpListener {
    let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind fake hub");
    l.set_nonblocking(true).unwrap();
    l
}

impl FakeHub {
    pub fn start(repos: Vec<Repo>) -> FakeHub {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let api = std_listener();
        let cdn = std_listener();
        let endpoint = format!("http://{}", api.local_addr().unwrap());
        let cdn_origin = format!("http://{}", cdn.local_addr().unwrap());
        let mut blobs = HashMap::new();
        for r in &repos {
            for f in &r.files {
                blobs.insert(f.sha256(), f.data.clone());
            }
        }
        let inner = Arc::new(Inner {
            repos: repos.into_iter().map(|r| (r.id.clone(), r)).collect(),
            blobs,
            cdn_origin,
            log: Mutex::new(Vec::new()),
            throttle: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route(
                "/api/models/{org}/{name}/revision/{rev}",
                get(revision_info),
            )
            .route("/api/models/{org}/{name}/tree/{rev}", get(tree))
            .route(
                "/{org}/{name}/resolve/{rev}/{*file}",
                get(resolve).head(resolve),
            )
            .route("/blobs/{sha}", get(blob).head(blob))
            .with_state(inner.clone());
        for l in [api, cdn] {
            let app = app.clone();
            runtime.spawn(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                axum::serve(l, app).await.unwrap();
            });
        }
        FakeHub {
            endpoint,
            inner,
            runtime: Some(runtime),
        }
    }

    /// Requests so far.
    pub fn log(&self) -> Vec<Logged> {
        self.inner.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.inner.log.lock().unwrap().clear();
    }

    /// Serves the blob with this sha256 at `bytes_per_sec` (`None`: full speed).
    pub fn throttle(&self, sha256: &str, bytes_per_sec: Option<u64>) {
        let mut t = self.inner.throttle.lock().unwrap();
        match bytes_per_sec {
            Some(b) => t.insert(sha256.to_string(), b),
            None => t.remove(sha256),
        };
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn record(inner: &Inner, method: &Method, path: &str, headers: &HeaderMap, status: u16) {
    inner.log.lock().unwrap().push(Logged {
        method: method.to_string(),
        path: path.to_string(),
        range: headers
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        authorized: headers.contains_key("authorization"),
        status,
    });
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut r = Response::new(Body::from(
        serde_json::json!({ "error": message }).to_string(),
    ));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if !code.is_empty() {
        h.insert("x-error-code", HeaderValue::from_str(code).unwrap());
    }
    h.insert("x-error-message", HeaderValue::from_str(message).unwrap());
    r
}

/// The repository and the commit `rev` names, or the hub's 404.
#[allow(clippy::result_large_err)]
fn find<'a>(
    inner: &'a Inner,
    org: &str,
    name: &str,
    rev: &str,
) -> Result<&'a Repo, Response<Body>> {
    let id = format!("{org}/{name}");
    let repo = inner.repos.get(&id).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            "Repository not found",
        )
    })?;
    if rev != "main" && rev != repo.commit {
        return Err(error(
            StatusCode::NOT_FOUND,
            "RevisionNotFound",
            &format!("Invalid rev id: {rev}"),
        ));
    }
    Ok(repo)
}

async fn revision_info(
    State(inner): State<Arc<Inner>>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response<Body> {
    let path = format!("/api/models/{org}/{name}/revision/{rev}");
    let resp = match find(&inner, &org, &name, &rev) {
        Err(e) => e,
        Ok(repo) => {
            let siblings: Vec<_> = repo
                .files
                .iter()
                .map(|f| serde_json::json!({ "rfilename": f.path }))
                .collect();
            let body = serde_json::json!({
                "_id": "0123456789abcdef01234567",
                "id": repo.id,
                "modelId": repo.id,
                "private": false,
                "gated": if repo.gated_token.is_some() { serde_json::json!("manual") } else { serde_json::json!(false) },
                "disabled": false,
                "sha": repo.commit,
                "siblings": siblings,
                "tags": [],
            });
            let mut r = Response::new(Body::from(body.to_string()));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            r
        }
    };
    record(&inner, &method, &path, &headers, resp.status().as_u16());
    resp
}

async fn tree(
    State(inner): State<Arc<Inner>>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response<Body> {
    let path = format!("/api/models/{org}/{name}/tree/{rev}");
    let resp = match find(&inner, &org, &name, &rev) {
        Err(e) => e,
        Ok(repo) => {
            let mut folders = BTreeMap::new();
            let mut entries = Vec::new();
            for f in &repo.files {
                if let Some((dir, _)) = f.path.rsplit_once('/') {
                    folders.insert(dir.to_string(), ());
                }
                let mut e = serde_json::json!({
                    "type": "file",
                    "oid": f.git_oid(),
                    "size": f.data.len(),
                    "path": f.path,
                });
                if f.lfs {
                    e["lfs"] = serde_json::json!({
                        "oid": f.sha256(), "size": f.data.len(), "pointerSize": 134
                    });
                }
                entries.push(e);
            }
            for d in folders.keys() {
                entries.push(serde_json::json!({
                    "type": "directory", "oid": "0".repeat(40), "size": 0, "path": d
                }));
            }
            let mut r = Response::new(Body::from(serde_json::Value::from(entries).to_string()));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            r
        }
    };
    record(&inner, &method, &path, &headers, resp.status().as_u16());
    resp
}

async fn resolve(
    State(inner): State<Arc<Inner>>,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response<Body> {
    let path = format!("/{org}/{name}/resolve/{rev}/{file}");
    let resp = resolve_inner(&inner, &org, &name, &rev, &file, &method, &headers);
    record(&inner, &method, &path, &headers, resp.status().as_u16());
    resp
}

fn resolve_inner(
    inner: &Inner,
    org: &str,
    name: &str,
    rev: &str,
    file: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Response<Body> {
    let repo = match find(inner, org, name, rev) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Some(token) = &repo.gated_token {
        let sent = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match sent {
            None => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "GatedRepo",
                    &format!(
                        "Access to model {} is restricted. You must have access to it and be \
                         authenticated to access it. Please log in.",
                        repo.id
                    ),
                )
            }
            Some(t) if t != token => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "",
                    "Invalid credentials in Authorization header",
                )
            }
            Some(_) => {}
        }
    }
    let Some(f) = repo.files.iter().find(|f| f.path == file) else {
        return error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            &format!("{file} does not exist on \"{rev}\""),
        );
    };
    let mut r = if f.lfs {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::FOUND;
        let loc = format!(
            "{}/blobs/{}?X-Amz-Signature=fake&response-content-disposition=inline",
            inner.cdn_origin,
            f.sha256()
        );
        let h = r.headers_mut();
        h.insert("location", HeaderValue::from_str(&loc).unwrap());
        h.insert(
            "x-linked-etag",
            HeaderValue::from_str(&format!("\"{}\"", f.sha256())).unwrap(),
        );
        h.insert("x-linked-size", HeaderValue::from(f.data.len()));
        h.insert(
            "etag",
            HeaderValue::from_str(&format!("\"{}\"", f.git_oid())).unwrap(),
        );
        h.insert("content-length", HeaderValue::from(0));
        r
    } else {
        let mut r = ranged(&f.data, headers, method, None);
        r.headers_mut().insert(
            "etag",
            HeaderValue::from_str(&format!("\"{}\"", f.git_oid())).unwrap(),
        );
        r
    };
    r.headers_mut().insert(
        "x-repo-commit",
        HeaderValue::from_str(&repo.commit).unwrap(),
    );
    r
}

async fn blob(
    State(inner): State<Arc<Inner>>,
    UrlPath(sha): UrlPath<String>,
    method: Method,
    headers: HeaderMap,
) -> Response<Body> {
    let path = format!("/blobs/{sha}");
    let resp = match inner.blobs.get(&sha) {
        None => error(StatusCode::NOT_FOUND, "", "no such blob"),
        Some(data) => {
            let rate = inner.throttle.lock().unwrap().get(&sha).copied();
            let mut r = ranged(data, &headers, &method, rate);
            r.headers_mut().insert(
                "etag",
                HeaderValue::from_str(&format!("\"{sha}\"")).unwrap(),
            );
            r
        }
    };
    record(&inner, &method, &path, &headers, resp.status().as_u16());
    resp
}

/// `bytes=N-` / `bytes=N-M` of `data` (206), or all of it (200); `rate` throttles the body.
fn ranged(
    data: &Arc<Vec<u8>>,
    headers: &HeaderMap,
    method: &Method,
    rate: Option<u64>,
) -> Response<Body> {
    let len = data.len() as u64;
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .map(|v| {
            let (a, b) = v.split_once('-').unwrap_or((v, ""));
            let start: u64 = a.trim().parse().unwrap_or(0);
            let end: u64 = b.trim().parse().map(|e: u64| e + 1).unwrap_or(len);
            (start, end.min(len))
        });
    let (status, start, end) = match range {
        Some((s, _)) if s >= len => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            r.headers_mut().insert(
                "content-range",
                HeaderValue::from_str(&format!("bytes */{len}")).unwrap(),
            );
            return r;
        }
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
        None => (StatusCode::OK, 0, len),
    };
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        throttled_body(data.clone(), start as usize, end as usize, rate)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert("content-length", HeaderValue::from(end - start));
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            "content-range",
            HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)).unwrap(),
        );
    }
    r
}

fn throttled_body(data: Arc<Vec<u8>>, start: usize, end: usize, rate: Option<u64>) -> Body {
    let chunk = 64 * 1024;
    let stream = futures_util::stream::unfold(start, move |pos| {
        let data = data.clone();
        async move {
            if pos >= end {
                return None;
            }
            let next = (pos + chunk).min(end);
            if let Some(bps) = rate {
                let secs = (next - pos) as f64 / bps.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
            let bytes = Bytes::copy_from_slice(&data[pos..next]);
            Some((Ok::<_, std::io::Error>(bytes), next))
        }
    });
    Body::from_stream(stream)
}
