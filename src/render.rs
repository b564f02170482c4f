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
//!   visible; inbound rules of the profile (e.g. AzureMachineLearning →
//!   44224) are accepted; everything else is dropped and counted.

use std::fmt::Write;

use ipnet::IpNet;

use crate::config::{Action, Direction, Protocol};
use crate::load::Loaded;
use crate::policy::{Rule, RuleState};

const TABLE: &str = "portcullis";

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

fn one_line(text: &str) -> String {
    let t: String = text.chars().filter(|c| *c != '"' && *c != '\n').collect();
    if t.len() > 100 {
        format!("{}...", &t[..97])
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
/// When the config has no transparent listener to redirect to.
pub fn nftables(loaded: &Loaded) -> Result<String, String> {
    let policy = &loaded.policy;
    let Some(transparent) = loaded.config.listen.transparent else {
        return Err(
            "[listen] transparent is not set: the ruleset redirects forwarded TCP to the transparent listener, \
             so set it (e.g. transparent = \"0.0.0.0:3129\")"
                .into(),
        );
    };
    let port = transparent.port();
    let mut out = String::new();
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
    // Create-then-delete makes the first load and every reload the same atomic transaction.
    let _ = writeln!(out, "table inet {TABLE}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out);
    let _ = writeln!(out, "table inet {TABLE} {{");

    let clients = policy.clients();
    write_set(
        &mut out,
        "clients_v4",
        clients,
        false,
        "[clients] allow: who may use the gateway",
    );
    write_set(
        &mut out,
        "clients_v6",
        clients,
        true,
        "[clients] allow: who may use the gateway",
    );
    let has_v4_clients = clients.iter().any(|n| matches!(n, IpNet::V4(_)));
    let has_v6_clients = clients.iter().any(|n| matches!(n, IpNet::V6(_)));

    // Address rules that nftables itself must enforce: UDP egress, and inbound.
    struct Emitted<'a> {
        rule: &'a Rule,
        v4: Option<String>,
        v6: Option<String>,
    }
    let mut udp: Vec<Emitted<'_>> = Vec::new();
    let mut inbound: Vec<Emitted<'_>> = Vec::new();
    for (i, rule) in policy.rules().iter().enumerate() {
        let nftable = match (rule.direction, rule.state.clone()) {
            (Direction::Egress, RuleState::Active) => rule.protocol != Protocol::Tcp,
            (Direction::Inbound, RuleState::NotEgress) => {
                policy
                    .scenarios()
                    .iter()
                    .any(|s| Some(&s.name) == rule.scenario.as_ref() && s.enabled)
                    || rule.scenario.is_none()
            }
            _ => false,
        };
        if !nftable || rule.cidrs.is_empty() {
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
            v4: write_set(&mut out, &v4n, &rule.cidrs, false, &comment).then_some(v4n),
            v6: write_set(&mut out, &v6n, &rule.cidrs, true, &comment).then_some(v6n),
        };
        if rule.direction == Direction::Inbound {
            inbound.push(e);
        } else {
            udp.push(e);
        }
    }

    let _ = writeln!(out);
    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    let _ = writeln!(
        out,
        "\t\t# Traffic to the gateway itself (explicit proxy, admin, SSH) is not redirected."
    );
    let _ = writeln!(out, "\t\tfib daddr type local return");
    let _ = writeln!(
        out,
        "\t\t# Forwarded TCP from clients goes to the transparent listener ({transparent}): decided on SNI, Host or address."
    );
    if has_v4_clients {
        let _ = writeln!(
            out,
            "\t\tip saddr @clients_v4 meta l4proto tcp redirect to :{port}"
        );
    }
    if has_v6_clients {
        let _ = writeln!(
            out,
            "\t\tip6 saddr @clients_v6 meta l4proto tcp redirect to :{port}"
        );
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out);

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
    for e in &udp {
        let ports = ports_expr(&e.rule.ports);
        let verdict = if e.rule.action == Action::Deny {
            "drop"
        } else {
            "accept"
        };
        let comment = one_line(&format!("rule {}", e.rule.name));
        for (fam, saddr, set) in [("ip", "@clients_v4", &e.v4), ("ip6", "@clients_v6", &e.v6)] {
            let Some(set) = set else { continue };
            if (fam == "ip" && !has_v4_clients) || (fam == "ip6" && !has_v6_clients) {
                continue;
            }
            let _ = writeln!(
                out,
                "\t\t{fam} saddr {saddr} {fam} daddr @{set} udp dport {ports} counter {verdict} comment \"{comment}\""
            );
        }
    }
    for e in &inbound {
        let ports = ports_expr(&e.rule.ports);
        let comment = one_line(&format!("inbound rule {}", e.rule.name));
        for (fam, set) in [("ip", &e.v4), ("ip6", &e.v6)] {
            let Some(set) = set else { continue };
            for proto in l4(e.rule.protocol) {
                let _ = writeln!(
                    out,
                    "\t\t{fam} saddr @{set} {proto} dport {ports} counter accept comment \"{comment}\""
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\t\t# Everything else: dropped and counted (`nft list chain inet {TABLE} forward`)."
    );
    let _ = writeln!(out, "\t\tcounter comment \"dropped\"");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out);

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
    let _ = writeln!(out, "}}");
    Ok(out)
}
