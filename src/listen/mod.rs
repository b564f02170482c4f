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
pub mod authority;
pub mod body;
pub mod dns;
pub mod explicit;
pub mod http_relay;
pub mod inspect;
pub mod respond;
pub mod stall;
pub mod transparent;

pub use access::{AccessLog, Close};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::gateway::Gateway;
use crate::metrics::{Listener, RejectReason, Via};
use crate::policy::{Client, Decision, Policy, Target, Verdict};
use crate::shutdown::TaskGuard;
use crate::spare::{Accepted, Spare};
use respond::Refusal;

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
    /// The client's groups under that snapshot, looked up once at accept.
    pub client: Client,
    /// When it was accepted.
    pub started: Instant,
    /// Access lines are written as JSON (`[log] format = "json"`).
    pub json_log: bool,
    _guard: ConnGuard,
}

impl Conn {
    /// The policy in force for a request arriving now on this connection:
    /// the accept-time snapshot while no reload happened (no second check);
    /// after a reload, the new policy, or `None` when it no longer admits
    /// this client.
    pub fn policy_now(&self, gw: &Gateway) -> Option<Arc<Policy>> {
        let current = gw.policy.load();
        if current.generation() == self.policy.generation() {
            return Some(self.policy.clone());
        }
        let current = arc_swap::Guard::into_inner(current);
        current.client_allowed(self.peer.ip())?;
        Some(current)
    }

    /// The client as `policy` sees it: the one looked up at accept while
    /// `policy` is the snapshot, else looked up again (a reload may have
    /// changed the groups).
    #[inline]
    pub fn client_under(&self, policy: &Policy) -> Client {
        if policy.generation() == self.policy.generation() {
            self.client
        } else {
            policy.client(self.peer.ip())
        }
    }
}

/// Releases a connection's slots when the last user (request handler or
/// tunnel task) drops it.
struct ConnGuard {
    /// The listener's slot and the process's descriptor-budget slot.
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    _task: TaskGuard,
    gw: Arc<Gateway>,
    ip: IpAddr,
    active: IntGauge,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.active.dec();
        self.gw.release_client_slot(self.ip);
    }
}

/// How a connection that was not admitted is answered.
fn refusal(why: RejectReason) -> Refusal<'static> {
    match why {
        RejectReason::ClientNotAllowed => Refusal::ClientNotAllowed,
        RejectReason::Limit => Refusal::ConnectionLimit,
    }
}

fn admit(
    gw: &Arc<Gateway>,
    listener: Listener,
    peer: SocketAddr,
    slots: &Arc<Semaphore>,
) -> Result<Conn, RejectReason> {
    let policy = gw.policy.load_full();
    let Some(subnet) = policy.client_allowed(peer.ip()).copied() else {
        return Err(RejectReason::ClientNotAllowed);
    };
    let permit = slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| RejectReason::Limit)?;
    let descriptors = gw
        .descriptors
        .clone()
        .try_acquire_owned()
        .map_err(|_| RejectReason::Limit)?;
    if !gw.take_client_slot(peer.ip()) {
        return Err(RejectReason::Limit);
    }
    let (active, total) = gw.listener_series(listener);
    active.inc();
    total.inc();
    let active = active.clone();
    Ok(Conn {
        peer,
        client_subnet: subnet,
        listener,
        client: policy.client(peer.ip()),
        policy,
        started: Instant::now(),
        json_log: gw.json_log,
        _guard: ConnGuard {
            _permits: (permit, descriptors),
            _task: gw.shutdown.track(),
            gw: gw.clone(),
            ip: peer.ip(),
            active,
        },
    })
}

/// Refusals answered at a time per listener; past it a refused client is
/// closed at once. Each holds a descriptor for up to [`REFUSAL_LINGER`].
const MAX_LINGERING_REFUSALS: usize = 256;
/// How long a refusal may take to be written and read out.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Accepts until draining starts; each admitted connection runs `handle` in
/// its own task. Refused connections are answered here, bounded in number
/// and time (explicit proxy: a 403/503 response; transparent: a close), and
/// at the fd limit a spare descriptor lets the next client be refused
/// instead of hanging in the backlog.
pub async fn accept_loop<H, HF>(listener: TcpListener, kind: Listener, gw: Arc<Gateway>, handle: H)
where
    H: Fn(TcpStream, Arc<Conn>, Arc<Gateway>) -> HF + Send + Sync + 'static,
    HF: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(gw.limits.max_connections));
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING_REFUSALS));
    let mut spare = Spare::new();
    gw.metrics
        .connections_limit
        .with_label_values(&[kind.as_str()])
        .set(gw.limits.max_connections.min(gw.connection_budget) as i64);
    tune(&listener);
    let draining = gw.shutdown.draining();
    tokio::pin!(draining);
    loop {
        let accepted = tokio::select! {
            a = spare.accept(&listener, kind.as_str()) => a,
            () = &mut draining => return,
        };
        let (stream, peer, admitted) = match accepted {
            Accepted::Client(stream, peer) => {
                let admitted = admit(&gw, kind, peer, &slots);
                (stream, peer, admitted)
            }
            Accepted::AtLimit(stream, peer) => (stream, peer, Err(RejectReason::Limit)),
            Accepted::Retry => continue,
        };
        match admitted {
            Ok(conn) => {
                tokio::spawn(handle(stream, Arc::new(conn), gw.clone()));
            }
            Err(why) => refuse(&gw, kind, stream, peer, why, &lingering),
        }
    }
}

/// Counts, logs and answers a connection that was not admitted.
fn refuse(
    gw: &Gateway,
    kind: Listener,
    stream: TcpStream,
    peer: SocketAddr,
    why: RejectReason,
    lingering: &Arc<Semaphore>,
) {
    gw.metrics
        .connections_rejected
        .with_label_values(&[kind.as_str(), why.as_str()])
        .inc();
    tracing::info!(
        client = %peer,
        listener = kind.as_str(),
        reason = why.as_str(),
        "connection refused"
    );
    // Transparent clients speak no proxy protocol: they are closed.
    if kind == Listener::Transparent {
        return;
    }
    let answer = refusal(why).raw("");
    match lingering.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(async move {
                respond::write_and_close(stream, &answer, REFUSAL_LINGER).await;
                drop(permit);
            });
        }
        // Too many refusals in flight: one try to write, then close.
        Err(_) => {
            let _ = stream.try_write(&answer);
        }
    }
}

/// The two ends of an allowed connection, and what the client already sent.
pub struct Ends {
    /// The client.
    pub client: TcpStream,
    /// The upstream it was allowed to reach.
    pub upstream: TcpStream,
    /// Bytes read from the client and not yet sent upstream.
    pub prefix: bytes::BytesMut,
}

/// Relays an allowed connection and writes its log line at the end: its
/// bytes as they are (`http: None`), or HTTP requests each checked against
/// `http` ([`http_relay`]).
pub async fn relay(
    gw: &Arc<Gateway>,
    conn: &Arc<Conn>,
    ends: Ends,
    http: Option<http_relay::Expect>,
    log: AccessLog<'_>,
) {
    let Ends {
        client,
        upstream,
        prefix,
    } = ends;
    match http {
        Some(expect) => {
            let (conn, gw) = (conn.clone(), gw.clone());
            http_relay::serve(client, prefix, upstream, expect, conn, gw, log).await;
        }
        None => relay_and_log(gw, &client, &upstream, prefix, log).await,
    }
}

/// Replays the client's already-read bytes upstream, frees their buffer (a
/// sniff buffer held for a tunnel's life would be most of an idle tunnel's
/// memory), relays until the tunnel ends, then writes its log line.
async fn relay_and_log(
    gw: &Gateway,
    client: &TcpStream,
    upstream: &TcpStream,
    prefix: bytes::BytesMut,
    mut log: AccessLog<'_>,
) {
    let replayed = prefix.len() as u64;
    if replayed > 0 {
        if crate::tunnel::write_all(upstream, &prefix).await.is_err() {
            log.close = Close::Tunnel(crate::tunnel::CloseReason::UpstreamError);
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
    log.close = Close::Tunnel(stats.close);
    log.emit();
}

/// Logs a denial at decision time, with the command that explains it.
pub fn log_denial(conn: &Conn, policy: &Policy, via: Via, host: &str, port: u16, d: &Decision) {
    let host = access::shown_host(host);
    let host = host.as_ref();
    tracing::info!(
        target: "portcullis::deny",
        client = %conn.peer,
        client_group = policy.client_group(conn.client_under(policy)),
        via = via.as_str(),
        host,
        port,
        verdict = d.verdict.as_str(),
        rule = d.rule.map(|r| policy.rule(r).name.as_str()).unwrap_or("-"),
        reason = d.reason.as_str(),
        explain = %explain_command(policy, conn, host, port),
        "{}",
        policy.explain(d)
    );
}

/// The command that explains a denial: with `--client` when client groups
/// may change the answer.
fn explain_command(policy: &Policy, conn: &Conn, host: &str, port: u16) -> String {
    if policy.group_names().is_empty() {
        format!("portcullis explain {host}:{port}")
    } else {
        format!(
            "portcullis explain --client {} {host}:{port}",
            conn.peer.ip()
        )
    }
}

/// Sets `TCP_NODELAY` and keepalives on a listening socket: Linux copies
/// its options into each connection as the handshake completes, so every
/// accepted socket has them without five system calls of its own. `serve`
/// calls it at bind (before any client can connect), the accept loop again
/// for a listener it was handed.
pub fn tune(listener: &TcpListener) {
    let _ = socket2::SockRef::from(listener).set_tcp_nodelay(true);
    crate::upstream::keep_alive(listener);
}

/// Decides for one connection under one policy, and counts and logs what
/// it decides: `decide`'s answers and the data path's cuts alike.
pub struct Judge<'a> {
    /// Where decisions are counted.
    pub gw: &'a Gateway,
    /// The connection decided for.
    pub conn: &'a Conn,
    /// The policy deciding (the connection's snapshot, or the one in force
    /// when a request arrived).
    pub policy: &'a Policy,
}

impl Judge<'_> {
    /// The client as the deciding policy sees it.
    #[inline]
    pub fn client(&self) -> Client {
        self.conn.client_under(self.policy)
    }

    /// Decides `host:port` over TCP for this client, counts it and logs a denial.
    pub fn decide(&self, via: Via, host: &str, port: u16) -> Decision {
        let d = self.policy.decide_for(
            &crate::policy::Dest {
                target: Target::parse(host),
                port,
                proto: crate::config::Protocol::Tcp,
            },
            self.client(),
        );
        self.record(via, host, port, &d);
        d
    }

    /// Decides a connection that names no host, to `ip:port`: by address
    /// rules, else as a name the DNS listener answered `ip` for (reason
    /// `dns_address`, returning that name) when a rule allows the name on
    /// this port and the address itself passes the resolved-address checks
    /// (never a platform, guarded or address-denied one). Counted and logged.
    pub fn decide_address(&self, via: Via, ip: IpAddr, port: u16) -> (Decision, Option<String>) {
        let tcp = crate::config::Protocol::Tcp;
        let client = self.client();
        let decide = |target: Target<'_>| -> Decision {
            let dest = crate::policy::Dest {
                target,
                port,
                proto: tcp,
            };
            self.policy.decide_for(&dest, client)
        };
        let by_address = decide(Target::Ip(ip));
        let ip_text = ip.to_string();
        // No DNS listener, or nobody resolved this address: nothing more to
        // look at (the table is empty without a listener).
        let names = if by_address.verdict == Verdict::Allow {
            Vec::new()
        } else {
            self.gw.learned.names(ip, std::time::Instant::now())
        };
        let checked = || self.policy.check_resolved_for(ip, port, tcp, Some(client));
        if names.is_empty() || checked().is_err() {
            self.record(via, &ip_text, port, &by_address);
            return (by_address, None);
        }
        for name in names {
            let d = decide(Target::Name(&name));
            if d.verdict == Verdict::Allow {
                let d = Decision {
                    reason: crate::policy::Reason::DnsAddress,
                    ..d
                };
                self.record(via, &name, port, &d);
                return (d, Some(name));
            }
        }
        self.record(via, &ip_text, port, &by_address);
        (by_address, None)
    }

    /// Counts `d` and logs it if it is a denial.
    pub fn record(&self, via: Via, host: &str, port: u16, d: &Decision) {
        let group = self.policy.client_group(self.client());
        self.gw
            .count_decision(&self.conn.client_subnet, group, via, d, host, port);
        if d.verdict != Verdict::Allow {
            log_denial(self.conn, self.policy, via, host, port, d);
        }
    }
}
