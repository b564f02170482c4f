//! Metrics: every Prometheus family portcullis exports, registered in one place
//! (one small function per area, called from [`Metrics::new`]).
//!
//! In: events from listeners, upstream and reload (`&Metrics` is passed down;
//! there are no globals). Out: the text exposition served on `/metrics`.
//! Labels are enum strings, never a host or address, except the one
//! denied-destination family, whose hosts are bounded (see [`DeniedHosts`]).
//! Metrics live outside `Policy`, so a reload never resets a counter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::policy::{Reason, Verdict};
use crate::servicetags::{RefreshStatus, TagsFile};

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
    /// The DNS listener: a query for a name.
    Dns,
}

impl Via {
    /// Every way, in declaration order.
    pub const ALL: [Via; 6] = [
        Via::Connect,
        Via::Http,
        Via::Sni,
        Via::Host,
        Via::Address,
        Via::Dns,
    ];

    /// Label form.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Connect => "connect",
            Via::Http => "http",
            Via::Sni => "sni",
            Via::Host => "host",
            Via::Address => "address",
            Via::Dns => "dns",
        }
    }
}

const VERDICTS: [Verdict; 3] = [Verdict::Allow, Verdict::Deny, Verdict::AuditDeny];

/// Whether a decision with this verdict and reason can happen, so its
/// `decisions_total` series is created at start (at 0). `decide` allows only
/// with `rule_matched` and denies (`deny`, or `audit_deny` in audit mode)
/// with every other reason, whatever the `via`. Pre-creating every product
/// instead made series such as `action="allow",reason="deny_rule"` that can
/// never move (issue #19).
pub fn decision_possible(verdict: Verdict, reason: Reason) -> bool {
    (verdict == Verdict::Allow) == matches!(reason, Reason::RuleMatched | Reason::DnsAddress)
}

/// Counter handles of one `client_group`, one per (verdict, via, reason).
type GroupHandles = Box<[OnceLock<IntCounter>]>;

/// The `decisions_total` family and a counter handle per
/// (verdict, via, reason) for clients in no group, so counting neither
/// allocates nor hashes; each client group's handles are made on its
/// first decision and found by name among the few groups configured.
struct Decisions {
    family: IntCounterVec,
    /// Indexed by [`Decisions::slot`]. Filled at start where
    /// [`decision_possible`]; any other slot is filled on first use, so a
    /// combination this module did not foresee is still counted.
    handles: GroupHandles,
    /// Per named client group (bounded by the groups ever configured).
    groups: RwLock<Vec<(Box<str>, Arc<GroupHandles>)>>,
}

fn empty_handles() -> GroupHandles {
    let mut handles = Vec::new();
    handles.resize_with(
        VERDICTS.len() * Via::ALL.len() * Reason::ALL.len(),
        OnceLock::new,
    );
    handles.into_boxed_slice()
}

impl Decisions {
    fn new(family: IntCounterVec) -> Decisions {
        let d = Decisions {
            family,
            handles: empty_handles(),
            groups: RwLock::new(Vec::new()),
        };
        for verdict in VERDICTS {
            for via in Via::ALL {
                for reason in Reason::ALL {
                    if decision_possible(verdict, reason) {
                        d.handle(verdict, via, reason);
                    }
                }
            }
        }
        d
    }

    fn slot(verdict: Verdict, via: Via, reason: Reason) -> usize {
        let v = VERDICTS.iter().position(|&x| x == verdict).unwrap_or(0);
        let w = Via::ALL.iter().position(|&x| x == via).unwrap_or(0);
        let r = Reason::ALL.iter().position(|&x| x == reason).unwrap_or(0);
        (v * Via::ALL.len() + w) * Reason::ALL.len() + r
    }

    #[inline]
    fn handle(&self, verdict: Verdict, via: Via, reason: Reason) -> &IntCounter {
        self.handles[Self::slot(verdict, via, reason)].get_or_init(|| {
            self.family
                .with_label_values(&[verdict.as_str(), via.as_str(), reason.as_str(), ""])
        })
    }

    /// The handles of a named group, made on first use.
    fn group(&self, group: &str) -> Arc<GroupHandles> {
        let found = (self.groups.read()).ok().and_then(|g| {
            g.iter()
                .find(|(n, _)| &**n == group)
                .map(|(_, h)| h.clone())
        });
        if let Some(h) = found {
            return h;
        }
        let mut groups = self.groups.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, h)) = groups.iter().find(|(n, _)| &**n == group) {
            return h.clone();
        }
        let h = Arc::new(empty_handles());
        groups.push((group.into(), h.clone()));
        h
    }

    /// Counts one decision for a client in `group` (`""`: in none).
    fn count(&self, verdict: Verdict, via: Via, reason: Reason, group: &str) {
        if group.is_empty() {
            self.handle(verdict, via, reason).inc();
            return;
        }
        let labels = [verdict.as_str(), via.as_str(), reason.as_str(), group];
        (self.group(group)[Self::slot(verdict, via, reason)])
            .get_or_init(|| self.family.with_label_values(&labels))
            .inc();
    }

    /// Decisions counted for this combination, over every group.
    fn counted(&self, verdict: Verdict, via: Via, reason: Reason) -> u64 {
        let slot = Self::slot(verdict, via, reason);
        let groups = self.groups.read().map(|g| {
            g.iter()
                .filter_map(|(_, h)| h[slot].get().map(IntCounter::get))
                .sum::<u64>()
        });
        self.handle(verdict, via, reason).get() + groups.unwrap_or(0)
    }
}

/// A listener, for per-listener families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Explicit proxy.
    Proxy,
    /// Transparent listener.
    Transparent,
}

impl Listener {
    /// Every listener, in declaration order.
    pub const ALL: [Listener; 2] = [Listener::Proxy, Listener::Transparent];

    /// Label form.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Transparent => "transparent",
        }
    }
}

/// Defines a label enum: its variants with their label strings, `ALL`
/// (declaration order) and `as_str`.
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$(stringify!($variant)),+].len()] = [$($name::$variant,)+];

            /// Label form.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

label_enum! {
    /// Why a client connection was refused before any request: the `reason`
    /// label of `connections_rejected_total`.
    RejectReason {
        /// The client is outside `[clients] allow`.
        ClientNotAllowed => "client_not_allowed",
        /// The listener's (or the client's) connection limit is reached.
        Limit => "limit",
    }
}

label_enum! {
    /// Which way bytes went: the `direction` label of `bytes_total`.
    ByteDirection {
        /// Client to upstream.
        Upload => "upload",
        /// Upstream to client.
        Download => "download",
    }
}

label_enum! {
    /// An upstream failure as its RFC 9209 Proxy-Status error type: the
    /// `error` label of `upstream_errors_total`.
    UpstreamError {
        /// Resolving the name failed.
        DnsError => "dns_error",
        /// The upstream refused the connection.
        ConnectionRefused => "connection_refused",
        /// The upstream did not answer in time.
        ConnectionTimeout => "connection_timeout",
        /// A resolved address is refused by the IP rules or the built-in deny-list.
        DestinationIpProhibited => "destination_ip_prohibited",
        /// The upstream was unreachable (no route, reset, ...).
        DestinationUnavailable => "destination_unavailable",
        /// The upstream's answer to a forwarded request was not valid HTTP.
        HttpProtocolError => "http_protocol_error",
    }
}

label_enum! {
    /// How a DNS lookup ended: the `result` label of `dns_lookups_total`.
    DnsResult {
        /// Resolved.
        Ok => "ok",
        /// Answered from the cache.
        Cached => "cached",
        /// Answered from `[resolve]`.
        Static => "static",
        /// The name does not exist.
        Nxdomain => "nxdomain",
        /// The lookup failed.
        Error => "error",
    }
}

label_enum! {
    /// How the DNS listener answered: the `result` label of `dns_queries_total`.
    DnsAnswer {
        /// The resolvers' answer, for a name a rule allows.
        Answered => "answered",
        /// The same, from the listener's cache (within the answer's TTL).
        Cached => "cached",
        /// A name no rule allows, or a query type only tunnels use: refused.
        Refused => "refused",
        /// The name does not exist (or has no records of that type).
        Nxdomain => "nxdomain",
        /// The resolvers failed (timeout, SERVFAIL).
        Servfail => "servfail",
        /// Not a DNS query the listener serves (malformed, not QUERY, not one question).
        Malformed => "malformed",
    }
}

label_enum! {
    /// Which names disagreed: the `kind` label of `tls_name_mismatch_total`.
    NameMismatch {
        /// CONNECT authority vs TLS SNI (domain fronting).
        ConnectSni => "connect_sni",
        /// Request URI vs `Host`.
        HostUri => "host_uri",
        /// Transparent: SNI vs the original destination.
        SniDestination => "sni_destination",
        /// Transparent: `Host` vs the original destination.
        HostDestination => "host_destination",
    }
}

label_enum! {
    /// How a config reload ended: the `result` label of `config_reloads_total`.
    ReloadResult {
        /// The new policy is in force.
        Success => "success",
        /// The old policy was kept.
        Failure => "failure",
    }
}

/// The denied-destination family with a bounded number of hosts: the first
/// `max` distinct `(host, port)` pairs get their own series, later ones are
/// folded into `host="__other__"`. A client spraying random names cannot
/// grow memory or the scrape without bound.
pub struct DeniedHosts {
    family: IntCounterVec,
    /// Keyed by host, port and client group.
    seen: DashMap<(Box<str>, u16, Box<str>), IntCounter>,
    other: IntCounter,
    max: AtomicUsize,
    /// Slots taken in `seen` (reserved before inserting).
    reserved: AtomicUsize,
}

impl DeniedHosts {
    /// Counts one denial of `host:port` for a client in no group.
    pub fn record(&self, host: &str, port: u16) {
        self.record_in(host, port, "");
    }

    /// Counts one denial of `host:port` for a client in `group` (`""`: none).
    pub fn record_in(&self, host: &str, port: u16, group: &str) {
        let key = (Box::from(host), port, Box::from(group));
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
                let counter =
                    (self.family).with_label_values(&[host, port.to_string().as_str(), group]);
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
    decisions: Decisions,
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
    /// `dns_queries_total{result}`: the DNS listener's answers.
    pub dns_queries: IntCounterVec,
    /// Its series, one per [`DnsAnswer`] in `ALL` order: counting a query
    /// neither hashes nor locks.
    dns_answers: Vec<IntCounter>,
    /// `dns_learned_addresses`: pairs the learned table holds.
    pub dns_learned: IntGauge,
    /// `dns_learned_evicted_total`: pairs the size limit pushed out.
    pub dns_learned_evicted: IntCounter,
    /// `dns_udp_set_runs_total{result}`: `nft` runs that wrote learned UDP
    /// addresses into the ruleset's sets (`ok`, `failed`).
    pub dns_udp_set_runs: IntCounterVec,
    /// `dns_udp_set_elements_total{result}`: `address . port` elements
    /// written, or dropped (queue or table full).
    pub dns_udp_set_elements: IntCounterVec,
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
    /// 1 while `/readyz` answers 200 (updated on every `/readyz` and scrape).
    pub ready: IntGauge,
    /// The service tags file in force, exported at scrape time by the
    /// service tags families (none while no file is loaded).
    service_tags: Arc<ArcSwapOption<TagsFile>>,
    /// `config_info{sha256}`: which config the gateway runs.
    pub config_info: IntGaugeVec,
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

/// The decision families: decisions, denied destinations, client denials,
/// and connections cut because names disagree.
struct DecisionFamilies {
    decisions: Decisions,
    denied: DeniedHosts,
    client_denials: IntCounterVec,
    tls_name_mismatch: IntCounterVec,
}

fn register_decisions(r: &Registry, max_denied_hosts: usize) -> DecisionFamilies {
    let decisions = Decisions::new(counter_vec(
        r,
        "decisions_total",
        "Policy decisions by action, how the destination was learnt, reason, and the client's group.",
        &["action", "via", "reason", "client_group"],
    ));
    let denied_family = counter_vec(
        r,
        "denied_destinations_total",
        "Denied destinations by host, port and the client's group; hosts beyond the tracked maximum are folded into __other__.",
        &["host", "port", "client_group"],
    );
    let other = denied_family.with_label_values(&["__other__", "", ""]);
    let tls_name_mismatch = counter_vec(
        r,
        "tls_name_mismatch_total",
        "Connections cut because names disagree (domain fronting, Host vs URI, SNI vs destination).",
        &["kind"],
    );
    for kind in NameMismatch::ALL {
        tls_name_mismatch.with_label_values(&[kind.as_str()]);
    }
    DecisionFamilies {
        decisions,
        denied: DeniedHosts {
            family: denied_family,
            seen: DashMap::new(),
            other,
            max: AtomicUsize::new(max_denied_hosts),
            reserved: AtomicUsize::new(0),
        },
        client_denials: counter_vec(
            r,
            "client_denials_total",
            "Denials by the [clients] allow CIDR the client matched.",
            &["client_subnet"],
        ),
        tls_name_mismatch,
    }
}

/// The per-listener connection families.
struct ConnectionFamilies {
    active: IntGaugeVec,
    total: IntCounterVec,
    limit: IntGaugeVec,
    rejected: IntCounterVec,
}

fn register_connections(r: &Registry) -> ConnectionFamilies {
    let rejected = counter_vec(
        r,
        "connections_rejected_total",
        "Client connections refused before any request.",
        &["listener", "reason"],
    );
    for listener in Listener::ALL {
        for reason in RejectReason::ALL {
            rejected.with_label_values(&[listener.as_str(), reason.as_str()]);
        }
    }
    ConnectionFamilies {
        active: gauge_vec(
            r,
            "connections_active",
            "Open client connections.",
            &["listener"],
        ),
        total: counter_vec(
            r,
            "connections_total",
            "Accepted client connections.",
            &["listener"],
        ),
        limit: gauge_vec(
            r,
            "connections_limit",
            "Configured maximum of concurrent client connections.",
            &["listener"],
        ),
        rejected,
    }
}

fn register_bytes(r: &Registry) -> IntCounterVec {
    let bytes = counter_vec(
        r,
        "bytes_total",
        "Bytes relayed: upload is client to upstream.",
        &["direction"],
    );
    for direction in ByteDirection::ALL {
        bytes.with_label_values(&[direction.as_str()]);
    }
    bytes
}

/// The upstream connect-time histogram and the upstream error counter.
fn register_upstream(r: &Registry) -> (Histogram, IntCounterVec) {
    let connect = Histogram::with_opts(
        HistogramOpts::new(
            "upstream_connect_duration_seconds",
            "Time to establish upstream TCP connections, including Happy Eyeballs fallbacks.",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
    )
    .expect("valid histogram");
    r.register(Box::new(connect.clone()))
        .expect("metric registered once");
    let errors = counter_vec(
        r,
        "upstream_errors_total",
        "Upstream failures by Proxy-Status error.",
        &["error"],
    );
    for error in UpstreamError::ALL {
        errors.with_label_values(&[error.as_str()]);
    }
    (connect, errors)
}

/// The DNS families: the gateway's own lookups, the DNS listener's answers
/// and the addresses it learned.
struct DnsFamilies {
    lookups: IntCounterVec,
    queries: IntCounterVec,
    learned: IntGauge,
    learned_evicted: IntCounter,
    udp_set_runs: IntCounterVec,
    udp_set_elements: IntCounterVec,
}

fn register_dns(r: &Registry) -> DnsFamilies {
    let lookups = counter_vec(
        r,
        "dns_lookups_total",
        "DNS lookups by result.",
        &["result"],
    );
    for result in DnsResult::ALL {
        lookups.with_label_values(&[result.as_str()]);
    }
    let queries = counter_vec(
        r,
        "dns_queries_total",
        "Queries the DNS listener answered, by how.",
        &["result"],
    );
    for result in DnsAnswer::ALL {
        queries.with_label_values(&[result.as_str()]);
    }
    let udp_set_runs = counter_vec(
        r,
        "dns_udp_set_runs_total",
        "nft runs that added the DNS listener's answers for UDP rules to the ruleset's sets, by result.",
        &["result"],
    );
    for result in ["ok", "failed"] {
        udp_set_runs.with_label_values(&[result]);
    }
    let udp_set_elements = counter_vec(
        r,
        "dns_udp_set_elements_total",
        "address . port elements for UDP rules: written to the ruleset's sets, or dropped (queue or table full).",
        &["result"],
    );
    for result in ["written", "dropped"] {
        udp_set_elements.with_label_values(&[result]);
    }
    DnsFamilies {
        udp_set_runs,
        udp_set_elements,
        lookups,
        queries,
        learned: gauge(
            r,
            "dns_learned_addresses",
            "(address, name) pairs the DNS listener answered and still remembers.",
        ),
        learned_evicted: {
            let c = IntCounter::new(
                "dns_learned_evicted_total",
                "Learned (address, name) pairs pushed out by [dns] max_learned.",
            )
            .expect("valid metric definition");
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        },
    }
}

/// The reload and policy families: reloads, generation, last success,
/// active rules and the config in use.
struct ReloadFamilies {
    reloads: IntCounterVec,
    policy_generation: IntGauge,
    last_reload_success: Gauge,
    last_reload_successful: IntGauge,
    rules: IntGaugeVec,
    config_info: IntGaugeVec,
}

fn register_reload(r: &Registry) -> ReloadFamilies {
    let reloads = counter_vec(
        r,
        "config_reloads_total",
        "Config reloads by result.",
        &["result"],
    );
    for result in ReloadResult::ALL {
        reloads.with_label_values(&[result.as_str()]);
    }
    let last_reload_success = Gauge::new(
        "config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful config load.",
    )
    .expect("valid metric definition");
    r.register(Box::new(last_reload_success.clone()))
        .expect("metric registered once");
    ReloadFamilies {
        reloads,
        policy_generation: gauge(
            r,
            "policy_generation",
            "Generation of the policy in force (1 at start).",
        ),
        last_reload_success,
        last_reload_successful: gauge(
            r,
            "config_last_reload_successful",
            "1 when the last config reload succeeded.",
        ),
        rules: gauge_vec(r, "rules", "Active rules per scenario.", &["scenario"]),
        config_info: gauge_vec(
            r,
            "config_info",
            "The config in force, by the SHA-256 of its file; always 1.",
            &["sha256"],
        ),
    }
}

/// `build_info` (always 1) and, on Linux, the process collector.
/// Build information, the process collector, and readiness (returned).
fn register_info(r: &Registry) -> IntGauge {
    let build_info = gauge_vec(
        r,
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
    gauge(
        r,
        "ready",
        "1 while /readyz answers 200: serving, not draining, and under [admin] require_ruleset the ruleset loaded.",
    )
}

/// The kernel's connection-tracking table, read at every scrape: two
/// gauges while conntrack is loaded, nothing when it is not.
struct Conntrack {
    entries: IntGauge,
    max: IntGauge,
}

impl prometheus::core::Collector for Conntrack {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.entries
            .desc()
            .into_iter()
            .chain(self.max.desc())
            .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some(usage) = crate::conntrack::read() else {
            return Vec::new();
        };
        self.entries.set(usage.entries as i64);
        self.max.set(usage.max as i64);
        self.entries
            .collect()
            .into_iter()
            .chain(self.max.collect())
            .collect()
    }
}

/// Log lines dropped because the log sink stalled, read from the log
/// writer at every scrape.
struct LogDropped(IntCounter);

impl prometheus::core::Collector for LogDropped {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let now = crate::logwriter::dropped();
        self.0.inc_by(now.saturating_sub(self.0.get()));
        self.0.collect()
    }
}

fn register_log(r: &Registry) {
    let dropped = IntCounter::with_opts(prometheus::Opts::new(
        "log_lines_dropped_total",
        "Log lines dropped because the log sink (stderr, journald) did not keep up.",
    ))
    .expect("valid counter");
    r.register(Box::new(LogDropped(dropped)))
        .expect("log counter registers once");
}

/// The ruleset's packet counters, from the file the counters unit writes.
struct RulesetCounters {
    packets: IntCounterVec,
    written: Gauge,
}

impl prometheus::core::Collector for RulesetCounters {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.packets
            .desc()
            .into_iter()
            .chain(self.written.desc())
            .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some((counters, written)) = crate::ruleset::read() else {
            return Vec::new();
        };
        // The kernel's totals, as they are (a ruleset reload resets them,
        // which Prometheus' rate() handles like any counter reset).
        self.packets.reset();
        for c in &counters {
            self.packets
                .with_label_values(&[c.name.as_str(), c.action])
                .inc_by(c.packets);
        }
        let at = written
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.written.set(at);
        self.packets
            .collect()
            .into_iter()
            .chain(self.written.collect())
            .collect()
    }
}

fn register_ruleset(r: &Registry) {
    let packets = IntCounterVec::new(
        prometheus::Opts::new(
            "ruleset_packets_total",
            "Packets counted by the nftables forward chain, by counter and what the rule does (drop, accept).",
        ),
        &["counter", "action"],
    )
    .expect("valid counter");
    let written = Gauge::with_opts(prometheus::Opts::new(
        "ruleset_counters_timestamp_seconds",
        "When the ruleset counters were last read from the kernel (Unix time).",
    ))
    .expect("valid gauge");
    r.register(Box::new(RulesetCounters { packets, written }))
        .expect("ruleset counters register once");
}

/// The service tags file in force (set on every load) and the refresh
/// timer's last outcome (its status file, read at each scrape like the
/// ruleset counters). No series while no tags file is loaded, so an age
/// alert cannot fire on a gateway that uses none.
struct ServiceTagsFamilies {
    file: Arc<ArcSwapOption<TagsFile>>,
    change: IntGauge,
    modified: Gauge,
    info: IntGaugeVec,
    refresh_ok: IntGauge,
    refresh_finished: Gauge,
}

/// Unix seconds of `t` (0 before 1970).
fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl prometheus::core::Collector for ServiceTagsFamilies {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.change.desc();
        d.extend(self.modified.desc());
        d.extend(self.info.desc());
        d.extend(self.refresh_ok.desc());
        d.extend(self.refresh_finished.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some(file) = self.file.load_full() else {
            return Vec::new();
        };
        self.change.set(file.change_number as i64);
        let mut out = self.change.collect();
        if let Some(at) = file.modified {
            self.modified.set(unix_seconds(at));
            out.extend(self.modified.collect());
        }
        self.info.reset();
        let path = file.path.display().to_string();
        self.info.with_label_values(&[&file.cloud, &path]).set(1);
        out.extend(self.info.collect());
        if let Some(status) = RefreshStatus::read(&file) {
            self.refresh_ok.set(i64::from(status.ok));
            self.refresh_finished
                .set(unix_seconds(status.finished_at()));
            out.extend(self.refresh_ok.collect());
            out.extend(self.refresh_finished.collect());
        }
        out
    }
}

fn register_service_tags(r: &Registry) -> Arc<ArcSwapOption<TagsFile>> {
    let gauge =
        |name: &str, help: &str| IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge");
    let time =
        |name: &str, help: &str| Gauge::with_opts(Opts::new(name, help)).expect("valid gauge");
    let file = Arc::new(ArcSwapOption::empty());
    let families = ServiceTagsFamilies {
        file: file.clone(),
        change: gauge(
            "service_tags_change_number",
            "changeNumber of the service tags file in use.",
        ),
        modified: time(
            "service_tags_timestamp_seconds",
            "Modification time (Unix) of the service tags file in use, read when it was loaded; its age is time() minus this.",
        ),
        info: IntGaugeVec::new(
            Opts::new(
                "service_tags_info",
                "The service tags file in use, by cloud and path; always 1.",
            ),
            &["cloud", "path"],
        )
        .expect("valid gauge"),
        refresh_ok: gauge(
            "service_tags_last_refresh_successful",
            "1 when the service tags refresh timer's last run replaced the file and reloaded the gateway, 0 when it failed (from FILE.status).",
        ),
        refresh_finished: time(
            "service_tags_last_refresh_timestamp_seconds",
            "When the service tags refresh timer's last run ended (Unix time, from FILE.status).",
        ),
    };
    r.register(Box::new(families))
        .expect("service tags families register once");
    file
}

fn register_conntrack(r: &Registry) {
    let gauge = |name: &str, help: &str| {
        IntGauge::with_opts(prometheus::Opts::new(name, help)).expect("valid gauge")
    };
    let collector = Conntrack {
        entries: gauge(
            "conntrack_entries",
            "Entries in the kernel's connection-tracking table (nf_conntrack_count).",
        ),
        max: gauge(
            "conntrack_max",
            "Size of the kernel's connection-tracking table (nf_conntrack_max).",
        ),
    };
    r.register(Box::new(collector))
        .expect("conntrack gauges register once");
}

impl Metrics {
    /// Registers every family in a new registry. Every series whose labels
    /// are known up front is created at 0, so the first event after a start
    /// is visible to `rate()` and `increase()`.
    pub fn new(max_denied_hosts: usize) -> Metrics {
        let r = Registry::new_custom(Some("portcullis".into()), None).expect("valid prefix");
        let decisions = register_decisions(&r, max_denied_hosts);
        let connections = register_connections(&r);
        let bytes = register_bytes(&r);
        let (upstream_connect, upstream_errors) = register_upstream(&r);
        let dns = register_dns(&r);
        let reload = register_reload(&r);
        let ready = register_info(&r);
        register_conntrack(&r);
        register_log(&r);
        register_ruleset(&r);
        let service_tags = register_service_tags(&r);
        Metrics {
            decisions: decisions.decisions,
            denied: decisions.denied,
            client_denials: decisions.client_denials,
            connections_active: connections.active,
            connections_total: connections.total,
            connections_limit: connections.limit,
            connections_rejected: connections.rejected,
            bytes,
            upstream_connect,
            upstream_errors,
            dns_lookups: dns.lookups,
            dns_answers: (DnsAnswer::ALL.iter())
                .map(|a| dns.queries.with_label_values(&[a.as_str()]))
                .collect(),
            dns_queries: dns.queries,
            dns_learned: dns.learned,
            dns_learned_evicted: dns.learned_evicted,
            dns_udp_set_runs: dns.udp_set_runs,
            dns_udp_set_elements: dns.udp_set_elements,
            tls_name_mismatch: decisions.tls_name_mismatch,
            reloads: reload.reloads,
            policy_generation: reload.policy_generation,
            last_reload_success: reload.last_reload_success,
            last_reload_successful: reload.last_reload_successful,
            rules: reload.rules,
            service_tags,
            config_info: reload.config_info,
            ready,
            registry: r,
        }
    }

    /// Counts a decision for a client in no group. No allocation, no
    /// hashing: handles of every [possible](decision_possible) combination
    /// are resolved at start.
    #[inline]
    pub fn decision(&self, verdict: Verdict, via: Via, reason: Reason) {
        self.decisions.handle(verdict, via, reason).inc();
    }

    /// Counts a decision for a client whose `client_group` label is `group`
    /// (`""`: in no group, as [`Metrics::decision`]).
    #[inline]
    pub fn decision_in(&self, verdict: Verdict, via: Via, reason: Reason, group: &str) {
        self.decisions.count(verdict, via, reason, group);
    }

    /// Counts one answer of the DNS listener.
    #[inline]
    pub fn dns_answered(&self, answer: DnsAnswer) {
        if let Some(i) = DnsAnswer::ALL.iter().position(|a| *a == answer) {
            self.dns_answers[i].inc();
        }
    }

    /// How many decisions were counted for this combination, every group together.
    pub fn decisions_counted(&self, verdict: Verdict, via: Via, reason: Reason) -> u64 {
        self.decisions.counted(verdict, via, reason)
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
        self.service_tags
            .store(policy.service_tags_file().cloned().map(Arc::new));
        // One series: the config in force now.
        self.config_info.reset();
        self.config_info
            .with_label_values(&[policy.config_sha256()])
            .set(1);
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
    fn conntrack_gauges_follow_the_kernel_table() {
        let text = Metrics::new(10).render();
        match crate::conntrack::read() {
            Some(usage) => {
                assert!(
                    text.contains("# TYPE portcullis_conntrack_entries gauge"),
                    "{text}"
                );
                let max = format!("portcullis_conntrack_max {}", usage.max);
                assert!(text.contains(&max), "{max} missing");
            }
            None => assert!(!text.contains("portcullis_conntrack"), "{text}"),
        }
    }

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
            text.contains("portcullis_denied_destinations_total{client_group=\"\",host=\"__other__\",port=\"\"} 990"),
            "{text}"
        );
        assert!(text.contains(
            "portcullis_denied_destinations_total{client_group=\"\",host=\"spray0.example.com\",port=\"443\"} 2"
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
    fn fixed_label_sets_start_at_zero() {
        let text = Metrics::new(10).render();
        let mut expected: Vec<String> = Vec::new();
        for l in Listener::ALL {
            for r in RejectReason::ALL {
                expected.push(format!(
                    "portcullis_connections_rejected_total{{listener=\"{}\",reason=\"{}\"}} 0",
                    l.as_str(),
                    r.as_str()
                ));
            }
        }
        let single: [(&str, &str, Vec<&str>); 5] = [
            (
                "bytes_total",
                "direction",
                ByteDirection::ALL.map(ByteDirection::as_str).to_vec(),
            ),
            (
                "upstream_errors_total",
                "error",
                UpstreamError::ALL.map(UpstreamError::as_str).to_vec(),
            ),
            (
                "dns_lookups_total",
                "result",
                DnsResult::ALL.map(DnsResult::as_str).to_vec(),
            ),
            (
                "tls_name_mismatch_total",
                "kind",
                NameMismatch::ALL.map(NameMismatch::as_str).to_vec(),
            ),
            (
                "config_reloads_total",
                "result",
                ReloadResult::ALL.map(ReloadResult::as_str).to_vec(),
            ),
        ];
        for (family, label, values) in single {
            for v in values {
                expected.push(format!("portcullis_{family}{{{label}=\"{v}\"}} 0"));
            }
        }
        for line in expected {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    /// `(action, via, reason)` of every `decisions_total` series in `text`.
    fn decision_series(text: &str) -> Vec<(String, String, String)> {
        let label = |line: &str, name: &str| {
            let start = line.find(&format!("{name}=\"")).expect("label present") + name.len() + 2;
            let len = line[start..].find('"').expect("label closed");
            line[start..start + len].to_string()
        };
        text.lines()
            .filter(|l| l.starts_with("portcullis_decisions_total{"))
            .map(|l| (label(l, "action"), label(l, "via"), label(l, "reason")))
            .collect()
    }

    #[test]
    fn decisions_pre_create_only_possible_series() {
        let series = decision_series(&Metrics::new(10).render());
        for (action, via, reason) in &series {
            assert!(
                action != "allow" || reason == "rule_matched" || reason == "dns_address",
                "impossible series pre-created: action={action} via={via} reason={reason}"
            );
        }
        // Per via: allow × rule_matched and dns_address, and deny,
        // audit_deny × the others.
        let per_via = 2 + 2 * (Reason::ALL.len() - 2);
        assert_eq!(series.len(), Via::ALL.len() * per_via, "{series:?}");
        for verdict in VERDICTS {
            for via in Via::ALL {
                for reason in Reason::ALL {
                    let key = (
                        verdict.as_str().to_string(),
                        via.as_str().to_string(),
                        reason.as_str().to_string(),
                    );
                    let possible = decision_possible(verdict, reason);
                    assert_eq!(series.contains(&key), possible, "{key:?}");
                }
            }
        }
    }

    /// Reasons the test's destinations cannot reach: scenario_disabled needs
    /// a profile scenario, needs_var and needs_service_tags a rule waiting
    /// for a value, needs_dns a name on UDP (listeners see only TCP).
    const BY_HAND: [Reason; 4] = [
        Reason::ScenarioDisabled,
        Reason::NeedsVar,
        Reason::NeedsServiceTags,
        Reason::NeedsDns,
    ];

    /// Every (verdict, reason) the production `decide` gives, in enforce and
    /// audit mode, over destinations meant to reach each reason, plus the
    /// transparent listener's own refusal (deny, malformed_host), has its
    /// series from the start, for every via.
    #[test]
    fn decisions_seen_in_practice_are_pre_created() {
        use crate::config::{Config, Protocol, Source};
        use crate::policy::{CompileInput, Dest, Policy, Target};

        let rules = r#"
[[rule]]
name = "a"
hosts = ["a.test"]
[[rule]]
name = "bad"
hosts = ["bad.test"]
action = "deny"
[[rule]]
name = "udp"
hosts = ["udp.test"]
protocol = "udp"
[[rule]]
name = "net"
cidrs = ["10.1.0.0/16", "203.0.113.0/24"]
"#;
        let mut seen = vec![(Verdict::Deny, Reason::MalformedHost)];
        for mode in ["enforce", "audit"] {
            let source = Source {
                name: "t.toml".into(),
                text: format!("[policy]\nprofile = \"none\"\nmode = \"{mode}\"\n{rules}"),
            };
            let config = Config::parse(&source).expect("test config parses");
            let (policy, _) = Policy::compile(&config, &source, &CompileInput::default())
                .expect("test config compiles");
            for (host, port) in [
                ("a.test", 443),
                ("a.test", 80),
                ("bad.test", 443),
                ("udp.test", 443),
                ("other.test", 443),
                ("bad name!", 443),
                ("10.1.2.3", 443),
                ("10.2.0.1", 443),
                ("127.0.0.1", 443),
                ("169.254.169.254", 80),
                ("203.0.113.9", 443),
                ("198.51.100.1", 443),
            ] {
                let target = Target::parse(host);
                let d = policy.decide(&Dest {
                    target,
                    port,
                    proto: Protocol::Tcp,
                });
                seen.push((d.verdict, d.reason));
            }
        }
        // The destinations reach every reason `decide` gives but BY_HAND's,
        // so this check does not pass vacuously. Those and the data path's
        // cuts are added by hand.
        let by_hand = BY_HAND;
        let reasons: std::collections::HashSet<Reason> = seen.iter().map(|&(_, r)| r).collect();
        let decided = Reason::ALL.iter().filter(|r| !r.is_data_path()).count();
        assert_eq!(reasons.len(), decided - by_hand.len(), "{seen:?}");
        for reason in Reason::ALL.into_iter().filter(|r| r.is_data_path()) {
            let verdict = if reason == Reason::DnsAddress {
                Verdict::Allow
            } else {
                Verdict::Deny
            };
            seen.push((verdict, reason));
        }
        for reason in by_hand {
            seen.push((Verdict::Deny, reason));
            seen.push((Verdict::AuditDeny, reason));
        }
        let series = decision_series(&Metrics::new(10).render());
        for (verdict, reason) in seen {
            for via in Via::ALL {
                let key = (
                    verdict.as_str().to_string(),
                    via.as_str().to_string(),
                    reason.as_str().to_string(),
                );
                assert!(series.contains(&key), "not pre-created: {key:?}");
            }
        }
    }

    #[test]
    fn an_unforeseen_decision_is_still_counted() {
        let m = Metrics::new(10);
        m.decision(Verdict::Allow, Via::Host, Reason::DenyRule);
        m.decision(Verdict::Allow, Via::Host, Reason::DenyRule);
        let text = m.render();
        assert!(
            text.contains(
                "portcullis_decisions_total{action=\"allow\",client_group=\"\",reason=\"deny_rule\",via=\"host\"} 2"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_client_group_is_a_label_of_its_own() {
        let m = Metrics::new(10);
        m.decision_in(Verdict::AuditDeny, Via::Sni, Reason::NoRule, "new-team");
        m.decision_in(Verdict::AuditDeny, Via::Sni, Reason::NoRule, "new-team");
        m.decision_in(Verdict::AuditDeny, Via::Sni, Reason::NoRule, "");
        m.denied.record_in("x.test", 443, "new-team");
        let text = m.render();
        for line in [
            "portcullis_decisions_total{action=\"audit_deny\",client_group=\"new-team\",reason=\"no_rule\",via=\"sni\"} 2",
            "portcullis_decisions_total{action=\"audit_deny\",client_group=\"\",reason=\"no_rule\",via=\"sni\"} 1",
            "portcullis_denied_destinations_total{client_group=\"new-team\",host=\"x.test\",port=\"443\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert_eq!(
            m.decisions_counted(Verdict::AuditDeny, Via::Sni, Reason::NoRule),
            3
        );
    }

    #[test]
    fn decisions_use_labels() {
        let m = Metrics::new(10);
        m.decision(Verdict::AuditDeny, Via::Sni, Reason::NoRule);
        m.decision(Verdict::Allow, Via::Connect, Reason::RuleMatched);
        let text = m.render();
        assert!(
            text.contains(
                "portcullis_decisions_total{action=\"audit_deny\",client_group=\"\",reason=\"no_rule\",via=\"sni\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "portcullis_decisions_total{action=\"allow\",client_group=\"\",reason=\"rule_matched\",via=\"connect\"} 1"
        ));
        assert!(text.contains("portcullis_build_info{version="));
    }
}
