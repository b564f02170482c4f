//! Tunnel: relay bytes both ways between a client and an upstream socket.
//!
//! In: two connected `TcpStream`s (and bytes already read from the client,
//! replayed first). Out: byte counts and why the tunnel closed.
//!
//! On Linux each direction moves bytes with `splice(2)` through a pipe, so
//! the payload never enters user space; where a pipe cannot be had (fd
//! limit) it falls back to a plain copy through a buffer borrowed for the
//! burst. Neither path holds memory while idle: the copy buffer lives for one
//! burst, the pipe is released after a second without traffic, so an idle
//! tunnel costs two sockets and a task. EOF on one side half-closes the other
//! (`shutdown(SHUT_WR)`); the tunnel ends when both directions are done, on
//! a reset, after `idle` without a byte either way, or when `cut` fires
//! (shutdown grace elapsed). Only metrics are touched here.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes read per system call; a burst reuses one buffer.
const CHUNK: usize = 16 * 1024;

/// Time of the last byte either way, as nanoseconds since the tunnel started.
/// (Atomics rather than `Cell`s only so the relay future is `Send`; both
/// directions run in the one task.)
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_nanos() as u64, Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Relaxed))
    }

    /// Resolves once `idle` has passed without a byte either way.
    async fn idle_for(&self, idle: Duration) {
        loop {
            tokio::time::sleep_until(self.last() + idle).await;
            if self.last() + idle <= Instant::now() {
                return;
            }
        }
    }
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed cleanly; the client closed first.
    ClientClosed,
    /// Both sides closed cleanly; the upstream closed first.
    UpstreamClosed,
    /// The client reset or failed.
    ClientError,
    /// The upstream reset or failed.
    UpstreamError,
    /// No byte either way for the idle timeout.
    IdleTimeout,
    /// Cut at the end of the shutdown grace period.
    Shutdown,
}

impl CloseReason {
    /// Log form.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::UpstreamClosed => "upstream_closed",
            CloseReason::ClientError => "client_error",
            CloseReason::UpstreamError => "upstream_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// What a finished tunnel reports.
#[derive(Debug, Clone, Copy)]
pub struct TunnelStats {
    /// Client → upstream bytes (including the replayed prefix).
    pub upload: u64,
    /// Upstream → client bytes.
    pub download: u64,
    /// Why it ended.
    pub close: CloseReason,
}

/// Byte counters resolved once per connection.
pub struct Counters {
    /// `portcullis_bytes_total{direction="upload"}`.
    pub upload: IntCounter,
    /// `portcullis_bytes_total{direction="download"}`.
    pub download: IntCounter,
}

impl Counters {
    /// Counters registered nowhere, for bytes counted elsewhere.
    pub fn detached() -> Counters {
        let counter = || IntCounter::new("detached", "not exported").expect("valid counter");
        Counters {
            upload: counter(),
            download: counter(),
        }
    }
}

/// Writes all of `data`, waiting for writability without holding anything else.
///
/// # Errors
/// The socket's error.
pub async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A pipe a direction keeps while traffic flows.
struct Pipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
}

/// Pipes are released after this long without traffic in their direction.
const PIPE_IDLE: Duration = Duration::from_secs(1);
/// Bytes a direction copies before it makes a pipe and splices.
const SPLICE_AFTER: u64 = 64 * 1024;
/// Most bytes moved per splice call (the default pipe capacity).
const PIPE_CHUNK: usize = 64 * 1024;

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use nix::fcntl::OFlag;
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { r, w })
    }
}

fn splice(
    from: impl std::os::fd::AsFd,
    to: impl std::os::fd::AsFd,
    len: usize,
) -> io::Result<usize> {
    use nix::fcntl::SpliceFFlags;
    nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
    )
    .map_err(io::Error::from)
}

/// One direction with splice(2). Same contract as [`pump`]; falls back to
/// it when no pipe can be created.
async fn pump_splice(
    from: &TcpStream,
    to: &TcpStream,
    total: &AtomicU64,
    activity: &Activity,
    metric: &IntCounter,
    sides: (CloseReason, CloseReason),
) -> Result<(), CloseReason> {
    use tokio::io::Interest;
    // Short exchanges (most tunnels' first bytes, and whole small requests)
    // are copied: a pipe costs three system calls to make and close.
    if pump(from, to, total, activity, metric, sides, SPLICE_AFTER).await? {
        return Ok(());
    }
    let mut pipe: Option<Pipe> = None;
    loop {
        if pipe.is_some() {
            match tokio::time::timeout(PIPE_IDLE, from.readable()).await {
                Ok(r) => r.map_err(|_| sides.0)?,
                Err(_) => {
                    pipe = None;
                    continue;
                }
            }
        } else {
            from.readable().await.map_err(|_| sides.0)?;
        }
        let p = match &mut pipe {
            Some(p) => p,
            None => match Pipe::new() {
                Ok(p) => pipe.insert(p),
                Err(_) => {
                    return pump(from, to, total, activity, metric, sides, u64::MAX)
                        .await
                        .map(|_| ());
                }
            },
        };
        loop {
            let n = match from.try_io(Interest::READABLE, || splice(from, &p.w, PIPE_CHUNK)) {
                Ok(0) => {
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(sides.0),
            };
            let mut left = n;
            while left > 0 {
                to.writable().await.map_err(|_| sides.1)?;
                match to.try_io(Interest::WRITABLE, || splice(&p.r, to, left)) {
                    Ok(0) => return Err(sides.1),
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(sides.1),
                }
            }
            total.fetch_add(n as u64, Relaxed);
            metric.inc_by(n as u64);
            activity.touch();
        }
    }
}

/// One direction by copying. Returns `Ok(true)` at EOF (after half-closing
/// `to`), `Ok(false)` once `limit` bytes have been moved (never, for
/// `u64::MAX`), or which side failed: `sides.0` when reading `from`,
/// `sides.1` when writing `to`.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    total: &AtomicU64,
    activity: &Activity,
    metric: &IntCounter,
    sides: (CloseReason, CloseReason),
    limit: u64,
) -> Result<bool, CloseReason> {
    let mut moved = 0u64;
    loop {
        if moved >= limit {
            return Ok(false);
        }
        from.readable().await.map_err(|_| sides.0)?;
        // Uninitialised capacity, filled by the read: no 16 KiB memset per burst.
        let mut buf = Vec::with_capacity(CHUNK);
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    // Half-close: the peer sees our EOF, the other direction goes on.
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    return Ok(true);
                }
                Ok(n) => {
                    write_all(to, &buf[..n]).await.map_err(|_| sides.1)?;
                    total.fetch_add(n as u64, Relaxed);
                    metric.inc_by(n as u64);
                    activity.touch();
                    moved += n as u64;
                    if moved >= limit {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(sides.0),
            }
        }
    }
}

/// Relays until both directions end, an error, `idle`, or `cut`.
/// `prefix` (bytes already read from the client) is sent upstream first.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    prefix: &[u8],
    idle: Duration,
    counters: &Counters,
    cut: impl Future<Output = ()>,
) -> TunnelStats {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let activity = Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
    };
    // Which side reached EOF first: 0 none yet, 1 client, 2 upstream.
    let first_eof = AtomicU8::new(0);

    let stats = |close| TunnelStats {
        upload: up.load(Relaxed),
        download: down.load(Relaxed),
        close,
    };
    if !prefix.is_empty() {
        if write_all(upstream, prefix).await.is_err() {
            return stats(CloseReason::UpstreamError);
        }
        up.store(prefix.len() as u64, Relaxed);
        counters.upload.inc_by(prefix.len() as u64);
    }

    let upload = async {
        let sides = (CloseReason::ClientError, CloseReason::UpstreamError);
        let r = pump_splice(client, upstream, &up, &activity, &counters.upload, sides).await;
        if r.is_ok() {
            let _ = first_eof.compare_exchange(0, 1, Relaxed, Relaxed);
        }
        r
    };
    let download = async {
        let sides = (CloseReason::UpstreamError, CloseReason::ClientError);
        let r = pump_splice(
            upstream,
            client,
            &down,
            &activity,
            &counters.download,
            sides,
        )
        .await;
        if r.is_ok() {
            let _ = first_eof.compare_exchange(0, 2, Relaxed, Relaxed);
        }
        r
    };
    let both = async { tokio::try_join!(upload, download) };
    tokio::select! {
        r = both => match r {
            Ok(_) if first_eof.load(Relaxed) == 2 => stats(CloseReason::UpstreamClosed),
            Ok(_) => stats(CloseReason::ClientClosed),
            Err(reason) => stats(reason),
        },
        () = activity.idle_for(idle) => stats(CloseReason::IdleTimeout),
        () = cut => stats(CloseReason::Shutdown),
    }
}

/// Relays two byte streams that are not plain sockets (upgraded HTTP
/// connections): copied both ways through buffers, with the same idle
/// timer, cut and byte counting as [`relay`].
pub async fn relay_io<A, B>(
    client: A,
    upstream: B,
    idle: Duration,
    counters: &Counters,
    cut: impl Future<Output = ()>,
) -> TunnelStats
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
    };
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut client = Watched {
        io: client,
        activity: &activity,
        read: &up,
        counter: &counters.upload,
    };
    let mut upstream = Watched {
        io: upstream,
        activity: &activity,
        read: &down,
        counter: &counters.download,
    };
    let close = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match r {
            Ok(_) => CloseReason::ClientClosed,
            // copy_bidirectional does not say which side failed.
            Err(_) => CloseReason::ClientError,
        },
        () = activity.idle_for(idle) => CloseReason::IdleTimeout,
        () = cut => CloseReason::Shutdown,
    };
    TunnelStats {
        upload: up.load(Relaxed),
        download: down.load(Relaxed),
        close,
    }
}

/// A stream whose reads count bytes and mark activity.
struct Watched<'a, T> {
    io: T,
    activity: &'a Activity,
    read: &'a AtomicU64,
    counter: &'a IntCounter,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.activity.touch();
            self.read.fetch_add(n, Relaxed);
            self.counter.inc_by(n);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        #[allow(clippy::disallowed_methods)] // a loopback pair for the test
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn counters() -> Counters {
        Counters {
            upload: IntCounter::new("u", "u").unwrap(),
            download: IntCounter::new("d", "d").unwrap(),
        }
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_prefix() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_up, mut server) = pair().await;
        let c = counters();
        let relay = tokio::spawn(async move {
            relay(
                &proxy_client,
                &proxy_up,
                b"hello ",
                Duration::from_secs(10),
                &c,
                std::future::pending(),
            )
            .await
        });
        client.write_all(b"world").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        server.write_all(&blob).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, blob);
        let stats = relay.await.unwrap();
        assert_eq!((stats.upload, stats.download), (11, 200_000));
        assert_eq!(stats.close, CloseReason::ClientClosed);
    }

    #[tokio::test]
    async fn copy_fallback_relays_and_half_closes() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_up, mut server) = pair().await;
        let c = counters();
        let total = AtomicU64::new(0);
        let activity = Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        };
        let sides = (CloseReason::ClientError, CloseReason::UpstreamError);
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let writer = async {
            client.write_all(&blob).await.unwrap();
            client.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        };
        let (r, (), got) = tokio::join!(
            pump(
                &proxy_client,
                &proxy_up,
                &total,
                &activity,
                &c.upload,
                sides,
                u64::MAX
            ),
            writer,
            reader
        );
        assert_eq!(r, Ok(true));
        assert_eq!(got, blob);
        assert_eq!(total.load(Relaxed), 100_000);
        assert_eq!(c.upload.get(), 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_times_out() {
        let (_client, proxy_client) = pair().await;
        let (proxy_up, _server) = pair().await;
        let stats = relay(
            &proxy_client,
            &proxy_up,
            b"",
            Duration::from_secs(30),
            &counters(),
            std::future::pending(),
        )
        .await;
        assert_eq!(stats.close, CloseReason::IdleTimeout);
    }

    #[tokio::test]
    async fn cut_ends_the_tunnel() {
        let (_client, proxy_client) = pair().await;
        let (proxy_up, _server) = pair().await;
        let stats = relay(
            &proxy_client,
            &proxy_up,
            b"",
            Duration::from_secs(30),
            &counters(),
            async {},
        )
        .await;
        assert_eq!(stats.close, CloseReason::Shutdown);
    }
}
