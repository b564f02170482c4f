//! Policy: the compiled, immutable allowlist, and `decide`.
//!
//! In: a parsed [`Config`](crate::config::Config) (plus the embedded
//! profile, `--var` overrides and an optional service tags file). Out: a
//! [`Policy`] that answers [`Policy::decide`] for a destination with a small
//! `Copy` [`Decision`].
//!
//! [`Policy::compile`] (`compile.rs`) is the only place that builds matchers
//! and tables; it collects every error (with file:line:col) instead of
//! stopping at the first. After it, the policy never changes and never does
//! I/O; reload swaps it whole.
//!
//! Decision order, for a destination `(host or ip, port, protocol)`:
//! 1. malformed names are denied (`malformed_host`); the Azure platform
//!    addresses are denied (`platform_address`);
//! 2. a matching deny rule wins over every allow (`deny_rule`);
//! 3. names: the most specific matching allow rule (exact, then the longest
//!    `*.suffix`, then rule order); addresses: the longest matching CIDR, and a
//!    guarded address needs an allow rule whose CIDR lies inside guarded space;
//! 4. otherwise deny, saying why: the host is allowed on other ports
//!    (`port_not_allowed`) or for another protocol (`protocol_not_allowed`),
//!    only in a disabled scenario (`scenario_disabled`), only by a rule that
//!    waits for a placeholder value (`needs_var`) or a service tags file
//!    (`needs_service_tags`), or not at all (`no_rule`);
//! 5. a name allowed on UDP is denied (`needs_dns`) without a DNS listener:
//!    UDP carries no name, so the gateway forwards UDP by address rules only
//!    (nftables sets). With `[listen] dns` it stays allowed: the gateway adds
//!    the addresses it answered for the name to the ruleset's sets
//!    ([`Policy::udp_ports`], the nftset module). UDP 443 (QUIC) is denied
//!    either way: the ruleset drops it so clients use TCP.
//!
//! `reference_tests.rs` states this order as plainly as it can and compares
//! it with `decide` on random rule sets.
//!
//! Files: `decision.rs` (what a decision says), `rule.rs` (the rule model),
//! `compile.rs` (config to policy), `diagnostic.rs` and `lint.rs` (what
//! compile reports), `grants.rs` (per-key grant folding and the walk that
//! decides), `host/` (names), `net.rs` (addresses), `profile.rs` (built-in
//! rules).

mod clients;
mod compile;
mod decision;
mod diagnostic;
pub mod diff;
mod grants;
pub mod host;
mod lint;
pub mod net;
mod pending;
mod profile;
mod rule;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::{DnsConfig, Mode, Protocol, UpstreamMode};
use clients::ClientMap;
use grants::{Grant, KeyGrants, Walk};
use host::HostTable;
use net::{Guard, NetTable};
use pending::Pending;
use rule::ports_text;

pub use clients::{Client, ClientClass, MAX_GROUPS};
pub use compile::CompileInput;
pub use decision::{Decision, Dest, Reason, RuleId, Target, Verdict};
pub use diagnostic::{Diagnostic, Severity};
pub use profile::{Profile, Scenario};
pub use rule::{Rule, RuleState, ScenarioState, port_ranges};

/// UDP to this port is QUIC, which the ruleset drops (clients fall back to
/// TCP, where the name is readable).
pub const QUIC_PORT: u16 = 443;

/// A name's UDP ports the gateway puts into the ruleset's sets, at most:
/// each port of each answered address is one set element.
pub const MAX_UDP_PORTS: usize = 256;

/// The compiled policy: cheap to clone, never changes.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Inner>,
}

/// What a policy holds; built only by `compile`.
struct Inner {
    rules: Vec<Rule>,
    grants: Vec<Grant>,
    hosts: HostTable<KeyGrants>,
    nets: NetTable,
    /// What rules waiting for a value would allow (explains denials only).
    pending: Pending,
    mode: Mode,
    upstream: UpstreamMode,
    require_matching_sni: bool,
    clients: ClientMap,
    /// What [`Policy::decide`] decides for: a served client in no group.
    default_client: Client,
    resolve: HashMap<String, Vec<IpAddr>>,
    dns: DnsConfig,
    dns_servers: Vec<SocketAddr>,
    private_ranges: Vec<IpNet>,
    dns_listener: bool,
    scenarios: Vec<ScenarioState>,
    vars: BTreeMap<String, String>,
    service_tags: Option<crate::servicetags::TagsFile>,
    generation: u64,
    /// SHA-256 of the config text, hex (`portcullis_config_info`).
    config_sha256: String,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("rules", &self.inner.rules.len())
            .field("generation", &self.inner.generation)
            .finish()
    }
}

impl Policy {
    /// Decides on a destination. Pure, allocation-free, and what every
    /// listener and `portcullis explain` call.
    ///
    /// ```
    /// use portcullis::config::{Config, Protocol, Source};
    /// use portcullis::policy::{CompileInput, Dest, Policy, Target, Verdict};
    ///
    /// let source = Source { name: "x.toml".into(), text: r#"
    ///     [policy]
    ///     profile = "none"
    ///     [[rule]]
    ///     name = "pypi"
    ///     hosts = ["pypi.org", "*.pythonhosted.org"]
    /// "#.into() };
    /// let config = Config::parse(&source).unwrap();
    /// let (policy, _) = Policy::compile(&config, &source, &CompileInput::default()).unwrap();
    /// let dest = |host, port| Dest { target: Target::parse(host), port, proto: Protocol::Tcp };
    /// assert_eq!(policy.decide(&dest("files.pythonhosted.org", 443)).verdict, Verdict::Allow);
    /// assert_eq!(policy.decide(&dest("pythonhosted.org", 443)).verdict, Verdict::Deny);
    /// assert_eq!(policy.decide(&dest("pypi.org", 80)).verdict, Verdict::Deny);
    /// ```
    ///
    /// It decides for a served client in no client group; the gateway
    /// decides with [`Policy::decide_for`] and the connection's [`Client`].
    #[inline(always)]
    pub fn decide(&self, dest: &Dest<'_>) -> Decision {
        self.decide_for(dest, self.inner.default_client)
    }

    /// Decides on a destination for one client ([`Policy::client`]): rules
    /// whose `clients` it is in no group of do not exist for it, and its
    /// denials are `audit_deny` when its groups (or, in none, `[policy]
    /// mode`) audit.
    #[inline(always)]
    pub fn decide_for(&self, dest: &Dest<'_>, client: Client) -> Decision {
        let mut decision = match dest.target {
            Target::Name(name) => {
                self.decide_name(name.as_bytes(), dest.port, dest.proto, client.mask)
            }
            Target::Ip(ip) => self.decide_ip(ip, dest.port, dest.proto, client.mask),
        };
        if client.audit && decision.verdict == Verdict::Deny {
            decision.verdict = Verdict::AuditDeny;
        }
        decision
    }

    #[inline]
    fn decide_name(&self, name: &[u8], port: u16, proto: Protocol, mask: u64) -> Decision {
        let inner = &*self.inner;
        let found = inner.hosts.find_name(name);
        let d = match found.value {
            Some(key) => grants::decide_name(key.of(&inner.grants), port, proto, mask),
            None if found.malformed => return Decision::deny(None, Reason::MalformedHost),
            None => Decision::deny(None, Reason::NoRule),
        };
        match d.reason {
            // No UDP datagram names its host. With a DNS listener the gateway
            // puts the addresses it answered for the name into the ruleset's
            // sets (see the nftset module); without one, or on 443 (QUIC, always
            // dropped), UDP goes only where address rules allow.
            // The sets serve every client: a rule for client groups cannot
            // be enforced on UDP either.
            Reason::RuleMatched
                if proto == Protocol::Udp
                    && (!inner.dns_listener
                        || port == QUIC_PORT
                        || d.rule
                            .is_some_and(|r| !inner.rules[r.index()].clients.is_empty())) =>
            {
                Decision {
                    verdict: Verdict::Deny,
                    reason: Reason::NeedsDns,
                    ..d
                }
            }
            Reason::NoRule if !inner.pending.is_empty() => {
                match inner.pending.name(name, port, proto) {
                    Some(rule) => Decision::deny(Some(rule), Reason::NeedsVar),
                    None => d,
                }
            }
            _ => d,
        }
    }

    /// The grants of every CIDR containing `ip`, longest prefix first.
    fn walk_ip(&self, ip: IpAddr, port: u16, proto: Protocol, mask: u64) -> Walk {
        let inner = &*self.inner;
        let mut walk = Walk::new(mask);
        inner
            .nets
            .visit(ip, |g| walk.observe(&inner.grants[g as usize], port, proto));
        walk
    }

    fn decide_ip(&self, ip: IpAddr, port: u16, proto: Protocol, mask: u64) -> Decision {
        let guard = net::guard(ip);
        if guard == Some(Guard::Platform) {
            return Decision::deny(None, Reason::PlatformAddress);
        }
        let walk = self.walk_ip(ip, port, proto, mask);
        if let Some(rule) = walk.deny {
            return Decision::deny(Some(rule), Reason::DenyRule);
        }
        let allow = if guard.is_some() {
            walk.allow_unlocking
        } else {
            walk.allow
        };
        let d = match (allow, guard) {
            (Some(rule), _) => return Decision::allow(rule),
            (None, Some(_)) => Decision::deny(walk.allow, Reason::GuardedAddress),
            (None, None) => walk.refusal(),
        };
        let unexplained = matches!(d.reason, Reason::NoRule | Reason::GuardedAddress);
        if unexplained
            && !self.inner.pending.is_empty()
            && let Some((rule, why)) = self.inner.pending.addr(guard.is_some(), port, proto)
        {
            return Decision::deny(Some(rule), why);
        }
        d
    }

    /// Whether a resolved address of an allowed name may be dialled, for a
    /// served client in no group (as [`Policy::decide`]); see
    /// [`Policy::check_resolved_for`].
    ///
    /// # Errors
    /// The reason the address is refused.
    pub fn check_resolved(&self, ip: IpAddr, port: u16, proto: Protocol) -> Result<(), Reason> {
        self.check_resolved_mask(ip, port, proto, self.inner.default_client.mask)
    }

    /// Whether a resolved address of an allowed name may be dialled for
    /// `client`: not a platform address, not denied by an address rule, and
    /// not guarded unless an address rule names that guarded range
    /// explicitly or it lies in `[policy] private_ranges`. `None`: for a connection any client may reuse (the
    /// forwarding pool), so the address must pass for every client class.
    ///
    /// # Errors
    /// The reason the address is refused.
    pub fn check_resolved_for(
        &self,
        ip: IpAddr,
        port: u16,
        proto: Protocol,
        client: Option<Client>,
    ) -> Result<(), Reason> {
        match client {
            Some(c) => self.check_resolved_mask(ip, port, proto, c.mask),
            None if self.inner.clients.classes.is_empty() => {
                self.check_resolved_mask(ip, port, proto, self.inner.default_client.mask)
            }
            None => (self.inner.clients.classes.iter())
                .try_for_each(|class| self.check_resolved_mask(ip, port, proto, class.client.mask)),
        }
    }

    fn check_resolved_mask(
        &self,
        ip: IpAddr,
        port: u16,
        proto: Protocol,
        mask: u64,
    ) -> Result<(), Reason> {
        let guard = net::guard(ip);
        if guard == Some(Guard::Platform) {
            return Err(Reason::PlatformAddress);
        }
        let walk = self.walk_ip(ip, port, proto, mask);
        if walk.deny.is_some() {
            return Err(Reason::DenyRule);
        }
        let named_private = || self.inner.private_ranges.iter().any(|n| n.contains(&ip));
        if guard.is_some() && walk.allow_unlocking.is_none() && !named_private() {
            return Err(Reason::GuardedAddress);
        }
        Ok(())
    }

    /// One sentence a user can act on, e.g. for a 403 body:
    /// `no rule allows this host (scenario python-packages is disabled)`.
    pub fn explain(&self, decision: &Decision) -> String {
        let rule = decision.rule.map(|id| self.rule(id));
        let name = rule.map(|r| r.name.as_str()).unwrap_or("");
        match decision.reason {
            Reason::RuleMatched => format!("allowed by rule '{name}'"),
            Reason::DenyRule => format!("denied by rule '{name}'"),
            Reason::NoRule => match rule {
                Some(r) => format!(
                    "no rule allows this destination for this client (rule '{name}' is for client group(s) {})",
                    r.clients.join(", ")
                ),
                None => "no rule allows this destination".to_string(),
            },
            Reason::PortNotAllowed => {
                let ports = rule.map(|r| ports_text(&r.ports)).unwrap_or_default();
                format!("rule '{name}' allows this host only on port {ports}")
            }
            Reason::ProtocolNotAllowed => {
                let proto = rule.map(|r| r.protocol.as_str()).unwrap_or("tcp");
                format!("rule '{name}' allows this host only over {proto}")
            }
            Reason::ScenarioDisabled => match rule.map(|r| (&r.state, &r.scenario)) {
                Some((RuleState::Disabled, _)) => format!(
                    "no rule allows this host (rule '{name}' is switched off by [policy] disable_rules)"
                ),
                Some((_, Some(scenario))) => {
                    format!("no rule allows this host (scenario {scenario} is disabled)")
                }
                _ => format!("no rule allows this host (rule '{name}' is inactive)"),
            },
            Reason::NeedsVar => {
                let vars = match rule.map(|r| &r.state) {
                    Some(RuleState::MissingVars(vars)) => vars.clone(),
                    _ => Vec::new(),
                };
                let names: Vec<String> = vars.iter().map(|v| format!("<{v}>")).collect();
                let set: Vec<String> = vars.iter().map(|v| format!("--var {v}=...")).collect();
                let verb = if names.len() == 1 { "has" } else { "have" };
                format!(
                    "rule '{name}' would allow this, but {} {verb} no value, so the gateway cannot enforce it: set it in [vars], with {} or with `portcullis init`",
                    names.join(", "),
                    set.join(" ")
                )
            }
            Reason::NeedsServiceTags => {
                let tags = rule.map(|r| r.service_tags.join(", ")).unwrap_or_default();
                format!(
                    "rule '{name}' (service tag {tags}) may allow this address, but no service tags file is loaded, so the gateway cannot know the tag's addresses: set [policy] service_tags or pass --service-tags FILE"
                )
            }
            Reason::NeedsDns if self.inner.dns_listener => format!(
                "rule '{name}' names this host, but UDP 443 (QUIC) carries no readable name: the gateway drops it so clients use TCP, where the name is checked"
            ),
            Reason::NeedsDns if self.inner.dns_listener => format!(
                "rule '{name}' names this host, but UDP carries no name: the gateway forwards UDP to the addresses its DNS listener answered only for rules that apply to every client (the kernel's sets cannot tell client groups apart), and never on 443 (QUIC is dropped); explain the address instead"
            ),
            Reason::NeedsDns => format!(
                "rule '{name}' names this host, but UDP carries no name and there is no DNS listener ([listen] dns) to learn its addresses: the gateway forwards UDP only to the addresses of address rules (service tags, cidrs) and drops UDP 443; explain the address instead"
            ),
            Reason::MalformedHost => "not a valid host name".to_string(),
            Reason::GuardedAddress => {
                "private, loopback and link-local addresses are refused unless an address rule names them"
                    .to_string()
            }
            Reason::PlatformAddress => {
                "Azure platform address (instance metadata / wire server): add 169.254.169.254 and 168.63.129.16 to NO_PROXY"
                    .to_string()
            }
            Reason::SniMismatch => {
                "the TLS server name names another host than the tunnel was allowed for (domain fronting)"
                    .to_string()
            }
            Reason::HostMismatch => {
                "the HTTP Host header names another host than the one asked for".to_string()
            }
            Reason::DnsAddress => format!(
                "allowed by rule '{name}' for a name the DNS listener answered with this address"
            ),
            Reason::SniUnreadable => {
                "the tunnel did not start with a readable TLS ClientHello or HTTP request (a rule allows other protocols with opaque = true)"
                    .to_string()
            }
        }
    }

    /// A rule by id.
    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.inner.rules[id.index()]
    }

    /// Every rule, in order (profile rules first).
    pub fn rules(&self) -> &[Rule] {
        &self.inner.rules
    }

    /// Scenarios known to this policy.
    pub fn scenarios(&self) -> &[ScenarioState] {
        &self.inner.scenarios
    }

    /// `enforce` or `audit`.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// Transparent upstream mode.
    pub fn upstream(&self) -> UpstreamMode {
        self.inner.upstream
    }

    /// Whether CONNECT tunnels must carry a matching SNI.
    pub fn require_matching_sni(&self) -> bool {
        self.inner.require_matching_sni
    }

    /// Whether a client address may use the gateway.
    pub fn client_allowed(&self, ip: IpAddr) -> Option<&IpNet> {
        let ip = net::canonical(ip);
        self.inner.clients.allow.iter().find(|n| n.contains(&ip))
    }

    /// Client CIDRs served.
    pub fn clients(&self) -> &[IpNet] {
        &self.inner.clients.allow
    }

    /// The client at `ip` as this policy sees it: its groups (one lookup)
    /// and whether its denials are audited.
    #[inline]
    pub fn client(&self, ip: IpAddr) -> Client {
        self.inner.clients.client(ip)
    }

    /// The `client_group` label of a client: its first group in file
    /// order, or `""` for a client in none (bounded by the groups configured).
    pub fn client_group(&self, client: Client) -> &str {
        self.inner.clients.label(client)
    }

    /// Every group a client is in, in file order.
    pub fn client_groups(&self, client: Client) -> Vec<&str> {
        (client.groups())
            .map(|i| self.inner.clients.names[i].as_str())
            .collect()
    }

    /// Names of the client groups `[clients]` defines, in file order.
    pub fn group_names(&self) -> &[String] {
        &self.inner.clients.names
    }

    /// The served clients whose decisions may differ: one per distinct set
    /// of groups a served address is in (clients in no group first). One
    /// class when no groups are configured.
    pub fn client_classes(&self) -> &[ClientClass] {
        &self.inner.clients.classes
    }

    /// Static addresses for a normalised name from `[resolve]`.
    pub fn static_addresses(&self, name: &str) -> Option<&[IpAddr]> {
        self.inner.resolve.get(name).map(Vec::as_slice)
    }

    /// Filled placeholder values.
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.inner.vars
    }

    /// `changeNumber` of the service tags file in use.
    pub fn service_tags_change(&self) -> Option<u64> {
        self.inner.service_tags.as_ref().map(|t| t.change_number)
    }

    /// The service tags file in use: path, change number, cloud, age.
    pub fn service_tags_file(&self) -> Option<&crate::servicetags::TagsFile> {
        self.inner.service_tags.as_ref()
    }

    /// Reload generation.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// SHA-256 of the config file's text, as lowercase hex: which config a
    /// gateway runs (`sha256sum` of the file gives the same).
    pub fn config_sha256(&self) -> &str {
        &self.inner.config_sha256
    }

    /// The first active allow rule for `name` on any port and protocol that
    /// applies to `client`: the DNS listener answers only such names. `None`
    /// for a malformed name.
    pub fn name_allowed(&self, name: &str, client: Client) -> Option<RuleId> {
        let inner = &*self.inner;
        let key = inner.hosts.find_name(name.as_bytes()).value?;
        key.of(&inner.grants)
            .iter()
            .find(|g| g.active && !g.deny && g.clients & client.mask != 0)
            .map(|g| RuleId::new(g.rule))
    }

    /// The DNS listener's decision for `client`'s query of `name`: allowed
    /// when an active allow rule for that client names it on any port and
    /// protocol; denials are `audit_deny` where the client is audited, as
    /// `decide_for` does.
    pub fn decide_query(&self, name: &str, client: Client) -> Decision {
        let mut d = match self.name_allowed(name, client) {
            Some(rule) => Decision::allow(rule.index() as u32),
            None => Decision::deny(None, Reason::NoRule),
        };
        if client.audit && d.verdict == Verdict::Deny {
            d.verdict = Verdict::AuditDeny;
        }
        d
    }

    /// Whether the config runs a DNS listener (`[listen] dns`): connections
    /// that name no host may then be decided as the name a client resolved.
    pub fn dns_listener(&self) -> bool {
        self.inner.dns_listener
    }

    /// `[dns]`: how the DNS listener answers and remembers.
    pub fn dns(&self) -> &DnsConfig {
        &self.inner.dns
    }

    /// `[dns] servers`, parsed; empty: the system's resolvers.
    pub fn dns_servers(&self) -> &[SocketAddr] {
        &self.inner.dns_servers
    }

    /// The UDP ports on which `decide` allows `name` (so on which the
    /// gateway adds the addresses the DNS listener answered for it to the
    /// ruleset's sets): none without a DNS listener; at most
    /// [`MAX_UDP_PORTS`], lowest first.
    pub fn udp_ports(&self, name: &str) -> Vec<u16> {
        let inner = &*self.inner;
        if !inner.dns_listener {
            return Vec::new();
        }
        let Some(key) = inner.hosts.find_name(name.as_bytes()).value else {
            return Vec::new();
        };
        let mut ports: Vec<u16> = Vec::new();
        let udp = key
            .of(&inner.grants)
            .iter()
            .filter(|g| g.active && !g.deny && g.covers_proto(Protocol::Udp));
        for g in udp {
            ports.extend((g.lo..=g.hi).take(MAX_UDP_PORTS));
        }
        ports.sort_unstable();
        ports.dedup();
        ports.retain(|&port| {
            let dest = Dest {
                target: Target::Name(name),
                port,
                proto: Protocol::Udp,
            };
            self.decide(&dest).verdict == Verdict::Allow
        });
        ports.truncate(MAX_UDP_PORTS);
        ports
    }

    /// Active egress rules per scenario (`""` for rules without one).
    pub fn active_rules_by_scenario(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in self.rules().iter().filter(|r| r.state == RuleState::Active) {
            *out.entry(r.scenario.clone().unwrap_or_default())
                .or_default() += 1;
        }
        out
    }
}

#[cfg(test)]
mod group_tests;
#[cfg(test)]
mod reference_tests;
#[cfg(test)]
mod tests;
