//! A tokio HTTP/1.1 origin for in-process tests: keep-alive, bodies, upgrades, stalls.
//!
//! In: how to answer. Out: a listener on `127.0.0.2:0` whose every
//! connection serves requests in a loop: it reads a head (and a
//! `Content-Length` body), then answers per [`Answer`]. It counts requests
//! and the request-body bytes it received.

#![allow(dead_code)] // each test binary uses a part of it

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the origin answers every request.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// `200` with a body of this many bytes; the connection stays open.
    Bytes(usize),
    /// `200` with chunked encoding: one chunk, then silence forever.
    Stall,
    /// `101 Switching Protocols` to a request with `Upgrade` (bytes after it
    /// are counted in `body_bytes`), then silence (an idle WebSocket); an
    /// empty `200` to any other request.
    Upgrade,
    /// Reads everything, counting it in `body_bytes`, and never answers (a
    /// TLS server that waits for a whole hello).
    Sink,
    /// Speaks first (an SMTP-style banner), then reads like [`Answer::Sink`].
    Banner,
}

/// What [`Answer::Banner`] says first.
pub const BANNER: &[u8] = b"220 origin.test ESMTP\r\n";

/// A running origin.
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests answered.
    pub requests: Arc<AtomicU64>,
    /// Request-body bytes received.
    pub body_bytes: Arc<AtomicU64>,
}

impl Origin {
    /// Starts an origin on `127.0.0.2:0` answering every request with `answer`.
    pub async fn start(answer: Answer) -> Origin {
        let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind origin");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let body_bytes = Arc::new(AtomicU64::new(0));
        let (r, b) = (requests.clone(), body_bytes.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, answer, r.clone(), b.clone()));
            }
        });
        Origin {
            addr,
            requests,
            body_bytes,
        }
    }
}

async fn serve(mut s: TcpStream, answer: Answer, requests: Arc<AtomicU64>, body: Arc<AtomicU64>) {
    if let Answer::Banner = answer {
        let _ = s.write_all(BANNER).await;
    }
    if let Answer::Sink | Answer::Banner = answer {
        let mut chunk = [0u8; 16384];
        while let Ok(n @ 1..) = s.read(&mut chunk).await {
            body.fetch_add(n as u64, Relaxed);
        }
        return;
    }
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut s, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        buf.drain(..head_end);
        while buf.len() < length {
            let mut chunk = [0u8; 65536];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        body.fetch_add(length as u64, Relaxed);
        requests.fetch_add(1, Relaxed);
        let ok = match answer {
            Answer::Bytes(n) => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                let mut out = head.into_bytes();
                out.resize(out.len() + n, b'x');
                s.write_all(&out).await.is_ok()
            }
            Answer::Stall => {
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nping\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                std::future::pending::<()>().await;
                false
            }
            Answer::Upgrade if head.contains("\r\nupgrade:") => {
                let head = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                // Bytes after the switch count as body bytes.
                let mut sink = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut sink).await {
                    body.fetch_add(n as u64, Relaxed);
                }
                false
            }
            // A request that asks for no upgrade gets an empty 200.
            Answer::Upgrade => s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .is_ok(),
            Answer::Sink | Answer::Banner => false,
        };
        if !ok {
            return;
        }
    }
}

/// Reads until a whole head is in `buf`; its length with the blank line.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
