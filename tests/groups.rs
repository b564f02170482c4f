//! Client groups end to end: rules for one group, per-group audit, reloads,
//! the `client_group` label and access-line field.
//!
//! Clients connect from their own loopback addresses (127.0.0.5 and up) to
//! a gateway whose `[clients]` puts them in groups; the origin is on
//! 127.0.0.2. In process, except the access-line test, which reads the
//! binary's stderr.
// Clients of the gateway under test, not egress: clippy.toml's ban on
// `TcpStream::connect` guards the library.
#![allow(clippy::disallowed_methods)]

#[path = "support/inproc.rs"]
mod inproc;
#[path = "support/origin.rs"]
mod origin;
mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use inproc::InProc;
use origin::{Answer, Origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A gateway for 127.0.0.0/8 with groups `audited` (127.0.0.5, .7; audit)
/// and `enforced` (127.0.0.6, .7), a rule `group-only` for `group.test`
/// for the group `rule_for`, and every name resolving to the origin.
/// `swapped` swaps the groups' order in the file (their bits).
fn config(origin: SocketAddr, listen: &str, rule_for: &str, swapped: bool) -> String {
    let (ip, port) = (origin.ip(), origin.port());
    let audited = "audited = { cidrs = [\"127.0.0.5/32\", \"127.0.0.7/32\"], mode = \"audit\" }";
    let enforced = "enforced = [\"127.0.0.6/32\", \"127.0.0.7/32\"]";
    let groups = if swapped {
        format!("{enforced}\n{audited}")
    } else {
        format!("{audited}\n{enforced}")
    };
    format!(
        "[listen]\n{listen}\n\n[clients]\nallow = [\"127.0.0.0/8\"]\n{groups}\n\n\
         [policy]\nprofile = \"none\"\n\n\
         [[rule]]\nname = \"group-only\"\nhosts = [\"group.test\"]\nports = [{port}]\nclients = [\"{rule_for}\"]\n\n\
         [[rule]]\nname = \"origins\"\ncidrs = [\"{ip}/32\"]\nports = [{port}]\n\n\
         [resolve]\n\"group.test\" = [\"{ip}\"]\n\"denied.test\" = [\"{ip}\"]\n"
    )
}

const IN_PROCESS: &str = "proxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"";

/// A connection to `proxy` from the loopback address `from`.
async fn from(from: &str, proxy: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let ip: IpAddr = from.parse().expect("address");
    socket.bind(SocketAddr::new(ip, 0)).expect("bind");
    socket.connect(proxy).await.expect("connect")
}

/// The status of a response, its head and `Content-Length` body read.
async fn status(s: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await.expect("read head");
        assert!(
            n > 0,
            "closed before a head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length: usize = (head.lines())
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().expect("a length"));
    let mut rest = vec![0u8; (end + length).saturating_sub(buf.len())];
    s.read_exact(&mut rest).await.expect("body");
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"))
}

/// The status a CONNECT to `host` on the origin's port gets from `client`.
async fn connect(gw: SocketAddr, client: &str, host: &str, port: u16) -> u16 {
    let mut c = from(client, gw).await;
    let head = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    c.write_all(head.as_bytes()).await.expect("write");
    status(&mut c).await
}

/// `decisions_total` for one action and group over CONNECT.
fn decisions(text: &str, action: &str, group: &str, reason: &str) -> u64 {
    let series = format!(
        "portcullis_decisions_total{{action=\"{action}\",client_group=\"{group}\",reason=\"{reason}\",via=\"connect\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

#[tokio::test]
async fn a_rule_for_one_group_reaches_no_other_and_an_audit_group_passes() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let port = origin.addr.port();
    let gw = InProc::start(&config(origin.addr, IN_PROCESS, "enforced", false)).await;
    let proxy = gw.addr("proxy");
    // The group's rule: its clients only (.7 is in it, and in audited).
    assert_eq!(connect(proxy, "127.0.0.6", "group.test", port).await, 200);
    assert_eq!(connect(proxy, "127.0.0.7", "group.test", port).await, 200);
    assert_eq!(connect(proxy, "127.0.0.8", "group.test", port).await, 403);
    // An auditing group passes what is denied, as audit_deny.
    assert_eq!(connect(proxy, "127.0.0.5", "group.test", port).await, 200);
    assert_eq!(connect(proxy, "127.0.0.5", "denied.test", port).await, 200);
    // An enforcing group is refused; in both, enforcement wins.
    assert_eq!(connect(proxy, "127.0.0.6", "denied.test", port).await, 403);
    assert_eq!(connect(proxy, "127.0.0.7", "denied.test", port).await, 403);

    let text = gw.gw.metrics.render();
    // The label is the client's first group in file order (.7: audited).
    assert_eq!(
        decisions(&text, "allow", "enforced", "rule_matched"),
        1,
        "{text}"
    );
    assert_eq!(
        decisions(&text, "allow", "audited", "rule_matched"),
        1,
        "{text}"
    );
    assert_eq!(decisions(&text, "deny", "", "no_rule"), 1, "{text}");
    assert_eq!(
        decisions(&text, "audit_deny", "audited", "no_rule"),
        2,
        "{text}"
    );
    assert_eq!(decisions(&text, "deny", "enforced", "no_rule"), 1, "{text}");
    assert_eq!(decisions(&text, "deny", "audited", "no_rule"), 1, "{text}");
    let denied =
        "portcullis_denied_destinations_total{client_group=\"audited\",host=\"denied.test\"";
    assert!(text.contains(denied), "{text}");
}

#[tokio::test]
async fn a_reload_regroups_requests_on_open_keep_alive_connections() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let port = origin.addr.port();
    let gw = InProc::start(&config(origin.addr, IN_PROCESS, "enforced", false)).await;
    let get = format!("GET http://group.test:{port}/ HTTP/1.1\r\nHost: group.test:{port}\r\n\r\n");
    let mut c = from("127.0.0.6", gw.addr("proxy")).await;
    c.write_all(get.as_bytes()).await.expect("write");
    assert_eq!(status(&mut c).await, 200);
    // The groups swap bits and the rule moves to `audited`: the accept-time
    // groups (bit 1 = enforced) would now read as audited and pass.
    gw.reload(&config(origin.addr, IN_PROCESS, "audited", true))
        .await
        .expect("reload");
    c.write_all(get.as_bytes()).await.expect("write");
    assert_eq!(status(&mut c).await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_line_names_the_client_group_and_its_audit_deny() {
    let origin = Origin::start(Answer::Bytes(2)).await;
    let port = origin.addr.port();
    let listen = "proxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"";
    let proxy = support::Proxy::start(&config(origin.addr, listen, "enforced", false));
    assert_eq!(
        connect(proxy.addr(), "127.0.0.5", "denied.test", port).await,
        200
    );
    assert_eq!(
        connect(proxy.addr(), "127.0.0.6", "denied.test", port).await,
        403
    );
    let access = |client: &'static str| {
        move |l: &str| {
            l.contains("\"target\":\"portcullis::access\"")
                && l.contains(&format!("\"client\":\"{client}:"))
        }
    };
    let wait = Duration::from_secs(30);
    let audited = proxy.stderr().wait_line(wait, access("127.0.0.5"));
    let audited = audited.expect("an access line for 127.0.0.5");
    assert!(
        audited.contains("\"client_group\":\"audited\""),
        "{audited}"
    );
    assert!(audited.contains("\"verdict\":\"audit_deny\""), "{audited}");
    let enforced = proxy.stderr().wait_line(wait, access("127.0.0.6"));
    let enforced = enforced.expect("an access line for 127.0.0.6");
    assert!(
        enforced.contains("\"client_group\":\"enforced\""),
        "{enforced}"
    );
    assert!(enforced.contains("\"verdict\":\"deny\""), "{enforced}");
    let denial = proxy.stderr().wait_line(wait, |l| {
        l.contains("portcullis::deny") && l.contains("127.0.0.6")
    });
    let denial = denial.expect("a denial line");
    assert!(
        denial.contains("portcullis explain --client 127.0.0.6 denied.test"),
        "{denial}"
    );
}
