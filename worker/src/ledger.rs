//! The site's privacy ledger and budget, in the site's own SQLite database.
//!
//! The hospital, not the data scientist, enforces privacy: a job is accepted
//! only if its planned ε fits both the per-job cap and what the dataset has
//! left, and the job's remaining planned charges stay reserved until it
//! ends, so two jobs racing for the last of a budget cannot both get it.
//! Every release is committed here (WAL, `synchronous = FULL`) before it
//! leaves the site: a DP-SGD round, a round's clip count, an evaluation, the
//! dataset's sizes. The ledger table is append-only: triggers refuse UPDATE
//! and DELETE. Spent ε is always the RDP composition of every entry, never a
//! sum of ε values.
//!
//! A dataset's training and test sizes are released once, with discrete
//! Gaussian noise, and again only when its records change
//! ([`Ledger::release_sizes`]); every job on it plans its sampling rate and
//! steps from that release, so nothing about the exact row count leaves.

mod schema;

use std::path::Path;
use std::sync::Mutex;

use meridian_spec::job::{PlannedCharge, SitePlan};
use meridian_spec::mechanism::Mechanism;
use meridian_spec::reason::ReasonCode;
use meridian_store::sqlite::{self, LEDGER_COLUMNS};
use meridian_sys::now_ms;
use meridian_wire::pb;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::config::DatasetConfig;
use crate::dataset::SplitSizes;
use crate::outgoing::Refusal;

/// A ledger failure.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite refused.
    #[error("ledger database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The accountant refused the parameters.
    #[error("accountant: {0}")]
    Accountant(String),
    /// OpenDP refused a release.
    #[error("release: {0}")]
    Release(#[from] meridian_privacy::release::ReleaseError),
    /// The charge would exceed the dataset's budget.
    #[error(
        "dataset \"{dataset}\": charging {mechanism} of round {round} of {job_id} would bring it to ε {after:.4} (composed), over its budget of {budget:.4}"
    )]
    OverBudget {
        /// Dataset.
        dataset: String,
        /// Job (empty for a size release).
        job_id: String,
        /// Round.
        round: u32,
        /// What was to be charged.
        mechanism: Mechanism,
        /// ε after the charge.
        after: f64,
        /// The budget.
        budget: f64,
    },
    /// A charge the job's accepted plan does not hold: a round or a release
    /// the site never agreed to (a coordinator asking for more).
    #[error(
        "job {job_id}: charging {mechanism} at σ {noise_multiplier} for round {round} would go past the plan the site accepted"
    )]
    BeyondPlan {
        /// Job.
        job_id: String,
        /// Round.
        round: u32,
        /// What was to be charged.
        mechanism: Mechanism,
        /// At which noise.
        noise_multiplier: f64,
    },
    /// A stored plan that no longer parses.
    #[error("job {job_id}: stored plan is unreadable: {detail}")]
    CorruptPlan {
        /// Job.
        job_id: String,
        /// What failed.
        detail: String,
    },
}

/// One release at one site, to be charged.
#[derive(Clone, Debug)]
pub struct Charge {
    /// Job id (empty for a dataset's size release).
    pub job_id: String,
    /// Hash of the job spec the site approved.
    pub spec_hash: String,
    /// Round (the release's number for a size release).
    pub round: u32,
    /// What is released.
    pub mechanism: Mechanism,
    /// σ, in units of the sensitivity.
    pub noise_multiplier: f64,
    /// q.
    pub sample_rate: f64,
    /// C (1 for a count).
    pub clip_norm: f64,
    /// Compositions.
    pub steps: u64,
    /// δ of the job.
    pub delta: f64,
}

/// A site's decision on a job offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Why the job was refused; `None` when it was accepted.
    pub refusal: Option<Refusal>,
    /// ε the job would spend at the job's δ.
    pub planned_epsilon: f64,
    /// ε the dataset would reach at its budget's δ with this job, composed
    /// with everything charged and reserved.
    pub projected_epsilon: f64,
    /// The released training-set size the job was planned with.
    pub train_examples: u64,
}

/// The offer a decision is on: which job, which exact spec, from whom.
#[derive(Clone, Copy, Debug)]
pub struct Offered<'a> {
    /// Job id.
    pub job_id: &'a str,
    /// SHA-256 of the spec's canonical JSON.
    pub spec_hash: &'a str,
    /// The spec's canonical JSON.
    pub spec_json: &'a str,
    /// The scientist who submitted it.
    pub submitted_by: &'a str,
}

/// A decision as the site's jobs table keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// Job id.
    pub job_id: String,
    /// Its dataset.
    pub dataset: String,
    /// The spec's hash.
    pub spec_hash: String,
    /// The spec's canonical JSON.
    pub spec_json: String,
    /// Who submitted it (empty for decisions older than this column).
    pub submitted_by: String,
    /// Whether it was accepted.
    pub accepted: bool,
    /// Whether it is accepted and has not ended (its plan reserved).
    pub active: bool,
    /// When it was decided.
    pub decided_at_ms: i64,
}

/// A dataset's sizes as released, and what they were released from.
#[derive(Clone, Debug, PartialEq)]
pub struct SizeRelease {
    /// Which release of the dataset's sizes (1, 2, ...).
    pub release: u32,
    /// Released training rows (noised, then clamped at 0).
    pub train_rows: u64,
    /// Released test rows (noised, then clamped at 0).
    pub test_rows: u64,
    /// The exact counts, which never leave the site.
    pub exact: SplitSizes,
    /// The records changed since this release, but the budget (with what
    /// running jobs have reserved) could not take a new one.
    pub stale: bool,
    /// The ledger entry that charged it.
    pub ledger_seq: u64,
}

/// The site's ledger database.
pub struct Ledger {
    conn: Mutex<Connection>,
    site: String,
}

/// The accountant named in ledger entries.
pub const ACCOUNTANT: &str = "rdp";
/// The conversion named in ledger entries.
pub const CONVERSION: &str = "dp_accounting-improved";

/// The recorded decision on a job, if any.
fn read_decision(conn: &Connection, job_id: &str) -> Result<Option<Decision>, LedgerError> {
    Ok(conn
        .query_row(
            "SELECT accepted, reason, planned_epsilon, noisy_examples, code, projected_epsilon FROM jobs WHERE job_id = ?1",
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
                    projected_epsilon: r.get(5)?,
                })
            },
        )
        .optional()?)
}

/// (q, σ, steps) of a planned or committed charge, as the accountant takes it.
type Item = (f64, f64, u64);

fn item(c: &PlannedCharge) -> Item {
    (c.sample_rate, c.noise_multiplier, c.steps)
}

/// ε of the whole `plan` at `delta`.
pub fn planned_epsilon(plan: &SitePlan, delta: f64) -> Result<f64, LedgerError> {
    compose(plan.charges.iter().map(item), delta)
}

/// ε of `(q, σ, steps)` triples composed by RDP at `delta` (0 when empty).
fn compose(items: impl IntoIterator<Item = Item>, delta: f64) -> Result<f64, LedgerError> {
    meridian_privacy::accountant::composed_epsilon(items, delta).map_err(|e| LedgerError::Accountant(e.to_string()))
}

/// A plan as the jobs table keeps it.
fn plan_json(plan: &SitePlan) -> String {
    let charges: Vec<_> = plan
        .charges
        .iter()
        .map(|c| serde_json::json!([c.mechanism.as_str(), c.sample_rate, c.noise_multiplier, c.steps]))
        .collect();
    serde_json::Value::Array(charges).to_string()
}

/// The planned charges stored for `job_id`.
fn parse_plan(job_id: &str, json: &str) -> Result<Vec<PlannedCharge>, LedgerError> {
    let corrupt = |detail: String| LedgerError::CorruptPlan { job_id: job_id.to_string(), detail };
    let rows: Vec<(String, f64, f64, u64)> = serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))?;
    rows.into_iter()
        .map(|(m, sample_rate, noise_multiplier, steps)| {
            let mechanism = Mechanism::parse(&m).ok_or_else(|| corrupt(format!("mechanism \"{m}\"")))?;
            Ok(PlannedCharge { mechanism, sample_rate, noise_multiplier, steps })
        })
        .collect()
}

impl Ledger {
    /// Opens (creating or migrating if needed) the ledger of `site` at `path`.
    pub fn open(path: &Path, site: &str) -> Result<Ledger, LedgerError> {
        let mut conn = sqlite::open(path)?;
        schema::prepare(&mut conn)?;
        Ok(Ledger { conn: Mutex::new(conn), site: site.to_string() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        meridian_sys::sync::lock(&self.conn)
    }

    /// (q, σ, steps) of every entry charged to `dataset`.
    fn charged(tx: &Connection, dataset: &str) -> Result<Vec<Item>, LedgerError> {
        let mut stmt = tx.prepare("SELECT sample_rate, noise_multiplier, steps FROM ledger WHERE dataset = ?1")?;
        let rows = stmt
            .query_map(params![dataset], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// What accepted, unfinished jobs on `dataset` (but `except_job`) have
    /// planned and not yet charged, mechanism by mechanism.
    fn reserved(tx: &Connection, dataset: &str, except_job: &str) -> Result<Vec<Item>, LedgerError> {
        let mut stmt = tx.prepare(
            "SELECT job_id, plan_json, sample_rate, noise_multiplier, planned_steps FROM jobs
             WHERE dataset = ?1 AND accepted = 1 AND active = 1 AND job_id != ?2",
        )?;
        let jobs = stmt
            .query_map(params![dataset, except_job], |r| {
                let legacy = PlannedCharge {
                    mechanism: Mechanism::DpSgd,
                    sample_rate: r.get(2)?,
                    noise_multiplier: r.get(3)?,
                    steps: r.get::<_, i64>(4)? as u64,
                };
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, legacy))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut reserved = Vec::new();
        for (job_id, json, legacy) in jobs {
            // A job decided before plans were stored planned DP-SGD steps only.
            let planned = if json.is_empty() { vec![legacy] } else { parse_plan(&job_id, &json)? };
            let mut charged = std::collections::BTreeMap::new();
            let mut stmt = tx.prepare("SELECT mechanism, steps FROM ledger WHERE job_id = ?1")?;
            for row in stmt.query_map(params![job_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))? {
                let (mechanism, steps) = row?;
                if let Some(m) = Mechanism::parse(&mechanism) {
                    *charged.entry(m).or_insert(0) += steps;
                }
            }
            reserved.extend(meridian_spec::job::remaining(&planned, &charged).iter().map(item));
        }
        Ok(reserved)
    }

    /// The recorded decision on a job, if any.
    pub fn decision(&self, job_id: &str) -> Result<Option<Decision>, LedgerError> {
        read_decision(&self.lock(), job_id)
    }

    /// Decides a job offer planned as `plan` against the dataset's cap and
    /// budget and records the decision; an accepted job reserves its plan.
    /// Serialized by an immediate transaction, so concurrent offers see
    /// each other. A job already decided gets the same decision again.
    pub fn decide(
        &self,
        dataset: &DatasetConfig,
        offer: &Offered<'_>,
        plan: &SitePlan,
        delta: f64,
    ) -> Result<Decision, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(d) = read_decision(&tx, offer.job_id)? {
            return Ok(d);
        }
        let decision = Self::assess(&tx, dataset, offer.job_id, plan, delta)?;
        Self::record(&tx, dataset, offer, plan, delta, &decision)?;
        tx.commit()?;
        Ok(decision)
    }

    /// Records that the hospital refused `offer` (a person rejected it):
    /// the decision stands like any other, and the job reserves nothing.
    pub fn refuse(
        &self,
        dataset: &DatasetConfig,
        offer: &Offered<'_>,
        plan: &SitePlan,
        delta: f64,
        refusal: &Refusal,
    ) -> Result<Decision, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(d) = read_decision(&tx, offer.job_id)? {
            return Ok(d);
        }
        let assessed = Self::assess(&tx, dataset, offer.job_id, plan, delta)?;
        let decision = Decision { refusal: Some(refusal.clone()), ..assessed };
        Self::record(&tx, dataset, offer, plan, delta, &decision)?;
        tx.commit()?;
        Ok(decision)
    }

    /// What [`Ledger::decide`] would decide now, recording nothing: the
    /// offer a person is asked to approve is one the budget allows.
    pub fn preview(
        &self,
        dataset: &DatasetConfig,
        job_id: &str,
        plan: &SitePlan,
        delta: f64,
    ) -> Result<Decision, LedgerError> {
        let conn = self.lock();
        if let Some(d) = read_decision(&conn, job_id)? {
            return Ok(d);
        }
        Self::assess(&conn, dataset, job_id, plan, delta)
    }

    /// The decision on `plan` against the cap and what the dataset has charged and reserved.
    fn assess(
        tx: &Connection,
        dataset: &DatasetConfig,
        job_id: &str,
        plan: &SitePlan,
        delta: f64,
    ) -> Result<Decision, LedgerError> {
        let planned = planned_epsilon(plan, delta)?;
        let mut committed = Self::charged(tx, &dataset.name)?;
        committed.extend(Self::reserved(tx, &dataset.name, job_id)?);
        committed.extend(plan.charges.iter().map(item));
        let projected = compose(committed, dataset.budget_delta)?;
        let refusal = if planned > dataset.job_epsilon_cap {
            Some(Refusal::new(
                ReasonCode::JobCapExceeded,
                format!(
                    "dataset \"{}\": planned ε {planned:.3} exceeds the per-job cap ε {:.3} (δ = {delta:e})",
                    dataset.name, dataset.job_epsilon_cap
                ),
            ))
        } else if projected > dataset.budget_epsilon {
            Some(Refusal::new(
                ReasonCode::BudgetExceeded,
                format!(
                    "dataset \"{}\": this job (planned ε {planned:.3}) would bring the dataset to ε {projected:.3}, composed with everything spent and reserved, over its budget of ε {:.3} at δ = {:e}",
                    dataset.name, dataset.budget_epsilon, dataset.budget_delta
                ),
            ))
        } else {
            None
        };
        Ok(Decision {
            refusal,
            planned_epsilon: planned,
            projected_epsilon: projected,
            train_examples: plan.train_rows,
        })
    }

    /// Records `decision` on `job_id` in the jobs table (its plan reserved if accepted).
    fn record(
        tx: &Connection,
        dataset: &DatasetConfig,
        offer: &Offered<'_>,
        plan: &SitePlan,
        delta: f64,
        decision: &Decision,
    ) -> Result<(), LedgerError> {
        let accepted = decision.refusal.is_none();
        let (code, detail) =
            decision.refusal.as_ref().map_or(("", ""), |r| (r.reason.code().as_str(), r.detail.as_str()));
        let dp_sgd = plan.charges.iter().find(|c| c.mechanism == Mechanism::DpSgd);
        tx.execute(
            "INSERT INTO jobs (job_id, dataset, spec_hash, spec_json, accepted, reason, noise_multiplier, sample_rate,
                planned_steps, delta, planned_epsilon, active, decided_at_ms, noisy_examples, code, plan_json, projected_epsilon,
                submitted_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?5, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                offer.job_id,
                dataset.name,
                offer.spec_hash,
                offer.spec_json,
                i64::from(accepted),
                detail,
                dp_sgd.map_or(0.0, |c| c.noise_multiplier),
                plan.sample_rate,
                dp_sgd.map_or(0, |c| c.steps) as i64,
                delta,
                decision.planned_epsilon,
                now_ms(),
                plan.train_rows as i64,
                code,
                plan_json(plan),
                decision.projected_epsilon,
                offer.submitted_by
            ],
        )?;
        Ok(())
    }

    /// Every decision this site recorded, newest first.
    pub fn decisions(&self) -> Result<Vec<JobRecord>, LedgerError> {
        self.job_records("1 = 1", "")
    }

    /// The decision recorded on `job_id`, if any.
    pub fn job_record(&self, job_id: &str) -> Result<Option<JobRecord>, LedgerError> {
        Ok(self.job_records("job_id = ?1", job_id)?.pop())
    }

    fn job_records(&self, filter: &str, job_id: &str) -> Result<Vec<JobRecord>, LedgerError> {
        let conn = self.lock();
        let sql = format!(
            "SELECT job_id, dataset, spec_hash, spec_json, submitted_by, accepted, active, decided_at_ms FROM jobs
             WHERE {filter} ORDER BY decided_at_ms DESC"
        );
        let mut stmt = conn.prepare(&sql)?;
        let read = |r: &rusqlite::Row<'_>| {
            Ok(JobRecord {
                job_id: r.get(0)?,
                dataset: r.get(1)?,
                spec_hash: r.get(2)?,
                spec_json: r.get(3)?,
                submitted_by: r.get(4)?,
                accepted: r.get::<_, i64>(5)? == 1,
                active: r.get::<_, i64>(6)? == 1,
                decided_at_ms: r.get(7)?,
            })
        };
        let rows = if filter.contains("?1") {
            stmt.query_map(params![job_id], read)?.collect::<rusqlite::Result<Vec<_>>>()?
        } else {
            stmt.query_map([], read)?.collect::<rusqlite::Result<Vec<_>>>()?
        };
        Ok(rows)
    }

    /// ε of every entry of `job_id` composed at `delta`.
    pub fn job_spent(&self, job_id: &str, delta: f64) -> Result<f64, LedgerError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT sample_rate, noise_multiplier, steps FROM ledger WHERE job_id = ?1")?;
        let items = stmt
            .query_map(params![job_id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        compose(items, delta)
    }

    /// ε the dataset reaches at its budget's δ with everything charged and
    /// every accepted, unfinished job's remaining plan, composed.
    pub fn committed(&self, dataset: &DatasetConfig) -> Result<f64, LedgerError> {
        let conn = self.lock();
        let mut items = Self::charged(&conn, &dataset.name)?;
        items.extend(Self::reserved(&conn, &dataset.name, "")?);
        compose(items, dataset.budget_delta)
    }

    /// The dataset's sizes as released for `sizes`: the latest release if
    /// it was made from the same records and split, otherwise a new one,
    /// noised with the dataset's `size_noise_scale` and charged in the
    /// same transaction. Refused (and nothing released) if the charge would
    /// take the dataset over its budget.
    pub fn release_sizes(&self, dataset: &DatasetConfig, sizes: &SplitSizes) -> Result<SizeRelease, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let latest = Self::latest_release(&tx, &dataset.name)?;
        if let Some((release, digest, fraction, seed)) = &latest
            && *digest == sizes.digest
            && *fraction == dataset.test_fraction
            && *seed == dataset.split_seed
        {
            return Self::size_release(&tx, &dataset.name, *release)?
                .ok_or_else(|| LedgerError::Sql(rusqlite::Error::QueryReturnedNoRows));
        }
        // A new release must leave room for what running jobs have reserved;
        // when it cannot, the last release stands (for older records).
        let mut items = Self::charged(&tx, &dataset.name)?;
        items.extend(Self::reserved(&tx, &dataset.name, "")?);
        items.push((1.0, dataset.size_noise_scale, 1));
        if compose(items, dataset.budget_delta)? > dataset.budget_epsilon
            && let Some((release, ..)) = &latest
        {
            let last = Self::size_release(&tx, &dataset.name, *release)?;
            return last
                .map(|r| SizeRelease { stale: true, ..r })
                .ok_or(LedgerError::Sql(rusqlite::Error::QueryReturnedNoRows));
        }
        let release = latest.map_or(1, |(r, ..)| r + 1);
        let noisy = meridian_privacy::release::release_counts(&[sizes.train, sizes.test], dataset.size_noise_scale)?;
        // Post-processing: a size is not negative.
        let (train_rows, test_rows) = (noisy.values[0].max(0) as u64, noisy.values[1].max(0) as u64);
        let charge = Charge {
            job_id: String::new(),
            spec_hash: String::new(),
            round: release,
            mechanism: Mechanism::SizeRelease,
            noise_multiplier: dataset.size_noise_scale,
            sample_rate: 1.0,
            clip_norm: 1.0,
            steps: 1,
            delta: dataset.budget_delta,
        };
        let entry = self.insert_charge(&tx, dataset, &charge)?;
        tx.execute(
            "INSERT INTO size_releases (dataset, release, digest, test_fraction, split_seed, exact_train, exact_test,
                train_rows, test_rows, noise_scale, ledger_seq, released_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                dataset.name,
                release,
                sizes.digest,
                dataset.test_fraction,
                dataset.split_seed as i64,
                sizes.train as i64,
                sizes.test as i64,
                train_rows as i64,
                test_rows as i64,
                dataset.size_noise_scale,
                entry.seq as i64,
                now_ms()
            ],
        )?;
        tx.commit()?;
        Ok(SizeRelease { release, train_rows, test_rows, exact: sizes.clone(), ledger_seq: entry.seq, stale: false })
    }

    /// (release, digest, test fraction, split seed) of the dataset's latest size release.
    fn latest_release(tx: &Connection, dataset: &str) -> Result<Option<(u32, String, f64, u64)>, LedgerError> {
        Ok(tx
            .query_row(
                "SELECT release, digest, test_fraction, split_seed FROM size_releases WHERE dataset = ?1
                 ORDER BY release DESC LIMIT 1",
                params![dataset],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64)),
            )
            .optional()?)
    }

    fn size_release(tx: &Connection, dataset: &str, release: u32) -> Result<Option<SizeRelease>, LedgerError> {
        Ok(tx
            .query_row(
                "SELECT release, train_rows, test_rows, digest, exact_train, exact_test, ledger_seq FROM size_releases
                 WHERE dataset = ?1 AND release = ?2",
                params![dataset, release],
                |r| {
                    Ok(SizeRelease {
                        release: r.get(0)?,
                        train_rows: r.get::<_, i64>(1)? as u64,
                        test_rows: r.get::<_, i64>(2)? as u64,
                        exact: SplitSizes {
                            digest: r.get(3)?,
                            train: r.get::<_, i64>(4)? as u64,
                            test: r.get::<_, i64>(5)? as u64,
                        },
                        ledger_seq: r.get::<_, i64>(6)? as u64,
                        stale: false,
                    })
                },
            )
            .optional()?)
    }

    /// The dataset's latest size release, if it has one.
    pub fn current_sizes(&self, dataset: &str) -> Result<Option<SizeRelease>, LedgerError> {
        let conn = self.lock();
        match Self::latest_release(&conn, dataset)? {
            Some((release, ..)) => Self::size_release(&conn, dataset, release),
            None => Ok(None),
        }
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

    /// The entry charging `mechanism` for a job's round, if it was charged.
    pub fn entry(
        &self,
        job_id: &str,
        round: u32,
        mechanism: Mechanism,
    ) -> Result<Option<pb::LedgerEntry>, LedgerError> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE job_id = ?1 AND round = ?2 AND mechanism = ?3"),
                params![job_id, round, mechanism.as_str()],
                sqlite::ledger_entry,
            )
            .optional()?)
    }

    /// (number of entries, highest sequence number; 0 when empty).
    pub fn head(&self) -> Result<(u64, u64), LedgerError> {
        self.count_through(u64::MAX)
    }

    /// (entries, highest sequence number) among those with seq ≤ `seq`.
    pub fn count_through(&self, seq: u64) -> Result<(u64, u64), LedgerError> {
        let conn = self.lock();
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        Ok(conn.query_row("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM ledger WHERE seq <= ?1", params![seq], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?)
    }

    /// At most `limit` entries after sequence number `seq`, oldest first.
    pub fn entries_after(&self, seq: u64, limit: usize) -> Result<Vec<pb::LedgerEntry>, LedgerError> {
        let conn = self.lock();
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt =
            conn.prepare(&format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?;
        let rows = stmt.query_map(params![seq, limit], sqlite::ledger_entry)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Result<Vec<pb::LedgerEntry>, LedgerError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("SELECT {LEDGER_COLUMNS} FROM ledger ORDER BY seq"))?;
        let rows = stmt.query_map([], sqlite::ledger_entry)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// ε spent on `dataset` at `delta`, composing every entry.
    pub fn spent(&self, dataset: &str, delta: f64) -> Result<f64, LedgerError> {
        let conn = self.lock();
        compose(Self::charged(&conn, dataset)?, delta)
    }

    /// Charges `c` and keeps the values `draw` releases, in one
    /// transaction: nothing is drawn unless it is charged, and a crash
    /// before the commit leaves neither. If `c` was charged before, the
    /// values released then come back and `draw` is not called: a release
    /// sent again is the same release, never fresh noise on the same data.
    pub fn release(
        &self,
        dataset: &DatasetConfig,
        c: &Charge,
        draw: impl FnOnce() -> Result<Vec<i64>, LedgerError>,
    ) -> Result<(pb::LedgerEntry, Vec<i64>), LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(entry) = Self::find(&tx, &dataset.name, c)? {
            let json: String = tx.query_row(
                "SELECT values_json FROM released_values WHERE seq = ?1",
                params![entry.seq as i64],
                |r| r.get(0),
            )?;
            let values = serde_json::from_str(&json)
                .map_err(|e| LedgerError::CorruptPlan { job_id: c.job_id.clone(), detail: e.to_string() })?;
            return Ok((entry, values));
        }
        let entry = self.insert_charge(&tx, dataset, c)?;
        let values = draw()?;
        tx.execute(
            "INSERT INTO released_values (seq, values_json) VALUES (?1, ?2)",
            params![entry.seq as i64, serde_json::to_string(&values).unwrap_or_default()],
        )?;
        tx.commit()?;
        Ok((entry, values))
    }

    /// The entry and values of a release charged before, if any.
    pub fn released(
        &self,
        job_id: &str,
        round: u32,
        mechanism: Mechanism,
    ) -> Result<Option<(pb::LedgerEntry, Vec<i64>)>, LedgerError> {
        let Some(entry) = self.entry(job_id, round, mechanism)? else {
            return Ok(None);
        };
        let conn = self.lock();
        let json: Option<String> = conn
            .query_row("SELECT values_json FROM released_values WHERE seq = ?1", params![entry.seq as i64], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(json) = json else {
            return Ok(None);
        };
        let values = serde_json::from_str(&json)
            .map_err(|e| LedgerError::CorruptPlan { job_id: job_id.to_string(), detail: e.to_string() })?;
        Ok(Some((entry, values)))
    }

    /// Refuses a job's charge that its accepted plan does not hold: no
    /// more steps of a mechanism at a noise than the plan has left of it
    /// (the per-job cap and the reservations were judged on the plan). A
    /// size release has no job; a job decided before plans were stored is
    /// not bound.
    fn check_within_plan(tx: &Connection, c: &Charge) -> Result<(), LedgerError> {
        if c.job_id.is_empty() {
            return Ok(());
        }
        let beyond = || LedgerError::BeyondPlan {
            job_id: c.job_id.clone(),
            round: c.round,
            mechanism: c.mechanism,
            noise_multiplier: c.noise_multiplier,
        };
        let stored: Option<(i64, String)> = tx
            .query_row("SELECT accepted, plan_json FROM jobs WHERE job_id = ?1", params![c.job_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let plan = match stored {
            Some((1, json)) if json.is_empty() => return Ok(()),
            Some((1, json)) => parse_plan(&c.job_id, &json)?,
            _ => return Err(beyond()),
        };
        let same =
            |m: Mechanism, sigma: f64| m == c.mechanism && (sigma - c.noise_multiplier).abs() <= 1e-12 * sigma.max(1.0);
        let planned: u64 = plan.iter().filter(|p| same(p.mechanism, p.noise_multiplier)).map(|p| p.steps).sum();
        let mut stmt = tx.prepare("SELECT mechanism, noise_multiplier, steps FROM ledger WHERE job_id = ?1")?;
        let mut used = 0u64;
        for row in stmt.query_map(params![c.job_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?, r.get::<_, i64>(2)? as u64))
        })? {
            let (m, sigma, steps) = row?;
            if Mechanism::parse(&m).is_some_and(|m| same(m, sigma)) {
                used += steps;
            }
        }
        if used + c.steps > planned {
            return Err(beyond());
        }
        Ok(())
    }

    fn find(tx: &Connection, dataset: &str, c: &Charge) -> Result<Option<pb::LedgerEntry>, LedgerError> {
        Ok(tx
            .query_row(
                &format!(
                    "SELECT {LEDGER_COLUMNS} FROM ledger WHERE dataset = ?1 AND job_id = ?2 AND round = ?3 AND mechanism = ?4"
                ),
                params![dataset, c.job_id, c.round, c.mechanism.as_str()],
                sqlite::ledger_entry,
            )
            .optional()?)
    }

    /// Commits one charge durably and returns the entry. Refuses a charge
    /// that would take the dataset over its budget; charging the same
    /// release again returns the entry already committed.
    pub fn charge(&self, dataset: &DatasetConfig, c: &Charge) -> Result<pb::LedgerEntry, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let entry = self.insert_charge(&tx, dataset, c)?;
        tx.commit()?;
        Ok(entry)
    }

    /// Inserts a charge inside `tx` (or returns the one already there).
    fn insert_charge(
        &self,
        tx: &Connection,
        dataset: &DatasetConfig,
        c: &Charge,
    ) -> Result<pb::LedgerEntry, LedgerError> {
        if let Some(existing) = Self::find(tx, &dataset.name, c)? {
            return Ok(existing);
        }
        Self::check_within_plan(tx, c)?;
        let this = (c.sample_rate, c.noise_multiplier, c.steps);
        let epsilon_round = compose([this], c.delta)?;
        let mut job_items: Vec<Item> = {
            let mut stmt = tx.prepare(
                "SELECT sample_rate, noise_multiplier, steps FROM ledger WHERE job_id = ?1 AND dataset = ?2",
            )?;
            stmt.query_map(params![c.job_id, dataset.name], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        job_items.push(this);
        let epsilon_job = compose(job_items, c.delta)?;
        let mut dataset_items = Self::charged(tx, &dataset.name)?;
        dataset_items.push(this);
        let epsilon_dataset = compose(dataset_items, dataset.budget_delta)?;
        if epsilon_dataset > dataset.budget_epsilon {
            return Err(LedgerError::OverBudget {
                dataset: dataset.name.clone(),
                job_id: c.job_id.clone(),
                round: c.round,
                mechanism: c.mechanism,
                after: epsilon_dataset,
                budget: dataset.budget_epsilon,
            });
        }
        tx.execute(
            "INSERT INTO ledger (site, dataset, job_id, round, spec_hash, noise_multiplier, sample_rate, clip_norm, steps, delta,
                epsilon_round, epsilon_job, epsilon_dataset, accountant, conversion, library_version, recorded_at_ms, mechanism)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
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
                now_ms(),
                c.mechanism.as_str()
            ],
        )?;
        Ok(tx.query_row(
            &format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE seq = last_insert_rowid()"),
            [],
            sqlite::ledger_entry,
        )?)
    }
}

#[cfg(test)]
mod tests;
