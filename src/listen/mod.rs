//! Listen: accept loops, client admission, limits, and the per-connection log line.
//!
//! In: bound listeners and the shared [`Gateway`]. Out: one task per client
//! connection, handed to `explicit` or `transparent` with its policy snapshot.
//! This is the only orchestrator: it calls classify, policy, upstream and
//! tunnel; none of them call each other. Admission happens before any byte is
//! read: clients outside `[clients] allow` are refused, and the connection
//! caps (per listener and per client address) answer 503 or close instead of
//! queueing without bound.

pub mod access;
pub mod explicit;
pub mod pool;
pub mod transparent;

pub use access::AccessLog;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use ipnet::IpNet;
use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;
use crate::metrics::{Listener, Metrics, Via};
use crate::policy::{Decision, Policy, Verdict};
use crate::shutdown::{Shutdown, TaskGuard};
use crate::tunnel::Counters;
use crate::upstream::Upstream;

/// Everything the listeners share.
pub struct Gateway {
    /// The policy in force; connections take a snapshot at accept.
    pub policy: ArcSwap<Policy>,
    /// Metric families.
    pub metrics: Metrics,
    /// The egress connector.
    pub upstream: Upstream,
    /// Sizes and timeouts (fixed for the process: a restart changes them).
    pub limits: Limits,
    /// Drain state.
    pub shutdown: Shutdown,
    /// Listeners bound and policy loaded.
    pub ready: AtomicBool,
    /// Addresses of our own listeners: a redirected connection to one of them is a loop.
    pub own_addrs: Vec<SocketAddr>,
    /// Access lines as JSON (`[log] format = "json"`), written directly.
    pub json_log: bool,
    /// Keep-alive upstream connections for forwarded plain-HTTP requests (built on first use).
    pub http_client: std::sync::OnceLock<pool::HttpClient>,
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
            upload: metrics.bytes.with_label_values(&["upload"]),
            download: metrics.bytes.with_label_values(&["download"]),
        };
        let listeners = [Listener::Proxy, Listener::Transparent].map(|l| {
            (
                metrics.connections_active.with_label_values(&[l.as_str()]),
                metrics.connections_total.with_label_values(&[l.as_str()]),
            )
        });
        Gateway {
            policy: ArcSwap::from_pointee(policy),
            upstream: Upstream::new(
                limits.dns_cache_entries,
                Duration::from_millis(limits.connect_timeout_ms),
            ),
            metrics,
            limits,
            shutdown: Shutdown::new(),
            ready: AtomicBool::new(false),
            own_addrs,
            json_log: true,
            http_client: std::sync::OnceLock::new(),
            per_client: DashMap::new(),
            bytes,
            listeners,
        }
    }

    /// The byte counters tunnels count into.
    pub fn counters(&self) -> &Counters {
        &self.bytes
    }

    /// A listener's active-connections gauge and total counter.
    fn listener_series(&self, listener: Listener) -> &(IntGauge, IntCounter) {
        match listener {
            Listener::Proxy => &self.listeners[0],
            Listener::Transparent => &self.listeners[1],
        }
    }

    /// Counts a decision, and for denials the destination and client subnet.
    pub fn count_decision(&self, cx: &Conn, via: Via, d: &Decision, host: &str, port: u16) {
        self.metrics.decision(d.verdict, via, d.reason);
        if d.verdict != Verdict::Allow {
            self.metrics.denied.record(host, port);
            self.metrics
                .client_denials
                .with_label_values(&[cx.client_subnet.to_string().as_str()])
                .inc();
        }
    }
}

/// One accepted client connection: who, through which listener, under which policy.
pub struct Conn {
    /// The client's address.
    pub peer: SocketAddr,
    /// The `[clients] allow` CIDR it matched.
    pub client_subnet: IpNet,
    /// Which listener accepted it.
    pub listener: Listener,
    /// Policy snapshot taken at accept.
    pub policy: Arc<Policy>,
    /// When it was accepted.
    pub started: Instant,
    /// Access lines are written as JSON (`[log] format = "json"`).
    pub json_log: bool,
    _guard: ConnGuard,
}

/// Releases a connection's slots when the last user (request handler or
/// tunnel task) drops it.
struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    _task: TaskGuard,
    gw: Arc<Gateway>,
    ip: IpAddr,
    active: IntGauge,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.active.dec();
        if let dashmap::Entry::Occupied(mut e) = self.gw.per_client.entry(self.ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Source address outside `[clients] allow`.
    ClientNotAllowed,
    /// Listener or per-client connection cap reached.
    Limit,
}

impl Refusal {
    /// Label form.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "client_not_allowed",
            Refusal::Limit => "limit",
        }
    }
}

fn admit(
    gw: &Arc<Gateway>,
    listener: Listener,
    peer: SocketAddr,
    slots: &Arc<Semaphore>,
) -> Result<Conn, Refusal> {
    let policy = gw.policy.load_full();
    let Some(subnet) = policy.client_allowed(peer.ip()).copied() else {
        return Err(Refusal::ClientNotAllowed);
    };
    let permit = slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::Limit)?;
    {
        let mut n = gw.per_client.entry(peer.ip()).or_insert(0);
        if *n >= gw.limits.max_connections_per_client {
            return Err(Refusal::Limit);
        }
        *n += 1;
    }
    let (active, total) = gw.listener_series(listener);
    active.inc();
    total.inc();
    let active = active.clone();
    Ok(Conn {
        peer,
        client_subnet: subnet,
        listener,
        policy,
        started: Instant::now(),
        json_log: gw.json_log,
        _guard: ConnGuard {
            _permit: permit,
            _task: gw.shutdown.track(),
            gw: gw.clone(),
            ip: peer.ip(),
            active,
        },
    })
}

/// Accepts until draining starts; each admitted connection runs `handle` in
/// its own task, each refused one `refuse`.
pub async fn accept_loop<H, HF, R, RF>(
    listener: TcpListener,
    kind: Listener,
    gw: Arc<Gateway>,
    handle: H,
    refuse: R,
) where
    H: Fn(TcpStream, Arc<Conn>, Arc<Gateway>) -> HF + Send + Sync + 'static,
    HF: Future<Output = ()> + Send + 'static,
    R: Fn(TcpStream, Refusal) -> RF + Send + Sync + 'static,
    RF: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(gw.limits.max_connections));
    gw.metrics
        .connections_limit
        .with_label_values(&[kind.as_str()])
        .set(gw.limits.max_connections as i64);
    let draining = gw.shutdown.draining();
    tokio::pin!(draining);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = kind.as_str(), error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut draining => return,
        };
        let _ = stream.set_nodelay(true);
        match admit(&gw, kind, peer, &slots) {
            Ok(conn) => {
                tokio::spawn(handle(stream, Arc::new(conn), gw.clone()));
            }
            Err(refusal) => {
                gw.metrics
                    .connections_rejected
                    .with_label_values(&[kind.as_str(), refusal.as_str()])
                    .inc();
                tracing::info!(
                    client = %peer,
                    listener = kind.as_str(),
                    reason = refusal.as_str(),
                    "connection refused"
                );
                tokio::spawn(refuse(stream, refusal));
            }
        }
    }
}

/// Replays the client's already-read bytes upstream, frees their buffer (a
/// sniff buffer held for a tunnel's life would be most of an idle tunnel's
/// memory), relays until the tunnel ends, then writes its log line.
pub async fn relay_and_log(
    gw: &Gateway,
    client: &TcpStream,
    upstream: &TcpStream,
    prefix: bytes::BytesMut,
    mut log: AccessLog<'_>,
) {
    let replayed = prefix.len() as u64;
    if replayed > 0 {
        if crate::tunnel::write_all(upstream, &prefix).await.is_err() {
            log.close = crate::tunnel::CloseReason::UpstreamError.as_str();
            log.emit();
            return;
        }
        gw.counters().upload.inc_by(replayed);
    }
    drop(prefix);
    let stats = crate::tunnel::relay(
        client,
        upstream,
        b"",
        Duration::from_millis(gw.limits.idle_timeout_ms),
        gw.counters(),
        gw.shutdown.cutting(),
    )
    .await;
    log.upload = stats.upload + replayed;
    log.download = stats.download;
    log.close = stats.close.as_str();
    log.emit();
}

/// Logs a denial at decision time, with the command that explains it.
pub fn log_denial(conn: &Conn, via: Via, host: &str, port: u16, d: &Decision) {
    let policy = &conn.policy;
    tracing::info!(
        target: "portcullis::deny",
        client = %conn.peer,
        via = via.as_str(),
        host,
        port,
        verdict = d.verdict.as_str(),
        rule = d.rule.map(|r| policy.rule(r).name.as_str()).unwrap_or("-"),
        reason = d.reason.as_str(),
        explain = %format!("portcullis explain {host}:{port}"),
        "{}",
        policy.explain(d)
    );
}

/// A complete HTTP/1.1 response with `Proxy-Status` (RFC 9209), for paths
/// that answer outside hyper (refused connections, transparent HTTP).
pub fn raw_response(status_line: &str, error: &str, details: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status_line}\r\nProxy-Status: portcullis; error={error}; details=\"{details}\"\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
