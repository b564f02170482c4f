//! What the machine running the tests offers: root privileges and installed
//! tools, and the one rule for a missing one (skip with `SKIPPED: why`, or
//! fail when `CI=true`, since CI must run every test).
//!
//! Plain `std` only: `benches/load` includes this file with `#[path]`, so the
//! test harness and the load tool decide "are we root?" the same way. It
//! starts nothing that outlives the call.

use std::process::{Command, Stdio};

/// Whether this process runs with effective uid 0: the effective uid is what
/// the kernel checks for `ip netns`, `nft` and sysctl writes.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            // `Uid:` lists real, effective, saved and filesystem uids.
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether running `program args` succeeds (the tool is installed and works).
pub fn tool_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `CI=true`: then nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True when `available`; otherwise prints `SKIPPED: why` and returns false,
/// or panics when `CI=true` (CI must run every test).
pub fn require(available: bool, why: &str) -> bool {
    if available {
        return true;
    }
    if in_ci() {
        panic!("required tool missing in CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// [`require`] on `program args` working, with `PROGRAM not found` as why.
pub fn have(program: &str, args: &[&str]) -> bool {
    require(tool_works(program, args), &format!("{program} not found"))
}

/// python3 is needed for every test with an upstream.
pub fn have_python() -> bool {
    require(tool_works("python3", &["--version"]), "python3 not found")
}
