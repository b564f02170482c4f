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

use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::Conn;
use super::respond::{Body, Refusal};
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
    let http = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(gw.limits.head_timeout_ms))
        .max_buf_size(gw.limits.max_head_bytes.max(8192))
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(http);
    let draining = gw.shutdown.draining();
    tokio::select! {
        r = http.as_mut() => {
            if let Err(err) = r {
                tracing::debug!(client = %conn.peer, error = %err, "client connection ended");
            }
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
    let policy = gw.policy.load_full();
    if policy.client_allowed(conn.peer.ip()).is_none() {
        let mut resp = Refusal::ClientNotAllowed.response("");
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return resp;
    }
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

/// Parses `host:port` of a CONNECT or absolute URI, strictly: no userinfo,
/// and a port of 1-5 ASCII digits in 1-65535 (`+443`, `65536`, `08x` are
/// errors, never a default port).
fn authority(uri: &Uri, default_port: Option<u16>) -> Result<(String, u16), &'static str> {
    let auth = uri.authority().ok_or("missing host")?;
    authority_text(auth.as_str(), default_port)
}

/// [`authority`] of the text `host[:port]` (also a Host header's value,
/// which must carry nothing else: no path, query, fragment or userinfo).
fn authority_text(text: &str, default_port: Option<u16>) -> Result<(String, u16), &'static str> {
    if text.contains('@') {
        return Err("userinfo (user@host) is not allowed in the target");
    }
    if text.bytes().any(|b| {
        matches!(b, b'/' | b'?' | b'#' | b'\\') || b.is_ascii_whitespace() || b.is_ascii_control()
    }) {
        return Err("the host may not carry a path, query, fragment or spaces");
    }
    let (host, port_text) = split_port(text)?;
    if host.is_empty() {
        return Err("missing host");
    }
    let port = match (port_text, default_port) {
        (Some(p), _) => parse_port(p)?,
        (None, Some(p)) => p,
        (None, None) => return Err("CONNECT needs host:port, e.g. CONNECT pypi.org:443"),
    };
    Ok((host.to_string(), port))
}

/// `host` and the text after its last `:` (IPv6 literals are bracketed).
fn split_port(text: &str) -> Result<(&str, Option<&str>), &'static str> {
    if text.starts_with('[') {
        let end = text.find(']').ok_or("missing ']' after an IPv6 address")?;
        let (host, rest) = text.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => rest
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or("expected ':port' after ']'"),
        };
    }
    Ok(match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    })
}

/// A port: 1-5 ASCII digits, 1-65535.
fn parse_port(text: &str) -> Result<u16, &'static str> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the port is not a number from 1 to 65535");
    }
    match text.parse::<u32>() {
        Ok(0) => Err("port 0 is not a port"),
        Ok(p) if p <= 65535 => Ok(p as u16),
        _ => Err("the port is not a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::normalized_host;
    use super::*;

    #[test]
    fn authority_forms() {
        let a = |s: &str, d| authority(&s.parse::<Uri>().unwrap(), d);
        assert_eq!(a("pypi.org:443", None), Ok(("pypi.org".into(), 443)));
        assert_eq!(
            a("http://pypi.org/simple", Some(80)),
            Ok(("pypi.org".into(), 80))
        );
        assert_eq!(a("[::1]:443", None), Ok(("[::1]".into(), 443)));
        assert!(a("pypi.org:0", None).is_err());
        assert!(
            a("http://user:pw@pypi.org/", Some(80))
                .unwrap_err()
                .contains("userinfo")
        );
        assert!(a("pypi.org", None).is_err());
        // Strict ports: never a silent default, never a sign.
        assert!(a("pypi.org:+443", None).is_err());
        assert!(a("pypi.org:65536", None).is_err());
        assert!(a("http://pypi.org:65536/", Some(80)).is_err());
        assert!(a("pypi.org:000443", None).is_err());
        assert_eq!(a("pypi.org:65535", None), Ok(("pypi.org".into(), 65535)));
        let h = |s: &str| authority_text(s, Some(80));
        assert_eq!(h("pypi.org"), Ok(("pypi.org".into(), 80)));
        assert_eq!(h("[::1]:8080"), Ok(("[::1]".into(), 8080)));
        for bad in [
            "pypi.org/x",
            "pypi.org?q",
            "pypi.org#f",
            "a b",
            "pypi.org:",
            "[::1",
            "[::1]x",
        ] {
            assert!(h(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(normalized_host("[::1]"), "::1");
        assert_eq!(normalized_host("PyPI.org."), "pypi.org");
    }
}
