//! Lints: warnings about rules that compile but are probably not what was
//! meant.
//!
//! In: the compiled rules and their host grants. Out: warnings pushed to the
//! compile's diagnostics. Lints never make a config invalid and never change
//! a decision.

use std::collections::{HashMap, HashSet};

use super::diagnostic::Diags;
use super::grants::Grant;
use super::host::HostKey;
use super::rule::{Rule, RuleState};
use crate::config::{Action, Protocol};

/// Wildcards that let any tenant's storage or registry through: fine for the
/// service, but they allow data exfiltration by design.
const EXFILTRATION_SUFFIXES: &[&str] = &[
    "blob.core.windows.net",
    "file.core.windows.net",
    "dfs.core.windows.net",
    "table.core.windows.net",
    "queue.core.windows.net",
    "core.windows.net",
    "web.core.windows.net",
    "azurecr.io",
    "data.azurecr.io",
    "azureedge.net",
    "s3.amazonaws.com",
    "amazonaws.com",
    "storage.googleapis.com",
    "googleapis.com",
    "githubusercontent.com",
    "ngrok.io",
    "ngrok-free.app",
];

/// Wildcards over endpoints every Azure tenant gets a name under, which the
/// Azure ML document lists without warning: each reaches other tenants'
/// services (a write channel out), not only yours.
const MULTI_TENANT_SUFFIXES: &[(&str, &str)] = &[
    ("kusto.windows.net", "Azure Data Explorer cluster"),
    ("vault.azure.net", "Key Vault"),
    ("azurewebsites.net", "App Service app"),
    ("cloudapp.azure.com", "public IP name"),
    ("cloudapp.net", "cloud service"),
    (
        "servicebus.windows.net",
        "Service Bus / Event Hubs namespace",
    ),
    ("database.windows.net", "Azure SQL server"),
    ("azurefd.net", "Front Door endpoint"),
    ("trafficmanager.net", "Traffic Manager profile"),
];

/// Service tags whose ranges front many tenants' endpoints.
const MULTI_TENANT_TAGS: &[(&str, &str)] = &[
    (
        "azurefrontdoor.",
        "every Azure Front Door customer's endpoints",
    ),
    ("azurecloud", "every Azure customer's public addresses"),
    ("appservice", "every App Service customer's apps"),
];

/// Warnings: exfiltration and multi-tenant wildcards, names on protocols
/// that carry none, duplicate and shadowed host grants.
pub(super) fn lint(
    rules: &[Rule],
    keyed: &[(HostKey, Grant)],
    dns_listener: bool,
    d: &mut Diags<'_>,
) {
    for rule in rules
        .iter()
        .filter(|r| r.state == RuleState::Active && r.action == Action::Allow)
    {
        exfiltration(rule, d);
        multi_tenant(rule, d);
        nameless(rule, dns_listener, d);
        unchecked_tunnels(rule, d);
    }
    shadowing(rules, keyed, d);
}

/// Multi-tenant wildcards and service tags the document does not warn about.
fn multi_tenant(rule: &Rule, d: &mut Diags<'_>) {
    let off = format!("[policy] disable_rules = [\"{}\"]", rule.name);
    for h in &rule.hosts {
        let Some(suffix) = h.strip_prefix("*.") else {
            continue;
        };
        let Some((_, what)) = MULTI_TENANT_SUFFIXES.iter().find(|(s, _)| *s == suffix) else {
            continue;
        };
        d.warn_at(
            &rule.origin,
            format!(
                "rule '{}' allows '{h}': every tenant's {what}, not only yours, so data can leave to another tenant; allow yours by name ('NAME.{suffix}') in a rule of your own and switch this one off with {off}",
                rule.name
            ),
        );
    }
    for tag in &rule.service_tags {
        let lower = tag.to_ascii_lowercase();
        let Some((_, what)) = MULTI_TENANT_TAGS.iter().find(|(p, _)| lower.starts_with(p)) else {
            continue;
        };
        let how = if rule.protocol == Protocol::Tcp && !rule.any_sni && !rule.opaque {
            "TLS tunnels to them still carry only names a host rule allows, but a connection without a name is decided by the address alone"
        } else {
            "this rule lets traffic to them through without a name check (udp, any, opaque or sni = \"any\")"
        };
        d.warn_at(
            &rule.origin,
            format!(
                "rule '{}' allows service tag '{tag}': addresses shared by {what}; {how}; if the host rules cover what you need, switch it off with {off}",
                rule.name
            ),
        );
    }
}

/// Host rules on traffic that carries no name: UDP and opaque TCP through
/// the transparent listener, unless a DNS listener learns which address is
/// which name (and then UDP only on the ports it can put into the sets).
fn nameless(rule: &Rule, dns_listener: bool, d: &mut Diags<'_>) {
    if rule.hosts.is_empty() {
        return;
    }
    let off = format!("[policy] disable_rules = [\"{}\"]", rule.name);
    let udp_ports: usize = (rule.ports.iter())
        .map(|&(lo, hi)| usize::from(hi - lo) + 1)
        .sum();
    if rule.protocol != Protocol::Tcp && dns_listener && udp_ports > super::MAX_UDP_PORTS {
        d.warn_at(
            &rule.origin,
            format!(
                "rule '{}' names hosts on {} UDP ports: the gateway adds the addresses the DNS listener answers for them to the ruleset's sets on the first {} ports only (one set element per address and port); list the ports the service uses",
                rule.name,
                udp_ports,
                super::MAX_UDP_PORTS
            ),
        );
    }
    if rule.protocol != Protocol::Tcp && !dns_listener {
        d.warn_at(
            &rule.origin,
            format!(
                "rule '{}' names hosts on {}, but UDP carries no name: without a DNS listener ([listen] dns) the gateway forwards UDP by address sets only, so the names are never enforced; UDP reaches these hosts only where an address rule allows their addresses, and `explain` says needs_dns for the names; set [listen] dns (the gateway then forwards UDP to the addresses it answered for these names), allow the service's addresses with an address rule (service_tags or cidrs, protocol = \"udp\"), set protocol = \"tcp\", or switch it off with {off}",
                rule.name,
                rule.protocol.as_str()
            ),
        );
    }
    let tls_only = rule
        .ports
        .iter()
        .all(|&(lo, hi)| lo == hi && (lo == 443 || lo == 80));
    if rule.opaque && !tls_only && !dns_listener {
        d.warn_at(
            &rule.origin,
            format!(
                "rule '{}' names hosts with opaque = true: the explicit proxy enforces the name (CONNECT carries it), but without a DNS listener ([listen] dns) a transparent connection on port {} carries no name and is decided by address rules only (cidrs or service_tags on that port); send this traffic through the explicit proxy, add an address rule, or switch it off with {off}",
                rule.name,
                super::rule::ports_text(&rule.ports)
            ),
        );
    }
}

/// Tunnels whose contents are not checked: `sni = "any"` reaches every
/// tenant behind the rule's addresses; `opaque = true` lets any protocol
/// through, so on a TLS port a fronted hello is not cut.
fn unchecked_tunnels(rule: &Rule, d: &mut Diags<'_>) {
    if rule.any_sni {
        d.warn_at(
            &rule.origin,
            format!(
                "rule '{}' accepts any TLS name in tunnels to its addresses (sni = \"any\"): every tenant behind them is reachable; remove it to accept only names a host rule allows",
                rule.name
            ),
        );
    }
    let tls_port = rule.ports.iter().any(|&(lo, hi)| lo <= 443 && 443 <= hi);
    if rule.opaque && tls_port {
        d.warn_at(
            &rule.origin,
            format!(
                "rule '{}' lets its tunnels on port 443 carry anything (opaque = true): TLS names are not checked there (domain fronting); keep opaque rules to ports of protocols that name no host",
                rule.name
            ),
        );
    }
}

/// Broad wildcards and storage service tags in an active allow rule.
fn exfiltration(rule: &Rule, d: &mut Diags<'_>) {
    for h in &rule.hosts {
        let Some(suffix) = h.strip_prefix("*.") else {
            continue;
        };
        let broad = !suffix.contains('.');
        if broad || EXFILTRATION_SUFFIXES.contains(&suffix) {
            let why = if broad {
                "every name under a top-level domain".to_string()
            } else {
                format!("any tenant's '{suffix}' endpoint")
            };
            d.warn_at(
                &rule.origin,
                format!(
                    "rule '{}' allows '{h}': {why}, so data can be exfiltrated by design; name the accounts you own instead where you can ([policy] disable_rules = [\"{}\"] switches this rule off)",
                    rule.name, rule.name
                ),
            );
        }
    }
    for tag in &rule.service_tags {
        if tag.eq_ignore_ascii_case("Storage") || tag.to_ascii_lowercase().starts_with("storage.") {
            d.warn_at(
                &rule.origin,
                format!(
                    "rule '{}' allows service tag '{tag}': every storage account in that range, so data can be exfiltrated by design",
                    rule.name
                ),
            );
        }
    }
}

fn active_allow(g: &Grant) -> bool {
    g.active && !g.deny
}

/// The active allow grants of each host key, to look up what covers a grant.
struct Allows<'a> {
    exact: HashMap<&'a str, Vec<&'a Grant>>,
    wild: HashMap<&'a str, Vec<&'a Grant>>,
}

impl<'a> Allows<'a> {
    fn new(keyed: &'a [(HostKey, Grant)]) -> Allows<'a> {
        let mut allows = Allows {
            exact: HashMap::new(),
            wild: HashMap::new(),
        };
        for (key, g) in keyed.iter().filter(|(_, g)| active_allow(g)) {
            match key {
                HostKey::Exact(n) => allows.exact.entry(n).or_default().push(g),
                HostKey::Wildcard(s) => allows.wild.entry(s).or_default().push(g),
            }
        }
        allows
    }

    /// Another rule's grant whose key matches every name `key` does and
    /// whose ports and protocol cover `g`'s: on the same key first, then on
    /// the wildcards above it, nearest first. Its rule and its key as written.
    fn covering(&self, key: &HostKey, g: &Grant) -> Option<(u32, String)> {
        let covers = |o: &&&Grant| {
            o.rule != g.rule
                && o.lo <= g.lo
                && g.hi <= o.hi
                && (o.proto == Protocol::Any || o.proto == g.proto)
                && super::clients::covers(o.clients, g.clients)
        };
        let (name, same) = match key {
            HostKey::Exact(n) => (n.as_str(), self.exact.get(n.as_str())),
            HostKey::Wildcard(s) => (s.as_str(), self.wild.get(s.as_str())),
        };
        if let Some(o) = same.and_then(|v| v.iter().find(covers)) {
            return Some((o.rule, key.to_string()));
        }
        let mut rest = name;
        if matches!(key, HostKey::Wildcard(_)) {
            rest = rest.split_once('.').map(|(_, r)| r)?;
        }
        loop {
            if let Some(o) = self.wild.get(rest).and_then(|v| v.iter().find(covers)) {
                return Some((o.rule, format!("*.{rest}")));
            }
            rest = rest.split_once('.').map(|(_, r)| r)?;
        }
    }
}

/// Duplicate / shadowed: a grant of rule A whose host, ports and protocol
/// are all covered by an earlier-or-broader active allow of rule B.
fn shadowing(rules: &[Rule], keyed: &[(HostKey, Grant)], d: &mut Diags<'_>) {
    let allows = Allows::new(keyed);
    let mut reported: HashSet<(u32, u32)> = HashSet::new();
    for (key, g) in keyed.iter().filter(|(_, g)| active_allow(g)) {
        let Some((other, by)) = allows.covering(key, g) else {
            continue;
        };
        let (a, b) = (&rules[g.rule as usize], &rules[other as usize]);
        if (a.from_profile && b.from_profile) || !reported.insert((g.rule, other)) {
            continue;
        }
        let duplicate = by == key.to_string();
        if duplicate && g.rule < other {
            continue; // reported once, on the later rule
        }
        let kind = if duplicate {
            "duplicates"
        } else {
            "is shadowed by"
        };
        d.warn_at(
            &a.origin,
            format!(
                "rule '{}' host '{key}' {kind} rule '{}' ('{by}', {}): it changes nothing",
                a.name, b.name, b.origin
            ),
        );
    }
}
