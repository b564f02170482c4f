//! The scale and multi-core cases: many concurrent tunnels through one
//! portcullis (each moving a little data), many idle ones, and the same
//! traffic through a portcullis pinned to one core (one worker) against one
//! using both (two workers), alternated.
//!
//! `scale`: on a fresh portcullis, `scale_live` tunnels each echo 32 bytes
//! every [`LIVE_PERIOD`]; the gateway's RSS and CPU are read while only they
//! run, then while 8 clients also open new tunnels (their p50/p99 is the
//! set-up latency under that load); every failed echo or open is an error.
//! Then, on another fresh portcullis, `scale_idle` idle tunnels.
//! `cores`: new tunnels (32 clients) and 8-tunnel downloads, alternating
//! between the pinned and the unpinned gateway, median and spread.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::cases::Kind;
use crate::clients::{Via, bulk, echo_check, idle, open, rss_kib, tunnels};
use crate::cost::{cost, cpu_secs};
use crate::proxies::{Proxy, start_portcullis};
use crate::report::{COLS, Cell, PORTCULLIS, Row, median};
use crate::run::{RUN_LIMIT, bounded};
use crate::sample::Sample;
use crate::settings::Settings;
use crate::upstreams::Upstreams;
use crate::wire::Dir;

/// How often each live tunnel echoes 32 bytes.
pub const LIVE_PERIOD: Duration = Duration::from_secs(1);
/// Concurrent opens while building up the live tunnels.
const OPEN_CONCURRENCY: usize = 64;

/// A row with a value in the portcullis column only.
fn row(label: String, v: f64) -> Row {
    let mut cells: [Cell; COLS] = std::array::from_fn(|_| Cell::Blank);
    cells[PORTCULLIS] = Cell::Value(v);
    Row {
        label,
        kind: Kind::Absolute,
        cells,
    }
}

/// Live tunnels echoing in the background until `stop`.
struct Live {
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    first_error: Arc<std::sync::Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Opens `n` tunnels through `via` (at most [`OPEN_CONCURRENCY`] at once),
/// each then echoing every [`LIVE_PERIOD`]; returns once all are open.
async fn start_live(via: Via, ups: Upstreams, n: usize) -> Live {
    let mut live = Live {
        stop: Arc::new(AtomicBool::new(false)),
        echoes: Arc::new(AtomicUsize::new(0)),
        errors: Arc::new(AtomicUsize::new(0)),
        first_error: Arc::new(std::sync::Mutex::new(None)),
        tasks: Vec::with_capacity(n),
    };
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let opened = Arc::new(Semaphore::new(0));
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.expect("gate open");
        let (stop, echoes, errors) = (live.stop.clone(), live.echoes.clone(), live.errors.clone());
        let (first_error, opened, echo) = (live.first_error.clone(), opened.clone(), ups.echo);
        live.tasks.push(tokio::spawn(async move {
            let fail = |e: String| {
                errors.fetch_add(1, Relaxed);
                first_error.lock().expect("lock").get_or_insert(e);
            };
            let tunnel = async {
                let (mut s, pre) = open(via, echo).await?;
                echo_check(&mut s, pre).await?;
                Ok::<_, String>(s)
            };
            let r = tokio::time::timeout(Duration::from_secs(10), tunnel).await;
            drop(permit);
            opened.add_permits(1);
            let mut s = match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return fail(e),
                Err(_) => return fail("open stalled".into()),
            };
            // Spread the echoes over the period.
            let offset = LIVE_PERIOD.mul_f64((i % 1000) as f64 / 1000.0);
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(LIVE_PERIOD);
            while !stop.load(Relaxed) {
                tick.tick().await;
                let r =
                    tokio::time::timeout(Duration::from_secs(10), echo_check(&mut s, Vec::new()));
                match r.await {
                    Ok(Ok(())) => echoes.fetch_add(1, Relaxed),
                    Ok(Err(e)) => return fail(e),
                    Err(_) => return fail("echo stalled".into()),
                };
            }
        }));
    }
    let _ = opened.acquire_many(n as u32).await;
    live
}

impl Live {
    async fn stop(self) {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

/// CPU seconds and wall seconds of `f` in `pid`.
async fn timed_cpu<T>(pid: u32, f: impl Future<Output = T>) -> Result<(T, f64, f64), String> {
    let (c0, t0) = (cpu_secs(pid)?, Instant::now());
    let out = f.await;
    Ok((out, cpu_secs(pid)? - c0, t0.elapsed().as_secs_f64()))
}

/// The live part of `scale`: rows for `n` echoing tunnels on a fresh gateway.
async fn scale_live(
    bin: &Path,
    ups: Upstreams,
    n: usize,
    window: Duration,
) -> Result<Vec<Row>, String> {
    let p = start_portcullis(bin, &ups.ports(), "info")?;
    let pid = p.proc.pid();
    let via = Via::Proxy(p.addr);
    // Warm-up, then the baseline RSS.
    let warm = Settings {
        txn_time: Duration::from_millis(300),
        txn_max: 200,
        ..Settings::quick()
    };
    tunnels(via, ups, 8, &warm).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = rss_kib(pid)?;
    let t0 = Instant::now();
    let live = start_live(via, ups, n).await;
    let open_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(LIVE_PERIOD * 2).await;
    let e0 = live.echoes.load(Relaxed);
    let ((), cpu_quiet, quiet_secs) = timed_cpu(pid, tokio::time::sleep(window)).await?;
    let echoes = (live.echoes.load(Relaxed) - e0) as f64;
    let rss1 = rss_kib(pid)?;
    let s = Settings {
        txn_time: window,
        txn_max: 20_000,
        ..Settings::full()
    };
    let (new, cpu_busy, busy_secs) = timed_cpu(pid, tunnels(via, ups, 8, &s)).await?;
    let errors = live.errors.load(Relaxed);
    let first = live.first_error.lock().expect("lock").clone();
    live.stop().await;
    if let Some(e) = first {
        eprintln!("  scale: {errors} errors, first: {e}");
    }
    let new = new?;
    let new_count = crate::cost::work_units(&new);
    let v = new.values();
    let held = n - errors.min(n);
    Ok(vec![
        row(
            format!("scale: live tunnels held (asked {n}), each a 32 B echo every {LIVE_PERIOD:?}"),
            held as f64,
        ),
        row(
            "scale: seconds to open them (64 at a time)".into(),
            open_secs,
        ),
        row(
            "scale: RSS per live tunnel, KiB".into(),
            (rss1 - rss0) / n as f64,
        ),
        row("scale: gateway RSS with them, MiB".into(), rss1 / 1024.0),
        row(
            "scale: gateway CPU, live tunnels only, % of one core".into(),
            cpu_quiet / quiet_secs * 100.0,
        ),
        row(
            "scale: CPU per live-tunnel echo, µs".into(),
            cpu_quiet * 1e6 / echoes.max(1.0),
        ),
        row("scale: new tunnels/s beside them, 8 clients".into(), v[0]),
        row("scale: new tunnel p50 beside them, µs".into(), v[1]),
        row("scale: new tunnel p99 beside them, µs".into(), v[2]),
        row(
            "scale: gateway CPU, live + new tunnels, % of one core".into(),
            cpu_busy / busy_secs * 100.0,
        ),
        row("scale: new tunnels opened in that window".into(), new_count),
        row(
            "scale: errors (failed opens or echoes)".into(),
            errors as f64,
        ),
    ])
}

/// The `scale` case: live tunnels, then idle ones, each on a fresh gateway.
pub async fn scale_case(s: &Settings, bin: &Path, ups: Upstreams) -> (Vec<Row>, Vec<String>) {
    let window = if s.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(4)
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    match bounded(RUN_LIMIT * 2, scale_live(bin, ups, s.scale_live, window)).await {
        Ok(r) => rows.extend(r),
        Err(e) => notes.push(format!("scale (live) failed: {e}")),
    }
    let idle_rows = async {
        let p = start_portcullis(bin, &ups.ports(), "info")?;
        let v = bounded(
            RUN_LIMIT,
            idle(Via::Proxy(p.addr), ups, p.proc.pid(), s.scale_idle),
        )
        .await?;
        let rss = rss_kib(p.proc.pid())?;
        Ok::<_, String>(vec![
            row(
                format!("scale: idle tunnels held (asked {})", s.scale_idle),
                v[1],
            ),
            row("scale: RSS per idle tunnel, KiB".into(), v[0]),
            row("scale: gateway RSS with them, MiB".into(), rss / 1024.0),
        ])
    };
    match idle_rows.await {
        Ok(r) => rows.extend(r),
        Err(e) => notes.push(format!("scale (idle) failed: {e}")),
    }
    (rows, notes)
}

/// portcullis pinned to CPU 0 from its start (`taskset -c 0` in a wrapper
/// that execs it, so the pid stays; tokio then sizes one worker), or free
/// (two workers on this 2-core machine). The wrapper's dir goes with it.
fn start_pinned(
    bin: &Path,
    ups: Upstreams,
    pinned: bool,
) -> Result<(Proxy, Option<tempfile::TempDir>), String> {
    use std::os::unix::fs::PermissionsExt;
    if !pinned {
        return Ok((start_portcullis(bin, &ups.ports(), "info")?, None));
    }
    let dir = tempfile::tempdir().map_err(crate::io_err("tempdir"))?;
    let wrapper = dir.path().join("portcullis-1core");
    let script = format!("#!/bin/sh\nexec taskset -c 0 '{}' \"$@\"\n", bin.display());
    std::fs::write(&wrapper, script).map_err(crate::io_err("wrapper"))?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .map_err(crate::io_err("chmod"))?;
    Ok((start_portcullis(&wrapper, &ups.ports(), "info")?, Some(dir)))
}

/// How many workers the runtime of `pid` started: its `tokio-rt-worker`
/// (older tokio: `tokio-runtime-w`) threads.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| {
                        c.starts_with("tokio-rt-worker") || c.starts_with("tokio-runtime-w")
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

/// The `cores` case: 1 core (pinned) vs 2, alternating, `reps` rounds.
pub async fn cores_case(s: &Settings, bin: &Path, ups: Upstreams) -> (Vec<Row>, Vec<String>) {
    let run = async {
        let (one, _wrapper) = start_pinned(bin, ups, true)?;
        let (two, _) = start_pinned(bin, ups, false)?;
        eprintln!(
            "  cores: worker threads {} (pinned) and {} (free)",
            worker_threads(one.proc.pid()),
            worker_threads(two.proc.pid())
        );
        let rounds = s.reps.max(3) * 2 - 1;
        let slice = Settings {
            txn_time: Duration::from_secs(1),
            bulk_time: Duration::from_secs(1),
            ..s.clone()
        };
        // [pinned, free] × [tunnels/s, µs/tunnel, MiB/s, ms/GiB]
        let mut vals: [[Vec<f64>; 4]; 2] = Default::default();
        for _ in 0..rounds {
            for (i, p) in [&one, &two].into_iter().enumerate() {
                let via = Via::Proxy(p.addr);
                let pid = p.proc.pid();
                let (t, ct, _) =
                    timed_cpu(pid, bounded(RUN_LIMIT, tunnels(via, ups, 32, &slice))).await?;
                let (b, cb, _) = timed_cpu(
                    pid,
                    bounded(RUN_LIMIT, bulk(via, ups, Dir::Down, 8, &slice)),
                )
                .await?;
                let (t, b): (Sample, Sample) = (t?, b?);
                vals[i][1].push(cost(&t, Some(ct)));
                vals[i][3].push(cost(&b, Some(cb)));
                vals[i][0].push(t.values()[0]);
                vals[i][2].push(b.values()[0]);
            }
        }
        Ok::<_, String>((vals, rounds))
    };
    let (vals, rounds) = match run.await {
        Ok(v) => v,
        Err(e) => return (Vec::new(), vec![format!("cores failed: {e}")]),
    };
    let what = [
        "new tunnels/s, 32 clients",
        "CPU per new tunnel, µs",
        "8 tunnels download, MiB/s",
        "CPU per GiB down, ms",
    ];
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (i, cores) in [(0, 1), (1, 2)] {
        for (k, w) in what.iter().enumerate() {
            let v = vals[i][k].clone();
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
            rows.push(row(
                format!("cores: {w}, gateway on {cores} core(s)"),
                median(v),
            ));
            notes.push(format!(
                "cores: {w}, {cores} core(s): {rounds} rounds, min {lo:.1}, max {hi:.1}"
            ));
        }
    }
    (rows, notes)
}
