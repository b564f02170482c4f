//! The rule model as compiled: what `explain`, `profile show` and `check`
//! print about each rule and scenario.
//!
//! In: filled in by `compile`. Out: plain data, read through
//! [`Policy::rules`](super::Policy::rules) and
//! [`Policy::scenarios`](super::Policy::scenarios). Decisions do not read
//! it: they use the grants compiled from it.

use ipnet::IpNet;

use crate::config::{Action, Direction, Location, Protocol};

/// Whether a rule takes part in decisions, and if not why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleState {
    /// Active.
    Active,
    /// Its scenario is not enabled.
    ScenarioDisabled,
    /// Placeholders without a value (only when compiling leniently).
    MissingVars(Vec<String>),
    /// Service tags named but no service tags file given.
    WaitingForServiceTags,
    /// Not an egress rule: documentation / nftables only.
    NotEgress,
    /// Switched off by `[policy] disable_rules`.
    Disabled,
}

/// A compiled rule, as `explain` and `profile show` print it.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name.
    pub name: String,
    /// Purpose text.
    pub description: String,
    /// Scenario, if any.
    pub scenario: Option<String>,
    /// Allow or deny.
    pub action: Action,
    /// Protocol.
    pub protocol: Protocol,
    /// Direction.
    pub direction: Direction,
    /// Port ranges, inclusive.
    pub ports: Vec<(u16, u16)>,
    /// Host patterns after placeholder substitution (as written when placeholders are missing).
    pub hosts: Vec<String>,
    /// CIDRs, from `cidrs` and resolved service tags.
    pub cidrs: Vec<IpNet>,
    /// Service tag names as written (after substitution).
    pub service_tags: Vec<String>,
    /// Inbound rules: the ranges the traffic may reach (`to`, filled).
    pub to: Vec<IpNet>,
    /// Where the rule was written.
    pub origin: Location,
    /// Whether it takes part in decisions.
    pub state: RuleState,
    /// Whether it comes from the built-in profile.
    pub from_profile: bool,
    /// Address rules: tunnels to its addresses may carry any TLS name (`sni = "any"`).
    pub any_sni: bool,
    /// Tunnels it allows may carry a protocol that names no host (`opaque = true`).
    pub opaque: bool,
    /// The client groups it applies to (`clients`); empty: every served client.
    pub clients: Vec<String>,
}

/// A scenario as compiled: known from the profile or from config rules, and whether it is on.
#[derive(Debug, Clone)]
pub struct ScenarioState {
    /// Name.
    pub name: String,
    /// What it covers.
    pub description: String,
    /// What it assumes or where its rules come from (profile scenarios).
    pub notes: Vec<String>,
    /// Enabled in this policy.
    pub enabled: bool,
}

/// Port ranges as written in configs: `443`, `8704-8710`.
pub fn port_ranges(ports: &[(u16, u16)]) -> Vec<String> {
    ports
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect()
}

pub(super) fn ports_text(ports: &[(u16, u16)]) -> String {
    port_ranges(ports).join(", ")
}
