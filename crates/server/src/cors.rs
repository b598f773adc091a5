//! CORS as vLLM sets it up (Starlette's `CORSMiddleware` with `--allowed-origins`,
//! `--allowed-methods`, `--allowed-headers`, `--allow-credentials`; as in vLLM 0.32 no origin
//! is allowed by default, and every method and header of an allowed origin): preflight
//! requests are answered here (400 for an origin not allowed), other requests from an allowed
//! origin get `Access-Control-Allow-Origin` (and credentials) on their response.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct Cors {
    pub origins: Vec<String>,
    pub methods: Vec<String>,
    pub headers: Vec<String>,
    pub credentials: bool,
}

/// Starlette's list when every method is allowed.
const ALL_METHODS: &str = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT";

impl Cors {
    fn any_origin(&self) -> bool {
        self.origins.iter().any(|o| o == "*")
    }

    fn allows(&self, origin: &str) -> bool {
        self.any_origin() || self.origins.iter().any(|o| o == origin)
    }

    /// The `Access-Control-Allow-Origin` value: `*` for any origin unless credentials are
    /// allowed (browsers refuse `*` with credentials), else the origin itself.
    fn allow_origin(&self, origin: &str) -> String {
        if self.any_origin() && !self.credentials {
            "*".into()
        } else {
            origin.into()
        }
    }

    fn preflight(&self, origin: &str, req: &HeaderMap) -> Response {
        let method = req
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let method_ok = self
            .methods
            .iter()
            .any(|m| m == "*" || m.eq_ignore_ascii_case(method));
        let asked_headers = req
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let any_header = self.headers.iter().any(|h| h == "*");
        let headers_ok = any_header
            || asked_headers
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .all(|h| self.headers.iter().any(|a| a.eq_ignore_ascii_case(h)));
        let mut problems = Vec::new();
        if !self.allows(origin) {
            problems.push("origin");
        }
        if !method_ok {
            problems.push("method");
        }
        if !headers_ok {
            problems.push("headers");
        }
        if !problems.is_empty() {
            return (
                StatusCode::BAD_REQUEST,
                format!("Disallowed CORS {}", problems.join(", ")),
            )
                .into_response();
        }
        let mut resp = (StatusCode::OK, "OK").into_response();
        let h = resp.headers_mut();
        let set = |h: &mut HeaderMap, k, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(k, v);
            }
        };
        set(
            h,
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            &self.allow_origin(origin),
        );
        let methods = if self.methods.iter().any(|m| m == "*") {
            ALL_METHODS.to_string()
        } else {
            self.methods.join(", ")
        };
        set(h, header::ACCESS_CONTROL_ALLOW_METHODS, &methods);
        let allowed_headers = if any_header {
            asked_headers.to_string()
        } else {
            self.headers.join(", ")
        };
        if !allowed_headers.is_empty() {
            set(h, header::ACCESS_CONTROL_ALLOW_HEADERS, &allowed_headers);
        }
        set(h, header::ACCESS_CONTROL_MAX_AGE, "600");
        if self.credentials {
            set(h, header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        if !self.any_origin() || self.credentials {
            set(h, header::VARY, "Origin");
        }
        resp
    }
}

pub async fn layer(State(cors): State<Arc<Cors>>, req: Request, next: Next) -> Response {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return next.run(req).await;
    };
    if req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return cors.preflight(&origin, req.headers());
    }
    let mut resp = next.run(req).await;
    if cors.allows(&origin) {
        if let Ok(v) = HeaderValue::from_str(&cors.allow_origin(&origin)) {
            resp.headers_mut()
                .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        if cors.credentials {
            resp.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if !cors.any_origin() || cors.credentials {
            resp.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    resp
}
