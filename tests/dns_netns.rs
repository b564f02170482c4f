//! The DNS listener for real, as root: three network namespaces (client →
//! gateway → server, see `support/netns.rs`), the gateway running
//! `portcullis run` with `[listen] dns` behind the ruleset `portcullis
//! render nftables` printed, and a real dnsmasq in the server namespace as
//! the gateway's `[dns] servers`.
//!
//! Server side (10.213.2.0/24): dnsmasq on 10.213.2.53 knows
//! `smb.dnsns.test` (10.213.2.45, a TCP echo on 445 standing in for SMB),
//! `udp.dnsns.test` (10.213.2.58, UDP echo on 5831 and 5832) and
//! `denied.dnsns.test` (10.213.2.99, the same echo servers, no rule). Rules
//! allow `smb.dnsns.test` on TCP 445 and `udp.dnsns.test` on UDP 5831, by
//! name only. The client asks other DNS servers (168.63.129.16, 8.8.8.8):
//! the ruleset redirects its port 53 to the gateway's listener. Every
//! namespace's resolv.conf says 127.0.0.1, where nothing answers.
//!
//! Shown: (a) DNS to any address is answered by the gateway, a denied name
//! is REFUSED and never reaches dnsmasq; (b) TCP 445 to the server fails
//! before the client resolved its name through the gateway and passes
//! after, logged as `dns_address` naming the name; (c) UDP to the resolved
//! address and port passes only after the gateway put it into the
//! ruleset's set; another port or address stays dropped.
//!
//! portcullis runs with the systemd unit's privileges: an unprivileged
//! user with CAP_NET_ADMIN only (setpriv), which `nft` needs for (c).
//!
//! Without root the test prints `SKIPPED: ...` (or panics when `CI=true`);
//! without dnsmasq or setpriv likewise.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use support::netns::{Layout, Portcullis, Side, Spawned, TcpOpts, Topology, require_root};
use support::{have, printed, require};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 211, 1, 2);
const GW_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 211, 1, 1);
const GW_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 213, 2, 1);
const DNSMASQ: Ipv4Addr = Ipv4Addr::new(10, 213, 2, 53);
const SMB: Ipv4Addr = Ipv4Addr::new(10, 213, 2, 45);
const UDP_SERVER: Ipv4Addr = Ipv4Addr::new(10, 213, 2, 58);
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 213, 2, 99);

const SMB_NAME: &str = "smb.dnsns.test";
const UDP_NAME: &str = "udp.dnsns.test";
const DENIED_NAME: &str = "denied.dnsns.test";

const TRANSPARENT_PORT: u16 = 3129;
/// Not 53: the redirect must carry port 53 to the listener's own port.
const DNS_PORT: u16 = 5354;
const SMB_PORT: u16 = 445;
/// Allowed by the UDP name rule.
const UDP_ALLOWED: u16 = 5831;
/// Same address, no rule.
const UDP_OTHER: u16 = 5832;

/// Azure's DNS / wire server, and a public resolver: neither exists here.
const AZURE_DNS: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
const PUBLIC_DNS: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

const RCODE_NOERROR: u8 = 0;
const RCODE_REFUSED: u8 = 5;
const TYPE_A: u16 = 1;
const TYPE_TXT: u16 = 16;

/// How long a client waits for an answer that must not come (the test
/// then also checks the server never saw the packet).
const SILENCE: Duration = Duration::from_millis(800);
const ANSWER: Duration = Duration::from_secs(5);
const METRIC_TIMEOUT: Duration = Duration::from_secs(15);

struct Env {
    gw: Portcullis,
    dnsmasq: Spawned,
    echo: support::netns::Echo,
    /// Last: dropping it kills every process and deletes the namespaces.
    topo: Topology,
}

fn config() -> String {
    format!(
        r#"[listen]
proxy = "127.0.0.1:0"
transparent = "0.0.0.0:{TRANSPARENT_PORT}"
admin = "127.0.0.1:0"
dns = "0.0.0.0:{DNS_PORT}"

[clients]
allow = ["10.211.1.0/24"]

[policy]
profile = "none"
# 10/8 is guarded: the names below may resolve into the server subnet,
# which is never reached by address alone.
private_ranges = ["10.213.2.0/24"]

[dns]
servers = ["{DNSMASQ}:53"]

[[rule]]
name = "smb"
hosts = ["{SMB_NAME}"]
ports = [{SMB_PORT}]
opaque = true

[[rule]]
name = "udp-service"
hosts = ["{UDP_NAME}"]
ports = [{UDP_ALLOWED}]
protocol = "udp"

[limits]
sniff_timeout_ms = 500
connect_timeout_ms = 3000
"#
    )
}

/// The unit's `User=` (an unprivileged one: nobody) and its
/// `AmbientCapabilities=` / `CapabilityBoundingSet=` (CAP_NET_ADMIN), with
/// `NoNewPrivileges=yes`.
const UNIT_PRIVILEGES: [&str; 8] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all,+net_admin",
    "--ambient-caps=-all,+net_admin",
    "--bounding-set=-all,+net_admin",
    "--no-new-privs",
];

fn setup(test: &str) -> Option<Env> {
    if !require_root(test)
        || !require(have("dnsmasq", &["--version"]), "dnsmasq not found")
        || !require(have("setpriv", &["--version"]), "setpriv not found")
    {
        return None;
    }
    let topo = Topology::create_named(
        "pcudp",
        Layout {
            client: CLIENT,
            gateway_client_side: GW_CLIENT_SIDE,
            client_prefix: 24,
            gateway_server_side: GW_SERVER_SIDE,
            // UDP_SERVER first: the echo servers listen on 0.0.0.0, and a
            // UDP answer leaves from the interface's first address.
            servers: vec![UDP_SERVER, DNSMASQ, SMB, DENIED],
            server_prefix: 24,
        },
    );
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--bind-interfaces",
        "--log-queries",
        "--log-facility=-",
        "--local-ttl=60",
        "--port=53",
    ])
    .arg(format!("--listen-address={DNSMASQ}"))
    .arg(format!("--host-record={SMB_NAME},{SMB}"))
    .arg(format!("--host-record={UDP_NAME},{UDP_SERVER}"))
    .arg(format!("--host-record={DENIED_NAME},{DENIED}"));
    let dnsmasq = topo.spawn(Side::Server, cmd);
    if dnsmasq
        .stderr
        .wait_line(ANSWER * 4, |l| l.contains("started, version"))
        .is_none()
    {
        panic!(
            "dnsmasq did not start\n{}",
            printed(&dnsmasq.stdout, &dnsmasq.stderr)
        );
    }
    let echo = topo.start_echo(
        Ipv4Addr::UNSPECIFIED,
        &[SMB_PORT],
        &[UDP_ALLOWED, UDP_OTHER],
    );
    // As deploy/systemd/portcullis.service runs it: not root, with
    // CAP_NET_ADMIN (for `nft`, adding set elements) and nothing else.
    let gw = topo.start_portcullis_as(&config(), &UNIT_PRIVILEGES);
    Some(Env {
        gw,
        dnsmasq,
        echo,
        topo,
    })
}

/// A DNS query: id 0x5053, recursion desired, one question.
fn query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x50, 0x53, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// (rcode, answer count, whether the answer ends with `ip`'s bytes: the
/// RDATA of a one-record A answer).
fn reply(bytes: &[u8], ip: Ipv4Addr) -> (u8, u16, bool) {
    assert!(bytes.len() >= 12, "short DNS reply: {bytes:?}");
    assert_eq!(&bytes[..2], &[0x50, 0x53], "reply id");
    let ancount = u16::from_be_bytes([bytes[6], bytes[7]]);
    (bytes[3] & 0x0f, ancount, bytes.ends_with(&ip.octets()))
}

impl Env {
    /// One DNS query over UDP from the client to `server:53`; the reply.
    fn ask_udp(&self, server: Ipv4Addr, name: &str, qtype: u16) -> Vec<u8> {
        let dest = SocketAddr::from((server, 53));
        self.topo
            .udp(dest, &query(name, qtype), ANSWER)
            .unwrap_or_else(|| panic!("no DNS answer from {dest} for {name}\n{}", self.context()))
    }

    /// The same over TCP (length-prefixed).
    fn ask_tcp(&self, server: Ipv4Addr, name: &str, qtype: u16) -> Vec<u8> {
        let q = query(name, qtype);
        let mut send = (q.len() as u16).to_be_bytes().to_vec();
        send.extend_from_slice(&q);
        let r = self.topo.tcp(
            Side::Client,
            SocketAddr::from((server, 53)),
            &TcpOpts {
                send,
                timeout: ANSWER,
                ..TcpOpts::default()
            },
        );
        assert_eq!(r.connect, "ok", "{r:?}\n{}", self.context());
        assert!(r.received.len() > 2, "{r:?}\n{}", self.context());
        r.received[2..].to_vec()
    }

    /// Echo server events about `port`.
    fn echo_saw(&self, what: &str, port: u16) -> usize {
        let needle = format!("{what} port={port} ");
        (self.echo.events().iter())
            .filter(|l| l.starts_with(&needle))
            .count()
    }

    fn context(&self) -> String {
        format!(
            "--- portcullis log ---\n{}\n--- dnsmasq ---\n{}\n--- echo ---\n{}\n--- ruleset ---\n{}",
            self.gw.logs_text(),
            self.dnsmasq.stderr.snapshot().join("\n"),
            self.echo.events().join("\n"),
            self.topo.nft_list(Side::Gateway)
        )
    }
}

/// The SMB client's first bytes, echoed when it gets through.
const SMB_HELLO: &[u8] = b"\x00\x00\x00\x08SMB-ish!";

fn smb_opts() -> TcpOpts {
    TcpOpts {
        send: SMB_HELLO.to_vec(),
        want: SMB_HELLO.len(),
        timeout: ANSWER,
        ..TcpOpts::default()
    }
}

impl Env {
    /// Before any resolution: SMB and UDP to the servers get nowhere.
    fn nothing_passes_unresolved(&self) {
        // (b, before) SMB to the server's address: no name, nothing
        // learned, refused by the gateway, never reaching the server.
        let smb = SocketAddr::from((SMB, SMB_PORT));
        let before = self.topo.tcp(Side::Client, smb, &smb_opts());
        assert!(before.received.is_empty(), "{before:?}\n{}", self.context());
        assert_eq!(
            self.echo_saw("tcp accept", SMB_PORT),
            0,
            "{}",
            self.context()
        );
        // (c, before) UDP to the service's address: dropped by the ruleset.
        let udp = SocketAddr::from((UDP_SERVER, UDP_ALLOWED));
        assert_eq!(self.topo.udp(udp, b"early", SILENCE), None);
        assert_eq!(
            self.echo_saw("udp recv", UDP_ALLOWED),
            0,
            "{}",
            self.context()
        );
    }

    /// (a) DNS to Azure's resolver and to a public one, UDP and TCP: the
    /// gateway answers (dnsmasq is the only server that knows the names),
    /// and refuses a name no rule allows.
    fn dns_goes_through_the_gateway(&self) {
        let (code, n, has) = reply(&self.ask_udp(AZURE_DNS, SMB_NAME, TYPE_A), SMB);
        assert_eq!(
            (code, n, has),
            (RCODE_NOERROR, 1, true),
            "{}",
            self.context()
        );
        let (code, n, has) = reply(&self.ask_tcp(PUBLIC_DNS, UDP_NAME, TYPE_A), UDP_SERVER);
        assert_eq!(
            (code, n, has),
            (RCODE_NOERROR, 1, true),
            "{}",
            self.context()
        );
        // A name no rule allows: REFUSED, for A and TXT, over UDP and TCP;
        // it never reaches dnsmasq.
        for (server, qtype) in [(AZURE_DNS, TYPE_A), (PUBLIC_DNS, TYPE_TXT)] {
            let (code, n, _) = reply(&self.ask_udp(server, DENIED_NAME, qtype), DENIED);
            assert_eq!((code, n), (RCODE_REFUSED, 0), "{}", self.context());
        }
        let (code, _, _) = reply(&self.ask_tcp(AZURE_DNS, DENIED_NAME, TYPE_A), DENIED);
        assert_eq!(code, RCODE_REFUSED, "{}", self.context());
        let dnsmasq_log = self.dnsmasq.stderr.snapshot().join("\n");
        assert!(dnsmasq_log.contains(SMB_NAME), "{}", self.context());
        assert!(!dnsmasq_log.contains(DENIED_NAME), "{}", self.context());
        let refused = self.gw.wait_metric(
            "portcullis_dns_queries_total",
            &[("result", "refused")],
            METRIC_TIMEOUT,
            |v| v >= 3.0,
        );
        assert!(refused >= 3.0, "{}", self.context());
    }

    /// (b, after) The same SMB connection passes, decided as the name; an
    /// address nobody resolved stays refused on the same port.
    fn smb_passes_as_the_resolved_name(&self) {
        let smb = SocketAddr::from((SMB, SMB_PORT));
        let after = self.topo.tcp(Side::Client, smb, &smb_opts());
        assert_eq!(after.received, SMB_HELLO, "{after:?}\n{}", self.context());
        assert_eq!(
            self.echo_saw("tcp accept", SMB_PORT),
            1,
            "{}",
            self.context()
        );
        let line = self.gw.logs().wait_line(METRIC_TIMEOUT, |l| {
            l.contains("\"reason\":\"dns_address\"")
                && l.contains(&format!("\"host\":\"{SMB_NAME}\""))
        });
        assert!(
            line.is_some(),
            "no dns_address access line\n{}",
            self.context()
        );
        let denied = SocketAddr::from((DENIED, SMB_PORT));
        let denied = self.topo.tcp(Side::Client, denied, &smb_opts());
        assert!(denied.received.is_empty(), "{denied:?}\n{}", self.context());
        assert_eq!(
            self.echo_saw("tcp accept", SMB_PORT),
            1,
            "{}",
            self.context()
        );
    }

    /// (c, after) Once the gateway wrote the element, UDP to that address
    /// and port passes; another port, or another address, stays dropped.
    fn udp_passes_to_the_resolved_address_and_port_only(&self) {
        let written = self.gw.wait_metric(
            "portcullis_dns_udp_set_elements_total",
            &[("result", "written")],
            METRIC_TIMEOUT,
            |v| v >= 1.0,
        );
        assert_eq!(written, 1.0, "{}", self.context());
        let set = ["list", "set", "inet", "portcullis", "dns_udp_v4"];
        let set = self.topo.run(Side::Gateway, "nft", &set, ANSWER);
        let set = String::from_utf8_lossy(&set.stdout).into_owned();
        let element = format!("{UDP_SERVER} . {UDP_ALLOWED} timeout");
        assert!(set.contains(&element), "{set}");
        let udp = SocketAddr::from((UDP_SERVER, UDP_ALLOWED));
        let echoed = self.topo.udp(udp, b"resolved", ANSWER);
        assert_eq!(
            echoed.as_deref(),
            Some(&b"resolved"[..]),
            "{}",
            self.context()
        );
        assert_eq!(
            self.echo_saw("udp recv", UDP_ALLOWED),
            1,
            "{}",
            self.context()
        );
        let other_port = SocketAddr::from((UDP_SERVER, UDP_OTHER));
        assert_eq!(self.topo.udp(other_port, b"other", SILENCE), None);
        let other_addr = SocketAddr::from((DENIED, UDP_ALLOWED));
        assert_eq!(self.topo.udp(other_addr, b"other", SILENCE), None);
        assert_eq!(
            self.echo_saw("udp recv", UDP_OTHER),
            0,
            "{}",
            self.context()
        );
        assert_eq!(
            self.echo_saw("udp recv", UDP_ALLOWED),
            1,
            "{}",
            self.context()
        );
        let failed = ("result", "failed");
        let failed = self
            .gw
            .metric("portcullis_dns_udp_set_runs_total", &[failed]);
        assert_eq!(failed, 0.0, "{}", self.context());
    }
}

#[test]
fn dns_is_filtered_and_names_open_smb_and_udp_only_once_resolved() {
    let Some(env) = setup("dns_is_filtered_and_names_open_smb_and_udp_only_once_resolved") else {
        return;
    };
    assert!(env.gw.ruleset.contains(&format!("redirect to :{DNS_PORT}")));
    env.nothing_passes_unresolved();
    env.dns_goes_through_the_gateway();
    env.smb_passes_as_the_resolved_name();
    env.udp_passes_to_the_resolved_address_and_port_only();
}
