//! Metrics: every Prometheus family portcullis exports, registered in one place.
//!
//! In: events from listeners, upstream and reload (`&Metrics` is passed down;
//! there are no globals). Out: the text exposition served on `/metrics`.
//! Labels are enum strings, never a host or address, except the one
//! denied-destination family, whose hosts are bounded (see [`DeniedHosts`]).
//! Metrics live outside `Policy`, so a reload never resets a counter.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::policy::{Reason, Verdict};

/// How a destination was learnt: the `via` label of decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Explicit proxy CONNECT.
    Connect,
    /// Explicit proxy absolute-URI request.
    Http,
    /// Transparent: TLS SNI.
    Sni,
    /// Transparent: HTTP Host header.
    Host,
    /// Transparent: original destination address.
    Address,
}

impl Via {
    const ALL: [Via; 5] = [Via::Connect, Via::Http, Via::Sni, Via::Host, Via::Address];

    /// Label form.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Connect => "connect",
            Via::Http => "http",
            Via::Sni => "sni",
            Via::Host => "host",
            Via::Address => "address",
        }
    }
}

const VERDICTS: [Verdict; 3] = [Verdict::Allow, Verdict::Deny, Verdict::AuditDeny];

/// A listener, for per-listener families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Explicit proxy.
    Proxy,
    /// Transparent listener.
    Transparent,
}

impl Listener {
    /// Label form.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Transparent => "transparent",
        }
    }
}

/// The denied-destination family with a bounded number of hosts: the first
/// `max` distinct `(host, port)` pairs get their own series, later ones are
/// folded into `host="__other__"`. A client spraying random names cannot
/// grow memory or the scrape without bound.
pub struct DeniedHosts {
    family: IntCounterVec,
    seen: DashMap<(Box<str>, u16), IntCounter>,
    other: IntCounter,
    max: AtomicUsize,
    /// Slots taken in `seen` (reserved before inserting).
    reserved: AtomicUsize,
}

impl DeniedHosts {
    /// Counts one denial of `host:port`.
    pub fn record(&self, host: &str, port: u16) {
        let key = (Box::from(host), port);
        if let Some(c) = self.seen.get(&key) {
            c.inc();
            return;
        }
        // Reserve a slot first: checking the map's length and then inserting
        // would let concurrent first denials overshoot the bound.
        let max = self.max.load(Ordering::Relaxed);
        if self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            self.other.inc();
            return;
        }
        match self.seen.entry(key) {
            dashmap::Entry::Occupied(e) => {
                // Another thread tracked it meanwhile: give the slot back.
                e.get().inc();
                self.reserved.fetch_sub(1, Ordering::AcqRel);
            }
            dashmap::Entry::Vacant(v) => {
                let counter = self
                    .family
                    .with_label_values(&[host, port.to_string().as_str()]);
                counter.inc();
                v.insert(counter);
            }
        }
    }

    /// Number of distinct tracked hosts.
    pub fn tracked(&self) -> usize {
        self.seen.len()
    }
}

/// Every family. Build one with [`Metrics::new`] and share it by reference.
pub struct Metrics {
    registry: Registry,
    decisions: Vec<IntCounter>,
    /// Denied destinations by host and port (bounded).
    pub denied: DeniedHosts,
    /// Denials by the `[clients] allow` CIDR the client matched.
    pub client_denials: IntCounterVec,
    /// Open client connections per listener.
    pub connections_active: IntGaugeVec,
    /// Accepted client connections per listener.
    pub connections_total: IntCounterVec,
    /// Configured connection limit per listener.
    pub connections_limit: IntGaugeVec,
    /// Connections refused before any request: client not allowed, limit reached.
    pub connections_rejected: IntCounterVec,
    /// Bytes relayed, `upload` (client → upstream) and `download`.
    pub bytes: IntCounterVec,
    /// Time to establish an upstream TCP connection.
    pub upstream_connect: Histogram,
    /// Upstream failures by RFC 9209 error token.
    pub upstream_errors: IntCounterVec,
    /// DNS lookups by result.
    pub dns_lookups: IntCounterVec,
    /// Name disagreements: CONNECT vs SNI, URI vs Host, SNI vs destination.
    pub tls_name_mismatch: IntCounterVec,
    /// Config reloads by result.
    pub reloads: IntCounterVec,
    /// Generation of the policy in force.
    pub policy_generation: IntGauge,
    /// Unix time of the last successful (re)load.
    pub last_reload_success: Gauge,
    /// 1 when the last reload succeeded.
    pub last_reload_successful: IntGauge,
    /// Active rules per scenario.
    pub rules: IntGaugeVec,
    /// `changeNumber` of the service tags file in use.
    pub service_tags_change: IntGauge,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(v.clone()))
        .expect("metric registered once");
    v
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(v.clone()))
        .expect("metric registered once");
    v
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    /// Registers every family in a new registry.
    pub fn new(max_denied_hosts: usize) -> Metrics {
        let r = Registry::new_custom(Some("portcullis".into()), None).expect("valid prefix");
        let decisions_vec = counter_vec(
            &r,
            "decisions_total",
            "Policy decisions by action, how the destination was learnt, and reason.",
            &["action", "via", "reason"],
        );
        let mut decisions = Vec::with_capacity(VERDICTS.len() * Via::ALL.len() * Reason::ALL.len());
        for v in VERDICTS {
            for via in Via::ALL {
                for reason in Reason::ALL {
                    decisions.push(decisions_vec.with_label_values(&[
                        v.as_str(),
                        via.as_str(),
                        reason.as_str(),
                    ]));
                }
            }
        }
        let denied_family = counter_vec(
            &r,
            "denied_destinations_total",
            "Denied destinations by host and port; hosts beyond the tracked maximum are folded into __other__.",
            &["host", "port"],
        );
        let other = denied_family.with_label_values(&["__other__", ""]);
        let upstream_connect = Histogram::with_opts(
            HistogramOpts::new(
                "upstream_connect_duration_seconds",
                "Time to establish upstream TCP connections, including Happy Eyeballs fallbacks.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(upstream_connect.clone()))
            .expect("metric registered once");
        let last_reload_success = Gauge::new(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        .expect("valid metric definition");
        r.register(Box::new(last_reload_success.clone()))
            .expect("metric registered once");
        let build_info = gauge_vec(
            &r,
            "build_info",
            "Build information; always 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // Registered without the namespace: process_* is the convention.
            let _ = prometheus::default_registry().register(Box::new(pc));
        }
        let m = Metrics {
            decisions,
            denied: DeniedHosts {
                family: denied_family,
                seen: DashMap::new(),
                other,
                max: AtomicUsize::new(max_denied_hosts),
                reserved: AtomicUsize::new(0),
            },
            client_denials: counter_vec(
                &r,
                "client_denials_total",
                "Denials by the [clients] allow CIDR the client matched.",
                &["client_subnet"],
            ),
            connections_active: gauge_vec(
                &r,
                "connections_active",
                "Open client connections.",
                &["listener"],
            ),
            connections_total: counter_vec(
                &r,
                "connections_total",
                "Accepted client connections.",
                &["listener"],
            ),
            connections_limit: gauge_vec(
                &r,
                "connections_limit",
                "Configured maximum of concurrent client connections.",
                &["listener"],
            ),
            connections_rejected: counter_vec(
                &r,
                "connections_rejected_total",
                "Client connections refused before any request.",
                &["listener", "reason"],
            ),
            bytes: counter_vec(
                &r,
                "bytes_total",
                "Bytes relayed: upload is client to upstream.",
                &["direction"],
            ),
            upstream_connect,
            upstream_errors: counter_vec(
                &r,
                "upstream_errors_total",
                "Upstream failures by Proxy-Status error.",
                &["error"],
            ),
            dns_lookups: counter_vec(
                &r,
                "dns_lookups_total",
                "DNS lookups by result.",
                &["result"],
            ),
            tls_name_mismatch: counter_vec(
                &r,
                "tls_name_mismatch_total",
                "Connections cut because names disagree (domain fronting, Host vs URI, SNI vs destination).",
                &["kind"],
            ),
            reloads: counter_vec(
                &r,
                "config_reloads_total",
                "Config reloads by result.",
                &["result"],
            ),
            policy_generation: gauge(
                &r,
                "policy_generation",
                "Generation of the policy in force (1 at start).",
            ),
            last_reload_success,
            last_reload_successful: gauge(
                &r,
                "config_last_reload_successful",
                "1 when the last config reload succeeded.",
            ),
            rules: gauge_vec(&r, "rules", "Active rules per scenario.", &["scenario"]),
            service_tags_change: gauge(
                &r,
                "service_tags_change_number",
                "changeNumber of the service tags file in use.",
            ),
            registry: r,
        };
        m.zero_known_series();
        m
    }

    /// Creates every series whose labels are known up front at 0, so the
    /// first event after a start is visible to `rate()` and `increase()`.
    fn zero_known_series(&self) {
        for result in ["success", "failure"] {
            self.reloads.with_label_values(&[result]);
        }
        for error in [
            "dns_error",
            "connection_refused",
            "connection_timeout",
            "destination_ip_prohibited",
            "destination_unavailable",
            "http_protocol_error",
        ] {
            self.upstream_errors.with_label_values(&[error]);
        }
        for result in ["ok", "cached", "static", "nxdomain", "error"] {
            self.dns_lookups.with_label_values(&[result]);
        }
        for kind in [
            "connect_sni",
            "host_uri",
            "sni_destination",
            "host_destination",
        ] {
            self.tls_name_mismatch.with_label_values(&[kind]);
        }
        for listener in [Listener::Proxy, Listener::Transparent] {
            for reason in ["client_not_allowed", "limit"] {
                self.connections_rejected
                    .with_label_values(&[listener.as_str(), reason]);
            }
        }
        for direction in ["upload", "download"] {
            self.bytes.with_label_values(&[direction]);
        }
    }

    /// Counts a decision. No allocation, no hashing: handles are resolved at start.
    #[inline]
    pub fn decision(&self, verdict: Verdict, via: Via, reason: Reason) {
        let v = VERDICTS.iter().position(|&x| x == verdict).unwrap_or(0);
        let w = Via::ALL.iter().position(|&x| x == via).unwrap_or(0);
        let r = Reason::ALL.iter().position(|&x| x == reason).unwrap_or(0);
        self.decisions[(v * Via::ALL.len() + w) * Reason::ALL.len() + r].inc();
    }

    /// The text exposition (our families and the process collector's).
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(prometheus::default_registry().gather());
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }

    /// Sets the per-policy gauges after a (re)load.
    pub fn policy_loaded(&self, policy: &crate::policy::Policy) {
        self.policy_generation.set(policy.generation() as i64);
        self.rules.reset();
        for (scenario, n) in policy.active_rules_by_scenario() {
            self.rules
                .with_label_values(&[scenario.as_str()])
                .set(n as i64);
        }
        if let Some(c) = policy.service_tags_change() {
            self.service_tags_change.set(c as i64);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reload_success.set(now);
        self.last_reload_successful.set(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_hosts_are_bounded() {
        let m = Metrics::new(10);
        for i in 0..1000 {
            m.denied.record(&format!("spray{i}.example.com"), 443);
        }
        m.denied.record("spray0.example.com", 443);
        assert_eq!(m.denied.tracked(), 10);
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("portcullis_denied_destinations_total{"))
            .count();
        assert_eq!(series, 11, "10 hosts + __other__");
        assert!(
            text.contains("portcullis_denied_destinations_total{host=\"__other__\",port=\"\"} 990"),
            "{text}"
        );
        assert!(text.contains(
            "portcullis_denied_destinations_total{host=\"spray0.example.com\",port=\"443\"} 2"
        ));
    }

    #[test]
    fn denied_hosts_bound_holds_under_concurrency() {
        let m = Metrics::new(50);
        std::thread::scope(|s| {
            for t in 0..8 {
                let m = &m;
                s.spawn(move || {
                    for i in 0..2000 {
                        m.denied.record(&format!("h{t}-{i}.example"), 80);
                    }
                });
            }
        });
        assert_eq!(m.denied.tracked(), 50);
        let series = m
            .render()
            .lines()
            .filter(|l| l.starts_with("portcullis_denied_destinations_total{"))
            .count();
        assert_eq!(series, 51, "50 hosts + __other__");
    }

    #[test]
    fn decisions_use_labels() {
        let m = Metrics::new(10);
        m.decision(Verdict::AuditDeny, Via::Sni, Reason::NoRule);
        m.decision(Verdict::Allow, Via::Connect, Reason::RuleMatched);
        let text = m.render();
        assert!(
            text.contains(
                "portcullis_decisions_total{action=\"audit_deny\",reason=\"no_rule\",via=\"sni\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "portcullis_decisions_total{action=\"allow\",reason=\"rule_matched\",via=\"connect\"} 1"
        ));
        assert!(text.contains("portcullis_build_info{version="));
    }
}
