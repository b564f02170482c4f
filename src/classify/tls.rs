//! TLS ClientHello parser: records → handshake message → ClientHello → SNI.
//!
//! **In:** the first bytes of a client's stream, record header first.
//! **Out:** `Incomplete` (a valid prefix; how many bytes are needed at
//! least), or the `server_name` host name as sent plus whether an
//! `encrypted_client_hello` extension is present, or a [`HelloError`].
//! **Must not:** allocate (the answer borrows from the input; a fragmented
//! hello is reassembled in a stack buffer), panic on any input, trust a
//! length field before capping it, or look at anything but the ClientHello.
//!
//! Strictness choices (all deliberate, all tested in `classify::tests`):
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

use super::OpaqueReason;

/// Largest TLS plaintext record fragment: 2^14 bytes (RFC 8446 §5.1,
/// RFC 5246 §6.2.1). Longer handshake records are malformed.
pub const MAX_TLS_RECORD_LEN: usize = 1 << 14;

/// Largest ClientHello body accepted (the 24-bit handshake length of
/// RFC 8446 §4, capped). Real hellos are 0.2–2 KB, post-quantum key shares
/// included; anything larger is reported as [`OpaqueReason::TooLarge`].
pub const MAX_CLIENT_HELLO_LEN: usize = 16 * 1024;

/// TLS alert record: fatal access_denied (RFC 8446 §6.2, AlertDescription 49),
/// sent before closing a denied TLS connection.
pub const TLS_ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// TLS ContentType `handshake` (RFC 8446 §5.1).
pub(super) const CONTENT_TYPE_HANDSHAKE: u8 = 22;
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

pub(super) enum Progress<'a> {
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

pub(super) fn client_hello_progress(buf: &[u8]) -> Result<Progress<'_>, HelloError> {
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

pub(super) fn is_sni_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}
