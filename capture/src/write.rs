//! Writing a capture: records are buffered into blocks, each compressed and checksummed as it
//! fills, so memory stays bounded whatever the capture's length.

use std::io::Write;

use crate::{BLOCK_BYTES, CaptureError, MAGIC, Meta, RECORD_HEADER, Record, VERSION};

/// zstd level: fast (the probe side streams; captures are mostly text that compresses well
/// even so).
const LEVEL: i32 = 3;

/// A capture being written to `W`.
pub struct CaptureWriter<W: Write> {
    out: W,
    block: Vec<u8>,
    records: u64,
    bytes: u64,
}

impl<W: Write> CaptureWriter<W> {
    /// Writes the magic and the header with `meta`.
    pub fn new(mut out: W, meta: &Meta) -> Result<Self, CaptureError> {
        let meta = serde_json::to_vec(meta).map_err(|e| CaptureError::Header(e.to_string()))?;
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&0u16.to_le_bytes())?;
        out.write_all(&(meta.len() as u32).to_le_bytes())?;
        out.write_all(&crc32fast::hash(&meta).to_le_bytes())?;
        out.write_all(&meta)?;
        Ok(Self {
            out,
            block: Vec::with_capacity(BLOCK_BYTES + RECORD_HEADER),
            records: 0,
            bytes: (MAGIC.len() + 12 + meta.len()) as u64,
        })
    }

    /// Appends a record; a full block is compressed and written.
    pub fn write(&mut self, r: &Record) -> Result<(), CaptureError> {
        self.block.push(r.kind as u8);
        self.block.push(r.direction as u8);
        self.block.extend_from_slice(&r.conn.to_le_bytes());
        self.block.extend_from_slice(&r.ts_unix_ns.to_le_bytes());
        self.block
            .extend_from_slice(&(r.body.len() as u32).to_le_bytes());
        self.block.extend_from_slice(&r.body);
        self.records += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.flush_block()?;
        }
        Ok(())
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes written to the output so far (the last, partial block not included).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    fn flush_block(&mut self) -> Result<(), CaptureError> {
        if self.block.is_empty() {
            return Ok(());
        }
        let stored = zstd::bulk::compress(&self.block, LEVEL)?;
        self.out.write_all(&(stored.len() as u32).to_le_bytes())?;
        self.out
            .write_all(&(self.block.len() as u32).to_le_bytes())?;
        self.out
            .write_all(&crc32fast::hash(&stored).to_le_bytes())?;
        self.out.write_all(&stored)?;
        self.bytes += 12 + stored.len() as u64;
        self.block.clear();
        Ok(())
    }

    /// Writes what is buffered as a block and flushes the output: what was written so far is
    /// then readable (a capture in progress can be read, up to here).
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        self.flush_block()?;
        self.out.flush()?;
        Ok(())
    }

    /// Writes the last block and the end marker (an empty block header and the record
    /// count: a reader tells a complete capture from a cut one), flushes, returns the output.
    pub fn finish(mut self) -> Result<W, CaptureError> {
        self.flush_block()?;
        self.out.write_all(&[0u8; 12])?;
        self.out.write_all(&self.records.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}
