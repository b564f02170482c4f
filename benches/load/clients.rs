//! The load clients: open a tunnel (directly or by CONNECT through a proxy),
//! bulk streams each way, new tunnels with a 32-byte echo in a closed loop,
//! and idle tunnels held open while the proxy's memory is read.
//!
//! Every dial goes through [`connect_local`], which only reaches loopback or
//! the tool's own namespaces; every transaction is bounded by [`STALL`].

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::haproxy::Relay;
use crate::io_err;
use crate::netns::{PORTCULLIS_NET, ROUTED_NET};
use crate::sample::Sample;
use crate::settings::Settings;
use crate::upstreams::Upstreams;
use crate::wire::{
    Dir, ECHO_PAYLOAD, HOST, PATTERN_LEN, UPLOAD_END, bulk_header, pattern, pattern_matches,
};

/// Longest any single transaction (open + echo, one HTTP exchange) may take.
const STALL: Duration = Duration::from_secs(10);
/// Concurrent opens while building up idle tunnels.
const IDLE_OPEN_CONCURRENCY: usize = 64;
/// Wait between opening the last idle tunnel and reading the proxy's RSS.
const IDLE_SETTLE: Duration = Duration::from_millis(1500);

/// How a client reaches an upstream.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    /// Straight to the upstream address.
    Direct,
    /// Through an explicit proxy at this address (CONNECT / absolute URI).
    Proxy(SocketAddr),
    /// Through a TCP relay's frontend for that upstream (HAProxy).
    Relay(Relay),
}

/// Set only in the `--ns-role client` process, which runs inside the client
/// namespace the tool made (no route leaves it).
pub static IN_TOOL_NETNS: AtomicBool = AtomicBool::new(false);

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
pub async fn connect_local(addr: SocketAddr) -> io::Result<TcpStream> {
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
pub async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
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
pub async fn open(via: Via, dest: SocketAddr) -> Result<(TcpStream, Vec<u8>), String> {
    match via {
        Via::Direct | Via::Relay(_) => {
            let to = match via {
                Via::Relay(r) => r.frontend(dest)?,
                _ => dest,
            };
            let s = connect_local(to)
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
pub async fn echo_check(s: &mut TcpStream, mut got: Vec<u8>) -> Result<(), String> {
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
pub async fn bulk(
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

/// Runs `clients` loops of `txn` until the time or the count budget is spent.
pub async fn closed_loop<F, Fut>(clients: usize, s: &Settings, txn: F) -> Result<Sample, String>
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

/// New tunnels/s: `clients` closed loops of open, echo 32 bytes, close.
pub async fn tunnels(
    via: Via,
    ups: Upstreams,
    clients: usize,
    s: &Settings,
) -> Result<Sample, String> {
    let echo = ups.echo;
    closed_loop(clients, s, move |_| echo_once(via, echo)).await
}

/// Resident memory of `pid` (VmRSS), KiB.
pub fn rss_kib(pid: u32) -> Result<f64, String> {
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
pub async fn idle(via: Via, ups: Upstreams, pid: u32, n: usize) -> Result<Vec<f64>, String> {
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
