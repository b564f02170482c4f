//! Host names: normalisation, validation and the exact / `*.suffix` matcher.
//!
//! In: a host name as a client sent it. Out: the value of the most specific
//! key it matches (the exact name, else the longest `*.suffix`).
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
//! How: names of 8 to 64 bytes (nearly all) are read straight from the
//! slice, nothing copied: 8-byte loads that end 8, 16, 24... bytes before
//! the end of the name, the first clamped to start at 0, so they overlap
//! where the length is not a multiple of 8 and never read past the name.
//! Pairs of them are validated 16 bytes at a time by saturating-subtract /
//! minimum lane code the compiler turns into a dozen SSE2 instructions (no
//! `unsafe`, no intrinsics), and their dots become a bitmap by one multiply
//! per 8 bytes. ORing bit 5 into every byte folds a valid name's case (`_`
//! becomes 0x7f, which no other valid byte does); keys are stored folded
//! the same way. The loads, seen as 8-byte words from the end of the name,
//! are whole words of every suffix; one pass gives the running hashes of
//! all of them, and the first `len % 8` bytes of a suffix (its partial
//! word) come from one more load when it is probed. Names under 8 or over
//! 64 bytes take an out-of-line path that copies the name right-aligned
//! into a stack buffer and builds the same words. The exact name is probed
//! if some exact key has its length, then each suffix `.rest` that some
//! wildcard key is as long as (a bitset ANDed with the dot bitmap), longest
//! first. Before a candidate is hashed, a bit filter indexed by a
//! one-multiply sketch of it (first and last 8 bytes, length) rules out
//! nearly every one no key can equal, which is most of them: a name is
//! tried at each of its suffixes, and a miss at all of them. One
//! open-addressing table holds both kinds (wildcard keys keep their
//! leading dot, so they never equal an exact key); a probe walks a
//! 16-bit tag array and compares the 64-byte slot (key words and value)
//! only once a tag matches, whole words below `len / 8` plus the partial
//! word, with no branch per word. Nothing is allocated per lookup. The
//! bench `benches/policy.rs` compares this with aho-corasick and a
//! `HashSet` walk on the same streams.

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
/// path uses [`HostTable::find_name`] instead, which does the same for ASCII input.
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

// ---------------------------------------------------------------------------
// Words: a name seen 8 bytes at a time from its end.
//
// Word `k` of a string of `n` bytes holds bytes `n-8k-8 .. n-8k` (little
// endian, bit 5 of every byte set); the last word holds the first `n % 8`
// bytes in its high lanes and zeros below. Every suffix of the string is then
// a run of whole words from word 0 plus the high lanes of one more word (its
// partial word), so the hashes of all suffixes come from one pass, and keys
// are compared a word at a time.

const HASH_K: u64 = 0x9e37_79b9_7f4a_7c15;
/// Words kept inside a slot; longer keys keep the rest in the spill area.
const INLINE_WORDS: usize = 4;

/// Mask of the high `r` lanes, for `r` in 0..8 (0 for 0).
#[inline(always)]
fn partial_mask(r: usize) -> u64 {
    !(u64::MAX >> (8 * r))
}

/// One more word into a running hash. The multiply is on the word alone,
/// so the words' products are computed side by side and only the rotate
/// and xor wait on the word before (2 cycles a word, not 5); [`finish`]
/// mixes the result.
#[inline(always)]
fn mix(h: u64, w: u64) -> u64 {
    h.rotate_left(29) ^ w.wrapping_mul(HASH_K)
}

#[inline(always)]
fn finish(h: u64, len: usize) -> u64 {
    let h = (h ^ len as u64).wrapping_mul(HASH_K);
    h ^ (h >> 32)
}

/// The words of an already normalised key, for the table.
fn key_words(bytes: &[u8]) -> Vec<u64> {
    let n = bytes.len();
    (0..n.div_ceil(8))
        .map(|k| {
            let end = n - 8 * k;
            let start = end.saturating_sub(8);
            let w = bytes[start..end]
                .iter()
                .rev()
                .fold(0u64, |w, &b| w << 8 | u64::from(b | 0x20));
            w << (8 * (8 - (end - start)))
        })
        .collect()
}

/// Hash of the last `len` bytes of a string, from the running hashes
/// `chain[k]` of its words `0..=k` and `partial`: its word `len / 8` masked
/// to the suffix (`partial_mask(len % 8)`; 0 when `len` is a multiple of 8).
#[inline(always)]
fn suffix_hash(chain: &[u64], partial: u64, len: usize) -> u64 {
    let q = len / 8;
    // Read unconditionally, then selected: a branch here would mispredict.
    let before = chain[q.wrapping_sub(1) % chain.len()];
    let h = if q == 0 { HASH_K } else { before };
    // The partial word is mixed in even when empty: one branch fewer.
    finish(mix(h, partial), len)
}

fn key_hash(words: &[u64], len: usize) -> u64 {
    let chain: Vec<u64> = words
        .iter()
        .scan(HASH_K, |h, &w| {
            *h = mix(*h, w);
            Some(*h)
        })
        .collect();
    suffix_hash(
        &chain,
        words.get(len / 8).map_or(0, |&w| w & partial_mask(len % 8)),
        len,
    )
}

/// 16 bytes lowercased, with 1 in each lane of `not_ok` that is not a letter,
/// digit, `-`, `.` or `_`, and 1 in each lane of `dot` that is a dot. Written
/// lane by lane without branches, so the compiler turns it into SIMD.
#[inline(always)]
fn classify16(bytes: &[u8; 16]) -> ([u8; 16], [u8; 16], [u8; 16]) {
    let (mut lower, mut not_ok, mut dot) = ([0u8; 16], [0u8; 16], [0u8; 16]);
    for i in 0..16 {
        let x = bytes[i];
        let l = x | u8::from(x.wrapping_sub(b'A') < 26) << 5;
        let ok = (l.wrapping_sub(b'a') < 26)
            | (l.wrapping_sub(b'0') < 10)
            | (l.wrapping_sub(b'-') < 2)
            | (l == b'_');
        // Bit 5 set: `_` becomes 0x7f, like every word compared or hashed.
        lower[i] = l | 0x20;
        not_ok[i] = u8::from(!ok);
        dot[i] = u8::from(l == b'.');
    }
    (lower, not_ok, dot)
}

/// Bit 5 of every lane. ORed into a valid name's bytes it lowercases the
/// letters and leaves digits, `-` and `.` alone (`_` becomes 0x7f, which no
/// other valid byte does), so names and keys are hashed and compared folded.
const BIT5: u64 = 0x2020_2020_2020_2020;

/// The 8 bytes of `name` from `at`, little endian.
#[inline(always)]
fn load8(name: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(name[at..at + 8].try_into().expect("8 bytes"))
}

/// ORs into `bad`, lane by lane, a value that is 0 exactly when the byte is
/// a letter, digit, `-`, `.` or `_`, and returns 1 in each lane that is a
/// dot. Saturating subtractions and minimums, so the compiler turns it into
/// a dozen SSE2 instructions.
#[inline(always)]
fn classify_direct(bad: &mut [u8; 16], bytes: &[u8; 16]) -> [u8; 16] {
    let mut dot = [0u8; 16];
    for i in 0..16 {
        let x = bytes[i];
        let letter = (x | 0x20).wrapping_sub(b'a').saturating_sub(25);
        let digit = x.wrapping_sub(b'0').saturating_sub(9);
        let dash_dot = x.wrapping_sub(b'-').saturating_sub(1);
        let underscore = x ^ b'_';
        bad[i] |= letter.min(digit).min(dash_dot).min(underscore);
        dot[i] = u8::from(x == b'.');
    }
    dot
}

/// A name lowercased and validated into words, with where its dots are.
struct Scan<const W: usize> {
    words: [u64; W],
    chain: [u64; W],
    /// Bit `s - 1` set: the suffix of `s` bytes starts with a dot.
    dots: [u64; 4],
}

impl<const W: usize> Scan<W> {
    /// Dot bitmap words in use: one per 64 bytes of name.
    const DOT_WORDS: usize = W.div_ceil(8);

    #[inline(always)]
    fn zeroed() -> Scan<W> {
        Scan {
            words: [0; W],
            chain: [0; W],
            dots: [0; 4],
        }
    }

    /// Scans `name` (1..=B bytes, B = 8*W). False when any byte is not
    /// allowed or a label is empty or too long (the caller then finds which).
    #[inline(always)]
    fn fill<const B: usize>(&mut self, name: &[u8]) -> bool {
        let n = name.len();
        debug_assert!(B == 8 * W && n > 0 && n <= B);
        // Right-aligned, padded with a letter: padding is valid and never a
        // dot, and the lanes it fills are masked off wherever words are used.
        let mut buf = [b'a'; B];
        buf[B - n..].copy_from_slice(name);
        let mut bad = 0u64;
        let mut h = HASH_K;
        // Every chunk of the buffer, a count fixed per `W`: a loop that ends
        // where the name does mispredicts on a stream of mixed lengths.
        for c in 0..W / 2 {
            let end = B - 16 * c;
            let chunk: &[u8; 16] = buf[end - 16..end].try_into().expect("16 bytes");
            let (lower, not_ok, dot) = classify16(chunk);
            let half = |a: &[u8; 16], i: usize| {
                u64::from_le_bytes(a[8 * i..8 * i + 8].try_into().expect("8 bytes"))
            };
            bad |= half(&not_ok, 0) | half(&not_ok, 1);
            // Word 2c is the chunk's high half, word 2c+1 its low half.
            for (k, i) in [(2 * c, 1), (2 * c + 1, 0)] {
                let word = half(&lower, i);
                // Lane j of word k is the start of the suffix of `8k + 8 - j`
                // bytes, so it goes to bit `8k + 7 - j`.
                let reversed = half(&dot, i).wrapping_mul(0x8040_2010_0804_0201) >> 56;
                self.dots[(k / 8) % 4] |= reversed << (8 * (k % 8));
                self.words[k % W] = word;
                h = mix(h, word);
                self.chain[k % W] = h;
            }
        }
        bad == 0 && self.labels_ok(n)
    }

    /// Scans `name` (8..=8*W bytes) straight from the slice, nothing copied
    /// (so no load waits on a store): word `k` is the 8-byte load ending
    /// `8k` bytes before the end, clamped to start at 0. Those loads cover
    /// the name (overlapping where it is not a multiple of 8 bytes long),
    /// which is all validation and the dot bitmap need; a word that is not
    /// whole (below `n / 8`) is never read: the caller supplies the partial
    /// word of each suffix. False as for `fill`.
    #[inline(always)]
    fn fill_direct(&mut self, name: &[u8]) -> bool {
        let n = name.len();
        debug_assert!((8..=8 * W).contains(&n) && W <= 8 && W.is_multiple_of(2));
        let mut h = HASH_K;
        let mut dots = 0u64;
        let mut bad = [0u8; 16];
        for j in 0..W / 2 {
            // Word 2j is the block's high half, word 2j+1 its low half.
            let hi = (n - 8).saturating_sub(16 * j);
            let lo = (n - 8).saturating_sub(16 * j + 8);
            let mut block = [0u8; 16];
            block[..8].copy_from_slice(&name[lo..lo + 8]);
            block[8..].copy_from_slice(&name[hi..hi + 8]);
            let dot = classify_direct(&mut bad, &block);
            for (i, at) in [(1, hi), (0, lo)] {
                let half = |a: &[u8; 16]| {
                    u64::from_le_bytes(a[8 * i..8 * i + 8].try_into().expect("8 bytes"))
                };
                // Lane l (byte at + l) starts the suffix of n - at - l bytes: bit n - 1 - at - l.
                let reversed = half(&dot).wrapping_mul(0x8040_2010_0804_0201) >> 56;
                dots |= reversed << (n - 8 - at);
                let word = half(&block) | BIT5;
                let k = 2 * j + 1 - i;
                self.words[k] = word;
                h = mix(h, word);
                self.chain[k] = h;
            }
        }
        self.dots[0] = dots;
        u128::from_le_bytes(bad) == 0 && self.labels_ok(n)
    }

    /// No empty label and none over 63 bytes, from the dot bitmap.
    #[inline(always)]
    fn labels_ok(&self, n: usize) -> bool {
        let dots = &self.dots[..Self::DOT_WORDS];
        let bit = |i: usize| dots[i / 64] >> (i % 64) & 1 != 0;
        // A dot first or last, or two in a row.
        if bit(0) || bit(n - 1) {
            return false;
        }
        for i in 0..dots.len() {
            let next = dots.get(i + 1).map_or(0, |d| d << 63);
            if dots[i] & (dots[i] >> 1 | next) != 0 {
                return false;
            }
        }
        if n <= MAX_LABEL_LEN {
            return true;
        }
        let mut prev: isize = -1;
        for (i, &d) in dots.iter().enumerate() {
            let mut d = d;
            while d != 0 {
                let p = (i * 64 + d.trailing_zeros() as usize) as isize;
                if p - prev - 1 > MAX_LABEL_LEN as isize {
                    return false;
                }
                prev = p;
                d &= d - 1;
            }
        }
        n as isize - 1 - prev <= MAX_LABEL_LEN as isize
    }
}

/// The first problem of a name already known to have one, left to right.
#[cold]
fn name_error(name: &[u8]) -> NameError {
    let mut label = 0;
    for &raw in name {
        match FOLD[raw as usize] {
            0 => return NameError::BadByte(raw),
            b'.' => {
                if let Err(e) = check_label(label) {
                    return e;
                }
                label = 0;
            }
            _ => label += 1,
        }
    }
    check_label(label).err().unwrap_or(NameError::EmptyLabel)
}

#[inline(always)]
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

// ---------------------------------------------------------------------------
// The table.

/// One key: its first words, its length and its value, in one cache line,
/// so a probe that finds its key touches nothing else (keys over 32 bytes
/// keep their other words in the spill area).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Slot<V> {
    words: [u64; INLINE_WORDS],
    len: u16,
    spill: u32,
    value: V,
}

/// A slot's 16-bit hash tag, never 0 (0 marks an empty slot).
#[inline(always)]
fn tag_of(hash: u64) -> u16 {
    (hash >> 48) as u16 | 1
}

/// What [`HostTable::find_name`] found.
#[derive(Debug, Clone, Copy)]
pub struct Found<'a, V> {
    /// The most specific key's value.
    pub value: Option<&'a V>,
    /// The name is not a valid host name (`value` is `None`).
    pub malformed: bool,
}

/// A compiled set of host keys. Keys are normalised names (`a.com`) or
/// wildcard suffixes with their leading dot (`.a.com` for `*.a.com`); each
/// carries a caller-chosen value, stored beside it.
#[derive(Clone)]
pub struct HostTable<V> {
    /// One tag per slot, probed first: 32 to a cache line, so a probe that
    /// misses rarely touches a slot (at 100,000 keys the tags fit in L2).
    tags: Vec<u16>,
    slots: Vec<Slot<V>>,
    mask: usize,
    spill: Vec<u64>,
    /// Bit `s - 1` set: some wildcard key has `s` bytes (with its dot).
    /// Suffixes of other lengths are not probed.
    wild_lens: [u64; 4],
    /// The same for exact keys.
    exact_lens: [u64; 4],
    /// One bit per [`sketch`] value, set for every key: a candidate whose
    /// bit is clear is not hashed or probed (most candidates, as a name
    /// is tried at each of its suffixes). Over 32 bits per key, so about
    /// 3% of absent candidates pass.
    filter: Vec<u64>,
    /// `64 - log2(filter bits)`: a sketch's top bits pick its bit.
    filter_shift: u32,
}

/// A cheap summary of a string of `len` bytes (a key, or a suffix of a
/// name) for [`HostTable::filter`]: its first 8 bytes, its last 8 bytes
/// and its length, folded like words (bit 5 set). `first`: the first
/// `min(len, 8)` bytes in the low lanes, zeros above; `last`: the last
/// `min(len, 8)` bytes in the high lanes, zeros below. Strings that differ
/// only in their middle bytes share a sketch; the probe tells them apart.
#[inline(always)]
fn sketch(first: u64, last: u64, len: usize) -> u64 {
    let p = u128::from(first ^ last.rotate_left(29) ^ (len as u64) << 56) * u128::from(HASH_K);
    (p as u64) ^ (p >> 64) as u64
}

#[inline(always)]
fn has_len(set: &[u64; 4], len: usize) -> bool {
    let i = len.wrapping_sub(1);
    i < 256 && set[i / 64] >> (i % 64) & 1 != 0
}

impl<V: Copy> HostTable<V> {
    /// Builds the table. Keys must be distinct.
    pub fn build(keys: &[(HostKey, V)]) -> HostTable<V> {
        let cap = (keys.len() * 2).next_power_of_two().max(16);
        let filter_bits = (keys.len() * 32).next_power_of_two().max(1024);
        let mut slots: Vec<Option<Slot<V>>> = vec![None; cap];
        let mut table = HostTable {
            tags: vec![0; cap],
            slots: Vec::new(),
            mask: cap - 1,
            spill: Vec::new(),
            wild_lens: [0; 4],
            exact_lens: [0; 4],
            filter: vec![0; filter_bits / 64],
            filter_shift: 64 - filter_bits.trailing_zeros(),
        };
        for (key, value) in keys {
            let bytes = key.table_bytes();
            let n = bytes.len();
            assert!((1..=MAX_NAME_LEN + 1).contains(&n), "keys are valid names");
            let set = match key {
                HostKey::Exact(_) => &mut table.exact_lens,
                HostKey::Wildcard(_) => &mut table.wild_lens,
            };
            set[(n - 1) / 64] |= 1 << ((n - 1) % 64);
            let words = key_words(&bytes);
            let hash = key_hash(&words, n);
            // Word 0 is the last 8 bytes (high lanes when shorter); the first
            // ones are the word of the key's head, shifted to the low lanes.
            let head = n.min(8);
            let first = key_words(&bytes[..head])[0] >> (8 * (8 - head));
            let bit = (sketch(first, words[0], n) >> table.filter_shift) as usize;
            table.filter[bit / 64] |= 1 << (bit % 64);
            let mut inline = [0; INLINE_WORDS];
            let head = words.len().min(INLINE_WORDS);
            inline[..head].copy_from_slice(&words[..head]);
            let spill = u32::try_from(table.spill.len()).expect("host keys under 32 GiB");
            table.spill.extend_from_slice(&words[head..]);
            let mut i = hash as usize & table.mask;
            while slots[i].is_some() {
                i = (i + 1) & table.mask;
            }
            table.tags[i] = tag_of(hash);
            slots[i] = Some(Slot {
                words: inline,
                len: n as u16,
                spill,
                value: *value,
            });
        }
        // Empty slots: length 0, and a copy of any value (never read).
        if let Some((_, filler)) = keys.first() {
            table.slots = slots
                .into_iter()
                .map(|s| {
                    s.unwrap_or(Slot {
                        words: [0; INLINE_WORDS],
                        len: 0,
                        spill: 0,
                        value: *filler,
                    })
                })
                .collect();
        } else {
            table.tags.clear();
            table.mask = 0;
        }
        table
    }

    /// The value of the key equal to the last `len` bytes of the scanned
    /// name, whose word `len / 8` masked to the suffix is `partial`.
    #[inline(always)]
    fn find<const W: usize>(&self, scan: &Scan<W>, partial: u64, len: usize) -> Option<&V> {
        if self.slots.is_empty() {
            return None;
        }
        let hash = suffix_hash(&scan.chain, partial, len);
        let tag = tag_of(hash);
        let mut i = hash as usize & self.mask;
        // The tags first; the key is compared after the loop, so the
        // compiler does not prepare that on every probe.
        loop {
            let t = self.tags[i];
            if t == tag {
                break;
            }
            if t == 0 {
                return None;
            }
            i = (i + 1) & self.mask;
        }
        let slot = &self.slots[i];
        if usize::from(slot.len) == len && self.same(slot, scan, partial, len) {
            Some(&slot.value)
        } else {
            self.find_after(scan, partial, len, tag, i)
        }
    }

    /// [`Self::find`] on from after slot `i`, whose tag matched but not its
    /// key (two keys with one tag: rare).
    #[cold]
    #[inline(never)]
    fn find_after<const W: usize>(
        &self,
        scan: &Scan<W>,
        partial: u64,
        len: usize,
        tag: u16,
        mut i: usize,
    ) -> Option<&V> {
        loop {
            i = (i + 1) & self.mask;
            let t = self.tags[i];
            if t == 0 {
                return None;
            }
            let slot = &self.slots[i];
            if t == tag && usize::from(slot.len) == len && self.same(slot, scan, partial, len) {
                return Some(&slot.value);
            }
        }
    }

    /// Whether the slot's key, known to be `len` bytes long, is the last
    /// `len` bytes of the scanned name: its whole words below `len / 8`
    /// (inline ones all at once, masked arithmetically, then any spilled),
    /// and the partial word. Key words past that are 0 and need no look.
    #[inline(always)]
    fn same<const W: usize>(
        &self,
        slot: &Slot<V>,
        scan: &Scan<W>,
        partial: u64,
        len: usize,
    ) -> bool {
        let q = len / 8;
        let key_word = |k: usize| {
            if k < INLINE_WORDS {
                slot.words[k]
            } else {
                self.spill
                    .get(slot.spill as usize + k - INLINE_WORDS)
                    .copied()
                    .unwrap_or(0)
            }
        };
        // Arithmetic, not a match: its branches would mispredict.
        let diff = (0..INLINE_WORDS.min(W)).fold(0, |d, k| {
            d | (scan.words[k] ^ slot.words[k]) & u64::from(k < q).wrapping_neg()
        });
        diff == 0
            // Masked: with no partial word, `key_word(q)` may be another key's.
            && partial == key_word(q) & partial_mask(len % 8)
            && (INLINE_WORDS..q).all(|k| scan.words[k % W] == key_word(k))
    }

    /// The value of the most specific key matching `name` (the exact name,
    /// else the longest `*.suffix`), after normalising and validating it.
    /// `name` must be ASCII (IDNs are converted to A-labels before they
    /// reach here); one trailing dot is ignored.
    ///
    /// Less specific keys are not visited: every name whose most specific
    /// key is K matches exactly K and the wildcard keys that are suffixes of
    /// K, so the caller folds those into K's value when it builds the table.
    ///
    /// # Errors
    /// [`NameError`] when `name` is not a valid host name.
    pub fn most_specific(&self, name: &[u8]) -> Result<Option<&V>, NameError> {
        self.lookup_name(name)
    }

    /// [`Self::most_specific`] for the decision path, which needs to know
    /// only whether the name was malformed, not why: two scalars, which
    /// come back in registers (the `Result` goes through memory, and the
    /// decision waits for that round trip).
    // Out of line: inlined, its stack frame and saved registers are paid
    // by every caller's decision, including those on addresses (5-7%
    // slower in the paired bench).
    #[inline(never)]
    pub fn find_name(&self, name: &[u8]) -> Found<'_, V> {
        match self.lookup_name(name) {
            Ok(value) => Found {
                value,
                malformed: false,
            },
            Err(_) => Found {
                value: None,
                malformed: true,
            },
        }
    }

    #[inline(always)]
    fn lookup_name(&self, name: &[u8]) -> Result<Option<&V>, NameError> {
        // A branch, not a select: everything after waits on the length, and
        // a trailing dot is rare (the select would add its latency to all).
        let name = match name.split_last() {
            Some((b'.', rest)) => {
                std::hint::cold_path();
                rest
            }
            _ => name,
        };
        match name.len() {
            0 => Err(NameError::Empty),
            8..=32 => self.lookup_direct::<4>(name),
            33..=64 => self.lookup_direct::<8>(name),
            1..=7 | 65..=MAX_NAME_LEN => self.lookup_rare(name),
            _ => Err(NameError::TooLong),
        }
    }

    #[inline(always)]
    fn lookup_direct<const W: usize>(&self, name: &[u8]) -> Result<Option<&V>, NameError> {
        let n = name.len();
        let mut scan = Scan::<W>::zeroed();
        if !scan.fill_direct(name) {
            return Err(name_error(name));
        }
        // The suffix of `len` bytes starts at `n - len`; its first `len % 8`
        // bytes, as the high lanes of its word `len / 8`, from one load (for
        // suffixes under 8 bytes, the load ending with the name).
        let partial = |len: usize| {
            let start = n - len;
            let at = start.min(n - 8);
            let lanes = 8 - len % 8 - (start - at);
            (load8(name, at) | BIT5).wrapping_shl(8 * lanes as u32) & partial_mask(len % 8)
        };
        // Whether the suffix of `len` bytes may be a key, from its sketch.
        // Word 0 is the name's last 8 bytes, folded.
        let last = scan.words[0];
        let maybe = |len: usize| {
            let (first, last) = if len >= 8 {
                (load8(name, n - len) | BIT5, last)
            } else {
                (last >> (8 * (8 - len)), last & partial_mask(len))
            };
            let bit = (sketch(first, last, len) >> self.filter_shift) as usize;
            self.filter[bit / 64] >> (bit % 64) & 1 != 0
        };
        Ok(self.probe(&scan, n, partial, maybe))
    }

    /// Names under 8 or over 64 bytes (rare): through a right-aligned copy,
    /// out of line so the common path keeps a small stack frame.
    #[inline(never)]
    fn lookup_rare(&self, name: &[u8]) -> Result<Option<&V>, NameError> {
        if name.len() < 8 {
            self.lookup::<4, 32>(name)
        } else {
            self.lookup::<32, 256>(name)
        }
    }

    #[inline(always)]
    fn lookup<const W: usize, const B: usize>(&self, name: &[u8]) -> Result<Option<&V>, NameError> {
        let mut scan = Scan::<W>::zeroed();
        if !scan.fill::<B>(name) {
            return Err(name_error(name));
        }
        let words = scan.words;
        let partial = |len: usize| words[(len / 8) % W] & partial_mask(len % 8);
        Ok(self.probe(&scan, name.len(), partial, |_| true))
    }

    /// The most specific key for a scanned name of `n` bytes: the exact
    /// name if some exact key is that long, then each suffix `.rest` as long
    /// as some wildcard key, longest first. `partial(len)`: the suffix's
    /// word `len / 8`, masked.
    #[inline(always)]
    fn probe<const W: usize>(
        &self,
        scan: &Scan<W>,
        n: usize,
        partial: impl Fn(usize) -> u64,
        maybe: impl Fn(usize) -> bool,
    ) -> Option<&V> {
        if has_len(&self.exact_lens, n)
            && maybe(n)
            && let Some(v) = self.find(scan, partial(n), n)
        {
            return Some(v);
        }
        // Suffixes `.rest` as long as some wildcard key, longest first.
        for i in (0..Scan::<W>::DOT_WORDS).rev() {
            let mut lens = scan.dots[i] & self.wild_lens[i];
            while lens != 0 {
                let top = 63 - lens.leading_zeros() as usize;
                lens ^= 1 << top;
                let len = i * 64 + top + 1;
                if maybe(len)
                    && let Some(v) = self.find(scan, partial(len), len)
                {
                    return Some(v);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
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

    /// Tiny deterministic PRNG (xorshift64) for the differential test.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

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
            1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 39, 40, 41, 47, 48, 49, 55, 56,
            57, 63, 64, 65, 66, 96, 127, 128, 129, 200, 252, 253,
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
                    0x00, 0x0d, 0x0e, 0x0f, 0x10, 0x19, 0x1a, 0x20, 0x2c, 0x2d, 0x2e, 0x2f, 0x30,
                    0x39, 0x3a, 0x40, 0x41, 0x4d, 0x5a, 0x5b, 0x5e, 0x5f, 0x60, 0x61, 0x7a, 0x7b,
                    0x7e, 0x7f, 0x80, 0xad, 0xae, 0xb0, 0xc1, 0xda, 0xdf, 0xe1, 0xed, 0xfa, 0xfe,
                    0xff,
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
                        let extra: Vec<String> =
                            (0..rng.below(4)).map(|_| label(&mut rng)).collect();
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
}
