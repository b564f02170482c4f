//! `portcullis learn`: proposed `[[rule]]` blocks from access-log lines, so an allowlist starts from real traffic.
//!
//! In: a [`Log`] (destinations with hits by verdict), optionally the policy
//! of a config to learn against, suffixes to collapse, whether refused
//! traffic counts. Out: TOML text a config can include: exact names (and
//! addresses) with their ports and hit counts, one rule per client group
//! and port set; a name under a `--collapse` suffix becomes `*.suffix`.
//! The text is compiled before it is printed: it is valid, and what the
//! compile warns about (a collapsed suffix the exfiltration lint knows)
//! is printed with it as comments.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{Result, bail};

use super::seen::{Log, Seen};
use crate::config::{Config, Protocol, Source};
use crate::policy::{CompileInput, Dest, Policy, Target, Verdict};

/// What `learn` was asked.
pub struct Ask<'a> {
    /// Print only what this policy does not already allow.
    pub against: Option<&'a Policy>,
    /// Names under these suffixes become `*.suffix`.
    pub collapse: &'a [String],
    /// Learn refused connections too (default: only what passed, allowed
    /// or let through by audit mode).
    pub include_denied: bool,
}

/// A rule to print: client group, name or address, port set.
type RuleKey = (String, bool, BTreeSet<u16>);

/// The proposed rules as TOML, with a header saying what they came from.
///
/// # Errors
/// The proposal does not compile (a bug: it is reported, not printed).
pub fn learn(log: &Log, ask: &Ask<'_>) -> Result<String> {
    // (group, is address, pattern) → (ports, hits)
    let mut by_dest: BTreeMap<(String, bool, String), (BTreeSet<u16>, u64)> = BTreeMap::new();
    let mut learned = 0;
    for ((host, port, group), seen) in &log.dests {
        if !wanted(host, *port, seen, ask) {
            continue;
        }
        learned += 1;
        let is_addr = host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok();
        let pattern = if is_addr {
            host.trim_matches(['[', ']']).to_string()
        } else {
            collapsed(host, ask.collapse)
        };
        let entry = by_dest
            .entry((group.clone(), is_addr, pattern))
            .or_default();
        entry.0.insert(*port);
        entry.1 += seen.hits();
    }
    let mut rules: BTreeMap<RuleKey, Vec<(String, u64)>> = BTreeMap::new();
    for ((group, is_addr, pattern), (ports, hits)) in by_dest {
        rules
            .entry((group, is_addr, ports))
            .or_default()
            .push((pattern, hits));
    }
    let mut text = format!(
        "# portcullis learn: {learned} destination(s) from {} access line(s) ({} skipped){}.\n",
        log.lines,
        log.skipped,
        if ask.against.is_some() {
            ", only what the config does not allow yet"
        } else {
            ""
        }
    );
    for (key, dests) in &rules {
        text.push_str(&rule_block(key, dests));
    }
    let groups: BTreeSet<&str> = (rules.keys())
        .map(|(g, _, _)| g.as_str())
        .filter(|g| !g.is_empty())
        .collect();
    for warning in compile_warnings(&text, &groups)? {
        let _ = writeln!(text, "# check: {warning}");
    }
    Ok(text)
}

/// Whether a logged destination belongs in the proposal.
fn wanted(host: &str, port: u16, seen: &Seen, ask: &Ask<'_>) -> bool {
    let passed = seen.allowed + seen.audit_denied > 0;
    let refused = ask.include_denied && seen.denied > 0;
    if !(passed || refused) {
        return false;
    }
    let Some(policy) = ask.against else {
        return true;
    };
    let dest = Dest {
        target: Target::parse(host),
        port,
        proto: Protocol::Tcp,
    };
    let d = match seen.client {
        Some(ip) if policy.client(ip).served() => policy.decide_for(&dest, policy.client(ip)),
        _ => policy.decide(&dest),
    };
    d.verdict != Verdict::Allow
}

/// `host`, or `*.suffix` for the first `--collapse` suffix it lies under.
fn collapsed(host: &str, suffixes: &[String]) -> String {
    for s in suffixes {
        let s = s
            .trim_start_matches("*.")
            .trim_matches('.')
            .to_ascii_lowercase();
        if host.len() > s.len() && host.ends_with(&s) && host[..host.len() - s.len()].ends_with('.')
        {
            return format!("*.{s}");
        }
    }
    host.to_string()
}

/// One `[[rule]]` block: name from group and ports, one line a destination.
fn rule_block((group, is_addr, ports): &RuleKey, dests: &[(String, u64)]) -> String {
    let port_list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut name = String::from("learned");
    if !group.is_empty() {
        let _ = write!(name, "-{group}");
    }
    if *is_addr {
        name.push_str("-addresses");
    }
    let _ = write!(name, "-{}", port_list.join("-"));
    let hits: u64 = dests.iter().map(|d| d.1).sum();
    let mut b = format!(
        "\n[[rule]]\nname = \"{name}\"\ndescription = \"learned from access logs: {} destination(s), {hits} connection(s)\"\nports = [{}]\n",
        dests.len(),
        port_list.join(", ")
    );
    if !group.is_empty() {
        let _ = writeln!(b, "clients = [\"{group}\"]");
    }
    b.push_str(if *is_addr {
        "cidrs = [\n"
    } else {
        "hosts = [\n"
    });
    for (pattern, hits) in dests {
        let item = if *is_addr {
            let bits = if pattern.contains(':') { 128 } else { 32 };
            format!("{pattern}/{bits}")
        } else {
            pattern.clone()
        };
        let _ = writeln!(b, "  \"{item}\", # {hits} connection(s)");
    }
    b.push_str("]\n");
    b
}

/// Compiles the proposal on its own (with stand-in ranges for the client
/// groups its rules name, which the config they join defines); its
/// warnings, or an error if invalid.
fn compile_warnings(text: &str, groups: &BTreeSet<&str>) -> Result<Vec<String>> {
    let mut clients = String::from("[clients]\nallow = [\"10.255.0.0/16\"]\n");
    for (i, g) in groups.iter().enumerate() {
        let _ = writeln!(clients, "{g} = [\"10.255.{}.0/24\"]", i % 256);
    }
    let source = Source {
        name: "learned rules".into(),
        text: format!("{clients}[policy]\nprofile = \"none\"\n{text}"),
    };
    let config = Config::parse(&source).map_err(|e| anyhow::anyhow!("{e}"))?;
    match Policy::compile(&config, &source, &CompileInput::default()) {
        Ok((_, warnings)) => Ok(warnings.iter().map(|w| w.message.clone()).collect()),
        Err(errors) => {
            let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
            bail!(
                "the learned rules do not compile (a bug):\n{}",
                msgs.join("\n")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &[(&str, u16, &str)]) -> Log {
        let mut text = String::new();
        for (host, port, verdict) in lines {
            // `host@group`: the line carries that client group.
            let (host, group) = host.split_once('@').unwrap_or((host, ""));
            text.push_str(&format!(
                "{{\"host\":\"{host}\",\"port\":{port},\"verdict\":\"{verdict}\",\"client_group\":\"{group}\",\"target\":\"portcullis::access\"}}\n"
            ));
        }
        let mut log = Log::default();
        log.add(text.as_bytes(), "t").unwrap();
        log
    }

    #[test]
    fn names_group_by_port_set_and_collapse_only_when_asked() {
        let log = log(&[
            ("pypi.org", 443, "audit_deny"),
            ("pypi.org", 443, "audit_deny"),
            ("files.pythonhosted.org", 443, "allow"),
            ("a.blob.core.windows.net", 443, "audit_deny"),
            ("b.blob.core.windows.net", 443, "audit_deny"),
            ("git.example", 22, "audit_deny"),
            ("git.example", 443, "audit_deny"),
            ("20.1.2.3", 445, "audit_deny"),
            ("evil.example", 443, "deny"),
        ]);
        let plain = Ask {
            against: None,
            collapse: &[],
            include_denied: false,
        };
        let text = learn(&log, &plain).unwrap();
        assert!(text.contains("name = \"learned-443\""), "{text}");
        assert!(text.contains("\"pypi.org\", # 2 connection(s)"), "{text}");
        assert!(text.contains("\"a.blob.core.windows.net\""), "{text}");
        assert!(text.contains("name = \"learned-22-443\""), "{text}");
        assert!(text.contains("\"20.1.2.3/32\""), "{text}");
        assert!(
            !text.contains("evil.example"),
            "denied traffic is not learned: {text}"
        );
        assert!(!text.contains("# check:"), "{text}");

        let suffix = ["blob.core.windows.net".to_string()];
        let ask = Ask {
            against: None,
            collapse: &suffix,
            include_denied: true,
        };
        let text = learn(&log, &ask).unwrap();
        assert!(
            text.contains("\"*.blob.core.windows.net\", # 2 connection(s)"),
            "{text}"
        );
        assert!(!text.contains("a.blob.core.windows.net"), "{text}");
        assert!(text.contains("evil.example"), "{text}");
        // The exfiltration lint's warning comes with the collapsed suffix.
        assert!(
            text.lines()
                .any(|l| l.starts_with("# check:") && l.contains("*.blob.core.windows.net")),
            "{text}"
        );
    }

    #[test]
    fn each_client_group_gets_its_own_rules() {
        let log = log(&[
            ("pypi.org@training", 443, "audit_deny"),
            ("pypi.org@training", 443, "audit_deny"),
            ("myregistry.azurecr.io@inference", 443, "audit_deny"),
            ("login.microsoftonline.com", 443, "allow"),
        ]);
        let ask = Ask {
            against: None,
            collapse: &[],
            include_denied: false,
        };
        let text = learn(&log, &ask).unwrap();
        let block = |name: &str| {
            let start = text
                .find(&format!("name = \"{name}\""))
                .unwrap_or_else(|| panic!("{name}: {text}"));
            text[start..]
                .split("\n[[rule]]")
                .next()
                .unwrap()
                .to_string()
        };
        let training = block("learned-training-443");
        assert!(
            training.contains("clients = [\"training\"]") && training.contains("\"pypi.org\""),
            "{text}"
        );
        assert!(!training.contains("azurecr"), "{text}");
        let inference = block("learned-inference-443");
        assert!(
            inference.contains("clients = [\"inference\"]")
                && inference.contains("myregistry.azurecr.io"),
            "{text}"
        );
        let everyone = block("learned-443");
        assert!(
            !everyone.contains("clients =") && everyone.contains("login.microsoftonline.com"),
            "{text}"
        );
    }
}
