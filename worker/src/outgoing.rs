//! Every message this site sends the coordinator about a job is built
//! here, from typed values only: answers to offers, reports of failed
//! tasks, evaluations and the headers of updates.
//!
//! The rule that defines Meridian is that nothing leaves a hospital except
//! values released under DP and charged to its ledger. A refusal or a
//! failure therefore carries a [`SiteReason`] (a code and the spec's column
//! names), never the error text that explains it: that text names values,
//! lines and paths, and goes into the site's own log and audit as a
//! [`Refusal`]'s `detail`. Numbers leave as [`Released`] values, each with
//! the ledger entry that charged it; exact metrics only where the site's
//! policy says `release_exact_metrics = true`. The repository's tidy test
//! checks that the worker builds these messages nowhere else.

use std::collections::BTreeMap;

use meridian_spec::evaluation::Histogram;
use meridian_spec::reason::{ReasonCode, SiteReason};
use meridian_wire::pb;

/// A site's "no": what the coordinator is told, and what only the site keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// What leaves the site.
    pub reason: SiteReason,
    /// The whole story, for the site's log and audit only.
    pub detail: String,
    /// The job's cost, when the site computed it before refusing.
    pub cost: Cost,
}

impl Refusal {
    /// A refusal with a code and no column.
    pub fn new(code: ReasonCode, detail: impl Into<String>) -> Refusal {
        Refusal { reason: SiteReason::new(code), detail: detail.into(), cost: Cost::default() }
    }

    /// A refusal with a reason already built (with the spec's columns).
    pub fn with(reason: SiteReason, detail: impl Into<String>) -> Refusal {
        Refusal { reason, detail: detail.into(), cost: Cost::default() }
    }
}

/// What a site computed of a job's privacy cost: its plan's ε and the ε
/// the dataset would reach with it, composed. Both follow from the ledger
/// and released sizes, so they may leave.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// ε of the job's plan at the job's δ.
    pub planned: f64,
    /// ε the dataset would reach with the job at its budget's δ.
    pub projected: f64,
}

/// The answer refusing an offer (with the job's cost, when the site got
/// as far as computing it).
pub fn refusal(job_id: &str, spec_hash: &str, reason: &SiteReason, cost: Cost) -> pb::OfferAnswer {
    pb::OfferAnswer {
        job_id: job_id.to_string(),
        spec_hash: spec_hash.to_string(),
        accept: false,
        refusal: Some(pb::SiteReason::from(reason)),
        planned_epsilon: cost.planned,
        projected_epsilon: cost.projected,
        ..Default::default()
    }
}

/// The answer accepting an offer: the job's cost and the dataset's
/// released training-set size.
pub fn acceptance(job_id: &str, spec_hash: &str, cost: Cost, train_examples: u64) -> pb::OfferAnswer {
    pb::OfferAnswer {
        job_id: job_id.to_string(),
        spec_hash: spec_hash.to_string(),
        accept: true,
        refusal: None,
        planned_epsilon: cost.planned,
        train_examples,
        ledger_entry: None,
        projected_epsilon: cost.projected,
    }
}

/// The report of a task the site could not carry out.
pub fn failure(job_id: &str, round: u32, reason: &SiteReason) -> pb::TaskFailure {
    pb::TaskFailure { job_id: job_id.to_string(), round, reason: Some(pb::SiteReason::from(reason)) }
}

/// A value released under DP, with the ledger entry that charged it.
#[derive(Clone, Debug, PartialEq)]
pub struct Released<T> {
    /// The noised value.
    pub value: T,
    /// Its charge, committed before the value leaves.
    pub entry: pb::LedgerEntry,
}

/// Exact metrics, which the site's policy explicitly releases (or `None`).
pub type ExactMetrics = Option<BTreeMap<String, f64>>;

/// The report of a held-out evaluation of round `round`'s model.
pub fn evaluation(
    job_id: &str,
    round: u32,
    histogram: Released<Histogram>,
    exact: ExactMetrics,
) -> pb::EvaluationReport {
    pb::EvaluationReport {
        job_id: job_id.to_string(),
        round,
        negatives: histogram.value.negatives,
        positives: histogram.value.positives,
        ledger_entry: Some(histogram.entry),
        exact_metrics: exact.unwrap_or_default().into_iter().collect(),
    }
}

/// What an update carries beside its values.
pub struct UpdateFacts {
    /// The job.
    pub job_id: String,
    /// The round.
    pub round: u32,
    /// The model's layout hash.
    pub layout_hash: String,
    /// Parameters.
    pub num_params: u64,
    /// The FedAvg weight: the dataset's released training-set size.
    pub weight: u64,
    /// The DP-SGD charge of the round.
    pub entry: pb::LedgerEntry,
    /// The round's clipped examples, released with the DP-SGD entry (absent
    /// when the spec releases none).
    pub clipped: Option<Released<i64>>,
    /// Exact training metrics, under the site's policy only.
    pub exact: ExactMetrics,
}

/// The header of a whole update (`upload` cuts a large one into parts).
pub fn update_header(facts: UpdateFacts) -> pb::UpdateHeader {
    // A clip count is charged with the steps, by the update's own entry.
    let clipped_count = facts.clipped.map(|r| r.value);
    pb::UpdateHeader {
        job_id: facts.job_id,
        round: facts.round,
        layout_hash: facts.layout_hash,
        num_params: facts.num_params,
        num_examples: facts.weight,
        ledger_entry: Some(facts.entry),
        clipped_count,
        exact_metrics: facts.exact.unwrap_or_default().into_iter().collect(),
        ..Default::default()
    }
}
