//! Render: configuration for other tools, derived from the same config (nftables).
//!
//! In: a loaded config and its compiled policy. Out: the text of a complete,
//! commented nftables ruleset for the gateway VM. Nothing is applied here
//! (`deploy/apply-nftables.sh` checks and loads it).
//!
//! The ruleset, one `inet` table replaced as a whole:
//! - prerouting: traffic to the gateway itself (explicit proxy, admin, SSH)
//!   is left alone; forwarded TCP from `[clients] allow` is redirected to the
//!   transparent listener, which decides on SNI, Host or address. Opaque TCP
//!   such as SMB 445 goes through the listener too, so it is decided by the
//!   same address rules, logged and counted like everything else.
//! - forward: UDP has no name to read, so the UDP address rules (service tags
//!   and CIDRs) become nftables sets that are forwarded and masqueraded;
//!   UDP 443 (QUIC) is dropped so clients fall back to TCP, where SNI is
//!   visible; inbound rules (e.g. AzureMachineLearning → the VNet on 44224
//!   in the profile's `public-ip` scenario) are accepted to their `to`
//!   ranges only; everything else is dropped and counted.
//! - with `[listen] dns`: the clients' port 53 (UDP and TCP, to any address)
//!   is redirected to the DNS listener, and two sets of `address . port`
//!   with timeouts (`dns_udp_v4`, `dns_udp_v6`), which the running gateway
//!   fills with the addresses it answered for names UDP rules allow
//!   (`crate::nftset`), are forwarded like the UDP address rules.

use std::fmt::Write;
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::config::{Action, Direction, Protocol};
use crate::load::Loaded;
use crate::policy::{Policy, Rule, RuleState};

const TABLE: &str = crate::nftset::TABLE;

#[cfg(test)]
mod tests;

fn set_name(prefix: &str, index: usize, v6: bool) -> String {
    format!("{prefix}{index}_{}", if v6 { "v6" } else { "v4" })
}

fn ports_expr(ports: &[(u16, u16)]) -> String {
    let items = crate::policy::port_ranges(ports);
    if items.len() == 1 {
        items[0].clone()
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

/// Writes `set NAME { ... }` for the given family, or nothing if empty. Returns whether written.
fn write_set(out: &mut String, name: &str, nets: &[IpNet], v6: bool, comment: &str) -> bool {
    let elems: Vec<String> = nets
        .iter()
        .filter(|n| matches!(n, IpNet::V6(_)) == v6)
        .map(|n| n.trunc().to_string())
        .collect();
    if elems.is_empty() {
        return false;
    }
    let kind = if v6 { "ipv6_addr" } else { "ipv4_addr" };
    let _ = writeln!(out, "\tset {name} {{");
    let _ = writeln!(out, "\t\t# {comment}");
    let _ = writeln!(out, "\t\ttype {kind}; flags interval; auto-merge");
    let _ = writeln!(out, "\t\telements = {{");
    for chunk in elems.chunks(8) {
        let _ = writeln!(out, "\t\t\t{},", chunk.join(", "));
    }
    let _ = writeln!(out, "\t\t}}");
    let _ = writeln!(out, "\t}}");
    true
}

/// `text` as a one-line nftables comment: without `"` or newlines, and at
/// most 100 bytes (97 and `...` when cut), well inside nft's 128-byte limit
/// for a `comment "..."`.
fn one_line(text: &str) -> String {
    let t: String = text.chars().filter(|c| *c != '"' && *c != '\n').collect();
    if t.len() > 100 {
        // Byte 97 may fall inside a multi-byte character (a description in
        // any language): cut before that character, never through it.
        format!("{}...", &t[..t.floor_char_boundary(97)])
    } else {
        t
    }
}

fn l4(proto: Protocol) -> Vec<&'static str> {
    match proto {
        Protocol::Tcp => vec!["tcp"],
        Protocol::Udp => vec!["udp"],
        Protocol::Any => vec!["tcp", "udp"],
    }
}

/// The nftables ruleset for the gateway host.
///
/// # Errors
/// When the config has no transparent listener to redirect to, or its DNS
/// listener is on a loopback address (redirected DNS could not reach it).
pub fn nftables(loaded: &Loaded) -> Result<String, String> {
    let Some(transparent) = loaded.config.listen.transparent else {
        return Err(
            "[listen] transparent is not set: the ruleset redirects forwarded TCP to the transparent listener, \
             so set it (e.g. transparent = \"0.0.0.0:3129\")"
                .into(),
        );
    };
    let dns = loaded.config.listen.dns;
    if let Some(dns) = dns.filter(|d| d.ip().is_loopback()) {
        return Err(format!(
            "[listen] dns = \"{dns}\" is a loopback address: the ruleset redirects the clients' port 53 to the address their packets arrive on, where nothing would answer; \
             bind it to that address or to all (e.g. dns = \"0.0.0.0:{}\")",
            dns.port()
        ));
    }
    let policy = &loaded.policy;
    let mut out = String::new();
    write_header(&mut out, loaded);
    // Create-then-delete makes the first load and every reload the same atomic transaction.
    let _ = writeln!(out, "table inet {TABLE}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out);
    let _ = writeln!(out, "table inet {TABLE} {{");
    let clients = write_client_sets(&mut out, policy.clients());
    let sets = write_rule_sets(&mut out, policy);
    if dns.is_some() {
        write_dns_sets(&mut out);
    }
    write_prerouting(&mut out, transparent, dns, clients);
    write_forward(&mut out, clients, &sets, dns.is_some());
    write_postrouting(&mut out);
    let _ = writeln!(out, "}}");
    Ok(out)
}

/// The `#` comment lines before the table: provenance, how to apply, and a
/// warning when service-tag rules are left out for want of a tags file.
fn write_header(out: &mut String, loaded: &Loaded) {
    let policy = &loaded.policy;
    let _ = writeln!(out, "#!/usr/sbin/nft -f");
    let _ = writeln!(
        out,
        "# portcullis {} gateway ruleset, rendered from {} by `portcullis render nftables`.",
        env!("CARGO_PKG_VERSION"),
        loaded.source.name
    );
    let _ = writeln!(
        out,
        "# Apply with deploy/apply-nftables.sh (checks with `nft -c -f` first). Re-render after config changes."
    );
    let _ = writeln!(
        out,
        "# Needs net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1."
    );
    if policy.service_tags_change().is_none()
        && policy
            .rules()
            .iter()
            .any(|r| r.state == RuleState::WaitingForServiceTags)
    {
        let _ = writeln!(
            out,
            "# WARNING: no service tags file: rules naming service tags (e.g. AzureMachineLearning UDP 5831) are not rendered."
        );
    }
    let _ = writeln!(out);
}

/// Which address families have clients (a family without any gets no
/// `@clients_*` set, so no rule may name one).
#[derive(Debug, Clone, Copy)]
struct ClientFamilies {
    v4: bool,
    v6: bool,
}

/// `set clients_v4` / `set clients_v6` from `[clients] allow`.
fn write_client_sets(out: &mut String, clients: &[IpNet]) -> ClientFamilies {
    let comment = "[clients] allow: who may use the gateway";
    write_set(out, "clients_v4", clients, false, comment);
    write_set(out, "clients_v6", clients, true, comment);
    ClientFamilies {
        v4: clients.iter().any(|n| matches!(n, IpNet::V4(_))),
        v6: clients.iter().any(|n| matches!(n, IpNet::V6(_))),
    }
}

/// An address rule rendered as sets: the set names written per family.
struct Emitted<'a> {
    rule: &'a Rule,
    v4: Option<String>,
    v6: Option<String>,
}

/// The address rules nftables itself must enforce, as written sets.
struct RuleSets<'a> {
    /// Egress UDP (or any-protocol) rules: forwarded and masqueraded.
    udp: Vec<Emitted<'a>>,
    /// Inbound rules of enabled (or unscoped) scenarios.
    inbound: Vec<Emitted<'a>>,
}

/// Does nftables enforce `rule`? The transparent listener sees only TCP, so
/// egress rules that cover UDP, and inbound rules, are the ruleset's job.
fn enforced_by_nftables(policy: &Policy, rule: &Rule) -> bool {
    match (rule.direction, rule.state.clone()) {
        (Direction::Egress, RuleState::Active) => rule.protocol != Protocol::Tcp,
        (Direction::Inbound, RuleState::NotEgress) => {
            policy
                .scenarios()
                .iter()
                .any(|s| Some(&s.name) == rule.scenario.as_ref() && s.enabled)
                || rule.scenario.is_none()
        }
        _ => false,
    }
}

/// One `set` per family for every address rule nftables enforces, named by
/// the rule's index (`udp<i>_v4`, `in<i>_v6`, ...).
fn write_rule_sets<'a>(out: &mut String, policy: &'a Policy) -> RuleSets<'a> {
    let mut sets = RuleSets {
        udp: Vec::new(),
        inbound: Vec::new(),
    };
    for (i, rule) in policy.rules().iter().enumerate() {
        if !enforced_by_nftables(policy, rule) || rule.cidrs.is_empty() {
            continue;
        }
        let prefix = if rule.direction == Direction::Inbound {
            "in"
        } else {
            "udp"
        };
        let comment = format!("rule {}: {}", rule.name, one_line(&rule.description));
        let v4n = set_name(prefix, i, false);
        let v6n = set_name(prefix, i, true);
        let e = Emitted {
            rule,
            v4: write_set(out, &v4n, &rule.cidrs, false, &comment).then_some(v4n),
            v6: write_set(out, &v6n, &rule.cidrs, true, &comment).then_some(v6n),
        };
        if rule.direction == Direction::Inbound {
            sets.inbound.push(e);
        } else {
            sets.udp.push(e);
        }
    }
    sets
}

/// The two sets the running gateway fills with the addresses its DNS
/// listener answered for names UDP rules allow (`crate::nftset`), declared
/// empty (both families always, so a batch never names a missing set).
fn write_dns_sets(out: &mut String) {
    for (name, kind) in [
        (crate::nftset::SET_V4, "ipv4_addr"),
        (crate::nftset::SET_V6, "ipv6_addr"),
    ] {
        let _ = writeln!(out, "\tset {name} {{");
        let _ = writeln!(
            out,
            "\t\t# Filled by the gateway: address . port for each address its DNS listener answered for a name a UDP rule allows, until TTL + grace."
        );
        let _ = writeln!(out, "\t\ttype {kind} . inet_service; flags timeout");
        let _ = writeln!(out, "\t}}");
    }
}

/// `chain prerouting`: the clients' DNS → the DNS listener (when there is
/// one); forwarded TCP from clients → the transparent listener.
fn write_prerouting(
    out: &mut String,
    transparent: SocketAddr,
    dns: Option<SocketAddr>,
    clients: ClientFamilies,
) {
    let port = transparent.port();
    let _ = writeln!(out);
    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    if let Some(dns) = dns {
        write_dns_redirect(out, dns, clients);
    }
    let _ = writeln!(
        out,
        "\t\t# Traffic to the gateway itself (explicit proxy, admin, SSH) is not redirected."
    );
    let _ = writeln!(out, "\t\tfib daddr type local return");
    let _ = writeln!(
        out,
        "\t\t# Forwarded TCP from clients goes to the transparent listener ({transparent}): decided on SNI, Host or address."
    );
    if clients.v4 {
        let _ = writeln!(
            out,
            "\t\tip saddr @clients_v4 meta l4proto tcp redirect to :{port}"
        );
    }
    if clients.v6 {
        let _ = writeln!(
            out,
            "\t\tip6 saddr @clients_v6 meta l4proto tcp redirect to :{port}"
        );
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out);
}

/// Port 53 from clients, UDP and TCP, to any address (the gateway's own,
/// 168.63.129.16, a public resolver) → the DNS listener's port: a client
/// that ignores its resolver settings is answered by the filter too. Before
/// the local-traffic return, so DNS to the gateway's own address on 53
/// reaches the listener whatever port it is on.
fn write_dns_redirect(out: &mut String, dns: SocketAddr, clients: ClientFamilies) {
    let port = dns.port();
    let _ = writeln!(
        out,
        "\t\t# DNS from clients to any address goes to the DNS listener ({dns}): names no rule allows are refused."
    );
    for (fam, set, on) in [
        ("ip", "@clients_v4", clients.v4),
        ("ip6", "@clients_v6", clients.v6),
    ] {
        if !on {
            continue;
        }
        for proto in ["udp", "tcp"] {
            let _ = writeln!(
                out,
                "\t\t{fam} saddr {set} {proto} dport 53 counter redirect to :{port} comment \"dns to the listener\""
            );
        }
    }
}

/// `chain forward`: QUIC dropped, UDP and inbound rules, the rest dropped.
fn write_forward(out: &mut String, clients: ClientFamilies, sets: &RuleSets<'_>, dns: bool) {
    let _ = writeln!(out, "\tchain forward {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook forward priority filter; policy drop;"
    );
    let _ = writeln!(out, "\t\tct state established,related accept");
    let _ = writeln!(out, "\t\tct state invalid drop");
    let _ = writeln!(
        out,
        "\t\t# QUIC (UDP 443) carries no readable SNI: drop it so browsers and SDKs fall back to TCP."
    );
    let _ = writeln!(out, "\t\tudp dport 443 counter drop comment \"quic\"");
    write_udp_rules(out, clients, &sets.udp);
    if dns {
        write_dns_udp_rules(out, clients);
    }
    write_inbound_rules(out, &sets.inbound);
    let _ = writeln!(
        out,
        "\t\t# Everything else: dropped and counted (`nft list chain inet {TABLE} forward`)."
    );
    let _ = writeln!(out, "\t\tcounter comment \"dropped\"");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out);
}

/// Forward rules for egress UDP: clients of a family → the rule's set.
fn write_udp_rules(out: &mut String, clients: ClientFamilies, udp: &[Emitted<'_>]) {
    for e in udp {
        let ports = ports_expr(&e.rule.ports);
        let verdict = if e.rule.action == Action::Deny {
            "drop"
        } else {
            "accept"
        };
        let comment = one_line(&format!("rule {}", e.rule.name));
        for (fam, saddr, set) in [("ip", "@clients_v4", &e.v4), ("ip6", "@clients_v6", &e.v6)] {
            let Some(set) = set else { continue };
            if (fam == "ip" && !clients.v4) || (fam == "ip6" && !clients.v6) {
                continue;
            }
            let _ = writeln!(
                out,
                "\t\t{fam} saddr {saddr} {fam} daddr @{set} udp dport {ports} counter {verdict} comment \"{comment}\""
            );
        }
    }
}

/// Forward rules for UDP to the addresses the DNS listener answered for
/// names UDP rules allow, on those rules' ports (the sets the gateway
/// fills). After the address rules, so their `drop`s win.
fn write_dns_udp_rules(out: &mut String, clients: ClientFamilies) {
    let _ = writeln!(
        out,
        "\t\t# UDP to an address the DNS listener answered for a name a UDP rule allows, on that rule's ports (sets filled by the gateway)."
    );
    for (fam, saddr, set, on) in [
        ("ip", "@clients_v4", crate::nftset::SET_V4, clients.v4),
        ("ip6", "@clients_v6", crate::nftset::SET_V6, clients.v6),
    ] {
        if on {
            let _ = writeln!(
                out,
                "\t\t{fam} saddr {saddr} {fam} daddr . udp dport @{set} counter accept comment \"udp to names resolved through the dns listener\""
            );
        }
    }
}

/// `{ a, b }` (or the one range) of `to`'s nets of one family, if any.
fn daddr_expr(to: &[IpNet], v6: bool) -> Option<String> {
    let nets: Vec<String> = to
        .iter()
        .filter(|n| matches!(n, IpNet::V6(_)) == v6)
        .map(|n| n.trunc().to_string())
        .collect();
    match nets.len() {
        0 => None,
        1 => Some(nets[0].clone()),
        _ => Some(format!("{{ {} }}", nets.join(", "))),
    }
}

/// Forward rules for inbound traffic: the rule's set → its `to` ranges on
/// its ports, per protocol. A family without `to` ranges gets no rule.
fn write_inbound_rules(out: &mut String, inbound: &[Emitted<'_>]) {
    for e in inbound {
        let ports = ports_expr(&e.rule.ports);
        let comment = one_line(&format!("inbound rule {}", e.rule.name));
        for (fam, set, v6) in [("ip", &e.v4, false), ("ip6", &e.v6, true)] {
            let Some(set) = set else { continue };
            let Some(daddr) = daddr_expr(&e.rule.to, v6) else {
                continue;
            };
            for proto in l4(e.rule.protocol) {
                let _ = writeln!(
                    out,
                    "\t\t{fam} saddr @{set} {fam} daddr {daddr} {proto} dport {ports} counter accept comment \"{comment}\""
                );
            }
        }
    }
}

/// `chain postrouting`: forwarded UDP is masqueraded.
fn write_postrouting(out: &mut String) {
    let _ = writeln!(out, "\tchain postrouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    let _ = writeln!(
        out,
        "\t\t# Forwarded UDP leaves with the gateway's address (redirected TCP is proxied, so it already does)."
    );
    let _ = writeln!(
        out,
        "\t\tfib saddr type != local meta l4proto udp masquerade"
    );
    let _ = writeln!(out, "\t}}");
}
