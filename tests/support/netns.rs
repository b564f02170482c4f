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

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::host::{in_ci, is_root, require, tool_works};
use super::metrics::{metric_sum, wait_value};
use super::process::{Lines, client_command, output_text, pipes, printed, run_command};
use super::proxy::{Listening, portcullis_run, wait_ready};
use super::tls::TestCa;
use super::upstream::{Site, ready_ports};

// The nettools clients and servers are `Topology` methods too; tests import
// them from here with the rest of the namespace harness.
#[allow(unused_imports)]
pub use super::nettools::{Echo, TcpOpts, TcpResult, background_tcp_result, hex, unhex};

/// Deadline for set-up commands (`ip`, `nft`, `render`).
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
static SEQ: AtomicUsize = AtomicUsize::new(0);

// ---------------------------------------------------------------------------
// Root and tools

/// True when root and the tools are there; otherwise prints
/// `SKIPPED: TEST needs root (network namespaces)` and returns false, or
/// panics when `CI=true`.
pub fn require_root(test: &str) -> bool {
    if !is_root() {
        let why = format!("{test} needs root (network namespaces)");
        if in_ci() {
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

/// `ip netns exec NAME PROGRAM` with proxy variables removed; add the arguments.
fn netns_exec(name: &str, program: &str) -> Command {
    let mut cmd = client_command("ip");
    cmd.args(["netns", "exec", name, program]);
    cmd
}

/// Deletes a namespace (best effort: it may be gone already).
fn delete_netns(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
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
        Topology::create_named("pcl", layout)
    }

    /// [`Topology::create`] with namespace names starting with `prefix`
    /// (then the pid and a sequence number): a test's own namespaces are
    /// recognisable in `ip netns list`.
    pub fn create_named(prefix: &str, layout: Layout) -> Topology {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let base = format!("{prefix}{}n{seq}", std::process::id());
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
                delete_netns(&name);
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
        netns_exec(self.name(side), program)
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
        let (stdout, stderr) = pipes(&mut child);
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
        self.start_portcullis_as(config, &[])
    }

    /// [`Topology::start_portcullis`], with `portcullis run` started by
    /// `wrap` (a program and its arguments, e.g. `setpriv` with another
    /// user and capability set; empty: as root). With a wrapper the
    /// scratch directory and config are made readable to every user.
    pub fn start_portcullis_as(&self, config: &str, wrap: &[&str]) -> Portcullis {
        let bin = env!("CARGO_BIN_EXE_portcullis");
        let config_path = self.dir().join("portcullis.toml");
        std::fs::write(&config_path, config).unwrap();
        if !wrap.is_empty() {
            use std::os::unix::fs::PermissionsExt;
            let open = |path: &Path, mode| {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
            };
            open(self.dir(), 0o755);
            open(&config_path, 0o644);
        }
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

        let run = portcullis_run(&config_path);
        let p = match wrap.split_first() {
            None => self.spawn(Side::Gateway, run),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(run.get_program()).args(run.get_args());
                for (k, v) in run.get_envs() {
                    match v {
                        Some(v) => cmd.env(k, v),
                        None => cmd.env_remove(k),
                    };
                }
                self.spawn(Side::Gateway, cmd)
            }
        };
        if !wait_ready(&p.stdout) {
            panic!(
                "portcullis did not print `ready`\nconfig:\n{config}\n{}",
                printed(&p.stdout, &p.stderr)
            );
        }
        let listening = Listening::parse(&p.stdout.snapshot()).expect("listening address");
        Portcullis {
            ns: self.name(Side::Gateway).to_string(),
            admin: listening.admin.expect("no `listening admin ADDR` line"),
            transparent: listening
                .transparent
                .expect("no `listening transparent ADDR` line"),
            ruleset,
            proc: p,
        }
    }

    /// Starts `tests/fixtures/upstream.py` in the server namespace on `ip`,
    /// with a certificate from `ca` for `names`.
    pub fn start_upstream(&self, ca: &TestCa, ip: Ipv4Addr, names: &[&str]) -> NsUpstream {
        let site = Site::create(&self.dir().join(format!("upstream-{ip}")), ca, names);
        std::fs::write(site.www.join("name.txt"), format!("{}\n", names[0])).unwrap();
        let p = self.spawn(Side::Server, site.serve_command(ip));
        let Some((https_port, http_port)) = ready_ports(&p.stdout) else {
            panic!(
                "upstream.py on {ip} did not become ready\n{}",
                printed(&p.stdout, &p.stderr)
            );
        };
        NsUpstream {
            ip,
            https_port,
            http_port,
            blob: site.blob,
            proc: p,
        }
    }
}

/// Kills and reaps `children`, then deletes the namespaces in `created`
/// and their `/etc/netns` folders: what every lab does when it drops.
pub fn tear_down(children: &Mutex<Vec<Child>>, created: &[String]) {
    let mut children = std::mem::take(&mut *children.lock().unwrap_or_else(|e| e.into_inner()));
    for child in &mut children {
        let _ = child.kill();
    }
    for child in &mut children {
        let _ = child.wait();
    }
    for name in created {
        delete_netns(name);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        tear_down(&self.children, &self.created);
    }
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
            netns_exec(&self.ns, "curl").args([
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
        wait_value(timeout, pred, || self.metric(name, labels))
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
        netns_exec(&self.name, program)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}
