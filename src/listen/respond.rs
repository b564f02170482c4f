//! Respond: the one mapping from every refusal or failure to what the client is told.
//!
//! In: a [`Refusal`] (why portcullis answers instead of relaying) and what
//! the client asked for. Out: the HTTP status, RFC 9209 `Proxy-Status` error
//! token and details, the one-line body a person can act on, and the access
//! line's close reason; rendered as a hyper response (explicit proxy), raw
//! HTTP/1.1 bytes (fast path, refused connections, transparent HTTP) or a TLS
//! alert (transparent TLS). Nothing else in the crate chooses a status or a
//! token: every match here is exhaustive, so a new kind of refusal forces a
//! decision about how it is answered.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::access::Close;
use crate::classify;
use crate::policy::{Decision, Policy, Reason};
use crate::upstream::ConnectError;

pub use crate::upstream::pool::Body;

/// Why portcullis answers a client itself instead of relaying.
#[derive(Clone, Copy)]
pub enum Refusal<'a> {
    /// The source address is outside `[clients] allow` (nothing was read).
    ClientNotAllowed,
    /// A listener or per-client connection cap was reached (nothing was read).
    ConnectionLimit,
    /// The request is malformed; says what is wrong.
    BadRequest(&'static str),
    /// The request head is larger than `[limits] max_head_bytes`.
    HeadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// An origin-form request: the client treats the proxy as a web server.
    NotAProxyRequest,
    /// The policy denied the destination.
    Denied {
        /// The policy snapshot that decided (for the sentence).
        policy: &'a Policy,
        /// The decision.
        decision: &'a Decision,
        /// The destination was an IP literal (decided by address rules).
        ip_literal: bool,
    },
    /// The upstream could not be reached (or every address was refused).
    Upstream(&'a ConnectError),
    /// The upstream answered with something that is not HTTP/1.
    UpstreamProtocol(&'a (dyn std::fmt::Display + Sync)),
}

impl Refusal<'_> {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::ClientNotAllowed | Refusal::Denied { .. } => StatusCode::FORBIDDEN,
            Refusal::ConnectionLimit => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BadRequest(_) | Refusal::NotAProxyRequest => StatusCode::BAD_REQUEST,
            Refusal::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Upstream(err) => upstream_status(err),
            Refusal::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The RFC 9209 §2.3 error token of the `Proxy-Status` header.
    pub fn token(&self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "http_request_denied",
            Refusal::ConnectionLimit => "proxy_internal_response",
            Refusal::BadRequest(_) | Refusal::HeadTooLarge { .. } | Refusal::NotAProxyRequest => {
                "http_request_error"
            }
            Refusal::Denied {
                decision,
                ip_literal,
                ..
            } => {
                if *ip_literal {
                    "destination_ip_prohibited"
                } else {
                    deny_token(decision.reason)
                }
            }
            Refusal::Upstream(err) => err.as_str(),
            Refusal::UpstreamProtocol(_) => "http_protocol_error",
        }
    }

    /// The `details` parameter of the `Proxy-Status` header.
    pub fn details(&self) -> String {
        match self {
            Refusal::ClientNotAllowed => "client_not_allowed".into(),
            Refusal::ConnectionLimit => "limit".into(),
            Refusal::BadRequest(msg) => (*msg).into(),
            Refusal::HeadTooLarge { .. } => "request head too large".into(),
            Refusal::NotAProxyRequest => "not a proxy request".into(),
            Refusal::Denied { decision, .. } => decision.reason.as_str().into(),
            Refusal::Upstream(err) => err.to_string(),
            Refusal::UpstreamProtocol(_) => "upstream response".into(),
        }
    }

    /// The one-line body; `what` is the request as the client sent it
    /// (`CONNECT host:port`, `GET http://...`).
    pub fn body(&self, what: &str) -> String {
        match self {
            Refusal::ClientNotAllowed => {
                "portcullis: this client address is not in [clients] allow\n".into()
            }
            Refusal::ConnectionLimit => {
                "portcullis: connection limit reached, retry later\n".into()
            }
            Refusal::BadRequest(msg) => format!("portcullis: bad request — {msg}\n"),
            Refusal::HeadTooLarge { limit } => {
                format!("portcullis: request head over {limit} bytes ([limits] max_head_bytes)\n")
            }
            Refusal::NotAProxyRequest => {
                "portcullis: this is a forward proxy, not a web server. Set HTTP_PROXY and \
                 HTTPS_PROXY to http://<this host>:<port> and request the real URL.\n"
                    .into()
            }
            Refusal::Denied {
                policy, decision, ..
            } => format!("portcullis: denied {what} — {}\n", policy.explain(decision)),
            Refusal::Upstream(err) => upstream_body(what, err),
            Refusal::UpstreamProtocol(err) => {
                format!("portcullis: {what} failed — upstream answered badly: {err}\n")
            }
        }
    }

    /// What the access line's `close` field says.
    pub fn close(&self) -> Close {
        match self {
            Refusal::ClientNotAllowed
            | Refusal::ConnectionLimit
            | Refusal::BadRequest(_)
            | Refusal::HeadTooLarge { .. }
            | Refusal::NotAProxyRequest => Close::Status(self.status().as_u16()),
            Refusal::Denied { .. } => Close::Denied,
            Refusal::Upstream(ConnectError::NotAmong { .. }) => Close::SniMismatch,
            Refusal::Upstream(err) => Close::Upstream(err.as_str()),
            Refusal::UpstreamProtocol(_) => Close::Upstream("http_protocol_error"),
        }
    }

    /// The `Proxy-Status` header value: `portcullis; error=...; details="..."`.
    fn proxy_status(&self) -> Option<HeaderValue> {
        // details is an sf-string (RFC 8941 §3.3.3): printable ASCII, no `"` or `\`.
        let details: String = self
            .details()
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
            .collect();
        HeaderValue::from_str(&format!(
            "portcullis; error={}; details=\"{details}\"",
            self.token()
        ))
        .ok()
    }

    /// The answer as a hyper response (the explicit proxy's hyper path).
    pub fn response(&self, what: &str) -> Response<Body> {
        let mut resp = Response::new(full(self.body(what)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(v) = self.proxy_status() {
            h.insert(HeaderName::from_static("proxy-status"), v);
        }
        resp
    }

    /// The answer as a complete HTTP/1.1 response that closes the connection,
    /// for paths that answer outside hyper.
    pub fn raw(&self, what: &str) -> Vec<u8> {
        let status = self.status();
        let body = self.body(what);
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(v) = self.proxy_status() {
            out.extend_from_slice(b"proxy-status: ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(
            format!(
                "content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body.as_bytes());
        out
    }
}

/// How a transparent connection is told it was refused: by the protocol it spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speech {
    /// It sent a TLS record: a TLS `access_denied` alert.
    Tls,
    /// It sent an HTTP/1 request: a raw HTTP response.
    Http,
    /// Anything else: close without a word (there is no protocol to answer in).
    Opaque,
}

impl Speech {
    /// The access line's `method` for this protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            Speech::Tls => "TLS",
            Speech::Http => "HTTP",
            Speech::Opaque => "TCP",
        }
    }

    /// Writes `refusal` in the client's protocol and closes the write side, within 5 s.
    pub async fn answer(self, client: &mut TcpStream, refusal: &Refusal<'_>, what: &str) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            match self {
                Speech::Tls => {
                    let _ = client.write_all(&classify::TLS_ACCESS_DENIED_ALERT).await;
                }
                Speech::Http => {
                    let _ = client.write_all(&refusal.raw(what)).await;
                }
                Speech::Opaque => {}
            }
            let _ = client.shutdown().await;
        })
        .await;
    }
}

/// RFC 9209 error token for a policy denial of a name.
fn deny_token(reason: Reason) -> &'static str {
    match reason {
        Reason::GuardedAddress | Reason::PlatformAddress => "destination_ip_prohibited",
        Reason::RuleMatched
        | Reason::DenyRule
        | Reason::NoRule
        | Reason::PortNotAllowed
        | Reason::ProtocolNotAllowed
        | Reason::ScenarioDisabled
        | Reason::NeedsVar
        | Reason::NeedsServiceTags
        | Reason::NeedsDns
        | Reason::MalformedHost
        | Reason::SniMismatch
        | Reason::HostMismatch
        | Reason::SniUnreadable
        | Reason::DnsAddress => "http_request_denied",
    }
}

/// Status for an upstream failure: refused addresses are a denial (403),
/// a timeout 504, everything else a bad gateway.
fn upstream_status(err: &ConnectError) -> StatusCode {
    match err {
        ConnectError::Prohibited { .. } | ConnectError::NotAmong { .. } => StatusCode::FORBIDDEN,
        ConnectError::NotFound(_)
        | ConnectError::Dns { .. }
        | ConnectError::Refused(_)
        | ConnectError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
        ConnectError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
    }
}

fn upstream_body(what: &str, err: &ConnectError) -> String {
    match err {
        ConnectError::Prohibited { reason, .. } => {
            let hint = if *reason == Reason::PlatformAddress {
                "; add 169.254.169.254 and 168.63.129.16 to NO_PROXY"
            } else {
                ": private, loopback and link-local addresses are refused unless an address rule names them"
            };
            format!("portcullis: denied {what} — {err}{hint}\n")
        }
        ConnectError::NotAmong { .. } => format!("portcullis: denied {what} — {err}\n"),
        _ => format!("portcullis: {what} failed — {err}\n"),
    }
}

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Writes a complete answer, closes the write side, and reads out what the
/// client still sends (up to 64 KiB), all within `budget`: closing with
/// unread bytes would reset the connection and could destroy the answer
/// before the client reads it.
pub async fn write_and_close(mut stream: TcpStream, answer: &[u8], budget: Duration) {
    let _ = tokio::time::timeout(budget, async {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_answers_are_whole_responses_that_close() {
        let raw = Refusal::ConnectionLimit.raw("");
        let text = String::from_utf8(raw).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains(
            "proxy-status: portcullis; error=proxy_internal_response; details=\"limit\"\r\n"
        ));
        assert!(text.contains("connection: close\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert_eq!(body, "portcullis: connection limit reached, retry later\n");
    }

    #[test]
    fn details_are_a_valid_sf_string() {
        let err = ConnectError::Dns {
            name: "a\"b\\c".into(),
            message: "tab\there, é".into(),
        };
        let r = Refusal::Upstream(&err);
        let v = r.proxy_status().expect("header value");
        let v = v.to_str().unwrap();
        assert_eq!(v.matches('"').count(), 2, "{v}");
        assert!(
            !v.contains('\\') && !v.contains('\t') && !v.contains('é'),
            "{v}"
        );
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.close(), Close::Upstream("dns_error"));
    }

    #[test]
    fn statuses_follow_the_upstream_error() {
        let timeout = ConnectError::Timeout("x".into());
        assert_eq!(
            Refusal::Upstream(&timeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        let prohibited = ConnectError::Prohibited {
            name: "n".into(),
            addrs: "10.0.0.1".into(),
            reason: Reason::PlatformAddress,
        };
        let r = Refusal::Upstream(&prohibited);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.token(), "destination_ip_prohibited");
        assert!(r.body("CONNECT n:443").contains("NO_PROXY"));
    }
}
