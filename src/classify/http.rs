//! HTTP/1.x request-head parser (RFC 9112), resumable on a growing buffer.
//!
//! **In:** the first bytes of a client's stream.
//! **Out:** `Ok(None)` while the bytes are a valid prefix of a request head,
//! then the method, request-target, version, the single `Host` value
//! (trimmed of OWS, otherwise as sent), whether a body is declared and the
//! head's length; or an [`HttpHeadError`].
//! **Must not:** allocate (the answer borrows from the input), panic on any
//! input, read past the head, or interpret the target or `Host` beyond
//! checking their characters: normalisation belongs to the caller.
//!
//! Strictness choices (all deliberate, all tested in `classify::tests`):
//!
//! * Lines must end in CRLF. A bare LF or bare CR is rejected as
//!   malformed rather than tolerated (RFC 9112 §2.2 permits either; rejecting
//!   leaves no room for request-smuggling disagreements with the upstream).
//!   obs-fold is rejected (RFC 9112 §5.2), as is whitespace before a field
//!   name's colon (RFC 9112 §5.1). Two `Host` fields are
//!   [`HttpHeadError::DuplicateHost`]. A missing `Host` is *not* an error here
//!   (HTTP/1.0 needs none); the caller decides what that means.

use super::OpaqueReason;

/// Longest HTTP method accepted (RFC 9110 §9.1 allows any token; longer
/// tokens are treated as "not HTTP").
pub const MAX_HTTP_METHOD_LEN: usize = 16;

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

/// Parse an HTTP/1.x request head from the start of `buf`.
///
/// `Ok(None)` means the bytes so far are a valid prefix of a head and more
/// are needed; the caller bounds how long it keeps trying. Bytes after the
/// head (a body, a pipelined request) are ignored; see
/// [`HttpHead::head_len`].
pub fn parse_http_head(buf: &[u8]) -> Result<Option<HttpHead<'_>>, HttpHeadError> {
    HeadScan::default().step(buf)
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
pub(super) fn scan_method(buf: &[u8]) -> Result<Option<usize>, ()> {
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
pub(super) struct HeadScan {
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
    pub(super) fn step<'a>(
        &mut self,
        buf: &'a [u8],
    ) -> Result<Option<HttpHead<'a>>, HttpHeadError> {
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
pub(super) fn is_host_byte(b: u8) -> bool {
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
