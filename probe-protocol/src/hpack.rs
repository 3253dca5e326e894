//! HPACK (RFC 7541) header-block decoding for observed traffic.
//!
//! A client or server library may assume it saw every header block of a connection from the
//! start; the probe may not. It attaches to connections already open, and a header block may be
//! cut by the capture. So this decoder is *tolerant*:
//!
//! - It never panics and never allocates by a length it read: every string is a slice of the
//!   block (or its Huffman decoding, at most 8/5 of the block), integers are checked for
//!   overflow, and the table it keeps is bounded ([`MAX_HELD_TABLE_SIZE`]).
//! - It keeps the entries inserted since it last knew the table's positions, newest first. An
//!   index `62 + p` names the `p`-th most recent insertion for any valid encoder, whatever the
//!   table's maximum size: eviction (RFC 7541 §4.4) only ever removes the oldest entries. So an
//!   index into the entries it holds is decoded exactly, and an index past them is reported as
//!   *unknown* (`None`), never guessed.
//! - A literal with incremental indexing whose name is an unknown index is still inserted, with
//!   an unknown name, so that later positions stay right.
//! - It is *synced* when it knows no older entry can be referenced: from the start of a
//!   connection, or after a dynamic table size update small enough to have evicted everything it
//!   never saw (a size update to 0 always is).
//! - A header block it could not read whole ([`HpackDecoder::decode_truncated`], or a decoding
//!   error) may have inserted entries it did not see, which moves every position: it forgets the
//!   table and is unsynced again ([`HpackDecoder::mark_unsynced`]).

use std::{borrow::Cow, collections::VecDeque};

/// The initial maximum size of a dynamic table (the default `SETTINGS_HEADER_TABLE_SIZE`).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Most table bytes (entry sizes as RFC 7541 §4.1 counts them) a decoder holds, whatever size the
/// encoder announced: bounds memory per connection direction. Entries the decoder drops for this
/// bound become unknown; they are never guessed.
pub const MAX_HELD_TABLE_SIZE: usize = 64 * 1024;

/// Per-entry overhead of RFC 7541 §4.1: also the smallest size an entry can have.
const ENTRY_OVERHEAD: usize = 32;

/// The static table, RFC 7541 Appendix A (index 1 first).
pub const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The Huffman code, RFC 7541 Appendix B: `(code, bit length)` of symbols 0-255 and EOS (256).
/// The code is canonical (a test checks it), which the decoder relies on.
pub const HUFFMAN_CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    (0x3fffffff, 30),
];

/// The end-of-string symbol: must never be decoded (RFC 7541 §5.2).
const EOS: u16 = 256;

/// Lookup structures for canonical decoding, built at compile time from [`HUFFMAN_CODES`].
struct HuffmanDecoder {
    /// Symbols sorted by (code length, symbol): canonical code order.
    sorted: [u16; 257],
    /// First code of each length.
    first: [u32; 31],
    /// Index in `sorted` of the first symbol of each length.
    offset: [u16; 31],
    /// `(first + count) << (32 - length)`: a 32-bit left-aligned window below it starts with a
    /// code of that length or a shorter one.
    limit: [u64; 31],
    /// Codes of at most 8 bits, by the window's first byte: `length << 9 | symbol`, 0 if none.
    fast: [u16; 256],
}

const fn build_huffman() -> HuffmanDecoder {
    let mut d = HuffmanDecoder {
        sorted: [0; 257],
        first: [0; 31],
        offset: [0; 31],
        limit: [0; 31],
        fast: [0; 256],
    };
    let mut count = [0u32; 31];
    let mut n = 0;
    let mut len = 1;
    while len <= 30 {
        d.offset[len] = n as u16;
        let mut sym = 0;
        while sym < 257 {
            if HUFFMAN_CODES[sym].1 as usize == len {
                d.sorted[n] = sym as u16;
                n += 1;
                count[len] += 1;
            }
            sym += 1;
        }
        len += 1;
    }
    let mut code = 0u32;
    let mut len = 1;
    while len <= 30 {
        d.first[len] = code;
        d.limit[len] = ((code + count[len]) as u64) << (32 - len);
        code = (code + count[len]) << 1;
        len += 1;
    }
    let mut sym = 0;
    while sym < 257 {
        let (code, len) = HUFFMAN_CODES[sym];
        if len <= 8 {
            let base = (code << (8 - len)) as usize;
            let mut k = 0;
            while k < (1 << (8 - len)) {
                d.fast[base + k] = ((len as u16) << 9) | sym as u16;
                k += 1;
            }
        }
        sym += 1;
    }
    d
}

static HUFFMAN: HuffmanDecoder = build_huffman();

/// Why a header block could not be decoded. After any of these the decoder's table is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a field representation (or a string is longer than the block).
    #[error("header block ends inside a field")]
    Truncated,
    /// An integer does not fit in 32 bits (RFC 7541 §5.1 lets decoders set this limit).
    #[error("integer does not fit in 32 bits")]
    IntegerOverflow,
    /// Index 0 is never valid (RFC 7541 §6.1).
    #[error("table index 0")]
    ZeroIndex,
    /// A Huffman string holds the EOS symbol or padding that is not a short run of 1 bits.
    #[error("invalid Huffman string")]
    Huffman,
}

/// One decoded header field. `None` means the field came from a table entry the decoder never
/// saw: the probe reports it as unknown rather than guessing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The name; borrowed when it comes from the static table.
    pub name: Option<Cow<'static, str>>,
    /// The value, UTF-8 (invalid bytes replaced).
    pub value: Option<String>,
}

/// A dynamic table entry. The value is always known (it was a literal); the name is not when
/// it referred to an entry the decoder never saw.
#[derive(Debug)]
struct Entry {
    name: Option<Box<[u8]>>,
    value: Box<[u8]>,
    /// RFC 7541 §4.1 size; with an unknown name, the smallest it can be (name of length 0).
    size: usize,
}

impl Entry {
    fn new(name: Option<Box<[u8]>>, value: Box<[u8]>) -> Self {
        let size = ENTRY_OVERHEAD + value.len() + name.as_ref().map_or(0, |n| n.len());
        Self { name, value, size }
    }
}

/// The HPACK decoding state of one direction of a connection.
#[derive(Debug)]
pub struct HpackDecoder {
    /// Entries inserted since the positions were last known, newest first.
    entries: VecDeque<Entry>,
    /// Sum of `entries` sizes (a lower bound of their real size when a name is unknown).
    size: usize,
    /// The encoder's maximum table size, when known.
    max_size: Option<usize>,
    /// No entry older than `entries` can be referenced.
    synced: bool,
    /// Scratch space for Huffman-decoded names and values (kept to avoid allocating per field).
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Default for HpackDecoder {
    fn default() -> Self {
        Self::new(true)
    }
}

/// A field's name and value as slices; `None` for unknown.
type FieldRef<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// What receives decoded fields.
type FieldSink<'s> = dyn FnMut(Option<&[u8]>, Option<&[u8]>) + 's;

/// Where a literal's name comes from.
enum Name<'a> {
    Literal(&'a [u8]),
    Index(u32),
}

impl HpackDecoder {
    /// A decoder for a direction seen from its start (`synced`), or from the middle (every
    /// dynamic entry inserted before is unknown).
    pub fn new(synced: bool) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size: synced.then_some(DEFAULT_TABLE_SIZE),
            synced,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Whether every index the encoder may use is known (entries dropped for the memory bound
    /// aside, which are reported unknown too).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Entries held.
    pub fn table_len(&self) -> usize {
        self.entries.len()
    }

    /// Sum of the held entries' sizes (RFC 7541 §4.1; a lower bound where a name is unknown).
    pub fn table_size(&self) -> usize {
        self.size
    }

    /// A header block (or part of one) was lost: it may have inserted entries, so no position
    /// is known any more. Forgets the table; until a size update proves the old entries gone,
    /// only entries inserted from now on are known.
    pub fn mark_unsynced(&mut self) {
        self.entries.clear();
        self.size = 0;
        self.synced = false;
        // The lost block may have carried a size update.
        self.max_size = None;
    }

    /// Decodes a complete header block into its fields.
    pub fn decode_block(&mut self, block: &[u8]) -> Result<Vec<Header>, HpackError> {
        let mut out = Vec::new();
        self.decode_block_with(block, |name, value| out.push(owned(name, value)))?;
        Ok(out)
    }

    /// Decodes a complete header block, handing each field to `f` as it is read (no copies: the
    /// probe keeps a few fields of each block). On an error, the fields before it were handed
    /// over, and the table is forgotten ([`Self::mark_unsynced`]).
    pub fn decode_block_with<F>(&mut self, block: &[u8], mut f: F) -> Result<(), HpackError>
    where
        F: FnMut(Option<&[u8]>, Option<&[u8]>),
    {
        let mut name_buf = std::mem::take(&mut self.name_buf);
        let mut value_buf = std::mem::take(&mut self.value_buf);
        let result = self.decode_fields(block, &mut name_buf, &mut value_buf, &mut f);
        // Keep the scratch space unless one odd block made it large.
        if name_buf.capacity() <= 4096 {
            self.name_buf = name_buf;
        }
        if value_buf.capacity() <= 4096 {
            self.value_buf = value_buf;
        }
        if result.is_err() {
            self.mark_unsynced();
        }
        result
    }

    /// Decodes the captured beginning of a header block whose end was not captured: hands `f`
    /// every field complete in `prefix`, then forgets the table (the missing part may have
    /// inserted entries).
    pub fn decode_truncated<F>(&mut self, prefix: &[u8], f: F)
    where
        F: FnMut(Option<&[u8]>, Option<&[u8]>),
    {
        // `Truncated` at the cut is expected; any error forgets the table, and so does success.
        let _ = self.decode_block_with(prefix, f);
        self.mark_unsynced();
    }

    fn decode_fields(
        &mut self,
        block: &[u8],
        name_buf: &mut Vec<u8>,
        value_buf: &mut Vec<u8>,
        f: &mut FieldSink<'_>,
    ) -> Result<(), HpackError> {
        let mut pos = 0;
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                // Indexed header field (§6.1).
                let index = read_int(block, &mut pos, 7)?;
                let (name, value) = self.lookup(index)?;
                f(name, value);
            } else if first & 0x40 != 0 {
                // Literal with incremental indexing (§6.2.1).
                let index = read_int(block, &mut pos, 6)?;
                let name = if index == 0 {
                    Name::Literal(read_string(block, &mut pos, name_buf)?)
                } else {
                    Name::Index(index)
                };
                let value = read_string(block, &mut pos, value_buf)?;
                let name: Option<Box<[u8]>> = match name {
                    Name::Literal(n) => Some(n.into()),
                    Name::Index(i) => self.lookup(i)?.0.map(Box::from),
                };
                let entry = Entry::new(name, value.into());
                f(entry.name.as_deref(), Some(&entry.value));
                self.insert(entry);
            } else if first & 0x20 != 0 {
                // Dynamic table size update (§6.3). RFC 7541 allows it only at the start of a
                // block; accepting it anywhere loses nothing.
                let size = read_int(block, &mut pos, 5)?;
                self.size_update(size as usize);
            } else {
                // Literal without indexing (§6.2.2) or never indexed (§6.2.3).
                let index = read_int(block, &mut pos, 4)?;
                if index == 0 {
                    let name = read_string(block, &mut pos, name_buf)?;
                    let value = read_string(block, &mut pos, value_buf)?;
                    f(Some(name), Some(value));
                } else {
                    let value = read_string(block, &mut pos, value_buf)?;
                    let (name, _) = self.lookup(index)?;
                    f(name, Some(value));
                }
            }
        }
        Ok(())
    }

    /// Name and value at `index` (static table, then dynamic); `None` for an entry not held.
    fn lookup(&mut self, index: u32) -> Result<FieldRef<'_>, HpackError> {
        let index = index as usize;
        if index == 0 {
            return Err(HpackError::ZeroIndex);
        }
        if let Some((name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((Some(name.as_bytes()), Some(value.as_bytes())));
        }
        let position = index - 1 - STATIC_TABLE.len();
        if position >= self.entries.len() {
            // Synced, the encoder would not use it: our view is wrong (or was cut by the memory
            // bound). Either way, only held entries are trusted from now on.
            self.synced = false;
            return Ok((None, None));
        }
        let e = &self.entries[position];
        Ok((e.name.as_deref(), Some(&e.value)))
    }

    fn insert(&mut self, entry: Entry) {
        self.size += entry.size;
        self.entries.push_front(entry);
        self.evict();
    }

    fn size_update(&mut self, new_max: usize) {
        // The encoder evicts its oldest entries, those the decoder never saw first, until its
        // table fits `new_max`. If one of them survived, everything held would have too, and
        // the table would be at least `size + 32` (an entry is at least 32): so when that does
        // not fit, nothing unseen is left.
        if !self.synced && self.size + ENTRY_OVERHEAD > new_max {
            self.synced = true;
        }
        self.max_size = Some(new_max);
        self.evict();
    }

    /// Drops the oldest entries beyond the encoder's maximum size (known sizes are lower bounds,
    /// so this never drops an entry the encoder still has), or beyond the memory bound.
    fn evict(&mut self) {
        let bounded = self.max_size.is_none_or(|m| m > MAX_HELD_TABLE_SIZE);
        let limit = self
            .max_size
            .map_or(MAX_HELD_TABLE_SIZE, |m| m.min(MAX_HELD_TABLE_SIZE));
        while self.size > limit {
            let Some(e) = self.entries.pop_back() else {
                self.size = 0;
                break;
            };
            self.size -= e.size;
            if bounded {
                // The encoder may still hold it: it is unknown from now on.
                self.synced = false;
            }
        }
    }
}

fn owned(name: Option<&[u8]>, value: Option<&[u8]>) -> Header {
    let name = name.map(
        |n| match STATIC_TABLE.iter().find(|(s, _)| s.as_bytes() == n) {
            Some((s, _)) => Cow::Borrowed(*s),
            None => Cow::Owned(String::from_utf8_lossy(n).into_owned()),
        },
    );
    Header {
        name,
        value: value.map(|v| String::from_utf8_lossy(v).into_owned()),
    }
}

/// Reads an integer with an `n`-bit prefix (RFC 7541 §5.1), at most 2^32 - 1.
fn read_int(buf: &[u8], pos: &mut usize, n: u8) -> Result<u32, HpackError> {
    let mask = ((1u16 << n) - 1) as u8;
    let first = buf.get(*pos).ok_or(HpackError::Truncated)? & mask;
    *pos += 1;
    if first < mask {
        return Ok(u32::from(first));
    }
    let mut value = u64::from(mask);
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        value += u64::from(b & 0x7f) << shift;
        if value > u64::from(u32::MAX) {
            return Err(HpackError::IntegerOverflow);
        }
        if b & 0x80 == 0 {
            return Ok(value as u32);
        }
        shift += 7;
        if shift > 28 {
            // More continuation bytes than a 32-bit value needs (zero padding included).
            return Err(HpackError::IntegerOverflow);
        }
    }
}

/// Reads a string literal (§5.2): a slice of `buf`, or its Huffman decoding in `scratch`.
fn read_string<'a>(
    buf: &'a [u8],
    pos: &mut usize,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], HpackError> {
    let huffman = buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(buf, pos, 7)? as usize;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    let raw = buf.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if huffman {
        scratch.clear();
        huffman_decode(raw, scratch)?;
        Ok(scratch)
    } else {
        Ok(raw)
    }
}

/// Appends the Huffman decoding of `input` to `out` (at most `8 * input.len() / 5` bytes).
pub fn huffman_decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let h = &HUFFMAN;
    // Bits not yet decoded, left-aligned in `acc`.
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    let mut next = 0;
    out.reserve(input.len() + input.len() / 2);
    loop {
        while nbits <= 56 {
            let Some(&b) = input.get(next) else { break };
            acc |= u64::from(b) << (56 - nbits);
            nbits += 8;
            next += 1;
        }
        if nbits == 0 {
            return Ok(());
        }
        let top = (acc >> 32) as u32;
        // Past the input, pretend 1 bits: a code that then needs them is the padding.
        let window = if nbits < 32 {
            top | (u32::MAX >> nbits)
        } else {
            top
        };
        let (len, sym) = decode_symbol(h, window);
        if len > nbits {
            // Padding: fewer than 8 bits, all 1 (the most significant bits of EOS).
            let rest = acc >> (64 - nbits);
            if nbits <= 7 && rest == (1u64 << nbits) - 1 {
                return Ok(());
            }
            return Err(HpackError::Huffman);
        }
        if sym == EOS {
            return Err(HpackError::Huffman);
        }
        out.push(sym as u8);
        acc <<= len;
        nbits -= len;
    }
}

/// The symbol whose code starts the 32-bit window, and the code's length.
#[inline]
fn decode_symbol(h: &HuffmanDecoder, window: u32) -> (u32, u16) {
    let fast = h.fast[(window >> 24) as usize];
    if fast != 0 {
        return (u32::from(fast >> 9), fast & 0x1ff);
    }
    for len in 9..=30usize {
        if u64::from(window) < h.limit[len] {
            let code = window >> (32 - len);
            // `code >= first[len]` for canonical codes; a wrapped value would only miss the table.
            let i = usize::from(h.offset[len]) + code.wrapping_sub(h.first[len]) as usize;
            return (len as u32, h.sorted.get(i).copied().unwrap_or(EOS));
        }
    }
    // Unreachable: every 30-bit window is below the last limit (2^32).
    (30, EOS)
}

/// A small HPACK encoder for tests: static and dynamic table lookups, literals with and without
/// indexing and Huffman, size updates. Shared with the HTTP/2 tests.
#[cfg(test)]
pub(crate) mod encoder {
    use std::collections::VecDeque;

    use super::{DEFAULT_TABLE_SIZE, ENTRY_OVERHEAD, HUFFMAN_CODES, STATIC_TABLE};

    /// How one field is represented.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Mode {
        /// An index when the whole field is in a table, else a literal with incremental indexing.
        Index,
        /// A literal with incremental indexing (name indexed when the name is in a table).
        Incremental,
        /// A literal without indexing.
        WithoutIndexing,
        /// A literal never indexed.
        NeverIndexed,
    }

    #[derive(Debug, Clone)]
    pub(crate) struct Encoder {
        table: VecDeque<(Vec<u8>, Vec<u8>)>,
        size: usize,
        max: usize,
        pub(crate) huffman: bool,
    }

    impl Encoder {
        pub(crate) fn new(huffman: bool) -> Self {
            Self {
                table: VecDeque::new(),
                size: 0,
                max: DEFAULT_TABLE_SIZE,
                huffman,
            }
        }

        pub(crate) fn size_update(&mut self, out: &mut Vec<u8>, max: usize) {
            self.max = max;
            self.evict();
            encode_int(out, 5, 0x20, max as u64);
        }

        fn evict(&mut self) {
            while self.size > self.max {
                let (n, v) = self.table.pop_back().expect("size > 0 means entries");
                self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
            }
        }

        fn find(&self, name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
            let mut name_index = None;
            let statics = STATIC_TABLE
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()));
            let dynamics = self.table.iter().map(|(n, v)| (&n[..], &v[..]));
            for (i, (n, v)) in statics.chain(dynamics).enumerate() {
                if n == name {
                    if v == value {
                        return (Some(i + 1), Some(i + 1));
                    }
                    name_index.get_or_insert(i + 1);
                }
            }
            (None, name_index)
        }

        pub(crate) fn encode(&mut self, out: &mut Vec<u8>, name: &[u8], value: &[u8], mode: Mode) {
            let (full, name_index) = self.find(name, value);
            if let (Mode::Index, Some(i)) = (mode, full) {
                encode_int(out, 7, 0x80, i as u64);
                return;
            }
            let (prefix, flags) = match mode {
                Mode::Index | Mode::Incremental => (6, 0x40),
                Mode::WithoutIndexing => (4, 0x00),
                Mode::NeverIndexed => (4, 0x10),
            };
            match name_index {
                Some(i) => encode_int(out, prefix, flags, i as u64),
                None => {
                    encode_int(out, prefix, flags, 0);
                    encode_str(out, name, self.huffman);
                }
            }
            encode_str(out, value, self.huffman);
            if flags == 0x40 {
                self.size += name.len() + value.len() + ENTRY_OVERHEAD;
                self.table.push_front((name.to_vec(), value.to_vec()));
                self.evict();
            }
        }

        /// One header block of `headers`, each field in `mode`.
        pub(crate) fn block(&mut self, headers: &[(&str, &str)], mode: Mode) -> Vec<u8> {
            let mut out = Vec::new();
            for (n, v) in headers {
                self.encode(&mut out, n.as_bytes(), v.as_bytes(), mode);
            }
            out
        }
    }

    pub(crate) fn encode_int(out: &mut Vec<u8>, prefix: u8, flags: u8, value: u64) {
        let max = (1u64 << prefix) - 1;
        if value < max {
            out.push(flags | value as u8);
            return;
        }
        out.push(flags | max as u8);
        let mut rest = value - max;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }

    pub(crate) fn encode_str(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
        if huffman {
            let h = huffman_encode(s);
            encode_int(out, 7, 0x80, h.len() as u64);
            out.extend(h);
        } else {
            encode_int(out, 7, 0, s.len() as u64);
            out.extend_from_slice(s);
        }
    }

    pub(crate) fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut acc, mut n) = (0u64, 0u32);
        for &b in s {
            let (code, len) = HUFFMAN_CODES[b as usize];
            acc = (acc << len) | u64::from(code);
            n += u32::from(len);
            while n >= 8 {
                out.push((acc >> (n - 8)) as u8);
                n -= 8;
            }
        }
        if n > 0 {
            out.push(((acc << (8 - n)) as u8) | (0xff >> n));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::encoder::{Encoder, Mode, encode_int, huffman_encode};
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(headers: &[Header]) -> Vec<(Option<&str>, Option<&str>)> {
        headers
            .iter()
            .map(|h| (h.name.as_deref(), h.value.as_deref()))
            .collect()
    }

    fn known<'a>(v: &[(&'a str, &'a str)]) -> Vec<(Option<&'a str>, Option<&'a str>)> {
        v.iter().map(|(n, v)| (Some(*n), Some(*v))).collect()
    }

    #[test]
    fn the_huffman_code_is_canonical() {
        // The decoder derives codes from lengths: check that gives RFC 7541's codes.
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (HUFFMAN_CODES[s].1, s));
        let mut code = 0u32;
        let mut prev = HUFFMAN_CODES[order[0]].1;
        for (k, &s) in order.iter().enumerate() {
            let len = HUFFMAN_CODES[s].1;
            if k > 0 {
                code = (code + 1) << (len - prev);
            }
            prev = len;
            assert_eq!(code, HUFFMAN_CODES[s].0, "symbol {s}");
        }
        assert_eq!(HUFFMAN_CODES[256], (0x3fff_ffff, 30));
        assert_eq!(HUFFMAN_CODES[b'a' as usize], (0x3, 5));
    }

    #[test]
    fn huffman_rfc_examples_and_every_symbol_round_trip() {
        // RFC 7541 C.4.1 and C.6.1.
        let mut out = Vec::new();
        huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"), &mut out).unwrap();
        assert_eq!(out, b"www.example.com");
        out.clear();
        huffman_decode(
            &hex("d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff"),
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"Mon, 21 Oct 2013 20:13:21 GMT");
        let all: Vec<u8> = (0..=255).collect();
        out.clear();
        huffman_decode(&huffman_encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
    }

    #[test]
    fn huffman_rejects_eos_and_bad_padding() {
        let mut out = Vec::new();
        // EOS in full (30 one bits, then 2 padding bits).
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
            Err(HpackError::Huffman)
        );
        // A full byte of padding.
        assert_eq!(
            huffman_decode(&[0x1f, 0xff], &mut out),
            Err(HpackError::Huffman)
        );
        // Padding of 0 bits: '0' is 00000, then 000 padding.
        assert_eq!(huffman_decode(&[0x00], &mut out), Err(HpackError::Huffman));
        // Valid: 'a' (00011) + 111 padding.
        out.clear();
        huffman_decode(&[0x1f], &mut out).unwrap();
        assert_eq!(out, b"a");
    }

    #[test]
    fn integers_rfc_examples_and_overflow() {
        // C.1.2: 1337 with a 5-bit prefix.
        let mut pos = 0;
        assert_eq!(read_int(&[0x1f, 0x9a, 0x0a], &mut pos, 5), Ok(1337));
        assert_eq!(pos, 3);
        let mut pos = 0;
        assert_eq!(
            read_int(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0x7f], &mut pos, 5),
            Err(HpackError::IntegerOverflow)
        );
        let mut pos = 0;
        assert_eq!(
            read_int(&[0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00], &mut pos, 5),
            Err(HpackError::IntegerOverflow)
        );
        let mut pos = 0;
        assert_eq!(
            read_int(&[0x1f, 0x80], &mut pos, 5),
            Err(HpackError::Truncated)
        );
        let mut out = Vec::new();
        encode_int(&mut out, 7, 0, u64::from(u32::MAX));
        let mut pos = 0;
        assert_eq!(read_int(&out, &mut pos, 7), Ok(u32::MAX));
    }

    #[test]
    fn rfc_c3_requests_without_huffman() {
        let mut d = HpackDecoder::new(true);
        let first = d
            .decode_block(&hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"))
            .unwrap();
        assert_eq!(
            pairs(&first),
            known(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(d.table_size(), 57);
        let second = d
            .decode_block(&hex("8286 84be 5808 6e6f 2d63 6163 6865"))
            .unwrap();
        assert_eq!(
            pairs(&second),
            known(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let third = d
            .decode_block(&hex(
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ))
            .unwrap();
        assert_eq!(
            pairs(&third),
            known(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(d.table_size(), 164);
        assert_eq!(d.table_len(), 3);
    }

    #[test]
    fn rfc_c6_responses_with_huffman_and_eviction() {
        // Table size 256: entries are evicted.
        let mut d = HpackDecoder::new(true);
        d.decode_block(&[0x3f, 0xe1, 0x01]).unwrap(); // size update to 256
        let blocks = [
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ];
        let out: Vec<Vec<Header>> = blocks
            .iter()
            .map(|b| d.decode_block(&hex(b)).unwrap())
            .collect();
        assert_eq!(
            pairs(&out[1]),
            known(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(
            pairs(&out[2]),
            known(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
                ("location", "https://www.example.com"),
                ("content-encoding", "gzip"),
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                ),
            ])
        );
        assert_eq!(d.table_size(), 215);
        assert_eq!(d.table_len(), 3);
        assert!(d.is_synced());
    }

    #[test]
    fn attached_mid_connection_unknown_indices_are_not_guessed() {
        let mut enc = Encoder::new(true);
        // Before attach: the path and a custom header enter the table.
        enc.block(
            &[(":method", "POST"), (":path", "/pkg.Svc/Old"), ("x-a", "1")],
            Mode::Index,
        );
        let mut d = HpackDecoder::new(false);
        assert!(!d.is_synced());
        // After attach: old entries are referenced; a new one is added with an unknown name
        // index (x-a's name is an entry never seen).
        let mut block = enc.block(
            &[(":method", "POST"), (":path", "/pkg.Svc/Old")],
            Mode::Index,
        );
        enc.encode(&mut block, b"x-a", b"2", Mode::Incremental);
        enc.encode(&mut block, b"x-b", b"3", Mode::Incremental);
        let out = d.decode_block(&block).unwrap();
        assert_eq!(
            pairs(&out),
            vec![
                (Some(":method"), Some("POST")),
                (None, None),
                (None, Some("2")),
                (Some("x-b"), Some("3")),
            ]
        );
        // The new entries are at the right positions: x-b newest, then the unnamed one.
        let block = enc.block(&[("x-b", "3"), ("x-a", "2")], Mode::Index);
        assert_eq!(block, [0xbe, 0xbf]);
        let out = d.decode_block(&block).unwrap();
        assert_eq!(
            pairs(&out),
            vec![(Some("x-b"), Some("3")), (None, Some("2"))]
        );
        assert!(!d.is_synced());
        // A size update to 0 empties the encoder's table: in sync from then on.
        let mut block = Vec::new();
        enc.size_update(&mut block, 0);
        enc.size_update(&mut block, 4096);
        block.extend(enc.block(&[(":path", "/pkg.Svc/New")], Mode::Index));
        let out = d.decode_block(&block).unwrap();
        assert!(d.is_synced());
        assert_eq!(pairs(&out), known(&[(":path", "/pkg.Svc/New")]));
        let out = d
            .decode_block(&enc.block(&[(":path", "/pkg.Svc/New")], Mode::Index))
            .unwrap();
        assert_eq!(pairs(&out), known(&[(":path", "/pkg.Svc/New")]));
    }

    #[test]
    fn a_size_update_that_must_have_evicted_the_unseen_entries_syncs() {
        let mut d = HpackDecoder::new(false);
        let mut enc = Encoder::new(false);
        enc.block(&[("old", "x".repeat(100).as_str())], Mode::Incremental);
        // 40 bytes held after attach.
        d.decode_block(&enc.block(&[("k", "1234567")], Mode::Incremental))
            .unwrap();
        assert_eq!(d.table_size(), 40);
        // 100: another entry of at least 32 could still fit behind ours.
        let mut b = Vec::new();
        enc.size_update(&mut b, 100);
        d.decode_block(&b).unwrap();
        assert!(!d.is_synced());
        // 60: it could not.
        let mut b = Vec::new();
        enc.size_update(&mut b, 60);
        d.decode_block(&b).unwrap();
        assert!(d.is_synced());
        assert_eq!(d.table_len(), 1);
    }

    #[test]
    fn a_truncated_block_decodes_its_prefix_and_unsyncs() {
        let mut enc = Encoder::new(true);
        let mut d = HpackDecoder::new(true);
        d.decode_block(&enc.block(&[("x-a", "1")], Mode::Incremental))
            .unwrap();
        let block = enc.block(
            &[
                (":method", "GET"),
                (":path", "/a/long/path"),
                ("user-agent", "test"),
            ],
            Mode::Incremental,
        );
        let mut got = Vec::new();
        d.decode_truncated(&block[..block.len() - 2], |n, v| got.push(owned(n, v)));
        assert_eq!(
            pairs(&got),
            known(&[(":method", "GET"), (":path", "/a/long/path")])
        );
        assert!(!d.is_synced());
        assert_eq!(d.table_len(), 0);
        // The entry before the lost block is unknown now.
        let out = d
            .decode_block(&enc.block(&[("x-a", "1")], Mode::Index))
            .unwrap();
        assert_eq!(pairs(&out), vec![(None, None)]);
    }

    #[test]
    fn errors_unsync_and_never_panic_on_known_crashers() {
        // Inputs that crashed other HPACK crates (shared/PROTOCOLS.md).
        for input in [&[0x3f, 0x0a][..], &[0x0a][..], &[0x80][..], &[0xff; 8][..]] {
            let mut d = HpackDecoder::new(true);
            let _ = d.decode_block(input);
        }
        let mut d = HpackDecoder::new(true);
        assert_eq!(d.decode_block(&[0x80]), Err(HpackError::ZeroIndex));
        assert!(!d.is_synced());
        let mut d = HpackDecoder::new(true);
        assert_eq!(
            d.decode_block(&[0x40, 0x05, b'a']),
            Err(HpackError::Truncated)
        );
    }

    #[test]
    fn the_memory_bound_holds_for_a_huge_announced_table() {
        let mut d = HpackDecoder::new(true);
        let mut enc = Encoder::new(false);
        let mut b = Vec::new();
        enc.size_update(&mut b, 1 << 20);
        d.decode_block(&b).unwrap();
        let v = "v".repeat(1000);
        for i in 0..200 {
            let name = format!("h{i}");
            d.decode_block(&enc.block(&[(name.as_str(), v.as_str())], Mode::Incremental))
                .unwrap();
        }
        assert!(d.table_size() <= MAX_HELD_TABLE_SIZE);
        // Dropped for memory: unknown, and no longer synced.
        let out = d
            .decode_block(&enc.block(&[("h0", v.as_str())], Mode::Index))
            .unwrap();
        assert_eq!(pairs(&out), vec![(None, None)]);
        assert!(!d.is_synced());
        let out = d
            .decode_block(&enc.block(&[("h199", v.as_str())], Mode::Index))
            .unwrap();
        assert_eq!(out[0].name.as_deref(), Some("h199"));
    }

    fn field() -> impl Strategy<Value = (String, String, u8)> {
        let names = prop::sample::select(vec![
            ":method",
            ":path",
            ":status",
            "content-type",
            "x-request-id",
            "grpc-status",
            "custom",
            "user-agent",
        ]);
        (
            prop_oneof![names.prop_map(String::from), "[a-z-]{1,12}"],
            prop_oneof![
                prop::sample::select(vec!["GET", "/", "200", "0", "application/grpc"])
                    .prop_map(String::from),
                "[ -~]{0,40}",
                ".{0,10}",
            ],
            0u8..4,
        )
    }

    fn mode(m: u8) -> Mode {
        [
            Mode::Index,
            Mode::Incremental,
            Mode::WithoutIndexing,
            Mode::NeverIndexed,
        ][m as usize % 4]
    }

    proptest! {
        /// Whatever the representation, a synced decoder gives back exactly what was encoded.
        #[test]
        fn encoded_blocks_round_trip(
            blocks in prop::collection::vec(prop::collection::vec(field(), 0..12), 1..12),
            huffman in any::<bool>(),
            sizes in prop::collection::vec(prop::option::of(0usize..600), 12),
        ) {
            let mut enc = Encoder::new(huffman);
            let mut d = HpackDecoder::new(true);
            for (i, fields) in blocks.iter().enumerate() {
                let mut b = Vec::new();
                if let Some(s) = sizes[i] {
                    enc.size_update(&mut b, s);
                }
                for (n, v, m) in fields {
                    enc.encode(&mut b, n.as_bytes(), v.as_bytes(), mode(*m));
                }
                let out = d.decode_block(&b).unwrap();
                prop_assert!(d.is_synced());
                let want: Vec<(Option<&str>, Option<&str>)> =
                    fields.iter().map(|(n, v, _)| (Some(n.as_str()), Some(v.as_str()))).collect();
                prop_assert_eq!(pairs(&out), want);
            }
        }

        /// Attached after `skip` blocks (or after a lost one), the decoder never guesses: each
        /// field is exactly right or unknown.
        #[test]
        fn mid_connection_fields_are_right_or_unknown(
            blocks in prop::collection::vec(prop::collection::vec(field(), 0..12), 1..16),
            huffman in any::<bool>(),
            skip in 0usize..16,
            sizes in prop::collection::vec(prop::option::of(0usize..600), 16),
        ) {
            let mut enc = Encoder::new(huffman);
            let mut d = HpackDecoder::new(false);
            let mut unknown = 0;
            for (i, fields) in blocks.iter().enumerate() {
                let mut b = Vec::new();
                if let Some(s) = sizes[i] {
                    enc.size_update(&mut b, s);
                }
                for (n, v, m) in fields {
                    enc.encode(&mut b, n.as_bytes(), v.as_bytes(), mode(*m));
                }
                if i < skip {
                    continue;
                }
                let out = d.decode_block(&b).unwrap();
                prop_assert_eq!(out.len(), fields.len());
                for (h, (n, v, _)) in out.iter().zip(fields) {
                    if let Some(name) = &h.name {
                        prop_assert_eq!(name.as_ref(), n.as_str());
                    }
                    if let Some(value) = &h.value {
                        prop_assert_eq!(value.as_str(), v.as_str());
                    }
                    unknown += usize::from(h.name.is_none() || h.value.is_none());
                }
                if d.is_synced() {
                    prop_assert!(out.iter().all(|h| h.value.is_some()));
                }
            }
            let _ = unknown;
        }

        /// Arbitrary bytes never panic, synced or not, and keep the table bounded.
        #[test]
        fn arbitrary_bytes_never_panic(
            blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..8),
            synced in any::<bool>(),
        ) {
            let mut d = HpackDecoder::new(synced);
            for b in &blocks {
                let _ = d.decode_block(b);
                d.decode_truncated(b, |_, _| {});
                prop_assert!(d.table_size() <= MAX_HELD_TABLE_SIZE);
            }
        }

        /// Random bytes as Huffman strings: an error or at most 8/5 as many bytes, never a panic.
        #[test]
        fn huffman_arbitrary(input in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut out = Vec::new();
            if huffman_decode(&input, &mut out).is_ok() {
                prop_assert!(out.len() <= input.len() * 8 / 5);
                prop_assert_eq!(huffman_encode(&out), input);
            }
        }
    }
}
