//! What the load traffic looks like on the wire: the bulk pattern (so any
//! lost, duplicated or reordered byte shows), the bulk request header, the
//! echo payload and the HTTP body, shared by the upstream servers and the
//! clients.
//!
//! Pure data and checks: no I/O.

use std::sync::OnceLock;

/// The upstream name the proxies are asked for; `[resolve]`/`hosts_file` map it to 127.0.0.1.
pub const HOST: &str = "load.test";
/// Ends an upload: a byte the pattern never holds (it holds 0..=250).
pub const UPLOAD_END: u8 = 0xff;
/// Bulk data is `offset % 251`, so any lost, duplicated or reordered byte shows.
const PATTERN_PERIOD: usize = 251;
/// One write of bulk data: a whole number of periods, so writes join seamlessly.
pub const PATTERN_LEN: usize = PATTERN_PERIOD * 261;
/// What each new tunnel sends and expects back. Starts with a control byte
/// so portcullis classifies it as opaque at once (no TLS/HTTP wait: a run of
/// token characters could still be an HTTP method, which it would wait for).
pub const ECHO_PAYLOAD: &[u8; 32] = b"\x01echo-0123456789abcdefghijklmnop";
/// Body of every HTTP response of the upstream server.
pub const HTTP_BODY: &[u8] = b"portcullis load test: a small keep-alive response body.\n";

/// [`PATTERN_LEN`] bytes of the bulk pattern, built once.
pub fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        (0..PATTERN_LEN)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect()
    })
}

/// Whether `data` is the pattern from stream offset `offset` on.
pub fn pattern_matches(offset: u64, data: &[u8]) -> bool {
    let p = pattern();
    let mut start = (offset % PATTERN_PERIOD as u64) as usize;
    let mut rest = data;
    while !rest.is_empty() {
        let n = rest.len().min(PATTERN_LEN - start);
        if rest[..n] != p[start..start + n] {
            return false;
        }
        rest = &rest[n..];
        start = 0;
    }
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// Which way a bulk stream goes.
pub enum Dir {
    /// Upstream → client.
    Down,
    /// Client → upstream.
    Up,
}

/// 16 bytes: `bulk`, `d`|`u`, `v`|`-` (verify), 2 pad, limit (u64 BE).
pub fn bulk_header(dir: Dir, verify: bool, limit: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(b"bulk");
    h[4] = if dir == Dir::Down { b'd' } else { b'u' };
    h[5] = if verify { b'v' } else { b'-' };
    h[8..].copy_from_slice(&limit.to_be_bytes());
    h
}
