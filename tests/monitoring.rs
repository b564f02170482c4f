//! Observability end to end: the `/metrics` exposition checked by
//! `promtool`, counters moving with traffic, a real Prometheus scraping a
//! running portcullis and evaluating every expression of the shipped Grafana
//! dashboard and alert rules, the count panels counting one event as one,
//! `promtool test rules` on every alert, the bound on denied-destination
//! series under a spray of random names, and `/readyz` while draining.
//!
//! Upstreams are local (127.0.0.2, names mapped by `[resolve]`); nothing here
//! resolves a real name or leaves the machine. Prometheus listens on
//! 127.0.0.1 with its TSDB in a tempdir and is killed when the test ends.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    ChildGuard, Lines, Proxy, TestCa, Upstream, client_command, connect, connect_via, have,
    have_python, http_get, metric_sum, output_text, parse_metrics, read_response,
    read_until_closed, run_command, wait_until,
};

const METRIC_TIMEOUT: Duration = Duration::from_secs(10);
const PROM_TIMEOUT: Duration = Duration::from_secs(30);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/portcullis.json"
);
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/portcullis-alerts.yml"
);
const PROM_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/prometheus.yml"
);
const ALERT_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/portcullis-alerts.test.yml"
);

// ---------------------------------------------------------------------------
// Set-up

/// A config allowing `allowed.test` on the upstream's ports (and 443), with
/// `limits` and `extra` (more top-level TOML) appended.
fn config(up: Option<&Upstream>, limits: &[(&str, u64)], extra: &str) -> String {
    let mut ports = vec![443u16];
    if let Some(up) = up {
        ports.extend([up.https_port(), up.http_port()]);
    }
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let limits: String = limits.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    format!(
        r#"[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[clients]
allow = ["127.0.0.0/8"]

[policy]
profile = "none"
mode = "enforce"

[[rule]]
name = "allowed"
hosts = ["allowed.test"]
ports = [{ports}]

# 127.0.0.2 is guarded (loopback): the upstreams need an explicit address rule.
[[rule]]
name = "upstreams"
cidrs = ["127.0.0.2/32"]
ports = [{ports}]

[resolve]
"allowed.test" = ["127.0.0.2"]

[limits]
{limits}
{extra}"#
    )
}

// ---------------------------------------------------------------------------
// Traffic

/// Downloads `path` from the plain-HTTP upstream through a CONNECT tunnel;
/// returns every byte the client received after the CONNECT response.
fn download_through_tunnel(proxy: SocketAddr, up: &Upstream, path: &str) -> Vec<u8> {
    let authority = format!("allowed.test:{}", up.http_port());
    let (mut s, head) = connect_via(proxy, &authority);
    assert_eq!(head.status, 200, "CONNECT {authority}: {head:?}");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let bytes = read_until_closed(&mut s)
        .unwrap_or_else(|(got, e)| panic!("tunnel read after {} bytes: {e}", got.len()));
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "GET {path}: {text:?}");
    bytes
}

/// An absolute-form GET of `http://allowed.test:PORT/hello.txt` (allowed, via http).
fn allowed_plain_get(proxy: SocketAddr, up: &Upstream) {
    let authority = format!("allowed.test:{}", up.http_port());
    let mut s = connect(proxy).unwrap();
    write!(
        s,
        "GET http://{authority}/hello.txt HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 200, "GET http://{authority}/hello.txt");
}

/// One domain-fronting attempt: a CONNECT to allowed.test whose TLS
/// ClientHello names other.test. The proxy cuts it and counts one
/// `portcullis_tls_name_mismatch_total{kind="connect_sni"}`.
fn fronted_connect(proxy: SocketAddr, up: &Upstream, ca: &TestCa) {
    let authority = format!("allowed.test:{}", up.https_port());
    let (mut s, head) = connect_via(proxy, &authority);
    assert_eq!(head.status, 200, "CONNECT {authority}: {head:?}");
    let name = rustls::pki_types::ServerName::try_from("other.test").expect("a DNS name");
    let mut tls = rustls::ClientConnection::new(ca.client_config(), name).expect("TLS client");
    tls.write_tls(&mut s).expect("send ClientHello");
    // The proxy closes the tunnel; what (if anything) came back is not the point.
    let _ = read_until_closed(&mut s);
}

/// `times` denied CONNECTs to `host:port` (each on its own connection: a
/// refused CONNECT closes it). Returns the number of connections opened.
fn deny_connect(proxy: SocketAddr, host: &str, port: u16, times: usize) -> usize {
    for _ in 0..times {
        let mut s = connect(proxy).unwrap();
        write!(
            s,
            "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
        )
        .unwrap();
        let resp = read_response(&mut s).unwrap();
        assert_eq!(resp.status, 403, "CONNECT {host}:{port}: {}", resp.text());
    }
    times
}

/// `times` denied absolute-form GETs of `http://host/`, kept alive on one
/// connection as long as the proxy allows (after a `Connection: close`
/// answer the next request opens a new one). Returns the connections opened.
fn deny_get(proxy: SocketAddr, host: &str, times: usize) -> usize {
    let mut stream: Option<TcpStream> = None;
    let mut opened = 0;
    for i in 0..times {
        let s = stream.get_or_insert_with(|| {
            opened += 1;
            connect(proxy).expect("connect to proxy")
        });
        write!(s, "GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let resp = read_response(s).unwrap_or_else(|e| panic!("GET http://{host}/ #{i}: {e}"));
        assert_eq!(resp.status, 403, "GET http://{host}/: {}", resp.text());
        if resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            stream = None;
        }
    }
    opened
}

/// `times` UDP queries (TXT, as a tunnel would send) for `host` to the DNS
/// listener at `dns`, each answered REFUSED. Returns `times`.
fn deny_dns(dns: SocketAddr, host: &str, times: usize) -> usize {
    use hickory_resolver::proto::op::{Message, Query, ResponseCode};
    use hickory_resolver::proto::rr::{Name, RecordType};
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(METRIC_TIMEOUT)).unwrap();
    for i in 0..times {
        let mut m = Message::query();
        m.metadata.id = i as u16;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(host).unwrap(),
            RecordType::TXT,
        ));
        socket.send_to(&m.to_vec().unwrap(), dns).unwrap();
        let mut buf = [0u8; 1500];
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no answer from the DNS listener for {host}: {e}"));
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(reply.metadata.id, i as u16);
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::Refused,
            "{host}"
        );
    }
    times
}

/// The DNS listener's address from a running proxy's `listening dns ADDR` line.
fn dns_addr(proxy: &Proxy) -> SocketAddr {
    proxy
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("listening dns ")?.trim().parse().ok())
        .expect("a `listening dns ADDR` line")
}

// ---------------------------------------------------------------------------
// Prometheus

/// Percent-encodes a query-string value.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Prometheus server on 127.0.0.1, killed on drop.
struct Prometheus {
    _child: ChildGuard,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    stderr: Lines,
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` every second as job `portcullis`,
    /// with the shipped alert rules loaded; waits for `/-/ready`.
    fn start(target: SocketAddr) -> Prometheus {
        let mut last_err = String::new();
        // The free port is found by binding port 0 and letting it go; if
        // someone takes it in between, Prometheus exits and we try another.
        for _ in 0..3 {
            match Prometheus::try_start(target) {
                Ok(p) => return p,
                Err(e) => last_err = e,
            }
        }
        panic!("prometheus did not start: {last_err}");
    }

    fn try_start(target: SocketAddr) -> Result<Prometheus, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(
            &config_path,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {ALERTS:?}\n\
                 scrape_configs:\n  - job_name: portcullis\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let tsdb = dir.path().join("data");
        let mut child = client_command("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", tsdb.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn prometheus: {e}"))?;
        let stderr = Lines::spawn_reader(child.stderr.take().unwrap());
        let mut child = ChildGuard(child);
        let mut exited = None;
        let ready = wait_until(PROM_TIMEOUT, || {
            if let Ok(Some(status)) = child.0.try_wait() {
                exited = Some(status);
                return true;
            }
            http_get(addr, "/-/ready").is_ok_and(|r| r.status == 200)
        });
        if !ready || exited.is_some() {
            drop(child);
            stderr.wait(Duration::from_secs(2), |_| false);
            return Err(format!(
                "not ready within {PROM_TIMEOUT:?} (exit: {exited:?})\nstderr:\n{}",
                stderr.snapshot().join("\n")
            ));
        }
        Ok(Prometheus {
            _child: child,
            _dir: dir,
            addr,
            stderr,
        })
    }

    /// GET `path` on the HTTP API; the decoded JSON document (also for 4xx,
    /// which carry `"status":"error"`).
    fn api(&self, path: &str) -> Result<Value, String> {
        let resp = http_get(self.addr, path).map_err(|e| format!("GET {path}: {e}"))?;
        serde_json::from_slice(&resp.body)
            .map_err(|e| format!("GET {path}: {} {e}: {}", resp.status, resp.text()))
    }

    /// An instant query; the whole response document.
    fn query(&self, expr: &str) -> Result<Value, String> {
        self.api(&format!("/api/v1/query?query={}", urlencode(expr)))
    }

    /// An instant query that must succeed; its result vector as (labels, value).
    fn vector(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let doc = self.query(expr).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(doc["status"], "success", "{expr}: {doc}");
        doc["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{expr}: no result vector: {doc}"))
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect()
    }
}

/// Every PromQL expression of the dashboard: `expr` anywhere (panels, rows'
/// nested panels, targets, annotations) and the templating queries.
/// Returned as (where, expression).
fn dashboard_queries(doc: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                let name = map
                    .get("title")
                    .or_else(|| map.get("name"))
                    .and_then(Value::as_str)
                    .map(|t| format!("{path} {t:?}"))
                    .unwrap_or_else(|| path.to_string());
                if let Some(Value::String(e)) = map.get("expr") {
                    let ref_id = map.get("refId").and_then(Value::as_str).unwrap_or("");
                    out.push((format!("{name} {ref_id}").trim().to_string(), e.clone()));
                }
                for (k, child) in map {
                    walk(child, &format!("{name}/{k}"), out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc, "", &mut out);
    for var in doc["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        let query = match &var["query"] {
            Value::String(q) => Some(q.clone()),
            Value::Object(o) => o.get("query").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        for q in query
            .into_iter()
            .chain(var["definition"].as_str().map(str::to_string))
        {
            out.push((format!("templating ${name}"), q));
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.1 == b.1);
    out
}

/// Replaces Grafana's variables: `$instance` → `.*` (the dashboard's
/// allValue), intervals → `1m`, `$__range` → `1h`. Panics on an unknown one.
fn substitute(expr: &str) -> String {
    let mut s = expr.to_string();
    for (var, value) in [
        ("__rate_interval", "1m"),
        ("__interval_ms", "60000"),
        ("__interval", "1m"),
        ("__range_ms", "3600000"),
        ("__range_s", "3600"),
        ("__range", "1h"),
        ("instance", ".*"),
    ] {
        s = s.replace(&format!("${{{var}:regex}}"), value);
        s = s.replace(&format!("${{{var}}}"), value);
        s = s.replace(&format!("${var}"), value);
    }
    let unknown = s
        .char_indices()
        .filter(|&(i, c)| {
            c == '$'
                && s[i + 1..]
                    .chars()
                    .next()
                    .is_some_and(|n| n == '{' || n == '_' || n.is_ascii_alphabetic())
        })
        .count();
    assert_eq!(unknown, 0, "unknown dashboard variable left in {s:?}");
    s
}

/// `label_values(selector, label)` / `label_values(label)` (Grafana's
/// variable query functions): the label API path Grafana calls for it.
fn label_values_path(query: &str) -> Option<String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = match inner.rsplit_once(',') {
        Some((sel, label)) => (Some(sel.trim()), label.trim()),
        None => (None, inner.trim()),
    };
    Some(match selector {
        Some(sel) => format!("/api/v1/label/{label}/values?match[]={}", urlencode(sel)),
        None => format!("/api/v1/label/{label}/values"),
    })
}

/// (title, expr) of every panel that shows a count over the dashboard
/// range (title ends in "(dashboard range)", one instant query), in
/// dashboard order; the top-denied table is checked on its own.
fn range_count_panels(doc: &Value) -> Vec<(String, String)> {
    doc["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "stat")
        .filter_map(|p| {
            let title = p["title"].as_str()?;
            let targets = p["targets"].as_array()?;
            (title.ends_with("(dashboard range)") && targets.len() == 1).then(|| {
                assert_eq!(targets[0]["instant"], true, "{title}: not an instant query");
                let expr = targets[0]["expr"].as_str().unwrap_or_default();
                (title.to_string(), expr.to_string())
            })
        })
        .collect()
}

/// The windows of every `increase(` in `expr`: the first `[...]` after it.
fn increase_windows(expr: &str) -> Vec<&str> {
    expr.match_indices("increase(")
        .filter_map(|(i, _)| {
            let rest = &expr[i..];
            let open = rest.find('[')?;
            let close = rest[open..].find(']')?;
            Some(&rest[open + 1..open + close])
        })
        .collect()
}

/// The `expr` of every rule in a Prometheus rules file, with a minimal YAML
/// reader: `expr: inline`, quoted, or a `|` / `>` block scalar.
fn yaml_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let key_indent = indent(line);
        let rest = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        i += 1;
        let Some(value) = rest.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        // Continuation lines: blank, or indented deeper than the key.
        let mut body = Vec::new();
        while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > key_indent) {
            body.push(lines[i].trim());
            i += 1;
        }
        while body.last().is_some_and(|l| l.is_empty()) {
            body.pop();
        }
        let expr = if value.starts_with('|') || value.starts_with('>') {
            body.join("\n")
        } else {
            let first = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            std::iter::once(first)
                .chain(body)
                .collect::<Vec<_>>()
                .join(" ")
        };
        out.push(expr);
    }
    out
}

/// The same list through PyYAML, when python3 has it.
fn yaml_exprs_python(path: &str) -> Option<Vec<String>> {
    let out = client_command("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             doc = yaml.safe_load(open(sys.argv[1]))\n\
             print(json.dumps([r['expr'] for g in doc['groups'] for r in g['rules']]))",
            path,
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn promtool(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    run_command(
        client_command("promtool").args(args),
        stdin,
        Duration::from_secs(60),
    )
}

// ---------------------------------------------------------------------------
// 1. The exposition is valid and counters move

#[test]
fn metrics_pass_promtool_and_counters_follow_traffic() {
    if !have_python() || !have("promtool", &["--version"]) {
        return;
    }
    let ca = TestCa::new();
    let up = Upstream::start(&ca);
    let proxy = Proxy::start(&config(Some(&up), &[], ""));
    let before = proxy.metrics_text();
    let m0 = |name: &str, labels: &[(&str, &str)]| metric_sum(&before, name, labels).unwrap_or(0.0);
    let allow0 = m0(
        "portcullis_decisions_total",
        &[("action", "allow"), ("via", "connect")],
    );
    let deny0 = m0("portcullis_decisions_total", &[("action", "deny")]);
    let down0 = m0("portcullis_bytes_total", &[("direction", "download")]);
    let conns0 = m0("portcullis_connections_total", &[("listener", "proxy")]);

    let mut downloaded = 0usize;
    for _ in 0..2 {
        downloaded += download_through_tunnel(proxy.addr(), &up, "/blob").len();
    }
    let mut conns = 2;
    allowed_plain_get(proxy.addr(), &up);
    conns += 1;
    let hp = up.https_port();
    conns += deny_connect(proxy.addr(), "denied-1.test", hp, 3);
    conns += deny_connect(proxy.addr(), "denied-2.test", 443, 1);
    conns += deny_get(proxy.addr(), "denied-3.test", 2);
    let denials = 3 + 1 + 2;

    let allow = proxy.wait_metric(
        "portcullis_decisions_total",
        &[("action", "allow"), ("via", "connect")],
        METRIC_TIMEOUT,
        |v| v - allow0 == 2.0,
    );
    assert_eq!(allow - allow0, 2.0, "{}", proxy.metrics_text());
    let deny = proxy.wait_metric(
        "portcullis_decisions_total",
        &[("action", "deny")],
        METRIC_TIMEOUT,
        |v| v - deny0 == denials as f64,
    );
    assert_eq!(deny - deny0, denials as f64, "{}", proxy.metrics_text());
    let down = proxy.wait_metric(
        "portcullis_bytes_total",
        &[("direction", "download")],
        METRIC_TIMEOUT,
        |v| v - down0 >= downloaded as f64,
    );
    assert!(
        down - down0 >= downloaded as f64,
        "download counter grew by {} for {downloaded} bytes downloaded",
        down - down0
    );
    let total = proxy.wait_metric(
        "portcullis_connections_total",
        &[("listener", "proxy")],
        METRIC_TIMEOUT,
        |v| v - conns0 >= conns as f64,
    );
    assert!(
        total - conns0 >= conns as f64,
        "connections_total {total}, opened {conns}"
    );

    let text = proxy.metrics_text();
    let hp_s = hp.to_string();
    for (host, port, want) in [
        ("denied-1.test", hp_s.as_str(), 3.0),
        ("denied-2.test", "443", 1.0),
        ("denied-3.test", "80", 2.0),
    ] {
        let got = metric_sum(
            &text,
            "portcullis_denied_destinations_total",
            &[("host", host), ("port", port)],
        );
        assert_eq!(got, Some(want), "{host}:{port}\n{text}");
    }
    assert_eq!(
        metric_sum(&text, "portcullis_denied_destinations_total", &[]),
        Some(denials as f64),
        "{text}"
    );

    let out = promtool(&["check", "metrics"], Some(text.as_bytes()));
    eprintln!(
        "promtool check metrics on {} samples: {}",
        parse_metrics(&text).len(),
        output_text(&out)
    );
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{text}",
        output_text(&out)
    );
}

// ---------------------------------------------------------------------------
// 2. A real Prometheus: dashboard and alert expressions

#[test]
fn prometheus_scrapes_and_every_dashboard_and_alert_expression_evaluates() {
    if !have_python() || !have("promtool", &["--version"]) || !have("prometheus", &["--version"]) {
        return;
    }
    // The shipped files pass promtool first.
    let out = promtool(&["check", "rules", ALERTS], None);
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        output_text(&out)
    );
    let out = promtool(&["check", "config", PROM_CONFIG], None);
    assert!(
        out.status.success(),
        "promtool check config: {}",
        output_text(&out)
    );

    let ca = TestCa::new();
    let up = Upstream::start(&ca);
    // With a DNS listener, whose refusals the DNS panels show. Refused
    // names are never forwarded; port 9 (discard) on loopback answers nothing.
    let cfg = config(Some(&up), &[], "[dns]\nservers = [\"127.0.0.1:9\"]\n").replace(
        "admin = \"127.0.0.1:0\"\n",
        "admin = \"127.0.0.1:0\"\ndns = \"127.0.0.1:0\"\n",
    );
    let proxy = Proxy::start(&cfg);
    let dns = dns_addr(&proxy);
    let admin = proxy.admin_addr();
    let prom = Prometheus::start(admin);
    let instance = admin.to_string();

    // The target is up and samples exist.
    let mut last = Value::Null;
    let up_ok = wait_until(PROM_TIMEOUT, || {
        last = prom.api("/api/v1/targets").unwrap_or(Value::Null);
        last["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["health"] == "up" && t["labels"]["instance"] == instance.as_str())
    });
    assert!(
        up_ok,
        "target {instance} never up: {last}\n{:?}",
        prom.stderr.snapshot()
    );
    assert!(
        wait_until(PROM_TIMEOUT, || !prom
            .vector("portcullis_build_info")
            .is_empty()),
        "no portcullis_build_info samples"
    );

    // Phase 1: allowed traffic, and every denied host once, until scraped.
    download_through_tunnel(proxy.addr(), &up, "/blob");
    allowed_plain_get(proxy.addr(), &up);
    // (host, port, via, further denials in phase 2)
    let denied: [(&str, u16, &str, usize); 5] = [
        ("denied-1.test", 443, "connect", 4),
        ("denied-2.test", 443, "connect", 15),
        ("denied-3.test", 80, "http", 1),
        ("denied-4.test", 80, "http", 9),
        ("x1f8b.tunnel.test", 53, "dns", 6),
    ];
    let drive = |times: &dyn Fn(usize) -> usize| {
        for &(host, port, via, n) in &denied {
            match via {
                "connect" => deny_connect(proxy.addr(), host, port, times(n)),
                "dns" => deny_dns(dns, host, times(n)),
                _ => deny_get(proxy.addr(), host, times(n)),
            };
        }
    };
    drive(&|_| 1);
    let scraped = |want: &dyn Fn(usize) -> f64| {
        let mut seen = Vec::new();
        let ok = wait_until(PROM_TIMEOUT, || {
            seen = prom.vector(r#"portcullis_denied_destinations_total{job="portcullis"}"#);
            denied.iter().all(|&(host, port, _, n)| {
                seen.iter().any(|(l, v)| {
                    l.get("host").map(String::as_str) == Some(host)
                        && l.get("port") == Some(&port.to_string())
                        && *v == want(n)
                })
            })
        });
        assert!(ok, "Prometheus never scraped the denied counts: {seen:?}");
    };
    scraped(&|_| 1.0);

    // Phase 2: some hosts denied more often than others, and a reload.
    drive(&|n| n);
    download_through_tunnel(proxy.addr(), &up, "/hello.txt");
    proxy.reload(&cfg);
    scraped(&|n| 1.0 + n as f64);
    assert!(
        wait_until(PROM_TIMEOUT, || {
            prom.vector("portcullis_policy_generation")
                .iter()
                .any(|(_, v)| *v == 2.0)
        }),
        "reload never scraped"
    );
    // One domain-fronting attempt, for the name-mismatch count panel.
    fronted_connect(proxy.addr(), &up, &ca);
    assert!(
        wait_until(PROM_TIMEOUT, || {
            prom.vector(r#"portcullis_tls_name_mismatch_total{kind="connect_sni"}"#)
                .iter()
                .any(|(_, v)| *v == 1.0)
        }),
        "name mismatch never scraped"
    );

    // Every dashboard expression evaluates.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).expect("dashboard JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 30, "only {} queries found", queries.len());
    let mut failures = Vec::new();
    let mut empty = Vec::new();
    for (place, raw) in &queries {
        if let Some(path) = label_values_path(&substitute(raw)) {
            match prom.api(&path) {
                Ok(doc) if doc["status"] == "success" => {
                    let values = doc["data"].as_array().cloned().unwrap_or_default();
                    if !values.iter().any(|v| v == instance.as_str()) {
                        failures.push(format!("{place}: {raw}: {instance} not among {values:?}"));
                    }
                }
                Ok(doc) => failures.push(format!("{place}: {raw}: {doc}")),
                Err(e) => failures.push(format!("{place}: {raw}: {e}")),
            }
            continue;
        }
        let expr = substitute(raw);
        match prom.query(&expr) {
            Ok(doc) if doc["status"] == "success" => {
                let n = doc["data"]["result"].as_array().map_or(1, Vec::len);
                if n == 0 {
                    empty.push(format!("{place}: {expr}"));
                }
            }
            Ok(doc) => failures.push(format!("{place}: {expr}\n    {doc}")),
            Err(e) => failures.push(format!("{place}: {expr}\n    {e}")),
        }
    }
    eprintln!(
        "dashboard: {} expressions evaluated, {} failed, {} returned no series (no such events in this run):\n  {}",
        queries.len(),
        failures.len(),
        empty.len(),
        empty.join("\n  ")
    );
    assert!(
        failures.is_empty(),
        "dashboard queries failed:\n{}",
        failures.join("\n")
    );

    // The top-denied table lists exactly the test's hosts, most denied first.
    let top_query = |dns_only: bool| {
        queries
            .iter()
            .find(|(_, e)| {
                e.contains("topk(")
                    && e.contains("portcullis_denied_destinations_total")
                    && e.contains("port=\"53\"") == dns_only
            })
            .map(|(_, e)| e.clone())
            .expect("a topk query over portcullis_denied_destinations_total")
    };
    let top_raw = &top_query(false);
    let mut top = prom.vector(&substitute(top_raw));
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let got: Vec<(String, String, f64)> = top
        .iter()
        .map(|(l, v)| {
            (
                l.get("host").cloned().unwrap_or_default(),
                l.get("port").cloned().unwrap_or_default(),
                *v,
            )
        })
        .collect();
    let mut want: Vec<(&str, u16, usize)> = denied.iter().map(|&(h, p, _, n)| (h, p, n)).collect();
    want.sort_by_key(|w| std::cmp::Reverse(w.2));
    eprintln!("top denied destinations: {got:?} (phase-2 denials {want:?})");
    // The overflow series exists from start-up with 0 (nothing overflowed
    // here); the table may list it, but only at 0 and last.
    let (got, overflow): (Vec<_>, Vec<_>) = got.into_iter().partition(|(h, _, _)| h != "__other__");
    assert!(
        overflow.iter().all(|(_, _, v)| *v == 0.0),
        "__other__ counted denials: {overflow:?}"
    );
    let got_keys: Vec<(String, String)> =
        got.iter().map(|(h, p, _)| (h.clone(), p.clone())).collect();
    let want_keys: Vec<(String, String)> = want
        .iter()
        .map(|(h, p, _)| (h.to_string(), p.to_string()))
        .collect();
    assert_eq!(got_keys, want_keys, "top denied destinations: {got:?}");
    assert!(
        got.windows(2).all(|w| w[0].2 > w[1].2) && got.last().is_some_and(|l| l.2 > 0.0),
        "counts not strictly ordered: {got:?}"
    );
    // The refused-DNS-names table: only the name refused on port 53, with
    // its count: 1 + 6 queries, which increase() extrapolates towards the
    // range's ends (8.3 for 7 in one run; the table above shows the same).
    let dns_top = prom.vector(&substitute(&top_query(true)));
    eprintln!("top refused DNS names: {dns_top:?}");
    let dns_top: Vec<(String, f64)> = dns_top
        .into_iter()
        .map(|(l, v)| (l.get("host").cloned().unwrap_or_default(), v))
        .filter(|(h, _)| h != "__other__")
        .collect();
    assert_eq!(dns_top.len(), 1, "{dns_top:?}");
    assert_eq!(dns_top[0].0, "x1f8b.tunnel.test");
    assert!((6.5..10.5).contains(&dns_top[0].1), "{dns_top:?}");
    // The DNS listener's queries by result: the refusals were scraped.
    let refused = prom.vector(r#"portcullis_dns_queries_total{result="refused"}"#);
    assert!(
        refused.iter().any(|(_, v)| *v == 7.0),
        "refused DNS queries: {refused:?}"
    );

    // The count panels count one event as one: one reload, one fronted CONNECT.
    let panels = range_count_panels(&dashboard);
    let titles: Vec<&str> = panels.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        titles,
        [
            "Name mismatches (dashboard range)",
            "Config reloads (dashboard range)"
        ],
        "count panels"
    );
    // (panel title, label, the count each label value must show)
    type Want<'a> = (&'a str, &'a str, &'a [(&'a str, f64)]);
    let expected: [Want<'_>; 2] = [
        (
            "Name mismatches (dashboard range)",
            "kind",
            &[
                ("connect_sni", 1.0),
                ("host_uri", 0.0),
                ("sni_destination", 0.0),
                ("host_destination", 0.0),
            ],
        ),
        (
            "Config reloads (dashboard range)",
            "result",
            &[("success", 1.0), ("failure", 0.0)],
        ),
    ];
    for (title, label, want) in expected {
        let (_, raw) = panels.iter().find(|(t, _)| t == title).unwrap();
        let got = prom.vector(&substitute(raw));
        eprintln!("{title}: {raw}\n  = {got:?}");
        for &(value, n) in want {
            let v = got
                .iter()
                .find(|(l, _)| l.get(label).map(String::as_str) == Some(value))
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("{title}: no {label}={value} in {got:?}"));
            // increase() extrapolates to the window's end by at most about
            // one scrape interval, so one event reads 1.0x; the panel shows
            // it with 0 decimals. Overlapping windows summed would read ~4.
            assert!(
                (v - n).abs() < 0.25,
                "{title}: {label}={value} counted {v}, want {n}"
            );
        }
    }

    // Every alert expression evaluates, and Prometheus evaluates the loaded rules cleanly.
    let alerts_text = std::fs::read_to_string(ALERTS).unwrap();
    let exprs = yaml_exprs(&alerts_text);
    let rule_count = alerts_text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:")
        })
        .count();
    assert_eq!(exprs.len(), rule_count, "exprs found: {exprs:#?}");
    if let Some(py) = yaml_exprs_python(ALERTS) {
        let a: Vec<String> = exprs.iter().map(|e| words(e)).collect();
        let b: Vec<String> = py.iter().map(|e| words(e)).collect();
        assert_eq!(a, b, "minimal YAML reader disagrees with PyYAML");
    }
    let mut failures = Vec::new();
    for expr in &exprs {
        match prom.query(expr) {
            Ok(doc) if doc["status"] == "success" => {}
            Ok(doc) => failures.push(format!("{expr}\n    {doc}")),
            Err(e) => failures.push(format!("{expr}\n    {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "alert expressions failed:\n{}",
        failures.join("\n")
    );
    let mut rules = Vec::new();
    let evaluated = wait_until(PROM_TIMEOUT, || {
        rules = prom.api("/api/v1/rules").map_or_else(
            |_| Vec::new(),
            |doc| {
                doc["data"]["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                    .collect()
            },
        );
        rules.len() == rule_count && rules.iter().all(|r| r["health"] != "unknown")
    });
    assert!(evaluated, "rules not all evaluated: {rules:#?}");
    let bad: Vec<String> = rules
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
        .collect();
    assert!(bad.is_empty(), "rules with errors: {bad:#?}");
    eprintln!(
        "alerts: {} expressions evaluated; {} rules loaded and evaluated ok",
        exprs.len(),
        rules.len()
    );
}

// ---------------------------------------------------------------------------
// 3. Dashboard counts and import; alert unit tests and runbooks

#[test]
fn dashboard_counts_use_the_range_and_declare_their_data_source_input() {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    let doc: Value = serde_json::from_str(&text).expect("dashboard JSON");
    // A count is increase() over the whole range, never a legend that sums
    // overlapping increase(...[$__rate_interval]) windows.
    for (place, expr) in dashboard_queries(&doc) {
        for window in increase_windows(&expr) {
            assert_eq!(window, "$__range", "{place}: {expr}");
        }
    }
    for p in doc["panels"].as_array().unwrap() {
        let calcs = &p["options"]["legend"]["calcs"];
        assert!(
            !calcs
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c == "sum" || c == "total"),
            "{}: legend sums points: {calcs}",
            p["title"]
        );
    }
    // Import offers a data-source picker for DS_PROMETHEUS, and the choice
    // becomes the Data source variable's default.
    let inputs: Vec<&str> = doc["__inputs"]
        .as_array()
        .expect("__inputs")
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["DS_PROMETHEUS"]);
    assert_eq!(doc["__inputs"][0]["type"], "datasource");
    assert_eq!(doc["__inputs"][0]["pluginId"], "prometheus");
    let used: std::collections::BTreeSet<&str> = text
        .match_indices("${DS_")
        .map(|(i, _)| {
            let rest = &text[i + 2..];
            &rest[..rest.find('}').unwrap()]
        })
        .collect();
    assert_eq!(used.into_iter().collect::<Vec<_>>(), inputs);
    let var = &doc["templating"]["list"][0];
    assert_eq!(var["name"], "datasource");
    assert_eq!(var["current"]["value"], "${DS_PROMETHEUS}");
    // Both READMEs describe that picker.
    for readme in ["README.md", "deploy/README.md"] {
        let body =
            std::fs::read_to_string(format!("{}/{readme}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            body.contains("DS_PROMETHEUS"),
            "{readme} does not describe the import picker"
        );
    }
}

/// GitHub's anchor for a Markdown heading: lower case, spaces to `-`,
/// punctuation other than `-` and `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_unit_tests_and_link_their_runbooks() {
    if !have("promtool", &["--version"]) {
        return;
    }
    let out = promtool(&["check", "rules", ALERTS], None);
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        output_text(&out)
    );
    // Input series, expected alerts with labels and annotations (rendered
    // templates included), and cases that must not fire.
    let out = promtool(&["test", "rules", ALERT_TESTS], None);
    eprintln!("promtool test rules: {}", output_text(&out).trim());
    assert!(
        out.status.success(),
        "promtool test rules: {}",
        output_text(&out)
    );

    let alerts = std::fs::read_to_string(ALERTS).unwrap();
    let tests = std::fs::read_to_string(ALERT_TESTS).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let anchors: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(anchor)
        .collect();
    let names: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    let runbooks: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .map(|u| u.trim_matches('"'))
        .collect();
    assert_eq!(names.len(), runbooks.len(), "every alert has a runbook_url");
    for (name, url) in names.iter().zip(&runbooks) {
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{name} has no case in {ALERT_TESTS}"
        );
        let (_, frag) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: {url}"));
        assert_eq!(frag, name.to_lowercase(), "{name}: runbook anchor");
        assert!(
            anchors.iter().any(|a| a == frag),
            "{name}: README.md has no heading for #{frag}"
        );
    }
    for name in [
        "PortcullisDomainFronting",
        "PortcullisConntrackNearFull",
        "PortcullisRulesetUnitFailed",
    ] {
        assert!(names.contains(&name), "{name} missing");
    }

    // The commented azure_sd example is a valid scrape config once uncommented.
    let config = std::fs::read_to_string(PROM_CONFIG).unwrap();
    let mut inside = false;
    let mut lines = Vec::new();
    for line in config.lines() {
        if line.contains("BEGIN azure_sd example") || line.contains("END azure_sd example") {
            inside = !inside;
            continue;
        }
        lines.push(match line.strip_prefix("  # ") {
            Some(rest) if inside => format!("  {rest}"),
            _ => line.to_string(),
        });
    }
    assert!(
        !inside
            && lines
                .iter()
                .any(|l| l.starts_with("  - job_name: portcullis-azure")),
        "azure_sd markers"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, lines.join("\n")).unwrap();
    std::fs::copy(ALERTS, dir.path().join("portcullis-alerts.yml")).unwrap();
    let path = path.display().to_string();
    let out = promtool(&["check", "config", &path], None);
    assert!(
        out.status.success(),
        "promtool check config with azure_sd_configs: {}",
        output_text(&out)
    );
}

// ---------------------------------------------------------------------------
// 4. Denied-destination cardinality is bounded

/// Reads one response, which must be a 403; true when it says `Connection: close`.
fn read_denied(r: &mut impl BufRead, line: &mut String, body: &mut Vec<u8>) -> bool {
    line.clear();
    r.read_line(line).expect("read response");
    assert!(line.starts_with("HTTP/1.1 403"), "response {line:?}");
    let mut len = 0usize;
    let mut close = false;
    loop {
        line.clear();
        r.read_line(line).expect("read response head");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
            if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    body.resize(len, 0);
    r.read_exact(body).expect("read response body");
    close
}

/// Whether the proxy keeps the connection open after a denied plain-HTTP request.
fn denied_http_keeps_alive(proxy: SocketAddr) -> bool {
    let s = connect(proxy).expect("connect to proxy");
    let mut w = s.try_clone().unwrap();
    write!(
        w,
        "GET http://probe.test/ HTTP/1.1\r\nHost: probe.test\r\n\r\n"
    )
    .unwrap();
    !read_denied(&mut BufReader::new(s), &mut String::new(), &mut Vec::new())
}

/// Sends a denied absolute-form GET for every name, pipelined on one
/// kept-alive connection, and reads every 403.
fn spray_connection(proxy: SocketAddr, names: Vec<String>, deadline: Instant) {
    let n = names.len();
    let mut line = String::new();
    let mut body = Vec::new();
    let s = connect(proxy).expect("connect to proxy");
    let mut writer = s.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(64 * 1024);
        for name in names {
            write!(buf, "GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n\r\n").unwrap();
            if buf.len() > 60 * 1024 {
                writer.write_all(&buf)?;
                buf.clear();
            }
        }
        writer.write_all(&buf)
    });
    let mut r = BufReader::with_capacity(256 * 1024, s.try_clone().unwrap());
    for i in 0..n {
        if i % 256 == 0 {
            assert!(
                Instant::now() < deadline,
                "spray still running after its deadline: {i} of {n} answered"
            );
        }
        let close = read_denied(&mut r, &mut line, &mut body);
        assert!(
            !close,
            "response {i} of {n} closed the kept-alive connection"
        );
    }
    w.join().unwrap().expect("write pipelined requests");
    let _ = s.shutdown(Shutdown::Both);
}

/// `count` distinct random names starting at index `from`, over `conns`
/// client threads at once.
fn spray(proxy: SocketAddr, seed: u64, from: usize, count: usize, conns: usize, deadline: Instant) {
    let mut x = seed | 1;
    let mut per: Vec<Vec<String>> = vec![Vec::new(); conns];
    for i in from..from + count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        per[i % conns].push(format!("rand-{:08x}{i:x}.test", x as u32));
    }
    let threads: Vec<_> = per
        .into_iter()
        .map(|names| std::thread::spawn(move || spray_connection(proxy, names, deadline)))
        .collect();
    for t in threads {
        t.join().expect("spray connection");
    }
}

fn rss(proxy: &Proxy) -> f64 {
    proxy.metric("process_resident_memory_bytes", &[])
}

#[test]
fn denied_destination_series_are_bounded_under_a_spray() {
    const MAX: usize = 50;
    const WARMUP: usize = 10_000;
    const TOTAL: usize = 100_000;
    const CONNS: usize = 8;
    let proxy = Proxy::start(&config(
        None,
        &[("max_denied_hosts", MAX as u64)],
        // 100,000 denial log lines would only measure the log pipe.
        "[log]\nlevel = \"warn\"\n",
    ));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    // Denied plain-HTTP requests leave the connection open (keep-alive).
    assert!(
        denied_http_keeps_alive(proxy.addr()),
        "a denied plain-HTTP request closed the connection"
    );
    let started = Instant::now();
    // A hang guard, not a speed assertion: pipelined, the spray takes about
    // 12 s in a debug build; one connection per request, about 50 s.
    let deadline = started + Duration::from_secs(180);
    let rss_start = rss(&proxy);
    spray(proxy.addr(), seed, 0, WARMUP - 1, CONNS, deadline);
    let rss_warm = rss(&proxy);
    spray(
        proxy.addr(),
        seed ^ 0x5eed,
        WARMUP,
        TOTAL - WARMUP,
        CONNS,
        deadline,
    );
    let rss_after = rss(&proxy);
    let elapsed = started.elapsed();

    let text = proxy.metrics_text();
    let series: Vec<_> = parse_metrics(&text)
        .into_iter()
        .filter(|s| s.name == "portcullis_denied_destinations_total")
        .collect();
    let other: Vec<_> = series
        .iter()
        .filter(|s| s.labels.get("host").map(String::as_str) == Some("__other__"))
        .collect();
    let tracked: Vec<_> = series
        .iter()
        .filter(|s| s.labels.get("host").map(String::as_str) != Some("__other__"))
        .collect();
    let other_count = other.first().map_or(f64::NAN, |s| s.value);
    eprintln!(
        "spray: {TOTAL} distinct denied names from {CONNS} client threads (pipelined, kept alive) in {elapsed:?}; \
         {} tracked series + {} __other__ = {other_count}; \
         RSS start {:.1} MiB, after {WARMUP} {:.1} MiB, after {TOTAL} {:.1} MiB",
        tracked.len(),
        other.len(),
        rss_start / 1048576.0,
        rss_warm / 1048576.0,
        rss_after / 1048576.0
    );
    assert_eq!(other.len(), 1, "one __other__ series");
    assert_eq!(tracked.len(), MAX, "tracked series");
    assert!(
        tracked.iter().all(|s| s.value == 1.0
            && s.labels["port"] == "80"
            && (s.labels["host"].starts_with("rand-") || s.labels["host"] == "probe.test")),
        "tracked series: {tracked:?}"
    );
    assert_eq!(
        other_count,
        (TOTAL - tracked.len()) as f64,
        "__other__ count"
    );
    assert_eq!(
        metric_sum(&text, "portcullis_decisions_total", &[("action", "deny")]),
        Some(TOTAL as f64)
    );
    assert!(
        rss_warm > 0.0 && rss_after <= 1.5 * rss_warm + 8.0 * 1048576.0,
        "RSS grew with distinct names: {rss_warm} after {WARMUP}, {rss_after} after {TOTAL}"
    );
}

// ---------------------------------------------------------------------------
// 5. /readyz while draining

#[test]
fn readyz_is_503_while_draining_and_exit_is_clean() {
    if !have_python() {
        return;
    }
    let ca = TestCa::new();
    let up = Upstream::start(&ca);
    let mut proxy = Proxy::start(&config(Some(&up), &[("grace_period_ms", 10_000)], ""));
    let admin = proxy.admin_addr();
    let status = |path: &str| http_get(admin, path).map(|r| r.status).ok();
    assert_eq!(status("/readyz"), Some(200));

    let authority = format!("allowed.test:{}", up.http_port());
    let (mut tunnel, head) = connect_via(proxy.addr(), &authority);
    assert_eq!(head.status, 200, "CONNECT {authority}: {head:?}");
    let get = |s: &mut TcpStream| {
        write!(s, "GET /hello.txt HTTP/1.1\r\nHost: {authority}\r\n\r\n").unwrap();
        let resp = read_response(s).expect("GET through the tunnel");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, support::HELLO);
    };
    get(&mut tunnel);

    proxy.terminate();
    let mut last = None;
    let draining = wait_until(METRIC_TIMEOUT, || {
        last = status("/readyz");
        last == Some(503)
    });
    assert!(draining, "/readyz after SIGTERM: {last:?}");
    assert_eq!(status("/healthz"), Some(200), "/healthz while draining");
    let active = proxy.metric("portcullis_connections_active", &[("listener", "proxy")]);
    assert_eq!(active, 1.0, "the open tunnel while draining");
    // The tunnel still carries traffic, and the process waits for it.
    get(&mut tunnel);
    assert!(proxy.is_running(), "exited with a tunnel open");

    tunnel.shutdown(Shutdown::Both).unwrap();
    drop(tunnel);
    let exit = proxy
        .wait_exit(Duration::from_secs(30))
        .expect("portcullis did not exit after its last tunnel closed");
    assert!(exit.success(), "exit status {exit}");
}
