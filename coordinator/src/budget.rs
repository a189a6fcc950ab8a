//! The reviewer's view: budgets and ledgers from the coordinator's mirror
//! of every site's privacy ledger.
//!
//! Spent ε is recomputed here from each entry's mechanism parameters
//! (σ, q, steps) by RDP composition, not copied from the sites' figures and
//! not summed, so a reviewer reading these rows sees the accountant's
//! answer for everything the site was charged.

use std::collections::BTreeMap;

use meridian_wire::pb;
use tonic::{Request, Response, Status};

use crate::service::Services;

const READERS: &[meridian_wire::identity::Role] = &[
    meridian_wire::identity::Role::Scientist,
    meridian_wire::identity::Role::Reviewer,
    meridian_wire::identity::Role::Admin,
];

/// ε of a set of ledger entries composed by RDP at `delta`.
pub(crate) fn composed_epsilon<'a>(
    entries: impl Iterator<Item = &'a pb::LedgerEntry>,
    delta: f64,
) -> Result<f64, Status> {
    meridian_privacy::accountant::composed_epsilon(entries.map(|e| (e.sample_rate, e.noise_multiplier, e.steps)), delta)
        .map_err(|err| Status::data_loss(format!("a mirrored ledger entry the accountant refuses: {err}")))
}

#[tonic::async_trait]
impl pb::privacy_service_server::PrivacyService for Services {
    async fn get_budgets(
        &self,
        req: Request<pb::GetBudgetsRequest>,
    ) -> Result<Response<pb::GetBudgetsResponse>, Status> {
        self.authorize(&req, READERS, "PrivacyService/GetBudgets")?;
        let store = &self.inner.store;
        let ledger = store.ledger("", "")?;
        let policies = store.policies()?;
        let exact = |site: &str| policies.get(site).is_some_and(|p| p.release_exact_metrics);
        let mut rows = Vec::new();
        for d in store.datasets()? {
            let info = &d.info;
            let entries: Vec<&pb::LedgerEntry> =
                ledger.iter().filter(|e| e.site == d.site && e.dataset == info.name).collect();
            let spent = composed_epsilon(entries.iter().copied(), info.budget_delta)?;
            rows.push(pb::BudgetRow {
                site: d.site.clone(),
                dataset: info.name.clone(),
                job_id: String::new(),
                epsilon_spent: spent,
                epsilon_total: info.budget_epsilon,
                releases_exact_metrics: exact(&d.site),
                delta: info.budget_delta,
                rounds: entries.len() as u32,
            });
            let mut by_job: BTreeMap<&str, Vec<&pb::LedgerEntry>> = BTreeMap::new();
            // A size release (no job) counts in the dataset's total only.
            for e in entries.iter().filter(|e| !e.job_id.is_empty()) {
                by_job.entry(e.job_id.as_str()).or_default().push(e);
            }
            for (job_id, job_entries) in by_job {
                let delta = job_entries.first().map_or(info.budget_delta, |e| e.delta);
                let spent = composed_epsilon(job_entries.iter().copied(), delta)?;
                rows.push(pb::BudgetRow {
                    site: d.site.clone(),
                    dataset: info.name.clone(),
                    job_id: job_id.to_string(),
                    epsilon_spent: spent,
                    epsilon_total: info.job_epsilon_cap,
                    releases_exact_metrics: exact(&d.site),
                    delta,
                    rounds: job_entries.len() as u32,
                });
            }
        }
        Ok(Response::new(pb::GetBudgetsResponse { rows }))
    }

    async fn list_ledger(
        &self,
        req: Request<pb::ListLedgerRequest>,
    ) -> Result<Response<pb::ListLedgerResponse>, Status> {
        self.authorize(&req, READERS, "PrivacyService/ListLedger")?;
        let r = req.get_ref();
        let entries = self.inner.store.ledger(&r.site, &r.dataset)?;
        Ok(Response::new(pb::ListLedgerResponse { entries }))
    }
}
