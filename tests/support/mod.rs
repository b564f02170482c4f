//! Shared harness for end-to-end tests, one job per module:
//!
//! - [`host`]: root and installed tools; skip (`SKIPPED: why`) or fail in CI.
//! - [`process`]: client commands with the proxy environment cleaned, runs
//!   with a deadline, line readers on a child's pipes, signals, bounded waits.
//! - [`http`]: a blocking raw-socket HTTP/1.1 client (heads, bodies, responses).
//! - [`metrics`]: Prometheus text parsing and polling.
//! - [`tls`]: [`TestCa`], a throwaway CA and leaf certificates as PEM files.
//! - [`proxy`]: [`Proxy`], the `portcullis` binary as a child process.
//! - [`upstream`]: [`Upstream`], `tests/fixtures/upstream.py` on 127.0.0.2.
//! - [`netns`] and [`nettools`]: network namespaces for the transparent
//!   tests (root only), and the raw TCP/UDP clients and echo servers in them.
//!
//! Everything but `netns`/`nettools` is re-exported here, so tests write
//! `support::Proxy`. No sleeps as synchronisation: every wait is on an event
//! or a polled condition with a deadline, and every child is killed when its
//! owner drops.
#![allow(dead_code)]

pub mod host;
pub mod http;
pub mod metrics;
pub mod netns;
pub mod nettools;
pub mod process;
pub mod proxy;
pub mod tls;
pub mod upstream;

// Each test binary uses its own part of the harness: a re-export one of them
// does not use is not a mistake.
#[allow(unused_imports)]
pub use host::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use metrics::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use tls::*;
#[allow(unused_imports)]
pub use upstream::*;
