//! The in-process upstream servers every case talks to: bulk source/sink,
//! echo, and hyper HTTP/1.1 keep-alive, on 127.0.0.1 (or every address of
//! the tool's server namespace).
//!
//! Each connection is bounded in time; the servers run until the runtime
//! shuts down. They never dial out.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::wire::{HTTP_BODY, PATTERN_LEN, UPLOAD_END, pattern, pattern_matches};

/// Longest a server keeps any one connection.
const SERVER_CONN_LIMIT: Duration = Duration::from_secs(300);
/// Where the loopback cases' upstreams listen.
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Clone, Copy, Debug)]
/// Where the three upstream servers listen.
pub struct Upstreams {
    pub bulk: SocketAddr,
    pub echo: SocketAddr,
    pub http: SocketAddr,
}

impl Upstreams {
    /// Their ports: bulk, echo, HTTP.
    pub fn ports(&self) -> [u16; 3] {
        [self.bulk.port(), self.echo.port(), self.http.port()]
    }
}

/// Download: sends the pattern up to the limit (or until the client goes).
/// Upload: reads up to the end mark, then answers the byte count (u64 BE)
/// and `1` if every byte matched (or was not checked), `0` otherwise.
async fn bulk_conn(mut s: TcpStream) -> io::Result<()> {
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr).await?;
    if &hdr[..4] != b"bulk" {
        return Err(io::Error::other("bad bulk header"));
    }
    let verify = hdr[5] == b'v';
    let limit = u64::from_be_bytes(hdr[8..].try_into().expect("8 bytes"));
    match hdr[4] {
        b'd' => {
            let p = pattern();
            let mut sent = 0u64;
            while sent < limit {
                let n = (limit - sent).min(PATTERN_LEN as u64) as usize;
                s.write_all(&p[..n]).await?;
                sent += n as u64;
            }
            s.shutdown().await
        }
        b'u' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            let mut intact = true;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::other("upload ended without its end mark"));
                }
                // The end mark is the last byte the client sends, so it ends a read.
                let done = buf[n - 1] == UPLOAD_END;
                let data = &buf[..n - usize::from(done)];
                if verify {
                    intact &= pattern_matches(got, data);
                }
                got += data.len() as u64;
                if done {
                    break;
                }
            }
            let mut reply = [0u8; 9];
            reply[..8].copy_from_slice(&got.to_be_bytes());
            reply[8] = u8::from(intact);
            s.write_all(&reply).await?;
            s.shutdown().await
        }
        _ => Err(io::Error::other("bad bulk direction")),
    }
}

async fn echo_conn(mut s: TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 2048];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}

/// Keep-alive HTTP/1.1: `GET /x` → 200 with [`HTTP_BODY`], anything else 404.
async fn http_conn(s: TcpStream) -> io::Result<()> {
    let svc = service_fn(|req: Request<Incoming>| async move {
        let mut resp = Response::new(Full::new(Bytes::from_static(HTTP_BODY)));
        if req.uri().path() != "/x" {
            *resp.status_mut() = StatusCode::NOT_FOUND;
        }
        Ok::<_, Infallible>(resp)
    });
    http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(s), svc)
        .await
        .map_err(io::Error::other)
}

/// Accepts until the runtime shuts down; each connection is bounded in time.
async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                let conn = handler(s);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(SERVER_CONN_LIMIT, conn).await;
                });
            }
            // EMFILE and the like: back off rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The three servers on `ip` (127.0.0.1; 0.0.0.0 in the server namespace).
pub async fn start_upstreams(ip: IpAddr) -> io::Result<Upstreams> {
    let bulk = TcpListener::bind((ip, 0)).await?;
    let echo = TcpListener::bind((ip, 0)).await?;
    let http = TcpListener::bind((ip, 0)).await?;
    let ups = Upstreams {
        bulk: bulk.local_addr()?,
        echo: echo.local_addr()?,
        http: http.local_addr()?,
    };
    tokio::spawn(serve(bulk, bulk_conn));
    tokio::spawn(serve(echo, echo_conn));
    tokio::spawn(serve(http, http_conn));
    Ok(ups)
}
