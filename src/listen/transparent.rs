//! Transparent listener: connections the kernel redirected here (nftables REDIRECT).
//!
//! In: an admitted client connection with no proxy protocol at all. Out: a
//! decision from what the connection itself says, then a tunnel or a refusal.
//! The original destination comes from `SO_ORIGINAL_DST`; the first client
//! bytes (bounded in size and time) are classified: a TLS ClientHello is
//! decided on its SNI, an HTTP/1 request on its Host, anything else (or a
//! ClientHello without SNI) on the original address and port.
//!
//! The original destination is not trusted for a name-based decision:
//! `upstream = "resolve"` (default) dials a fresh resolution of the allowed
//! name, so a forged SNI cannot reach another address; `verify` dials the
//! original address only when it is among the name's addresses; `original`
//! dials it as is (spoofable; for split-horizon DNS you trust). Which of
//! these applies is a [`DialPlan`]; `upstream` carries it out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::http_relay::Expect;
use super::respond::{Refusal, Speech};
use super::{AccessLog, Close, Conn, Ends, Judge, relay};
use crate::classify::{self, Classified, OpaqueReason};
use crate::config::UpstreamMode;
use crate::gateway::Gateway;
use crate::metrics::{NameMismatch, Via};
use crate::policy::{Decision, Reason, Target, Verdict, host};
use crate::upstream::{ConnectError, DialPlan};

/// The destination the client meant, before REDIRECT rewrote it.
///
/// # Errors
/// When the socket carries no original destination (not redirected).
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// What the connection's first bytes say about where it is going.
struct Heard {
    via: Via,
    /// Name from SNI or Host (normalised), if any.
    name: Option<String>,
    speech: Speech,
    ech: bool,
    /// The request line as a proxy would show it (`GET http://host/path`).
    request: Option<String>,
}

fn heard(classified: &Classified) -> Heard {
    let nameless = |speech| Heard {
        via: Via::Address,
        name: None,
        speech,
        ech: false,
        request: None,
    };
    match classified {
        Classified::Tls { sni, ech } => Heard {
            via: if sni.is_some() {
                Via::Sni
            } else {
                Via::Address
            },
            name: sni.as_deref().map(host::normalized_or_kept),
            speech: Speech::Tls,
            ech: *ech,
            request: None,
        },
        Classified::Http {
            host: Some(h),
            method,
            target,
        } => Heard {
            via: Via::Host,
            name: Some(host::normalized_or_kept(host_without_port(h))),
            speech: Speech::Http,
            ech: false,
            request: Some(format!("{method} http://{h}{target}")),
        },
        Classified::Http { method, target, .. } => Heard {
            request: Some(format!("{method} {target}")),
            ..nameless(Speech::Http)
        },
        Classified::Opaque(_) => nameless(Speech::Opaque),
    }
}

/// A Host header's host: the decision uses the original port, so a
/// `:port` suffix is dropped (IPv6 literals keep their colons).
fn host_without_port(h: &str) -> &str {
    let bare = match h.rsplit_once(':') {
        Some((name, port))
            if (!name.contains(':') || name.ends_with(']'))
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            name
        }
        _ => h,
    };
    bare.trim_start_matches('[').trim_end_matches(']')
}

/// Serves one redirected connection.
pub async fn serve(mut client: TcpStream, conn: Arc<Conn>, gw: Arc<Gateway>) {
    let orig = match original_dst(&client) {
        Ok(a) => a,
        Err(err) => {
            tracing::warn!(client = %conn.peer, error = %err, "no original destination: not redirected by nftables");
            return;
        }
    };
    let local = client.local_addr().ok();
    if Some(orig) == local || gw.own_addrs.contains(&orig) {
        tracing::warn!(client = %conn.peer, dest = %orig, "connection to the gateway itself refused (loop)");
        return;
    }
    let mut prefix = BytesMut::new();
    let classified = match classify::read_classified(
        &mut client,
        &mut prefix,
        gw.limits.sniff_max_bytes,
        Duration::from_millis(gw.limits.sniff_timeout_ms),
    )
    .await
    {
        Ok(c) => c,
        Err(err) => {
            tracing::debug!(client = %conn.peer, error = %err, "client failed before its first bytes");
            return;
        }
    };
    let heard = heard(&classified);
    if let Classified::Opaque(why) = classified {
        match why {
            // A client that left before saying anything: nothing to decide.
            OpaqueReason::Eof if prefix.is_empty() => return,
            // Unnamed protocols, and silent clients of server-speaks-first
            // ones, are decided by address below; but a request line the
            // classifier does not take (leading CRLFs, a lower-case or long
            // method) is HTTP to a lenient server, and its Host would go
            // unchecked: refused.
            OpaqueReason::NotTlsOrHttp => {
                let limits = (gw.limits.sniff_max_bytes, gw.limits.sniff_timeout_ms);
                if http_in_disguise(&mut client, &mut prefix, limits).await {
                    let why = OpaqueReason::MalformedHttp;
                    return unreadable(&mut client, &conn, &gw, orig, &prefix, why).await;
                }
            }
            OpaqueReason::Timeout if prefix.is_empty() => {}
            // It started as TLS or HTTP but never named a host (stalled,
            // oversized, malformed): falling back to the address would let a
            // slow client past name rules, so it is refused.
            _ => return unreadable(&mut client, &conn, &gw, orig, &prefix, why).await,
        }
    }
    decide_and_relay(client, &conn, &gw, orig, heard, prefix).await;
}

/// Whether the first line is `<token> <target> HTTP/1.x`, after any empty
/// lines (RFC 9112 §2.2 lets servers skip them). Reads on, bounded in size
/// and time, while the bytes could still be such a line; bytes that could
/// still become one when the bound is reached count as one (a slow or
/// oversized disguise must not fall through to the address decision).
async fn http_in_disguise(
    client: &mut TcpStream,
    prefix: &mut BytesMut,
    (max, timeout_ms): (usize, u64),
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        match request_line(prefix) {
            Some(answer) => return answer,
            None if prefix.len() >= max => return true,
            None => {}
        }
        prefix.reserve(1024);
        match tokio::time::timeout_at(deadline, client.read_buf(prefix)).await {
            Ok(Ok(1..)) => {}
            // The client left: nothing will be relayed anyway.
            Ok(_) => return false,
            // Still undecided at the deadline.
            Err(_) => return true,
        }
    }
}

/// `Some(true)`: a request line; `Some(false)`: cannot become one; `None`:
/// not decided yet.
fn request_line(buf: &[u8]) -> Option<bool> {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let line = &buf[start..];
    // RFC 9110 §5.6.2 token characters, up to the first space.
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let method_end = line.iter().position(|&b| !tchar(b));
    match method_end {
        None => None,
        Some(0) => Some(false),
        Some(i) if line[i] != b' ' => Some(false),
        Some(i) => {
            let eol = line.iter().position(|&b| b == b'\n')?;
            let rest = &line[i + 1..eol];
            let version = rest.rsplit(|&b| b == b' ').next().unwrap_or(b"");
            Some(version.len() >= 5 && version[..5].eq_ignore_ascii_case(b"HTTP/"))
        }
    }
}

/// Refuses a connection whose first bytes started a protocol but never named a host.
async fn unreadable(
    client: &mut TcpStream,
    conn: &Conn,
    gw: &Gateway,
    orig: SocketAddr,
    prefix: &[u8],
    why: OpaqueReason,
) {
    // Answered in the protocol it started: a TLS alert, or a 403 to a
    // request head that was malformed (two Hosts, a bad version, ...).
    let speech = match why {
        _ if prefix.first() == Some(&0x16) => Speech::Tls,
        OpaqueReason::MalformedHttp
        | OpaqueReason::DuplicateHost
        | OpaqueReason::UnsupportedHttpVersion => Speech::Http,
        _ => Speech::Opaque,
    };
    let d = Decision {
        verdict: Verdict::Deny,
        rule: None,
        reason: Reason::MalformedHost,
    };
    let ip_text = orig.ip().to_string();
    let group = conn.policy.client_group(conn.client);
    gw.count_decision(
        &conn.client_subnet,
        group,
        Via::Address,
        &d,
        &ip_text,
        orig.port(),
    );
    let close = Close::Unreadable(why);
    AccessLog::new(
        conn,
        speech.as_str(),
        &ip_text,
        orig.port(),
        Some(&d),
        close,
    )
    .emit();
    let refusal = Refusal::Denied {
        policy: &conn.policy,
        decision: &d,
        ip_literal: true,
    };
    speech.answer(client, &refusal, "").await;
}

/// Decides on the name heard (or the original address), dials per
/// `[policy] upstream`, and relays: HTTP request by request, anything else
/// as bytes.
async fn decide_and_relay(
    mut client: TcpStream,
    conn: &Arc<Conn>,
    gw: &Arc<Gateway>,
    orig: SocketAddr,
    heard: Heard,
    prefix: BytesMut,
) {
    let port = orig.port();
    let judge = Judge {
        gw,
        conn,
        policy: &conn.policy,
    };
    // No name heard: by address, or as a name the DNS listener answered.
    let (d, shown) = match heard.name.as_deref() {
        Some(name) => (judge.decide(heard.via, name, port), name.to_string()),
        None => {
            let (d, learned) = judge.decide_address(heard.via, orig.ip(), port);
            (d, learned.unwrap_or_else(|| orig.ip().to_string()))
        }
    };
    let shown_host = shown.as_str();
    let what = heard
        .request
        .clone()
        .unwrap_or_else(|| format!("{} {shown_host}:{port}", heard.speech.as_str()));
    let method = heard.speech.as_str();
    let mut log = AccessLog::new(conn, method, shown_host, port, Some(&d), Close::Unset);
    log.ech = heard.ech;
    if d.verdict == Verdict::Deny {
        let refusal = Refusal::Denied {
            policy: &conn.policy,
            decision: &d,
            ip_literal: heard.name.is_none(),
        };
        heard.speech.answer(&mut client, &refusal, &what).await;
        log.close = Close::Denied;
        log.emit();
        return;
    }
    let target = heard
        .name
        .as_deref()
        .map_or(Target::Ip(orig.ip()), Target::parse);
    let plan = dial_plan(conn.policy.upstream(), &heard, target, orig);
    let dialled = gw
        .upstream
        .connect(&conn.policy, Some(conn.client), plan, port, &gw.metrics)
        .await;
    match dialled {
        Ok((upstream, addr)) => {
            log.upstream = Some(addr);
            // HTTP: every request is decided, not just the first.
            let http = (heard.speech == Speech::Http).then(|| Expect {
                host: heard.name.clone(),
                port,
                decided: (d, conn.policy.generation()),
            });
            let ends = Ends {
                client,
                upstream,
                prefix,
            };
            relay(gw, conn, ends, http, log).await;
        }
        Err(err) => {
            count_dial_error(gw, &heard, &err);
            let refusal = Refusal::Upstream(&err);
            log.close = refusal.close();
            // The gateway's own refusals are answered; a destination that
            // does not answer (refused, timeout, unreachable) is passed on
            // as a close, as the client would have seen without a gateway.
            if err.is_refusal() {
                heard.speech.answer(&mut client, &refusal, &what).await;
            }
            log.emit();
        }
    }
}

/// Which addresses to dial, per `[policy] upstream`. A connection decided
/// on its address is dialled there, after the same address check.
fn dial_plan<'a>(
    mode: UpstreamMode,
    heard: &'a Heard,
    target: Target<'a>,
    orig: SocketAddr,
) -> DialPlan<'a> {
    match (&heard.name, mode) {
        (None, _) | (Some(_), UpstreamMode::Resolve) => DialPlan::Target(target),
        (Some(name), UpstreamMode::Verify) => DialPlan::Verify {
            name,
            original: orig.ip(),
        },
        (Some(_), UpstreamMode::Original) => DialPlan::Original(orig.ip()),
    }
}

/// A forged name under `verify` counts as a name mismatch; everything else
/// as an upstream error.
fn count_dial_error(gw: &Gateway, heard: &Heard, err: &ConnectError) {
    match err.label() {
        Some(label) => gw.count_upstream_error(label),
        None if heard.via == Via::Host => gw.count_name_mismatch(NameMismatch::HostDestination),
        None => gw.count_name_mismatch(NameMismatch::SniDestination),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_the_classifier_leaves_are_still_seen() {
        for line in [
            &b"\r\nGET / HTTP/1.1\r\nHost: x\r\n"[..],
            b"get / HTTP/1.1\n",
            b"VERYLONGMETHODNAMEOVERSIXTEEN /x http/1.0\r\n",
        ] {
            assert_eq!(
                request_line(line),
                Some(true),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        for line in [
            &b"\0\0\0\x85\xffSMB"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"GET / FTP\r\n",
        ] {
            assert_eq!(
                request_line(line),
                Some(false),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(request_line(b"\r\n\r\nGE"), None);
        assert_eq!(request_line(b"GET /path-without-end"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disguise_still_undecided_at_the_deadline_is_refused() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        #[allow(clippy::disallowed_methods)] // a loopback pair for the test
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        // Empty lines, then nothing: could still become a request line.
        c.write_all(b"\r\n\r\nGE").await.unwrap();
        let mut prefix = BytesMut::new();
        assert!(http_in_disguise(&mut s, &mut prefix, (16_384, 2_000)).await);
        // Not a request line: decided at once, whatever follows.
        c.write_all(b"T\0\0").await.unwrap();
        let mut prefix = BytesMut::from(&b"\x00\x01"[..]);
        assert!(!http_in_disguise(&mut s, &mut prefix, (16_384, 2_000)).await);
        // The client leaves undecided: nothing to relay, not a refusal.
        drop(c);
        let mut prefix = BytesMut::from(&b"GE"[..]);
        let mut rest = [0u8; 8];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut rest).await;
        assert!(!http_in_disguise(&mut s, &mut prefix, (16_384, 2_000)).await);
    }

    #[test]
    fn host_header_forms() {
        let http = |h: &str| Classified::Http {
            host: Some(h.to_string()),
            method: "GET".into(),
            target: "/".into(),
        };
        assert_eq!(
            heard(&http("Example.com:8080")).name.as_deref(),
            Some("example.com")
        );
        assert_eq!(
            heard(&http("example.com")).name.as_deref(),
            Some("example.com")
        );
        assert_eq!(
            heard(&http("[2001:db8::1]:80")).name.as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            heard(&http("host:notaport")).name.as_deref(),
            Some("host:notaport")
        );
        let tls = Classified::Tls {
            sni: Some("PyPI.org".into()),
            ech: true,
        };
        let h = heard(&tls);
        assert_eq!(
            (h.name.as_deref(), h.via, h.ech, h.speech),
            (Some("pypi.org"), Via::Sni, true, Speech::Tls)
        );
    }
}
