//! Learned addresses: which names the DNS listener answered each address for, until TTL + grace, bounded.
//!
//! In: `(address, name, lifetime)` from every answer the DNS listener gives
//! for an allowed name. Out: the live names of an address, for a connection
//! that carries no name (opaque TCP, an IP-literal CONNECT, UDP). The table
//! holds at most `max` (address, name) pairs; past it the entry that expires
//! first goes, and is counted. Expired pairs are dropped when their address
//! is looked up or written, and by [`Learned::sweep`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Names an address was answered for, each with when it stops counting.
type Names = Vec<(String, Instant)>;

/// The table. One lock: writes come at DNS-answer rate, reads once per
/// connection that names no host; neither holds it for more than a few
/// names.
pub struct Learned {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_addr: HashMap<IpAddr, Names>,
    pairs: usize,
    evicted: u64,
}

impl Learned {
    /// A table of at most `max` (address, name) pairs (at least one).
    pub fn new(max: usize) -> Learned {
        Learned {
            max: max.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Remembers that `name` resolved to `addr`, for `life` from `now`
    /// (an existing pair is extended, never shortened). Returns how many
    /// pairs the size limit pushed out to make room.
    pub fn learn(&self, addr: IpAddr, name: &str, life: Duration, now: Instant) -> u64 {
        let until = now + life;
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let before = t.by_addr.get(&addr).map_or(0, Vec::len);
        let names = t.by_addr.entry(addr).or_default();
        names.retain(|(_, u)| *u > now);
        match names.iter_mut().find(|(n, _)| n == name) {
            Some((_, u)) => *u = (*u).max(until),
            None => names.push((name.to_string(), until)),
        }
        let after = names.len();
        t.pairs = t.pairs + after - before;
        let evicted = t.evicted;
        if t.pairs > self.max {
            let over = t.pairs - self.max;
            t.evict_soonest(over, self.max);
        }
        t.evicted - evicted
    }

    /// The live names `addr` was answered for.
    pub fn names(&self, addr: IpAddr, now: Instant) -> Vec<String> {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.by_addr.get(&addr).map_or_else(Vec::new, |names| {
            names
                .iter()
                .filter(|(_, u)| *u > now)
                .map(|(n, _)| n.clone())
                .collect()
        })
    }

    /// Drops every expired pair; returns how many are left.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut pairs = 0;
        t.by_addr.retain(|_, names| {
            names.retain(|(_, u)| *u > now);
            pairs += names.len();
            !names.is_empty()
        });
        t.pairs = pairs;
        pairs
    }

    /// (address, name) pairs held, live or not yet swept.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).pairs
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pairs pushed out by the size limit, ever.
    pub fn evicted(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).evicted
    }
}

impl Inner {
    /// Removes the pairs that expire first: at least `over`, and at least
    /// 1/64 of `max`, so a full table pays one pass per many new pairs,
    /// not one per pair.
    fn evict_soonest(&mut self, over: usize, max: usize) {
        let mut untils: Vec<Instant> = (self.by_addr.values())
            .flat_map(|names| names.iter().map(|(_, u)| *u))
            .collect();
        let k = over.max(max / 64).clamp(1, untils.len().max(1));
        if untils.is_empty() {
            return;
        }
        let (_, &mut cut, _) = untils.select_nth_unstable(k - 1);
        let mut removed = 0;
        self.by_addr.retain(|_, names| {
            let before = names.len();
            names.retain(|(_, u)| *u > cut);
            removed += before - names.len();
            !names.is_empty()
        });
        self.pairs -= removed;
        self.evicted += removed as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_live_until_their_time_and_the_oldest_go_first_when_full() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let table = Learned::new(3);
        table.learn(ip("20.1.1.1"), "a.example", 10 * s, t0);
        table.learn(ip("20.1.1.1"), "b.example", 20 * s, t0);
        table.learn(ip("20.1.1.1"), "a.example", 5 * s, t0); // never shortened
        assert_eq!(
            table.names(ip("20.1.1.1"), t0 + 9 * s),
            ["a.example", "b.example"]
        );
        assert_eq!(table.names(ip("20.1.1.1"), t0 + 15 * s), ["b.example"]);
        assert!(table.names(ip("20.9.9.9"), t0).is_empty());
        assert_eq!(table.len(), 2);

        // Full: the pair that expires first (a.example at 10 s) goes.
        table.learn(ip("20.2.2.2"), "c.example", 30 * s, t0);
        table.learn(ip("20.3.3.3"), "d.example", 30 * s, t0);
        assert_eq!(table.len(), 3);
        assert_eq!(table.evicted(), 1);
        assert_eq!(table.names(ip("20.1.1.1"), t0), ["b.example"]);
        assert_eq!(table.names(ip("20.3.3.3"), t0), ["d.example"]);

        // Sweeping past every lifetime empties it.
        assert_eq!(table.sweep(t0 + 31 * s), 0);
        assert!(table.is_empty());
    }
}
