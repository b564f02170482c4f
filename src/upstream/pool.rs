//! Pool: keep-alive upstream connections for forwarded plain-HTTP requests.
//!
//! In: absolute-URI requests the explicit proxy has already allowed. Out:
//! responses, over upstream connections reused per `host:port` (hyper-util's
//! pooling client). New connections are made by [`GuardedConnector`], which
//! goes through [`Upstream::connect`] like every other egress socket: resolve,
//! check every address against the current policy, Happy Eyeballs. The
//! address dialled travels with each response as an [`UpstreamAddr`] extension.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use arc_swap::ArcSwap;

use super::{ConnectError, DialPlan, Upstream};
use crate::metrics::Metrics;
use crate::policy::{Policy, Target, host};

/// The address a pooled connection reached.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamAddr(pub SocketAddr);

/// Request and response bodies the pool relays.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

/// The pooling client type the gateway keeps.
pub type HttpClient = Client<GuardedConnector, Body>;

/// Idle upstream connections are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per `host:port`.
const POOL_PER_HOST: usize = 32;

/// Builds the pooling client around a connector that dials through
/// `upstream`, checking addresses against the policy in force at dial time.
pub fn client(
    policy: Arc<ArcSwap<Policy>>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_PER_HOST)
        .build(GuardedConnector {
            policy,
            upstream,
            metrics,
        })
}

/// A `tower::Service<Uri>` that opens upstream connections through [`Upstream`].
#[derive(Clone)]
pub struct GuardedConnector {
    policy: Arc<ArcSwap<Policy>>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
}

/// An upstream TCP connection that remembers where it went.
pub struct Dialled {
    io: TokioIo<TcpStream>,
    addr: SocketAddr,
}

impl Connection for Dialled {
    fn connected(&self) -> Connected {
        Connected::new().extra(UpstreamAddr(self.addr))
    }
}

impl Read for Dialled {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for Dialled {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Errors of the bodies and connections the pool relays.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = Dialled;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Dialled, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let raw = uri.host().ok_or("request URI has no host")?;
            let port = uri.port_u16().unwrap_or(80);
            let name = match Target::parse(raw) {
                Target::Ip(ip) => ip.to_string(),
                Target::Name(n) => host::normalize(n).map_err(|e| format!("'{n}': {e}"))?,
            };
            let policy = this.policy.load_full();
            let (stream, addr) = this
                .upstream
                .connect(
                    &policy,
                    // Pooled connections are shared by every client.
                    None,
                    DialPlan::Target(Target::parse(&name)),
                    port,
                    &this.metrics,
                )
                .await?;
            Ok(Dialled {
                io: TokioIo::new(stream),
                addr,
            })
        })
    }
}

/// The [`ConnectError`] behind a client error, if the connector failed.
pub fn connect_error(err: &hyper_util::client::legacy::Error) -> Option<&ConnectError> {
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(ce) = e.downcast_ref::<ConnectError>() {
            return Some(ce);
        }
        source = e.source();
    }
    None
}
