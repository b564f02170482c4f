//! Access log: the one line each connection (or forwarded request) writes when it closes.
//!
//! In: what a listener learnt about a connection. Out: a JSON line on stderr
//! (`[log] format = "json"`, the default) or a tracing event (`text`), both
//! through [`crate::logwriter`], so a connection never waits on a write. The
//! JSON line is built here by hand, with the same fields and shape as the
//! tracing JSON layer's, because that formatter costs microseconds per line
//! and this is written for every connection (`benches/path.rs`).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use super::Conn;
use crate::classify::OpaqueReason;
use crate::metrics::Listener;
use crate::policy::{Decision, Policy};
use crate::tunnel::CloseReason;

/// Why a connection (or forwarded request) ended: the access line's `close` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Close {
    /// Not said (a line written before the end).
    #[default]
    Unset,
    /// The policy denied it; the client was told.
    Denied,
    /// A tunnel ended.
    Tunnel(CloseReason),
    /// The upstream failed: the RFC 9209 error token.
    Upstream(&'static str),
    /// A forwarded request was answered (or refused) with this HTTP status.
    Status(u16),
    /// The first bytes could not be read as the protocol they started as.
    Unreadable(OpaqueReason),
    /// A TLS name disagreed with the name decided (domain fronting).
    SniMismatch,
    /// An upgraded (WebSocket) connection ended.
    UpgradeClosed,
}

impl Close {
    /// The text written to the log.
    fn write(self, o: &mut String) {
        match self {
            Close::Unset => {}
            Close::Denied => o.push_str("denied"),
            Close::Tunnel(r) => o.push_str(r.as_str()),
            Close::Upstream(token) => o.push_str(token),
            Close::Status(code) => {
                let _ = write!(o, "{code}");
            }
            Close::Unreadable(why) => o.push_str(why.as_str()),
            Close::SniMismatch => o.push_str("sni_mismatch"),
            Close::UpgradeClosed => o.push_str("upgrade_closed"),
        }
    }
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        self.write(&mut s);
        f.write_str(&s)
    }
}

/// The fields of the one log line each connection (or forwarded request) writes at close.
pub struct AccessLog<'a> {
    /// The client's address.
    pub client: SocketAddr,
    /// Listener that accepted it.
    pub listener: Listener,
    /// Policy snapshot the connection decided with.
    pub policy: &'a Policy,
    /// When the connection was accepted.
    pub started: Instant,
    /// Write JSON directly (else a tracing event, for the text format).
    pub json: bool,
    /// `CONNECT`, `GET`..., `TLS`, `HTTP`, `TCP` (transparent).
    pub method: &'a str,
    /// Host or address asked for.
    pub host: &'a str,
    /// Port asked for.
    pub port: u16,
    /// Address dialled, if any.
    pub upstream: Option<SocketAddr>,
    /// The decision.
    pub decision: Option<&'a Decision>,
    /// Bytes client → upstream.
    pub upload: u64,
    /// Bytes upstream → client.
    pub download: u64,
    /// Why it ended.
    pub close: Close,
    /// TLS ClientHello carried an Encrypted Client Hello extension.
    pub ech: bool,
}

impl<'a> AccessLog<'a> {
    /// A line for `conn` with nothing relayed yet.
    pub fn new(
        conn: &'a Conn,
        method: &'a str,
        host: &'a str,
        port: u16,
        decision: Option<&'a Decision>,
        close: Close,
    ) -> Self {
        AccessLog {
            client: conn.peer,
            listener: conn.listener,
            policy: &conn.policy,
            started: conn.started,
            json: conn.json_log,
            method,
            host,
            port,
            upstream: None,
            decision,
            upload: 0,
            download: 0,
            close,
            ech: false,
        }
    }

    /// The same line, for a decision made under `policy` (a later policy
    /// than the connection's snapshot: per-request decisions on keep-alive
    /// connections use the policy in force when each request arrives).
    pub fn under(mut self, policy: &'a Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Writes the line (target `portcullis::access`, level info).
    pub fn emit(&self) {
        if !tracing::enabled!(target: "portcullis::access", tracing::Level::INFO) {
            return;
        }
        if self.json {
            let mut line = self.json_line(SystemTime::now());
            line.push('\n');
            crate::logwriter::write(line.as_bytes());
            return;
        }
        let policy = self.policy;
        let (verdict, rule, reason) = self.outcome();
        tracing::info!(
            target: "portcullis::access",
            client = %self.client,
            client_group = self.client_group(),
            listener = self.listener.as_str(),
            method = self.method,
            host = %shown_host(self.host),
            port = self.port,
            upstream = self.upstream.map(|a| a.to_string()).as_deref().unwrap_or("-"),
            verdict,
            rule,
            reason,
            upload = self.upload,
            download = self.download,
            duration_ms = self.started.elapsed().as_millis() as u64,
            close = %self.close,
            ech = self.ech,
            generation = policy.generation(),
            "connection closed"
        );
    }
}

impl AccessLog<'_> {
    /// The client's first group under the line's policy, or `""`.
    fn client_group(&self) -> &str {
        let client = self.policy.client(self.client.ip());
        self.policy.client_group(client)
    }

    /// Verdict, rule name and reason as logged (`-` when there is no decision).
    fn outcome(&self) -> (&str, &str, &str) {
        match self.decision {
            Some(d) => (
                d.verdict.as_str(),
                d.rule
                    .map(|r| self.policy.rule(r).name.as_str())
                    .unwrap_or("-"),
                d.reason.as_str(),
            ),
            None => ("-", "-", "-"),
        }
    }

    /// The JSON line, without its newline, stamped with `now`.
    pub fn json_line(&self, now: SystemTime) -> String {
        let policy = self.policy;
        let (verdict, rule, reason) = self.outcome();
        let mut o = String::with_capacity(512);
        o.push_str("{\"timestamp\":\"");
        rfc3339(&mut o, now);
        o.push_str("\",\"level\":\"INFO\",\"message\":\"connection closed\"");
        let _ = write!(o, ",\"client\":\"{}\"", self.client);
        field(&mut o, "client_group", self.client_group());
        field(&mut o, "listener", self.listener.as_str());
        field(&mut o, "method", self.method);
        field(&mut o, "host", &shown_host(self.host));
        let _ = write!(o, ",\"port\":{}", self.port);
        match self.upstream {
            Some(a) => {
                let _ = write!(o, ",\"upstream\":\"{a}\"");
            }
            None => o.push_str(",\"upstream\":\"-\""),
        }
        field(&mut o, "verdict", verdict);
        field(&mut o, "rule", rule);
        field(&mut o, "reason", reason);
        let _ = write!(
            o,
            ",\"upload\":{},\"download\":{},\"duration_ms\":{}",
            self.upload,
            self.download,
            self.started.elapsed().as_millis()
        );
        o.push_str(",\"close\":\"");
        // Every close text is a token or a number: nothing to escape.
        self.close.write(&mut o);
        o.push('"');
        let _ = write!(
            o,
            ",\"ech\":{},\"generation\":{},\"target\":\"portcullis::access\"}}",
            self.ech,
            policy.generation()
        );
        o
    }
}

/// A host as logged: whole up to the longest valid name, else its first 64
/// bytes and its length (a hostile client's 60 KB "name" is not copied into
/// every log line).
pub fn shown_host(host: &str) -> Cow<'_, str> {
    if host.len() <= crate::gateway::MAX_NAME {
        return Cow::Borrowed(host);
    }
    let mut cut = 64;
    while !host.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}…({} bytes)", &host[..cut], host.len()))
}

/// `,"key":"value"` with the value escaped per RFC 8259 §7.
fn field(o: &mut String, key: &str, value: &str) {
    o.push_str(",\"");
    o.push_str(key);
    o.push_str("\":\"");
    for c in value.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC), as the tracing JSON layer writes it.
fn rfc3339(o: &mut String, t: SystemTime) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-compatible
    // low-level date algorithms").
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        o,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Source};
    use crate::policy::{CompileInput, Reason, RuleId, Verdict};
    use std::time::Duration;

    #[test]
    fn json_line_has_the_fields_and_escapes() {
        let source = Source {
            name: "t.toml".into(),
            text: "[policy]\nprofile = \"none\"\n[[rule]]\nname = \"r\"\nhosts = [\"a.com\"]\n"
                .into(),
        };
        let config = Config::parse(&source).unwrap();
        let (policy, _) = Policy::compile(&config, &source, &CompileInput::default()).unwrap();
        let d = Decision {
            verdict: Verdict::Allow,
            rule: Some(RuleId::new(0)),
            reason: Reason::RuleMatched,
        };
        let log = AccessLog {
            client: "10.0.0.5:40000".parse().unwrap(),
            listener: Listener::Proxy,
            policy: &policy,
            started: Instant::now(),
            json: true,
            method: "GET",
            host: "we\"ird\\\u{1}host",
            port: 443,
            upstream: Some("[2001:db8::1]:443".parse().unwrap()),
            decision: Some(&d),
            upload: 12,
            download: 3456,
            close: Close::Tunnel(CloseReason::ClientClosed),
            ech: true,
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_700_000_123_456);
        let line = log.json_line(t);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["timestamp"], "2026-11-26T13:33:20.123456Z");
        assert_eq!(v["host"], "we\"ird\\\u{1}host");
        assert_eq!(v["upstream"], "[2001:db8::1]:443");
        assert_eq!(v["rule"], "r");
        assert_eq!(v["verdict"], "allow");
        assert_eq!(v["port"], 443);
        assert_eq!(v["download"], 3456);
        assert_eq!(v["ech"], true);
        assert_eq!(v["close"], "client_closed");
        assert_eq!(v["target"], "portcullis::access");
        assert_eq!(v["message"], "connection closed");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        let mut s = String::new();
        rfc3339(&mut s, t);
        assert_eq!(s, "2000-02-29T00:00:00.000000Z");
    }
}
