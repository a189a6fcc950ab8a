//! Every message this site sends the coordinator about a job is built
//! here, from typed values only: answers to offers and reports of failed
//! tasks.
//!
//! The rule that defines Meridian is that nothing leaves a hospital except
//! values released under DP and charged to its ledger. A refusal or a
//! failure therefore carries a [`SiteReason`] (a code and the spec's column
//! names), never the error text that explains it: that text names values,
//! lines and paths, and goes into the site's own log and audit as a
//! [`Refusal`]'s `detail`. The repository's tidy test checks that the
//! worker builds these messages nowhere else.

use proto::pb;
use proto::reason::{ReasonCode, SiteReason};

/// A site's "no": what the coordinator is told, and what only the site keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// What leaves the site.
    pub reason: SiteReason,
    /// The whole story, for the site's log and audit only.
    pub detail: String,
}

impl Refusal {
    /// A refusal with a code and no column.
    pub fn new(code: ReasonCode, detail: impl Into<String>) -> Refusal {
        Refusal { reason: SiteReason::new(code), detail: detail.into() }
    }

    /// A refusal with a reason already built (with the spec's columns).
    pub fn with(reason: SiteReason, detail: impl Into<String>) -> Refusal {
        Refusal { reason, detail: detail.into() }
    }
}

/// The answer refusing an offer.
pub fn refusal(job_id: &str, spec_hash: &str, reason: &SiteReason) -> pb::OfferAnswer {
    pb::OfferAnswer {
        job_id: job_id.to_string(),
        spec_hash: spec_hash.to_string(),
        accept: false,
        refusal: Some(reason.to_wire()),
        ..Default::default()
    }
}

/// The answer accepting an offer: the ε the site planned for the job, its
/// released training-set size and the ledger entry charging that release.
pub fn acceptance(
    job_id: &str,
    spec_hash: &str,
    planned_epsilon: f64,
    train_examples: u64,
    ledger_entry: Option<pb::LedgerEntry>,
) -> pb::OfferAnswer {
    pb::OfferAnswer {
        job_id: job_id.to_string(),
        spec_hash: spec_hash.to_string(),
        accept: true,
        refusal: None,
        planned_epsilon,
        train_examples,
        ledger_entry,
    }
}

/// The report of a task the site could not carry out.
pub fn failure(job_id: &str, round: u32, reason: &SiteReason) -> pb::TaskFailure {
    pb::TaskFailure { job_id: job_id.to_string(), round, reason: Some(reason.to_wire()) }
}
