//! Grants: what a host key or CIDR lets through, folded per key at compile
//! time, and walked per decision.
//!
//! In: one [`Grant`] per (rule, port range, host key or CIDR) from
//! `compile`. Out: per host key, the contiguous list of every grant a name
//! whose most specific key it is meets ([`fold_host_grants`]); per decision,
//! what the grants met say ([`Walk`], [`decide_name`]). Nothing here parses
//! names or addresses or knows about audit mode.

use std::collections::HashMap;

use super::decision::{Decision, Reason};
use super::host::HostKey;
use crate::config::Protocol;

/// One port range of one rule, on one host key or CIDR.
#[derive(Debug, Clone, Copy)]
pub(super) struct Grant {
    /// Index of the rule in `Policy::rules`.
    pub(super) rule: u32,
    /// First port, inclusive.
    pub(super) lo: u16,
    /// Last port, inclusive.
    pub(super) hi: u16,
    pub(super) proto: Protocol,
    /// A deny rule's grant.
    pub(super) deny: bool,
    /// Its rule is active; an inactive grant only explains a denial.
    pub(super) active: bool,
    /// Why an inactive grant's rule is off: `scenario_disabled`,
    /// `needs_var` or `needs_service_tags` (unused when active).
    pub(super) why: Reason,
    /// A CIDR inside guarded space: it may allow a guarded address.
    pub(super) unlocks_guarded: bool,
    /// In a key's folded list: the first grant of a more specific key than
    /// the grants before it (host keys only).
    pub(super) more_specific: bool,
    /// The clients it applies to: its rule's group bits, or `SERVED` for
    /// every served client (`clients.rs`). A client whose mask shares no
    /// bit with it does not see it.
    pub(super) clients: u64,
}

impl Grant {
    pub(super) fn covers_port(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    pub(super) fn covers_proto(&self, proto: Protocol) -> bool {
        self.proto == Protocol::Any || self.proto == proto
    }
}

/// What a walk over the grants a destination meets has seen, for one
/// client: the first grant of each kind, in walk order (names: least
/// specific key first, then rule order; addresses: longest prefix first,
/// then rule order). Grants for other clients are skipped.
#[derive(Debug)]
pub(super) struct Walk {
    /// The client's mask (`clients.rs`).
    mask: u64,
    /// An active deny grant on this port and protocol.
    pub(super) deny: Option<u32>,
    /// An active allow grant on this port and protocol.
    pub(super) allow: Option<u32>,
    /// Such an allow grant that may allow a guarded address.
    pub(super) allow_unlocking: Option<u32>,
    /// An active allow grant on another port, or on this port for another protocol.
    near: Option<(u32, Reason)>,
    /// An inactive allow grant on this port and protocol, and why it is off.
    disabled: Option<(u32, Reason)>,
    /// An active allow grant on this port and protocol for other clients.
    other_clients: Option<u32>,
}

impl Walk {
    /// A walk for the client with this mask.
    #[inline]
    pub(super) fn new(mask: u64) -> Walk {
        Walk {
            mask,
            deny: None,
            allow: None,
            allow_unlocking: None,
            near: None,
            disabled: None,
            other_clients: None,
        }
    }

    /// Takes one more grant into account.
    #[inline]
    pub(super) fn observe(&mut self, g: &Grant, port: u16, proto: Protocol) {
        let port_ok = g.covers_port(port);
        let proto_ok = g.covers_proto(proto);
        if g.clients & self.mask == 0 {
            if g.active && !g.deny && port_ok && proto_ok {
                self.other_clients.get_or_insert(g.rule);
            }
            return;
        }
        if !g.active {
            if port_ok && proto_ok && !g.deny {
                self.disabled.get_or_insert((g.rule, g.why));
            }
            return;
        }
        if port_ok && proto_ok {
            if g.deny {
                self.deny.get_or_insert(g.rule);
            } else {
                self.allow.get_or_insert(g.rule);
                if g.unlocks_guarded {
                    self.allow_unlocking.get_or_insert(g.rule);
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

    /// The denial when nothing allowed or denied: the nearest rule's port or
    /// protocol, else an inactive rule that would allow it (and why it is
    /// off), else no rule (naming a rule that allows it for other clients,
    /// if one does).
    pub(super) fn refusal(&self) -> Decision {
        if let Some((rule, reason)) = self.near {
            Decision::deny(Some(rule), reason)
        } else if let Some((rule, why)) = self.disabled {
            Decision::deny(Some(rule), why)
        } else {
            Decision::deny(self.other_clients, Reason::NoRule)
        }
    }
}

/// The decision on a name from its most specific key's folded grants. The
/// first deny met wins; otherwise the allow of the most specific key that
/// has one, the first in rule order; otherwise [`Walk::refusal`].
pub(super) fn decide_name(grants: &[Grant], port: u16, proto: Protocol, mask: u64) -> Decision {
    let mut walk = Walk::new(mask);
    // The allow of the most specific key seen so far that had one.
    let mut allow = None;
    for g in grants {
        if g.more_specific {
            allow = walk.allow.take().or(allow);
        }
        walk.observe(g, port, proto);
        if let Some(rule) = walk.deny {
            return Decision::deny(Some(rule), Reason::DenyRule);
        }
    }
    match walk.allow.or(allow) {
        Some(rule) => Decision::allow(rule),
        None => walk.refusal(),
    }
}

/// Where a host key's folded grants sit in the policy's grant list.
#[derive(Debug, Clone, Copy)]
pub(super) struct KeyGrants {
    start: u32,
    end: u32,
}

impl KeyGrants {
    /// The key's grants in `all` (the list [`fold_host_grants`] filled).
    #[inline]
    pub(super) fn of(self, all: &[Grant]) -> &[Grant] {
        &all[self.start as usize..self.end as usize]
    }
}

/// Groups the host grants by key (each key's in rule order) and appends,
/// for each key K, every grant a name whose most specific key is K meets:
/// those of the wildcard keys that are suffixes of K, least specific first,
/// then K's own. Returns each key with where its list sits in `all`.
pub(super) fn fold_host_grants(
    keyed: Vec<(HostKey, Grant)>,
    all: &mut Vec<Grant>,
) -> Vec<(HostKey, KeyGrants)> {
    let mut by_key: Vec<(HostKey, Vec<Grant>)> = Vec::new();
    let mut key_index: HashMap<HostKey, usize> = HashMap::new();
    for (key, grant) in keyed {
        let i = *key_index.entry(key.clone()).or_insert_with(|| {
            by_key.push((key, Vec::new()));
            by_key.len() - 1
        });
        by_key[i].1.push(grant);
    }
    let count = |n: usize| u32::try_from(n).expect("fewer than 2^32 grants");
    let mut out = Vec::with_capacity(by_key.len());
    for (key, own) in &by_key {
        let start = count(all.len());
        for ancestor in wildcard_ancestors(key) {
            if let Some(&i) = key_index.get(&ancestor) {
                push_group(all, &by_key[i].1);
            }
        }
        push_group(all, own);
        let end = count(all.len());
        out.push((key.clone(), KeyGrants { start, end }));
    }
    out
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
