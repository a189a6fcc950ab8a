//! The privacy ledger's record types and the arithmetic over them.
//!
//! Each site keeps a ledger of every DP-SGD run on each of its datasets (one
//! [`LedgerEntry`] per job round); storing it is the worker's job (SQLite),
//! this module only defines what an entry says and how entries add up.
//!
//! Entries compose by Rényi DP, never by adding their ε: [`dataset_epsilon`]
//! sums the RDP curves of all entries of a dataset and converts once, which
//! is both correct and much tighter than Σε. An entry's `epsilon_round`,
//! `epsilon_job` and `epsilon_dataset` are reports computed that way at the
//! time of recording, not inputs to later sums.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::accountant::{AccountantError, EpsilonAtDelta, RdpAccountant};

#[cfg(test)]
mod tests;

/// [`LedgerEntry::accountant`] for entries accounted by [`RdpAccountant`].
pub const ACCOUNTANT_RDP: &str = "rdp";

/// [`LedgerEntry::conversion`] for ε from dp_accounting's improved RDP to
/// (ε, δ) conversion ([`RdpAccountant::epsilon`]).
pub const CONVERSION_DP_ACCOUNTING_IMPROVED: &str = "dp_accounting-improved";

/// [`LedgerEntry::library_version`]: the version of this crate.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors from ledger arithmetic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerError {
    /// An entry's DP-SGD parameters are invalid.
    #[error("ledger entry for job {job_id} round {round}: {source}")]
    Entry {
        /// The entry's job.
        job_id: String,
        /// The entry's round.
        round: u32,
        /// What is wrong with it.
        source: AccountantError,
    },
    /// Converting the composed RDP to ε failed (invalid δ).
    #[error(transparent)]
    Accountant(#[from] AccountantError),
    /// A budget's ε is negative, infinite or NaN.
    #[error("budget epsilon must be finite and >= 0, got {0}")]
    BudgetEpsilon(f64),
    /// A budget's δ is not in [0, 1).
    #[error("budget delta must be in [0, 1), got {0}")]
    BudgetDelta(f64),
    /// A spent ε is negative or NaN.
    #[error("spent epsilon must be >= 0, got {0}")]
    SpentEpsilon(f64),
}

/// One DP-SGD run recorded against a dataset: one round of one job at one
/// site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    /// The federated job.
    pub job_id: String,
    /// The round within the job.
    pub round: u32,
    /// The dataset whose records were used; budgets are per dataset.
    pub dataset: String,
    /// The site holding the dataset.
    pub site: String,
    /// σ: noise standard deviation over the clipping norm.
    pub noise_multiplier: f64,
    /// q: Poisson sampling probability per example and step.
    pub sample_rate: f64,
    /// C: per-example L2 clipping norm.
    pub clip_norm: f64,
    /// Number of DP-SGD steps in this round.
    pub steps: u64,
    /// δ at which the ε fields are stated.
    pub delta: f64,
    /// ε of this round alone.
    pub epsilon_round: f64,
    /// ε of all rounds of this job so far, composed by RDP.
    pub epsilon_job: f64,
    /// ε of all entries on this dataset so far, composed by RDP.
    pub epsilon_dataset: f64,
    /// The accountant, [`ACCOUNTANT_RDP`].
    pub accountant: String,
    /// The RDP to (ε, δ) conversion, [`CONVERSION_DP_ACCOUNTING_IMPROVED`].
    pub conversion: String,
    /// The version of this crate that computed the ε fields,
    /// [`LIBRARY_VERSION`].
    pub library_version: String,
    /// When the entry was recorded, in milliseconds since the Unix epoch.
    pub recorded_at_unix_ms: i64,
}

/// ε at `delta` of all `entries` together, composed by RDP (with
/// dp_accounting's default orders and improved conversion).
///
/// Entries with the same sampling rate and noise multiplier are grouped, so
/// a long ledger costs one RDP evaluation per distinct parameter pair. An
/// empty ledger has spent ε = 0.
pub fn dataset_epsilon(entries: &[LedgerEntry], delta: f64) -> Result<EpsilonAtDelta, LedgerError> {
    let mut steps_by_parameters: HashMap<(u64, u64), u64> = HashMap::new();
    let mut accountant = RdpAccountant::new();
    for entry in entries {
        // Validate every entry, even those whose group is already known.
        accountant
            .compose_poisson_gaussian(entry.sample_rate, entry.noise_multiplier, 0)
            .map_err(|source| LedgerError::Entry {
                job_id: entry.job_id.clone(),
                round: entry.round,
                source,
            })?;
        let key = (
            entry.sample_rate.to_bits(),
            entry.noise_multiplier.to_bits(),
        );
        let steps = steps_by_parameters.entry(key).or_insert(0);
        match steps.checked_add(entry.steps) {
            Some(sum) => *steps = sum,
            None => {
                // Beyond u64 steps: compose what we have and start again.
                accountant.compose_poisson_gaussian(
                    entry.sample_rate,
                    entry.noise_multiplier,
                    *steps,
                )?;
                *steps = entry.steps;
            }
        }
    }
    // Compose in a fixed order so that the result does not depend on hashing.
    let mut groups: Vec<_> = steps_by_parameters.into_iter().collect();
    groups.sort_unstable_by_key(|&(key, _)| key);
    for ((sample_rate, noise_multiplier), steps) in groups {
        accountant.compose_poisson_gaussian(
            f64::from_bits(sample_rate),
            f64::from_bits(noise_multiplier),
            steps,
        )?;
    }
    Ok(accountant.epsilon(delta)?)
}

/// A privacy budget: the (ε, δ) a dataset may spend in total.
///
/// Invariants: ε is finite and >= 0; δ is in [0, 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawBudget", into = "RawBudget")]
pub struct Budget {
    epsilon: f64,
    delta: f64,
}

/// The serialized form of [`Budget`], validated on the way in.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    epsilon: f64,
    delta: f64,
}

impl TryFrom<RawBudget> for Budget {
    type Error = LedgerError;

    fn try_from(raw: RawBudget) -> Result<Self, LedgerError> {
        Budget::new(raw.epsilon, raw.delta)
    }
}

impl From<Budget> for RawBudget {
    fn from(budget: Budget) -> Self {
        RawBudget {
            epsilon: budget.epsilon,
            delta: budget.delta,
        }
    }
}

impl Budget {
    /// A budget of (`epsilon`, `delta`).
    pub fn new(epsilon: f64, delta: f64) -> Result<Self, LedgerError> {
        if !(epsilon.is_finite() && epsilon >= 0.0) {
            return Err(LedgerError::BudgetEpsilon(epsilon));
        }
        if !(0.0..1.0).contains(&delta) {
            return Err(LedgerError::BudgetDelta(delta));
        }
        Ok(Self { epsilon, delta })
    }

    /// The total ε.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// The δ at which ε is stated.
    pub fn delta(&self) -> f64 {
        self.delta
    }
}

/// What is left of `total` once `spent_epsilon` (computed at `total.delta()`,
/// e.g. by [`dataset_epsilon`]) has been spent, clamped at zero.
///
/// The difference is a report, not a spending allowance: ε does not add up
/// under composition, so whether a new run fits is decided by composing it
/// with the ledger and comparing the result with the total.
pub fn remaining(total: &Budget, spent_epsilon: f64) -> Result<Budget, LedgerError> {
    if spent_epsilon.is_nan() || spent_epsilon < 0.0 {
        return Err(LedgerError::SpentEpsilon(spent_epsilon));
    }
    Ok(Budget {
        epsilon: (total.epsilon - spent_epsilon).max(0.0),
        delta: total.delta,
    })
}
