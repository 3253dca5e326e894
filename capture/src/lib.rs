//! The capture file: what `bakeoff capture` records of a cohort's traffic, and what
//! `bakeoff replay` reads back.
//!
//! Layout (version 1, all integers little-endian):
//!
//! ```text
//! file    = magic header block* end
//! magic   = "BAKEOFF-CAPTURE\n" (16 bytes)
//! header  = version:u16  flags:u16(0)  meta_len:u32  meta_crc:u32  meta:meta_len bytes (JSON, `Meta`)
//! block   = stored_len:u32  raw_len:u32  crc:u32  zstd(records):stored_len bytes
//! end     = 0:u32  0:u32  0:u32  records:u64
//! record  = kind:u8  direction:u8  conn:u64  ts_unix_ns:u64  len:u32  body:len bytes
//! ```
//!
//! `crc` is CRC-32 (IEEE) of the block's stored bytes. `end` closes a complete capture with
//! its record count; a file without it was cut (or is still being written). Records are grouped into blocks of about
//! `BLOCK_BYTES` before compression, so a writer streams with bounded memory and a reader can
//! stop at the first damaged block: a truncated or corrupted file is read up to the damage, and
//! the error says where (byte offset, block number) and how many records came before it.
//!
//! A record's `body` depends on its kind: `Data` carries payload bytes (complete, after
//! redaction), `Open` a JSON [`ConnInfo`], `Close` nothing, `Loss` a JSON [`Loss`] (what the
//! capture could not record there, so a replay knows the session is incomplete).

mod read;
pub mod redact;
mod write;

pub use read::CaptureReader;
pub use write::CaptureWriter;

/// First bytes of every capture file.
pub const MAGIC: &[u8; 16] = b"BAKEOFF-CAPTURE\n";
/// The format version this crate writes (and the newest it reads).
pub const VERSION: u16 = 1;
/// Uncompressed bytes of records per block (a block may exceed it by one record).
pub const BLOCK_BYTES: usize = 256 * 1024;
/// Largest block or record a reader accepts: a length beyond it is damage, not an allocation.
pub const MAX_BLOCK_BYTES: u32 = 64 * 1024 * 1024;
/// Largest metadata a reader accepts.
pub const MAX_META_BYTES: u32 = 1024 * 1024;
/// Bytes of a record before its body.
pub const RECORD_HEADER: usize = 1 + 1 + 8 + 8 + 4;

/// What a capture is of, written once at its start.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub experiment: String,
    pub cohort: String,
    /// `http1`, `postgres`, ... or empty for every protocol.
    #[serde(default)]
    pub protocol: String,
    pub started_unix_ns: u64,
    /// Redaction rules in force when it was recorded (names, as the probe reports them).
    #[serde(default)]
    pub redaction: Vec<String>,
    /// Anything else the recorder wants to keep (probe ids, capture id, limits).
    #[serde(default)]
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// What a record is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A connection starts being recorded (opened, or already open when the capture began).
    Open = 1,
    /// Payload bytes in one direction.
    Data = 2,
    /// The connection closed.
    Close = 3,
    /// Bytes or messages the capture lost on this connection.
    Loss = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Open,
            2 => Self::Data,
            3 => Self::Close,
            4 => Self::Loss,
            _ => return None,
        })
    }
}

/// Direction of a record's bytes, seen from the recorded (cohort) process.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Not about one direction (`Open`, `Close`).
    None = 0,
    /// Read by the process: requests, when it serves.
    Ingress = 1,
    /// Written by the process.
    Egress = 2,
}

impl Direction {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::Ingress,
            2 => Self::Egress,
            _ => return None,
        })
    }
}

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub direction: Direction,
    /// The connection, unique within the capture.
    pub conn: u64,
    pub ts_unix_ns: u64,
    pub body: Vec<u8>,
}

/// The body of an `Open` record.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnInfo {
    /// `server` (the process accepted it) or `client`.
    pub role: String,
    pub protocol: String,
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(default)]
    pub pid: u32,
    /// Open before the capture started: its session state (startup parameters, `SET`s,
    /// prepared statements) comes from `attributes`, as the probe kept it.
    #[serde(default)]
    pub midstream: bool,
    #[serde(default)]
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// The body of a `Loss` record.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Loss {
    /// Bytes known lost (0 when unknown).
    pub bytes: u64,
    /// Why: `ring_full`, `payload_truncated`, `tcp_hole`, ...
    pub reason: String,
}

impl Record {
    pub fn data(conn: u64, direction: Direction, ts_unix_ns: u64, body: Vec<u8>) -> Self {
        Self {
            kind: Kind::Data,
            direction,
            conn,
            ts_unix_ns,
            body,
        }
    }

    pub fn open(conn: u64, ts_unix_ns: u64, info: &ConnInfo) -> Self {
        Self {
            kind: Kind::Open,
            direction: Direction::None,
            conn,
            ts_unix_ns,
            body: serde_json::to_vec(info).unwrap_or_default(),
        }
    }

    pub fn close(conn: u64, ts_unix_ns: u64) -> Self {
        Self {
            kind: Kind::Close,
            direction: Direction::None,
            conn,
            ts_unix_ns,
            body: Vec::new(),
        }
    }

    pub fn loss(conn: u64, direction: Direction, ts_unix_ns: u64, loss: &Loss) -> Self {
        Self {
            kind: Kind::Loss,
            direction,
            conn,
            ts_unix_ns,
            body: serde_json::to_vec(loss).unwrap_or_default(),
        }
    }

    /// The connection an `Open` record describes.
    pub fn conn_info(&self) -> Result<ConnInfo, CaptureError> {
        serde_json::from_slice(&self.body).map_err(|e| CaptureError::Body(e.to_string()))
    }

    /// What a `Loss` record says was lost.
    pub fn loss_info(&self) -> Result<Loss, CaptureError> {
        serde_json::from_slice(&self.body).map_err(|e| CaptureError::Body(e.to_string()))
    }
}

/// Why a capture file could not be written or read (further).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("not a bakeoff capture file (bad magic)")]
    BadMagic,
    #[error(
        "capture format version {0} is newer than this bakeoff reads ({VERSION}): upgrade bakeoff"
    )]
    Version(u16),
    #[error("the capture's header is damaged: {0}")]
    Header(String),
    #[error(
        "the capture is truncated at byte {offset} (block {block}): {records} records read before it"
    )]
    Truncated {
        offset: u64,
        block: u64,
        records: u64,
    },
    #[error(
        "the capture is corrupted at byte {offset} (block {block}: {what}): {records} records read before it"
    )]
    Corrupt {
        offset: u64,
        block: u64,
        records: u64,
        what: String,
    },
    #[error("a record's body is not what its kind says: {0}")]
    Body(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests;
