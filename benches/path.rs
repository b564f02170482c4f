//! Benchmarks the per-connection decision path, stage by stage and whole.
//!
//! Stages: ClientHello sniff (a real Chrome capture) → SNI; `Policy::decide`
//! on the embedded Azure ML profile (default scenarios); the metrics touched
//! per connection (decision counter, byte counters); the JSON access-log line
//! (`AccessLog::json_line`, what `emit` writes, into `io::sink`); and all of
//! them together (`path/whole/*`), which the issue
//! wants under 2 µs. Also an HTTP/1.1 request-head parse (~300 B).
//!
//! Two whole paths: `denied` runs the capture as recorded (SNI
//! `www.google.com`, which the profile does not allow); `allowed` runs the
//! same bytes with the 14-byte name replaced by `www.azureml.ms` (every
//! length field stays valid), which `*.azureml.ms` allows.
//!
//! Each runs twice: on the profile alone (ids as above) and with client
//! groups in use (`.../groups`: three groups, one auditing, and rules for
//! single groups on the very keys decided, so the walk meets their grants;
//! the client is in one group). Both look the client's groups up once per
//! connection (`Policy::client`, as admission does) and decide with
//! `decide_for`, as the listeners do.
//!
//! Each set-up asserts the expected answer (SNI, verdict, rule, counter
//! values, the log line's fields), so a broken stage fails instead of
//! looking fast. Run: `cargo bench --bench path` (under a minute);
//! `cargo test --bench path` runs every bench once.

use std::hint::black_box;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::classify::{Sniff, parse_http_head, sniff};
use portcullis::config::{Config, Protocol, Source};
use portcullis::listen::{AccessLog, Close};
use portcullis::metrics::{Listener, Metrics, Via};
use portcullis::policy::{Client, CompileInput, Decision, Dest, Policy, Reason, Target, Verdict};
use portcullis::tunnel::CloseReason;

const CHROME: &str = include_str!("../tests/data/clienthello-chrome.hex");
/// Budget passed to `sniff`, as in the listeners (`[limits] sniff_max_bytes` default).
const MAX_LEN: usize = 16 * 1024;
const RECORDED_SNI: &str = "www.google.com";
/// Same length as [`RECORDED_SNI`], allowed by the profile's `*.azureml.ms`.
const ALLOWED_SNI: &str = "www.azureml.ms";

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim().as_bytes();
    assert!(s.len().is_multiple_of(2), "odd hex length");
    s.chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).expect("ascii hex");
            u8::from_str_radix(text, 16).expect("hex digit")
        })
        .collect()
}

/// The capture with its (single) SNI replaced by a name of the same length.
fn with_sni(hello: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at: Vec<usize> = hello
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{from} occurs once in the capture");
    let mut out = hello.to_vec();
    out[at[0]..at[0] + to.len()].copy_from_slice(to.as_bytes());
    out
}

/// A typical ~300-byte request head.
fn http_request() -> Vec<u8> {
    let req = b"GET /simple/numpy/ HTTP/1.1\r\n\
Host: pypi.org\r\n\
User-Agent: pip/24.0 {\"ci\":null,\"cpu\":\"x86_64\",\"implementation\":{\"name\":\"CPython\"}}\r\n\
Accept: application/vnd.pypi.simple.v1+json, text/html;q=0.01\r\n\
Accept-Encoding: gzip, deflate\r\n\
Cache-Control: max-age=0\r\n\
Connection: keep-alive\r\n\r\n"
        .to_vec();
    assert!((250..=350).contains(&req.len()), "len {}", req.len());
    req
}

/// `[clients]` of both policies: the bench's client is served.
const CLIENTS: &str = "[clients]\nallow = [\"10.0.0.0/16\"]\n";

/// Client groups and rules for single groups on the keys the bench decides
/// (`*.azureml.ms`, `www.azureml.ms`), none of them the client's group.
const GROUPS: &str = r#"training = ["10.0.1.0/24"]
inference = { cidrs = ["10.0.3.0/24"], mode = "audit" }
gpu = ["10.0.1.128/25", "10.0.4.0/24"]

[[rule]]
name = "inference-alt-port"
hosts = ["*.azureml.ms"]
ports = [8443]
clients = ["inference"]

[[rule]]
name = "gpu-no-www"
hosts = ["www.azureml.ms"]
action = "deny"
clients = ["gpu"]

[[rule]]
name = "training-extra"
hosts = ["*.azureml.ms"]
clients = ["training"]
"#;

/// The embedded profile, `[clients]`, and `extra` after it.
fn azureml(extra: &str) -> Policy {
    let source = Source {
        name: "bench-path.toml".into(),
        text: format!(
            "[vars]\nregion = \"westus2\"\nstorage = \"mlstore\"\nacr = \"mlacr\"\nvnet = \"10.0.0.0/16\"\n{CLIENTS}{extra}"
        ),
    };
    let config = Config::parse(&source).expect("config parses");
    match Policy::compile(&config, &source, &CompileInput::default()) {
        Ok((policy, _warnings)) => policy,
        Err(diags) => panic!("azureml profile does not compile: {diags:#?}"),
    }
}

/// Reference for `access_log`: the same fields as one JSON object written
/// with `serde_json` straight into a reused buffer (no `tracing` layers).
#[derive(serde::Serialize)]
struct LineRef<'a> {
    timestamp_ms: u128,
    level: &'static str,
    target: &'static str,
    client: SocketAddr,
    listener: &'static str,
    method: &'a str,
    host: &'a str,
    port: u16,
    upstream: Option<SocketAddr>,
    verdict: &'static str,
    rule: &'a str,
    reason: &'static str,
    upload: u64,
    download: u64,
    duration_ms: u64,
    close: &'a str,
    ech: bool,
    generation: u64,
    message: &'static str,
}

fn sni_of(hello: &[u8]) -> Option<&str> {
    match sniff(hello, MAX_LEN) {
        Sniff::Tls { sni, .. } => sni,
        _ => None,
    }
}

fn decide(policy: &Policy, host: &str, client: Client) -> Decision {
    policy.decide_for(
        &Dest {
            target: Target::Name(host),
            port: 443,
            proto: Protocol::Tcp,
        },
        client,
    )
}

/// Everything a connection does besides I/O: sniff, decide, count, log.
/// Returns the decision so nothing is optimised away.
fn whole_path(
    hello: &[u8],
    policy: &Policy,
    metrics: &Metrics,
    client: SocketAddr,
    upstream: SocketAddr,
    started: Instant,
    out: &mut impl Write,
) -> Verdict {
    let Some(sni) = sni_of(hello) else {
        return Verdict::Deny;
    };
    // Once per connection, at admission.
    let me = policy.client(client.ip());
    let d = decide(policy, sni, me);
    let group = policy.client_group(me);
    metrics.decision_in(d.verdict, Via::Sni, d.reason, group);
    let (upload, download) = if d.verdict == Verdict::Allow {
        let up = metrics.bytes.with_label_values(&["upload"]);
        let down = metrics.bytes.with_label_values(&["download"]);
        up.inc_by(hello.len() as u64);
        down.inc_by(4096);
        (hello.len() as u64, 4096)
    } else {
        metrics.denied.record_in(sni, 443, group);
        (0, 0)
    };
    let line = AccessLog {
        client,
        listener: Listener::Transparent,
        policy,
        started,
        method: "TLS",
        host: sni,
        port: 443,
        upstream: (d.verdict == Verdict::Allow).then_some(upstream),
        decision: Some(&d),
        upload,
        download,
        close: if d.verdict == Verdict::Allow {
            Close::Tunnel(CloseReason::ClientClosed)
        } else {
            Close::Denied
        },
        ech: false,
        json: true,
    }
    .json_line(SystemTime::now());
    out.write_all(line.as_bytes()).expect("write");
    out.write_all(b"\n").expect("write");
    d.verdict
}

/// What one policy's benches need, checked in set-up.
struct Case {
    policy: Policy,
    client: Client,
    allowed: Decision,
}

/// Set-up checks for one policy: verdicts, the client's group, and that the
/// whole path counts and logs what it should.
fn case(
    policy: Policy,
    group: &str,
    hellos: (&[u8], &[u8]),
    addrs: (SocketAddr, SocketAddr),
) -> Case {
    let (client_addr, upstream) = addrs;
    let client = policy.client(client_addr.ip());
    assert!(client.served(), "the bench's client is served");
    assert_eq!(policy.client_group(client), group);
    let denied = decide(&policy, RECORDED_SNI, client);
    assert_eq!(
        (denied.verdict, denied.reason),
        (Verdict::Deny, Reason::NoRule)
    );
    let allowed = decide(&policy, ALLOWED_SNI, client);
    assert_eq!(
        (allowed.verdict, allowed.reason),
        (Verdict::Allow, Reason::RuleMatched)
    );
    assert!(allowed.rule.is_some(), "an allow names its rule");
    let metrics = Metrics::new(500);
    let mut captured = Vec::new();
    let started = Instant::now();
    for (hello, verdict) in [(hellos.0, Verdict::Allow), (hellos.1, Verdict::Deny)] {
        let got = whole_path(
            hello,
            &policy,
            &metrics,
            client_addr,
            upstream,
            started,
            &mut captured,
        );
        assert_eq!(got, verdict);
    }
    let logged = String::from_utf8(captured).expect("utf-8");
    let lines: Vec<&str> = logged.lines().collect();
    assert_eq!(lines.len(), 2, "one access line per connection: {logged}");
    for (line, host, verdict) in [
        (lines[0], ALLOWED_SNI, "allow"),
        (lines[1], RECORDED_SNI, "deny"),
    ] {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(v["host"], host, "{line}");
        assert_eq!(v["verdict"], verdict, "{line}");
        assert_eq!(v["client_group"], group, "{line}");
        assert_eq!(v["target"], "portcullis::access", "{line}");
    }
    assert_eq!(metrics.bytes.with_label_values(&["upload"]).get(), 517);
    assert_eq!(metrics.denied.tracked(), 1);
    let text = metrics.render();
    let series = format!("client_group=\"{group}\"");
    assert!(
        text.lines()
            .any(|l| l.starts_with("portcullis_decisions_total{")
                && l.contains(&series)
                && l.ends_with(" 1")),
        "decisions counted under {series}"
    );
    Case {
        policy,
        client,
        allowed,
    }
}

fn benches(c: &mut Criterion) {
    let recorded = unhex(CHROME);
    assert_eq!(recorded.len(), 517);
    let allowed_hello = with_sni(&recorded, RECORDED_SNI, ALLOWED_SNI);
    assert_eq!(sni_of(&recorded), Some(RECORDED_SNI));
    assert_eq!(sni_of(&allowed_hello), Some(ALLOWED_SNI));
    let client: SocketAddr = "10.0.1.17:50514".parse().expect("addr");
    let upstream: SocketAddr = "20.42.1.9:443".parse().expect("addr");
    let hellos = (allowed_hello.as_slice(), recorded.as_slice());
    let plain = case(azureml(""), "", hellos, (client, upstream));
    let grouped = case(azureml(GROUPS), "training", hellos, (client, upstream));
    let (policy, allowed) = (&plain.policy, plain.allowed);
    let rule = allowed.rule.map(|r| policy.rule(r).name.clone());
    let metrics = Metrics::new(500);
    let started = Instant::now();

    let req = http_request();
    let head = parse_http_head(&req)
        .expect("valid head")
        .expect("complete head");
    assert_eq!(
        (head.method, head.host, head.head_len),
        ("GET", Some("pypi.org"), req.len())
    );

    let mut g = c.benchmark_group("path");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("sniff/chrome", |b| b.iter(|| sni_of(black_box(&recorded))));
    for (suffix, case) in [("", &plain), ("/groups", &grouped)] {
        let p = &case.policy;
        g.bench_function(format!("client{suffix}"), |b| {
            b.iter(|| p.client(black_box(client.ip())))
        });
        g.bench_function(format!("decide/denied{suffix}"), |b| {
            b.iter(|| decide(p, black_box(RECORDED_SNI), case.client))
        });
        g.bench_function(format!("decide/allowed{suffix}"), |b| {
            b.iter(|| decide(p, black_box(ALLOWED_SNI), case.client))
        });
        for (what, hello) in [("allowed", &allowed_hello), ("denied", &recorded)] {
            g.bench_function(format!("whole/{what}{suffix}"), |b| {
                b.iter(|| {
                    whole_path(
                        black_box(hello),
                        p,
                        &metrics,
                        client,
                        upstream,
                        started,
                        &mut io::sink(),
                    )
                })
            });
        }
    }
    g.bench_function("metrics", |b| {
        b.iter(|| {
            metrics.decision(allowed.verdict, Via::Sni, allowed.reason);
            let up = metrics.bytes.with_label_values(&["upload"]);
            let down = metrics.bytes.with_label_values(&["download"]);
            up.inc_by(black_box(517));
            down.inc_by(black_box(4096));
        })
    });
    g.bench_function("access_log", |b| {
        b.iter(|| {
            let line = AccessLog {
                client,
                listener: Listener::Transparent,
                policy,
                started,
                method: "TLS",
                host: black_box(ALLOWED_SNI),
                port: 443,
                upstream: Some(upstream),
                decision: Some(&allowed),
                upload: 517,
                download: 4096,
                close: Close::Tunnel(CloseReason::ClientClosed),
                ech: false,
                json: true,
            }
            .json_line(SystemTime::now());
            io::sink().write_all(line.as_bytes()).expect("sink");
        })
    });
    let rule_name = rule.as_deref().unwrap_or("-");
    let mut line = Vec::with_capacity(512);
    let by_hand = |line: &mut Vec<u8>| {
        line.clear();
        let fields = LineRef {
            timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            level: "INFO",
            target: "portcullis::access",
            client,
            listener: Listener::Transparent.as_str(),
            method: "TLS",
            host: black_box(ALLOWED_SNI),
            port: 443,
            upstream: Some(upstream),
            verdict: allowed.verdict.as_str(),
            rule: rule_name,
            reason: allowed.reason.as_str(),
            upload: 517,
            download: 4096,
            duration_ms: started.elapsed().as_millis() as u64,
            close: "client_closed",
            ech: false,
            generation: policy.generation(),
            message: "connection closed",
        };
        serde_json::to_writer(&mut *line, &fields).expect("serialise");
        line.push(b'\n');
        io::sink().write_all(line).expect("sink");
    };
    by_hand(&mut line);
    let v: serde_json::Value = serde_json::from_slice(&line).expect("reference line is JSON");
    assert_eq!(
        (v["host"].as_str(), v["client"].as_str()),
        (Some(ALLOWED_SNI), Some("10.0.1.17:50514"))
    );
    g.bench_function("reference/serde_json_line", |b| {
        b.iter(|| by_hand(&mut line))
    });
    g.bench_function("http_head/pip", |b| {
        b.iter(|| parse_http_head(black_box(&req)))
    });
    g.finish();
}

criterion_group!(path, benches);
criterion_main!(path);
