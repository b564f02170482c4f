//! What a decision is about and what it says: [`Dest`] in, [`Decision`] out.
//!
//! In: a destination as a listener parsed it ([`Target::parse`]). Out: the
//! small `Copy` values `decide` returns and logs, metrics, the proxy's 403
//! body and `portcullis explain` print. Nothing here decides anything.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;

use crate::config::Protocol;

/// Index of a rule in [`Policy::rules`](super::Policy::rules). Kept plus
/// one in a `NonZeroU32`, so an `Option<RuleId>` is 4 bytes and a
/// [`Decision`] 8: one register, cheap to copy into logs and metrics.
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

    /// Its index in [`Policy::rules`](super::Policy::rules).
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
    /// Only a rule of a disabled scenario (or one switched off by
    /// `[policy] disable_rules`) would allow it.
    ScenarioDisabled,
    /// Only a rule whose placeholders (`<region>`, `<storage>`, ...) have no
    /// value would allow it: the gateway cannot enforce it until they do.
    NeedsVar,
    /// Only a service-tag rule would allow it, and no service tags file is
    /// loaded: the gateway cannot know the tag's addresses.
    NeedsServiceTags,
    /// A host rule allows the name, but on a protocol that carries no name
    /// (UDP), and there is no DNS listener to learn the name's addresses (or
    /// it is UDP 443, QUIC, which the ruleset always drops).
    NeedsDns,
    /// Not a valid host name.
    MalformedHost,
    /// A private, loopback, link-local or other guarded address.
    GuardedAddress,
    /// 169.254.169.254 or 168.63.129.16.
    PlatformAddress,
    /// Data path: a TLS ClientHello in an allowed tunnel names another host
    /// than the one decided (or, in a tunnel to an address, a name no rule
    /// allows): domain fronting.
    SniMismatch,
    /// Data path: an HTTP request in an allowed tunnel or connection names
    /// another host than the one decided.
    HostMismatch,
    /// Data path: an allowed tunnel's first bytes are no readable ClientHello
    /// or HTTP request (other protocol, too slow, too large, malformed) and
    /// its rule does not say `opaque = true`.
    SniUnreadable,
    /// A connection that named no host went to an address the DNS listener
    /// answered for a name, and a rule allows that name there.
    DnsAddress,
}

impl Reason {
    /// Every reason, for code that keeps one entry per reason (metrics).
    pub const ALL: [Reason; 16] = [
        Reason::RuleMatched,
        Reason::DenyRule,
        Reason::NoRule,
        Reason::PortNotAllowed,
        Reason::ProtocolNotAllowed,
        Reason::ScenarioDisabled,
        Reason::NeedsVar,
        Reason::NeedsServiceTags,
        Reason::NeedsDns,
        Reason::MalformedHost,
        Reason::GuardedAddress,
        Reason::PlatformAddress,
        Reason::SniMismatch,
        Reason::HostMismatch,
        Reason::SniUnreadable,
        Reason::DnsAddress,
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
            Reason::NeedsVar => "needs_var",
            Reason::NeedsServiceTags => "needs_service_tags",
            Reason::NeedsDns => "needs_dns",
            Reason::MalformedHost => "malformed_host",
            Reason::GuardedAddress => "guarded_address",
            Reason::PlatformAddress => "platform_address",
            Reason::SniMismatch => "sni_mismatch",
            Reason::HostMismatch => "host_mismatch",
            Reason::SniUnreadable => "sni_unreadable",
            Reason::DnsAddress => "dns_address",
        }
    }

    /// Whether only the listeners give this reason (`decide` never does):
    /// the cuts made from the bytes inside an allowed connection, and
    /// `dns_address`, an address decided as a name the DNS listener answered.
    pub fn is_data_path(self) -> bool {
        matches!(
            self,
            Reason::SniMismatch | Reason::HostMismatch | Reason::SniUnreadable | Reason::DnsAddress
        )
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

impl Decision {
    /// A denial for `reason` that no rule gave (data-path cuts, unreadable names).
    pub fn denied(reason: Reason) -> Decision {
        Decision {
            verdict: Verdict::Deny,
            rule: None,
            reason,
        }
    }

    /// Allowed by the rule at index `rule`.
    pub(super) fn allow(rule: u32) -> Decision {
        Decision {
            verdict: Verdict::Allow,
            rule: Some(RuleId::new(rule)),
            reason: Reason::RuleMatched,
        }
    }

    /// Denied, naming the rule at index `rule` if one is to blame or near.
    pub(super) fn deny(rule: Option<u32>, reason: Reason) -> Decision {
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
