//! Explicit proxy: what `HTTP_PROXY`/`HTTPS_PROXY` clients talk to.
//!
//! In: an admitted client connection speaking HTTP/1.1 (hyper server).
//! Out: for `CONNECT host:port`, a decision, an upstream connection, `200`,
//! then a tunnel; for `GET http://host/...`, the request forwarded upstream
//! (hop-by-hop headers removed, `Via` added, bodies streamed both ways,
//! WebSocket upgrades passed through). Every refusal is a 403/4xx/5xx with a
//! `Proxy-Status` header (RFC 9209) and a one-line body a person can act on.
//!
//! Names must agree: the first bytes of a CONNECT tunnel are read (bounded in
//! size and time); a TLS ClientHello whose SNI names another host than the
//! CONNECT authority is cut (domain fronting). An absolute-URI request whose
//! Host header names another host is refused.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{AccessLog, Conn, Gateway, Refusal, log_denial, pool, raw_response};
use crate::classify::{self, Classified};
use crate::config::Protocol;
use crate::metrics::Via;
use crate::policy::{Decision, Dest, Reason, Target, Verdict, host};
use crate::upstream::ConnectError;

type Body = BoxBody<Bytes, hyper::Error>;

const VIA: &str = "1.1 portcullis";

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A text response with `Proxy-Status` (RFC 9209 §2): `portcullis; error=...; details="..."`.
fn status_response(
    status: StatusCode,
    error: Option<&str>,
    details: &str,
    body: String,
) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(error) = error {
        let details: String = details
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
            .collect();
        if let Ok(v) =
            HeaderValue::from_str(&format!("portcullis; error={error}; details=\"{details}\""))
        {
            h.insert(HeaderName::from_static("proxy-status"), v);
        }
    }
    resp
}

fn bad_request(message: &str) -> Response<Body> {
    status_response(
        StatusCode::BAD_REQUEST,
        Some("http_request_error"),
        message,
        format!("portcullis: bad request — {message}\n"),
    )
}

/// RFC 9209 error token for a policy denial.
fn deny_token(reason: Reason) -> &'static str {
    match reason {
        Reason::GuardedAddress | Reason::PlatformAddress => "destination_ip_prohibited",
        Reason::RuleMatched
        | Reason::DenyRule
        | Reason::NoRule
        | Reason::PortNotAllowed
        | Reason::ProtocolNotAllowed
        | Reason::ScenarioDisabled
        | Reason::MalformedHost => "http_request_denied",
    }
}

fn denied(cx: &Conn, what: &str, d: &Decision, ip_literal: bool) -> Response<Body> {
    let sentence = cx.policy.explain(d);
    let token = if ip_literal {
        "destination_ip_prohibited"
    } else {
        deny_token(d.reason)
    };
    status_response(
        StatusCode::FORBIDDEN,
        Some(token),
        d.reason.as_str(),
        format!("portcullis: denied {what} — {sentence}\n"),
    )
}

fn upstream_failed(what: &str, err: &ConnectError) -> Response<Body> {
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let text = match err {
        ConnectError::Prohibited { reason, .. } => {
            let hint = if *reason == Reason::PlatformAddress {
                "; add 169.254.169.254 and 168.63.129.16 to NO_PROXY"
            } else {
                ": private, loopback and link-local addresses are refused unless an address rule names them"
            };
            format!("portcullis: denied {what} — {err}{hint}\n")
        }
        _ => format!("portcullis: {what} failed — {err}\n"),
    };
    status_response(status, Some(err.as_str()), &err.to_string(), text)
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

/// Parses `host:port` of a CONNECT or absolute URI. Refuses userinfo and port 0.
fn authority(uri: &Uri, default_port: Option<u16>) -> Result<(String, u16), &'static str> {
    let auth = uri.authority().ok_or("missing host")?;
    if auth.as_str().contains('@') {
        return Err("userinfo (user@host) is not allowed in the target");
    }
    let host = auth.host();
    if host.is_empty() {
        return Err("missing host");
    }
    let port = match (auth.port_u16(), default_port) {
        (Some(0), _) => return Err("port 0 is not a port"),
        (Some(p), _) => p,
        (None, Some(p)) => p,
        (None, None) => return Err("CONNECT needs host:port, e.g. CONNECT pypi.org:443"),
    };
    Ok((host.to_string(), port))
}

/// The name policy and DNS see: normalised, brackets dropped from IPv6 literals.
fn canonical_host(raw: &str) -> String {
    match Target::parse(raw) {
        Target::Ip(ip) => ip.to_string(),
        Target::Name(n) => host::normalize(n).unwrap_or_else(|_| n.to_string()),
    }
}

/// Serves one client connection until it closes, or drains.
///
/// A connection whose first bytes are a whole `CONNECT` head (what every
/// client sends) is served by [`connect_fast`] in this task; anything else,
/// including a CONNECT head that arrives in pieces, goes to hyper, which sees
/// the stream from its first byte (the fast path only peeks).
pub async fn serve(stream: TcpStream, cx: Arc<Conn>, gw: Arc<Gateway>) {
    let Some(stream) = connect_fast(stream, &cx, &gw).await else {
        return;
    };
    // Boxed: the fast path's tunnel runs in this task, so its future stays
    // small while idle instead of reserving room for hyper's connection.
    Box::pin(serve_http(stream, cx, gw)).await;
}

async fn serve_http(stream: TcpStream, cx: Arc<Conn>, gw: Arc<Gateway>) {
    let svc = {
        let (cx, gw) = (cx.clone(), gw.clone());
        service_fn(move |req| {
            let (cx, gw) = (cx.clone(), gw.clone());
            async move { Ok::<_, Infallible>(handle(req, cx, gw).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(gw.limits.head_timeout_ms))
        .max_buf_size(gw.limits.max_head_bytes.max(8192))
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let draining = gw.shutdown.draining();
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(err) = r {
                tracing::debug!(client = %cx.peer, error = %err, "client connection ended");
            }
        }
        () = draining => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Bytes peeked for a CONNECT head; a larger head goes through hyper.
const FAST_HEAD_BYTES: usize = 4096;

/// The CONNECT fast path: hyper's per-connection machinery, its upgrade
/// hand-off and a second task cost more than the rest of a short tunnel.
///
/// Peeks the first bytes (under `head_timeout_ms`). A complete, well-formed
/// `CONNECT host:port` head without framing headers is consumed, decided,
/// answered and tunnelled here, and `None` is returned; so is `None` when the
/// client sends nothing in time, closes, or draining starts. Everything else
/// is handed back untouched (`Some`), for hyper to answer exactly as it would
/// have: errors in the head get hyper's and [`handle`]'s answers.
async fn connect_fast(stream: TcpStream, cx: &Conn, gw: &Gateway) -> Option<TcpStream> {
    let mut peeked = vec![0u8; FAST_HEAD_BYTES];
    let head_timeout = Duration::from_millis(gw.limits.head_timeout_ms);
    let n = tokio::select! {
        r = tokio::time::timeout(head_timeout, stream.peek(&mut peeked)) => match r {
            Ok(Ok(n)) if n > 0 => n,
            // EOF, an error, or nothing within the head timeout (what hyper's
            // header_read_timeout does too): close.
            _ => return None,
        },
        () = gw.shutdown.draining() => return None,
    };
    let Some((raw_host, port, head_len)) =
        fast_connect_head(&peeked[..n], gw.limits.max_head_bytes)
    else {
        return Some(stream);
    };
    let mut client = stream;
    // The head is in the socket buffer: one read. What follows it (a
    // pipelined ClientHello) stays there for the SNI check.
    if client.read_exact(&mut peeked[..head_len]).await.is_err() {
        return None;
    }
    drop(peeked);
    match open(cx, gw, &raw_host, port).await {
        Ok(open) => {
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_ok()
            {
                tunnel(gw, cx, client, open, BytesMut::new()).await;
            }
        }
        Err(resp) => write_and_close(client, &response_bytes(resp).await).await,
    }
    None
}

/// `(host, port, head length)` of a head the fast path serves: complete,
/// `CONNECT` with an authority-form target that [`authority`] accepts, within
/// `max_head_bytes`, and without `Content-Length` or `Transfer-Encoding`
/// (whose meaning on CONNECT is left to hyper).
fn fast_connect_head(buf: &[u8], max_head_bytes: usize) -> Option<(String, u16, usize)> {
    let head = classify::parse_http_head(buf).ok()??;
    if head.method != "CONNECT" || head.head_len > max_head_bytes || head.framed {
        return None;
    }
    let uri = head.target.parse::<Uri>().ok()?;
    if uri.scheme().is_some() {
        return None;
    }
    let (host, port) = authority(&uri, None).ok()?;
    Some((host, port, head.head_len))
}

/// `resp` serialised for [`write_and_close`] (answers outside hyper).
async fn response_bytes(resp: Response<Body>) -> Vec<u8> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    out
}

/// Writes a complete answer, closes the write side, and reads out what the
/// client still sends (up to 64 KiB), all within 5 s: closing with unread
/// bytes would reset the connection and could destroy the answer before
/// the client reads it.
async fn write_and_close(mut stream: TcpStream, answer: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Answers a connection that was not admitted, without parsing its request.
pub async fn refuse(stream: TcpStream, why: Refusal) {
    let (status, text) = match why {
        Refusal::ClientNotAllowed => (
            "403 Forbidden",
            "portcullis: this client address is not in [clients] allow\n",
        ),
        Refusal::Limit => (
            "503 Service Unavailable",
            "portcullis: connection limit reached, retry later\n",
        ),
    };
    let error = match why {
        Refusal::ClientNotAllowed => "http_request_denied",
        Refusal::Limit => "proxy_internal_response",
    };
    let resp = raw_response(status, error, why.as_str(), text);
    write_and_close(stream, resp.as_bytes()).await;
}

async fn handle(req: Request<Incoming>, cx: Arc<Conn>, gw: Arc<Gateway>) -> Response<Body> {
    // hyper's read buffer bounds memory; this enforces the configured head size.
    if head_len(&req) > gw.limits.max_head_bytes {
        return status_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Some("http_request_error"),
            "request head too large",
            format!(
                "portcullis: request head over {} bytes ([limits] max_head_bytes)\n",
                gw.limits.max_head_bytes
            ),
        );
    }
    if req.method() == Method::CONNECT {
        return connect(req, cx, gw).await;
    }
    if req.uri().scheme().is_none() {
        return status_response(
            StatusCode::BAD_REQUEST,
            Some("http_request_error"),
            "not a proxy request",
            "portcullis: this is a forward proxy, not a web server. Set HTTP_PROXY and HTTPS_PROXY \
             to http://<this host>:<port> and request the real URL.\n"
                .to_string(),
        );
    }
    forward(req, cx, gw).await
}

/// Decides, counts and logs; returns the decision.
fn decide(gw: &Gateway, cx: &Conn, via: Via, host: &str, port: u16) -> Decision {
    let d = cx.policy.decide(&Dest {
        target: Target::parse(host),
        port,
        proto: Protocol::Tcp,
    });
    gw.count_decision(cx, via, &d, host, port);
    if d.verdict != Verdict::Allow {
        log_denial(cx, via, host, port, &d);
    }
    d
}

async fn connect(req: Request<Incoming>, cx: Arc<Conn>, gw: Arc<Gateway>) -> Response<Body> {
    let mut resp = connect_inner(req, cx, gw).await;
    if resp.status() != StatusCode::OK {
        // The client may already be sending tunnel bytes: never parse them as a request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn connect_inner(req: Request<Incoming>, cx: Arc<Conn>, gw: Arc<Gateway>) -> Response<Body> {
    let (raw_host, port) = match authority(req.uri(), None) {
        Ok(x) => x,
        Err(msg) => return bad_request(msg),
    };
    let open = match open(&cx, &gw, &raw_host, port).await {
        Ok(open) => open,
        Err(resp) => return resp,
    };
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(err) => {
                tracing::debug!(client = %cx.peer, error = %err, "CONNECT upgrade failed");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            tracing::error!("CONNECT upgrade is not a TcpStream: this is a bug");
            return;
        };
        // Copy what hyper read past the CONNECT head, and let go of its read
        // buffer (a slice of it would pin the whole buffer for the tunnel's life).
        let prefix = BytesMut::from(&parts.read_buf[..]);
        drop(parts.read_buf);
        tunnel(&gw, &cx, parts.io.into_inner(), open, prefix).await;
    });
    Response::new(full(Bytes::new()))
}

/// An allowed CONNECT whose upstream is connected.
struct Open {
    host: String,
    port: u16,
    decision: Decision,
    upstream: TcpStream,
    addr: std::net::SocketAddr,
}

/// Decides a CONNECT to `raw_host:port` and dials it; `Err` is the answer
/// to send instead of `200` (denied, or the upstream failed), already
/// counted and logged.
async fn open(cx: &Conn, gw: &Gateway, raw_host: &str, port: u16) -> Result<Open, Response<Body>> {
    let host = canonical_host(raw_host);
    let target = Target::parse(&host);
    let what = || format!("CONNECT {raw_host}:{port}");
    let d = decide(gw, cx, Via::Connect, &host, port);
    if d.verdict == Verdict::Deny {
        AccessLog::new(cx, "CONNECT", &host, port, Some(&d), "denied").emit();
        return Err(denied(cx, &what(), &d, matches!(target, Target::Ip(_))));
    }
    match gw
        .upstream
        .connect(&cx.policy, target, port, &gw.metrics)
        .await
    {
        Ok((upstream, addr)) => Ok(Open {
            host,
            port,
            decision: d,
            upstream,
            addr,
        }),
        Err(err) => {
            gw.metrics
                .upstream_errors
                .with_label_values(&[err.as_str()])
                .inc();
            AccessLog::new(cx, "CONNECT", &host, port, Some(&d), err.as_str()).emit();
            Err(upstream_failed(&what(), &err))
        }
    }
}

/// Runs an answered CONNECT's tunnel: the SNI check, then the relay and its
/// log line. `prefix` is what was already read from the client.
async fn tunnel(gw: &Gateway, cx: &Conn, mut client: TcpStream, open: Open, mut prefix: BytesMut) {
    let Open {
        host,
        port,
        decision,
        upstream,
        addr,
    } = open;
    let mut log = AccessLog::new(cx, "CONNECT", &host, port, Some(&decision), "");
    log.upstream = Some(addr);
    if let Some(mismatch) =
        check_sni(gw, cx, &mut client, &upstream, &mut prefix, &host, &mut log).await
    {
        log.close = mismatch;
        log.emit();
        return;
    }
    super::relay_and_log(gw, &client, &upstream, prefix, log).await;
}

/// Reads the tunnel's first client bytes when the client speaks first, and
/// cuts the tunnel when a ClientHello names another host. Returns the close
/// reason when cut.
async fn check_sni(
    gw: &Gateway,
    cx: &Conn,
    client: &mut TcpStream,
    upstream: &TcpStream,
    prefix: &mut BytesMut,
    host: &str,
    log: &mut AccessLog<'_>,
) -> Option<&'static str> {
    if !cx.policy.require_matching_sni() || matches!(Target::parse(host), Target::Ip(_)) {
        return None;
    }
    if prefix.is_empty() {
        // Server-speaks-first protocols (SSH, SMTP) must not wait for a hello.
        tokio::select! {
            r = client.readable() => if r.is_err() { return None },
            _ = upstream.readable() => return None,
        }
    }
    let timeout = Duration::from_millis(gw.limits.sniff_timeout_ms);
    let classified =
        match classify::read_classified(client, prefix, gw.limits.sniff_max_bytes, timeout).await {
            Ok(c) => c,
            Err(_) => return Some("client_error"),
        };
    let Classified::Tls { sni, ech } = classified else {
        return None;
    };
    log.ech = ech;
    let sni = sni.as_deref()?;
    if host::normalize(sni).ok().as_deref() == Some(host) {
        return None;
    }
    gw.metrics
        .tls_name_mismatch
        .with_label_values(&["connect_sni"])
        .inc();
    tracing::warn!(
        target: "portcullis::deny",
        client = %cx.peer,
        host,
        sni,
        "TLS SNI names another host than CONNECT (domain fronting?): tunnel cut"
    );
    let _ = client.write_all(&classify::TLS_ACCESS_DENIED_ALERT).await;
    Some("sni_mismatch")
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus those named in Connection.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    } else {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn add_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, HeaderValue::from_static(VIA));
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

async fn forward(mut req: Request<Incoming>, cx: Arc<Conn>, gw: Arc<Gateway>) -> Response<Body> {
    if req.uri().scheme_str() != Some("http") {
        return bad_request(
            "only http:// URLs are forwarded; https goes through CONNECT (set HTTPS_PROXY)",
        );
    }
    let (raw_host, port) = match authority(req.uri(), Some(80)) {
        Ok(x) => x,
        Err(msg) => return bad_request(msg),
    };
    let host = canonical_host(&raw_host);
    let method = req.method().clone();
    // Only answers other than the upstream's need it: made on demand.
    let uri = req.uri().clone();
    let what = || format!("{method} {uri}");
    // Names must agree: one Host, naming the URI's host and port.
    let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return bad_request("more than one Host header");
    }
    if let Some(h) = hosts.first() {
        // Nearly always the Host header is the URI's authority as sent.
        let same_text = req
            .uri()
            .authority()
            .is_some_and(|a| a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()));
        let agrees = same_text
            || h.to_str()
                .ok()
                .and_then(|h| format!("http://{h}/").parse::<Uri>().ok())
                .and_then(|u| authority(&u, Some(80)).ok())
                .is_some_and(|(hh, hp)| canonical_host(&hh) == host && hp == port);
        if !agrees {
            gw.metrics
                .tls_name_mismatch
                .with_label_values(&["host_uri"])
                .inc();
            return status_response(
                StatusCode::FORBIDDEN,
                Some("http_request_denied"),
                "host_mismatch",
                format!(
                    "portcullis: denied {} — the Host header names another host than the URL\n",
                    what()
                ),
            );
        }
    }
    let target = Target::parse(&host);
    let d = decide(&gw, &cx, Via::Http, &host, port);
    if d.verdict == Verdict::Deny {
        AccessLog::new(&cx, method.as_str(), &host, port, Some(&d), "denied").emit();
        return denied(&cx, &what(), &d, matches!(target, Target::Ip(_)));
    }

    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    add_via(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let client = gw
        .http_client
        .get_or_init(|| pool::client(Arc::downgrade(&gw)));
    let mut resp = match client.request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(err) => {
            let (token, resp) = match pool::connect_error(&err) {
                Some(ce) => (ce.as_str(), upstream_failed(&what(), ce)),
                None => (
                    "http_protocol_error",
                    status_response(
                        StatusCode::BAD_GATEWAY,
                        Some("http_protocol_error"),
                        "upstream response",
                        format!(
                            "portcullis: {} failed — upstream answered badly: {err}\n",
                            what()
                        ),
                    ),
                ),
            };
            gw.metrics.upstream_errors.with_label_values(&[token]).inc();
            AccessLog::new(&cx, method.as_str(), &host, port, Some(&d), token).emit();
            return resp;
        }
    };
    let mut log = AccessLog::new(&cx, method.as_str(), &host, port, Some(&d), "");
    log.upstream = resp.extensions().get::<pool::UpstreamAddr>().map(|a| a.0);
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (gw2, cx2) = (gw.clone(), cx.clone());
            tokio::spawn(async move {
                let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
                    return;
                };
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                let copied = tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut c, &mut u) => r.unwrap_or((0, 0)),
                    () = gw2.shutdown.cutting() => (0, 0),
                };
                gw2.counters().upload.inc_by(copied.0);
                gw2.counters().download.inc_by(copied.1);
                let mut log = AccessLog::new(&cx2, "UPGRADE", "", 0, None, "upgrade_closed");
                log.upload = copied.0;
                log.download = copied.1;
                log.emit();
            });
        }
        let (mut parts, body) = resp.into_parts();
        add_via(&mut parts.headers);
        log.close = "101";
        log.emit();
        return Response::from_parts(parts, body.boxed());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    add_via(&mut parts.headers);
    log.close = parts.status.as_str();
    log.emit();
    Response::from_parts(parts, body.boxed())
}

#[cfg(test)]
mod tests {
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
        assert_eq!(canonical_host("[::1]"), "::1");
        assert_eq!(canonical_host("PyPI.org."), "pypi.org");
    }

    #[test]
    fn only_whole_plain_connect_heads_take_the_fast_path() {
        let fast = |head: &str| fast_connect_head(head.as_bytes(), 65536);
        let h = "CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n";
        assert_eq!(fast(h), Some(("pypi.org".into(), 443, h.len())));
        // Bytes after the head (a pipelined ClientHello) are not the head's.
        assert_eq!(
            fast(&format!("{h}\x16\x03\x01")),
            Some(("pypi.org".into(), 443, h.len()))
        );
        let v6 = "CONNECT [::1]:8443 HTTP/1.0\r\n\r\n";
        assert_eq!(fast(v6), Some(("[::1]".into(), 8443, v6.len())));
        for (what, head) in [
            ("partial head", "CONNECT pypi.org:443 HTTP/1.1\r\nHost: py"),
            (
                "not CONNECT",
                "GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n",
            ),
            ("no port", "CONNECT pypi.org HTTP/1.1\r\n\r\n"),
            ("port 0", "CONNECT pypi.org:0 HTTP/1.1\r\n\r\n"),
            ("userinfo", "CONNECT u:p@pypi.org:443 HTTP/1.1\r\n\r\n"),
            (
                "absolute URI",
                "CONNECT http://pypi.org:443/ HTTP/1.1\r\n\r\n",
            ),
            (
                "Content-Length",
                "CONNECT pypi.org:443 HTTP/1.1\r\ncontent-LENGTH: 5\r\n\r\n",
            ),
            (
                "Transfer-Encoding",
                "CONNECT pypi.org:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            ),
            (
                "two Hosts",
                "CONNECT a.org:443 HTTP/1.1\r\nHost: a.org\r\nHost: b.org\r\n\r\n",
            ),
            ("HTTP/2 line", "CONNECT pypi.org:443 HTTP/2.0\r\n\r\n"),
            ("TLS record", "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03"),
        ] {
            assert_eq!(fast(head), None, "{what} must go to hyper");
        }
        // Over max_head_bytes: hyper answers 431.
        assert_eq!(fast_connect_head(h.as_bytes(), h.len() - 1), None);
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }
}
