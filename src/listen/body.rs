//! Body: forwarded HTTP bodies, counted and cut like tunnel bytes.
//!
//! In: a request or response body on its way through the explicit proxy.
//! Out: the same frames, with every data byte counted in
//! `portcullis_bytes_total` and in the request's access line, and an error
//! in place of the next frame once the shutdown grace period ends (hyper
//! then aborts the connection, as a cut tunnel would close). The access line
//! of a forwarded request is written when its response body ends or is
//! dropped, so it carries the bytes both ways.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus::IntCounter;

use super::{AccessLog, Close, Conn};
use crate::policy::{Decision, Policy};
use crate::upstream::pool::BoxError;

/// Awaits `f` (an upstream's answer) while the request makes progress:
/// `None` once `idle` passes without the answer and without a request body
/// byte counted in `progress` (an origin that never answers, a client that
/// stalls its body).
pub async fn within_idle<F: Future>(
    f: F,
    idle: std::time::Duration,
    progress: &AtomicU64,
) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut seen = progress.load(Relaxed);
    loop {
        match tokio::time::timeout(idle, &mut f).await {
            Ok(out) => return Some(out),
            Err(_) => {
                let now = progress.load(Relaxed);
                if now == seen {
                    return None;
                }
                seen = now;
            }
        }
    }
}

/// What a client is told when its upstream never answered.
pub const NO_ANSWER: &str = "no answer from the upstream within the idle timeout";

/// A body's idle timer, checked lazily as the tunnel's is: a frame only
/// notes the time (no timer re-armed per frame); when the sleep fires early
/// it is moved to the last frame's time plus `after`.
struct IdleTimer {
    after: std::time::Duration,
    last: tokio::time::Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    /// Whether `after` has passed since the last frame (else the sleep is
    /// registered with `cx` for the new deadline).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let due = self.last + self.after;
            if due <= tokio::time::Instant::now() {
                return true;
            }
            self.sleep.as_mut().reset(due);
        }
        false
    }
}

/// The access line of a forwarded request, written when dropped.
pub struct PendingLine {
    /// The connection it came on.
    pub conn: Arc<Conn>,
    /// The policy that decided it.
    pub policy: Arc<Policy>,
    /// Request method.
    pub method: String,
    /// Host asked for (normalised).
    pub host: String,
    /// Port asked for.
    pub port: u16,
    /// The decision.
    pub decision: Decision,
    /// Address dialled.
    pub upstream: Option<SocketAddr>,
    /// How it ended (the response status).
    pub close: Close,
    /// Request body bytes relayed so far.
    pub upload: Arc<AtomicU64>,
    /// Response body bytes relayed so far.
    pub download: Arc<AtomicU64>,
}

impl Drop for PendingLine {
    fn drop(&mut self) {
        let mut log = AccessLog::new(
            &self.conn,
            &self.method,
            &self.host,
            self.port,
            Some(&self.decision),
            self.close,
        )
        .under(&self.policy);
        log.upstream = self.upstream;
        log.upload = self.upload.load(Relaxed);
        log.download = self.download.load(Relaxed);
        log.emit();
    }
}

/// A body cut at the end of the grace period, its data bytes counted.
pub struct Metered<B> {
    inner: B,
    /// Where data bytes are counted (none: the connection counts its own).
    counted: Option<(IntCounter, Arc<AtomicU64>)>,
    cut: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
    /// Written when the body ends or is dropped (response bodies only).
    line: Option<PendingLine>,
    /// Ends the body when no frame comes for a while (see [`Metered::with_idle`]).
    idle: Option<IdleTimer>,
}

impl<B> Metered<B> {
    /// Wraps `inner`: bytes go to `counter` and `total`; `cut` ends it.
    pub fn new(
        inner: B,
        counter: IntCounter,
        total: Arc<AtomicU64>,
        cut: impl Future<Output = ()> + Send + Sync + 'static,
    ) -> Self {
        Metered {
            inner,
            counted: Some((counter, total)),
            cut: Box::pin(cut),
            line: None,
            idle: None,
        }
    }

    /// Wraps `inner` to be cut by `cut`, counting nothing.
    pub fn uncounted(inner: B, cut: impl Future<Output = ()> + Send + Sync + 'static) -> Self {
        Metered {
            inner,
            counted: None,
            cut: Box::pin(cut),
            line: None,
            idle: None,
        }
    }

    /// Ends the body with an error when `idle` passes without a frame (an
    /// upstream that stops sending mid-body), as a tunnel's idle timer would.
    pub fn with_idle(mut self, idle: std::time::Duration) -> Self {
        self.idle = Some(IdleTimer {
            after: idle,
            last: tokio::time::Instant::now(),
            sleep: Box::pin(tokio::time::sleep(idle)),
        });
        self
    }

    /// Writes `line` when this body ends.
    pub fn with_line(mut self, line: PendingLine) -> Self {
        self.line = Some(line);
        self
    }
}

impl<B> HttpBody for Metered<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.cut.as_mut().poll(cx).is_ready() {
            self.line.take();
            return Poll::Ready(Some(Err(
                "cut at the end of the shutdown grace period".into()
            )));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some((counter, total))) = (frame.data_ref(), &self.counted) {
                    let n = data.len() as u64;
                    counter.inc_by(n);
                    total.fetch_add(n, Relaxed);
                }
                if let Some(idle) = &mut self.idle {
                    idle.last = tokio::time::Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.line.take();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.line.take();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let expired = self.idle.as_mut().is_some_and(|t| t.expired(cx));
                if expired {
                    self.line.take();
                    return Poll::Ready(Some(Err("no body byte within the idle timeout".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
