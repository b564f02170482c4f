//! nftset: the addresses the DNS listener answered for names that UDP rules allow, written into the ruleset's timeout sets.
//!
//! In: for each answer of the DNS listener, the name, its addresses with
//! their learned lifetimes (TTL clamped, plus grace) and the policy in force.
//! Out: `address . port` elements, one per port on which `decide` allows
//! the name over UDP ([`Policy::udp_ports`]), with the lifetime as their
//! timeout, in the `dns_udp_v4` / `dns_udp_v6` sets of `table inet
//! portcullis` that `render nftables` declares when `[listen] dns` is set;
//! the ruleset forwards the clients' UDP to those elements and drops the rest.
//!
//! The listener only queues elements (`try_send`: a full queue drops and
//! counts, a DNS answer never waits). One thread collects them and runs
//! `nft -f -` once per batch: at most every [`FLUSH_EVERY`], or sooner at
//! [`BATCH`] elements. A failed run is logged (at most once a minute) and
//! counted, and its elements are tried again on the next answer for them.
//! Each element is written as add, delete, add in one transaction: the
//! timeout is set whether or not the kernel already holds the element (older
//! kernels keep an existing element's timeout on a plain add).
//!
//! It decides nothing (the policy does) and writes nothing but elements of
//! those two sets; the process needs CAP_NET_ADMIN for it (see the unit).

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::config::Protocol;
use crate::policy::Policy;

/// The table `render nftables` writes.
pub const TABLE: &str = "portcullis";
/// The set of IPv4 `address . port` elements.
pub const SET_V4: &str = "dns_udp_v4";
/// The set of IPv6 `address . port` elements.
pub const SET_V6: &str = "dns_udp_v6";
/// Elements per `nft` run, at most.
pub const BATCH: usize = 256;
/// How long an element waits for its batch, at most.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Elements queued between the listener and the writer; past it, dropped.
const QUEUE: usize = 4096;
/// An element the kernel should still hold is written again after this
/// long anyway: re-applying the ruleset empties the sets, and the next
/// answers for a name then fill them again within this time.
const RESEND: Duration = Duration::from_secs(60);
/// An `nft` run that takes longer is killed and counted as failed.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one failure line per this long (every failure is counted).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What the writer counts.
#[derive(Clone)]
pub struct Counters {
    /// `nft` runs that loaded their batch.
    pub runs_ok: IntCounter,
    /// `nft` runs that failed (not found, refused, timed out).
    pub runs_failed: IntCounter,
    /// Elements written by successful runs.
    pub written: IntCounter,
    /// Elements dropped: queue full, or the writer's table full.
    pub dropped: IntCounter,
}

/// One element to write: `addr . port`, until `until`.
struct Element {
    addr: IpAddr,
    port: u16,
    until: Instant,
}

/// The listener's side: a queue to the writer thread, started on the first
/// element (a gateway without UDP name rules never starts it).
pub struct NftSets {
    nft: String,
    max: usize,
    counters: Counters,
    tx: OnceLock<Option<SyncSender<Element>>>,
}

impl NftSets {
    /// Writes with the `nft` program `nft`, holding at most `max` elements
    /// it believes the kernel has (more are dropped and counted).
    pub fn new(nft: &str, max: usize, counters: Counters) -> NftSets {
        NftSets {
            nft: nft.to_string(),
            max: max.max(1),
            counters,
            tx: OnceLock::new(),
        }
    }

    /// The DNS listener's hook: `name` was answered with `answered`
    /// (address, learned lifetime). Queues `address . port` for every port
    /// on which the policy allows the name over UDP, for addresses the
    /// resolved-address checks pass; nothing when no UDP rule allows it.
    pub fn learned(&self, policy: &Policy, name: &str, answered: &[(IpAddr, Duration)]) {
        if answered.is_empty() {
            return;
        }
        let ports = policy.udp_ports(name);
        if ports.is_empty() {
            return;
        }
        let now = Instant::now();
        for &(addr, life) in answered {
            for &port in &ports {
                if policy.check_resolved(addr, port, Protocol::Udp).is_ok() {
                    self.offer(Element {
                        addr,
                        port,
                        until: now + life,
                    });
                }
            }
        }
    }

    fn offer(&self, e: Element) {
        let tx = self.tx.get_or_init(|| self.start());
        let sent = match tx {
            Some(tx) => tx.try_send(e),
            None => Err(TrySendError::Disconnected(e)),
        };
        if sent.is_err() {
            self.counters.dropped.inc();
        }
    }

    fn start(&self) -> Option<SyncSender<Element>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let writer = Writer {
            nft: self.nft.clone(),
            max: self.max,
            counters: self.counters.clone(),
            installed: HashMap::new(),
            last_log: None,
            failures: 0,
        };
        let spawned = std::thread::Builder::new()
            .name("nftset".into())
            .spawn(move || writer.run(rx));
        match spawned {
            Ok(_) => Some(tx),
            Err(err) => {
                tracing::error!(error = %err, "nftset: cannot start the writer thread; UDP sets stay empty");
                None
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    nft: String,
    max: usize,
    counters: Counters,
    /// Elements written: (until, when written). Expired ones are dropped at
    /// each batch, so this is about what the kernel holds.
    installed: HashMap<(IpAddr, u16), (Instant, Instant)>,
    last_log: Option<Instant>,
    /// Failed runs since the last failure line.
    failures: u64,
}

impl Writer {
    /// Collects elements into batches until the listener side goes away.
    fn run(mut self, rx: Receiver<Element>) {
        let mut batch: HashMap<(IpAddr, u16), Instant> = HashMap::new();
        let mut due: Option<Instant> = None;
        loop {
            let wait = due.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            let closed = match rx.recv_timeout(wait) {
                Ok(e) => {
                    let until = batch.entry((e.addr, e.port)).or_insert(e.until);
                    *until = (*until).max(e.until);
                    due.get_or_insert_with(|| Instant::now() + FLUSH_EVERY);
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            let full = batch.len() >= BATCH;
            if closed || full || due.is_some_and(|d| Instant::now() >= d) {
                if !batch.is_empty() {
                    self.flush(&mut batch);
                }
                due = None;
            }
            if closed {
                return;
            }
        }
    }

    /// Writes what in `batch` the kernel does not hold long enough yet.
    fn flush(&mut self, batch: &mut HashMap<(IpAddr, u16), Instant>) {
        let now = Instant::now();
        self.installed.retain(|_, (until, _)| *until > now);
        let mut chosen = Vec::new();
        let mut added = 0;
        for (key, until) in batch.drain() {
            let until = match self.installed.get(&key) {
                Some(&(held, sent)) if held >= until && now.duration_since(sent) < RESEND => {
                    continue;
                }
                Some(&(held, _)) => held.max(until),
                None if self.installed.len() + added >= self.max => {
                    self.counters.dropped.inc();
                    continue;
                }
                None => {
                    added += 1;
                    until
                }
            };
            chosen.push((key, until));
        }
        if chosen.is_empty() {
            return;
        }
        let script = script(&chosen, now);
        match run_nft(&self.nft, &script) {
            Ok(()) => {
                self.counters.runs_ok.inc();
                self.counters.written.inc_by(chosen.len() as u64);
                for (key, until) in chosen {
                    self.installed.insert(key, (until, now));
                }
            }
            Err(err) => {
                self.counters.runs_failed.inc();
                self.failures += 1;
                if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    tracing::warn!(
                        error = %err,
                        elements = chosen.len(),
                        failed_runs = self.failures,
                        "nftset: could not add learned UDP addresses to the ruleset's sets (is the ruleset rendered with [listen] dns loaded, and does the gateway have CAP_NET_ADMIN?)"
                    );
                    self.last_log = Some(Instant::now());
                    self.failures = 0;
                }
            }
        }
    }
}

/// The `nft -f` text for `elements`: per family, add, delete, add, so the
/// timeout is the one given whether or not the element was there.
fn script(elements: &[((IpAddr, u16), Instant)], now: Instant) -> String {
    let mut out = String::new();
    for (set, v6) in [(SET_V4, false), (SET_V6, true)] {
        let mine: Vec<_> = (elements.iter())
            .filter(|((addr, _), _)| addr.is_ipv6() == v6)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let with_timeout: Vec<String> = (mine.iter())
            .map(|((addr, port), until)| {
                let secs = until.saturating_duration_since(now).as_secs().max(1);
                format!("{addr} . {port} timeout {secs}s")
            })
            .collect();
        let keys: Vec<String> = (mine.iter())
            .map(|((addr, port), _)| format!("{addr} . {port}"))
            .collect();
        let add = format!(
            "add element inet {TABLE} {set} {{ {} }}\n",
            with_timeout.join(", ")
        );
        out.push_str(&add);
        out.push_str(&format!(
            "delete element inet {TABLE} {set} {{ {} }}\n",
            keys.join(", ")
        ));
        out.push_str(&add);
    }
    out
}

/// Runs `nft -f -` with `script` on its input, killed after [`NFT_TIMEOUT`].
fn run_nft(nft: &str, script: &str) -> Result<(), String> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {nft}: {e}"))?;
    // Read stderr on the side, so a long complaint never fills the pipe
    // and stalls nft; keep its first 4 KiB.
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut all = Vec::new();
            let _ = err.read_to_end(&mut all);
            all.truncate(4096);
            String::from_utf8_lossy(&all).into_owned()
        })
    });
    // Written on the side too: an nft that stops reading cannot hold this
    // thread past the timeout.
    let script = script.to_string();
    let wrote = child
        .stdin
        .take()
        .map(|mut stdin| std::thread::spawn(move || stdin.write_all(script.as_bytes()).is_ok()));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < NFT_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{nft} did not finish in {NFT_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("waiting for {nft}: {e}")),
        }
    };
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    let wrote = wrote.is_some_and(|t| t.join().unwrap_or(false));
    if status.success() && wrote {
        return Ok(());
    }
    Err(format!("{nft} -f - failed ({status}): {}", stderr.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_one_transaction_per_family_that_sets_each_timeout() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        let v4: IpAddr = "20.1.2.3".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let text = script(
            &[((v4, 5831), now + 90 * s), ((v6, 5831), now + 30 * s)],
            now,
        );
        assert_eq!(
            text,
            "add element inet portcullis dns_udp_v4 { 20.1.2.3 . 5831 timeout 90s }\n\
             delete element inet portcullis dns_udp_v4 { 20.1.2.3 . 5831 }\n\
             add element inet portcullis dns_udp_v4 { 20.1.2.3 . 5831 timeout 90s }\n\
             add element inet portcullis dns_udp_v6 { 2001:db8::7 . 5831 timeout 30s }\n\
             delete element inet portcullis dns_udp_v6 { 2001:db8::7 . 5831 }\n\
             add element inet portcullis dns_udp_v6 { 2001:db8::7 . 5831 timeout 30s }\n"
        );
    }

    fn counters() -> Counters {
        let c = |n: &str| IntCounter::new(n, n).unwrap();
        Counters {
            runs_ok: c("ok"),
            runs_failed: c("failed"),
            written: c("written"),
            dropped: c("dropped"),
        }
    }

    #[test]
    fn a_failed_run_is_counted_and_its_elements_are_tried_again() {
        let mut w = Writer {
            nft: "/nonexistent/nft".into(),
            max: 2,
            counters: counters(),
            installed: HashMap::new(),
            last_log: None,
            failures: 0,
        };
        let until = Instant::now() + Duration::from_secs(60);
        let addr: IpAddr = "20.1.2.3".parse().unwrap();
        let mut batch = HashMap::from([((addr, 5831), until)]);
        w.flush(&mut batch);
        w.flush(&mut HashMap::from([((addr, 5831), until)]));
        assert_eq!(w.counters.runs_failed.get(), 2);
        assert_eq!(w.counters.written.get(), 0);
        assert!(w.installed.is_empty());

        // `sort -f -` reads its whole input and succeeds: it stands in for
        // a working nft. Written once, then held.
        w.nft = "sort".into();
        w.flush(&mut HashMap::from([((addr, 5831), until)]));
        w.flush(&mut HashMap::from([((addr, 5831), until)]));
        assert_eq!(w.counters.runs_ok.get(), 1);
        assert_eq!(w.counters.written.get(), 1);
        // A longer lifetime is written again; past `max` new elements are dropped.
        let later = until + Duration::from_secs(60);
        let other: IpAddr = "20.1.2.4".parse().unwrap();
        let third: IpAddr = "20.1.2.5".parse().unwrap();
        w.flush(&mut HashMap::from([
            ((addr, 5831), later),
            ((other, 5831), later),
            ((third, 5831), later),
        ]));
        assert_eq!(w.counters.written.get(), 3);
        assert_eq!(w.counters.dropped.get(), 1);
        assert_eq!(w.installed.len(), 2);
    }
}
