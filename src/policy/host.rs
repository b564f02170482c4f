//! Host names: normalisation, validation and the exact / `*.suffix` matcher.
//!
//! In: a host name as a client sent it. Out: the keys it matches, visited from
//! the least specific (`*.com`) to the most specific (the exact name).
//!
//! Semantics (DESIGN.md "Rule semantics"):
//! - `a.com` matches exactly `a.com`.
//! - `*.a.com` matches any name with one or more labels before `.a.com`
//!   (`x.a.com`, `x.y.a.com`), never `a.com` itself.
//! - Matching is ASCII case-insensitive and ignores one trailing dot.
//! - Precedence is decided by the caller (`policy::decide`): a deny anywhere
//!   wins, then the most specific allow (exact, then the longest suffix),
//!   then rule order.
//!
//! How: one pass lowercases and validates each byte into a stack buffer and
//! notes where the dots are. Then each suffix `.rest` whose length some
//! wildcard key has (a bitset) is probed in one open-addressing table, and
//! the whole name if some exact key has its length (wildcard keys are stored
//! with their leading dot, exact keys without, so both live in one table and
//! never collide). A probe hashes the suffix 8 bytes at a time, compares the
//! 64-bit hash and length, then the bytes. Nothing is allocated per lookup.
//! The bench `benches/policy.rs` compares this with aho-corasick and a
//! `HashSet` walk on the same streams.

use std::ops::ControlFlow;

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

/// Normalises a name for display and for rule patterns: IDN to A-labels, ASCII
/// lowercase, one trailing dot removed, then validated. Allocates; the hot
/// path uses [`HostTable::visit`] instead, which does the same for ASCII input.
///
/// # Errors
/// The first [`NameError`] found.
pub fn normalize(name: &str) -> Result<String, NameError> {
    let ascii = if name.is_ascii() {
        name.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(name).map_err(|_| NameError::BadIdn)?
    };
    let trimmed = ascii.strip_suffix('.').unwrap_or(&ascii);
    validate(trimmed.as_bytes())?;
    Ok(trimmed.to_string())
}

/// Checks an already lowercased name without a trailing dot.
fn validate(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong);
        }
        if let Some(&b) = label.iter().find(|&&b| FOLD[b as usize] == 0) {
            return Err(NameError::BadByte(b));
        }
    }
    Ok(())
}

/// Hash of a key or suffix, 8 bytes at a time. Only a probe hint: keys are
/// compared byte for byte, so a collision costs time, never a wrong answer.
#[inline(always)]
fn hash_key(key: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = key.len() as u64;
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("chunks_exact yields 8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Byte by byte: a variable-length copy would be a memcpy call.
        let w = rest
            .iter()
            .enumerate()
            .fold(0u64, |w, (k, &b)| w | u64::from(b) << (8 * k));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    h ^ (h >> 32)
}

#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    offset: u32,
    len: u32,
    value: u32,
}

const EMPTY: u32 = u32::MAX;

/// A compiled set of host keys. Keys are normalised names (`a.com`) or
/// wildcard suffixes with their leading dot (`.a.com` for `*.a.com`); each
/// carries a caller-chosen `u32` value.
#[derive(Clone)]
pub struct HostTable {
    slots: Vec<Slot>,
    mask: usize,
    arena: Vec<u8>,
    /// Bit `n` set: some wildcard key has `n` bytes (with its dot; keys over
    /// 255 bytes cannot exist). Suffixes of other lengths are not probed.
    wild_lens: [u64; 4],
    /// The same for exact keys.
    exact_lens: [u64; 4],
}

#[inline(always)]
fn has_len(set: &[u64; 4], len: usize) -> bool {
    len < 256 && set[len >> 6] & (1 << (len & 63)) != 0
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

impl HostTable {
    /// Builds the table. Keys must be distinct.
    pub fn build(keys: &[(HostKey, u32)]) -> HostTable {
        let cap = (keys.len() * 2).next_power_of_two().max(16);
        let mut table = HostTable {
            slots: vec![
                Slot {
                    hash: 0,
                    offset: 0,
                    len: 0,
                    value: EMPTY,
                };
                cap
            ],
            mask: cap - 1,
            arena: Vec::new(),
            wild_lens: [0; 4],
            exact_lens: [0; 4],
        };
        for (key, value) in keys {
            let bytes = key.table_bytes();
            let n = bytes.len().min(255);
            let set = match key {
                HostKey::Exact(_) => &mut table.exact_lens,
                HostKey::Wildcard(_) => &mut table.wild_lens,
            };
            set[n >> 6] |= 1 << (n & 63);
            let hash = hash_key(&bytes);
            let mut i = hash as usize & table.mask;
            while table.slots[i].value != EMPTY {
                i = (i + 1) & table.mask;
            }
            table.slots[i] = Slot {
                hash,
                offset: u32::try_from(table.arena.len()).expect("host arena under 4 GiB"),
                len: bytes.len() as u32,
                value: *value,
            };
            table.arena.extend_from_slice(&bytes);
        }
        table
    }

    #[inline(always)]
    fn probe(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let mut i = hash as usize & self.mask;
        loop {
            let slot = self.slots[i];
            if slot.value == EMPTY {
                return None;
            }
            if slot.hash == hash && slot.len as usize == key.len() {
                let start = slot.offset as usize;
                if same_bytes(&self.arena[start..start + key.len()], key) {
                    return Some(slot.value);
                }
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Visits the value of every key matching `name`, least specific first,
    /// after normalising and validating it. `name` must be ASCII (IDNs are
    /// converted to A-labels before they reach here); one trailing dot is
    /// ignored. A malformed name visits nothing.
    ///
    /// # Errors
    /// [`NameError`] when `name` is not a valid host name.
    #[inline]
    pub fn visit(
        &self,
        name: &[u8],
        mut visitor: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<(), NameError> {
        let name = name.strip_suffix(b".").unwrap_or(name);
        let n = name.len();
        if n == 0 {
            return Err(NameError::Empty);
        }
        if n > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        // One pass: lowercase into `buf`, validate bytes and label lengths,
        // remember where the dots are. No hashing per byte.
        let mut storage = [0u8; MAX_NAME_LEN];
        let buf = &mut storage[..n];
        let mut dots = [0u8; MAX_NAME_LEN / 2 + 1];
        let mut ndots = 0;
        let mut label_start = 0;
        for i in 0..n {
            let raw = name[i];
            let b = FOLD[raw as usize];
            if b == 0 {
                return Err(NameError::BadByte(raw));
            }
            buf[i] = b;
            if b == b'.' {
                check_label(i - label_start)?;
                dots[ndots] = i as u8;
                ndots += 1;
                label_start = i + 1;
            }
        }
        check_label(n - label_start)?;
        let name = &*buf;
        // Suffixes `.rest`, shortest (least specific) first, then the exact name.
        for &dot in dots[..ndots].iter().rev() {
            let suffix = &name[dot as usize..];
            if has_len(&self.wild_lens, suffix.len())
                && let Some(v) = self.probe(hash_key(suffix), suffix)
                && visitor(v).is_break()
            {
                return Ok(());
            }
        }
        if has_len(&self.exact_lens, n)
            && let Some(v) = self.probe(hash_key(name), name)
        {
            let _ = visitor(v);
        }
        Ok(())
    }
}

/// Equality of two equally long byte strings, 8 bytes at a time (names are
/// short: this beats both a byte loop and a memcmp call).
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"));
    let mut i = 0;
    while i + 8 <= a.len() {
        if word(a, i) != word(b, i) {
            return false;
        }
        i += 8;
    }
    a[i..] == b[i..]
}

#[inline(always)]
fn check_label(len: usize) -> Result<(), NameError> {
    match len {
        0 => Err(NameError::EmptyLabel),
        1..=MAX_LABEL_LEN => Ok(()),
        _ => Err(NameError::LabelTooLong),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(patterns: &[&str]) -> HostTable {
        let keys: Vec<_> = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| (HostKey::parse(p).unwrap(), i as u32))
            .collect();
        HostTable::build(&keys)
    }

    fn matches(t: &HostTable, name: &str) -> Result<Vec<u32>, NameError> {
        let mut out = Vec::new();
        t.visit(name.as_bytes(), |v| {
            out.push(v);
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    macro_rules! t {
        ($t:expr, $($name:expr => $want:expr),+ $(,)?) => {
            $( assert_eq!(matches(&$t, $name), $want, "name {:?}", $name); )+
        };
    }

    #[test]
    fn wildcard_does_not_match_apex() {
        let t = table(&["*.a.com"]);
        t!(t, "a.com" => Ok(vec![]), "x.a.com" => Ok(vec![0]), "x.y.a.com" => Ok(vec![0]));
    }

    #[test]
    fn exact_matches_only_itself() {
        let t = table(&["a.com"]);
        t!(t, "a.com" => Ok(vec![0]), "x.a.com" => Ok(vec![]), "aa.com" => Ok(vec![]), "a.com.evil" => Ok(vec![]));
    }

    #[test]
    fn matches_come_least_specific_first() {
        let t = table(&["*.com", "*.a.com", "x.a.com"]);
        t!(t, "x.a.com" => Ok(vec![0, 1, 2]), "y.a.com" => Ok(vec![0, 1]), "a.com" => Ok(vec![0]));
    }

    #[test]
    fn matching_is_ascii_case_insensitive_and_ignores_one_trailing_dot() {
        let t = table(&["pypi.org", "*.Anaconda.COM"]);
        t!(t, "PyPI.Org" => Ok(vec![0]), "pypi.org." => Ok(vec![0]), "REPO.anaconda.com." => Ok(vec![1]));
        t!(t, "pypi.org.." => Err(NameError::EmptyLabel));
    }

    #[test]
    fn look_alikes_do_not_match() {
        let t = table(&["*.azureml.ms", "azureml.ms"]);
        t!(t,
            "evilazureml.ms" => Ok(vec![]),
            "azureml.ms.evil.com" => Ok(vec![]),
            "x.azureml.ms" => Ok(vec![0]),
            "azureml.ms" => Ok(vec![1]),
        );
    }

    #[test]
    fn malformed_names_are_rejected() {
        let t = table(&["a.com"]);
        let long_label = format!("{}.com", "a".repeat(64));
        let ok_label = format!("{}.com", "a".repeat(63));
        let long_name = format!("{}.com", vec!["a".repeat(60); 4].join("."));
        t!(t,
            "" => Err(NameError::Empty),
            "." => Err(NameError::Empty),
            ".a.com" => Err(NameError::EmptyLabel),
            "a..com" => Err(NameError::EmptyLabel),
            &long_label => Err(NameError::LabelTooLong),
            &ok_label => Ok(vec![]),
            &long_name => Ok(vec![]),
            "a\0.com" => Err(NameError::BadByte(0)),
            "a%2e.com" => Err(NameError::BadByte(b'%')),
            "a/b.com" => Err(NameError::BadByte(b'/')),
            "a b.com" => Err(NameError::BadByte(b' ')),
            "a:443" => Err(NameError::BadByte(b':')),
            "under_score.a.com" => Ok(vec![]),
        );
        assert_eq!(long_name.len(), 247);
        let l63 = "a".repeat(63);
        let name253 = format!("{l63}.{l63}.{l63}.{}", "d".repeat(61));
        let name254 = format!("{l63}.{l63}.{l63}.{}", "d".repeat(62));
        assert_eq!((name253.len(), name254.len()), (253, 254));
        t!(t, &name253 => Ok(vec![]), &name254 => Err(NameError::TooLong));
    }

    #[test]
    fn normalize_converts_idn_and_case() {
        assert_eq!(
            normalize("Bücher.Example.").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(normalize("PYPI.org").unwrap(), "pypi.org");
        assert_eq!(normalize("a..b"), Err(NameError::EmptyLabel));
    }

    #[test]
    fn pattern_errors_say_how_to_fix() {
        assert_eq!(
            HostKey::parse("*foo.com").unwrap_err(),
            "'*foo.com' is not a valid pattern: a wildcard must be a whole leading label, as in '*.foo.com'"
        );
        assert!(
            HostKey::parse("a.*.com")
                .unwrap_err()
                .contains("whole leading label")
        );
        assert!(
            HostKey::parse("*")
                .unwrap_err()
                .contains("whole leading label")
        );
        assert_eq!(
            HostKey::parse("*.com").unwrap(),
            HostKey::Wildcard("com".into())
        );
        assert_eq!(
            HostKey::parse("*.A.com.").unwrap(),
            HostKey::Wildcard("a.com".into())
        );
    }

    #[test]
    fn many_keys_all_found() {
        let names: Vec<String> = (0..5000)
            .map(|i| format!("host{i}.example{}.com", i % 7))
            .collect();
        let keys: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (HostKey::Exact(n.clone()), i as u32))
            .collect();
        let t = HostTable::build(&keys);
        for (i, n) in names.iter().enumerate() {
            assert_eq!(matches(&t, n), Ok(vec![i as u32]));
        }
        assert_eq!(matches(&t, "host5000.example0.com"), Ok(vec![]));
    }
}
