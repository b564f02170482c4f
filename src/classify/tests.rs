//! Tests for the classify stage: real ClientHello captures, hand-built TLS
//! and HTTP edge cases, deterministic fuzzing, and `read_classified` over
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

/// xorshift64*, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

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
// Real captures
// ---------------------------------------------------------------------------

#[test]
fn captures_give_indexed_sni_and_ech() {
    let caps = captures();
    assert!(caps.iter().any(|c| c.ech) && caps.iter().any(|c| c.sni.is_none()));
    for c in &caps {
        let want = Sniff::Tls {
            sni: c.sni.as_deref(),
            ech: c.ech,
        };
        assert_eq!(sniff(&c.bytes, BIG), want, "{}", c.file);
        // The smallest budget that fits is enough; one byte less is not.
        assert_eq!(sniff(&c.bytes, c.bytes.len()), want, "{}", c.file);
        assert_eq!(
            sniff(&c.bytes, c.bytes.len() - 1),
            Sniff::Opaque(OpaqueReason::TooLarge),
            "{}",
            c.file
        );
        let info = parse_client_hello(&c.bytes).unwrap().unwrap();
        assert_eq!(info.sni, c.sni.as_deref(), "{}", c.file);
        assert_eq!(info.ech, c.ech, "{}", c.file);
        // The SNI borrows from the input.
        if let Some(s) = info.sni {
            let at = offset_in(&c.bytes, s);
            assert_eq!(&c.bytes[at..at + s.len()], s.as_bytes());
        }
        // Trailing bytes after the hello are ignored.
        let mut more = c.bytes.clone();
        more.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0xff]);
        assert_eq!(sniff(&more, BIG), want, "{} + trailing", c.file);
    }
}

#[test]
fn every_capture_prefix_is_incomplete() {
    for c in captures() {
        for n in 0..c.bytes.len() {
            let p = &c.bytes[..n];
            assert_eq!(sniff(p, BIG), Sniff::Incomplete, "{} prefix {n}", c.file);
            assert_eq!(parse_client_hello(p), Ok(None), "{} prefix {n}", c.file);
        }
    }
}

#[test]
fn captures_split_into_two_records_at_every_point() {
    for c in captures() {
        let hs = handshake_of(&c.bytes);
        let whole = parse_client_hello(&c.bytes).unwrap().unwrap();
        let name_range = whole.sni.map(|s| {
            let at = offset_in(&c.bytes, s) - 5;
            (at, at + s.len())
        });
        for cut in 1..hs.len() {
            let two = reframe(hs, &[cut]);
            let got = sniff(&two, BIG);
            let splits_name = name_range.is_some_and(|(a, b)| a < cut && cut < b);
            if splits_name {
                assert_eq!(
                    got,
                    Sniff::Opaque(OpaqueReason::MalformedTls),
                    "{} cut {cut}",
                    c.file
                );
            } else {
                let want = Sniff::Tls {
                    sni: c.sni.as_deref(),
                    ech: c.ech,
                };
                assert_eq!(got, want, "{} cut {cut}", c.file);
            }
        }
    }
}

#[test]
fn split_record_prefixes_are_incomplete() {
    for c in captures() {
        let hs = handshake_of(&c.bytes);
        let l = hs.len();
        let name = parse_client_hello(&c.bytes).unwrap().unwrap().sni.map(|s| {
            let at = offset_in(&c.bytes, s) - 5;
            (at, at + s.len())
        });
        // Middle cut moved off the host name so that the hello stays usable.
        let mid = match name {
            Some((a, b)) if a < l / 2 && l / 2 < b => b,
            _ => l / 2,
        };
        for cuts in [
            vec![1],
            vec![2],
            vec![3],
            vec![4],
            vec![5, 40],
            vec![mid],
            vec![l - 1],
            vec![1, 2, 3, l - 1],
        ] {
            let framed = reframe(hs, &cuts);
            for n in 0..framed.len() {
                assert_eq!(
                    sniff(&framed[..n], BIG),
                    Sniff::Incomplete,
                    "{} cuts {cuts:?} prefix {n}",
                    c.file
                );
            }
            let got = sniff(&framed, BIG);
            assert_eq!(
                got,
                Sniff::Tls {
                    sni: c.sni.as_deref(),
                    ech: c.ech
                },
                "{} cuts {cuts:?}",
                c.file
            );
        }
    }
}

#[test]
fn one_byte_records() {
    // Legal but absurd: every handshake byte in its own record. The host name
    // then straddles records, which this stage reports as malformed.
    let c = capture("clienthello-chrome125-x25519kyber768-echgrease.hex");
    let hs = handshake_of(&c);
    let cuts: Vec<usize> = (1..hs.len()).collect();
    let framed = reframe(hs, &cuts);
    assert_eq!(
        sniff(&framed, BIG),
        Sniff::Opaque(OpaqueReason::MalformedTls)
    );
    assert_eq!(sniff(&framed[..framed.len() - 1], BIG), Sniff::Incomplete);
    // The no-SNI capture survives it.
    let c = capture("clienthello-go-crypto-tls-nosni.hex");
    let hs = handshake_of(&c);
    let cuts: Vec<usize> = (1..hs.len()).collect();
    assert_eq!(
        sniff(&reframe(hs, &cuts), BIG),
        Sniff::Tls {
            sni: None,
            ech: false
        }
    );
}

#[test]
fn declared_size_beyond_budget_is_too_large_early() {
    let c = capture("clienthello-chrome125-x25519kyber768-echgrease.hex");
    // Handshake header known after 9 bytes: 1756 > 1024.
    assert_eq!(sniff(&c[..8], 1024), Sniff::Incomplete);
    assert_eq!(sniff(&c[..9], 1024), Sniff::Opaque(OpaqueReason::TooLarge));
    assert_eq!(sniff(&c[..3], 0), Sniff::Opaque(OpaqueReason::TooLarge));
    assert_eq!(sniff(&[], 0), Sniff::Opaque(OpaqueReason::TooLarge));
}

// ---------------------------------------------------------------------------
// Hand-built TLS edge cases
// ---------------------------------------------------------------------------

macro_rules! t {
    ($name:expr, $input:expr, $want:expr) => {{
        let input: Vec<u8> = $input;
        let got = sniff(&input, BIG);
        assert_eq!(got, $want, "case {:?}", $name);
        assert_sane(&got);
    }};
}

const MALFORMED_TLS: Sniff<'static> = Sniff::Opaque(OpaqueReason::MalformedTls);

#[test]
fn tls_table() {
    let good = sni_ext(b"example.com");
    let ech = ext(0xfe0d, &[0, 1, 2]);
    t!(
        "plain",
        hello_record(std::slice::from_ref(&good)),
        Sniff::Tls {
            sni: Some("example.com"),
            ech: false
        }
    );
    t!(
        "case preserved",
        hello_record(&[sni_ext(b"ExAmple.COM")]),
        Sniff::Tls {
            sni: Some("ExAmple.COM"),
            ech: false
        }
    );
    t!(
        "ech only",
        hello_record(std::slice::from_ref(&ech)),
        Sniff::Tls {
            sni: None,
            ech: true
        }
    );
    t!(
        "sni + ech + grease",
        hello_record(&[ext(0x0a0a, &[]), ech.clone(), good.clone()]),
        Sniff::Tls {
            sni: Some("example.com"),
            ech: true
        }
    );
    t!(
        "no extensions block (TLS 1.2)",
        record(&hello_with(None)),
        Sniff::Tls {
            sni: None,
            ech: false
        }
    );
    t!(
        "empty extensions block",
        record(&hello_with(Some(&[]))),
        Sniff::Tls {
            sni: None,
            ech: false
        }
    );
    let name255 = vec![b'a'; 255];
    t!(
        "255-byte name",
        hello_record(&[sni_ext(&name255)]),
        Sniff::Tls {
            sni: Some(std::str::from_utf8(&name255).unwrap()),
            ech: false
        }
    );
    t!(
        "256-byte name",
        hello_record(&[sni_ext(&[b'a'; 256])]),
        MALFORMED_TLS
    );
    t!(
        "zero-length name",
        hello_record(&[sni_ext(b"")]),
        MALFORMED_TLS
    );
    for bad in [
        &b"exa mple.com"[..],
        b"ex\0ample",
        b"a/b",
        b"a:443",
        b"\xc3\xa9.fr",
        b"a\x7f",
    ] {
        t!(
            format!("bad byte {bad:?}"),
            hello_record(&[sni_ext(bad)]),
            MALFORMED_TLS
        );
    }
    t!(
        "duplicate server_name",
        hello_record(&[good.clone(), sni_ext(b"other.com")]),
        MALFORMED_TLS
    );
    t!(
        "duplicate ech",
        hello_record(&[ech.clone(), ech.clone()]),
        MALFORMED_TLS
    );
    t!(
        "empty server_name ext",
        hello_record(&[ext(0, &[])]),
        MALFORMED_TLS
    );
    t!(
        "empty server_name_list",
        hello_record(&[ext(0, &[0, 0])]),
        MALFORMED_TLS
    );
    t!(
        "non-host_name type",
        hello_record(&[ext(0, &[0, 4, 1, 0, 1, b'a'])]),
        MALFORMED_TLS
    );
    t!(
        "two host_name entries",
        hello_record(&[ext(0, &[0, 8, 0, 0, 1, b'a', 0, 0, 1, b'b'])]),
        MALFORMED_TLS
    );
    t!(
        "list length overruns extension",
        hello_record(&[ext(0, &[0, 9, 0, 0, 1, b'a'])]),
        MALFORMED_TLS
    );
    t!(
        "host_name length overruns list",
        hello_record(&[ext(0, &[0, 4, 0, 0, 9, b'a'])]),
        MALFORMED_TLS
    );
    t!(
        "bytes after list",
        hello_record(&[ext(0, &[0, 4, 0, 0, 1, b'a', 0])]),
        MALFORMED_TLS
    );
    // Extension whose length overruns the block.
    let mut overrun = good.clone();
    overrun.extend_from_slice(&[0x00, 0x10, 0x00, 0x09, 1, 2]);
    t!("extension overrun", hello_record(&[overrun]), MALFORMED_TLS);
    t!(
        "truncated extension header",
        hello_record(&[vec![0x00]]),
        MALFORMED_TLS
    );

    // Body-level fields.
    let base = hello_with(None);
    let mut m = base.clone();
    m[4 + 34] = 33; // session id length 33
    t!("session id 33", record(&m), MALFORMED_TLS);
    let mut m = base.clone();
    m[4] = 0x02; // legacy_version 0x0203
    t!("legacy_version major 2", record(&m), MALFORMED_TLS);
    // Odd cipher_suites length: rebuild the body.
    let body_with = |cs: &[u8], comp: &[u8], tail: &[u8]| {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[0; 32]);
        b.push(0);
        b.extend_from_slice(cs);
        b.extend_from_slice(comp);
        b.extend_from_slice(tail);
        record(&hs_msg(&b))
    };
    t!(
        "odd cipher_suites",
        body_with(&[0, 3, 0x13, 1, 2], &[1, 0], &[0, 0, 0, 0, 0, 0]),
        MALFORMED_TLS
    );
    t!(
        "empty cipher_suites",
        body_with(&[0, 0], &[1, 0], &[0; 8]),
        MALFORMED_TLS
    );
    t!(
        "empty compression",
        body_with(&[0, 2, 0x13, 1], &[0], &[0; 8]),
        MALFORMED_TLS
    );
    t!(
        "cipher_suites overrun",
        body_with(&[0xff, 0xfe, 0x13, 1], &[1, 0], &[0; 8]),
        MALFORMED_TLS
    );
    t!(
        "bytes after extensions",
        body_with(&[0, 2, 0x13, 1], &[1, 0], &[0, 0, 0xaa, 0, 0, 0, 0, 0]),
        MALFORMED_TLS
    );
    t!(
        "extensions length overruns",
        body_with(&[0, 2, 0x13, 1], &[1, 0], &[0, 9, 0, 0, 0, 0, 0, 0]),
        MALFORMED_TLS
    );
    t!(
        "lone extensions-length byte",
        body_with(&[0, 2, 0x13, 1], &[1, 0], &[0, 0, 0, 0, 0, 0, 0]),
        MALFORMED_TLS
    );

    // Record and handshake headers.
    let ok = hello_record(std::slice::from_ref(&good));
    let mut m = ok.clone();
    m[2] = 5;
    t!("record version 0x0305", m, MALFORMED_TLS);
    let mut m = ok.clone();
    m[2] = 0;
    t!(
        "record version 0x0300",
        m,
        Sniff::Tls {
            sni: Some("example.com"),
            ech: false
        }
    );
    let mut m = ok.clone();
    m[5] = 2; // ServerHello
    t!("not a ClientHello", m, MALFORMED_TLS);
    t!(
        "wrong second byte",
        vec![0x16, 0x02],
        Sniff::Opaque(OpaqueReason::NotTlsOrHttp)
    );
    t!("zero-length record", vec![0x16, 3, 1, 0, 0], MALFORMED_TLS);
    t!(
        "record over 2^14",
        vec![0x16, 3, 1, 0x40, 0x01],
        MALFORMED_TLS
    );
    t!(
        "record of 2^14 is fine so far",
        vec![0x16, 3, 1, 0x40, 0x00],
        Sniff::Incomplete
    );
    t!(
        "hello over 16 KiB",
        vec![0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0x40, 0x01],
        Sniff::Opaque(OpaqueReason::TooLarge)
    );
    t!(
        "hello of 16 KiB is fine so far",
        vec![0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0x40, 0x00],
        Sniff::Incomplete
    );
    t!(
        "hello too short",
        vec![0x16, 3, 1, 0, 8, 1, 0, 0, 4, 3, 3, 0, 0],
        MALFORMED_TLS
    );
    // A non-handshake record before the hello is complete.
    let hs = hello_with(Some(&good));
    let mut m = reframe(&hs, &[10]);
    m[5 + 10] = 0x17;
    t!("interleaved application_data", m, MALFORMED_TLS);
    let mut m = reframe(&hs, &[10]);
    m[5 + 10 + 3] = 0;
    m[5 + 10 + 4] = 0;
    t!("zero-length continuation record", m, MALFORMED_TLS);
}

#[test]
fn parse_client_hello_errors() {
    assert_eq!(parse_client_hello(b""), Ok(None));
    assert_eq!(
        parse_client_hello(b"GET / HTTP/1.1"),
        Err(HelloError::NotHandshake)
    );
    assert!(matches!(
        parse_client_hello(&[0x16, 3, 1, 0, 0]),
        Err(HelloError::Malformed(_))
    ));
    assert_eq!(
        parse_client_hello(&[0x16, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff]),
        Err(HelloError::TooLarge)
    );
    assert!(HelloError::Malformed("x").to_string().contains('x'));
    assert_eq!(HelloError::TooLarge.reason(), OpaqueReason::TooLarge);
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

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

const MALFORMED_HTTP: Sniff<'static> = Sniff::Opaque(OpaqueReason::MalformedHttp);

#[test]
fn http_table() {
    t!(
        "GET with Host",
        b("GET /index.html HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"),
        http("GET", "/index.html", Some("example.com"))
    );
    t!(
        "Host with port, odd case, OWS",
        b("POST /api HTTP/1.1\r\nhOsT: \t example.com:8080 \t\r\nContent-Length: 2\r\n\r\nhi"),
        http("POST", "/api", Some("example.com:8080"))
    );
    t!(
        "IPv6 literal Host",
        b("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
        http("GET", "/", Some("[::1]:80"))
    );
    t!(
        "HTTP/1.0 without Host",
        b("GET / HTTP/1.0\r\n\r\n"),
        http("GET", "/", None)
    );
    t!(
        "empty Host",
        b("GET / HTTP/1.1\r\nHost:\r\n\r\n"),
        http("GET", "/", Some(""))
    );
    t!(
        "CONNECT",
        b("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
        http("CONNECT", "example.com:443", Some("example.com:443"))
    );
    t!(
        "absolute-form",
        b("GET http://a.example/x?y=1 HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        http("GET", "http://a.example/x?y=1", Some("a.example"))
    );
    t!(
        "OPTIONS *",
        b("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
        http("OPTIONS", "*", Some("a"))
    );
    t!(
        "extension method token",
        b("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\r\n"),
        http("M-SEARCH", "*", Some("239.255.255.250:1900"))
    );
    t!(
        "obs-text in other field values",
        b"GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\nHost: h\r\n\r\n".to_vec(),
        http("GET", "/", Some("h"))
    );
    t!(
        "duplicate Host",
        b("GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
        Sniff::Opaque(OpaqueReason::DuplicateHost)
    );
    t!(
        "duplicate Host decided before the head ends",
        b("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\nX-"),
        Sniff::Opaque(OpaqueReason::DuplicateHost)
    );
    t!(
        "obs-fold",
        b("GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "obs-fold early",
        b("GET / HTTP/1.1\r\nX: a\r\n\t"),
        MALFORMED_HTTP
    );
    t!(
        "whitespace before first header",
        b("GET / HTTP/1.1\r\n Host: a\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "space before colon",
        b("GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "no colon",
        b("GET / HTTP/1.1\r\nHost a\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "empty name",
        b("GET / HTTP/1.1\r\n: a\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!("bare LF", b("GET / HTTP/1.1\nHost: a\n\n"), MALFORMED_HTTP);
    t!(
        "bare LF later",
        b("GET / HTTP/1.1\r\nHost: a\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "bare CR",
        b("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "bare CR early",
        b("GET / HTTP/1.1\r\nX: a\rb"),
        MALFORMED_HTTP
    );
    t!(
        "NUL in value",
        b("GET / HTTP/1.1\r\nX: a\0b\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!("NUL early", b("GET /\0"), MALFORMED_HTTP);
    t!(
        "userinfo in Host",
        b("GET / HTTP/1.1\r\nHost: u@h\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "space in Host",
        b("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "two spaces in request line",
        b("GET  / HTTP/1.1\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!(
        "space in target",
        b("GET /a b HTTP/1.1\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!("no version", b("GET /\r\n\r\n"), MALFORMED_HTTP);
    t!(
        "lowercase version",
        b("GET / http/1.1\r\n\r\n"),
        MALFORMED_HTTP
    );
    t!("version junk", b("GET / HTTP/1.1x\r\n\r\n"), MALFORMED_HTTP);
    t!(
        "HTTP/1.9 is 1.x",
        b("GET / HTTP/1.9\r\n\r\n"),
        http("GET", "/", None)
    );
    t!(
        "HTTP/2 prior knowledge preface",
        b("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        Sniff::Opaque(OpaqueReason::UnsupportedHttpVersion)
    );
    t!(
        "HTTP/0.9 style",
        b("GET / HTTP/0.9\r\n\r\n"),
        Sniff::Opaque(OpaqueReason::UnsupportedHttpVersion)
    );

    // Detection from the first bytes.
    t!(
        "lowercase method",
        b("get / HTTP/1.1\r\n\r\n"),
        Sniff::Opaque(OpaqueReason::NotTlsOrHttp)
    );
    t!(
        "SSH banner",
        b("SSH-2.0-OpenSSH_9.6\r\n"),
        Sniff::Opaque(OpaqueReason::NotTlsOrHttp)
    );
    t!(
        "leading CRLF",
        b("\r\nGET / HTTP/1.1\r\n\r\n"),
        Sniff::Opaque(OpaqueReason::NotTlsOrHttp)
    );
    t!(
        "binary",
        vec![0x00, 0x01],
        Sniff::Opaque(OpaqueReason::NotTlsOrHttp)
    );
    t!(
        "method of 16",
        b("ABCDEFGHIJKLMNOP / HTTP/1.1\r\n\r\n"),
        http("ABCDEFGHIJKLMNOP", "/", None)
    );
    t!(
        "method of 17",
        b("ABCDEFGHIJKLMNOPQ"),
        Sniff::Opaque(OpaqueReason::NotTlsOrHttp)
    );
    t!(
        "method of 16 waits for SP",
        b("ABCDEFGHIJKLMNOP"),
        Sniff::Incomplete
    );
    t!("G", b("G"), Sniff::Incomplete);
    t!("empty", vec![], Sniff::Incomplete);
    t!("0x16 alone", vec![0x16], Sniff::Incomplete);
}

#[test]
fn http_head_details() {
    let req = b"GET /x HTTP/1.1\r\nHost: h:1\r\n\r\nBODY";
    let head = parse_http_head(req).unwrap().unwrap();
    assert_eq!(
        head,
        HttpHead {
            method: "GET",
            target: "/x",
            version_minor: 1,
            host: Some("h:1"),
            framed: false,
            head_len: req.len() - 4,
        }
    );
    assert_eq!(&req[head.head_len..], b"BODY");
    for field in ["Content-Length: 4", "transfer-ENCODING: chunked"] {
        let req = format!("POST /x HTTP/1.1\r\nHost: h\r\n{field}\r\n\r\n");
        let head = parse_http_head(req.as_bytes()).unwrap().unwrap();
        assert!(head.framed, "{field}");
    }
    assert_eq!(
        parse_http_head(b"GET / HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap()
            .version_minor,
        0
    );
    assert_eq!(parse_http_head(b"GET / HTTP/1.1\r\n"), Ok(None));
    assert_eq!(
        parse_http_head(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
        Err(HttpHeadError::DuplicateHost)
    );
    assert!(matches!(
        parse_http_head(b"\x16\x03"),
        Err(HttpHeadError::Malformed(_))
    ));
    assert_eq!(
        HttpHeadError::DuplicateHost.reason(),
        OpaqueReason::DuplicateHost
    );
}

#[test]
fn every_http_prefix_is_incomplete() {
    let heads = [
        &b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"[..],
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic eA==\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ];
    for head in heads {
        let full = sniff(head, BIG);
        assert!(matches!(full, Sniff::Http { .. }), "{full:?}");
        for n in 0..head.len() {
            assert_eq!(sniff(&head[..n], BIG), Sniff::Incomplete, "prefix {n}");
            assert_eq!(parse_http_head(&head[..n]), Ok(None), "prefix {n}");
        }
    }
}

#[test]
fn huge_http_head_is_too_large() {
    let mut req = b("GET / HTTP/1.1\r\nHost: a\r\n");
    while req.len() < 10_000 {
        req.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(sniff(&req, 8192), Sniff::Opaque(OpaqueReason::TooLarge));
    assert_eq!(sniff(&req[..8191], 8192), Sniff::Incomplete);
    req.extend_from_slice(b"\r\n");
    assert_eq!(sniff(&req, 8192), Sniff::Opaque(OpaqueReason::TooLarge));
    assert_eq!(sniff(&req, req.len()), http("GET", "/", Some("a")));
    // A complete head longer than the budget is too large even though it is
    // valid.
    assert_eq!(
        sniff(&req, req.len() - 1),
        Sniff::Opaque(OpaqueReason::TooLarge)
    );
}

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
