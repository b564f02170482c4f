//! Policy: the compiled, immutable allowlist, and `decide`.
//!
//! In: a parsed [`Config`] (plus the embedded profile, `--var` overrides and
//! an optional service tags file). Out: a [`Policy`] that answers
//! [`Policy::decide`] for a destination with a small `Copy` [`Decision`].
//!
//! `compile` is the only place that builds matchers and tables; it collects
//! every error (with file:line:col) instead of stopping at the first. After it,
//! the policy never changes and never does I/O; reload swaps it whole.
//!
//! Decision order, for a destination `(host or ip, port, protocol)`:
//! 1. malformed names are denied (`malformed_host`); the Azure platform
//!    addresses are denied (`platform_address`);
//! 2. a matching deny rule wins over every allow (`deny_rule`);
//! 3. names: the most specific matching allow rule (exact, then the longest
//!    `*.suffix`, then rule order); addresses: the longest matching CIDR, and a
//!    guarded address needs an allow rule whose CIDR lies inside guarded space;
//! 4. otherwise deny, saying why: the host is allowed on other ports
//!    (`port_not_allowed`), only in a disabled scenario (`scenario_disabled`),
//!    or not at all (`no_rule`).

pub mod host;
pub mod net;
mod profile;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use ipnet::IpNet;
use toml::Spanned;

use crate::config::{
    Action, Config, Direction, LineIndex, Location, Mode, PortSpec, Protocol, RuleConfig, Source,
    UpstreamMode,
};
use crate::servicetags::ServiceTags;
use host::{HostKey, HostTable};
use net::{Guard, NetTable};
pub use profile::{Profile, Scenario};

/// Index of a rule in [`Policy::rules`], kept plus one so that an
/// `Option<RuleId>` is 4 bytes and a [`Decision`] fits in a register.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(NonZeroU32);

impl fmt::Debug for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RuleId").field(&self.index()).finish()
    }
}

impl RuleId {
    /// The id of the rule at `index`.
    pub fn new(index: u32) -> RuleId {
        RuleId(NonZeroU32::new(index.wrapping_add(1)).expect("fewer than 2^32 - 1 rules"))
    }

    /// Its index in [`Policy::rules`].
    pub fn index(self) -> usize {
        self.0.get() as usize - 1
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
    /// Would be denied, but `mode = "audit"` lets it through.
    AuditDeny,
}

impl Verdict {
    /// Label form (`allow`, `deny`, `audit_deny`).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::AuditDeny => "audit_deny",
        }
    }

    /// Whether traffic passes (allow or audit_deny).
    pub fn passes(self) -> bool {
        !matches!(self, Verdict::Deny)
    }
}

/// Why a decision came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An allow rule matched.
    RuleMatched,
    /// A deny rule matched.
    DenyRule,
    /// Nothing allows this host or address.
    NoRule,
    /// A rule allows the host, on other ports.
    PortNotAllowed,
    /// A rule allows the host and port, for another protocol.
    ProtocolNotAllowed,
    /// Only a rule of a disabled scenario (or with unset placeholders) would allow it.
    ScenarioDisabled,
    /// Not a valid host name.
    MalformedHost,
    /// A private, loopback, link-local or other guarded address.
    GuardedAddress,
    /// 169.254.169.254 or 168.63.129.16.
    PlatformAddress,
}

impl Reason {
    /// Every reason, in declaration order (the order `Packed` encodes).
    pub const ALL: [Reason; 9] = [
        Reason::RuleMatched,
        Reason::DenyRule,
        Reason::NoRule,
        Reason::PortNotAllowed,
        Reason::ProtocolNotAllowed,
        Reason::ScenarioDisabled,
        Reason::MalformedHost,
        Reason::GuardedAddress,
        Reason::PlatformAddress,
    ];

    /// Label form, used in metrics, logs and `Proxy-Status` details.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RuleMatched => "rule_matched",
            Reason::DenyRule => "deny_rule",
            Reason::NoRule => "no_rule",
            Reason::PortNotAllowed => "port_not_allowed",
            Reason::ProtocolNotAllowed => "protocol_not_allowed",
            Reason::ScenarioDisabled => "scenario_disabled",
            Reason::MalformedHost => "malformed_host",
            Reason::GuardedAddress => "guarded_address",
            Reason::PlatformAddress => "platform_address",
        }
    }
}

/// A policy decision: what, by which rule, and why. Logs, metrics, the
/// proxy's 403 body and `portcullis explain` all print this same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Allow, deny or audit_deny.
    pub verdict: Verdict,
    /// The rule that decided (or the nearest one, for port and scenario denials).
    pub rule: Option<RuleId>,
    /// Why.
    pub reason: Reason,
}

// One register. At 12 bytes (a plain u32 rule id) a decision was built on
// the stack and read back whole by callers that keep it: a stalled
// store-to-load forward.
const _: () = assert!(size_of::<Decision>() == 8);
// `Packed` keeps a reason in 4 bits, and 15 with every rule bit set is
// `Packed::EVALUATE`; `Reason::ALL` lists every variant in order.
const _: () = {
    assert!(Reason::ALL.len() < 15);
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as usize == i);
        i += 1;
    }
};

impl Decision {
    fn deny(rule: Option<u32>, reason: Reason) -> Decision {
        Decision {
            verdict: Verdict::Deny,
            rule: rule.map(RuleId::new),
            reason,
        }
    }
}

/// What a connection wants to reach: a name or an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// A host name as sent (ASCII; IDNs arrive as A-labels).
    Name(&'a str),
    /// An address literal.
    Ip(IpAddr),
}

impl<'a> Target<'a> {
    /// An IP literal (`1.2.3.4`, `[2001:db8::1]`, `2001:db8::1`) or a name.
    #[inline]
    pub fn parse(host: &'a str) -> Target<'a> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        // Only digits-and-dots or a colon can be an address: names skip the parse.
        let maybe_ip = bare.contains(':') || bare.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        match maybe_ip.then(|| bare.parse::<IpAddr>().ok()).flatten() {
            Some(ip) => Target::Ip(ip),
            None => Target::Name(host),
        }
    }
}

/// A destination to decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dest<'a> {
    /// Name or address.
    pub target: Target<'a>,
    /// Destination port.
    pub port: u16,
    /// `Tcp` or `Udp`.
    pub proto: Protocol,
}

impl fmt::Display for Dest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target {
            Target::Name(n) => write!(f, "{n}:{}", self.port),
            Target::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Target::Ip(ip) => write!(f, "{ip}:{}", self.port),
        }?;
        if self.proto == Protocol::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}

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
    /// Where the rule was written.
    pub origin: Location,
    /// Whether it takes part in decisions.
    pub state: RuleState,
    /// Whether it comes from the built-in profile.
    pub from_profile: bool,
}

#[derive(Debug, Clone, Copy)]
struct Grant {
    rule: u32,
    lo: u16,
    hi: u16,
    proto: Protocol,
    deny: bool,
    active: bool,
    unlocks_guarded: bool,
    /// In a key's folded list: the first grant of a more specific key than
    /// the grants before it (host keys only).
    more_specific: bool,
}

impl Grant {
    #[inline(always)]
    fn covers_port(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    #[inline(always)]
    fn covers_proto(&self, proto: Protocol) -> bool {
        self.proto == Protocol::Any || self.proto == proto
    }
}

/// A name decision in 4 bytes (names are allowed exactly when the reason is
/// `RuleMatched`, before audit mode): the reason in the low 4 bits, the
/// rule's [`RuleId`] (its index plus one) above them (0: no rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed(u32);

impl Packed {
    /// Marks a key whose grants are evaluated per decision.
    const EVALUATE: Packed = Packed(u32::MAX);

    /// `None` for a rule id too large to pack (past 268 million rules).
    fn pack(d: Decision) -> Option<Packed> {
        let rule = match d.rule {
            Some(RuleId(r)) if r.get() < 1 << 28 => r.get(),
            Some(_) => return None,
            None => 0,
        };
        Some(Packed(rule << 4 | d.reason as u32))
    }

    #[inline(always)]
    fn unpack(self) -> Decision {
        // `pack` stores `reason as u32`: the index in `Reason::ALL`.
        let reason = Reason::ALL
            .get((self.0 & 15) as usize)
            .copied()
            .unwrap_or(Reason::NoRule);
        Decision {
            verdict: if reason == Reason::RuleMatched {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            rule: NonZeroU32::new(self.0 >> 4).map(RuleId),
            reason,
        }
    }
}

/// What the host table keeps beside a key. The grants a name whose most
/// specific key this is meets are folded at compile time (those of the
/// wildcard keys that are suffixes of this one, least specific first, then
/// its own, each key's in rule order): `Inner::key_lists[list]`. For TCP
/// their answer is a function of the port that is constant between the
/// grants' port bounds. When those runs of ports alternate between two
/// answers and there are at most 7 of them (nearly every key: one port, a
/// range, `80, 443`, `443, 8787, 18881`), the runs' last ports and both
/// answers are kept here, so a decision is six comparisons in the cache
/// line that matched the name, without a branch on the port. Otherwise both
/// answers are [`Packed::EVALUATE`] and the grants are evaluated.
#[derive(Debug, Clone, Copy)]
struct KeyAnswer {
    /// The last port of each run but the final one, ascending; `u16::MAX`
    /// past the runs. A port's run is how many of these are below it.
    ends: [u16; KeyAnswer::ENDS],
    /// The answer of the odd runs.
    inside: Packed,
    /// The answer of the even runs (run 0 starts at port 0).
    outside: Packed,
    list: u32,
}

// The slot's key part takes 40 of its 64 bytes: a larger answer would
// double every slot.
const _: () = assert!(size_of::<KeyAnswer>() <= 24);

impl KeyAnswer {
    const ENDS: usize = 6;

    #[inline(always)]
    fn tcp(&self, port: u16) -> Packed {
        // Counted without branches: the port's run is not predictable.
        let run = self.ends.iter().fold(0, |n, &e| n + u32::from(port > e));
        if run & 1 == 1 {
            self.inside
        } else {
            self.outside
        }
    }
}

/// Running state of one decision over the grants it meets.
#[derive(Default)]
struct Matcher {
    deny: Option<u32>,
    allow: Option<u32>,
    allow_unlocking: Option<u32>,
    near: Option<(u32, Reason)>,
    disabled: Option<u32>,
}

impl Matcher {
    /// `replace_allow`: later grants are more specific (host walk) or less (CIDR walk).
    #[inline(always)]
    fn observe(&mut self, g: &Grant, port: u16, proto: Protocol, replace_allow: bool) {
        let port_ok = g.covers_port(port);
        let proto_ok = g.covers_proto(proto);
        if !g.active {
            if port_ok && proto_ok && !g.deny {
                self.disabled.get_or_insert(g.rule);
            }
            return;
        }
        if port_ok && proto_ok {
            if g.deny {
                self.deny.get_or_insert(g.rule);
            } else {
                if replace_allow || self.allow.is_none() {
                    self.allow = Some(g.rule);
                }
                if g.unlocks_guarded && self.allow_unlocking.is_none() {
                    self.allow_unlocking = Some(g.rule);
                }
            }
        } else if !g.deny {
            let reason = if port_ok {
                Reason::ProtocolNotAllowed
            } else {
                Reason::PortNotAllowed
            };
            self.near.get_or_insert((g.rule, reason));
        }
    }

    /// The decision on a name once its key's grants are observed; `allow_before`:
    /// the allow of a less specific key, if a more specific one had none.
    #[inline(always)]
    fn name_decision(&self, allow_before: Option<u32>) -> Decision {
        if let Some(rule) = self.deny {
            return Decision::deny(Some(rule), Reason::DenyRule);
        }
        match self.allow.or(allow_before) {
            Some(rule) => Decision {
                verdict: Verdict::Allow,
                rule: Some(RuleId::new(rule)),
                reason: Reason::RuleMatched,
            },
            None => self.refusal(),
        }
    }

    fn refusal(&self) -> Decision {
        if let Some((rule, reason)) = self.near {
            Decision::deny(Some(rule), reason)
        } else if let Some(rule) = self.disabled {
            Decision::deny(Some(rule), Reason::ScenarioDisabled)
        } else {
            Decision::deny(None, Reason::NoRule)
        }
    }
}

/// Whether a compiled item came out of the config or a lint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The config cannot be used.
    Error,
    /// Usable, but probably not what was meant.
    Warning,
}

/// One compile error or warning, with where it was written.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Where, when known.
    pub location: Option<Location>,
    /// Config path, e.g. `rules[3].hosts[1]`.
    pub path: String,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.path.is_empty() {
            write!(f, "{sev}: {}", self.message)
        } else {
            write!(f, "{sev}: {}: {}", self.path, self.message)
        }
    }
}

/// A scenario as compiled: known from the profile or from config rules, and whether it is on.
#[derive(Debug, Clone)]
pub struct ScenarioState {
    /// Name.
    pub name: String,
    /// What it covers.
    pub description: String,
    /// Enabled in this policy.
    pub enabled: bool,
}

/// Everything `compile` needs besides the config itself.
#[derive(Default)]
pub struct CompileInput<'a> {
    /// `--var key=value` overrides, applied over `[vars]`.
    pub var_overrides: &'a [(String, String)],
    /// The loaded service tags file, if `[policy] service_tags` names one.
    pub service_tags: Option<&'a ServiceTags>,
    /// Placeholders without a value disable their rule with a warning instead
    /// of failing (used for the embedded default, when there is no config file).
    pub lenient_placeholders: bool,
    /// Reload generation to stamp the policy with.
    pub generation: u64,
}

/// The compiled policy: cheap to clone, never changes.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Inner>,
}

struct Inner {
    rules: Vec<Rule>,
    grants: Vec<Grant>,
    hosts: HostTable<KeyAnswer>,
    key_lists: Vec<(u32, u32)>,
    nets: NetTable,
    mode: Mode,
    upstream: UpstreamMode,
    require_matching_sni: bool,
    clients: Vec<IpNet>,
    resolve: HashMap<String, Vec<IpAddr>>,
    scenarios: Vec<ScenarioState>,
    vars: BTreeMap<String, String>,
    service_tags_change: Option<u64>,
    generation: u64,
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
    #[inline(always)]
    pub fn decide(&self, dest: &Dest<'_>) -> Decision {
        let mut decision = match dest.target {
            Target::Name(name) => self.decide_name(name.as_bytes(), dest.port, dest.proto),
            Target::Ip(ip) => self.decide_ip(ip, dest.port, dest.proto),
        };
        if self.inner.mode == Mode::Audit && decision.verdict == Verdict::Deny {
            decision.verdict = Verdict::AuditDeny;
        }
        decision
    }

    #[inline]
    fn decide_name(&self, name: &[u8], port: u16, proto: Protocol) -> Decision {
        let inner = &*self.inner;
        let found = inner.hosts.find_name(name);
        let Some(key) = found.value else {
            let reason = if found.malformed {
                Reason::MalformedHost
            } else {
                Reason::NoRule
            };
            return Decision::deny(None, reason);
        };
        let answer = key.tcp(port);
        if proto == Protocol::Tcp && answer != Packed::EVALUATE {
            return answer.unpack();
        }
        let (start, end) = inner.key_lists[key.list as usize];
        evaluate(&inner.grants[start as usize..end as usize], port, proto)
    }

    fn ip_matcher(&self, ip: IpAddr, port: u16, proto: Protocol) -> Matcher {
        let inner = &*self.inner;
        let mut m = Matcher::default();
        inner.nets.visit(ip, |g| {
            m.observe(&inner.grants[g as usize], port, proto, false)
        });
        m
    }

    fn decide_ip(&self, ip: IpAddr, port: u16, proto: Protocol) -> Decision {
        let guard = net::guard(ip);
        if guard == Some(Guard::Platform) {
            return Decision::deny(None, Reason::PlatformAddress);
        }
        let m = self.ip_matcher(ip, port, proto);
        if let Some(rule) = m.deny {
            return Decision::deny(Some(rule), Reason::DenyRule);
        }
        let allow = if guard.is_some() {
            m.allow_unlocking
        } else {
            m.allow
        };
        match (allow, guard) {
            (Some(rule), _) => Decision {
                verdict: Verdict::Allow,
                rule: Some(RuleId::new(rule)),
                reason: Reason::RuleMatched,
            },
            (None, Some(_)) => Decision::deny(m.allow, Reason::GuardedAddress),
            (None, None) => m.refusal(),
        }
    }

    /// Whether a resolved address of an allowed name may be dialled: not a
    /// platform address, not denied by an address rule, and not guarded
    /// unless an address rule names that guarded range explicitly.
    ///
    /// # Errors
    /// The reason the address is refused.
    pub fn check_resolved(&self, ip: IpAddr, port: u16, proto: Protocol) -> Result<(), Reason> {
        let guard = net::guard(ip);
        if guard == Some(Guard::Platform) {
            return Err(Reason::PlatformAddress);
        }
        let m = self.ip_matcher(ip, port, proto);
        if m.deny.is_some() {
            return Err(Reason::DenyRule);
        }
        if guard.is_some() && m.allow_unlocking.is_none() {
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
            Reason::NoRule => "no rule allows this destination".to_string(),
            Reason::PortNotAllowed => {
                let ports = rule.map(|r| ports_text(&r.ports)).unwrap_or_default();
                format!("rule '{name}' allows this host only on port {ports}")
            }
            Reason::ProtocolNotAllowed => {
                let proto = rule.map(|r| r.protocol.as_str()).unwrap_or("tcp");
                format!("rule '{name}' allows this host only over {proto}")
            }
            Reason::ScenarioDisabled => match rule.map(|r| (&r.state, &r.scenario)) {
                Some((RuleState::MissingVars(vars), _)) => format!(
                    "no rule allows this host (rule '{name}' needs --var {})",
                    vars.iter().map(|v| format!("{v}=...")).collect::<Vec<_>>().join(" --var ")
                ),
                Some((_, Some(scenario))) => {
                    format!("no rule allows this host (scenario {scenario} is disabled)")
                }
                _ => format!("no rule allows this host (rule '{name}' is inactive)"),
            },
            Reason::MalformedHost => "not a valid host name".to_string(),
            Reason::GuardedAddress => {
                "private, loopback and link-local addresses are refused unless an address rule names them"
                    .to_string()
            }
            Reason::PlatformAddress => {
                "Azure platform address (instance metadata / wire server): add 169.254.169.254 and 168.63.129.16 to NO_PROXY"
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
        self.inner.clients.iter().find(|n| n.contains(&ip))
    }

    /// Client CIDRs served.
    pub fn clients(&self) -> &[IpNet] {
        &self.inner.clients
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
        self.inner.service_tags_change
    }

    /// Reload generation.
    pub fn generation(&self) -> u64 {
        self.inner.generation
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

fn ports_text(ports: &[(u16, u16)]) -> String {
    port_ranges(ports).join(", ")
}

/// Replaces `<name>` placeholders. Returns the missing names on failure.
fn fill(text: &str, vars: &BTreeMap<String, String>) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        out.push_str(&rest[..open]);
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => missing.push(name.to_string()),
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

/// Port errors: index into `ports` and message.
type PortErrors = Vec<(usize, String)>;

fn parse_ports(specs: &[Spanned<PortSpec>]) -> Result<Vec<(u16, u16)>, PortErrors> {
    if specs.is_empty() {
        return Ok(vec![(443, 443)]);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let port = |n: i64| u16::try_from(n).ok().filter(|&p| p != 0);
    for (i, spec) in specs.iter().enumerate() {
        let parsed = match spec.get_ref() {
            PortSpec::Number(n) => port(*n)
                .map(|p| (p, p))
                .ok_or_else(|| format!("{n} is not a port (1-65535)")),
            PortSpec::Range(text) => {
                let range = text.split_once('-').and_then(|(lo, hi)| {
                    let lo = port(lo.trim().parse().ok()?)?;
                    let hi = port(hi.trim().parse().ok()?)?;
                    (lo <= hi).then_some((lo, hi))
                });
                match (range, text.trim().parse::<i64>().ok().and_then(port)) {
                    (Some(r), _) => Ok(r),
                    (None, Some(p)) => Ok((p, p)),
                    (None, None) => Err(format!(
                        "'{text}' is not a port or range: write 443 or \"8704-8710\" (1-65535, low-high)"
                    )),
                }
            }
        };
        match parsed {
            Ok(r) => out.push(r),
            Err(e) => errors.push((i, e)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Collects diagnostics during compile.
struct Diags<'s> {
    list: Vec<Diagnostic>,
    sources: [&'s Source; 2],
    lines: [LineIndex; 2],
}

impl Diags<'_> {
    fn push(
        &mut self,
        severity: Severity,
        src: usize,
        span: Option<&std::ops::Range<usize>>,
        path: String,
        message: String,
    ) {
        let location = span
            .filter(|s| !(s.start == 0 && s.end == 0))
            .map(|s| self.locate(src, s));
        self.list.push(Diagnostic {
            severity,
            location,
            path,
            message,
        });
    }

    fn error(
        &mut self,
        src: usize,
        span: Option<&std::ops::Range<usize>>,
        path: String,
        message: String,
    ) {
        self.push(Severity::Error, src, span, path, message);
    }

    fn warn(
        &mut self,
        src: usize,
        span: Option<&std::ops::Range<usize>>,
        path: String,
        message: String,
    ) {
        self.push(Severity::Warning, src, span, path, message);
    }

    fn locate(&self, src: usize, span: &std::ops::Range<usize>) -> Location {
        self.lines[src].locate(&self.sources[src].name, span)
    }

    fn has_errors(&self) -> bool {
        self.list.iter().any(|d| d.severity == Severity::Error)
    }
}

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

impl Policy {
    /// Compiles a config (and its profile) into a policy.
    ///
    /// # Errors
    /// Every error found, each with its location and config path; warnings
    /// found along the way are included.
    pub fn compile(
        config: &Config,
        source: &Source,
        input: &CompileInput<'_>,
    ) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
        let profile = profile::by_name(config.policy.profile.get_ref());
        let empty = Source {
            name: String::new(),
            text: String::new(),
        };
        let profile_source = profile.map_or(&empty, |p| &p.source);
        let mut d = Diags {
            list: Vec::new(),
            sources: [source, profile_source],
            lines: [
                LineIndex::new(&source.text),
                LineIndex::new(&profile_source.text),
            ],
        };
        const CFG: usize = 0;
        const PROFILE: usize = 1;

        let profile_name = config.policy.profile.get_ref();
        if profile.is_none() && profile_name != "none" {
            d.error(
                CFG,
                Some(&config.policy.profile.span()),
                "policy.profile".into(),
                format!("unknown profile '{profile_name}' (known: azureml, none)"),
            );
        }

        // Vars: [vars], then --var.
        let mut vars: BTreeMap<String, String> = config
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.get_ref().clone()))
            .collect();
        for (k, v) in input.var_overrides {
            vars.insert(k.clone(), v.clone());
        }
        for (k, v) in &vars {
            let ok = !v.is_empty()
                && v.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':')
                });
            if !ok {
                let span = config.vars.get(k).map(|s| s.span());
                d.error(
                    CFG,
                    span.as_ref(),
                    format!("vars.{k}"),
                    format!("'{v}' is not a usable value: letters, digits, '-', '_', '.', '/' and ':' only"),
                );
            }
        }

        // Scenarios.
        let mut scenarios: Vec<ScenarioState> = profile
            .map(|p| {
                p.scenarios
                    .iter()
                    .map(|s| ScenarioState {
                        name: s.name.clone(),
                        description: s.description.clone(),
                        enabled: s.default,
                    })
                    .collect()
            })
            .unwrap_or_default();
        for rule in &config.rules {
            if let Some(s) = &rule.scenario
                && !scenarios.iter().any(|k| &k.name == s)
            {
                scenarios.push(ScenarioState {
                    name: s.clone(),
                    description: String::new(),
                    enabled: false,
                });
            }
        }
        if let Some(wanted) = &config.policy.scenarios {
            for s in scenarios.iter_mut() {
                s.enabled = false;
            }
            for (i, w) in wanted.iter().enumerate() {
                match scenarios.iter_mut().find(|s| &s.name == w.get_ref()) {
                    Some(s) => s.enabled = true,
                    None => {
                        let known: Vec<_> = scenarios.iter().map(|s| s.name.as_str()).collect();
                        d.error(
                            CFG,
                            Some(&w.span()),
                            format!("policy.scenarios[{i}]"),
                            format!(
                                "unknown scenario '{}' (known: {})",
                                w.get_ref(),
                                known.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        let enabled = |s: &Option<String>| {
            s.as_ref()
                .is_none_or(|name| scenarios.iter().any(|k| &k.name == name && k.enabled))
        };

        // Rules: the profile's, then the config's.
        let mut rules: Vec<Rule> = Vec::new();
        let mut keyed: Vec<(HostKey, Grant)> = Vec::new();
        let mut netted: Vec<(IpNet, Grant)> = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let all = profile
            .map(|p| p.rules.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|r| (PROFILE, r))
            .chain(config.rules.iter().map(|r| (CFG, r)));
        let mut config_index = 0usize;
        let mut profile_index = 0usize;
        for (src, rc) in all {
            let idx = if src == CFG {
                config_index += 1;
                config_index - 1
            } else {
                profile_index += 1;
                profile_index - 1
            };
            let path = if src == CFG {
                format!("rules[{idx}]")
            } else {
                format!("profile.rules[{idx}]")
            };
            let rule_id = rules.len() as u32;
            let compiled =
                compile_rule(rc, src, &path, &vars, input, enabled(&rc.scenario), &mut d);
            let Some((rule, keys, nets)) = compiled else {
                continue;
            };
            if let Some(prev) = names.insert(rule.name.clone(), rules.len()) {
                d.error(
                    src,
                    Some(&rc.name.span()),
                    format!("{path}.name"),
                    format!(
                        "rule name '{}' is already used by another rule ({})",
                        rule.name, rules[prev].origin
                    ),
                );
            }
            let active = rule.state == RuleState::Active;
            for &(lo, hi) in &rule.ports {
                let grant = Grant {
                    rule: rule_id,
                    lo,
                    hi,
                    proto: rule.protocol,
                    deny: rule.action == Action::Deny,
                    active,
                    unlocks_guarded: false,
                    more_specific: false,
                };
                for key in &keys {
                    keyed.push((key.clone(), grant));
                }
                for net in &nets {
                    netted.push((
                        *net,
                        Grant {
                            unlocks_guarded: net::unlocks_guarded(net),
                            more_specific: false,
                            ..grant
                        },
                    ));
                }
            }
            rules.push(rule);
        }

        // Clients.
        let mut clients = Vec::new();
        for (i, c) in config.clients.allow.iter().enumerate() {
            match net::parse_cidr(c.get_ref()) {
                Ok(n) => clients.push(n),
                Err(e) => d.error(CFG, Some(&c.span()), format!("clients.allow[{i}]"), e),
            }
        }

        // Static resolution.
        let mut resolve = HashMap::new();
        for (name, addrs) in &config.resolve {
            let norm = match host::normalize(name) {
                Ok(n) => n,
                Err(e) => {
                    d.error(
                        CFG,
                        None,
                        format!("resolve.\"{name}\""),
                        format!("'{name}' is not a valid host: {e}"),
                    );
                    continue;
                }
            };
            let mut ips = Vec::new();
            for (i, a) in addrs.iter().enumerate() {
                match a.get_ref().parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => d.error(
                        CFG,
                        Some(&a.span()),
                        format!("resolve.\"{name}\"[{i}]"),
                        format!("'{}' is not an IP address", a.get_ref()),
                    ),
                }
            }
            resolve.insert(norm, ips);
        }

        if d.has_errors() {
            return Err(d.list);
        }

        lint(&rules, &keyed, &mut d);

        // Tables. Host keys are grouped so each key's grants are contiguous, in rule order.
        let mut by_key: Vec<(HostKey, Vec<Grant>)> = Vec::new();
        let mut key_index: HashMap<HostKey, usize> = HashMap::new();
        for (key, grant) in keyed {
            let i = *key_index.entry(key.clone()).or_insert_with(|| {
                by_key.push((key, Vec::new()));
                by_key.len() - 1
            });
            by_key[i].1.push(grant);
        }
        let mut grants = Vec::new();
        let mut key_lists = Vec::new();
        let mut table_keys = Vec::new();
        for (key, _) in &by_key {
            let mut folded = Vec::new();
            for ancestor in wildcard_ancestors(key) {
                if let Some(&i) = key_index.get(&ancestor) {
                    push_group(&mut folded, &by_key[i].1);
                }
            }
            push_group(&mut folded, &by_key[key_index[key]].1);
            let list = key_lists.len() as u32;
            let start = grants.len() as u32;
            grants.extend(&folded);
            key_lists.push((start, grants.len() as u32));
            table_keys.push((key.clone(), key_answer(&folded, list)));
        }
        let mut net_entries = Vec::new();
        for (net, grant) in netted {
            net_entries.push((net, grants.len() as u32));
            grants.push(grant);
        }

        let policy = Policy {
            inner: Arc::new(Inner {
                rules,
                grants,
                hosts: HostTable::build(&table_keys),
                key_lists,
                nets: NetTable::build(&net_entries),
                mode: config.policy.mode,
                upstream: config.policy.upstream,
                require_matching_sni: config.policy.require_matching_sni,
                clients,
                resolve,
                scenarios,
                vars,
                service_tags_change: input.service_tags.map(|t| t.change_number),
                generation: input.generation,
            }),
        };
        Ok((policy, d.list))
    }
}

type CompiledRule = (Rule, Vec<HostKey>, Vec<IpNet>);

fn compile_rule(
    rc: &RuleConfig,
    src: usize,
    path: &str,
    vars: &BTreeMap<String, String>,
    input: &CompileInput<'_>,
    scenario_on: bool,
    d: &mut Diags<'_>,
) -> Option<CompiledRule> {
    let errors_before = d.list.len();
    let name = rc.name.get_ref().trim().to_string();
    if name.is_empty() {
        d.error(
            src,
            Some(&rc.name.span()),
            format!("{path}.name"),
            "a rule needs a name".into(),
        );
    }
    let has_addr = !rc.cidrs.is_empty() || !rc.service_tags.is_empty();
    if rc.hosts.is_empty() && !has_addr {
        d.error(
            src,
            Some(&rc.name.span()),
            path.to_string(),
            format!("rule '{name}' names no hosts, cidrs or service_tags"),
        );
    }
    if !rc.hosts.is_empty() && has_addr {
        d.error(
            src,
            Some(&rc.name.span()),
            path.to_string(),
            format!("rule '{name}' mixes hosts with cidrs/service_tags: write one rule for names and one for addresses"),
        );
    }
    let ports = match parse_ports(&rc.ports) {
        Ok(p) => p,
        Err(errors) => {
            for (i, e) in errors {
                d.error(
                    src,
                    Some(&rc.ports[i].span()),
                    format!("{path}.ports[{i}]"),
                    e,
                );
            }
            Vec::new()
        }
    };

    let mut missing: Vec<String> = Vec::new();
    let mut hosts = Vec::new();
    let mut keys = Vec::new();
    for (i, h) in rc.hosts.iter().enumerate() {
        match fill(h.get_ref(), vars) {
            Ok(text) => match HostKey::parse(text.trim()) {
                Ok(key) => {
                    hosts.push(key.to_string());
                    keys.push(key);
                }
                Err(e) => d.error(src, Some(&h.span()), format!("{path}.hosts[{i}]"), e),
            },
            Err(m) => {
                hosts.push(h.get_ref().clone());
                missing.extend(m);
            }
        }
    }
    let mut cidrs = Vec::new();
    for (i, c) in rc.cidrs.iter().enumerate() {
        match fill(c.get_ref(), vars) {
            Ok(text) => match net::parse_cidr(&text) {
                Ok(n) => cidrs.push(n),
                Err(e) => d.error(src, Some(&c.span()), format!("{path}.cidrs[{i}]"), e),
            },
            Err(m) => missing.extend(m),
        }
    }
    let mut tags = Vec::new();
    let mut waiting = false;
    for (i, t) in rc.service_tags.iter().enumerate() {
        match fill(t.get_ref(), vars) {
            Ok(tag) => {
                match input.service_tags {
                    Some(st) => match st.get(&tag) {
                        Some(nets) => cidrs.extend_from_slice(nets),
                        None if scenario_on && rc.direction == Direction::Egress => {
                            let similar = st.similar(&tag);
                            let hint = if similar.is_empty() {
                                String::new()
                            } else {
                                format!(" (similar: {})", similar.join(", "))
                            };
                            d.error(
                                src,
                                Some(&t.span()),
                                format!("{path}.service_tags[{i}]"),
                                format!(
                                    "service tag '{tag}' is not in the service tags file{hint}"
                                ),
                            );
                        }
                        None => {}
                    },
                    None => waiting = true,
                }
                tags.push(tag);
            }
            Err(m) => {
                tags.push(t.get_ref().clone());
                missing.extend(m);
            }
        }
    }
    missing.sort();
    missing.dedup();

    let state = if rc.direction != Direction::Egress {
        RuleState::NotEgress
    } else if !scenario_on {
        RuleState::ScenarioDisabled
    } else if !missing.is_empty() {
        let span = rc.name.span();
        let list = missing
            .iter()
            .map(|m| format!("<{m}>"))
            .collect::<Vec<_>>()
            .join(", ");
        if input.lenient_placeholders {
            d.warn(
                src,
                Some(&span),
                path.to_string(),
                format!(
                    "rule '{name}' is disabled: placeholder {list} has no value (set it in [vars] or with --var {}=...)",
                    missing[0]
                ),
            );
        } else {
            d.error(
                src,
                Some(&span),
                path.to_string(),
                format!(
                    "rule '{name}' uses placeholder {list} with no value: set it in [vars] or with --var {}=..., or disable scenario '{}'",
                    missing[0],
                    rc.scenario.as_deref().unwrap_or("-")
                ),
            );
        }
        RuleState::MissingVars(missing)
    } else if waiting {
        RuleState::WaitingForServiceTags
    } else {
        RuleState::Active
    };
    if d.list.len() > errors_before
        && d.list[errors_before..]
            .iter()
            .any(|x| x.severity == Severity::Error)
    {
        return None;
    }
    // Rules that cannot match anything yet still compile their host keys, so
    // that a denial can say which scenario or placeholder would allow it.
    let keys = if matches!(state, RuleState::MissingVars(_) | RuleState::NotEgress) {
        Vec::new()
    } else {
        keys
    };
    let nets = if state == RuleState::NotEgress {
        Vec::new()
    } else {
        cidrs.clone()
    };
    let origin = d.locate(src, &rc.name.span());
    Some((
        Rule {
            name,
            description: rc.description.clone().unwrap_or_default(),
            scenario: rc.scenario.clone(),
            action: rc.action,
            protocol: rc.protocol,
            direction: rc.direction,
            ports,
            hosts,
            cidrs,
            service_tags: tags,
            origin,
            state,
            from_profile: src == 1,
        },
        keys,
        nets,
    ))
}

/// The decision on a name from its key's folded grants. A more specific
/// key's allow replaces a less specific one's; within one key the first rule
/// in order keeps it; the first deny met wins.
fn evaluate(grants: &[Grant], port: u16, proto: Protocol) -> Decision {
    let mut m = Matcher::default();
    let mut allow_before = None;
    for g in grants {
        if m.deny.is_some() {
            break;
        }
        if g.more_specific {
            allow_before = m.allow.or(allow_before);
            m.allow = None;
        }
        m.observe(g, port, proto, false);
    }
    m.name_decision(allow_before)
}

/// A key's [`KeyAnswer`]: the TCP answer on every run of ports between the
/// grants' bounds, kept when it has the shape [`KeyAnswer`] holds.
fn key_answer(grants: &[Grant], list: u32) -> KeyAnswer {
    // Evaluating every run costs runs x grants; a key with this many folded
    // grants (many port entries on a broad wildcard) is evaluated per decision.
    const MAX_PRECOMPUTED: usize = 32;
    let evaluated = KeyAnswer {
        ends: [u16::MAX; KeyAnswer::ENDS],
        inside: Packed::EVALUATE,
        outside: Packed::EVALUATE,
        list,
    };
    if grants.len() > MAX_PRECOMPUTED {
        return evaluated;
    }
    let mut starts: Vec<u32> = vec![0];
    for g in grants {
        starts.extend([u32::from(g.lo), u32::from(g.hi) + 1]);
    }
    starts.retain(|&p| p <= u32::from(u16::MAX));
    starts.sort_unstable();
    starts.dedup();
    // (first port, answer) of each run, equal neighbours merged.
    let mut runs: Vec<(u16, Packed)> = Vec::new();
    for p in starts {
        let p = p as u16;
        let Some(answer) = Packed::pack(evaluate(grants, p, Protocol::Tcp)) else {
            return evaluated;
        };
        if runs.last().is_none_or(|&(_, a)| a != answer) {
            runs.push((p, answer));
        }
    }
    let outside = runs[0].1;
    let inside = runs.get(1).map_or(outside, |r| r.1);
    let alternating = runs
        .iter()
        .enumerate()
        .all(|(i, r)| r.1 == if i % 2 == 1 { inside } else { outside });
    if runs.len() > KeyAnswer::ENDS + 1 || !alternating {
        return evaluated;
    }
    let mut ends = [u16::MAX; KeyAnswer::ENDS];
    for (end, next) in ends.iter_mut().zip(&runs[1..]) {
        *end = next.0 - 1;
    }
    KeyAnswer {
        ends,
        inside,
        outside,
        list,
    }
}

/// The wildcard keys that match every name `key` matches, least specific
/// first: `*.com`, `*.b.com` for `a.b.com` and for `*.a.b.com`.
fn wildcard_ancestors(key: &HostKey) -> Vec<HostKey> {
    let (HostKey::Exact(name) | HostKey::Wildcard(name)) = key;
    let mut out: Vec<HostKey> = name
        .match_indices('.')
        .map(|(i, _)| HostKey::Wildcard(name[i + 1..].to_string()))
        .collect();
    out.reverse();
    out
}

/// Appends one key's grants, marking where the more specific key starts.
fn push_group(folded: &mut Vec<Grant>, group: &[Grant]) {
    for (i, g) in group.iter().enumerate() {
        folded.push(Grant {
            more_specific: i == 0,
            ..*g
        });
    }
}

/// Warnings: exfiltration wildcards, duplicate and shadowed host grants.
fn lint(rules: &[Rule], keyed: &[(HostKey, Grant)], d: &mut Diags<'_>) {
    let active = |g: &Grant| g.active && !g.deny;
    for rule in rules
        .iter()
        .filter(|r| r.state == RuleState::Active && r.action == Action::Allow)
    {
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
                d.list.push(Diagnostic {
                    severity: Severity::Warning,
                    location: Some(rule.origin.clone()),
                    path: String::new(),
                    message: format!(
                        "rule '{}' allows '{h}': {why}, so data can be exfiltrated by design; name the accounts you own instead where you can",
                        rule.name
                    ),
                });
            }
        }
        for tag in &rule.service_tags {
            if tag.eq_ignore_ascii_case("Storage")
                || tag.to_ascii_lowercase().starts_with("storage.")
            {
                d.list.push(Diagnostic {
                    severity: Severity::Warning,
                    location: Some(rule.origin.clone()),
                    path: String::new(),
                    message: format!(
                        "rule '{}' allows service tag '{tag}': every storage account in that range, so data can be exfiltrated by design",
                        rule.name
                    ),
                });
            }
        }
    }

    // Duplicate / shadowed: a grant of rule A whose host, ports and protocol
    // are all covered by an earlier-or-broader active allow of rule B.
    let mut exact: HashMap<&str, Vec<&Grant>> = HashMap::new();
    let mut wild: HashMap<&str, Vec<&Grant>> = HashMap::new();
    for (key, g) in keyed.iter().filter(|(_, g)| active(g)) {
        match key {
            HostKey::Exact(n) => exact.entry(n).or_default().push(g),
            HostKey::Wildcard(s) => wild.entry(s).or_default().push(g),
        }
    }
    let covered_by = |name: &str, is_wild: bool, g: &Grant| -> Option<(u32, String)> {
        let covers = |o: &&Grant| {
            o.rule != g.rule
                && o.lo <= g.lo
                && g.hi <= o.hi
                && (o.proto == Protocol::Any || o.proto == g.proto)
        };
        let same = if is_wild {
            wild.get(name)
        } else {
            exact.get(name)
        };
        if let Some(o) = same.and_then(|v| v.iter().find(|o| covers(o))) {
            let shown = if is_wild {
                format!("*.{name}")
            } else {
                name.to_string()
            };
            return Some((o.rule, shown));
        }
        let mut rest = name;
        if is_wild {
            rest = rest.split_once('.').map(|(_, r)| r)?;
        }
        loop {
            if let Some(o) = wild.get(rest).and_then(|v| v.iter().find(|o| covers(o))) {
                return Some((o.rule, format!("*.{rest}")));
            }
            rest = rest.split_once('.').map(|(_, r)| r)?;
        }
    };
    let mut reported: HashSet<(u32, u32)> = HashSet::new();
    for (key, g) in keyed.iter().filter(|(_, g)| active(g)) {
        let (name, is_wild) = match key {
            HostKey::Exact(n) => (n.as_str(), false),
            HostKey::Wildcard(s) => (s.as_str(), true),
        };
        let Some((other, by)) = covered_by(name, is_wild, g) else {
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
        d.list.push(Diagnostic {
            severity: Severity::Warning,
            location: Some(a.origin.clone()),
            path: String::new(),
            message: format!(
                "rule '{}' host '{key}' {kind} rule '{}' ('{by}', {}): it changes nothing",
                a.name, b.name, b.origin
            ),
        });
    }
}

#[cfg(test)]
mod tests;
