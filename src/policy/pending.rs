//! Rules waiting for a value: what they would allow, so that a denial says
//! what is missing (`needs_var`, `needs_service_tags`) instead of `no_rule`.
//!
//! In: from `compile`, the host patterns of active-scenario rules whose
//! placeholders have no value (each `<name>` label kept as "any one label"),
//! and the address rules that wait for a variable or a service tags file.
//! Out: for a destination no rule explains, the first such rule that would
//! allow it. Only denials read it: it never allows anything, and it is empty
//! once every value is given.

use super::decision::Reason;
use super::grants::Grant;
use crate::config::Protocol;

/// A host pattern with placeholders: `*.<region>.batch.azure.com`.
#[derive(Debug, Clone)]
pub(super) struct Pattern {
    /// `*.` in front: one or more labels before the rest.
    wildcard: bool,
    /// Labels, left to right, lowercase; `None` for a placeholder (any one label).
    labels: Vec<Option<Box<str>>>,
}

impl Pattern {
    /// A partially filled pattern as written (`*.<region>.batch.azure.com`).
    pub(super) fn parse(text: &str) -> Pattern {
        let text = text.trim().trim_end_matches('.');
        let (wildcard, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let labels = rest
            .split('.')
            .map(|l| (!l.contains('<')).then(|| l.to_ascii_lowercase().into_boxed_str()))
            .collect();
        Pattern { wildcard, labels }
    }

    /// Whether `name` (as sent: any case, maybe a trailing dot) fits.
    fn matches(&self, name: &[u8]) -> bool {
        let name = name.strip_suffix(b".").unwrap_or(name);
        let mut got = name.rsplit(|&b| b == b'.');
        for want in self.labels.iter().rev() {
            match got.next() {
                Some(label) if !label.is_empty() => {
                    if want
                        .as_ref()
                        .is_some_and(|w| !label.eq_ignore_ascii_case(w.as_bytes()))
                    {
                        return false;
                    }
                }
                _ => return false,
            }
        }
        let mut rest = got.peekable();
        if rest.peek().is_none() {
            return !self.wildcard;
        }
        self.wildcard && rest.all(|l| !l.is_empty())
    }
}

/// What waiting rules would allow.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Host patterns of rules missing a placeholder value, one grant per port range.
    hosts: Vec<(Pattern, Grant)>,
    /// Address rules: a grant per port range, the reason, and whether it may
    /// cover guarded addresses (a `cidrs` placeholder such as `<vnet>`).
    addrs: Vec<(Grant, Reason, bool)>,
}

impl Pending {
    /// A rule waiting for a placeholder value would allow `pattern` with `grant`.
    pub(super) fn add_host(&mut self, pattern: Pattern, grant: Grant) {
        self.hosts.push((pattern, grant));
    }

    /// An address rule waits (`reason`: `needs_var` or `needs_service_tags`);
    /// `guarded`: its missing value is a CIDR, which may be private space.
    pub(super) fn add_addr(&mut self, grant: Grant, reason: Reason, guarded: bool) {
        self.addrs.push((grant, reason, guarded));
    }

    /// Whether nothing waits (the common case: one branch per denial).
    pub(super) fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.addrs.is_empty()
    }

    /// The first waiting rule that would allow `name` on `port`/`proto`.
    pub(super) fn name(&self, name: &[u8], port: u16, proto: Protocol) -> Option<u32> {
        self.hosts
            .iter()
            .find(|(p, g)| g.covers_port(port) && g.covers_proto(proto) && p.matches(name))
            .map(|(_, g)| g.rule)
    }

    /// The first waiting address rule that would allow an address on
    /// `port`/`proto`, and why it waits; `guarded`: the address is private
    /// space, which only a `cidrs` rule can name.
    pub(super) fn addr(&self, guarded: bool, port: u16, proto: Protocol) -> Option<(u32, Reason)> {
        self.addrs
            .iter()
            .find(|(g, _, cidr)| {
                (!guarded || *cidr) && g.covers_port(port) && g.covers_proto(proto)
            })
            .map(|(g, why, _)| (g.rule, *why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placeholder_is_exactly_one_label_and_a_wildcard_one_or_more() {
        let p = Pattern::parse("*.<region>.batch.azure.com");
        assert!(p.matches(b"pool.westus2.batch.azure.com"));
        assert!(p.matches(b"a.b.WestUS2.Batch.azure.com."));
        assert!(!p.matches(b"westus2.batch.azure.com"));
        assert!(!p.matches(b"pool.westus2.batch.azure.com.evil"));
        assert!(!p.matches(b".westus2.batch.azure.com"));
        let exact = Pattern::parse("<acr>.<region>.data.azurecr.io");
        assert!(exact.matches(b"myacr.westus2.data.azurecr.io"));
        assert!(!exact.matches(b"x.myacr.westus2.data.azurecr.io"));
        assert!(!exact.matches(b"westus2.data.azurecr.io"));
        let filled = Pattern::parse("myacr.<region>.data.azurecr.io");
        assert!(!filled.matches(b"other.westus2.data.azurecr.io"));
    }
}
