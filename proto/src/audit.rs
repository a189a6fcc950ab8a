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
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn head_path(path: &Path) -> PathBuf {
    path.with_extension("head")
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path`, verifying it first.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (count, last) = if path.exists() {
            verify(path)?
        } else {
            (0, GENESIS.to_string())
        };
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            state: Mutex::new((file, count, last)),
        })
    }

    /// Appends one entry durably (written and fsynced, then the head).
    pub fn record(&self, kind: &str, subject: &str, detail: serde_json::Value) -> Result<(), AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let head = head_path(&self.path);
        let tmp = head.with_extension("head.tmp");
        std::fs::write(&tmp, format!("{seq} {hash}\n"))
            .and_then(|()| File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &head))
            .map_err(|source| AuditError::Io { path: head.clone(), source })?;
        *count = seq;
        *last = hash;
        Ok(())
    }
}

/// Checks every entry of the log at `path` and its head; returns the number
/// of entries and the last hash, or the first entry that fails.
pub fn verify(path: &Path) -> Result<(u64, String), AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let broken = |seq: u64, line: usize, problem: String| AuditError::Broken {
        path: path.to_path_buf(),
        seq,
        line,
        problem,
    };
    let mut prev = GENESIS.to_string();
    let mut count = 0u64;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let expected_seq = count + 1;
        let entry: AuditEntry = serde_json::from_str(&line)
            .map_err(|e| broken(expected_seq, i + 1, format!("not a valid entry ({e})")))?;
        if entry.seq != expected_seq {
            return Err(broken(
                expected_seq,
                i + 1,
                format!("found entry {} where entry {expected_seq} belongs: entries were deleted or reordered", entry.seq),
            ));
        }
        if entry.prev_hash != prev {
            return Err(broken(entry.seq, i + 1, "does not chain to the previous entry: an entry before it was changed or deleted".to_string()));
        }
        let hash = entry_hash(&entry.prev_hash, entry.seq, entry.at_unix_ms, &entry.kind, &entry.subject, &entry.detail);
        if hash != entry.hash {
            return Err(broken(entry.seq, i + 1, "content does not match its hash: the entry was edited".to_string()));
        }
        prev = entry.hash;
        count = entry.seq;
    }
    let head = head_path(path);
    if let Ok(text) = std::fs::read_to_string(&head) {
        let mut parts = text.split_whitespace();
        let head_count: u64 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let head_hash = parts.next().unwrap_or_default();
        if head_count != count || (count > 0 && head_hash != prev) {
            return Err(broken(
                count + 1,
                count as usize + 1,
                format!("the head records {head_count} entries but the log holds {count}: entries were removed from the end"),
            ));
        }
    }
    Ok((count, prev))
}

#[cfg(test)]
mod tests;
