//! CONNECT: decide `host:port`, dial it, answer `200`, then check the tunnel's first bytes and relay.
//!
//! In: a CONNECT head, either peeked whole from a fresh connection (the fast
//! path, served in the connection's task without hyper) or parsed by hyper
//! (heads that arrive in pieces, or CONNECT after another request). Out: a
//! refusal through `respond`, or a tunnel whose access line is written when
//! it closes. Names must agree: a TLS ClientHello in the tunnel whose SNI
//! names another host than the CONNECT authority is cut (domain fronting).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::classify;
use crate::gateway::Gateway;
use crate::listen::authority::authority;
use crate::listen::http_relay::Expect;
use crate::listen::inspect::{self, Carried, Tunnel};
use crate::listen::respond::{Body, Refusal, full, write_and_close};
use crate::listen::stall::Stalled;
use crate::listen::{AccessLog, Close, Conn, Ends, Judge, relay};
use crate::metrics::{NameMismatch, Via};
use crate::policy::{Decision, Policy, Reason, Target, Verdict, host};
use crate::upstream::{ConnectError, DialPlan};

/// How long a refused CONNECT's answer may take to be written and read out.
const ANSWER_LINGER: Duration = Duration::from_secs(5);

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
/// have.
pub(super) async fn fast(
    stream: TcpStream,
    conn: &Arc<Conn>,
    gw: &Arc<Gateway>,
) -> Option<TcpStream> {
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
    let Some((raw_host, port, head_len)) = fast_head(&peeked[..n], gw.limits.max_head_bytes) else {
        return Some(stream);
    };
    let mut client = stream;
    // The head is in the socket buffer: one read. What follows it (a
    // pipelined ClientHello) stays there for the SNI check.
    if client.read_exact(&mut peeked[..head_len]).await.is_err() {
        return None;
    }
    drop(peeked);
    // Decided by the policy in force now, as hyper's path does: the head
    // may arrive up to `head_timeout_ms` after the accept-time snapshot.
    let Some(policy) = conn.policy_now(gw) else {
        write_and_close(client, &Refusal::ClientNotAllowed.raw(""), ANSWER_LINGER).await;
        return None;
    };
    match open(conn, gw, &policy, &raw_host, port).await {
        Ok(open) => {
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_ok()
            {
                tunnel(gw, conn, client, open, BytesMut::new()).await;
            }
        }
        Err(err) => {
            let what = format!("CONNECT {raw_host}:{port}");
            write_and_close(client, &err.refusal(&policy).raw(&what), ANSWER_LINGER).await;
        }
    }
    None
}

/// `(host, port, head length)` of a head the fast path serves: complete,
/// `CONNECT` with an authority-form target that [`authority`] accepts, within
/// `max_head_bytes`, and without `Content-Length` or `Transfer-Encoding`
/// (whose meaning on CONNECT is left to hyper).
fn fast_head(buf: &[u8], max_head_bytes: usize) -> Option<(String, u16, usize)> {
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

/// A CONNECT that hyper parsed: answered by hyper, tunnelled after its
/// upgrade; decided under `policy`, the policy in force when it arrived.
pub(super) async fn via_hyper(
    req: Request<Incoming>,
    conn: Arc<Conn>,
    gw: Arc<Gateway>,
    policy: Arc<Policy>,
) -> Response<Body> {
    let (raw_host, port) = match authority(req.uri(), None) {
        Ok(x) => x,
        Err(msg) => return refused(Refusal::BadRequest(msg).response("")),
    };
    let open = match open(&conn, &gw, &policy, &raw_host, port).await {
        Ok(open) => open,
        Err(err) => {
            let what = format!("CONNECT {raw_host}:{port}");
            return refused(err.refusal(&policy).response(&what));
        }
    };
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(err) => {
                tracing::debug!(client = %conn.peer, error = %err, "CONNECT upgrade failed");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<Stalled<TcpStream>>>() else {
            tracing::error!("CONNECT upgrade is not a TcpStream: this is a bug");
            return;
        };
        // Copy what hyper read past the CONNECT head, and let go of its read
        // buffer (a slice of it would pin the whole buffer for the tunnel's life).
        let prefix = BytesMut::from(&parts.read_buf[..]);
        drop(parts.read_buf);
        tunnel(&gw, &conn, parts.io.into_inner().into_inner(), open, prefix).await;
    });
    Response::new(full(Bytes::new()))
}

/// A refused CONNECT closes the connection: the client may already be
/// sending tunnel bytes, which must never be parsed as a request.
fn refused(mut resp: Response<Body>) -> Response<Body> {
    debug_assert_ne!(resp.status(), StatusCode::OK);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// An allowed CONNECT whose upstream is connected.
struct Open {
    /// The policy that allowed it; the tunnel keeps it for its life.
    policy: Arc<Policy>,
    host: String,
    port: u16,
    decision: Decision,
    upstream: TcpStream,
    addr: std::net::SocketAddr,
}

/// Why a CONNECT is answered with something other than `200`.
enum OpenError {
    /// The policy denied it (`ip_literal`: the authority was an address).
    Denied(Decision, bool),
    /// It was allowed, but no upstream connection was made.
    Upstream(ConnectError),
}

impl OpenError {
    fn refusal<'a>(&'a self, policy: &'a Policy) -> Refusal<'a> {
        match self {
            OpenError::Denied(decision, ip_literal) => Refusal::Denied {
                policy,
                decision,
                ip_literal: *ip_literal,
            },
            OpenError::Upstream(err) => Refusal::Upstream(err),
        }
    }
}

/// Decides a CONNECT to `raw_host:port` under `policy` and dials it. A
/// refusal is already counted and logged.
async fn open(
    conn: &Conn,
    gw: &Gateway,
    policy: &Arc<Policy>,
    raw_host: &str,
    port: u16,
) -> Result<Open, OpenError> {
    let host = host::normalized_or_kept(raw_host);
    let target = Target::parse(&host);
    let judge = Judge { gw, conn, policy };
    // An address: by address rules, or as a name the DNS listener answered
    // it for (the tunnel's TLS name is still checked against host rules).
    let d = match target {
        Target::Ip(ip) => judge.decide_address(Via::Connect, ip, port).0,
        Target::Name(_) => judge.decide(Via::Connect, &host, port),
    };
    if d.verdict == Verdict::Deny {
        AccessLog::new(conn, "CONNECT", &host, port, Some(&d), Close::Denied)
            .under(policy)
            .emit();
        return Err(OpenError::Denied(d, matches!(target, Target::Ip(_))));
    }
    let dialled = gw
        .upstream
        .connect(
            policy,
            Some(judge.client()),
            DialPlan::Target(target),
            port,
            &gw.metrics,
        )
        .await;
    match dialled {
        Ok((upstream, addr)) => Ok(Open {
            policy: policy.clone(),
            host,
            port,
            decision: d,
            upstream,
            addr,
        }),
        Err(err) => {
            if let Some(label) = err.label() {
                gw.count_upstream_error(label);
            }
            let close = Close::Upstream(err.as_str());
            AccessLog::new(conn, "CONNECT", &host, port, Some(&d), close)
                .under(policy)
                .emit();
            Err(OpenError::Upstream(err))
        }
    }
}

/// Runs an answered CONNECT's tunnel: its first bytes are checked against
/// the decision (`inspect`), then relayed as they are, served as HTTP
/// requests each checked (`http_relay`), or cut. `prefix` is what was
/// already read from the client.
async fn tunnel(
    gw: &Arc<Gateway>,
    conn: &Arc<Conn>,
    mut client: TcpStream,
    open: Open,
    mut prefix: BytesMut,
) {
    let Open {
        policy,
        host,
        port,
        decision,
        upstream,
        addr,
    } = open;
    let mut log =
        AccessLog::new(conn, "CONNECT", &host, port, Some(&decision), Close::Unset).under(&policy);
    log.upstream = Some(addr);
    let inspected = Tunnel {
        host: &host,
        port,
        decision: &decision,
        client: conn.client_under(&policy),
    };
    let (client_ref, ech) = (&mut client, &mut log.ech);
    let carried = inspect::first_bytes(
        gw,
        &policy,
        &inspected,
        client_ref,
        &upstream,
        &mut prefix,
        ech,
    )
    .await;
    let http = match carried {
        Carried::Relay => None,
        Carried::Http => Some(Expect {
            host: Some(host.clone()),
            port,
            decided: (decision, policy.generation()),
        }),
        Carried::Cut {
            reason,
            speech,
            sni,
        } => {
            let judge = Judge {
                gw,
                conn,
                policy: &policy,
            };
            let cut = cut(&judge, &inspected, reason, sni.as_deref());
            let refusal = Refusal::Denied {
                policy: &policy,
                decision: &cut,
                ip_literal: false,
            };
            speech.answer(&mut client, &refusal, "").await;
            log.decision = Some(&cut);
            log.close = Close::Denied;
            log.emit();
            return;
        }
        Carried::Ended(close) => {
            log.close = Close::Tunnel(close);
            log.emit();
            return;
        }
    };
    let ends = Ends {
        client,
        upstream,
        prefix,
    };
    relay(gw, conn, ends, http, log).await;
}

/// The denial for a tunnel cut on its first bytes, counted and logged.
fn cut(judge: &Judge<'_>, tunnel: &Tunnel<'_>, reason: Reason, sni: Option<&str>) -> Decision {
    let cut = Decision {
        verdict: Verdict::Deny,
        rule: tunnel.decision.rule,
        reason,
    };
    if reason == Reason::SniMismatch {
        judge.gw.count_name_mismatch(NameMismatch::ConnectSni);
        tracing::warn!(
            target: "portcullis::deny",
            client = %judge.conn.peer,
            host = tunnel.host,
            sni = sni.unwrap_or("-"),
            "TLS SNI names another host than CONNECT (domain fronting?): tunnel cut"
        );
    }
    judge.record(Via::Sni, tunnel.host, tunnel.port, &cut);
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_plain_connect_heads_take_the_fast_path() {
        let fast = |head: &str| fast_head(head.as_bytes(), 65536);
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
        assert_eq!(fast_head(h.as_bytes(), h.len() - 1), None);
    }
}
