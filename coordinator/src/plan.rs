//! A job planned before it is submitted: for every site that holds its
//! dataset, the same checks the site will apply to the offer (its schema,
//! [`meridian_spec::policy`], the per-job cap, the budget) and what the site would
//! charge, all from what sites announced (schemas, policies, released
//! sizes) and the mirror of their ledgers.
//!
//! The site plans from its released training-set size with the same
//! [`JobSpec::site_plan`], so the sampling rate, the steps and the ε given
//! here are what the site will charge. The budget's verdict may differ from
//! the site's only if the mirror lags its ledger (by seconds, see
//! `WorkerService/SyncLedger`).

use std::collections::BTreeMap;

use meridian_spec::job::JobSpec;
use meridian_spec::mechanism::Mechanism;
use meridian_spec::reason::ReasonCode;
use meridian_wire::pb;

use crate::store::{DatasetRow, Store, StoreError};

/// Why a job could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The accountant refused a mechanism's parameters.
    #[error("accountant: {0}")]
    Accountant(#[from] meridian_privacy::accountant::AccountantError),
    /// No registered site holds the dataset.
    #[error("dataset: no registered site holds dataset \"{dataset}\" (known: {known})")]
    NoHolder {
        /// The dataset asked for.
        dataset: String,
        /// The datasets sites announced.
        known: String,
    },
}

fn check(name: &'static str, outcome: Result<String, (ReasonCode, String)>) -> pb::PolicyCheck {
    match outcome {
        Ok(detail) => pb::PolicyCheck { name: name.to_string(), passed: true, detail, code: String::new() },
        Err((code, detail)) => {
            pb::PolicyCheck { name: name.to_string(), passed: false, detail, code: code.as_str().to_string() }
        }
    }
}

/// Whether the site announced every column the spec reads, of the right kind.
fn schema(d: &DatasetRow, spec: &JobSpec) -> pb::PolicyCheck {
    let info = &d.info;
    let wanted =
        std::iter::once(("features.label".to_string(), &spec.features.label, &info.columns, "known"))
            .chain(
                spec.features
                    .numeric
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("features.numeric[{i}]"), c, &info.numeric, "numeric")),
            )
            .chain(spec.features.categorical.iter().enumerate().map(|(i, c)| {
                (format!("features.categorical[{i}].column"), &c.column, &info.categorical, "categorical")
            }));
    let missing: Vec<String> = wanted
        .filter(|(_, column, list, _)| !list.contains(column))
        .map(|(field, column, _, kind)| {
            format!(
                "{field}: column \"{column}\" is not a {kind} column of dataset \"{}\" (site {})",
                info.name, d.site
            )
        })
        .collect();
    check(
        "schema",
        match missing.first() {
            None => Ok(format!("the site announces every column the job reads of dataset \"{}\"", info.name)),
            Some(first) => Err((ReasonCode::SchemaMismatch, first.clone())),
        },
    )
}

/// (q, σ, steps) of a ledger entry, as the accountant takes it.
fn entry_item(e: &pb::LedgerEntry) -> (f64, f64, u64) {
    (e.sample_rate, e.noise_multiplier, e.steps)
}

/// Everything charged to `site`'s dataset (its mirrored `entries`), and
/// every running job's remaining plan there, as accountant items.
fn committed(
    store: &Store,
    site: &str,
    dataset: &str,
    entries: &[pb::LedgerEntry],
) -> Result<Vec<(f64, f64, u64)>, PlanError> {
    let mut items: Vec<(f64, f64, u64)> = entries.iter().map(entry_item).collect();
    for job in store.jobs()?.into_iter().filter(|j| !j.state.is_terminal() && j.spec.dataset == dataset) {
        let Some(at) = store.participant(&job.id, site)? else {
            continue;
        };
        let mut used: BTreeMap<Mechanism, u64> = BTreeMap::new();
        for e in entries.iter().filter(|e| e.job_id == job.id) {
            *used.entry(e.charged()).or_default() += e.steps;
        }
        for c in meridian_spec::job::remaining(&job.spec.site_plan(at.train_examples).charges, &used) {
            items.push((c.sample_rate, c.noise_multiplier, c.steps));
        }
    }
    Ok(items)
}

/// The plan of `spec` at one site that holds its dataset.
fn at_site(
    store: &Store,
    d: &DatasetRow,
    policy: &pb::SitePolicy,
    spec: &JobSpec,
) -> Result<pb::PlannedSite, PlanError> {
    let info = &d.info;
    let view = meridian_spec::policy::Policy {
        allowed_models: &policy.allowed_models,
        min_training_rows: policy.min_training_rows,
        min_test_rows: policy.min_test_rows,
    };
    let sizes = info.size.as_ref().map(|s| (s.train_rows, s.test_rows));
    let mut checks = vec![schema(d, spec)];
    checks
        .extend(meridian_spec::policy::checks(&view, spec, true, sizes).into_iter().map(|c| check(c.name, c.outcome)));
    let mut planned = pb::PlannedSite {
        site: d.site.clone(),
        manual_approval: policy.manual_approval,
        job_epsilon_cap: info.job_epsilon_cap,
        budget_epsilon: info.budget_epsilon,
        budget_delta: info.budget_delta,
        ..Default::default()
    };
    if let Some((train_rows, _)) = sizes {
        let plan = spec.site_plan(train_rows);
        let items: Vec<(f64, f64, u64)> =
            plan.charges.iter().map(|c| (c.sample_rate, c.noise_multiplier, c.steps)).collect();
        let epsilon = meridian_privacy::accountant::composed_epsilon(items.iter().copied(), spec.privacy.delta)?;
        let entries = store.ledger(&d.site, &info.name)?;
        planned.spent_epsilon =
            meridian_privacy::accountant::composed_epsilon(entries.iter().map(entry_item), info.budget_delta)?;
        let mut all = committed(store, &d.site, &info.name, &entries)?;
        all.extend(items);
        let projected = meridian_privacy::accountant::composed_epsilon(all, info.budget_delta)?;
        checks.push(check(
            "per-job cap",
            if epsilon <= info.job_epsilon_cap {
                Ok(format!("planned ε {epsilon:.3} within the per-job cap {:.3}", info.job_epsilon_cap))
            } else {
                Err((
                    ReasonCode::JobCapExceeded,
                    format!("planned ε {epsilon:.3} exceeds the per-job cap {:.3}", info.job_epsilon_cap),
                ))
            },
        ));
        checks.push(check(
            "budget",
            if projected <= info.budget_epsilon {
                Ok(format!("the dataset would reach ε {projected:.3} of its budget {:.3}", info.budget_epsilon))
            } else {
                Err((
                    ReasonCode::BudgetExceeded,
                    format!("the dataset would reach ε {projected:.3}, over its budget {:.3}", info.budget_epsilon),
                ))
            },
        ));
        planned.train_rows = train_rows;
        planned.sample_rate = plan.sample_rate;
        planned.steps_per_round = plan.steps_per_round;
        planned.planned_epsilon = epsilon;
        planned.projected_epsilon = projected;
        planned.charges = plan
            .charges
            .iter()
            .map(|c| pb::PlannedCharge {
                mechanism: meridian_wire::convert::mechanism_value(c.mechanism),
                sample_rate: c.sample_rate,
                noise_multiplier: c.noise_multiplier,
                steps: c.steps,
            })
            .collect();
    }
    planned.would_take = checks.iter().all(|c| c.passed);
    planned.checks = checks;
    Ok(planned)
}

/// The plan of `spec` at every site that holds its dataset.
pub fn plan(store: &Store, spec: &JobSpec) -> Result<pb::JobPlan, PlanError> {
    let datasets = store.datasets()?;
    let policies = store.policies()?;
    let holders: Vec<&DatasetRow> = datasets.iter().filter(|d| d.info.name == spec.dataset).collect();
    if holders.is_empty() {
        let mut known: Vec<&str> = datasets.iter().map(|d| d.info.name.as_str()).collect();
        known.sort_unstable();
        known.dedup();
        return Err(PlanError::NoHolder { dataset: spec.dataset.clone(), known: known.join(", ") });
    }
    let sites = holders
        .into_iter()
        .map(|d| at_site(store, d, &policies.get(&d.site).cloned().unwrap_or_default(), spec))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pb::JobPlan {
        takers: sites.iter().filter(|s| s.would_take).count() as u32,
        sites,
        min_sites: spec.policy.min_sites,
        delta: spec.privacy.delta,
        accountant: "rdp (dp_accounting's orders and improved conversion)".to_string(),
    })
}
