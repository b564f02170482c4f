//! Reports: what `check`, `explain` and `profile` print for a person.
//!
//! In: a loaded config or a compiled policy. Out: lines on stdout and an
//! exit code. Every verdict printed here comes from the production
//! `Policy::decide`, so `explain` says what the running gateway does.

use std::io::Write;
use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::config::{ExpectVerdict, Protocol};

use crate::load::Loaded;
use crate::policy::{ClientClass, Decision, Dest, Policy, RuleState, Target, Verdict, host};

/// A destination argument, parsed and normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestArg {
    /// Normalised host name or IP literal text.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// Parses `host[:port]`, `ip[:port]`, `[v6]:port` or a bare IPv6 address.
/// Host names are normalised (IDN to A-labels); a malformed name is kept as
/// written so that `decide` reports `malformed_host`.
///
/// # Errors
/// A message when the port is not 1-65535.
pub fn parse_dest(text: &str, default_port: u16) -> Result<DestArg, String> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("'{text}': missing ']' after an IPv6 address"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("'{text}': expected ':port' after ']'")),
        }
    } else if text.parse::<std::net::Ipv6Addr>().is_ok() {
        (text, None)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("'{text}': '{p}' is not a port (1-65535)"))?,
    };
    Ok(DestArg {
        host: host::normalized_or_kept(host),
        port,
    })
}

fn describe(policy: &Policy, dest: &Dest<'_>, d: &Decision) -> String {
    let mut line = format!("{dest} {}", d.verdict.as_str());
    if let Some(id) = d.rule {
        let r = policy.rule(id);
        line.push_str(&format!(" rule={}", r.name));
        if let Some(s) = &r.scenario {
            line.push_str(&format!(" scenario={s}"));
        }
    } else {
        line.push_str(" rule=-");
    }
    line.push_str(&format!(
        " reason={} ({})",
        d.reason.as_str(),
        policy.explain(d)
    ));
    if let Some(note) = tunnel_note(policy, dest, d) {
        line.push_str("; ");
        line.push_str(note);
    }
    line
}

/// What the data path checks inside an allowed CONNECT tunnel, where it is
/// not obvious from the destination, so `explain` does not promise more
/// than the gateway delivers: an address carries only TLS names a host rule
/// allows; a name on a port other than 80 and 443 carries only TLS or HTTP
/// (SSH and other protocols need `opaque = true`).
fn tunnel_note(policy: &Policy, dest: &Dest<'_>, d: &Decision) -> Option<&'static str> {
    let id = d
        .rule
        .filter(|_| d.verdict == Verdict::Allow && dest.proto == Protocol::Tcp)?;
    let r = policy.rule(id);
    if r.opaque || !policy.require_matching_sni() {
        return None;
    }
    match dest.target {
        Target::Ip(_) if !r.any_sni => Some(
            "a tunnel to it carries only TLS names a host rule allows (sni = \"any\" or opaque = true on the rule to widen)",
        ),
        Target::Name(_) if dest.port != 80 && dest.port != 443 => Some(
            "a tunnel to it must start with TLS or HTTP naming it (opaque = true on the rule for SSH and other protocols)",
        ),
        _ => None,
    }
}

/// Who a decision is for, as `explain` and `check` say it: `for clients in
/// group training (e.g. 10.0.2.0)`.
fn class_text(policy: &Policy, class: &ClientClass) -> String {
    let groups = policy.client_groups(class.client);
    let who = match groups.as_slice() {
        [] => "clients in no group".to_string(),
        [one] => format!("clients in group {one}"),
        many => format!("clients in groups {}", many.join(" and ")),
    };
    format!("for {who} (e.g. {})", class.example)
}

/// The decisions on `dest` for every client class, or one when they all
/// agree (always, without client groups): `(decision, class)` pairs.
fn decide_per_class(policy: &Policy, dest: &Dest<'_>) -> Vec<(Decision, Option<ClientClass>)> {
    let classes = policy.client_classes();
    let all: Vec<(Decision, Option<ClientClass>)> = classes
        .iter()
        .map(|c| (policy.decide_for(dest, c.client), Some(*c)))
        .collect();
    match all.first() {
        Some(&(first, _)) if all.iter().all(|&(d, _)| d == first) => vec![(first, None)],
        Some(_) => all,
        None => vec![(policy.decide(dest), None)],
    }
}

/// Prints one line per destination (and, without `--client`, per client
/// group whose verdict differs); exit 0 all allowed, 1 any denied, 2 a bad
/// argument.
pub(super) fn explain(
    policy: &Policy,
    dests: &[String],
    proto: Protocol,
    client: Option<IpAddr>,
) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut denied = false;
    let mut bad = false;
    for text in dests {
        let arg = match parse_dest(text, 443) {
            Ok(arg) => arg,
            Err(e) => {
                bad = true;
                writeln!(out, "{text} error ({e})")?;
                continue;
            }
        };
        let dest = Dest {
            target: Target::parse(&arg.host),
            port: arg.port,
            proto,
        };
        let Some(ip) = client else {
            for (d, class) in decide_per_class(policy, &dest) {
                denied |= d.verdict != Verdict::Allow;
                let mut line = describe(policy, &dest, &d);
                if let Some(class) = class {
                    line = format!("{line}; {}", class_text(policy, &class));
                }
                writeln!(out, "{line}")?;
            }
            continue;
        };
        denied |= explain_for(&mut out, policy, &dest, ip)? != Verdict::Allow;
    }
    Ok(ExitCode::from(if bad {
        2
    } else if denied {
        1
    } else {
        0
    }))
}

/// One `explain --client` line: the decision for that client, with its
/// groups, or a refusal when `[clients] allow` does not serve it.
fn explain_for(
    out: &mut impl Write,
    policy: &Policy,
    dest: &Dest<'_>,
    ip: IpAddr,
) -> Result<Verdict> {
    let client = policy.client(ip);
    if !client.served() {
        writeln!(
            out,
            "{dest} deny client={ip} (not in [clients] allow: the gateway refuses this client before any request)"
        )?;
        return Ok(Verdict::Deny);
    }
    let d = policy.decide_for(dest, client);
    let groups = policy.client_groups(client);
    let groups = if groups.is_empty() {
        "-".to_string()
    } else {
        groups.join(",")
    };
    let line = describe(policy, dest, &d);
    writeln!(out, "{line}; client={ip} groups={groups}")?;
    Ok(d.verdict)
}

/// Prints warnings, waiting rules and `[[expect]]` results; exit 0 ok, 1 an expectation failed.
pub(super) fn check(loaded: &Loaded) -> Result<ExitCode> {
    let p = &loaded.policy;
    let mut out = std::io::stdout().lock();
    for w in &loaded.warnings {
        writeln!(out, "{w}")?;
    }
    let waiting: Vec<&str> = p
        .rules()
        .iter()
        .filter(|r| r.state == RuleState::WaitingForServiceTags)
        .map(|r| r.name.as_str())
        .collect();
    if let Some(line) = service_tags_line(loaded) {
        writeln!(out, "{line}")?;
    }
    if !waiting.is_empty() {
        writeln!(
            out,
            "note: {} rule(s) wait for a service tags file ([policy] service_tags or --service-tags; download 'Azure IP Ranges and Service Tags'): {}",
            waiting.len(),
            waiting.join(", ")
        )?;
    }
    let mut failed = 0;
    for e in &loaded.config.expects {
        let arg = match parse_dest(e.dest.get_ref(), 443) {
            Ok(a) => a,
            Err(msg) => {
                let loc = loaded.source.locate(&e.dest.span());
                writeln!(out, "{loc}: error: expect: {msg}")?;
                failed += 1;
                continue;
            }
        };
        let dest = Dest {
            target: Target::parse(&arg.host),
            port: arg.port,
            proto: e.proto,
        };
        failed += usize::from(!expect_holds(&mut out, loaded, e, &dest)?);
    }
    let active = p
        .rules()
        .iter()
        .filter(|r| r.state == RuleState::Active)
        .count();
    let n = loaded.config.expects.len();
    if failed > 0 {
        writeln!(out, "{failed} of {n} expectation(s) failed")?;
        return Ok(ExitCode::from(1));
    }
    writeln!(
        out,
        "ok: {} ({active} active rules, {} warning(s), {n} expectation(s) passed)",
        loaded.source.name,
        loaded.warnings.len()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs one `[[expect]]`: for its `client`, or for every client class
/// (each must get the verdict). Prints a failure; returns whether it held.
fn expect_holds(
    out: &mut impl Write,
    loaded: &Loaded,
    e: &crate::config::Expect,
    dest: &Dest<'_>,
) -> Result<bool> {
    let p = &loaded.policy;
    let loc = loaded.source.locate(&e.dest.span());
    let want_allow = e.verdict == ExpectVerdict::Allow;
    let want = if want_allow { "allow" } else { "deny" };
    let decisions: Vec<(Decision, String)> = match &e.client {
        Some(text) => {
            let loc = loaded.source.locate(&text.span());
            let Ok(ip) = text.get_ref().trim().parse::<IpAddr>() else {
                writeln!(
                    out,
                    "{loc}: error: expect: client '{}' is not an IP address",
                    text.get_ref()
                )?;
                return Ok(false);
            };
            let client = p.client(ip);
            if !client.served() {
                writeln!(
                    out,
                    "{loc}: expect failed: client {ip} is not in [clients] allow"
                )?;
                return Ok(false);
            }
            vec![(p.decide_for(dest, client), format!("for client {ip}"))]
        }
        None => decide_per_class(p, dest)
            .into_iter()
            .map(|(d, c)| (d, c.map(|c| class_text(p, &c)).unwrap_or_default()))
            .collect(),
    };
    for (d, who) in decisions {
        if (d.verdict == Verdict::Allow) != want_allow {
            let who = if who.is_empty() {
                String::new()
            } else {
                format!(" {who}")
            };
            writeln!(
                out,
                "{loc}: expect failed: wanted {want}{who}, got {}",
                describe(p, dest, &d)
            )?;
            return Ok(false);
        }
    }
    Ok(true)
}

/// Service tags older than this draw a warning: Microsoft publishes weekly.
const SERVICE_TAGS_STALE_DAYS: u64 = 30;

/// Which service tags file was loaded, its change number and age; a warning
/// when it is older than [`SERVICE_TAGS_STALE_DAYS`].
fn service_tags_line(loaded: &Loaded) -> Option<String> {
    let path = loaded.service_tags_path.as_ref()?;
    let change = loaded.policy.service_tags_change().unwrap_or(0);
    let days = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map(|d| d.as_secs() / 86_400);
    let age = days.map_or("age unknown".to_string(), |d| format!("{d} day(s) old"));
    let line = format!(
        "service tags: {} (change number {change}, {age})",
        path.display()
    );
    Some(match days {
        Some(d) if d > SERVICE_TAGS_STALE_DAYS => format!(
            "{line}\nwarning: the service tags file is {d} days old: Azure's address ranges change weekly; refresh it (az network list-service-tags --location <region> > FILE)"
        ),
        _ => line,
    })
}

/// Prints the scenarios: on/off, rule count, description.
pub(super) fn profile_list(policy: &Policy) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    for s in policy.scenarios() {
        let n = policy
            .rules()
            .iter()
            .filter(|r| r.scenario.as_deref() == Some(&s.name))
            .count();
        let on = if s.enabled { "on " } else { "off" };
        writeln!(out, "{on} {:<17} {n:>2} rules  {}", s.name, s.description)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one scenario's rules (or all) with the source document's wording.
pub(super) fn profile_show(policy: &Policy, scenario: Option<&str>) -> Result<ExitCode> {
    if let Some(name) = scenario
        && !policy.scenarios().iter().any(|s| s.name == name)
    {
        let known: Vec<&str> = policy.scenarios().iter().map(|s| s.name.as_str()).collect();
        bail!("unknown scenario '{name}' (known: {})", known.join(", "));
    }
    let mut out = std::io::stdout().lock();
    for s in policy
        .scenarios()
        .iter()
        .filter(|s| scenario.is_none_or(|n| n == s.name))
    {
        let on = if s.enabled { "enabled" } else { "disabled" };
        writeln!(out, "## {} ({on})\n{}\n", s.name, s.description)?;
        for r in policy
            .rules()
            .iter()
            .filter(|r| r.scenario.as_deref() == Some(&s.name))
        {
            let what: Vec<String> = r
                .hosts
                .iter()
                .cloned()
                .chain(r.service_tags.iter().map(|t| format!("tag:{t}")))
                .chain(
                    r.cidrs
                        .iter()
                        .filter(|_| r.service_tags.is_empty())
                        .map(ToString::to_string),
                )
                .collect();
            let ports = crate::policy::port_ranges(&r.ports);
            let state = match &r.state {
                RuleState::Active => String::new(),
                RuleState::ScenarioDisabled => String::new(),
                RuleState::MissingVars(v) => format!("  [needs --var {}]", v.join(", --var ")),
                RuleState::WaitingForServiceTags => "  [waits for service tags file]".into(),
                RuleState::Disabled => "  [switched off by [policy] disable_rules]".into(),
                RuleState::NotEgress => {
                    format!("  [{:?}: not enforced by the proxy]", r.direction).to_lowercase()
                }
            };
            writeln!(
                out,
                "- {} {}/{}  {}{state}\n    {}",
                r.name,
                r.protocol.as_str(),
                ports.join(","),
                what.join(" "),
                r.description
            )?;
        }
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
}
