//! At the process's file-descriptor limit the gateway still answers: past
//! the connection budget the open-file limit leaves, a client gets a 503
//! instead of hanging in the backlog; when the limit drops under a running
//! gateway, the spare descriptor still answers; `/healthz` stays up, and it
//! recovers when descriptors free up. Run for real with `prlimit` on the
//! binary.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::metrics::metric_sum;
use support::proxy::{Listening, wait_ready};
use support::{ChildGuard, Lines, have, http_get, pipes, printed, require};

/// The descriptor limit the gateway runs under.
const NOFILE: u32 = 64;

/// Opens `CONNECT authority` and returns the status code (0: no answer in 10 s).
fn connect_status(proxy: SocketAddr, authority: &str) -> (u16, Option<TcpStream>) {
    let Ok(mut s) = TcpStream::connect(proxy) else {
        return (0, None);
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    if s.write_all(head.as_bytes()).is_err() {
        return (0, None);
    }
    let mut line = String::new();
    let mut r = BufReader::new(s.try_clone().unwrap());
    if r.read_line(&mut line).is_err() {
        return (0, None);
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, Some(s))
}

/// A gateway under `prlimit --nofile=nofile`, allowing `held.test` (an
/// origin that holds every connection until its client closes).
struct Held {
    proxy: SocketAddr,
    admin: SocketAddr,
    authority: String,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

fn start_held(nofile: u32) -> Held {
    let origin = TcpListener::bind("127.0.0.2:0").unwrap();
    let port = origin.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in origin.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
             [clients]\nallow = [\"127.0.0.0/8\"]\n\n[policy]\nprofile = \"none\"\n\n\
             [[rule]]\nname = \"held\"\nhosts = [\"held.test\"]\nports = [{port}]\nopaque = true\n\n\
             [[rule]]\nname = \"origin\"\ncidrs = [\"127.0.0.2/32\"]\nports = [{port}]\n\n\
             [resolve]\n\"held.test\" = [\"127.0.0.2\"]\n\n[log]\nlevel = \"error\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn prlimit portcullis");
    let (stdout, stderr): (Lines, Lines) = pipes(&mut child);
    let child = ChildGuard(child);
    assert!(wait_ready(&stdout), "{}", printed(&stdout, &stderr));
    let listening = Listening::parse(&stdout.snapshot()).unwrap();
    Held {
        proxy: listening.proxy.unwrap(),
        admin: listening.admin.unwrap(),
        authority: format!("held.test:{port}"),
        child,
        _dir: dir,
    }
}

impl Held {
    /// Opens `count` tunnels one after another; their statuses, and the open ones.
    fn open(&self, count: usize) -> (Vec<u16>, Vec<TcpStream>) {
        let mut open = Vec::new();
        let mut statuses = Vec::new();
        for _ in 0..count {
            let (status, stream) = connect_status(self.proxy, &self.authority);
            statuses.push(status);
            if status == 200 {
                open.extend(stream);
            }
        }
        (statuses, open)
    }

    /// `/healthz` answers, and after `open` closes a new tunnel is served
    /// again (polled, bounded).
    fn recovers(&self, open: Vec<TcpStream>) {
        let health = http_get(self.admin, "/healthz").expect("admin answers at the fd limit");
        assert_eq!(health.status, 200);
        drop(open);
        let recovered = support::wait_until(Duration::from_secs(20), || {
            connect_status(self.proxy, &self.authority).0 == 200
        });
        assert!(recovered, "no tunnel served after the others closed");
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = String::from_utf8(http_get(self.admin, "/metrics").unwrap().body).unwrap();
        metric_sum(&text, name, labels).unwrap_or(0.0)
    }
}

#[test]
fn past_the_budget_the_open_file_limit_leaves_clients_get_503() {
    if !require(
        have("prlimit", &["--version"]),
        "prlimit (util-linux) is needed",
    ) {
        return;
    }
    let held = start_held(NOFILE);
    // 64 descriptors: 32 reserved, two a connection.
    let budget = 16;
    assert_eq!(
        held.metric("portcullis_connections_limit", &[("listener", "proxy")]),
        budget as f64,
        "the limit gauge shows the budget"
    );
    let (statuses, open) = held.open(NOFILE as usize);
    assert_eq!(open.len(), budget, "{statuses:?}");
    assert!(
        statuses[budget..].iter().all(|s| *s == 503),
        "every client past the budget gets 503, none hangs: {statuses:?}"
    );
    let refused = held.metric(
        "portcullis_connections_rejected_total",
        &[("listener", "proxy"), ("reason", "limit")],
    );
    assert_eq!(refused, (NOFILE as usize - budget) as f64);
    held.recovers(open);
}

#[test]
fn when_the_limit_drops_under_a_running_gateway_the_spare_still_answers() {
    if !require(
        have("prlimit", &["--version"]),
        "prlimit (util-linux) is needed",
    ) {
        return;
    }
    // Started with room for thousands, then cut to 64 while running: the
    // budget no longer protects the fd table, the spare descriptor does.
    let held = start_held(20_000);
    let pid = held.child.0.id().to_string();
    let status = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={NOFILE}:{NOFILE}")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit --pid");
    let (statuses, open) = held.open(NOFILE as usize);
    assert!(
        statuses.iter().all(|s| [200, 502, 503].contains(s)),
        "every client gets an answer (200, 502 or 503), none hangs: {statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| *s != 200),
        "the limit was reached and refused: {statuses:?}"
    );
    assert!(
        open.len() > 10,
        "tunnels were served before the limit: {statuses:?}"
    );
    held.recovers(open);
}
