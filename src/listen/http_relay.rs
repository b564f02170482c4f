//! HTTP relay: plain HTTP/1 on an allowed connection, every request checked before it goes upstream.
//!
//! In: a client connection whose first bytes were an HTTP request (inside
//! an allowed CONNECT tunnel, or a transparent connection decided on its
//! Host), the bytes already read, and the one upstream connection it was
//! allowed to reach. Out: the requests relayed one by one over that
//! upstream. Each request must name the host the connection was decided
//! for (its absolute URI's authority, else its Host; a port, when given,
//! must be the connection's), and is decided again by the policy in force
//! when it arrives. A request that names another host, or that the policy
//! now denies, is answered 403 and ends the connection: nothing of it
//! reaches the upstream. Bodies are counted and cut at the grace period;
//! upgrades (WebSocket) are relayed with the tunnels' idle timer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_http1;
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::authority::{authority, authority_text};
use super::body::{Metered, NO_ANSWER, within_idle};
use super::respond::{Body, Refusal};
use super::stall::{Stall, Stalled};
use super::{AccessLog, Close, Conn, Judge};
use crate::config::Protocol;
use crate::gateway::Gateway;
use crate::metrics::Via;
use crate::policy::{Decision, Dest, Policy, Reason, Target, Verdict, host};
use crate::tunnel::{CloseReason, Counters, relay_io};

/// What every request on the connection must name, and what was decided for it.
#[derive(Debug, Clone)]
pub struct Expect {
    /// The host decided for the connection (normalised), or `None` when it
    /// was decided on its address (a request without a name).
    pub host: Option<String>,
    /// The connection's port.
    pub port: u16,
    /// The connection's decision and the generation of the policy that
    /// made it: a request decided the same way under the same policy is
    /// not counted again.
    pub decided: (Decision, u64),
}

/// Serves the client's requests over `upstream` until either side closes,
/// a request is refused, or the grace period ends; then writes `log`.
pub async fn serve(
    client: TcpStream,
    prefix: BytesMut,
    upstream: TcpStream,
    expect: Expect,
    conn: Arc<Conn>,
    gw: Arc<Gateway>,
    mut log: AccessLog<'_>,
) {
    let (sender, upstream_conn) = match client_http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(upstream))
        .await
    {
        Ok(x) => x,
        Err(err) => {
            tracing::debug!(error = %err, "upstream HTTP handshake failed");
            log.close = Close::Tunnel(CloseReason::UpstreamError);
            log.emit();
            return;
        }
    };
    tokio::spawn(async move {
        let _ = upstream_conn.with_upgrades().await;
    });
    let state = Arc::new(Relay {
        sender: Mutex::new(sender),
        expect,
        conn: conn.clone(),
        gw: gw.clone(),
        upload: Arc::new(AtomicU64::new(0)),
        download: Arc::new(AtomicU64::new(0)),
    });
    // Bytes are counted on the client's side of the wire, heads included,
    // as a tunnel counts them.
    let (upload, download) = (state.upload.clone(), state.download.clone());
    let rewind = Rewind {
        prefix,
        io: client,
        up: (gw.counters().upload.clone(), upload.clone()),
        down: (gw.counters().download.clone(), download.clone()),
    };
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(state.handle(req).await) }
    });
    let stall = Stall::new();
    let http = server_http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(gw.limits.head_timeout_ms))
        .max_buf_size(gw.limits.max_head_bytes.max(8192))
        .serve_connection(TokioIo::new(Stalled::new(rewind, stall.clone())), svc)
        .with_upgrades();
    tokio::pin!(http);
    let idle = Duration::from_millis(gw.limits.idle_timeout_ms);
    let close = tokio::select! {
        r = http.as_mut() => match r {
            Ok(()) => CloseReason::ClientClosed,
            Err(_) => CloseReason::ClientError,
        },
        () = stall.stuck_for(idle) => CloseReason::IdleTimeout,
        () = gw.shutdown.cutting() => CloseReason::Shutdown,
    };
    log.close = Close::Tunnel(close);
    log.upload = upload.load(Relaxed);
    log.download = download.load(Relaxed);
    log.emit();
}

/// The state every request on one connection shares.
struct Relay {
    sender: Mutex<client_http1::SendRequest<Body>>,
    expect: Expect,
    conn: Arc<Conn>,
    gw: Arc<Gateway>,
    /// Bytes client → gateway.
    upload: Arc<AtomicU64>,
    /// Bytes gateway → client.
    download: Arc<AtomicU64>,
}

impl Relay {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let policy = self.gw.policy.load_full();
        let what = format!("{} {}", req.method(), req.uri());
        if let Err(d) = self.check(&req, &policy) {
            let refusal = Refusal::Denied {
                policy: &policy,
                decision: &d,
                ip_literal: false,
            };
            return closing(refusal.response(&what));
        }
        // Only WebSocket is relayed after a 101: an upgrade to h2c (or any
        // protocol that carries requests) would carry requests nobody checks.
        let upgrade = websocket_upgrade(req.headers());
        if !upgrade {
            req.headers_mut().remove(header::UPGRADE);
            req.headers_mut().remove("http2-settings");
        }
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body = Metered::uncounted(body, self.gw.shutdown.cutting());
        let sent = {
            let mut sender = self.sender.lock().await;
            sender.send_request(Request::from_parts(parts, body.boxed()))
        };
        let idle = Duration::from_millis(self.gw.limits.idle_timeout_ms);
        let resp = match within_idle(sent, idle, &self.upload).await {
            Some(Ok(r)) => r,
            Some(Err(err)) => {
                let refusal = Refusal::UpstreamProtocol(&err);
                return closing(refusal.response(&what));
            }
            None => return closing(Refusal::UpstreamProtocol(&NO_ANSWER).response(&what)),
        };
        match client_upgrade {
            Some(c) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // This connection's bytes are counted as they pass `Rewind`.
                relay_upgrade(resp, c, &self.conn, &self.gw, false)
            }
            _ => {
                let (parts, body) = resp.into_parts();
                let body = Metered::uncounted(body, self.gw.shutdown.cutting()).with_idle(idle);
                Response::from_parts(parts, body.boxed())
            }
        }
    }

    /// The request names the connection's host (and port), and the policy
    /// in force still allows it; else the denial, counted and logged.
    fn check(&self, req: &Request<Incoming>, policy: &Policy) -> Result<(), Decision> {
        let port = self.expect.port;
        let named = request_name(req, port);
        let judge = Judge {
            gw: &self.gw,
            conn: &self.conn,
            policy,
        };
        let (host, d) = match (&named, &self.expect.host) {
            (Ok(Some(name)), Some(want)) if name == want => {
                let dest = Dest {
                    target: Target::parse(name),
                    port,
                    proto: Protocol::Tcp,
                };
                let d = policy.decide_for(&dest, judge.client());
                if (d, policy.generation()) != self.expect.decided {
                    judge.record(Via::Host, name, port, &d);
                }
                (name.clone(), d)
            }
            (Ok(None), None) => return Ok(()),
            (Ok(Some(name)), _) => (name.clone(), Decision::denied(Reason::HostMismatch)),
            (Ok(None), Some(want)) => (want.clone(), Decision::denied(Reason::HostMismatch)),
            (Err(()), _) => (String::new(), Decision::denied(Reason::HostMismatch)),
        };
        if d.reason == Reason::HostMismatch {
            judge.record(Via::Host, &host, port, &d);
        }
        if d.verdict != Verdict::Deny {
            return Ok(());
        }
        AccessLog::new(&self.conn, "HTTP", &host, port, Some(&d), Close::Denied)
            .under(policy)
            .emit();
        Err(d)
    }
}

/// The name a request gives (absolute URI authority, else Host), normalised;
/// `Ok(None)` without either; `Err` when malformed, two Hosts, or a port
/// other than the connection's.
fn request_name(req: &Request<Incoming>, port: u16) -> Result<Option<String>, ()> {
    let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(());
    }
    let from_uri = match req.uri().authority() {
        // An absolute URI without a port means its scheme's port.
        Some(_) => {
            let default = match req.uri().scheme_str() {
                Some(s) if s.eq_ignore_ascii_case("https") => 443,
                Some(_) => 80,
                None => port,
            };
            Some(authority(req.uri(), Some(default)).map_err(|_| ())?)
        }
        None => None,
    };
    let from_host = match hosts.first() {
        Some(h) => {
            let text = h.to_str().map_err(|_| ())?;
            Some(authority_text(text, Some(port)).map_err(|_| ())?)
        }
        None => None,
    };
    let (host, p) = match (from_uri, from_host) {
        (Some(u), Some(h))
            if host::normalized_or_kept(&u.0) != host::normalized_or_kept(&h.0) || u.1 != h.1 =>
        {
            return Err(());
        }
        (Some(u), _) => u,
        (None, Some(h)) => h,
        (None, None) => return Ok(None),
    };
    if p != port {
        return Err(());
    }
    Ok(Some(host::normalized_or_kept(&host)))
}

/// The request asks to upgrade to WebSocket and nothing else (`Upgrade`
/// tokens compared without case or version).
pub fn websocket_upgrade(headers: &http::HeaderMap) -> bool {
    let mut tokens = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(|t| t.trim().split('/').next().unwrap_or(""))
        .peekable();
    tokens.peek().is_some() && tokens.all(|t| t.eq_ignore_ascii_case("websocket"))
}

/// The response, with the connection closed after it.
fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Answers `101` and, once both sides have upgraded, relays the two
/// connections in a task of their own, with the tunnels' idle timer, until
/// either closes or the grace period ends. `count`: add the bytes to
/// `portcullis_bytes_total` (false when the client's stream counts them).
pub fn relay_upgrade(
    mut resp: Response<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    conn: &Arc<Conn>,
    gw: &Arc<Gateway>,
    count: bool,
) -> Response<Body> {
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let (gw, conn) = (gw.clone(), conn.clone());
    tokio::spawn(async move {
        let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) else {
            return;
        };
        let idle = Duration::from_millis(gw.limits.idle_timeout_ms);
        let uncounted;
        let counters = if count {
            gw.counters()
        } else {
            uncounted = Counters::detached();
            &uncounted
        };
        let (c, u) = (TokioIo::new(c), TokioIo::new(u));
        let stats = relay_io(c, u, idle, counters, gw.shutdown.cutting()).await;
        let mut log = AccessLog::new(&conn, "UPGRADE", "", 0, None, Close::UpgradeClosed);
        if stats.close != CloseReason::ClientClosed {
            log.close = Close::Tunnel(stats.close);
        }
        log.upload = stats.upload;
        log.download = stats.download;
        log.emit();
    });
    let (mut parts, body) = resp.into_parts();
    parts
        .headers
        .append(header::VIA, HeaderValue::from_static("1.1 portcullis"));
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

/// The client's stream: yields `prefix` before reading from `io`, and
/// counts bytes each way.
struct Rewind {
    prefix: BytesMut,
    io: TcpStream,
    up: (IntCounter, Arc<AtomicU64>),
    down: (IntCounter, Arc<AtomicU64>),
}

fn count((counter, total): &(IntCounter, Arc<AtomicU64>), n: usize) {
    counter.inc_by(n as u64);
    total.fetch_add(n as u64, Relaxed);
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            count(&self.up, n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        count(&self.up, buf.filled().len() - before);
        r
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            count(&self.down, n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
