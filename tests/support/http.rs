//! A small blocking HTTP/1.1 client over raw sockets, so tests see exactly
//! the bytes the proxy sent: response heads (read byte by byte, so nothing
//! after them is consumed), bodies (chunked, Content-Length or to EOF), whole
//! responses, and reads to close.
//!
//! Every socket it opens has read and write timeouts ([`IO_TIMEOUT`]); it
//! bounds heads (256 KiB) and chunk lines (64 KiB) so a broken peer fails the
//! test instead of filling memory.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Default deadline for network reads in helpers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// First header of that name (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A response head: status, reason, headers.
#[derive(Debug, Clone)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
}

/// Connects with read and write timeouts set.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Sends `CONNECT authority` to `proxy` and reads the response head; the
/// stream is left right after the head (tunnel bytes follow on 200). Panics
/// on transport errors (test helper).
pub fn connect_via(proxy: SocketAddr, authority: &str) -> (TcpStream, Head) {
    let mut s = connect(proxy).expect("connect to proxy");
    write!(
        s,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s).unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"));
    (s, head)
}

/// Reads a response head byte by byte (so nothing after it is consumed).
pub fn read_head(r: &mut impl Read) -> io::Result<Head> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 256 * 1024 {
            return Err(io::Error::other("response head over 256 KiB"));
        }
        match r.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "EOF after {} bytes of head: {:?}",
                        buf.len(),
                        String::from_utf8_lossy(&buf)
                    ),
                ));
            }
            _ => buf.push(byte[0]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::other(format!(
            "not an HTTP response: {status_line:?}"
        )));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Ok(Head {
        status,
        reason,
        headers,
    })
}

/// Reads a body framed by `head` (chunked, Content-Length, or until EOF).
pub fn read_body(r: &mut impl Read, head: &Head, head_request: bool) -> io::Result<Vec<u8>> {
    if head_request || head.status / 100 == 1 || head.status == 204 || head.status == 304 {
        return Ok(Vec::new());
    }
    let te = header(&head.headers, "transfer-encoding").unwrap_or_default();
    if te.to_ascii_lowercase().contains("chunked") {
        let mut body = Vec::new();
        loop {
            let line = read_line(r)?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                loop {
                    if read_line(r)?.is_empty() {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            read_line(r)?;
        }
    }
    if let Some(len) = header(&head.headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::other(format!("bad content-length {len:?}")))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    r.read_to_end(&mut body)?;
    Ok(body)
}

fn read_line(r: &mut impl Read) -> io::Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        if r.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("line over 64 KiB"));
        }
    }
    buf.truncate(buf.len() - 2);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads a whole response.
pub fn read_response(r: &mut impl Read) -> io::Result<Response> {
    let head = read_head(r)?;
    let body = read_body(r, &head, false)?;
    Ok(Response {
        status: head.status,
        reason: head.reason,
        headers: head.headers,
        body,
    })
}

/// A plain `GET path` to `addr` (HTTP/1.1, `Connection: close`).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut s = connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    read_response(&mut s)
}

/// Reads until EOF or error; returns what was read and how it ended.
/// `Ok(bytes)` on a clean EOF, `Err((bytes, err))` otherwise (reset, timeout).
pub fn read_until_closed(s: &mut TcpStream) -> Result<Vec<u8>, (Vec<u8>, io::Error)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((buf, e)),
        }
    }
}

/// Whether an I/O error is a read timeout (as opposed to a reset or EOF).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
