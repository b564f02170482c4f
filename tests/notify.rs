//! systemd readiness for real: `portcullis run` under a fake `NOTIFY_SOCKET`
//! says `READY=1` only once its listeners answer, and `STOPPING=1` with the
//! stop time it needs when told to stop.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{ChildGuard, http_get, send_signal, wait_child};

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification within 30 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_after_bind_and_stopping_with_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The admin listener on a fixed free port: READY must mean it answers.
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_addr = admin.local_addr().unwrap();
    drop(admin);
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"{admin_addr}\"\n\n\
             [clients]\nallow = [\"127.0.0.0/8\"]\n\n[policy]\nprofile = \"none\"\n\n\
             [limits]\ngrace_period_ms = 7000\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn portcullis");
    let mut child = ChildGuard(child);
    let ready = recv(&sock);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means bound and serving: the admin listener answers at once.
    let resp = http_get(admin_addr, "/readyz").expect("admin answers after READY=1");
    assert_eq!(resp.status, 200);

    send_signal(child.0.id(), "TERM");
    let stopping = recv(&sock);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(
        stopping
            .lines()
            .any(|l| l == "EXTEND_TIMEOUT_USEC=12000000"),
        "the stop time follows grace_period_ms (7 s + 5 s): {stopping:?}"
    );
    let status = wait_child(&mut child.0, Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{status:?}");
}
