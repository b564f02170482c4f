//! Hostile and unhappy paths, in process: every one must fail closed.
//!
//! Each test drives `serve()` in its own runtime (tokio's paused clock where
//! a timeout is the point) against an origin of its own on 127.0.0.2.
// Clients of the gateway under test, not egress: clippy.toml's ban on
// `TcpStream::connect` guards the library.
#![allow(clippy::disallowed_methods)]

#[path = "support/inproc.rs"]
mod inproc;
#[path = "support/origin.rs"]
mod origin;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use inproc::InProc;
use origin::{Answer, Origin};
use portcullis::serve::Stopped;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A proxy for `clients` allowing `allowed.test` (→ `origin`) on the
/// origin's port when `rule`, with `limits`.
fn config(origin: SocketAddr, clients: &str, rule: bool, limits: &str) -> String {
    inproc::Site {
        origin,
        clients,
        hosts: if rule { &["allowed.test"] } else { &[] },
        limits,
        ..inproc::Site::default()
    }
    .toml()
}

/// Waits (virtual time, at most an hour) until the gateway closes `c`, and
/// checks it took at least `at_least`: closed by its timer, not at once.
async fn closed_after(c: &mut TcpStream, at_least: Duration, what: &str) {
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3600), c.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "{what}: still open after an hour");
    let waited = started.elapsed();
    assert!(waited >= at_least, "{what}: closed after {waited:?}");
}

/// Reads one response: status, lower-cased head, body (by Content-Length).
async fn response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.expect("read response");
        assert!(
            n > 0,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; 65536];
        let n = s.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "closed in the body");
        body.extend_from_slice(&chunk[..n]);
    }
    (status, head, body)
}

async fn send(s: &mut TcpStream, text: &str) {
    s.write_all(text.as_bytes()).await.expect("write request");
}

fn get(origin: SocketAddr) -> String {
    format!(
        "GET http://allowed.test:{0}/ HTTP/1.1\r\nHost: allowed.test:{0}\r\n\r\n",
        origin.port()
    )
}

#[tokio::test]
async fn a_reload_reaches_requests_on_open_keep_alive_connections() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let clients = "\"127.0.0.0/8\"";
    let gw = InProc::start(&config(origin.addr, clients, true, "")).await;
    let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    send(&mut c, &get(origin.addr)).await;
    assert_eq!(response(&mut c).await.0, 200);

    // The rule goes: the next request on the same connection is refused.
    gw.reload(&config(origin.addr, clients, false, ""))
        .await
        .expect("reload");
    send(&mut c, &get(origin.addr)).await;
    let (status, head, body) = response(&mut c).await;
    assert_eq!(status, 403, "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("no rule"),
        "{body:?}"
    );
    assert_eq!(origin.requests.load(Relaxed), 1);

    // The client's subnet goes: a keep-alive connection from it is refused.
    let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    send(&mut c, &get(origin.addr)).await;
    assert_eq!(response(&mut c).await.0, 403);
    gw.reload(&config(origin.addr, clients, true, ""))
        .await
        .expect("reload");
    send(&mut c, &get(origin.addr)).await;
    assert_eq!(response(&mut c).await.0, 200);
    gw.reload(&config(origin.addr, "\"10.9.9.0/24\"", true, ""))
        .await
        .expect("reload");
    send(&mut c, &get(origin.addr)).await;
    let (status, head, _) = response(&mut c).await;
    assert_eq!(status, 403);
    assert!(head.contains("client_not_allowed"), "{head}");
    assert_eq!(origin.requests.load(Relaxed), 2);
}

#[tokio::test]
async fn lenient_ports_and_hosts_are_refused_with_400() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, "")).await;
    let port = origin.addr.port();
    let cases = [
        format!("CONNECT allowed.test:+{port} HTTP/1.1\r\nHost: allowed.test\r\n\r\n"),
        format!("CONNECT allowed.test:0{port}0 HTTP/1.1\r\nHost: allowed.test\r\n\r\n"),
        "GET http://allowed.test:65536/ HTTP/1.1\r\nHost: allowed.test:65536\r\n\r\n".to_string(),
        format!(
            "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}/x?y\r\n\r\n"
        ),
        format!("GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:+{port}\r\n\r\n"),
    ];
    for case in cases {
        let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
        send(&mut c, &case).await;
        let (status, head, _) = response(&mut c).await;
        assert!(status == 400, "{case:?} answered {status}: {head}");
        assert!(
            head.contains("proxy-status: portcullis; error=http_request_error"),
            "{head}"
        );
    }
    assert_eq!(
        origin.requests.load(Relaxed),
        0,
        "nothing reached the origin"
    );
}

#[tokio::test]
async fn forwarded_bodies_are_counted_both_ways() {
    let origin = Origin::start(Answer::Bytes(300_000)).await;
    let gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, "")).await;
    let bytes = |dir: &str| gw.gw.metrics.bytes.with_label_values(&[dir]).get();
    let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    let body = vec![b'u'; 1_000_000];
    let head = format!(
        "POST http://allowed.test:{0}/ HTTP/1.1\r\nHost: allowed.test:{0}\r\ncontent-length: {1}\r\n\r\n",
        origin.addr.port(),
        body.len()
    );
    send(&mut c, &head).await;
    c.write_all(&body).await.unwrap();
    let (status, _, got) = response(&mut c).await;
    assert_eq!(status, 200);
    assert_eq!(got.len(), 300_000);
    assert_eq!(origin.body_bytes.load(Relaxed), 1_000_000);
    assert_eq!(bytes("upload"), 1_000_000);
    // The response body is counted as it passes; the last frame may still be
    // on its way to the counter when the client has read it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bytes("download") < 300_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(bytes("download"), 300_000);
}

#[tokio::test(start_paused = true)]
async fn a_forwarded_response_is_cut_when_the_grace_period_ends() {
    let origin = Origin::start(Answer::Stall).await;
    let limits = "grace_period_ms = 30000";
    let mut gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, limits)).await;
    let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    send(&mut c, &get(origin.addr)).await;
    let mut first = [0u8; 16];
    c.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200 OK\r");
    let started = Instant::now();
    gw.stop();
    let stopped = gw.stopped().await;
    let waited = started.elapsed();
    assert_eq!(stopped, Stopped::Cut(1));
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "the process must end at the grace period, not after: {waited:?}"
    );
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(1), c.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the client connection must be closed by the cut"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_tunnel_is_closed_at_the_idle_timeout_on_every_path() {
    let origin = Origin::start(Answer::Bytes(0)).await;
    let limits = "idle_timeout_ms = 60000";
    let gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, limits)).await;
    let port = origin.addr.port();
    let head = format!("CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    // Whole head (fast path), and the same head in two writes (hyper path).
    for split in [head.len(), 10] {
        let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
        c.write_all(&head.as_bytes()[..split]).await.unwrap();
        if split < head.len() {
            tokio::task::yield_now().await;
            c.write_all(&head.as_bytes()[split..]).await.unwrap();
        }
        let (status, _, _) = response(&mut c).await;
        assert_eq!(status, 200);
        closed_after(&mut c, Duration::from_secs(60), &format!("split {split}")).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_upgraded_connection_is_closed_at_the_idle_timeout() {
    let origin = Origin::start(Answer::Upgrade).await;
    let limits = "idle_timeout_ms = 60000";
    let gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, limits)).await;
    let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    let req = format!(
        "GET http://allowed.test:{0}/ws HTTP/1.1\r\nHost: allowed.test:{0}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        origin.addr.port()
    );
    send(&mut c, &req).await;
    let (status, _, _) = response(&mut c).await;
    assert_eq!(status, 101);
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3600), c.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "an idle upgraded connection must not live for an hour"
    );
    assert!(started.elapsed() >= Duration::from_secs(60));
}

#[tokio::test]
async fn a_huge_malformed_name_is_one_bounded_series_not_a_label() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, "")).await;
    // Under [limits] max_head_bytes (64 KiB), far over any valid name.
    let name = "a".repeat(30_000);
    for _ in 0..3 {
        let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
        send(&mut c, &format!("CONNECT {name}:443 HTTP/1.1\r\n\r\n")).await;
        let (status, head, _) = response(&mut c).await;
        assert_eq!(status, 403, "{head}");
        assert!(head.contains("malformed_host"), "{head}");
    }
    let text = gw.gw.metrics.render();
    assert!(!text.contains(&name[..300]), "the name is a label");
    assert!(
        text.len() < 64 * 1024,
        "/metrics grew to {} bytes",
        text.len()
    );
    assert!(
        text.contains("host=\"__malformed__\",port=\"443\"} 3"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_nobody_answers_is_closed_at_the_idle_timeout_on_every_path() {
    // The origin reads everything and never answers.
    let origin = Origin::start(Answer::Sink).await;
    let limits = "idle_timeout_ms = 60000";
    let gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, limits)).await;
    let port = origin.addr.port();
    let in_tunnel = format!("GET / HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    let stalled_body =
        format!("POST / HTTP/1.1\r\nHost: allowed.test:{port}\r\ncontent-length: 10\r\n\r\n");
    for (what, tunnel, request) in [
        ("forwarded", false, get(origin.addr)),
        ("in a tunnel", true, in_tunnel),
        ("body stalled in a tunnel", true, stalled_body),
    ] {
        let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
        if tunnel {
            let head = format!(
                "CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
            );
            send(&mut c, &head).await;
            assert_eq!(response(&mut c).await.0, 200);
        }
        send(&mut c, &request).await;
        closed_after(&mut c, Duration::from_secs(60), what).await;
    }
}

#[tokio::test]
async fn a_connect_head_is_decided_by_the_policy_in_force_when_it_arrives() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let clients = "\"127.0.0.0/8\"";
    let gw = InProc::start(&config(origin.addr, clients, true, "")).await;
    let port = origin.addr.port();
    let head = format!("CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    // Accepted under the old policy; its head arrives after the rule went.
    let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    gw.reload(&config(origin.addr, clients, false, ""))
        .await
        .expect("reload");
    send(&mut c, &head).await;
    let (status, head_text, _) = response(&mut c).await;
    assert_eq!(status, 403, "{head_text}");
    // And with the client's subnet gone.
    gw.reload(&config(origin.addr, clients, true, ""))
        .await
        .expect("reload");
    let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    gw.reload(&config(origin.addr, "\"10.9.9.0/24\"", true, ""))
        .await
        .expect("reload");
    send(&mut c, &head).await;
    let (status, head_text, _) = response(&mut c).await;
    assert_eq!(status, 403, "{head_text}");
    assert!(head_text.contains("client_not_allowed"), "{head_text}");
}

/// Asks for `/` of `allowed.test` at `origin`: forwarded (absolute URI),
/// or over an allowed CONNECT tunnel when `tunnel`.
async fn get_one(c: &mut TcpStream, origin: SocketAddr, tunnel: bool) {
    if !tunnel {
        send(c, &get(origin)).await;
        return;
    }
    let port = origin.port();
    let head = format!("CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    send(c, &head).await;
    assert_eq!(response(c).await.0, 200);
    send(
        c,
        &format!("GET / HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_response_body_that_stalls_is_cut_at_the_idle_timeout_on_every_path() {
    // The origin sends a head and one chunk, then nothing, forever.
    let origin = Origin::start(Answer::Stall).await;
    let limits = "idle_timeout_ms = 60000";
    let gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, limits)).await;
    for tunnel in [false, true] {
        let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
        get_one(&mut c, origin.addr, tunnel).await;
        closed_after(&mut c, Duration::from_secs(60), &format!("tunnel {tunnel}")).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_a_response_is_closed_at_the_idle_timeout_on_every_path() {
    // 32 MiB: more than the socket buffers between origin, gateway and
    // client hold, so the gateway's writes to the client must wait.
    const SIZE: usize = 32 << 20;
    let origin = Origin::start(Answer::Bytes(SIZE)).await;
    let limits = "idle_timeout_ms = 60000";
    let gw = InProc::start(&config(origin.addr, "\"127.0.0.0/8\"", true, limits)).await;
    for tunnel in [false, true] {
        let mut c = TcpStream::connect(gw.addr("proxy")).await.unwrap();
        get_one(&mut c, origin.addr, tunnel).await;
        // The client reads nothing for well past the idle timeout...
        tokio::time::sleep(Duration::from_secs(150)).await;
        // ...then takes what is left: the gateway closed the connection
        // short of the whole body, instead of waiting on it forever.
        let mut got = 0usize;
        let mut chunk = vec![0u8; 1 << 16];
        let closed = tokio::time::timeout(Duration::from_secs(3600), async {
            loop {
                match c.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "tunnel {tunnel}: still open after an hour");
        assert!(
            got < SIZE,
            "tunnel {tunnel}: the whole body arrived ({got} bytes): nothing was cut"
        );
    }
}
