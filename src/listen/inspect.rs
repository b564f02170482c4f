//! Inspect: an allowed tunnel carries exactly what was decided, checked on its first client bytes.
//!
//! In: an answered CONNECT (to a name or an address), its decision and the
//! bytes the client sends first (bounded in size by `sniff_max_bytes` and
//! in time by `sniff_timeout_ms`). Out: what to do with the tunnel:
//! - a TLS ClientHello whose SNI agrees (name CONNECT: the same name after
//!   normalisation; address CONNECT: a name some rule allows on that port,
//!   or any name when the address rule says `sni = "any"`), or one without
//!   SNI: relay it;
//! - HTTP/1 requests: serve them one by one, each checked (`http_relay`);
//! - anything else (other protocol, a server that speaks first, too slow,
//!   too large, malformed, an SNI split across records): cut, unless the
//!   rule says `opaque = true`.
//!
//! `[policy] require_matching_sni = false` turns the check off. It never
//! dials and never writes to the client: the caller answers a cut.

use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::respond::Speech;
use crate::classify::{self, Classified, OpaqueReason};
use crate::config::Protocol;
use crate::gateway::Gateway;
use crate::policy::{Client, Decision, Dest, Policy, Reason, Target, Verdict, host};
use crate::tunnel::CloseReason;

/// What an allowed tunnel's first bytes call for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried {
    /// Relay as is: a ClientHello that agrees, or traffic the rule lets through unchecked.
    Relay,
    /// HTTP/1 requests: each must name the tunnel's host.
    Http,
    /// The bytes disagree with the decision: cut, for this reason.
    Cut {
        /// `sni_mismatch` or `sni_unreadable`.
        reason: Reason,
        /// How the client is told (a TLS alert when it sent TLS).
        speech: Speech,
        /// The TLS name it sent, if any.
        sni: Option<String>,
    },
    /// The client left before a byte, or nobody spoke until the idle timeout.
    Ended(CloseReason),
}

/// The tunnel being inspected.
pub struct Tunnel<'a> {
    /// The CONNECT host, normalised (an IP literal's canonical text for an address).
    pub host: &'a str,
    /// The CONNECT port.
    pub port: u16,
    /// The decision that allowed it.
    pub decision: &'a Decision,
    /// The client it was decided for (an SNI must be a name allowed for it).
    pub client: Client,
}

/// Reads and judges the tunnel's first client bytes; `prefix` keeps them
/// for the relay, `ech` says whether the ClientHello carried ECH.
pub async fn first_bytes(
    gw: &Gateway,
    policy: &Policy,
    tunnel: &Tunnel<'_>,
    client: &mut TcpStream,
    upstream: &TcpStream,
    prefix: &mut BytesMut,
    ech: &mut bool,
) -> Carried {
    if !policy.require_matching_sni() {
        return Carried::Relay;
    }
    let opaque_ok = tunnel
        .decision
        .rule
        .is_some_and(|id| policy.rule(id).opaque);
    let unreadable = |speech| Carried::Cut {
        reason: Reason::SniUnreadable,
        speech,
        sni: None,
    };
    if prefix.is_empty() {
        let idle = Duration::from_millis(gw.limits.idle_timeout_ms);
        // `peek`, not `readable`: readiness left over from the CONNECT head
        // would wake at once, and a silent client be judged on no bytes.
        let (mut one, mut theirs) = ([0u8; 1], [0u8; 1]);
        tokio::select! {
            r = client.peek(&mut one) => match r {
                Ok(0) => return Carried::Ended(CloseReason::ClientClosed),
                Ok(_) => {}
                Err(_) => return Carried::Ended(CloseReason::ClientError),
            },
            // A server that speaks first: no name will come from the client.
            // (An upstream that closed or failed instead ends the tunnel.)
            r = upstream.peek(&mut theirs) => {
                return match r {
                    Ok(0) => Carried::Ended(CloseReason::UpstreamClosed),
                    Err(_) => Carried::Ended(CloseReason::UpstreamError),
                    Ok(_) if opaque_ok => Carried::Relay,
                    Ok(_) => unreadable(Speech::Opaque),
                };
            }
            () = tokio::time::sleep(idle) => return Carried::Ended(CloseReason::IdleTimeout),
        }
    }
    let timeout = Duration::from_millis(gw.limits.sniff_timeout_ms);
    let classified =
        match classify::read_classified(client, prefix, gw.limits.sniff_max_bytes, timeout).await {
            Ok(c) => c,
            Err(_) => return Carried::Ended(CloseReason::ClientError),
        };
    match classified {
        Classified::Tls { sni, ech: e } => {
            *ech = e;
            match sni {
                Some(sni) if !sni_agrees(policy, tunnel, &sni) => Carried::Cut {
                    reason: Reason::SniMismatch,
                    speech: Speech::Tls,
                    sni: Some(sni),
                },
                _ => Carried::Relay,
            }
        }
        Classified::Http { .. } => Carried::Http,
        Classified::Opaque(OpaqueReason::Eof) if prefix.is_empty() => {
            Carried::Ended(CloseReason::ClientClosed)
        }
        Classified::Opaque(_) if opaque_ok => Carried::Relay,
        Classified::Opaque(_) => {
            let speech = if prefix.first() == Some(&0x16) {
                Speech::Tls
            } else {
                Speech::Opaque
            };
            unreadable(speech)
        }
    }
}

/// Name CONNECT: the SNI is the CONNECT name. Address CONNECT: the address
/// rule accepts any name, or the SNI is a name some rule allows on the port.
fn sni_agrees(policy: &Policy, tunnel: &Tunnel<'_>, sni: &str) -> bool {
    let Ok(name) = host::normalize(sni) else {
        return false;
    };
    match Target::parse(tunnel.host) {
        Target::Name(h) => name == h,
        Target::Ip(_) => {
            let any = tunnel
                .decision
                .rule
                .is_some_and(|id| policy.rule(id).any_sni);
            any || policy
                .decide_for(
                    &Dest {
                        target: Target::Name(&name),
                        port: tunnel.port,
                        proto: Protocol::Tcp,
                    },
                    tunnel.client,
                )
                .verdict
                == Verdict::Allow
        }
    }
}
