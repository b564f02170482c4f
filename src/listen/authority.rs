//! Authority: `host[:port]` of a CONNECT line, an absolute URI or a Host header, parsed strictly.
//!
//! In: the text a client sent. Out: the host as written (brackets kept on
//! IPv6 literals) and a port, or a sentence saying what is wrong. Strict on
//! purpose: a port is 1-5 ASCII digits in 1-65535 (never a sign, never a
//! silent default for a bad one), and a host carries no userinfo, path,
//! query, fragment or spaces. It decides nothing.

use http::Uri;

/// Parses `host:port` of a CONNECT or absolute URI, strictly: no userinfo,
/// and a port of 1-5 ASCII digits in 1-65535 (`+443`, `65536`, `08x` are
/// errors, never a default port).
pub fn authority(uri: &Uri, default_port: Option<u16>) -> Result<(String, u16), &'static str> {
    let auth = uri.authority().ok_or("missing host")?;
    authority_text(auth.as_str(), default_port)
}

/// [`authority`] of the text `host[:port]` (also a Host header's value,
/// which must carry nothing else: no path, query, fragment or userinfo).
pub fn authority_text(
    text: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), &'static str> {
    if text.contains('@') {
        return Err("userinfo (user@host) is not allowed in the target");
    }
    if text.bytes().any(|b| {
        matches!(b, b'/' | b'?' | b'#' | b'\\') || b.is_ascii_whitespace() || b.is_ascii_control()
    }) {
        return Err("the host may not carry a path, query, fragment or spaces");
    }
    let (host, port_text) = split_port(text)?;
    if host.is_empty() {
        return Err("missing host");
    }
    let port = match (port_text, default_port) {
        (Some(p), _) => parse_port(p)?,
        (None, Some(p)) => p,
        (None, None) => return Err("CONNECT needs host:port, e.g. CONNECT pypi.org:443"),
    };
    Ok((host.to_string(), port))
}

/// `host` and the text after its last `:` (IPv6 literals are bracketed).
fn split_port(text: &str) -> Result<(&str, Option<&str>), &'static str> {
    if text.starts_with('[') {
        let end = text.find(']').ok_or("missing ']' after an IPv6 address")?;
        let (host, rest) = text.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => rest
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or("expected ':port' after ']'"),
        };
    }
    Ok(match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    })
}

/// A port: 1-5 ASCII digits, 1-65535.
fn parse_port(text: &str) -> Result<u16, &'static str> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the port is not a number from 1 to 65535");
    }
    match text.parse::<u32>() {
        Ok(0) => Err("port 0 is not a port"),
        Ok(p) if p <= 65535 => Ok(p as u16),
        _ => Err("the port is not a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::host;

    #[test]
    fn authority_forms() {
        let a = |s: &str, d| authority(&s.parse::<Uri>().unwrap(), d);
        assert_eq!(a("pypi.org:443", None), Ok(("pypi.org".into(), 443)));
        assert_eq!(
            a("http://pypi.org/simple", Some(80)),
            Ok(("pypi.org".into(), 80))
        );
        assert_eq!(a("[::1]:443", None), Ok(("[::1]".into(), 443)));
        assert!(a("pypi.org:0", None).is_err());
        assert!(
            a("http://user:pw@pypi.org/", Some(80))
                .unwrap_err()
                .contains("userinfo")
        );
        assert!(a("pypi.org", None).is_err());
        // Strict ports: never a silent default, never a sign.
        assert!(a("pypi.org:+443", None).is_err());
        assert!(a("pypi.org:65536", None).is_err());
        assert!(a("http://pypi.org:65536/", Some(80)).is_err());
        assert!(a("pypi.org:000443", None).is_err());
        assert_eq!(a("pypi.org:65535", None), Ok(("pypi.org".into(), 65535)));
        let h = |s: &str| authority_text(s, Some(80));
        assert_eq!(h("pypi.org"), Ok(("pypi.org".into(), 80)));
        assert_eq!(h("[::1]:8080"), Ok(("[::1]".into(), 8080)));
        for bad in [
            "pypi.org/x",
            "pypi.org?q",
            "pypi.org#f",
            "a b",
            "pypi.org:",
            "[::1",
            "[::1]x",
        ] {
            assert!(h(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(host::normalized_or_kept("[::1]"), "::1");
        assert_eq!(host::normalized_or_kept("PyPI.org."), "pypi.org");
    }
}
