//! Write stalls: a client that stops reading while the gateway has bytes for it is closed after the idle timeout.
//!
//! hyper writes a response only as fast as the client reads it, and polls
//! the response body only when it can write, so a client that never reads
//! would hold its connection, its upstream and a connection slot forever:
//! no body timer runs while nothing is polled. [`Stalled`] wraps the client
//! side of a served connection and notes when a write last had to wait;
//! [`Stall::stuck_for`] resolves once one write has waited the idle timeout
//! without the client taking a byte. Time spent waiting for the client's
//! next request, or for an upstream's answer, is not a stall: those have
//! timers of their own.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When the current write started waiting, as nanoseconds since `start`
/// plus one; 0 while no write waits.
pub struct Stall {
    start: Instant,
    since: AtomicU64,
}

impl Stall {
    /// A stall clock for one connection.
    pub fn new() -> Arc<Stall> {
        Arc::new(Stall {
            start: Instant::now(),
            since: AtomicU64::new(0),
        })
    }

    fn waiting(&self) {
        if self.since.load(Relaxed) == 0 {
            let now = self.start.elapsed().as_nanos() as u64;
            self.since.store(now + 1, Relaxed);
        }
    }

    fn moved(&self) {
        self.since.store(0, Relaxed);
    }

    fn waiting_since(&self) -> Option<Instant> {
        match self.since.load(Relaxed) {
            0 => None,
            n => Some(self.start + Duration::from_nanos(n - 1)),
        }
    }

    /// Resolves once a write has waited `idle` for the client to read.
    /// Checks every `idle` while nothing waits: one timer per connection,
    /// re-armed once an idle period, not once a write.
    pub async fn stuck_for(&self, idle: Duration) {
        loop {
            let Some(since) = self.waiting_since() else {
                tokio::time::sleep(idle).await;
                continue;
            };
            if since + idle <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(since + idle).await;
        }
    }
}

/// A client stream whose writes report to a [`Stall`].
pub struct Stalled<T> {
    io: T,
    stall: Arc<Stall>,
}

impl<T> Stalled<T> {
    /// Wraps `io`; its waiting writes show in `stall`.
    pub fn new(io: T, stall: Arc<Stall>) -> Stalled<T> {
        Stalled { io, stall }
    }

    /// The stream, for a tunnel that runs with its own timers (an upgrade).
    pub fn into_inner(self) -> T {
        self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalled<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalled<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(r.is_pending());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.note(r.is_pending());
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T> Stalled<T> {
    fn note(&self, pending: bool) {
        if pending {
            self.stall.waiting();
        } else {
            self.stall.moved();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_is_a_stall_and_one_that_reads_is_not() {
        let (near, mut far) = tokio::io::duplex(1024);
        let stall = Stall::new();
        let mut w = Stalled::new(near, stall.clone());
        let idle = Duration::from_secs(60);
        // The far side reads: a 64 KiB write through a 1 KiB pipe moves.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 64 * 1024];
            far.read_exact(&mut got).await.unwrap();
            far
        });
        tokio::select! {
            r = w.write_all(&[7u8; 64 * 1024]) => r.unwrap(),
            () = stall.stuck_for(idle) => panic!("a reading client is no stall"),
        }
        assert!(stall.waiting_since().is_none());
        // Now nobody reads: the write waits, and the stall fires after idle.
        let _far = reader.await.unwrap();
        let started = Instant::now();
        tokio::select! {
            _ = w.write_all(&[7u8; 64 * 1024]) => panic!("nobody reads"),
            () = stall.stuck_for(idle) => {}
        }
        assert!(
            started.elapsed() >= idle,
            "fired after {:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < idle * 2 + Duration::from_secs(1));
    }
}
