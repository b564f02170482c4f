//! The DNS listener, in process, against a real dnsmasq on 127.0.0.1: what it answers, what it refuses, what it strips, and what it learns.
//!
//! dnsmasq (`--no-resolv`: it knows only the records each test gives it)
//! is the gateway's `[dns] servers`; the test asks the gateway's listener
//! over UDP and TCP with hickory's message type, as a stub resolver would.
// Clients of the gateway under test, not egress: clippy.toml's ban on
// `TcpStream::connect` guards the library.
#![allow(clippy::disallowed_methods)]

#[path = "support/host.rs"]
#[allow(dead_code)]
mod host;
#[path = "support/inproc.rs"]
mod inproc;
#[path = "support/origin.rs"]
mod origin;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::svcb::SvcParamKey;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use inproc::InProc;
use origin::{Answer, BANNER, Origin};
use portcullis::metrics::{DnsAnswer, Via};
use portcullis::policy::{Reason, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A dnsmasq serving only `records` (dnsmasq options) on 127.0.0.1.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dnsmasq {
    /// Starts it and waits until it answers; `None` (skipped) without
    /// dnsmasq. A port that turns out taken (dnsmasq binds UDP and TCP; a
    /// TCP client elsewhere may hold the same number) means another try.
    async fn start(records: &[&str]) -> Option<Dnsmasq> {
        if !host::have("dnsmasq", &["--version"]) {
            return None;
        }
        for _ in 0..5 {
            if let Some(server) = Self::try_start(records).await {
                return Some(server);
            }
        }
        panic!("dnsmasq did not start on a free port in 5 tries");
    }

    async fn try_start(records: &[&str]) -> Option<Dnsmasq> {
        // A port free for both UDP and TCP right now.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
        let port = udp.local_addr().expect("bound").port();
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).ok()?;
        drop((udp, tcp));
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                &format!("--port={port}"),
            ])
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        let mut server = Dnsmasq {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        for _ in 0..100 {
            if server.child.try_wait().expect("dnsmasq status").is_some() {
                return None;
            }
            let ready = ask_within(
                Duration::from_millis(200),
                "127.0.0.1",
                server.addr,
                "ready.test",
                RecordType::A,
            );
            if ready.await.is_some() {
                return Some(server);
            }
        }
        panic!("dnsmasq did not answer on {}", server.addr);
    }
}

/// A query for `name`/`rtype` from a socket bound to `from`, over UDP;
/// `None` when nothing answers within a second.
async fn ask_from(
    from: &str,
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
) -> Option<Message> {
    ask_within(Duration::from_secs(1), from, server, name, rtype).await
}

/// [`ask_from`] waiting at most `wait`.
async fn ask_within(
    wait: Duration,
    from: &str,
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
) -> Option<Message> {
    let socket = UdpSocket::bind(format!("{from}:0")).await.expect("bind");
    let bytes = query(name, rtype).to_vec().expect("encode");
    socket.send_to(&bytes, server).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(wait, socket.recv(&mut buf))
        .await
        .ok()?
        .expect("receive");
    Some(Message::from_vec(&buf[..n]).expect("a DNS reply"))
}

async fn ask(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    ask_from("127.0.0.1", server, name, rtype)
        .await
        .unwrap_or_else(|| panic!("no answer for {name} {rtype}"))
}

/// The same over TCP (two-byte length prefix).
async fn ask_tcp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut s = TcpStream::connect(server).await.expect("connect");
    let bytes = query(name, rtype).to_vec().expect("encode");
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.expect("send");
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.expect("length");
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut reply).await.expect("reply");
    Message::from_vec(&reply).expect("a DNS reply")
}

fn query(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    m
}

fn addresses(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn config(dns_server: SocketAddr, clients: &str, extra: &str) -> String {
    format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\n\n\
         [clients]\nallow = [{clients}]\n\n[policy]\nprofile = \"none\"\n{extra}\n\
         [dns]\nservers = [\"{dns_server}\"]\n"
    )
}

/// HTTPS RDATA: priority 1, target ".", alpn h2, ech (a 2-byte list).
const HTTPS_WITH_ECH: &str = "0001000001000302683200050004" /* ech len 4 */;

#[tokio::test]
async fn allowed_names_are_answered_and_everything_else_refused() {
    let https = format!("--dns-rr=allowed.test,65,{HTTPS_WITH_ECH}0002abcd");
    let Some(dns) = Dnsmasq::start(&[
        "--local-ttl=60",
        "--host-record=allowed.test,20.0.0.1",
        "--host-record=ready.test,20.0.0.2",
        "--host-record=evil.test,20.6.6.6",
        "--txt-record=evil.test,exfiltrated-bytes",
        "--host-record=edge.other.test,20.0.0.9",
        "--cname=www.cdn.test,edge.other.test",
        &https,
    ])
    .await
    else {
        return;
    };
    let rules = "[[rule]]\nname = \"allowed\"\nhosts = [\"allowed.test\", \"*.cdn.test\"]\n";
    let gw = InProc::start(&config(dns.addr, "\"127.0.0.1/32\"", rules)).await;
    let listener = gw.addr("dns");

    // An allowed name: the resolvers' answer, over UDP and TCP.
    let a = ask(listener, "allowed.test", RecordType::A).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&a), ["20.0.0.1".parse::<IpAddr>().unwrap()]);
    let a = ask_tcp(listener, "Allowed.Test", RecordType::A).await;
    assert_eq!(addresses(&a), ["20.0.0.1".parse::<IpAddr>().unwrap()]);
    // The same question again is answered from the listener's cache.
    let m = &gw.gw.metrics;
    let cached = || {
        m.dns_queries
            .with_label_values(&[DnsAnswer::Cached.as_str()])
            .get()
    };
    let before = cached();
    let a = ask(listener, "allowed.test", RecordType::A).await;
    assert_eq!(addresses(&a), ["20.0.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(cached(), before + 1);

    // A name no rule allows, whatever the type: refused, never forwarded
    // (dnsmasq would answer the TXT: that is the tunnel).
    for rtype in [RecordType::A, RecordType::TXT] {
        let r = ask(listener, "evil.test", rtype).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{rtype}");
        assert!(r.answers.is_empty());
    }
    let r = ask_tcp(listener, "x.ready.test", RecordType::TXT).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    // ANY is refused even for an allowed name.
    let r = ask(listener, "allowed.test", RecordType::ANY).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);

    // A CNAME chain: every address is remembered for the name asked.
    let r = ask(listener, "www.cdn.test", RecordType::A).await;
    let edge: IpAddr = "20.0.0.9".parse().unwrap();
    assert_eq!(addresses(&r), [edge]);
    let now = std::time::Instant::now();
    assert_eq!(gw.gw.learned.names(edge, now), ["www.cdn.test"]);
    assert!(
        gw.gw
            .learned
            .names("20.6.6.6".parse().unwrap(), now)
            .is_empty()
    );

    // HTTPS records keep their alpn and lose their ech.
    let r = ask(listener, "allowed.test", RecordType::HTTPS).await;
    let params: Vec<SvcParamKey> = r
        .answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::HTTPS(h) => Some(h.0.svc_params.iter().map(|(k, _)| *k).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(params, [SvcParamKey::Alpn], "{r:?}");

    // Counted and shown as denials of name:53, like any other.
    assert_eq!(
        m.dns_queries
            .with_label_values(&[DnsAnswer::Refused.as_str()])
            .get(),
        4
    );
    // Five allowed questions: A over UDP, TCP and again, the CNAME, HTTPS,
    // each answered by the resolvers or from the cache.
    let answered = m
        .dns_queries
        .with_label_values(&[DnsAnswer::Answered.as_str()])
        .get();
    assert_eq!(
        answered + cached(),
        5,
        "{answered} answered, {} cached",
        cached()
    );
    assert_eq!(
        m.decisions_counted(Verdict::Deny, Via::Dns, Reason::NoRule),
        4
    );
    let text = m.render();
    assert!(
        text.contains(
            "portcullis_denied_destinations_total{client_group=\"\",host=\"evil.test\",port=\"53\"} 2"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn clients_outside_allow_and_garbage_get_no_answer_they_can_use() {
    let Some(dns) = Dnsmasq::start(&["--host-record=ready.test,20.0.0.2"]).await else {
        return;
    };
    let rules = "[[rule]]\nname = \"r\"\nhosts = [\"ready.test\"]\n";
    let gw = InProc::start(&config(dns.addr, "\"127.0.0.1/32\"", rules)).await;
    let listener = gw.addr("dns");
    // Never an open resolver: another client is refused, even for an allowed name.
    let r = ask_from("127.0.0.2", listener, "ready.test", RecordType::A)
        .await
        .expect("an answer");
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    // Bytes that are no DNS message: FORMERR when a header's worth came,
    // nothing for less; the listener keeps serving.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(
            &[0x12, 0x34, 0xff, 0xff, 0, 9, 0, 0, 0, 0, 0, 0, 1],
            listener,
        )
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .expect("FORMERR in time")
        .unwrap();
    let reply = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    socket.send_to(&[1, 2, 3], listener).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf))
            .await
            .is_err(),
        "three bytes get no reply"
    );
    let r = ask(listener, "ready.test", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    // Both pieces of garbage are counted, answered or not.
    assert_eq!(
        gw.gw
            .metrics
            .dns_queries
            .with_label_values(&[DnsAnswer::Malformed.as_str()])
            .get(),
        2
    );
}

/// An origin that speaks first and names nothing (SMB-like) on 127.0.0.2,
/// a dnsmasq that knows `files.test` → 127.0.0.2, and a gateway whose only
/// rule allows `files.test` on the origin's port (`opaque`), with
/// `dns_extra` lines in `[dns]`. `None` (skipped) without dnsmasq.
async fn files_gateway(dns_extra: &str) -> Option<(Origin, Dnsmasq, InProc)> {
    let origin = Origin::start(Answer::Banner).await;
    let port = origin.addr.port();
    let dns = Dnsmasq::start(&[
        "--host-record=ready.test,20.0.0.2",
        "--host-record=files.test,127.0.0.2",
    ])
    .await?;
    let rules = format!(
        "private_ranges = [\"127.0.0.0/8\"]\n\
         [[rule]]\nname = \"files\"\nhosts = [\"files.test\"]\nports = [{port}]\nopaque = true\n"
    );
    let gw = InProc::start(&(config(dns.addr, "\"127.0.0.0/8\"", &rules) + dns_extra)).await;
    Some((origin, dns, gw))
}

/// CONNECT to `authority` through `gw`: the status and the stream.
async fn connect(gw: &InProc, authority: &str) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(gw.addr("proxy")).await.unwrap();
    let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before a head");
        got.extend_from_slice(&buf[..n]);
    }
    let status: u16 = String::from_utf8_lossy(&got)[9..12].parse().unwrap();
    (status, s)
}

#[tokio::test]
async fn an_address_answered_for_a_name_is_decided_as_that_name() {
    let Some((origin, _dns, gw)) = files_gateway("").await else {
        return;
    };
    let port = origin.addr.port();
    let at = format!("127.0.0.2:{port}");
    // Nobody resolved it: the address alone is not allowed.
    assert_eq!(connect(&gw, &at).await.0, 403);
    // A client resolves the name through the gateway...
    let a = ask(gw.addr("dns"), "files.test", RecordType::A).await;
    assert_eq!(addresses(&a), ["127.0.0.2".parse::<IpAddr>().unwrap()]);
    // ...and the address is now decided as that name, on that rule's port.
    let (status, mut s) = connect(&gw, &at).await;
    assert_eq!(status, 200);
    let mut banner = vec![0u8; BANNER.len()];
    s.read_exact(&mut banner).await.unwrap();
    assert_eq!(banner, BANNER);
    let m = &gw.gw.metrics;
    assert_eq!(
        m.decisions_counted(Verdict::Allow, Via::Connect, Reason::DnsAddress),
        1
    );
    let other = format!("127.0.0.2:{}", port.wrapping_add(1));
    assert_eq!(
        connect(&gw, &other).await.0,
        403,
        "the name's rule allows one port"
    );
}

#[tokio::test]
async fn a_learned_address_counts_only_for_its_ttl_and_grace() {
    // dnsmasq answers with TTL 0; no floor and no grace: the address counts
    // for no time at all, so the CONNECT after the answer is refused again.
    let Some((origin, _dns, gw)) =
        files_gateway("min_ttl_s = 0\nmax_ttl_s = 0\ngrace_s = 0\n").await
    else {
        return;
    };
    let a = ask(gw.addr("dns"), "files.test", RecordType::A).await;
    assert_eq!(addresses(&a), ["127.0.0.2".parse::<IpAddr>().unwrap()]);
    let at = format!("127.0.0.2:{}", origin.addr.port());
    assert_eq!(connect(&gw, &at).await.0, 403);
    assert_eq!(
        gw.gw
            .metrics
            .decisions_counted(Verdict::Allow, Via::Connect, Reason::DnsAddress),
        0
    );
}
