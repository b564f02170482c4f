//! `portcullis diff OLD NEW`: the rules a config change adds, removes and changes, and the verdicts it flips.
//!
//! In: two loaded configs (the same `--var`s and tags file for both) and
//! optionally access-log files. Out: the rule changes
//! ([`crate::policy::diff`], the same lines a reload logs), every
//! `[[expect]]` of either config whose verdict differs between them, and
//! every destination in the logs whose verdict differs, with its hits. Exit
//! code 0 when nothing differs, 1 when something does (as diff(1)).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::report::{parse_dest, verdict_text};
use super::seen::Log;
use crate::config::Protocol;
use crate::load::Loaded;
use crate::policy::{Dest, Policy, Target, diff};

/// Prints what changes from `old` to `new`, and in `logs`' traffic.
///
/// # Errors
/// A log file that cannot be read, or stdout closed.
pub fn diff(old: &Loaded, new: &Loaded, logs: &[PathBuf]) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let changes = diff::rule_changes(&old.policy, &new.policy);
    writeln!(out, "rules: {}", diff::summary(&changes))?;
    for c in &changes {
        writeln!(out, "  {c}")?;
    }
    let mut differs = !changes.is_empty();
    let flipped = expectations(old, new);
    if !flipped.is_empty() {
        writeln!(out, "[[expect]] verdicts that change:")?;
        for line in &flipped {
            writeln!(out, "  {line}")?;
        }
        differs = true;
    }
    if !logs.is_empty() {
        let log = Log::read(logs)?;
        let mut lines = Vec::new();
        for ((host, port, group), seen) in &log.dests {
            let dest = Dest {
                target: Target::parse(host),
                port: *port,
                proto: Protocol::Tcp,
            };
            if let Some(flip) = flip(&old.policy, &new.policy, &dest, seen.client) {
                let who = if group.is_empty() {
                    String::new()
                } else {
                    format!(" [{group}]")
                };
                lines.push(format!("{host}:{port}{who}: {flip} ({} hits)", seen.hits()));
            }
        }
        writeln!(
            out,
            "logged destinations: {} from {} lines ({} skipped), {} change verdict",
            log.dests.len(),
            log.lines,
            log.skipped,
            lines.len()
        )?;
        for line in &lines {
            writeln!(out, "  {line}")?;
        }
        differs |= !lines.is_empty();
    }
    Ok(if differs {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `old verdict → new verdict` for a client at `client` (each policy
/// placing it in its own groups; none: a client in no group), when they differ.
fn flip(old: &Policy, new: &Policy, dest: &Dest<'_>, client: Option<IpAddr>) -> Option<String> {
    let decide = |p: &Policy| match client {
        Some(ip) if p.client(ip).served() => p.decide_for(dest, p.client(ip)),
        _ => p.decide(dest),
    };
    let (a, b) = (decide(old), decide(new));
    (a.verdict != b.verdict)
        .then(|| format!("{} → {}", verdict_text(old, &a), verdict_text(new, &b)))
}

/// Every `[[expect]]` destination of either config whose verdict differs.
fn expectations(old: &Loaded, new: &Loaded) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let files =
        (old.config.expects_by_file(&old.source)).chain(new.config.expects_by_file(&new.source));
    for (source, expects) in files {
        for e in expects {
            let Ok(arg) = parse_dest(e.dest.get_ref(), 443) else {
                continue;
            };
            if !seen.insert((arg.host.clone(), arg.port, e.proto.as_str())) {
                continue;
            }
            let dest = Dest {
                target: Target::parse(&arg.host),
                port: arg.port,
                proto: e.proto,
            };
            let client = (e.client.as_ref()).and_then(|c| c.get_ref().trim().parse().ok());
            if let Some(flip) = flip(&old.policy, &new.policy, &dest, client) {
                let loc = source.locate(&e.dest.span());
                out.push(format!(
                    "{loc}: {}:{}/{}: {flip}",
                    arg.host,
                    arg.port,
                    e.proto.as_str()
                ));
            }
        }
    }
    out
}
