//! Host name tests: the matcher's precedence rules by name, normalisation,
//! pattern errors, and the table against a plain reading of the semantics.

use super::*;

/// A table whose value for each key is its index in `keys`.
fn numbered_table(keys: &[HostKey]) -> HostTable<u32> {
    let numbered: Vec<_> = keys.iter().cloned().zip(0u32..).collect();
    HostTable::build(&numbered)
}

fn table(patterns: &[&str]) -> HostTable<u32> {
    let keys: Vec<_> = patterns
        .iter()
        .enumerate()
        .map(|(i, p)| (HostKey::parse(p).unwrap(), i as u32))
        .collect();
    HostTable::build(&keys)
}

fn matches(t: &HostTable<u32>, name: &str) -> Result<Option<u32>, NameError> {
    t.most_specific(name.as_bytes()).map(Option::<&u32>::copied)
}

macro_rules! t {
    ($t:expr, $($name:expr => $want:expr),+ $(,)?) => {
        $( assert_eq!(matches(&$t, $name), $want, "name {:?}", $name); )+
    };
}

#[test]
fn wildcard_does_not_match_apex() {
    let t = table(&["*.a.com"]);
    t!(t, "a.com" => Ok(None), "x.a.com" => Ok(Some(0)), "x.y.a.com" => Ok(Some(0)));
}

#[test]
fn exact_matches_only_itself() {
    let t = table(&["a.com"]);
    t!(t, "a.com" => Ok(Some(0)), "x.a.com" => Ok(None), "aa.com" => Ok(None), "a.com.evil" => Ok(None));
}

#[test]
fn the_most_specific_key_wins() {
    let t = table(&["*.com", "*.a.com", "x.a.com"]);
    t!(t, "x.a.com" => Ok(Some(2)), "y.a.com" => Ok(Some(1)), "z.y.a.com" => Ok(Some(1)), "a.com" => Ok(Some(0)));
}

#[test]
fn matching_is_ascii_case_insensitive_and_ignores_one_trailing_dot() {
    let t = table(&["pypi.org", "*.Anaconda.COM"]);
    t!(t, "PyPI.Org" => Ok(Some(0)), "pypi.org." => Ok(Some(0)), "REPO.anaconda.com." => Ok(Some(1)));
    t!(t, "pypi.org.." => Err(NameError::EmptyLabel));
}

#[test]
fn look_alikes_do_not_match() {
    let t = table(&["*.azureml.ms", "azureml.ms"]);
    t!(t,
        "evilazureml.ms" => Ok(None),
        "azureml.ms.evil.com" => Ok(None),
        "x.azureml.ms" => Ok(Some(0)),
        "azureml.ms" => Ok(Some(1)),
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
        &ok_label => Ok(None),
        &long_name => Ok(None),
        "a\0.com" => Err(NameError::BadByte(0)),
        "a%2e.com" => Err(NameError::BadByte(b'%')),
        "a/b.com" => Err(NameError::BadByte(b'/')),
        "a b.com" => Err(NameError::BadByte(b' ')),
        "a:443" => Err(NameError::BadByte(b':')),
        "under_score.a.com" => Ok(None),
    );
    assert_eq!(long_name.len(), 247);
    let l63 = "a".repeat(63);
    let name253 = format!("{l63}.{l63}.{l63}.{}", "d".repeat(61));
    let name254 = format!("{l63}.{l63}.{l63}.{}", "d".repeat(62));
    assert_eq!((name253.len(), name254.len()), (253, 254));
    t!(t, &name253 => Ok(None), &name254 => Err(NameError::TooLong));
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
        assert_eq!(matches(&t, n), Ok(Some(i as u32)));
    }
    assert_eq!(matches(&t, "host5000.example0.com"), Ok(None));
}

/// Numbered hosts share their first and last 8 bytes and length, so
/// one filter bit: every key is still found, and a name that shares the
/// bit but is no key is still refused (the probe decides).
#[test]
fn keys_sharing_a_sketch_are_told_apart() {
    let keys: Vec<HostKey> = (0..200)
        .map(|i| HostKey::Exact(format!("customer-{i:04}.eu.example.com")))
        .chain((0..200).map(|i| HostKey::Wildcard(format!("node{i:03}.example.com"))))
        .collect();
    let t = numbered_table(&keys);
    for i in 0..200u32 {
        let exact = format!("customer-{i:04}.eu.example.com");
        let under = format!("x.node{i:03}.example.com");
        t!(t, &exact => Ok(Some(i)), &under => Ok(Some(200 + i)));
    }
    t!(t,
        "customer-0200.eu.example.com" => Ok(None),
        "customer-00x1.eu.example.com" => Ok(None),
        "x.node200.example.com" => Ok(None),
        "node001.example.com" => Ok(None),
    );
}

use crate::testing::Rng;

/// The semantics written plainly: what `most_specific` must return for `name`.
fn reference(patterns: &[HostKey], name: &str) -> Result<Option<u32>, NameError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for (i, label) in name.split('.').enumerate() {
        let before: usize = name.split('.').take(i).map(|l| l.len() + 1).sum();
        if let Some(&b) = label
            .as_bytes()
            .iter()
            .find(|&&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            // The first bad byte wins over a later label's length.
            let _ = before;
            return Err(NameError::BadByte(b));
        }
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong);
        }
    }
    let name = name.to_ascii_lowercase();
    let mut wild: Vec<(usize, u32)> = Vec::new();
    let mut exact = None;
    for (i, p) in patterns.iter().enumerate() {
        match p {
            HostKey::Exact(e) if *e == name => exact = Some(i as u32),
            HostKey::Wildcard(s) if name.ends_with(&format!(".{s}")) => {
                wild.push((s.len(), i as u32))
            }
            _ => {}
        }
    }
    wild.sort();
    Ok(exact.or(wild.last().map(|&(_, i)| i)))
}

/// A valid name of exactly `n` bytes (`n` >= 1): labels of 1 to 9
/// letters and digits, as the seed picks.
fn name_of_len(n: usize, rng: &mut Rng) -> String {
    let mut name = String::new();
    while name.len() < n {
        if !name.is_empty() {
            name.push('.');
        }
        let left = n - name.len();
        let label = if left <= 10 { left } else { 1 + rng.below(9) };
        for _ in 0..label {
            name.push(b"abcxyz0189-_"[rng.below(12)].into());
        }
        // A label may not start or end with `.`, and `-`/`_` are fine anywhere.
    }
    assert_eq!(name.len(), n);
    name
}

/// Every length at the edges of the scan's words and blocks (1, 7, 8, 15,
/// 16, 31, 32, 33, 63, 64, 65, 253 ...), with keys on every suffix: the
/// exact name, upper case, a trailing dot, suffixes and look-alikes, and
/// bytes at the classifier's edges at every position, against the plain
/// semantics.
#[test]
fn every_length_and_byte_position_agrees_with_the_plain_semantics() {
    let mut rng = Rng(0x0b0e_5eed_0000_0001);
    let lens = [
        1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 39, 40, 41, 47, 48, 49, 55, 56, 57,
        63, 64, 65, 66, 96, 127, 128, 129, 200, 252, 253,
    ];
    for &n in &lens {
        for _ in 0..4 {
            let name = name_of_len(n, &mut rng);
            // Keys: each suffix after a dot as a wildcard or an exact name, and the name.
            let mut keys = vec![HostKey::Exact(name.clone())];
            for (i, _) in name.match_indices('.') {
                let rest = name[i + 1..].to_string();
                keys.push(match rng.below(3) {
                    0 => HostKey::Exact(rest),
                    _ => HostKey::Wildcard(rest),
                });
            }
            keys.dedup();
            if rng.below(2) == 0 {
                keys.remove(0);
            }
            let t = numbered_table(&keys);
            let mut probes = vec![
                name.clone(),
                name.to_ascii_uppercase(),
                format!("{name}."),
                format!("x.{name}"),
                format!("x{name}"),
                name[1..].to_string(),
            ];
            for (i, _) in name.match_indices('.') {
                probes.push(name[i + 1..].to_string());
                probes.push(format!("q{}", &name[i..]));
            }
            for probe in &probes {
                assert_eq!(
                    matches(&t, probe),
                    reference(&keys, probe),
                    "{probe:?} {keys:?}"
                );
            }
            // Bytes at and around every edge of the classifier's ranges
            // (and those that bit 5 turns into `-`, `.` or a digit) at
            // every position (a sample of positions for long names).
            const EDGES: [u8; 40] = [
                0x00, 0x0d, 0x0e, 0x0f, 0x10, 0x19, 0x1a, 0x20, 0x2c, 0x2d, 0x2e, 0x2f, 0x30, 0x39,
                0x3a, 0x40, 0x41, 0x4d, 0x5a, 0x5b, 0x5e, 0x5f, 0x60, 0x61, 0x7a, 0x7b, 0x7e, 0x7f,
                0x80, 0xad, 0xae, 0xb0, 0xc1, 0xda, 0xdf, 0xe1, 0xed, 0xfa, 0xfe, 0xff,
            ];
            let step = if n > 70 { 7 } else { 1 };
            let every: Vec<u8> = (0..=255).collect();
            for at in (0..n).step_by(step) {
                // All 256 values at the ends and the middle.
                let values = if at == 0 || at == n / 2 || at == n - 1 {
                    &every[..]
                } else {
                    &EDGES[..]
                };
                for &b in values {
                    let mut bytes = name.clone().into_bytes();
                    bytes[at] = b;
                    let got = t.most_specific(&bytes).map(Option::<&u32>::copied);
                    match std::str::from_utf8(&bytes) {
                        Ok(s) => assert_eq!(got, reference(&keys, s), "{s:?} {keys:?}"),
                        Err(_) => assert_eq!(got, Err(NameError::BadByte(b)), "{bytes:?}"),
                    }
                }
            }
        }
    }
    // Labels at the 63-byte limit, and one byte over, in every tier.
    let t = table(&["*.b", "b"]);
    let keys = [HostKey::Wildcard("b".into()), HostKey::Exact("b".into())];
    for label in [7, 8, 30, 31, 32, 62, 63, 64, 65] {
        let a = "a".repeat(label);
        for name in [
            a.clone(),
            format!("{a}.b"),
            format!("b.{a}"),
            format!("b.{a}.b"),
        ] {
            assert_eq!(matches(&t, &name), reference(&keys, &name), "{name}");
        }
    }
}

#[test]
fn agrees_with_the_plain_semantics_on_random_names() {
    const WORDS: [&str; 8] = ["a", "b", "ab", "api", "azureml", "x0", "core-net", "q_1"];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let label = |rng: &mut Rng| -> String {
        match rng.below(12) {
            0 => "l".repeat(1 + rng.below(70)),
            _ => WORDS[rng.below(WORDS.len())].to_string(),
        }
    };
    for round in 0..40 {
        let mut keys: Vec<HostKey> = Vec::new();
        for _ in 0..1 + rng.below(40) {
            let labels = 1 + rng.below(6);
            let name: Vec<String> = (0..labels).map(|_| label(&mut rng)).collect();
            let name = name.join(".");
            if name.len() > MAX_NAME_LEN - 2 || name.split('.').any(|l| l.len() > 63) {
                continue;
            }
            let key = if rng.below(2) == 0 {
                HostKey::Exact(name)
            } else {
                HostKey::Wildcard(name)
            };
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let t = numbered_table(&keys);
        for _ in 0..500 {
            let mut name = match rng.below(3) {
                // Under a key, so most names match something.
                0 | 1 => {
                    let base = match &keys[rng.below(keys.len())] {
                        HostKey::Exact(e) | HostKey::Wildcard(e) => e.clone(),
                    };
                    let extra: Vec<String> = (0..rng.below(4)).map(|_| label(&mut rng)).collect();
                    extra
                        .into_iter()
                        .chain([base])
                        .collect::<Vec<_>>()
                        .join(".")
                }
                _ => (0..1 + rng.below(8))
                    .map(|_| label(&mut rng))
                    .collect::<Vec<_>>()
                    .join("."),
            };
            match rng.below(10) {
                0 => name = name.to_ascii_uppercase(),
                1 => name.push('.'),
                2 => {
                    let at = rng.below(name.len() + 1);
                    let bad = [b'\0', b'%', b' ', b'/', b'*', 0xc3, b'.', b':'][rng.below(8)];
                    let mut bytes = name.into_bytes();
                    bytes.insert(at, bad);
                    name = String::from_utf8_lossy(&bytes).into_owned();
                }
                _ => {}
            }
            let want = reference(&keys, &name);
            let got = matches(&t, &name);
            assert_eq!(got, want, "round {round}, name {name:?}, keys {keys:?}");
        }
    }
}
