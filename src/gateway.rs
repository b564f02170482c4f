//! Gateway: the runtime state every listener, the admin endpoint and reload share.
//!
//! In: a compiled policy, the `[limits]` section, the bound listener
//! addresses. Out: one [`Gateway`] behind an `Arc`, built here and only here.
//! It holds state and the counters every connection touches; it decides
//! nothing and does no I/O of its own.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use ipnet::IpNet;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Semaphore;

use crate::config::Limits;
use crate::learned::Learned;
use crate::metrics::{ByteDirection, Listener, Metrics, NameMismatch, UpstreamError, Via};
use crate::nftset::{self, NftSets};
use crate::policy::{Decision, Policy, Reason, Verdict};

/// The longest valid host name (RFC 1035 §2.3.4, without the trailing dot).
pub const MAX_NAME: usize = 253;
/// The denied-destination label of every malformed name.
pub const MALFORMED_LABEL: &str = "__malformed__";
use crate::shutdown::Shutdown;
use crate::tunnel::Counters;
use crate::upstream::Upstream;
use crate::upstream::pool::{self, HttpClient};

/// Everything the listeners share.
pub struct Gateway {
    /// The policy in force; connections take a snapshot at accept.
    pub policy: Arc<ArcSwap<Policy>>,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// The egress connector.
    pub upstream: Arc<Upstream>,
    /// Addresses the DNS listener answered, with their names.
    pub learned: Learned,
    /// Where the learned addresses of UDP name rules go: the ruleset's sets.
    pub nftset: NftSets,
    /// Sizes and timeouts (fixed for the process: a restart changes them).
    pub limits: Limits,
    /// Drain state.
    pub shutdown: Shutdown,
    /// Listeners bound and policy loaded.
    pub ready: AtomicBool,
    /// `/readyz` also requires the transparent ruleset (`[admin]
    /// require_ruleset`; a reload applies it).
    pub require_ruleset: AtomicBool,
    /// What the last `/readyz` found of the ruleset, so each flip is logged once.
    pub ruleset_seen: AtomicBool,
    /// Addresses of our own listeners: a redirected connection to one of them is a loop.
    pub own_addrs: Vec<SocketAddr>,
    /// Access lines as JSON (`[log] format = "json"`), written directly.
    pub json_log: bool,
    /// Keep-alive upstream connections for forwarded plain-HTTP requests (built on first use).
    http_client: OnceLock<HttpClient>,
    /// Client connections the open-file limit leaves room for, across
    /// listeners ([`crate::spare::connection_budget`]); past it a client
    /// gets the connection-limit refusal.
    pub connection_budget: usize,
    /// Slots of that budget (each admitted connection holds one).
    pub descriptors: Arc<Semaphore>,
    /// Open connections per client address (`[limits] max_connections_per_client`).
    per_client: DashMap<IpAddr, usize>,
    /// Series every connection touches, resolved once (a label lookup is a
    /// hash and a lock): bytes each way, and per listener (proxy,
    /// transparent) the active gauge and total counter.
    bytes: Counters,
    listeners: [(IntGauge, IntCounter); 2],
}

impl Gateway {
    /// A gateway around a compiled policy; `own_addrs` are the bound listener addresses.
    pub fn new(policy: Policy, limits: Limits, own_addrs: Vec<SocketAddr>) -> Gateway {
        let metrics = Metrics::new(limits.max_denied_hosts);
        metrics.policy_loaded(&policy);
        let bytes = Counters {
            upload: metrics
                .bytes
                .with_label_values(&[ByteDirection::Upload.as_str()]),
            download: metrics
                .bytes
                .with_label_values(&[ByteDirection::Download.as_str()]),
        };
        let listeners = [Listener::Proxy, Listener::Transparent].map(|l| {
            (
                metrics.connections_active.with_label_values(&[l.as_str()]),
                metrics.connections_total.with_label_values(&[l.as_str()]),
            )
        });
        let budget = crate::spare::connection_budget()
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        // `[dns] servers` and the table's size are read once: a change needs a restart.
        let upstream = Arc::new(Upstream::new(
            limits.dns_cache_entries,
            Duration::from_millis(limits.connect_timeout_ms),
            policy.dns_servers(),
        ));
        let learned = Learned::new(policy.dns().max_learned);
        let nftset = udp_sets(&metrics, policy.dns().max_learned);
        Gateway {
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            upstream,
            learned,
            nftset,
            metrics: Arc::new(metrics),
            limits,
            shutdown: Shutdown::new(),
            ready: AtomicBool::new(false),
            require_ruleset: AtomicBool::new(false),
            ruleset_seen: AtomicBool::new(true),
            own_addrs,
            json_log: true,
            http_client: OnceLock::new(),
            per_client: DashMap::new(),
            connection_budget: budget,
            descriptors: Arc::new(Semaphore::new(budget)),
            bytes,
            listeners,
        }
    }

    /// The byte counters tunnels count into.
    pub fn counters(&self) -> &Counters {
        &self.bytes
    }

    /// The pooling client for forwarded plain-HTTP requests (built on first use).
    pub fn http_client(&self) -> &HttpClient {
        self.http_client.get_or_init(|| {
            pool::client(
                self.policy.clone(),
                self.upstream.clone(),
                self.metrics.clone(),
            )
        })
    }

    /// A listener's active-connections gauge and total counter.
    pub fn listener_series(&self, listener: Listener) -> &(IntGauge, IntCounter) {
        match listener {
            Listener::Proxy => &self.listeners[0],
            Listener::Transparent => &self.listeners[1],
        }
    }

    /// Takes one of `ip`'s connection slots; false when it has none left.
    pub fn take_client_slot(&self, ip: IpAddr) -> bool {
        let mut n = self.per_client.entry(ip).or_insert(0);
        if *n >= self.limits.max_connections_per_client {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a slot taken by [`Gateway::take_client_slot`].
    pub fn release_client_slot(&self, ip: IpAddr) {
        if let dashmap::Entry::Occupied(mut e) = self.per_client.entry(ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Counts an upstream failure.
    pub fn count_upstream_error(&self, error: UpstreamError) {
        self.metrics
            .upstream_errors
            .with_label_values(&[error.as_str()])
            .inc();
    }

    /// Counts two names that disagreed (a cut or refused connection).
    pub fn count_name_mismatch(&self, kind: NameMismatch) {
        self.metrics
            .tls_name_mismatch
            .with_label_values(&[kind.as_str()])
            .inc();
    }

    /// Counts a decision (with the client's `client_group` label), and for
    /// denials the destination and client subnet.
    pub fn count_decision(
        &self,
        client_subnet: &IpNet,
        client_group: &str,
        via: Via,
        d: &Decision,
        host: &str,
        port: u16,
    ) {
        self.metrics
            .decision_in(d.verdict, via, d.reason, client_group);
        if d.verdict != Verdict::Allow {
            // A malformed name may be any length: one bucket, never the name.
            let label = if d.reason == Reason::MalformedHost || host.len() > MAX_NAME {
                MALFORMED_LABEL
            } else {
                host
            };
            self.metrics.denied.record_in(label, port, client_group);
            self.metrics
                .client_denials
                .with_label_values(&[client_subnet.to_string().as_str()])
                .inc();
        }
    }
}

/// The writer of learned UDP addresses, counting into `metrics`: it holds
/// at most 4 elements (address, port) per learned pair.
fn udp_sets(metrics: &Metrics, max_learned: usize) -> NftSets {
    let runs = |r: &str| metrics.dns_udp_set_runs.with_label_values(&[r]);
    let elements = |r: &str| metrics.dns_udp_set_elements.with_label_values(&[r]);
    let counters = nftset::Counters {
        runs_ok: runs("ok"),
        runs_failed: runs("failed"),
        written: elements("written"),
        dropped: elements("dropped"),
    };
    NftSets::new("nft", max_learned.saturating_mul(4), counters)
}
