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
//! Strictness choices (all deliberate, all tested):
//!
//! * TLS records must be `handshake` (22), legacy version `0x0300..=0x0304`,
//!   and 1..=2^14 bytes long (RFC 8446 §5.1 / RFC 5246 §6.2.1). The ClientHello
//!   may be fragmented over any number of records and TCP segments; it is
//!   reassembled without allocation, but if the host name bytes themselves
//!   straddle a record boundary the hello is reported as malformed (no real
//!   client does that; the caller then falls back to the address).
//! * The `server_name` extension must hold exactly one `host_name` entry
//!   (RFC 6066 §3) of 1..=255 bytes drawn from letters, digits, `-`, `.` and
//!   `_`; duplicate `server_name` or `encrypted_client_hello` extensions are
//!   malformed (RFC 8446 §4.2).
//! * HTTP lines must end in CRLF. A bare LF or bare CR is rejected as
//!   malformed rather than tolerated (RFC 9112 §2.2 permits either; rejecting
//!   leaves no room for request-smuggling disagreements with the upstream).
//!   obs-fold is rejected (RFC 9112 §5.2), as is whitespace before a field
//!   name's colon (RFC 9112 §5.1). Two `Host` fields are
//!   [`OpaqueReason::DuplicateHost`]. A missing `Host` is *not* an error here
//!   (HTTP/1.0 needs none); the caller decides what that means.

use std::fmt;
use std::io;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

#[cfg(test)]
mod tests;

/// Largest TLS plaintext record fragment: 2^14 bytes (RFC 8446 §5.1,
/// RFC 5246 §6.2.1). Longer handshake records are malformed.
pub const MAX_TLS_RECORD_LEN: usize = 1 << 14;

/// Largest ClientHello body accepted (the 24-bit handshake length of
/// RFC 8446 §4, capped). Real hellos are 0.2–2 KB, post-quantum key shares
/// included; anything larger is reported as [`OpaqueReason::TooLarge`].
pub const MAX_CLIENT_HELLO_LEN: usize = 16 * 1024;

/// Longest HTTP method accepted (RFC 9110 §9.1 allows any token; longer
/// tokens are treated as "not HTTP").
pub const MAX_HTTP_METHOD_LEN: usize = 16;

/// TLS alert record: fatal access_denied (RFC 8446 §6.2, AlertDescription 49),
/// sent before closing a denied TLS connection.
pub const TLS_ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// TLS ContentType `handshake` (RFC 8446 §5.1).
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// HandshakeType `client_hello` (RFC 8446 §4).
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// ExtensionType `server_name` (RFC 6066 §3).
const EXT_SERVER_NAME: u16 = 0;
/// ExtensionType `encrypted_client_hello` (draft-ietf-tls-esni / RFC 9849).
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
/// NameType `host_name` (RFC 6066 §3).
const NAME_TYPE_HOST_NAME: u8 = 0;
/// Smallest possible ClientHello body: version(2) + random(32) +
/// session_id length(1) + cipher_suites length(2) + one suite(2) +
/// compression length(1) + one method(1) (RFC 5246 §7.4.1.2).
const MIN_CLIENT_HELLO_LEN: usize = 41;
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

/// What a complete ClientHello says that this stage cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHelloInfo<'a> {
    /// The `host_name` from the `server_name` extension, as sent (validated
    /// ASCII, not lowercased); `None` when the extension is absent.
    pub sni: Option<&'a str>,
    /// Whether an `encrypted_client_hello` (0xfe0d) extension is present.
    pub ech: bool,
}

/// Why bytes are not a usable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first record is not a TLS handshake record.
    #[error("not a TLS handshake record")]
    NotHandshake,
    /// The records or the ClientHello violate the TLS wire format.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello declares more than [`MAX_CLIENT_HELLO_LEN`] bytes.
    #[error("ClientHello larger than {} bytes", MAX_CLIENT_HELLO_LEN)]
    TooLarge,
}

/// A complete HTTP/1.x request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpHead<'a> {
    /// The method token (RFC 9110 §9.1), e.g. `GET`.
    pub method: &'a str,
    /// The request-target as sent (RFC 9112 §3.2).
    pub target: &'a str,
    /// `x` in `HTTP/1.x` (RFC 9112 §2.3).
    pub version_minor: u8,
    /// The single `Host` field value, trimmed of OWS (RFC 9112 §3.2); may carry
    /// `:port` and may be empty; `None` when absent.
    pub host: Option<&'a str>,
    /// A `Content-Length` or `Transfer-Encoding` field is present (the
    /// message declares a body).
    pub framed: bool,
    /// Length of the head including the final CRLFCRLF; the body (if any)
    /// starts at this offset.
    pub head_len: usize,
}

/// Why bytes are not a usable HTTP/1.x request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpHeadError {
    /// The request line or a header field violates RFC 9112.
    #[error("malformed HTTP request head: {0}")]
    Malformed(&'static str),
    /// More than one `Host` field (RFC 9112 §3.2 requires rejecting these).
    #[error("more than one Host header field")]
    DuplicateHost,
    /// The request line names a version other than HTTP/1.x.
    #[error("unsupported HTTP version (only HTTP/1.x is parsed)")]
    UnsupportedVersion,
}

impl HttpHeadError {
    /// The [`OpaqueReason`] a caller should record for this error.
    pub fn reason(&self) -> OpaqueReason {
        match self {
            HttpHeadError::Malformed(_) => OpaqueReason::MalformedHttp,
            HttpHeadError::DuplicateHost => OpaqueReason::DuplicateHost,
            HttpHeadError::UnsupportedVersion => OpaqueReason::UnsupportedHttpVersion,
        }
    }
}

impl HelloError {
    /// The [`OpaqueReason`] a caller should record for this error.
    pub fn reason(&self) -> OpaqueReason {
        match self {
            HelloError::NotHandshake => OpaqueReason::NotTlsOrHttp,
            HelloError::Malformed(_) => OpaqueReason::MalformedTls,
            HelloError::TooLarge => OpaqueReason::TooLarge,
        }
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

/// Parse a TLS ClientHello from the start of `buf` (record header first).
///
/// `Ok(None)` means the bytes so far are a valid prefix and more are needed.
/// The handshake message may be fragmented over several records (RFC 8446
/// §5.1); bytes after the ClientHello are ignored.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHelloInfo<'_>>, HelloError> {
    match client_hello_progress(buf)? {
        Progress::Need(_) => Ok(None),
        Progress::Done(info) => Ok(Some(info)),
    }
}

/// Parse an HTTP/1.x request head from the start of `buf`.
///
/// `Ok(None)` means the bytes so far are a valid prefix of a head and more
/// are needed; the caller bounds how long it keeps trying. Bytes after the
/// head (a body, a pipelined request) are ignored; see
/// [`HttpHead::head_len`].
pub fn parse_http_head(buf: &[u8]) -> Result<Option<HttpHead<'_>>, HttpHeadError> {
    HeadScan::default().step(buf)
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

// ---------------------------------------------------------------------------
// Protocol detection and the (incremental) sniffer
// ---------------------------------------------------------------------------

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

/// Is `b` a `tchar` (RFC 9110 §5.6.2)?
fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// Lookup table for [`is_tchar`].
static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    table
};

/// Look for `method SP` at the start of `buf`: an uppercase letter, then
/// token characters, at most [`MAX_HTTP_METHOD_LEN`] in all.
/// `Ok(Some(len))` = found, `Ok(None)` = valid so far, `Err` = not a method.
fn scan_method(buf: &[u8]) -> Result<Option<usize>, ()> {
    for (i, &b) in buf.iter().enumerate().take(MAX_HTTP_METHOD_LEN + 1) {
        if b == b' ' {
            return if i == 0 { Err(()) } else { Ok(Some(i)) };
        }
        let ok = if i == 0 {
            b.is_ascii_uppercase()
        } else {
            is_tchar(b)
        };
        if !ok {
            return Err(());
        }
    }
    if buf.len() > MAX_HTTP_METHOD_LEN {
        Err(())
    } else {
        Ok(None)
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

// ---------------------------------------------------------------------------
// TLS: records → handshake message → ClientHello
// ---------------------------------------------------------------------------

enum Progress<'a> {
    /// Valid so far; at least this many bytes in total are needed to finish.
    Need(usize),
    Done(ClientHelloInfo<'a>),
}

/// Where the complete handshake message lies in the record stream.
struct Located {
    /// Message length including its 4-byte handshake header.
    msg_len: usize,
    /// Number of records it spans.
    records: usize,
}

fn client_hello_progress(buf: &[u8]) -> Result<Progress<'_>, HelloError> {
    let located = match locate_handshake(buf)? {
        Ok(located) => located,
        Err(min_total) => return Ok(Progress::Need(min_total)),
    };
    let hello = if located.records == 1 {
        // Common case: one record, so the body is contiguous in `buf`
        // (record header 5 bytes + handshake header 4 bytes).
        let body = buf
            .get(9..5 + located.msg_len)
            .ok_or(HelloError::Malformed("internal: record bounds"))?;
        parse_hello_body(body)?
    } else {
        parse_fragmented_hello(buf, located.msg_len)?
    };
    let sni = match hello.sni {
        None => None,
        Some((start, end)) => {
            // Body offsets → handshake-message offsets → offsets in `buf`.
            let (start, end) = map_message_range(buf, start + 4, end + 4).ok_or(
                HelloError::Malformed("server_name host_name split across TLS records"),
            )?;
            let bytes = buf
                .get(start..end)
                .ok_or(HelloError::Malformed("internal: server_name bounds"))?;
            Some(
                std::str::from_utf8(bytes)
                    .map_err(|_| HelloError::Malformed("server_name is not ASCII"))?,
            )
        }
    };
    Ok(Progress::Done(ClientHelloInfo {
        sni,
        ech: hello.ech,
    }))
}

/// Check the (possibly partial) 5-byte record header `h` (RFC 8446 §5.1:
/// ContentType type; ProtocolVersion legacy_record_version; uint16 length).
fn check_record_header(h: &[u8], first: bool) -> Result<(), HelloError> {
    if let Some(&content_type) = h.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        return Err(if first {
            HelloError::NotHandshake
        } else {
            HelloError::Malformed(
                "non-handshake record before the ClientHello ended (RFC 8446 §5.1)",
            )
        });
    }
    if let Some(&major) = h.get(1)
        && major != 3
    {
        return Err(HelloError::Malformed(
            "record legacy_version major is not 3",
        ));
    }
    if let Some(&minor) = h.get(2)
        && minor > 4
    {
        return Err(HelloError::Malformed(
            "record legacy_version outside 0x0300..=0x0304",
        ));
    }
    Ok(())
}

/// Check the 4-byte handshake header (RFC 8446 §4: HandshakeType msg_type;
/// uint24 length) and return the whole message length, header included.
fn check_handshake_header(h: [u8; 4]) -> Result<usize, HelloError> {
    if h[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::Malformed(
            "first handshake message is not a ClientHello",
        ));
    }
    let len = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
    if len > MAX_CLIENT_HELLO_LEN {
        return Err(HelloError::TooLarge);
    }
    if len < MIN_CLIENT_HELLO_LEN {
        return Err(HelloError::Malformed(
            "ClientHello shorter than its fixed fields",
        ));
    }
    Ok(4 + len)
}

/// Read a record's uint16 length (RFC 8446 §5.1, RFC 5246 §6.2.1) and cap it:
/// 1..=2^14 (zero-length handshake fragments are forbidden, RFC 8446 §5.1).
fn record_len(h: &[u8]) -> Result<usize, HelloError> {
    let (Some(&hi), Some(&lo)) = (h.get(3), h.get(4)) else {
        return Err(HelloError::Malformed("internal: short record header"));
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 {
        return Err(HelloError::Malformed("zero-length handshake record"));
    }
    if len > MAX_TLS_RECORD_LEN {
        return Err(HelloError::Malformed("record longer than 2^14 bytes"));
    }
    Ok(len)
}

/// Walk the records at the start of `buf` until one complete handshake
/// message has been seen. `Ok(Err(n))`: valid so far, at least `n` bytes in
/// total are needed.
fn locate_handshake(buf: &[u8]) -> Result<Result<Located, usize>, HelloError> {
    let mut off = 0usize;
    let mut header = [0u8; 4];
    let mut have = 0usize; // handshake bytes seen so far
    let mut msg_len: Option<usize> = None;
    let mut records = 0usize;
    loop {
        let missing = match msg_len {
            Some(total) => total - have,
            None => 4 - have,
        };
        let rest = buf.get(off..).unwrap_or(&[]);
        let Some(rec_header) = rest.get(..5) else {
            check_record_header(rest, off == 0)?;
            return Ok(Err(off + 5 + missing));
        };
        check_record_header(rec_header, off == 0)?;
        let len = record_len(rec_header)?;
        records += 1;
        let frag_start = off + 5;
        let frag_end = frag_start + len;
        let mut frag = buf.get(frag_start..frag_end.min(buf.len())).unwrap_or(&[]);
        while msg_len.is_none() {
            let Some((&b, tail)) = frag.split_first() else {
                break;
            };
            frag = tail;
            if let Some(slot) = header.get_mut(have) {
                *slot = b;
            }
            have += 1;
            if have == 4 {
                msg_len = Some(check_handshake_header(header)?);
            }
        }
        if let Some(total) = msg_len {
            have += frag.len().min(total - have);
            if have == total {
                return Ok(Ok(Located {
                    msg_len: total,
                    records,
                }));
            }
        }
        if frag_end > buf.len() {
            let missing = match msg_len {
                Some(total) => total - have,
                None => 4 - have,
            };
            return Ok(Err(buf.len() + missing));
        }
        off = frag_end;
    }
}

/// Reassemble a handshake message spread over several (already validated)
/// records into a stack buffer and parse it. Kept out of line so the
/// single-record path does not carry the 16 KiB frame.
#[inline(never)]
fn parse_fragmented_hello(buf: &[u8], msg_len: usize) -> Result<ParsedHello, HelloError> {
    let mut msg = [0u8; MAX_CLIENT_HELLO_LEN + 4];
    let out = msg
        .get_mut(..msg_len)
        .ok_or(HelloError::Malformed("internal: message length"))?;
    let mut filled = 0usize;
    let mut off = 0usize;
    while filled < out.len() {
        let len = record_len(buf.get(off..).unwrap_or(&[]))?;
        let frag_start = off + 5;
        let frag = buf
            .get(frag_start..(frag_start + len).min(buf.len()))
            .unwrap_or(&[]);
        let take = frag.len().min(out.len() - filled);
        match (out.get_mut(filled..filled + take), frag.get(..take)) {
            (Some(dst), Some(src)) if take > 0 => dst.copy_from_slice(src),
            _ => return Err(HelloError::Malformed("internal: reassembly")),
        }
        filled += take;
        off = frag_start + len;
    }
    let body = out
        .get(4..)
        .ok_or(HelloError::Malformed("internal: message length"))?;
    parse_hello_body(body)
}

/// Map the handshake-message byte range `start..end` to a contiguous range
/// of `buf`, or `None` if it straddles a record boundary.
fn map_message_range(buf: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let mut off = 0usize;
    let mut msg_pos = 0usize; // message offset of the current fragment's first byte
    loop {
        let len = record_len(buf.get(off..)?).ok()?;
        let frag_start = off + 5;
        if start < msg_pos + len {
            if start < msg_pos || end > msg_pos + len {
                return None;
            }
            return Some((frag_start + (start - msg_pos), frag_start + (end - msg_pos)));
        }
        msg_pos += len;
        off = frag_start + len;
    }
}

/// The parts of a ClientHello body we keep, as offsets into the body.
struct ParsedHello {
    sni: Option<(usize, usize)>,
    ech: bool,
}

/// Bounds-checked big-endian cursor over `buf[pos..end]`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    fn skip(&mut self, n: usize, what: &'static str) -> Result<usize, HelloError> {
        if n > self.end - self.pos {
            return Err(HelloError::Malformed(what));
        }
        let at = self.pos;
        self.pos += n;
        Ok(at)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        let at = self.skip(1, what)?;
        self.buf.get(at).copied().ok_or(HelloError::Malformed(what))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let at = self.skip(2, what)?;
        match self.buf.get(at..at + 2) {
            Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
            _ => Err(HelloError::Malformed(what)),
        }
    }

    /// Split off the next `n` bytes as their own reader.
    fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, HelloError> {
        let at = self.skip(n, what)?;
        Ok(Reader {
            buf: self.buf,
            pos: at,
            end: at + n,
        })
    }
}

/// Parse a ClientHello body (RFC 8446 §4.1.2; RFC 5246 §7.4.1.2 for TLS 1.2
/// hellos without extensions).
fn parse_hello_body(body: &[u8]) -> Result<ParsedHello, HelloError> {
    let mut r = Reader::new(body);
    // ProtocolVersion legacy_version: any 0x03XX (RFC 5246 Appendix E.1).
    let version = r.u16("truncated legacy_version")?;
    if version >> 8 != 3 {
        return Err(HelloError::Malformed("legacy_version major is not 3"));
    }
    // Random random[32].
    r.skip(32, "truncated random")?;
    // opaque legacy_session_id<0..32>.
    let sid_len = usize::from(r.u8("truncated legacy_session_id")?);
    if sid_len > 32 {
        return Err(HelloError::Malformed("legacy_session_id longer than 32"));
    }
    r.skip(sid_len, "truncated legacy_session_id")?;
    // CipherSuite cipher_suites<2..2^16-2>: non-empty, whole 2-byte suites.
    let cs_len = usize::from(r.u16("truncated cipher_suites")?);
    if cs_len < 2 || !cs_len.is_multiple_of(2) {
        return Err(HelloError::Malformed(
            "cipher_suites length not even and >= 2",
        ));
    }
    r.skip(cs_len, "truncated cipher_suites")?;
    // opaque legacy_compression_methods<1..2^8-1>.
    let comp_len = usize::from(r.u8("truncated legacy_compression_methods")?);
    if comp_len == 0 {
        return Err(HelloError::Malformed("empty legacy_compression_methods"));
    }
    r.skip(comp_len, "truncated legacy_compression_methods")?;
    let mut hello = ParsedHello {
        sni: None,
        ech: false,
    };
    if r.is_empty() {
        // TLS 1.2 and earlier may omit the extensions block entirely.
        return Ok(hello);
    }
    // Extension extensions<8..2^16-1> (RFC 8446 §4.1.2); it must end the body.
    let ext_len = usize::from(r.u16("truncated extensions length")?);
    let mut exts = r.sub(ext_len, "extensions overrun the ClientHello")?;
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions block"));
    }
    let mut seen_sni = false;
    while !exts.is_empty() {
        // struct { ExtensionType extension_type; opaque extension_data<0..2^16-1>; }
        // (RFC 8446 §4.2); no type may repeat.
        let ext_type = exts.u16("truncated extension type")?;
        let data_len = usize::from(exts.u16("truncated extension length")?);
        let mut data = exts.sub(data_len, "extension overruns the extensions block")?;
        match ext_type {
            EXT_SERVER_NAME => {
                if seen_sni {
                    return Err(HelloError::Malformed("duplicate server_name extension"));
                }
                seen_sni = true;
                hello.sni = Some(parse_server_name(&mut data)?);
            }
            EXT_ENCRYPTED_CLIENT_HELLO => {
                if hello.ech {
                    return Err(HelloError::Malformed(
                        "duplicate encrypted_client_hello extension",
                    ));
                }
                hello.ech = true;
            }
            _ => {}
        }
    }
    Ok(hello)
}

/// Parse `server_name` extension_data (RFC 6066 §3): a ServerNameList
/// `<1..2^16-1>` holding exactly one ServerName of type host_name, whose
/// HostName is `opaque<1..2^16-1>`, capped here to 255 bytes of letters,
/// digits, `-`, `.` and `_`. Returns the name's range in the body.
fn parse_server_name(data: &mut Reader<'_>) -> Result<(usize, usize), HelloError> {
    let list_len = usize::from(data.u16("truncated server_name_list length")?);
    let mut list = data.sub(list_len, "server_name_list overruns its extension")?;
    if !data.is_empty() {
        return Err(HelloError::Malformed("bytes after server_name_list"));
    }
    if list.is_empty() {
        return Err(HelloError::Malformed("empty server_name_list"));
    }
    let name_type = list.u8("truncated server_name name_type")?;
    if name_type != NAME_TYPE_HOST_NAME {
        return Err(HelloError::Malformed("server_name entry is not host_name"));
    }
    let name_len = usize::from(list.u16("truncated host_name length")?);
    let start = list.skip(name_len, "host_name overruns server_name_list")?;
    if !list.is_empty() {
        return Err(HelloError::Malformed(
            "more than one server_name entry (RFC 6066 §3)",
        ));
    }
    if name_len == 0 || name_len > 255 {
        return Err(HelloError::Malformed("host_name length not in 1..=255"));
    }
    let name = list
        .buf
        .get(start..start + name_len)
        .ok_or(HelloError::Malformed("internal: host_name bounds"))?;
    if !name.iter().all(|&b| is_sni_byte(b)) {
        return Err(HelloError::Malformed(
            "host_name has a byte outside [A-Za-z0-9._-]",
        ));
    }
    Ok((start, start + name_len))
}

fn is_sni_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

// ---------------------------------------------------------------------------
// HTTP/1.x request head (RFC 9112)
// ---------------------------------------------------------------------------

/// A parsed request line, as offsets into the buffer.
#[derive(Debug, Clone, Copy)]
struct RequestLine {
    method: (usize, usize),
    target: (usize, usize),
    minor: u8,
}

/// Resumable line-by-line scan of a request head. Every complete line is
/// validated once, when its LF arrives; bytes of the unfinished last line
/// are screened once each, so hopeless input is refused early.
#[derive(Debug, Clone, Copy, Default)]
struct HeadScan {
    /// Start of the first line not yet parsed.
    line_start: usize,
    /// Bytes in `line_start..scanned` are screened and hold no LF.
    scanned: usize,
    request: Option<RequestLine>,
    host: Option<(usize, usize)>,
    framed: bool,
}

/// Bytes never allowed anywhere in a head line's content: CTLs other than
/// HTAB (CR only as part of CRLF), and DEL.
fn is_forbidden_byte(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// Does `bytes` hold a [forbidden](is_forbidden_byte) byte? (No early exit,
/// so the loop vectorises.)
fn any_forbidden(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .fold(false, |hit, &b| hit | is_forbidden_byte(b))
}

/// Index of the first LF in `bytes`, testing 16-byte blocks without early
/// exit so that the block test vectorises.
fn find_lf(bytes: &[u8]) -> Option<usize> {
    let mut base = 0;
    for block in bytes.chunks(16) {
        if block.iter().fold(false, |hit, &b| hit | (b == b'\n')) {
            return block.iter().position(|&b| b == b'\n').map(|i| base + i);
        }
        base += block.len();
    }
    None
}

fn malformed(what: &'static str) -> HttpHeadError {
    HttpHeadError::Malformed(what)
}

impl HeadScan {
    fn step<'a>(&mut self, buf: &'a [u8]) -> Result<Option<HttpHead<'a>>, HttpHeadError> {
        loop {
            let from = self.scanned.max(self.line_start);
            let tail = buf.get(from..).unwrap_or(&[]);
            let Some(i) = find_lf(tail) else {
                self.screen_partial(buf, from)?;
                return Ok(None);
            };
            let lf = from + i;
            let line = buf.get(self.line_start..lf).unwrap_or(&[]);
            // RFC 9112 §2.2: lines end in CRLF; a bare LF is refused.
            let Some(content) = line.strip_suffix(b"\r") else {
                return Err(malformed("bare LF line ending (RFC 9112 §2.2)"));
            };
            // Checked first so that every byte-level fault is `Malformed`,
            // whatever else the line says (keeps answers chunking-independent).
            if any_forbidden(content) {
                return Err(malformed("control character or bare CR in head"));
            }
            match self.request {
                None => self.request = Some(parse_request_line(content, self.line_start)?),
                Some(request) if content.is_empty() => {
                    return Ok(Some(self.finish(buf, request, lf + 1)?));
                }
                Some(_) => self.header_line(content, self.line_start)?,
            }
            self.line_start = lf + 1;
            self.scanned = lf + 1;
        }
    }

    /// Screen the unfinished last line, bytes `from..` being new.
    fn screen_partial(&mut self, buf: &[u8], from: usize) -> Result<(), HttpHeadError> {
        let new = buf.get(from..).unwrap_or(&[]);
        for (i, &b) in new.iter().enumerate() {
            if b == b'\r' {
                // Only valid if the next byte, once known, is LF (none of the
                // screened bytes is LF, so a known next byte is an error).
                if i + 1 < new.len() {
                    return Err(malformed("bare CR in head (RFC 9112 §2.2)"));
                }
            } else if is_forbidden_byte(b) {
                return Err(malformed("control character in head"));
            }
        }
        let line = buf.get(self.line_start..).unwrap_or(&[]);
        match self.request {
            None => {
                if scan_method(line).is_err() {
                    return Err(malformed("request line does not start with a method"));
                }
            }
            Some(_) => {
                if matches!(line.first(), Some(b' ' | b'\t')) {
                    return Err(malformed("obs-fold line folding (RFC 9112 §5.2)"));
                }
            }
        }
        // A trailing CR is re-screened once its successor arrives.
        self.scanned = if buf.last() == Some(&b'\r') {
            buf.len() - 1
        } else {
            buf.len()
        };
        Ok(())
    }

    /// One `field-line` (RFC 9112 §5): field-name ":" OWS field-value OWS.
    fn header_line(&mut self, content: &[u8], at: usize) -> Result<(), HttpHeadError> {
        if matches!(content.first(), Some(b' ' | b'\t')) {
            return Err(malformed("obs-fold line folding (RFC 9112 §5.2)"));
        }
        let Some(colon) = content.iter().position(|&b| b == b':') else {
            return Err(malformed("header line without a colon"));
        };
        let (name, value) = content.split_at(colon);
        let value = value.get(1..).unwrap_or(&[]);
        // No whitespace between name and colon (RFC 9112 §5.1): the name is a
        // token (RFC 9110 §5.1).
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(malformed("header field name is not a token"));
        }
        // field-value bytes are VCHAR / obs-text / SP / HTAB (RFC 9110 §5.5):
        // exactly the bytes `step` already let through.
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            self.framed = true;
        }
        if !name.eq_ignore_ascii_case(b"host") {
            return Ok(());
        }
        let value_start = at + colon + 1;
        let (lead, trimmed) = trim_ows(value);
        // Host = uri-host [ ":" port ] (RFC 9112 §3.2, RFC 3986 §3.2.2);
        // userinfo ("@") and anything outside these characters is refused.
        if !trimmed.iter().all(|&b| is_host_byte(b)) {
            return Err(malformed("invalid character in Host"));
        }
        if self.host.is_some() {
            return Err(HttpHeadError::DuplicateHost);
        }
        let start = value_start + lead;
        self.host = Some((start, start + trimmed.len()));
        Ok(())
    }

    fn finish<'a>(
        &self,
        buf: &'a [u8],
        request: RequestLine,
        head_len: usize,
    ) -> Result<HttpHead<'a>, HttpHeadError> {
        let host = match self.host {
            Some(range) => Some(ascii_at(buf, range)?),
            None => None,
        };
        Ok(HttpHead {
            method: ascii_at(buf, request.method)?,
            target: ascii_at(buf, request.target)?,
            version_minor: request.minor,
            host,
            framed: self.framed,
            head_len,
        })
    }
}

fn ascii_at(buf: &[u8], (start, end): (usize, usize)) -> Result<&str, HttpHeadError> {
    let bytes = buf
        .get(start..end)
        .ok_or(malformed("internal: head bounds"))?;
    std::str::from_utf8(bytes).map_err(|_| malformed("internal: non-ASCII field"))
}

/// Split leading OWS off `value` and drop trailing OWS (RFC 9110 §5.6.3).
fn trim_ows(value: &[u8]) -> (usize, &[u8]) {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let lead = value.iter().take_while(|b| is_ows(b)).count();
    let rest = value.get(lead..).unwrap_or(&[]);
    let trail = rest.iter().rev().take_while(|b| is_ows(b)).count();
    (lead, rest.get(..rest.len() - trail).unwrap_or(&[]))
}

/// Characters of `uri-host [":" port]`: unreserved, sub-delims, pct-encoded,
/// ":" and the IP-literal brackets (RFC 3986 §3.2.2).
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b'%'
                | b':'
                | b'['
                | b']'
        )
}

/// `request-line = method SP request-target SP HTTP-version` (RFC 9112 §3),
/// with `content` starting at offset `at` of the buffer.
fn parse_request_line(content: &[u8], at: usize) -> Result<RequestLine, HttpHeadError> {
    let Ok(Some(method_len)) = scan_method(content) else {
        return Err(malformed("request line does not start with a method"));
    };
    let rest = content.get(method_len + 1..).unwrap_or(&[]);
    let Some(target_len) = rest.iter().position(|&b| b == b' ') else {
        return Err(malformed("request line without an HTTP version"));
    };
    let (target, version) = rest.split_at(target_len);
    let version = version.get(1..).unwrap_or(&[]);
    // request-target has no whitespace (RFC 9112 §3.2): visible ASCII only.
    let visible = target
        .iter()
        .fold(true, |ok, &b| ok & (0x21..=0x7e).contains(&b));
    if target.is_empty() || !visible {
        return Err(malformed("invalid request-target"));
    }
    // HTTP-version = "HTTP/" DIGIT "." DIGIT (RFC 9112 §2.3).
    let minor = match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            if *major != b'1' {
                return Err(HttpHeadError::UnsupportedVersion);
            }
            minor - b'0'
        }
        _ => return Err(malformed("invalid HTTP-version")),
    };
    let target_start = at + method_len + 1;
    Ok(RequestLine {
        method: (at, at + method_len),
        target: (target_start, target_start + target_len),
        minor,
    })
}
