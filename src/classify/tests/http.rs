//! HTTP/1.x request-head tests: a table of edge cases, head details,
//! every prefix, and the size budget.

use super::*;

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
