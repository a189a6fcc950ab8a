//! The coordinator's durable state in SQLite: jobs and their sites, rounds,
//! received updates, evaluations, registered sites and datasets, and the
//! mirror of every site's privacy ledger.
//!
//! The database runs in WAL mode with `synchronous = FULL`, so a committed
//! transaction survives `kill -9` and power loss. Every state change is one
//! transaction; nothing is acknowledged to a peer before its commit.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use meridian_spec::evaluation::Histogram;
use meridian_spec::job::JobSpec;
use meridian_spec::reason::SiteReason;
use meridian_store::sqlite::{self, LEDGER_COLUMNS};
use meridian_sys::now_ms;
use meridian_wire::pb;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored value that no longer parses (a corrupted row).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What failed to parse.
        detail: String,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

mod applications;

pub use applications::{ApplicationRow, DecisionRow};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Offered to sites, waiting for their answers.
    Offering,
    /// Training rounds in progress.
    Running,
    /// Collecting the final model's held-out metrics.
    Evaluating,
    /// Done; the final model is available.
    Completed,
    /// Stopped with a reason.
    Failed,
    /// Cancelled by a scientist.
    Cancelled,
}

impl JobState {
    /// Its name in the database and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Offering => "offering",
            JobState::Running => "running",
            JobState::Evaluating => "evaluating",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Result<JobState> {
        Ok(match s {
            "offering" => JobState::Offering,
            "running" => JobState::Running,
            "evaluating" => JobState::Evaluating,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => {
                return Err(StoreError::Corrupt { table: "jobs", detail: format!("state \"{other}\"") });
            }
        })
    }

    /// Whether the job will change no more.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }
}

/// Where a site stands in a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteState {
    /// Offered the job, not answered yet.
    Offered,
    /// Accepted the job: it takes part in every round.
    Accepted,
    /// Refused the offer.
    Refused,
    /// Reported a failure; it takes no further part.
    Failed,
}

impl SiteState {
    /// Its name in the database and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteState::Offered => "offered",
            SiteState::Accepted => "accepted",
            SiteState::Refused => "refused",
            SiteState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<SiteState> {
        Ok(match s {
            "offered" => SiteState::Offered,
            "accepted" => SiteState::Accepted,
            "refused" => SiteState::Refused,
            "failed" => SiteState::Failed,
            other => {
                return Err(StoreError::Corrupt { table: "job_sites", detail: format!("state \"{other}\"") });
            }
        })
    }
}

/// Where a round is, as the scientist reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundState {
    /// The initial model, before any round (evaluated only).
    Initial,
    /// In progress: updates are arriving.
    Open,
    /// Closed: its updates were folded into the next model.
    Aggregated,
}

impl RoundState {
    /// Its name in the database and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RoundState::Initial => "initial",
            RoundState::Open => "open",
            RoundState::Aggregated => "aggregated",
        }
    }
}

/// A job as stored.
#[derive(Clone, Debug)]
pub struct JobRow {
    /// Job id.
    pub id: String,
    /// The validated spec.
    pub spec: JobSpec,
    /// Hash of the spec's canonical JSON.
    pub spec_hash: String,
    /// Certificate name of the submitter.
    pub submitted_by: String,
    /// Current state.
    pub state: JobState,
    /// Why it failed or was cancelled.
    pub reason: String,
    /// The round in progress (0 before the first).
    pub current_round: u32,
    /// Attempt of the current round (1-based).
    pub attempt: u32,
    /// When the current phase stops waiting (unix ms).
    pub deadline_ms: i64,
    /// Parameters of the model.
    pub num_params: u64,
    /// Layout hash of the model.
    pub layout_hash: String,
    /// Submission time.
    pub submitted_at_ms: i64,
    /// Last change.
    pub updated_at_ms: i64,
}

/// What became of an update offered to [`Store::insert_update`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// Stored: it counts in its round.
    Inserted,
    /// The site already sent its update for this round.
    Duplicate,
    /// The round closed (or the job ended) while the update was arriving.
    RoundClosed,
}

/// An aggregated round: its number, the attempt that closed it, and the
/// example-weighted mean of the sites' training metrics.
pub type ClosedRound = (u32, u32, BTreeMap<String, f64>);

/// A site's standing in a job.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSiteRow {
    /// Site name.
    pub site: String,
    /// Where it stands.
    pub state: SiteState,
    /// Why it refused or failed, rendered from its code and columns.
    pub reason: String,
    /// The site's reason code (`schema_mismatch`), empty when none.
    pub reason_code: String,
    /// The job spec's columns the code concerns.
    pub reason_columns: Vec<String>,
    /// ε the dataset would reach with the job, as the site computed it.
    pub projected_epsilon: f64,
    /// ε the site planned for the whole job.
    pub planned_epsilon: f64,
    /// Training examples at the site.
    pub train_examples: u64,
}

/// A received, durable update.
#[derive(Clone, Debug)]
pub struct UpdateRow {
    /// Site that sent it.
    pub site: String,
    /// Its FedAvg weight: the site's released training-set size.
    pub num_examples: u64,
    /// What the site released beside the update's values.
    pub released: RoundRelease,
    /// File holding the update's values.
    pub path: String,
}

/// What a site released with a round's update: its clip count and, from a
/// site whose policy releases them, exact training metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoundRelease {
    /// The round's released count of clipped examples.
    pub clipped: Option<i64>,
    /// The examples the round's steps took in expectation (steps · q · Ñ):
    /// the clip count's denominator.
    pub clip_denominator: f64,
    /// Exact training metrics (policy `release_exact_metrics` only).
    pub exact: BTreeMap<String, f64>,
}

/// A site's evaluation of a global model, as released.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvaluationRow {
    /// The global model's round.
    pub round: u32,
    /// Reporting site.
    pub site: String,
    /// The noised score × label histogram.
    pub histogram: Histogram,
    /// The standard deviation of each cell's noise.
    pub noise_scale: f64,
    /// Exact held-out metrics (policy `release_exact_metrics` only).
    pub exact: BTreeMap<String, f64>,
}

/// A dataset a site announced.
#[derive(Clone, Debug)]
pub struct DatasetRow {
    /// Site name.
    pub site: String,
    /// The announcement.
    pub info: pb::DatasetInfo,
}

/// The coordinator's database.
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    submitted_by TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    current_round INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 1,
    deadline_ms INTEGER NOT NULL,
    num_params INTEGER NOT NULL,
    layout_hash TEXT NOT NULL,
    submitted_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS job_sites (
    job_id TEXT NOT NULL,
    site TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    planned_epsilon REAL NOT NULL DEFAULT 0,
    train_examples INTEGER NOT NULL DEFAULT 0,
    reason_code TEXT NOT NULL DEFAULT '',
    reason_columns TEXT NOT NULL DEFAULT '[]',
    projected_epsilon REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, site)
);
CREATE TABLE IF NOT EXISTS updates (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    path TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, round, site)
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    train_metrics_json TEXT NOT NULL DEFAULT '{}',
    closed_at_ms INTEGER,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS evaluations (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    PRIMARY KEY (job_id, round, site)
);
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    software_version TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    policy BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS datasets (
    site TEXT NOT NULL,
    name TEXT NOT NULL,
    info BLOB NOT NULL,
    PRIMARY KEY (site, name)
);
CREATE TABLE IF NOT EXISTS ledger_mirror (
    site TEXT NOT NULL,
    seq INTEGER NOT NULL,
    dataset TEXT NOT NULL,
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
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
    spec_hash TEXT NOT NULL,
    mechanism TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (site, seq)
);
"#;

/// A protobuf message stored as a blob in `table`.
fn decode<T: prost::Message + Default>(blob: &[u8], table: &'static str) -> Result<T> {
    T::decode(blob).map_err(|e| StoreError::Corrupt { table, detail: e.to_string() })
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string())
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str, table: &'static str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt { table, detail: e.to_string() })
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = sqlite::open(path)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(applications::SCHEMA)?;
        sqlite::add_column(&conn, "job_sites", "reason_code", "TEXT NOT NULL DEFAULT ''")?;
        sqlite::add_column(&conn, "job_sites", "reason_columns", "TEXT NOT NULL DEFAULT '[]'")?;
        sqlite::add_column(&conn, "ledger_mirror", "mechanism", "TEXT NOT NULL DEFAULT ''")?;
        sqlite::add_column(&conn, "job_sites", "projected_epsilon", "REAL NOT NULL DEFAULT 0")?;
        sqlite::add_column(&conn, "sites", "policy", "BLOB NOT NULL DEFAULT x''")?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = meridian_sys::sync::lock(&self.conn);
        f(&mut conn)
    }

    /// Records a new job and offers it to `sites`, in one transaction.
    pub fn insert_job(&self, job: &JobRow, sites: &[String]) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO jobs (id, spec_json, spec_hash, submitted_by, state, reason, current_round, attempt, deadline_ms, num_params, layout_hash, submitted_at_ms, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    job.id,
                    job.spec.canonical_json(),
                    job.spec_hash,
                    job.submitted_by,
                    job.state.as_str(),
                    job.reason,
                    job.current_round,
                    job.attempt,
                    job.deadline_ms,
                    job.num_params as i64,
                    job.layout_hash,
                    job.submitted_at_ms,
                    job.updated_at_ms
                ],
            )?;
            for site in sites {
                tx.execute(
                    "INSERT INTO job_sites (job_id, site, state) VALUES (?1, ?2, ?3)",
                    params![job.id, site, SiteState::Offered.as_str()],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawJobRow> {
        Ok(RawJobRow {
            id: row.get(0)?,
            spec_json: row.get(1)?,
            spec_hash: row.get(2)?,
            submitted_by: row.get(3)?,
            state: row.get(4)?,
            reason: row.get(5)?,
            current_round: row.get(6)?,
            attempt: row.get(7)?,
            deadline_ms: row.get(8)?,
            num_params: row.get::<_, i64>(9)? as u64,
            layout_hash: row.get(10)?,
            submitted_at_ms: row.get(11)?,
            updated_at_ms: row.get(12)?,
        })
    }

    fn finish_job(raw: RawJobRow) -> Result<JobRow> {
        let spec = JobSpec::from_canonical_json(&raw.spec_json)
            .map_err(|e| StoreError::Corrupt { table: "jobs", detail: e.to_string() })?;
        Ok(JobRow {
            id: raw.id,
            spec,
            spec_hash: raw.spec_hash,
            submitted_by: raw.submitted_by,
            state: JobState::parse(&raw.state)?,
            reason: raw.reason,
            current_round: raw.current_round,
            attempt: raw.attempt,
            deadline_ms: raw.deadline_ms,
            num_params: raw.num_params,
            layout_hash: raw.layout_hash,
            submitted_at_ms: raw.submitted_at_ms,
            updated_at_ms: raw.updated_at_ms,
        })
    }

    const JOB_COLUMNS: &'static str = "id, spec_json, spec_hash, submitted_by, state, reason, current_round, attempt, deadline_ms, num_params, layout_hash, submitted_at_ms, updated_at_ms";

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<JobRow>> {
        let raw = self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {} FROM jobs WHERE id = ?1", Self::JOB_COLUMNS),
                params![id],
                Self::job_from_row,
            )
            .optional()?)
        })?;
        raw.map(Self::finish_job).transpose()
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Result<Vec<JobRow>> {
        let raws = self.with(|c| {
            let mut stmt =
                c.prepare(&format!("SELECT {} FROM jobs ORDER BY submitted_at_ms DESC, id", Self::JOB_COLUMNS))?;
            let rows = stmt.query_map([], Self::job_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        raws.into_iter().map(Self::finish_job).collect()
    }

    /// Moves a job to a new state and phase.
    pub fn update_job(
        &self,
        id: &str,
        state: JobState,
        reason: &str,
        current_round: u32,
        attempt: u32,
        deadline_ms: i64,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET state = ?2, reason = ?3, current_round = ?4, attempt = ?5, deadline_ms = ?6, updated_at_ms = ?7 WHERE id = ?1",
                params![id, state.as_str(), reason, current_round, attempt, deadline_ms, now_ms()],
            )?;
            Ok(())
        })
    }

    /// The sites of a job.
    pub fn job_sites(&self, job_id: &str) -> Result<Vec<JobSiteRow>> {
        let rows = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT site, state, reason, planned_epsilon, train_examples, reason_code, reason_columns, projected_epsilon FROM job_sites WHERE job_id = ?1 ORDER BY site",
            )?;
            let rows = stmt
                .query_map(params![job_id], |r| {
                    Ok(RawJobSiteRow {
                        site: r.get(0)?,
                        state: r.get(1)?,
                        reason: r.get(2)?,
                        planned_epsilon: r.get(3)?,
                        train_examples: r.get::<_, i64>(4)? as u64,
                        reason_code: r.get(5)?,
                        reason_columns: r.get(6)?,
                        projected_epsilon: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter().map(RawJobSiteRow::parse).collect()
    }

    /// `site`'s row of a job, if the site accepted the job and still takes part.
    pub fn participant(&self, job_id: &str, site: &str) -> Result<Option<JobSiteRow>> {
        Ok(self.job_sites(job_id)?.into_iter().find(|s| s.site == site && s.state == SiteState::Accepted))
    }

    /// Records a site's answer or failure; returns false if the site was not offered the job.
    pub fn set_job_site(
        &self,
        job_id: &str,
        site: &str,
        state: SiteState,
        reason: Option<&SiteReason>,
        cost: Option<(f64, f64)>,
        train_examples: Option<u64>,
    ) -> Result<bool> {
        let (planned_epsilon, projected_epsilon) = (cost.map(|c| c.0), cost.map(|c| c.1));
        let text = reason.map(SiteReason::to_string).unwrap_or_default();
        let code = reason.map_or("", |r| r.code().as_str());
        let columns = to_json(&reason.map_or(&[][..], |r| r.columns()));
        self.with(|c| {
            let n = c.execute(
                "UPDATE job_sites SET state = ?3, reason = ?4,
                    planned_epsilon = COALESCE(?5, planned_epsilon),
                    train_examples = COALESCE(?6, train_examples),
                    reason_code = ?7, reason_columns = ?8,
                    projected_epsilon = COALESCE(?9, projected_epsilon)
                 WHERE job_id = ?1 AND site = ?2",
                params![
                    job_id,
                    site,
                    state.as_str(),
                    text,
                    planned_epsilon,
                    train_examples.map(|n| n as i64),
                    code,
                    columns,
                    projected_epsilon
                ],
            )?;
            Ok(n == 1)
        })
    }

    /// Records a durable update; false if this site already sent one for the round.
    pub fn insert_update(&self, job_id: &str, round: u32, row: &UpdateRow) -> Result<Insert> {
        self.with(|c| {
            // Only while the round is still open: an update that finished
            // arriving after its round closed is refused, never acknowledged
            // and left uncounted.
            let n = c.execute(
                "INSERT OR IGNORE INTO updates (job_id, round, site, num_examples, metrics_json, path, received_at_ms)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
                 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?1 AND state = 'running' AND current_round = ?2)",
                params![job_id, round, row.site, row.num_examples as i64, to_json(&row.released), row.path, now_ms()],
            )?;
            if n == 1 {
                return Ok(Insert::Inserted);
            }
            let duplicate: bool = c.query_row(
                "SELECT EXISTS (SELECT 1 FROM updates WHERE job_id = ?1 AND round = ?2 AND site = ?3)",
                params![job_id, round, row.site],
                |r| r.get(0),
            )?;
            Ok(if duplicate { Insert::Duplicate } else { Insert::RoundClosed })
        })
    }

    /// The updates received for a round.
    pub fn updates(&self, job_id: &str, round: u32) -> Result<Vec<UpdateRow>> {
        let rows = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT site, num_examples, metrics_json, path FROM updates WHERE job_id = ?1 AND round = ?2 ORDER BY site",
            )?;
            let rows = stmt
                .query_map(params![job_id, round], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(site, n, m, path)| {
                Ok(UpdateRow { site, num_examples: n as u64, released: from_json(&m, "updates")?, path })
            })
            .collect()
    }

    /// Closes round `round` (aggregated, with its training metrics) and moves
    /// the job to its next phase, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub fn advance_round(
        &self,
        job_id: &str,
        round: u32,
        attempt: u32,
        metrics: &BTreeMap<String, f64>,
        next_state: JobState,
        next_round: u32,
        deadline_ms: i64,
    ) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO rounds (job_id, round, state, attempt, train_metrics_json, closed_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![job_id, round, RoundState::Aggregated.as_str(), attempt, to_json(metrics), now_ms()],
            )?;
            tx.execute(
                "UPDATE jobs SET state = ?2, current_round = ?3, attempt = 1, deadline_ms = ?4, updated_at_ms = ?5 WHERE id = ?1",
                params![job_id, next_state.as_str(), next_round, deadline_ms, now_ms()],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Aggregated rounds of a job: (round, attempt, train metrics).
    pub fn closed_rounds(&self, job_id: &str) -> Result<Vec<ClosedRound>> {
        let rows = self.with(|c| {
            let mut stmt =
                c.prepare("SELECT round, attempt, train_metrics_json FROM rounds WHERE job_id = ?1 ORDER BY round")?;
            let rows = stmt
                .query_map(params![job_id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?)))?
                .collect::<rusqlite::Result<Vec<(u32, u32, String)>>>()?;
            Ok(rows)
        })?;
        rows.into_iter().map(|(r, a, m)| Ok((r, a, from_json(&m, "rounds")?))).collect()
    }

    /// Records a released evaluation; false if already reported.
    pub fn insert_evaluation(&self, job_id: &str, row: &EvaluationRow) -> Result<bool> {
        let examples: i64 = row.histogram.cells().iter().sum();
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO evaluations (job_id, round, site, num_examples, metrics_json) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![job_id, row.round, row.site, examples.max(0), to_json(row)],
            )?;
            Ok(n == 1)
        })
    }

    /// Every evaluation of a job.
    pub fn evaluations(&self, job_id: &str) -> Result<Vec<EvaluationRow>> {
        let rows = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT round, site, num_examples, metrics_json FROM evaluations WHERE job_id = ?1 ORDER BY round, site",
            )?;
            let rows = stmt
                .query_map(params![job_id], |r| {
                    Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(round, site, _, m)| Ok(EvaluationRow { round, site, ..from_json(&m, "evaluations")? }))
            .collect()
    }

    /// Records a site's registration: its version, policy and datasets (replacing earlier ones).
    pub fn register_site(
        &self,
        site: &str,
        version: &str,
        policy: &pb::SitePolicy,
        datasets: &[pb::DatasetInfo],
    ) -> Result<()> {
        use prost::Message;
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO sites (name, software_version, last_seen_ms, policy) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET software_version = ?2, last_seen_ms = ?3, policy = ?4",
                params![site, version, now_ms(), policy.encode_to_vec()],
            )?;
            tx.execute("DELETE FROM datasets WHERE site = ?1", params![site])?;
            for d in datasets {
                tx.execute(
                    "INSERT INTO datasets (site, name, info) VALUES (?1, ?2, ?3)",
                    params![site, d.name, d.encode_to_vec()],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Updates a site's last-seen time.
    pub fn touch_site(&self, site: &str) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE sites SET last_seen_ms = ?2 WHERE name = ?1", params![site, now_ms()])?;
            Ok(())
        })
    }

    /// When each registered site was last heard from (unix ms).
    pub fn last_seen(&self) -> Result<std::collections::HashMap<String, i64>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT name, last_seen_ms FROM sites")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<rusqlite::Result<std::collections::HashMap<_, _>>>()?;
            Ok(rows)
        })
    }

    /// Every registered site's announced policy.
    pub fn policies(&self) -> Result<std::collections::HashMap<String, pb::SitePolicy>> {
        Ok(self.decoded_by_site("SELECT name, policy FROM sites", "sites")?.into_iter().collect())
    }

    /// Whether `site`'s announced policy lets it send exact metrics beside
    /// its released ones (kept only then).
    pub fn releases_exact_metrics(&self, site: &str) -> Result<bool> {
        Ok(self.policies()?.get(site).is_some_and(|p| p.release_exact_metrics))
    }

    /// Every dataset announced by every site.
    pub fn datasets(&self) -> Result<Vec<DatasetRow>> {
        let rows = self.decoded_by_site("SELECT site, info FROM datasets ORDER BY site, name", "datasets")?;
        Ok(rows.into_iter().map(|(site, info)| DatasetRow { site, info }).collect())
    }

    /// The (site, message) pairs of a query selecting a site's name and a
    /// stored message, in the query's order.
    fn decoded_by_site<T: prost::Message + Default>(&self, sql: &str, table: &'static str) -> Result<Vec<(String, T)>> {
        let rows = self.with(|c| {
            let mut stmt = c.prepare(sql)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter().map(|(site, blob)| Ok((site, decode(&blob, table)?))).collect()
    }

    /// Mirrors the entries `site` sent with a message about `job_id` that
    /// are its own and that job's, whatever the job's state: a site's
    /// committed charge is spent even when the message it came with is refused.
    pub fn mirror_own(&self, site: &str, job_id: &str, entries: &[pb::LedgerEntry]) -> Result<()> {
        let own: Vec<pb::LedgerEntry> =
            entries.iter().filter(|e| e.site == site && e.job_id == job_id).cloned().collect();
        if !own.is_empty() {
            self.mirror_ledger(site, &own)?;
        }
        Ok(())
    }

    /// Mirrors ledger entries of `site` (idempotent by sequence number).
    pub fn mirror_ledger(&self, site: &str, entries: &[pb::LedgerEntry]) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            for e in entries {
                tx.execute(
                    "INSERT OR IGNORE INTO ledger_mirror (site, seq, dataset, job_id, round, noise_multiplier, sample_rate, clip_norm, steps, delta,
                        epsilon_round, epsilon_job, epsilon_dataset, accountant, conversion, library_version, recorded_at_ms, spec_hash, mechanism)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
                    params![
                        site,
                        e.seq as i64,
                        e.dataset,
                        e.job_id,
                        e.round,
                        e.noise_multiplier,
                        e.sample_rate,
                        e.clip_norm,
                        e.steps as i64,
                        e.delta,
                        e.epsilon_round,
                        e.epsilon_job,
                        e.epsilon_dataset,
                        e.accountant,
                        e.conversion,
                        e.library_version,
                        e.recorded_at_unix_ms,
                        e.spec_hash,
                        e.charged().as_str()
                    ],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// (entries, highest sequence number) of `site` in the mirror.
    pub fn mirrored(&self, site: &str) -> Result<(u64, u64)> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM ledger_mirror WHERE site = ?1",
                params![site],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )?)
        })
    }

    /// Mirrored ledger entries, filtered by site and dataset when non-empty.
    pub fn ledger(&self, site: &str, dataset: &str) -> Result<Vec<pb::LedgerEntry>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {LEDGER_COLUMNS} FROM ledger_mirror WHERE (?1 = '' OR site = ?1) AND (?2 = '' OR dataset = ?2) \
                 ORDER BY site, seq"
            ))?;
            let rows =
                stmt.query_map(params![site, dataset], sqlite::ledger_entry)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }
}

/// A job row as SQLite returns it, before its spec and state are parsed.
struct RawJobRow {
    id: String,
    spec_json: String,
    spec_hash: String,
    submitted_by: String,
    state: String,
    reason: String,
    current_round: u32,
    attempt: u32,
    deadline_ms: i64,
    num_params: u64,
    layout_hash: String,
    submitted_at_ms: i64,
    updated_at_ms: i64,
}

/// A job's site as SQLite returns it, before its state and columns are parsed.
struct RawJobSiteRow {
    site: String,
    state: String,
    reason: String,
    planned_epsilon: f64,
    train_examples: u64,
    reason_code: String,
    reason_columns: String,
    projected_epsilon: f64,
}

impl RawJobSiteRow {
    fn parse(self) -> Result<JobSiteRow> {
        Ok(JobSiteRow {
            site: self.site,
            state: SiteState::parse(&self.state)?,
            reason: self.reason,
            reason_code: self.reason_code,
            reason_columns: from_json(&self.reason_columns, "job_sites")?,
            projected_epsilon: self.projected_epsilon,
            planned_epsilon: self.planned_epsilon,
            train_examples: self.train_examples,
        })
    }
}
