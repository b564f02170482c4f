//! Transparent mode for real, as root: three network namespaces (client →
//! gateway → server, see `support/netns.rs`), the gateway running
//! `portcullis run` behind the ruleset `portcullis render nftables` printed,
//! and clients with no proxy settings at all (curl, openssl, raw sockets).
//!
//! Server side (10.203.2.0/24): `allowed.test` is upstream.py on
//! 10.203.2.2, `denied.test` another upstream.py on 10.203.2.3; TCP and UDP
//! echo servers listen on both. Names reach them only through curl's
//! `--resolve`/`--connect-to` and portcullis's `[resolve]` table; every
//! namespace's resolv.conf points at 127.0.0.1, where nothing answers.
//!
//! Without root each test prints `SKIPPED: ...` (or panics when `CI=true`).
//! The namespace tests run one at a time (they share addresses and port
//! choices, though never namespaces).

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use support::netns::{
    self, Echo, Layout, NsUpstream, Portcullis, Scratch, Side, TcpOpts, Topology, require_root,
    tests_path,
};
use support::{TestCa, output_text, run_command};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
const GW_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
const GW_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 203, 2, 1);
/// allowed.test's upstream.
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 203, 2, 2);
/// denied.test's upstream: no rule names it or its address.
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 203, 2, 3);

/// The transparent listener inside the gateway namespace (fixed: the
/// rendered ruleset redirects to it).
const TRANSPARENT_PORT: u16 = 3129;
/// TCP echo on both server addresses; allowed by address on SERVER only.
const ECHO_TCP: u16 = 7007;
/// UDP echo allowed by a `protocol = "udp"` address rule (SERVER only).
const UDP_ALLOWED: u16 = 7008;
/// UDP echo that no rule allows.
const UDP_OTHER: u16 = 7009;
/// QUIC: allowed by the UDP rule too, yet dropped by the ruleset.
const UDP_QUIC: u16 = 443;

const SNIFF_TIMEOUT_MS: u64 = 500;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
const METRIC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a UDP client waits for an answer that must not come.
const UDP_SILENCE: Duration = Duration::from_millis(800);

/// TLS alert record: fatal `access_denied`.
const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Set-up

struct Env {
    gw: Portcullis,
    allowed: NsUpstream,
    denied: NsUpstream,
    echo: Echo,
    ca: TestCa,
    /// Last: dropping it kills every process and deletes the namespaces.
    topo: Topology,
}

fn layout() -> Layout {
    Layout {
        client: CLIENT,
        gateway_client_side: GW_CLIENT_SIDE,
        client_prefix: 24,
        gateway_server_side: GW_SERVER_SIDE,
        servers: vec![SERVER, DENIED],
        server_prefix: 24,
    }
}

fn config(allowed: &NsUpstream, upstream_mode: &str) -> String {
    let (https, http) = (allowed.https_port, allowed.http_port);
    format!(
        r#"[listen]
proxy = "127.0.0.1:0"
transparent = "0.0.0.0:{TRANSPARENT_PORT}"
admin = "127.0.0.1:0"

[clients]
allow = ["10.201.1.0/24"]

[policy]
profile = "none"
upstream = "{upstream_mode}"

[[rule]]
name = "allowed"
hosts = ["allowed.test"]
ports = [{https}, {http}]

# 10/8 is guarded: resolved addresses (and address decisions) need an
# explicit address rule. This one also lets opaque TCP reach the echo port.
[[rule]]
name = "server-address"
cidrs = ["{SERVER}/32"]
ports = [{https}, {http}, {ECHO_TCP}]

[[rule]]
name = "udp-echo"
protocol = "udp"
cidrs = ["{SERVER}/32"]
ports = [{UDP_ALLOWED}, {UDP_QUIC}]

[resolve]
"allowed.test" = ["{SERVER}"]
"denied.test" = ["{DENIED}"]

[limits]
sniff_timeout_ms = {SNIFF_TIMEOUT_MS}
connect_timeout_ms = 3000
"#
    )
}

/// Namespaces, upstreams, echo servers and portcullis with `[policy]
/// upstream = MODE`; `None` when skipped.
fn setup(test: &str, upstream_mode: &str) -> Option<Env> {
    if !require_root(test) {
        return None;
    }
    let topo = Topology::create(layout());
    let ca = TestCa::new();
    let allowed = topo.start_upstream(&ca, SERVER, &["allowed.test"]);
    let denied = topo.start_upstream(&ca, DENIED, &["denied.test"]);
    let echo = topo.start_echo(
        Ipv4Addr::UNSPECIFIED,
        &[ECHO_TCP],
        &[UDP_ALLOWED, UDP_OTHER, UDP_QUIC],
    );
    // Forged-SNI tests connect to DENIED on allowed.test's ports: route those
    // to denied.test's own upstream, so a dial of the original destination
    // would show up in its log.
    topo.nft_apply(
        Side::Server,
        "server.nft",
        &format!(
            "table ip forged {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tip daddr {DENIED} tcp dport {} dnat to {DENIED}:{}\n\
             \t\tip daddr {DENIED} tcp dport {} dnat to {DENIED}:{}\n\t}}\n}}\n",
            allowed.https_port, denied.https_port, allowed.http_port, denied.http_port
        ),
    );
    let gw = topo.start_portcullis(&config(&allowed, upstream_mode));
    assert_eq!(gw.transparent.port(), TRANSPARENT_PORT);
    Some(Env {
        gw,
        allowed,
        denied,
        echo,
        ca,
        topo,
    })
}

impl Env {
    /// curl in the client namespace, no proxy, bounded.
    fn curl(&self, args: &[&str]) -> Output {
        let mut cmd = self.topo.exec(Side::Client, "curl");
        cmd.args(["-sS", "--noproxy", "*", "--max-time", "15", "--cacert"])
            .arg(self.ca.ca_path())
            .args(args);
        run_command(&mut cmd, None, CLIENT_TIMEOUT)
    }

    /// `curl --resolve NAME:PORT:IP URL`.
    fn curl_resolved(&self, name: &str, addr: SocketAddr, url: &str, extra: &[&str]) -> Output {
        let resolve = format!("{name}:{}:{}", addr.port(), addr.ip());
        let mut args = vec!["--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(url);
        self.curl(&args)
    }

    fn decisions(&self, action: &str, via: &str) -> f64 {
        self.gw.metric(
            "portcullis_decisions_total",
            &[("action", action), ("via", via)],
        )
    }

    /// Waits for `portcullis_connections_active{listener="transparent"}` to be 0.
    fn assert_no_active_connections(&self) {
        let active = self.gw.wait_metric(
            "portcullis_connections_active",
            &[("listener", "transparent")],
            METRIC_TIMEOUT,
            |v| v == 0.0,
        );
        assert_eq!(
            active,
            0.0,
            "transparent connections still active\n{}",
            self.gw.logs_text()
        );
    }

    fn context(&self) -> String {
        format!(
            "portcullis log:\n{}\nallowed upstream: {:?}\ndenied upstream: {:?}\necho: {:?}",
            self.gw.logs_text(),
            self.allowed.events(),
            self.denied.events(),
            self.echo.events()
        )
    }
}

/// Splits `curl -i` output into status code and body.
fn status_and_body(out: &Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_lowercase()
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn allowed_name_is_served_byte_for_byte_over_https_and_http() {
    let _serial = serial();
    let Some(env) = setup(
        "allowed_name_is_served_byte_for_byte_over_https_and_http",
        "resolve",
    ) else {
        return;
    };
    let https = env.allowed.https_addr();
    let http = env.allowed.http_addr();

    let out = env.curl_resolved(
        "allowed.test",
        https,
        &format!("https://allowed.test:{}/blob", https.port()),
        &[],
    );
    assert!(
        out.status.success(),
        "curl https: {}\n{}",
        output_text(&out),
        env.context()
    );
    assert!(
        out.stdout == env.allowed.blob(),
        "https /blob differs: got {} bytes",
        out.stdout.len()
    );
    assert!(
        env.allowed
            .events()
            .iter()
            .any(|l| l.starts_with("https sni ") && l.ends_with(" name=allowed.test")),
        "the upstream saw no SNI allowed.test: {:?}",
        env.allowed.events()
    );

    let out = env.curl_resolved(
        "allowed.test",
        http,
        &format!("http://allowed.test:{}/blob", http.port()),
        &[],
    );
    assert!(
        out.status.success(),
        "curl http: {}\n{}",
        output_text(&out),
        env.context()
    );
    assert!(
        out.stdout == env.allowed.blob(),
        "http /blob differs: got {} bytes",
        out.stdout.len()
    );

    assert!(env.decisions("allow", "sni") >= 1.0, "{}", env.context());
    assert!(env.decisions("allow", "host") >= 1.0, "{}", env.context());
    assert_eq!(env.decisions("deny", "sni"), 0.0);
    env.assert_no_active_connections();
    // Proxied, not routed: the upstream sees the gateway's address.
    let log = env.gw.logs_text();
    assert!(
        log.contains(&format!("\"upstream\":\"{SERVER}:{}\"", https.port())),
        "no access log line with upstream {SERVER}: {log}"
    );
}

#[test]
fn denied_name_gets_a_tls_alert_and_http_403() {
    let _serial = serial();
    let Some(env) = setup("denied_name_gets_a_tls_alert_and_http_403", "resolve") else {
        return;
    };
    let https = env.denied.https_addr();
    let http = env.denied.http_addr();

    // curl: the handshake ends with an access_denied alert.
    let out = env.curl_resolved(
        "denied.test",
        https,
        &format!("https://denied.test:{}/hello.txt", https.port()),
        &[],
    );
    assert!(!out.status.success(), "curl to denied.test succeeded");
    assert!(
        stderr_text(&out).contains("alert access denied"),
        "curl did not report an access_denied alert: {}",
        output_text(&out)
    );

    // openssl s_client says the same.
    let out = run_command(
        env.topo
            .exec(Side::Client, "openssl")
            .args(["s_client", "-connect", &https.to_string()])
            .args(["-servername", "denied.test", "-CAfile"])
            .arg(env.ca.ca_path()),
        Some(b""),
        CLIENT_TIMEOUT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("alert access denied"),
        "s_client: {}",
        output_text(&out)
    );

    // On the wire: exactly the alert record, then EOF.
    let raw = env.topo.tcp(
        Side::Client,
        https,
        &TcpOpts {
            hello: Some(Some("denied.test".into())),
            ..TcpOpts::default()
        },
    );
    assert_eq!(raw.connect, "ok");
    assert_eq!(
        raw.received,
        ACCESS_DENIED_ALERT.to_vec(),
        "{raw:?}\n{}",
        env.context()
    );
    assert_eq!(raw.end, "eof", "{raw:?}");

    // Plain HTTP: 403 with the reason.
    let out = env.curl_resolved(
        "denied.test",
        http,
        &format!("http://denied.test:{}/hello.txt", http.port()),
        &["-i"],
    );
    assert!(out.status.success(), "curl http: {}", output_text(&out));
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 403, "{}", output_text(&out));
    let prefix = format!(
        "portcullis: denied GET http://denied.test:{}/hello.txt — ",
        http.port()
    );
    assert!(
        body.starts_with(&prefix) && body.trim_end().len() > prefix.len(),
        "403 body {body:?} does not start with {prefix:?} and a reason"
    );
    assert!(body.contains("no rule"), "403 body {body:?}");

    assert_eq!(
        env.denied.accepts(),
        0,
        "denied.test's upstream was reached: {}",
        env.context()
    );
    assert_eq!(env.decisions("deny", "sni"), 3.0, "{}", env.context());
    assert_eq!(env.decisions("deny", "host"), 1.0, "{}", env.context());
    assert!(
        env.gw.metric(
            "portcullis_decisions_total",
            &[("action", "deny"), ("via", "sni"), ("reason", "no_rule")]
        ) == 3.0
    );
    env.assert_no_active_connections();
}

#[test]
fn forged_sni_under_resolve_reaches_the_allowed_server() {
    let _serial = serial();
    let Some(env) = setup(
        "forged_sni_under_resolve_reaches_the_allowed_server",
        "resolve",
    ) else {
        return;
    };
    let (https, http) = (env.allowed.https_port, env.allowed.http_port);

    // SNI allowed.test, destination denied.test's address.
    for (scheme, port) in [("https", https), ("http", http)] {
        let connect_to = format!("allowed.test:{port}:{DENIED}:{port}");
        let out = env.curl(&[
            "--connect-to",
            &connect_to,
            &format!("{scheme}://allowed.test:{port}/name.txt"),
        ]);
        assert!(
            out.status.success(),
            "{scheme}: {}\n{}",
            output_text(&out),
            env.context()
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "allowed.test\n",
            "{scheme}: not served by the allowed server"
        );
    }
    assert_eq!(
        env.denied.accepts(),
        0,
        "the original destination was dialled: {}",
        env.context()
    );
    assert_eq!(
        env.gw.metric(
            "portcullis_tls_name_mismatch_total",
            &[("kind", "sni_destination")]
        ),
        0.0
    );

    // Control: the same destination dialled from the gateway itself (not
    // redirected) does reach denied.test's upstream, so the check above
    // would have seen a wrong dial.
    let raw = env.topo.tcp(
        Side::Gateway,
        SocketAddr::from((DENIED, https)),
        &TcpOpts {
            hello: Some(Some("allowed.test".into())),
            timeout: Duration::from_secs(2),
            ..TcpOpts::default()
        },
    );
    assert_eq!(raw.connect, "ok", "{raw:?}");
    assert!(
        env.denied
            .log()
            .wait_line(METRIC_TIMEOUT, |l| l.starts_with("https accept "))
            .is_some(),
        "control dial did not reach denied.test's upstream: {:?}",
        env.denied.events()
    );
    env.assert_no_active_connections();
}

#[test]
fn forged_sni_under_verify_is_refused_and_counted() {
    let _serial = serial();
    let Some(env) = setup("forged_sni_under_verify_is_refused_and_counted", "verify") else {
        return;
    };
    let (https, http) = (env.allowed.https_port, env.allowed.http_port);
    let mismatch = || {
        env.gw.metric(
            "portcullis_tls_name_mismatch_total",
            &[("kind", "sni_destination")],
        )
    };
    assert_eq!(mismatch(), 0.0);

    let connect_to = format!("allowed.test:{https}:{DENIED}:{https}");
    let out = env.curl(&[
        "--connect-to",
        &connect_to,
        &format!("https://allowed.test:{https}/name.txt"),
    ]);
    assert!(
        !out.status.success(),
        "forged SNI was served under verify: {}",
        output_text(&out)
    );
    assert!(
        stderr_text(&out).contains("alert access denied"),
        "expected an access_denied alert: {}",
        output_text(&out)
    );
    assert_eq!(mismatch(), 1.0, "{}", env.context());

    // The same with a forged Host: 403.
    let connect_to = format!("allowed.test:{http}:{DENIED}:{http}");
    let out = env.curl(&[
        "-i",
        "--connect-to",
        &connect_to,
        &format!("http://allowed.test:{http}/name.txt"),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 403, "forged Host under verify: {body:?}");

    assert_eq!(env.denied.accepts(), 0, "{}", env.context());
    assert_eq!(env.allowed.accepts(), 0, "{}", env.context());

    // Not forged: the destination is among allowed.test's addresses.
    let out = env.curl_resolved(
        "allowed.test",
        env.allowed.https_addr(),
        &format!("https://allowed.test:{https}/name.txt"),
        &[],
    );
    assert!(
        out.status.success(),
        "verify refused a matching destination: {}\n{}",
        output_text(&out),
        env.context()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "allowed.test\n");
    assert!(mismatch() >= 1.0);
    env.assert_no_active_connections();
}

#[test]
fn no_sni_and_opaque_tcp_are_decided_by_address() {
    let _serial = serial();
    let Some(env) = setup("no_sni_and_opaque_tcp_are_decided_by_address", "resolve") else {
        return;
    };

    // TLS without SNI to an address in an address rule: a real handshake and request.
    let out = run_command(
        env.topo
            .exec(Side::Client, "openssl")
            .args(["s_client", "-quiet", "-noservername", "-connect"])
            .arg(env.allowed.https_addr().to_string())
            .arg("-CAfile")
            .arg(env.ca.ca_path()),
        Some(b"GET /name.txt HTTP/1.0\r\n\r\n"),
        CLIENT_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("HTTP/1.1 200 ") && stdout.ends_with("\r\n\r\nallowed.test\n"),
        "s_client -noservername to an allowed address: {}\n{}",
        output_text(&out),
        env.context()
    );
    // upstream.py logs `name=None` for a ClientHello without SNI.
    let events = env.allowed.events();
    assert!(
        events.iter().any(|l| l.ends_with(" ok"))
            && events
                .iter()
                .filter(|l| l.starts_with("https sni "))
                .all(|l| l.ends_with(" name=None")),
        "{events:?}"
    );

    // TLS without SNI to an address no rule covers: the alert, nothing upstream.
    let raw = env.topo.tcp(
        Side::Client,
        env.denied.https_addr(),
        &TcpOpts {
            hello: Some(None),
            ..TcpOpts::default()
        },
    );
    assert_eq!(
        (raw.received.clone(), raw.end.as_str()),
        (ACCESS_DENIED_ALERT.to_vec(), "eof"),
        "{raw:?}\n{}",
        env.context()
    );
    assert_eq!(env.denied.accepts(), 0, "{}", env.context());

    // Opaque TCP to the allowed address: the echo round-trips.
    let ping = b"ping through portcullis\n".to_vec();
    let raw = env.topo.tcp(
        Side::Client,
        SocketAddr::from((SERVER, ECHO_TCP)),
        &TcpOpts {
            send: ping.clone(),
            want: ping.len(),
            ..TcpOpts::default()
        },
    );
    assert_eq!(
        (raw.received.clone(), raw.end.as_str()),
        (ping.clone(), "enough"),
        "{raw:?}\n{}",
        env.context()
    );
    // The echo's log line is read from its output by another thread: wait for it.
    let accepted = format!("tcp accept port={ECHO_TCP} local={SERVER} peer={GW_SERVER_SIDE}:");
    let logged = support::wait_until(Duration::from_secs(10), || {
        env.echo.events().iter().any(|l| l.starts_with(&accepted))
    });
    assert!(logged, "{:?}", env.echo.events());

    // Opaque TCP to the same port on an address no rule covers: closed.
    let raw = env.topo.tcp(
        Side::Client,
        SocketAddr::from((DENIED, ECHO_TCP)),
        &TcpOpts {
            send: ping.clone(),
            want: ping.len(),
            ..TcpOpts::default()
        },
    );
    assert!(
        raw.received.is_empty() && (raw.end == "eof" || raw.end == "reset"),
        "{raw:?}\n{}",
        env.context()
    );
    assert!(
        !env.echo
            .events()
            .iter()
            .any(|l| l.contains(&format!("local={DENIED}"))),
        "{:?}",
        env.echo.events()
    );

    // Traffic to the gateway itself is not redirected; the transparent
    // listener refuses it as a loop.
    let raw = env.topo.tcp(
        Side::Client,
        SocketAddr::from((GW_CLIENT_SIDE, TRANSPARENT_PORT)),
        &TcpOpts {
            send: ping,
            ..TcpOpts::default()
        },
    );
    assert!(
        raw.received.is_empty() && raw.end != "timeout",
        "{raw:?}\n{}",
        env.context()
    );

    assert_eq!(env.decisions("allow", "address"), 2.0, "{}", env.context());
    assert_eq!(env.decisions("deny", "address"), 2.0, "{}", env.context());
    env.assert_no_active_connections();
}

#[test]
fn every_keep_alive_request_is_decided_on_its_own_host() {
    let _serial = serial();
    let Some(env) = setup(
        "every_keep_alive_request_is_decided_on_its_own_host",
        "resolve",
    ) else {
        return;
    };
    // Two requests on one connection to allowed.test's address: the first
    // names allowed.test, the second denied.test (which the old code sent
    // to allowed.test's server). An absolute-form URI counts as its name.
    let first = "GET /name.txt HTTP/1.1\r\nHost: allowed.test\r\n\r\n";
    for second in [
        "GET /name.txt HTTP/1.1\r\nHost: denied.test\r\n\r\n",
        "GET http://denied.test/name.txt HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    ] {
        let before = env
            .allowed
            .events()
            .iter()
            .filter(|l| l.starts_with("request "))
            .count();
        let raw = env.topo.tcp(
            Side::Client,
            env.allowed.http_addr(),
            &TcpOpts {
                send: format!("{first}{second}").into_bytes(),
                ..TcpOpts::default()
            },
        );
        let text = String::from_utf8_lossy(&raw.received).to_string();
        assert!(
            text.starts_with("HTTP/1.1 200 ") && text.contains("allowed.test\n"),
            "{raw:?}\n{}",
            env.context()
        );
        let second_answer = &text[text.find("allowed.test\n").unwrap_or(0)..];
        assert!(
            second_answer.contains("HTTP/1.1 403 ") && second_answer.contains("host_mismatch"),
            "the second request must be refused: {text}\n{}",
            env.context()
        );
        let requests = env
            .allowed
            .events()
            .iter()
            .filter(|l| l.starts_with("request "))
            .count();
        assert_eq!(
            requests - before,
            1,
            "only the first request reached the server"
        );
    }
    // A request line the classifier does not take (leading CRLF, lower-case
    // method) to an address an address rule allows is still HTTP: refused,
    // never relayed with its Host unchecked (the echo would send it back).
    let disguised = b"\r\nget / HTTP/1.1\r\nHost: denied.test\r\n\r\n".to_vec();
    let raw = env.topo.tcp(
        Side::Client,
        SocketAddr::from((SERVER, ECHO_TCP)),
        &TcpOpts {
            send: disguised,
            ..TcpOpts::default()
        },
    );
    let text = String::from_utf8_lossy(&raw.received);
    assert!(
        text.starts_with("HTTP/1.1 403 ") && !text.contains("denied.test\r\n"),
        "{raw:?}\n{}",
        env.context()
    );

    // A malformed head (two Hosts) is answered, not silently closed.
    let raw = env.topo.tcp(
        Side::Client,
        env.allowed.http_addr(),
        &TcpOpts {
            send: b"GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: denied.test\r\n\r\n".to_vec(),
            ..TcpOpts::default()
        },
    );
    let text = String::from_utf8_lossy(&raw.received);
    assert!(
        text.starts_with("HTTP/1.1 403 ") && text.contains("malformed_host"),
        "{raw:?}\n{}",
        env.context()
    );
    assert_eq!(env.denied.accepts(), 0, "{}", env.context());
    env.assert_no_active_connections();
}

#[test]
fn udp_reaches_only_udp_address_rules_and_quic_is_dropped() {
    let _serial = serial();
    let Some(env) = setup(
        "udp_reaches_only_udp_address_rules_and_quic_is_dropped",
        "resolve",
    ) else {
        return;
    };
    let data = b"udp through the gateway";

    let got = env.topo.udp(
        SocketAddr::from((SERVER, UDP_ALLOWED)),
        data,
        METRIC_TIMEOUT,
    );
    assert_eq!(
        got.as_deref(),
        Some(&data[..]),
        "allowed UDP did not echo\n{}",
        env.context()
    );
    // Masqueraded: the server sees the gateway's address.
    assert!(
        env.echo.events().iter().any(|l| l.starts_with(&format!(
            "udp recv port={UDP_ALLOWED} peer={GW_SERVER_SIDE}:"
        ))),
        "{:?}",
        env.echo.events()
    );

    for (dest, what) in [
        (
            SocketAddr::from((SERVER, UDP_OTHER)),
            "a port no rule allows",
        ),
        (
            SocketAddr::from((DENIED, UDP_ALLOWED)),
            "an address no rule allows",
        ),
        (SocketAddr::from((SERVER, UDP_QUIC)), "QUIC (UDP 443)"),
    ] {
        let got = env.topo.udp(dest, data, UDP_SILENCE);
        assert_eq!(got, None, "UDP to {what} ({dest}) came back");
    }
    let recvs: Vec<String> = env
        .echo
        .events()
        .into_iter()
        .filter(|l| l.starts_with("udp recv "))
        .collect();
    assert_eq!(
        recvs.len(),
        1,
        "only the allowed datagram may reach the server: {recvs:?}"
    );

    // The QUIC drop counted it.
    let rules = env.topo.nft_list(Side::Gateway);
    let quic = rules
        .lines()
        .find(|l| l.contains("comment \"quic\""))
        .unwrap_or_else(|| panic!("no quic rule in:\n{rules}"));
    let packets: u64 = quic
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet counter in {quic:?}"));
    assert!(packets >= 1, "quic counter did not count: {quic}");
}

#[test]
fn silent_and_slow_clients_are_closed_after_the_sniff_timeout() {
    let _serial = serial();
    let Some(env) = setup(
        "silent_and_slow_clients_are_closed_after_the_sniff_timeout",
        "resolve",
    ) else {
        return;
    };
    let before_total = env.gw.metric(
        "portcullis_connections_total",
        &[("listener", "transparent")],
    );
    let dest = env.denied.https_addr();
    let silent = TcpOpts {
        timeout: Duration::from_secs(10),
        ..TcpOpts::default()
    };
    // The first three bytes of a ClientHello record, then nothing.
    let slow = TcpOpts {
        send: vec![0x16, 0x03, 0x01],
        timeout: Duration::from_secs(10),
        ..TcpOpts::default()
    };
    // An opaque connection held open meanwhile, so the gauge is seen counting.
    let hold = b"hold\n".to_vec();
    let holder = env.topo.tcp_background(
        Side::Client,
        SocketAddr::from((SERVER, ECHO_TCP)),
        &TcpOpts {
            send: hold.clone(),
            want: 1000,
            timeout: Duration::from_secs(4),
            ..TcpOpts::default()
        },
    );
    let active = env.gw.wait_metric(
        "portcullis_connections_active",
        &[("listener", "transparent")],
        METRIC_TIMEOUT,
        |v| v >= 1.0,
    );
    assert!(
        active >= 1.0,
        "open connection not counted\n{}",
        env.context()
    );

    // The silent client goes to an address no rule covers (decided by address
    // after the timeout); the stalled ClientHello to an address a rule DOES
    // cover: a hello that never names a host must not fall back to the
    // address decision, so it is refused with the TLS alert.
    let a = env.topo.tcp_background(Side::Client, dest, &silent);
    let b = env
        .topo
        .tcp_background(Side::Client, env.allowed.https_addr(), &slow);
    for (p, what, want) in [
        (&a, "silent", &[][..]),
        (&b, "slow", &ACCESS_DENIED_ALERT[..]),
    ] {
        let r = netns::background_tcp_result(p, Duration::from_secs(20));
        assert_eq!(r.connect, "ok", "{what}: {r:?}");
        assert!(
            r.received == want && (r.end == "eof" || r.end == "reset"),
            "{what} client was not closed: {r:?}\n{}",
            env.context()
        );
        // Closed by the sniff timeout, well before the client's own 10 s.
        assert!(
            r.elapsed_ms >= SNIFF_TIMEOUT_MS - 100 && r.elapsed_ms < 5_000,
            "{what} client closed after {} ms (sniff_timeout_ms = {SNIFF_TIMEOUT_MS})",
            r.elapsed_ms
        );
    }
    let r = netns::background_tcp_result(&holder, Duration::from_secs(20));
    assert_eq!((r.received, r.end.as_str()), (hold, "timeout"), "holder");
    let total = env.gw.metric(
        "portcullis_connections_total",
        &[("listener", "transparent")],
    );
    assert_eq!(total - before_total, 3.0, "{}", env.context());
    assert_eq!(env.decisions("deny", "address"), 2.0, "{}", env.context());
    assert_eq!(env.denied.accepts(), 0, "{}", env.context());
    assert_eq!(env.allowed.accepts(), 0, "{}", env.context());
    env.assert_no_active_connections();
}

#[test]
fn render_nftables_for_the_azureml_config_passes_nft_check() {
    let _serial = serial();
    if !require_root("render_nftables_for_the_azureml_config_passes_nft_check") {
        return;
    }
    let tags = tests_path("data/servicetags-public-subset.json");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/azureml.toml"))
        .unwrap();
    let text = text
        .replace("region = \"westus2\"", "region = \"eastus\"")
        .replace(
            "# service_tags = \"ServiceTags_Public.json\"",
            &format!("service_tags = {:?}", tags.display().to_string()),
        );
    assert!(text.contains("region = \"eastus\"") && text.contains("\nservice_tags = "));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("azureml.toml");
    std::fs::write(&config, &text).unwrap();
    let out = run_command(
        support::client_command(env!("CARGO_BIN_EXE_portcullis"))
            .args(["render", "nftables", "-c"])
            .arg(&config),
        None,
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "render: {}", output_text(&out));
    let ruleset = String::from_utf8(out.stdout).unwrap();
    assert!(
        !ruleset.contains("WARNING: no service tags file"),
        "{ruleset}"
    );
    // The service-tag UDP rule (AzureMachineLearning, 5831) is rendered from the file.
    assert!(
        ruleset.contains("udp dport 5831") && ruleset.contains("redirect to :3129"),
        "{ruleset}"
    );
    let path = dir.path().join("azureml.nft");
    std::fs::write(&path, &ruleset).unwrap();

    let ns = Scratch::create();
    let out = run_command(
        ns.exec("nft").arg("-c").arg("-f").arg(&path),
        None,
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "nft -c -f: {}", output_text(&out));
    // And it loads (twice: the create-then-delete header makes reloads atomic).
    for _ in 0..2 {
        let out = run_command(ns.exec("nft").arg("-f").arg(&path), None, CLIENT_TIMEOUT);
        assert!(out.status.success(), "nft -f: {}", output_text(&out));
    }
    let out = run_command(
        ns.exec("nft").args(["list", "table", "inet", "portcullis"]),
        None,
        CLIENT_TIMEOUT,
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("chain forward"),
        "{}",
        output_text(&out)
    );
}
