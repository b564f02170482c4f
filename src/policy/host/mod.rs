//! Host names: the one normalisation, validation, rule patterns, and the
//! exact / `*.suffix` matcher.
//!
//! In: a host name as a client sent it, or a rule's pattern. Out: the
//! normalised name ([`normalize`]), a [`HostKey`], or the value of the most
//! specific key a name matches ([`HostTable`]). Nothing here knows about
//! rules, ports or decisions.
//!
//! Semantics (DESIGN.md "Rule semantics"):
//! - `a.com` matches exactly `a.com`.
//! - `*.a.com` matches any name with one or more labels before `.a.com`
//!   (`x.a.com`, `x.y.a.com`), never `a.com` itself.
//! - Matching is ASCII case-insensitive and ignores one trailing dot.
//! - Precedence (a deny anywhere wins, then the most specific allow, then
//!   rule order) needs every key a name matches; those are the most specific
//!   key K and the wildcard keys that are suffixes of K, whatever the name,
//!   so `policy` folds them into K's value when it compiles, and a lookup
//!   stops at the first (most specific) key it finds.
//!
//! [`scan`] reads a name into hashed words without copying it; [`table`]
//! holds the keys and probes them.

mod scan;
mod table;
#[cfg(test)]
mod tests;

pub use table::{Found, HostTable};

/// Longest name accepted, in bytes, without the trailing dot (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label accepted, in bytes (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a name is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Nothing left after removing one trailing dot.
    #[error("empty name")]
    Empty,
    /// Over 253 bytes.
    #[error("name longer than 253 bytes")]
    TooLong,
    /// Two dots in a row, or a leading dot.
    #[error("empty label")]
    EmptyLabel,
    /// A label over 63 bytes.
    #[error("label longer than 63 bytes")]
    LabelTooLong,
    /// A byte outside letters, digits, `-` and `_`.
    #[error("byte {0:#04x} is not allowed in a host name")]
    BadByte(u8),
    /// An internationalised name that has no valid A-label form.
    #[error("not a valid internationalised name")]
    BadIdn,
}

/// Byte class: 0 = not allowed, otherwise the lowercased byte (`.` maps to itself).
static FOLD: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = if b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || b == b'-'
            || b == b'_'
            || b == b'.'
        {
            b
        } else if b.is_ascii_uppercase() {
            b + 32
        } else {
            0
        };
        i += 1;
    }
    t
};

/// Normalises a host name: the one definition every stage uses.
///
/// 1. internationalised (non-ASCII) names become their A-label form
///    (`bücher.example` → `xn--bcher-kva.example`), via IDNA; ASCII names
///    are lowercased (ASCII only);
/// 2. one trailing dot is removed (`pypi.org.` → `pypi.org`; two are an
///    empty label);
/// 3. the result must be a valid name (see [`check`]), else an error.
///
/// Allocates. The decision path does not call it: [`HostTable::find_name`]
/// applies the same rules to ASCII bytes in place (and refuses non-ASCII
/// bytes: IDNs reach a listener as A-labels), and the policy's reference
/// test checks the two agree.
///
/// # Errors
/// The first [`NameError`] found; [`NameError::BadIdn`] when a non-ASCII
/// name has no A-label form.
pub fn normalize(name: &str) -> Result<String, NameError> {
    let ascii = if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(name).map_err(|_| NameError::BadIdn)?
    };
    let trimmed = ascii.strip_suffix('.').unwrap_or(&ascii);
    check(trimmed.as_bytes())?;
    Ok(trimmed.to_string())
}

/// The form of a host that policy, DNS and logs see: IP literals without
/// brackets in canonical text, names normalised (lowercase, no trailing dot,
/// A-labels); a malformed name is kept as sent, so `decide` answers
/// `malformed_host` for it.
pub fn normalized_or_kept(raw: &str) -> String {
    match super::Target::parse(raw) {
        super::Target::Ip(ip) => ip.to_string(),
        super::Target::Name(n) => normalize(n).unwrap_or_else(|_| n.to_string()),
    }
}

/// Checks a name without its trailing dot (either case): 1 to 253 bytes,
/// labels of 1 to 63 letters, digits, `-` or `_`. Reports the first problem
/// left to right (a bad byte before a later label's length).
///
/// # Errors
/// The first [`NameError`] found.
pub fn check(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    let mut label = 0;
    for &raw in name {
        match FOLD[raw as usize] {
            0 => return Err(NameError::BadByte(raw)),
            b'.' => {
                check_label(label)?;
                label = 0;
            }
            _ => label += 1,
        }
    }
    check_label(label)
}

fn check_label(len: usize) -> Result<(), NameError> {
    match len {
        0 => Err(NameError::EmptyLabel),
        1..=MAX_LABEL_LEN => Ok(()),
        _ => Err(NameError::LabelTooLong),
    }
}

/// A key handed to [`HostTable::build`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostKey {
    /// Exactly this normalised name.
    Exact(String),
    /// Any name ending in `.` + this normalised suffix (the pattern `*.suffix`).
    Wildcard(String),
}

impl HostKey {
    /// Parses a normalised rule pattern.
    ///
    /// # Errors
    /// A message for the user when the pattern has a wildcard anywhere but as
    /// a whole leading label, or is not a valid name.
    pub fn parse(pattern: &str) -> Result<HostKey, String> {
        let (wild, rest) = match pattern.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        if rest.contains('*') || (!wild && pattern.starts_with('*')) {
            return Err(format!(
                "'{pattern}' is not a valid pattern: a wildcard must be a whole leading label, as in '*.{}'",
                pattern.trim_start_matches(['*', '.'])
            ));
        }
        let name = normalize(rest).map_err(|e| format!("'{pattern}' is not a valid host: {e}"))?;
        Ok(if wild {
            HostKey::Wildcard(name)
        } else {
            HostKey::Exact(name)
        })
    }

    fn table_bytes(&self) -> Vec<u8> {
        match self {
            HostKey::Exact(name) => name.as_bytes().to_vec(),
            HostKey::Wildcard(suffix) => {
                let mut v = Vec::with_capacity(suffix.len() + 1);
                v.push(b'.');
                v.extend_from_slice(suffix.as_bytes());
                v
            }
        }
    }
}

impl std::fmt::Display for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostKey::Exact(n) => f.write_str(n),
            HostKey::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}
