//! Reports: what `check`, `explain` and `profile` print for a person.
//!
//! In: a loaded config or a compiled policy. Out: lines on stdout and an
//! exit code. Every verdict printed here comes from the production
//! `Policy::decide`, so `explain` says what the running gateway does.

use std::io::Write;
use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::config::{Expect, ExpectVerdict, Protocol, Source};

use crate::load::Loaded;
use crate::policy::{ClientClass, Decision, Dest, Policy, RuleState, Target, Verdict, host};
use crate::servicetags::RefreshStatus;

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

/// A verdict with what decided it: `allow (rule pypi)`, `deny (no_rule)`.
pub fn verdict_text(policy: &Policy, d: &Decision) -> String {
    match d.rule {
        Some(id) => format!("{} (rule {})", d.verdict.as_str(), policy.rule(id).name),
        None => format!("{} ({})", d.verdict.as_str(), d.reason.as_str()),
    }
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
    // The running gateway also decides a TCP connection that names no host
    // by what its DNS listener answered: say so rather than a flat deny.
    // (Only where the address itself passes the resolved-address checks,
    // as `Judge::decide_address` requires.)
    let by_name = match dest.target {
        Target::Ip(ip) => {
            d.verdict != Verdict::Allow
                && dest.proto == Protocol::Tcp
                && policy.dns_listener()
                && policy.check_resolved(ip, dest.port, Protocol::Tcp).is_ok()
        }
        Target::Name(_) => false,
    };
    if by_name {
        line.push_str(
            "; once a client resolved a name to this address through the DNS listener, its connections that name no host (opaque, CONNECT to the address) are decided as that name (reason dns_address): explain the name",
        );
    }
    line
}

/// What the data path checks inside an allowed CONNECT tunnel, where it is
/// not obvious from the destination, so `explain` does not promise more
/// than the gateway delivers: an address carries only TLS names a host rule
/// allows; a name on a port other than 80 and 443 carries only TLS or HTTP
/// (SSH and other protocols need `opaque = true`); a name on an opaque
/// rule's port is enforced only through the explicit proxy; a name over UDP
/// passes only to the addresses the DNS listener answered for it.
fn tunnel_note(policy: &Policy, dest: &Dest<'_>, d: &Decision) -> Option<&'static str> {
    let named = matches!(dest.target, Target::Name(_));
    if d.verdict == Verdict::Allow && dest.proto == Protocol::Udp && named {
        // `decide` allows a name over UDP only with a DNS listener.
        return Some(
            "allowed once resolved through the DNS listener ([listen] dns): UDP carries no name, so the gateway adds each address it answers for this name to the ruleset's dns_udp sets on this port, for the answer's TTL + [dns] grace_s; datagrams to an address nobody resolved through it are dropped",
        );
    }
    let id = d
        .rule
        .filter(|_| d.verdict == Verdict::Allow && dest.proto == Protocol::Tcp)?;
    let r = policy.rule(id);
    if r.opaque && matches!(dest.target, Target::Name(_)) && dest.port != 80 && dest.port != 443 {
        return Some(if policy.dns_listener() {
            "transparent connections on this port carry no name: they are decided as this name once the client resolved it through the DNS listener ([listen] dns), by address rules otherwise"
        } else {
            "through the explicit proxy only: without a DNS listener ([listen] dns) a transparent connection on this port carries no name and is decided by address rules"
        });
    }
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
    if let Some(line) = service_tags_line(loaded) {
        writeln!(out, "{line}")?;
    }
    let (readiness, readiness_warnings) = readiness_lines(loaded);
    for line in readiness {
        writeln!(out, "{line}")?;
    }
    let mut failed = 0;
    let mut n = 0;
    for (source, expects) in loaded.config.expects_by_file(&loaded.source) {
        n += expects.len();
        failed += run_expects(&mut out, p, source, expects)?;
    }
    let active = p
        .rules()
        .iter()
        .filter(|r| r.state == RuleState::Active)
        .count();
    if failed > 0 {
        writeln!(out, "{failed} of {n} expectation(s) failed")?;
        return Ok(ExitCode::from(1));
    }
    writeln!(
        out,
        "ok: {} ({active} active rules, {} warning(s), {n} expectation(s) passed)",
        loaded.source.name,
        loaded.warnings.len() + readiness_warnings
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs one file's `[[expect]]` tests, printing each failure located in
/// that file; returns how many failed.
fn run_expects(
    out: &mut impl Write,
    p: &Policy,
    source: &Source,
    expects: &[Expect],
) -> Result<usize> {
    let mut failed = 0;
    for e in expects {
        let arg = match parse_dest(e.dest.get_ref(), 443) {
            Ok(a) => a,
            Err(msg) => {
                let loc = source.locate(&e.dest.span());
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
        failed += usize::from(!expect_holds(out, p, source, e, &dest)?);
    }
    Ok(failed)
}

/// Runs one `[[expect]]`: for its `client`, or for every client class
/// (each must get the verdict). Prints a failure; returns whether it held.
fn expect_holds(
    out: &mut impl Write,
    p: &Policy,
    source: &Source,
    e: &crate::config::Expect,
    dest: &Dest<'_>,
) -> Result<bool> {
    let loc = source.locate(&e.dest.span());
    let want_allow = e.verdict == ExpectVerdict::Allow;
    let want = if want_allow { "allow" } else { "deny" };
    let decisions: Vec<(Decision, String)> = match &e.client {
        Some(text) => {
            let loc = source.locate(&text.span());
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
pub(super) const SERVICE_TAGS_STALE_DAYS: u64 = 30;

/// Which service tags file was loaded (path, change number, cloud, tag
/// count, age); a warning when it is older than [`SERVICE_TAGS_STALE_DAYS`];
/// and the refresh timer's last outcome when its status file exists.
fn service_tags_line(loaded: &Loaded) -> Option<String> {
    let file = loaded.policy.service_tags_file()?;
    let now = std::time::SystemTime::now();
    let days = file.age(now).map(|d| d.as_secs() / 86_400);
    let age = days.map_or("age unknown".to_string(), |d| format!("{d} day(s) old"));
    let cloud = if file.cloud.is_empty() {
        "no cloud named"
    } else {
        &file.cloud
    };
    let mut line = format!(
        "service tags: {} (change number {}, cloud {cloud}, {} tags, {age})",
        file.path.display(),
        file.change_number,
        file.tags
    );
    if let Some(d) = days.filter(|d| *d > SERVICE_TAGS_STALE_DAYS) {
        line.push_str(&format!(
            "\nwarning: the service tags file is {d} days old: Azure's address ranges change weekly; \
             refresh it (systemctl start portcullis-service-tags, or az network list-service-tags --location <region> > FILE)"
        ));
    }
    if let Some(status) = RefreshStatus::read(file) {
        let ago = now
            .duration_since(status.finished_at())
            .map_or(0, |d| d.as_secs() / 3_600);
        let (what, lead) = if status.ok {
            ("succeeded", "")
        } else {
            ("FAILED", "warning: ")
        };
        line.push_str(&format!(
            "\n{lead}service tags refresh: the last run {what} {ago} hour(s) ago: {} ({})",
            status.message,
            file.status_path().display()
        ));
    }
    Some(line)
}

/// What `[admin] require_ruleset = true` makes `/readyz` require, and a
/// warning (counted: the second value) when there is no transparent
/// listener: no ruleset is loaded for one, so the gateway would never be ready.
fn readiness_lines(loaded: &Loaded) -> (Vec<String>, usize) {
    let Some(setting) = &loaded.config.admin.require_ruleset else {
        return (Vec::new(), 0);
    };
    if !*setting.get_ref() {
        return (Vec::new(), 0);
    }
    let mut lines = vec![format!(
        "readiness: /readyz answers 503 unless {} lists chain inet portcullis forward and is at most {} s old (portcullis-ruleset-counters.timer writes it every 15 s while the ruleset is loaded)",
        crate::ruleset::path().display(),
        crate::ruleset::MAX_AGE.as_secs()
    )];
    if loaded.config.listen.transparent.is_some() {
        return (lines, 0);
    }
    let loc = loaded.source.locate(&setting.span());
    lines.push(format!(
        "{loc}: warning: [admin] require_ruleset is true but [listen] transparent is not set: no ruleset is loaded for an explicit-only gateway, so /readyz would never answer 200"
    ));
    (lines, 1)
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
        for note in &s.notes {
            writeln!(out, "> {note}")?;
        }
        if !s.notes.is_empty() {
            writeln!(out)?;
        }
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
                .chain(r.to.iter().map(|n| format!("to:{n}")))
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
