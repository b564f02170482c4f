//! Forwarding: absolute-URI plain-HTTP requests (`GET http://host/...`) sent on upstream.
//!
//! In: a request hyper parsed on an admitted connection. Out: the upstream's
//! response (hop-by-hop headers removed, `Via` added, bodies streamed both
//! ways, WebSocket upgrades passed through), or a refusal through `respond`.
//! Each request is decided on its own URL, and its Host header must agree
//! with it; upstream connections come from the gateway's pool, which dials
//! through `upstream` like every other egress socket.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::gateway::Gateway;
use crate::listen::authority::{authority, authority_text};
use crate::listen::body::{Metered, NO_ANSWER, PendingLine, within_idle};
use crate::listen::http_relay::relay_upgrade;
use crate::listen::respond::{Body, Refusal};
use crate::listen::{AccessLog, Close, Conn, Judge};
use crate::metrics::{NameMismatch, UpstreamError, Via};
use crate::policy::{Decision, Policy, Reason, Target, Verdict, host};
use crate::upstream::pool;

const VIA: &str = "1.1 portcullis";

/// Decides (under `policy`, the policy in force when the request arrived)
/// and forwards one absolute-URI request.
pub(super) async fn forward(
    req: Request<Incoming>,
    conn: Arc<Conn>,
    gw: Arc<Gateway>,
    policy: Arc<Policy>,
) -> Response<Body> {
    let (host, port) = match destination(req.uri()) {
        Ok(x) => x,
        Err(refusal) => return refusal.response(""),
    };
    let method = req.method().clone();
    // Only answers other than the upstream's need it: made on demand.
    let uri = req.uri().clone();
    let what = || format!("{method} {uri}");
    let judge = Judge {
        gw: &gw,
        conn: &conn,
        policy: &policy,
    };
    let d = match host_agrees(&req, &host, port) {
        Ok(()) => judge.decide(Via::Http, &host, port),
        Err(Some(refusal)) => return refusal.response(&what()),
        Err(None) => {
            gw.count_name_mismatch(NameMismatch::HostUri);
            let d = Decision::denied(Reason::HostMismatch);
            judge.record(Via::Http, &host, port, &d);
            d
        }
    };
    if d.verdict == Verdict::Deny {
        AccessLog::new(&conn, method.as_str(), &host, port, Some(&d), Close::Denied)
            .under(&policy)
            .emit();
        let ip_literal = matches!(Target::parse(&host), Target::Ip(_));
        return Refusal::Denied {
            policy: &policy,
            decision: &d,
            ip_literal,
        }
        .response(&what());
    }

    let line = PendingLine {
        conn: conn.clone(),
        policy: policy.clone(),
        method: method.to_string(),
        host,
        port,
        decision: d,
        upstream: None,
        close: Close::Unset,
        upload: Arc::new(AtomicU64::new(0)),
        download: Arc::new(AtomicU64::new(0)),
    };
    send(req, line, &conn, &gw).await.unwrap_or_else(|e| e)
}

/// Sends an allowed request upstream through the pool and returns the
/// response to relay, bodies metered both ways; `Err` is the answer when
/// the upstream failed. `line` is written when the response ends.
async fn send(
    mut req: Request<Incoming>,
    mut line: PendingLine,
    conn: &Arc<Conn>,
    gw: &Arc<Gateway>,
) -> Result<Response<Body>, Response<Body>> {
    // Only an answer of our own needs it.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    add_via(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let up = gw.counters().upload.clone();
    let body = Metered::new(body, up, line.upload.clone(), gw.shutdown.cutting());
    let request = gw
        .http_client()
        .request(Request::from_parts(parts, body.boxed()));
    let idle = std::time::Duration::from_millis(gw.limits.idle_timeout_ms);
    let Some(sent) = within_idle(request, idle, &line.upload).await else {
        // No answer and no request byte for the idle timeout: close.
        gw.count_upstream_error(UpstreamError::HttpProtocolError);
        let refusal = Refusal::UpstreamProtocol(&NO_ANSWER);
        line.close = refusal.close();
        let mut resp = refusal.response(&format!("{method} {uri}"));
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(resp);
    };
    let resp = sent.map_err(|err| {
        let (refusal, label) = match pool::connect_error(&err) {
            Some(ce) => (Refusal::Upstream(ce), ce.label()),
            None => (
                Refusal::UpstreamProtocol(&err),
                Some(UpstreamError::HttpProtocolError),
            ),
        };
        if let Some(label) = label {
            gw.count_upstream_error(label);
        }
        line.close = refusal.close();
        refusal.response(&format!("{method} {uri}"))
    })?;
    line.upstream = resp.extensions().get::<pool::UpstreamAddr>().map(|a| a.0);
    line.close = Close::Status(resp.status().as_u16());
    if let Some(c) = client_upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS) {
        drop(line);
        return Ok(relay_upgrade(resp, c, conn, gw, true));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    add_via(&mut parts.headers);
    let down = gw.counters().download.clone();
    let body = Metered::new(body, down, line.download.clone(), gw.shutdown.cutting());
    let body = body.with_idle(idle).with_line(line);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The normalised host and port of an `http://` URL.
fn destination(uri: &Uri) -> Result<(String, u16), Refusal<'static>> {
    if uri.scheme_str() != Some("http") {
        return Err(Refusal::BadRequest(
            "only http:// URLs are forwarded; https goes through CONNECT (set HTTPS_PROXY)",
        ));
    }
    let (raw_host, port) = authority(uri, Some(80)).map_err(Refusal::BadRequest)?;
    Ok((host::normalized_or_kept(&raw_host), port))
}

/// One Host header, naming the URI's host and port (when there is one).
/// `Err(Some)`: a malformed request; `Err(None)`: a Host naming another host.
fn host_agrees(
    req: &Request<Incoming>,
    host: &str,
    port: u16,
) -> Result<(), Option<Refusal<'static>>> {
    let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(Some(Refusal::BadRequest("more than one Host header")));
    }
    let Some(h) = hosts.first() else {
        return Ok(());
    };
    // Nearly always the Host header is the URI's authority as sent.
    let same_text = req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()));
    if same_text {
        return Ok(());
    }
    let text = h
        .to_str()
        .map_err(|_| Some(Refusal::BadRequest("the Host header is not ASCII")))?;
    let (h_host, h_port) =
        authority_text(text, Some(80)).map_err(|msg| Some(Refusal::BadRequest(msg)))?;
    if host::normalized_or_kept(&h_host) == host && h_port == port {
        Ok(())
    } else {
        Err(None)
    }
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
    crate::listen::http_relay::websocket_upgrade(headers)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

#[cfg(test)]
mod tests {
    use super::*;

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
