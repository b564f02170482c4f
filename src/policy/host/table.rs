//! The host table: exact names and `*.suffix` keys, each with a value,
//! probed for the most specific key a name matches.
//!
//! In: `(HostKey, value)` pairs at build time; a name's bytes per lookup.
//! Out: the most specific key's value, or that the name is malformed. It
//! never allocates per lookup and knows nothing of what the values mean.
//!
//! The exact name is probed if some exact key has its length, then each
//! suffix `.rest` that some wildcard key is as long as (a bitset ANDed with
//! the dot bitmap of the [`Scan`]), longest first. Before a candidate is
//! hashed, a bit filter indexed by a one-multiply sketch of it (first and
//! last 8 bytes, length) rules out nearly every one no key can equal, which
//! is most of them: a name is tried at each of its suffixes, and a miss at
//! all of them. One open-addressing table holds both kinds (wildcard keys
//! keep their leading dot, so they never equal an exact key); a probe walks
//! a 16-bit tag array and compares the 64-byte slot (key words and value)
//! only once a tag matches, whole words below `len / 8` plus the partial
//! word, with no branch per word. The bench `benches/policy.rs` compares
//! this with aho-corasick and a `HashSet` walk on the same streams.

use super::scan::{
    BIT5, HASH_K, INLINE_WORDS, Scan, key_hash, key_words, load8, partial_mask, suffix_hash,
};
use super::{HostKey, MAX_NAME_LEN, NameError, check};

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
            return Err(invalid(name));
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
            return Err(invalid(name));
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

/// Why a name the scan refused is malformed ([`check`] is the definition;
/// the scan only answers yes or no, fast).
#[cold]
fn invalid(name: &[u8]) -> NameError {
    // The scan and `check` agree (tested); `EmptyLabel` is never reached.
    check(name).err().unwrap_or(NameError::EmptyLabel)
}
