//! Replaying Postgres sessions: each captured connection's frontend stream (the request side)
//! framed into units of replay and sent again, in order, on a connection of the replay's own.
//!
//! A unit is what one ReadyForQuery answers: a simple Query (`Q`), or an extended-protocol group
//! (Parse, Bind, Describe, Execute, Close, Flush ...) up to its Sync (`S`). Its latency runs from
//! the unit's first byte written to the ReadyForQuery read; its answer is hashed (CommandComplete
//! tags, rows as an order-insensitive multiset unless the statement has a top-level `ORDER BY`,
//! SQLSTATEs of errors without their message text, which can carry variable details) so that A
//! and B can be compared with the HTTP replay's [`Outcome`], per normalized query.
//!
//! The replay authenticates itself (trust, cleartext, MD5, SCRAM-SHA-256 with
//! `PgOptions::password`): captured password and SASL messages are masked and never sent. It
//! connects in plain text (`sslmode=disable`): TLS to the target is not supported. Startup
//! parameters are the captured ones (or, for a session recorded mid-way, the Open record's
//! `pg.user`, `pg.database`, `pg.param.<name>` attributes), `user` and `database` overridable;
//! statements a mid-way session prepared before the capture (`pg.statement.<name>`) are parsed
//! first. Safety valves: statements that may change data are skipped unless writes are allowed,
//! and the sessions then run with `default_transaction_read_only` on, so a write the classifier
//! missed fails instead of changing the target; every connection has `lock_timeout` and
//! `statement_timeout` set as startup parameters (a session's `RESET` returns to them); only
//! the target addresses are contacted. Replayed against several targets (A, B, A2) at once,
//! each unit goes to each target in turn before the next unit, so that a moment of background
//! load on the replaying host weighs on all of them, not on whichever was replayed then.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use bakeoff_capture::Record;
use bakeoff_protocol::sql;

use crate::{
    http::{Outcome, ReplayOptions, Replayed, Schedule, Timing, in_parallel},
    session::{Stream, request_streams},
};

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Largest startup message (the server refuses more than 10000 bytes).
const MAX_STARTUP: usize = 10_000;
/// Largest message framed or read (the server's own limit, 1 GiB).
const MAX_MESSAGE: usize = 1 << 30;
/// Messages that must frame one after the other before a session recorded mid-way is framed
/// from a piece's start (unless the stream ends exactly after fewer).
const CHAIN_PROOF: usize = 4;
/// SQLSTATEs of the replay's own safety valves: the unit is an error (a timeout), not an answer.
const TIMEOUT_STATES: [&str; 2] = ["57014", "55P03"];
/// Bytes of a unit's answer kept as its excerpt.
const EXCERPT_BYTES: usize = 200;

/// One unit of replay: what the client sent up to one ReadyForQuery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// The messages as recorded (COPY data that followed a `COPY ... FROM STDIN` included;
    /// password messages left out).
    pub bytes: Vec<u8>,
    /// When the recorded server read its first byte (Unix ns).
    pub ts_unix_ns: u64,
    /// The endpoint: the normalized statement (`; `-joined when several), `PREPARE <sql>` for
    /// a group that only prepares, `SYNC` for one with no statement.
    pub path: String,
    /// It may change data (a statement that is not known to be read-only counts).
    pub write: bool,
    /// Per result it should produce (statement of a Query, Execute), whether its rows are in
    /// a defined order.
    pub ordered: Vec<bool>,
    /// It carries COPY data (`d`, `c`, `f`).
    pub copy_data: bool,
    /// A statement it uses whose SQL the capture does not have (prepared before the capture
    /// and not in its attributes): not replayable.
    pub unknown_statement: Option<String>,
}

/// One captured connection, framed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgSession {
    pub conn: u64,
    /// Startup parameters (`user`, `database`, `application_name` ...) as captured, or from the
    /// Open record's attributes.
    pub params: Vec<(String, String)>,
    /// Named statements prepared before the capture (name, SQL), parsed before the first unit.
    pub prepared: Vec<(String, String)>,
    /// Session `SET`s run before the capture (`pg.set.NN`, in order), run again first.
    pub sets: Vec<String>,
    /// Recorded from the middle of the connection (no startup message).
    pub midstream: bool,
    pub units: Vec<Unit>,
    /// Recorded bytes no unit was framed from (after a loss, a cut message, an unknown tag).
    pub unframed_bytes: u64,
    /// The capture recorded losses on this connection's request side.
    pub lossy: bool,
}

/// Options of a Postgres replay.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Target, concurrency, writes, timeout (per unit, also the `statement_timeout`), timing.
    pub replay: ReplayOptions,
    /// Override the captured `user` / `database`.
    pub user: Option<String>,
    pub database: Option<String>,
    /// For cleartext, MD5 and SCRAM-SHA-256 authentication.
    pub password: Option<String>,
    pub lock_timeout: Duration,
}

/// A session that could not be replayed at all (connect, startup, authentication).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SessionError {
    pub session: u64,
    pub error: String,
}

/// A Postgres replay's results: the HTTP replay's, and the sessions that could not start.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PgReplayed {
    pub replayed: Replayed,
    /// Their units are error outcomes too, so they count per query.
    pub session_errors: Vec<SessionError>,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let x = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let x = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([x[0], x[1]]))
}

/// The NUL-terminated string at the start of `b`, and what follows it.
fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

/// Whether a connection's first request-side bytes are Postgres (a startup-phase message, or a
/// Query/Parse/Bind for a connection recorded mid-way).
pub fn is_postgres(first: &[u8]) -> bool {
    use bakeoff_protocol::detect::{Detected, detect, detect_midstream_request};
    detect(first) == Some(Detected::Postgres)
        || detect_midstream_request(first) == Some(Detected::Postgres)
}

/// Whether most connections of a capture that carry request bytes speak Postgres.
pub fn capture_is_postgres(records: &[Record]) -> bool {
    let streams = request_streams(records.iter().cloned());
    let with_bytes: Vec<&Stream> = streams.values().filter(|s| !s.bytes.is_empty()).collect();
    let pg = with_bytes.iter().filter(|s| is_postgres(&s.bytes)).count();
    pg > 0 && 2 * pg >= with_bytes.len()
}

/// The Postgres sessions of a capture's records, in connection order; connections that sent
/// no unit and no unframed byte (a CancelRequest, a connection only opened) are left out.
pub fn sessions(records: impl IntoIterator<Item = Record>) -> Vec<PgSession> {
    request_streams(records)
        .into_iter()
        .map(|(conn, s)| frame(conn, &s))
        .filter(|s| !s.units.is_empty() || s.unframed_bytes > 0)
        .collect()
}

/// The startup phase at the start of a stream.
enum Startup {
    /// The StartupMessage's parameters, and where the tagged messages start.
    Found(Vec<(String, String)>, usize),
    /// A CancelRequest: nothing to replay.
    Cancel,
    /// A startup phase cut by the end of what was recorded.
    Cut,
    /// Not a startup phase (a connection recorded mid-way).
    None,
}

fn startup(b: &[u8]) -> Startup {
    let mut at = 0;
    loop {
        let (Some(len), Some(code)) = (be32(b, at), be32(b, at + 4)) else {
            return if at > 0 { Startup::Cut } else { Startup::None };
        };
        let len = len as usize;
        match code {
            SSL_REQUEST | GSSENC_REQUEST if len == 8 => at += 8,
            CANCEL_REQUEST if len == 16 => return Startup::Cancel,
            c if c >> 16 == 3 && (9..=MAX_STARTUP).contains(&len) => {
                let Some(body) = b.get(at + 8..at + len) else {
                    return Startup::Cut;
                };
                let mut params = Vec::new();
                let mut rest = body;
                while let Some((k, after)) = cstr(rest) {
                    if k.is_empty() {
                        break;
                    }
                    let Some((v, after)) = cstr(after) else { break };
                    params.push((k.to_string(), v.to_string()));
                    rest = after;
                }
                return Startup::Found(params, at + len);
            }
            _ if at > 0 => return Startup::Cut,
            _ => return Startup::None,
        }
    }
}

/// A frontend message at `at`: its tag and total length (tag included), when it is complete
/// and plausible.
fn message(b: &[u8], at: usize) -> Option<(u8, usize)> {
    let tag = *b.get(at)?;
    let len = be32(b, at + 1)? as usize;
    let plausible = match tag {
        b'S' | b'H' | b'X' | b'c' => len == 4,
        b'Q' | b'P' | b'B' | b'E' | b'C' | b'D' | b'F' | b'd' | b'f' | b'p' => {
            (5..=MAX_MESSAGE).contains(&len)
        }
        _ => false,
    };
    (plausible && at + 1 + len <= b.len()).then_some((tag, 1 + len))
}

/// Where framing a stream recorded mid-way starts: the first piece's start from which
/// [`CHAIN_PROOF`] messages frame (or all the rest does).
fn resync(b: &[u8], s: &Stream) -> Option<usize> {
    s.times.iter().map(|(off, _)| *off).find(|&start| {
        let (mut at, mut n) = (start, 0);
        while n < CHAIN_PROOF {
            match message(b, at) {
                Some((_, len)) => {
                    at += len;
                    n += 1;
                }
                None => break,
            }
        }
        start < b.len() && (n >= CHAIN_PROOF || at == b.len())
    })
}

/// Per session while framing: what its names stand for.
#[derive(Default)]
struct Names {
    /// Prepared statement name ("" unnamed) to SQL.
    statements: HashMap<String, String>,
    /// Portal name to its statement's SQL (`None`: a statement the capture does not have).
    portals: HashMap<String, Result<String, String>>,
    /// SQL-level `PREPARE name AS ...`: whether the statement writes.
    sql_prepared: HashMap<String, bool>,
}

/// A unit being framed.
#[derive(Default)]
struct Building {
    /// Offset of its first message in the stream.
    start: usize,
    bytes: Vec<u8>,
    /// Keys of the statements it executes, and of those it only prepares.
    executes: Vec<String>,
    prepares: Vec<String>,
    write: bool,
    ordered: Vec<bool>,
    copy_data: bool,
    unknown: Option<String>,
}

impl Building {
    fn unit(self, ts_unix_ns: u64) -> Unit {
        let join = |keys: &[String]| {
            let mut seen: Vec<&str> = Vec::new();
            for k in keys {
                if !seen.contains(&k.as_str()) {
                    seen.push(k);
                }
            }
            seen.join("; ")
        };
        let path = if !self.executes.is_empty() {
            join(&self.executes)
        } else if !self.prepares.is_empty() {
            format!("PREPARE {}", join(&self.prepares))
        } else {
            "SYNC".to_string()
        };
        Unit {
            bytes: self.bytes,
            ts_unix_ns,
            path,
            write: self.write,
            ordered: self.ordered,
            copy_data: self.copy_data,
            unknown_statement: self.unknown,
        }
    }

    /// One statement of a simple Query (SQL-level PREPARE/EXECUTE followed).
    fn statement(&mut self, stmt: &str, names: &mut Names) {
        let words = words(stmt);
        let first = words.first().map(|w| w.text.to_ascii_uppercase());
        let write = match first.as_deref() {
            Some("EXECUTE") => words
                .get(1)
                .and_then(|w| names.sql_prepared.get(&w.text.to_ascii_lowercase()))
                .copied()
                .unwrap_or(true),
            _ => is_write(stmt),
        };
        if first.as_deref() == Some("PREPARE")
            && let Some(name) = words.get(1)
        {
            names
                .sql_prepared
                .insert(name.text.to_ascii_lowercase(), write);
        }
        self.write |= write;
        self.ordered.push(ordered(stmt));
        self.executes.push(query_key(stmt));
    }

    /// One frontend message of the unit.
    fn push(&mut self, tag: u8, msg: &[u8], names: &mut Names) {
        self.bytes.extend_from_slice(msg);
        let body = &msg[5..];
        match tag {
            b'Q' => {
                let sql = match cstr(body) {
                    Some((sql, _)) => sql.to_string(),
                    None => String::from_utf8_lossy(body).into_owned(),
                };
                for stmt in sql::split_statements(&sql) {
                    self.statement(stmt, names);
                }
            }
            b'P' => {
                let Some((name, rest)) = cstr(body) else {
                    self.write = true;
                    return;
                };
                let sql = cstr(rest).map_or("", |s| s.0);
                self.write |= sql::split_statements(sql).iter().any(|s| is_write(s));
                self.prepares.push(query_key(sql));
                names.statements.insert(name.to_string(), sql.to_string());
            }
            b'B' => {
                let Some((portal, rest)) = cstr(body) else {
                    self.write = true;
                    return;
                };
                let name = cstr(rest).map_or("", |s| s.0);
                let sql = names
                    .statements
                    .get(name)
                    .cloned()
                    .ok_or_else(|| name.to_string());
                match &sql {
                    Ok(sql) => {
                        self.write |= sql::split_statements(sql).iter().any(|s| is_write(s));
                    }
                    Err(name) => {
                        self.unknown.get_or_insert_with(|| name.clone());
                    }
                }
                names.portals.insert(portal.to_string(), sql);
            }
            b'E' => {
                let portal = cstr(body).map_or("", |s| s.0);
                match names.portals.get(portal) {
                    Some(Ok(sql)) => {
                        self.ordered.push(ordered(sql));
                        self.executes.push(query_key(sql));
                    }
                    Some(Err(name)) => {
                        self.ordered.push(false);
                        self.executes.push(format!(
                            "EXECUTE {name} {}",
                            bakeoff_protocol::postgres::UNKNOWN_STATEMENT
                        ));
                    }
                    None => {
                        // A portal bound before the capture: unknown too.
                        self.unknown
                            .get_or_insert_with(|| format!("portal {portal}"));
                        self.ordered.push(false);
                        self.executes.push(format!(
                            "EXECUTE {portal} {}",
                            bakeoff_protocol::postgres::UNKNOWN_STATEMENT
                        ));
                    }
                }
            }
            b'C' => {
                if let Some((name, _)) = body.get(1..).and_then(cstr) {
                    match body[0] {
                        b'S' => {
                            names.statements.remove(name);
                        }
                        b'P' => {
                            names.portals.remove(name);
                        }
                        _ => {}
                    }
                }
            }
            // A function call: what it does is unknown.
            b'F' => {
                self.write = true;
                self.ordered.push(false);
                self.executes.push("FUNCTION CALL".into());
            }
            _ => {}
        }
    }
}

/// Frames one connection's request side.
fn frame(conn: u64, s: &Stream) -> PgSession {
    let info = s.info.clone().unwrap_or_default();
    let end = s.lost_at.unwrap_or(s.bytes.len());
    let b = &s.bytes[..end];
    let mut session = PgSession {
        conn,
        midstream: info.midstream,
        lossy: s.lost_at.is_some(),
        ..PgSession::default()
    };
    let mut names = Names::default();
    for (k, v) in &info.attributes {
        if let Some(name) = k.strip_prefix("pg.statement.") {
            names.statements.insert(name.to_string(), v.clone());
            session.prepared.push((name.to_string(), v.clone()));
        } else if k.starts_with("pg.set.") {
            // The attributes are sorted by key: `NN` keeps the order they ran in.
            session.sets.push(v.clone());
        }
    }
    // Bytes before the first framed message of a stream recorded mid-way.
    let mut skipped = 0;
    let mut at = match startup(b) {
        Startup::Found(params, at) => {
            session.params = params;
            at
        }
        Startup::Cancel => return session,
        Startup::Cut => {
            session.unframed_bytes = s.bytes.len() as u64;
            return session;
        }
        Startup::None => {
            session.midstream = true;
            for (k, v) in &info.attributes {
                let key = match k.as_str() {
                    "pg.user" => "user",
                    "pg.database" => "database",
                    k => match k.strip_prefix("pg.param.") {
                        Some(p) => p,
                        None => continue,
                    },
                };
                session.params.push((key.to_string(), v.clone()));
            }
            match resync(b, s) {
                Some(at) => {
                    skipped = at;
                    at
                }
                None => {
                    session.unframed_bytes = s.bytes.len() as u64;
                    return session;
                }
            }
        }
    };
    let mut pending: Option<Building> = None;
    while let Some((tag, len)) = message(b, at) {
        let msg = &b[at..at + len];
        match tag {
            // Password and SASL messages: the replay authenticates itself.
            b'p' => {}
            b'X' => {
                at += len;
                break;
            }
            b'd' | b'c' | b'f' => match (&mut pending, session.units.last_mut()) {
                (Some(p), _) => {
                    p.copy_data = true;
                    p.bytes.extend_from_slice(msg);
                }
                (None, Some(last)) => {
                    last.copy_data = true;
                    last.bytes.extend_from_slice(msg);
                }
                (None, None) => {}
            },
            _ => {
                let p = pending.get_or_insert_with(|| Building {
                    start: at,
                    ..Building::default()
                });
                p.push(tag, msg, &mut names);
                if matches!(tag, b'Q' | b'S' | b'F')
                    && let Some(p) = pending.take()
                {
                    let ts = s.ts_at(p.start);
                    session.units.push(p.unit(ts));
                }
            }
        }
        at += len;
    }
    // A group the capture ends before its Sync: nothing would answer it.
    if let Some(p) = pending {
        at = p.start;
    }
    session.unframed_bytes = (skipped + s.bytes.len() - at) as u64;
    session
}

/// A word of SQL outside strings, quoted identifiers and comments, with its parenthesis depth
/// and byte offset.
#[derive(Clone, Copy, Debug)]
struct Word<'a> {
    text: &'a str,
    depth: i32,
    start: usize,
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The unquoted words of a statement: enough to classify it and find its top-level
/// `ORDER BY` (total on any text: an unterminated string or comment runs to the end).
fn words(sql: &str) -> Vec<Word<'_>> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut depth) = (0usize, 0i32);
    let skip_quoted = |mut i: usize, quote: u8, backslash: bool| {
        i += 1;
        while i < b.len() {
            if backslash && b[i] == b'\\' {
                i += 2;
            } else if b[i] == quote {
                if b.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return i + 1;
                }
            } else {
                i += 1;
            }
        }
        b.len()
    };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied().unwrap_or(0);
        if c == b'-' && next == b'-' {
            i = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p + 1);
        } else if c == b'/' && next == b'*' {
            let mut level = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    level += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    level -= 1;
                    i += 2;
                    if level == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'\'' {
            // E'...' takes backslash escapes.
            let escape =
                i > 0 && matches!(b[i - 1], b'E' | b'e') && (i < 2 || !ident_char(b[i - 2]));
            i = skip_quoted(i, b'\'', escape);
        } else if c == b'"' {
            i = skip_quoted(i, b'"', false);
        } else if c == b'$' && next.is_ascii_digit() {
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        } else if c == b'$' {
            // $tag$ ... $tag$ (the tag may be empty).
            let tag_end = b[i + 1..]
                .iter()
                .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))
                .map(|p| i + 1 + p);
            match tag_end {
                Some(e) if b[e] == b'$' => {
                    let tag = &b[i..=e];
                    i = b[e + 1..]
                        .windows(tag.len())
                        .position(|w| w == tag)
                        .map_or(b.len(), |p| e + 1 + p + tag.len());
                }
                _ => i += 1,
            }
        } else if ident_start(c) {
            let start = i;
            while i < b.len() && ident_char(b[i]) {
                i += 1;
            }
            out.push(Word {
                text: sql.get(start..i).unwrap_or_default(),
                depth,
                start,
            });
        } else {
            match c {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
            i += 1;
        }
    }
    out
}

fn is_word(w: Option<&Word<'_>>, name: &str) -> bool {
    w.is_some_and(|w| w.text.eq_ignore_ascii_case(name))
}

/// Whether one statement may change data (or state outside the session): anything not known
/// to be read-only. Read-only: `SELECT`/`VALUES`/`TABLE`/`WITH` without a data-modifying
/// statement, `INTO` or a locking clause; `EXPLAIN` without `ANALYZE`; `SHOW`; transaction
/// control (not two-phase); `SET`/`RESET` (not of read-only-ness); `PREPARE` of a read;
/// `DECLARE` of a read cursor, `FETCH`, `MOVE`, `CLOSE`; `DEALLOCATE`; `DISCARD`; `LISTEN`,
/// `UNLISTEN`; `COPY ... TO STDOUT` of a read.
pub fn is_write(stmt: &str) -> bool {
    let w = words(stmt);
    let any = |names: &[&str]| {
        w.iter()
            .any(|x| names.iter().any(|n| x.text.eq_ignore_ascii_case(n)))
    };
    // FOR UPDATE, FOR NO KEY UPDATE, FOR SHARE, FOR KEY SHARE.
    let locks = || {
        w.windows(2).any(|p| {
            p[0].text.eq_ignore_ascii_case("FOR")
                && ["UPDATE", "SHARE", "NO", "KEY"]
                    .iter()
                    .any(|k| p[1].text.eq_ignore_ascii_case(k))
        })
    };
    let modifies = || any(&["INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "TRUNCATE"]) || locks();
    // What follows the first top-level `word` (PREPARE ... AS stmt, DECLARE ... FOR stmt).
    let after = |word: &str| {
        w.iter()
            .position(|x| x.depth == 0 && x.text.eq_ignore_ascii_case(word))
            .and_then(|i| w.get(i + 1))
            .map(|x| &stmt[x.start..])
    };
    let Some(first) = w.first() else {
        // An empty statement.
        return false;
    };
    match first.text.to_ascii_uppercase().as_str() {
        "SELECT" | "VALUES" | "TABLE" | "WITH" => modifies(),
        "EXPLAIN" => any(&["ANALYZE", "ANALYSE"]),
        "SHOW" | "BEGIN" | "START" | "SAVEPOINT" | "RELEASE" | "DEALLOCATE" | "DISCARD"
        | "CLOSE" | "FETCH" | "MOVE" | "LISTEN" | "UNLISTEN" => false,
        // Not COMMIT PREPARED / ROLLBACK PREPARED (two-phase).
        "COMMIT" | "END" | "ROLLBACK" | "ABORT" => any(&["PREPARED"]),
        // Not of the read-only-ness the replay sets.
        "SET" | "RESET" => {
            w.iter()
                .any(|x| x.text.to_ascii_lowercase().contains("read_only"))
                || w.windows(2).any(|p| {
                    p[0].text.eq_ignore_ascii_case("READ")
                        && p[1].text.eq_ignore_ascii_case("WRITE")
                })
        }
        // PREPARE TRANSACTION has no AS: a write.
        "PREPARE" => after("AS").is_none_or(is_write),
        "DECLARE" => after("FOR").is_none_or(is_write),
        "COPY" => {
            let top = |name: &str| {
                w.iter()
                    .any(|x| x.depth == 0 && x.text.eq_ignore_ascii_case(name))
            };
            let to_stdout = w.windows(2).any(|p| {
                p[0].depth == 0
                    && p[0].text.eq_ignore_ascii_case("TO")
                    && p[1].text.eq_ignore_ascii_case("STDOUT")
            });
            top("FROM")
                || !to_stdout
                || w[1..].iter().any(|x| {
                    ["INSERT", "UPDATE", "DELETE", "MERGE"]
                        .iter()
                        .any(|n| x.text.eq_ignore_ascii_case(n))
                })
        }
        _ => true,
    }
}

/// Whether a statement's result rows come in a defined order: a top-level `ORDER BY`.
pub fn ordered(stmt: &str) -> bool {
    let w = words(stmt);
    let top = w.iter().map(|x| x.depth).min().unwrap_or(0);
    w.windows(2).any(|p| {
        p[0].depth == top && p[0].text.eq_ignore_ascii_case("ORDER") && is_word(Some(&p[1]), "BY")
    })
}

/// A statement's endpoint: [`sql::normalize`]d (literals as `$?`, whitespace collapsed,
/// keywords upper-cased), with `$n` parameters as `$?` too, so a query sent with literals and
/// the same one prepared are one endpoint.
pub fn query_key(stmt: &str) -> String {
    let n = sql::normalize(stmt);
    let b = n.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let (mut i, mut quoted) = (0, false);
    while i < b.len() {
        let c = b[i];
        if c == b'"' {
            quoted = !quoted;
        }
        if !quoted
            && c == b'$'
            && b.get(i + 1).is_some_and(u8::is_ascii_digit)
            && (i == 0 || !ident_char(b[i - 1]))
        {
            out.extend_from_slice(sql::PLACEHOLDER.as_bytes());
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8(out).unwrap_or(n)
}

/// FNV-1a, 64 bits: a row's or a value's hash (sorted for the order-insensitive multiset).
fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h ^= u64::from(c);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A well-mixed hash of two numbers (SplitMix64's finalizer): every bit depends on all of
/// theirs, so its low bits do not follow a unit's position's parity as FNV's would.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The answer to one unit, hashed as it is read.
struct Answer<'u> {
    ordered: &'u [bool],
    crc: crc32fast::Hasher,
    /// The current result's index, column names, row hashes and per-column value hashes.
    result: usize,
    columns: Vec<String>,
    rows: Vec<u64>,
    values: Vec<Vec<u64>>,
    /// Per result column (`name`, `2.name` for the second result...) a hash of its values,
    /// and `(result)`: tags, errors, row counts. A calibration learns which are noisy.
    fields: Vec<(String, u32)>,
    status: crc32fast::Hasher,
    body_bytes: u64,
    excerpt: String,
    /// A safety valve's SQLSTATE (statement or lock timeout).
    timed_out: Option<String>,
}

impl<'u> Answer<'u> {
    fn new(ordered: &'u [bool]) -> Self {
        Self {
            ordered,
            crc: crc32fast::Hasher::new(),
            result: 0,
            columns: Vec::new(),
            rows: Vec::new(),
            values: Vec::new(),
            fields: Vec::new(),
            status: crc32fast::Hasher::new(),
            body_bytes: 0,
            excerpt: String::new(),
            timed_out: None,
        }
    }

    fn note(&mut self, text: &str) {
        if self.excerpt.len() < EXCERPT_BYTES {
            if !self.excerpt.is_empty() {
                self.excerpt.push_str("; ");
            }
            let mut end = text.len().min(EXCERPT_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            self.excerpt.push_str(&text[..end]);
        }
    }

    fn row(&mut self, body: &[u8], copy: bool) {
        self.body_bytes += body.len() as u64;
        self.rows.push(fnv(body));
        let first = self.rows.len() == 1;
        if copy {
            if first {
                self.note(&format!(
                    "row: {}",
                    String::from_utf8_lossy(body).trim_end()
                ));
            }
            return;
        }
        // Columns: count, then per column a length (-1: NULL) and the bytes.
        let n = be16(body, 0).unwrap_or(0) as usize;
        let mut at = 2;
        let mut shown = Vec::new();
        for c in 0..n {
            let Some(len) = be32(body, at) else { break };
            at += 4;
            let value = if len == u32::MAX {
                if first {
                    shown.push("NULL".into());
                }
                fnv(b"\xffNULL")
            } else {
                let end = (at + len as usize).min(body.len());
                if first {
                    shown.push(String::from_utf8_lossy(&body[at..end]).into_owned());
                }
                let v = fnv(&body[at..end]);
                at = end;
                v
            };
            if self.values.len() <= c {
                self.values.resize(c + 1, Vec::new());
            }
            self.values[c].push(value);
        }
        if first {
            self.note(&format!("row: ({})", shown.join(", ")));
        }
    }

    /// Ends the current result (its rows hashed in order, or sorted) with `what`.
    fn end_result(&mut self, what: &[u8]) {
        let ordered = self.ordered.get(self.result).copied().unwrap_or(false);
        if !ordered {
            self.rows.sort_unstable();
        }
        self.crc.update(&(self.rows.len() as u64).to_le_bytes());
        for r in &self.rows {
            self.crc.update(&r.to_le_bytes());
        }
        self.crc.update(what);
        self.status.update(what);
        self.status.update(&(self.rows.len() as u64).to_le_bytes());
        for (c, mut v) in std::mem::take(&mut self.values).into_iter().enumerate() {
            if !ordered {
                v.sort_unstable();
            }
            let mut h = crc32fast::Hasher::new();
            for x in v {
                h.update(&x.to_le_bytes());
            }
            let name = self
                .columns
                .get(c)
                .cloned()
                .unwrap_or_else(|| format!("column{}", c + 1));
            let key = if self.result == 0 {
                name
            } else {
                format!("{}.{name}", self.result + 1)
            };
            self.fields.push((key, h.finalize()));
        }
        self.rows.clear();
        self.columns.clear();
        self.result += 1;
    }

    fn message(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'T' => {
                // Column names (types left out: user type OIDs differ between instances).
                let n = be16(body, 0).unwrap_or(0);
                let mut rest = body.get(2..).unwrap_or_default();
                self.columns.clear();
                for _ in 0..n {
                    let Some((name, after)) = cstr(rest) else {
                        break;
                    };
                    self.crc.update(name.as_bytes());
                    self.crc.update(b"\0");
                    self.columns.push(name.to_string());
                    rest = after.get(18..).unwrap_or_default();
                }
            }
            b'D' => self.row(body, false),
            b'd' => self.row(body, true),
            b'C' => {
                let tag = cstr(body).map_or("", |s| s.0).to_string();
                self.note(&tag);
                self.end_result(format!("C{tag}").as_bytes());
            }
            b'E' => {
                // The SQLSTATE only: the message can carry variable details.
                let code = error_fields(body).0.to_string();
                if TIMEOUT_STATES.contains(&code.as_str()) {
                    self.timed_out.get_or_insert_with(|| code.clone());
                }
                self.note(&format!("ERROR {code}"));
                self.end_result(format!("E{code}").as_bytes());
            }
            b'I' => self.end_result(b"I"),
            b's' => self.end_result(b"s"),
            _ => {}
        }
    }

    fn finish(mut self, status: u8) -> (u32, Vec<(String, u32)>, u64, String, Option<String>) {
        if !self.rows.is_empty() {
            // Rows without their CommandComplete (COPY OUT is ended by one too).
            self.end_result(b"");
        }
        self.crc.update(&[b'Z', status]);
        self.status.update(&[status]);
        self.fields
            .push(("(result)".into(), self.status.finalize()));
        (
            self.crc.finalize(),
            self.fields,
            self.body_bytes,
            self.excerpt,
            self.timed_out,
        )
    }
}

/// A replay connection: the socket and what was read but not yet used.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl Conn {
    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("write: {e}"))
    }

    /// The length of the complete message at the read position, if there is one.
    fn complete(&self) -> Result<Option<usize>, String> {
        let have = &self.buf[self.pos..];
        let Some(len) = be32(have, 1) else {
            return Ok(None);
        };
        let len = len as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(format!(
                "the target does not speak Postgres (message {:?} of {len} bytes)",
                char::from(have[0])
            ));
        }
        Ok((have.len() > len).then_some(len))
    }

    /// The next backend message (tag, body), waiting at most until `deadline`.
    fn next(&mut self, deadline: Instant) -> Result<(u8, &[u8]), String> {
        let len = loop {
            if let Some(len) = self.complete()? {
                break len;
            }
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timeout waiting for the answer".into());
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| format!("read: {e}"))?;
            let old = self.buf.len();
            self.buf.resize(old + 64 * 1024, 0);
            let n = self.stream.read(&mut self.buf[old..]);
            self.buf.truncate(old + *n.as_ref().unwrap_or(&0));
            match n {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err("timeout waiting for the answer".into());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        };
        let start = self.pos;
        self.pos += 1 + len;
        Ok((self.buf[start], &self.buf[start + 5..start + 1 + len]))
    }
}

/// A frontend message: tag, length, body.
pub fn frontend_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 5);
    m.push(tag);
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A StartupMessage (protocol 3.0) with `params`.
pub fn startup_message<K: AsRef<str>, V: AsRef<str>>(params: &[(K, V)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        for text in [k.as_ref(), v.as_ref()] {
            body.extend_from_slice(text.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend(body);
    m
}

/// The startup parameters the replay sends: the captured ones (protocol extensions and
/// replication left out), `user`/`database` overridden, and the safety valves.
fn startup_params(s: &PgSession, o: &PgOptions) -> Result<Vec<(String, String)>, String> {
    const OURS: [&str; 4] = [
        "lock_timeout",
        "statement_timeout",
        "default_transaction_read_only",
        "replication",
    ];
    if s.params
        .iter()
        .any(|(k, v)| k == "replication" && !matches!(v.as_str(), "false" | "off" | "0" | "no"))
    {
        return Err("a replication connection: not replayed".into());
    }
    let mut p: Vec<(String, String)> = s
        .params
        .iter()
        .filter(|(k, _)| !k.starts_with("_pq_.") && !OURS.contains(&k.as_str()))
        .cloned()
        .collect();
    let mut set = |k: &str, v: String| {
        p.retain(|(x, _)| x != k);
        p.push((k.to_string(), v));
    };
    if let Some(u) = &o.user {
        set("user", u.clone());
    }
    if let Some(d) = &o.database {
        set("database", d.clone());
    }
    set("lock_timeout", format!("{}ms", o.lock_timeout.as_millis()));
    set(
        "statement_timeout",
        format!("{}ms", o.replay.timeout.as_millis()),
    );
    if !o.replay.allow_writes {
        set("default_transaction_read_only", "on".into());
    }
    if !p.iter().any(|(k, _)| k == "user") {
        return Err(format!(
            "no startup parameters for this session ({}): give --pg-user (and --pg-database)",
            if s.midstream {
                "recorded mid-way, and the capture has no pg.user attribute"
            } else {
                "its startup message names no user"
            }
        ));
    }
    Ok(p)
}

/// The server's ErrorResponse as `message (SQLSTATE)`.
fn error_text(body: &[u8]) -> String {
    let (code, message) = error_fields(body);
    format!("{message} ({code})")
}

/// An ErrorResponse's SQLSTATE and message.
fn error_fields(body: &[u8]) -> (&str, &str) {
    let (mut code, mut message) = ("", "");
    let mut rest = body;
    while let Some(&field) = rest.first() {
        if field == 0 {
            break;
        }
        let Some((value, after)) = cstr(&rest[1..]) else {
            break;
        };
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = after;
    }
    (code, message)
}

/// Connects, starts up and authenticates a session, then parses the statements it prepared
/// before the capture.
fn open(s: &PgSession, o: &PgOptions, target: SocketAddr) -> Result<Conn, String> {
    use postgres_protocol::authentication::{md5_hash, sasl};
    let params = startup_params(s, o)?;
    let stream = TcpStream::connect_timeout(&target, o.replay.timeout)
        .map_err(|e| format!("connect {target}: {e}"))?;
    stream
        .set_write_timeout(Some(o.replay.timeout))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| format!("connect {target}: {e}"))?;
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(64 * 1024),
        pos: 0,
    };
    conn.send(&startup_message(&params))?;
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map_or("", |(_, v)| v.as_str())
        .to_string();
    let password = |method: &str| {
        o.password.clone().ok_or_else(|| {
            format!("the server asks for a password ({method}): give --pg-password or PGPASSWORD")
        })
    };
    let deadline = Instant::now() + o.replay.timeout;
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        let (tag, body) = conn.next(deadline)?;
        let reply = match tag {
            b'R' => match be32(body, 0) {
                Some(0) => None,
                Some(3) => {
                    let mut m = password("cleartext")?.into_bytes();
                    m.push(0);
                    Some(frontend_message(b'p', &m))
                }
                Some(5) => {
                    let Some(&[a, b, c, d]) = body.get(4..8).map(<[u8]>::as_ref) else {
                        return Err("a bad MD5 authentication request".into());
                    };
                    let salt = [a, b, c, d];
                    let mut m =
                        md5_hash(user.as_bytes(), password("md5")?.as_bytes(), salt).into_bytes();
                    m.push(0);
                    Some(frontend_message(b'p', &m))
                }
                Some(10) => {
                    let mechanisms: Vec<&str> = body[4..]
                        .split(|&c| c == 0)
                        .filter_map(|m| std::str::from_utf8(m).ok())
                        .filter(|m| !m.is_empty())
                        .collect();
                    if !mechanisms.contains(&sasl::SCRAM_SHA_256) {
                        return Err(format!(
                            "the server asks for SASL authentication with {mechanisms:?}; the replay does SCRAM-SHA-256 only"
                        ));
                    }
                    let s = sasl::ScramSha256::new(
                        password("SCRAM-SHA-256")?.as_bytes(),
                        sasl::ChannelBinding::unsupported(),
                    );
                    let mut m = sasl::SCRAM_SHA_256.as_bytes().to_vec();
                    m.push(0);
                    m.extend_from_slice(&(s.message().len() as u32).to_be_bytes());
                    m.extend_from_slice(s.message());
                    scram = Some(s);
                    Some(frontend_message(b'p', &m))
                }
                Some(11) => {
                    let s = scram
                        .as_mut()
                        .ok_or("a SASL continuation before SASL started")?;
                    s.update(&body[4..])
                        .map_err(|e| format!("SCRAM-SHA-256: {e}"))?;
                    Some(frontend_message(b'p', s.message()))
                }
                Some(12) => {
                    scram
                        .as_mut()
                        .ok_or("a SASL final message before SASL started")?
                        .finish(&body[4..])
                        .map_err(|e| format!("SCRAM-SHA-256: the server's proof: {e}"))?;
                    None
                }
                Some(code) => {
                    let method = match code {
                        2 => "Kerberos V5",
                        6 => "SCM credentials",
                        7 | 8 => "GSSAPI",
                        9 => "SSPI",
                        _ => "an unknown method",
                    };
                    return Err(format!(
                        "the server asks for {method} authentication (code {code}): the replay does trust, cleartext, MD5 and SCRAM-SHA-256"
                    ));
                }
                None => return Err("a bad authentication request".into()),
            },
            b'E' => {
                return Err(format!(
                    "the server refused the session: {}",
                    error_text(body)
                ));
            }
            b'Z' => break,
            _ => None,
        };
        if let Some(r) = reply {
            conn.send(&r)?;
        }
    }
    // The session's `SET`s from before the capture (one that could change data is left out
    // unless writes are allowed, as its statements would be).
    for set in s
        .sets
        .iter()
        .filter(|set| o.replay.allow_writes || !is_write(set))
    {
        let mut b = set.as_bytes().to_vec();
        b.push(0);
        conn.send(&frontend_message(b'Q', &b))?;
        let deadline = Instant::now() + o.replay.timeout;
        while conn.next(deadline)?.0 != b'Z' {}
    }
    if !s.prepared.is_empty() {
        let mut parse = Vec::new();
        for (name, sql) in &s.prepared {
            let mut b = Vec::new();
            for part in [name.as_bytes(), sql.as_bytes()] {
                b.extend_from_slice(part);
                b.push(0);
            }
            b.extend_from_slice(&0u16.to_be_bytes());
            parse.extend(frontend_message(b'P', &b));
        }
        parse.extend(frontend_message(b'S', &[]));
        conn.send(&parse)?;
        let deadline = Instant::now() + o.replay.timeout;
        // A statement that fails to parse fails its Binds later, visibly.
        while conn.next(deadline)?.0 != b'Z' {}
    }
    Ok(conn)
}

/// What one unit got.
struct Got {
    hash: u32,
    fields: Vec<(String, u32)>,
    body_bytes: u64,
    excerpt: String,
    timed_out: Option<String>,
}

/// Sends one unit and reads its answer, up to its ReadyForQuery.
fn exchange(conn: &mut Conn, unit: &Unit, timeout: Duration) -> Result<Got, String> {
    let deadline = Instant::now() + timeout;
    conn.send(&unit.bytes)?;
    let mut answer = Answer::new(&unit.ordered);
    loop {
        let (tag, body) = conn.next(deadline)?;
        match tag {
            b'Z' => {
                let status = body.first().copied().unwrap_or(0);
                let (hash, fields, body_bytes, excerpt, timed_out) = answer.finish(status);
                return Ok(Got {
                    hash,
                    fields,
                    body_bytes,
                    excerpt,
                    timed_out,
                });
            }
            b'W' => return Err("COPY BOTH (replication) is not replayed".into()),
            b'G' if !unit.copy_data => {
                // COPY FROM STDIN whose data the capture does not have: end it.
                conn.send(&frontend_message(b'f', b"no COPY data in the capture\0"))?;
            }
            _ => answer.message(tag, body),
        }
    }
}

/// One target's side of a session being replayed.
#[derive(Default)]
struct Side {
    conn: Option<Conn>,
    /// Why the rest of the session is not sent there.
    broken: Option<String>,
    error: Option<SessionError>,
    outcomes: Vec<Outcome>,
}

/// One session, in order, on one connection per target, each unit sent to every target in
/// turn (the first one drawn per unit) before the next: background load and warm-up fall on all of
/// them alike. After a target's connection breaks or a unit times out there, the rest of the
/// session is not sent to it (its state is gone): error outcomes.
fn run_session(
    s: &PgSession,
    o: &PgOptions,
    targets: &[SocketAddr],
    schedule: &Schedule,
) -> (Vec<Side>, u64) {
    let mut sides: Vec<Side> = targets.iter().map(|_| Side::default()).collect();
    let mut skipped = 0;
    for (index, unit) in s.units.iter().enumerate() {
        if unit.write && !o.replay.allow_writes {
            skipped += 1;
            continue;
        }
        let outcome = Outcome {
            session: s.conn,
            index,
            method: "SQL".into(),
            path: unit.path.clone(),
            status: None,
            latency_ns: 0,
            body_hash: 0,
            body_bytes: 0,
            error: unit.unknown_statement.as_ref().map(|name| {
                format!(
                    "not replayable: statement {name:?} was prepared before the capture and its SQL is not in it"
                )
            }),
            late_ns: 0,
            headers_hash: 0,
            headers: Vec::new(),
            body_fields: Vec::new(),
            body_excerpt: String::new(),
        };
        if outcome.error.is_some() {
            for side in &mut sides {
                side.outcomes.push(outcome.clone());
            }
            continue;
        }
        for (side, target) in sides.iter_mut().zip(targets) {
            if side.conn.is_none() && side.broken.is_none() {
                match open(s, o, *target) {
                    Ok(c) => side.conn = Some(c),
                    Err(e) => {
                        side.broken = Some(format!("session not started: {e}"));
                        side.error = Some(SessionError {
                            session: s.conn,
                            error: e,
                        });
                    }
                }
            }
        }
        let late = schedule.wait(o.replay.timing, unit.ts_unix_ns);
        let due = Instant::now();
        // Who goes first is drawn per unit: whichever target answers second runs right after
        // the first one's work (measured: ~40% slower on two cores), and a rotation would
        // follow the workload's own period (one query kind at even positions).
        let first = (mix(s.conn, index as u64) % targets.len().max(1) as u64) as usize;
        for k in 0..sides.len() {
            let side = &mut sides[(first + k) % targets.len()];
            let mut outcome = outcome.clone();
            let Some(c) = side.conn.as_mut() else {
                outcome.error.clone_from(&side.broken);
                side.outcomes.push(outcome);
                continue;
            };
            let started = Instant::now();
            outcome.late_ns = match o.replay.timing {
                Timing::AsFast => 0,
                Timing::Recorded { .. } => late + started.duration_since(due).as_nanos() as u64,
            };
            match exchange(c, unit, o.replay.timeout) {
                Ok(got) => {
                    outcome.latency_ns = started.elapsed().as_nanos() as u64;
                    outcome.body_hash = got.hash;
                    outcome.body_bytes = got.body_bytes;
                    outcome.body_fields = got.fields;
                    outcome.body_excerpt = got.excerpt;
                    if let Some(code) = got.timed_out {
                        outcome.error = Some(format!(
                            "canceled by the replay's {} ({code})",
                            if code == "55P03" {
                                "lock_timeout"
                            } else {
                                "statement_timeout"
                            }
                        ));
                    }
                }
                Err(e) => {
                    outcome.latency_ns = started.elapsed().as_nanos() as u64;
                    side.broken = Some(format!(
                        "not sent: the session's connection failed before: {e}"
                    ));
                    outcome.error = Some(e);
                    side.conn = None;
                }
            }
            side.outcomes.push(outcome);
        }
    }
    for side in &mut sides {
        if let Some(c) = side.conn.as_mut() {
            let _ = c.send(&frontend_message(b'X', &[]));
        }
    }
    (sides, skipped)
}

/// Replays `sessions` against `options.replay.target`: sessions concurrently up to the
/// limit, each in its recorded order, as fast as it goes or at its recorded times.
pub fn replay(sessions: &[PgSession], options: &PgOptions) -> PgReplayed {
    replay_each(sessions, options, &[options.replay.target])
        .pop()
        .unwrap_or_default()
}

/// Replays `sessions` against each of `targets` at once, interleaved unit by unit (A, B and
/// A2 then see the same moments of the replaying host and of the network); one result per
/// target, in their order. `options.replay.target` is not used.
pub fn replay_each(
    sessions: &[PgSession],
    options: &PgOptions,
    targets: &[SocketAddr],
) -> Vec<PgReplayed> {
    let mut order: Vec<&PgSession> = sessions.iter().collect();
    order.sort_by_key(|s| s.units.first().map_or(u64::MAX, |u| u.ts_unix_ns));
    let schedule = Schedule::new(
        order
            .iter()
            .filter_map(|s| s.units.first())
            .map(|u| u.ts_unix_ns)
            .min()
            .unwrap_or(0),
    );
    let mut out: Vec<PgReplayed> = targets
        .iter()
        .map(|_| PgReplayed {
            replayed: Replayed {
                sessions: sessions.len(),
                unframed_bytes: sessions.iter().map(|s| s.unframed_bytes).sum(),
                ..Replayed::default()
            },
            session_errors: Vec::new(),
        })
        .collect();
    for (sides, skipped) in in_parallel(order, options.replay.concurrency, |s| {
        run_session(s, options, targets, &schedule)
    }) {
        for (r, side) in out.iter_mut().zip(sides) {
            r.replayed.outcomes.extend(side.outcomes);
            r.replayed.skipped_writes += skipped;
            r.session_errors.extend(side.error);
        }
    }
    for r in &mut out {
        r.replayed.outcomes.sort_by_key(|o| (o.session, o.index));
        r.session_errors.sort_by_key(|e| e.session);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bakeoff_capture::{ConnInfo, Direction, Loss};

    fn cstrs(parts: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        for p in parts {
            b.extend_from_slice(p.as_bytes());
            b.push(0);
        }
        b
    }

    fn query(sql: &str) -> Vec<u8> {
        frontend_message(b'Q', &cstrs(&[sql]))
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = cstrs(&[name, sql]);
        b.extend_from_slice(&0u16.to_be_bytes());
        frontend_message(b'P', &b)
    }

    fn bind(portal: &str, statement: &str, param: &str) -> Vec<u8> {
        let mut b = cstrs(&[portal, statement]);
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&(param.len() as u32).to_be_bytes());
        b.extend_from_slice(param.as_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        frontend_message(b'B', &b)
    }

    fn execute(portal: &str) -> Vec<u8> {
        let mut b = cstrs(&[portal]);
        b.extend_from_slice(&0u32.to_be_bytes());
        frontend_message(b'E', &b)
    }

    fn open_record(conn: u64, info: ConnInfo) -> Record {
        Record::open(conn, 1, &info)
    }

    fn server() -> ConnInfo {
        ConnInfo {
            role: "server".into(),
            ..ConnInfo::default()
        }
    }

    /// A pgbench-like stream: SSLRequest, startup, a masked password, a prepared statement
    /// used twice, a simple query of two statements, an UPDATE, Terminate.
    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&8u32.to_be_bytes());
        s.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        s.extend(startup_message(&[
            ("user", "bob"),
            ("database", "shop"),
            ("application_name", "pgbench"),
        ]));
        s.extend(frontend_message(b'p', b"********\0"));
        s.extend(parse(
            "P_0",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        ));
        s.extend(frontend_message(b'S', &[]));
        for aid in ["7", "8"] {
            s.extend(bind("", "P_0", aid));
            s.extend(frontend_message(b'D', b"P\0"));
            s.extend(execute(""));
            s.extend(frontend_message(b'S', &[]));
        }
        s.extend(query("SELECT 1; SELECT name FROM t ORDER BY name"));
        s.extend(query("UPDATE t SET x = 1 WHERE id = 42"));
        s.extend(frontend_message(b'X', &[]));
        s
    }

    #[test]
    fn framing_is_the_same_across_any_cuts() {
        let bytes = stream();
        let whole = sessions(vec![
            open_record(1, server()),
            Record::data(1, Direction::Ingress, 10, bytes.clone()),
        ]);
        assert_eq!(whole.len(), 1);
        let s = &whole[0];
        assert_eq!(
            s.params,
            vec![
                ("user".to_string(), "bob".to_string()),
                ("database".into(), "shop".into()),
                ("application_name".into(), "pgbench".into())
            ]
        );
        let paths: Vec<(&str, bool)> = s.units.iter().map(|u| (u.path.as_str(), u.write)).collect();
        assert_eq!(
            paths,
            vec![
                (
                    "PREPARE SELECT abalance FROM pgbench_accounts WHERE aid = $?",
                    false
                ),
                (
                    "SELECT abalance FROM pgbench_accounts WHERE aid = $?",
                    false
                ),
                (
                    "SELECT abalance FROM pgbench_accounts WHERE aid = $?",
                    false
                ),
                ("SELECT $?; SELECT name FROM t ORDER BY name", false),
                ("UPDATE t SET x = $? WHERE id = $?", true),
            ]
        );
        assert_eq!(s.units[3].ordered, vec![false, true]);
        assert_eq!(s.unframed_bytes, 0);
        // No password byte is in any unit.
        assert!(
            s.units
                .iter()
                .all(|u| !u.bytes.windows(8).any(|w| w == b"********"))
        );
        // Cut at every pair of offsets: the same units, the first piece's time on each.
        for a in 1..bytes.len() {
            for b in (a + 1..bytes.len()).step_by(7) {
                let cut = sessions(vec![
                    open_record(1, server()),
                    Record::data(1, Direction::Ingress, 10, bytes[..a].to_vec()),
                    Record::data(1, Direction::Egress, 11, b"N".to_vec()),
                    Record::data(1, Direction::Ingress, 12, bytes[a..b].to_vec()),
                    Record::data(1, Direction::Ingress, 13, bytes[b..].to_vec()),
                ]);
                assert_eq!(cut.len(), 1);
                let units: Vec<&Vec<u8>> = cut[0].units.iter().map(|u| &u.bytes).collect();
                let want: Vec<&Vec<u8>> = s.units.iter().map(|u| &u.bytes).collect();
                assert_eq!(units, want, "cut at {a} and {b}");
                assert_eq!(cut[0].unframed_bytes, 0);
            }
        }
    }

    #[test]
    fn a_loss_ends_framing_and_an_unsynced_group_is_unframed() {
        let mut bytes = startup_message(&[("user", "bob")]);
        bytes.extend(query("SELECT 1"));
        let group = [parse("", "SELECT 2"), bind("", "", "x"), execute("")].concat();
        bytes.extend(&group);
        let s = sessions(vec![
            open_record(3, server()),
            Record::data(3, Direction::Ingress, 10, bytes),
            Record::loss(
                3,
                Direction::Ingress,
                11,
                &Loss {
                    bytes: 10,
                    reason: "payload_truncated".into(),
                },
            ),
            Record::data(3, Direction::Ingress, 12, frontend_message(b'S', &[])),
        ]);
        assert_eq!(s[0].units.len(), 1);
        assert!(s[0].lossy);
        // The group before the loss, and the Sync after it.
        assert_eq!(s[0].unframed_bytes, group.len() as u64 + 5);
    }

    #[test]
    fn a_statement_named_in_bind_is_its_parse_sql_and_midstream_sessions_use_attributes() {
        let mut info = server();
        info.midstream = true;
        info.attributes.insert("pg.user".into(), "app".into());
        info.attributes.insert("pg.database".into(), "shop".into());
        info.attributes
            .insert("pg.param.application_name".into(), "api".into());
        info.attributes.insert(
            "pg.statement.s1".into(),
            "SELECT price FROM items WHERE id = $1".into(),
        );
        info.attributes
            .insert("pg.set.01".into(), "SET statement_timeout = 0".into());
        info.attributes
            .insert("pg.set.00".into(), "SET search_path = shop".into());
        let mut bytes = Vec::new();
        // The recording starts inside a message: framing starts at the next piece.
        let junk = b"ELECT 1\0".to_vec();
        bytes.extend(
            [
                bind("p", "s1", "5"),
                execute("p"),
                frontend_message(b'S', &[]),
            ]
            .concat(),
        );
        bytes.extend(parse("s2", "DELETE FROM items WHERE id = $1"));
        bytes.extend(frontend_message(b'S', &[]));
        bytes.extend(
            [
                bind("", "s2", "5"),
                execute(""),
                frontend_message(b'S', &[]),
            ]
            .concat(),
        );
        bytes.extend(
            [
                bind("", "gone", "5"),
                execute(""),
                frontend_message(b'S', &[]),
            ]
            .concat(),
        );
        let s = sessions(vec![
            open_record(9, info),
            Record::data(9, Direction::Ingress, 10, junk.clone()),
            Record::data(9, Direction::Ingress, 11, bytes),
        ]);
        let s = &s[0];
        assert!(s.midstream);
        assert_eq!(s.unframed_bytes, junk.len() as u64);
        assert_eq!(
            s.prepared,
            vec![("s1".into(), "SELECT price FROM items WHERE id = $1".into())]
        );
        assert_eq!(
            s.sets,
            ["SET search_path = shop", "SET statement_timeout = 0"]
        );
        let mut params = s.params.clone();
        params.sort();
        assert_eq!(
            params,
            vec![
                ("application_name".to_string(), "api".to_string()),
                ("database".into(), "shop".into()),
                ("user".into(), "app".into())
            ]
        );
        let got: Vec<(&str, bool, Option<&str>)> = s
            .units
            .iter()
            .map(|u| (u.path.as_str(), u.write, u.unknown_statement.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("SELECT price FROM items WHERE id = $?", false, None),
                ("PREPARE DELETE FROM items WHERE id = $?", true, None),
                ("DELETE FROM items WHERE id = $?", true, None),
                (
                    "EXECUTE gone /* statement not captured */",
                    false,
                    Some("gone")
                ),
            ]
        );
        assert_eq!(s.units[0].ts_unix_ns, 11);
    }

    #[test]
    fn writes_are_classified() {
        for read in [
            "SELECT 1",
            "select * from t where note = 'insert into x' -- update\n",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "EXPLAIN SELECT * FROM t",
            "SHOW work_mem",
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "SET search_path = app",
            "PREPARE q AS SELECT $1::int",
            "DEALLOCATE q",
            "DISCARD ALL",
            "VALUES (1)",
            "COPY (SELECT 1) TO STDOUT",
            "DECLARE c CURSOR FOR SELECT 1",
            "SELECT $$update$$, E'\\'delete', \"insert\" FROM t",
            "",
        ] {
            assert!(!is_write(read), "{read}");
        }
        for write in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET x = 1",
            "DELETE FROM t",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "CREATE TABLE t (x int)",
            "DROP TABLE t",
            "ALTER TABLE t ADD y int",
            "TRUNCATE t",
            "COPY t FROM STDIN",
            "COPY t TO '/tmp/x'",
            "GRANT SELECT ON t TO bob",
            "REVOKE SELECT ON t FROM bob",
            "VACUUM t",
            "CLUSTER t",
            "REINDEX TABLE t",
            "LOCK TABLE t",
            "CALL p()",
            "DO $$ BEGIN END $$",
            "SELECT * INTO t2 FROM t",
            "SELECT * FROM t FOR UPDATE",
            "select * from t for share",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "EXPLAIN ANALYZE SELECT 1",
            "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t",
            "PREPARE q AS UPDATE t SET x = 1",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "SET default_transaction_read_only = off",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "ANALYZE t",
            "NOTIFY ch",
            "SOMETHING NEW",
        ] {
            assert!(is_write(write), "{write}");
        }
    }

    #[test]
    fn sql_level_prepare_and_execute_keep_their_class() {
        let mut bytes = startup_message(&[("user", "bob")]);
        bytes.extend(query("PREPARE r AS SELECT 1; PREPARE w AS DELETE FROM t"));
        bytes.extend(query("EXECUTE r"));
        bytes.extend(query("EXECUTE w"));
        bytes.extend(query("EXECUTE unknown"));
        let s = sessions(vec![
            open_record(1, server()),
            Record::data(1, Direction::Ingress, 1, bytes),
        ]);
        let writes: Vec<bool> = s[0].units.iter().map(|u| u.write).collect();
        assert_eq!(writes, vec![true, false, true, true]);
    }

    #[test]
    fn keys_and_order() {
        assert_eq!(
            query_key("select abalance from pgbench_accounts where aid = 42;"),
            query_key("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
        );
        assert_eq!(
            query_key("SELECT \"$1\", a$1 FROM t WHERE x IN ($1, $2) AND y = $10"),
            "SELECT \"$1\", a$1 FROM t WHERE x IN ($?) AND y = $?"
        );
        assert!(ordered("SELECT a FROM t ORDER BY a"));
        assert!(ordered("(SELECT a FROM t ORDER BY a)"));
        assert!(!ordered("SELECT a, rank() OVER (ORDER BY a) FROM t"));
        assert!(!ordered("SELECT * FROM (SELECT a FROM t ORDER BY a) s"));
        assert!(!ordered("SELECT 'order by' FROM t"));
    }

    /// The answer's hash: rows as a multiset without a top-level ORDER BY, in order with one;
    /// errors by SQLSTATE only.
    #[test]
    fn row_order_counts_only_when_ordered() {
        let row = |v: &str| {
            let mut b = 1u16.to_be_bytes().to_vec();
            b.extend_from_slice(&(v.len() as u32).to_be_bytes());
            b.extend_from_slice(v.as_bytes());
            b
        };
        let hash = |ordered: &[bool], rows: &[&str], error: Option<&[u8]>| {
            let mut a = Answer::new(ordered);
            let mut t = 1u16.to_be_bytes().to_vec();
            t.extend(cstrs(&["name"]));
            t.extend([0u8; 18]);
            a.message(b'T', &t);
            for r in rows {
                a.message(b'D', &row(r));
            }
            match error {
                Some(e) => a.message(b'E', e),
                None => a.message(b'C', format!("SELECT {}\0", rows.len()).as_bytes()),
            }
            a.finish(b'I')
        };
        let unordered = [false];
        let (h1, f1, bytes, excerpt, _) = hash(&unordered, &["a", "b", "c"], None);
        let (h2, f2, _, _, _) = hash(&unordered, &["c", "a", "b"], None);
        assert_eq!((h1, &f1), (h2, &f2));
        assert_eq!(bytes, 3 * 7);
        assert!(
            excerpt.starts_with("row: ") && excerpt.ends_with("SELECT 3"),
            "{excerpt}"
        );
        let (h3, _, _, _, _) = hash(&unordered, &["a", "b", "d"], None);
        assert_ne!(h1, h3);
        let ordered = [true];
        let (o1, _, _, _, _) = hash(&ordered, &["a", "b", "c"], None);
        let (o2, _, _, _, _) = hash(&ordered, &["c", "a", "b"], None);
        assert_ne!(o1, o2);
        // A duplicate row is not the same multiset.
        let (d, _, _, _, _) = hash(&unordered, &["a", "a", "b"], None);
        assert_ne!(d, hash(&unordered, &["a", "b", "b"], None).0);
        // Errors: the SQLSTATE counts, the message does not.
        let e1 = [
            b"SERROR\0".as_slice(),
            b"C22012\0",
            b"Mdivision by zero at 12:00\0",
            b"\0",
        ]
        .concat();
        let e2 = [
            b"SERROR\0".as_slice(),
            b"C22012\0",
            b"Mdivision by zero at 12:01\0",
            b"\0",
        ]
        .concat();
        let e3 = [
            b"SERROR\0".as_slice(),
            b"C42P01\0",
            b"Mdivision by zero at 12:00\0",
            b"\0",
        ]
        .concat();
        assert_eq!(
            hash(&unordered, &[], Some(&e1)).0,
            hash(&unordered, &[], Some(&e2)).0
        );
        assert_ne!(
            hash(&unordered, &[], Some(&e1)).0,
            hash(&unordered, &[], Some(&e3)).0
        );
        let timeout = [b"C57014\0".as_slice(), b"\0"].concat();
        assert_eq!(
            hash(&unordered, &[], Some(&timeout)).4.as_deref(),
            Some("57014")
        );
    }

    proptest::proptest! {
        /// Any bytes, cut anywhere, with or without a startup: framing never panics and
        /// accounts for every byte it does not replay.
        #[test]
        fn framing_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            cut in 0usize..512,
            midstream in proptest::prelude::any::<bool>(),
        ) {
            let cut = cut.min(bytes.len());
            let mut info = server();
            info.midstream = midstream;
            let s = sessions(vec![
                open_record(1, info),
                Record::data(1, Direction::Ingress, 1, bytes[..cut].to_vec()),
                Record::data(1, Direction::Ingress, 2, bytes[cut..].to_vec()),
            ]);
            for s in &s {
                let framed: usize = s.units.iter().map(|u| u.bytes.len()).sum();
                proptest::prop_assert!(framed + s.unframed_bytes as usize <= bytes.len());
            }
            for u in s.iter().flat_map(|s| &s.units) {
                let _ = is_write(&u.path);
            }
        }

        #[test]
        fn sql_functions_are_total(sql in ".{0,200}") {
            let _ = (is_write(&sql), ordered(&sql), query_key(&sql));
        }
    }
}
