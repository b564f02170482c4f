//! The markdown report: one cell per column (a median, why it is missing,
//! or nothing), ratios against direct (rates) or added µs (latencies), and
//! the header lines that say what ran where (commit, load average, Squid).
//!
//! Formatting only: it measures nothing and starts nothing but `git`/`date`.

use std::fmt::Write as _;
use std::fs;
use std::process::Command;

use crate::cases::Kind;
use crate::proxies::manifest_dir;

/// One cell: a median, a reason it is missing, or nothing to show.
#[derive(Clone, Debug)]
pub enum Cell {
    Value(f64),
    Missing(String),
    Blank,
}

/// One table row: its label, how it compares, one cell per column.
pub struct Row {
    pub label: String,
    pub kind: Kind,
    pub cells: [Cell; COLS],
}

/// Column indices: direct, portcullis, squid, haproxy.
pub const DIRECT: usize = 0;
pub const PORTCULLIS: usize = 1;
pub const SQUID: usize = 2;
pub const HAPROXY: usize = 3;
/// How many columns.
pub const COLS: usize = 4;

/// The median (mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt_value(v: f64, kind: Kind) -> String {
    match kind {
        _ if v.is_nan() => "—".into(),
        Kind::Absolute if v < 100.0 => format!("{v:.1}"),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

fn fmt_cell(c: &Cell, kind: Kind) -> String {
    match c {
        Cell::Value(v) => fmt_value(*v, kind),
        Cell::Missing(why) => why.clone(),
        Cell::Blank => "—".into(),
    }
}

fn fmt_compare(proxy: &Cell, direct: &Cell, kind: Kind) -> String {
    match (proxy, direct, kind) {
        (Cell::Value(p), Cell::Value(d), Kind::Rate) if *d > 0.0 => format!("{:.2}", p / d),
        (Cell::Value(p), Cell::Value(d), Kind::Latency) => format!("{:+.0} µs", p - d),
        _ => "—".into(),
    }
}

/// The cost rows: each proxy's figure, portcullis against the reference the
/// goal names, and whether the goal is met (reported, never asserted).
pub fn cost_table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| cost: gateway process CPU (user+system) or RSS per unit of work | portcullis | squid \
         | haproxy | portcullis/reference | goal | met |\n",
    );
    out.push_str("| --- | ---: | ---: | ---: | ---: | --- | --- |\n");
    for r in rows {
        let Kind::Cost {
            reference,
            goal_pct,
        } = r.kind
        else {
            continue;
        };
        let name = if reference == SQUID {
            "squid"
        } else {
            "haproxy"
        };
        let (ratio, met) = match (&r.cells[PORTCULLIS], &r.cells[reference]) {
            (Cell::Value(p), Cell::Value(q)) if *q > 0.0 && !p.is_nan() && !q.is_nan() => {
                let ratio = p / q;
                let met = match goal_pct {
                    0 => "—",
                    g if ratio <= f64::from(g) / 100.0 => "yes",
                    _ => "**no**",
                };
                (format!("{ratio:.2} × {name}"), met)
            }
            _ => ("—".into(), "—"),
        };
        let goal = match goal_pct {
            0 => "—".to_string(),
            g => format!("≤ {:.2} × {name}", f64::from(g) / 100.0),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {ratio} | {goal} | {met} |",
            r.label,
            fmt_cell(&r.cells[PORTCULLIS], r.kind),
            fmt_cell(&r.cells[SQUID], r.kind),
            fmt_cell(&r.cells[HAPROXY], r.kind),
        );
    }
    out
}

/// The markdown table: values, then the two comparisons with direct.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| case | direct | portcullis | squid | haproxy | portcullis/direct | squid/direct \
         | haproxy/direct |\n",
    );
    out.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows.iter().filter(|r| !matches!(r.kind, Kind::Cost { .. })) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            fmt_cell(&r.cells[DIRECT], r.kind),
            fmt_cell(&r.cells[PORTCULLIS], r.kind),
            fmt_cell(&r.cells[SQUID], r.kind),
            fmt_cell(&r.cells[HAPROXY], r.kind),
            fmt_compare(&r.cells[PORTCULLIS], &r.cells[DIRECT], r.kind),
            fmt_compare(&r.cells[SQUID], &r.cells[DIRECT], r.kind),
            fmt_compare(&r.cells[HAPROXY], &r.cells[DIRECT], r.kind),
        );
    }
    out
}

/// Medians of per-target samples into rows; `errors` replace a target's cells.
pub fn to_rows(
    labels: Vec<(String, Kind)>,
    samples: &[Vec<Vec<f64>>; COLS],
    missing: &[Option<String>; COLS],
) -> Vec<Row> {
    labels
        .into_iter()
        .enumerate()
        .map(|(i, (label, kind))| {
            let cells = std::array::from_fn(|t| {
                if let Some(why) = &missing[t] {
                    Cell::Missing(why.clone())
                } else if samples[t].is_empty() {
                    Cell::Blank
                } else {
                    Cell::Value(median(samples[t].iter().map(|v| v[i]).collect()))
                }
            });
            Row { label, kind, cells }
        })
        .collect()
}

/// The 1-minute load average: other work on the machine skews every column alike.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(manifest_dir())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An error as a table cell: first line, 48 characters, no `|`.
pub fn short_error(e: &str) -> String {
    let one_line = e.lines().next().unwrap_or_default();
    let mut s: String = one_line.chars().take(48).collect();
    if s.len() < one_line.len() {
        s.push('…');
    }
    format!("error: {}", s.replace('|', "/"))
}

/// What the report's first lines say about the run.
pub struct Header {
    /// The 1-minute load average before the run.
    pub load_before: String,
    /// Repetitions per case, and whether sizes were `--quick`.
    pub reps: usize,
    pub quick: bool,
    /// Squid's version, if installed.
    pub squid: Option<String>,
    /// HAProxy's version, if installed.
    pub haproxy: Option<String>,
    /// Whether any transparent case ran.
    pub transparent: bool,
}

/// The markdown report: what ran where, the table, then the notes.
pub fn report(h: &Header, rows: &[Row], notes: &[String]) -> String {
    let commit = command_line("git", &["rev-parse", "--short", "HEAD"]).unwrap_or("?".into());
    let dirty = command_line("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|o| !o.is_empty());
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or("?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut report = String::new();
    let _ = writeln!(
        report,
        "portcullis load results: commit `{commit}`{}, {date}, {cpus} CPUs (load average \
         {} before, {} after), median of {} rep(s){}",
        if dirty {
            " (+ uncommitted changes)"
        } else {
            ""
        },
        h.load_before,
        loadavg(),
        h.reps,
        if h.quick { ", --quick sizes" } else { "" },
    );
    let _ = writeln!(
        report,
        "portcullis: `target/release/portcullis`, `[log] level = \"info\"` (one JSON line per \
         connection, to a file) unless the row says warn; squid: {}; all on 127.0.0.1.\n",
        match &h.squid {
            Some(v) => format!("{v}, `workers 1`, `cache deny all`, access.log to a file"),
            None => "not installed".into(),
        }
    );
    let _ = writeln!(
        report,
        "haproxy: {}; cost rows: the gateway process's utime+stime (`/proc/PID/stat`) over \
         the measured slices divided by the work the clients counted.\n",
        match &h.haproxy {
            Some(v) => format!(
                "{v}, `mode tcp`, `option splice-request` + `splice-response`, one frontend per upstream, no logs"
            ),
            None => "not installed".into(),
        }
    );
    if h.transparent {
        let _ = writeln!(
            report,
            "transparent rows: client and servers in network namespaces of their own, through a \
             gateway namespace that only routes (direct column) or one running portcullis \
             (`[log] level = \"info\"`) behind the `render nftables` ruleset; squid n/a.\n"
        );
    }
    report.push_str(&table(rows));
    if rows.iter().any(|r| matches!(r.kind, Kind::Cost { .. })) {
        report.push('\n');
        report.push_str(&cost_table(rows));
    }
    for n in notes {
        let _ = writeln!(report, "\nnote: {n}");
    }
    report
}
