//! The explicit proxy end to end: real clients (curl, Python requests/urllib,
//! pip, git, openssl s_client, rustls) through `portcullis run` to local
//! upstreams on 127.0.0.2, plus raw-socket abuse, SSRF, domain fronting,
//! graceful shutdown, client ACLs, audit mode and reload.
//!
//! Names reach the upstreams only through the proxy's `[resolve]` table;
//! nothing here resolves a real name or leaves the machine.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use rustls::pki_types::ServerName;
use support::{
    BLOB_SIZE, HELLO, Proxy, Response, TestCa, UPSTREAM_IP, Upstream, WHEEL, client_command,
    connect, connect_via, have, have_python, is_timeout, output_text, read_head, read_response,
    read_until_closed, require, run_command, tool_works, wait_until,
};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
const METRIC_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Set-up

/// Variations on the base config.
#[derive(Default)]
struct Opts {
    /// `[policy] mode`; default enforce.
    mode: Option<&'static str>,
    /// `[clients] allow` items (TOML strings); default `127.0.0.0/8`.
    clients: Option<&'static str>,
    /// Hosts added to the `allowed` rule.
    extra_hosts: Vec<&'static str>,
    /// Ports added to both rules.
    extra_ports: Vec<u16>,
    /// `[limits]` entries.
    limits: Vec<(&'static str, u64)>,
    /// Extra `[policy]` lines.
    policy: Vec<&'static str>,
}

fn config(up: &Upstream, opts: &Opts) -> String {
    let mut ports = vec![up.https_port(), up.http_port()];
    ports.extend(&opts.extra_ports);
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut hosts = vec![
        "allowed.test",
        "*.pypi.test",
        "pypi.test",
        "git.test",
        "ssrf.test",
        "metadata.test",
        "private.test",
    ];
    hosts.extend(&opts.extra_hosts);
    let hosts = hosts
        .iter()
        .map(|h| format!("{h:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let limits: String = opts
        .limits
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    let clients = opts.clients.unwrap_or("\"127.0.0.0/8\"");
    let mode = opts.mode.unwrap_or("enforce");
    let policy: String = opts.policy.iter().map(|l| format!("{l}\n")).collect();
    format!(
        r#"[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[clients]
allow = [{clients}]

[policy]
profile = "none"
mode = "{mode}"
{policy}
[[rule]]
name = "allowed"
hosts = [{hosts}]
ports = [{ports}]

# Resolved addresses in guarded ranges (127/8) need an explicit address rule.
[[rule]]
name = "upstreams"
cidrs = ["127.0.0.2/32"]
ports = [{ports}]

[resolve]
"allowed.test" = ["127.0.0.2"]
"other.test" = ["127.0.0.2"]
"pypi.test" = ["127.0.0.2"]
"git.test" = ["127.0.0.2"]
"ssrf.test" = ["127.0.0.1"]
"metadata.test" = ["169.254.169.254"]
"private.test" = ["10.1.2.3"]

[limits]
{limits}"#
    )
}

struct Env {
    proxy: Proxy,
    up: Upstream,
    ca: TestCa,
}

/// CA, upstream and proxy; `None` (skipped) without python3.
fn setup(opts: Opts) -> Option<Env> {
    if !have_python() {
        return None;
    }
    let ca = TestCa::new();
    let up = Upstream::start(&ca);
    let proxy = Proxy::start(&config(&up, &opts));
    Some(Env { proxy, up, ca })
}

/// `git http-backend` is installed (in git's exec path).
fn have_http_backend() -> bool {
    std::process::Command::new("git")
        .arg("--exec-path")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .is_some_and(|dir| std::path::Path::new(&dir).join("git-http-backend").exists())
}

// ---------------------------------------------------------------------------
// Raw helpers

/// CONNECT and read the whole response (for refusals, which carry a body).
fn connect_refusal(proxy: SocketAddr, authority: &str) -> Response {
    let mut s = connect(proxy).expect("connect to proxy");
    write!(
        s,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    read_response(&mut s).unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"))
}

/// Sends raw bytes to the proxy and reads one response.
fn exchange(proxy: SocketAddr, request: &[u8]) -> std::io::Result<Response> {
    let mut s = connect(proxy)?;
    s.write_all(request)?;
    read_response(&mut s)
}

/// The `error=` parameter of `Proxy-Status`.
fn proxy_status_error(resp: &Response) -> Option<String> {
    let value = resp.header("proxy-status")?;
    value
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("error="))
        .map(|e| e.trim_matches('"').to_string())
}

fn describe(resp: &Response) -> String {
    let mut body = resp.text();
    if body.len() > 400 {
        let cut = (0..=400)
            .rev()
            .find(|i| body.is_char_boundary(*i))
            .unwrap_or(0);
        body = format!("{}... ({} bytes)", &body[..cut], resp.body.len());
    }
    format!(
        "{} {} {:?} body={body:?}",
        resp.status, resp.reason, resp.headers
    )
}

/// Asserts a refusal: status, `Proxy-Status: portcullis; error=TOKEN`, one-line body.
fn assert_refused(resp: &Response, status: u16, token: &str, what: &str) {
    assert_eq!(resp.status, status, "{what}: {}", describe(resp));
    let ps = resp.header("proxy-status").unwrap_or_default();
    assert!(
        ps.starts_with("portcullis"),
        "{what}: Proxy-Status {ps:?} should name portcullis"
    );
    assert_eq!(
        proxy_status_error(resp).as_deref(),
        Some(token),
        "{what}: {}",
        describe(resp)
    );
    assert!(ps.contains("details="), "{what}: Proxy-Status {ps:?}");
}

/// A GET through an open tunnel to the plain-HTTP upstream.
fn get_through(mut s: TcpStream, host: &str, path: &str) -> Response {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_response(&mut s).unwrap_or_else(|e| panic!("GET {path} through tunnel: {e}"))
}

/// TLS (rustls, trusting `ca`) over an open tunnel with `sni`, then GET `path`.
fn tls_get(ca: &TestCa, s: TcpStream, sni: &str, path: &str) -> std::io::Result<Response> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(ca.client_config(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
    )?;
    read_response(&mut tls)
}

fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}: got {} bytes, want {} bytes (first difference at {:?})",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

/// Echo document from `/echo`.
fn echo_headers(resp: &Response) -> (serde_json::Value, Vec<(String, String)>) {
    let doc: serde_json::Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("echo body is not JSON ({e}): {}", resp.text()));
    let headers = doc["headers"]
        .as_array()
        .expect("headers array")
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_ascii_lowercase(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (doc, headers)
}

fn hdr<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    support::header(headers, name)
}

// ---------------------------------------------------------------------------
// Allowed traffic with real clients

#[test]
fn curl_https_through_proxy_flag_and_env_is_byte_exact() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    if !have("curl", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://allowed.test:{}/blob", env.up.https_port());
    let ca = env.ca.ca_path().to_str().unwrap().to_string();

    let via_flag = dir.path().join("via-flag");
    let out = run_command(
        client_command("curl")
            .args([
                "-sS",
                "--fail",
                "--cacert",
                &ca,
                "-x",
                &env.proxy.url(),
                "-o",
            ])
            .arg(&via_flag)
            .arg(&url),
        None,
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "curl -x: {}", output_text(&out));
    assert_same_bytes(&std::fs::read(&via_flag).unwrap(), env.up.blob(), "curl -x");

    let via_env = dir.path().join("via-env");
    let out = run_command(
        client_command("curl")
            .env("HTTPS_PROXY", env.proxy.url())
            .args(["-sS", "--fail", "--cacert", &ca, "-o"])
            .arg(&via_env)
            .arg(&url),
        None,
        CLIENT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "curl HTTPS_PROXY: {}",
        output_text(&out)
    );
    assert_same_bytes(
        &std::fs::read(&via_env).unwrap(),
        env.up.blob(),
        "curl HTTPS_PROXY",
    );

    // Both went through the proxy: two allow decisions, two TLS handshakes upstream.
    let allowed = env.proxy.wait_metric(
        "portcullis_decisions_total",
        &[("action", "allow")],
        METRIC_TIMEOUT,
        |v| v == 2.0,
    );
    assert_eq!(allowed, 2.0, "{}", env.proxy.metrics_text());
    let handshakes = env
        .up
        .log()
        .snapshot()
        .iter()
        .filter(|l| l.starts_with("https handshake") && l.ends_with(" ok"))
        .count();
    assert_eq!(handshakes, 2, "{:?}", env.up.log().snapshot());
    let down = env.proxy.wait_metric(
        "portcullis_bytes_total",
        &[("direction", "download")],
        METRIC_TIMEOUT,
        |v| v >= (2 * BLOB_SIZE) as f64,
    );
    assert!(down >= (2 * BLOB_SIZE) as f64, "download bytes {down}");
    let up = env
        .proxy
        .metric("portcullis_bytes_total", &[("direction", "upload")]);
    assert!(up > 0.0, "upload bytes {up}");
    let total = env
        .proxy
        .metric("portcullis_connections_total", &[("listener", "proxy")]);
    assert!(total >= 2.0, "connections_total {total}");
    let active = env.proxy.wait_metric(
        "portcullis_connections_active",
        &[("listener", "proxy")],
        METRIC_TIMEOUT,
        |v| v == 0.0,
    );
    assert_eq!(active, 0.0);
}

#[test]
fn denied_connect_is_403_with_reason_and_is_counted() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let hp = env.up.https_port();
    let authority = format!("other.test:{hp}");

    let resp = connect_refusal(env.proxy.addr(), &authority);
    assert_refused(&resp, 403, "http_request_denied", "CONNECT other.test");
    assert_eq!(
        resp.text().trim_end(),
        format!("portcullis: denied CONNECT {authority} — no rule allows this destination"),
    );
    assert!(
        !resp.text().trim_end().contains('\n'),
        "body is one line: {:?}",
        resp.text()
    );

    let url = format!("http://other.test:{}/hello.txt", env.up.http_port());
    let resp = exchange(
        env.proxy.addr(),
        format!(
            "GET {url} HTTP/1.1\r\nHost: other.test:{}\r\n\r\n",
            env.up.http_port()
        )
        .as_bytes(),
    )
    .unwrap();
    assert_refused(&resp, 403, "http_request_denied", "GET other.test");
    assert!(
        resp.text()
            .starts_with(&format!("portcullis: denied GET {url} — ")),
        "{}",
        resp.text()
    );

    let mut curl_runs = 0.0;
    if have("curl", &["--version"]) {
        let out = run_command(
            client_command("curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_connect}",
                    "--cacert",
                ])
                .arg(env.ca.ca_path())
                .args(["-x", &env.proxy.url()])
                .arg(format!("https://{authority}/")),
            None,
            CLIENT_TIMEOUT,
        );
        assert!(
            !out.status.success(),
            "curl must fail: {}",
            output_text(&out)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "403",
            "{}",
            output_text(&out)
        );
        curl_runs = 1.0;
    }

    let port = hp.to_string();
    let https_denials = env.proxy.wait_metric(
        "portcullis_denied_destinations_total",
        &[("host", "other.test"), ("port", &port)],
        METRIC_TIMEOUT,
        |v| v == 1.0 + curl_runs,
    );
    assert_eq!(
        https_denials,
        1.0 + curl_runs,
        "{}",
        env.proxy.metrics_text()
    );
    let denies = env.proxy.metric(
        "portcullis_decisions_total",
        &[("action", "deny"), ("reason", "no_rule")],
    );
    assert_eq!(denies, 2.0 + curl_runs, "{}", env.proxy.metrics_text());
    assert_eq!(
        env.proxy
            .metric("portcullis_decisions_total", &[("action", "allow")]),
        0.0
    );

    // A JSON log line names the denied destination.
    let line = env.proxy.stderr().wait_line(METRIC_TIMEOUT, |l| {
        l.contains("other.test") && serde_json::from_str::<serde_json::Value>(l).is_ok()
    });
    assert!(
        line.is_some(),
        "no JSON log line about other.test: {:?}",
        env.proxy.stderr_lines()
    );
    // The upstream was never contacted.
    let accepts: Vec<String> = env
        .up
        .log()
        .snapshot()
        .into_iter()
        .filter(|l| l.contains(" accept "))
        .collect();
    assert!(accepts.is_empty(), "upstream contacted: {accepts:?}");
}

#[test]
fn plain_http_is_forwarded_with_via_and_without_hop_by_hop_headers() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let host = format!("allowed.test:{}", env.up.http_port());

    // Raw client: two requests on one keep-alive connection.
    let mut s = connect(env.proxy.addr()).unwrap();
    write!(
        s,
        "GET http://{host}/echo HTTP/1.1\r\nHost: {host}\r\nProxy-Connection: keep-alive\r\n\
         Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic dXNlcjpwdw==\r\nX-Keep: yes\r\n\r\n"
    )
    .unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 200, "{}", describe(&resp));
    let (doc, headers) = echo_headers(&resp);
    assert_eq!(doc["method"], "GET");
    assert_eq!(doc["path"], "/echo", "upstream must get origin-form");
    assert!(hdr(&headers, "via").is_some(), "no Via: {headers:?}");
    for gone in [
        "proxy-connection",
        "x-hop",
        "keep-alive",
        "proxy-authorization",
    ] {
        assert!(
            hdr(&headers, gone).is_none(),
            "{gone} forwarded: {headers:?}"
        );
    }
    assert_eq!(hdr(&headers, "x-keep"), Some("yes"), "{headers:?}");
    assert_eq!(hdr(&headers, "host"), Some(host.as_str()), "{headers:?}");

    write!(
        s,
        "POST http://{host}/echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 11\r\n\
         Connection: close\r\n\r\nhello world"
    )
    .unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 200, "{}", describe(&resp));
    let (doc, _) = echo_headers(&resp);
    assert_eq!(doc["method"], "POST");
    assert_eq!(doc["body"], "hello world");

    // curl.
    if !have("curl", &["--version"]) {
        return;
    }
    let out = run_command(
        client_command("curl")
            .args(["-sS", "--fail", "-x", &env.proxy.url()])
            .args(["-H", "Proxy-Connection: keep-alive"])
            .args(["-H", "X-Keep: curl"])
            .arg(format!("http://{host}/echo")),
        None,
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let resp = Response {
        status: 200,
        reason: String::new(),
        headers: Vec::new(),
        body: out.stdout.clone(),
    };
    let (doc, headers) = echo_headers(&resp);
    assert_eq!(doc["path"], "/echo");
    assert!(hdr(&headers, "via").is_some(), "no Via: {headers:?}");
    assert!(hdr(&headers, "proxy-connection").is_none(), "{headers:?}");
    assert_eq!(hdr(&headers, "x-keep"), Some("curl"), "{headers:?}");
}

#[test]
fn python_requests_and_urllib_through_https_proxy() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    if !require(
        tool_works("python3", &["-c", "import requests"]),
        "python3 requests not importable",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://allowed.test:{}/blob", env.up.https_port());
    let denied = format!("https://other.test:{}/", env.up.https_port());
    let script = r#"
import ssl, sys, urllib.request
import requests
url, denied, ca, out1, out2 = sys.argv[1:6]
r = requests.get(url, timeout=60)
r.raise_for_status()
open(out1, "wb").write(r.content)
ctx = ssl.create_default_context(cafile=ca)
with urllib.request.urlopen(url, context=ctx, timeout=60) as resp:
    open(out2, "wb").write(resp.read())
try:
    requests.get(denied, timeout=60)
    print("requests-denied: no error")
except requests.exceptions.ProxyError as e:
    print("requests-denied:", e)
try:
    urllib.request.urlopen(denied, context=ctx, timeout=60)
    print("urllib-denied: no error")
except OSError as e:
    print("urllib-denied:", e)
"#;
    let out1 = dir.path().join("requests.bin");
    let out2 = dir.path().join("urllib.bin");
    let out = run_command(
        client_command("python3")
            .env("HTTPS_PROXY", env.proxy.url())
            .env("REQUESTS_CA_BUNDLE", env.ca.ca_path())
            .args(["-c", script, &url, &denied])
            .arg(env.ca.ca_path())
            .arg(&out1)
            .arg(&out2),
        None,
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert_same_bytes(&std::fs::read(&out1).unwrap(), env.up.blob(), "requests");
    assert_same_bytes(&std::fs::read(&out2).unwrap(), env.up.blob(), "urllib");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for client in ["requests-denied:", "urllib-denied:"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(client))
            .unwrap_or_else(|| panic!("no {client} line: {stdout}"));
        assert!(line.contains("403"), "{line}");
    }
}

#[test]
fn pip_download_through_proxy_is_byte_exact() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    if !have("python3", &["-m", "pip", "--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let index = format!("https://pypi.test:{}/simple/", env.up.https_port());
    let out = run_command(
        client_command("python3")
            .env("PIP_CONFIG_FILE", "/dev/null")
            .env("PIP_NO_INPUT", "1")
            .env("HOME", dir.path())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--no-cache-dir",
                "--index-url",
                &index,
                "--proxy",
                &env.proxy.url(),
                "--cert",
            ])
            .arg(env.ca.ca_path())
            .arg("-d")
            .arg(dir.path().join("dl"))
            .arg("tinypkg"),
        None,
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let got = std::fs::read(dir.path().join("dl").join(WHEEL))
        .unwrap_or_else(|e| panic!("no {WHEEL} downloaded ({e}): {}", output_text(&out)));
    assert_same_bytes(&got, &std::fs::read(env.up.wheel_path()).unwrap(), "wheel");
    let paths = env.up.request_paths();
    assert!(
        paths.iter().any(|p| p == "/simple/tinypkg/"),
        "index not fetched: {paths:?}"
    );
}

#[test]
fn git_clone_through_proxy_gets_the_commit() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    if !have("git", &["--version"]) || !require(have_http_backend(), "git http-backend not found") {
        return;
    }
    let head = env.up.create_git_repo("repo");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("clone");
    let url = format!("https://git.test:{}/repo.git", env.up.https_port());
    let git = |args: &[&str]| {
        let mut cmd = client_command("git");
        cmd.env("HOME", dir.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .args(args);
        run_command(&mut cmd, None, CLIENT_TIMEOUT)
    };
    let proxy_cfg = format!("http.proxy={}", env.proxy.url());
    let ca_cfg = format!("http.sslCAInfo={}", env.ca.ca_path().display());
    let out = git(&[
        "-c",
        &proxy_cfg,
        "-c",
        &ca_cfg,
        "clone",
        "-q",
        &url,
        dest.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "git clone: {}", output_text(&out));
    let out = git(&["-C", dest.to_str().unwrap(), "rev-parse", "HEAD"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), head);
    assert_same_bytes(
        &std::fs::read(dest.join("blob.bin")).unwrap(),
        &env.up.blob()[..64 * 1024],
        "cloned blob.bin",
    );
}

#[test]
fn openssl_s_client_through_proxy() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    if !have("openssl", &["version"]) {
        return;
    }
    let hp = env.up.https_port();
    let s_client = |host: &str| {
        let connect_to = format!("{host}:{hp}");
        let request =
            format!("GET /hello.txt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        run_command(
            client_command("openssl")
                .args(["s_client", "-proxy", &env.proxy.addr().to_string()])
                .args(["-connect", &connect_to, "-servername", host])
                .arg("-CAfile")
                .arg(env.ca.ca_path())
                .args(["-verify_return_error", "-ign_eof"]),
            Some(request.as_bytes()),
            CLIENT_TIMEOUT,
        )
    };
    let out = s_client("allowed.test");
    assert!(out.status.success(), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "{}",
        output_text(&out)
    );
    assert!(stdout.contains("HTTP/1.1 200"), "{}", output_text(&out));
    assert!(
        stdout.contains(std::str::from_utf8(HELLO).unwrap()),
        "{}",
        output_text(&out)
    );

    let out = s_client("other.test");
    assert!(!out.status.success(), "{}", output_text(&out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("403"), "proxy refusal not reported: {all}");
    assert!(!all.contains("hello from"), "{all}");
}

// ---------------------------------------------------------------------------
// Security properties

#[test]
fn ssrf_destinations_are_refused_by_address() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let hp = env.up.https_port();
    let proxy = env.proxy.addr();
    // Loopback first: if the guard fails here it connects to 127.0.0.1, which
    // stays on this machine. Only then try names that resolve off-host, so a
    // broken guard never sends a packet to 10.x or 169.254.x.
    let mut failures = Vec::new();
    let mut check = |authority: &str, needs_no_proxy: bool| -> bool {
        let resp = connect_refusal(proxy, authority);
        let mut ok = true;
        if resp.status != 403
            || proxy_status_error(&resp).as_deref() != Some("destination_ip_prohibited")
        {
            failures.push(format!(
                "CONNECT {authority}: want 403 destination_ip_prohibited, got {}",
                describe(&resp)
            ));
            ok = false;
        }
        let prefix = format!("portcullis: denied CONNECT {authority} — ");
        if !resp.text().starts_with(&prefix) {
            failures.push(format!(
                "CONNECT {authority}: body should start {prefix:?}, got {:?}",
                resp.text()
            ));
        }
        if needs_no_proxy && !resp.text().contains("NO_PROXY") {
            failures.push(format!(
                "CONNECT {authority}: body should mention NO_PROXY: {:?}",
                resp.text()
            ));
        }
        ok
    };
    let mut local_guard_holds = true;
    for authority in [
        format!("ssrf.test:{hp}"),
        format!("[::1]:{hp}"),
        format!("[::ffff:127.0.0.1]:{hp}"),
        format!("127.0.0.1:{hp}"),
    ] {
        local_guard_holds &= check(&authority, false);
    }
    if local_guard_holds {
        check(&format!("private.test:{hp}"), false);
        check(&format!("metadata.test:{hp}"), true);
        check("169.254.169.254:80", true);
        check("168.63.129.16:80", true);
    } else {
        failures.push(
            "loopback guard failed: off-host cases (10.x, 169.254.x) not tried, \
             to send nothing off this machine"
                .to_string(),
        );
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    // A literal that an address rule names is allowed.
    let (s, head) = connect_via(proxy, &format!("127.0.0.2:{}", env.up.http_port()));
    assert_eq!(head.status, 200, "{head:?}");
    let resp = get_through(s, "127.0.0.2", "/hello.txt");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, HELLO);
    // Nothing reached the upstream but that one request.
    assert_eq!(env.up.wait_request_paths(1), vec!["/hello.txt".to_string()]);
}

#[test]
fn domain_fronting_sni_mismatch_cuts_the_tunnel() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let authority = format!("allowed.test:{}", env.up.https_port());

    let (s, head) = connect_via(env.proxy.addr(), &authority);
    assert_eq!(head.status, 200, "{head:?}");
    match tls_get(&env.ca, s, "other.test", "/hello.txt") {
        Ok(resp) => panic!("fronted request went through: {}", describe(&resp)),
        Err(e) => assert!(!is_timeout(&e), "tunnel not cut, client timed out: {e}"),
    }
    let mismatches = env.proxy.wait_metric(
        "portcullis_tls_name_mismatch_total",
        &[("kind", "connect_sni")],
        METRIC_TIMEOUT,
        |v| v == 1.0,
    );
    assert_eq!(mismatches, 1.0, "{}", env.proxy.metrics_text());

    // Control: the matching name works through the same proxy.
    let (s, head) = connect_via(env.proxy.addr(), &authority);
    assert_eq!(head.status, 200);
    let resp = tls_get(&env.ca, s, "allowed.test", "/hello.txt").expect("matching SNI");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, HELLO);

    // Once every upstream connection has ended, none saw the fronted hello.
    let settled = env.up.log().wait(METRIC_TIMEOUT, |lines| {
        let accepts = lines
            .iter()
            .filter(|l| l.starts_with("https accept"))
            .count();
        let ends = lines.iter().filter(|l| l.starts_with("https end")).count();
        accepts == ends
    });
    let log = env.up.log().snapshot();
    assert!(settled, "upstream connections still open: {log:?}");
    assert!(
        !log.iter().any(|l| l.contains("name=other.test")),
        "upstream received the fronted ClientHello: {log:?}"
    );
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("https handshake") && l.ends_with(" ok"))
            .count(),
        1,
        "{log:?}"
    );
    assert_eq!(
        env.proxy.metric(
            "portcullis_tls_name_mismatch_total",
            &[("kind", "connect_sni")]
        ),
        1.0
    );
}

#[test]
fn sni_check_off_lets_a_mismatched_hello_through() {
    // The harness sees a fronted hello when one gets through: with the check
    // disabled, the upstream logs SNI other.test and the request succeeds.
    let Some(env) = setup(Opts {
        policy: vec!["require_matching_sni = false"],
        ..Opts::default()
    }) else {
        return;
    };
    let (s, head) = connect_via(
        env.proxy.addr(),
        &format!("allowed.test:{}", env.up.https_port()),
    );
    assert_eq!(head.status, 200, "{head:?}");
    let resp = tls_get(&env.ca, s, "other.test", "/hello.txt").expect("fronted request");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, HELLO);
    assert!(
        env.up
            .log()
            .wait_line(METRIC_TIMEOUT, |l| l.contains("name=other.test"))
            .is_some()
    );
    assert_eq!(
        env.proxy.metric(
            "portcullis_tls_name_mismatch_total",
            &[("kind", "connect_sni")]
        ),
        0.0
    );
}

#[test]
fn host_header_must_match_the_absolute_uri() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let hp = env.up.http_port();
    let resp = exchange(
        env.proxy.addr(),
        format!(
            "GET http://allowed.test:{hp}/echo HTTP/1.1\r\nHost: other.test:{hp}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(resp.status, 403, "{}", describe(&resp));
    // Control: matching Host passes.
    let resp = exchange(
        env.proxy.addr(),
        format!(
            "GET http://allowed.test:{hp}/hello.txt HTTP/1.1\r\nHost: allowed.test:{hp}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(resp.status, 200, "{}", describe(&resp));
    assert_eq!(resp.body, HELLO);
    assert_eq!(env.up.wait_request_paths(1), vec!["/hello.txt".to_string()]);
}

#[test]
fn origin_form_request_to_the_proxy_is_400_with_usage() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let resp = exchange(
        env.proxy.addr(),
        format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            env.proxy.addr()
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(resp.status, 400, "{}", describe(&resp));
    let body = resp.text().to_ascii_lowercase();
    assert!(body.contains("proxy"), "no usage hint: {}", resp.text());
    assert!(env.up.request_paths().is_empty());
}

#[test]
fn client_outside_allow_list_is_refused() {
    let Some(env) = setup(Opts {
        clients: Some("\"10.9.9.0/24\""),
        ..Opts::default()
    }) else {
        return;
    };
    let authority = format!("allowed.test:{}", env.up.http_port());
    let mut s = connect(env.proxy.addr()).unwrap();
    // The proxy may answer and close before reading the request: a failed
    // write is fine as long as the 403 can be read.
    let _ = write!(
        s,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    );
    match read_response(&mut s) {
        Ok(resp) => assert_eq!(resp.status, 403, "{}", describe(&resp)),
        Err(e) => panic!("expected a 403 for a client outside [clients] allow: {e}"),
    }
    let accepts = env
        .up
        .log()
        .snapshot()
        .into_iter()
        .filter(|l| l.contains(" accept "))
        .count();
    assert_eq!(accepts, 0, "upstream contacted");
}

#[test]
fn audit_mode_lets_denials_through_and_counts_them() {
    let Some(env) = setup(Opts {
        mode: Some("audit"),
        ..Opts::default()
    }) else {
        return;
    };
    let (s, head) = connect_via(
        env.proxy.addr(),
        &format!("other.test:{}", env.up.http_port()),
    );
    assert_eq!(head.status, 200, "{head:?}");
    let resp = get_through(s, "other.test", "/hello.txt");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, HELLO);
    let audited = env.proxy.wait_metric(
        "portcullis_decisions_total",
        &[("action", "audit_deny")],
        METRIC_TIMEOUT,
        |v| v == 1.0,
    );
    assert_eq!(audited, 1.0, "{}", env.proxy.metrics_text());
    assert_eq!(
        env.proxy
            .metric("portcullis_decisions_total", &[("action", "deny")]),
        0.0
    );
    // Audit mode never opens the guarded ranges: loopback stays refused.
    let admin_port = env.proxy.admin_addr().port();
    for dest in [
        format!("127.0.0.1:{admin_port}"),
        "ssrf.test:80".to_string(),
    ] {
        let (_s, head) = connect_via(env.proxy.addr(), &dest);
        assert_eq!(head.status, 403, "{dest}: {head:?}");
    }
}

#[test]
fn upstream_connection_refused_is_502() {
    if !have_python() {
        return;
    }
    // A port on 127.0.0.2 that nothing listens on.
    let closed = TcpListener::bind((UPSTREAM_IP, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(env) = setup(Opts {
        extra_ports: vec![closed],
        ..Opts::default()
    }) else {
        return;
    };
    let resp = connect_refusal(env.proxy.addr(), &format!("allowed.test:{closed}"));
    assert_refused(&resp, 502, "connection_refused", "CONNECT closed port");
    let errors = env.proxy.wait_metric(
        "portcullis_upstream_errors_total",
        &[("error", "connection_refused")],
        METRIC_TIMEOUT,
        |v| v == 1.0,
    );
    assert_eq!(errors, 1.0, "{}", env.proxy.metrics_text());
}

#[test]
fn admin_health_endpoints() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    for path in ["/healthz", "/readyz"] {
        let resp = support::http_get(env.proxy.admin_addr(), path).unwrap();
        assert_eq!(resp.status, 200, "{path}: {}", describe(&resp));
    }
    let resp = support::http_get(env.proxy.admin_addr(), "/metrics").unwrap();
    assert_eq!(resp.status, 200);
    assert!(
        resp.text().contains("portcullis_"),
        "no portcullis_ metrics: {}",
        resp.text()
    );
}

#[test]
fn sighup_reload_changes_the_policy() {
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let authority = format!("other.test:{}", env.up.http_port());
    let resp = connect_refusal(env.proxy.addr(), &authority);
    assert_eq!(resp.status, 403, "{}", describe(&resp));

    env.proxy.reload(&config(
        &env.up,
        &Opts {
            extra_hosts: vec!["other.test"],
            ..Opts::default()
        },
    ));
    let mut last = None;
    let reloaded = wait_until(METRIC_TIMEOUT, || {
        let (s, head) = connect_via(env.proxy.addr(), &authority);
        let ok = head.status == 200;
        if ok {
            last = Some(get_through(s, "other.test", "/hello.txt"));
        }
        ok
    });
    assert!(reloaded, "other.test still denied after SIGHUP reload");
    let resp = last.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, HELLO);
    // The reload says what changed, as `portcullis diff` would.
    let line = env
        .proxy
        .stderr()
        .wait_line(METRIC_TIMEOUT, |l| l.contains("config reloaded"));
    let line = line.expect("a 'config reloaded' line");
    assert!(line.contains("1 changed ("), "{line}");
    assert!(
        line.contains("none → none"),
        "service tags before and after: {line}"
    );
    let change = env
        .proxy
        .stderr()
        .wait_line(METRIC_TIMEOUT, |l| l.contains("rule changed by reload"));
    let change = change.expect("a 'rule changed by reload' line");
    assert!(change.contains("hosts +other.test"), "{change}");
    let mut proxy = env.proxy;
    assert!(proxy.is_running());
}

// ---------------------------------------------------------------------------
// Hostile and broken clients

/// Reads a response and then expects the proxy to close (EOF or reset, not a timeout).
fn expect_status_then_close(
    proxy: SocketAddr,
    what: &str,
    request: &[u8],
    statuses: &[u16],
    failures: &mut Vec<String>,
) {
    let mut s = match connect(proxy) {
        Ok(s) => s,
        Err(e) => return failures.push(format!("{what}: connect: {e}")),
    };
    let _ = s.write_all(request);
    match read_response(&mut s) {
        Ok(resp) if statuses.contains(&resp.status) => {
            if let Err((_, e)) = read_until_closed(&mut s)
                && is_timeout(&e)
            {
                failures.push(format!(
                    "{what}: got {} but the connection stayed open",
                    resp.status
                ));
            }
        }
        Ok(resp) => failures.push(format!(
            "{what}: expected one of {statuses:?}, got {}",
            describe(&resp)
        )),
        Err(e) => failures.push(format!("{what}: expected {statuses:?}, got error {e}")),
    }
}

#[test]
fn hostile_input_is_refused_and_connections_drain() {
    let Some(env) = setup(Opts {
        limits: vec![("head_timeout_ms", 500)],
        ..Opts::default()
    }) else {
        return;
    };
    let proxy = env.proxy.addr();
    let hp = env.up.http_port();
    let mut failures = Vec::new();

    expect_status_then_close(
        proxy,
        "malformed request line",
        b"GARBAGE\r\n\r\n",
        &[400],
        &mut failures,
    );
    expect_status_then_close(
        proxy,
        "CONNECT without port",
        b"CONNECT allowed.test HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        &[400],
        &mut failures,
    );
    expect_status_then_close(
        proxy,
        "CONNECT port 0",
        b"CONNECT allowed.test:0 HTTP/1.1\r\nHost: allowed.test:0\r\n\r\n",
        &[400, 403],
        &mut failures,
    );
    expect_status_then_close(
        proxy,
        "CONNECT port 65536",
        b"CONNECT allowed.test:65536 HTTP/1.1\r\nHost: allowed.test:65536\r\n\r\n",
        &[400],
        &mut failures,
    );
    expect_status_then_close(
        proxy,
        "CONNECT with userinfo",
        b"CONNECT user:pw@allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n",
        &[400],
        &mut failures,
    );
    match exchange(
        proxy,
        b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n",
    ) {
        Ok(resp)
            if resp.status == 403
                && proxy_status_error(&resp).as_deref() == Some("destination_ip_prohibited") => {}
        Ok(resp) => failures.push(format!("CONNECT [::1]:443: {}", describe(&resp))),
        Err(e) => failures.push(format!("CONNECT [::1]:443: {e}")),
    }

    // A head over 64 KiB: 431 (or 400) and close; a reset before the answer
    // could be read still proves the proxy did not wait for the rest.
    {
        let mut head =
            format!("GET http://allowed.test:{hp}/echo HTTP/1.1\r\nHost: allowed.test:{hp}\r\n");
        let pad = "x".repeat(1000);
        for i in 0..70 {
            head.push_str(&format!("X-Pad-{i}: {pad}\r\n"));
        }
        head.push_str("\r\n");
        let mut s = connect(proxy).unwrap();
        let _ = s.write_all(head.as_bytes());
        match read_response(&mut s) {
            Ok(resp) if resp.status == 431 || resp.status == 400 => {
                if let Err((_, e)) = read_until_closed(&mut s)
                    && is_timeout(&e)
                {
                    failures.push("oversized head: answered but not closed".into());
                }
            }
            Ok(resp) => failures.push(format!("oversized head: {}", describe(&resp))),
            Err(e) if is_timeout(&e) => failures.push(format!("oversized head: no answer ({e})")),
            Err(_) => {}
        }
    }

    // Slowloris: part of a head, then silence; head_timeout_ms = 500.
    for (what, partial) in [
        (
            "partial head",
            &b"GET http://allowed.test/ HTTP/1.1\r\nHost: al"[..],
        ),
        ("no bytes at all", &b""[..]),
    ] {
        let mut s = connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(partial).unwrap();
        if let Err((_, e)) = read_until_closed(&mut s)
            && is_timeout(&e)
        {
            failures.push(format!("slowloris ({what}): still open after 5 s"));
        }
    }

    // Request smuggling: Content-Length and chunked together, and two
    // different Content-Lengths. The upstream must never see `/smuggled`.
    let smuggles = [
        (
            "CL+TE",
            format!(
                "POST http://allowed.test:{hp}/echo HTTP/1.1\r\nHost: allowed.test:{hp}\r\n\
                 Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                 0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: allowed.test:{hp}\r\n\r\n"
            ),
        ),
        (
            "TE+CL",
            format!(
                "POST http://allowed.test:{hp}/echo HTTP/1.1\r\nHost: allowed.test:{hp}\r\n\
                 Transfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n\
                 0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: allowed.test:{hp}\r\n\r\n"
            ),
        ),
        (
            "CL+CL",
            format!(
                "POST http://allowed.test:{hp}/echo HTTP/1.1\r\nHost: allowed.test:{hp}\r\n\
                 Content-Length: 4\r\nContent-Length: 54\r\n\r\n\
                 abcdGET /smuggled HTTP/1.1\r\nHost: allowed.test:{hp}\r\n\r\n"
            ),
        ),
    ];
    for (i, (what, request)) in smuggles.iter().enumerate() {
        let mut s = connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(request.as_bytes());
        let _ = s.shutdown(Shutdown::Write);
        let _ = read_until_closed(&mut s);
        // A marker request afterwards: once the upstream logged it, anything
        // smuggled on the earlier connection would have been logged too.
        let marker = format!("/hello.txt?after={i}");
        match exchange(
            proxy,
            format!(
                "GET http://allowed.test:{hp}{marker} HTTP/1.1\r\nHost: allowed.test:{hp}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        ) {
            Ok(resp) if resp.status == 200 => {}
            Ok(resp) => failures.push(format!("{what}: marker request got {}", describe(&resp))),
            Err(e) => failures.push(format!("{what}: marker request failed: {e}")),
        }
        if env
            .up
            .log()
            .wait_line(METRIC_TIMEOUT, |l| l.ends_with(&format!("path={marker}")))
            .is_none()
        {
            failures.push(format!("{what}: marker never reached the upstream"));
        }
    }
    let paths = env.up.request_paths();
    if paths.iter().any(|p| p.contains("smuggled")) {
        failures.push(format!("smuggled request reached the upstream: {paths:?}"));
    }
    let posts = paths.iter().filter(|p| p.as_str() == "/echo").count();
    if posts > smuggles.len() {
        failures.push(format!("more upstream requests than sent: {paths:?}"));
    }

    // A tunnel counts as active while open.
    {
        let (s, head) = connect_via(proxy, &format!("allowed.test:{hp}"));
        if head.status != 200 {
            failures.push(format!("CONNECT for active count: {head:?}"));
        }
        let active = env.proxy.wait_metric(
            "portcullis_connections_active",
            &[("listener", "proxy")],
            METRIC_TIMEOUT,
            |v| v >= 1.0,
        );
        if active < 1.0 {
            failures.push(format!("connections_active with an open tunnel: {active}"));
        }
        drop(s);
    }

    // Client resets mid-tunnel.
    {
        let (mut s, head) = connect_via(proxy, &format!("allowed.test:{hp}"));
        if head.status != 200 {
            failures.push(format!("CONNECT before client reset: {head:?}"));
        }
        s.write_all(b"GET /hello.txt HTTP/1.1\r\nHo").unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    }

    // Upstream resets mid-tunnel: the client must see the tunnel end.
    {
        let (mut s, head) = connect_via(proxy, &format!("allowed.test:{hp}"));
        if head.status != 200 {
            failures.push(format!("CONNECT before upstream reset: {head:?}"));
        }
        s.write_all(format!("GET /reset HTTP/1.1\r\nHost: allowed.test:{hp}\r\n\r\n").as_bytes())
            .unwrap();
        if env
            .up
            .log()
            .wait_line(METRIC_TIMEOUT, |l| l.starts_with("reset id="))
            .is_none()
        {
            failures.push("upstream never got /reset".into());
        }
        if let Err((_, e)) = read_until_closed(&mut s)
            && is_timeout(&e)
        {
            failures.push("upstream reset: client tunnel stayed open".into());
        }
    }

    let active = env.proxy.wait_metric(
        "portcullis_connections_active",
        &[("listener", "proxy")],
        METRIC_TIMEOUT,
        |v| v == 0.0,
    );
    if active != 0.0 {
        failures.push(format!(
            "connections_active{{listener=\"proxy\"}} = {active} after every client left"
        ));
    }
    let mut proxy_process = env.proxy;
    if !proxy_process.is_running() {
        failures.push(format!("proxy died: {:?}", proxy_process.stderr_lines()));
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Lifecycle

#[test]
fn sigterm_drains_open_tunnels_then_exits_zero() {
    let Some(env) = setup(Opts {
        limits: vec![("grace_period_ms", 30_000)],
        ..Opts::default()
    }) else {
        return;
    };
    if !have("curl", &["--version"]) {
        return;
    }
    let Env { mut proxy, up, ca } = env;
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("slow.bin");
    let mut curl = client_command("curl");
    curl.args(["-sS", "--fail", "--max-time", "120", "--cacert"])
        .arg(ca.ca_path())
        .args(["-x", &proxy.url(), "-o"])
        .arg(&out_path)
        .arg(format!("https://allowed.test:{}/slow", up.https_port()));
    let curl_thread = std::thread::spawn(move || run_command(&mut curl, None, CLIENT_TIMEOUT));

    assert!(
        up.log()
            .wait_line(Duration::from_secs(60), |l| l.starts_with("slow waiting"))
            .is_some(),
        "the /slow download never started: {:?}",
        up.log().snapshot()
    );
    let admin = proxy.admin_addr();
    let addr = proxy.addr();
    proxy.terminate();

    // New connections are refused once the proxy stops accepting.
    let refused = wait_until(METRIC_TIMEOUT, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
    });
    assert!(refused, "proxy still accepts connections after SIGTERM");
    let readyz = support::http_get(admin, "/readyz");
    assert!(
        matches!(&readyz, Ok(r) if r.status == 503),
        "/readyz while draining: {readyz:?}"
    );
    assert!(proxy.is_running(), "proxy exited before the tunnel drained");

    up.release_slow();
    let out = curl_thread.join().unwrap();
    assert!(out.status.success(), "curl: {}", output_text(&out));
    assert_same_bytes(&std::fs::read(&out_path).unwrap(), up.blob(), "/slow");

    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .expect("proxy did not exit after its tunnel closed");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn tunnel_carries_a_1mib_upload_unchanged() {
    // A tunnel carries bytes both ways unchanged: 1 MiB up, echoed back.
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let hp = env.up.http_port();
    let (mut s, head) = connect_via(env.proxy.addr(), &format!("allowed.test:{hp}"));
    assert_eq!(head.status, 200);
    let body = env.up.blob().to_vec();
    write!(
        s,
        "POST /echo HTTP/1.1\r\nHost: allowed.test:{hp}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || w.write_all(&body))
    };
    let resp = read_response(&mut s).unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(resp.status, 200);
    let (doc, _) = echo_headers(&resp);
    let echoed: Vec<u8> = doc["body"]
        .as_str()
        .unwrap()
        .chars()
        .map(|c| c as u32 as u8)
        .collect();
    assert_same_bytes(&echoed, env.up.blob(), "uploaded body");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "bytes after the response: {}", rest.len());
}

#[test]
fn connect_in_pieces_or_after_a_request_takes_the_general_path() {
    // Whole CONNECT heads are served without hyper; these two shapes are
    // not, and must tunnel all the same: a head split across two writes
    // (the pause makes the proxy see the first part alone), and a CONNECT on
    // a connection that already carried a forwarded request (always hyper's).
    let Some(env) = setup(Opts::default()) else {
        return;
    };
    let proxy = env.proxy.addr();
    let hp = env.up.http_port();
    let host = format!("allowed.test:{hp}");

    let mut s = connect(proxy).unwrap();
    s.set_nodelay(true).unwrap();
    write!(s, "CONNECT {host} HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    write!(s, "st: {host}\r\n\r\n").unwrap();
    let head = read_head(&mut s).unwrap();
    assert_eq!(head.status, 200, "split CONNECT head: {head:?}");
    let resp = get_through(s, &host, "/hello.txt");
    assert_eq!((resp.status, resp.body.as_slice()), (200, HELLO));

    let mut s = connect(proxy).unwrap();
    write!(
        s,
        "GET http://{host}/hello.txt HTTP/1.1\r\nHost: {host}\r\n\r\n"
    )
    .unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!((resp.status, resp.body.as_slice()), (200, HELLO));
    write!(s, "CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let head = read_head(&mut s).unwrap();
    assert_eq!(head.status, 200, "CONNECT after a request: {head:?}");
    let resp = get_through(s, &host, "/hello.txt");
    assert_eq!((resp.status, resp.body.as_slice()), (200, HELLO));
}

/// A one-shot WebSocket-style server on 127.0.0.2: answers the upgrade with
/// 101, then echoes every byte until the peer closes. Returns its port.
fn upgrade_echo_server() -> (u16, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind((UPSTREAM_IP, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => s.write_all(&buf[..n]).unwrap(),
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    });
    (port, handle)
}

#[test]
fn websocket_upgrade_is_passed_through_on_allowed_hosts() {
    if !have_python() {
        return;
    }
    let (ws_port, server) = upgrade_echo_server();
    let Some(env) = setup(Opts {
        extra_ports: vec![ws_port],
        ..Opts::default()
    }) else {
        return;
    };
    let mut s = connect(env.proxy.addr()).unwrap();
    write!(
        s,
        "GET http://allowed.test:{ws_port}/ws HTTP/1.1\r\nHost: allowed.test:{ws_port}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nProxy-Connection: keep-alive\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s).unwrap();
    assert_eq!(head.status, 101, "{head:?}");
    s.write_all(b"frame-bytes-\x00\x01\x02").unwrap();
    let mut got = [0u8; 15];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"frame-bytes-\x00\x01\x02");
    s.shutdown(Shutdown::Both).unwrap();
    let seen = server.join().unwrap().to_ascii_lowercase();
    assert!(
        seen.starts_with("get /ws http/1.1"),
        "origin-form upstream: {seen}"
    );
    assert!(seen.contains("upgrade: websocket"), "{seen}");
    assert!(seen.contains("connection: upgrade"), "{seen}");
    assert!(seen.contains("via: 1.1 portcullis"), "{seen}");
    assert!(!seen.contains("proxy-connection"), "{seen}");
}

#[test]
fn per_client_connection_cap_answers_503() {
    let Some(env) = setup(Opts {
        limits: vec![("max_connections_per_client", 2)],
        ..Opts::default()
    }) else {
        return;
    };
    let held: Vec<TcpStream> = (0..2).map(|_| connect(env.proxy.addr()).unwrap()).collect();
    let active = env.proxy.wait_metric(
        "portcullis_connections_active",
        &[("listener", "proxy")],
        METRIC_TIMEOUT,
        |v| v == 2.0,
    );
    assert_eq!(active, 2.0);
    let mut third = connect(env.proxy.addr()).unwrap();
    let resp = read_response(&mut third).unwrap();
    assert_eq!(resp.status, 503, "{}", describe(&resp));
    assert!(
        resp.text().contains("connection limit"),
        "{}",
        describe(&resp)
    );
    assert_eq!(
        env.proxy.metric(
            "portcullis_connections_rejected_total",
            &[("listener", "proxy"), ("reason", "limit")]
        ),
        1.0
    );
    drop(held);
    let active = env.proxy.wait_metric(
        "portcullis_connections_active",
        &[("listener", "proxy")],
        METRIC_TIMEOUT,
        |v| v == 0.0,
    );
    assert_eq!(active, 0.0);
    // Slots are released: a new connection is served again.
    let (_s, head) = connect_via(
        env.proxy.addr(),
        &format!("allowed.test:{}", env.up.http_port()),
    );
    assert_eq!(head.status, 200);
}

// ---------------------------------------------------------------------------
// learn and diff on a real gateway's access log

fn portcullis(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis")
}

#[test]
fn learn_on_a_day_of_audit_traffic_allows_exactly_that_traffic() {
    let opts = Opts {
        mode: Some("audit"),
        ..Opts::default()
    };
    let Some(env) = setup(opts) else {
        return;
    };
    let port = env.up.http_port();
    // Audit mode lets other.test through (twice) and logs it as audit_deny;
    // allowed.test passes by its rule.
    for host in ["other.test", "other.test", "allowed.test"] {
        let (s, head) = connect_via(env.proxy.addr(), &format!("{host}:{port}"));
        assert_eq!(head.status, 200, "{host} in audit mode");
        assert_eq!(get_through(s, host, "/hello.txt").status, 200);
    }
    let access = |l: &str| l.contains("\"target\":\"portcullis::access\"");
    assert!(
        env.proxy.stderr().wait(METRIC_TIMEOUT, |lines| lines
            .iter()
            .filter(|l| access(l))
            .count()
            >= 3),
        "three access lines: {:?}",
        env.proxy.stderr_lines()
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    std::fs::write(&log, env.proxy.stderr_lines().join("\n")).unwrap();
    let audit_config = config(
        &env.up,
        &Opts {
            mode: Some("audit"),
            ..Opts::default()
        },
    );
    let old = dir.path().join("old.toml");
    std::fs::write(&old, &audit_config).unwrap();
    let (old_s, log_s) = (old.to_str().unwrap(), log.to_str().unwrap());

    let learned = portcullis(&["learn", "--against", old_s, log_s]);
    assert!(learned.status.success(), "{}", output_text(&learned));
    let rules = String::from_utf8(learned.stdout).unwrap();
    assert!(
        rules.contains("\"other.test\", # 2 connection(s)"),
        "{rules}"
    );
    assert!(
        !rules.contains("\"allowed.test\""),
        "already allowed: {rules}"
    );

    // The config, enforcing, plus what was learned: valid, and it allows
    // that day's traffic and nothing new.
    let new = dir.path().join("new.toml");
    let enforcing = audit_config.replace("mode = \"audit\"", "mode = \"enforce\"");
    std::fs::write(&new, format!("{enforcing}\n{rules}")).unwrap();
    let new_s = new.to_str().unwrap();
    let check = portcullis(&["check", "-c", new_s]);
    assert!(check.status.success(), "{}", output_text(&check));
    for (dest, verdict) in [
        (format!("other.test:{port}"), "allow"),
        (format!("allowed.test:{port}"), "allow"),
        (format!("unseen.test:{port}"), "deny"),
        (format!("other.test:{}", port ^ 1), "deny"),
    ] {
        let out = portcullis(&["explain", "-c", new_s, &dest]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!(" {verdict} ")), "{dest}: {text}");
    }

    // diff says what the change does, to the rules and to that traffic.
    let diff = portcullis(&["diff", old_s, new_s, "--log", log_s]);
    let text = String::from_utf8_lossy(&diff.stdout);
    assert_eq!(diff.status.code(), Some(1), "{}", output_text(&diff));
    assert!(text.contains(&format!("+ rule learned-{port}")), "{text}");
    assert!(
        text.contains(&format!(
            "other.test:{port}: audit_deny (no_rule) → allow (rule learned-{port}) (2 hits)"
        )),
        "{text}"
    );
    assert!(
        !text.contains("allowed.test"),
        "its verdict does not change: {text}"
    );
    let same = portcullis(&["diff", new_s, new_s, "--log", log_s]);
    assert_eq!(same.status.code(), Some(0), "{}", output_text(&same));
}

/// A gateway without a service tags file cannot know a tag's addresses: a
/// CONNECT to an address only a service-tag rule could allow is refused,
/// and the 403, the access line and the metric give the reason `explain`
/// gives (`needs_service_tags`); the startup log lists the waiting rules in
/// one warning. Nothing is dialled (the address is refused first).
#[test]
fn a_rule_waiting_for_service_tags_denies_with_the_reason_explain_gives() {
    let proxy = Proxy::start(
        r#"[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
[clients]
allow = ["127.0.0.0/8"]
[policy]
profile = "none"
[[rule]]
name = "aml"
service_tags = ["AzureMachineLearning"]
"#,
    );
    let resp = connect_refusal(proxy.addr(), "20.37.64.10:443");
    assert_refused(&resp, 403, "destination_ip_prohibited", "waiting tag rule");
    let ps = resp.header("proxy-status").unwrap_or_default();
    assert!(ps.contains("needs_service_tags"), "{}", describe(&resp));
    let labels = [("action", "deny"), ("reason", "needs_service_tags")];
    let n = proxy.wait_metric("portcullis_decisions_total", &labels, METRIC_TIMEOUT, |v| {
        v == 1.0
    });
    assert_eq!(n, 1.0, "{}", proxy.metrics_text());
    let logged = |pred: &dyn Fn(&str) -> bool| {
        let lines = [proxy.stdout_lines(), proxy.stderr_lines()].concat();
        lines.into_iter().filter(|l| pred(l)).count()
    };
    let access = |l: &str| {
        l.contains("portcullis::access")
            && l.contains("\"host\":\"20.37.64.10\"")
            && l.contains("\"reason\":\"needs_service_tags\"")
    };
    assert!(
        support::process::wait_until(METRIC_TIMEOUT, || logged(&access) == 1),
        "{:?}",
        [proxy.stdout_lines(), proxy.stderr_lines()].concat()
    );
    assert_eq!(logged(&|l| l.contains("cannot be enforced yet")), 1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["-c", &proxy.dir().join("portcullis.toml").to_string_lossy()])
        .args(["explain", "20.37.64.10:443"])
        .output()
        .expect("explain runs");
    let explained = String::from_utf8_lossy(&out.stdout);
    assert!(
        explained.starts_with("20.37.64.10:443 deny rule=aml reason=needs_service_tags"),
        "{explained}"
    );
}
