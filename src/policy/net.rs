//! Addresses: the CIDR table behind address rules, and the guarded ranges.
//!
//! In: an IP address (a literal destination, a resolved address, or the
//! original destination of a transparent connection). Out: the values of every
//! CIDR containing it, most specific first; or the guarded range it lies in.
//!
//! Guarded ranges (DESIGN.md "Security defaults") are never reached through a
//! name or a broad rule: loopback, RFC 1918, link-local, CGNAT, ULA,
//! multicast, unspecified, reserved and documentation ranges, in IPv4 and in
//! the IPv6 forms that embed IPv4 (mapped, compatible, NAT64, 6to4). Only an
//! allow rule whose own CIDR lies inside a guarded range (a private endpoint
//! in the VNet) unlocks it. The Azure platform addresses 169.254.169.254
//! (instance metadata: the gateway VM's own identity token) and 168.63.129.16
//! (wire server) are refused always.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why an address is guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// 169.254.169.254 or 168.63.129.16: refused always; clients must use `NO_PROXY`.
    Platform,
    /// A private, local or special-purpose range, named.
    Range(&'static str),
}

const PLATFORM: [Ipv4Addr; 2] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(168, 63, 129, 16),
];

const GUARDED_V4: &[(&str, &str)] = &[
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link_local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
];

const GUARDED_V6: &[(&str, &str)] = &[
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("::/96", "ipv4_compatible"),
    ("100::/64", "reserved"),
    ("2001::/32", "teredo"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "ula"),
    ("fe80::/10", "link_local"),
    ("fec0::/10", "site_local"),
    ("ff00::/8", "multicast"),
];

/// The IPv4 address an IPv6 address stands for, if it embeds one
/// (`::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4 `2002:aabb:ccdd::`).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The address policy compares: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn guarded_nets() -> &'static [(IpNet, &'static str)] {
    static NETS: std::sync::OnceLock<Vec<(IpNet, &'static str)>> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        GUARDED_V4
            .iter()
            .chain(GUARDED_V6)
            .map(|(net, name)| {
                (
                    net.parse().expect("built-in guarded range is a CIDR"),
                    *name,
                )
            })
            .collect()
    })
}

/// The guarded range `ip` lies in, looking through embedded IPv4.
pub fn guard(ip: IpAddr) -> Option<Guard> {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if let IpAddr::V4(v4) = ip {
        if PLATFORM.contains(&v4) {
            return Some(Guard::Platform);
        }
        if v4.is_broadcast() {
            return Some(Guard::Range("broadcast"));
        }
    }
    guarded_nets()
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, name)| Guard::Range(name))
}

/// Whether an allow rule for `net` names guarded space explicitly: the whole
/// CIDR lies inside one guarded range (a private endpoint subnet does;
/// `0.0.0.0/0` or a service tag does not).
pub fn unlocks_guarded(net: &IpNet) -> bool {
    let net = net.trunc();
    guarded_nets().iter().any(|(g, _)| g.contains(&net))
}

/// A set of CIDRs, each with a value, answering "which contain this address?".
/// One hash map per prefix length present; lookups go longest prefix first.
#[derive(Debug, Clone, Default)]
pub struct NetTable {
    v4: Vec<(u8, HashMap<u32, Vec<u32>>)>,
    v6: Vec<(u8, HashMap<u128, Vec<u32>>)>,
}

impl NetTable {
    /// Builds the table from `(cidr, value)` pairs; a CIDR may repeat.
    pub fn build(entries: &[(IpNet, u32)]) -> NetTable {
        let mut v4: HashMap<u8, HashMap<u32, Vec<u32>>> = HashMap::new();
        let mut v6: HashMap<u8, HashMap<u128, Vec<u32>>> = HashMap::new();
        for (net, value) in entries {
            match net.trunc() {
                IpNet::V4(n) => v4
                    .entry(n.prefix_len())
                    .or_default()
                    .entry(u32::from(n.network()))
                    .or_default()
                    .push(*value),
                IpNet::V6(n) => v6
                    .entry(n.prefix_len())
                    .or_default()
                    .entry(u128::from(n.network()))
                    .or_default()
                    .push(*value),
            }
        }
        let mut v4: Vec<_> = v4.into_iter().collect();
        let mut v6: Vec<_> = v6.into_iter().collect();
        v4.sort_by_key(|e| std::cmp::Reverse(e.0));
        v6.sort_by_key(|e| std::cmp::Reverse(e.0));
        NetTable { v4, v6 }
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Visits the values of every CIDR containing `ip`, longest prefix first.
    /// IPv4-mapped IPv6 addresses are looked up as IPv4.
    pub fn visit(&self, ip: IpAddr, mut visitor: impl FnMut(u32)) {
        match canonical(ip) {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                for (len, map) in &self.v4 {
                    let masked = Ipv4Net::new(Ipv4Addr::from(bits), *len)
                        .map(|n| u32::from(n.network()))
                        .unwrap_or(0);
                    if let Some(values) = map.get(&masked) {
                        values.iter().for_each(|v| visitor(*v));
                    }
                }
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                for (len, map) in &self.v6 {
                    let masked = Ipv6Net::new(Ipv6Addr::from(bits), *len)
                        .map(|n| u128::from(n.network()))
                        .unwrap_or(0);
                    if let Some(values) = map.get(&masked) {
                        values.iter().for_each(|v| visitor(*v));
                    }
                }
            }
        }
    }
}

/// Parses a CIDR or a single address (`10.0.0.1` means `10.0.0.1/32`).
///
/// # Errors
/// A message saying the text is not a CIDR.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "'{text}' has host bits set; did you mean '{}'?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("'{text}' is not a valid CIDR or IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    macro_rules! t {
        ($($addr:expr => $want:expr),+ $(,)?) => {
            $( assert_eq!(guard(ip($addr)), $want, "{}", $addr); )+
        };
    }

    #[test]
    fn guarded_ranges_include_embedded_forms() {
        use Guard::*;
        t!(
            "127.0.0.1" => Some(Range("loopback")),
            "10.1.2.3" => Some(Range("private")),
            "172.31.255.255" => Some(Range("private")),
            "192.168.1.1" => Some(Range("private")),
            "100.64.0.1" => Some(Range("cgnat")),
            "169.254.169.254" => Some(Platform),
            "168.63.129.16" => Some(Platform),
            "169.254.1.1" => Some(Range("link_local")),
            "0.0.0.0" => Some(Range("unspecified")),
            "224.0.0.251" => Some(Range("multicast")),
            "255.255.255.255" => Some(Range("broadcast")),
            "::1" => Some(Range("loopback")),
            "::" => Some(Range("unspecified")),
            "fd00::1" => Some(Range("ula")),
            "fe80::1" => Some(Range("link_local")),
            "ff02::1" => Some(Range("multicast")),
            "::ffff:127.0.0.1" => Some(Range("loopback")),
            "::ffff:169.254.169.254" => Some(Platform),
            "64:ff9b::a9fe:a9fe" => Some(Platform),
            "64:ff9b::10.0.0.1" => Some(Range("private")),
            "2002:7f00:1::" => Some(Range("loopback")),
            "20.42.0.1" => None,
            "2603:1030::1" => None,
            "64:ff9b::8.8.8.8" => None,
        );
    }

    #[test]
    fn only_cidrs_inside_guarded_space_unlock_it() {
        assert!(unlocks_guarded(&"10.1.0.0/16".parse().unwrap()));
        assert!(unlocks_guarded(&"fd00:1::/64".parse().unwrap()));
        assert!(!unlocks_guarded(&"0.0.0.0/0".parse().unwrap()));
        assert!(!unlocks_guarded(&"8.0.0.0/6".parse().unwrap()));
        assert!(!unlocks_guarded(&"20.0.0.0/8".parse().unwrap()));
    }

    #[test]
    fn longest_prefix_first() {
        let t = NetTable::build(&[
            ("10.0.0.0/8".parse().unwrap(), 1),
            ("10.1.0.0/16".parse().unwrap(), 2),
            ("2001:db8::/32".parse().unwrap(), 3),
        ]);
        let mut seen = vec![];
        t.visit(ip("10.1.2.3"), |v| seen.push(v));
        assert_eq!(seen, vec![2, 1]);
        seen.clear();
        t.visit(ip("::ffff:10.9.9.9"), |v| seen.push(v));
        assert_eq!(seen, vec![1]);
        seen.clear();
        t.visit(ip("2001:db8::5"), |v| seen.push(v));
        assert_eq!(seen, vec![3]);
        seen.clear();
        t.visit(ip("11.0.0.1"), |v| seen.push(v));
        assert!(seen.is_empty());
    }

    #[test]
    fn cidr_parse_errors() {
        assert_eq!(
            parse_cidr("10.0.0.1").unwrap(),
            "10.0.0.1/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_cidr("10.0.0.0/33").unwrap_err(),
            "'10.0.0.0/33' is not a valid CIDR or IP address"
        );
        assert!(
            parse_cidr("10.0.0.1/8")
                .unwrap_err()
                .contains("did you mean '10.0.0.0/8'")
        );
    }
}
