//! Serve: a gateway's lifecycle — bind, spawn the listeners, ready, drain, cut.
//!
//! In: the `[listen]` addresses, a built [`Gateway`], and futures that say
//! when to stop (first signal) and when to stop at once (second signal).
//! Out: accept loops and the admin endpoint running until shutdown, then a
//! drain of at most `[limits] grace_period_ms`. It takes no signals itself,
//! so tests drive it in process with any futures they like; `cli` wires the
//! real signals to it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};

use crate::admin;
use crate::config::Listen;
use crate::gateway::Gateway;
use crate::listen::{self, dns, explicit, transparent};
use crate::metrics::Listener;

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("failed to bind {what} listener on {addr}: {source}")]
pub struct BindError {
    /// Which listener (`proxy`, `transparent`, `admin`).
    pub what: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// The bound listeners of one gateway.
pub struct Bound {
    proxy: Option<TcpListener>,
    transparent: Option<TcpListener>,
    admin: Option<TcpListener>,
    /// The DNS listener: UDP and TCP on one address.
    dns: Option<(UdpSocket, TcpListener)>,
}

impl Bound {
    /// Binds every listener the config names (port 0 picks a free port).
    ///
    /// # Errors
    /// The first listener that cannot be bound.
    pub async fn bind(listen: &Listen) -> Result<Bound, BindError> {
        let proxy = bind("proxy", listen.proxy).await?;
        let transparent = bind("transparent", listen.transparent).await?;
        for l in proxy.iter().chain(&transparent) {
            listen::tune(l);
        }
        Ok(Bound {
            proxy,
            transparent,
            admin: bind("admin", listen.admin).await?,
            dns: bind_dns(listen.dns).await?,
        })
    }

    /// `(name, address)` of every bound listener, in config order.
    pub fn addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        [
            ("proxy", &self.proxy),
            ("transparent", &self.transparent),
            ("admin", &self.admin),
        ]
        .into_iter()
        .filter_map(|(name, l)| Some((name, l.as_ref()?.local_addr().ok()?)))
        .chain(
            self.dns
                .as_ref()
                .and_then(|(_, t)| Some(("dns", t.local_addr().ok()?))),
        )
        .collect()
    }
}

/// The DNS listener's TCP socket, then UDP on the same address and port
/// (port 0: the port TCP got).
async fn bind_dns(addr: Option<SocketAddr>) -> Result<Option<(UdpSocket, TcpListener)>, BindError> {
    let Some(tcp) = bind("dns", addr).await? else {
        return Ok(None);
    };
    let at = tcp.local_addr().map_err(|source| BindError {
        what: "dns",
        addr: addr.unwrap_or(([0, 0, 0, 0], 0).into()),
        source,
    })?;
    let udp = UdpSocket::bind(at).await.map_err(|source| BindError {
        what: "dns (udp)",
        addr: at,
        source,
    })?;
    Ok(Some((udp, tcp)))
}

async fn bind(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, BindError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| BindError { what, addr, source })
}

/// How a gateway's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every connection finished within the grace period.
    Drained,
    /// The grace period ended first: this many connections were cut.
    Cut(usize),
    /// A second stop request came during the drain: this many were cut.
    Forced(usize),
}

/// Runs `gw` on `bound` until `shutdown` resolves, then stops: `/readyz`
/// answers 503 at once while the listeners keep accepting for
/// `drain_delay_ms` (a load balancer's probe sees it first), then listeners
/// stop accepting and open connections get `grace_period_ms` to finish
/// before they are cut. `force` resolving meanwhile cuts at once.
/// `on_ready` runs once the listeners are serving.
pub async fn serve(
    bound: Bound,
    gw: Arc<Gateway>,
    on_ready: impl FnOnce(),
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) -> Stopped {
    if gw.connection_budget < gw.limits.max_connections {
        tracing::warn!(
            connections = gw.connection_budget,
            max_connections = gw.limits.max_connections,
            "the open-file limit (ulimit -n, LimitNOFILE) leaves room for fewer connections \
             than [limits] max_connections; clients past it get 503"
        );
    }
    spawn_listeners(bound, &gw);
    gw.ready.store(true, Ordering::Release);
    on_ready();
    shutdown.await;
    let delay = Duration::from_millis(gw.limits.drain_delay_ms);
    gw.shutdown.announce();
    tokio::pin!(force);
    if !delay.is_zero() {
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "stopping: /readyz answers 503; still accepting until the drain delay ends"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut force => {
                gw.shutdown.cut();
                return Stopped::Forced(gw.shutdown.active());
            }
        }
    }
    drain(&gw, force).await
}

fn spawn_listeners(bound: Bound, gw: &Arc<Gateway>) {
    if let Some(l) = bound.proxy {
        tokio::spawn(listen::accept_loop(
            l,
            Listener::Proxy,
            gw.clone(),
            explicit::serve,
        ));
    }
    if let Some(l) = bound.transparent {
        tokio::spawn(listen::accept_loop(
            l,
            Listener::Transparent,
            gw.clone(),
            transparent::serve,
        ));
    }
    if let Some(l) = bound.admin {
        tokio::spawn(admin::serve(l, gw.clone()));
    }
    if let Some((udp, tcp)) = bound.dns {
        tokio::spawn(dns::serve_udp(udp, gw.clone()));
        tokio::spawn(dns::serve_tcp(tcp, gw.clone()));
    }
}

async fn drain(gw: &Gateway, force: impl Future<Output = ()>) -> Stopped {
    let grace = Duration::from_millis(gw.limits.grace_period_ms);
    tracing::info!(
        open = gw.shutdown.active(),
        grace_ms = grace.as_millis() as u64,
        "shutting down: draining connections"
    );
    gw.shutdown.drain();
    let forced = tokio::select! {
        () = gw.shutdown.idle() => {
            tracing::info!("all connections finished; exiting");
            return Stopped::Drained;
        }
        () = tokio::time::sleep(grace) => false,
        () = force => {
            tracing::warn!("second signal: exiting now");
            true
        }
    };
    let cut = gw.shutdown.active();
    gw.shutdown.cut();
    tracing::warn!(cut, "grace period over: open tunnels cut");
    let _ = tokio::time::timeout(Duration::from_secs(2), gw.shutdown.idle()).await;
    if forced {
        Stopped::Forced(cut)
    } else {
        Stopped::Cut(cut)
    }
}
