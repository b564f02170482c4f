//! High availability for real, as root: two gateways behind a kernel load
//! balancer, the local stand-in for Azure's internal load balancer with HA
//! ports, and a steady stream of new tunnels through its virtual address.
//!
//! ```text
//!  client ns ──veth── lb ns ──veth── gateway a ns (portcullis run, explicit :3128, admin :9090)
//!  10.77.0.2          10.77.9.9 ──── gateway b ns (the same config)
//!  (ha.py stream)     nft DNAT  ──── origin ns 10.77.3.2:7000 (ha.py origin)
//! ```
//!
//! The load balancer is nftables in the lb namespace: new flows to
//! 10.77.9.9:3128 are DNATed round robin (`numgen inc`) to the gateways a
//! health checker (a thread of this test) finds ready: it asks each
//! gateway's `/readyz` every 100 ms, as Azure's probe does every 5 s, and
//! rewrites the rule in one `nft -f` transaction when the set changes.
//! Established flows keep their gateway (conntrack), as Azure's do. This
//! kernel has no IPVS; DNAT keeps the balancer out of the TCP path too, as
//! Azure's is.
//!
//! Three phases, each with its own stream of tunnels (20 a second, each a
//! CONNECT, "ping", 300 ms, "pong"):
//!
//! - SIGTERM to one gateway, with a drain delay (3 s) well over the probe
//!   interval: no tunnel fails; the checker saw its `/readyz` turn 503
//!   while it still accepted.
//! - SIGKILL to one gateway: only tunnels it carried or was sent before the
//!   checker took it out fail; every tunnel started after that succeeds.
//! - SIGHUP to both: no tunnel fails.
//!
//! The assertions are on counts and on the order of events the client
//! itself reports (`mark` lines), never on durations. Without root each
//! test prints `SKIPPED: ...` (or panics when `CI=true`). Namespaces are
//! named `pha<pid>n<seq>X` and removed on drop, also on panic.

mod support;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::netns::tests_path;
use support::{
    Lines, client_command, is_root, output_text, pipes, printed, require, run_command, send_signal,
    tool_works, wait_ready, wait_until,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 9);
const PROXY_PORT: u16 = 3128;
const ADMIN_PORT: u16 = 9090;
const ORIGIN: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 2);
const ORIGIN_PORT: u16 = 7000;
/// The two gateways: name, namespace suffix, address, the lb's address facing it.
const GATEWAYS: [(&str, Ipv4Addr, Ipv4Addr); 2] = [
    (
        "a",
        Ipv4Addr::new(10, 77, 1, 2),
        Ipv4Addr::new(10, 77, 1, 1),
    ),
    (
        "b",
        Ipv4Addr::new(10, 77, 2, 2),
        Ipv4Addr::new(10, 77, 2, 1),
    ),
];
/// How often the checker asks `/readyz`.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// `[limits] drain_delay_ms`: 30 probe intervals.
const DRAIN_DELAY_MS: u64 = 3_000;
/// New tunnels a second, and how long each holds its connection open.
const RATE: u32 = 20;
const HOLD_MS: u32 = 300;
/// Tunnels a phase may start at most (bounds the test if a wait runs long).
const MAX_TUNNELS: u32 = 600;
/// Results each phase waits for after its last event.
const AFTER: usize = 20;
/// Deadline for any one wait (set-up commands, readiness, an event).
const WAIT: Duration = Duration::from_secs(30);

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn config() -> String {
    format!(
        "[listen]\nproxy = \"0.0.0.0:{PROXY_PORT}\"\nadmin = \"0.0.0.0:{ADMIN_PORT}\"\n\n\
         [clients]\nallow = [\"10.77.0.0/24\"]\n\n[policy]\nprofile = \"none\"\n\n\
         [[rule]]\nname = \"origin\"\nhosts = [\"origin.test\"]\nports = [{ORIGIN_PORT}]\nopaque = true\n\n\
         [[rule]]\nname = \"origin-address\"\ncidrs = [\"{ORIGIN}/32\"]\nports = [{ORIGIN_PORT}]\n\n\
         [resolve]\n\"origin.test\" = [\"{ORIGIN}\"]\n\n\
         [limits]\ndrain_delay_ms = {DRAIN_DELAY_MS}\ngrace_period_ms = 10000\n"
    )
}

// ---------------------------------------------------------------------------
// Namespaces and processes

/// Runs `cmd` and panics with its output unless it succeeds.
fn must(cmd: &mut Command) {
    let out = run_command(cmd, None, WAIT);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        output_text(&out)
    );
}

/// `ip netns exec NS PROGRAM` with proxy variables and RUST_LOG removed.
fn ns_exec(ns: &str, program: &str) -> Command {
    let mut cmd = client_command("ip");
    cmd.args(["netns", "exec", ns, program])
        .env_remove("RUST_LOG");
    cmd
}

/// A process in a namespace: its pid, stdin and output lines.
struct Proc {
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    stderr: Lines,
}

/// Five namespaces (client, lb, gateway a, gateway b, origin) wired to the
/// lb, and every process started in them; all removed on drop.
struct Lab {
    base: String,
    created: Vec<String>,
    children: Mutex<Vec<Child>>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn create() -> Lab {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let mut lab = Lab {
            base: format!("pha{}n{seq}", std::process::id()),
            created: Vec::new(),
            children: Mutex::new(Vec::new()),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for which in ["c", "l", "a", "b", "o"] {
            let name = lab.ns(which);
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            must(Command::new("ip").args(["netns", "add", &name]));
            lab.created.push(name.clone());
            let etc = PathBuf::from("/etc/netns").join(&name);
            std::fs::create_dir_all(&etc).expect("create /etc/netns/NAME");
            std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
            must(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        }
        let c = Ipv4Addr::new(10, 77, 0, 2);
        let lb_c = Ipv4Addr::new(10, 77, 0, 1);
        let lb_o = Ipv4Addr::new(10, 77, 3, 1);
        lab.link("c", "c0", lb_c, c);
        for (name, ip, lb_side) in GATEWAYS {
            lab.link(name, &format!("g{name}"), lb_side, ip);
        }
        lab.link("o", "o0", lb_o, ORIGIN);
        must(
            lab.exec("l", "sysctl")
                .args(["-qw", "net.ipv4.ip_forward=1"]),
        );
        lab
    }

    /// The namespace name of `which` (`c`, `l`, `a`, `b`, `o`).
    fn ns(&self, which: &str) -> String {
        format!("{}{which}", self.base)
    }

    /// A veth from the lb (`lb_if`, `lb_ip`) to `peer`'s eth0 (`peer_ip`),
    /// which routes everything through the lb.
    fn link(&self, peer: &str, lb_if: &str, lb_ip: Ipv4Addr, peer_ip: Ipv4Addr) {
        let (l, p) = (self.ns("l"), self.ns(peer));
        let ip = |ns: &str, args: &[&str]| must(Command::new("ip").arg("-n").arg(ns).args(args));
        ip(
            &l,
            &[
                "link", "add", lb_if, "type", "veth", "peer", "name", "eth0", "netns", &p,
            ],
        );
        ip(&l, &["addr", "add", &format!("{lb_ip}/24"), "dev", lb_if]);
        ip(&l, &["link", "set", lb_if, "up"]);
        ip(
            &p,
            &["addr", "add", &format!("{peer_ip}/24"), "dev", "eth0"],
        );
        ip(&p, &["link", "set", "eth0", "up"]);
        ip(&p, &["route", "add", "default", "via", &lb_ip.to_string()]);
    }

    /// `ip netns exec NS PROGRAM` in namespace `which`.
    fn exec(&self, which: &str, program: &str) -> Command {
        ns_exec(&self.ns(which), program)
    }

    /// Starts `program args` in a namespace; killed when the lab drops.
    fn spawn(&self, which: &str, program: &str, args: &[&str]) -> Proc {
        let mut cmd = self.exec(which, program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (stdout, stderr) = pipes(&mut child);
        let proc = Proc {
            pid: child.id(),
            stdin: child.stdin.take(),
            stdout,
            stderr,
        };
        self.children.lock().unwrap().push(child);
        proc
    }

    /// Waits for process `pid` (started by [`Lab::spawn`]) to exit.
    fn wait_exit(&self, pid: u32, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            let mut children = self.children.lock().unwrap();
            let child = children
                .iter_mut()
                .find(|c| c.id() == pid)
                .expect("our child");
            status = child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Starts `portcullis run` in gateway namespace `name` and waits for `ready`.
    fn start_gateway(&self, name: &'static str) -> Proc {
        let config = self.dir.path().join("portcullis.toml");
        let bin = env!("CARGO_BIN_EXE_portcullis");
        let p = self.spawn(name, bin, &["run", "-c", &config.to_string_lossy()]);
        assert!(
            wait_ready(&p.stdout),
            "gateway {name} did not print `ready`\n{}",
            printed(&p.stdout, &p.stderr)
        );
        p
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        support::netns::tear_down(&self.children, &self.created);
    }
}

// ---------------------------------------------------------------------------
// The load balancer and its health checker

/// What the checker has seen.
#[derive(Default)]
struct Health {
    /// Gateways in the lb's rule.
    up: [bool; 2],
    /// Each gateway's `/readyz` status codes, one entry per change (`000`: no answer).
    history: [Vec<String>; 2],
    /// Changes with their time, for the report.
    log: Vec<String>,
    stop: bool,
}

/// The health checker thread; stopped on drop.
struct Checker {
    state: Arc<(Mutex<Health>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    /// The clock of the log.
    started: Instant,
}

/// The lb's rule for the gateways in `up`: round robin over them.
fn lb_rule(up: [bool; 2]) -> String {
    let backends: Vec<Ipv4Addr> = GATEWAYS
        .iter()
        .zip(up)
        .filter(|(_, u)| *u)
        .map(|(g, _)| g.1)
        .collect();
    let action = if backends.is_empty() {
        "drop".to_string()
    } else {
        let map: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("{i} : {ip}"))
            .collect();
        format!(
            "dnat to numgen inc mod {} map {{ {} }}",
            backends.len(),
            map.join(", ")
        )
    };
    format!(
        "flush chain ip lb pre\nadd rule ip lb pre ip daddr {VIP} tcp dport {PROXY_PORT} {action}\n"
    )
}

impl Checker {
    fn start(lab: &Lab) -> Checker {
        let table = "table ip lb {\n\
            \tchain pre { type nat hook prerouting priority dstnat; policy accept; }\n\
            \tchain post { type nat hook postrouting priority srcnat; policy accept; }\n}\n";
        let path = lab.dir.path().join("lb.nft");
        std::fs::write(&path, table).unwrap();
        must(lab.exec("l", "nft").arg("-f").arg(&path));
        let state = Arc::new((Mutex::new(Health::default()), Condvar::new()));
        let (shared, lb) = (state.clone(), lab.ns("l"));
        let started = Instant::now();
        let thread = std::thread::spawn(move || check(&shared, &lb, &path, started));
        Checker {
            state,
            thread: Some(thread),
            started,
        }
    }

    /// Logs an event of the test (a signal) on the checker's clock.
    fn note(&self, what: &str) {
        let t = self.started.elapsed().as_secs_f64();
        let mut h = self.state.0.lock().unwrap();
        h.log.push(format!("{t:7.2}s {what}"));
    }

    /// Waits until `cond` holds on what the checker saw.
    fn wait(&self, what: &str, cond: impl Fn(&Health) -> bool) {
        let (lock, cv) = &*self.state;
        let deadline = Instant::now() + WAIT;
        let mut h = lock.lock().unwrap();
        while !cond(&h) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "checker: {what} not seen\n{}",
                h.log.join("\n")
            );
            h = cv.wait_timeout(h, deadline - now).unwrap().0;
        }
    }

    /// A copy of gateway `i`'s status history.
    fn history(&self, i: usize) -> Vec<String> {
        self.state.0.lock().unwrap().history[i].clone()
    }

    fn log(&self) -> String {
        self.state.0.lock().unwrap().log.join("\n")
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The checker's loop: probe both gateways, rewrite the lb's rule when the
/// ready set changes (in the kernel before the change is published).
fn check(state: &(Mutex<Health>, Condvar), lb: &str, rule: &PathBuf, started: Instant) {
    let mut probe = ns_exec(lb, "curl");
    probe.args(["-s", "--max-time", "2", "-w", "%{http_code}\\n"]);
    for (_, ip, _) in GATEWAYS {
        probe
            .args(["-o", "/dev/null"])
            .arg(format!("http://{ip}:{ADMIN_PORT}/readyz"));
    }
    loop {
        if state.0.lock().unwrap().stop {
            return;
        }
        let out = probe.output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let codes: Vec<&str> = text.lines().collect();
        let up = [codes.first() == Some(&"200"), codes.get(1) == Some(&"200")];
        let changed = state.0.lock().unwrap().up != up;
        if changed {
            std::fs::write(rule, lb_rule(up)).unwrap();
            let out = ns_exec(lb, "nft")
                .arg("-f")
                .arg(rule)
                .output()
                .expect("run nft");
            assert!(out.status.success(), "nft: {}", output_text(&out));
        }
        let t = started.elapsed().as_secs_f64();
        let mut h = state.0.lock().unwrap();
        for (i, (name, _, _)) in GATEWAYS.iter().enumerate() {
            let code = codes.get(i).copied().unwrap_or("000").to_string();
            if h.history[i].last() != Some(&code) {
                h.log.push(format!("{t:7.2}s /readyz {name}: {code}"));
                h.history[i].push(code);
            }
        }
        if changed {
            h.up = up;
            h.log.push(format!("{t:7.2}s lb backends: {up:?}"));
        }
        state.1.notify_all();
        drop(h);
        std::thread::sleep(PROBE_INTERVAL);
    }
}

// ---------------------------------------------------------------------------
// The clients

/// One tunnel as the client reported it.
#[derive(Debug, Clone)]
struct Outcome {
    /// Its number in the stream (in start order).
    id: usize,
    ok: bool,
    /// The gateway that carried it (ok), or why it failed.
    detail: String,
}

fn outcomes(lines: &[String]) -> Vec<Outcome> {
    lines
        .iter()
        .filter_map(|l| {
            let mut words = l.splitn(3, ' ');
            let ok = match words.next()? {
                "ok" => true,
                "fail" => false,
                _ => return None,
            };
            let id = words.next()?.parse().ok()?;
            let detail = words.next().unwrap_or("").to_string();
            Some(Outcome { id, ok, detail })
        })
        .collect()
}

/// Tunnels numbered `from` and up that gateway `i` carried.
fn served(outs: &[Outcome], i: usize, from: usize) -> usize {
    let ip = GATEWAYS[i].1.to_string();
    outs.iter()
        .filter(|o| o.ok && o.id >= from && o.detail == ip)
        .count()
}

/// Tunnels numbered `from` and up that have ended (either way).
fn ended(outs: &[Outcome], from: usize) -> usize {
    outs.iter().filter(|o| o.id >= from).count()
}

/// A steady stream of new tunnels through the virtual address (`ha.py stream`).
struct Stream {
    proc: Proc,
}

impl Stream {
    fn start(lab: &Lab) -> Stream {
        let script = tests_path("fixtures/ha.py");
        let args = [
            script.to_string_lossy().into_owned(),
            "stream".into(),
            VIP.to_string(),
            PROXY_PORT.to_string(),
            format!("origin.test:{ORIGIN_PORT}"),
            RATE.to_string(),
            MAX_TUNNELS.to_string(),
            HOLD_MS.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Stream {
            proc: lab.spawn("c", "python3", &args),
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.proc.stdin.as_mut().expect("client stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to the client");
    }

    fn text(&self) -> String {
        printed(&self.proc.stdout, &self.proc.stderr)
    }

    /// A mark in the client's own order: `(started, ok)` when it read it;
    /// tunnels numbered `started` and up start after this call.
    fn mark(&mut self, name: &str) -> (usize, usize) {
        self.send(&format!("mark {name}"));
        let prefix = format!("mark {name} ");
        let line = self
            .proc
            .stdout
            .wait_line(WAIT, |l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line\n{}", self.text()));
        let field = |key: &str| -> usize {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        (field("started="), field("ok="))
    }

    /// Waits until the outcomes so far satisfy `cond`.
    fn wait(&self, what: &str, cond: impl Fn(&[Outcome]) -> bool) {
        let held = self.proc.stdout.wait(WAIT, |lines| cond(&outcomes(lines)));
        assert!(held, "client: {what} not seen\n{}", self.text());
    }

    /// Waits until both gateways have carried `n` tunnels numbered `from` and up.
    fn wait_both(&self, n: usize, from: usize) {
        self.wait("tunnels through both gateways", |o| {
            served(o, 0, from) >= n && served(o, 1, from) >= n
        });
    }

    /// Stops starting tunnels and waits for the open ones: every outcome,
    /// and every line in the order the client printed them.
    fn finish(mut self) -> (Vec<Outcome>, Vec<String>) {
        self.send("stop");
        let done = self
            .proc
            .stdout
            .wait(WAIT, |l| l.iter().any(|l| l.starts_with("done ")));
        assert!(done, "the client did not finish\n{}", self.text());
        let lines = self.proc.stdout.snapshot();
        (outcomes(&lines), lines)
    }
}

// ---------------------------------------------------------------------------
// The phases

/// Counts of one phase, printed at the end.
struct Phase {
    name: &'static str,
    outs: Vec<Outcome>,
    notes: String,
}

impl Phase {
    fn failures(&self) -> Vec<&Outcome> {
        self.outs.iter().filter(|o| !o.ok).collect()
    }

    fn report(&self) -> String {
        format!(
            "{}: {} tunnels, {} ok, {} failed (a carried {}, b {}); {}",
            self.name,
            self.outs.len(),
            self.outs.iter().filter(|o| o.ok).count(),
            self.failures().len(),
            served(&self.outs, 0, 0),
            served(&self.outs, 1, 0),
            self.notes
        )
    }
}

/// SIGTERM to gateway a: `/readyz` 503 first, the checker takes it out
/// while it still accepts, it exits after the drain: nothing fails.
fn sigterm(lab: &Lab, checker: &Checker, a: &Proc) -> Phase {
    let mut s = Stream::start(lab);
    s.wait_both(3, 0);
    let before = checker.history(0).len();
    let (term, _) = s.mark("term");
    send_signal(a.pid, "TERM");
    checker.note("SIGTERM a");
    let status = lab.wait_exit(a.pid, WAIT).expect("a exits after its drain");
    let (exited, _) = s.mark("exited");
    s.wait("tunnels after a exited", |o| ended(o, exited) >= AFTER);
    let (outs, _) = s.finish();
    let phase = Phase {
        name: "SIGTERM a",
        notes: format!(
            "a carried {} tunnels started after its SIGTERM (drain delay {DRAIN_DELAY_MS} ms)",
            served(&outs, 0, term)
        ),
        outs,
    };
    assert!(
        status.success(),
        "a drained with {status}\n{}",
        printed(&a.stdout, &a.stderr)
    );
    assert!(
        phase.failures().is_empty(),
        "{}\n{:?}\n{}",
        phase.report(),
        phase.failures(),
        checker.log()
    );
    let seen = checker.history(0)[before..].to_vec();
    assert_eq!(
        seen.first().map(String::as_str),
        Some("503"),
        "the checker must see a draining gateway answer 503 before it stops accepting: {seen:?}\n{}",
        checker.log()
    );
    assert_eq!(served(&phase.outs, 1, exited), ended(&phase.outs, exited));
    phase
}

/// SIGKILL to gateway a: what it carried or was sent before the checker
/// took it out may fail; everything started after that succeeds on b.
fn sigkill(lab: &Lab, checker: &Checker, a: &Proc) -> Phase {
    let mut s = Stream::start(lab);
    s.wait_both(3, 0);
    let (killed, ok_before) = s.mark("kill");
    send_signal(a.pid, "KILL");
    checker.note("SIGKILL a");
    lab.wait_exit(a.pid, WAIT).expect("a is killed");
    checker.wait("a taken out", |h| !h.up[0]);
    let (removed, _) = s.mark("removed");
    s.wait("tunnels after a was taken out", |o| {
        ended(o, removed) >= AFTER
    });
    let (outs, lines) = s.finish();
    let phase = Phase {
        name: "SIGKILL a",
        notes: format!(
            "{} in flight at the kill, {} started before the checker took a out (bound on failures: {})",
            killed - ok_before,
            removed - killed,
            removed - ok_before
        ),
        outs,
    };
    let fails = phase.failures();
    let kill_line = lines
        .iter()
        .position(|l| l.starts_with("mark kill "))
        .unwrap();
    let first_fail = lines.iter().position(|l| l.starts_with("fail "));
    assert!(
        first_fail.is_none_or(|f| f > kill_line),
        "a tunnel failed before the kill\n{}",
        lines.join("\n")
    );
    assert!(
        fails.iter().all(|o| o.id < removed) && fails.len() <= removed - ok_before,
        "only tunnels in flight on a or sent to it before the checker reacted may fail: {}\n{fails:?}\n{}",
        phase.report(),
        checker.log()
    );
    assert_eq!(
        served(&phase.outs, 1, removed),
        ended(&phase.outs, removed),
        "every tunnel started after a was taken out succeeds on b"
    );
    phase
}

/// SIGHUP to both gateways (a changed config): nothing fails, neither
/// leaves the load balancer.
fn sighup(lab: &Lab, checker: &Checker, gws: &[Proc; 2]) -> Phase {
    let mut s = Stream::start(lab);
    s.wait_both(3, 0);
    let before = [checker.history(0).len(), checker.history(1).len()];
    let changed = format!(
        "{}\n[[rule]]\nname = \"added-by-reload\"\nhosts = [\"other.test\"]\nports = [443]\n",
        config()
    );
    std::fs::write(lab.dir.path().join("portcullis.toml"), changed).unwrap();
    s.mark("hup");
    for g in gws {
        send_signal(g.pid, "HUP");
    }
    checker.note("SIGHUP a and b");
    for g in gws {
        let line = g.stderr.wait_line(WAIT, |l| l.contains("config reloaded"));
        assert!(
            line.is_some(),
            "no reload\n{}",
            printed(&g.stdout, &g.stderr)
        );
    }
    let (reloaded, _) = s.mark("reloaded");
    s.wait_both(AFTER / 2, reloaded);
    let (outs, _) = s.finish();
    let phase = Phase {
        name: "SIGHUP a and b",
        notes: format!(
            "{} tunnels started after both reloaded",
            ended(&outs, reloaded)
        ),
        outs,
    };
    assert!(
        phase.failures().is_empty(),
        "{}\n{:?}",
        phase.report(),
        phase.failures()
    );
    let after = [checker.history(0).len(), checker.history(1).len()];
    assert_eq!(
        before,
        after,
        "a reload changed readiness\n{}",
        checker.log()
    );
    phase
}

fn available(test: &str) -> bool {
    if !is_root() {
        return require(
            false,
            &format!("{test} needs root (network namespaces, nft)"),
        );
    }
    require(tool_works("ip", &["-V"]), "ip (iproute2) not found")
        && require(tool_works("nft", &["--version"]), "nft not found")
        && require(tool_works("curl", &["--version"]), "curl not found")
        && require(tool_works("python3", &["--version"]), "python3 not found")
}

#[test]
fn two_gateways_behind_a_load_balancer_drain_fail_over_and_reload() {
    if !available("two_gateways_behind_a_load_balancer_drain_fail_over_and_reload") {
        return;
    }
    let lab = Lab::create();
    std::fs::write(lab.dir.path().join("portcullis.toml"), config()).unwrap();
    let script = tests_path("fixtures/ha.py");
    let origin = lab.spawn(
        "o",
        "python3",
        &[
            &script.to_string_lossy(),
            "origin",
            &ORIGIN.to_string(),
            &ORIGIN_PORT.to_string(),
        ],
    );
    assert!(
        origin.stdout.wait_line(WAIT, |l| l == "ready").is_some(),
        "origin\n{}",
        printed(&origin.stdout, &origin.stderr)
    );
    let mut gws = [lab.start_gateway("a"), lab.start_gateway("b")];
    // Declared after the lab: dropped (stopped) before it.
    let checker = Checker::start(&lab);
    checker.wait("both gateways in", |h| h.up == [true, true]);

    let term = sigterm(&lab, &checker, &gws[0]);
    gws[0] = lab.start_gateway("a");
    checker.note("a restarted");
    checker.wait("a back in", |h| h.up == [true, true]);
    let kill = sigkill(&lab, &checker, &gws[0]);
    gws[0] = lab.start_gateway("a");
    checker.note("a restarted");
    checker.wait("a back in", |h| h.up == [true, true]);
    let hup = sighup(&lab, &checker, &gws);

    eprintln!(
        "load balancer: nftables DNAT, checker every {} ms; {RATE} new tunnels/s, each held {HOLD_MS} ms",
        PROBE_INTERVAL.as_millis()
    );
    for phase in [&term, &kill, &hup] {
        eprintln!("{}", phase.report());
    }
    eprintln!("checker:\n{}", checker.log());
}
