//! A tunnel carries exactly what was decided: fronting, unreadable and
//! other-protocol tunnels are cut, in process, with real rustls ClientHellos.
// Clients of the gateway under test, not egress: clippy.toml's ban on
// `TcpStream::connect` guards the library.
#![allow(clippy::disallowed_methods)]

#[path = "support/inproc.rs"]
mod inproc;
#[path = "support/origin.rs"]
mod origin;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use inproc::InProc;
use origin::{Answer, Origin};
use portcullis::metrics::Via;
use portcullis::policy::{Reason, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A real ClientHello (rustls) naming `sni`: one TLS record.
fn client_hello(sni: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

/// The same handshake in two TLS records, split inside the SNI name.
fn split_in_sni(hello: &[u8], sni: &str) -> Vec<u8> {
    let body = &hello[5..];
    let at = body
        .windows(sni.len())
        .position(|w| w == sni.as_bytes())
        .expect("sni in hello")
        + sni.len() / 2;
    let mut out = Vec::new();
    for part in [&body[..at], &body[at..]] {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// `allowed.test` and `other.test` allowed on the origin (both resolve to
/// it), the origin's address allowed by an address rule, then `extra`.
fn config(origin: SocketAddr, limits: &str, extra: &str) -> String {
    inproc::Site {
        origin,
        hosts: &["allowed.test", "other.test"],
        extra,
        limits,
        ..inproc::Site::default()
    }
    .toml()
}

/// Opens `CONNECT authority`, expecting 200.
async fn connect(gw: &InProc, authority: &str) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 39];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf[..], b"HTTP/1.1 200 Connection established\r\n\r\n");
    s
}

/// What the client reads until the gateway closes: `None` if it stays open.
async fn until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut got)).await {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

/// `decisions_total` for a verdict, via and reason.
fn decisions(gw: &InProc, verdict: Verdict, via: Via, reason: Reason) -> u64 {
    gw.gw.metrics.decisions_counted(verdict, via, reason)
}

const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

#[tokio::test]
async fn a_hello_naming_the_connect_host_is_relayed_and_another_is_cut() {
    let origin = Origin::start(Answer::Sink).await;
    let gw = InProc::start(&config(origin.addr, "", "")).await;
    let port = origin.addr.port();
    let mut ok = connect(&gw, &format!("allowed.test:{port}")).await;
    let hello = client_hello("allowed.test");
    ok.write_all(&hello).await.unwrap();
    assert!(
        until_closed(&mut ok, Duration::from_millis(300))
            .await
            .is_none()
    );
    let mut cut = connect(&gw, &format!("allowed.test:{port}")).await;
    cut.write_all(&client_hello("other.test")).await.unwrap();
    let answer = until_closed(&mut cut, Duration::from_secs(10)).await;
    assert_eq!(
        answer.as_deref(),
        Some(&ALERT[..]),
        "a fronted hello is cut with an alert"
    );
    assert_eq!(
        origin.body_bytes.load(Relaxed),
        hello.len() as u64,
        "only the agreeing hello went on"
    );
    assert_eq!(
        decisions(&gw, Verdict::Deny, Via::Sni, Reason::SniMismatch),
        1
    );
}

#[tokio::test]
async fn a_hello_split_inside_its_name_across_records_is_cut() {
    let origin = Origin::start(Answer::Sink).await;
    let gw = InProc::start(&config(origin.addr, "", "")).await;
    let mut s = connect(&gw, &format!("allowed.test:{}", origin.addr.port())).await;
    s.write_all(&split_in_sni(&client_hello("other.test"), "other.test"))
        .await
        .unwrap();
    let answer = until_closed(&mut s, Duration::from_secs(10)).await;
    assert_eq!(answer.as_deref(), Some(&ALERT[..]));
    assert_eq!(
        origin.body_bytes.load(Relaxed),
        0,
        "nothing reached the origin"
    );
    assert_eq!(
        decisions(&gw, Verdict::Deny, Via::Sni, Reason::SniUnreadable),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_trickled_hello_is_cut_at_the_sniff_timeout() {
    let origin = Origin::start(Answer::Sink).await;
    let gw = InProc::start(&config(origin.addr, "sniff_timeout_ms = 2000", "")).await;
    let mut s = connect(&gw, &format!("allowed.test:{}", origin.addr.port())).await;
    let hello = client_hello("other.test");
    // One byte every 100 ms: the hello would take far longer than 2 s.
    let trickle = async {
        for b in &hello {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    let answer = until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(answer.is_some(), "a trickling tunnel must be cut");
    assert_eq!(origin.body_bytes.load(Relaxed), 0);
    assert_eq!(
        decisions(&gw, Verdict::Deny, Via::Sni, Reason::SniUnreadable),
        1
    );
}

#[tokio::test]
async fn a_hello_larger_than_the_sniff_buffer_is_cut() {
    let origin = Origin::start(Answer::Sink).await;
    let gw = InProc::start(&config(origin.addr, "sniff_max_bytes = 128", "")).await;
    let mut s = connect(&gw, &format!("allowed.test:{}", origin.addr.port())).await;
    let hello = client_hello("other.test");
    assert!(hello.len() > 128);
    s.write_all(&hello).await.unwrap();
    assert!(
        until_closed(&mut s, Duration::from_secs(10))
            .await
            .is_some()
    );
    assert_eq!(origin.body_bytes.load(Relaxed), 0);
}

#[tokio::test]
async fn other_protocols_are_cut_unless_the_rule_says_opaque() {
    let origin = Origin::start(Answer::Sink).await;
    let port = origin.addr.port();
    let ssh = b"SSH-2.0-OpenSSH_9.6\r\n";
    let gw = InProc::start(&config(origin.addr, "", "")).await;
    let mut s = connect(&gw, &format!("allowed.test:{port}")).await;
    s.write_all(ssh).await.unwrap();
    assert_eq!(
        until_closed(&mut s, Duration::from_secs(10))
            .await
            .as_deref(),
        Some(&b""[..])
    );
    assert_eq!(origin.body_bytes.load(Relaxed), 0);

    let opaque = format!(
        "[[rule]]\nname = \"ssh\"\nhosts = [\"ssh.test\"]\nports = [{port}]\nopaque = true\n"
    );
    let gw = InProc::start(&config(origin.addr, "", &opaque).replace(
        "[resolve]\n",
        &format!("[resolve]\n\"ssh.test\" = [\"{}\"]\n", origin.addr.ip()),
    ))
    .await;
    let mut s = connect(&gw, &format!("ssh.test:{port}")).await;
    s.write_all(ssh).await.unwrap();
    assert!(
        until_closed(&mut s, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(origin.body_bytes.load(Relaxed), ssh.len() as u64);
}

#[tokio::test]
async fn an_address_connect_carries_only_names_a_rule_allows_unless_sni_any() {
    let origin = Origin::start(Answer::Sink).await;
    let addr = origin.addr.to_string();
    let gw = InProc::start(&config(origin.addr, "", "")).await;
    let mut fronted = connect(&gw, &addr).await;
    fronted
        .write_all(&client_hello("tenant.example"))
        .await
        .unwrap();
    let answer = until_closed(&mut fronted, Duration::from_secs(10)).await;
    assert_eq!(answer.as_deref(), Some(&ALERT[..]));
    let mut named = connect(&gw, &addr).await;
    let hello = client_hello("other.test");
    named.write_all(&hello).await.unwrap();
    assert!(
        until_closed(&mut named, Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(origin.body_bytes.load(Relaxed), hello.len() as u64);

    let any = config(origin.addr, "", "").replace("cidrs = [", "sni = \"any\"\ncidrs = [");
    let gw = InProc::start(&any).await;
    let mut s = connect(&gw, &addr).await;
    s.write_all(&client_hello("tenant.example")).await.unwrap();
    assert!(
        until_closed(&mut s, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn plain_http_in_a_tunnel_must_name_the_tunnel_host_on_every_request() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let gw = InProc::start(&config(origin.addr, "", "")).await;
    let port = origin.addr.port();
    let mut s = connect(&gw, &format!("allowed.test:{port}")).await;
    let get = |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    s.write_all(get("allowed.test").as_bytes()).await.unwrap();
    let mut first = Vec::new();
    while !first.ends_with(b"\r\n\r\nxx") {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&first));
        first.extend_from_slice(&chunk[..n]);
    }
    assert!(first.starts_with(b"HTTP/1.1 200"));
    // The second request on the same tunnel names another (allowed) host.
    s.write_all(get("other.test").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("host_mismatch"), "{text}");
    assert_eq!(
        origin.requests.load(Relaxed),
        1,
        "the fronted request never reached the origin"
    );
    assert_eq!(
        decisions(&gw, Verdict::Deny, Via::Host, Reason::HostMismatch),
        1
    );
}

/// Sends `req` (an h2c upgrade), reads the answer's head, then sends a
/// request for `other.test`; the head as text.
async fn h2c_then_fronted(s: &mut TcpStream, req: &str, port: u16) -> String {
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed in the head");
        head.push(b[0]);
    }
    let fronted = format!("GET / HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n");
    let _ = s.write_all(fronted.as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    String::from_utf8_lossy(&head).to_string()
}

#[tokio::test]
async fn an_h2c_upgrade_cannot_carry_requests_for_other_hosts() {
    let origin = Origin::start(Answer::Upgrade).await;
    let gw = InProc::start(&config(origin.addr, "", "")).await;
    let port = origin.addr.port();
    // The request names the tunnel's host and passes; after a 101 to h2c the
    // client would speak HTTP/2, whose :authority nobody checks.
    let h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    let mut s = connect(&gw, &format!("allowed.test:{port}")).await;
    let req = format!("GET / HTTP/1.1\r\nHost: allowed.test:{port}\r\n{h2c}");
    let head = h2c_then_fronted(&mut s, &req, port).await;
    assert_eq!(
        origin.body_bytes.load(Relaxed),
        0,
        "tunnel: a request for other.test reached the origin undecided, after: {head}"
    );
    assert!(!head.starts_with("HTTP/1.1 101"), "tunnel: {head}");
    // The same through the explicit proxy (HTTP2-Settings not in Connection).
    let mut s = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    let req = format!(
        "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    );
    let head = h2c_then_fronted(&mut s, &req, port).await;
    assert_eq!(
        origin.body_bytes.load(Relaxed),
        0,
        "forward: a request for other.test reached the origin undecided, after: {head}"
    );
    assert!(!head.starts_with("HTTP/1.1 101"), "forward: {head}");
}

#[tokio::test]
async fn a_server_that_speaks_first_is_cut_unless_the_rule_says_opaque() {
    let origin = Origin::start(Answer::Banner).await;
    let port = origin.addr.port();
    let gw = InProc::start(&config(origin.addr, "", "")).await;
    // The client waits for the banner: no name will ever come from it.
    let mut s = connect(&gw, &format!("allowed.test:{port}")).await;
    let answer = until_closed(&mut s, Duration::from_secs(10)).await;
    assert_eq!(
        answer.as_deref(),
        Some(&b""[..]),
        "the banner of a server that speaks first must not reach the client"
    );
    assert_eq!(
        decisions(&gw, Verdict::Deny, Via::Sni, Reason::SniUnreadable),
        1
    );

    let opaque = format!(
        "[[rule]]\nname = \"smtp\"\nhosts = [\"smtp.test\"]\nports = [{port}]\nopaque = true\n"
    );
    let gw = InProc::start(&config(origin.addr, "", &opaque).replace(
        "[resolve]\n",
        &format!("[resolve]\n\"smtp.test\" = [\"{}\"]\n", origin.addr.ip()),
    ))
    .await;
    let mut s = connect(&gw, &format!("smtp.test:{port}")).await;
    let mut banner = vec![0u8; origin::BANNER.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut banner))
        .await
        .expect("the banner in time")
        .expect("the banner");
    assert_eq!(banner, origin::BANNER, "an opaque rule relays the banner");
}

#[tokio::test]
async fn every_way_a_request_in_a_tunnel_can_name_another_host_is_refused() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let gw = InProc::start(&config(origin.addr, "", "")).await;
    let port = origin.addr.port();
    let other = port.wrapping_add(1).max(1);
    let cases = [
        (
            "HTTP/1.0 without Host",
            "GET / HTTP/1.0\r\n\r\n".to_string(),
        ),
        (
            "absolute URI naming another host",
            format!("GET http://other.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"),
        ),
        (
            "absolute URI and Host both naming another host",
            format!("GET http://other.test:{port}/ HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"),
        ),
        (
            "two Host headers",
            format!(
                "GET / HTTP/1.1\r\nHost: allowed.test:{port}\r\nHost: other.test:{port}\r\n\r\n"
            ),
        ),
        (
            "the tunnel's host on another port",
            format!("GET / HTTP/1.1\r\nHost: allowed.test:{other}\r\n\r\n"),
        ),
    ];
    // Each after a request that names the tunnel's host, on the same tunnel
    // (a first request with two Hosts is cut earlier, as unreadable).
    let good = format!("GET / HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    for (n, (what, request)) in cases.into_iter().enumerate() {
        let mut s = connect(&gw, &format!("allowed.test:{port}")).await;
        s.write_all(good.as_bytes()).await.unwrap();
        let mut first = Vec::new();
        while !first.ends_with(b"\r\n\r\nxx") {
            let mut chunk = [0u8; 256];
            let got = s.read(&mut chunk).await.unwrap();
            assert!(got > 0, "{what}: closed after the first request");
            first.extend_from_slice(&chunk[..got]);
        }
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 403") || text.starts_with("HTTP/1.0 403"),
            "{what}: {text}"
        );
        assert!(text.contains("host_mismatch"), "{what}: {text}");
        assert_eq!(
            origin.requests.load(Relaxed),
            n as u64 + 1,
            "{what} reached the origin"
        );
    }
    let before = origin.requests.load(Relaxed);
    // The control: an absolute URI naming the tunnel's host goes through.
    let mut s = connect(&gw, &format!("allowed.test:{port}")).await;
    let ok =
        format!("GET http://Allowed.Test.:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    s.write_all(ok.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert_eq!(origin.requests.load(Relaxed), before + 1);
}
