//! Network namespaces of the transparent cases (root only): a client and a
//! server joined by two gateways, one that only routes and one running
//! portcullis, and the processes started in them.
//!
//! Names carry [`NS_PREFIX`] and the tool's pid; namespaces a killed run
//! left are removed first. Dropping [`Netns`] (also on an error or a panic)
//! kills its processes and deletes the namespaces and `/etc/netns` dirs.
//! Nothing routes out: no namespace has an interface to the host.
//!
//! ```text
//!   client ns            gateway ns (one per path)          server ns
//!   eth0 10.231.1.2 ── toc 10.231.1.1 [routed] tos 10.231.2.1 ── eth0 10.231.2.2
//!   eth1 10.232.1.2 ── toc 10.232.1.1 [portc.] tos 10.232.2.1 ── eth1 10.232.2.2
//! ```
//!
//! Both gateways forward (ip_forward=1); the portcullis one also runs
//! `portcullis run` behind the ruleset `portcullis render nftables` printed,
//! so the client's TCP to 10.232.2.2 is redirected to its transparent
//! listener. The client reaches the servers through either gateway only by
//! choosing the destination address, so the two paths interleave without any
//! reconfiguration. The server and the client are this tool re-executed
//! under `ip netns exec` (`--ns-role server|client`); the client takes one
//! job per stdin line and answers one line on stdout.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::io_err;
use crate::proxies::{line_channel, tail};

/// Transparent cases: the second octet of the routed path's subnets
/// (10.231.1.0/24 client side, 10.231.2.0/24 server side)...
pub const ROUTED_NET: u8 = 231;
/// ...and of the path through portcullis (10.232.1.0/24, 10.232.2.0/24).
pub const PORTCULLIS_NET: u8 = 232;
/// Namespace names: this, the tool's pid, and a letter per namespace.
const NS_PREFIX: &str = "pcload";

/// Runs a set-up command to completion; its stderr is the error.
pub fn must(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes a namespace and its `/etc/netns` directory (best effort).
fn delete_netns(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
}

/// Deletes namespaces an earlier run left when it was killed (named
/// [`NS_PREFIX`], a pid that no longer runs, and one letter), after killing
/// the processes it had started in them (`ip netns pids`).
fn remove_stale_netns() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && rest.len() == pid.len() + 1 && !Path::new("/proc").join(&pid).exists()
        {
            eprintln!("load: removing namespace {name} left by a killed run");
            let pids = must(Command::new("ip").args(["netns", "pids", &name])).unwrap_or_default();
            for pid in String::from_utf8_lossy(&pids).split_whitespace() {
                if pid.parse::<u32>().is_ok() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            delete_netns(&name);
        }
    }
}

#[derive(Clone, Copy, Debug)]
/// The four namespaces: client, routed gateway, portcullis gateway, server.
pub enum Ns {
    Client,
    Routed,
    Gateway,
    Server,
}

/// A process started in a namespace: its stdin (kept open: the roles end at
/// EOF), its stdout lines, and the file its stderr goes to.
pub struct Role {
    /// Kept open: the role ends when it closes.
    pub stdin: std::process::ChildStdin,
    /// Its stdout, line by line.
    pub lines: mpsc::Receiver<String>,
    /// The file its stderr goes to.
    pub log: PathBuf,
}

impl Role {
    /// Waits up to `limit` for a stdout line `pred` accepts; `pred` sees
    /// every line before it.
    pub fn wait_line(
        &self,
        limit: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if pred(&line) {
                return Ok(line);
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(format!(
            "no answer within {limit:?}; its stderr ends:\n{}",
            tail(&self.log)
        ))
    }
}

/// The four namespaces and every process started in them. Dropping it (also
/// on an error or a panic) kills the processes, then deletes the namespaces
/// (their veth pairs go with them) and their `/etc/netns` directories.
pub struct Netns {
    /// `pcload<pid>`: a namespace is this plus one letter.
    pub base: String,
    /// Namespaces made so far (all of them deleted on drop, even after a
    /// partial set-up).
    pub created: Vec<String>,
    /// Every process started in the namespaces (killed on drop).
    pub children: Vec<Child>,
    /// Configs, rulesets and logs.
    pub dir: tempfile::TempDir,
}

impl Netns {
    /// The namespace's name: the base and one letter.
    pub fn name(&self, ns: Ns) -> String {
        let letter = match ns {
            Ns::Client => 'c',
            Ns::Routed => 'r',
            Ns::Gateway => 'p',
            Ns::Server => 's',
        };
        format!("{}{letter}", self.base)
    }

    /// `ip netns exec NS PROGRAM`; add the arguments.
    pub fn exec(&self, ns: Ns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(self.name(ns)).arg(program);
        cmd
    }

    /// `ip -n NS ARGS` (arguments split on spaces).
    pub fn ip(&self, ns: Ns, args: &str) -> Result<(), String> {
        must(
            Command::new("ip")
                .arg("-n")
                .arg(self.name(ns))
                .args(args.split_whitespace()),
        )
        .map(drop)
    }

    /// `sysctl -qw SETTING` inside a namespace.
    pub fn sysctl(&self, ns: Ns, setting: &str) -> Result<(), String> {
        must(self.exec(ns, "sysctl").args(["-qw", setting])).map(drop)
    }

    /// Removes stale namespaces, then builds the four, their links,
    /// addresses, routes and sysctls.
    pub fn create() -> Result<Netns, String> {
        remove_stale_netns();
        let mut n = Netns {
            base: format!("{NS_PREFIX}{}", std::process::id()),
            created: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().map_err(io_err("tempdir"))?,
        };
        for ns in [Ns::Client, Ns::Routed, Ns::Gateway, Ns::Server] {
            let name = n.name(ns);
            must(Command::new("ip").args(["netns", "add", &name]))?;
            n.created.push(name.clone());
            // Nothing resolves inside: no real DNS, ever.
            let etc = Path::new("/etc/netns").join(&name);
            fs::create_dir_all(&etc)
                .and_then(|()| fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n"))
                .map_err(io_err("/etc/netns/NAME/resolv.conf"))?;
            n.ip(ns, "link set lo up")?;
        }
        let (c, s) = (n.name(Ns::Client), n.name(Ns::Server));
        for (gw, net, dev) in [
            (Ns::Routed, ROUTED_NET, "eth0"),
            (Ns::Gateway, PORTCULLIS_NET, "eth1"),
        ] {
            let g = n.name(gw);
            must(Command::new("ip").args([
                "-n", &c, "link", "add", dev, "type", "veth", "peer", "name", "toc", "netns", &g,
            ]))?;
            must(Command::new("ip").args([
                "-n", &s, "link", "add", dev, "type", "veth", "peer", "name", "tos", "netns", &g,
            ]))?;
            n.ip(Ns::Client, &format!("addr add 10.{net}.1.2/24 dev {dev}"))?;
            n.ip(gw, &format!("addr add 10.{net}.1.1/24 dev toc"))?;
            n.ip(gw, &format!("addr add 10.{net}.2.1/24 dev tos"))?;
            n.ip(Ns::Server, &format!("addr add 10.{net}.2.2/24 dev {dev}"))?;
            for (ns, d) in [
                (Ns::Client, dev),
                (gw, "toc"),
                (gw, "tos"),
                (Ns::Server, dev),
            ] {
                n.ip(ns, &format!("link set {d} up"))?;
            }
            n.ip(
                Ns::Client,
                &format!("route add 10.{net}.2.0/24 via 10.{net}.1.1"),
            )?;
            n.ip(
                Ns::Server,
                &format!("route add 10.{net}.1.0/24 via 10.{net}.2.1"),
            )?;
            n.sysctl(gw, "net.ipv4.ip_forward=1")?;
        }
        // Tens of thousands of short connections from one address to one
        // port: let the active closers (client, and portcullis upstream)
        // reuse TIME_WAIT ports, as loopback does by default.
        for ns in [Ns::Client, Ns::Gateway] {
            n.sysctl(ns, "net.ipv4.tcp_tw_reuse=1")?;
            n.sysctl(ns, "net.ipv4.ip_local_port_range=1024 65000")?;
        }
        Ok(n)
    }

    /// Starts `program args` in a namespace (stdin and stdout piped, stderr
    /// to `DIR/log`); the process belongs to `self`.
    pub fn spawn(
        &mut self,
        ns: Ns,
        program: &Path,
        args: &[&std::ffi::OsStr],
        log: &str,
    ) -> Result<Role, String> {
        let log = self.dir.path().join(log);
        let err = fs::File::create(&log).map_err(io_err("log file"))?;
        let mut child = self
            .exec(ns, program)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {} in {ns:?}: {e}", program.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("child without piped stdio".into());
        };
        self.children.push(child);
        Ok(Role {
            stdin,
            lines: line_channel(stdout),
            log,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        for name in &self.created {
            delete_netns(name);
        }
    }
}
