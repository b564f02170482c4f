//! Explicit proxy: what `HTTP_PROXY`/`HTTPS_PROXY` clients talk to.
//!
//! In: an admitted client connection speaking HTTP/1.1. Out: for
//! `CONNECT host:port`, a decision, an upstream connection, `200`, then a
//! tunnel (`connect`); for `GET http://host/...`, the request forwarded
//! upstream (`forward`). Every refusal is answered through `respond`, with a
//! `Proxy-Status` header (RFC 9209) and a one-line body a person can act on.
//!
//! This file routes: a whole CONNECT head in the first bytes takes the fast
//! path in `connect`; everything else goes through hyper, whose requests
//! [`handle`] sends to `connect` or `forward`.

mod connect;
mod forward;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::Conn;
use super::respond::{Body, Refusal};
use super::stall::{Stall, Stalled};
use crate::gateway::Gateway;

/// Serves one client connection until it closes, or drains.
///
/// A connection whose first bytes are a whole `CONNECT` head (what every
/// client sends) is served by the fast path in this task; anything else,
/// including a CONNECT head that arrives in pieces, goes to hyper, which sees
/// the stream from its first byte (the fast path only peeks).
pub async fn serve(stream: TcpStream, conn: Arc<Conn>, gw: Arc<Gateway>) {
    let Some(stream) = connect::fast(stream, &conn, &gw).await else {
        return;
    };
    // Boxed: the fast path's tunnel runs in this task, so its future stays
    // small while idle instead of reserving room for hyper's connection.
    Box::pin(serve_http(stream, conn, gw)).await;
}

async fn serve_http(stream: TcpStream, conn: Arc<Conn>, gw: Arc<Gateway>) {
    let svc = {
        let (conn, gw) = (conn.clone(), gw.clone());
        service_fn(move |req| {
            let (conn, gw) = (conn.clone(), gw.clone());
            async move { Ok::<_, Infallible>(handle(req, conn, gw).await) }
        })
    };
    let stall = Stall::new();
    let http = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(gw.limits.head_timeout_ms))
        .max_buf_size(gw.limits.max_head_bytes.max(8192))
        .serve_connection(TokioIo::new(Stalled::new(stream, stall.clone())), svc)
        .with_upgrades();
    tokio::pin!(http);
    let draining = gw.shutdown.draining();
    let idle = Duration::from_millis(gw.limits.idle_timeout_ms);
    tokio::select! {
        r = http.as_mut() => {
            if let Err(err) = r {
                tracing::debug!(client = %conn.peer, error = %err, "client connection ended");
            }
        }
        () = stall.stuck_for(idle) => {
            tracing::debug!(client = %conn.peer, "client stopped reading: closed at the idle timeout");
        }
        () = draining => {
            http.as_mut().graceful_shutdown();
            let _ = http.await;
        }
    }
}

async fn handle(req: Request<Incoming>, conn: Arc<Conn>, gw: Arc<Gateway>) -> Response<Body> {
    // hyper's read buffer bounds memory; this enforces the configured head size.
    if head_len(&req) > gw.limits.max_head_bytes {
        return Refusal::HeadTooLarge {
            limit: gw.limits.max_head_bytes,
        }
        .response("");
    }
    // Every request is decided by the policy in force when it arrives, so a
    // reload reaches keep-alive connections too, client list included.
    let Some(policy) = conn.policy_now(&gw) else {
        let mut resp = Refusal::ClientNotAllowed.response("");
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return resp;
    };
    if req.method() == Method::CONNECT {
        return connect::via_hyper(req, conn, gw, policy).await;
    }
    if req.uri().scheme().is_none() {
        return Refusal::NotAProxyRequest.response("");
    }
    forward::forward(req, conn, gw, policy).await
}

/// Bytes of a request head as received: request line and header lines.
fn head_len(req: &Request<Incoming>) -> usize {
    // Measured from the parsed parts: no per-request allocation.
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}
