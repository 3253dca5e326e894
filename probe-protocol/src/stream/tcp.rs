//! Rebuilds one direction of one TCP connection's byte stream from the segments the kernel
//! programs report.
//!
//! Ingress segments are seen before TCP's own sequence processing, so they come duplicated,
//! retransmitted (overlapping, re-segmented) and out of order; GSO/GRO segments carry only a
//! captured prefix of a much longer payload. [`Reassembler`] puts them back in sequence order,
//! trims what was already delivered, holds segments that are ahead of a hole in a bounded buffer,
//! and reports a hole that will not fill as a [`Piece::Gap`] of known size, so decoders see each
//! stream position at most once, in order, and never a byte that was not captured.

use std::collections::BTreeMap;

use super::Piece;

/// How far ahead of the next expected byte a segment may start and still be taken as data of this
/// stream. Linux never advertises a receive window above 1 GiB (65535 << 14), so a segment
/// further ahead cannot be accepted by the receiver: it is dropped as garbage (counted as a
/// duplicate) instead of opening a hole that would never fill.
const MAX_AHEAD: u64 = 1 << 30;

/// One TCP segment of the watched direction, as a kernel program reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Sequence number of the first payload byte, or of the SYN itself when `syn` is set.
    pub seq: u32,
    /// Payload bytes, exact (a GSO/GRO segment may be far longer than what was captured).
    pub len: u32,
    /// Captured start of the payload; anything beyond `len` is ignored.
    pub prefix: &'a [u8],
    /// When the segment was seen (CLOCK_MONOTONIC ns).
    pub ts: u64,
    /// Opens the stream: it starts at `seq + 1`.
    pub syn: bool,
    /// Ends the stream after this segment's payload.
    pub fin: bool,
    /// Aborts the stream: what is buffered is delivered and later segments are ignored.
    pub rst: bool,
}

/// What one direction may hold back while it waits for a hole to fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Segments buffered ahead of a hole.
    pub max_segments: usize,
    /// Captured bytes buffered ahead of a hole.
    pub max_bytes: usize,
    /// How long a hole may wait for its retransmission before [`Reassembler::expire`] gives up.
    pub hole_timeout_ns: u64,
}

impl Default for Limits {
    /// 64 segments and 256 KiB hold a few round trips of reordering at the probe's capture
    /// sizes; 3 s outlasts a few retransmission timeouts (Linux: 200 ms minimum, 1 s initial),
    /// so a hole that the sender repairs is normally repaired before it is given up.
    fn default() -> Self {
        Self {
            max_segments: 64,
            max_bytes: 256 * 1024,
            hole_timeout_ns: 3_000_000_000,
        }
    }
}

/// Counters of one direction's reassembly, for metrics and diagnosis.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReassemblyStats {
    /// Segments pushed, whatever became of them.
    pub segments: u64,
    /// Segments with payload dropped whole: already delivered, covered by a buffered segment,
    /// past the FIN, or too far ahead to be this stream's.
    pub duplicates: u64,
    /// Segments delivered without their front, which had already been delivered.
    pub overlaps_trimmed: u64,
    /// Segments buffered because they were ahead of the next expected byte.
    pub out_of_order: u64,
    /// Holes given up (buffer full, timeout, close), each reported as one `Piece::Gap`.
    pub gaps: u64,
    /// Bytes in those holes.
    pub gap_bytes: u64,
    /// Times the buffer was full and its lowest hole was given up to make room.
    pub buffer_overflows: u64,
}

/// Where the stream is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No SYN and no payload seen yet: nothing tells where the stream starts.
    Unstarted,
    /// Delivering bytes as they become contiguous.
    Open,
    /// The FIN was reached in order: later payload can only be a retransmission.
    FinConsumed,
    /// RST or [`Reassembler::finish`]: later segments are ignored.
    Closed,
}

/// A segment held until the bytes before it arrive; owns a copy of its captured bytes because
/// the caller's buffer does not outlive `push`.
#[derive(Debug)]
struct Buffered {
    len: u64,
    prefix: Vec<u8>,
    ts: u64,
}

/// The FIN's stream offset, once known, and when it was seen (it may wait behind a hole too).
#[derive(Clone, Copy, Debug)]
struct FinMark {
    offset: u64,
    ts: u64,
}

/// Reassembles one direction of one TCP connection. Positions are kept as 64-bit stream offsets
/// (bytes since the start, holes included) so that buffered segments never face sequence
/// number wraparound; only an incoming segment's 32-bit sequence number is compared, once, with
/// the next expected one.
#[derive(Debug)]
pub struct Reassembler {
    limits: Limits,
    phase: Phase,
    /// Sequence number of the next byte to deliver.
    next_seq: u32,
    /// Stream offset of the next byte to deliver.
    next_offset: u64,
    /// Segments ahead of `next_offset`, keyed by stream offset. No entry's range contains
    /// another's, so starts and ends both increase along the map: the entry before a new
    /// segment is the only one that can cover it.
    ahead: BTreeMap<u64, Buffered>,
    /// Captured bytes held in `ahead`.
    ahead_bytes: usize,
    /// Set by the first FIN seen at or after `next_offset`.
    fin: Option<FinMark>,
    /// Earliest `ts` among the segments (and FIN) waiting behind the lowest hole; `None` when
    /// not known since entries left, recomputed by `expire` (so `push` never scans).
    hole_since: Option<u64>,
    stats: ReassemblyStats,
}

impl Reassembler {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            phase: Phase::Unstarted,
            next_seq: 0,
            next_offset: 0,
            ahead: BTreeMap::new(),
            ahead_bytes: 0,
            fin: None,
            hole_since: None,
            stats: ReassemblyStats::default(),
        }
    }

    /// Feeds one segment; calls `out` with every piece that becomes deliverable, in stream order.
    /// A segment that arrives in order is passed on borrowed, without a copy.
    pub fn push(&mut self, seg: &Segment<'_>, out: &mut dyn FnMut(Piece<'_>)) {
        self.stats.segments += 1;
        if self.phase == Phase::Closed {
            return;
        }
        if seg.rst {
            // The receiver drops the connection: nothing after the reset will reach the
            // application, and what was waiting behind holes is delivered as is.
            self.finish(out);
            return;
        }
        if self.phase == Phase::FinConsumed {
            if seg.len > 0 {
                self.stats.duplicates += 1;
            }
            return;
        }
        if self.phase == Phase::Unstarted && !self.start(seg) {
            return;
        }

        let data_seq = if seg.syn {
            seg.seq.wrapping_add(1)
        } else {
            seg.seq
        };
        // Signed distance from the next expected byte: sequence numbers wrap, so a segment is
        // ahead or behind by whichever way round is shorter.
        let start = i64::from(data_seq.wrapping_sub(self.next_seq) as i32);
        let mut len = u64::from(seg.len);
        if start >= MAX_AHEAD as i64 {
            if len > 0 {
                self.stats.duplicates += 1;
            }
            return;
        }
        let mut end = start + len as i64;
        if seg.fin && end >= 0 {
            self.note_fin(self.next_offset + end as u64, seg.ts);
            if self.phase != Phase::Open {
                // The FIN was the next thing expected, so the payload was all delivered before.
                if len > 0 {
                    self.stats.duplicates += 1;
                }
                return;
            }
        }
        // Nothing is delivered past the FIN: cut what would cross it.
        if let Some(fin) = self.fin {
            let fin_at = fin.offset.saturating_sub(self.next_offset) as i64;
            if end > fin_at {
                len = len.saturating_sub((end - fin_at) as u64);
                end = fin_at;
            }
        }
        if len == 0 {
            return;
        }
        let prefix = clamp(seg.prefix, len);
        if end <= 0 {
            self.stats.duplicates += 1;
        } else if start <= 0 {
            self.take_overlapping(start.unsigned_abs(), len, prefix, seg.ts, out);
            self.drain(out);
        } else {
            let offset = self.next_offset + start as u64;
            self.hold(offset, len, prefix, seg.ts, out);
        }
    }

    /// Gives up on a hole that has waited longer than the hole timeout (measured with the `now`
    /// ts, same clock as `Segment::ts`): reports `Gap { bytes: Some(n) }` and delivers what was
    /// buffered behind it. A hole has waited since the earliest `ts` of what is buffered behind
    /// it (segments, or a FIN), so several stale holes go in one call; a `now` before that `ts`
    /// (clocks read on different CPUs) counts as no wait.
    pub fn expire(&mut self, now: u64, out: &mut dyn FnMut(Piece<'_>)) {
        if self.phase != Phase::Open {
            return;
        }
        while let Some(hole_end) = self.hole_end()
            && let Some(since) = self.hole_waiting_since()
            && now.saturating_sub(since) > self.limits.hole_timeout_ns
        {
            self.give_up_hole(hole_end, out);
            self.drain(out);
        }
    }

    /// The other end acknowledged every byte before `ack`: those bytes exist, so a hole below
    /// it was lost by the probe, not by the network (a retransmission is seen before it can be
    /// acknowledged). Gives such holes up now, not at the timeout, so the decoder resumes in
    /// step with the other direction.
    /// Before this direction started, an acknowledgment says where it starts: a connection
    /// first seen mid-way (an accepted one: its handshake went to the listener) then does not
    /// lose its first bytes when their segment is retransmitted after a later one.
    pub fn acknowledged(&mut self, ack: u32, out: &mut dyn FnMut(Piece<'_>)) {
        if self.phase == Phase::Unstarted {
            self.next_seq = ack;
            self.phase = Phase::Open;
            return;
        }
        if self.phase != Phase::Open {
            return;
        }
        let ahead = i64::from(ack.wrapping_sub(self.next_seq) as i32);
        if ahead <= 0 || ahead >= MAX_AHEAD as i64 {
            return;
        }
        let acked_to = self.next_offset + ahead as u64;
        while let Some(hole_end) = self.hole_end()
            && hole_end <= acked_to
            && hole_end > self.next_offset
        {
            self.give_up_hole(hole_end, out);
            self.drain(out);
        }
        if self.next_offset < acked_to && self.phase == Phase::Open {
            self.give_up_hole(acked_to, out);
            self.drain(out);
        }
    }

    /// Gives up every hole with data behind it seen at or before `ts`: the caller knows from the
    /// other direction that the hole will not be filled (a server answered, so it read past
    /// it; only records lost by the probe leave such a hole).
    pub fn give_up_holes_before(&mut self, ts: u64, out: &mut dyn FnMut(Piece<'_>)) {
        if self.phase != Phase::Open {
            return;
        }
        while let Some(hole_end) = self.hole_end()
            && let Some(since) = self.hole_waiting_since()
            && since <= ts
        {
            self.give_up_hole(hole_end, out);
            self.drain(out);
        }
    }

    /// Connection closing: delivers everything buffered, with a gap for each hole (and for bytes
    /// missing before a FIN that was seen). Later pushes are ignored.
    pub fn finish(&mut self, out: &mut dyn FnMut(Piece<'_>)) {
        if self.phase == Phase::Open {
            while let Some(hole_end) = self.hole_end() {
                self.give_up_hole(hole_end, out);
                self.drain(out);
            }
        }
        self.phase = Phase::Closed;
        self.ahead.clear();
        self.ahead_bytes = 0;
        self.hole_since = None;
    }

    /// Captured bytes buffered, for a memory bound kept by the caller.
    pub fn buffered_bytes(&self) -> usize {
        self.ahead_bytes
    }

    /// Counters so far.
    pub fn stats(&self) -> &ReassemblyStats {
        &self.stats
    }

    /// Sets where the stream starts; false when the segment cannot tell (no SYN, no payload).
    fn start(&mut self, seg: &Segment<'_>) -> bool {
        if seg.syn {
            // The SYN takes one sequence number; payload, if any, follows it.
            self.next_seq = seg.seq.wrapping_add(1);
        } else if seg.len > 0 {
            // Adopted mid-stream: the first payload seen is where the stream starts.
            self.next_seq = seg.seq;
        } else {
            return false;
        }
        self.phase = Phase::Open;
        true
    }

    /// Buffers a segment that starts ahead of `next_offset`, giving up the lowest hole while the
    /// buffer has no room for it.
    fn hold(
        &mut self,
        offset: u64,
        len: u64,
        prefix: &[u8],
        ts: u64,
        out: &mut dyn FnMut(Piece<'_>),
    ) {
        loop {
            let end = offset + len;
            if let Some((&before, held)) = self.ahead.range(..=offset).next_back()
                && before + held.len >= end
            {
                self.stats.duplicates += 1;
                return;
            }
            // Entries the new segment covers would only be trimmed away on delivery.
            while let Some((&after, held)) = self.ahead.range(offset..).next()
                && after + held.len <= end
            {
                self.remove(after);
                self.stats.duplicates += 1;
            }

            let fits = self.ahead.len() < self.limits.max_segments
                && self.ahead_bytes.saturating_add(prefix.len()) <= self.limits.max_bytes;
            if fits {
                let had_hole = self.hole_end().is_some();
                self.hole_since = if had_hole {
                    self.hole_since.map(|since| since.min(ts))
                } else {
                    Some(ts)
                };
                self.ahead_bytes += prefix.len();
                self.ahead.insert(
                    offset,
                    Buffered {
                        len,
                        prefix: prefix.to_vec(),
                        ts,
                    },
                );
                self.stats.out_of_order += 1;
                return;
            }

            self.stats.buffer_overflows += 1;
            match self.ahead.keys().next() {
                Some(&first) if first < offset => {
                    self.give_up_hole(first, out);
                    self.drain(out);
                }
                _ => {
                    // The new segment is the lowest thing waiting: its own hole goes, and it is
                    // delivered without being copied (even if it alone exceeds the limits).
                    self.give_up_hole(offset, out);
                    self.take_overlapping(0, len, prefix, ts, out);
                    self.drain(out);
                    return;
                }
            }
            if offset <= self.next_offset {
                self.take_overlapping(self.next_offset - offset, len, prefix, ts, out);
                self.drain(out);
                return;
            }
        }
    }

    /// Delivers a segment that starts `behind` bytes before `next_offset`, without the part
    /// already delivered; never invents bytes: the trimmed prefix may be empty.
    fn take_overlapping(
        &mut self,
        behind: u64,
        len: u64,
        prefix: &[u8],
        ts: u64,
        out: &mut dyn FnMut(Piece<'_>),
    ) {
        if behind >= len {
            self.stats.duplicates += 1;
            return;
        }
        if behind > 0 {
            self.stats.overlaps_trimmed += 1;
        }
        let skipped = usize::try_from(behind).unwrap_or(usize::MAX);
        let prefix = prefix.get(skipped..).unwrap_or_default();
        let len = len - behind;
        out(Piece::Data { ts, len, prefix });
        self.advance(len);
    }

    /// Delivers the buffered segments that `next_offset` has reached.
    fn drain(&mut self, out: &mut dyn FnMut(Piece<'_>)) {
        while let Some(entry) = self.ahead.first_entry()
            && *entry.key() <= self.next_offset
        {
            let offset = *entry.key();
            let held = entry.remove();
            self.ahead_bytes -= held.prefix.len();
            self.hole_since = None;
            self.take_overlapping(
                self.next_offset - offset,
                held.len,
                &held.prefix,
                held.ts,
                out,
            );
        }
    }

    /// Reports the bytes up to `to` as missing and moves past them.
    fn give_up_hole(&mut self, to: u64, out: &mut dyn FnMut(Piece<'_>)) {
        let missing = to.saturating_sub(self.next_offset);
        if missing == 0 {
            return;
        }
        out(Piece::Gap {
            bytes: Some(missing),
        });
        self.stats.gaps += 1;
        self.stats.gap_bytes += missing;
        self.hole_since = None;
        self.advance(missing);
    }

    /// Moves the next expected position on by `bytes` (delivered or given up).
    fn advance(&mut self, bytes: u64) {
        self.next_offset += bytes;
        // Sequence numbers are the offset modulo 2^32: truncating is the point.
        self.next_seq = self.next_seq.wrapping_add(bytes as u32);
        if let Some(fin) = self.fin
            && fin.offset == self.next_offset
        {
            self.consume_fin();
        }
    }

    /// Records where the stream ends. The first FIN seen decides; what is buffered past it is
    /// dropped, and the one entry crossing it is cut (others crossing it would then lie inside
    /// that one, so they go).
    fn note_fin(&mut self, offset: u64, ts: u64) {
        if self.fin.is_some() || offset < self.next_offset {
            return;
        }
        self.fin = Some(FinMark { offset, ts });
        self.hole_since = None;
        if offset == self.next_offset {
            self.consume_fin();
            return;
        }
        for (_, held) in self.ahead.split_off(&offset) {
            self.ahead_bytes -= held.prefix.len();
            self.stats.duplicates += 1;
        }
        let mut lowest_crossing: Option<(u64, Buffered)> = None;
        while let Some(entry) = self.ahead.last_entry()
            && *entry.key() + entry.get().len > offset
        {
            let start = *entry.key();
            let held = entry.remove();
            self.ahead_bytes -= held.prefix.len();
            if lowest_crossing.replace((start, held)).is_some() {
                self.stats.duplicates += 1;
            }
        }
        if let Some((start, mut held)) = lowest_crossing {
            held.len = offset - start;
            held.prefix.truncate(clamp(&held.prefix, held.len).len());
            self.ahead_bytes += held.prefix.len();
            self.ahead.insert(start, held);
        }
    }

    /// The stream is complete: whatever arrives later is a retransmission, so nothing is kept.
    fn consume_fin(&mut self) {
        self.phase = Phase::FinConsumed;
        self.ahead.clear();
        self.ahead_bytes = 0;
        self.hole_since = None;
    }

    /// Drops a buffered entry.
    fn remove(&mut self, offset: u64) {
        if let Some(held) = self.ahead.remove(&offset) {
            self.ahead_bytes -= held.prefix.len();
            self.hole_since = None;
        }
    }

    /// Where the lowest hole ends: the first buffered segment, or a FIN seen ahead.
    fn hole_end(&self) -> Option<u64> {
        self.ahead.keys().next().copied().or_else(|| {
            self.fin
                .map(|fin| fin.offset)
                .filter(|&offset| offset > self.next_offset)
        })
    }

    /// Earliest `ts` among what waits behind the lowest hole.
    fn hole_waiting_since(&mut self) -> Option<u64> {
        if self.hole_since.is_none() {
            let fin_ts = self
                .fin
                .filter(|fin| fin.offset > self.next_offset)
                .map(|fin| fin.ts);
            self.hole_since = self.ahead.values().map(|held| held.ts).chain(fin_ts).min();
        }
        self.hole_since
    }
}

#[cfg(test)]
impl Reassembler {
    /// What the structure relies on, checked by the tests after every call.
    fn check_invariants(&self) {
        let mut bytes = 0;
        let mut previous: Option<(u64, u64)> = None;
        for (&start, held) in &self.ahead {
            let end = start + held.len;
            assert!(
                start > self.next_offset,
                "{start} buffered, {} next",
                self.next_offset
            );
            assert!(held.len > 0 && held.prefix.len() as u64 <= held.len);
            if let Some((previous_start, previous_end)) = previous {
                assert!(
                    start > previous_start && end > previous_end,
                    "nested entries"
                );
            }
            if let Some(fin) = self.fin {
                assert!(end <= fin.offset, "entry past the FIN");
            }
            previous = Some((start, end));
            bytes += held.prefix.len();
        }
        assert_eq!(bytes, self.ahead_bytes);
        assert!(self.ahead.len() <= self.limits.max_segments);
        assert!(self.ahead_bytes <= self.limits.max_bytes);
        match self.phase {
            Phase::Open => {
                if let Some(fin) = self.fin {
                    assert!(
                        fin.offset > self.next_offset,
                        "FIN reached but not consumed"
                    );
                }
            }
            _ => assert!(self.ahead.is_empty()),
        }
        if self.hole_end().is_some()
            && let Some(since) = self.hole_since
        {
            let fin_ts = self
                .fin
                .filter(|fin| fin.offset > self.next_offset)
                .map(|fin| fin.ts);
            let oldest = self.ahead.values().map(|held| held.ts).chain(fin_ts).min();
            assert_eq!(Some(since), oldest, "stale hole age");
        }
    }
}

/// The captured bytes that belong to a payload of `len` bytes (a hostile report may claim more).
fn clamp(prefix: &[u8], len: u64) -> &[u8] {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    &prefix[..prefix.len().min(len)]
}

#[cfg(test)]
mod tests {
    use proptest::{collection::vec, prelude::*, sample::Index};

    use super::*;

    /// A delivered piece, owned so a test can keep it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Got {
        Data { ts: u64, len: u64, bytes: Vec<u8> },
        Gap(u64),
        UnknownGap,
    }

    fn own(piece: Piece<'_>) -> Got {
        match piece {
            Piece::Data { ts, len, prefix } => Got::Data {
                ts,
                len,
                bytes: prefix.to_vec(),
            },
            Piece::Gap { bytes: Some(n) } => Got::Gap(n),
            Piece::Gap { bytes: None } => Got::UnknownGap,
        }
    }

    /// Fully captured data seen at `ts`.
    fn data(ts: u64, bytes: &[u8]) -> Got {
        Got::Data {
            ts,
            len: bytes.len() as u64,
            bytes: bytes.to_vec(),
        }
    }

    fn seg(seq: u32, payload: &[u8]) -> Segment<'_> {
        Segment {
            seq,
            len: payload.len() as u32,
            prefix: payload,
            ts: 0,
            syn: false,
            fin: false,
            rst: false,
        }
    }

    fn at(ts: u64, seg: Segment<'_>) -> Segment<'_> {
        Segment { ts, ..seg }
    }

    fn syn(seq: u32) -> Segment<'static> {
        Segment {
            syn: true,
            ..seg(seq, b"")
        }
    }

    /// A reassembler whose invariants are checked after every call.
    struct Harness {
        reassembler: Reassembler,
    }

    impl Harness {
        fn new() -> Self {
            Self::with(Limits::default())
        }

        fn with(limits: Limits) -> Self {
            Self {
                reassembler: Reassembler::new(limits),
            }
        }

        /// Makes one call and returns what it delivered.
        fn run(
            &mut self,
            call: impl FnOnce(&mut Reassembler, &mut dyn FnMut(Piece<'_>)),
        ) -> Vec<Got> {
            let mut got = Vec::new();
            call(&mut self.reassembler, &mut |piece| got.push(own(piece)));
            self.reassembler.check_invariants();
            got
        }

        fn push(&mut self, seg: Segment<'_>) -> Vec<Got> {
            self.run(|reassembler, out| reassembler.push(&seg, out))
        }

        fn expire(&mut self, now: u64) -> Vec<Got> {
            self.run(|reassembler, out| reassembler.expire(now, out))
        }

        fn finish(&mut self) -> Vec<Got> {
            self.run(|reassembler, out| reassembler.finish(out))
        }

        fn stats(&self) -> &ReassemblyStats {
            self.reassembler.stats()
        }
    }

    #[test]
    fn in_order_segments_pass_through_borrowed() {
        let mut reassembler = Reassembler::new(Limits::default());
        let payloads: [&[u8]; 3] = [b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"];
        let mut seq = 100;
        for payload in payloads {
            let mut pieces = 0;
            reassembler.push(&seg(seq, payload), &mut |piece| {
                pieces += 1;
                let Piece::Data { len, prefix, .. } = piece else {
                    panic!("unexpected {piece:?}");
                };
                assert_eq!(len, payload.len() as u64);
                // Same memory as the caller's: no copy on the in-order path.
                assert_eq!(prefix.as_ptr(), payload.as_ptr());
                assert_eq!(prefix, payload);
            });
            assert_eq!(pieces, 1);
            assert_eq!(reassembler.buffered_bytes(), 0);
            seq += payload.len() as u32;
        }
        assert_eq!(reassembler.stats().segments, 3);
        assert_eq!(reassembler.stats().out_of_order, 0);
    }

    #[test]
    fn syn_takes_one_sequence_number() {
        let mut h = Harness::new();
        assert_eq!(h.push(syn(1000)), []);
        assert_eq!(h.push(seg(1001, b"abc")), [data(0, b"abc")]);
        // A retransmitted SYN changes nothing.
        assert_eq!(h.push(syn(1000)), []);
        assert_eq!(h.push(seg(1004, b"d")), [data(0, b"d")]);

        // A SYN carrying payload (TCP Fast Open): the payload starts after the SYN.
        let mut h = Harness::new();
        let fast_open = Segment {
            syn: true,
            ..seg(7, b"hi")
        };
        assert_eq!(h.push(fast_open), [data(0, b"hi")]);
        assert_eq!(h.push(seg(10, b"!")), [data(0, b"!")]);
    }

    #[test]
    fn adopted_stream_starts_at_first_payload() {
        let mut h = Harness::new();
        // Pure ACKs and a bare FIN before any payload say nothing about where the stream is.
        assert_eq!(h.push(seg(500, b"")), []);
        assert_eq!(
            h.push(Segment {
                fin: true,
                ..seg(700, b"")
            }),
            []
        );
        assert_eq!(h.push(seg(1000, b"abc")), [data(0, b"abc")]);
        // Bytes before the adoption point were never part of this stream.
        assert_eq!(h.push(seg(990, b"0123456789")), []);
        assert_eq!(h.push(seg(1003, b"def")), [data(0, b"def")]);
        assert_eq!(h.stats().duplicates, 1);
    }

    #[test]
    fn duplicate_is_dropped_and_counted() {
        let mut h = Harness::new();
        h.push(syn(0));
        assert_eq!(h.push(seg(1, b"hello")), [data(0, b"hello")]);
        assert_eq!(h.push(seg(1, b"hello")), []);
        assert_eq!(h.push(seg(3, b"ll")), []);
        // A keepalive probe: one garbage byte just before the next expected one.
        assert_eq!(h.push(seg(5, b"\0")), []);
        assert_eq!(h.stats().duplicates, 3);
        assert_eq!(h.push(seg(6, b"!")), [data(0, b"!")]);
    }

    #[test]
    fn partial_overlap_delivers_only_new_bytes() {
        let mut h = Harness::new();
        h.push(syn(0));
        assert_eq!(h.push(seg(1, b"0123456789")), [data(0, b"0123456789")]);
        assert_eq!(h.push(seg(6, b"56789abcde")), [data(0, b"abcde")]);
        assert_eq!(h.stats().overlaps_trimmed, 1);

        // Only 3 bytes of a 20-byte retransmission were captured, and the first 5 are old:
        // the new 15 bytes are delivered with nothing known about them.
        let partial = Segment {
            len: 20,
            ..seg(11, b"abc")
        };
        assert_eq!(
            h.push(partial),
            [Got::Data {
                ts: 0,
                len: 15,
                bytes: vec![]
            }]
        );
        // With 8 captured, the 3 past the overlap are known.
        let partial = Segment {
            len: 10,
            ..seg(31, b"ABCDEFGH")
        };
        h.push(seg(31, b"ABCDE"));
        assert_eq!(
            h.push(partial),
            [Got::Data {
                ts: 0,
                len: 5,
                bytes: b"FGH".to_vec()
            }]
        );
    }

    #[test]
    fn out_of_order_segments_wait_for_the_hole() {
        let mut h = Harness::new();
        h.push(syn(0));
        assert_eq!(h.push(at(3, seg(7, b"ghi"))), []);
        assert_eq!(h.push(at(2, seg(4, b"def"))), []);
        assert_eq!(h.reassembler.buffered_bytes(), 6);
        assert_eq!(
            h.push(at(1, seg(1, b"abc"))),
            [data(1, b"abc"), data(2, b"def"), data(3, b"ghi")]
        );
        assert_eq!(h.reassembler.buffered_bytes(), 0);
        assert_eq!(h.stats().out_of_order, 2);

        // Overlapping buffered segments are trimmed on delivery.
        assert_eq!(h.push(seg(12, b"lmnop")), []);
        assert_eq!(h.push(seg(11, b"klm")), []);
        assert_eq!(
            h.push(seg(10, b"j")),
            [data(0, b"j"), data(0, b"klm"), data(0, b"nop")]
        );
        assert_eq!(h.stats().overlaps_trimmed, 1);
    }

    #[test]
    fn buffered_segment_covered_by_a_later_one_is_replaced() {
        let mut h = Harness::new();
        h.push(syn(0));
        h.push(seg(5, b"ef"));
        h.push(seg(8, b"h"));
        // Covers both buffered segments: they go, it stays.
        h.push(seg(4, b"defgh"));
        assert_eq!(h.reassembler.buffered_bytes(), 5);
        // Covered by what is buffered: a duplicate.
        h.push(seg(6, b"fgh"));
        assert_eq!(h.stats().duplicates, 3);
        assert_eq!(h.push(seg(1, b"abc")), [data(0, b"abc"), data(0, b"defgh")]);
    }

    #[test]
    fn sequence_numbers_wrap_around_u32_max() {
        let mut h = Harness::new();
        let isn = u32::MAX - 3;
        h.push(syn(isn));
        // Stream offset 0 is seq MAX-2, offset 3 is seq 0.
        assert_eq!(h.push(seg(isn.wrapping_add(6), b"fgh")), []);
        assert_eq!(h.push(seg(isn.wrapping_add(1), b"abc")), [data(0, b"abc")]);
        assert_eq!(
            h.push(seg(isn.wrapping_add(4), b"de")),
            [data(0, b"de"), data(0, b"fgh")]
        );
        assert_eq!(h.push(seg(u32::MAX, b"cdefg")), []);
        assert_eq!(h.push(seg(4, b"hij")), [data(0, b"ij")]);
        assert_eq!(h.stats().duplicates, 1);
        assert_eq!(h.stats().overlaps_trimmed, 1);
    }

    #[test]
    fn fin_ends_the_stream() {
        let mut h = Harness::new();
        h.push(syn(0));
        let last = Segment {
            fin: true,
            ..seg(1, b"bye")
        };
        assert_eq!(h.push(last), [data(0, b"bye")]);
        // Retransmission of the FIN segment, and anything after it.
        assert_eq!(h.push(last), []);
        assert_eq!(h.push(seg(5, b"more")), []);
        assert_eq!(h.stats().duplicates, 2);
        assert_eq!(h.finish(), []);

        // FIN ahead of a hole: the stream ends when the hole fills; bytes past it are cut.
        let mut h = Harness::new();
        h.push(syn(0));
        let fin = Segment {
            fin: true,
            ..seg(4, b"def")
        };
        assert_eq!(h.push(fin), []);
        assert_eq!(h.push(seg(6, b"fXYZ")), []);
        assert_eq!(h.push(seg(1, b"abcdefgh")), [data(0, b"abcdef")]);
        assert_eq!(h.reassembler.buffered_bytes(), 0);
        assert_eq!(h.push(seg(7, b"late")), []);
        assert_eq!(h.finish(), []);

        // A FIN inside buffered segments: the lowest one crossing it is cut, the other one
        // would lie inside it and goes.
        let mut h = Harness::new();
        h.push(syn(0));
        h.push(seg(4, b"defgh"));
        h.push(seg(6, b"fghij"));
        let bare_fin = Segment {
            fin: true,
            ..seg(8, b"")
        };
        assert_eq!(h.push(bare_fin), []);
        assert_eq!(h.reassembler.buffered_bytes(), 4);
        assert_eq!(h.stats().duplicates, 1);
        assert_eq!(h.push(seg(1, b"abc")), [data(0, b"abc"), data(0, b"defg")]);
        assert_eq!(h.finish(), []);
    }

    #[test]
    fn bytes_missing_before_a_fin_are_a_gap_on_finish() {
        let mut h = Harness::new();
        h.push(syn(0));
        h.push(seg(1, b"ab"));
        let bare_fin = Segment {
            fin: true,
            ..seg(11, b"")
        };
        assert_eq!(h.push(bare_fin), []);
        h.push(seg(5, b"ef"));
        assert_eq!(h.finish(), [Got::Gap(2), data(0, b"ef"), Got::Gap(4)]);
        assert_eq!(h.stats().gaps, 2);
        assert_eq!(h.stats().gap_bytes, 6);
        assert_eq!(h.push(seg(3, b"cd")), []);
    }

    #[test]
    fn rst_delivers_what_waits_and_ends_the_stream() {
        let mut h = Harness::new();
        h.push(syn(0));
        h.push(seg(1, b"ab"));
        h.push(seg(5, b"ef"));
        h.push(seg(9, b"ij"));
        let rst = Segment {
            rst: true,
            ..seg(3, b"cd")
        };
        assert_eq!(
            h.push(rst),
            [Got::Gap(2), data(0, b"ef"), Got::Gap(2), data(0, b"ij")]
        );
        assert_eq!(h.reassembler.buffered_bytes(), 0);
        assert_eq!(h.push(seg(11, b"kl")), []);
        assert_eq!(h.finish(), []);
        assert_eq!(h.stats().segments, 6);
    }

    #[test]
    fn full_buffer_gives_up_the_lowest_hole() {
        let mut h = Harness::with(Limits {
            max_segments: 2,
            ..Limits::default()
        });
        h.push(syn(0));
        h.push(seg(1, b"a"));
        assert_eq!(h.push(seg(3, b"c")), []);
        assert_eq!(h.push(seg(4, b"d")), []);
        // A third segment does not fit: the hole at offset 1 goes, [c, d] are delivered,
        // and the new segment waits behind the next hole.
        assert_eq!(
            h.push(seg(7, b"g")),
            [Got::Gap(1), data(0, b"c"), data(0, b"d")]
        );
        assert_eq!(h.reassembler.buffered_bytes(), 1);
        assert_eq!(h.stats().buffer_overflows, 1);
        assert_eq!(h.stats().gaps, 1);
        assert_eq!(h.stats().gap_bytes, 1);
        assert_eq!(h.push(seg(5, b"ef")), [data(0, b"ef"), data(0, b"g")]);

        // A new segment below everything buffered is delivered after its own hole.
        h.push(seg(10, b"j"));
        h.push(seg(12, b"l"));
        assert_eq!(
            h.push(seg(9, b"i")),
            [Got::Gap(1), data(0, b"i"), data(0, b"j")]
        );
        assert_eq!(h.finish(), [Got::Gap(1), data(0, b"l")]);
    }

    #[test]
    fn byte_limit_counts_captured_bytes() {
        let mut h = Harness::with(Limits {
            max_bytes: 4,
            ..Limits::default()
        });
        h.push(syn(0));
        h.push(seg(3, b"cde"));
        // 1000 bytes moved, 1 captured: fits.
        h.push(Segment {
            len: 1000,
            ..seg(7, b"g")
        });
        assert_eq!(h.reassembler.buffered_bytes(), 4);
        // Only as many holes are given up as it takes to make room.
        assert_eq!(h.push(seg(2000, b"xy")), [Got::Gap(2), data(0, b"cde")]);
        assert_eq!(h.reassembler.buffered_bytes(), 3);
        assert_eq!(h.stats().buffer_overflows, 1);

        // A segment larger than the whole buffer: every hole below it goes, then it is
        // delivered uncopied (covering, and so replacing, the buffered "xy").
        let big = [7u8; 10];
        assert_eq!(
            h.push(seg(1994, &big)),
            [
                Got::Gap(1),
                Got::Data {
                    ts: 0,
                    len: 1000,
                    bytes: b"g".to_vec()
                },
                Got::Gap(987),
                data(0, &big)
            ]
        );
        assert_eq!(h.reassembler.buffered_bytes(), 0);
        assert_eq!(h.stats().buffer_overflows, 3);
        assert_eq!(h.stats().gap_bytes, 2 + 1 + 987);
    }

    #[test]
    fn acknowledged_bytes_that_never_came_are_a_gap_at_once() {
        let mut r = Reassembler::new(Limits::default());
        let mut got = Vec::new();
        {
            let mut out = |p: Piece<'_>| got.push(format!("{p:?}"));
            r.push(&at(1, seg(100, b"aaaa")), &mut out);
            // 104..110 lost; the peer acknowledges up to 110: a gap, nothing to wait for.
            r.acknowledged(110, &mut out);
            r.push(&at(2, seg(110, b"bb")), &mut out);
            // A stale or duplicate acknowledgment changes nothing.
            r.acknowledged(105, &mut out);
        }
        assert_eq!(
            got,
            [
                "Data { ts: 1, len: 4, prefix: [97, 97, 97, 97] }",
                "Gap { bytes: Some(6) }",
                "Data { ts: 2, len: 2, prefix: [98, 98] }",
            ]
        );
        // Unstarted, an acknowledgment says where the stream starts: a first segment lost and
        // retransmitted after a later one still arrives in order.
        let mut r = Reassembler::new(Limits::default());
        let mut got = Vec::new();
        {
            let mut out = |p: Piece<'_>| got.push(format!("{p:?}"));
            r.acknowledged(100, &mut out);
            r.push(&at(2, seg(104, b"bb")), &mut out);
            r.push(&at(3, seg(100, b"aaaa")), &mut out);
        }
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("Data { ts: 3, len: 4"), "{got:?}");
        // Holes below the acknowledgment with data behind them go too.
        let mut r = Reassembler::new(Limits::default());
        let mut got = Vec::new();
        {
            let mut out = |p: Piece<'_>| got.push(format!("{p:?}"));
            r.push(&at(1, seg(100, b"aa")), &mut out);
            r.push(&at(3, seg(104, b"cc")), &mut out);
            r.acknowledged(106, &mut out);
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[1], "Gap { bytes: Some(2) }");
    }

    #[test]
    fn holes_before_a_time_are_given_up_on_request() {
        let mut r = Reassembler::new(Limits::default());
        let mut got = Vec::new();
        {
            let mut out = |p: Piece<'_>| got.push(format!("{p:?}"));
            r.push(&at(10, seg(100, b"aaaa")), &mut out);
            r.push(&at(20, seg(108, b"cccc")), &mut out);
            r.give_up_holes_before(15, &mut out);
        }
        assert_eq!(
            got.len(),
            1,
            "a hole with newer data behind it stays: {got:?}"
        );
        r.give_up_holes_before(20, &mut |p: Piece<'_>| got.push(format!("{p:?}")));
        assert_eq!(
            got[1..],
            [
                "Gap { bytes: Some(4) }".to_string(),
                "Data { ts: 20, len: 4, prefix: [99, 99, 99, 99] }".to_string()
            ]
        );
    }

    #[test]
    fn expire_gives_up_holes_older_than_the_timeout() {
        let timeout = 1_000;
        let mut h = Harness::with(Limits {
            hole_timeout_ns: timeout,
            ..Limits::default()
        });
        h.push(syn(0));
        h.push(at(100, seg(1, b"a")));
        h.push(at(200, seg(3, b"c")));
        h.push(at(150, seg(6, b"f")));
        assert_eq!(h.expire(1_150), []);
        // A clock that goes backwards makes nothing older.
        assert_eq!(h.expire(0), []);
        // Both holes have waited since 150 (the oldest segment behind them): both go.
        assert_eq!(
            h.expire(1_151),
            [Got::Gap(1), data(200, b"c"), Got::Gap(2), data(150, b"f")]
        );
        assert_eq!(h.stats().gaps, 2);

        // A hole that partly fills keeps its age; a new hole starts its own.
        h.push(at(2_000, seg(10, b"j")));
        h.push(at(2_500, seg(8, b"h")));
        assert_eq!(
            h.push(at(2_600, seg(7, b"g"))),
            [data(2_600, b"g"), data(2_500, b"h")]
        );
        assert_eq!(h.expire(3_001), [Got::Gap(1), data(2_000, b"j")]);

        // A FIN seen ahead of a hole ages like a segment.
        h.push(at(
            4_000,
            Segment {
                fin: true,
                ..seg(20, b"")
            },
        ));
        assert_eq!(h.expire(4_500), []);
        assert_eq!(h.expire(5_001), [Got::Gap(9)]);
        assert_eq!(h.push(seg(11, b"k")), []);
    }

    #[test]
    fn gso_super_segment_then_resegmented_retransmission() {
        // Egress: one 10,000-byte GSO segment of which 64 bytes were captured, later
        // retransmitted as MSS-sized segments, fully captured.
        let stream: Vec<u8> = (0..12_000u32).map(|i| (i % 251) as u8).collect();
        let mut h = Harness::new();
        h.push(syn(41));
        let super_segment = Segment {
            len: 10_000,
            ..seg(42, &stream[..64])
        };
        assert_eq!(
            h.push(super_segment),
            [Got::Data {
                ts: 0,
                len: 10_000,
                bytes: stream[..64].to_vec()
            }]
        );
        for chunk in (0..10_000).step_by(1448) {
            let end = (chunk + 1448).min(10_000);
            assert_eq!(h.push(seg(42 + chunk as u32, &stream[chunk..end])), []);
        }
        // A retransmission that runs past the super-segment yields only its new bytes.
        assert_eq!(
            h.push(seg(42 + 9_000, &stream[9_000..10_448])),
            [data(0, &stream[10_000..10_448])]
        );

        // Ingress, reordered: the GRO-merged segment is ahead of a hole, and the
        // retransmission that fills the hole is cut differently, running into it.
        let mut h = Harness::new();
        h.push(syn(u32::MAX));
        let merged = Segment {
            len: 8_000,
            ..seg(2_000, &stream[2_000..2_100])
        };
        assert_eq!(h.push(merged), []);
        assert_eq!(h.reassembler.buffered_bytes(), 100);
        assert_eq!(
            h.push(seg(0, &stream[..1_448])),
            [data(0, &stream[..1_448])]
        );
        assert_eq!(
            h.push(seg(1_448, &stream[1_448..2_050])),
            [
                data(0, &stream[1_448..2_050]),
                Got::Data {
                    ts: 0,
                    len: 7_950,
                    bytes: stream[2_050..2_100].to_vec()
                }
            ]
        );
        assert_eq!(h.stats().overlaps_trimmed, 1);
    }

    #[test]
    fn segment_too_far_ahead_is_garbage() {
        let mut h = Harness::new();
        h.push(syn(0));
        // Next expected is seq 1: 2^30 ahead of it is past any receive window.
        assert_eq!(h.push(seg(1 + (1 << 30), b"x")), []);
        assert_eq!(h.push(seg(u32::MAX / 2 + 5, b"x")), []);
        assert_eq!(h.reassembler.buffered_bytes(), 0);
        assert_eq!(h.stats().duplicates, 2);
        // Just inside the window: held, and a gap on finish.
        assert_eq!(h.push(seg(1 << 30, b"y")), []);
        assert_eq!(h.finish(), [Got::Gap((1 << 30) - 1), data(0, b"y")]);
    }

    #[test]
    fn hostile_lengths_are_clamped() {
        let mut h = Harness::new();
        // Captured bytes beyond the claimed length are not stream bytes.
        let lying = Segment {
            len: 2,
            ..seg(10, b"abcdef")
        };
        assert_eq!(h.push(lying), [data(0, b"ab")]);
        let lying_ahead = Segment {
            len: 1,
            ..seg(14, b"efgh")
        };
        assert_eq!(h.push(lying_ahead), []);
        assert_eq!(h.reassembler.buffered_bytes(), 1);
        // Zero-length segments never deliver anything.
        assert_eq!(
            h.push(Segment {
                len: 0,
                ..seg(12, b"cd")
            }),
            []
        );
        assert_eq!(h.push(seg(12, b"cd")), [data(0, b"cd"), data(0, b"e")]);
        // The largest length there is.
        let huge = Segment {
            len: u32::MAX,
            ..seg(15, b"f")
        };
        assert_eq!(
            h.push(huge),
            [Got::Data {
                ts: 0,
                len: u64::from(u32::MAX),
                bytes: b"f".to_vec()
            }]
        );
        // 2^32 - 1 bytes later the sequence numbers have come round to just before 15.
        assert_eq!(h.push(seg(14, b"g")), [data(0, b"g")]);
    }

    /// Byte ranges of a stream, in the order they arrive.
    struct Plan {
        arrivals: Vec<(usize, usize)>,
        /// Index in `arrivals` of each original segment's first arrival (dropped: `None`).
        original_count: usize,
    }

    /// Cuts `0..total` into segments (sizes from `cuts`, cyclic) and orders their arrivals:
    /// each original moves back by up to `jitter` places, `dups` repeat one later, and
    /// `retrans` send a range again, cut differently, after the last original it overlaps.
    /// `keep` drops originals (and their duplicates) that it maps to false.
    fn plan(
        total: usize,
        cuts: &[usize],
        jitter: &[usize],
        dups: &[(Index, usize)],
        retrans: &[(Index, Index, Vec<usize>, usize)],
        keep: &dyn Fn(usize) -> bool,
    ) -> Plan {
        let mut originals = Vec::new();
        let mut start = 0;
        while start < total {
            let end = (start + cuts[originals.len() % cuts.len()]).min(total);
            originals.push((start, end));
            start = end;
        }
        let key_of = |i: usize| i + jitter[i % jitter.len()];
        // (order key, tie-break, range)
        let mut events: Vec<(usize, usize, (usize, usize))> = Vec::new();
        let add = |key: usize, range: (usize, usize), events: &mut Vec<_>| {
            let tie = events.len();
            events.push((key, tie, range));
        };
        for (i, &range) in originals.iter().enumerate() {
            if keep(i) {
                add(key_of(i), range, &mut events);
            }
        }
        if !originals.is_empty() {
            for (which, delay) in dups {
                let i = which.index(originals.len());
                if keep(i) {
                    add(key_of(i) + delay, originals[i], &mut events);
                }
            }
            for (from, to, pieces, delay) in retrans {
                let (a, b) = (from.index(total), to.index(total));
                let (low, high) = (a.min(b), a.max(b) + 1);
                let last = originals.partition_point(|&(_, end)| end < high);
                let key = key_of(last) + delay;
                let mut start = low;
                let mut k = 0;
                while start < high {
                    let end = (start + pieces[k % pieces.len()]).min(high);
                    add(key, (start, end), &mut events);
                    start = end;
                    k += 1;
                }
            }
        }
        events.sort_unstable();
        Plan {
            arrivals: events.into_iter().map(|(_, _, range)| range).collect(),
            original_count: originals.len(),
        }
    }

    fn isn_strategy() -> impl Strategy<Value = u32> {
        prop_oneof![any::<u32>(), (u32::MAX - 40_000)..=u32::MAX]
    }

    const WINDOW: usize = 8;

    proptest! {
        /// Reordered (within a window), duplicated and re-segmented retransmitted segments
        /// rebuild the stream exactly: every byte once, in order, no gap.
        #[test]
        fn scrambled_delivery_rebuilds_the_stream_exactly(
            isn in isn_strategy(),
            stream in vec(any::<u8>(), 0..20_000),
            cuts in vec(1usize..3000, 1..32),
            jitter in vec(0usize..WINDOW, 1..32),
            dups in vec((any::<Index>(), 0usize..WINDOW), 0..16),
            retrans in vec((any::<Index>(), any::<Index>(), vec(1usize..3000, 1..8), 0usize..WINDOW), 0..8),
            fin in any::<bool>(),
        ) {
            let plan = plan(stream.len(), &cuts, &jitter, &dups, &retrans, &|_| true);
            // Room for anything this plan can buffer: this property is about order, not limits.
            let mut h = Harness::with(Limits {
                max_segments: usize::MAX,
                max_bytes: usize::MAX,
                ..Limits::default()
            });
            let mut got = h.push(syn(isn));
            let data_seq = |offset: usize| isn.wrapping_add(1).wrapping_add(offset as u32);
            for (ts, &(start, end)) in plan.arrivals.iter().enumerate() {
                got.extend(h.push(Segment {
                    ts: ts as u64,
                    fin: fin && end == stream.len(),
                    ..seg(data_seq(start), &stream[start..end])
                }));
            }
            if fin && stream.is_empty() {
                got.extend(h.push(Segment { fin: true, ..seg(data_seq(0), b"") }));
            }
            prop_assert_eq!(h.reassembler.buffered_bytes(), 0);
            got.extend(h.finish());

            let mut rebuilt = Vec::new();
            let mut moved = 0;
            for piece in &got {
                match piece {
                    Got::Data { len, bytes, .. } => {
                        prop_assert_eq!(*len, bytes.len() as u64);
                        rebuilt.extend_from_slice(bytes);
                        moved += len;
                    }
                    gap => prop_assert!(false, "unexpected {:?}", gap),
                }
            }
            prop_assert_eq!(moved, stream.len() as u64);
            prop_assert!(rebuilt == stream, "stream differs");
            prop_assert_eq!(h.stats().gaps, 0);
            prop_assert_eq!(h.stats().buffer_overflows, 0);
            prop_assert_eq!(plan.original_count == 0, stream.is_empty());
        }

        /// Segments lost for good (optionally with tight limits and expiry): every delivered
        /// byte is at its offset, and data plus gaps account for the stream up to the furthest
        /// segment seen. With room to wait, exactly the bytes that never arrived are gaps.
        #[test]
        fn lost_segments_become_gaps_of_the_right_size(
            isn in isn_strategy(),
            stream in vec(any::<u8>(), 1..20_000),
            cuts in vec(1usize..3000, 1..32),
            jitter in vec(0usize..WINDOW, 1..32),
            dups in vec((any::<Index>(), 0usize..WINDOW), 0..16),
            lost in vec(prop::bool::weighted(0.2), 1..32),
            with_syn in any::<bool>(),
            tight in prop::option::of((0usize..16, 0usize..40_000, 1usize..20)),
        ) {
            let keep = |i: usize| !lost[i % lost.len()];
            let plan = plan(stream.len(), &cuts, &jitter, &dups, &[], &keep);
            let (max_segments, max_bytes, expire_every) = tight.unwrap_or((usize::MAX, usize::MAX, usize::MAX));
            let mut h = Harness::with(Limits { max_segments, max_bytes, hole_timeout_ns: 5 });
            let mut got = Vec::new();
            if with_syn {
                got.extend(h.push(syn(isn)));
            }
            let data_seq = |offset: usize| isn.wrapping_add(1).wrapping_add(offset as u32);
            for (ts, &(start, end)) in plan.arrivals.iter().enumerate() {
                got.extend(h.push(Segment { ts: ts as u64, ..seg(data_seq(start), &stream[start..end]) }));
                if ts % expire_every == 0 {
                    got.extend(h.expire(ts as u64));
                }
            }
            got.extend(h.finish());

            // Without a SYN the stream starts at the first segment that arrived.
            let origin = if with_syn { 0 } else { plan.arrivals.first().map_or(0, |&(start, _)| start) };
            let furthest = plan.arrivals.iter().map(|&(_, end)| end).max().unwrap_or(origin);
            let mut arrived = vec![false; stream.len()];
            for &(start, end) in &plan.arrivals {
                arrived[start..end].fill(true);
            }
            let never_arrived = arrived[origin..furthest].iter().filter(|&&seen| !seen).count() as u64;

            let mut offset = origin as u64;
            let mut gap_bytes = 0;
            for piece in &got {
                match piece {
                    Got::Data { len, bytes, .. } => {
                        prop_assert!(*len > 0);
                        prop_assert_eq!(*len, bytes.len() as u64, "fully captured stays fully captured");
                        let at = offset as usize;
                        prop_assert!(bytes[..] == stream[at..at + bytes.len()], "bytes at {} differ", at);
                        offset += len;
                    }
                    Got::Gap(n) => {
                        prop_assert!(*n > 0);
                        offset += n;
                        gap_bytes += n;
                    }
                    Got::UnknownGap => prop_assert!(false, "a TCP gap always has a size"),
                }
            }
            prop_assert_eq!(offset, furthest as u64);
            prop_assert_eq!(h.stats().gap_bytes, gap_bytes);
            prop_assert!(gap_bytes >= never_arrived);
            if tight.is_none() {
                prop_assert_eq!(gap_bytes, never_arrived);
            }
        }

        /// Arbitrary segments, expiries and closes never panic, keep the invariants and the
        /// limits, and only ever deliver well-formed pieces.
        #[test]
        fn garbage_never_panics(
            base in any::<u32>(),
            ops in vec(
                prop_oneof![
                    8 => (
                        any::<bool>(),
                        any::<u32>(),
                        prop_oneof![0u32..3000, any::<u32>()],
                        vec(any::<u8>(), 0..64),
                        any::<u64>(),
                        any::<(bool, bool)>(),
                        prop::bool::weighted(0.02),
                    ).prop_map(Some),
                    1 => Just(None),
                ],
                0..200,
            ),
            max_segments in 0usize..8,
            max_bytes in 0usize..512,
            timeout in 0u64..100,
            expire_at in any::<u64>(),
        ) {
            let mut h = Harness::with(Limits { max_segments, max_bytes, hole_timeout_ns: timeout });
            let mut got = Vec::new();
            for op in ops {
                match op {
                    Some((near, seq, len, prefix, ts, (syn, fin), rst)) => {
                        // Near one base, so that segments overlap and fill each other's holes.
                        let seq = if near { base.wrapping_add(seq % 5000) } else { seq };
                        got.extend(h.push(Segment { seq, len, prefix: &prefix, ts, syn, fin, rst }));
                        got.extend(h.expire(ts.wrapping_add(expire_at % 200)));
                    }
                    None => got.extend(h.expire(expire_at)),
                }
            }
            got.extend(h.finish());
            prop_assert_eq!(h.reassembler.buffered_bytes(), 0);
            for piece in got {
                match piece {
                    Got::Data { len, bytes, .. } => prop_assert!(len > 0 && bytes.len() as u64 <= len),
                    Got::Gap(n) => prop_assert!(n > 0),
                    Got::UnknownGap => prop_assert!(false, "a TCP gap always has a size"),
                }
            }
        }
    }
}
