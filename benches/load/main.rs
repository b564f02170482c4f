//! Load tool: portcullis beside the same traffic sent direct and through Squid.
//!
//! Measures, on loopback only and in one run: bulk throughput through one and
//! eight CONNECT tunnels (each direction), new tunnels per second with a
//! 32-byte echo at 1 and 32 concurrent clients (with p50/p99 latency),
//! plain-HTTP forwarding over keep-alive connections (requests/s, p99),
//! resident memory per idle tunnel; and, in namespaces of its own, one
//! connection's throughput and new connections per second through the
//! transparent gateway against plain routing. Every number is a median of `--reps` runs
//! interleaved direct → portcullis → Squid, and every proxy number is shown
//! as a ratio against (or, for latency, added to) the direct run of the same
//! process, because the machine is small and shared.
//!
//! The upstreams are in-process tokio servers on 127.0.0.1 (bulk source/sink,
//! echo, hyper HTTP/1.1); portcullis is `target/release/portcullis` started
//! as a child on a generated config; Squid (Debian package, if installed) is a
//! child on a generated `squid.conf`. Both are killed when the tool ends.
//!
//! The `transparent-*` cases (root only; otherwise `skipped (needs root)`)
//! build network namespaces of their own: a client and a server joined by
//! two gateways, one that only routes (the direct column) and one running
//! portcullis behind its `render nftables` ruleset. Client and server are
//! this tool re-executed in their namespaces (`--ns-role`), running the same
//! bulk and echo code; everything is torn down when the tool ends.
//!
//! Run: `benches/run-load.sh [--quick]`, or
//! `cargo bench --bench load -- [--quick] [--reps N] [--only CASE[,CASE...]]`
//! (env: `LOAD_QUICK=1`, `LOAD_REPS`, `LOAD_ONLY`). Without `--bench`
//! (`cargo test --benches`) it runs a few-second smoke check that bytes
//! arrive intact through portcullis (and, as root, through both transparent
//! paths), so the tool cannot rot.
//!
//! Modules, from the settings to the report: `settings` (sizes, options),
//! `wire` (the bytes on the wire), `upstreams` (in-process servers),
//! `clients` and `http` (the traffic), `sample` (what a run measured),
//! `proxies` (portcullis and Squid children), `netns` and `transparent`
//! (the namespace cases and the `--ns-role` processes), `cases` (what is
//! measured, row by row), `run` (the full measurement), `smoke` (the check
//! mode) and `report` (the markdown table). `host` is the tests' own
//! `tests/support/host.rs` (root, tools, CI).

mod cases;
mod clients;
mod cost;
mod haproxy;
#[path = "../../tests/support/host.rs"]
#[allow(dead_code)] // the tests' skip helpers; the tool uses is_root, tool_works, in_ci
mod host;
mod http;
mod netns;
mod proxies;
mod report;
mod run;
mod sample;
mod scale;
mod settings;
mod smoke;
mod transparent;
mod upstreams;
mod wire;

use std::io;
use std::time::Duration;

use crate::settings::Settings;

/// `--help`: what the tool takes (the module docs say what it measures).
const USAGE: &str = "\
usage: cargo bench --bench load -- [--quick] [--reps N] [--only CASE[,CASE...]]
       benches/run-load.sh [same options]   (builds release, tees target/load-results.md)
env:   LOAD_QUICK=1, LOAD_REPS=N, LOAD_ONLY=CASE,...
Without --bench (cargo test --bench load) it runs the smoke check instead.
Cases: see benches/README.md.";

/// Maps an I/O error to the tool's error text, prefixed with what failed.
fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let bench_mode = args.iter().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let role = match args.as_slice() {
        [flag, role] if flag == "--ns-role" => Some(role.as_str()),
        _ => None,
    };
    let result = if let Some(role) = role {
        // Re-executed by the tool inside one of its namespaces.
        match role {
            "server" => rt.block_on(transparent::role_server()),
            "client" => rt.block_on(transparent::role_client()),
            other => Err(format!("unknown --ns-role {other:?}")),
        }
    } else if bench_mode {
        rt.block_on(run::bench(Settings::from_args(&args)))
    } else {
        rt.block_on(smoke::smoke()).map(|ran| {
            if ran {
                println!("load smoke: 1 passed, 0 failed");
            }
        })
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    if let Err(e) = result {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}
