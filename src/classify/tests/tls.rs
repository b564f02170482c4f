//! ClientHello tests: real captures (every prefix, every record split) and
//! a table of hand-built edge cases, each with its expected answer.

use super::*;

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
