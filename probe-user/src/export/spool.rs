//! Batches that the collector has not acknowledged yet: a bounded queue in memory that overflows
//! into a bounded directory on disk. Every batch stays until an ack covers its sequence number;
//! when both bounds are reached the oldest batch is dropped and its events counted.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
};

use bakeoff_proto::v1::EventBatch;
use prost::Message as _;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A spooled batch on disk: its size and event count (kept for drop accounting).
#[derive(Clone, Copy, Debug)]
struct OnDisk {
    bytes: u64,
    events: u64,
}

#[derive(Debug)]
pub struct Spool {
    memory: VecDeque<EventBatch>,
    memory_limit: usize,
    dir: Option<PathBuf>,
    disk: BTreeMap<u64, OnDisk>,
    disk_limit: u64,
    disk_bytes: u64,
    /// Highest sequence acknowledged by the collector.
    acked: u64,
    /// Events dropped because both bounds were reached.
    pub dropped_events: u64,
}

impl Spool {
    /// `memory_limit` batches in memory; with `dir`, up to `disk_limit` bytes on disk. Batches
    /// left on disk by an earlier run are picked up (and resent).
    pub fn new(
        memory_limit: usize,
        dir: Option<PathBuf>,
        disk_limit: u64,
    ) -> Result<Self, SpoolError> {
        let mut disk = BTreeMap::new();
        let mut disk_bytes = 0;
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
                let name = entry.file_name();
                let Some((seq, events)) = parse_name(&name.to_string_lossy()) else {
                    continue;
                };
                let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
                disk.insert(seq, OnDisk { bytes, events });
                disk_bytes += bytes;
            }
        }
        Ok(Self {
            memory: VecDeque::new(),
            memory_limit: memory_limit.max(1),
            dir,
            disk,
            disk_limit,
            disk_bytes,
            acked: 0,
            dropped_events: 0,
        })
    }

    /// Highest sequence found on disk at start (the next batch must number above it).
    pub fn max_sequence(&self) -> u64 {
        let mem = self.memory.back().map_or(0, |b| b.sequence);
        self.disk.keys().next_back().copied().unwrap_or(0).max(mem)
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn memory_batches(&self) -> usize {
        self.memory.len()
    }

    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Batches and events not yet acknowledged.
    pub fn pending_batches(&self) -> usize {
        self.memory.len() + self.disk.len()
    }

    /// Events in batches not yet acknowledged.
    pub fn pending_events(&self) -> u64 {
        self.memory
            .iter()
            .map(|b| b.events.len() as u64)
            .sum::<u64>()
            + self.disk.values().map(|d| d.events).sum::<u64>()
    }

    /// Adds a new batch (its sequence above every other).
    pub fn push(&mut self, batch: EventBatch) {
        if self.memory.len() >= self.memory_limit
            && let Some(oldest) = self.memory.pop_front()
        {
            self.spill(oldest);
        }
        self.memory.push_back(batch);
    }

    /// Moves a batch to disk, making room by dropping the oldest spooled ones; drops the batch
    /// itself when there is no spool directory or it cannot be written.
    fn spill(&mut self, batch: EventBatch) {
        let events = batch.events.len() as u64;
        let Some(dir) = self.dir.clone() else {
            self.dropped_events += events;
            return;
        };
        let bytes = batch.encode_to_vec();
        let size = bytes.len() as u64;
        while self.disk_bytes + size > self.disk_limit {
            let Some((&seq, _)) = self.disk.iter().next() else {
                break;
            };
            self.remove_disk(seq, true);
        }
        if self.disk_bytes + size > self.disk_limit {
            self.dropped_events += events;
            return;
        }
        let path = dir.join(file_name(batch.sequence, events));
        match std::fs::write(&path, &bytes) {
            Ok(()) => {
                self.disk.insert(
                    batch.sequence,
                    OnDisk {
                        bytes: size,
                        events,
                    },
                );
                self.disk_bytes += size;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot spool a batch; dropped");
                self.dropped_events += events;
            }
        }
    }

    fn remove_disk(&mut self, seq: u64, dropped: bool) {
        if let Some(d) = self.disk.remove(&seq) {
            self.disk_bytes -= d.bytes;
            if dropped {
                self.dropped_events += d.events;
            }
            if let Some(dir) = &self.dir {
                let _ = std::fs::remove_file(dir.join(file_name(seq, d.events)));
            }
        }
    }

    /// The collector stored everything up to `seq`.
    pub fn ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.memory.front().is_some_and(|b| b.sequence <= seq) {
            self.memory.pop_front();
        }
        let done: Vec<u64> = self.disk.range(..=seq).map(|(s, _)| *s).collect();
        for s in done {
            self.remove_disk(s, false);
        }
    }

    /// Whether some batch has a sequence above `after` (cheap: no copy, no disk read).
    pub fn has_after(&self, after: u64) -> bool {
        self.disk.range(after + 1..).next().is_some()
            || self.memory.back().is_some_and(|b| b.sequence > after)
    }

    /// The first batch with a sequence above `after`, oldest first (disk, then memory).
    pub fn next_after(&self, after: u64) -> Option<EventBatch> {
        if let Some((&seq, d)) = self.disk.range(after + 1..).next() {
            let dir = self.dir.as_ref()?;
            let path = dir.join(file_name(seq, d.events));
            match std::fs::read(&path).map(|b| EventBatch::decode(b.as_slice())) {
                Ok(Ok(batch)) => return Some(batch),
                _ => {
                    tracing::warn!(path = %path.display(), "unreadable spooled batch skipped");
                    return Some(EventBatch {
                        sequence: seq,
                        events: Vec::new(),
                    });
                }
            }
        }
        self.memory.iter().find(|b| b.sequence > after).cloned()
    }
}

fn file_name(seq: u64, events: u64) -> String {
    format!("{seq:020}-{events}.batch")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (seq, rest) = name.strip_suffix(".batch")?.split_once('-')?;
    Some((seq.parse().ok()?, rest.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use bakeoff_proto::v1::RequestEvent;

    use super::*;

    fn batch(seq: u64, events: usize) -> EventBatch {
        EventBatch {
            sequence: seq,
            events: (0..events)
                .map(|i| RequestEvent {
                    path: format!("/{seq}/{i}"),
                    ..RequestEvent::default()
                })
                .collect(),
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bakeoff-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn memory_only_drops_oldest_and_counts() {
        let mut s = Spool::new(2, None, 0).unwrap();
        for seq in 1..=4 {
            s.push(batch(seq, 10));
        }
        assert_eq!(s.dropped_events, 20);
        assert_eq!(s.next_after(0).unwrap().sequence, 3);
        s.ack(3);
        assert_eq!(s.next_after(0).unwrap().sequence, 4);
        s.ack(4);
        assert!(s.next_after(0).is_none());
    }

    #[test]
    fn overflow_goes_to_disk_in_order_and_survives_a_restart() {
        let dir = tmp("restart");
        let mut s = Spool::new(2, Some(dir.clone()), 1 << 20).unwrap();
        for seq in 1..=5 {
            s.push(batch(seq, 3));
        }
        assert_eq!(s.memory_batches(), 2);
        assert!(s.disk_bytes() > 0);
        let order: Vec<u64> = std::iter::successors(s.next_after(0), |b| s.next_after(b.sequence))
            .map(|b| b.sequence)
            .collect();
        assert_eq!(order, vec![1, 2, 3, 4, 5]);
        // has_after sees both the spooled (1..3) and the in-memory (4, 5) batches.
        assert!(s.has_after(0) && s.has_after(2) && s.has_after(4));
        assert!(!s.has_after(5));
        assert_eq!(s.next_after(1).unwrap().events[2].path, "/2/2");
        s.ack(2);
        drop(s);
        // A new run finds batch 3 on disk (4 and 5 were only in memory).
        let s = Spool::new(2, Some(dir.clone()), 1 << 20).unwrap();
        assert_eq!(s.max_sequence(), 3);
        assert_eq!(s.next_after(0).unwrap().sequence, 3);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_full_disk_drops_the_oldest_spooled_batch_with_its_events() {
        let dir = tmp("full");
        let one = batch(1, 5).encode_to_vec().len() as u64;
        let mut s = Spool::new(1, Some(dir.clone()), one * 2 + 1).unwrap();
        for seq in 1..=4 {
            s.push(batch(seq, 5));
        }
        // Memory holds 4; disk could hold two of 1..3: batch 1 was dropped.
        assert_eq!(s.dropped_events, 5);
        assert_eq!(s.next_after(0).unwrap().sequence, 2);
        assert_eq!(s.pending_batches(), 3);
        let _ = std::fs::remove_dir_all(dir);
    }
}
