//! Tests for the classify stage. Per parser: `tests/tls.rs` (real
//! ClientHello captures, hand-built TLS edge cases) and `tests/http.rs`
//! (request-head edge cases). Here: the helpers they share, deterministic
//! fuzzing of `sniff` as a whole, and `read_classified` over
//! `tokio::io::duplex`.

use super::http::is_host_byte;
use super::tls::is_sni_byte;
use super::*;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncWriteExt, ReadBuf};

/// Generous budget: any legal ClientHello fits.
const BIG: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// Helpers: hex, a tiny JSON reader for the capture index, a PRNG
// ---------------------------------------------------------------------------

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

#[derive(Debug)]
enum Json {
    Null,
    Bool,
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) {
        self.ws();
        assert_eq!(
            self.s[self.i], b,
            "json: expected {:?} at {}",
            b as char, self.i
        );
        self.i += 1;
    }

    fn value(&mut self) -> Json {
        self.ws();
        match self.s[self.i] {
            b'{' => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.s[self.i] == b'}' {
                    self.i += 1;
                    return Json::Obj(fields);
                }
                loop {
                    self.ws();
                    let Json::Str(k) = self.value() else {
                        panic!("json: key")
                    };
                    self.eat(b':');
                    fields.push((k, self.value()));
                    self.ws();
                    self.i += 1;
                    if self.s[self.i - 1] == b'}' {
                        return Json::Obj(fields);
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s[self.i] == b']' {
                    self.i += 1;
                    return Json::Arr(items);
                }
                loop {
                    items.push(self.value());
                    self.ws();
                    self.i += 1;
                    if self.s[self.i - 1] == b']' {
                        return Json::Arr(items);
                    }
                }
            }
            b'"' => {
                self.i += 1;
                let mut out = String::new();
                loop {
                    let c = self.s[self.i];
                    self.i += 1;
                    match c {
                        b'"' => return Json::Str(out),
                        b'\\' => {
                            let e = self.s[self.i];
                            self.i += 1;
                            match e {
                                b'u' => {
                                    let hex = std::str::from_utf8(&self.s[self.i..self.i + 4])
                                        .expect("utf8");
                                    let cp = u32::from_str_radix(hex, 16).expect("\\u");
                                    out.push(char::from_u32(cp).unwrap_or('?'));
                                    self.i += 4;
                                }
                                b'n' => out.push('\n'),
                                b't' => out.push('\t'),
                                other => out.push(other as char),
                            }
                        }
                        _ => {
                            // Copy one UTF-8 sequence.
                            let start = self.i - 1;
                            while self.s.get(self.i).is_some_and(|b| b & 0xc0 == 0x80) {
                                self.i += 1;
                            }
                            out.push_str(std::str::from_utf8(&self.s[start..self.i]).unwrap());
                        }
                    }
                }
            }
            b't' => {
                self.i += 4;
                Json::Bool
            }
            b'f' => {
                self.i += 5;
                Json::Bool
            }
            b'n' => {
                self.i += 4;
                Json::Null
            }
            _ => {
                let start = self.i;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|b| b"+-.eE0123456789".contains(b))
                {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).expect("ascii");
                Json::Num(text.parse().expect("json number"))
            }
        }
    }
}

struct Capture {
    file: String,
    bytes: Vec<u8>,
    sni: Option<String>,
    ech: bool,
}

fn data_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn captures() -> Vec<Capture> {
    let index = std::fs::read_to_string(data_path("clienthello-index.json")).expect("index");
    let json = JsonParser {
        s: index.as_bytes(),
        i: 0,
    }
    .value();
    let Json::Arr(entries) = json else {
        panic!("index is not an array")
    };
    assert!(entries.len() >= 10, "expected the full capture set");
    entries
        .iter()
        .map(|e| {
            let Some(Json::Str(file)) = e.get("file") else {
                panic!("entry without file")
            };
            let hex = std::fs::read_to_string(data_path(file)).expect("capture file");
            let bytes = unhex(&hex);
            let Some(&Json::Num(len)) = e.get("bytes") else {
                panic!("{file}: no byte count")
            };
            assert_eq!(bytes.len() as f64, len, "{file}: length differs from index");
            assert!(
                matches!(e.get("tls_records"), Some(&Json::Num(n)) if n == 1.0),
                "{file}: the tests assume one record per capture"
            );
            let sni = match e.get("sni") {
                Some(Json::Str(s)) => Some(s.clone()),
                Some(Json::Null) => None,
                other => panic!("{file}: bad sni {other:?}"),
            };
            let ech = match e.get("ech") {
                Some(Json::Null) => false,
                Some(Json::Obj(_)) => true,
                other => panic!("{file}: bad ech {other:?}"),
            };
            Capture {
                file: file.clone(),
                bytes,
                sni,
                ech,
            }
        })
        .collect()
}

fn capture(name: &str) -> Vec<u8> {
    captures()
        .into_iter()
        .find(|c| c.file == name)
        .expect("capture")
        .bytes
}

use crate::testing::Rng;

// ---------------------------------------------------------------------------
// Helpers: building TLS records and ClientHellos
// ---------------------------------------------------------------------------

/// The handshake message bytes of a single-record capture.
fn handshake_of(record: &[u8]) -> &[u8] {
    let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
    assert_eq!(record.len(), 5 + len, "capture is one record");
    &record[5..]
}

/// Frame `hs` into handshake records cut at `cuts` (strictly increasing).
fn reframe(hs: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &cut in cuts.iter().chain(std::iter::once(&hs.len())) {
        let frag = &hs[prev..cut];
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(frag.len() as u16).to_be_bytes());
        out.extend_from_slice(frag);
        prev = cut;
    }
    out
}

fn record(hs: &[u8]) -> Vec<u8> {
    reframe(hs, &[])
}

fn u16be(n: usize) -> [u8; 2] {
    (n as u16).to_be_bytes()
}

fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut v = ty.to_be_bytes().to_vec();
    v.extend_from_slice(&u16be(data.len()));
    v.extend_from_slice(data);
    v
}

fn sni_ext(name: &[u8]) -> Vec<u8> {
    let mut entry = vec![0u8];
    entry.extend_from_slice(&u16be(name.len()));
    entry.extend_from_slice(name);
    let mut list = u16be(entry.len()).to_vec();
    list.extend_from_slice(&entry);
    ext(0, &list)
}

/// A ClientHello handshake message (header included) with the given
/// extensions block (`None` = no extensions block at all).
fn hello_with(exts: Option<&[u8]>) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(32);
    body.extend_from_slice(&[9u8; 32]);
    body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]);
    body.extend_from_slice(&[0x01, 0x00]);
    if let Some(exts) = exts {
        body.extend_from_slice(&u16be(exts.len()));
        body.extend_from_slice(exts);
    }
    hs_msg(&body)
}

fn hs_msg(body: &[u8]) -> Vec<u8> {
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(body);
    hs
}

fn hello_record(exts: &[Vec<u8>]) -> Vec<u8> {
    record(&hello_with(Some(&exts.concat())))
}

/// Offset of `needle` inside `hay` given that it is a subslice of it.
fn offset_in(hay: &[u8], needle: &str) -> usize {
    needle.as_ptr() as usize - hay.as_ptr() as usize
}

fn assert_sane(s: &Sniff<'_>) {
    match s {
        Sniff::Tls {
            sni: Some(name), ..
        } => {
            assert!(
                (1..=255).contains(&name.len()) && name.bytes().all(is_sni_byte),
                "garbage SNI {name:?}"
            );
        }
        Sniff::Http {
            method,
            target,
            host,
        } => {
            assert!(scan_method(format!("{method} ").as_bytes()) == Ok(Some(method.len())));
            assert!(!target.is_empty() && target.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            if let Some(h) = host {
                assert!(h.bytes().all(is_host_byte), "garbage host {h:?}");
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Helpers shared by the TLS and HTTP tables
// ---------------------------------------------------------------------------

macro_rules! t {
    ($name:expr, $input:expr, $want:expr) => {{
        let input: Vec<u8> = $input;
        let got = sniff(&input, BIG);
        assert_eq!(got, $want, "case {:?}", $name);
        assert_sane(&got);
    }};
}

fn http(method: &'static str, target: &'static str, host: Option<&'static str>) -> Sniff<'static> {
    Sniff::Http {
        method,
        target,
        host,
    }
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

mod http;
mod tls;

// ---------------------------------------------------------------------------
// Fuzzing: random bytes, mutations, truncations, incremental equivalence
// ---------------------------------------------------------------------------

/// Feed `input` to one incremental sniffer in random chunks; at every step it
/// must agree with a fresh `sniff` of the same prefix, and stop at the first
/// decision.
fn check_incremental(input: &[u8], max_len: usize, rng: &mut Rng) {
    let mut sniffer = Sniffer::new(max_len);
    let mut n = 0;
    loop {
        let got = sniffer.sniff(&input[..n]);
        let fresh = sniff(&input[..n], max_len);
        assert_eq!(got, fresh, "incremental vs fresh at {n} of {input:?}");
        assert_sane(&got);
        if got != Sniff::Incomplete || n == input.len() {
            return;
        }
        n = (n + 1 + rng.below(8)).min(input.len());
    }
}

#[test]
fn fuzz_random_bytes() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let prefixes: [&[u8]; 5] = [
        b"",
        b"\x16\x03\x01",
        b"\x16\x03\x03\x02\x00\x01",
        b"GET ",
        b"CONNECT a:1 HTTP/1.1\r\n",
    ];
    for case in 0..4000 {
        let mut input = prefixes[case % prefixes.len()].to_vec();
        let len = rng.below(600);
        // Bias towards printable bytes for the HTTP cases.
        for _ in 0..len {
            let b = if case % 2 == 0 {
                rng.byte()
            } else {
                let alphabet = b"ab:/ \r\n\tHost";
                alphabet[rng.below(alphabet.len())]
            };
            input.push(b);
        }
        let max_len = if case % 7 == 0 { rng.below(700) } else { BIG };
        let s = sniff(&input, max_len);
        assert_sane(&s);
        let _ = parse_client_hello(&input);
        let _ = parse_http_head(&input);
        check_incremental(&input, max_len, &mut rng);
    }
}

#[test]
fn fuzz_mutated_captures() {
    let mut rng = Rng(42);
    let caps = captures();
    for round in 0..3000 {
        let c = &caps[round % caps.len()];
        let mut m = c.bytes.clone();
        // Corrupt a few bytes, preferring the early length-bearing ones.
        for _ in 0..1 + rng.below(4) {
            let i = if rng.below(2) == 0 {
                rng.below(m.len().min(200))
            } else {
                rng.below(m.len())
            };
            m[i] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                2 => m[i] ^ 1,
                _ => rng.byte(),
            };
        }
        if rng.below(3) == 0 {
            m.truncate(rng.below(m.len() + 1));
        }
        let s = sniff(&m, BIG);
        assert_sane(&s);
        if let Ok(Some(info)) = parse_client_hello(&m) {
            assert_eq!(
                s,
                Sniff::Tls {
                    sni: info.sni,
                    ech: info.ech
                }
            );
        }
        if round % 10 == 0 {
            check_incremental(&m, BIG, &mut rng);
        }
        // Reframed mutations exercise the reassembly path.
        if round % 5 == 0 && m.len() > 10 {
            let hs = &m[5..];
            let cut = 1 + rng.below(hs.len() - 1);
            assert_sane(&sniff(&reframe(hs, &[cut]), BIG));
        }
    }
}

#[test]
fn fuzz_mutated_http() {
    let mut rng = Rng(7);
    let base = b"GET /a?b=c HTTP/1.1\r\nHost: example.com:80\r\nUser-Agent: x\r\n\r\n";
    let alphabet = b" \t\r\n:Hh/\x00\x7f\xc3aZ";
    for _ in 0..3000 {
        let mut m = base.to_vec();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(m.len());
            match rng.below(3) {
                0 => m[i] = alphabet[rng.below(alphabet.len())],
                1 => {
                    m.insert(i, alphabet[rng.below(alphabet.len())]);
                }
                _ => {
                    m.remove(i);
                }
            }
        }
        assert_sane(&sniff(&m, BIG));
        check_incremental(&m, BIG, &mut rng);
        check_incremental(&m, 40, &mut rng);
    }
}

#[test]
fn trickled_head_costs_linear_work() {
    // 60 KB of headers fed one byte at a time to one incremental sniffer:
    // with a quadratic re-scan this would take minutes in a debug build.
    let mut req = b("GET / HTTP/1.1\r\nHost: a\r\n");
    while req.len() < 60_000 {
        req.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let mut sniffer = Sniffer::new(BIG);
    for n in 0..req.len() {
        assert_eq!(sniffer.sniff(&req[..n]), Sniff::Incomplete);
    }
    assert_eq!(sniffer.sniff(&req), http("GET", "/", Some("a")));
}

// ---------------------------------------------------------------------------
// Misc API
// ---------------------------------------------------------------------------

#[test]
fn reasons_and_constants() {
    let all = [
        OpaqueReason::NotTlsOrHttp,
        OpaqueReason::MalformedTls,
        OpaqueReason::MalformedHttp,
        OpaqueReason::DuplicateHost,
        OpaqueReason::UnsupportedHttpVersion,
        OpaqueReason::TooLarge,
        OpaqueReason::Timeout,
        OpaqueReason::Eof,
    ];
    let mut labels: Vec<&str> = all.iter().map(OpaqueReason::as_str).collect();
    assert!(
        labels
            .iter()
            .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    );
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), all.len());
    assert_eq!(OpaqueReason::TooLarge.to_string(), "too_large");
    // Alert record: type alert(21), TLS 1.2 record version, length 2,
    // level fatal(2), access_denied(49).
    assert_eq!(TLS_ACCESS_DENIED_ALERT, [21, 3, 3, 0, 2, 2, 49]);
    assert_eq!(Classified::from_sniff(Sniff::Incomplete), None);
    assert_eq!(
        Classified::from_sniff(http("GET", "/", Some("h"))),
        Some(Classified::Http {
            host: Some("h".into()),
            method: "GET".into(),
            target: "/".into()
        })
    );
}

// ---------------------------------------------------------------------------
// read_classified
// ---------------------------------------------------------------------------

const T: Duration = Duration::from_secs(5);

async fn trickle(data: Vec<u8>, chunk: usize) -> (io::Result<Classified>, BytesMut) {
    let (mut client, mut server) = tokio::io::duplex(256);
    let writer = tokio::spawn(async move {
        for piece in data.chunks(chunk) {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        client
    });
    let mut buf = BytesMut::new();
    let got = read_classified(&mut server, &mut buf, BIG, T).await;
    drop(writer.await.unwrap());
    (got, buf)
}

#[tokio::test]
async fn read_trickled_tls() {
    let hello = capture("clienthello-chrome-x25519mlkem768-split.hex");
    for chunk in [1, 7, 1392] {
        let (got, buf) = trickle(hello.clone(), chunk).await;
        assert_eq!(
            got.unwrap(),
            Classified::Tls {
                sni: Some("clients2.google.com".into()),
                ech: true
            }
        );
        assert_eq!(&buf[..], &hello[..]);
    }
}

#[tokio::test]
async fn read_trickled_http() {
    let req = b("GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let (got, buf) = trickle(req.clone(), 1).await;
    assert_eq!(
        got.unwrap(),
        Classified::Http {
            host: Some("example.com".into()),
            method: "GET".into(),
            target: "/x".into()
        }
    );
    assert_eq!(&buf[..], &req[..]);
}

#[tokio::test]
async fn read_keeps_bytes_after_the_hello() {
    let mut data = capture("clienthello-curl.hex");
    data.extend_from_slice(b"early");
    let (mut client, mut server) = tokio::io::duplex(4096);
    client.write_all(&data).await.unwrap();
    let mut buf = BytesMut::new();
    let got = read_classified(&mut server, &mut buf, BIG, T)
        .await
        .unwrap();
    assert_eq!(
        got,
        Classified::Tls {
            sni: Some("enabled.tls13.com".into()),
            ech: false
        }
    );
    assert_eq!(&buf[..], &data[..]);
}

#[tokio::test(start_paused = true)]
async fn read_silent_peer_times_out_without_waiting() {
    let wall = std::time::Instant::now();
    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(b"GET / HT").await.unwrap();
    let mut buf = BytesMut::new();
    let got = read_classified(&mut server, &mut buf, BIG, Duration::from_secs(30)).await;
    assert_eq!(got.unwrap(), Classified::Opaque(OpaqueReason::Timeout));
    assert_eq!(&buf[..], b"GET / HT");
    assert!(wall.elapsed() < Duration::from_secs(5));
    drop(client);
}

#[tokio::test]
async fn read_eof_early() {
    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(b"\x16\x03\x01\x02").await.unwrap();
    drop(client);
    let mut buf = BytesMut::new();
    let got = read_classified(&mut server, &mut buf, BIG, T)
        .await
        .unwrap();
    assert_eq!(got, Classified::Opaque(OpaqueReason::Eof));
    assert_eq!(&buf[..], b"\x16\x03\x01\x02");

    let (client, mut server) = tokio::io::duplex(64);
    drop(client);
    let mut buf = BytesMut::new();
    let got = read_classified(&mut server, &mut buf, BIG, T)
        .await
        .unwrap();
    assert_eq!(got, Classified::Opaque(OpaqueReason::Eof));
    assert!(buf.is_empty());
}

#[tokio::test]
async fn read_oversized_stops_at_max_len() {
    let mut req = b("GET / HTTP/1.1\r\n");
    while req.len() < 50_000 {
        req.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaa\r\n");
    }
    for max_len in [1000, 4096, 4097] {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&req).await.unwrap();
        let mut buf = BytesMut::new();
        let got = read_classified(&mut server, &mut buf, max_len, T)
            .await
            .unwrap();
        assert_eq!(got, Classified::Opaque(OpaqueReason::TooLarge));
        assert_eq!(buf.len(), max_len);
    }
    // A declared ClientHello size beyond the budget stops after the header.
    let (mut client, mut server) = tokio::io::duplex(1 << 16);
    let hello = capture("clienthello-chrome125-x25519kyber768-echgrease.hex");
    client.write_all(&hello).await.unwrap();
    let mut buf = BytesMut::new();
    let got = read_classified(&mut server, &mut buf, 1000, T)
        .await
        .unwrap();
    assert_eq!(got, Classified::Opaque(OpaqueReason::TooLarge));
    assert!(buf.len() <= 1000);
}

#[tokio::test]
async fn read_uses_bytes_already_in_buf() {
    let hello = capture("clienthello-firefox.hex");
    let (_client, mut server) = tokio::io::duplex(64);
    let mut buf = BytesMut::from(&hello[..]);
    let got = read_classified(&mut server, &mut buf, BIG, T)
        .await
        .unwrap();
    assert_eq!(
        got,
        Classified::Tls {
            sni: Some("contile.services.mozilla.com".into()),
            ech: false
        }
    );
    // Already over budget: decided without reading.
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
    let got = read_classified(&mut server, &mut buf, 4, T).await.unwrap();
    assert_eq!(got, Classified::Opaque(OpaqueReason::TooLarge));
    assert_eq!(buf.len(), 16);
}

/// A reader that counts polls and always reports EOF, or always fails.
struct Counting {
    polls: usize,
    fail: bool,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.polls += 1;
        if self.fail {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "boom")))
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

#[tokio::test]
async fn read_does_not_spin_and_passes_errors() {
    let mut eof = Counting {
        polls: 0,
        fail: false,
    };
    let mut buf = BytesMut::new();
    let got = read_classified(&mut eof, &mut buf, BIG, T).await.unwrap();
    assert_eq!(got, Classified::Opaque(OpaqueReason::Eof));
    assert_eq!(eof.polls, 1);

    let mut failing = Counting {
        polls: 0,
        fail: true,
    };
    let err = read_classified(&mut failing, &mut buf, BIG, T)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}
