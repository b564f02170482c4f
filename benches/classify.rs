//! Benchmarks for the classify stage: ClientHello SNI extraction from real
//! captures and HTTP/1.1 request-head parsing. Each set-up asserts the
//! expected answer first, so a broken parser fails instead of looking fast.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::classify::{Sniff, parse_client_hello, parse_http_head, sniff};

const CHROME: &str = include_str!("../tests/data/clienthello-chrome.hex");
const CHROME125_KYBER: &str =
    include_str!("../tests/data/clienthello-chrome125-x25519kyber768-echgrease.hex");

/// Budget passed to `sniff`: any legal ClientHello fits.
const MAX_LEN: usize = 64 * 1024;

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim().as_bytes();
    assert!(s.len().is_multiple_of(2), "odd hex length");
    s.chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).expect("ascii hex");
            u8::from_str_radix(text, 16).expect("hex digit")
        })
        .collect()
}

/// A typical ~300-byte browser-ish request head.
fn http_request() -> Vec<u8> {
    let req = b"GET /api/v1/items?limit=50&offset=100 HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Connection: keep-alive\r\n\r\n"
        .to_vec();
    assert!((280..=340).contains(&req.len()), "len {}", req.len());
    req
}

fn bench_tls(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_hello");
    for (name, hex, len, host, ech) in [
        ("chrome", CHROME, 517, "www.google.com", false),
        (
            "chrome125_kyber",
            CHROME125_KYBER,
            1756,
            "lh3.google.com",
            true,
        ),
    ] {
        let hello = unhex(hex);
        assert_eq!(hello.len(), len, "{name}");
        let info = parse_client_hello(&hello)
            .expect("valid ClientHello")
            .expect("complete ClientHello");
        assert_eq!((info.sni, info.ech), (Some(host), ech), "{name}");
        assert_eq!(
            sniff(&hello, MAX_LEN),
            Sniff::Tls {
                sni: Some(host),
                ech
            },
            "{name}"
        );
        group.throughput(Throughput::Bytes(hello.len() as u64));
        group.bench_function(format!("parse_client_hello/{name}"), |b| {
            b.iter(|| parse_client_hello(black_box(&hello)))
        });
        group.bench_function(format!("sniff/{name}"), |b| {
            b.iter(|| sniff(black_box(&hello), MAX_LEN))
        });
    }
    group.finish();
}

fn bench_http(c: &mut Criterion) {
    let req = http_request();
    let head = parse_http_head(&req)
        .expect("valid head")
        .expect("complete head");
    assert_eq!(head.method, "GET");
    assert_eq!(head.host, Some("api.example.com"));
    assert_eq!(head.head_len, req.len());
    assert!(matches!(
        sniff(&req, MAX_LEN),
        Sniff::Http {
            host: Some("api.example.com"),
            ..
        }
    ));
    let mut group = c.benchmark_group("http_head");
    group.throughput(Throughput::Bytes(req.len() as u64));
    group.bench_function("parse_http_head/typical", |b| {
        b.iter(|| parse_http_head(black_box(&req)))
    });
    group.bench_function("sniff/typical", |b| {
        b.iter(|| sniff(black_box(&req), MAX_LEN))
    });
    group.finish();
}

criterion_group!(benches, bench_tls, bench_http);
criterion_main!(benches);
