//! The load tool's settings: full and `--quick` sizes, command line and
//! environment (`--reps`, `--only`, `LOAD_*`), time slices of a
//! repetition, and the small verified settings of the path checks.
//!
//! Pure values: nothing here starts, dials or measures anything.

use std::time::Duration;

#[derive(Clone, Debug)]
/// Sizes, budgets and selection of one run.
pub struct Settings {
    /// Repetitions per case (median over them).
    pub reps: usize,
    /// Bulk: stream this long or `bulk_bytes`, whichever first.
    pub bulk_time: Duration,
    pub bulk_bytes: u64,
    /// New tunnels / HTTP requests: this long or this many, whichever first.
    pub txn_time: Duration,
    pub txn_max: usize,
    /// Keep-alive connections of the HTTP case.
    pub http_conns: usize,
    /// A repetition runs as this many slices per target, interleaved.
    pub bulk_slices: usize,
    pub txn_slices: usize,
    /// Tunnels the idle case holds.
    pub idle_tunnels: usize,
    /// The scale case: live (echoing) tunnels, then idle ones, through one gateway.
    pub scale_live: usize,
    pub scale_idle: usize,
    /// Check every byte (smoke) rather than counts only (bench).
    pub verify: bool,
    /// Case-name prefixes (`--only`); empty: every case.
    pub only: Vec<String>,
    /// Whether these are `--quick` sizes (said in the report).
    pub quick: bool,
}

impl Settings {
    /// The sizes of a full run.
    pub fn full() -> Settings {
        Settings {
            reps: 3,
            bulk_time: Duration::from_secs(3),
            bulk_bytes: 16 << 30,
            txn_time: Duration::from_secs(2),
            txn_max: 100_000,
            http_conns: 8,
            bulk_slices: 6,
            txn_slices: 10,
            idle_tunnels: 2000,
            scale_live: 9000,
            scale_idle: 9500,
            verify: false,
            only: Vec::new(),
            quick: false,
        }
    }

    /// The sizes of `--quick`.
    pub fn quick() -> Settings {
        Settings {
            reps: 1,
            bulk_time: Duration::from_millis(500),
            bulk_bytes: 512 << 20,
            txn_time: Duration::from_millis(500),
            txn_max: 20_000,
            bulk_slices: 2,
            txn_slices: 5,
            idle_tunnels: 300,
            scale_live: 500,
            scale_idle: 500,
            quick: true,
            ..Settings::full()
        }
    }

    /// One slice of a repetition cut into `n`.
    pub fn sliced(&self, n: usize) -> Settings {
        let n = n.max(1);
        Settings {
            bulk_time: self.bulk_time / n as u32,
            bulk_bytes: self.bulk_bytes / n as u64,
            txn_time: self.txn_time / n as u32,
            txn_max: (self.txn_max / n).max(1),
            ..self.clone()
        }
    }

    /// `--quick`, `--reps N`, `--only a,b` (and `LOAD_QUICK`, `LOAD_REPS`, `LOAD_ONLY`).
    pub fn from_args(args: &[String]) -> Settings {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let quick = args.iter().any(|a| a == "--quick") || env("LOAD_QUICK").is_some();
        let mut s = if quick {
            Settings::quick()
        } else {
            Settings::full()
        };
        let mut reps = env("LOAD_REPS");
        let mut only = env("LOAD_ONLY");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--reps" => reps = it.next().cloned(),
                "--only" => only = it.next().cloned(),
                "--quick" | "--bench" => {}
                other => eprintln!("load: ignoring argument {other:?}"),
            }
        }
        if let Some(r) = reps {
            s.reps = r.parse().unwrap_or_else(|_| {
                eprintln!("load: --reps {r:?} is not a number; using {}", s.reps);
                s.reps
            });
            s.reps = s.reps.clamp(1, 50);
        }
        if let Some(o) = only {
            s.only = o.split(',').map(|c| c.trim().to_string()).collect();
        }
        s
    }
}

/// Small sizes, every byte checked: the gate before measuring a path.
pub fn check_settings() -> Settings {
    Settings {
        reps: 1,
        bulk_time: Duration::from_secs(10),
        bulk_bytes: 3 << 20,
        txn_time: Duration::from_secs(5),
        txn_max: 20,
        http_conns: 2,
        bulk_slices: 1,
        txn_slices: 1,
        idle_tunnels: 0,
        scale_live: 0,
        scale_idle: 0,
        verify: true,
        only: Vec::new(),
        quick: true,
    }
}
