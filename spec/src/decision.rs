//! A site's decision on a data-use application, as its steward makes it:
//! approve with a [`Grant`] no wider than the application asked of the
//! site, reject, or revoke an approval, each with the steward's reason.
//!
//! A decision names the application by hash, the site and the steward, and
//! has one canonical JSON form: that is what the steward signs
//! (`meridian_wire::decision`), what the site verifies before it reserves
//! anything, and what both audit logs record, so no party can change the
//! terms of a decision it passes on.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::application::ApplicationSpec;
use crate::date::Date;

#[cfg(test)]
mod tests;

/// What a site grants an application: at most what it was asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The ε every job of the application may spend at the site together.
    pub epsilon: f64,
    /// The δ at which that ε is read (the application's, for this site).
    pub delta: f64,
    /// The last day (UTC) the grant holds, no later than the application's.
    pub valid_until: Date,
    /// How many jobs may run at the site under it.
    pub max_jobs: u32,
    /// The feature columns a job may read there (the label always).
    pub columns: Vec<String>,
}

/// What the steward decided.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
pub enum Verdict {
    /// Approved, within these terms.
    Approve {
        /// The terms granted.
        grant: Grant,
    },
    /// Refused.
    Reject {
        /// Why, for the requester and the audit.
        reason: String,
    },
    /// An approval withdrawn: no job may start or go on under it here.
    Revoke {
        /// Why, for the requester and the audit.
        reason: String,
    },
}

impl Verdict {
    /// The verdict's name in statuses and audit entries.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Approve { .. } => "approve",
            Verdict::Reject { .. } => "reject",
            Verdict::Revoke { .. } => "revoke",
        }
    }
}

/// One steward's decision for one site on one application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteDecision {
    /// The application's id at the coordinator.
    pub application_id: String,
    /// SHA-256 of the application's canonical JSON: the terms decided on.
    pub application_hash: String,
    /// The site decided for.
    pub site: String,
    /// The steward's certificate name.
    pub steward: String,
    /// When, ms since the Unix epoch.
    pub decided_at_ms: i64,
    /// What was decided.
    pub verdict: Verdict,
}

impl SiteDecision {
    /// The canonical JSON a steward signs and every party stores.
    pub fn canonical_json(&self) -> String {
        // Plain structs of strings, numbers and a tagged enum always serialise.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// SHA-256 of [`SiteDecision::canonical_json`], hex.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// Checks the decision against the application it names: the hash, the
    /// site, a reason where one is due, and an approval's grant within what
    /// the site was asked. Every problem names its term.
    pub fn check_against(&self, application: &ApplicationSpec) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.application_hash != application.hash() {
            problems.push(format!("application_hash: {} is not the application's", self.application_hash));
        }
        match &self.verdict {
            Verdict::Approve { grant } => match application.site(&self.site) {
                Some(_) => problems.extend(application.check_grant(&self.site, grant).err().unwrap_or_default()),
                None => problems.push(format!("site: the application asks nothing of {}", self.site)),
            },
            Verdict::Reject { reason } | Verdict::Revoke { reason } => {
                if application.site(&self.site).is_none() {
                    problems.push(format!("site: the application asks nothing of {}", self.site));
                }
                if reason.trim().is_empty() {
                    problems.push(format!("reason: a {} says why", self.verdict.as_str()));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

impl ApplicationSpec {
    /// The grant that gives `site` everything it was asked, if it was asked.
    pub fn full_grant(&self, site: &str) -> Option<Grant> {
        let asked = self.site(site)?;
        Some(Grant {
            epsilon: asked.epsilon,
            delta: asked.delta,
            valid_until: self.valid_until,
            max_jobs: self.max_jobs,
            columns: self.columns.clone(),
        })
    }

    /// Every way `grant` is wider than what `site` was asked (or is no
    /// grant at all), each naming its term.
    pub fn check_grant(&self, site: &str, grant: &Grant) -> Result<(), Vec<String>> {
        let Some(asked) = self.site(site) else {
            return Err(vec![format!("site: the application asks nothing of {site}")]);
        };
        let mut problems = Vec::new();
        if !(grant.epsilon.is_finite() && grant.epsilon > 0.0 && grant.epsilon <= asked.epsilon) {
            problems
                .push(format!("epsilon: {} is not in (0, {}], what {site} was asked", grant.epsilon, asked.epsilon));
        }
        if grant.delta != asked.delta {
            problems.push(format!("delta: {} is not the application's {}", grant.delta, asked.delta));
        }
        if grant.valid_until > self.valid_until || grant.valid_until < self.valid_from {
            let (from, until) = (self.valid_from, self.valid_until);
            problems.push(format!("valid_until: {} is outside the application's {from}..={until}", grant.valid_until));
        }
        if grant.max_jobs == 0 || grant.max_jobs > self.max_jobs {
            problems.push(format!("max_jobs: {} is not in 1..={}", grant.max_jobs, self.max_jobs));
        }
        crate::application::names_problems("columns", &grant.columns, &mut problems);
        for c in grant.columns.iter().filter(|c| !self.columns.contains(c)) {
            problems.push(format!("columns: {c:?} was not asked for"));
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}
