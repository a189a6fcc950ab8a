//! Manual approval of job offers by the hospital, on the worker host.
//!
//! With `approval = "manual"` in the site policy, an offer that passes
//! every automatic check (model, data, sizes, per-job cap and budget) waits
//! here as *pending* until someone runs `meridian site approve JOB` or
//! `meridian site reject JOB --reason R`. An approval binds to the SHA-256
//! of the job spec the site saw: a job whose spec differs is a different
//! offer and needs its own approval. The table lives in the site's database
//! beside the ledger, so the daemon and the command line share it (SQLite
//! WAL handles the two processes).
//!
//! Only decidable offers are shown and decided: the daemon marks the offer
//! it waits on every second, an offer nobody waits on (its job stopped, or
//! the daemon is down until the coordinator offers it again) is not
//! pending, and a decision records who made it and when, for the daemon
//! to write into the site's audit.

use std::path::Path;

use meridian_sys::now_ms;
use rusqlite::{Connection, OptionalExtension, params};

/// Where an offer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalState {
    /// Waiting for a person.
    Pending,
    /// Approved; the daemon decides on the budget and accepts.
    Approved,
    /// Rejected by a person.
    Rejected,
    /// The coordinator stopped the job before anyone decided.
    Stopped,
}

impl ApprovalState {
    /// Its name in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Rejected => "rejected",
            ApprovalState::Stopped => "stopped",
        }
    }

    fn parse(name: &str) -> ApprovalState {
        match name {
            "approved" => ApprovalState::Approved,
            "rejected" => ApprovalState::Rejected,
            "stopped" => ApprovalState::Stopped,
            _ => ApprovalState::Pending,
        }
    }
}

/// An offer put to the hospital.
#[derive(Clone, Debug, PartialEq)]
pub struct Approval {
    /// Job id.
    pub job_id: String,
    /// Hash of the spec the decision binds to.
    pub spec_hash: String,
    /// The spec, as canonical JSON.
    pub spec_json: String,
    /// Who submitted the job (the certificate name the coordinator reported).
    pub submitted_by: String,
    /// Job name.
    pub name: String,
    /// Dataset asked for.
    pub dataset: String,
    /// Model kind.
    pub model: String,
    /// ε the job would spend here, at its δ.
    pub planned_epsilon: f64,
    /// ε the dataset would reach with it, composed with everything spent and reserved.
    pub projected_epsilon: f64,
    /// Where it stands.
    pub state: ApprovalState,
    /// Why it was rejected (kept at the site).
    pub reason: String,
    /// Who decided (`--as`, or the OS user).
    pub decided_by: String,
    /// When (unix ms; 0 before a decision).
    pub decided_at_ms: i64,
}

/// An approval operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// SQLite refused.
    #[error("site database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// No offer with this id was ever put to the site.
    #[error("no offer for job \"{0}\" (see `meridian site pending`)")]
    Unknown(String),
    /// The job was stopped before anyone decided.
    #[error("job \"{0}\" was stopped by the coordinator before it was decided; nothing was recorded")]
    Stopped(String),
    /// Decided already.
    #[error("job \"{job_id}\" was already {state} by {by}; nothing was recorded")]
    Decided {
        /// Job id.
        job_id: String,
        /// approved or rejected.
        state: &'static str,
        /// Who decided.
        by: String,
    },
    /// Pending, but no worker is waiting on it now.
    #[error(
        "the offer of job \"{0}\" is not waiting: the worker is not running, or the job ended while it was down; nothing was recorded"
    )]
    NotWaiting(String),
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

/// Columns later versions added.
const ADDED: [(&str, &str); 6] = [
    ("spec_json", "TEXT NOT NULL DEFAULT ''"),
    ("submitted_by", "TEXT NOT NULL DEFAULT ''"),
    ("projected_epsilon", "REAL NOT NULL DEFAULT 0"),
    ("decided_by", "TEXT NOT NULL DEFAULT ''"),
    ("decided_at_ms", "INTEGER NOT NULL DEFAULT 0"),
    ("waiting_at_ms", "INTEGER NOT NULL DEFAULT 0"),
];

const COLUMNS: &str = "job_id, spec_hash, spec_json, submitted_by, name, dataset, model, planned_epsilon, projected_epsilon, state, reason, decided_by, decided_at_ms";

/// How recently the daemon must have marked an offer for it to count as waiting.
const WAITING_MS: i64 = 5_000;

/// The approvals table in the site database at `path`.
pub struct Approvals {
    conn: std::sync::Mutex<Connection>,
}

impl Approvals {
    /// Opens the site database (the worker's `data_dir/ledger.sqlite`).
    pub fn open(path: &Path) -> Result<Approvals, ApprovalError> {
        let conn = meridian_store::sqlite::open(path)?;
        conn.execute_batch(SCHEMA)?;
        for (column, declaration) in ADDED {
            meridian_store::sqlite::add_column(&conn, "approvals", column, declaration)?;
        }
        Ok(Approvals { conn: std::sync::Mutex::new(conn) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        meridian_sys::sync::lock(&self.conn)
    }

    /// Records an offer as pending (idempotent), marks it as waited on, and
    /// returns its current state.
    pub fn request(&self, a: &Approval) -> Result<Approval, ApprovalError> {
        let conn = self.lock();
        conn.execute(
            "INSERT OR IGNORE INTO approvals (job_id, spec_hash, spec_json, submitted_by, name, dataset, model,
                planned_epsilon, projected_epsilon, state, reason, updated_at_ms, waiting_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', '', ?10, ?10)",
            params![
                a.job_id,
                a.spec_hash,
                a.spec_json,
                a.submitted_by,
                a.name,
                a.dataset,
                a.model,
                a.planned_epsilon,
                a.projected_epsilon,
                now_ms()
            ],
        )?;
        // Offered again (after a restart, or a round of other decisions): a
        // person reads the cost as it is now.
        conn.execute(
            "UPDATE approvals SET planned_epsilon = ?3, projected_epsilon = ?4
             WHERE job_id = ?1 AND spec_hash = ?2 AND state = 'pending'",
            params![a.job_id, a.spec_hash, a.planned_epsilon, a.projected_epsilon],
        )?;
        drop(conn);
        self.waiting(&a.job_id, &a.spec_hash)?.ok_or_else(|| ApprovalError::Unknown(a.job_id.clone()))
    }

    /// Marks the offer as waited on now and returns where it stands.
    pub fn waiting(&self, job_id: &str, spec_hash: &str) -> Result<Option<Approval>, ApprovalError> {
        let conn = self.lock();
        conn.execute(
            "UPDATE approvals SET waiting_at_ms = ?3 WHERE job_id = ?1 AND spec_hash = ?2",
            params![job_id, spec_hash, now_ms()],
        )?;
        Ok(conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM approvals WHERE job_id = ?1 AND spec_hash = ?2"),
                params![job_id, spec_hash],
                row,
            )
            .optional()?)
    }

    /// Offers waiting for a decision that a running worker waits on.
    pub fn pending(&self) -> Result<Vec<Approval>, ApprovalError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE state = 'pending' AND waiting_at_ms >= ?1 ORDER BY updated_at_ms"
        ))?;
        let rows = stmt.query_map(params![now_ms() - WAITING_MS], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The latest offer of `job_id`, whatever its state.
    pub fn latest(&self, job_id: &str) -> Result<Option<Approval>, ApprovalError> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM approvals WHERE job_id = ?1 ORDER BY updated_at_ms DESC LIMIT 1"),
                params![job_id],
                row,
            )
            .optional()?)
    }

    /// Approves (`reject_reason` = None) or rejects the pending offer of
    /// `job_id` as `by`; refused, recording nothing, unless the offer is
    /// pending and a worker waits on it.
    pub fn decide(&self, job_id: &str, reject_reason: Option<&str>, by: &str) -> Result<Approval, ApprovalError> {
        let current = self.latest(job_id)?.ok_or_else(|| ApprovalError::Unknown(job_id.to_string()))?;
        match current.state {
            ApprovalState::Pending => {}
            ApprovalState::Stopped => return Err(ApprovalError::Stopped(job_id.to_string())),
            decided => {
                return Err(ApprovalError::Decided {
                    job_id: job_id.to_string(),
                    state: decided.as_str(),
                    by: current.decided_by,
                });
            }
        }
        let (state, reason) = match reject_reason {
            None => (ApprovalState::Approved, ""),
            Some(r) => (ApprovalState::Rejected, r),
        };
        let now = now_ms();
        let n = self.lock().execute(
            "UPDATE approvals SET state = ?3, reason = ?4, decided_by = ?5, decided_at_ms = ?6, updated_at_ms = ?6
             WHERE job_id = ?1 AND spec_hash = ?2 AND state = 'pending' AND waiting_at_ms >= ?7",
            params![job_id, current.spec_hash, state.as_str(), reason, by, now, now - WAITING_MS],
        )?;
        if n == 0 {
            return Err(ApprovalError::NotWaiting(job_id.to_string()));
        }
        self.latest(job_id)?.ok_or_else(|| ApprovalError::Unknown(job_id.to_string()))
    }

    /// Marks every pending offer of `job_id` stopped (the coordinator ended the job).
    pub fn stop(&self, job_id: &str) -> Result<(), ApprovalError> {
        self.lock().execute(
            "UPDATE approvals SET state = 'stopped', updated_at_ms = ?2 WHERE job_id = ?1 AND state = 'pending'",
            params![job_id, now_ms()],
        )?;
        Ok(())
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
    Ok(Approval {
        job_id: r.get(0)?,
        spec_hash: r.get(1)?,
        spec_json: r.get(2)?,
        submitted_by: r.get(3)?,
        name: r.get(4)?,
        dataset: r.get(5)?,
        model: r.get(6)?,
        planned_epsilon: r.get(7)?,
        projected_epsilon: r.get(8)?,
        state: ApprovalState::parse(&r.get::<_, String>(9)?),
        reason: r.get(10)?,
        decided_by: r.get(11)?,
        decided_at_ms: r.get(12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(job: &str) -> Approval {
        Approval {
            job_id: job.to_string(),
            spec_hash: format!("hash-of-{job}"),
            spec_json: "{}".to_string(),
            submitted_by: "alice".to_string(),
            name: "n".to_string(),
            dataset: "d".to_string(),
            model: "mlp".to_string(),
            planned_epsilon: 0.5,
            projected_epsilon: 0.7,
            state: ApprovalState::Pending,
            reason: String::new(),
            decided_by: String::new(),
            decided_at_ms: 0,
        }
    }

    #[test]
    fn only_offers_a_worker_waits_on_are_decided_and_decisions_name_their_author() {
        let dir = tempfile::tempdir().unwrap();
        let a = Approvals::open(&dir.path().join("site.sqlite")).unwrap();
        a.request(&offer("job-1")).unwrap();
        a.request(&offer("job-2")).unwrap();
        assert_eq!(a.pending().unwrap().len(), 2);
        // job-2 was stopped: no longer pending, and deciding it records nothing.
        a.stop("job-2").unwrap();
        assert_eq!(a.pending().unwrap().iter().map(|p| p.job_id.as_str()).collect::<Vec<_>>(), ["job-1"]);
        assert!(matches!(a.decide("job-2", None, "rita"), Err(ApprovalError::Stopped(_))));
        assert_eq!(a.latest("job-2").unwrap().unwrap().state, ApprovalState::Stopped);
        // An offer nobody has waited on for a while is not decidable.
        a.lock().execute("UPDATE approvals SET waiting_at_ms = 0 WHERE job_id = 'job-1'", []).unwrap();
        assert!(a.pending().unwrap().is_empty());
        assert!(matches!(a.decide("job-1", None, "rita"), Err(ApprovalError::NotWaiting(_))));
        assert_eq!(a.latest("job-1").unwrap().unwrap().state, ApprovalState::Pending);
        // Waited on again: decided, with who and when.
        a.waiting("job-1", "hash-of-job-1").unwrap();
        let decided = a.decide("job-1", Some("not now"), "rita").unwrap();
        assert_eq!((decided.state, decided.decided_by.as_str()), (ApprovalState::Rejected, "rita"));
        assert!(decided.decided_at_ms > 0);
        assert!(matches!(a.decide("job-1", None, "sam"), Err(ApprovalError::Decided { by, .. }) if by == "rita"));
        assert!(matches!(a.decide("job-9", None, "sam"), Err(ApprovalError::Unknown(_))));
    }
}
