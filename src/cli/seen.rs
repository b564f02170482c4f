//! Access-log lines read back: the destinations a gateway saw, with hit counts, for `learn` and `diff --log`.
//!
//! In: JSON access lines (`[log] format = "json"`, as the gateway writes
//! them to stderr and `journalctl -u portcullis -o cat` prints them), from
//! files or stdin. Out: one [`Seen`] per destination (host or address,
//! port, client group) with its hits by verdict. Lines that are not access
//! lines (start-up messages, reload lines, text-format logs) are counted
//! and skipped, never guessed at; a name the gateway logged cut short (a
//! hostile client's 30 KB "name") is skipped too: no rule could name it.

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::{Context, Result};
use serde::Deserialize;

/// One destination and how often each verdict met it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// Connections allowed by a rule.
    pub allowed: u64,
    /// Connections an audit-mode gateway let through that it would deny.
    pub audit_denied: u64,
    /// Connections refused.
    pub denied: u64,
    /// The first client address seen going there, to decide as that client.
    pub client: Option<std::net::IpAddr>,
}

impl Seen {
    /// Every hit, whatever its verdict.
    pub fn hits(&self) -> u64 {
        self.allowed + self.audit_denied + self.denied
    }
}

/// Where a connection went: `(host, port, client group)`; the host is a
/// name or an address as logged, the group empty when none was logged.
pub type DestKey = (String, u16, String);

/// What a set of log lines holds.
#[derive(Debug, Default)]
pub struct Log {
    /// Destinations in name order.
    pub dests: BTreeMap<DestKey, Seen>,
    /// Lines read.
    pub lines: u64,
    /// Lines that were not access lines, or named no usable destination.
    pub skipped: u64,
}

#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    target: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    verdict: String,
    #[serde(default)]
    client_group: String,
    #[serde(default)]
    client: String,
}

impl Log {
    /// Reads `paths` (`-` is stdin), or stdin when there are none.
    ///
    /// # Errors
    /// A file that cannot be opened or read.
    pub fn read(paths: &[std::path::PathBuf]) -> Result<Log> {
        let mut log = Log::default();
        if paths.is_empty() {
            log.add(std::io::stdin().lock(), "stdin")?;
        }
        for path in paths {
            if path.as_os_str() == "-" {
                log.add(std::io::stdin().lock(), "stdin")?;
                continue;
            }
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            log.add(std::io::BufReader::new(file), &path.display().to_string())?;
        }
        Ok(log)
    }

    /// Adds the lines of `reader` (named `what` in errors).
    ///
    /// # Errors
    /// A read error.
    pub fn add(&mut self, reader: impl BufRead, what: &str) -> Result<()> {
        for line in reader.lines() {
            let line = line.with_context(|| format!("cannot read {what}"))?;
            self.lines += 1;
            if !self.take(&line) {
                self.skipped += 1;
            }
        }
        Ok(())
    }

    /// Counts one line; false when it is not a usable access line.
    fn take(&mut self, text: &str) -> bool {
        let Ok(line) = serde_json::from_str::<Line>(text.trim()) else {
            return false;
        };
        let usable = line.target == "portcullis::access"
            && line.port != 0
            && !line.host.is_empty()
            && line.host != "-"
            && !line.host.contains('…');
        if !usable {
            return false;
        }
        let key = (line.host.to_ascii_lowercase(), line.port, line.client_group);
        let seen = self.dests.entry(key).or_default();
        if seen.client.is_none() {
            seen.client = client_ip(&line.client);
        }
        match line.verdict.as_str() {
            "allow" => seen.allowed += 1,
            "audit_deny" => seen.audit_denied += 1,
            _ => seen.denied += 1,
        }
        true
    }
}

/// The address of a logged `client` (`10.0.2.7:5000`, `[::1]:5000`).
fn client_ip(text: &str) -> Option<std::net::IpAddr> {
    (text.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())).or_else(|| text.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_are_counted_by_destination_and_the_rest_skipped() {
        let text = r#"{"timestamp":"2026-12-03T01:00:00Z","level":"INFO","message":"connection closed","client":"10.0.2.7:5000","listener":"proxy","method":"CONNECT","host":"PyPI.org","port":443,"upstream":"-","verdict":"allow","rule":"pypi","reason":"rule_matched","upload":1,"download":2,"duration_ms":3,"close":"client_closed","ech":false,"generation":1,"target":"portcullis::access"}
{"timestamp":"2026-12-03T01:00:01Z","level":"INFO","message":"connection closed","host":"pypi.org","port":443,"verdict":"audit_deny","target":"portcullis::access"}
{"timestamp":"2026-12-03T01:00:02Z","level":"INFO","message":"connection closed","host":"evil.example","port":443,"verdict":"deny","target":"portcullis::access"}
{"timestamp":"2026-12-03T01:00:03Z","level":"INFO","fields":{"message":"config reloaded"},"target":"portcullis::reload"}
{"host":"aaaa…(30000 bytes)","port":443,"verdict":"deny","target":"portcullis::access"}
not json at all
"#;
        let mut log = Log::default();
        log.add(text.as_bytes(), "t").unwrap();
        assert_eq!(log.lines, 6);
        assert_eq!(log.skipped, 3);
        let pypi = &log.dests[&("pypi.org".to_string(), 443, String::new())];
        assert_eq!((pypi.allowed, pypi.audit_denied, pypi.denied), (1, 1, 0));
        assert_eq!(pypi.hits(), 2);
        assert_eq!(pypi.client, Some("10.0.2.7".parse().unwrap()));
        let evil = &log.dests[&("evil.example".to_string(), 443, String::new())];
        assert_eq!(evil.denied, 1);
    }
}
