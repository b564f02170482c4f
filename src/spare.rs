//! Spare: the descriptor budget, and one descriptor held back, so listeners answer at the fd limit.
//!
//! In: the process's open-file limit; an accept that failed with
//! `EMFILE`/`ENFILE`. Out: [`connection_budget`], how many client
//! connections fit under the limit (each holds two descriptors: the client
//! and its upstream), which the listeners admit against so a client past it
//! gets a 503 like any other limit; and [`Spare::accept`], which at the fd
//! limit lets the spare descriptor go for the one accept that follows, so
//! the client is answered instead of waiting in the backlog for a slot that
//! never comes (the classic libev/nginx remedy for a full fd table).

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Descriptors each client connection holds: its own and its upstream's.
const PER_CONNECTION: u64 = 2;
/// Descriptors kept out of the connection budget for everything else: the
/// listeners, the runtime, idle pooled upstreams, admin, log and config.
fn reserve(limit: u64) -> u64 {
    (32 + limit / 64).min(limit / 2)
}

/// Raises the soft open-file limit to the hard one (as Go's runtime and
/// nginx's `worker_rlimit_nofile` do: the soft default of 1024 is far below
/// a gateway's needs); the limit in force after.
pub fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// Client connections that fit under the open-file limit (`ulimit -n`),
/// across all listeners; `None` when the limit cannot be read.
pub fn connection_budget() -> Option<usize> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    Some(budget_for(soft))
}

fn budget_for(limit: u64) -> usize {
    let budget = (limit - reserve(limit)) / PER_CONNECTION;
    usize::try_from(budget.max(1)).unwrap_or(usize::MAX)
}

/// What one accept gave.
pub enum Accepted {
    /// A client, with descriptors to spare.
    Client(TcpStream, SocketAddr),
    /// A client accepted on the spare descriptor: answer it and close.
    AtLimit(TcpStream, SocketAddr),
    /// Nothing to serve (an error, already logged and backed off).
    Retry,
}

/// A descriptor kept open only to be closed at the fd limit.
pub struct Spare(Option<File>);

impl Default for Spare {
    fn default() -> Self {
        Spare::new()
    }
}

impl Spare {
    /// Takes the spare (`/dev/null`); without one the listener still works.
    pub fn new() -> Spare {
        Spare(File::open("/dev/null").ok())
    }

    /// Accepts one client. At the fd limit the spare is let go, and a client
    /// already waiting is accepted on it (`AtLimit`); when none is waiting
    /// (Linux reports `EMFILE` before it looks at the queue) the spare is
    /// taken back at once, so it is not lost to another task's socket.
    pub async fn accept(&mut self, listener: &TcpListener, name: &str) -> Accepted {
        let err = match listener.accept().await {
            // A client is only served while the spare is in hand: without
            // it the next one could not even be refused.
            Ok((stream, peer)) => {
                self.refill();
                return match self.0 {
                    Some(_) => Accepted::Client(stream, peer),
                    None => Accepted::AtLimit(stream, peer),
                };
            }
            Err(err) => err,
        };
        if is_exhaustion(&err) && self.0.take().is_some() {
            let waiting = poll_once(listener.accept()).await;
            self.refill();
            if let Some(Ok((stream, peer))) = waiting {
                return Accepted::AtLimit(stream, peer);
            }
            if self.0.is_some() {
                return Accepted::Retry;
            }
        }
        // Out of descriptors with no spare left, or a transient error: back
        // off instead of spinning.
        tracing::warn!(listener = name, error = %err, "accept failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.refill();
        Accepted::Retry
    }

    /// Takes the spare back if it is gone and a descriptor is free.
    fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = File::open("/dev/null").ok();
        }
    }
}

/// Whether `err` says the process or system is out of descriptors.
fn is_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(e) if e == nix::errno::Errno::EMFILE as i32 || e == nix::errno::Errno::ENFILE as i32
    )
}

/// Polls `fut` once: its output if it is ready now.
async fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_room_and_counts_two_descriptors_a_connection() {
        assert_eq!(budget_for(64), 16);
        assert_eq!(budget_for(20_000), (20_000 - 344) / 2);
        assert_eq!(budget_for(65_536), 32_240, "the README's figure");
        assert_eq!(budget_for(1), 1);
        assert_eq!(budget_for(0), 1);
    }
}
