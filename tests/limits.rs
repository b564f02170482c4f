//! At the process's file-descriptor limit the gateway still answers: a
//! client gets a refusal instead of hanging in the backlog, `/healthz`
//! stays up, and it recovers when descriptors free up. Run for real with
//! `prlimit --nofile` on the binary.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

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

#[test]
fn at_the_fd_limit_clients_are_refused_not_left_hanging() {
    if !require(
        have("prlimit", &["--version"]),
        "prlimit (util-linux) is needed",
    ) {
        return;
    }
    // An origin that holds every connection until its client closes.
    let origin = TcpListener::bind("127.0.0.2:0").unwrap();
    let origin_addr = origin.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in origin.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    let port = origin_addr.port();
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
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
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
    let (proxy, admin) = (listening.proxy.unwrap(), listening.admin.unwrap());

    let authority = format!("held.test:{port}");
    let mut open = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..NOFILE {
        let (status, stream) = connect_status(proxy, &authority);
        statuses.push(status);
        if status == 200 {
            open.extend(stream);
        }
    }
    assert!(
        statuses.iter().all(|s| [200, 502, 503].contains(s)),
        "every client gets an answer (200, 502 or 503), none hangs: {statuses:?}"
    );
    assert!(
        statuses.contains(&503),
        "the limit was reached and refused: {statuses:?}"
    );
    let health = http_get(admin, "/healthz").expect("admin answers at the fd limit");
    assert_eq!(health.status, 200);

    // Descriptors free up: a new tunnel is served again (polled, bounded).
    drop(open);
    let recovered = support::wait_until(Duration::from_secs(20), || {
        connect_status(proxy, &authority).0 == 200
    });
    assert!(recovered, "no tunnel served after the others closed");
    drop(child);
}
