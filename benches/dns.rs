//! DNS bench: cache-hit throughput of portcullis's DNS listener beside dnsmasq as a caching forwarder, in one run.
//!
//! Three children on 127.0.0.1, all on free ports: an authoritative
//! dnsmasq (`--no-resolv`, only the bench's records, TTL 3600 s); a
//! forwarding dnsmasq (`--server=127.0.0.1#AUTH`, its cache on), the
//! reference; and `portcullis run` with `[listen] dns` and `[dns] servers =
//! ["127.0.0.1:AUTH"]` on the embedded Azure ML profile plus a rule for the
//! bench's names. Both forwarders are warmed with every name, then the
//! authoritative server is stopped (SIGSTOP): from then on only a cache hit
//! can be answered, so a miss shows as a lost query and the run fails.
//!
//! Load is Debian's `dnsperf` (a real DNS load tool) sending A queries for
//! the bench's names in a loop, for `--secs` per run (default 3), alternating
//! the two targets `--reps` times (default 5; the order flips every
//! repetition). Each run reports queries/s and the server's CPU per query
//! (utime + stime from `/proc/PID/stat` before and after). The report is the
//! median of each, per target, and portcullis / dnsmasq.
//!
//! `cargo bench --bench dns -- [--reps N] [--secs S]` (env `DNS_REPS`,
//! `DNS_SECS`), or `benches/run-dns.sh` (builds release, installs the tools,
//! tees `target/dns-results.md`). Without `--bench` (`cargo test --benches`)
//! it runs the set-up check: answers from both forwarders, a refused name,
//! cache hits with the authoritative server stopped, and a short dnsperf run
//! against each with nothing lost; a few seconds. Skips (`SKIPPED: ...`)
//! without dnsmasq, dnsperf or a built portcullis; under `CI=true` that is
//! an error.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};

/// The names the bench asks for, each with its address at the authoritative server.
const NAMES: [(&str, Ipv4Addr); 4] = [
    ("bench-0.dnsbench.test", Ipv4Addr::new(20, 0, 0, 10)),
    ("bench-1.dnsbench.test", Ipv4Addr::new(20, 0, 0, 11)),
    ("bench-2.dnsbench.test", Ipv4Addr::new(20, 0, 0, 12)),
    ("bench-3.dnsbench.test", Ipv4Addr::new(20, 0, 0, 13)),
];
/// A name no rule allows: portcullis refuses it.
const DENIED: &str = "exfil.attacker.test";
/// The longest a child may take to start answering.
const START_LIMIT: Duration = Duration::from_secs(20);

/// A child killed (by its own pid) and reaped when dropped, with its temp dir.
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP or SIGCONT to this child only.
    fn signal(&self, sig: &str) -> Result<(), String> {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .map_err(|e| format!("kill {sig}: {e}"))?
            .success();
        ok.then_some(())
            .ok_or_else(|| format!("kill {sig} {} failed", self.pid()))
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both).
fn free_port() -> Result<u16, String> {
    for _ in 0..20 {
        let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let port = s.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no port free for both UDP and TCP".into())
}

/// One UDP query; `None` when nothing answers within `wait`.
fn ask(server: SocketAddr, name: &str, rtype: RecordType, wait: Duration) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket.set_read_timeout(Some(wait)).ok()?;
    let mut m = Message::query();
    m.metadata.id = 0x5151;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).ok()?, rtype));
    socket.send_to(&m.to_vec().ok()?, server).ok()?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).ok()?;
    Message::from_vec(&buf[..n])
        .ok()
        .filter(|r| r.metadata.id == 0x5151)
}

/// Whether `server` answers every bench name with its address.
fn answers_all(server: SocketAddr, wait: Duration) -> Result<(), String> {
    for (name, want) in NAMES {
        let r = ask(server, name, RecordType::A, wait)
            .ok_or_else(|| format!("{server}: no answer for {name}"))?;
        let got: Vec<Ipv4Addr> = (r.answers.iter())
            .filter_map(|a| match &a.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        if r.metadata.response_code != ResponseCode::NoError || got != [want] {
            return Err(format!(
                "{server}: {name} answered {:?} {got:?}, want NOERROR [{want}]",
                r.metadata.response_code
            ));
        }
    }
    Ok(())
}

/// Waits until the started `child` answers the bench's names at `addr`.
fn wait_answering(
    mut child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
) -> Result<Server, String> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if answers_all(addr, Duration::from_millis(300)).is_ok() {
            return Ok(Server {
                child,
                addr,
                _dir: dir,
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{addr}: exited ({status}) before answering"));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{addr}: did not answer within {START_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// dnsmasq on 127.0.0.1 with `extra` options (records, or an upstream);
/// tried on up to 5 ports, since a free port may be taken before dnsmasq
/// binds it (other tests run beside it).
fn start_dnsmasq(bin: &Path, extra: &[String]) -> Result<Server, String> {
    let mut last = String::new();
    for _ in 0..5 {
        match try_dnsmasq(bin, extra) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(format!("dnsmasq would not start: {last}"))
}

fn try_dnsmasq(bin: &Path, extra: &[String]) -> Result<Server, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port()?;
    let child = Command::new(bin)
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
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start dnsmasq: {e}"))?;
    wait_answering(child, SocketAddr::from(([127, 0, 0, 1], port)), dir)
}

/// The authoritative server: the bench's records, TTL 3600 s.
fn start_authoritative(bin: &Path) -> Result<Server, String> {
    let mut args = vec!["--local-ttl=3600".to_string()];
    args.extend(NAMES.map(|(n, a)| format!("--host-record={n},{a}")));
    start_dnsmasq(bin, &args)
}

/// The reference: a caching forwarder to the authoritative server.
fn start_forwarder(bin: &Path, auth: SocketAddr) -> Result<Server, String> {
    let args = [
        format!("--server={}#{}", auth.ip(), auth.port()),
        "--cache-size=10000".to_string(),
    ];
    start_dnsmasq(bin, &args)
}

/// The portcullis config: the Azure ML profile, a rule for the bench's
/// names, the DNS listener forwarding to the authoritative server.
fn portcullis_config(auth: SocketAddr) -> String {
    format!(
        r#"# Generated by benches/dns.rs.
[vars]
region = "westus2"
storage = "benchstore"
acr = "benchacr"
vnet = "10.0.0.0/16"

[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
dns = "127.0.0.1:0"

[clients]
allow = ["127.0.0.0/8"]

[policy]
profile = "azureml"

[[rule]]
name = "dns-bench"
description = "benches/dns.rs names"
hosts = ["*.dnsbench.test"]
ports = [443]

[dns]
servers = ["{auth}"]
"#
    )
}

/// `portcullis run` on [`portcullis_config`]; its `listening dns ADDR` line.
fn start_portcullis(bin: &Path, auth: SocketAddr) -> Result<Server, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = dir.path().join("portcullis.toml");
    fs::write(&config, portcullis_config(auth)).map_err(|e| e.to_string())?;
    let log = fs::File::create(dir.path().join("portcullis.log")).map_err(|e| e.to_string())?;
    let mut child = Command::new(bin)
        .args(["run", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + START_LIMIT;
    let mut addr = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "ready" => break,
            Ok(line) => {
                if let Some(a) = line.strip_prefix("listening dns ") {
                    addr = a.trim().parse::<SocketAddr>().ok();
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = fs::read_to_string(dir.path().join("portcullis.log")).unwrap_or_default();
                return Err(format!("portcullis did not print `ready`:\n{log}"));
            }
        }
    }
    let addr = addr.ok_or("portcullis printed no `listening dns` line")?;
    wait_answering(child, addr, dir)
}

/// What one dnsperf run measured, and the server's CPU over it.
#[derive(Clone, Copy, Debug)]
struct Run {
    qps: f64,
    completed: u64,
    lost: u64,
    /// Server CPU (user + system) per completed query, µs.
    cpu_us: f64,
}

/// One measured value of a run.
type Field = fn(&Run) -> f64;

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3,
    // utime 14, stime 15.
    let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Ok(num(11).ok_or("no utime")? + num(12).ok_or("no stime")?)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The number after `label` in dnsperf's statistics.
fn stat_value(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// dnsperf against `server` for `secs` (at most `max` passes over the
/// names), 4 sockets, 100 queries outstanding; every answer must be NOERROR.
fn dnsperf(bin: &Path, input: &Path, server: &Server, secs: f64, max: u64) -> Result<Run, String> {
    let before = cpu_ticks(server.pid())?;
    let out = Command::new(bin)
        .args(["-s", "127.0.0.1", "-p", &server.addr.port().to_string()])
        .arg("-d")
        .arg(input)
        .args(["-l", &format!("{secs}"), "-n", &max.to_string()])
        .args(["-c", "4", "-q", "100", "-t", "2"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("dnsperf: {e}"))?;
    let after = cpu_ticks(server.pid())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |label: &str| {
        stat_value(&text, label).ok_or_else(|| format!("dnsperf printed no {label:?}:\n{text}"))
    };
    let completed = get("Queries completed:")? as u64;
    let lost = get("Queries lost:")? as u64;
    let noerror = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("Response codes:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    if !out.status.success() || completed == 0 || noerror != completed {
        return Err(format!("dnsperf: not every answer NOERROR:\n{text}"));
    }
    let cpu_s = (after - before) as f64 / clock_ticks();
    Ok(Run {
        qps: get("Queries per second:")?,
        completed,
        lost,
        cpu_us: cpu_s * 1e6 / completed as f64,
    })
}

/// Everything a run needs: the three servers and dnsperf's input.
struct Bench {
    auth: Server,
    dnsmasq: Server,
    portcullis: Server,
    dnsperf: PathBuf,
    input: tempfile::NamedTempFile,
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// `target/{release,debug}/portcullis`, newest first; release only for the bench.
fn find_portcullis(release_only: bool) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), |d| root.join(d));
    let profiles: &[&str] = if release_only {
        &["release"]
    } else {
        &["release", "debug"]
    };
    (profiles.iter())
        .map(|p| target.join(p).join("portcullis"))
        .filter(|p| p.is_file())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
}

impl Bench {
    /// Starts the three servers, checks what each answers, warms both
    /// caches and stops the authoritative server; `Ok(None)`: a tool is missing.
    fn start(release_only: bool) -> Result<Option<Bench>, String> {
        let tools = (
            which("dnsmasq"),
            which("dnsperf"),
            find_portcullis(release_only),
        );
        let (Some(dnsmasq), Some(dnsperf), Some(portcullis)) = tools else {
            return Ok(None);
        };
        let auth = start_authoritative(&dnsmasq)?;
        let fwd = start_forwarder(&dnsmasq, auth.addr)?;
        let pc = start_portcullis(&portcullis, auth.addr)?;
        let refused = ask(pc.addr, DENIED, RecordType::A, Duration::from_secs(2))
            .ok_or("portcullis: no answer for a denied name")?;
        if refused.metadata.response_code != ResponseCode::Refused {
            return Err(format!("portcullis answered {DENIED}: {refused:?}"));
        }
        // Warm (wait_answering asked each name); then only the caches answer.
        auth.signal("-STOP")?;
        for s in [&fwd, &pc] {
            answers_all(s.addr, Duration::from_secs(2)).map_err(|e| {
                format!("not a cache hit with the authoritative server stopped: {e}")
            })?;
        }
        let mut input = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        for (name, _) in NAMES {
            use std::io::Write;
            writeln!(input, "{name} A").map_err(|e| e.to_string())?;
        }
        Ok(Some(Bench {
            auth,
            dnsmasq: fwd,
            portcullis: pc,
            dnsperf,
            input,
        }))
    }

    fn run(&self, server: &Server, secs: f64, max: u64) -> Result<Run, String> {
        let r = dnsperf(&self.dnsperf, self.input.path(), server, secs, max)?;
        if r.lost > 0 {
            return Err(format!("{} queries lost (a cache miss?): {r:?}", r.lost));
        }
        Ok(r)
    }
}

/// `--reps N` / `DNS_REPS` (default 5, 1..=50) and `--secs S` / `DNS_SECS` (default 3, 0.2..=30).
fn settings(args: &[String]) -> (usize, f64) {
    let arg = |flag: &str, env: &str| {
        (args.iter().position(|a| a == flag))
            .and_then(|i| args.get(i + 1).cloned())
            .or_else(|| std::env::var(env).ok())
    };
    let reps = arg("--reps", "DNS_REPS").and_then(|v| v.parse::<usize>().ok());
    let secs = arg("--secs", "DNS_SECS").and_then(|v| v.parse::<f64>().ok());
    (
        reps.unwrap_or(5).clamp(1, 50),
        secs.unwrap_or(3.0).clamp(0.2, 30.0),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The measurement: `reps` alternations, each target `secs` per run.
fn bench(args: &[String]) -> Result<(), String> {
    let (reps, secs) = settings(args);
    let b = Bench::start(true)?.ok_or(
        "needs dnsmasq, dnsperf and target/release/portcullis (benches/run-dns.sh installs and builds them)",
    )?;
    let load_before = loadavg();
    let mut runs: [Vec<Run>; 2] = Default::default();
    for rep in 0..reps {
        let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for t in order {
            let server = [&b.dnsmasq, &b.portcullis][t];
            let r = b.run(server, secs, 100_000_000)?;
            eprintln!(
                "  rep {rep} {}: {:.0} q/s, {:.2} µs CPU/query ({} queries)",
                ["dnsmasq", "portcullis"][t],
                r.qps,
                r.cpu_us,
                r.completed
            );
            runs[t].push(r);
        }
    }
    b.auth.signal("-CONT")?;
    print!("{}", report(&runs, reps, secs, &load_before));
    Ok(())
}

/// The markdown report: per-repetition values, medians, ratios.
fn report(runs: &[Vec<Run>; 2], reps: usize, secs: f64, load_before: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "DNS cache hits, commit {commit}: {reps} alternations × {secs} s per target, \
         dnsperf -c 4 -q 100 over {} names; load average before {load_before}, after {}.\n",
        NAMES.len(),
        loadavg()
    );
    out.push_str("| | dnsmasq (forwarder) | portcullis | portcullis / dnsmasq |\n");
    out.push_str("| --- | ---: | ---: | ---: |\n");
    let med = |t: usize, f: Field| median(runs[t].iter().map(f).collect());
    let rows: [(&str, Field, usize); 2] = [
        ("queries/s (median)", |r| r.qps, 0),
        ("server CPU per query, µs (median)", |r| r.cpu_us, 2),
    ];
    for (label, f, dp) in rows {
        let (d, p) = (med(0, f), med(1, f));
        let _ = writeln!(out, "| {label} | {d:.dp$} | {p:.dp$} | {:.2} |", p / d);
    }
    // Each alternation's own ratio: a slow spell of the machine hits both
    // runs of an alternation, less so two different ones.
    let pairs: Vec<f64> = (runs[0].iter().zip(&runs[1]))
        .map(|(d, p)| p.qps / d.qps)
        .collect();
    let shown: Vec<String> = pairs.iter().map(|r| format!("{r:.2}")).collect();
    let _ = writeln!(
        out,
        "| queries/s ratio per alternation ({}) | | | {:.2} (median) |",
        shown.join(", "),
        median(pairs.clone())
    );
    for (t, name) in ["dnsmasq", "portcullis"].iter().enumerate() {
        let qps: Vec<String> = runs[t].iter().map(|r| format!("{:.0}", r.qps)).collect();
        let cpu: Vec<String> = runs[t].iter().map(|r| format!("{:.2}", r.cpu_us)).collect();
        let _ = writeln!(
            out,
            "| {name} per run: queries/s; CPU µs/query | {}; {} | | |",
            qps.join(", "),
            cpu.join(", ")
        );
    }
    out
}

/// `cargo test --benches`: the set-up check and a short verified run each.
fn smoke() -> Result<(), String> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let Some(b) = Bench::start(false)? else {
        if in_ci {
            return Err("dnsmasq, dnsperf or target/*/portcullis missing in CI".into());
        }
        println!("SKIPPED: dns bench needs dnsmasq, dnsperf and a built portcullis");
        return Ok(());
    };
    for (name, server) in [("dnsmasq", &b.dnsmasq), ("portcullis", &b.portcullis)] {
        let r = b.run(server, 0.5, 2_000)?;
        println!(
            "dns smoke: {name} answered {} cache hits, none lost",
            r.completed
        );
    }
    b.auth.signal("-CONT")?;
    println!("dns smoke: 1 passed, 0 failed");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.iter().any(|a| a == "--bench") {
        bench(&args)
    } else {
        smoke()
    };
    if let Err(e) = result {
        eprintln!("dns bench: {e}");
        std::process::exit(1);
    }
}
