//! Upstream: resolve, check every address, dial. The only place that opens egress sockets.
//!
//! In: an allowed destination as a [`DialPlan`] (a name or an address, or a
//! transparent connection's original destination to verify) and a port, and
//! the policy snapshot the connection decided with. Out: a connected
//! `TcpStream` and the address it reached, or a [`ConnectError`] that maps to
//! one answer (`listen::respond`). Dialling is private to this module: every
//! socket it opens went through the address check of [`Upstream::connect`].
//!
//! Names are resolved once: first the static `[resolve]` table, then a TTL
//! cache, then DNS (hickory, honouring `/etc/resolv.conf`). Every address is
//! filtered through `Policy::check_resolved` (guarded ranges, platform
//! addresses, deny rules), and exactly the remaining addresses are dialled,
//! never the name, so DNS rebinding cannot swap them. Dialling follows Happy
//! Eyeballs (RFC 8305): families interleaved, a new attempt every 250 ms or as
//! soon as one fails, the first success wins, all under one timeout.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hickory_resolver::TokioResolver;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, Record, RecordType};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

use crate::config::Protocol;
use crate::metrics::{DnsResult, Metrics, UpstreamError};
use crate::policy::{Client, Policy, Reason, Target};

pub mod pool;

/// RFC 8305 §5: "Connection Attempt Delay", recommended 250 ms.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);
/// Answers are cached at least this long (a zero TTL would make every tunnel a lookup)...
const MIN_TTL: Duration = Duration::from_secs(5);
/// ...and at most this long, so a changed record is picked up.
const MAX_TTL: Duration = Duration::from_secs(300);
/// Negative answers (NXDOMAIN, no records) are cached this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// One Happy Eyeballs connection attempt in flight.
type Attempt = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

/// Why no upstream connection was made. Each variant has one RFC 9209 error token.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Every resolved address was refused by policy (guarded, platform or denied).
    #[error("every address of {name} is refused ({addrs})")]
    Prohibited {
        /// The name or address asked for.
        name: String,
        /// The refused addresses, comma-separated.
        addrs: String,
        /// Why the first one was refused.
        reason: Reason,
    },
    /// The name does not exist or has no A/AAAA records.
    #[error("{0} does not resolve (NXDOMAIN or no address records)")]
    NotFound(String),
    /// The resolver failed (timeout, SERVFAIL, no nameserver).
    #[error("DNS lookup for {name} failed: {message}")]
    Dns {
        /// Name.
        name: String,
        /// Resolver message.
        message: String,
    },
    /// Every address refused the connection.
    #[error("connection refused by {0}")]
    Refused(String),
    /// No address answered within the connect timeout.
    #[error("no answer from {0} within the connect timeout")]
    Timeout(String),
    /// `upstream = "verify"`: the original destination is not among the
    /// name's (allowed) addresses, so the SNI or Host may be forged.
    #[error("{name} does not resolve to {addr} (upstream = \"verify\")")]
    NotAmong {
        /// The name decided on.
        name: String,
        /// The original destination.
        addr: IpAddr,
    },
    /// Every address failed otherwise (unreachable network or host).
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        /// Last address tried.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ConnectError {
    /// RFC 9209 `Proxy-Status` error token; also the `error` label.
    pub fn as_str(&self) -> &'static str {
        match self {
            ConnectError::Prohibited { .. } => "destination_ip_prohibited",
            ConnectError::NotFound(_) => "dns_error",
            ConnectError::Dns { .. } => "dns_error",
            ConnectError::Refused(_) => "connection_refused",
            ConnectError::Timeout(_) => "connection_timeout",
            ConnectError::NotAmong { .. } => "http_request_denied",
            ConnectError::Unreachable { .. } => "destination_unavailable",
        }
    }

    /// Whether the gateway refused (an address check, a name that does not
    /// resolve, a forged name), rather than the destination failing to answer.
    pub fn is_refusal(&self) -> bool {
        match self {
            ConnectError::Prohibited { .. }
            | ConnectError::NotAmong { .. }
            | ConnectError::NotFound(_)
            | ConnectError::Dns { .. } => true,
            ConnectError::Refused(_)
            | ConnectError::Timeout(_)
            | ConnectError::Unreachable { .. } => false,
        }
    }

    /// The `error` label it counts under in `upstream_errors_total`; None
    /// for a forged name under `verify`, which counts as a name mismatch.
    pub fn label(&self) -> Option<UpstreamError> {
        match self {
            ConnectError::Prohibited { .. } => Some(UpstreamError::DestinationIpProhibited),
            ConnectError::NotFound(_) | ConnectError::Dns { .. } => Some(UpstreamError::DnsError),
            ConnectError::Refused(_) => Some(UpstreamError::ConnectionRefused),
            ConnectError::Timeout(_) => Some(UpstreamError::ConnectionTimeout),
            ConnectError::NotAmong { .. } => None,
            ConnectError::Unreachable { .. } => Some(UpstreamError::DestinationUnavailable),
        }
    }
}

/// Which addresses a connection may be dialled at.
#[derive(Debug, Clone, Copy)]
pub enum DialPlan<'a> {
    /// A name (resolved) or a literal (as given): every address the policy
    /// accepts is tried (`upstream = "resolve"`, the explicit proxy, and
    /// transparent connections decided by address).
    Target(Target<'a>),
    /// `upstream = "verify"`: the original destination, only when it is
    /// among the name's accepted addresses.
    Verify {
        /// The name decided on (normalised).
        name: &'a str,
        /// The transparent connection's original destination.
        original: IpAddr,
    },
    /// `upstream = "original"`: the original destination as is, after the
    /// address check (spoofable; for split-horizon DNS).
    Original(IpAddr),
}

#[derive(Clone)]
enum Cached {
    Addrs(Arc<[IpAddr]>),
    NotFound,
}

struct Entry {
    answer: Cached,
    expires: Instant,
}

/// Records of one name and type, and until when they hold.
type Records = (Arc<[Record]>, Instant);

/// Resolves and dials. One per process; shared by every listener.
pub struct Upstream {
    resolver: OnceCell<Option<TokioResolver>>,
    servers: Vec<SocketAddr>,
    cache: DashMap<String, Entry>,
    /// What the DNS listener forwarded, by name and type, until it expires.
    records: DashMap<(Name, RecordType), Records>,
    cache_max: usize,
    connect_timeout: Duration,
}

impl Upstream {
    /// A connector with a DNS cache of `cache_max` names and a connect
    /// timeout, resolving through `servers` (empty: `/etc/resolv.conf`).
    pub fn new(cache_max: usize, connect_timeout: Duration, servers: &[SocketAddr]) -> Upstream {
        Upstream {
            resolver: OnceCell::new(),
            servers: servers.to_vec(),
            cache: DashMap::new(),
            records: DashMap::new(),
            cache_max,
            connect_timeout,
        }
    }

    async fn resolver(&self) -> Option<&TokioResolver> {
        self.resolver
            .get_or_init(|| async {
                if !self.servers.is_empty() {
                    return configured_resolver(&self.servers);
                }
                match TokioResolver::builder_tokio() {
                    Ok(builder) => Some(builder.build().ok()?),
                    Err(err) => {
                        tracing::error!(error = %err, "cannot read /etc/resolv.conf; only [resolve] names will resolve");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// The records of `rtype` for a fully qualified `name`, as the
    /// gateway's resolvers answer (cached within their TTLs, CNAME chains
    /// followed): what the DNS listener forwards, and whether they came
    /// from this cache.
    ///
    /// # Errors
    /// The resolver's error; `None` when there is no resolver.
    pub async fn lookup_records(
        &self,
        name: Name,
        rtype: RecordType,
    ) -> Result<(Records, bool), Option<NetError>> {
        let now = Instant::now();
        let key = (name, rtype);
        // A hit is answered without touching the resolver: the future is
        // ready on its first poll, so the listener answers from its loop.
        if let Some(hit) = self.records.get(&key).filter(|e| e.1 > now) {
            return Ok(((hit.0.clone(), hit.1), true));
        }
        let Some(resolver) = self.resolver().await else {
            return Err(None);
        };
        let lookup = resolver.lookup(key.0.clone(), rtype).await.map_err(Some)?;
        let records: Arc<[Record]> = lookup.answers().into();
        let until = lookup.valid_until();
        if self.records.len() >= self.cache_max {
            self.records.retain(|_, e| e.1 > now);
            if self.records.len() >= self.cache_max {
                self.records.clear();
            }
        }
        self.records.insert(key, (records.clone(), until));
        Ok(((records, until), false))
    }

    /// Addresses of a normalised name: static table, cache, then DNS.
    ///
    /// # Errors
    /// [`ConnectError::NotFound`] or [`ConnectError::Dns`].
    pub async fn resolve(
        &self,
        policy: &Policy,
        name: &str,
        metrics: &Metrics,
    ) -> Result<Arc<[IpAddr]>, ConnectError> {
        if let Some(addrs) = policy.static_addresses(name) {
            metrics
                .dns_lookups
                .with_label_values(&[DnsResult::Static.as_str()])
                .inc();
            return Ok(addrs.into());
        }
        let now = Instant::now();
        if let Some(e) = self.cache.get(name).filter(|e| e.expires > now) {
            metrics
                .dns_lookups
                .with_label_values(&[DnsResult::Cached.as_str()])
                .inc();
            return match &e.answer {
                Cached::Addrs(a) => Ok(a.clone()),
                Cached::NotFound => Err(ConnectError::NotFound(name.to_string())),
            };
        }
        let (answer, ttl) = self.lookup(name, now, metrics).await?;
        if self.cache.len() >= self.cache_max {
            self.cache.retain(|_, e| e.expires > now);
            if self.cache.len() >= self.cache_max {
                self.cache.clear();
            }
        }
        self.cache.insert(
            name.to_string(),
            Entry {
                answer: answer.clone(),
                expires: now + ttl,
            },
        );
        match answer {
            Cached::Addrs(a) => {
                metrics
                    .dns_lookups
                    .with_label_values(&[DnsResult::Ok.as_str()])
                    .inc();
                Ok(a)
            }
            Cached::NotFound => {
                metrics
                    .dns_lookups
                    .with_label_values(&[DnsResult::Nxdomain.as_str()])
                    .inc();
                Err(ConnectError::NotFound(name.to_string()))
            }
        }
    }

    /// Asks DNS for `name`'s addresses: the answer to cache and for how long.
    async fn lookup(
        &self,
        name: &str,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<(Cached, Duration), ConnectError> {
        let Some(resolver) = self.resolver().await else {
            return Err(dns_failed(metrics, name, "no resolver configured".into()));
        };
        // A fully qualified name: no search domains for egress names.
        let fqdn = format!("{name}.");
        let (answer, ttl) = match resolver.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let addrs: Arc<[IpAddr]> = lookup.iter().collect();
                let ttl = lookup.valid_until().saturating_duration_since(now);
                if addrs.is_empty() {
                    (Cached::NotFound, NEGATIVE_TTL)
                } else {
                    (Cached::Addrs(addrs), ttl.clamp(MIN_TTL, MAX_TTL))
                }
            }
            Err(err) if err.is_nx_domain() || err.is_no_records_found() => {
                (Cached::NotFound, NEGATIVE_TTL)
            }
            Err(err) => return Err(dns_failed(metrics, name, err.to_string())),
        };
        Ok((answer, ttl))
    }

    /// Addresses a destination may be dialled at: resolved (names) or as
    /// given (literals, already decided by address rules), filtered by policy.
    ///
    /// # Errors
    /// Resolution errors, or [`ConnectError::Prohibited`] when none remain.
    async fn addresses(
        &self,
        policy: &Policy,
        client: Option<Client>,
        target: Target<'_>,
        port: u16,
        metrics: &Metrics,
    ) -> Result<Vec<IpAddr>, ConnectError> {
        // Literals were decided by address rules; the guard check is repeated
        // here so that audit mode, which lets denials through, still never
        // reaches private or platform addresses.
        let (shown, all): (String, Arc<[IpAddr]>) = match target {
            Target::Ip(ip) => (ip.to_string(), Arc::from([ip])),
            Target::Name(name) => (name.to_string(), self.resolve(policy, name, metrics).await?),
        };
        let mut first_reason = None;
        let allowed: Vec<IpAddr> = all
            .iter()
            .copied()
            .filter(
                |ip| match policy.check_resolved_for(*ip, port, Protocol::Tcp, client) {
                    Ok(()) => true,
                    Err(r) => {
                        first_reason.get_or_insert(r);
                        false
                    }
                },
            )
            .collect();
        if allowed.is_empty() {
            return Err(ConnectError::Prohibited {
                name: shown,
                addrs: all
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                reason: first_reason.unwrap_or(Reason::GuardedAddress),
            });
        }
        Ok(allowed)
    }

    /// Resolves and checks the addresses of `plan` for `client` (`None`: a
    /// connection any client may reuse), then dials them.
    ///
    /// # Errors
    /// Any [`ConnectError`].
    pub async fn connect(
        &self,
        policy: &Policy,
        client: Option<Client>,
        plan: DialPlan<'_>,
        port: u16,
        metrics: &Metrics,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let addrs = match plan {
            DialPlan::Target(target) => {
                (self.addresses(policy, client, target, port, metrics)).await?
            }
            DialPlan::Verify { name, original } => {
                let addrs = self
                    .addresses(policy, client, Target::Name(name), port, metrics)
                    .await?;
                if !addrs.contains(&original) {
                    return Err(ConnectError::NotAmong {
                        name: name.to_string(),
                        addr: original,
                    });
                }
                vec![original]
            }
            DialPlan::Original(ip) => {
                if let Err(reason) = policy.check_resolved_for(ip, port, Protocol::Tcp, client) {
                    return Err(ConnectError::Prohibited {
                        name: ip.to_string(),
                        addrs: ip.to_string(),
                        reason,
                    });
                }
                vec![ip]
            }
        };
        self.dial(&addrs, port, metrics).await
    }

    /// Dials the given addresses with Happy Eyeballs. Private: only
    /// addresses [`Upstream::connect`] checked are dialled.
    async fn dial(
        &self,
        addrs: &[IpAddr],
        port: u16,
        metrics: &Metrics,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let started = Instant::now();
        let order = interleave(addrs);
        let shown = || {
            order
                .iter()
                .map(|ip| SocketAddr::new(*ip, port).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        // The attempts are polled here, in the connection's task: a spawned
        // task per attempt would cost a wake-up on another worker and back on
        // every tunnel's critical path.
        let attempt = async {
            let mut pending: Vec<(SocketAddr, Attempt)> = Vec::with_capacity(1);
            let mut next = order.iter();
            let mut last_err: Option<(SocketAddr, std::io::Error)> = None;
            loop {
                if let Some(ip) = next.next() {
                    let sa = SocketAddr::new(*ip, port);
                    #[allow(clippy::disallowed_methods)] // the one place egress sockets are opened
                    pending.push((sa, Box::pin(TcpStream::connect(sa))));
                } else if pending.is_empty() {
                    break;
                }
                let finished = std::future::poll_fn(|cx| {
                    for (i, (_, fut)) in pending.iter_mut().enumerate() {
                        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                            return Poll::Ready((i, r));
                        }
                    }
                    Poll::Pending
                });
                // With addresses left, the next attempt starts after
                // ATTEMPT_DELAY or as soon as one fails.
                let done = if next.len() > 0 {
                    tokio::time::timeout(ATTEMPT_DELAY, finished).await.ok()
                } else {
                    Some(finished.await)
                };
                if let Some((i, r)) = done {
                    let (sa, _) = pending.swap_remove(i);
                    match r {
                        Ok(stream) => return Ok((stream, sa)),
                        Err(e) => last_err = Some((sa, e)),
                    }
                }
            }
            Err(last_err)
        };
        let result = tokio::time::timeout(self.connect_timeout, attempt).await;
        metrics
            .upstream_connect
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok((stream, sa))) => {
                let _ = stream.set_nodelay(true);
                keep_alive(&stream);
                Ok((stream, sa))
            }
            Ok(Err(Some((_, e)))) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(ConnectError::Refused(shown()))
            }
            Ok(Err(Some((sa, e)))) => Err(ConnectError::Unreachable {
                addr: sa.to_string(),
                source: e,
            }),
            Ok(Err(None)) => Err(ConnectError::Unreachable {
                addr: shown(),
                source: std::io::Error::other("no address to try"),
            }),
            Err(_) => Err(ConnectError::Timeout(shown())),
        }
    }
}

/// A resolver asking `servers` (UDP, then TCP) with default options.
fn configured_resolver(servers: &[SocketAddr]) -> Option<TokioResolver> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    let name_servers = servers
        .iter()
        .map(|a| {
            let mut udp = ConnectionConfig::udp();
            udp.port = a.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = a.port();
            NameServerConfig::new(a.ip(), true, vec![udp, tcp])
        })
        .collect();
    let config = ResolverConfig::from_name_servers(name_servers);
    let provider = hickory_resolver::net::runtime::TokioRuntimeProvider::default();
    TokioResolver::builder_with_config(config, provider)
        .build()
        .map_err(|err| tracing::error!(error = %err, "cannot build the resolver for [dns] servers"))
        .ok()
}

/// TCP keepalive probes after this long idle: well under the 4-minute idle
/// timeout of Azure's NAT gateway and load balancer, so a quiet tunnel
/// through them is not silently dropped.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// Turns on TCP keepalives (every [`KEEPALIVE_IDLE`], then every 15 s, 4
/// tries): on listening sockets (their accepted sockets inherit them) and
/// on upstream sockets as they connect.
pub fn keep_alive<S: std::os::fd::AsFd>(stream: &S) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(Duration::from_secs(15))
        .with_retries(4);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// A failed lookup, counted.
fn dns_failed(metrics: &Metrics, name: &str, message: String) -> ConnectError {
    metrics
        .dns_lookups
        .with_label_values(&[DnsResult::Error.as_str()])
        .inc();
    ConnectError::Dns {
        name: name.to_string(),
        message,
    }
}

/// RFC 8305 §4: alternate address families, starting with the first one given.
fn interleave(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let (v6, v4): (Vec<IpAddr>, Vec<IpAddr>) = addrs.iter().partition(|a| a.is_ipv6());
    let (first, second) = match addrs.first() {
        Some(IpAddr::V4(_)) => (v4, v6),
        _ => (v6, v4),
    };
    let mut out = Vec::with_capacity(addrs.len());
    let (mut a, mut b) = (first.into_iter(), second.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => break,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dialled_sockets_keep_alive_under_the_nat_timeout() {
        let m = Metrics::new(10);
        let up = Upstream::new(10, Duration::from_secs(2), &[]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (s, _) = up
            .dial(&["127.0.0.1".parse().unwrap()], port, &m)
            .await
            .unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert!(
            KEEPALIVE_IDLE < Duration::from_secs(240),
            "Azure NAT idle timeout is 4 min"
        );
    }

    #[test]
    fn families_alternate() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let got = interleave(&[
            ip("2001:db8::1"),
            ip("2001:db8::2"),
            ip("192.0.2.1"),
            ip("192.0.2.2"),
        ]);
        assert_eq!(
            got,
            vec![
                ip("2001:db8::1"),
                ip("192.0.2.1"),
                ip("2001:db8::2"),
                ip("192.0.2.2")
            ]
        );
        let got = interleave(&[ip("192.0.2.1"), ip("2001:db8::1")]);
        assert_eq!(got, vec![ip("192.0.2.1"), ip("2001:db8::1")]);
    }

    #[tokio::test]
    async fn refused_and_success() {
        let m = Metrics::new(10);
        let up = Upstream::new(10, Duration::from_secs(2), &[]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let (_s, sa) = up.dial(&[lo], port, &m).await.unwrap();
        assert_eq!(sa.port(), port);
        drop(listener);
        let err = up.dial(&[lo], port, &m).await.unwrap_err();
        assert_eq!(err.as_str(), "connection_refused");
    }
}
