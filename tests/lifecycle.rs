//! The gateway's lifecycle in process: `serve()` driven by futures, not signals,
//! with tokio's paused clock for the timeouts (no test waits in real time).
// Clients of the gateway under test, not egress: clippy.toml's ban on
// `TcpStream::connect` guards the library.
#![allow(clippy::disallowed_methods)]

#[path = "support/inproc.rs"]
mod inproc;

use std::net::SocketAddr;
use std::time::Duration;

use inproc::InProc;
use portcullis::serve::Stopped;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// One allowed name resolving to `upstream`; the echo upstream speaks no
/// TLS, so its tunnels are relayed unchecked (`opaque`).
fn config(upstream: SocketAddr, limits: &str) -> String {
    inproc::Site {
        origin: upstream,
        rule_extra: "opaque = true",
        limits,
        ..inproc::Site::default()
    }
    .toml()
}

/// An upstream that accepts connections and echoes what it reads.
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The status code of `GET path` on the admin listener.
async fn admin_status(gw: &InProc, path: &str) -> u16 {
    let mut s = TcpStream::connect(gw.addr("admin")).await.expect("admin");
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

/// Opens a CONNECT tunnel to `allowed.test` and checks it echoes.
async fn open_tunnel(gw: &InProc, upstream: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr("proxy")).await.expect("proxy");
    let head = format!(
        "CONNECT allowed.test:{0} HTTP/1.1\r\nHost: allowed.test:{0}\r\n\r\n",
        upstream.port()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 39];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf[..], b"HTTP/1.1 200 Connection established\r\n\r\n");
    s.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    s
}

#[tokio::test]
async fn stop_without_connections_drains_at_once() {
    let upstream = echo_upstream().await;
    let mut gw = InProc::start(&config(upstream, "")).await;
    assert_eq!(admin_status(&gw, "/readyz").await, 200);
    gw.stop();
    assert_eq!(gw.stopped().await, Stopped::Drained);
}

#[tokio::test(start_paused = true)]
async fn draining_answers_503_keeps_tunnels_and_a_second_stop_cuts_them() {
    let upstream = echo_upstream().await;
    let mut gw = InProc::start(&config(upstream, "grace_period_ms = 3600000")).await;
    let mut tunnel = open_tunnel(&gw, upstream).await;
    gw.stop();
    // The drain starts in the serve task; wait for it in virtual time.
    while !gw.gw.shutdown.is_draining() {
        tokio::task::yield_now().await;
    }
    assert_eq!(admin_status(&gw, "/readyz").await, 503);
    assert_eq!(admin_status(&gw, "/healthz").await, 200);
    // Still relaying while draining.
    tunnel.write_all(b"more").await.unwrap();
    let mut more = [0u8; 4];
    tunnel.read_exact(&mut more).await.unwrap();
    assert_eq!(&more, b"more");
    // The proxy listener is closed: new connections are refused.
    assert!(TcpStream::connect(gw.addr("proxy")).await.is_err());
    gw.force();
    assert_eq!(gw.stopped().await, Stopped::Forced(1));
    let mut rest = Vec::new();
    let _ = tunnel.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "cut tunnel sent {rest:?}");
}

#[tokio::test(start_paused = true)]
async fn open_tunnels_are_cut_when_the_grace_period_ends() {
    let upstream = echo_upstream().await;
    let mut gw = InProc::start(&config(upstream, "grace_period_ms = 30000")).await;
    let mut tunnel = open_tunnel(&gw, upstream).await;
    let started = Instant::now();
    gw.stop();
    assert_eq!(gw.stopped().await, Stopped::Cut(1));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(30),
        "cut after {waited:?}, before the 30 s grace period"
    );
    let mut rest = Vec::new();
    let _ = tunnel.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_at_the_head_timeout() {
    let upstream = echo_upstream().await;
    let gw = InProc::start(&config(upstream, "head_timeout_ms = 10000")).await;
    let mut client = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3600), client.read_to_end(&mut buf))
        .await
        .expect("a silent client must be closed, not kept for an hour");
    assert!(read.is_ok_and(|n| n == 0), "closed without an answer");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(3600),
        "closed after {waited:?}; head_timeout_ms is 10 s"
    );
}

#[tokio::test(start_paused = true)]
async fn readyz_turns_503_before_the_listeners_close_for_the_drain_delay() {
    let upstream = echo_upstream().await;
    let limits = "drain_delay_ms = 10000\ngrace_period_ms = 1000";
    let mut gw = InProc::start(&config(upstream, limits)).await;
    let proxy = gw.addr("proxy");
    gw.stop();
    while !gw.gw.shutdown.is_stopping() {
        tokio::task::yield_now().await;
    }
    let announced = Instant::now();
    assert_eq!(admin_status(&gw, "/readyz").await, 503);
    // Still accepting: a load balancer that has not probed yet loses nothing.
    let mut tunnel = open_tunnel(&gw, upstream).await;
    assert!(announced.elapsed() < Duration::from_secs(10));
    let stopped = gw.stopped().await;
    assert!(
        announced.elapsed() >= Duration::from_secs(10),
        "listeners closed after {:?}, before the 10 s drain delay",
        announced.elapsed()
    );
    assert_eq!(
        stopped,
        Stopped::Cut(1),
        "the late tunnel is cut at the grace period"
    );
    let mut rest = Vec::new();
    let _ = tunnel.read_to_end(&mut rest).await;
    // Then closed: a client the load balancer still sends is refused.
    assert!(TcpStream::connect(proxy).await.is_err(), "still accepting");
}

#[tokio::test]
async fn accepted_client_sockets_keep_alive_like_upstream_ones() {
    let upstream = echo_upstream().await;
    let gw = InProc::start(&config(upstream, "")).await;
    // The production accept loop on a listener of our own, with a handler
    // that reports the accepted socket's keepalive settings.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(portcullis::listen::accept_loop(
        listener,
        portcullis::metrics::Listener::Proxy,
        gw.gw.clone(),
        move |stream, _conn, _gw| {
            let sock = socket2::SockRef::from(&stream);
            let _ = tx.send((
                sock.keepalive().unwrap(),
                sock.tcp_keepalive_time().unwrap(),
                sock.tcp_keepalive_interval().unwrap(),
                sock.tcp_keepalive_retries().unwrap(),
                sock.tcp_nodelay().unwrap(),
            ));
            async {}
        },
    ));
    // The loop tunes its listener before it first waits: let it get there
    // (this runtime runs one task at a time), so the connection is made
    // after, as in production where `serve` tunes at bind.
    tokio::task::yield_now().await;
    let _client = TcpStream::connect(addr).await.unwrap();
    let (on, idle, interval, retries, nodelay) = rx.recv().await.expect("the handler ran");
    assert!(on, "SO_KEEPALIVE off on an accepted client socket");
    assert!(nodelay, "TCP_NODELAY off on an accepted client socket");
    assert_eq!((interval, retries), (Duration::from_secs(15), 4));
    assert_eq!(idle, portcullis::upstream::KEEPALIVE_IDLE);
    assert!(
        idle < Duration::from_secs(240),
        "keepalives must start under Azure's 4-minute NAT and load balancer idle timeout"
    );
}

#[tokio::test]
async fn config_info_names_the_config_in_force_by_its_sha256() {
    let upstream = echo_upstream().await;
    let text = config(upstream, "");
    let gw = InProc::start(&text).await;
    let sha = |t: &str| {
        let d = ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
        d.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let series = |t: &str| format!("portcullis_config_info{{sha256=\"{}\"}} 1", sha(t));
    assert!(gw.gw.metrics.render().contains(&series(&text)));
    let changed = config(upstream, "idle_timeout_ms = 60000");
    gw.reload(&changed).await.expect("reload");
    let metrics = gw.gw.metrics.render();
    assert!(metrics.contains(&series(&changed)), "{metrics}");
    assert!(
        !metrics.contains(&series(&text)),
        "the old config's series is gone"
    );
}
