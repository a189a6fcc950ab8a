//! The site's privacy ledger and budget, in the site's own SQLite database.
//!
//! The hospital, not the data scientist, enforces privacy: a job is accepted
//! only if its planned ε fits both the per-job cap and what the dataset has
//! left, and the job's remaining planned steps stay reserved until it ends,
//! so two jobs racing for the last of a budget cannot both get it. Every
//! round's ε is committed here (WAL, `synchronous = FULL`) before the update
//! leaves the site. The ledger table is append-only: triggers refuse
//! UPDATE and DELETE. Spent ε is always the RDP composition of every entry,
//! never a sum of ε values.

use std::path::Path;
use std::sync::Mutex;

use privacy::accountant::RdpAccountant;
use proto::pb;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::config::DatasetConfig;
use crate::outgoing::Refusal;
use proto::reason::ReasonCode;

/// A ledger failure.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite refused.
    #[error("ledger database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The accountant refused the parameters.
    #[error("accountant: {0}")]
    Accountant(String),
    /// The charge would exceed the dataset's budget.
    #[error("dataset \"{dataset}\": charging round {round} of {job_id} would spend ε {after:.4} of a budget of {budget:.4}")]
    OverBudget {
        /// Dataset.
        dataset: String,
        /// Job.
        job_id: String,
        /// Round.
        round: u32,
        /// ε after the charge.
        after: f64,
        /// The budget.
        budget: f64,
    },
}

/// The mechanism of one round at one site.
#[derive(Clone, Debug)]
pub struct Charge {
    /// Job id.
    pub job_id: String,
    /// Hash of the job spec the site approved.
    pub spec_hash: String,
    /// Round.
    pub round: u32,
    /// σ.
    pub noise_multiplier: f64,
    /// q.
    pub sample_rate: f64,
    /// C.
    pub clip_norm: f64,
    /// DP-SGD steps.
    pub steps: u64,
    /// δ of the job.
    pub delta: f64,
}

/// A site's decision on a job offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Why the job was refused; `None` when it was accepted.
    pub refusal: Option<Refusal>,
    /// ε the job would spend at the job's δ (DP-SGD and the count release).
    pub planned_epsilon: f64,
    /// The training-set size released with noise (0 when refused).
    pub train_examples: u64,
}

/// The count release that goes with an offer: the true training-set size
/// and the noise scale the job asks for.
#[derive(Clone, Copy, Debug)]
pub struct CountRelease {
    /// Training rows at the site.
    pub examples: u64,
    /// Standard deviation of the discrete Gaussian noise.
    pub noise_scale: f64,
}

/// The site's ledger database.
pub struct Ledger {
    conn: Mutex<Connection>,
    site: String,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    dataset TEXT NOT NULL,
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    spec_hash TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    clip_norm REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    epsilon_round REAL NOT NULL,
    epsilon_job REAL NOT NULL,
    epsilon_dataset REAL NOT NULL,
    accountant TEXT NOT NULL,
    conversion TEXT NOT NULL,
    library_version TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    UNIQUE (job_id, round)
);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    planned_steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    planned_epsilon REAL NOT NULL,
    noisy_examples INTEGER NOT NULL DEFAULT 0,
    active INTEGER NOT NULL,
    decided_at_ms INTEGER NOT NULL,
    code TEXT NOT NULL DEFAULT ''
);
"#;

/// The accountant named in ledger entries.
pub const ACCOUNTANT: &str = "rdp";
/// The conversion named in ledger entries.
pub const CONVERSION: &str = "dp_accounting-improved";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<pb::LedgerEntry> {
    Ok(pb::LedgerEntry {
        seq: r.get::<_, i64>(0)? as u64,
        site: r.get(1)?,
        dataset: r.get(2)?,
        job_id: r.get(3)?,
        round: r.get(4)?,
        spec_hash: r.get(5)?,
        noise_multiplier: r.get(6)?,
        sample_rate: r.get(7)?,
        clip_norm: r.get(8)?,
        steps: r.get::<_, i64>(9)? as u64,
        delta: r.get(10)?,
        epsilon_round: r.get(11)?,
        epsilon_job: r.get(12)?,
        epsilon_dataset: r.get(13)?,
        accountant: r.get(14)?,
        conversion: r.get(15)?,
        library_version: r.get(16)?,
        recorded_at_unix_ms: r.get(17)?,
    })
}

const ENTRY_COLUMNS: &str = "seq, site, dataset, job_id, round, spec_hash, noise_multiplier, sample_rate, clip_norm, steps, delta, epsilon_round, epsilon_job, epsilon_dataset, accountant, conversion, library_version, recorded_at_ms";

/// The recorded decision on a job, if any.
fn read_decision(conn: &Connection, job_id: &str) -> Result<Option<Decision>, LedgerError> {
    Ok(conn
        .query_row(
            "SELECT accepted, reason, planned_epsilon, noisy_examples, code FROM jobs WHERE job_id = ?1",
            params![job_id],
            |r| {
                let refusal = (r.get::<_, i64>(0)? != 1).then(|| -> rusqlite::Result<Refusal> {
                    let code = ReasonCode::parse(&r.get::<_, String>(4)?).unwrap_or(ReasonCode::Internal);
                    Ok(Refusal::new(code, r.get::<_, String>(1)?))
                });
                Ok(Decision {
                    refusal: refusal.transpose()?,
                    planned_epsilon: r.get(2)?,
                    train_examples: r.get::<_, i64>(3)? as u64,
                })
            },
        )
        .optional()?)
}

/// ε a job plans at `delta`: its DP-SGD steps and one count release.
pub fn planned_epsilon(sample_rate: f64, noise_multiplier: f64, steps: u64, count_noise_scale: f64, delta: f64) -> Result<f64, LedgerError> {
    compose([(sample_rate, noise_multiplier, steps), (1.0, count_noise_scale, 1)], delta)
}

/// ε of `(q, σ, steps)` triples composed by RDP at `delta` (0 when empty).
fn compose(items: impl IntoIterator<Item = (f64, f64, u64)>, delta: f64) -> Result<f64, LedgerError> {
    let mut acc = RdpAccountant::new();
    let mut any = false;
    for (q, sigma, steps) in items {
        if steps > 0 {
            acc.compose_poisson_gaussian(q, sigma, steps)
                .map_err(|e| LedgerError::Accountant(e.to_string()))?;
            any = true;
        }
    }
    if !any {
        return Ok(0.0);
    }
    acc.epsilon(delta).map(|e| e.epsilon).map_err(|e| LedgerError::Accountant(e.to_string()))
}

/// Brings a database written by an earlier version up to [`SCHEMA`].
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    add_column(conn, "jobs", "code", "TEXT NOT NULL DEFAULT ''")
}

/// Adds `column` to `table` unless it is there (ALTER TABLE ADD COLUMN
/// changes no row, so the ledger's append-only triggers do not object).
fn add_column(conn: &Connection, table: &str, column: &str, declaration: &str) -> rusqlite::Result<()> {
    let present: bool = conn.query_row(
        &format!("SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"),
        params![column],
        |r| r.get(0),
    )?;
    if !present {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {declaration}"))?;
    }
    Ok(())
}

impl Ledger {
    /// Opens (creating if needed) the ledger of `site` at `path`.
    pub fn open(path: &Path, site: &str) -> Result<Ledger, LedgerError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Ledger {
            conn: Mutex::new(conn),
            site: site.to_string(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// (q, σ, steps) of every entry charged to `dataset`.
    fn charged(tx: &Connection, dataset: &str) -> Result<Vec<(f64, f64, u64)>, LedgerError> {
        let mut stmt = tx.prepare("SELECT sample_rate, noise_multiplier, steps FROM ledger WHERE dataset = ?1")?;
        let rows = stmt
            .query_map(params![dataset], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Steps still reserved by accepted, unfinished jobs on `dataset`, except `except_job`.
    fn reserved(tx: &Connection, dataset: &str, except_job: &str) -> Result<Vec<(f64, f64, u64)>, LedgerError> {
        let mut stmt = tx.prepare(
            "SELECT j.sample_rate, j.noise_multiplier,
                    j.planned_steps - COALESCE((SELECT SUM(l.steps) FROM ledger l WHERE l.job_id = j.job_id AND l.round > 0), 0)
             FROM jobs j WHERE j.dataset = ?1 AND j.accepted = 1 AND j.active = 1 AND j.job_id != ?2",
        )?;
        let rows = stmt
            .query_map(params![dataset, except_job], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?.max(0) as u64))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The recorded decision on a job, if any.
    pub fn decision(&self, job_id: &str) -> Result<Option<Decision>, LedgerError> {
        read_decision(&self.lock(), job_id)
    }

    /// Decides a job offer against the dataset's budget and records the
    /// decision; an accepted job reserves its planned steps. Serialized by
    /// an immediate transaction, so concurrent offers see each other.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        dataset: &DatasetConfig,
        job_id: &str,
        spec_hash: &str,
        spec_json: &str,
        sample_rate: f64,
        noise_multiplier: f64,
        planned_steps: u64,
        delta: f64,
        count: CountRelease,
    ) -> Result<Decision, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing = read_decision(&tx, job_id)?;
        if let Some(d) = existing {
            return Ok(d);
        }
        // The job is its DP-SGD steps plus one Gaussian release of the training-set size.
        let job_items = [(sample_rate, noise_multiplier, planned_steps), (1.0, count.noise_scale, 1)];
        let planned = compose(job_items, delta)?;
        let mut committed = Self::charged(&tx, &dataset.name)?;
        committed.extend(Self::reserved(&tx, &dataset.name, job_id)?);
        let spent = compose(committed.iter().copied(), dataset.budget_delta)?;
        committed.extend(job_items);
        let after = compose(committed, dataset.budget_delta)?;
        let remaining = (dataset.budget_epsilon - spent).max(0.0);
        let decision = if planned > dataset.job_epsilon_cap {
            Decision {
                refusal: Some(Refusal::new(
                    ReasonCode::JobCapExceeded,
                    format!(
                        "dataset \"{}\": planned ε {planned:.3} exceeds the per-job cap ε {:.3} (δ = {delta:e})",
                        dataset.name, dataset.job_epsilon_cap
                    ),
                )),
                planned_epsilon: planned,
                train_examples: 0,
            }
        } else if after > dataset.budget_epsilon {
            Decision {
                refusal: Some(Refusal::new(
                    ReasonCode::BudgetExceeded,
                    format!(
                        "dataset \"{}\": planned ε {planned:.3} exceeds the remaining budget ε {remaining:.3} (of {:.3} at δ = {:e})",
                        dataset.name, dataset.budget_epsilon, dataset.budget_delta
                    ),
                )),
                planned_epsilon: planned,
                train_examples: 0,
            }
        } else {
            let released = privacy::release::release_count(count.examples, count.noise_scale)
                .map_err(|e| LedgerError::Accountant(e.to_string()))?;
            Decision { refusal: None, planned_epsilon: planned, train_examples: released.value }
        };
        let accepted = decision.refusal.is_none();
        let (code, detail) = decision
            .refusal
            .as_ref()
            .map_or(("", ""), |r| (r.reason.code().as_str(), r.detail.as_str()));
        tx.execute(
            "INSERT INTO jobs (job_id, dataset, spec_hash, spec_json, accepted, reason, noise_multiplier, sample_rate, planned_steps, delta, planned_epsilon, active, decided_at_ms, noisy_examples, code)
             VALUES (?1, ?2, ?3, ?12, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?4, ?11, ?13, ?14)",
            params![
                job_id,
                dataset.name,
                spec_hash,
                i64::from(accepted),
                detail,
                noise_multiplier,
                sample_rate,
                planned_steps as i64,
                delta,
                decision.planned_epsilon,
                now_ms(),
                spec_json,
                decision.train_examples as i64,
                code
            ],
        )?;
        if accepted {
            // Round 0 of the job: the count release, charged before the answer leaves.
            let release = Charge {
                job_id: job_id.to_string(),
                spec_hash: spec_hash.to_string(),
                round: 0,
                noise_multiplier: count.noise_scale,
                sample_rate: 1.0,
                clip_norm: 1.0,
                steps: 1,
                delta,
            };
            self.insert_charge(&tx, dataset, &release)?;
        }
        tx.commit()?;
        Ok(decision)
    }

    /// The spec (canonical JSON) and its hash of an accepted job that has not
    /// ended: what a restarted worker needs to carry on with it.
    pub fn accepted_job(&self, job_id: &str) -> Result<Option<(String, String)>, LedgerError> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                "SELECT spec_json, spec_hash FROM jobs WHERE job_id = ?1 AND accepted = 1 AND active = 1",
                params![job_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Releases a job's reservation (it completed, failed or was cancelled).
    pub fn finish_job(&self, job_id: &str) -> Result<(), LedgerError> {
        self.lock().execute("UPDATE jobs SET active = 0 WHERE job_id = ?1", params![job_id])?;
        Ok(())
    }

    /// The entry of a job's round, if it was charged.
    pub fn entry(&self, job_id: &str, round: u32) -> Result<Option<pb::LedgerEntry>, LedgerError> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!("SELECT {ENTRY_COLUMNS} FROM ledger WHERE job_id = ?1 AND round = ?2"),
                params![job_id, round],
                entry_from_row,
            )
            .optional()?)
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Result<Vec<pb::LedgerEntry>, LedgerError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("SELECT {ENTRY_COLUMNS} FROM ledger ORDER BY seq"))?;
        let rows = stmt.query_map([], entry_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// ε spent on `dataset` at `delta`, composing every entry.
    pub fn spent(&self, dataset: &str, delta: f64) -> Result<f64, LedgerError> {
        let conn = self.lock();
        compose(Self::charged(&conn, dataset)?, delta)
    }

    /// Commits one round's charge durably and returns the entry. Refuses a
    /// charge that would take the dataset over its budget; charging a round
    /// again returns the entry already committed.
    pub fn charge(&self, dataset: &DatasetConfig, c: &Charge) -> Result<pb::LedgerEntry, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let entry = self.insert_charge(&tx, dataset, c)?;
        tx.commit()?;
        Ok(entry)
    }

    /// Inserts a charge inside `tx` (or returns the one already there).
    fn insert_charge(&self, tx: &Connection, dataset: &DatasetConfig, c: &Charge) -> Result<pb::LedgerEntry, LedgerError> {
        if let Some(existing) = tx
            .query_row(
                &format!("SELECT {ENTRY_COLUMNS} FROM ledger WHERE job_id = ?1 AND round = ?2"),
                params![c.job_id, c.round],
                entry_from_row,
            )
            .optional()?
        {
            return Ok(existing);
        }
        let epsilon_round = compose([(c.sample_rate, c.noise_multiplier, c.steps)], c.delta)?;
        let mut job_items: Vec<(f64, f64, u64)> = {
            let mut stmt = tx.prepare("SELECT sample_rate, noise_multiplier, steps FROM ledger WHERE job_id = ?1")?;
            stmt.query_map(params![c.job_id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        job_items.push((c.sample_rate, c.noise_multiplier, c.steps));
        let epsilon_job = compose(job_items, c.delta)?;
        let mut dataset_items = Self::charged(tx, &dataset.name)?;
        dataset_items.push((c.sample_rate, c.noise_multiplier, c.steps));
        let epsilon_dataset = compose(dataset_items, dataset.budget_delta)?;
        if epsilon_dataset > dataset.budget_epsilon {
            return Err(LedgerError::OverBudget {
                dataset: dataset.name.clone(),
                job_id: c.job_id.clone(),
                round: c.round,
                after: epsilon_dataset,
                budget: dataset.budget_epsilon,
            });
        }
        tx.execute(
            "INSERT INTO ledger (site, dataset, job_id, round, spec_hash, noise_multiplier, sample_rate, clip_norm, steps, delta,
                epsilon_round, epsilon_job, epsilon_dataset, accountant, conversion, library_version, recorded_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                self.site,
                dataset.name,
                c.job_id,
                c.round,
                c.spec_hash,
                c.noise_multiplier,
                c.sample_rate,
                c.clip_norm,
                c.steps as i64,
                c.delta,
                epsilon_round,
                epsilon_job,
                epsilon_dataset,
                ACCOUNTANT,
                CONVERSION,
                concat!("meridian-privacy ", env!("CARGO_PKG_VERSION")),
                now_ms()
            ],
        )?;
        Ok(tx.query_row(
            &format!("SELECT {ENTRY_COLUMNS} FROM ledger WHERE seq = last_insert_rowid()"),
            [],
            entry_from_row,
        )?)
    }
}

#[cfg(test)]
mod tests;
