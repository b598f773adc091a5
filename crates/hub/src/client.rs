//! The few hub endpoints a download needs, over blocking reqwest (rustls). Redirects are
//! followed by hand so the `Authorization` header never leaves the hub's origin, and headers
//! (which carry the token) are never logged.

use std::time::Duration;

use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION, RANGE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

use crate::error::{HubError, Result};
use crate::{HubConfig, Token};

const MAX_REDIRECTS: usize = 8;

#[derive(Debug, Deserialize)]
pub struct RepoInfo {
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
pub struct Sibling {
    pub rfilename: String,
}

/// What `HEAD resolve/<commit>/<file>` says about a file.
#[derive(Debug, Clone)]
pub struct FileMeta {
    /// The blob name: the sha256 of an LFS file, the git blob id otherwise.
    pub etag: String,
    pub size: u64,
    /// Where the bytes are (the CDN / storage URL of a redirect, or the resolve URL itself).
    pub url: Url,
}

/// What the failing request was about, to word its error.
pub struct Ctx<'a> {
    pub repo: &'a str,
    pub revision: &'a str,
    pub file: Option<&'a str>,
}

pub struct Client {
    http: Http,
    endpoint: String,
    token: Option<Token>,
}

fn enc_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn enc_path(s: &str) -> String {
    s.split('/').map(enc_segment).collect::<Vec<_>>().join("/")
}

/// A URL without its query (signed storage URLs carry credentials there).
fn display_url(u: &Url) -> String {
    let mut u = u.clone();
    u.set_query(None);
    u.to_string()
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `W/"abc"` / `"abc"` → `abc`.
pub fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

impl Client {
    pub fn new(cfg: &HubConfig) -> Result<Client> {
        let http = Http::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(30))
            // Per read in the blocking client: an idle connection fails (and is retried).
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("tpuserve/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HubError::Network {
                url: cfg.endpoint.clone(),
                message: format!("building the HTTP client: {e}"),
            })?;
        Ok(Client {
            http,
            endpoint: cfg.endpoint.clone(),
            token: cfg.token.clone(),
        })
    }

    fn parse(&self, url: &str) -> Result<Url> {
        Url::parse(url).map_err(|e| HubError::Network {
            url: url.to_string(),
            message: format!("bad URL ({e}); check HF_ENDPOINT"),
        })
    }

    fn with_auth(&self, rb: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", t.secret()))
                    .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
                v.set_sensitive(true);
                rb.header(AUTHORIZATION, v)
            }
            None => rb,
        }
    }

    /// Sends `method url`, following redirects by hand; the token goes only to the hub's own
    /// origin. Stops at a redirect off the hub when `stop_off_hub` (HEAD: the metadata is on
    /// that response). Returns the last response and its URL.
    fn send(
        &self,
        method: Method,
        url: Url,
        range_from: u64,
        stop_off_hub: bool,
    ) -> Result<(Response, Url)> {
        let hub = self.parse(&self.endpoint)?;
        let mut url = url;
        for _ in 0..MAX_REDIRECTS {
            let mut rb = self
                .http
                .request(method.clone(), url.clone())
                .header("Accept-Encoding", "identity");
            if range_from > 0 {
                rb = rb.header(RANGE, format!("bytes={range_from}-"));
            }
            if same_origin(&url, &hub) {
                rb = self.with_auth(rb);
            }
            let resp = rb.send().map_err(|e| HubError::Network {
                url: display_url(&url),
                message: error_chain(&e),
            })?;
            if !resp.status().is_redirection() {
                return Ok((resp, url));
            }
            let Some(loc) = header(resp.headers(), LOCATION.as_str()) else {
                return Ok((resp, url));
            };
            let next = url.join(loc).map_err(|e| HubError::Network {
                url: display_url(&url),
                message: format!("bad redirect location ({e})"),
            })?;
            if stop_off_hub && !same_origin(&next, &hub) {
                return Ok((resp, url));
            }
            url = next;
        }
        Err(HubError::Network {
            url: display_url(&url),
            message: "too many redirects".into(),
        })
    }

    /// Turns an error status into the error a person can act on.
    fn status_error(&self, resp: Response, url: &Url, ctx: &Ctx) -> HubError {
        let status = resp.status().as_u16();
        let code = header(resp.headers(), "X-Error-Code").map(str::to_string);
        let mut message = header(resp.headers(), "X-Error-Message")
            .map(str::to_string)
            .or_else(|| {
                resp.text().ok().map(|t| {
                    serde_json::from_str::<serde_json::Value>(&t)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_string))
                        .unwrap_or(t)
                })
            })
            .unwrap_or_default();
        // Never echo the token, even if a server did.
        if let Some(t) = &self.token {
            message = message.replace(t.secret(), "<token>");
        }
        let message: String = message.trim().chars().take(300).collect();
        let detail = if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        };
        let repo = ctx.repo.to_string();
        let endpoint = self.endpoint.clone();
        match (status, code.as_deref()) {
            (404, Some("RevisionNotFound")) => HubError::RevisionNotFound {
                repo,
                revision: ctx.revision.to_string(),
                endpoint,
            },
            (404, Some("EntryNotFound")) => HubError::EntryNotFound {
                repo,
                revision: ctx.revision.to_string(),
                file: ctx.file.unwrap_or_default().to_string(),
            },
            (401 | 404, Some("RepoNotFound")) => HubError::RepoNotFound {
                repo,
                endpoint,
                status,
            },
            (404, _) => match ctx.file {
                Some(f) => HubError::EntryNotFound {
                    repo,
                    revision: ctx.revision.to_string(),
                    file: f.to_string(),
                },
                None => HubError::RepoNotFound {
                    repo,
                    endpoint,
                    status,
                },
            },
            (401 | 403, _) => match &self.token {
                None => HubError::TokenMissing {
                    repo,
                    endpoint,
                    status,
                    detail,
                },
                Some(t) => HubError::TokenRejected {
                    repo,
                    endpoint,
                    status,
                    detail,
                    source_var: t.source.clone(),
                },
            },
            _ => HubError::Http {
                url: display_url(url),
                status,
                detail,
            },
        }
    }

    /// `GET /api/models/{repo}/revision/{revision}`: the commit and file list.
    pub fn repo_info(&self, repo: &str, revision: &str) -> Result<RepoInfo> {
        let url = self.parse(&format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            repo,
            enc_segment(revision)
        ))?;
        let ctx = Ctx {
            repo,
            revision,
            file: None,
        };
        let (resp, url) = self.send(Method::GET, url, 0, false)?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp, &url, &ctx));
        }
        let text = resp.text().map_err(|e| HubError::Network {
            url: display_url(&url),
            message: error_chain(&e),
        })?;
        serde_json::from_str(&text).map_err(|e| HubError::Http {
            url: display_url(&url),
            status: 200,
            detail: format!(": unexpected repository info ({e})"),
        })
    }

    /// `HEAD /{repo}/resolve/{commit}/{file}`: etag, size and where the bytes are.
    pub fn file_meta(&self, repo: &str, commit: &str, file: &str) -> Result<FileMeta> {
        let url = self.parse(&format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            repo,
            enc_segment(commit),
            enc_path(file)
        ))?;
        let ctx = Ctx {
            repo,
            revision: commit,
            file: Some(file),
        };
        let (resp, url) = self.send(Method::HEAD, url, 0, true)?;
        let status = resp.status();
        if !(status.is_success() || status.is_redirection()) {
            return Err(self.status_error(resp, &url, &ctx));
        }
        let h = resp.headers();
        let etag = header(h, "X-Linked-Etag")
            .or_else(|| header(h, "ETag"))
            .map(normalize_etag)
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']) && e != "." && e != "..")
            .ok_or_else(|| HubError::MissingHeader {
                what: "ETag",
                file: file.to_string(),
                url: display_url(&url),
            })?;
        let size = header(h, "X-Linked-Size")
            .or_else(|| {
                (!status.is_redirection())
                    .then(|| header(h, "Content-Length"))
                    .flatten()
            })
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| HubError::MissingHeader {
                what: "size (X-Linked-Size / Content-Length)",
                file: file.to_string(),
                url: display_url(&url),
            })?;
        let location = if status.is_redirection() {
            match header(h, LOCATION.as_str()) {
                Some(l) => url.join(l).map_err(|e| HubError::Network {
                    url: display_url(&url),
                    message: format!("bad redirect location ({e})"),
                })?,
                None => url.clone(),
            }
        } else {
            url.clone()
        };
        Ok(FileMeta {
            etag,
            size,
            url: location,
        })
    }

    /// `GET url` from byte `from` on. The response is 200 (whole file) or 206 (the rest).
    pub fn get_from(&self, url: &Url, from: u64, ctx: &Ctx) -> Result<Response> {
        let (resp, last) = self.send(Method::GET, url.clone(), from, false)?;
        let s = resp.status();
        if s == StatusCode::OK || s == StatusCode::PARTIAL_CONTENT {
            return Ok(resp);
        }
        if s == StatusCode::RANGE_NOT_SATISFIABLE {
            return Err(HubError::Http {
                url: display_url(&last),
                status: 416,
                detail: String::new(),
            });
        }
        Err(self.status_error(resp, &last, ctx))
    }
}

/// An error and its causes on one line (reqwest's own message is terse).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_paths() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(enc_path("a b/c.json"), "a%20b/c.json");
        assert_eq!(enc_segment("refs/pr/1"), "refs%2Fpr%2F1");
    }
}
