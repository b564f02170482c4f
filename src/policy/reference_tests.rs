//! `decide` against a plain reading of the rule semantics, on random rule
//! sets and destinations.
//!
//! The reference below knows nothing of host tables, folded grants or CIDR
//! tables: it reads DESIGN.md "Rule semantics" and the decision order in
//! `mod.rs` as directly as it can, over every rule, port and pattern. Names
//! come from a small alphabet so that wildcards, exact names, apexes, near
//! misses, case changes, trailing dots and malformed names all occur;
//! addresses from a small set of CIDRs that nest, including guarded and
//! platform ones. The seed is printed on failure; rerun it with
//! `PORTCULLIS_SEED=<seed> cargo test --lib reference`.

use std::net::IpAddr;

use ipnet::IpNet;

use super::*;
use crate::config::{Config, Protocol, Source};

use crate::testing::{Rng, seed};

/// A rule as the reference reads it (and as it is written into the config).
#[derive(Debug)]
struct RefRule {
    deny: bool,
    /// Patterns as written: any case, maybe a trailing dot.
    hosts: Vec<String>,
    cidrs: Vec<IpNet>,
    /// Inclusive ranges as written; none means 443.
    ports: Vec<(u16, u16)>,
    proto: Protocol,
    /// `Some(true)`: in an enabled scenario; `Some(false)`: a disabled one.
    scenario: Option<bool>,
    /// `clients`: indices into the set's groups; `None`: every client.
    clients: Option<Vec<usize>>,
}

/// A client group as the reference reads it.
#[derive(Debug)]
struct RefGroup {
    cidrs: Vec<IpNet>,
    /// `Some(true)`: `mode = "audit"`; `Some(false)`: `"enforce"`; `None`: `[policy] mode`.
    audit: Option<bool>,
}

/// A client as the reference reads it: the groups holding its address,
/// and whether its denials are audited (in no group: `[policy] mode`; in
/// groups: only if every one of them audits).
fn ref_client(groups: &[RefGroup], policy_audit: bool, ip: IpAddr) -> (Vec<usize>, bool) {
    let ip = net::canonical(ip);
    let mine: Vec<usize> = (0..groups.len())
        .filter(|&g| groups[g].cidrs.iter().any(|c| c.contains(&ip)))
        .collect();
    let audit = if mine.is_empty() {
        policy_audit
    } else {
        mine.iter()
            .all(|&g| groups[g].audit.unwrap_or(policy_audit))
    };
    (mine, audit)
}

impl RefRule {
    fn ports(&self) -> Vec<(u16, u16)> {
        if self.ports.is_empty() {
            vec![(443, 443)]
        } else {
            self.ports.clone()
        }
    }

    fn active(&self) -> bool {
        self.scenario != Some(false)
    }
}

/// One port range of one rule that a destination's name or address meets,
/// with how specific its pattern or CIDR is.
#[derive(Debug)]
struct Met {
    rule: usize,
    deny: bool,
    active: bool,
    /// Port and protocol both match.
    fits: bool,
    /// The rule applies to the client (no `clients`, or one of its groups).
    applies: bool,
    /// The rule is active (its scenario on), whoever it is for.
    rule_active: bool,
    port_ok: bool,
    unlocks_guarded: bool,
    specificity: usize,
}

impl Met {
    fn new(rule: usize, r: &RefRule, (lo, hi): (u16, u16), q: &Query<'_>, spec: usize) -> Met {
        let dest = q.dest;
        let port_ok = lo <= dest.port && dest.port <= hi;
        let proto_ok = r.proto == Protocol::Any || r.proto == dest.proto;
        let applies = (r.clients.as_ref()).is_none_or(|c| c.iter().any(|g| q.groups.contains(g)));
        Met {
            rule,
            deny: r.deny,
            // A rule for other clients does not exist for this one, but for
            // naming it when nothing else allows.
            active: r.active() && applies,
            applies,
            rule_active: r.active(),
            fits: port_ok && proto_ok,
            port_ok,
            unlocks_guarded: false,
            specificity: spec,
        }
    }
}

fn deny(rule: Option<usize>, reason: Reason) -> Decision {
    Decision {
        verdict: Verdict::Deny,
        rule: rule.map(|r| RuleId::new(r as u32)),
        reason,
    }
}

fn allow(rule: usize) -> Decision {
    Decision {
        verdict: Verdict::Allow,
        rule: Some(RuleId::new(rule as u32)),
        reason: Reason::RuleMatched,
    }
}

/// One decision to make: the destination, and the client's groups.
struct Query<'a> {
    dest: &'a Dest<'a>,
    groups: &'a [usize],
}

/// The semantics, plainly. `met` is in walk order: least specific pattern
/// first for names, longest prefix first for addresses, then rule order,
/// then port order. `audit`: the client's denials are audited; `dns`: the
/// config runs a DNS listener.
fn reference(rules: &[RefRule], audit: bool, dns: bool, q: &Query<'_>) -> Decision {
    let dest = q.dest;
    let decision = match dest.target {
        Target::Name(name) => reference_name(rules, name, q),
        Target::Ip(ip) => reference_ip(rules, ip, q),
    };
    // No UDP datagram names its host: a name allowed on UDP is enforceable
    // only through a DNS listener's answers, and never on 443 (QUIC).
    let named = matches!(dest.target, Target::Name(_));
    // The sets serve every client: a rule for some groups only cannot be
    // enforced on UDP.
    let for_groups = (decision.rule).is_some_and(|r| rules[r.index()].clients.is_some());
    let unenforceable = !dns || dest.port == 443 || for_groups;
    let decision = if named
        && dest.proto == Protocol::Udp
        && decision.verdict == Verdict::Allow
        && unenforceable
    {
        deny(decision.rule.map(RuleId::index), Reason::NeedsDns)
    } else {
        decision
    };
    if audit && decision.verdict == Verdict::Deny {
        Decision {
            verdict: Verdict::AuditDeny,
            ..decision
        }
    } else {
        decision
    }
}

/// How specific `pattern` is for the normalised `name`, if it matches:
/// an exact name beats every wildcard; a longer suffix beats a shorter.
fn specificity(pattern: &str, name: &str) -> Option<usize> {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            let suffix = host::normalize(suffix).expect("generated patterns are valid");
            name.ends_with(&format!(".{suffix}"))
                .then_some(suffix.len())
        }
        None => (host::normalize(pattern).ok()? == name).then_some(usize::MAX),
    }
}

fn reference_name(rules: &[RefRule], name: &str, q: &Query<'_>) -> Decision {
    // IDNs reach a listener as A-labels: other non-ASCII bytes are malformed.
    if !name.is_ascii() {
        return deny(None, Reason::MalformedHost);
    }
    let Ok(name) = host::normalize(name) else {
        return deny(None, Reason::MalformedHost);
    };
    let mut met = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for ports in r.ports() {
            for pattern in &r.hosts {
                if let Some(spec) = specificity(pattern, &name) {
                    met.push(Met::new(i, r, ports, q, spec));
                }
            }
        }
    }
    met.sort_by_key(|m| m.specificity); // stable: rule order within a pattern
    if let Some(m) = met.iter().find(|m| m.active && m.deny && m.fits) {
        return deny(Some(m.rule), Reason::DenyRule);
    }
    let allows = || met.iter().filter(|m| m.active && !m.deny && m.fits);
    let best = allows().map(|m| m.specificity).max();
    match allows().find(|m| Some(m.specificity) == best) {
        Some(m) => allow(m.rule),
        None => refusal(&met),
    }
}

fn reference_ip(rules: &[RefRule], ip: IpAddr, q: &Query<'_>) -> Decision {
    let guard = net::guard(ip);
    if guard == Some(net::Guard::Platform) {
        return deny(None, Reason::PlatformAddress);
    }
    let canonical = net::canonical(ip);
    let mut met = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for ports in r.ports() {
            for cidr in r.cidrs.iter().filter(|c| c.contains(&canonical)) {
                met.push(Met {
                    unlocks_guarded: net::unlocks_guarded(cidr),
                    ..Met::new(i, r, ports, q, cidr.prefix_len().into())
                });
            }
        }
    }
    met.sort_by_key(|m| std::cmp::Reverse(m.specificity));
    if let Some(m) = met.iter().find(|m| m.active && m.deny && m.fits) {
        return deny(Some(m.rule), Reason::DenyRule);
    }
    let guarded = guard.is_some();
    let allows = || met.iter().filter(|m| m.active && !m.deny && m.fits);
    if let Some(m) = allows().find(|m| !guarded || m.unlocks_guarded) {
        return allow(m.rule);
    }
    if guarded {
        return deny(allows().next().map(|m| m.rule), Reason::GuardedAddress);
    }
    refusal(&met)
}

/// Nothing allowed or denied: the first rule on another port or protocol,
/// else the first disabled rule that would allow it, else no rule (naming
/// the first rule for other clients that would allow it).
fn refusal(met: &[Met]) -> Decision {
    if let Some(m) = met.iter().find(|m| m.active && !m.deny && !m.fits) {
        let reason = if m.port_ok {
            Reason::ProtocolNotAllowed
        } else {
            Reason::PortNotAllowed
        };
        return deny(Some(m.rule), reason);
    }
    if let Some(m) = met
        .iter()
        .find(|m| m.applies && !m.active && !m.deny && m.fits)
    {
        return deny(Some(m.rule), Reason::ScenarioDisabled);
    }
    let other = met
        .iter()
        .find(|m| !m.applies && !m.deny && m.fits && m.rule_active);
    deny(other.map(|m| m.rule), Reason::NoRule)
}

const LABELS: [&str; 4] = ["a", "b", "ab", "x"];
/// Names that nest, so that one name often meets several patterns.
const SPINE: [&str; 4] = ["b", "a.b", "x.a.b", "ab.x.a.b"];
const PORTS: [(u16, u16); 6] = [
    (443, 443),
    (80, 80),
    (22, 22),
    (440, 450),
    (8000, 8010),
    (1, 1000),
];
const PROBE_PORTS: [u16; 12] = [1, 22, 80, 439, 440, 443, 445, 450, 451, 8000, 8010, 8011];
const CIDRS: [&str; 16] = [
    "0.0.0.0/0",
    "20.0.0.0/8",
    "20.1.0.0/16",
    "20.1.2.0/24",
    "20.1.2.3/32",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "::/0",
    "2603:1000::/24",
    "fd00::/8",
    "fd00:1::/32",
    "::1/128",
];
const ADDRESSES: [&str; 20] = [
    "20.1.2.3",
    "20.1.2.9",
    "20.1.9.9",
    "20.9.9.9",
    "21.0.0.1",
    "8.8.8.8",
    "10.1.2.3",
    "10.1.9.9",
    "10.9.9.9",
    "127.0.0.1",
    "169.254.1.1",
    "169.254.169.254",
    "168.63.129.16",
    "100.64.1.1",
    "::ffff:20.1.2.3",
    "::ffff:10.1.2.3",
    "[2603:1000::5]",
    "fd00:1::7",
    "2001:db8::1",
    "[::1]",
];

/// Mostly a name of the spine, else one to three labels of the alphabet.
fn labels(rng: &mut Rng) -> String {
    if rng.chance(70) {
        return rng.pick(&SPINE).to_string();
    }
    let n = 1 + rng.below(3);
    (0..n)
        .map(|_| *rng.pick(&LABELS))
        .collect::<Vec<_>>()
        .join(".")
}

/// A pattern: an exact name or `*.suffix`, sometimes with upper case or a
/// trailing dot (both normalised away by compile).
fn pattern(rng: &mut Rng) -> String {
    let mut p = labels(rng);
    if rng.chance(60) {
        p = format!("*.{p}");
    }
    if rng.chance(10) {
        p = p.to_ascii_uppercase();
    }
    if rng.chance(10) {
        p.push('.');
    }
    p
}

/// Client ranges inside `ALLOW`, nesting and overlapping.
const GROUP_CIDRS: [&str; 6] = [
    "10.200.1.0/24",
    "10.200.1.128/25",
    "10.200.2.0/24",
    "10.200.0.0/22",
    "10.200.3.7/32",
    "fd99::/64",
];
const ALLOW: [&str; 2] = ["10.200.0.0/16", "fd99::/48"];
const CLIENTS: [&str; 7] = [
    "10.200.1.5",
    "10.200.1.200",
    "10.200.2.9",
    "10.200.3.7",
    "10.200.3.8",
    "10.200.9.9",
    "fd99::5",
];

/// Up to three groups of one or two ranges, each with a random mode.
fn random_groups(rng: &mut Rng) -> Vec<RefGroup> {
    if rng.chance(40) {
        return Vec::new();
    }
    (0..1 + rng.below(3))
        .map(|_| RefGroup {
            cidrs: (0..1 + rng.below(2))
                .map(|_| rng.pick(&GROUP_CIDRS).parse().expect("a CIDR"))
                .collect(),
            audit: *rng.pick(&[None, None, Some(true), Some(false)]),
        })
        .collect()
}

fn random_rule(rng: &mut Rng, groups: usize) -> RefRule {
    let clients = (groups > 0 && rng.chance(40)).then(|| {
        let mut c: Vec<usize> = (0..groups).filter(|_| rng.chance(50)).collect();
        if c.is_empty() {
            c.push(rng.below(groups));
        }
        c
    });
    let names = rng.chance(65);
    let count = 1 + rng.below(2);
    let ports = (0..rng.below(3)).map(|_| *rng.pick(&PORTS)).collect();
    RefRule {
        deny: rng.chance(20),
        hosts: if names {
            (0..count).map(|_| pattern(rng)).collect()
        } else {
            Vec::new()
        },
        cidrs: if names {
            Vec::new()
        } else {
            (0..count)
                .map(|_| rng.pick(&CIDRS).parse().expect("a CIDR"))
                .collect()
        },
        ports,
        proto: *rng.pick(&[Protocol::Tcp, Protocol::Tcp, Protocol::Udp, Protocol::Any]),
        scenario: *rng.pick(&[None, None, None, Some(true), Some(false)]),
        clients,
    }
}

/// `[clients]`: `ALLOW`, and the groups as `g0`, `g1`, ...
fn clients_text(groups: &[RefGroup]) -> String {
    let quoted = |items: &[&str]| -> String {
        let items: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
        items.join(", ")
    };
    let mut text = format!("[clients]\nallow = [{}]\n", quoted(&ALLOW));
    for (i, g) in groups.iter().enumerate() {
        let cidrs: Vec<String> = g.cidrs.iter().map(ToString::to_string).collect();
        let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        let mode = match g.audit {
            None => String::new(),
            Some(true) => ", mode = \"audit\"".into(),
            Some(false) => ", mode = \"enforce\"".into(),
        };
        text.push_str(&format!(
            "g{i} = {{ cidrs = [{}]{mode} }}\n",
            quoted(&cidrs)
        ));
    }
    text
}

/// The groups and rules as a config file (with a DNS listener when `dns`).
fn config_text(groups: &[RefGroup], rules: &[RefRule], audit: bool, dns: bool) -> String {
    let mut text = String::new();
    if dns {
        text.push_str("[listen]\ndns = \"127.0.0.1:5353\"\n");
    }
    text.push_str(&clients_text(groups));
    text.push_str("[policy]\nprofile = \"none\"\n");
    if audit {
        text.push_str("mode = \"audit\"\n");
    }
    if rules.iter().any(|r| r.scenario == Some(true)) {
        text.push_str("scenarios = [\"on\"]\n");
    }
    let quoted = |items: Vec<String>| {
        let items: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
        items.join(", ")
    };
    for (i, r) in rules.iter().enumerate() {
        text.push_str(&format!("\n[[rule]]\nname = \"r{i}\"\n"));
        if r.hosts.is_empty() {
            let cidrs = r.cidrs.iter().map(ToString::to_string).collect();
            text.push_str(&format!("cidrs = [{}]\n", quoted(cidrs)));
        } else {
            text.push_str(&format!("hosts = [{}]\n", quoted(r.hosts.clone())));
        }
        if !r.ports.is_empty() {
            let ports: Vec<String> = (r.ports.iter())
                .map(|&(lo, hi)| {
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("\"{lo}-{hi}\"")
                    }
                })
                .collect();
            text.push_str(&format!("ports = [{}]\n", ports.join(", ")));
        }
        text.push_str(&format!("protocol = \"{}\"\n", r.proto.as_str()));
        if r.deny {
            text.push_str("action = \"deny\"\n");
        }
        match r.scenario {
            Some(true) => text.push_str("scenario = \"on\"\n"),
            Some(false) => text.push_str("scenario = \"off\"\n"),
            None => {}
        }
        if let Some(c) = &r.clients {
            let names: Vec<String> = c.iter().map(|g| format!("\"g{g}\"")).collect();
            text.push_str(&format!("clients = [{}]\n", names.join(", ")));
        }
    }
    text
}

/// A destination host: a name near the patterns (under one, an apex, a
/// near miss), changed in case, given a trailing dot or made malformed; or
/// an address literal.
fn destination(rng: &mut Rng) -> String {
    if rng.chance(25) {
        return rng.pick(&ADDRESSES).to_string();
    }
    let mut name = labels(rng);
    if rng.chance(50) {
        name = format!("{}.{name}", rng.pick(&LABELS));
    }
    match rng.below(14) {
        0 => name.make_ascii_uppercase(),
        1 => name.push('.'),
        2 => name.push_str(".."),
        3 => name = format!("{name}..a"),
        4 => name = format!(".{name}"),
        5 => name = format!("{name} x"),
        6 => name = format!("ä.{name}"),
        7 => name = format!("{}.{name}", "q".repeat(63 + rng.below(2))),
        8 => {
            name = rng
                .pick(&["", ".", "1.2.3", "1.2.3.4.5", "a_b.x", "-.ab"])
                .to_string()
        }
        9 => name = format!("{name}:443"),
        _ => {}
    }
    name
}

/// Rule sets per run, and destinations per set: 24,000 decisions, about
/// 0.3 s in a debug build.
const SETS: usize = 800;
const DESTS: usize = 30;

/// Random rule sets and destinations: `decide` and the reference agree on
/// verdict, rule and reason.
#[test]
fn decide_agrees_with_the_plain_semantics() {
    let seed = seed();
    let mut rng = Rng(seed);
    let mut seen = Vec::new();
    let mut other_clients = false;
    for set in 0..SETS {
        let groups = random_groups(&mut rng);
        let rules: Vec<RefRule> = (0..1 + rng.below(6))
            .map(|_| random_rule(&mut rng, groups.len()))
            .collect();
        let audit = rng.chance(10);
        let dns = rng.chance(30);
        let text = config_text(&groups, &rules, audit, dns);
        let source = Source {
            name: "random.toml".into(),
            text: text.clone(),
        };
        let config = Config::parse(&source);
        let config = config.unwrap_or_else(|e| panic!("seed {seed}: set {set}: {e:?}\n{text}"));
        let policy = match Policy::compile(&config, &source, &CompileInput::default()) {
            Ok((p, _)) => p,
            Err(e) => panic!("seed {seed}: set {set}: {e:?}\n{text}"),
        };
        for _ in 0..DESTS {
            let host = destination(&mut rng);
            let dest = Dest {
                target: Target::parse(&host),
                port: *rng.pick(&PROBE_PORTS),
                proto: *rng.pick(&[Protocol::Tcp, Protocol::Tcp, Protocol::Udp]),
            };
            let ip: IpAddr = rng.pick(&CLIENTS).parse().expect("an address");
            let (mine, client_audit) = ref_client(&groups, audit, ip);
            let q = Query {
                dest: &dest,
                groups: &mine,
            };
            let got = policy.decide_for(&dest, policy.client(ip));
            let want = reference(&rules, client_audit, dns, &q);
            assert!(
                got == want,
                "seed {seed}: set {set}: {dest:?} from {ip}\n decide:    {got:?}\n reference: {want:?}\n{text}"
            );
            seen.push((got.verdict, got.reason));
            other_clients |= got.reason == Reason::NoRule && got.rule.is_some();
        }
    }
    assert!(
        other_clients,
        "seed {seed}: no denial naming another group's rule"
    );
    // The generator reaches every reason and verdict, so none goes untested;
    // its rules never wait for a value (`needs_var`, `needs_service_tags`:
    // tests.rs tests those by name).
    let waiting = [Reason::NeedsVar, Reason::NeedsServiceTags];
    for reason in Reason::ALL
        .into_iter()
        .filter(|r| !r.is_data_path() && !waiting.contains(r))
    {
        assert!(
            seen.iter().any(|&(_, r)| r == reason),
            "seed {seed}: no {reason:?}"
        );
    }
    for verdict in [Verdict::Allow, Verdict::Deny, Verdict::AuditDeny] {
        assert!(
            seen.iter().any(|&(v, _)| v == verdict),
            "seed {seed}: no {verdict:?}"
        );
    }
}
