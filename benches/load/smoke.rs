//! The smoke check (`cargo test --benches`, no `--bench` argument): a few
//! seconds of verified traffic direct and through portcullis, and, as root,
//! through both transparent paths, so the tool cannot rot.
//!
//! It also checks that the cost columns come from the gateway's own CPU
//! accounting (non-zero, and cost × work gives back the CPU delta).
//!
//! Skips (`SKIPPED: ...`) without a built portcullis or without root; in CI
//! (`CI=true`) a missing binary is an error.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::clients::{Via, bulk, echo_check, open, rss_kib, tunnels};
use crate::cost::{USER_HZ, cpu_secs, stat_cpu_secs};
use crate::host::in_ci;
use crate::http::http_load;
use crate::io_err;
use crate::proxies::{find_portcullis, start_portcullis};
use crate::report::{COLS, DIRECT, PORTCULLIS};
use crate::run::{RUN_LIMIT, bounded, interleave};
use crate::settings::{Settings, check_settings};
use crate::transparent::Transparent;
use crate::upstreams::{LOOPBACK, Upstreams, start_upstreams};
use crate::wire::{Dir, PATTERN_LEN, pattern, pattern_matches};

/// `cargo test --benches`: a few seconds of verified traffic through portcullis.
pub async fn smoke() -> Result<bool, String> {
    let Some(bin) = find_portcullis(false) else {
        if in_ci() {
            return Err("no target/{release,debug}/portcullis in CI".into());
        }
        println!("SKIPPED: build portcullis first (cargo build --release)");
        return Ok(false);
    };
    // The checker itself: a lost, changed or shifted byte must show.
    let p = pattern();
    assert!(pattern_matches(250, &[250, 0, 1]) && pattern_matches(7, &p[7..PATTERN_LEN]));
    assert!(!pattern_matches(0, &p[1..10]) && !pattern_matches(3, &[3, 4, 6]));
    let ups = start_upstreams(LOOPBACK)
        .await
        .map_err(io_err("upstreams"))?;
    let proxy = start_portcullis(&bin, &ups.ports(), "info")?;
    let s = Settings {
        bulk_time: Duration::from_secs(5),
        bulk_bytes: 4 << 20,
        txn_time: Duration::from_secs(2),
        txn_max: 40,
        ..check_settings()
    };
    for via in [Via::Direct, Via::Proxy(proxy.addr)] {
        for (dir, streams) in [(Dir::Down, 1), (Dir::Up, 1), (Dir::Down, 2), (Dir::Up, 2)] {
            let mib = bounded(RUN_LIMIT, bulk(via, ups, dir, streams, &s))
                .await?
                .values();
            assert!(mib[0] > 0.0);
        }
        let t = bounded(RUN_LIMIT, tunnels(via, ups, 4, &s)).await?.values();
        let h = bounded(RUN_LIMIT, http_load(via, ups, 2, &s))
            .await?
            .values();
        assert!(t[0] > 0.0 && h[0] > 0.0);
        let held = bounded(RUN_LIMIT, async {
            let mut held = Vec::new();
            for _ in 0..8 {
                let (mut c, pre) = open(via, ups.echo).await?;
                echo_check(&mut c, pre).await?;
                held.push(c);
            }
            Ok(held.len())
        })
        .await?;
        assert_eq!(held, 8);
        println!("load smoke: {via:?} carries bulk, echo and HTTP intact");
    }
    let rss = rss_kib(proxy.proc.pid())?;
    assert!(rss > 0.0);
    cost_smoke(proxy.proc.pid(), Via::Proxy(proxy.addr), ups).await?;
    transparent_smoke(&bin)?;
    Ok(true)
}

/// The cost columns come from the gateway's own accounting: parsing
/// `/proc/PID/stat` (a `comm` with spaces and `)`), then 2 × 128 MiB relayed
/// through portcullis in [`interleave`] with its pid. The cost it reports ×
/// the GiB counted must give back a CPU delta that is non-zero and within
/// the tick rounding of the delta read around the whole run; the direct
/// column, without a process, has no cost.
async fn cost_smoke(pid: u32, via: Via, ups: Upstreams) -> Result<(), String> {
    let line = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 1 0 9 9 9";
    assert_eq!(stat_cpu_secs(line), Some(2.0));
    assert_eq!(stat_cpu_secs("42 (x) S 1"), None);
    let slice = Settings {
        bulk_time: Duration::from_secs(60),
        bulk_bytes: 128 << 20,
        verify: false,
        ..check_settings()
    };
    let mut missing: [Option<String>; COLS] = Default::default();
    let outer = cpu_secs(pid)?;
    let samples = bounded(RUN_LIMIT, async {
        let active = [true, true, false, false];
        let pids = [None, Some(pid), None, None];
        Ok(interleave(1, 2, active, &mut missing, pids, async |col| {
            let via = if col == DIRECT { Via::Direct } else { via };
            bulk(via, ups, Dir::Down, 1, &slice).await
        })
        .await)
    })
    .await?;
    let outer = cpu_secs(pid)? - outer;
    if let Some(e) = missing.iter().flatten().next() {
        return Err(format!("cost smoke: {e}"));
    }
    // [MiB/s, ms per GiB]; 2 × 128 MiB = 0.25 GiB went through.
    let (direct, relayed) = (&samples[DIRECT][0], &samples[PORTCULLIS][0]);
    assert!(
        direct[1].is_nan(),
        "direct has no gateway process: {direct:?}"
    );
    let inner = relayed[1] * 0.25 / 1e3;
    let tick = 1.0 / USER_HZ;
    assert!(
        inner >= tick,
        "no CPU counted for 256 MiB relayed: {relayed:?}"
    );
    assert!(
        inner <= outer + 4.0 * tick && outer - inner <= 0.25,
        "cost × GiB = {inner:.3} s, CPU delta around the run {outer:.3} s"
    );
    println!(
        "load smoke: cost {:.0} ms CPU per GiB relayed ({inner:.2} s for 0.25 GiB, {outer:.2} s around it)",
        relayed[1]
    );
    Ok(())
}

/// The transparent paths with verified traffic (the set-up's own gate):
/// skipped without root, or (outside CI) without `ip`/`nft`.
fn transparent_smoke(bin: &Path) -> Result<(), String> {
    let started = Instant::now();
    let t = match tokio::task::block_in_place(|| Transparent::setup(bin, "info")) {
        Ok(t) => t,
        Err(why) if why == "skipped (needs root)" => {
            println!("SKIPPED: load smoke: transparent path needs root (network namespaces)");
            return Ok(());
        }
        Err(why) if why.starts_with("skipped") && !in_ci() => {
            println!("SKIPPED: load smoke: transparent path {why}");
            return Ok(());
        }
        Err(e) => return Err(format!("transparent set-up: {e}")),
    };
    for (col, what) in [(DIRECT, "routed"), (PORTCULLIS, "portcullis")] {
        if let Some(e) = &t.broken[col] {
            return Err(format!("transparent {what} path: {e}"));
        }
    }
    drop(t);
    println!(
        "load smoke: transparent routed and portcullis paths carry bulk and echo intact ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
