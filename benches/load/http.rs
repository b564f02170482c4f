//! The plain-HTTP forwarding client: keep-alive connections sending `GET`
//! back to back (origin-form direct, absolute-URI through a proxy), each
//! response's status and body checked.
//!
//! Reads are bounded (head 16 KiB, body as framed); a changed body or a
//! refused keep-alive is an error, never a number.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clients::{Via, closed_loop, connect_local, read_head};
use crate::io_err;
use crate::sample::Sample;
use crate::settings::Settings;
use crate::upstreams::Upstreams;
use crate::wire::{HOST, HTTP_BODY};

/// The request a client sends: origin-form direct, absolute-URI via a proxy.
fn http_request(via: Via, server: SocketAddr) -> Vec<u8> {
    let port = server.port();
    let target = match via {
        Via::Direct | Via::Relay(_) => "/x".to_string(),
        Via::Proxy(_) => format!("http://{HOST}:{port}/x"),
    };
    format!(
        "GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: portcullis-load/1\r\n\
         Accept: */*\r\n\r\n"
    )
    .into_bytes()
}

/// Fills `buf` to at least `n` bytes.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Result<(), String> {
    let mut tmp = [0u8; 4096];
    while buf.len() < n {
        let got = s.read(&mut tmp).await.map_err(io_err("read body"))?;
        if got == 0 {
            return Err("connection closed inside a response body".into());
        }
        buf.extend_from_slice(&tmp[..got]);
    }
    Ok(())
}

/// Reads a chunked body from `buf`/`s` (consuming it) and returns it.
async fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let n = buf.len() + 1;
            fill(s, buf, n).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // No trailers expected: just the final CRLF.
            fill(s, buf, 2).await?;
            buf.drain(..2);
            return Ok(body);
        }
        fill(s, buf, size + 2).await?;
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// One request/response on a keep-alive connection; checks status and body.
async fn http_exchange(s: &mut TcpStream, buf: &mut Vec<u8>, req: &[u8]) -> Result<(), String> {
    s.write_all(req).await.map_err(io_err("send request"))?;
    let head_len = read_head(s, buf).await?;
    let (mut length, mut chunked, mut close) = (None, false, false);
    {
        let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| "non-UTF-8 head")?;
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("HTTP answered {status:?}"));
        }
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
    }
    buf.drain(..head_len);
    let intact = if chunked {
        read_chunked(s, buf).await? == HTTP_BODY
    } else if let Some(n) = length {
        fill(s, buf, n).await?;
        let ok = buf[..n] == *HTTP_BODY;
        buf.drain(..n);
        ok
    } else {
        return Err("response without Content-Length or chunked body".into());
    };
    if !intact {
        return Err("response body came back changed".into());
    }
    if close {
        return Err("keep-alive refused (Connection: close)".into());
    }
    Ok(())
}

/// `conns` keep-alive connections, each sending requests back to back.
/// Returns [requests/s, p50 µs, p99 µs].
pub async fn http_load(
    via: Via,
    ups: Upstreams,
    conns: usize,
    s: &Settings,
) -> Result<Sample, String> {
    let req: Arc<[u8]> = http_request(via, ups.http).into();
    let connect_to = match via {
        Via::Direct => ups.http,
        Via::Proxy(p) => p,
        Via::Relay(r) => r.frontend(ups.http)?,
    };
    let mut streams = Vec::new();
    for _ in 0..conns {
        let s = connect_local(connect_to).await.map_err(io_err("connect"))?;
        let _ = s.set_nodelay(true);
        streams.push(tokio::sync::Mutex::new((s, Vec::with_capacity(4096))));
    }
    let streams = Arc::new(streams);
    closed_loop(conns, s, move |client| {
        let (streams, req) = (streams.clone(), req.clone());
        async move {
            let mut guard = streams[client].lock().await;
            let (s, buf) = &mut *guard;
            http_exchange(s, buf, &req).await
        }
    })
    .await
}
