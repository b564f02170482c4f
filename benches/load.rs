//! Load tool: portcullis beside the same traffic sent direct and through Squid.
//!
//! Measures, on loopback only and in one run: bulk throughput through one and
//! eight CONNECT tunnels (each direction), new tunnels per second with a
//! 32-byte echo at 1 and 32 concurrent clients (with p50/p99 latency),
//! plain-HTTP forwarding over keep-alive connections (requests/s, p99),
//! resident memory per idle tunnel; and, in namespaces of its own, one
//! connection's throughput and new connections per second through the
//! transparent gateway against plain routing. Every number is a median of `--reps` runs
//! interleaved direct → portcullis → Squid, and every proxy number is shown
//! as a ratio against (or, for latency, added to) the direct run of the same
//! process, because the machine is small and shared.
//!
//! The upstreams are in-process tokio servers on 127.0.0.1 (bulk source/sink,
//! echo, hyper HTTP/1.1); portcullis is `target/release/portcullis` started
//! as a child on a generated config; Squid (Debian package, if installed) is a
//! child on a generated `squid.conf`. Both are killed when the tool ends.
//!
//! The `transparent-*` cases (root only; otherwise `skipped (needs root)`)
//! build network namespaces of their own: a client and a server joined by
//! two gateways, one that only routes (the direct column) and one running
//! portcullis behind its `render nftables` ruleset. Client and server are
//! this tool re-executed in their namespaces (`--ns-role`), running the same
//! bulk and echo code; everything is torn down when the tool ends.
//!
//! Run: `benches/run-load.sh [--quick]`, or
//! `cargo bench --bench load -- [--quick] [--reps N] [--only CASE[,CASE...]]`
//! (env: `LOAD_QUICK=1`, `LOAD_REPS`, `LOAD_ONLY`). Without `--bench`
//! (`cargo test --benches`) it runs a few-second smoke check that bytes
//! arrive intact through portcullis (and, as root, through both transparent
//! paths), so the tool cannot rot.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The upstream name the proxies are asked for; `[resolve]`/`hosts_file` map it to 127.0.0.1.
const HOST: &str = "load.test";
/// Ends an upload: a byte the pattern never holds (it holds 0..=250).
const UPLOAD_END: u8 = 0xff;
/// Bulk data is `offset % 251`, so any lost, duplicated or reordered byte shows.
const PATTERN_PERIOD: usize = 251;
/// One write of bulk data: a whole number of periods, so writes join seamlessly.
const PATTERN_LEN: usize = PATTERN_PERIOD * 261;
/// What each new tunnel sends and expects back. Starts with a lowercase
/// letter so portcullis classifies it as opaque at once (no TLS/HTTP wait).
const ECHO_PAYLOAD: &[u8; 32] = b"echo-0123456789abcdefghijklmnopq";
/// Body of every HTTP response of the upstream server.
const HTTP_BODY: &[u8] = b"portcullis load test: a small keep-alive response body.\n";
/// Longest any single transaction (open + echo, one HTTP exchange) may take.
const STALL: Duration = Duration::from_secs(10);
/// Longest a server keeps any one connection.
const SERVER_CONN_LIMIT: Duration = Duration::from_secs(300);
/// Concurrent opens while building up idle tunnels.
const IDLE_OPEN_CONCURRENCY: usize = 64;
/// Wait between opening the last idle tunnel and reading the proxy's RSS.
const IDLE_SETTLE: Duration = Duration::from_millis(1500);
/// Upper bound on one measurement run (the case's own time plus setup).
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Where the loopback cases' upstreams listen.
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Transparent cases: the second octet of the routed path's subnets
/// (10.231.1.0/24 client side, 10.231.2.0/24 server side)...
const ROUTED_NET: u8 = 231;
/// ...and of the path through portcullis (10.232.1.0/24, 10.232.2.0/24).
const PORTCULLIS_NET: u8 = 232;
/// The transparent listener in the portcullis gateway (the ruleset redirects to it).
const TRANSPARENT_PORT: u16 = 3129;
/// Namespace names: this, the tool's pid, and a letter per namespace.
const NS_PREFIX: &str = "pcload";
/// Longest a namespace role (server or client process) lives.
const ROLE_LIMIT: Duration = Duration::from_secs(3600);
/// Most jobs the client role runs before it stops.
const ROLE_MAX_JOBS: usize = 100_000;
/// Longest a child in a namespace may take to print its ready line.
const READY_LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Settings

#[derive(Clone, Debug)]
struct Settings {
    reps: usize,
    /// Bulk: stream this long or `bulk_bytes`, whichever first.
    bulk_time: Duration,
    bulk_bytes: u64,
    /// New tunnels / HTTP requests: this long or this many, whichever first.
    txn_time: Duration,
    txn_max: usize,
    http_conns: usize,
    /// A repetition runs as this many slices per target, interleaved.
    bulk_slices: usize,
    txn_slices: usize,
    idle_tunnels: usize,
    /// Check every byte (smoke) rather than counts only (bench).
    verify: bool,
    only: Vec<String>,
    quick: bool,
}

impl Settings {
    fn full() -> Settings {
        Settings {
            reps: 3,
            bulk_time: Duration::from_secs(3),
            bulk_bytes: 16 << 30,
            txn_time: Duration::from_secs(2),
            txn_max: 100_000,
            http_conns: 8,
            bulk_slices: 6,
            txn_slices: 10,
            idle_tunnels: 2000,
            verify: false,
            only: Vec::new(),
            quick: false,
        }
    }

    fn quick() -> Settings {
        Settings {
            reps: 1,
            bulk_time: Duration::from_millis(500),
            bulk_bytes: 512 << 20,
            txn_time: Duration::from_millis(500),
            txn_max: 20_000,
            bulk_slices: 2,
            txn_slices: 5,
            idle_tunnels: 300,
            quick: true,
            ..Settings::full()
        }
    }

    /// One slice of a repetition cut into `n`.
    fn sliced(&self, n: usize) -> Settings {
        let n = n.max(1);
        Settings {
            bulk_time: self.bulk_time / n as u32,
            bulk_bytes: self.bulk_bytes / n as u64,
            txn_time: self.txn_time / n as u32,
            txn_max: (self.txn_max / n).max(1),
            ..self.clone()
        }
    }

    /// `--quick`, `--reps N`, `--only a,b` (and `LOAD_QUICK`, `LOAD_REPS`, `LOAD_ONLY`).
    fn from_args(args: &[String]) -> Settings {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let quick = args.iter().any(|a| a == "--quick") || env("LOAD_QUICK").is_some();
        let mut s = if quick {
            Settings::quick()
        } else {
            Settings::full()
        };
        let mut reps = env("LOAD_REPS");
        let mut only = env("LOAD_ONLY");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--reps" => reps = it.next().cloned(),
                "--only" => only = it.next().cloned(),
                "--quick" | "--bench" => {}
                other => eprintln!("load: ignoring argument {other:?}"),
            }
        }
        if let Some(r) = reps {
            s.reps = r.parse().unwrap_or_else(|_| {
                eprintln!("load: --reps {r:?} is not a number; using {}", s.reps);
                s.reps
            });
            s.reps = s.reps.clamp(1, 50);
        }
        if let Some(o) = only {
            s.only = o.split(',').map(|c| c.trim().to_string()).collect();
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Bulk data pattern

fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        (0..PATTERN_LEN)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect()
    })
}

/// Whether `data` is the pattern from stream offset `offset` on.
fn pattern_matches(offset: u64, data: &[u8]) -> bool {
    let p = pattern();
    let mut start = (offset % PATTERN_PERIOD as u64) as usize;
    let mut rest = data;
    while !rest.is_empty() {
        let n = rest.len().min(PATTERN_LEN - start);
        if rest[..n] != p[start..start + n] {
            return false;
        }
        rest = &rest[n..];
        start = 0;
    }
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Upstream → client.
    Down,
    /// Client → upstream.
    Up,
}

/// 16 bytes: `bulk`, `d`|`u`, `v`|`-` (verify), 2 pad, limit (u64 BE).
fn bulk_header(dir: Dir, verify: bool, limit: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(b"bulk");
    h[4] = if dir == Dir::Down { b'd' } else { b'u' };
    h[5] = if verify { b'v' } else { b'-' };
    h[8..].copy_from_slice(&limit.to_be_bytes());
    h
}

// ---------------------------------------------------------------------------
// Upstream servers (in-process, 127.0.0.1)

#[derive(Clone, Copy, Debug)]
struct Upstreams {
    bulk: SocketAddr,
    echo: SocketAddr,
    http: SocketAddr,
}

impl Upstreams {
    fn ports(&self) -> [u16; 3] {
        [self.bulk.port(), self.echo.port(), self.http.port()]
    }
}

/// Download: sends the pattern up to the limit (or until the client goes).
/// Upload: reads up to the end mark, then answers the byte count (u64 BE)
/// and `1` if every byte matched (or was not checked), `0` otherwise.
async fn bulk_conn(mut s: TcpStream) -> io::Result<()> {
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr).await?;
    if &hdr[..4] != b"bulk" {
        return Err(io::Error::other("bad bulk header"));
    }
    let verify = hdr[5] == b'v';
    let limit = u64::from_be_bytes(hdr[8..].try_into().expect("8 bytes"));
    match hdr[4] {
        b'd' => {
            let p = pattern();
            let mut sent = 0u64;
            while sent < limit {
                let n = (limit - sent).min(PATTERN_LEN as u64) as usize;
                s.write_all(&p[..n]).await?;
                sent += n as u64;
            }
            s.shutdown().await
        }
        b'u' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            let mut intact = true;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::other("upload ended without its end mark"));
                }
                // The end mark is the last byte the client sends, so it ends a read.
                let done = buf[n - 1] == UPLOAD_END;
                let data = &buf[..n - usize::from(done)];
                if verify {
                    intact &= pattern_matches(got, data);
                }
                got += data.len() as u64;
                if done {
                    break;
                }
            }
            let mut reply = [0u8; 9];
            reply[..8].copy_from_slice(&got.to_be_bytes());
            reply[8] = u8::from(intact);
            s.write_all(&reply).await?;
            s.shutdown().await
        }
        _ => Err(io::Error::other("bad bulk direction")),
    }
}

async fn echo_conn(mut s: TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 2048];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}

/// Keep-alive HTTP/1.1: `GET /x` → 200 with [`HTTP_BODY`], anything else 404.
async fn http_conn(s: TcpStream) -> io::Result<()> {
    let svc = service_fn(|req: Request<Incoming>| async move {
        let mut resp = Response::new(Full::new(Bytes::from_static(HTTP_BODY)));
        if req.uri().path() != "/x" {
            *resp.status_mut() = StatusCode::NOT_FOUND;
        }
        Ok::<_, Infallible>(resp)
    });
    http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(s), svc)
        .await
        .map_err(io::Error::other)
}

/// Accepts until the runtime shuts down; each connection is bounded in time.
async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                let conn = handler(s);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(SERVER_CONN_LIMIT, conn).await;
                });
            }
            // EMFILE and the like: back off rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The three servers on `ip` (127.0.0.1; 0.0.0.0 in the server namespace).
async fn start_upstreams(ip: IpAddr) -> io::Result<Upstreams> {
    let bulk = TcpListener::bind((ip, 0)).await?;
    let echo = TcpListener::bind((ip, 0)).await?;
    let http = TcpListener::bind((ip, 0)).await?;
    let ups = Upstreams {
        bulk: bulk.local_addr()?,
        echo: echo.local_addr()?,
        http: http.local_addr()?,
    };
    tokio::spawn(serve(bulk, bulk_conn));
    tokio::spawn(serve(echo, echo_conn));
    tokio::spawn(serve(http, http_conn));
    Ok(ups)
}

// ---------------------------------------------------------------------------
// Clients

/// How a client reaches an upstream.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// Straight to the upstream address.
    Direct,
    /// Through an explicit proxy at this address (CONNECT / absolute URI).
    Proxy(SocketAddr),
}

fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Set only in the `--ns-role client` process, which runs inside the client
/// namespace the tool made (no route leaves it).
static IN_TOOL_NETNS: AtomicBool = AtomicBool::new(false);

/// Where the tool may dial: loopback, and the servers of its own namespaces
/// from inside its client namespace.
fn dial_allowed(ip: IpAddr) -> bool {
    let in_tool_net = |ip: Ipv4Addr| {
        let [a, b, ..] = ip.octets();
        a == 10 && (b == ROUTED_NET || b == PORTCULLIS_NET)
    };
    ip.is_loopback()
        || (IN_TOOL_NETNS.load(Relaxed) && matches!(ip, IpAddr::V4(v) if in_tool_net(v)))
}

/// The tool's only way to dial: loopback, or its own namespaces, nothing else.
async fn connect_local(addr: SocketAddr) -> io::Result<TcpStream> {
    assert!(
        dial_allowed(addr.ip()),
        "load traffic stays on loopback and in the tool's namespaces: {addr}"
    );
    #[allow(clippy::disallowed_methods)] // a benchmark client, not the proxy's egress
    TcpStream::connect(addr).await
}

fn find_crlfcrlf(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Reads until `buf` holds a complete head; returns its length (through CRLFCRLF).
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
    let mut scanned = 0;
    loop {
        if let Some(i) = find_crlfcrlf(&buf[scanned..]) {
            return Ok(scanned + i + 4);
        }
        scanned = buf.len().saturating_sub(3);
        if buf.len() > 16 * 1024 {
            return Err("response head over 16 KiB".into());
        }
        let mut tmp = [0u8; 2048];
        let n = s.read(&mut tmp).await.map_err(io_err("read head"))?;
        if n == 0 {
            return Err("connection closed before the end of the response head".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn first_line(head: &[u8]) -> String {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    String::from_utf8_lossy(line).into_owned()
}

/// Connects to `dest` (directly or by CONNECT through the proxy). Returns the
/// stream and any tunnel bytes that arrived with the proxy's answer.
async fn open(via: Via, dest: SocketAddr) -> Result<(TcpStream, Vec<u8>), String> {
    match via {
        Via::Direct => {
            let s = connect_local(dest)
                .await
                .map_err(io_err("connect upstream"))?;
            let _ = s.set_nodelay(true);
            Ok((s, Vec::new()))
        }
        Via::Proxy(proxy) => {
            let mut s = connect_local(proxy)
                .await
                .map_err(io_err("connect proxy"))?;
            let _ = s.set_nodelay(true);
            let port = dest.port();
            let req = format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n");
            s.write_all(req.as_bytes())
                .await
                .map_err(io_err("send CONNECT"))?;
            let mut buf = Vec::with_capacity(256);
            let end = read_head(&mut s, &mut buf).await?;
            if !(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")) {
                return Err(format!("CONNECT answered {:?}", first_line(&buf)));
            }
            Ok((s, buf.split_off(end)))
        }
    }
}

/// Sends the 32-byte payload and checks it comes back unchanged.
async fn echo_check(s: &mut TcpStream, mut got: Vec<u8>) -> Result<(), String> {
    s.write_all(ECHO_PAYLOAD)
        .await
        .map_err(io_err("echo write"))?;
    let mut buf = [0u8; 64];
    while got.len() < ECHO_PAYLOAD.len() {
        let n = s.read(&mut buf).await.map_err(io_err("echo read"))?;
        if n == 0 {
            return Err(format!("tunnel closed after {} echo bytes", got.len()));
        }
        got.extend_from_slice(&buf[..n]);
    }
    if got[..] != ECHO_PAYLOAD[..] {
        return Err("echo bytes came back changed".into());
    }
    Ok(())
}

/// One new tunnel: open, echo 32 bytes, close.
async fn echo_once(via: Via, echo: SocketAddr) -> Result<(), String> {
    let (mut s, pre) = open(via, echo).await?;
    echo_check(&mut s, pre).await
}

/// Bytes moved and the time it took, for one bulk stream.
async fn bulk_stream(
    via: Via,
    dest: SocketAddr,
    dir: Dir,
    time: Duration,
    limit: u64,
    verify: bool,
) -> Result<(u64, Duration), String> {
    let (mut s, pre) = open(via, dest).await?;
    if !pre.is_empty() {
        return Err("bytes before the bulk request".into());
    }
    s.write_all(&bulk_header(dir, verify, limit))
        .await
        .map_err(io_err("bulk header"))?;
    let start = Instant::now();
    let deadline = start + time;
    match dir {
        Dir::Down => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).await.map_err(io_err("bulk read"))?;
                if n == 0 {
                    if got != limit {
                        return Err(format!("download ended at {got} of {limit} bytes"));
                    }
                    break;
                }
                if verify && !pattern_matches(got, &buf[..n]) {
                    return Err(format!("download corrupted near byte {got}"));
                }
                got += n as u64;
                if Instant::now() >= deadline {
                    break;
                }
            }
            Ok((got, start.elapsed()))
        }
        Dir::Up => {
            let p = pattern();
            let mut sent = 0u64;
            while sent < limit && Instant::now() < deadline {
                let n = (limit - sent).min(PATTERN_LEN as u64) as usize;
                s.write_all(&p[..n]).await.map_err(io_err("bulk write"))?;
                sent += n as u64;
            }
            // Not a half-close: Squid ends the whole tunnel on one.
            s.write_all(&[UPLOAD_END])
                .await
                .map_err(io_err("bulk end mark"))?;
            let mut reply = [0u8; 9];
            s.read_exact(&mut reply)
                .await
                .map_err(io_err("bulk upload receipt"))?;
            let elapsed = start.elapsed();
            let got = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
            if got != sent || reply[8] != 1 {
                return Err(format!(
                    "upload: sent {sent} bytes, upstream got {got} (intact: {})",
                    reply[8] == 1
                ));
            }
            Ok((sent, elapsed))
        }
    }
}

/// Aggregate MiB/s over `streams` parallel tunnels.
async fn bulk(
    via: Via,
    ups: Upstreams,
    dir: Dir,
    streams: usize,
    s: &Settings,
) -> Result<Sample, String> {
    let limit = s.bulk_bytes / streams as u64;
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (time, verify) = (s.bulk_time, s.verify);
        tasks.push(tokio::spawn(bulk_stream(
            via, ups.bulk, dir, time, limit, verify,
        )));
    }
    let mut bytes = 0u64;
    let mut longest = Duration::ZERO;
    for t in tasks {
        let (b, d) = t.await.map_err(|e| format!("bulk task: {e}"))??;
        bytes += b;
        longest = longest.max(d);
    }
    Ok(Sample::Bulk {
        bytes,
        secs: longest.as_secs_f64(),
    })
}

/// What one run of a case measured; runs (time slices) of one target add up.
#[derive(Debug)]
enum Sample {
    /// Bytes moved and the time it took (the slowest stream's).
    Bulk { bytes: u64, secs: f64 },
    /// Transactions, the wall time they took, and each one's latency.
    Txn { secs: f64, lat: Vec<Duration> },
}

impl Sample {
    fn merge(self, other: Sample) -> Sample {
        match (self, other) {
            (Sample::Bulk { bytes, secs }, Sample::Bulk { bytes: b, secs: t }) => Sample::Bulk {
                bytes: bytes + b,
                secs: secs + t,
            },
            (Sample::Txn { secs, mut lat }, Sample::Txn { secs: t, lat: l }) => {
                lat.extend(l);
                Sample::Txn {
                    secs: secs + t,
                    lat,
                }
            }
            (a, _) => a,
        }
    }

    /// Bulk: [MiB/s]. Transactions: [per second, p50 µs, p99 µs].
    fn values(mut self) -> Vec<f64> {
        match &mut self {
            Sample::Bulk { bytes, secs } => vec![*bytes as f64 / (1 << 20) as f64 / *secs],
            Sample::Txn { secs, lat } => {
                lat.sort_unstable();
                vec![
                    lat.len() as f64 / *secs,
                    percentile(lat, 0.50),
                    percentile(lat, 0.99),
                ]
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

/// Runs `clients` loops of `txn` until the time or the count budget is spent.
async fn closed_loop<F, Fut>(clients: usize, s: &Settings, txn: F) -> Result<Sample, String>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let start = Instant::now();
    let deadline = start + s.txn_time;
    let budget = Arc::new(AtomicUsize::new(0));
    let max = s.txn_max;
    let txn = Arc::new(txn);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (budget, txn) = (budget.clone(), txn.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline && budget.fetch_add(1, Relaxed) < max {
                let t = Instant::now();
                match tokio::time::timeout(STALL, txn(client)).await {
                    Ok(Ok(())) => lat.push(t.elapsed()),
                    Ok(Err(e)) => return Err(format!("{e} (after {} ok)", lat.len())),
                    Err(_) => return Err(format!("no answer in {STALL:?}")),
                }
            }
            Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| format!("client task: {e}"))??);
    }
    let secs = start.elapsed().as_secs_f64();
    if all.is_empty() {
        return Err("no transaction completed".into());
    }
    Ok(Sample::Txn { secs, lat: all })
}

async fn tunnels(via: Via, ups: Upstreams, clients: usize, s: &Settings) -> Result<Sample, String> {
    let echo = ups.echo;
    closed_loop(clients, s, move |_| echo_once(via, echo)).await
}

/// The request a client sends: origin-form direct, absolute-URI via a proxy.
fn http_request(via: Via, server: SocketAddr) -> Vec<u8> {
    let port = server.port();
    let target = match via {
        Via::Direct => "/x".to_string(),
        Via::Proxy(_) => format!("http://{HOST}:{port}/x"),
    };
    format!(
        "GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: portcullis-load/1\r\n\
         Accept: */*\r\n\r\n"
    )
    .into_bytes()
}

/// Fills `buf` to at least `n` bytes.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Result<(), String> {
    let mut tmp = [0u8; 4096];
    while buf.len() < n {
        let got = s.read(&mut tmp).await.map_err(io_err("read body"))?;
        if got == 0 {
            return Err("connection closed inside a response body".into());
        }
        buf.extend_from_slice(&tmp[..got]);
    }
    Ok(())
}

/// Reads a chunked body from `buf`/`s` (consuming it) and returns it.
async fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let n = buf.len() + 1;
            fill(s, buf, n).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // No trailers expected: just the final CRLF.
            fill(s, buf, 2).await?;
            buf.drain(..2);
            return Ok(body);
        }
        fill(s, buf, size + 2).await?;
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// One request/response on a keep-alive connection; checks status and body.
async fn http_exchange(s: &mut TcpStream, buf: &mut Vec<u8>, req: &[u8]) -> Result<(), String> {
    s.write_all(req).await.map_err(io_err("send request"))?;
    let head_len = read_head(s, buf).await?;
    let (mut length, mut chunked, mut close) = (None, false, false);
    {
        let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| "non-UTF-8 head")?;
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("HTTP answered {status:?}"));
        }
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
    }
    buf.drain(..head_len);
    let intact = if chunked {
        read_chunked(s, buf).await? == HTTP_BODY
    } else if let Some(n) = length {
        fill(s, buf, n).await?;
        let ok = buf[..n] == *HTTP_BODY;
        buf.drain(..n);
        ok
    } else {
        return Err("response without Content-Length or chunked body".into());
    };
    if !intact {
        return Err("response body came back changed".into());
    }
    if close {
        return Err("keep-alive refused (Connection: close)".into());
    }
    Ok(())
}

/// `conns` keep-alive connections, each sending requests back to back.
/// Returns [requests/s, p50 µs, p99 µs].
async fn http_load(via: Via, ups: Upstreams, conns: usize, s: &Settings) -> Result<Sample, String> {
    let req: Arc<[u8]> = http_request(via, ups.http).into();
    let connect_to = match via {
        Via::Direct => ups.http,
        Via::Proxy(p) => p,
    };
    let mut streams = Vec::new();
    for _ in 0..conns {
        let s = connect_local(connect_to).await.map_err(io_err("connect"))?;
        let _ = s.set_nodelay(true);
        streams.push(tokio::sync::Mutex::new((s, Vec::with_capacity(4096))));
    }
    let streams = Arc::new(streams);
    closed_loop(conns, s, move |client| {
        let (streams, req) = (streams.clone(), req.clone());
        async move {
            let mut guard = streams[client].lock().await;
            let (s, buf) = &mut *guard;
            http_exchange(s, buf, &req).await
        }
    })
    .await
}

fn rss_kib(pid: u32) -> Result<f64, String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .ok_or_else(|| format!("no VmRSS for pid {pid}"))
}

/// Holds `n` tunnels open and idle (each after one echo) and returns
/// [KiB of proxy RSS per tunnel, tunnels held].
async fn idle(via: Via, ups: Upstreams, pid: u32, n: usize) -> Result<Vec<f64>, String> {
    // Warm-up: first-use allocations are not per-tunnel cost.
    let mut warm = Vec::new();
    for _ in 0..32 {
        let (mut s, pre) = open(via, ups.echo).await?;
        echo_check(&mut s, pre).await?;
        warm.push(s);
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let gate = Arc::new(Semaphore::new(IDLE_OPEN_CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let echo = ups.echo;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            tokio::time::timeout(STALL, async {
                let (mut s, pre) = open(via, echo).await?;
                echo_check(&mut s, pre).await?;
                Ok::<_, String>(s)
            })
            .await
            .map_err(|_| "open stalled".to_string())?
        }));
    }
    let mut held = Vec::with_capacity(n);
    let mut first_error = None;
    for t in tasks {
        match t.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(s) => held.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if held.len() < n / 2 {
        return Err(format!(
            "only {} of {n} idle tunnels opened: {}",
            held.len(),
            first_error.unwrap_or_default()
        ));
    }
    if let Some(e) = first_error {
        eprintln!("  idle: {} of {n} tunnels opened ({e})", held.len());
    }
    // Past any short idle release in the proxy (portcullis drops a tunnel's
    // pipe after 1 s without traffic), so this is the steady idle state.
    tokio::time::sleep(IDLE_SETTLE).await;
    let after = rss_kib(pid)?;
    let per = (after - before) / held.len() as f64;
    Ok(vec![per, held.len() as f64])
}

// ---------------------------------------------------------------------------
// Child processes

/// A child killed (by its own pid) and reaped when dropped, with its temp dir.
struct Proc {
    child: Child,
    dir: tempfile::TempDir,
    /// `/dev/shm` names starting with this belong to the child (Squid).
    shm_prefix: Option<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Squid's shared-memory segments are named after its service name,
        // which is unique to this child: remove what it left.
        if let Some(prefix) = &self.shm_prefix
            && let Ok(entries) = fs::read_dir("/dev/shm")
        {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(prefix.as_str()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tail(&self, file: &str) -> String {
        tail(&self.dir.path().join(file))
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// A running proxy: where it listens and its process.
struct Proxy {
    addr: SocketAddr,
    proc: Proc,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => manifest_dir().join(d),
        None => manifest_dir().join("target"),
    }
}

/// `target/{release,debug}/portcullis`, newest first; release only when `release_only`.
fn find_portcullis(release_only: bool) -> Option<PathBuf> {
    let profiles: &[&str] = if release_only {
        &["release"]
    } else {
        &["release", "debug"]
    };
    profiles
        .iter()
        .map(|p| target_dir().join(p).join("portcullis"))
        .filter(|p| p.is_file())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Newest modification time under `dir` (recursively).
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let t = if entry.path().is_dir() {
            newest_mtime(&entry.path())
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn portcullis_config(ports: &[u16], level: &str) -> String {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# Generated by benches/load.rs.
[vars]
region = "westus2"
storage = "loadstore"
vnet = "10.0.0.0/16"

[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[clients]
allow = ["127.0.0.0/8"]

[policy]
profile = "azureml"

[[rule]]
name = "load-test"
description = "benches/load.rs upstream servers"
hosts = ["{HOST}"]
ports = [{ports}]

[[rule]]
name = "load-test-loopback"
description = "loopback is guarded: the load upstreams need an explicit address rule"
cidrs = ["127.0.0.1/32"]
ports = [{ports}]

[resolve]
"{HOST}" = ["127.0.0.1"]

[limits]
max_connections = 20000
max_connections_per_client = 20000

[log]
level = "{level}"
"#
    )
}

fn start_portcullis(bin: &Path, ports: &[u16], level: &str) -> Result<Proxy, String> {
    let dir = tempfile::tempdir().map_err(io_err("tempdir"))?;
    let config = dir.path().join("portcullis.toml");
    fs::write(&config, portcullis_config(ports, level)).map_err(io_err("write config"))?;
    let log = fs::File::create(dir.path().join("portcullis.log")).map_err(io_err("log file"))?;
    let mut child = Command::new(bin)
        .arg("run")
        .arg("-c")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let proc = Proc {
        child,
        dir,
        shm_prefix: None,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Drain to EOF (the child's exit), forwarding lines while anyone listens.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut addr = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "ready" => break,
            Ok(line) => {
                if let Some(a) = line.strip_prefix("listening proxy ") {
                    addr = a.trim().parse::<SocketAddr>().ok();
                }
            }
            Err(_) => {
                return Err(format!(
                    "portcullis did not print `ready`; its log ends:\n{}",
                    proc.tail("portcullis.log")
                ));
            }
        }
    }
    let addr = addr.ok_or("portcullis printed no `listening proxy` line")?;
    Ok(Proxy { addr, proc })
}

fn squid_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("squid"))
        .find(|p| p.is_file())
}

fn squid_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .next()
                .and_then(|l| l.split("Version ").nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("bind"))?;
    Ok(l.local_addr().map_err(io_err("local_addr"))?.port())
}

fn squid_config(dir: &Path, port: u16, ports: &[u16]) -> String {
    let d = dir.display();
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "# Generated by benches/load.rs: an allowlist forward proxy, no cache.
http_port 127.0.0.1:{port}
workers 1
visible_hostname portcullis-load
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log stdio:{d}/access.log
coredump_dir {d}
netdb_filename none
hosts_file {d}/hosts
dns_nameservers 127.0.0.1
pinger_enable off
icp_port 0
htcp_port 0
max_filedescriptors 16384
cache deny all
acl load_src src 127.0.0.0/8
acl load_dst dstdomain {HOST}
acl load_ports port {ports}
http_access allow load_src load_dst load_ports
http_access deny all
"
    )
}

fn start_squid(bin: &Path, ports: &[u16]) -> Result<Proxy, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().map_err(io_err("tempdir"))?;
    // Squid drops root for its effective user, which must write its logs here.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).map_err(io_err("chmod"))?;
    let port = free_port()?;
    let conf = dir.path().join("squid.conf");
    fs::write(&conf, squid_config(dir.path(), port, ports)).map_err(io_err("squid.conf"))?;
    fs::write(dir.path().join("hosts"), format!("127.0.0.1 {HOST}\n")).map_err(io_err("hosts"))?;
    let out = fs::File::create(dir.path().join("squid.out")).map_err(io_err("squid.out"))?;
    let err = out.try_clone().map_err(io_err("squid.out"))?;
    // A service name of our own keeps this Squid's shared memory apart from
    // any other Squid's (and lets Drop remove exactly its segments).
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let service = format!(
        "portcullisload{}x{}",
        std::process::id(),
        SERIAL.fetch_add(1, Relaxed)
    );
    let child = Command::new(bin)
        .arg("-n")
        .arg(&service)
        .arg("-N")
        .arg("-f")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start squid: {e}"))?;
    let mut proc = Proc {
        child,
        dir,
        shm_prefix: Some(format!("{service}-")),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(Proxy { addr, proc });
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Err(format!(
                "squid exited ({status}):\n{}\n{}",
                proc.tail("squid.out"),
                proc.tail("cache.log")
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "squid did not listen on {addr}:\n{}",
                proc.tail("cache.log")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Raises this process's open-file soft limit to the hard limit (children
/// inherit it) with util-linux `prlimit`; returns the soft limit in force.
fn raise_nofile() -> Option<u64> {
    let read = || -> Option<(u64, u64)> {
        let limits = fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut nums = line
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok());
        Some((nums.next()?, nums.next().unwrap_or(u64::MAX)))
    };
    let (soft, hard) = read()?;
    if soft < hard {
        let pid = std::process::id().to_string();
        let _ = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    read().map(|(soft, _)| soft)
}

// ---------------------------------------------------------------------------
// Transparent path: network namespaces (root only)
//
//   client ns            gateway ns (one per path)          server ns
//   eth0 10.231.1.2 ── toc 10.231.1.1 [routed] tos 10.231.2.1 ── eth0 10.231.2.2
//   eth1 10.232.1.2 ── toc 10.232.1.1 [portc.] tos 10.232.2.1 ── eth1 10.232.2.2
//
// Both gateways forward (ip_forward=1); the portcullis one also runs
// `portcullis run` behind the ruleset `portcullis render nftables` printed,
// so the client's TCP to 10.232.2.2 is redirected to its transparent
// listener. The client reaches the servers through either gateway only by
// choosing the destination address, so the two paths interleave without any
// reconfiguration. The server and the client are this tool re-executed
// under `ip netns exec` (`--ns-role server|client`); the client takes one
// job per stdin line and answers one line on stdout.

/// Whether this process runs with effective uid 0.
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a set-up command to completion; its stderr is the error.
fn must(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn tool_works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deletes a namespace and its `/etc/netns` directory (best effort).
fn delete_netns(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
}

/// Deletes namespaces an earlier run left when it was killed (named
/// [`NS_PREFIX`], a pid that no longer runs, and one letter), after killing
/// the processes it had started in them (`ip netns pids`).
fn remove_stale_netns() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && rest.len() == pid.len() + 1 && !Path::new("/proc").join(&pid).exists()
        {
            eprintln!("load: removing namespace {name} left by a killed run");
            let pids = must(Command::new("ip").args(["netns", "pids", &name])).unwrap_or_default();
            for pid in String::from_utf8_lossy(&pids).split_whitespace() {
                if pid.parse::<u32>().is_ok() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            delete_netns(&name);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Ns {
    Client,
    Routed,
    Gateway,
    Server,
}

/// A process started in a namespace: its stdin (kept open: the roles end at
/// EOF), its stdout lines, and the file its stderr goes to.
struct Role {
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Role {
    /// Waits up to `limit` for a stdout line `pred` accepts; `pred` sees
    /// every line before it.
    fn wait_line(
        &self,
        limit: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if pred(&line) {
                return Ok(line);
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(format!(
            "no answer within {limit:?}; its stderr ends:\n{}",
            tail(&self.log)
        ))
    }
}

/// The four namespaces and every process started in them. Dropping it (also
/// on an error or a panic) kills the processes, then deletes the namespaces
/// (their veth pairs go with them) and their `/etc/netns` directories.
struct Netns {
    base: String,
    /// Namespaces made so far (all of them deleted on drop, even after a
    /// partial set-up).
    created: Vec<String>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Netns {
    fn name(&self, ns: Ns) -> String {
        let letter = match ns {
            Ns::Client => 'c',
            Ns::Routed => 'r',
            Ns::Gateway => 'p',
            Ns::Server => 's',
        };
        format!("{}{letter}", self.base)
    }

    /// `ip netns exec NS PROGRAM`; add the arguments.
    fn exec(&self, ns: Ns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(self.name(ns)).arg(program);
        cmd
    }

    /// `ip -n NS ARGS` (arguments split on spaces).
    fn ip(&self, ns: Ns, args: &str) -> Result<(), String> {
        must(
            Command::new("ip")
                .arg("-n")
                .arg(self.name(ns))
                .args(args.split_whitespace()),
        )
        .map(drop)
    }

    fn sysctl(&self, ns: Ns, setting: &str) -> Result<(), String> {
        must(self.exec(ns, "sysctl").args(["-qw", setting])).map(drop)
    }

    fn create() -> Result<Netns, String> {
        remove_stale_netns();
        let mut n = Netns {
            base: format!("{NS_PREFIX}{}", std::process::id()),
            created: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().map_err(io_err("tempdir"))?,
        };
        for ns in [Ns::Client, Ns::Routed, Ns::Gateway, Ns::Server] {
            let name = n.name(ns);
            must(Command::new("ip").args(["netns", "add", &name]))?;
            n.created.push(name.clone());
            // Nothing resolves inside: no real DNS, ever.
            let etc = Path::new("/etc/netns").join(&name);
            fs::create_dir_all(&etc)
                .and_then(|()| fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n"))
                .map_err(io_err("/etc/netns/NAME/resolv.conf"))?;
            n.ip(ns, "link set lo up")?;
        }
        let (c, s) = (n.name(Ns::Client), n.name(Ns::Server));
        for (gw, net, dev) in [
            (Ns::Routed, ROUTED_NET, "eth0"),
            (Ns::Gateway, PORTCULLIS_NET, "eth1"),
        ] {
            let g = n.name(gw);
            must(Command::new("ip").args([
                "-n", &c, "link", "add", dev, "type", "veth", "peer", "name", "toc", "netns", &g,
            ]))?;
            must(Command::new("ip").args([
                "-n", &s, "link", "add", dev, "type", "veth", "peer", "name", "tos", "netns", &g,
            ]))?;
            n.ip(Ns::Client, &format!("addr add 10.{net}.1.2/24 dev {dev}"))?;
            n.ip(gw, &format!("addr add 10.{net}.1.1/24 dev toc"))?;
            n.ip(gw, &format!("addr add 10.{net}.2.1/24 dev tos"))?;
            n.ip(Ns::Server, &format!("addr add 10.{net}.2.2/24 dev {dev}"))?;
            for (ns, d) in [
                (Ns::Client, dev),
                (gw, "toc"),
                (gw, "tos"),
                (Ns::Server, dev),
            ] {
                n.ip(ns, &format!("link set {d} up"))?;
            }
            n.ip(
                Ns::Client,
                &format!("route add 10.{net}.2.0/24 via 10.{net}.1.1"),
            )?;
            n.ip(
                Ns::Server,
                &format!("route add 10.{net}.1.0/24 via 10.{net}.2.1"),
            )?;
            n.sysctl(gw, "net.ipv4.ip_forward=1")?;
        }
        // Tens of thousands of short connections from one address to one
        // port: let the active closers (client, and portcullis upstream)
        // reuse TIME_WAIT ports, as loopback does by default.
        for ns in [Ns::Client, Ns::Gateway] {
            n.sysctl(ns, "net.ipv4.tcp_tw_reuse=1")?;
            n.sysctl(ns, "net.ipv4.ip_local_port_range=1024 65000")?;
        }
        Ok(n)
    }

    /// Starts `program args` in a namespace (stdin and stdout piped, stderr
    /// to `DIR/log`); the process belongs to `self`.
    fn spawn(
        &mut self,
        ns: Ns,
        program: &Path,
        args: &[&std::ffi::OsStr],
        log: &str,
    ) -> Result<Role, String> {
        let log = self.dir.path().join(log);
        let err = fs::File::create(&log).map_err(io_err("log file"))?;
        let mut child = self
            .exec(ns, program)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {} in {ns:?}: {e}", program.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("child without piped stdio".into());
        };
        self.children.push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Drain to EOF (the child's exit), forwarding lines while anyone listens.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        Ok(Role {
            stdin,
            lines: rx,
            log,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        for name in &self.created {
            delete_netns(name);
        }
    }
}

fn transparent_config(ports: &[u16], level: &str) -> String {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let p = PORTCULLIS_NET;
    format!(
        r#"# Generated by benches/load.rs (transparent cases).
[vars]
region = "westus2"
storage = "loadstore"
vnet = "10.0.0.0/16"

[listen]
proxy = "127.0.0.1:0"
transparent = "0.0.0.0:{TRANSPARENT_PORT}"
admin = "127.0.0.1:0"

[clients]
allow = ["10.{p}.1.0/24"]

[policy]
profile = "azureml"

[[rule]]
name = "load-test-server"
description = "10/8 is guarded: the load servers need an explicit address rule"
cidrs = ["10.{p}.2.2/32"]
ports = [{ports}]

[limits]
max_connections = 20000
max_connections_per_client = 20000

[log]
level = "{level}"
"#
    )
}

/// One job for the client role: `WORK BULK ECHO HTTP BULK_MS BULK_BYTES
/// TXN_MS TXN_MAX VERIFY`, with WORK `bulk:d|u:STREAMS` or `tunnels:CLIENTS`.
fn job_line(work: Work, ups: Upstreams, s: &Settings) -> Result<String, String> {
    let w = match work {
        Work::Bulk { dir, streams } => {
            format!(
                "bulk:{}:{streams}",
                if dir == Dir::Down { 'd' } else { 'u' }
            )
        }
        Work::Tunnels { clients } => format!("tunnels:{clients}"),
        Work::Http | Work::Idle => return Err(format!("{work:?} is not a transparent case")),
    };
    Ok(format!(
        "{w} {} {} {} {} {} {} {} {}",
        ups.bulk,
        ups.echo,
        ups.http,
        s.bulk_time.as_millis(),
        s.bulk_bytes,
        s.txn_time.as_millis(),
        s.txn_max,
        u8::from(s.verify)
    ))
}

fn parse_job(line: &str) -> Result<(Work, Upstreams, Settings), String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [
        w,
        bulk,
        echo,
        http,
        bulk_ms,
        bulk_bytes,
        txn_ms,
        txn_max,
        verify,
    ] = f[..]
    else {
        return Err(format!("bad job {line:?}"));
    };
    let bad = |what: &str| format!("bad {what} in job {line:?}");
    let num = |v: &str, what: &str| v.parse::<u64>().map_err(|_| bad(what));
    let addr = |v: &str| v.parse::<SocketAddr>().map_err(|_| bad("address"));
    let work = match w.split(':').collect::<Vec<_>>()[..] {
        ["bulk", d, n] => Work::Bulk {
            dir: match d {
                "d" => Dir::Down,
                "u" => Dir::Up,
                _ => return Err(bad("direction")),
            },
            streams: num(n, "streams")?.clamp(1, 64) as usize,
        },
        ["tunnels", n] => Work::Tunnels {
            clients: num(n, "clients")?.clamp(1, 256) as usize,
        },
        _ => return Err(bad("work")),
    };
    let ups = Upstreams {
        bulk: addr(bulk)?,
        echo: addr(echo)?,
        http: addr(http)?,
    };
    let s = Settings {
        reps: 1,
        bulk_time: Duration::from_millis(num(bulk_ms, "time")?.min(60_000)),
        bulk_bytes: num(bulk_bytes, "size")?.max(1),
        txn_time: Duration::from_millis(num(txn_ms, "time")?.min(60_000)),
        txn_max: num(txn_max, "count")?.clamp(1, 1_000_000) as usize,
        verify: verify == "1",
        ..Settings::quick()
    };
    Ok((work, ups, s))
}

/// A sample as one line: `bulk BYTES SECS` or `txn SECS NS,NS,...`.
fn sample_line(sample: &Sample) -> String {
    match sample {
        Sample::Bulk { bytes, secs } => format!("bulk {bytes} {secs}"),
        Sample::Txn { secs, lat } => {
            let lat: Vec<String> = lat.iter().map(|d| d.as_nanos().to_string()).collect();
            format!("txn {secs} {}", lat.join(","))
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let bad = || format!("bad answer from the client: {:?}", short_error(line));
    let mut f = line.split_whitespace();
    let (kind, a, b) = (f.next(), f.next(), f.next());
    match (kind, a, b) {
        (Some("error"), _, _) => Err(line.trim_start_matches("error").trim().to_string()),
        (Some("bulk"), Some(bytes), Some(secs)) => Ok(Sample::Bulk {
            bytes: bytes.parse().map_err(|_| bad())?,
            secs: secs.parse().map_err(|_| bad())?,
        }),
        (Some("txn"), Some(secs), Some(lat)) => Ok(Sample::Txn {
            secs: secs.parse().map_err(|_| bad())?,
            lat: lat
                .split(',')
                .map(|n| n.parse().map(Duration::from_nanos))
                .collect::<Result<_, _>>()
                .map_err(|_| bad())?,
        }),
        _ => Err(bad()),
    }
}

/// The client role, from the parent's side.
struct NsClient {
    role: Role,
    /// Set once a job went unanswered: later answers would not match.
    dead: Option<String>,
}

impl NsClient {
    /// Runs one job in the client namespace (blocking).
    fn run(&mut self, work: Work, ups: Upstreams, s: &Settings) -> Result<Sample, String> {
        use std::io::Write as _;
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let job = job_line(work, ups, s)?;
        if let Err(e) = writeln!(self.role.stdin, "{job}") {
            let e = format!("client namespace process gone: {e}");
            self.dead = Some(e.clone());
            return Err(e);
        }
        match self
            .role
            .wait_line(RUN_LIMIT + Duration::from_secs(10), |_| true)
        {
            Ok(line) => parse_sample(&line),
            Err(e) => {
                self.dead = Some(format!("client stopped answering: {e}"));
                Err(e)
            }
        }
    }
}

/// Everything the transparent cases run on.
struct Transparent {
    client: NsClient,
    /// The server role (its stdin keeps it up).
    _server: Role,
    portcullis: Role,
    ports: [u16; 3],
    /// Per column, why a path failed its verified check.
    broken: [Option<String>; 3],
    /// Last: dropping it ends every process and deletes the namespaces.
    _netns: Netns,
}

impl Transparent {
    /// Builds the namespaces, starts the server, portcullis (behind its
    /// rendered ruleset) and the client, and checks both paths with verified
    /// traffic. `Err` is a table cell: why nothing can be measured.
    fn setup(bin: &Path, level: &str) -> Result<Transparent, String> {
        if !is_root() {
            return Err("skipped (needs root)".into());
        }
        for (tool, arg) in [("ip", "-V"), ("nft", "--version"), ("sysctl", "--version")] {
            if !tool_works(tool, arg) {
                return Err(format!("skipped ({tool} not found)"));
            }
        }
        let fail = |e: String| {
            eprintln!("load: transparent set-up: {e}");
            short_error(&e)
        };
        let exe = std::env::current_exe().map_err(|e| fail(format!("current_exe: {e}")))?;
        let mut netns = Netns::create().map_err(fail)?;

        let server = netns
            .spawn(
                Ns::Server,
                &exe,
                &["--ns-role".as_ref(), "server".as_ref()],
                "server.log",
            )
            .map_err(fail)?;
        let ready = server
            .wait_line(READY_LIMIT, |l| l.starts_with("ready "))
            .map_err(|e| fail(format!("server: {e}")))?;
        let ports: Vec<u16> = ready
            .split_whitespace()
            .skip(1)
            .filter_map(|p| p.parse().ok())
            .collect();
        let [bulk, echo, http] = ports[..] else {
            return Err(fail(format!("server said {ready:?}")));
        };

        let config = netns.dir.path().join("portcullis.toml");
        fs::write(&config, transparent_config(&[bulk, echo, http], level))
            .map_err(|e| fail(format!("write config: {e}")))?;
        let ruleset = must(
            Command::new(bin)
                .args(["render", "nftables", "-c"])
                .arg(&config),
        )
        .map_err(fail)?;
        let nft = netns.dir.path().join("portcullis.nft");
        fs::write(&nft, ruleset).map_err(|e| fail(format!("write ruleset: {e}")))?;
        must(netns.exec(Ns::Gateway, "nft").arg("-c").arg("-f").arg(&nft)).map_err(fail)?;
        must(netns.exec(Ns::Gateway, "nft").arg("-f").arg(&nft)).map_err(fail)?;
        // Closed connections leave conntrack entries for 120 s by default:
        // keep the gateway's table small over tens of thousands of them.
        if let Err(e) = netns.sysctl(
            Ns::Gateway,
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
        ) {
            eprintln!("load: note: {e}");
        }

        let gw = netns
            .spawn(
                Ns::Gateway,
                bin,
                &["run".as_ref(), "-c".as_ref(), config.as_os_str()],
                "portcullis.log",
            )
            .map_err(fail)?;
        let mut listening = None;
        gw.wait_line(READY_LIMIT, |l| {
            if let Some(a) = l.strip_prefix("listening transparent ") {
                listening = a.trim().parse::<SocketAddr>().ok();
            }
            l == "ready"
        })
        .map_err(|e| fail(format!("portcullis: {e}")))?;
        if listening.map(|a| a.port()) != Some(TRANSPARENT_PORT) {
            return Err(fail(format!(
                "portcullis listens transparent on {listening:?}, not port {TRANSPARENT_PORT}"
            )));
        }

        let client = netns
            .spawn(
                Ns::Client,
                &exe,
                &["--ns-role".as_ref(), "client".as_ref()],
                "client.log",
            )
            .map_err(fail)?;
        client
            .wait_line(READY_LIMIT, |l| l == "ready")
            .map_err(|e| fail(format!("client: {e}")))?;

        let mut t = Transparent {
            client: NsClient {
                role: client,
                dead: None,
            },
            _server: server,
            portcullis: gw,
            ports: [bulk, echo, http],
            broken: Default::default(),
            _netns: netns,
        };
        // Gate: both paths carry bytes intact before anything is measured,
        // and the portcullis path's connections show in portcullis's access
        // log (stderr to a file, through its log thread).
        let check = check_settings();
        for col in [DIRECT, PORTCULLIS] {
            let ups = t.upstreams(col);
            let r = [
                Work::Bulk {
                    dir: Dir::Down,
                    streams: 1,
                },
                Work::Bulk {
                    dir: Dir::Up,
                    streams: 1,
                },
                Work::Tunnels { clients: 4 },
            ]
            .into_iter()
            .try_for_each(|w| t.client.run(w, ups, &check).map(drop))
            .and_then(|()| {
                let server = ups.echo.ip().to_string();
                // Lines reach the file a few milliseconds after the
                // connection closes (portcullis's log thread gathers them).
                let deadline = Instant::now() + Duration::from_secs(3);
                let logged = loop {
                    let logged = fs::read_to_string(&t.portcullis.log).unwrap_or_default();
                    if col != PORTCULLIS || logged.contains(&server) || Instant::now() >= deadline {
                        break logged;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                if col == PORTCULLIS && !logged.contains(&server) {
                    return Err(format!("no access line for {server} in portcullis's log"));
                }
                Ok(())
            });
            if let Err(e) = r {
                eprintln!("load: transparent path check failed for column {col}: {e}");
                t.broken[col] = Some(short_error(&format!("broken: {e}")));
            }
        }
        Ok(t)
    }

    /// The servers as the client sees them: through the routed gateway for
    /// the direct column, through the portcullis gateway otherwise.
    fn upstreams(&self, col: usize) -> Upstreams {
        let net = if col == DIRECT {
            ROUTED_NET
        } else {
            PORTCULLIS_NET
        };
        let at = |port| SocketAddr::from(([10, net, 2, 2], port));
        Upstreams {
            bulk: at(self.ports[0]),
            echo: at(self.ports[1]),
            http: at(self.ports[2]),
        }
    }
}

/// `--ns-role server`: the three servers on every address of the server
/// namespace, until the tool closes stdin (it ended) or [`ROLE_LIMIT`].
async fn role_server() -> Result<(), String> {
    let ups = start_upstreams(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        .await
        .map_err(io_err("upstreams"))?;
    let [b, e, h] = ups.ports();
    println!("ready {b} {e} {h}");
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(ROLE_LIMIT, async {
        while let Ok(n) = stdin.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// `--ns-role client`: runs one job per stdin line, answers one line each,
/// until EOF, [`ROLE_MAX_JOBS`] or [`ROLE_LIMIT`].
async fn role_client() -> Result<(), String> {
    use std::io::Write as _;
    use tokio::io::AsyncBufReadExt;
    IN_TOOL_NETNS.store(true, Relaxed);
    println!("ready");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let deadline = Instant::now() + ROLE_LIMIT;
    for _ in 0..ROLE_MAX_JOBS {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = tokio::time::timeout(left, lines.next_line()).await else {
            return Err("client role: lifetime over".into());
        };
        let Some(line) = line.map_err(io_err("stdin"))? else {
            return Ok(());
        };
        let answer = match parse_job(&line) {
            Ok((work, ups, s)) => {
                match bounded(RUN_LIMIT, run_work(work, Via::Direct, ups, &s)).await {
                    Ok(sample) => sample_line(&sample),
                    Err(e) => format!("error {}", e.lines().next().unwrap_or_default()),
                }
            }
            Err(e) => format!("error {e}"),
        };
        if writeln!(io::stdout(), "{answer}").is_err() {
            return Ok(()); // the tool is gone
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Cases and the table

#[derive(Clone, Copy, Debug)]
enum Work {
    Bulk { dir: Dir, streams: usize },
    Tunnels { clients: usize },
    Http,
    Idle,
}

struct Case {
    name: &'static str,
    work: Work,
    /// Measure the portcullis instance at `[log] level = "warn"` (no access lines).
    quiet_log: bool,
    /// Through the namespaces: routed gateway (direct column) vs portcullis gateway.
    transparent: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "bulk-down",
        work: Work::Bulk {
            dir: Dir::Down,
            streams: 1,
        },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "bulk-up",
        work: Work::Bulk {
            dir: Dir::Up,
            streams: 1,
        },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "bulk-down-8",
        work: Work::Bulk {
            dir: Dir::Down,
            streams: 8,
        },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "bulk-up-8",
        work: Work::Bulk {
            dir: Dir::Up,
            streams: 8,
        },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "tunnels-1",
        work: Work::Tunnels { clients: 1 },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "tunnels-32",
        work: Work::Tunnels { clients: 32 },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "tunnels-32-warn",
        work: Work::Tunnels { clients: 32 },
        quiet_log: true,
        transparent: false,
    },
    Case {
        name: "http",
        work: Work::Http,
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "http-warn",
        work: Work::Http,
        quiet_log: true,
        transparent: false,
    },
    Case {
        name: "idle",
        work: Work::Idle,
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "transparent-bulk-down",
        work: Work::Bulk {
            dir: Dir::Down,
            streams: 1,
        },
        quiet_log: false,
        transparent: true,
    },
    Case {
        name: "transparent-bulk-up",
        work: Work::Bulk {
            dir: Dir::Up,
            streams: 1,
        },
        quiet_log: false,
        transparent: true,
    },
    Case {
        name: "transparent-conns-32",
        work: Work::Tunnels { clients: 32 },
        quiet_log: false,
        transparent: true,
    },
];

/// How a row compares a proxy with direct.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Higher is better: proxy / direct.
    Rate,
    /// Time: proxy − direct, shown as added µs.
    Latency,
    /// No direct counterpart.
    Absolute,
}

/// Row labels and kinds of a case; values come in the same order.
fn rows(case: &Case, s: &Settings) -> Vec<(String, Kind)> {
    let note = if case.quiet_log {
        " (portcullis log=warn)"
    } else {
        ""
    };
    if case.transparent {
        // The direct column of these rows is the routed gateway.
        return match case.work {
            Work::Bulk { dir, .. } => {
                let what = if dir == Dir::Down {
                    "download"
                } else {
                    "upload"
                };
                vec![(
                    format!("transparent: 1 connection {what}, MiB/s (direct = routed)"),
                    Kind::Rate,
                )]
            }
            Work::Tunnels { clients } => vec![
                (
                    format!("transparent: new connections/s, {clients} clients (direct = routed)"),
                    Kind::Rate,
                ),
                (
                    format!("transparent: new connection p50, {clients} clients, µs"),
                    Kind::Latency,
                ),
                (
                    format!("transparent: new connection p99, {clients} clients, µs"),
                    Kind::Latency,
                ),
            ],
            Work::Http | Work::Idle => Vec::new(),
        };
    }
    match case.work {
        Work::Bulk { dir, streams } => {
            let what = if dir == Dir::Down {
                "download"
            } else {
                "upload"
            };
            let label = if streams == 1 {
                format!("1 tunnel {what}, MiB/s")
            } else {
                format!("{streams} tunnels {what} (sum), MiB/s")
            };
            vec![(label, Kind::Rate)]
        }
        Work::Tunnels { clients } => {
            let c = if clients == 1 {
                "1 client".to_string()
            } else {
                format!("{clients} clients")
            };
            vec![
                (format!("new tunnels/s, {c}{note}"), Kind::Rate),
                (format!("new tunnel p50, {c}{note}, µs"), Kind::Latency),
                (format!("new tunnel p99, {c}{note}, µs"), Kind::Latency),
            ]
        }
        Work::Http => {
            let c = s.http_conns;
            vec![
                (
                    format!("HTTP forwarding req/s, {c} keep-alive conns{note}"),
                    Kind::Rate,
                ),
                (
                    format!("HTTP request p50, {c} conns{note}, µs"),
                    Kind::Latency,
                ),
                (
                    format!("HTTP request p99, {c} conns{note}, µs"),
                    Kind::Latency,
                ),
            ]
        }
        Work::Idle => vec![
            (
                format!("RSS per idle tunnel ({} held), KiB", s.idle_tunnels),
                Kind::Absolute,
            ),
            ("idle tunnels actually held".into(), Kind::Absolute),
        ],
    }
}

async fn run_work(work: Work, via: Via, ups: Upstreams, s: &Settings) -> Result<Sample, String> {
    match work {
        Work::Bulk { dir, streams } => bulk(via, ups, dir, streams, s).await,
        Work::Tunnels { clients } => tunnels(via, ups, clients, s).await,
        Work::Http => http_load(via, ups, s.http_conns, s).await,
        Work::Idle => Err("idle is run on fresh proxies".into()),
    }
}

/// One cell: a median, a reason it is missing, or nothing to show.
#[derive(Clone, Debug)]
enum Cell {
    Value(f64),
    Missing(String),
    Blank,
}

struct Row {
    label: String,
    kind: Kind,
    cells: [Cell; 3],
}

const DIRECT: usize = 0;
const PORTCULLIS: usize = 1;
const SQUID: usize = 2;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt_value(v: f64, kind: Kind) -> String {
    match kind {
        _ if v.is_nan() => "—".into(),
        Kind::Absolute if v < 100.0 => format!("{v:.1}"),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

fn fmt_cell(c: &Cell, kind: Kind) -> String {
    match c {
        Cell::Value(v) => fmt_value(*v, kind),
        Cell::Missing(why) => why.clone(),
        Cell::Blank => "—".into(),
    }
}

fn fmt_compare(proxy: &Cell, direct: &Cell, kind: Kind) -> String {
    match (proxy, direct, kind) {
        (Cell::Value(p), Cell::Value(d), Kind::Rate) if *d > 0.0 => format!("{:.2}", p / d),
        (Cell::Value(p), Cell::Value(d), Kind::Latency) => format!("{:+.0} µs", p - d),
        _ => "—".into(),
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| case | direct | portcullis | squid | portcullis/direct | squid/direct |\n");
    out.push_str("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            r.label,
            fmt_cell(&r.cells[DIRECT], r.kind),
            fmt_cell(&r.cells[PORTCULLIS], r.kind),
            fmt_cell(&r.cells[SQUID], r.kind),
            fmt_compare(&r.cells[PORTCULLIS], &r.cells[DIRECT], r.kind),
            fmt_compare(&r.cells[SQUID], &r.cells[DIRECT], r.kind),
        );
    }
    out
}

/// Medians of per-target samples into rows; `errors` replace a target's cells.
fn to_rows(
    labels: Vec<(String, Kind)>,
    samples: &[Vec<Vec<f64>>; 3],
    missing: &[Option<String>; 3],
) -> Vec<Row> {
    labels
        .into_iter()
        .enumerate()
        .map(|(i, (label, kind))| {
            let cells = std::array::from_fn(|t| {
                if let Some(why) = &missing[t] {
                    Cell::Missing(why.clone())
                } else if samples[t].is_empty() {
                    Cell::Blank
                } else {
                    Cell::Value(median(samples[t].iter().map(|v| v[i]).collect()))
                }
            });
            Row { label, kind, cells }
        })
        .collect()
}

/// The 1-minute load average: other work on the machine skews every column alike.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(manifest_dir())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn short_error(e: &str) -> String {
    let one_line = e.lines().next().unwrap_or_default();
    let mut s: String = one_line.chars().take(48).collect();
    if s.len() < one_line.len() {
        s.push('…');
    }
    format!("error: {}", s.replace('|', "/"))
}

/// One verified pass of every kind of traffic: nothing is measured through a
/// path that loses or changes bytes.
async fn check_path(via: Via, ups: Upstreams) -> Result<(), String> {
    let check = check_settings();
    for (dir, streams) in [(Dir::Down, 1), (Dir::Up, 1), (Dir::Down, 3), (Dir::Up, 3)] {
        bulk(via, ups, dir, streams, &check).await?;
    }
    tunnels(via, ups, 4, &check).await?;
    http_load(via, ups, 2, &check).await?;
    Ok(())
}

/// Small sizes, every byte checked: the gate before measuring a path.
fn check_settings() -> Settings {
    Settings {
        reps: 1,
        bulk_time: Duration::from_secs(10),
        bulk_bytes: 3 << 20,
        txn_time: Duration::from_secs(5),
        txn_max: 20,
        http_conns: 2,
        bulk_slices: 1,
        txn_slices: 1,
        idle_tunnels: 0,
        verify: true,
        only: Vec::new(),
        quick: true,
    }
}

async fn bounded<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {limit:?}")))
}

/// Runs `reps` repetitions, each cut into `slices` short slices that visit
/// the `active` columns in turn, so a burst of other work on the machine hits
/// all of them alike. A column whose run fails is marked missing. Returns
/// each column's values per repetition (its slices pooled).
async fn interleave(
    reps: usize,
    slices: usize,
    active: [bool; 3],
    missing: &mut [Option<String>; 3],
    mut run: impl AsyncFnMut(usize) -> Result<Sample, String>,
) -> [Vec<Vec<f64>>; 3] {
    let mut samples: [Vec<Vec<f64>>; 3] = Default::default();
    for rep in 0..reps {
        let mut acc: [Option<Sample>; 3] = Default::default();
        for _ in 0..slices {
            for (col, on) in active.into_iter().enumerate() {
                if !on || missing[col].is_some() {
                    continue;
                }
                match run(col).await {
                    Ok(v) => {
                        acc[col] = Some(match acc[col].take() {
                            Some(a) => a.merge(v),
                            None => v,
                        });
                    }
                    Err(e) => {
                        eprintln!("  rep {rep} column {col}: {e}");
                        missing[col] = Some(short_error(&e));
                    }
                }
            }
        }
        for (col, a) in acc.into_iter().enumerate() {
            if let Some(a) = a
                && missing[col].is_none()
            {
                let v = a.values();
                eprintln!("  rep {rep} column {col}: {v:.1?}");
                samples[col].push(v);
            }
        }
    }
    samples
}

/// The full measurement; prints the markdown report to stdout.
async fn bench(s: Settings) -> Result<(), String> {
    let bin = find_portcullis(true).ok_or(
        "target/release/portcullis not found: run `cargo build --release` (benches/run-load.sh does)",
    )?;
    if let (Ok(bin_time), Some(src_time)) = (
        fs::metadata(&bin).and_then(|m| m.modified()),
        newest_mtime(&manifest_dir().join("src")),
    ) && src_time > bin_time
    {
        eprintln!("load: warning: {} is older than src/", bin.display());
    }
    let load_before = loadavg();
    let nofile = raise_nofile();
    let mut idle_n = s.idle_tunnels;
    let mut notes = Vec::new();
    if let Some(limit) = nofile {
        // Client and echo-server ends here, plus slack.
        let fit = (limit.saturating_sub(256) / 2) as usize;
        if fit < idle_n {
            notes.push(format!(
                "open-file limit {limit}: idle case holds {fit} tunnels, not {idle_n}"
            ));
            idle_n = fit;
        }
    }
    let s = Settings {
        idle_tunnels: idle_n,
        ..s
    };
    let ups = start_upstreams(LOOPBACK)
        .await
        .map_err(io_err("upstreams"))?;
    let ports = ups.ports();
    let squid_bin = squid_binary();
    let squid_ver = squid_bin.as_deref().map(squid_version);

    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|c| s.only.is_empty() || s.only.iter().any(|o| c.name.starts_with(o.as_str())))
        .collect();
    if selected.is_empty() {
        let names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        return Err(format!(
            "--only {:?} matches no case (cases: {})",
            s.only,
            names.join(", ")
        ));
    }

    let portcullis = start_portcullis(&bin, &ports, "info")?;
    let quiet = start_portcullis(&bin, &ports, "warn")?;
    let squid = match &squid_bin {
        None => Err("n/a (squid not installed)".to_string()),
        Some(b) => start_squid(b, &ports).map_err(|e| {
            eprintln!("load: squid: {e}");
            "n/a (squid failed to start)".to_string()
        }),
    };

    // Gate: every path carries bytes intact before anything is measured.
    let mut broken: [Option<String>; 4] = Default::default();
    let targets: [(usize, Option<Via>); 4] = [
        (0, Some(Via::Direct)),
        (1, Some(Via::Proxy(portcullis.addr))),
        (2, squid.as_ref().ok().map(|p| Via::Proxy(p.addr))),
        (3, Some(Via::Proxy(quiet.addr))),
    ];
    for (i, via) in targets {
        let Some(via) = via else { continue };
        if let Err(e) = bounded(RUN_LIMIT, check_path(via, ups)).await {
            eprintln!("load: path check failed for target {i}: {e}");
            broken[i] = Some(short_error(&format!("broken: {e}")));
        }
    }

    let mut all_rows = Vec::new();
    // Built at the first transparent case, torn down after the last case.
    let mut transparent: Option<Result<Transparent, String>> = None;
    for case in &selected {
        eprintln!("load: {} ({} rep(s))", case.name, s.reps);
        let labels = rows(case, &s);
        let mut samples: [Vec<Vec<f64>>; 3] = Default::default();
        let mut missing: [Option<String>; 3] = Default::default();
        if case.transparent {
            let t = transparent.get_or_insert_with(|| {
                eprintln!("load: building the transparent namespaces");
                tokio::task::block_in_place(|| Transparent::setup(&bin, "info"))
            });
            missing[SQUID] = Some("n/a".into());
            let samples = match t {
                Err(e) => {
                    missing[DIRECT] = Some(e.clone());
                    missing[PORTCULLIS] = Some(e.clone());
                    Default::default()
                }
                Ok(t) => {
                    for col in [DIRECT, PORTCULLIS] {
                        missing[col] = missing[col].take().or_else(|| t.broken[col].clone());
                    }
                    let slices = match case.work {
                        Work::Bulk { .. } => s.bulk_slices,
                        _ => s.txn_slices,
                    };
                    let slice = s.sliced(slices);
                    let active = [true, true, false];
                    interleave(s.reps, slices, active, &mut missing, async |col| {
                        let ups = t.upstreams(col);
                        tokio::task::block_in_place(|| t.client.run(case.work, ups, &slice))
                    })
                    .await
                }
            };
            all_rows.extend(to_rows(labels, &samples, &missing));
            continue;
        }
        if let Work::Idle = case.work {
            for rep in 0..s.reps {
                for t in [PORTCULLIS, SQUID] {
                    if missing[t].is_some() {
                        continue;
                    }
                    let fresh = if t == PORTCULLIS {
                        start_portcullis(&bin, &ports, "info")
                    } else {
                        match &squid_bin {
                            None => Err("n/a (squid not installed)".into()),
                            Some(b) => start_squid(b, &ports),
                        }
                    };
                    let r = match fresh {
                        Ok(p) => {
                            bounded(
                                RUN_LIMIT,
                                idle(Via::Proxy(p.addr), ups, p.proc.pid(), idle_n),
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(v) => {
                            eprintln!("  rep {rep} target {t}: {v:?}");
                            samples[t].push(v);
                        }
                        Err(e) => missing[t] = Some(short_error(&e)),
                    }
                }
            }
            if squid_bin.is_none() {
                missing[SQUID] = Some("n/a (squid not installed)".into());
            }
            all_rows.extend(to_rows(labels, &samples, &missing));
            continue;
        }
        let proxy_target = if case.quiet_log { 3 } else { 1 };
        let vias: [(usize, usize, Option<Via>); 3] = [
            (DIRECT, 0, Some(Via::Direct)),
            (
                PORTCULLIS,
                proxy_target,
                Some(Via::Proxy(if case.quiet_log {
                    quiet.addr
                } else {
                    portcullis.addr
                })),
            ),
            (
                SQUID,
                2,
                if case.quiet_log {
                    None
                } else {
                    squid.as_ref().ok().map(|p| Via::Proxy(p.addr))
                },
            ),
        ];
        for (col, target, via) in vias {
            if let Some(b) = &broken[target] {
                missing[col] = Some(b.clone());
            } else if via.is_none() && col == SQUID && !case.quiet_log {
                missing[col] = squid.as_ref().err().cloned();
            }
        }
        let slices = match case.work {
            Work::Bulk { .. } => s.bulk_slices,
            _ => s.txn_slices,
        };
        let slice = s.sliced(slices);
        let active = vias.map(|(_, _, via)| via.is_some());
        let samples = interleave(
            s.reps,
            slices,
            active,
            &mut missing,
            async |col| match vias[col].2 {
                Some(via) => bounded(RUN_LIMIT, run_work(case.work, via, ups, &slice)).await,
                None => Err("no target for this column".into()),
            },
        )
        .await;
        all_rows.extend(to_rows(labels, &samples, &missing));
    }
    drop((portcullis, quiet, squid, transparent.take()));

    let commit = command_line("git", &["rev-parse", "--short", "HEAD"]).unwrap_or("?".into());
    let dirty = command_line("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|o| !o.is_empty());
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or("?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut report = String::new();
    let _ = writeln!(
        report,
        "portcullis load results: commit `{commit}`{}, {date}, {cpus} CPUs (load average \
         {load_before} before, {} after), median of {} rep(s){}",
        if dirty {
            " (+ uncommitted changes)"
        } else {
            ""
        },
        loadavg(),
        s.reps,
        if s.quick { ", --quick sizes" } else { "" },
    );
    let _ = writeln!(
        report,
        "portcullis: `target/release/portcullis`, `[log] level = \"info\"` (one JSON line per \
         connection, to a file) unless the row says warn; squid: {}; all on 127.0.0.1.\n",
        match &squid_ver {
            Some(v) => format!("{v}, `workers 1`, `cache deny all`, access.log to a file"),
            None => "not installed".into(),
        }
    );
    if selected.iter().any(|c| c.transparent) {
        let _ = writeln!(
            report,
            "transparent rows: client and servers in network namespaces of their own, through a \
             gateway namespace that only routes (direct column) or one running portcullis \
             (`[log] level = \"info\"`) behind the `render nftables` ruleset; squid n/a.\n"
        );
    }
    report.push_str(&table(&all_rows));
    for n in notes {
        let _ = writeln!(report, "\nnote: {n}");
    }
    print!("{report}");
    Ok(())
}

/// `cargo test --benches`: a few seconds of verified traffic through portcullis.
async fn smoke() -> Result<bool, String> {
    let Some(bin) = find_portcullis(false) else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            return Err("no target/{release,debug}/portcullis in CI".into());
        }
        println!("SKIPPED: build portcullis first (cargo build --release)");
        return Ok(false);
    };
    // The checker itself: a lost, changed or shifted byte must show.
    let p = pattern();
    assert!(pattern_matches(250, &[250, 0, 1]) && pattern_matches(7, &p[7..PATTERN_LEN]));
    assert!(!pattern_matches(0, &p[1..10]) && !pattern_matches(3, &[3, 4, 6]));
    let ups = start_upstreams(LOOPBACK)
        .await
        .map_err(io_err("upstreams"))?;
    let proxy = start_portcullis(&bin, &ups.ports(), "info")?;
    let s = Settings {
        reps: 1,
        bulk_time: Duration::from_secs(5),
        bulk_bytes: 4 << 20,
        txn_time: Duration::from_secs(2),
        txn_max: 40,
        http_conns: 2,
        bulk_slices: 1,
        txn_slices: 1,
        idle_tunnels: 0,
        verify: true,
        only: Vec::new(),
        quick: true,
    };
    for via in [Via::Direct, Via::Proxy(proxy.addr)] {
        for (dir, streams) in [(Dir::Down, 1), (Dir::Up, 1), (Dir::Down, 2), (Dir::Up, 2)] {
            let mib = bounded(RUN_LIMIT, bulk(via, ups, dir, streams, &s))
                .await?
                .values();
            assert!(mib[0] > 0.0);
        }
        let t = bounded(RUN_LIMIT, tunnels(via, ups, 4, &s)).await?.values();
        let h = bounded(RUN_LIMIT, http_load(via, ups, 2, &s))
            .await?
            .values();
        assert!(t[0] > 0.0 && h[0] > 0.0);
        let held = bounded(RUN_LIMIT, async {
            let mut held = Vec::new();
            for _ in 0..8 {
                let (mut c, pre) = open(via, ups.echo).await?;
                echo_check(&mut c, pre).await?;
                held.push(c);
            }
            Ok(held.len())
        })
        .await?;
        assert_eq!(held, 8);
        println!("load smoke: {via:?} carries bulk, echo and HTTP intact");
    }
    let rss = rss_kib(proxy.proc.pid())?;
    assert!(rss > 0.0);
    transparent_smoke(&bin)?;
    Ok(true)
}

/// The transparent paths with verified traffic (the set-up's own gate):
/// skipped without root, or (outside CI) without `ip`/`nft`.
fn transparent_smoke(bin: &Path) -> Result<(), String> {
    let started = Instant::now();
    let t = match tokio::task::block_in_place(|| Transparent::setup(bin, "info")) {
        Ok(t) => t,
        Err(why) if why == "skipped (needs root)" => {
            println!("SKIPPED: load smoke: transparent path needs root (network namespaces)");
            return Ok(());
        }
        Err(why)
            if why.starts_with("skipped") && !std::env::var("CI").is_ok_and(|v| v == "true") =>
        {
            println!("SKIPPED: load smoke: transparent path {why}");
            return Ok(());
        }
        Err(e) => return Err(format!("transparent set-up: {e}")),
    };
    for (col, what) in [(DIRECT, "routed"), (PORTCULLIS, "portcullis")] {
        if let Some(e) = &t.broken[col] {
            return Err(format!("transparent {what} path: {e}"));
        }
    }
    drop(t);
    println!(
        "load smoke: transparent routed and portcullis paths carry bulk and echo intact ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench_mode = args.iter().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let role = match args.as_slice() {
        [flag, role] if flag == "--ns-role" => Some(role.as_str()),
        _ => None,
    };
    let result = if let Some(role) = role {
        // Re-executed by the tool inside one of its namespaces.
        match role {
            "server" => rt.block_on(role_server()),
            "client" => rt.block_on(role_client()),
            other => Err(format!("unknown --ns-role {other:?}")),
        }
    } else if bench_mode {
        rt.block_on(bench(Settings::from_args(&args)))
    } else {
        rt.block_on(smoke()).map(|ran| {
            if ran {
                println!("load smoke: 1 passed, 0 failed");
            }
        })
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    if let Err(e) = result {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}
