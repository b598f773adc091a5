//! The HTTP/1.1 accept loop: `axum::serve` without a timer cannot time out slow clients, so a
//! slowloris (connections that trickle their headers or never send any) would hold sockets
//! and tasks forever. Here every connection gets hyper's header-read deadline, which hyper
//! restarts whenever it waits for a request head: one deadline covers a new connection that
//! sends nothing, headers that trickle in, and an idle keep-alive connection (uvicorn's
//! `timeout_keep_alive` under vLLM plays the same role). With `--ssl-*` each connection is a
//! TLS one (see `tls.rs`), its handshake bounded by the same deadline.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Per-connection limits.
#[derive(Clone)]
pub struct ConnectionLimits {
    /// A request head must be complete this long after the connection opens or after the
    /// previous response ends; otherwise the connection is closed.
    pub header_timeout: Duration,
    /// `--root-path`: as Starlette routes under uvicorn's root_path, a request path starting
    /// with this prefix is routed without it; other paths are routed as they are.
    pub root_path: Option<Arc<str>>,
    /// HTTPS: every connection goes through this TLS handshake first.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Drops `prefix` from the request path (and keeps the query) when the path starts with it.
fn strip_root_path<B>(prefix: &str, req: &mut hyper::Request<B>) {
    let Some(rest) = req.uri().path().strip_prefix(prefix) else {
        return;
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return; // `/apiary` is not under `/api`
    }
    let rest = if rest.is_empty() { "/" } else { rest };
    let pq = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    if let Ok(uri) = pq.parse() {
        *req.uri_mut() = uri;
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting (the listener
/// is closed, so new connections are refused) and waits for open connections to finish their
/// in-flight requests; idle keep-alive connections close at once.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Streams write one small SSE event per token: send each without delay.
        let _ = stream.set_nodelay(true);
        let tower = TowerToHyperService::new(router.clone());
        let prefix = limits.root_path.clone();
        let service = hyper::service::service_fn(move |mut req| {
            if let Some(p) = &prefix {
                strip_root_path(p, &mut req);
            }
            tower.call(req)
        });
        let Some(acceptor) = limits.tls.clone() else {
            let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("connection ended: {e}");
                }
            });
            continue;
        };
        // The handshake runs in the connection's own task (a slow one holds up no other),
        // bounded by the header deadline: a client that never completes it is dropped.
        let watcher = graceful.watcher();
        let http = http.clone();
        let deadline = limits.header_timeout;
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!("TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            };
            let conn = watcher.watch(http.serve_connection(TokioIo::new(tls), service));
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
