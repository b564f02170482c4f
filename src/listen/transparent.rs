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
//! dials it as is (spoofable; for split-horizon DNS you trust).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{AccessLog, Conn, Gateway, Refusal, log_denial, raw_response};
use crate::classify::{self, Classified, OpaqueReason};
use crate::config::{Protocol, UpstreamMode};
use crate::metrics::Via;
use crate::policy::{Decision, Dest, Reason, Target, Verdict, host};

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

/// What was learnt from the first bytes.
struct Seen {
    via: Via,
    /// Name from SNI or Host (normalised), if any.
    name: Option<String>,
    method: &'static str,
    ech: bool,
    http: Option<String>,
}

fn seen(classified: &Classified) -> Seen {
    match classified {
        Classified::Tls {
            sni: Some(sni),
            ech,
        } => Seen {
            via: Via::Sni,
            name: Some(host::normalize(sni).unwrap_or_else(|_| sni.clone())),
            method: "TLS",
            ech: *ech,
            http: None,
        },
        Classified::Tls { sni: None, ech } => Seen {
            via: Via::Address,
            name: None,
            method: "TLS",
            ech: *ech,
            http: None,
        },
        Classified::Http {
            host: Some(h),
            method,
            target,
        } => {
            // Host may carry a port; the decision uses the original port.
            let bare = match h.rsplit_once(':') {
                Some((name, port)) if !name.contains(':') || name.ends_with(']') => {
                    if port.bytes().all(|b| b.is_ascii_digit()) {
                        name
                    } else {
                        h.as_str()
                    }
                }
                _ => h.as_str(),
            };
            let bare = bare.trim_start_matches('[').trim_end_matches(']');
            Seen {
                via: Via::Host,
                name: Some(host::normalize(bare).unwrap_or_else(|_| bare.to_string())),
                method: "HTTP",
                ech: false,
                http: Some(format!("{method} http://{h}{target}")),
            }
        }
        Classified::Http { method, target, .. } => Seen {
            via: Via::Address,
            name: None,
            method: "HTTP",
            ech: false,
            http: Some(format!("{method} {target}")),
        },
        Classified::Opaque(_) => Seen {
            via: Via::Address,
            name: None,
            method: "TCP",
            ech: false,
            http: None,
        },
    }
}

/// Refused before any byte is read: just close.
pub async fn refuse(stream: TcpStream, _why: Refusal) {
    drop(stream);
}

async fn deny(
    client: &mut TcpStream,
    seen: &Seen,
    what: &str,
    sentence: &str,
    token: &str,
    details: &str,
) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        match (seen.method, &seen.http) {
            ("TLS", _) => {
                let _ = client.write_all(&classify::TLS_ACCESS_DENIED_ALERT).await;
            }
            (_, Some(_)) => {
                let body = format!("portcullis: denied {what} — {sentence}\n");
                let _ = client
                    .write_all(raw_response("403 Forbidden", token, details, &body).as_bytes())
                    .await;
            }
            _ => {}
        }
        let _ = client.shutdown().await;
    })
    .await;
}

/// Serves one redirected connection.
pub async fn serve(mut client: TcpStream, cx: Arc<Conn>, gw: Arc<Gateway>) {
    let orig = match original_dst(&client) {
        Ok(a) => a,
        Err(err) => {
            tracing::warn!(client = %cx.peer, error = %err, "no original destination: not redirected by nftables");
            return;
        }
    };
    let local = client.local_addr().ok();
    if Some(orig) == local || gw.own_addrs.contains(&orig) {
        tracing::warn!(client = %cx.peer, dest = %orig, "connection to the gateway itself refused (loop)");
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
            tracing::debug!(client = %cx.peer, error = %err, "client failed before its first bytes");
            return;
        }
    };
    let mut seen = seen(&classified);
    if let Classified::Opaque(why) = &classified {
        match why {
            // A client that left before saying anything: nothing to decide.
            OpaqueReason::Eof if prefix.is_empty() => return,
            // Unnamed protocols, and silent clients of server-speaks-first
            // ones, are decided by address below.
            OpaqueReason::NotTlsOrHttp => {}
            OpaqueReason::Timeout if prefix.is_empty() => {}
            // It started as TLS or HTTP but never named a host (stalled,
            // oversized, malformed): falling back to the address would let a
            // slow client past name rules, so it is refused.
            _ => {
                if prefix.first() == Some(&0x16) {
                    seen.method = "TLS";
                }
                let d = Decision {
                    verdict: Verdict::Deny,
                    rule: None,
                    reason: Reason::MalformedHost,
                };
                let ip_text = orig.ip().to_string();
                gw.count_decision(&cx, seen.via, &d, &ip_text, orig.port());
                AccessLog::new(
                    &cx,
                    seen.method,
                    &ip_text,
                    orig.port(),
                    Some(&d),
                    why.as_str(),
                )
                .emit();
                deny(&mut client, &seen, "", "", "", "").await;
                return;
            }
        }
    }
    let ip_text = orig.ip().to_string();
    let shown_host = seen.name.as_deref().unwrap_or(&ip_text);
    let port = orig.port();
    let d = cx.policy.decide(&Dest {
        target: match &seen.name {
            Some(n) => Target::parse(n),
            None => Target::Ip(orig.ip()),
        },
        port,
        proto: Protocol::Tcp,
    });
    gw.count_decision(&cx, seen.via, &d, shown_host, port);
    let what = seen
        .http
        .clone()
        .unwrap_or_else(|| format!("{} {shown_host}:{port}", seen.method));
    let mut log = AccessLog::new(&cx, seen.method, shown_host, port, Some(&d), "");
    log.ech = seen.ech;
    if d.verdict == Verdict::Deny {
        log_denial(&cx, seen.via, shown_host, port, &d);
        let token = if seen.name.is_none() {
            "destination_ip_prohibited"
        } else {
            "http_request_denied"
        };
        deny(
            &mut client,
            &seen,
            &what,
            &cx.policy.explain(&d),
            token,
            d.reason.as_str(),
        )
        .await;
        log.close = "denied";
        log.emit();
        return;
    }
    let addrs = match dial_addresses(&gw, &cx, &seen, orig).await {
        Ok(a) => a,
        Err((close, sentence)) => {
            let token = if close == "sni_mismatch" {
                "http_request_denied"
            } else {
                close
            };
            deny(&mut client, &seen, &what, &sentence, token, close).await;
            log.close = close;
            log.emit();
            return;
        }
    };
    let (upstream, addr) = match gw.upstream.dial(&addrs, port, &gw.metrics).await {
        Ok(x) => x,
        Err(err) => {
            gw.metrics
                .upstream_errors
                .with_label_values(&[err.as_str()])
                .inc();
            log.close = err.as_str();
            log.emit();
            return;
        }
    };
    log.upstream = Some(addr);
    super::relay_and_log(&gw, &client, &upstream, prefix, log).await;
}

/// Which addresses to dial, per `[policy] upstream`. Errors carry a close
/// reason and a sentence for the client.
async fn dial_addresses(
    gw: &Gateway,
    cx: &Conn,
    seen: &Seen,
    orig: SocketAddr,
) -> Result<Vec<IpAddr>, (&'static str, String)> {
    let policy = &cx.policy;
    let Some(name) = &seen.name else {
        // Decided on the address itself, guards included.
        return Ok(vec![orig.ip()]);
    };
    let mode = policy.upstream();
    if mode == UpstreamMode::Original {
        return match policy.check_resolved(orig.ip(), orig.port(), Protocol::Tcp) {
            Ok(()) => Ok(vec![orig.ip()]),
            Err(r) => Err((
                "destination_ip_prohibited",
                format!("{} is refused ({})", orig.ip(), r.as_str()),
            )),
        };
    }
    let addrs = match gw
        .upstream
        .addresses(policy, Target::Name(name), orig.port(), &gw.metrics)
        .await
    {
        Ok(a) => a,
        Err(err) => {
            gw.metrics
                .upstream_errors
                .with_label_values(&[err.as_str()])
                .inc();
            return Err((err.as_str(), err.to_string()));
        }
    };
    if mode == UpstreamMode::Verify {
        if !addrs.contains(&orig.ip()) {
            let kind = if seen.via == Via::Host {
                "host_destination"
            } else {
                "sni_destination"
            };
            gw.metrics
                .tls_name_mismatch
                .with_label_values(&[kind])
                .inc();
            return Err((
                "sni_mismatch",
                format!(
                    "{name} does not resolve to {} (upstream = \"verify\")",
                    orig.ip()
                ),
            ));
        }
        return Ok(vec![orig.ip()]);
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_forms() {
        let http = |h: &str| Classified::Http {
            host: Some(h.to_string()),
            method: "GET".into(),
            target: "/".into(),
        };
        assert_eq!(
            seen(&http("Example.com:8080")).name.as_deref(),
            Some("example.com")
        );
        assert_eq!(
            seen(&http("example.com")).name.as_deref(),
            Some("example.com")
        );
        assert_eq!(
            seen(&http("[2001:db8::1]:80")).name.as_deref(),
            Some("[2001:db8::1]").map(|_| "2001:db8::1")
        );
        let tls = Classified::Tls {
            sni: Some("PyPI.org".into()),
            ech: true,
        };
        let s = seen(&tls);
        assert_eq!(
            (s.name.as_deref(), s.via, s.ech),
            (Some("pypi.org"), Via::Sni, true)
        );
    }
}
