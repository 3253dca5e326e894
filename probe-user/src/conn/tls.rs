//! Tying TLS sessions to connections.
//!
//! A plaintext record names its TLS session (the process and its `SSL *`) and, when the
//! library did socket I/O during the call, the connection (fd or socket cookie). A session's
//! connection is remembered from those records; plaintext that arrives before its session is
//! tied (a read on the cgroup path, where received segments are not seen in the reader's
//! context, before the session's first write) waits here, bounded, and goes to the connection
//! in order once it is known.

use std::collections::{HashMap, VecDeque};

use super::{ConnKey, Direction};

/// Whether bytes start a TLS record (handshake, alert, change cipher spec, application data)
/// of a TLS 1.0-1.3 (or SSL 3) stream: content type 20-23, version 3.0-3.4.
pub fn starts_tls_record(prefix: &[u8]) -> bool {
    // A piece of one or two bytes (a peek, a cut read) that could start one counts too.
    matches!(prefix, [20..=23] | [20..=23, 3] | [20..=23, 3, 0..=4, ..])
}

/// Plaintext pieces held per session, and sessions with pieces held.
const HELD_PER_SESSION: usize = 64;
const HELD_SESSIONS: usize = 4096;
/// Sessions remembered; beyond it, those of connections no longer tracked are forgotten.
const MAX_SESSIONS: usize = 65_536;

/// A TLS session: (tgid, `SSL *`).
pub type Session = (u32, u64);

/// A plaintext piece waiting for its session's connection.
#[derive(Debug)]
pub struct HeldPiece {
    pub ts: u64,
    pub dir: Direction,
    pub len: u64,
    pub prefix: Vec<u8>,
}

/// Counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlsStats {
    /// Plaintext records (reads and writes).
    pub records: u64,
    /// Plaintext pieces that waited for their session's connection.
    pub held: u64,
    /// Plaintext pieces dropped because their session was never tied to a connection (a
    /// library that does its socket I/O elsewhere, as Node's memory BIOs) or the wait was full.
    pub dropped_unbound: u64,
}

/// Session -> connection, and the pieces waiting for one.
#[derive(Debug, Default)]
pub struct Sessions {
    bound: HashMap<Session, ConnKey>,
    held: HashMap<Session, VecDeque<HeldPiece>>,
    pub stats: TlsStats,
}

impl Sessions {
    /// Records that `session` did socket I/O on `key`. Returns the pieces that waited for it,
    /// oldest first.
    pub fn bind(&mut self, session: Session, key: ConnKey) -> VecDeque<HeldPiece> {
        self.bound.insert(session, key);
        self.held.remove(&session).unwrap_or_default()
    }

    /// The connection of `session`, if known.
    pub fn conn(&self, session: Session) -> Option<ConnKey> {
        self.bound.get(&session).copied()
    }

    /// Keeps a piece until `session` is tied to a connection (bounded; counted when dropped).
    pub fn hold(&mut self, session: Session, piece: HeldPiece) {
        if !self.held.contains_key(&session) && self.held.len() >= HELD_SESSIONS {
            self.stats.dropped_unbound += 1;
            return;
        }
        let q = self.held.entry(session).or_default();
        if q.len() >= HELD_PER_SESSION {
            q.pop_front();
            self.stats.dropped_unbound += 1;
        }
        q.push_back(piece);
        self.stats.held += 1;
    }

    /// A process exited: its sessions go, and what they held is lost (counted).
    pub fn forget_process(&mut self, tgid: u32) {
        self.bound.retain(|(t, _), _| *t != tgid);
        let before: usize = self.held.values().map(VecDeque::len).sum();
        self.held.retain(|(t, _), _| *t != tgid);
        let after: usize = self.held.values().map(VecDeque::len).sum();
        self.stats.dropped_unbound += (before - after) as u64;
    }

    /// Bounds memory: beyond `MAX_SESSIONS`, sessions whose connection is no longer tracked
    /// are forgotten (an `SSL *` reused later is tied again by its handshake).
    pub fn prune(&mut self, tracked: impl Fn(ConnKey) -> bool) {
        if self.bound.len() > MAX_SESSIONS {
            self.bound.retain(|_, key| tracked(*key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(n: u64) -> HeldPiece {
        HeldPiece {
            ts: n,
            dir: Direction::Ingress,
            len: 1,
            prefix: vec![n as u8],
        }
    }

    #[test]
    fn held_pieces_come_back_in_order_when_bound() {
        let mut s = Sessions::default();
        let session = (7, 0xdead);
        assert_eq!(s.conn(session), None);
        s.hold(session, piece(1));
        s.hold(session, piece(2));
        let held = s.bind(session, ConnKey::Socket(42));
        assert_eq!(held.iter().map(|p| p.ts).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(s.conn(session), Some(ConnKey::Socket(42)));
        assert!(s.bind(session, ConnKey::Socket(42)).is_empty());
        assert_eq!(s.stats.held, 2);
    }

    #[test]
    fn holding_is_bounded_and_counted() {
        let mut s = Sessions::default();
        for i in 0..(HELD_PER_SESSION as u64 + 3) {
            s.hold((1, 1), piece(i));
        }
        assert_eq!(s.stats.dropped_unbound, 3);
        let held = s.bind((1, 1), ConnKey::Fd { tgid: 1, fd: 3 });
        assert_eq!(held.len(), HELD_PER_SESSION);
        assert_eq!(held.front().map(|p| p.ts), Some(3));
        s.hold((2, 1), piece(0));
        s.forget_process(2);
        assert_eq!(s.stats.dropped_unbound, 4);
    }
}
