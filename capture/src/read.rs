//! Reading a capture: block by block, every length bounded and every block checked before it
//! is decompressed; the first damage ends the reading with an error that says where.

use std::io::Read;

use crate::{
    CaptureError, Direction, Kind, MAGIC, MAX_BLOCK_BYTES, MAX_META_BYTES, Meta, RECORD_HEADER,
    Record, VERSION,
};

/// A capture being read from `R`; an iterator of records.
pub struct CaptureReader<R: Read> {
    input: R,
    meta: Meta,
    version: u16,
    /// Decompressed records of the current block, and the read position in it.
    block: Vec<u8>,
    pos: usize,
    /// Byte offset of the next block in the file, and its number.
    offset: u64,
    blocks: u64,
    records: u64,
    /// Set after the first error or the end: the iterator then returns `None`.
    done: bool,
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` when the input ended before the first byte,
/// `Err(UnexpectedEof)` when it ended after some.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl<R: Read> CaptureReader<R> {
    /// Reads and checks the magic and the header.
    pub fn new(mut input: R) -> Result<Self, CaptureError> {
        let mut magic = [0u8; 16];
        if !read_full(&mut input, &mut magic).unwrap_or(false) || &magic != MAGIC {
            return Err(CaptureError::BadMagic);
        }
        let mut head = [0u8; 12];
        read_full(&mut input, &mut head)
            .ok()
            .filter(|ok| *ok)
            .ok_or_else(|| CaptureError::Header("truncated".into()))?;
        let version = u16::from_le_bytes([head[0], head[1]]);
        if version == 0 || version > VERSION {
            return Err(CaptureError::Version(version));
        }
        let (len, crc) = (le32(&head, 4), le32(&head, 8));
        if len > MAX_META_BYTES {
            return Err(CaptureError::Header(format!("metadata of {len} bytes")));
        }
        let mut meta = vec![0u8; len as usize];
        read_full(&mut input, &mut meta)
            .ok()
            .filter(|ok| *ok || len == 0)
            .ok_or_else(|| CaptureError::Header("truncated metadata".into()))?;
        if crc32fast::hash(&meta) != crc {
            return Err(CaptureError::Header("metadata checksum mismatch".into()));
        }
        let meta: Meta =
            serde_json::from_slice(&meta).map_err(|e| CaptureError::Header(e.to_string()))?;
        Ok(Self {
            input,
            meta,
            version,
            block: Vec::new(),
            pos: 0,
            offset: (MAGIC.len() + 12) as u64 + u64::from(len),
            blocks: 0,
            records: 0,
            done: false,
        })
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn version(&self) -> u16 {
        self.version
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    fn corrupt(&self, what: impl Into<String>) -> CaptureError {
        CaptureError::Corrupt {
            offset: self.offset,
            block: self.blocks,
            records: self.records,
            what: what.into(),
        }
    }

    fn truncated(&self) -> CaptureError {
        CaptureError::Truncated {
            offset: self.offset,
            block: self.blocks,
            records: self.records,
        }
    }

    /// Loads the next block; `Ok(false)` at a clean end of file.
    fn next_block(&mut self) -> Result<bool, CaptureError> {
        let mut head = [0u8; 12];
        match read_full(&mut self.input, &mut head) {
            // No end marker: cut, or still being written.
            Ok(false) => return Err(self.truncated()),
            Ok(true) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(self.truncated());
            }
            Err(e) => return Err(e.into()),
        }
        let (stored, raw, crc) = (le32(&head, 0), le32(&head, 4), le32(&head, 8));
        if stored == 0 && raw == 0 {
            // The end marker: the record count follows, and must match.
            let mut count = [0u8; 8];
            match read_full(&mut self.input, &mut count) {
                Ok(true) => {}
                Ok(false) => return Err(self.truncated()),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(self.truncated());
                }
                Err(e) => return Err(e.into()),
            }
            let count = u64::from_le_bytes(count);
            if crc != 0 || count != self.records {
                return Err(self.corrupt(format!(
                    "end marker says {count} records, {} were read",
                    self.records
                )));
            }
            return Ok(false);
        }
        if stored > MAX_BLOCK_BYTES || raw > MAX_BLOCK_BYTES {
            return Err(self.corrupt(format!("block lengths {stored}/{raw}")));
        }
        let mut data = vec![0u8; stored as usize];
        match read_full(&mut self.input, &mut data) {
            Ok(true) => {}
            Ok(false) => return Err(self.truncated()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(self.truncated());
            }
            Err(e) => return Err(e.into()),
        }
        if crc32fast::hash(&data) != crc {
            return Err(self.corrupt("checksum mismatch"));
        }
        let block = zstd::bulk::decompress(&data, raw as usize)
            .map_err(|e| self.corrupt(format!("zstd: {e}")))?;
        if block.len() != raw as usize {
            return Err(self.corrupt("decompressed length differs"));
        }
        self.block = block;
        self.pos = 0;
        self.offset += 12 + u64::from(stored);
        self.blocks += 1;
        Ok(true)
    }

    fn next_record(&mut self) -> Result<Option<Record>, CaptureError> {
        while self.pos >= self.block.len() {
            if !self.next_block()? {
                return Ok(None);
            }
        }
        let b = &self.block[self.pos..];
        if b.len() < RECORD_HEADER {
            return Err(self.corrupt("record header cut at the block's end"));
        }
        let len = le32(b, 18) as usize;
        if b.len() < RECORD_HEADER + len {
            return Err(self.corrupt("record body cut at the block's end"));
        }
        let (Some(kind), Some(direction)) = (Kind::from_u8(b[0]), Direction::from_u8(b[1])) else {
            return Err(self.corrupt(format!("record kind {} direction {}", b[0], b[1])));
        };
        let r = Record {
            kind,
            direction,
            conn: le64(b, 2),
            ts_unix_ns: le64(b, 10),
            body: b[RECORD_HEADER..RECORD_HEADER + len].to_vec(),
        };
        self.pos += RECORD_HEADER + len;
        self.records += 1;
        Ok(Some(r))
    }
}

impl<R: Read> Iterator for CaptureReader<R> {
    type Item = Result<Record, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
