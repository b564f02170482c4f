//! Clients: who is served, and which named groups a client is in.
//!
//! In: `[clients]` (the `allow` CIDRs and named groups, each with CIDRs and
//! an optional `mode`) and the `clients` a rule names. Out: a [`ClientMap`]
//! that turns a client address into a [`Client`] (one bit per group it is
//! in, plus the bit every served client has, and whether its denials are
//! audited) by one binary search, and each rule's group mask, so that a
//! decision tests a grant with one AND. Nothing here decides about
//! destinations.
//!
//! Groups are bits 0..63 in file order; bit 63 ([`SERVED`]) is set for every
//! client inside `[clients] allow` and on every rule without `clients`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use toml::Spanned;

use super::diagnostic::Diags;
use super::net;
use crate::config::{Config, Mode};

/// The most groups a config may name (one bit each; bit 63 is [`SERVED`]).
pub const MAX_GROUPS: usize = 63;
/// The bit every client inside `[clients] allow` has, and every rule without `clients`.
pub(super) const SERVED: u64 = 1 << 63;

/// A client as one policy sees it: the groups its address is in and whether
/// its denials are let through as `audit_deny`. Computed once per
/// connection (and again after a reload); small and `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// [`SERVED`] if inside `[clients] allow`, and a bit per group.
    pub(super) mask: u64,
    /// Its denials become `audit_deny`.
    pub(super) audit: bool,
}

impl Client {
    /// Whether `[clients] allow` serves it.
    pub fn served(self) -> bool {
        self.mask & SERVED != 0
    }

    /// Whether its denials are let through as `audit_deny`.
    pub fn audited(self) -> bool {
        self.audit
    }

    /// Indices of the groups it is in, in file order.
    pub(super) fn groups(self) -> impl Iterator<Item = usize> {
        (0..MAX_GROUPS).filter(move |i| self.mask & (1 << i) != 0)
    }
}

/// The clients whose decisions may differ: one per distinct set of groups
/// that some served address is in, with one such address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientClass {
    /// What the policy sees for every address of the class.
    pub client: Client,
    /// The lowest address of one of its ranges.
    pub example: IpAddr,
}

/// `[clients]` compiled: served ranges, groups, and a sorted interval list
/// per address family giving each address its mask.
#[derive(Debug, Default)]
pub(super) struct ClientMap {
    pub(super) allow: Vec<IpNet>,
    pub(super) names: Vec<String>,
    /// Bits of groups that enforce (their own `mode`, else `[policy] mode`).
    enforcing: u64,
    /// `[policy] mode = "audit"`: the mode of clients in no group.
    default_audit: bool,
    /// `(first address, mask)`, sorted; the first entry starts at 0.
    v4: Vec<(u128, u64)>,
    v6: Vec<(u128, u64)>,
    pub(super) classes: Vec<ClientClass>,
}

impl ClientMap {
    /// The client at `ip`.
    #[inline]
    pub(super) fn client(&self, ip: IpAddr) -> Client {
        let (table, x) = match net::canonical(ip) {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (&self.v6, u128::from(a)),
        };
        let at = table.partition_point(|&(start, _)| start <= x);
        let mask = at.checked_sub(1).map_or(0, |i| table[i].1);
        self.with_mask(mask)
    }

    /// A client with these bits, its audit flag derived: in no group, the
    /// policy's mode; in groups, audited only if none of them enforces
    /// (fail closed).
    pub(super) fn with_mask(&self, mask: u64) -> Client {
        let groups = mask & !SERVED;
        let audit = if groups == 0 {
            self.default_audit
        } else {
            groups & self.enforcing == 0
        };
        Client { mask, audit }
    }

    /// The name of the client's first group in file order, or `""`.
    #[inline]
    pub(super) fn label(&self, client: Client) -> &str {
        match client.mask & !SERVED {
            0 => "",
            groups => self.names[groups.trailing_zeros() as usize].as_str(),
        }
    }
}

/// Where a group's CIDR was written, and its config path.
type Written<'a> = (&'a Spanned<String>, String);

/// Compiles `[clients]`: `allow`, then each group (a valid name, CIDRs
/// inside `allow`, at most [`MAX_GROUPS`]).
pub(super) fn compile(config: &Config, cfg: usize, d: &mut Diags<'_>) -> ClientMap {
    let mut map = ClientMap {
        default_audit: config.policy.mode == Mode::Audit,
        ..ClientMap::default()
    };
    let mut spans: Vec<(IpNet, u64, Option<Written<'_>>)> = Vec::new();
    for (i, c) in config.clients.allow.iter().enumerate() {
        match net::parse_cidr(c.get_ref()) {
            Ok(n) => {
                map.allow.push(n);
                spans.push((n, SERVED, None));
            }
            Err(e) => d.error(cfg, Some(&c.span()), format!("clients.allow[{i}]"), e),
        }
    }
    for (bit, g) in config.clients.groups.iter().enumerate() {
        let name = g.name.get_ref();
        let path = format!("clients.{name}");
        if let Err(e) = group_name(name) {
            d.error(cfg, Some(&g.name.span()), path.clone(), e);
        }
        if bit == MAX_GROUPS {
            let message = format!("more than {MAX_GROUPS} client groups: merge some");
            d.error(cfg, Some(&g.name.span()), path.clone(), message);
        }
        if g.cidrs.is_empty() {
            let message = format!("client group '{name}' names no CIDRs");
            d.error(cfg, Some(&g.name.span()), path.clone(), message);
        }
        let bit = 1u64 << bit.min(MAX_GROUPS - 1);
        if g.mode.unwrap_or(config.policy.mode) == Mode::Enforce {
            map.enforcing |= bit;
        }
        map.names.push(name.clone());
        for (i, c) in g.cidrs.iter().enumerate() {
            match net::parse_cidr(c.get_ref()) {
                Ok(n) => spans.push((n, bit, Some((c, format!("{path}[{i}]"))))),
                Err(e) => d.error(cfg, Some(&c.span()), format!("{path}[{i}]"), e),
            }
        }
    }
    let nets: Vec<(IpNet, u64)> = spans.iter().map(|&(n, b, _)| (n, b)).collect();
    map.v4 = intervals(&nets, false);
    map.v6 = intervals(&nets, true);
    for (n, _, at) in &spans {
        if let Some((c, path)) = at.as_ref().filter(|_| !map.covers(n)) {
            let allow: Vec<String> = map.allow.iter().map(ToString::to_string).collect();
            let message = format!(
                "{n} is not inside [clients] allow ({}): a client outside allow is refused before any rule applies; add the range to allow, or narrow the group",
                allow.join(", ")
            );
            d.error(cfg, Some(&c.span()), path.clone(), message);
        }
    }
    map.classes = map.classes();
    map
}

impl ClientMap {
    /// Whether every address of `n` is served.
    fn covers(&self, n: &IpNet) -> bool {
        let (v6, lo, hi) = bounds(n);
        let table = if v6 { &self.v6 } else { &self.v4 };
        let first = table.partition_point(|&(s, _)| s <= lo).saturating_sub(1);
        table[first..]
            .iter()
            .take_while(|&&(s, _)| s <= hi)
            .all(|&(_, m)| m & SERVED != 0)
    }

    /// One class per distinct mask among served addresses: clients in no
    /// group first, then by their groups' bits.
    fn classes(&self) -> Vec<ClientClass> {
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        let mut out = Vec::new();
        let v4 = (self.v4.iter()).map(|&(s, m)| (m, IpAddr::from(Ipv4Addr::from(s as u32))));
        let v6 = (self.v6.iter()).map(|&(s, m)| (m, IpAddr::from(Ipv6Addr::from(s))));
        for (mask, example) in v4.chain(v6).filter(|&(m, _)| m & SERVED != 0) {
            if seen.insert(mask) {
                out.push(ClientClass {
                    client: self.with_mask(mask),
                    example,
                });
            }
        }
        out.sort_by_key(|c| c.client.mask & !SERVED);
        out
    }
}

/// `(family marker, first, last)` of a net as integers.
fn bounds(n: &IpNet) -> (bool, u128, u128) {
    match n {
        IpNet::V4(n) => (
            false,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// The sorted `(first address, mask)` list of one family: every boundary
/// of a net starts an interval whose mask is the OR of the nets holding it;
/// equal neighbours are merged.
fn intervals(nets: &[(IpNet, u64)], v6: bool) -> Vec<(u128, u64)> {
    let max = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    let ranges: Vec<(u128, u128, u64)> = nets
        .iter()
        .map(|(n, bit)| (bounds(n), *bit))
        .filter(|&((f, _, _), _)| f == v6)
        .map(|((_, lo, hi), bit)| (lo, hi, bit))
        .collect();
    let mut points: Vec<u128> = vec![0];
    for &(lo, hi, _) in &ranges {
        points.push(lo);
        if hi < max {
            points.push(hi + 1);
        }
    }
    points.sort_unstable();
    points.dedup();
    let mut out: Vec<(u128, u64)> = Vec::with_capacity(points.len());
    for p in points {
        let mask = (ranges.iter())
            .filter(|&&(lo, hi, _)| lo <= p && p <= hi)
            .fold(0, |m, &(_, _, bit)| m | bit);
        if out.last().is_none_or(|&(_, m)| m != mask) {
            out.push((p, mask));
        }
    }
    out
}

/// Whether a grant for clients `outer` reaches every client a grant for
/// `inner` does: `outer` is for every served client, or for at least
/// `inner`'s groups.
pub(super) fn covers(outer: u64, inner: u64) -> bool {
    outer & SERVED != 0 || inner & !outer == 0
}

/// A group name is used in metrics labels and log fields: letters, digits,
/// `-` and `_`, at most 64 bytes, and not `allow`.
fn group_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(format!(
            "'{name}' is not a usable client group name: letters, digits, '-' and '_', at most 64"
        ));
    }
    Ok(())
}

/// A rule's group mask from its `clients` ([`SERVED`] when it names none);
/// unknown names are errors with the closest known ones.
pub(super) fn rule_mask(
    clients: Option<&Spanned<Vec<Spanned<String>>>>,
    map: &ClientMap,
    path: &str,
    (src, d): (usize, &mut Diags<'_>),
) -> u64 {
    let Some(list) = clients else {
        return SERVED;
    };
    if list.get_ref().is_empty() {
        let message =
            "`clients = []` names no client group: leave `clients` out for every served client"
                .to_string();
        d.error(src, Some(&list.span()), format!("{path}.clients"), message);
        return 0;
    }
    let mut mask = 0;
    for (i, name) in list.get_ref().iter().enumerate() {
        match map.names.iter().position(|n| n == name.get_ref()) {
            Some(bit) => mask |= 1 << bit.min(MAX_GROUPS - 1),
            None => {
                let message = unknown_group(name.get_ref(), &map.names);
                d.error(
                    src,
                    Some(&name.span()),
                    format!("{path}.clients[{i}]"),
                    message,
                );
            }
        }
    }
    mask
}

/// The message for a rule naming a group `[clients]` does not define.
fn unknown_group(name: &str, known: &[String]) -> String {
    if name == "allow" {
        return "'allow' is [clients]' list of served clients, not a group: leave `clients` out for every served client".into();
    }
    if known.is_empty() {
        return format!(
            "unknown client group '{name}': [clients] names no groups (add one, e.g. {name} = [\"10.0.2.0/24\"])"
        );
    }
    let want = name.to_ascii_lowercase();
    let close: Vec<String> = known
        .iter()
        .filter(|k| {
            let k = k.to_ascii_lowercase();
            k.contains(&want) || want.contains(&k) || edits(&k, &want) <= 2
        })
        .map(|k| format!("'{k}'"))
        .collect();
    let hint = if close.is_empty() {
        String::new()
    } else {
        format!("did you mean {}? ", close.join(", "))
    };
    format!(
        "unknown client group '{name}': {hint}(groups in [clients]: {})",
        known.join(", ")
    )
}

/// Levenshtein distance (names are short).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
