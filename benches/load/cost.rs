//! What the work cost the gateway process: CPU time (user + system, from
//! `/proc/PID/stat`) read before and after each measured slice, divided by
//! the work the clients counted (GiB relayed, tunnels opened, requests
//! forwarded). The direct column has no gateway process: its cost is blank.
//!
//! Reads `/proc` only; measures nothing itself.

use std::fs;

use crate::sample::Sample;

/// Clock ticks per second of `/proc/PID/stat` (`USER_HZ`, 100 on Linux for
/// every architecture the tool runs on; `getconf CLK_TCK` says the same).
pub const USER_HZ: f64 = 100.0;

/// CPU seconds (utime + stime, all threads) `pid` has used so far.
pub fn cpu_secs(pid: u32) -> Result<f64, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    stat_cpu_secs(&stat).ok_or_else(|| format!("bad /proc/{pid}/stat: {stat:?}"))
}

/// utime + stime of one `/proc/PID/stat` line, in seconds.
pub fn stat_cpu_secs(stat: &str) -> Option<f64> {
    // Fields after the `(comm)`, which may hold spaces: state is field 3,
    // utime field 14, stime field 15 (proc(5)).
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    Some((tick(14)? + tick(15)?) as f64 / USER_HZ)
}

/// The unit of work a sample counts: GiB relayed (bulk) or transactions.
pub fn work_units(sample: &Sample) -> f64 {
    match sample {
        Sample::Bulk { bytes, .. } => *bytes as f64 / (1u64 << 30) as f64,
        Sample::Txn { lat, .. } => lat.len() as f64,
    }
}

/// CPU per unit of work: ms per GiB (bulk) or µs per transaction; NaN
/// without a process or without work.
pub fn cost(sample: &Sample, cpu: Option<f64>) -> f64 {
    let units = work_units(sample);
    match cpu {
        Some(c) if units > 0.0 => match sample {
            Sample::Bulk { .. } => c * 1e3 / units,
            Sample::Txn { .. } => c * 1e6 / units,
        },
        _ => f64::NAN,
    }
}
