//! DNS listener: answers clients' queries for names some rule allows, refuses the rest, strips ECH, and learns the addresses it answers.
//!
//! In: DNS queries over UDP and TCP (`[listen] dns`) from clients in
//! `[clients] allow` (anyone else is refused: never an open resolver). Out:
//! for a name some active allow rule names (any port, any protocol), the
//! answer of the gateway's own resolvers (`[dns] servers` or
//! `/etc/resolv.conf`; `[resolve]` names from that table), with every
//! address remembered for that name (TTL clamped to `[dns] min_ttl_s` ..
//! `max_ttl_s`, plus `grace_s`) in [`crate::learned`]; HTTPS and SVCB records
//! lose their `ech` parameter, so the client's ClientHello keeps a readable
//! name. For any other name: `REFUSED` (or `NXDOMAIN`, `[dns] refuse`),
//! counted and logged as a denial of `name:53` like any other. ANY, NULL and
//! zone transfers are refused for every name: they serve only tunnels and
//! amplification. The wire format is hickory's; nothing here parses bytes.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::svcb::{SVCB, SvcParamKey};
use hickory_resolver::proto::rr::rdata::{A, AAAA, HTTPS};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::config::RefuseWith;
use crate::gateway::Gateway;
use crate::metrics::{DnsAnswer, Via};
use crate::policy::{Client, Decision, Policy, Reason, Verdict, host};

/// Queries answered at once over UDP; past it a query is dropped (the
/// client retries), so a flood cannot grow memory.
const MAX_UDP_IN_FLIGHT: usize = 1024;
/// TCP connections served at once; past it a connection is closed.
const MAX_TCP_CONNECTIONS: usize = 256;
/// A TCP client that sends nothing this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Payload a UDP answer may fill when the query says nothing (RFC 1035).
const UDP_PLAIN: usize = 512;
/// Payload the listener offers over EDNS (the DNS flag day's value).
const UDP_EDNS: u16 = 1232;
/// TTL of answers from `[resolve]`.
const STATIC_TTL: u32 = 60;

/// Serves DNS over UDP on `socket` until the gateway drains.
pub async fn serve_udp(socket: UdpSocket, gw: Arc<Gateway>) {
    let socket = Arc::new(socket);
    let slots = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    let draining = gw.shutdown.draining();
    tokio::pin!(draining);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(err) => {
                    tracing::debug!(error = %err, "dns: receive failed");
                    continue;
                }
            },
            () = &mut draining => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, gw) = (socket.clone(), gw.clone());
        let mut reply = Box::pin(async move {
            if let Some(reply) = answer(&query, peer, &gw, Some(UDP_PLAIN)).await {
                let _ = socket.send_to(&reply, peer).await;
            }
            drop(permit);
        });
        // Most answers are ready at once (a refusal, `[resolve]`, the
        // resolver's cache): sent from this loop, they cost no task and no
        // hand-over between threads. Only one that waits on the resolvers
        // gets a task of its own (its first real poll registers its waker).
        let mut cx = Context::from_waker(Waker::noop());
        if reply.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(reply);
        }
    }
}

/// Serves DNS over TCP on `listener` until the gateway drains.
pub async fn serve_tcp(listener: TcpListener, gw: Arc<Gateway>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let draining = gw.shutdown.draining();
    tokio::pin!(draining);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    tracing::debug!(error = %err, "dns: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut draining => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            serve_tcp_conn(stream, peer, &gw).await;
            drop(permit);
        });
    }
}

/// Length-prefixed queries, one answer each, until the client stops.
async fn serve_tcp_conn(mut stream: TcpStream, peer: SocketAddr, gw: &Gateway) {
    if gw.policy.load().client_allowed(peer.ip()).is_none() {
        return;
    }
    loop {
        let mut len = [0u8; 2];
        let read = async {
            stream.read_exact(&mut len).await?;
            let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
            stream.read_exact(&mut query).await?;
            Ok::<_, std::io::Error>(query)
        };
        let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read).await else {
            return;
        };
        let Some(reply) = answer(&query, peer, gw, None).await else {
            return;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = n.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// The reply to one query from `peer` (`udp_limit`: the payload a UDP
/// reply may fill without EDNS; `None` over TCP). `None`: no reply at all
/// (not even a header to answer).
async fn answer(
    query: &[u8],
    peer: SocketAddr,
    gw: &Gateway,
    udp_limit: Option<usize>,
) -> Option<Vec<u8>> {
    let policy = gw.policy.load_full();
    let Ok(msg) = Message::from_vec(query) else {
        count(gw, DnsAnswer::Malformed);
        return form_error(query);
    };
    let Some(subnet) = policy.client_allowed(peer.ip()).copied() else {
        count(gw, DnsAnswer::Refused);
        return encode(reply_to(&msg, ResponseCode::Refused), udp_limit, &msg);
    };
    let one_query = msg.metadata.message_type == MessageType::Query
        && msg.metadata.op_code == OpCode::Query
        && msg.queries.len() == 1;
    if !one_query {
        count(gw, DnsAnswer::Malformed);
        return encode(reply_to(&msg, ResponseCode::NotImp), udp_limit, &msg);
    }
    let q = &msg.queries[0];
    let name = host::normalized_or_kept(q.name().to_ascii().trim_end_matches('.'));
    let rtype = q.query_type();
    let client = policy.client(peer.ip());
    let decision = judge(&policy, client, &name, rtype);
    let group = policy.client_group(client);
    gw.count_decision(&subnet, group, Via::Dns, &decision, &name, 53);
    if decision.verdict == Verdict::Deny {
        log_refusal(peer, &policy, &name, rtype, &decision);
        count(gw, DnsAnswer::Refused);
        let code = match policy.dns().refuse {
            RefuseWith::Refused => ResponseCode::Refused,
            RefuseWith::Nxdomain => ResponseCode::NXDomain,
        };
        return encode(reply_to(&msg, code), udp_limit, &msg);
    }
    let mut reply = reply_to(&msg, ResponseCode::NoError);
    let (code, records, how) = resolve(&policy, gw, &name, q.name(), rtype).await;
    reply.metadata.response_code = code;
    count(gw, how);
    learn(gw, &policy, &name, &records);
    reply.add_answers(records);
    encode(reply, udp_limit, &msg)
}

/// Whether `name` may be answered for `rtype`: as the policy says for the
/// name, except ANY, NULL and zone transfers, refused for every name even
/// in audit mode.
fn judge(policy: &Policy, client: Client, name: &str, rtype: RecordType) -> Decision {
    let tunnel_only = matches!(
        rtype,
        RecordType::ANY | RecordType::NULL | RecordType::AXFR | RecordType::IXFR
    );
    if tunnel_only {
        return Decision {
            verdict: Verdict::Deny,
            rule: None,
            reason: Reason::NoRule,
        };
    }
    policy.decide_query(name, client)
}

/// The records for `name`: from `[resolve]` when it is there, else from
/// the resolvers, with ECH removed and TTLs no longer than the cache's.
async fn resolve(
    policy: &Policy,
    gw: &Gateway,
    name: &str,
    qname: &Name,
    rtype: RecordType,
) -> (ResponseCode, Vec<Record>, DnsAnswer) {
    if let Some(addrs) = policy.static_addresses(name) {
        let records = (addrs.iter())
            .filter_map(|ip| match (ip, rtype) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|data| Record::from_rdata(qname.clone(), STATIC_TTL, data))
            .collect();
        return (ResponseCode::NoError, records, DnsAnswer::Answered);
    }
    let mut fqdn = qname.clone();
    fqdn.set_fqdn(true);
    match gw.upstream.lookup_records(fqdn, rtype).await {
        Ok(((answers, until), hit)) => {
            let left = until.saturating_duration_since(Instant::now());
            let left = u32::try_from(left.as_secs()).unwrap_or(u32::MAX);
            let records = (answers.iter())
                .map(|r| {
                    let mut r = strip_ech(r.clone());
                    r.ttl = r.ttl.min(left);
                    r
                })
                .collect();
            let how = if hit {
                DnsAnswer::Cached
            } else {
                DnsAnswer::Answered
            };
            (ResponseCode::NoError, records, how)
        }
        Err(Some(err)) if err.is_nx_domain() => {
            (ResponseCode::NXDomain, Vec::new(), DnsAnswer::Nxdomain)
        }
        Err(Some(err)) if err.is_no_records_found() => {
            (ResponseCode::NoError, Vec::new(), DnsAnswer::Answered)
        }
        Err(err) => {
            tracing::debug!(name, error = ?err.map(|e| e.to_string()), "dns: resolvers failed");
            (ResponseCode::ServFail, Vec::new(), DnsAnswer::Servfail)
        }
    }
}

/// An HTTPS or SVCB record without its `ech` parameter; any other as is.
fn strip_ech(mut r: Record) -> Record {
    let drop_ech = |svcb: &SVCB| {
        let mut svcb = svcb.clone();
        svcb.svc_params
            .retain(|(k, _)| *k != SvcParamKey::EchConfigList);
        svcb
    };
    r.data = match &r.data {
        RData::HTTPS(h) => RData::HTTPS(HTTPS(drop_ech(&h.0))),
        RData::SVCB(s) => RData::SVCB(drop_ech(s)),
        other => other.clone(),
    };
    r
}

/// Remembers every address in `records` for `name` (CNAME targets' too:
/// the client asked for `name`), and hands them to the ruleset's UDP sets
/// (nothing happens there unless a UDP rule allows `name`).
fn learn(gw: &Gateway, policy: &Policy, name: &str, records: &[Record]) {
    let cfg = policy.dns();
    let now = Instant::now();
    let mut evicted = 0;
    let mut answered = Vec::new();
    for r in records {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        let ttl = r.ttl.clamp(cfg.min_ttl_s, cfg.max_ttl_s.max(cfg.min_ttl_s));
        let life = Duration::from_secs(u64::from(ttl) + u64::from(cfg.grace_s));
        evicted += gw.learned.learn(ip, name, life, now);
        answered.push((ip, life));
    }
    gw.nftset.learned(policy, name, &answered);
    gw.metrics.dns_learned_evicted.inc_by(evicted);
    gw.metrics.dns_learned.set(gw.learned.len() as i64);
}

/// A reply header for `query`: same id, question and recursion flag.
fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    reply.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_EDNS);
        reply.edns = Some(edns);
    }
    reply
}

/// The reply's bytes; over UDP, cut to a truncated header when it does
/// not fit what the client can take (it retries over TCP).
fn encode(reply: Message, udp_limit: Option<usize>, query: &Message) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    let Some(plain) = udp_limit else {
        return Some(bytes);
    };
    let limit = query
        .edns
        .as_ref()
        .map_or(plain, |e| usize::from(e.max_payload().min(UDP_EDNS)));
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut cut = reply_to(query, reply.metadata.response_code);
    cut.metadata.truncation = true;
    cut.to_vec().ok()
}

/// FORMERR for bytes that are not a DNS message but carry an id; nothing
/// for fewer than a header's 12 bytes.
fn form_error(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

fn count(gw: &Gateway, answer: DnsAnswer) {
    gw.metrics.dns_answered(answer);
}

/// The denial line, in the shape of the listeners' (`portcullis::deny`).
fn log_refusal(peer: SocketAddr, policy: &Policy, name: &str, rtype: RecordType, d: &Decision) {
    let name = crate::listen::access::shown_host(name);
    let name = name.as_ref();
    tracing::info!(
        target: "portcullis::deny",
        client = %peer,
        via = Via::Dns.as_str(),
        host = name,
        port = 53,
        qtype = %rtype,
        verdict = d.verdict.as_str(),
        rule = "-",
        reason = d.reason.as_str(),
        explain = %format!("portcullis explain {name}"),
        "{}",
        policy.explain(d)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Limits, Source};
    use crate::policy::CompileInput;
    use crate::testing::{Rng, seed};
    use hickory_resolver::proto::op::Query;

    /// A gateway allowing `allowed.test` (from `[resolve]`: no resolver is
    /// ever asked) for clients on loopback.
    fn gateway() -> Gateway {
        let source = Source {
            name: "t.toml".into(),
            text: "[listen]\ndns = \"127.0.0.1:0\"\n[clients]\nallow = [\"127.0.0.0/8\"]\n\
                   [policy]\nprofile = \"none\"\n[[rule]]\nname = \"r\"\nhosts = [\"allowed.test\"]\n\
                   [resolve]\n\"allowed.test\" = [\"20.0.0.1\", \"2001:db8::1\"]\n"
                .into(),
        };
        let config = Config::parse(&source).unwrap();
        let (policy, _) = Policy::compile(&config, &source, &CompileInput::default()).unwrap();
        Gateway::new(policy, Limits::default(), Vec::new())
    }

    fn query_bytes(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    const PEER: &str = "127.0.0.1:5353";

    /// Mutated and random messages: never a panic, and every reply is a
    /// DNS message within the UDP limit, never an answer for a name no
    /// rule allows. Seeded (`PORTCULLIS_SEED`), the seed printed on failure.
    #[tokio::test]
    async fn hostile_messages_get_a_refusal_or_nothing() {
        let gw = gateway();
        let seed = seed();
        let mut rng = Rng(seed);
        let peer: SocketAddr = PEER.parse().unwrap();
        let valid = [
            query_bytes("allowed.test", RecordType::A),
            query_bytes("allowed.test", RecordType::AAAA),
            query_bytes("evil.test", RecordType::TXT),
            // A compression pointer to itself where the name should be.
            [
                &query_bytes("a.test", RecordType::A)[..12],
                &[0xc0, 12, 0, 1, 0, 1][..],
            ]
            .concat(),
        ];
        for round in 0..4000 {
            let mut bytes = rng.pick(&valid).clone();
            match rng.below(4) {
                0 => {
                    for _ in 0..=rng.below(4) {
                        let i = rng.below(bytes.len());
                        bytes[i] = rng.byte();
                    }
                }
                1 => bytes.truncate(rng.below(bytes.len())),
                2 => bytes.extend((0..rng.below(600)).map(|_| rng.byte())),
                _ => bytes = (0..rng.below(80)).map(|_| rng.byte()).collect(),
            }
            let Some(reply) = answer(&bytes, peer, &gw, Some(UDP_PLAIN)).await else {
                continue;
            };
            assert!(
                reply.len() <= UDP_EDNS as usize,
                "seed {seed} round {round}: {} bytes",
                reply.len()
            );
            let reply = Message::from_vec(&reply)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: reply does not parse: {e}"));
            for r in &reply.answers {
                let name = r.name.to_ascii().to_ascii_lowercase();
                assert_eq!(
                    name, "allowed.test.",
                    "seed {seed} round {round}: answered {name}"
                );
            }
        }
        // The answers stayed bounded: nothing learned but the allowed name's two addresses.
        assert!(gw.learned.len() <= 2, "seed {seed}: {}", gw.learned.len());
    }

    #[tokio::test]
    async fn an_answer_too_large_for_udp_is_truncated_for_a_retry_over_tcp() {
        let source = Source {
            name: "t.toml".into(),
            text: format!(
                "[listen]\ndns = \"127.0.0.1:0\"\n[clients]\nallow = [\"127.0.0.0/8\"]\n\
                 [policy]\nprofile = \"none\"\n[[rule]]\nname = \"r\"\nhosts = [\"big.test\"]\n\
                 [resolve]\n\"big.test\" = [{}]\n",
                (1..=60)
                    .map(|i| format!("\"20.0.1.{i}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let config = Config::parse(&source).unwrap();
        let (policy, _) = Policy::compile(&config, &source, &CompileInput::default()).unwrap();
        let gw = Gateway::new(policy, Limits::default(), Vec::new());
        let peer: SocketAddr = PEER.parse().unwrap();
        let q = query_bytes("big.test", RecordType::A);
        let udp =
            Message::from_vec(&answer(&q, peer, &gw, Some(UDP_PLAIN)).await.unwrap()).unwrap();
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = Message::from_vec(&answer(&q, peer, &gw, None).await.unwrap()).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 60);
    }
}
