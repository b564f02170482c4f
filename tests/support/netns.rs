//! Network namespaces for transparent-mode tests (root only):
//!
//! ```text
//!  client ns ──veth── gateway ns ──veth── server ns
//!  (curl, openssl,    (portcullis run,    (upstream.py HTTPS+HTTP per address,
//!   nettools.py)       render nftables      nettools.py TCP/UDP echo)
//!                      applied, forwarding)
//! ```
//!
//! [`Topology::create`] builds the three namespaces from a [`Layout`] the
//! test chooses (names carry the pid and a sequence number, so concurrent
//! test processes never collide), gives each `/etc/netns/NAME/resolv.conf`
//! (`nameserver 127.0.0.1`: nothing resolves), routes client and server by
//! default via the gateway and enables forwarding there. Nothing routes out
//! of the namespaces: none of them has an interface to the host.
//!
//! Every process runs through `ip netns exec` and is owned by the
//! [`Topology`]; dropping it (also on panic) kills them, deletes the
//! namespaces and removes their `/etc/netns` directories.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::{
    HELLO, Lines, TestCa, blob_bytes, client_command, metric_sum, output_text, require,
    run_command, tool_works, wait_until,
};

/// Deadline for set-up commands (`ip`, `nft`, `render`).
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline for a child to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

static SEQ: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------
// Root and tools

/// Whether this process runs with uid 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// True when root and the tools are there; otherwise prints
/// `SKIPPED: TEST needs root (network namespaces)` and returns false, or
/// panics when `CI=true`.
pub fn require_root(test: &str) -> bool {
    if !is_root() {
        let why = format!("{test} needs root (network namespaces)");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return false;
    }
    require(tool_works("ip", &["-V"]), "ip (iproute2) not found")
        && require(tool_works("nft", &["--version"]), "nft not found")
        && require(tool_works("python3", &["--version"]), "python3 not found")
        && require(tool_works("curl", &["--version"]), "curl not found")
        && require(tool_works("openssl", &["version"]), "openssl not found")
}

/// Runs `cmd` and panics with its output unless it succeeds.
fn must(cmd: &mut Command) -> Output {
    let out = run_command(cmd, None, SETUP_TIMEOUT);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        output_text(&out)
    );
    out
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a hex string (panics on bad input: test data).
pub fn unhex(text: &str) -> Vec<u8> {
    let text = text.trim();
    assert!(text.len().is_multiple_of(2), "odd hex length: {text:?}");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn nettools() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nettools.py")
}

// ---------------------------------------------------------------------------
// Layout and topology

/// Addresses of the three namespaces, chosen by the test.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The client's address (client side subnet).
    pub client: Ipv4Addr,
    /// The gateway's address on the client side (the client's default route).
    pub gateway_client_side: Ipv4Addr,
    /// Prefix length of the client side subnet.
    pub client_prefix: u8,
    /// The gateway's address on the server side (the server's default route).
    pub gateway_server_side: Ipv4Addr,
    /// Addresses of the server namespace (all on its one interface).
    pub servers: Vec<Ipv4Addr>,
    /// Prefix length of the server side subnet.
    pub server_prefix: u8,
}

/// Which namespace a command runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Where clients run.
    Client,
    /// Where portcullis runs.
    Gateway,
    /// Where upstream servers run.
    Server,
}

/// Three namespaces joined by veth pairs, and every process started in them.
pub struct Topology {
    /// The addresses.
    pub layout: Layout,
    names: [String; 3],
    /// Namespaces created so far (torn down in Drop, even after a partial set-up).
    created: Vec<String>,
    children: Mutex<Vec<Child>>,
    dir: tempfile::TempDir,
}

/// A process started in a namespace: its pid and output lines.
pub struct Spawned {
    /// Process id (of the program itself: `ip netns exec` execs it).
    pub pid: u32,
    /// stdout lines.
    pub stdout: Lines,
    /// stderr lines.
    pub stderr: Lines,
}

impl Topology {
    /// Builds the namespaces, links, addresses and routes; panics on failure
    /// (after tearing down what was built).
    pub fn create(layout: Layout) -> Topology {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let base = format!("pcl{}n{seq}", std::process::id());
        let names = [format!("{base}c"), format!("{base}g"), format!("{base}s")];
        let mut topo = Topology {
            layout,
            names,
            created: Vec::new(),
            children: Mutex::new(Vec::new()),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for name in topo.names.clone() {
            if Path::new("/run/netns").join(&name).exists() {
                // Left over by a killed run with the same pid.
                let _ = run_command(
                    Command::new("ip").args(["netns", "del", &name]),
                    None,
                    SETUP_TIMEOUT,
                );
            }
            must(Command::new("ip").args(["netns", "add", &name]));
            topo.created.push(name.clone());
            let etc = Path::new("/etc/netns").join(&name);
            std::fs::create_dir_all(&etc).expect("create /etc/netns/NAME");
            std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")
                .expect("write resolv.conf");
            must(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        }
        topo.wire();
        topo
    }

    fn wire(&self) {
        let [c, g, s] = &self.names;
        let l = &self.layout;
        // client eth0 <-> gateway "toc"; gateway "tos" <-> server eth0.
        must(Command::new("ip").args([
            "-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "toc", "netns", g,
        ]));
        must(Command::new("ip").args([
            "-n", s, "link", "add", "eth0", "type", "veth", "peer", "name", "tos", "netns", g,
        ]));
        let cp = l.client_prefix;
        let sp = l.server_prefix;
        self.ip(
            Side::Client,
            &["addr", "add", &format!("{}/{cp}", l.client), "dev", "eth0"],
        );
        self.ip(
            Side::Gateway,
            &[
                "addr",
                "add",
                &format!("{}/{cp}", l.gateway_client_side),
                "dev",
                "toc",
            ],
        );
        self.ip(
            Side::Gateway,
            &[
                "addr",
                "add",
                &format!("{}/{sp}", l.gateway_server_side),
                "dev",
                "tos",
            ],
        );
        for server in &l.servers {
            self.ip(
                Side::Server,
                &["addr", "add", &format!("{server}/{sp}"), "dev", "eth0"],
            );
        }
        self.ip(Side::Client, &["link", "set", "eth0", "up"]);
        self.ip(Side::Gateway, &["link", "set", "toc", "up"]);
        self.ip(Side::Gateway, &["link", "set", "tos", "up"]);
        self.ip(Side::Server, &["link", "set", "eth0", "up"]);
        self.ip(
            Side::Client,
            &[
                "route",
                "add",
                "default",
                "via",
                &l.gateway_client_side.to_string(),
            ],
        );
        self.ip(
            Side::Server,
            &[
                "route",
                "add",
                "default",
                "via",
                &l.gateway_server_side.to_string(),
            ],
        );
        must(
            self.exec(Side::Gateway, "sysctl")
                .args(["-qw", "net.ipv4.ip_forward=1"]),
        );
    }

    /// The namespace name of a side.
    pub fn name(&self, side: Side) -> &str {
        match side {
            Side::Client => &self.names[0],
            Side::Gateway => &self.names[1],
            Side::Server => &self.names[2],
        }
    }

    /// `ip -n NS ARGS...`, which must succeed.
    pub fn ip(&self, side: Side, args: &[&str]) {
        must(Command::new("ip").arg("-n").arg(self.name(side)).args(args));
    }

    /// `ip netns exec NS PROGRAM` with proxy variables removed; add the arguments.
    pub fn exec(&self, side: Side, program: &str) -> Command {
        let mut cmd = client_command("ip");
        cmd.args(["netns", "exec", self.name(side), program]);
        cmd
    }

    /// Runs `PROGRAM ARGS` in a namespace to completion (killed after `timeout`).
    pub fn run(&self, side: Side, program: &str, args: &[&str], timeout: Duration) -> Output {
        run_command(self.exec(side, program).args(args), None, timeout)
    }

    /// Starts a long-running process in a namespace (stdin kept open); the
    /// topology kills it on drop.
    pub fn spawn(&self, side: Side, cmd: Command) -> Spawned {
        let mut full = self.exec(side, cmd.get_program().to_str().expect("utf-8 program"));
        full.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => full.env(k, v),
                None => full.env_remove(k),
            };
        }
        full.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = full
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {full:?}: {e}"));
        let stdout = Lines::spawn_reader(child.stdout.take().unwrap());
        let stderr = Lines::spawn_reader(child.stderr.take().unwrap());
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Spawned {
            pid,
            stdout,
            stderr,
        }
    }

    /// A scratch directory removed with the topology.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Loads an nftables ruleset into a namespace (`nft -f`).
    pub fn nft_apply(&self, side: Side, name: &str, ruleset: &str) {
        let path = self.dir().join(name);
        std::fs::write(&path, ruleset).unwrap();
        must(self.exec(side, "nft").arg("-f").arg(&path));
    }

    /// `nft list ruleset` in a namespace.
    pub fn nft_list(&self, side: Side) -> String {
        let out = must(self.exec(side, "nft").args(["list", "ruleset"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    // -----------------------------------------------------------------------
    // Processes

    /// Writes `config`, renders its nftables ruleset in the gateway
    /// namespace, checks and applies it there, then starts `portcullis run`
    /// there and waits for `ready`.
    pub fn start_portcullis(&self, config: &str) -> Portcullis {
        let bin = env!("CARGO_BIN_EXE_portcullis");
        let config_path = self.dir().join("portcullis.toml");
        std::fs::write(&config_path, config).unwrap();
        let rendered = must(
            self.exec(Side::Gateway, bin)
                .args(["render", "nftables", "-c"])
                .arg(&config_path),
        );
        let ruleset = String::from_utf8(rendered.stdout).expect("utf-8 ruleset");
        let path = self.dir().join("portcullis.nft");
        std::fs::write(&path, &ruleset).unwrap();
        must(
            self.exec(Side::Gateway, "nft")
                .arg("-c")
                .arg("-f")
                .arg(&path),
        );
        must(self.exec(Side::Gateway, "nft").arg("-f").arg(&path));

        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .env_remove("RUST_LOG");
        let p = self.spawn(Side::Gateway, cmd);
        let ready = p.stdout.wait(READY_TIMEOUT, |lines| {
            lines.iter().any(|l| l.trim() == "ready")
        });
        if !ready {
            p.stderr.wait(Duration::from_secs(2), |_| false);
            panic!(
                "portcullis did not print `ready`\nconfig:\n{config}\nstdout:\n{}\nstderr:\n{}",
                p.stdout.snapshot().join("\n"),
                p.stderr.snapshot().join("\n")
            );
        }
        let mut admin = None;
        let mut transparent = None;
        for line in p.stdout.snapshot() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["listening", kind, addr] = words[..] {
                let addr: SocketAddr = addr.parse().expect("listening address");
                match kind {
                    "admin" => admin = Some(addr),
                    "transparent" => transparent = Some(addr),
                    _ => {}
                }
            }
        }
        Portcullis {
            ns: self.name(Side::Gateway).to_string(),
            admin: admin.expect("no `listening admin ADDR` line"),
            transparent: transparent.expect("no `listening transparent ADDR` line"),
            ruleset,
            proc: p,
        }
    }

    /// Starts `tests/fixtures/upstream.py` in the server namespace on `ip`,
    /// with a certificate from `ca` for `names`.
    pub fn start_upstream(&self, ca: &TestCa, ip: Ipv4Addr, names: &[&str]) -> NsUpstream {
        let root = self.dir().join(format!("upstream-{ip}"));
        let www = root.join("www");
        let git_root = root.join("git");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::create_dir_all(&git_root).unwrap();
        let blob = blob_bytes();
        std::fs::write(www.join("blob"), &blob).unwrap();
        std::fs::write(www.join("hello.txt"), HELLO).unwrap();
        std::fs::write(www.join("name.txt"), format!("{}\n", names[0])).unwrap();
        let (cert, key) = ca.leaf(names);
        let mut cmd = Command::new("python3");
        cmd.arg("-u")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/upstream.py"
            ))
            .arg("serve")
            .arg("--host")
            .arg(ip.to_string())
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--www")
            .arg(&www)
            .arg("--git-root")
            .arg(&git_root);
        let p = self.spawn(Side::Server, cmd);
        let Some(ready) = p
            .stdout
            .wait_line(READY_TIMEOUT, |l| l.starts_with("ready "))
        else {
            p.stderr.wait(Duration::from_secs(2), |_| false);
            panic!(
                "upstream.py on {ip} did not become ready\nstdout: {:?}\nstderr:\n{}",
                p.stdout.snapshot(),
                p.stderr.snapshot().join("\n")
            );
        };
        let port = |key: &str| -> u16 {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {ready:?}"))
        };
        NsUpstream {
            ip,
            https_port: port("https="),
            http_port: port("http="),
            blob,
            proc: p,
        }
    }

    /// Starts `nettools.py serve` in the server namespace: TCP and UDP echo
    /// servers on `host` (`0.0.0.0` for every server address).
    pub fn start_echo(&self, host: Ipv4Addr, tcp: &[u16], udp: &[u16]) -> Echo {
        let mut cmd = Command::new("python3");
        cmd.arg("-u")
            .arg("-S")
            .arg(nettools())
            .arg("serve")
            .arg("--host")
            .arg(host.to_string());
        for p in tcp {
            cmd.arg("--tcp").arg(p.to_string());
        }
        for p in udp {
            cmd.arg("--udp").arg(p.to_string());
        }
        let p = self.spawn(Side::Server, cmd);
        if p.stdout
            .wait_line(READY_TIMEOUT, |l| l == "ready")
            .is_none()
        {
            p.stderr.wait(Duration::from_secs(2), |_| false);
            panic!(
                "nettools.py serve did not become ready\nstderr:\n{}",
                p.stderr.snapshot().join("\n")
            );
        }
        Echo { proc: p }
    }

    // -----------------------------------------------------------------------
    // Clients

    /// A raw TCP client in a namespace (`nettools.py tcp`).
    pub fn tcp(&self, side: Side, dest: SocketAddr, opts: &TcpOpts) -> TcpResult {
        let mut cmd = self.exec(side, "python3");
        cmd.arg("-S")
            .arg(nettools())
            .arg("tcp")
            .arg(dest.ip().to_string())
            .arg(dest.port().to_string())
            .arg("--send")
            .arg(hex(&opts.send))
            .arg("--want")
            .arg(opts.want.to_string())
            .arg("--timeout")
            .arg(format!("{}", opts.timeout.as_secs_f64()));
        if let Some(hello) = &opts.hello {
            cmd.arg("--hello").arg(hello.as_deref().unwrap_or("-"));
        }
        let out = run_command(&mut cmd, None, opts.timeout + Duration::from_secs(20));
        parse_tcp_result(&out)
    }

    /// Starts the same TCP client in the background (killed on drop).
    pub fn tcp_background(&self, side: Side, dest: SocketAddr, opts: &TcpOpts) -> Spawned {
        let mut cmd = Command::new("python3");
        cmd.arg("-S")
            .arg(nettools())
            .arg("tcp")
            .arg(dest.ip().to_string())
            .arg(dest.port().to_string())
            .arg("--send")
            .arg(hex(&opts.send))
            .arg("--want")
            .arg(opts.want.to_string())
            .arg("--timeout")
            .arg(format!("{}", opts.timeout.as_secs_f64()));
        self.spawn(side, cmd)
    }

    /// Sends one UDP datagram from the client namespace and waits up to
    /// `timeout` for an answer.
    pub fn udp(&self, dest: SocketAddr, data: &[u8], timeout: Duration) -> Option<Vec<u8>> {
        let out = run_command(
            self.exec(Side::Client, "python3")
                .arg("-S")
                .arg(nettools())
                .arg("udp")
                .arg(dest.ip().to_string())
                .arg(dest.port().to_string())
                .arg("--send")
                .arg(hex(data))
                .arg("--timeout")
                .arg(format!("{}", timeout.as_secs_f64())),
            None,
            timeout + Duration::from_secs(20),
        );
        assert!(out.status.success(), "udp client: {}", output_text(&out));
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("udp client prints JSON");
        v["received"].as_str().map(unhex)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for child in &mut children {
            let _ = child.kill();
        }
        for child in &mut children {
            let _ = child.wait();
        }
        for name in &self.created {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        }
    }
}

/// Options of the raw TCP client.
#[derive(Debug, Clone)]
pub struct TcpOpts {
    /// Bytes sent after connecting.
    pub send: Vec<u8>,
    /// Send a ClientHello (generated by Python's ssl) first: `Some(Some(sni))`
    /// or `Some(None)` for one without SNI.
    pub hello: Option<Option<String>>,
    /// Stop reading after this many bytes (0: read until EOF or timeout).
    pub want: usize,
    /// How long to read.
    pub timeout: Duration,
}

impl Default for TcpOpts {
    fn default() -> Self {
        TcpOpts {
            send: Vec::new(),
            hello: None,
            want: 0,
            timeout: Duration::from_secs(5),
        }
    }
}

/// What the raw TCP client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpResult {
    /// `ok` or the connect error.
    pub connect: String,
    /// Bytes received.
    pub received: Vec<u8>,
    /// `enough`, `eof`, `reset`, `timeout` or `error ...`.
    pub end: String,
    /// Milliseconds from the end of sending to the end of reading.
    pub elapsed_ms: u64,
}

fn parse_tcp_result(out: &Output) -> TcpResult {
    assert!(out.status.success(), "tcp client: {}", output_text(out));
    tcp_result_json(&String::from_utf8_lossy(&out.stdout))
}

fn tcp_result_json(text: &str) -> TcpResult {
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("tcp client JSON: {e}: {text:?}"));
    TcpResult {
        connect: v["connect"].as_str().unwrap_or_default().to_string(),
        received: unhex(v["received"].as_str().unwrap_or_default()),
        end: v["end"].as_str().unwrap_or_default().to_string(),
        elapsed_ms: v["elapsed_ms"].as_u64().unwrap_or_default(),
    }
}

/// Parses the output of a finished [`Topology::tcp_background`] client.
pub fn background_tcp_result(p: &Spawned, timeout: Duration) -> TcpResult {
    let done = p
        .stdout
        .wait_line(timeout, |l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "background tcp client printed nothing within {timeout:?}; stderr: {:?}",
                p.stderr.snapshot()
            )
        });
    tcp_result_json(&done)
}

// ---------------------------------------------------------------------------
// Handles

/// portcullis running in the gateway namespace.
pub struct Portcullis {
    ns: String,
    /// Admin listener (inside the gateway namespace).
    pub admin: SocketAddr,
    /// Transparent listener.
    pub transparent: SocketAddr,
    /// The ruleset `render nftables` printed (and that was applied).
    pub ruleset: String,
    proc: Spawned,
}

impl Portcullis {
    /// `/metrics`, fetched with curl inside the gateway namespace.
    pub fn metrics_text(&self) -> String {
        let out = run_command(
            client_command("ip").args([
                "netns",
                "exec",
                &self.ns,
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "5",
                &format!("http://{}/metrics", self.admin),
            ]),
            None,
            Duration::from_secs(15),
        );
        assert!(out.status.success(), "GET /metrics: {}", output_text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sum of the samples named `name` carrying all of `labels`; 0 when none.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics_text(), name, labels).unwrap_or(0.0)
    }

    /// Polls `metric` until `pred` holds or `timeout` passes; the last value.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let mut last = f64::NAN;
        wait_until(timeout, || {
            last = self.metric(name, labels);
            pred(last)
        });
        last
    }

    /// The JSON log lines (stderr).
    pub fn logs(&self) -> &Lines {
        &self.proc.stderr
    }

    /// Logs so far, one string, for assertion messages.
    pub fn logs_text(&self) -> String {
        self.proc.stderr.snapshot().join("\n")
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }
}

/// `upstream.py` on one server address.
pub struct NsUpstream {
    /// Its address.
    pub ip: Ipv4Addr,
    /// HTTPS port.
    pub https_port: u16,
    /// Plain HTTP port.
    pub http_port: u16,
    blob: Vec<u8>,
    proc: Spawned,
}

impl NsUpstream {
    /// `ip:https_port`.
    pub fn https_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.https_port))
    }

    /// `ip:http_port`.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.http_port))
    }

    /// The bytes of `/blob`.
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// Event lines (see upstream.py).
    pub fn log(&self) -> &Lines {
        &self.proc.stdout
    }

    /// Event lines so far.
    pub fn events(&self) -> Vec<String> {
        self.proc.stdout.snapshot()
    }

    /// How many connections it accepted (HTTPS and HTTP).
    pub fn accepts(&self) -> usize {
        self.events()
            .iter()
            .filter(|l| l.starts_with("https accept ") || l.starts_with("http accept "))
            .count()
    }
}

/// `nettools.py serve`: TCP and UDP echo servers.
pub struct Echo {
    proc: Spawned,
}

impl Echo {
    /// Event lines so far.
    pub fn events(&self) -> Vec<String> {
        self.proc.stdout.snapshot()
    }

    /// Event lines, to wait on.
    pub fn log(&self) -> &Lines {
        &self.proc.stdout
    }
}

/// Path of a file under `tests/`.
pub fn tests_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(rel)
}

/// One empty namespace (for `nft -c`), deleted on drop.
pub struct Scratch {
    name: String,
}

impl Scratch {
    /// Creates `pclPIDxSEQ`.
    pub fn create() -> Scratch {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("pcl{}x{seq}", std::process::id());
        must(Command::new("ip").args(["netns", "add", &name]));
        Scratch { name }
    }

    /// `ip netns exec NAME PROGRAM`; add the arguments.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = client_command("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
