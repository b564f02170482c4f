//! portcullis: an egress gateway that locks a network's outbound traffic to an allowlist.
//!
//! ```text
//! config ─compile─▶ Policy (immutable Arc, swapped whole on reload)
//! listen ─▶ classify (CONNECT/SNI/Host) ─▶ policy.decide ─▶ upstream.connect ─▶ tunnel
//! side channels: &Metrics (counters) and tracing (one event per connection at close),
//! written to stderr by one log-writer thread
//! ```
//!
//! Modules are listed in the order data flows through them.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod config;
pub mod servicetags;
pub mod policy;
pub mod load;
pub mod gateway;
pub mod serve;
pub mod reload;
pub mod listen;
pub mod classify;
pub mod upstream;
pub mod tunnel;
pub mod admin;
pub mod spare;
pub mod metrics;
pub mod conntrack;
pub mod learned;
pub mod nftset;
pub mod ruleset;
pub mod logwriter;
pub mod shutdown;
pub mod notify;
pub mod render;
pub mod import;
pub mod cli;
#[cfg(test)]
mod testing;
