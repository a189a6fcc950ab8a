//! A tamper-evident audit log: an append-only file of JSON lines, each
//! carrying the SHA-256 of the previous line's hash and its own content, so
//! changing or deleting any entry breaks the chain at that entry.
//!
//! The coordinator and every worker keep one (`audit.log` in their data
//! directory) and record what a reviewer must be able to trust: job
//! submissions with their spec hash, approvals and refusals, rounds,
//! updates accepted or rejected with the reason, ε charged. A second file,
//! `audit.head`, holds the number of entries and the last hash, so removing
//! entries from the end is detected too. `meridian audit verify` names the
//! first entry that does not verify.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use meridian_sys::now_ms;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One audit record as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// 1-based position in the log.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: i64,
    /// What happened, e.g. `job.submitted`, `update.rejected`.
    pub kind: String,
    /// Who or what it concerns, e.g. a job id or a site.
    pub subject: String,
    /// Event details as JSON text, hashed exactly as written (re-serializing
    /// parsed JSON would not reproduce every float to the bit).
    pub detail: String,
    /// Hash of the previous entry (64 zeros for the first).
    pub prev_hash: String,
    /// SHA-256 over `prev_hash`, `seq`, `at_unix_ms`, `kind`, `subject` and `detail`.
    pub hash: String,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn entry_hash(prev_hash: &str, seq: u64, at: i64, kind: &str, subject: &str, detail: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(seq.to_le_bytes());
    h.update(at.to_le_bytes());
    for part in [kind, subject, detail] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// An audit log failure.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// I/O on the log file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The log does not verify.
    #[error("{path}: entry {seq} (line {line}): {problem}")]
    Broken {
        /// The file.
        path: PathBuf,
        /// The first entry that fails.
        seq: u64,
        /// Its line.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// An open audit log, appended to under a lock.
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<(File, u64, String)>,
}

fn head_path(path: &Path) -> PathBuf {
    path.with_extension("head")
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path`, verifying it first.
    ///
    /// A daemon killed while recording leaves one of two states, both
    /// repaired here: the last line half written (it is cut off: its event
    /// was never recorded), or the last entry written but the head not yet
    /// updated (the head is rolled forward to it). Anything else that does
    /// not verify is refused.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io { path: path.to_path_buf(), source };
        let (count, last) = if path.exists() {
            let scan = scan(path)?;
            // The head is checked first: a log that fails it keeps every byte as evidence.
            let head = check_head(path, &scan)?;
            if let Some(valid_len) = scan.torn_at {
                let file = OpenOptions::new().write(true).open(path).map_err(io)?;
                file.set_len(valid_len).and_then(|()| file.sync_all()).map_err(io)?;
            }
            if head == HeadState::OneBehind {
                write_head(path, scan.count, &scan.last)?;
            }
            (scan.count, scan.last)
        } else {
            (0, GENESIS.to_string())
        };
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        Ok(AuditLog { path: path.to_path_buf(), state: Mutex::new((file, count, last)) })
    }

    /// Appends one entry durably (written and fsynced, then the head).
    pub fn record(&self, kind: &str, subject: &str, detail: serde_json::Value) -> Result<(), AuditError> {
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        let mut state = meridian_sys::sync::lock(&self.state);
        let (file, count, last) = &mut *state;
        let seq = *count + 1;
        let at = now_ms();
        let detail = detail.to_string();
        let hash = entry_hash(last, seq, at, kind, subject, &detail);
        let entry = AuditEntry {
            seq,
            at_unix_ms: at,
            kind: kind.to_string(),
            subject: subject.to_string(),
            detail,
            prev_hash: last.clone(),
            hash: hash.clone(),
        };
        let mut line = serde_json::to_string(&entry).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        file.write_all(line.as_bytes()).and_then(|()| file.sync_data()).map_err(io)?;
        // The entry is durable: it is part of the chain whether or not the head
        // update below succeeds (a head one behind is repaired at the next open).
        *count = seq;
        *last = hash.clone();
        write_head(&self.path, seq, &hash)
    }
}

/// Writes the head of the log at `path` (count and last hash) atomically.
fn write_head(path: &Path, count: u64, hash: &str) -> Result<(), AuditError> {
    crate::atomic::replace(&head_path(path), format!("{count} {hash}\n").as_bytes(), Default::default())
        .map_err(|e| AuditError::Io { path: e.path, source: e.source })
}

/// What reading a log found: its valid entries and a half-written last line.
struct Scan {
    /// Entries that verify.
    count: u64,
    /// Hash of the last of them (the genesis hash for none).
    last: String,
    /// Hash of the entry before the last.
    before_last: String,
    /// Byte length of the complete lines, when a half-written line follows them.
    torn_at: Option<u64>,
}

/// How the head relates to the log.
#[derive(Debug, PartialEq)]
enum HeadState {
    /// It records exactly the log's entries (or there is no head).
    Matches,
    /// It records all but the last entry: the daemon stopped between the two writes.
    OneBehind,
}

fn broken(path: &Path, seq: u64, line: usize, problem: String) -> AuditError {
    AuditError::Broken { path: path.to_path_buf(), seq, line, problem }
}

/// Checks every complete entry of the log at `path` against the chain.
fn scan(path: &Path) -> Result<Scan, AuditError> {
    let bytes = std::fs::read(path).map_err(|source| AuditError::Io { path: path.to_path_buf(), source })?;
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut prev = GENESIS.to_string();
    let mut before_last = GENESIS.to_string();
    let mut count = 0u64;
    // The complete lines, without the newline that ends the last of them.
    let body = &bytes[..complete.saturating_sub(1)];
    let lines = (complete > 0).then(|| body.split(|b| *b == b'\n')).into_iter().flatten();
    for (i, line) in lines.enumerate() {
        let expected_seq = count + 1;
        let entry: AuditEntry = serde_json::from_slice(line)
            .map_err(|e| broken(path, expected_seq, i + 1, format!("not a valid entry ({e})")))?;
        if entry.seq != expected_seq {
            return Err(broken(
                path,
                expected_seq,
                i + 1,
                format!(
                    "found entry {} where entry {expected_seq} belongs: entries were deleted or reordered",
                    entry.seq
                ),
            ));
        }
        if entry.prev_hash != prev {
            return Err(broken(
                path,
                entry.seq,
                i + 1,
                "does not chain to the previous entry: an entry before it was changed or deleted".to_string(),
            ));
        }
        let hash =
            entry_hash(&entry.prev_hash, entry.seq, entry.at_unix_ms, &entry.kind, &entry.subject, &entry.detail);
        if hash != entry.hash {
            return Err(broken(
                path,
                entry.seq,
                i + 1,
                "content does not match its hash: the entry was edited".to_string(),
            ));
        }
        before_last = std::mem::replace(&mut prev, entry.hash);
        count = entry.seq;
    }
    let torn_at = (complete < bytes.len()).then_some(complete as u64);
    Ok(Scan { count, last: prev, before_last, torn_at })
}

/// Compares the head with the scanned log.
fn check_head(path: &Path, scan: &Scan) -> Result<HeadState, AuditError> {
    let Ok(text) = std::fs::read_to_string(head_path(path)) else {
        return Ok(HeadState::Matches);
    };
    let mut parts = text.split_whitespace();
    let head_count: u64 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let head_hash = parts.next().unwrap_or_default();
    let (count, line) = (scan.count, scan.count as usize + 1);
    if head_count == count && (count == 0 || head_hash == scan.last) {
        return Ok(HeadState::Matches);
    }
    if head_count + 1 == count && (head_count == 0 || head_hash == scan.before_last) {
        return Ok(HeadState::OneBehind);
    }
    let problem = if head_count > count {
        format!("the head records {head_count} entries but the log holds {count}: entries were removed from the end")
    } else if head_count == count {
        format!("the head's hash of entry {count} differs from the log's: the last entry was replaced")
    } else {
        format!(
            "the log holds {count} entries, {} more than its head records: entries were added outside the daemon",
            count - head_count
        )
    };
    Err(broken(path, count + 1, line, problem))
}

/// Checks every entry of the log at `path` and its head; returns the number
/// of entries and the last hash, or the first entry that fails.
///
/// A log whose head is one entry behind is valid (its daemon stopped between
/// writing the entry and the head, and rolls the head forward when it next
/// opens the log); a half-written last line is reported, since the daemon
/// has not yet cut it off.
pub fn verify(path: &Path) -> Result<(u64, String), AuditError> {
    let scan = scan(path)?;
    if scan.torn_at.is_some() {
        return Err(broken(
            path,
            scan.count + 1,
            scan.count as usize + 1,
            "the last line is incomplete: the daemon stopped while writing it, and drops it when it next starts"
                .to_string(),
        ));
    }
    check_head(path, &scan)?;
    Ok((scan.count, scan.last))
}

#[cfg(test)]
mod tests;
