//! The full measurement (`cargo bench --bench load`): starts the upstreams,
//! portcullis (info and warn), Squid and, for transparent cases, the
//! namespaces; gates every path on verified traffic; runs the selected
//! cases interleaved direct → portcullis → Squid; prints the report.
//!
//! Every run is bounded by [`RUN_LIMIT`]; every child and namespace is gone
//! when it returns.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cases::{CASES, Case, Work, rows, run_work};
use crate::clients::{Via, bulk, idle, tunnels};
use crate::cost::{cost, cpu_secs};
use crate::haproxy::{RelayProxy, haproxy_binary, haproxy_version, start_haproxy};
use crate::http::http_load;
use crate::io_err;
use crate::proxies::{
    Proc, Proxy, find_portcullis, manifest_dir, newest_mtime, squid_binary, squid_version,
    start_portcullis, start_squid,
};
use crate::report::{
    COLS, DIRECT, HAPROXY, Header, PORTCULLIS, Row, SQUID, loadavg, report, short_error, to_rows,
};
use crate::sample::Sample;
use crate::scale::{cores_case, scale_case};
use crate::settings::{Settings, check_settings};
use crate::transparent::Transparent;
use crate::upstreams::{LOOPBACK, Upstreams, start_upstreams};
use crate::wire::Dir;

/// Upper bound on one measurement run (the case's own time plus setup).
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// HAProxy's `maxconn`: it sizes its own open-file need from it (2.5 ×
/// maxconn with its splice pipes), which must fit under the 20,000 hard limit.
pub const HAPROXY_MAXCONN: usize = 7900;

/// One verified pass of every kind of traffic: nothing is measured through a
/// path that loses or changes bytes.
async fn check_path(via: Via, ups: Upstreams) -> Result<(), String> {
    let check = check_settings();
    for (dir, streams) in [(Dir::Down, 1), (Dir::Up, 1), (Dir::Down, 3), (Dir::Up, 3)] {
        bulk(via, ups, dir, streams, &check).await?;
    }
    tunnels(via, ups, 4, &check).await?;
    http_load(via, ups, 2, &check).await?;
    Ok(())
}

/// `f`, or an error once `limit` passes.
pub async fn bounded<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {limit:?}")))
}

/// The gateway processes whose CPU the cost rows divide, per column.
pub type Pids = [Option<u32>; COLS];

/// Runs `reps` repetitions, each cut into `slices` short slices that visit
/// the `active` columns in turn, so a burst of other work on the machine hits
/// all of them alike. A column whose run fails is marked missing. Returns
/// each column's values per repetition (its slices pooled), followed by its
/// cost: `pids`' CPU over its slices per unit of work (NaN without a pid).
pub async fn interleave(
    reps: usize,
    slices: usize,
    active: [bool; COLS],
    missing: &mut [Option<String>; COLS],
    pids: Pids,
    mut run: impl AsyncFnMut(usize) -> Result<Sample, String>,
) -> [Vec<Vec<f64>>; COLS] {
    let mut samples: [Vec<Vec<f64>>; COLS] = Default::default();
    for rep in 0..reps {
        let mut acc: [Option<Sample>; COLS] = Default::default();
        let mut cpu: [Option<f64>; COLS] = pids.map(|p| p.map(|_| 0.0));
        for _ in 0..slices {
            for (col, on) in active.into_iter().enumerate() {
                if !on || missing[col].is_some() {
                    continue;
                }
                let before = pids[col].map(cpu_secs).transpose();
                let result = run(col).await;
                let after = pids[col].map(cpu_secs).transpose();
                match (before, after) {
                    (Ok(Some(b)), Ok(Some(a))) => *cpu[col].get_or_insert(0.0) += a - b,
                    (Err(e), _) | (_, Err(e)) => eprintln!("  rep {rep} column {col}: {e}"),
                    _ => {}
                }
                match result {
                    Ok(v) => {
                        acc[col] = Some(match acc[col].take() {
                            Some(a) => a.merge(v),
                            None => v,
                        });
                    }
                    Err(e) => {
                        eprintln!("  rep {rep} column {col}: {e}");
                        missing[col] = Some(short_error(&e));
                    }
                }
            }
        }
        for (col, a) in acc.into_iter().enumerate() {
            if let Some(a) = a
                && missing[col].is_none()
            {
                let c = cost(&a, cpu[col]);
                let mut v = a.values();
                v.push(c);
                eprintln!("  rep {rep} column {col}: {v:.1?}");
                samples[col].push(v);
            }
        }
    }
    samples
}

/// Raises this process's open-file soft limit to the hard limit (children
/// inherit it) with util-linux `prlimit`; returns the soft limit in force.
fn raise_nofile() -> Option<u64> {
    let read = || -> Option<(u64, u64)> {
        let limits = fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut nums = line
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok());
        Some((nums.next()?, nums.next().unwrap_or(u64::MAX)))
    };
    let (soft, hard) = read()?;
    if soft < hard {
        let pid = std::process::id().to_string();
        let _ = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    read().map(|(soft, _)| soft)
}

/// Everything the loopback cases run against, started once per run.
struct Targets {
    ups: Upstreams,
    ports: [u16; 3],
    /// portcullis at `[log] level = "info"` and at `"warn"` (the `-warn` rows).
    portcullis: Proxy,
    quiet: Proxy,
    squid_bin: Option<PathBuf>,
    /// The running Squid, or the table cell saying why there is none.
    squid: Result<Proxy, String>,
    haproxy_bin: Option<PathBuf>,
    /// The running HAProxy, or the table cell saying why there is none.
    haproxy: Result<RelayProxy, String>,
    /// Per target (direct, portcullis, squid, quiet portcullis, haproxy):
    /// why its verified path check failed.
    broken: [Option<String>; 5],
}

impl Targets {
    /// Starts both portcullis instances and Squid (if installed), then gates
    /// every path: it carries bytes intact before anything is measured.
    async fn start(bin: &Path, ups: Upstreams) -> Result<Targets, String> {
        let ports = ups.ports();
        let squid_bin = squid_binary();
        let portcullis = start_portcullis(bin, &ports, "info")?;
        let quiet = start_portcullis(bin, &ports, "warn")?;
        let squid = match &squid_bin {
            None => Err("n/a (squid not installed)".to_string()),
            Some(b) => start_squid(b, &ports).map_err(|e| {
                eprintln!("load: squid: {e}");
                "n/a (squid failed to start)".to_string()
            }),
        };
        let haproxy_bin = haproxy_binary();
        let haproxy = match &haproxy_bin {
            None => Err("n/a (haproxy not installed)".to_string()),
            Some(b) => start_haproxy(b, &ports, HAPROXY_MAXCONN).map_err(|e| {
                eprintln!("load: haproxy: {e}");
                "n/a (haproxy failed to start)".to_string()
            }),
        };
        let mut t = Targets {
            ups,
            ports,
            portcullis,
            quiet,
            squid_bin,
            squid,
            haproxy_bin,
            haproxy,
            broken: Default::default(),
        };
        let targets: [(usize, Option<Via>); 5] = [
            (0, Some(Via::Direct)),
            (1, Some(Via::Proxy(t.portcullis.addr))),
            (2, t.squid.as_ref().ok().map(|p| Via::Proxy(p.addr))),
            (3, Some(Via::Proxy(t.quiet.addr))),
            (4, t.haproxy.as_ref().ok().map(|p| Via::Relay(p.relay))),
        ];
        for (i, via) in targets {
            let Some(via) = via else { continue };
            if let Err(e) = bounded(RUN_LIMIT, check_path(via, ups)).await {
                eprintln!("load: path check failed for target {i}: {e}");
                t.broken[i] = Some(short_error(&format!("broken: {e}")));
            }
        }
        Ok(t)
    }
}

/// `target/release/portcullis`, with a warning when `src/` is newer.
fn release_binary() -> Result<PathBuf, String> {
    let bin = find_portcullis(true).ok_or(
        "target/release/portcullis not found: run `cargo build --release` (benches/run-load.sh does)",
    )?;
    if let (Ok(bin_time), Some(src_time)) = (
        fs::metadata(&bin).and_then(|m| m.modified()),
        newest_mtime(&manifest_dir().join("src")),
    ) && src_time > bin_time
    {
        eprintln!("load: warning: {} is older than src/", bin.display());
    }
    Ok(bin)
}

/// Raises the open-file limit and shrinks the idle case to what fits in it;
/// returns the settings and a note when it had to shrink.
fn fit_open_files(s: Settings) -> (Settings, Vec<String>) {
    let mut idle_n = s.idle_tunnels;
    let mut notes = Vec::new();
    if let Some(limit) = raise_nofile() {
        // Client and echo-server ends here, plus slack.
        let fit = (limit.saturating_sub(256) / 2) as usize;
        if fit < idle_n {
            notes.push(format!(
                "open-file limit {limit}: idle case holds {fit} tunnels, not {idle_n}"
            ));
            idle_n = fit;
        }
    }
    let mut s = Settings {
        idle_tunnels: idle_n,
        ..s
    };
    if let Some(limit) = raise_nofile() {
        // The tool holds both ends of each tunnel (client and upstream), as
        // the gateway does: 2 descriptors per tunnel in each process.
        let fit = (limit.saturating_sub(512) / 2) as usize;
        for (n, what) in [(&mut s.scale_live, "live"), (&mut s.scale_idle, "idle")] {
            if fit < *n {
                notes.push(format!(
                    "open-file limit {limit}: scale holds {fit} {what} tunnels, not {n}"
                ));
                *n = fit;
            }
        }
    }
    (s, notes)
}

/// The cases `--only` selects (all without it); `Err` when it selects none.
fn select(s: &Settings) -> Result<Vec<&'static Case>, String> {
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|c| s.only.is_empty() || s.only.iter().any(|o| c.name.starts_with(o.as_str())))
        .collect();
    if selected.is_empty() {
        let names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        return Err(format!(
            "--only {:?} matches no case (cases: {})",
            s.only,
            names.join(", ")
        ));
    }
    Ok(selected)
}

/// Bulk cases run in `bulk_slices` slices, the others in `txn_slices`.
fn slices(case: &Case, s: &Settings) -> usize {
    match case.work {
        Work::Bulk { .. } => s.bulk_slices,
        _ => s.txn_slices,
    }
}

/// The full measurement; prints the markdown report to stdout.
pub async fn bench(s: Settings) -> Result<(), String> {
    let bin = release_binary()?;
    let load_before = loadavg();
    let (s, mut notes) = fit_open_files(s);
    let ups = start_upstreams(LOOPBACK)
        .await
        .map_err(io_err("upstreams"))?;
    let selected = select(&s)?;
    let targets = Targets::start(&bin, ups).await?;
    let squid_ver = targets.squid_bin.as_deref().map(squid_version);
    let haproxy_ver = targets.haproxy_bin.as_deref().map(haproxy_version);

    let mut all_rows = Vec::new();
    // Built at the first transparent case, torn down after the last case.
    let mut transparent: Option<Result<Transparent, String>> = None;
    for case in &selected {
        eprintln!("load: {} ({} rep(s))", case.name, s.reps);
        let rows = if case.transparent {
            let t = transparent.get_or_insert_with(|| {
                eprintln!("load: building the transparent namespaces");
                tokio::task::block_in_place(|| Transparent::setup(&bin, "info"))
            });
            transparent_case(case, &s, t).await
        } else if let Work::Idle = case.work {
            idle_case(case, &s, &bin, &targets).await
        } else if let Work::Scale | Work::Cores = case.work {
            let (rows, more) = if let Work::Scale = case.work {
                scale_case(&s, &bin, targets.ups).await
            } else {
                cores_case(&s, &bin, targets.ups).await
            };
            notes.extend(more);
            rows
        } else {
            loopback_case(case, &s, &targets).await
        };
        all_rows.extend(rows);
    }
    drop((targets, transparent.take()));

    let header = Header {
        load_before,
        reps: s.reps,
        quick: s.quick,
        squid: squid_ver,
        haproxy: haproxy_ver,
        transparent: selected.iter().any(|c| c.transparent),
    };
    print!("{}", report(&header, &all_rows, &notes));
    Ok(())
}

/// A transparent case: the direct column is the routed gateway, squid n/a.
async fn transparent_case(
    case: &Case,
    s: &Settings,
    t: &mut Result<Transparent, String>,
) -> Vec<Row> {
    let mut missing: [Option<String>; COLS] = Default::default();
    missing[SQUID] = Some("n/a".into());
    missing[HAPROXY] = Some("n/a".into());
    let samples = match t {
        Err(e) => {
            missing[DIRECT] = Some(e.clone());
            missing[PORTCULLIS] = Some(e.clone());
            Default::default()
        }
        Ok(t) => {
            for col in [DIRECT, PORTCULLIS] {
                missing[col] = missing[col].take().or_else(|| t.broken[col].clone());
            }
            let n = slices(case, s);
            let slice = s.sliced(n);
            let active = [true, true, false, false];
            interleave(s.reps, n, active, &mut missing, [None; COLS], async |col| {
                let ups = t.upstreams(col);
                tokio::task::block_in_place(|| t.client.run(case.work, ups, &slice))
            })
            .await
        }
    };
    to_rows(rows(case, s), &samples, &missing)
}

/// The idle case: every repetition on a fresh portcullis and a fresh Squid,
/// so memory from earlier cases does not count.
async fn idle_case(case: &Case, s: &Settings, bin: &Path, targets: &Targets) -> Vec<Row> {
    let mut samples: [Vec<Vec<f64>>; COLS] = Default::default();
    let mut missing: [Option<String>; COLS] = Default::default();
    for rep in 0..s.reps {
        for t in [PORTCULLIS, SQUID, HAPROXY] {
            if missing[t].is_some() {
                continue;
            }
            let r = match fresh_proxy(t, bin, targets) {
                Ok((via, proc)) => {
                    let held = idle(via, targets.ups, proc.pid(), s.idle_tunnels);
                    bounded(RUN_LIMIT, held).await
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => {
                    eprintln!("  rep {rep} target {t}: {v:?}");
                    samples[t].push(v);
                }
                Err(e) => missing[t] = Some(short_error(&e)),
            }
        }
    }
    if targets.squid_bin.is_none() {
        missing[SQUID] = Some("n/a (squid not installed)".into());
    }
    if targets.haproxy_bin.is_none() {
        missing[HAPROXY] = Some("n/a (haproxy not installed)".into());
    }
    to_rows(rows(case, s), &samples, &missing)
}

/// A freshly started proxy of column `t`: how to reach it and its process.
fn fresh_proxy(t: usize, bin: &Path, targets: &Targets) -> Result<(Via, Proc), String> {
    let p = match t {
        PORTCULLIS => start_portcullis(bin, &targets.ports, "info")?,
        SQUID => match &targets.squid_bin {
            None => return Err("n/a (squid not installed)".into()),
            Some(b) => start_squid(b, &targets.ports)?,
        },
        _ => {
            let b = targets.haproxy_bin.as_deref();
            let h = start_haproxy(
                b.ok_or("n/a (haproxy not installed)")?,
                &targets.ports,
                HAPROXY_MAXCONN,
            )?;
            return Ok((Via::Relay(h.relay), h.proc));
        }
    };
    Ok((Via::Proxy(p.addr), p.proc))
}

/// A loopback case: direct, portcullis (info, or warn for `-warn` rows) and
/// Squid (not for `-warn` rows), interleaved.
async fn loopback_case(case: &Case, s: &Settings, targets: &Targets) -> Vec<Row> {
    let mut missing: [Option<String>; COLS] = Default::default();
    let (proxy_target, proxy) = if case.quiet_log {
        (3, &targets.quiet)
    } else {
        (1, &targets.portcullis)
    };
    let squid = match (&targets.squid, case.quiet_log) {
        (Ok(p), false) => Some(Via::Proxy(p.addr)),
        _ => None,
    };
    let haproxy = targets.haproxy.as_ref().ok();
    let vias: [(usize, usize, Option<Via>); COLS] = [
        (DIRECT, 0, Some(Via::Direct)),
        (PORTCULLIS, proxy_target, Some(Via::Proxy(proxy.addr))),
        (SQUID, 2, squid),
        (HAPROXY, 4, haproxy.map(|h| Via::Relay(h.relay))),
    ];
    for (col, target, via) in vias {
        if let Some(b) = &targets.broken[target] {
            missing[col] = Some(b.clone());
        } else if via.is_none() && col == SQUID && !case.quiet_log {
            missing[col] = targets.squid.as_ref().err().cloned();
        } else if via.is_none() && col == HAPROXY {
            missing[col] = targets.haproxy.as_ref().err().cloned();
        }
    }
    let squid_pid = targets.squid.as_ref().ok().map(|p| p.proc.pid());
    let pids: Pids = [
        None,
        Some(proxy.proc.pid()),
        squid_pid.filter(|_| !case.quiet_log),
        haproxy.map(|h| h.proc.pid()),
    ];
    let n = slices(case, s);
    let slice = s.sliced(n);
    let active = vias.map(|(_, _, via)| via.is_some());
    let ups = targets.ups;
    let samples = interleave(
        s.reps,
        n,
        active,
        &mut missing,
        pids,
        async |col| match vias[col].2 {
            Some(via) => bounded(RUN_LIMIT, run_work(case.work, via, ups, &slice)).await,
            None => Err("no target for this column".into()),
        },
    )
    .await;
    to_rows(rows(case, s), &samples, &missing)
}
