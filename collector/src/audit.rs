//! The audit log: one JSON line per capture, replay and shadow command, append-only and
//! hash-chained, so that a changed, removed or inserted entry is found by `verify` (and by
//! `bakeoff audit`), naming the line.
//!
//! # Format
//!
//! A UTF-8 file of JSON lines, each ending with `\n`; line `N` holds the entry with `seq` `N`
//! (the first is 1). Members, always all present and in this order:
//!
//! ```text
//! {"seq":1,"time":"2026-05-01T12:00:00.123456Z","actor":"alice@build-7","action":"replay",
//!  "experiment":"checkout","cohort":"canary","target":"10.0.0.7:8080","bytes":52817,
//!  "redaction":["authorization","cookie"],"details":{"requests":300},
//!  "prev":"000…000","hash":"9f86d0…"}
//! ```
//!
//! `experiment`, `cohort`, `target` and `bytes` may be `null`; `time` is RFC 3339 in UTC;
//! `details` is an object whose keys (at every depth) are sorted by their UTF-8 bytes.
//!
//! # Hash chain
//!
//! `prev` is the previous line's `hash` (64 `0`s on line 1), and
//!
//! ```text
//! hash = lowercase_hex(SHA-256(prev ++ canonical))
//! ```
//!
//! where `prev` is its 64 ASCII hex characters and `canonical` is the line's JSON object
//! without its `hash` member, written compactly (no whitespace outside strings) with the
//! members in the order above and `serde_json`'s escaping (only `"`, `\` and control characters
//! escaped, `\n` `\t` `\r` `\b` `\f` short, others `\u00xx`; non-ASCII written as UTF-8).
//! As written by this module, `canonical` is exactly the line's bytes with the final
//! `,"hash":"…"` removed. An outside check (Python; floats in `details` may print differently,
//! so the collector writes none):
//!
//! ```text
//! prev = "0" * 64
//! for n, line in enumerate(open(path, encoding="utf-8"), 1):
//!     e = json.loads(line); h = e.pop("hash")
//!     body = json.dumps(e, separators=(",", ":"), ensure_ascii=False)
//!     assert e["seq"] == n and e["prev"] == prev
//!     assert hashlib.sha256((prev + body).encode()).hexdigest() == h
//!     prev = h
//! ```
//!
//! A chain proves order and integrity against edits in place, not against someone who rewrites
//! every hash from the edited line on: keep `Summary::last_hash` somewhere else (a ticket, a
//! chat message) to pin the log up to that point.
//!
//! # Writers
//!
//! `AuditLog::append` takes `&mut self`: threads of one process share one `AuditLog` behind
//! their own `Mutex`. Processes appending to the same file at once are serialized by an
//! exclusive `flock` held for each append, and each re-reads (and verifies) what the others
//! appended before writing, so the chain stays one chain.

use std::{
    ffi::OsString,
    fs::File,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a command records; `AuditLog::append` adds `seq`, `time`, `prev` and `hash`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entry {
    /// Who: `user@host` for local commands, the API caller's name for collector commands.
    pub actor: String,
    /// `capture.start`, `capture.stop`, `capture.get`, `replay`, `shadow.start`, ...
    pub action: String,
    pub experiment: Option<String>,
    pub cohort: Option<String>,
    /// The addresses contacted (replay, shadow) or the probe commanded (capture).
    pub target: Option<String>,
    pub bytes: Option<u64>,
    /// Redaction rules in force.
    pub redaction: Vec<String>,
    pub details: Map<String, Value>,
}

/// One line of the log, as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    pub seq: u64,
    pub time: String,
    pub actor: String,
    pub action: String,
    pub experiment: Option<String>,
    pub cohort: Option<String>,
    pub target: Option<String>,
    pub bytes: Option<u64>,
    pub redaction: Vec<String>,
    pub details: Map<String, Value>,
    pub prev: String,
    pub hash: String,
}

/// `Recorded` without `hash`, in the same member order: what the hash covers.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: u64,
    time: &'a str,
    actor: &'a str,
    action: &'a str,
    experiment: &'a Option<String>,
    cohort: &'a Option<String>,
    target: &'a Option<String>,
    bytes: Option<u64>,
    redaction: &'a [String],
    details: Value,
    prev: &'a str,
}

impl Recorded {
    /// The hash this entry should carry (see the module's documentation).
    pub fn expected_hash(&self) -> String {
        let canonical = Canonical {
            seq: self.seq,
            time: &self.time,
            actor: &self.actor,
            action: &self.action,
            experiment: &self.experiment,
            cohort: &self.cohort,
            target: &self.target,
            bytes: self.bytes,
            redaction: &self.redaction,
            details: sorted(&Value::Object(self.details.clone())),
            prev: &self.prev,
        };
        // Serializing plain strings, integers and `Value`s cannot fail.
        let body = serde_json::to_vec(&canonical).unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.prev.as_bytes());
        ctx.update(&body);
        hex(ctx.finish().as_ref())
    }
}

/// `v` with the keys of every object in sorted order, whether or not serde_json keeps
/// insertion order (its `preserve_order` feature may be on through another crate).
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What is wrong at a line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("hash mismatch (the entry was changed after it was written)")]
    HashMismatch,
    #[error("sequence gap: expected seq {expected}, found {found} (entries removed or inserted)")]
    SequenceGap { expected: u64, found: u64 },
    #[error("prev is not the previous entry's hash (entries removed, inserted or reordered)")]
    PrevMismatch,
    #[error("bad JSON: {0}")]
    BadJson(String),
    #[error("truncated last line (no newline at its end: an interrupted write)")]
    Truncated,
    #[error("the file is shorter than when this process last read it (truncated or replaced)")]
    Shrunk,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The cause is in the message, not `source()`, so that it is said once in error chains.
    #[error("audit log {path}: cannot {what}: {error}")]
    Io {
        path: PathBuf,
        what: &'static str,
        error: std::io::Error,
    },
    #[error("audit log {path} damaged at line {line}: {reason}")]
    Damaged {
        path: PathBuf,
        line: u64,
        reason: Damage,
    },
    #[error("no place for the audit log: set BAKEOFF_AUDIT_LOG, XDG_STATE_HOME or HOME")]
    NoPath,
}

/// A verified log, in brief.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
    /// The last entry's hash (`GENESIS` when empty): note it elsewhere to pin the log.
    pub last_hash: String,
}

/// A log read up to its first damage.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    /// The entries before the damage (all of them without).
    pub entries: Vec<Recorded>,
    /// The first damaged line and why.
    pub damage: Option<(u64, Damage)>,
}

/// Where the chain stands after the lines read so far.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tip {
    /// `seq` of the next entry (= its line number).
    next_seq: u64,
    last_hash: String,
}

impl Tip {
    fn genesis() -> Self {
        Self {
            next_seq: 1,
            last_hash: GENESIS.into(),
        }
    }
}

/// Reads and checks complete lines from `bytes`, continuing the chain at `tip`; each good
/// entry goes to `each`. Returns the bytes consumed (whole good lines) and the first damage.
fn scan(bytes: &[u8], tip: &mut Tip, mut each: impl FnMut(Recorded)) -> (u64, Option<Damage>) {
    let mut consumed = 0usize;
    while consumed < bytes.len() {
        let rest = &bytes[consumed..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return (consumed as u64, Some(Damage::Truncated));
        };
        let r: Recorded = match serde_json::from_slice(&rest[..end]) {
            Ok(r) => r,
            Err(_) if end == 0 => {
                return (consumed as u64, Some(Damage::BadJson("empty line".into())));
            }
            Err(e) => return (consumed as u64, Some(Damage::BadJson(e.to_string()))),
        };
        let damage = if r.seq != tip.next_seq {
            Some(Damage::SequenceGap {
                expected: tip.next_seq,
                found: r.seq,
            })
        } else if r.prev != tip.last_hash {
            Some(Damage::PrevMismatch)
        } else if r.expected_hash() != r.hash {
            Some(Damage::HashMismatch)
        } else {
            None
        };
        if damage.is_some() {
            return (consumed as u64, damage);
        }
        tip.next_seq += 1;
        tip.last_hash.clone_from(&r.hash);
        consumed += end + 1;
        each(r);
    }
    (consumed as u64, None)
}

/// Holds a `flock` on a file until dropped (also on error paths).
struct Locked<'a>(&'a File);

impl<'a> Locked<'a> {
    fn exclusive(f: &'a File, path: &Path) -> Result<Self, AuditError> {
        f.lock().map_err(|source| io_err(path, "lock", source))?;
        Ok(Self(f))
    }

    fn shared(f: &'a File, path: &Path) -> Result<Self, AuditError> {
        f.lock_shared()
            .map_err(|source| io_err(path, "lock", source))?;
        Ok(Self(f))
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn io_err(path: &Path, what: &'static str, error: std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        what,
        error,
    }
}

/// `file`'s bytes from `from` to its end.
fn read_from(mut file: &File, from: u64, path: &Path) -> Result<Vec<u8>, AuditError> {
    file.seek(SeekFrom::Start(from))
        .map_err(|source| io_err(path, "read", source))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|source| io_err(path, "read", source))?;
    Ok(bytes)
}

/// An audit log open for appending, its chain verified.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    tip: Tip,
    /// Bytes of the file verified so far (whole lines).
    len: u64,
}

impl AuditLog {
    /// Opens (creating it, mode 0600, and its directories, 0700) and verifies the log. A
    /// damaged log is an error naming the line: extending it would bury the damage under good
    /// entries.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| io_err(dir, "create the directory", source))?;
        }
        let file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| io_err(&path, "open", source))?;
        let mut tip = Tip::genesis();
        let len = {
            // Shared: no appender is half-way through a line while we read.
            let _lock = Locked::shared(&file, &path)?;
            let bytes = read_from(&file, 0, &path)?;
            let (len, damage) = scan(&bytes, &mut tip, |_| {});
            if let Some(reason) = damage {
                return Err(AuditError::Damaged {
                    path,
                    line: tip.next_seq,
                    reason,
                });
            }
            len
        };
        if len == 0 {
            // A new file's directory entry is durable once its directory is synced.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| io_err(dir, "sync the directory", source))?;
            }
        }
        Ok(Self {
            path,
            file,
            tip,
            len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `seq` the next entry gets.
    pub fn next_seq(&self) -> u64 {
        self.tip.next_seq
    }

    /// Appends `entry` (time now) and fsyncs it before returning; entries other processes
    /// appended since are verified and chained onto first.
    pub fn append(&mut self, entry: Entry) -> Result<Recorded, AuditError> {
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        self.append_at(entry, now)
    }

    fn append_at(&mut self, entry: Entry, time: String) -> Result<Recorded, AuditError> {
        let _lock = Locked::exclusive(&self.file, &self.path)?;
        let size = self
            .file
            .metadata()
            .map_err(|source| io_err(&self.path, "stat", source))?
            .len();
        let path = self.path.clone();
        let damaged = |line, reason| AuditError::Damaged {
            path: path.clone(),
            line,
            reason,
        };
        if size < self.len {
            return Err(damaged(self.tip.next_seq, Damage::Shrunk));
        }
        if size > self.len {
            // Another process appended since: verify its lines and chain onto them.
            let bytes = read_from(&self.file, self.len, &self.path)?;
            let mut tip = self.tip.clone();
            let (n, damage) = scan(&bytes, &mut tip, |_| {});
            if let Some(reason) = damage {
                return Err(damaged(tip.next_seq, reason));
            }
            self.tip = tip;
            self.len += n;
        }
        let Entry {
            actor,
            action,
            experiment,
            cohort,
            target,
            bytes,
            redaction,
            details,
        } = entry;
        let mut r = Recorded {
            seq: self.tip.next_seq,
            time,
            actor,
            action,
            experiment,
            cohort,
            target,
            bytes,
            redaction,
            details: match sorted(&Value::Object(details)) {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            prev: self.tip.last_hash.clone(),
            hash: String::new(),
        };
        r.hash = r.expected_hash();
        let mut line = serde_json::to_vec(&r).map_err(|e| {
            io_err(
                &self.path,
                "serialize an entry",
                std::io::Error::other(e.to_string()),
            )
        })?;
        line.push(b'\n');
        // One write: with O_APPEND it lands whole at the end (or fails, and the partial line
        // left by a full disk shows as a truncated last line).
        (&self.file)
            .write_all(&line)
            .map_err(|source| io_err(&self.path, "append", source))?;
        self.file
            .sync_all()
            .map_err(|source| io_err(&self.path, "fsync", source))?;
        self.len += line.len() as u64;
        self.tip.next_seq += 1;
        self.tip.last_hash.clone_from(&r.hash);
        Ok(r)
    }
}

/// Reads the log at `path` up to its first damage (for `bakeoff audit`).
pub fn read(path: impl AsRef<Path>) -> Result<Chain, AuditError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| io_err(path, "open", source))?;
    let bytes = {
        let _lock = Locked::shared(&file, path)?;
        read_from(&file, 0, path)?
    };
    let mut tip = Tip::genesis();
    let mut entries = Vec::new();
    let (_, damage) = scan(&bytes, &mut tip, |r| entries.push(r));
    Ok(Chain {
        entries,
        damage: damage.map(|d| (tip.next_seq, d)),
    })
}

/// Verifies the whole log at `path`: its summary, or `AuditError::Damaged` naming the first
/// bad line and why.
pub fn verify(path: impl AsRef<Path>) -> Result<Summary, AuditError> {
    let path = path.as_ref();
    let chain = read(path)?;
    if let Some((line, reason)) = chain.damage {
        return Err(AuditError::Damaged {
            path: path.to_path_buf(),
            line,
            reason,
        });
    }
    Ok(summary(&chain.entries))
}

/// The summary of verified `entries`.
pub fn summary(entries: &[Recorded]) -> Summary {
    Summary {
        entries: entries.len() as u64,
        first_time: entries.first().map(|e| e.time.clone()),
        last_time: entries.last().map(|e| e.time.clone()),
        last_hash: entries
            .last()
            .map_or_else(|| GENESIS.to_string(), |e| e.hash.clone()),
    }
}

/// The log's default place: `$BAKEOFF_AUDIT_LOG`, else `$XDG_STATE_HOME/bakeoff/audit.log`,
/// else `$HOME/.local/state/bakeoff/audit.log` (the XDG default for state).
pub fn default_path() -> Result<PathBuf, AuditError> {
    default_path_from(|k| std::env::var_os(k))
}

fn default_path_from(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, AuditError> {
    let set = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = set("BAKEOFF_AUDIT_LOG") {
        return Ok(p);
    }
    // The XDG spec says to ignore a relative XDG_STATE_HOME.
    if let Some(state) = set("XDG_STATE_HOME").filter(|p| p.is_absolute()) {
        return Ok(state.join("bakeoff/audit.log"));
    }
    set("HOME")
        .map(|home| home.join(".local/state/bakeoff/audit.log"))
        .ok_or(AuditError::NoPath)
}

/// This process's user and host, `user@host`, for commands run locally: the user is `$USER`
/// (else `uid:N`), the host the kernel's hostname (else `/etc/hostname`). `$USER` can be set
/// by anyone: `local_uid` is recorded next to it.
pub fn local_actor() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| local_uid().map(|u| format!("uid:{u}")))
        .unwrap_or_else(|| "unknown".into());
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{user}@{host}")
}

/// This process's (effective) uid: the owner of `/proc/self`.
pub fn local_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test.
    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bakeoff-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn entry(i: u64) -> Entry {
        let mut details = Map::new();
        details.insert("requests".into(), Value::from(10 * i));
        details.insert("capture".into(), Value::from(format!("/tmp/c{i}.bkcap")));
        Entry {
            actor: "alice@host".into(),
            action: "replay".into(),
            experiment: Some("checkout".into()),
            cohort: Some(format!("canary-{i}")),
            target: Some("127.0.0.1:8080".into()),
            bytes: Some(1000 + i),
            redaction: vec!["authorization".into(), "cookie".into()],
            details,
        }
    }

    /// A new log of `n` entries at `dir/audit.log`.
    fn log_of(dir: &Path, n: u64) -> PathBuf {
        let path = dir.join("audit.log");
        let _ = std::fs::remove_file(&path);
        let mut log = AuditLog::open(&path).expect("open");
        for i in 1..=n {
            log.append(entry(i)).expect("append");
        }
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).expect("write");
    }

    fn damage(path: &Path) -> (u64, Damage) {
        match verify(path) {
            Err(AuditError::Damaged { line, reason, .. }) => (line, reason),
            other => panic!("expected damage, got {other:?}"),
        }
    }

    #[test]
    fn three_entries_verify_and_chain() {
        let d = dir("three");
        let path = log_of(&d, 3);
        let s = verify(&path).expect("verifies");
        assert_eq!(s.entries, 3);
        let chain = read(&path).expect("read");
        assert_eq!(chain.damage, None);
        let e = &chain.entries;
        assert_eq!(e.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(e[0].prev, GENESIS);
        assert_eq!(e[1].prev, e[0].hash);
        assert_eq!(e[2].prev, e[1].hash);
        assert_eq!(s.first_time.as_deref(), Some(e[0].time.as_str()));
        assert_eq!(s.last_time.as_deref(), Some(e[2].time.as_str()));
        assert_eq!(s.last_hash, e[2].hash);
        assert!(e[0].time.ends_with('Z'), "{}", e[0].time);
        assert!(
            humantime::parse_rfc3339(&e[0].time).is_ok(),
            "{}",
            e[0].time
        );
        assert_eq!(e[1].cohort.as_deref(), Some("canary-2"));
        assert_eq!(e[1].details["requests"], Value::from(20));
        let mode = std::fs::metadata(&path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The documented construction, computed here by hand from the line's bytes: an outside
    /// tool can verify without this module.
    #[test]
    fn the_hash_is_sha256_of_prev_and_the_line_without_its_hash() {
        let d = dir("construction");
        let path = log_of(&d, 2);
        let mut prev = GENESIS.to_string();
        for line in lines(&path) {
            let (body, hash) = line.rsplit_once(",\"hash\":\"").expect("hash last");
            let hash = hash.strip_suffix("\"}").expect("ends the object");
            let canonical = format!("{body}}}");
            let mut input = prev.clone().into_bytes();
            input.extend_from_slice(canonical.as_bytes());
            let want = hex(ring::digest::digest(&ring::digest::SHA256, &input).as_ref());
            assert_eq!(hash, want, "{line}");
            assert!(
                canonical.contains(&format!("\"prev\":\"{prev}\"")),
                "{line}"
            );
            // Member order as documented; details' keys sorted.
            assert!(canonical.starts_with("{\"seq\":"), "{line}");
            assert!(
                canonical.contains("\"details\":{\"capture\":\"/tmp/c"),
                "{line}"
            );
            prev = hash.to_string();
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_edited_middle_entry_is_named_as_a_hash_mismatch() {
        let d = dir("edited");
        let path = log_of(&d, 3);
        let mut l = lines(&path);
        assert!(l[1].contains("\"cohort\":\"canary-2\""));
        l[1] = l[1].replace("\"cohort\":\"canary-2\"", "\"cohort\":\"baseline\"");
        write_lines(&path, &l);
        assert_eq!(damage(&path), (2, Damage::HashMismatch));
        let chain = read(&path).expect("read");
        assert_eq!(chain.entries.len(), 1);
        assert_eq!(chain.damage, Some((2, Damage::HashMismatch)));
        // An added member is not covered by the hash: refused too.
        let mut l = lines(&log_of(&d, 3));
        l[2] = l[2].replacen('{', "{\"note\":\"x\",", 1);
        write_lines(&path, &l);
        assert!(matches!(damage(&path), (3, Damage::BadJson(m)) if m.contains("unknown field")));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_deleted_line_is_named_as_a_sequence_gap() {
        let d = dir("deleted");
        let path = log_of(&d, 3);
        let mut l = lines(&path);
        l.remove(1);
        write_lines(&path, &l);
        assert_eq!(
            damage(&path),
            (
                2,
                Damage::SequenceGap {
                    expected: 2,
                    found: 3
                }
            )
        );
        // Deleted and renumbered (hash recomputed over the new seq, prev left): the prev
        // link breaks.
        let mut l = lines(&log_of(&d, 3));
        l.remove(1);
        let mut r: Recorded = serde_json::from_str(&l[1]).expect("json");
        r.seq = 2;
        r.hash = r.expected_hash();
        l[1] = serde_json::to_string(&r).expect("json");
        write_lines(&path, &l);
        assert_eq!(damage(&path), (2, Damage::PrevMismatch));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_truncated_last_line_and_bad_json_are_named() {
        let d = dir("truncated");
        let path = log_of(&d, 3);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, &text[..text.len() - 20]).expect("write");
        assert_eq!(damage(&path), (3, Damage::Truncated));
        assert_eq!(read(&path).expect("read").entries.len(), 2);
        let mut l = lines(&log_of(&d, 3));
        l[0] = "not json".into();
        write_lines(&path, &l);
        assert!(matches!(damage(&path), (1, Damage::BadJson(_))));
        let mut l = lines(&log_of(&d, 3));
        l.insert(2, String::new());
        write_lines(&path, &l);
        assert_eq!(damage(&path), (3, Damage::BadJson("empty line".into())));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn reopening_continues_the_chain() {
        let d = dir("reopen");
        let path = log_of(&d, 2);
        let mut log = AuditLog::open(&path).expect("reopen");
        assert_eq!(log.next_seq(), 3);
        let r = log.append(entry(3)).expect("append");
        let before = read(&path).expect("read").entries;
        assert_eq!(r.seq, 3);
        assert_eq!(r.prev, before[1].hash);
        assert_eq!(verify(&path).expect("verifies").entries, 3);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn opening_a_tampered_log_is_refused_and_leaves_it_alone() {
        let d = dir("tampered");
        let path = log_of(&d, 3);
        let mut l = lines(&path);
        l[0] = l[0].replace("\"bytes\":1001", "\"bytes\":1");
        write_lines(&path, &l);
        let before = std::fs::read(&path).expect("read");
        match AuditLog::open(&path) {
            Err(e @ AuditError::Damaged { line: 1, .. }) => {
                assert!(
                    e.to_string().contains("damaged at line 1: hash mismatch"),
                    "{e}"
                );
            }
            other => panic!("expected damage at line 1, got {other:?}"),
        }
        assert_eq!(std::fs::read(&path).expect("read"), before);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Two writers on one file (as two processes would be): each chains onto the other's
    /// entries; a writer refuses to extend what another made shorter.
    #[test]
    fn two_writers_keep_one_chain() {
        let d = dir("writers");
        let path = d.join("audit.log");
        let mut a = AuditLog::open(&path).expect("open a");
        let mut b = AuditLog::open(&path).expect("open b");
        a.append(entry(1)).expect("a1");
        let b2 = b.append(entry(2)).expect("b2");
        let a3 = a.append(entry(3)).expect("a3");
        assert_eq!((b2.seq, a3.seq), (2, 3));
        assert_eq!(a3.prev, b2.hash);
        assert_eq!(verify(&path).expect("verifies").entries, 3);
        // Threads, each with its own handle (flock is per open file description).
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut log = AuditLog::open(&path).expect("open");
                    for i in 0..5 {
                        log.append(entry(100 * t + i)).expect("append");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(verify(&path).expect("verifies").entries, 23);
        // Cut to its first entry: shorter than what `a` verified.
        write_lines(&path, &lines(&path)[..1]);
        assert!(matches!(
            a.append(entry(9)),
            Err(AuditError::Damaged {
                reason: Damage::Shrunk,
                ..
            })
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn default_path_prefers_the_variable_then_xdg_then_home() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let p = |vars| default_path_from(env(vars)).ok();
        assert_eq!(
            p(&[
                ("BAKEOFF_AUDIT_LOG", "/a/log"),
                ("XDG_STATE_HOME", "/x"),
                ("HOME", "/h")
            ]),
            Some(PathBuf::from("/a/log"))
        );
        assert_eq!(
            p(&[("XDG_STATE_HOME", "/x"), ("HOME", "/h")]),
            Some(PathBuf::from("/x/bakeoff/audit.log"))
        );
        assert_eq!(
            p(&[
                ("BAKEOFF_AUDIT_LOG", ""),
                ("XDG_STATE_HOME", "rel"),
                ("HOME", "/h")
            ]),
            Some(PathBuf::from("/h/.local/state/bakeoff/audit.log"))
        );
        assert!(matches!(
            default_path_from(env(&[])),
            Err(AuditError::NoPath)
        ));
    }
}
