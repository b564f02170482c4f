//! Scanning a name: validation, case folding and the hashes of every
//! suffix, in one pass, without copying or allocating.
//!
//! In: the bytes of a name (one trailing dot already removed). Out: a
//! [`Scan`] of its words, their running hashes and a bitmap of where its
//! dots are, or `false` when the name is malformed (the caller then asks
//! [`super::check`] why). It does not know about keys or tables.
//!
//! Word `k` of a string of `n` bytes holds bytes `n-8k-8 .. n-8k` (little
//! endian, bit 5 of every byte set); the last word holds the first `n % 8`
//! bytes in its high lanes and zeros below. Every suffix of the string is then
//! a run of whole words from word 0 plus the high lanes of one more word (its
//! partial word), so the hashes of all suffixes come from one pass, and keys
//! are compared a word at a time.
//!
//! Names of 8 to 64 bytes (nearly all) are read straight from the slice
//! ([`Scan::fill_direct`]): 8-byte loads that end 8, 16, 24... bytes before
//! the end of the name, the first clamped to start at 0, so they overlap
//! where the length is not a multiple of 8 and never read past the name.
//! Pairs of them are validated 16 bytes at a time by saturating-subtract /
//! minimum lane code the compiler turns into a dozen SSE2 instructions (no
//! `unsafe`, no intrinsics), and their dots become a bitmap by one multiply
//! per 8 bytes. ORing bit 5 into every byte folds a valid name's case (`_`
//! becomes 0x7f, which no other valid byte does); keys are stored folded
//! the same way. Names under 8 or over 64 bytes are copied right-aligned
//! into a stack buffer first ([`Scan::fill`]) and give the same words.

use super::MAX_LABEL_LEN;

pub(super) const HASH_K: u64 = 0x9e37_79b9_7f4a_7c15;
/// Words kept inside a slot; longer keys keep the rest in the spill area.
pub(super) const INLINE_WORDS: usize = 4;

/// Mask of the high `r` lanes, for `r` in 0..8 (0 for 0).
#[inline(always)]
pub(super) fn partial_mask(r: usize) -> u64 {
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
pub(super) fn key_words(bytes: &[u8]) -> Vec<u64> {
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
pub(super) fn suffix_hash(chain: &[u64], partial: u64, len: usize) -> u64 {
    let q = len / 8;
    // Read unconditionally, then selected: a branch here would mispredict.
    let before = chain[q.wrapping_sub(1) % chain.len()];
    let h = if q == 0 { HASH_K } else { before };
    // The partial word is mixed in even when empty: one branch fewer.
    finish(mix(h, partial), len)
}

pub(super) fn key_hash(words: &[u64], len: usize) -> u64 {
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
pub(super) const BIT5: u64 = 0x2020_2020_2020_2020;

/// The 8 bytes of `name` from `at`, little endian.
#[inline(always)]
pub(super) fn load8(name: &[u8], at: usize) -> u64 {
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
pub(super) struct Scan<const W: usize> {
    pub(super) words: [u64; W],
    pub(super) chain: [u64; W],
    /// Bit `s - 1` set: the suffix of `s` bytes starts with a dot.
    pub(super) dots: [u64; 4],
}

impl<const W: usize> Scan<W> {
    /// Dot bitmap words in use: one per 64 bytes of name.
    pub(super) const DOT_WORDS: usize = W.div_ceil(8);

    #[inline(always)]
    pub(super) fn zeroed() -> Scan<W> {
        Scan {
            words: [0; W],
            chain: [0; W],
            dots: [0; 4],
        }
    }

    /// Scans `name` (1..=B bytes, B = 8*W). False when any byte is not
    /// allowed or a label is empty or too long (the caller then finds which).
    #[inline(always)]
    pub(super) fn fill<const B: usize>(&mut self, name: &[u8]) -> bool {
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
    pub(super) fn fill_direct(&mut self, name: &[u8]) -> bool {
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
