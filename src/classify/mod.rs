//! Connection classification: the client's first bytes → what the connection is.
//!
//! This stage looks at the bytes a client sends first on an intercepted
//! connection and answers one of four things ([`Sniff`]):
//!
//! * a TLS ClientHello, with its `server_name` (SNI) and whether it carries an
//!   `encrypted_client_hello` extension;
//! * an HTTP/1.x request head, with its method, request-target and `Host`;
//! * "opaque" (not TLS, not HTTP/1, malformed or oversized), with a reason,
//!   so that the caller decides by destination address alone;
//! * "incomplete": more bytes are needed before anything can be said.
//!
//! **Input:** a prefix of the client's byte stream and a byte budget
//! (`max_len`); [`read_classified`] does the reading for an async stream, with
//! a deadline, and leaves every byte it read in the caller's buffer so that the
//! caller can replay them upstream unchanged.
//!
//! **Output:** the answer above. Names are returned *as sent*: the SNI is
//! checked to be a plausible ASCII host name but not lowercased, the `Host`
//! value is trimmed of whitespace but otherwise untouched. Normalisation and
//! every allow/deny decision belong to the caller.
//!
//! **What it must not do:** it never sees policy, never resolves names, never
//! writes to the client, never panics on any input, and never allocates while
//! parsing: every answer borrows from the input. The only allocations are the
//! owned strings of [`Classified`] (the returned host and friends) and the
//! growth of the caller's buffer in [`read_classified`]. Every length field
//! read from the wire is bounds-checked and capped before it is used.
//!
//! Layout: this file holds the public answer types, the protocol detection
//! on the first bytes, the incremental sniffer and the bounded, timed read
//! loop; `tls.rs` parses TLS records and the ClientHello (SNI, ECH), `http.rs`
//! the HTTP/1.x request head. Each parser's strictness choices (all
//! deliberate, all tested) are listed in its own module docs.

use std::fmt;
use std::io;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

mod http;
mod tls;
#[cfg(test)]
mod tests;

use http::{HeadScan, scan_method};
pub use http::{HttpHead, HttpHeadError, MAX_HTTP_METHOD_LEN, parse_http_head};
use tls::{CONTENT_TYPE_HANDSHAKE, Progress, client_hello_progress};
pub use tls::{
    ClientHelloInfo, HelloError, MAX_CLIENT_HELLO_LEN, MAX_TLS_RECORD_LEN, TLS_ACCESS_DENIED_ALERT,
    parse_client_hello,
};

/// Growth step of the read buffer in [`read_classified`].
const READ_CHUNK: usize = 4096;

/// Result of sniffing a prefix of the client's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff<'a> {
    /// Need more bytes to decide.
    Incomplete,
    /// A TLS ClientHello. `sni` is the server_name (host_name type) as sent,
    /// ASCII-validated but not lowercased; None when there is no SNI extension.
    Tls {
        /// The `host_name` from the `server_name` extension, as sent.
        sni: Option<&'a str>,
        /// Whether an `encrypted_client_hello` (0xfe0d) extension is present.
        ech: bool,
    },
    /// An HTTP/1.x request head (complete through CRLFCRLF). host = the single
    /// Host header value (may include :port), None if absent.
    Http {
        /// The request method token, e.g. `GET` or `CONNECT`.
        method: &'a str,
        /// The request-target as sent (origin, absolute, authority or asterisk form).
        target: &'a str,
        /// The `Host` field value trimmed of OWS; `None` when there is no `Host`.
        host: Option<&'a str>,
    },
    /// Not TLS, not HTTP/1, or malformed/oversized: decide by address.
    Opaque(OpaqueReason),
}

/// Why a connection could not be classified as TLS or HTTP/1.x.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpaqueReason {
    /// The first bytes are neither a TLS handshake record nor an HTTP method.
    NotTlsOrHttp,
    /// Starts like a TLS handshake but the records or ClientHello are invalid.
    MalformedTls,
    /// Starts like an HTTP request but the head is invalid.
    MalformedHttp,
    /// An HTTP request head with more than one `Host` field.
    DuplicateHost,
    /// A request line naming an HTTP version other than 1.x (e.g. the HTTP/2
    /// prior-knowledge preface `PRI * HTTP/2.0`).
    UnsupportedHttpVersion,
    /// The budget (`max_len`, or [`MAX_CLIENT_HELLO_LEN`]) ran out before a
    /// decision.
    TooLarge,
    /// The client sent too little before the deadline ([`read_classified`] only).
    Timeout,
    /// The client closed before a decision ([`read_classified`] only).
    Eof,
}

impl OpaqueReason {
    /// Stable snake_case label, suitable for logs and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            OpaqueReason::NotTlsOrHttp => "not_tls_or_http",
            OpaqueReason::MalformedTls => "malformed_tls",
            OpaqueReason::MalformedHttp => "malformed_http",
            OpaqueReason::DuplicateHost => "duplicate_host",
            OpaqueReason::UnsupportedHttpVersion => "unsupported_http_version",
            OpaqueReason::TooLarge => "too_large",
            OpaqueReason::Timeout => "timeout",
            OpaqueReason::Eof => "eof",
        }
    }
}

impl fmt::Display for OpaqueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An owned classification, returned by [`read_classified`]; it borrows
/// nothing, so the caller is free to replay the read buffer upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// A TLS ClientHello (see [`Sniff::Tls`]).
    Tls {
        /// The SNI host name as sent, if any.
        sni: Option<String>,
        /// Whether an `encrypted_client_hello` extension is present.
        ech: bool,
    },
    /// An HTTP/1.x request head (see [`Sniff::Http`]).
    Http {
        /// The trimmed `Host` value, if any.
        host: Option<String>,
        /// The request method.
        method: String,
        /// The request-target as sent.
        target: String,
    },
    /// Decide by address; includes [`OpaqueReason::Timeout`] and
    /// [`OpaqueReason::Eof`].
    Opaque(OpaqueReason),
}

impl Classified {
    /// The owned form of a decided [`Sniff`]; `None` for [`Sniff::Incomplete`].
    pub fn from_sniff(sniff: Sniff<'_>) -> Option<Classified> {
        match sniff {
            Sniff::Incomplete => None,
            Sniff::Tls { sni, ech } => Some(Classified::Tls {
                sni: sni.map(str::to_owned),
                ech,
            }),
            Sniff::Http {
                method,
                target,
                host,
            } => Some(Classified::Http {
                host: host.map(str::to_owned),
                method: method.to_owned(),
                target: target.to_owned(),
            }),
            Sniff::Opaque(reason) => Some(Classified::Opaque(reason)),
        }
    }
}

/// Classify a prefix of the client's first bytes.
///
/// Only `buf[..max_len]` is examined. The answer is [`Sniff::Incomplete`]
/// while more bytes could still change it, and becomes
/// [`OpaqueReason::TooLarge`] once `max_len` bytes are not enough (or a
/// ClientHello declares a size that cannot fit). A valid stream never gets
/// a wrong or opaque answer for one of its prefixes. `max_len` should be at
/// least 16 KiB + 64 so that a maximal ClientHello in a few records fits.
///
/// The first bytes decide the protocol as early as possible: `0x16 0x03` is
/// TLS, `0x16` followed by anything else is opaque; an uppercase letter
/// starting a token of at most [`MAX_HTTP_METHOD_LEN`] token characters
/// (RFC 9110 §5.6.2) followed by SP is HTTP; anything else is opaque.
pub fn sniff(buf: &[u8], max_len: usize) -> Sniff<'_> {
    Sniffer::new(max_len).sniff(buf)
}

/// Read from `stream` into `buf` (bounded by max_len) until `sniff` stops
/// answering Incomplete, or until `timeout` expires (then
/// [`OpaqueReason::Timeout`]) or EOF ([`OpaqueReason::Eof`]).
///
/// Bytes already in `buf` count as the start of the stream. Every byte read
/// stays in `buf` (never more than `max_len` in total), so the caller can
/// replay it upstream. The returned [`Classified`] owns its strings. I/O errors
/// are returned as they are. The whole loop runs under one
/// `tokio::time::timeout`; re-examining a growing HTTP head is incremental, so
/// a client trickling single bytes costs linear, not quadratic, work.
pub async fn read_classified<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
    timeout: Duration,
) -> io::Result<Classified> {
    match tokio::time::timeout(timeout, read_until_decided(stream, buf, max_len)).await {
        Ok(result) => result,
        Err(_elapsed) => Ok(Classified::Opaque(OpaqueReason::Timeout)),
    }
}

async fn read_until_decided<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    max_len: usize,
) -> io::Result<Classified> {
    let mut sniffer = Sniffer::new(max_len);
    loop {
        if let Some(decided) = Classified::from_sniff(sniffer.sniff(&buf[..])) {
            return Ok(decided);
        }
        // Incomplete implies buf.len() < max_len; stay defensive anyway.
        let room = max_len.saturating_sub(buf.len());
        if room == 0 {
            return Ok(Classified::Opaque(OpaqueReason::TooLarge));
        }
        buf.reserve(room.min(READ_CHUNK));
        let mut limited = (&mut *buf).limit(room);
        let n = stream.read_buf(&mut limited).await?;
        if n == 0 {
            return Ok(Classified::Opaque(OpaqueReason::Eof));
        }
    }
}

enum Kind {
    Undecided,
    Tls,
    Http,
    Opaque,
}

/// Decide the protocol from the fewest possible leading bytes.
fn detect(buf: &[u8]) -> Kind {
    match buf.first() {
        None => Kind::Undecided,
        Some(&CONTENT_TYPE_HANDSHAKE) => match buf.get(1) {
            None => Kind::Undecided,
            Some(3) => Kind::Tls,
            Some(_) => Kind::Opaque,
        },
        Some(_) => match scan_method(buf) {
            Ok(Some(_)) => Kind::Http,
            Ok(None) => Kind::Undecided,
            Err(()) => Kind::Opaque,
        },
    }
}

/// [`sniff`] with memory between calls on a growing buffer (same prefix,
/// more bytes): the HTTP head scan resumes where it stopped. A fresh sniffer
/// on the final buffer gives the same kind of answer.
struct Sniffer {
    max_len: usize,
    head: HeadScan,
}

impl Sniffer {
    fn new(max_len: usize) -> Self {
        Sniffer {
            max_len,
            head: HeadScan::default(),
        }
    }

    fn sniff<'a>(&mut self, buf: &'a [u8]) -> Sniff<'a> {
        let at_cap = buf.len() >= self.max_len;
        let view = buf.get(..self.max_len).unwrap_or(buf);
        let undecided = if at_cap {
            Sniff::Opaque(OpaqueReason::TooLarge)
        } else {
            Sniff::Incomplete
        };
        match detect(view) {
            Kind::Undecided => undecided,
            Kind::Opaque => Sniff::Opaque(OpaqueReason::NotTlsOrHttp),
            Kind::Tls => match client_hello_progress(view) {
                Ok(Progress::Done(info)) => Sniff::Tls {
                    sni: info.sni,
                    ech: info.ech,
                },
                Ok(Progress::Need(min_total)) => {
                    if at_cap || min_total > self.max_len {
                        Sniff::Opaque(OpaqueReason::TooLarge)
                    } else {
                        Sniff::Incomplete
                    }
                }
                // `detect` saw 0x16 0x03, so NotHandshake cannot happen; it
                // would still be a malformed TLS start.
                Err(HelloError::NotHandshake) => Sniff::Opaque(OpaqueReason::MalformedTls),
                Err(e) => Sniff::Opaque(e.reason()),
            },
            Kind::Http => match self.head.step(view) {
                Ok(Some(head)) => Sniff::Http {
                    method: head.method,
                    target: head.target,
                    host: head.host,
                },
                Ok(None) => undecided,
                Err(e) => Sniff::Opaque(e.reason()),
            },
        }
    }
}
