//! Manual approval of job offers by the hospital's IT, on the worker host.
//!
//! With `approval = "manual"` in the site policy, an offer that passes the
//! automatic checks waits here as *pending* until someone runs
//! `meridian site approve JOB` or `meridian site reject JOB --reason R`.
//! An approval binds to the SHA-256 of the job spec the site saw: a job
//! whose spec differs is a different offer and needs its own approval. The
//! table lives in the site's database beside the ledger, so the daemon and
//! the command line share it (SQLite WAL handles the two processes).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

/// A pending, approved or rejected offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Approval {
    /// Job id.
    pub job_id: String,
    /// Hash of the spec the decision binds to.
    pub spec_hash: String,
    /// Job name.
    pub name: String,
    /// Dataset asked for.
    pub dataset: String,
    /// Model kind.
    pub model: String,
    /// ε the job would spend here, at its δ.
    pub planned_epsilon: f64,
    /// pending, approved or rejected.
    pub state: String,
    /// Why it was rejected.
    pub reason: String,
}

/// An approval operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// SQLite refused.
    #[error("site database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// No pending offer with this id.
    #[error("no pending offer for job \"{0}\" (see `meridian site pending`)")]
    NotPending(String),
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS approvals (
    job_id TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    name TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    planned_epsilon REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, spec_hash)
)";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The approvals table in the site database at `path`.
pub struct Approvals {
    conn: std::sync::Mutex<Connection>,
}

impl Approvals {
    /// Opens the site database (the worker's `data_dir/ledger.sqlite`).
    pub fn open(path: &Path) -> Result<Approvals, ApprovalError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Approvals {
            conn: std::sync::Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an offer as pending (idempotent) and returns its current state.
    pub fn request(&self, a: &Approval) -> Result<Approval, ApprovalError> {
        let conn = self.lock();
        conn.execute(
            "INSERT OR IGNORE INTO approvals (job_id, spec_hash, name, dataset, model, planned_epsilon, state, reason, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', '', ?7)",
            params![a.job_id, a.spec_hash, a.name, a.dataset, a.model, a.planned_epsilon, now_ms()],
        )?;
        Self::get(&conn, &a.job_id, &a.spec_hash)?.ok_or_else(|| ApprovalError::NotPending(a.job_id.clone()))
    }

    fn get(conn: &Connection, job_id: &str, spec_hash: &str) -> Result<Option<Approval>, ApprovalError> {
        Ok(conn
            .query_row(
                "SELECT job_id, spec_hash, name, dataset, model, planned_epsilon, state, reason FROM approvals WHERE job_id = ?1 AND spec_hash = ?2",
                params![job_id, spec_hash],
                row,
            )
            .optional()?)
    }

    /// The state of the offer of `job_id` with `spec_hash`.
    pub fn state(&self, job_id: &str, spec_hash: &str) -> Result<Option<Approval>, ApprovalError> {
        Self::get(&self.lock(), job_id, spec_hash)
    }

    /// Offers waiting for a decision.
    pub fn pending(&self) -> Result<Vec<Approval>, ApprovalError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT job_id, spec_hash, name, dataset, model, planned_epsilon, state, reason FROM approvals WHERE state = 'pending' ORDER BY updated_at_ms",
        )?;
        let rows = stmt.query_map([], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Approves (`reason` = None) or rejects the pending offer of `job_id`.
    pub fn decide(&self, job_id: &str, reject_reason: Option<&str>) -> Result<Approval, ApprovalError> {
        let conn = self.lock();
        let (state, reason) = match reject_reason {
            None => ("approved", ""),
            Some(r) => ("rejected", r),
        };
        let n = conn.execute(
            "UPDATE approvals SET state = ?2, reason = ?3, updated_at_ms = ?4 WHERE job_id = ?1 AND state = 'pending'",
            params![job_id, state, reason, now_ms()],
        )?;
        if n == 0 {
            return Err(ApprovalError::NotPending(job_id.to_string()));
        }
        let mut stmt = conn.prepare(
            "SELECT job_id, spec_hash, name, dataset, model, planned_epsilon, state, reason FROM approvals WHERE job_id = ?1 ORDER BY updated_at_ms DESC LIMIT 1",
        )?;
        let a = stmt.query_row(params![job_id], row)?;
        Ok(a)
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
    Ok(Approval {
        job_id: r.get(0)?,
        spec_hash: r.get(1)?,
        name: r.get(2)?,
        dataset: r.get(3)?,
        model: r.get(4)?,
        planned_epsilon: r.get(5)?,
        state: r.get(6)?,
        reason: r.get(7)?,
    })
}
