//! `/readyz` under `[admin] require_ruleset`, in process: the counters file
//! the root-only timer writes (here a temp file named by
//! `PORTCULLIS_RULESET_COUNTERS`) decides readiness: missing → 503, a dump
//! of the portcullis forward chain written just now → 200, an old one → 503.
//! The only test in this binary: it sets the variable before any thread
//! reads the environment.
// Clients of the gateway under test, not egress: clippy.toml's ban on
// `TcpStream::connect` guards the library.
#![allow(clippy::disallowed_methods)]

#[path = "support/inproc.rs"]
mod inproc;

use std::path::Path;
use std::time::{Duration, SystemTime};

use inproc::InProc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A real `nft -j list chain inet portcullis forward` dump.
const FORWARD_CHAIN: &str = include_str!("data/nft/forward-chain.json");

/// Status and body of `GET /readyz`.
async fn readyz(gw: &InProc) -> (u16, String) {
    let mut s = TcpStream::connect(gw.addr("admin")).await.expect("admin");
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Writes the counters file with modification time `age` ago.
fn write_counters(path: &Path, json: &str, age: Duration) {
    std::fs::write(path, json).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

fn config(require: bool) -> String {
    let extra = format!("[admin]\nrequire_ruleset = {require}\n");
    inproc::Site {
        origin: std::net::SocketAddr::from(([127, 0, 0, 2], 443)),
        extra: &extra,
        ..inproc::Site::default()
    }
    .toml()
}

#[test]
fn readyz_requires_a_fresh_dump_of_the_forward_chain() {
    let dir = tempfile::tempdir().unwrap();
    let counters = dir.path().join("ruleset-counters.json");
    // SAFETY: the only test of this binary, before its runtime starts: no
    // other thread reads the environment.
    unsafe { std::env::set_var("PORTCULLIS_RULESET_COUNTERS", &counters) };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let gw = InProc::start(&config(true)).await;
        let (status, body) = readyz(&gw).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.starts_with("ruleset missing"), "{body}");

        write_counters(&counters, FORWARD_CHAIN, Duration::ZERO);
        assert_eq!(readyz(&gw).await, (200, "ready\n".to_string()));

        // Written by something else than the portcullis forward chain.
        let other = FORWARD_CHAIN.replace("\"portcullis\"", "\"filter\"");
        write_counters(&counters, &other, Duration::ZERO);
        let (status, body) = readyz(&gw).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("does not list chain inet portcullis forward"),
            "{body}"
        );

        // The timer stopped ten minutes ago.
        write_counters(&counters, FORWARD_CHAIN, Duration::from_secs(600));
        let (status, body) = readyz(&gw).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.starts_with("ruleset counters stale"), "{body}");

        // A reload that turns the setting off applies at once, and on again.
        gw.reload(&config(false)).await.expect("reload");
        assert_eq!(readyz(&gw).await.0, 200);
        gw.reload(&config(true)).await.expect("reload");
        assert_eq!(readyz(&gw).await.0, 503);

        let ready = |gw: &InProc| gw.gw.metrics.ready.get();
        assert_eq!(ready(&gw), 0, "portcullis_ready follows /readyz");
        write_counters(&counters, FORWARD_CHAIN, Duration::from_secs(5));
        assert_eq!(readyz(&gw).await, (200, "ready\n".to_string()));
        assert_eq!(ready(&gw), 1);
        std::fs::remove_file(&counters).unwrap();
        assert_eq!(readyz(&gw).await.0, 503, "removed by the timer: table gone");
    });
}
