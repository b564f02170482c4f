//! The cases the tool measures ([`CASES`]), the rows each one adds to the
//! table (label and how it compares with direct), and how one run of a case
//! is dispatched to the clients.
//!
//! Adding a case is one entry in [`CASES`]; its rows come from [`rows`].

use crate::clients::{Via, bulk, tunnels};
use crate::http::http_load;
use crate::report::{HAPROXY, SQUID};
use crate::sample::Sample;
use crate::settings::Settings;
use crate::upstreams::Upstreams;
use crate::wire::Dir;

#[derive(Clone, Copy, Debug)]
/// What a case runs on each target.
pub enum Work {
    Bulk {
        dir: Dir,
        streams: usize,
    },
    Tunnels {
        clients: usize,
    },
    Http,
    Idle,
    /// Many live tunnels, then many idle ones (rows from `scale`).
    Scale,
    /// The gateway on 1 core vs 2 (rows from `scale`).
    Cores,
}

/// One named case: its work and where it runs.
pub struct Case {
    /// The name `--only` matches by prefix.
    pub name: &'static str,
    /// What runs on each target.
    pub work: Work,
    /// Measure the portcullis instance at `[log] level = "warn"` (no access lines).
    pub quiet_log: bool,
    /// Through the namespaces: routed gateway (direct column) vs portcullis gateway.
    pub transparent: bool,
}

/// Every case, in report order.
pub const CASES: &[Case] = &[
    Case {
        name: "bulk-down",
        work: Work::Bulk {
            dir: Dir::Down,
            streams: 1,
        },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "bulk-up",
        work: Work::Bulk {
            dir: Dir::Up,
            streams: 1,
        },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "bulk-down-8",
        work: Work::Bulk {
            dir: Dir::Down,
            streams: 8,
        },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "bulk-up-8",
        work: Work::Bulk {
            dir: Dir::Up,
            streams: 8,
        },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "tunnels-1",
        work: Work::Tunnels { clients: 1 },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "tunnels-32",
        work: Work::Tunnels { clients: 32 },
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "tunnels-32-warn",
        work: Work::Tunnels { clients: 32 },
        quiet_log: true,
        transparent: false,
    },
    Case {
        name: "http",
        work: Work::Http,
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "http-warn",
        work: Work::Http,
        quiet_log: true,
        transparent: false,
    },
    Case {
        name: "idle",
        work: Work::Idle,
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "scale",
        work: Work::Scale,
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "cores",
        work: Work::Cores,
        quiet_log: false,
        transparent: false,
    },
    Case {
        name: "transparent-bulk-down",
        work: Work::Bulk {
            dir: Dir::Down,
            streams: 1,
        },
        quiet_log: false,
        transparent: true,
    },
    Case {
        name: "transparent-bulk-up",
        work: Work::Bulk {
            dir: Dir::Up,
            streams: 1,
        },
        quiet_log: false,
        transparent: true,
    },
    Case {
        name: "transparent-conns-32",
        work: Work::Tunnels { clients: 32 },
        quiet_log: false,
        transparent: true,
    },
];

/// How a row compares a proxy with direct.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Higher is better: proxy / direct.
    Rate,
    /// Time: proxy − direct, shown as added µs.
    Latency,
    /// No direct counterpart.
    Absolute,
    /// A cost (lower is better), in the cost table beside `reference`'s;
    /// the goal is portcullis ≤ `goal_pct` % of it (0: no goal).
    Cost { reference: usize, goal_pct: u32 },
}

/// Rows of a transparent case; the direct column is the routed gateway.
fn transparent_rows(case: &Case) -> Vec<(String, Kind)> {
    match case.work {
        Work::Bulk { dir, .. } => {
            let what = if dir == Dir::Down {
                "download"
            } else {
                "upload"
            };
            vec![(
                format!("transparent: 1 connection {what}, MiB/s (direct = routed)"),
                Kind::Rate,
            )]
        }
        Work::Tunnels { clients } => vec![
            (
                format!("transparent: new connections/s, {clients} clients (direct = routed)"),
                Kind::Rate,
            ),
            (
                format!("transparent: new connection p50, {clients} clients, µs"),
                Kind::Latency,
            ),
            (
                format!("transparent: new connection p99, {clients} clients, µs"),
                Kind::Latency,
            ),
        ],
        Work::Http | Work::Idle | Work::Scale | Work::Cores => Vec::new(),
    }
}

/// A cost row compared with `reference`, goal `goal_pct` % of it (0: none).
fn cost_vs(reference: usize, goal_pct: u32) -> Kind {
    Kind::Cost {
        reference,
        goal_pct,
    }
}

/// Row labels and kinds of a case; values come in the same order.
pub fn rows(case: &Case, s: &Settings) -> Vec<(String, Kind)> {
    let note = if case.quiet_log {
        " (portcullis log=warn)"
    } else {
        ""
    };
    if case.transparent {
        return transparent_rows(case);
    }
    match case.work {
        Work::Bulk { dir, streams } => {
            let what = if dir == Dir::Down {
                "download"
            } else {
                "upload"
            };
            let label = if streams == 1 {
                format!("1 tunnel {what}, MiB/s")
            } else {
                format!("{streams} tunnels {what} (sum), MiB/s")
            };
            let cost = format!(
                "CPU per GiB, {label_short}, ms",
                label_short = label.trim_end_matches(", MiB/s")
            );
            vec![(label, Kind::Rate), (cost, cost_vs(HAPROXY, 100))]
        }
        Work::Tunnels { clients } => {
            let c = if clients == 1 {
                "1 client".to_string()
            } else {
                format!("{clients} clients")
            };
            vec![
                (format!("new tunnels/s, {c}{note}"), Kind::Rate),
                (format!("new tunnel p50, {c}{note}, µs"), Kind::Latency),
                (format!("new tunnel p99, {c}{note}, µs"), Kind::Latency),
                (
                    format!("CPU per new tunnel, {c}{note}, µs"),
                    cost_vs(HAPROXY, 130),
                ),
            ]
        }
        Work::Http => {
            let c = s.http_conns;
            vec![
                (
                    format!("HTTP forwarding req/s, {c} keep-alive conns{note}"),
                    Kind::Rate,
                ),
                (
                    format!("HTTP request p50, {c} conns{note}, µs"),
                    Kind::Latency,
                ),
                (
                    format!("HTTP request p99, {c} conns{note}, µs"),
                    Kind::Latency,
                ),
                (
                    format!("CPU per forwarded HTTP request, {c} conns{note}, µs"),
                    cost_vs(SQUID, 50),
                ),
            ]
        }
        Work::Idle => vec![
            (
                format!("RSS per idle tunnel ({} held), KiB", s.idle_tunnels),
                cost_vs(HAPROXY, 0),
            ),
            ("idle tunnels actually held".into(), Kind::Absolute),
        ],
        Work::Scale | Work::Cores => Vec::new(),
    }
}

/// One run of `work` through `via` (idle is run by the caller, on fresh proxies).
pub async fn run_work(
    work: Work,
    via: Via,
    ups: Upstreams,
    s: &Settings,
) -> Result<Sample, String> {
    match work {
        Work::Bulk { dir, streams } => bulk(via, ups, dir, streams, s).await,
        Work::Tunnels { clients } => tunnels(via, ups, clients, s).await,
        Work::Http => http_load(via, ups, s.http_conns, s).await,
        Work::Idle | Work::Scale | Work::Cores => Err("run on fresh proxies".into()),
    }
}
