//! `meridian site …`: the hospital's own view and decisions, on the worker
//! host, from the worker's configuration and its state directory, with no
//! call to the coordinator: the offers waiting for a person and the
//! decisions on them, everything about one job (its spec, who asked, the
//! policy's verdict point by point, the ε it would bring the dataset to,
//! and the local detail of a refusal, which never left the site), the
//! site's budgets and its ledger.

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use meridian_spec::job::JobSpec;
use meridian_worker::approvals::{Approval, Approvals};
use meridian_worker::ledger::Ledger;
use meridian_worker::{DatasetConfig, WorkerConfig};

use crate::{client, out, output};

/// The site commands.
#[derive(Subcommand)]
pub enum SiteCommand {
    /// Offers waiting for a decision (only those a running worker waits on).
    Pending {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending offer (binds to the exact spec the site was offered).
    Approve {
        /// Job id.
        job: String,
        /// Who decides, for the site's audit (default: the OS user).
        #[arg(long = "as", value_name = "NAME")]
        by: Option<String>,
    },
    /// Reject a pending offer; only the code not_approved leaves the site.
    Reject {
        /// Job id.
        job: String,
        /// Why, for the site's own audit.
        #[arg(long)]
        reason: String,
        /// Who decides, for the site's audit (default: the OS user).
        #[arg(long = "as", value_name = "NAME")]
        by: Option<String>,
    },
    /// Everything about one job offered to this site: its spec, who asked,
    /// the policy's verdict point by point and the ε it would bring the dataset to.
    Show {
        /// Job id.
        job: String,
    },
    /// The site's budgets: ε spent per dataset and job, composed by RDP.
    Budget {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The site's own ledger: every charge, with what a reviewer needs to recompute it.
    Ledger {
        /// Print JSON (the same fields as `meridian budget ledger --json`).
        #[arg(long)]
        json: bool,
    },
}

/// The site's state, opened from its configuration.
struct Site {
    config: WorkerConfig,
    ledger: Ledger,
    approvals: Approvals,
}

impl Site {
    fn open(config: &Path) -> Result<Site> {
        let config = WorkerConfig::load(config)?;
        let db = config.data_dir.join("ledger.sqlite");
        if !db.is_file() {
            bail!("{}: no site database yet (the worker creates it when it first starts)", db.display());
        }
        let cert =
            std::fs::read(&config.tls_cert).with_context(|| format!("cannot read {}", config.tls_cert.display()))?;
        let site = meridian_wire::identity::principal_from_pem(&cert)?.name;
        let ledger = Ledger::open(&db, &site).with_context(|| format!("opening {}", db.display()))?;
        let approvals = Approvals::open(&db).with_context(|| format!("opening {}", db.display()))?;
        Ok(Site { config, ledger, approvals })
    }
}

/// Who is deciding: `--as`, or the OS user.
fn decider(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Runs a site command against the worker configuration at `config`.
pub fn run(command: SiteCommand, config: &Path) -> Result<()> {
    let site = Site::open(config)?;
    match command {
        SiteCommand::Pending { json } => pending(&site, json),
        SiteCommand::Approve { job, by } => {
            let a = site.approvals.decide(&job, None, &decider(by))?;
            out!("approved {} (spec {}) as {}", a.job_id, a.spec_hash, a.decided_by)?;
            Ok(())
        }
        SiteCommand::Reject { job, reason, by } => {
            let a = site.approvals.decide(&job, Some(&reason), &decider(by))?;
            out!(
                "rejected {} as {}: {} (the coordinator is told not_approved only)",
                a.job_id,
                a.decided_by,
                a.reason
            )?;
            Ok(())
        }
        SiteCommand::Show { job } => show(&site, &job),
        SiteCommand::Budget { json } => budget(&site, json),
        SiteCommand::Ledger { json } => {
            let entries = site.ledger.entries()?;
            if json {
                output::json(&serde_json::json!(entries.iter().map(client::ledger_json).collect::<Vec<_>>()))?;
            } else {
                output::block(&client::render_ledger(&entries))?;
            }
            Ok(())
        }
    }
}

fn approval_json(a: &Approval) -> serde_json::Value {
    serde_json::json!({
        "job_id": a.job_id, "name": a.name, "dataset": a.dataset, "model": a.model, "spec_hash": a.spec_hash,
        "submitted_by": a.submitted_by, "planned_epsilon": a.planned_epsilon, "projected_epsilon": a.projected_epsilon,
        "state": a.state.as_str(),
    })
}

fn pending(site: &Site, json: bool) -> Result<()> {
    let pending = site.approvals.pending()?;
    if json {
        output::json(&serde_json::json!(pending.iter().map(approval_json).collect::<Vec<_>>()))?;
        return Ok(());
    }
    if pending.is_empty() {
        out!("no offers waiting for approval")?;
    }
    for a in pending {
        out!(
            "{}  {:<24} by {:<10} dataset {:<10} model {:<20} planned ε {:.3}, dataset would reach ε {:.3}  spec {}",
            a.job_id,
            a.name,
            a.submitted_by,
            a.dataset,
            a.model,
            a.planned_epsilon,
            a.projected_epsilon,
            &a.spec_hash[..12.min(a.spec_hash.len())]
        )?;
    }
    Ok(())
}

/// The spec as a block a person reads before deciding.
fn describe_spec(spec: &JobSpec) -> String {
    let f = &spec.features;
    let t = &spec.training;
    let p = &spec.privacy;
    let e = &spec.evaluation;
    let model = match &spec.model {
        meridian_spec::job::ModelSpec::LogisticRegression => "logistic_regression".to_string(),
        meridian_spec::job::ModelSpec::Mlp { hidden } => format!("mlp, hidden layers {hidden:?}"),
        meridian_spec::job::ModelSpec::Cnn { image_side } => format!("cnn on {image_side}x{image_side} images"),
    };
    let mut out =
        format!("  spec\n    name       {}\n    dataset    {}\n    model      {model}\n", spec.name, spec.dataset);
    out.push_str(&format!(
        "    label      {} (positive {:?}, negative {:?})\n",
        f.label, f.positive_label, f.negative_labels
    ));
    out.push_str(&format!("    numeric    {}\n", f.numeric.join(", ")));
    for c in &f.categorical {
        out.push_str(&format!("    categorical {} ({} levels)\n", c.column, c.levels.len()));
    }
    out.push_str(&format!(
        "    training   {} rounds, {} local epochs, batch {}, learning rate {}\n",
        t.rounds, t.local_epochs, t.batch_size, t.learning_rate
    ));
    out.push_str(&format!(
        "    privacy    σ {}, clip C {}, δ {:e}, clip-count noise {}\n",
        p.noise_multiplier, p.clip_norm, p.delta, p.clip_count_noise
    ));
    out.push_str(&format!(
        "    evaluation {} bins in logit [{}, {}], noise {} per round, {} for the final model\n",
        e.bins, e.logit_min, e.logit_max, e.noise_scale, e.final_noise_scale
    ));
    out
}

/// `meridian site show`: everything about one job offered here, as a block.
fn show(site: &Site, job_id: &str) -> Result<()> {
    let approval = site.approvals.latest(job_id)?;
    let record = site.ledger.job_record(job_id)?;
    let (spec_json, submitted_by) = match (&approval, &record) {
        (Some(a), _) if !a.spec_json.is_empty() => (a.spec_json.clone(), a.submitted_by.clone()),
        (_, Some(r)) => (r.spec_json.clone(), r.submitted_by.clone()),
        _ => bail!("job \"{job_id}\" was never offered to this site (see `meridian site pending`)"),
    };
    let spec = JobSpec::from_canonical_json(&spec_json).map_err(anyhow::Error::msg)?;
    let mut text = format!(
        "job {job_id}, submitted by {}\n",
        if submitted_by.is_empty() { "(not recorded)" } else { &submitted_by }
    );
    text.push_str(&describe_spec(&spec));
    text.push_str("  policy verdict\n");
    text.push_str(&verdict(site, &spec, job_id)?);
    text.push_str(&format!("  approval   {}\n", if site.config.manual_approval { "manual" } else { "automatic" }));
    if let Some(a) = &approval {
        text.push_str(&describe_offer(a));
    }
    text.push_str(&describe_decision(site, job_id, &spec)?);
    output::block(&text)?;
    Ok(())
}

/// The policy's verdict on a job, one line per check, `ok` or `FAIL`.
#[derive(Default)]
struct Verdict(String);

impl Verdict {
    fn line(&mut self, ok: bool, name: &str, detail: &str) {
        self.0.push_str(&format!("    {} {name:<14} {detail}\n", if ok { "ok  " } else { "FAIL" }))
    }
}

/// Every check the site would make of `spec`: the policy's, then the
/// dataset's rows against the spec, then its per-job cap and budget once
/// its sizes are released.
fn verdict(site: &Site, spec: &JobSpec, job_id: &str) -> Result<String> {
    let sizes = site.ledger.current_sizes(&spec.dataset)?;
    let mut verdict = Verdict::default();
    for check in meridian_worker::policy::checks(&site.config, spec, sizes.as_ref()) {
        match check.outcome {
            Ok(detail) => verdict.line(true, check.name, &detail),
            Err((code, detail)) => verdict.line(false, check.name, &format!("{detail} ({code})")),
        }
    }
    if let Some(d) = site.config.datasets.iter().find(|d| d.name == spec.dataset) {
        schema_check(d, spec, &mut verdict);
        if let Some(sizes) = &sizes {
            budget_checks(site, d, spec, job_id, sizes.train_rows, &mut verdict)?;
        }
    }
    Ok(verdict.0)
}

/// Whether every row of the dataset fits the spec.
fn schema_check(d: &DatasetConfig, spec: &JobSpec, verdict: &mut Verdict) {
    let split = meridian_worker::dataset::SplitOptions { test_fraction: d.test_fraction, seed: d.split_seed };
    match meridian_worker::dataset::load(&d.path, &spec.features, &split) {
        Ok(data) => verdict.line(
            true,
            "schema",
            &format!("every row of {} fits the spec ({} inputs)", d.path.display(), data.dim),
        ),
        Err(e) => verdict.line(false, "schema", &format!("{e} ({})", e.reason(&spec.features).code())),
    }
}

/// The job's planned ε against the per-job cap, and the dataset's ε with it
/// against the budget, at `train_rows` released training rows.
fn budget_checks(
    site: &Site,
    d: &DatasetConfig,
    spec: &JobSpec,
    job_id: &str,
    train_rows: u64,
    verdict: &mut Verdict,
) -> Result<()> {
    let plan = spec.site_plan(train_rows);
    let preview = site.ledger.preview(d, job_id, &plan, spec.privacy.delta)?;
    let planned = format!(
        "planned ε {:.3} at δ {:e} (q {:.5}, {} steps a round) against the per-job cap {:.3}",
        preview.planned_epsilon, spec.privacy.delta, plan.sample_rate, plan.steps_per_round, d.job_epsilon_cap
    );
    verdict.line(preview.planned_epsilon <= d.job_epsilon_cap, "per-job cap", &planned);
    let spent = site.ledger.spent(&d.name, d.budget_delta)?;
    let budget = format!(
        "dataset at ε {spent:.3} now; with this job and every accepted job's remaining plan, composed: ε {:.3} of its budget {:.3} (δ {:e})",
        preview.projected_epsilon, d.budget_epsilon, d.budget_delta
    );
    verdict.line(preview.projected_epsilon <= d.budget_epsilon, "budget", &budget);
    Ok(())
}

/// The offer's state under manual approval, and who decided it when.
fn describe_offer(a: &Approval) -> String {
    let by = if a.decided_by.is_empty() {
        String::new()
    } else {
        format!(" by {} at unix ms {}", a.decided_by, a.decided_at_ms)
    };
    format!(
        "    offer      {}{by}{}\n",
        a.state.as_str(),
        if a.reason.is_empty() { String::new() } else { format!(": {}", a.reason) }
    )
}

/// The site's decision on the job: none yet, accepted with what it spent,
/// or refused with the local detail the coordinator never saw.
fn describe_decision(site: &Site, job_id: &str, spec: &JobSpec) -> Result<String> {
    Ok(match site.ledger.decision(job_id)? {
        None => "  decision   none yet\n".to_string(),
        Some(d) => match &d.refusal {
            None => format!(
                "  decision   accepted: planned ε {:.3}, released training rows {}, spent so far ε {:.3}\n",
                d.planned_epsilon,
                d.train_examples,
                site.ledger.job_spent(job_id, spec.privacy.delta)?
            ),
            Some(r) => format!(
                "  decision   refused, the coordinator was told {} only\n    here       {}\n",
                r.reason.code(),
                r.detail
            ),
        },
    })
}

fn budget(site: &Site, json: bool) -> Result<()> {
    let mut rows = Vec::new();
    let decisions = site.ledger.decisions()?;
    for d in &site.config.datasets {
        rows.push(serde_json::json!({
            "dataset": d.name, "job_id": null, "delta": d.budget_delta,
            "epsilon_spent": site.ledger.spent(&d.name, d.budget_delta)?,
            "epsilon_with_reserved": site.ledger.committed(d)?,
            "epsilon_limit": d.budget_epsilon, "job_epsilon_cap": d.job_epsilon_cap,
        }));
        for r in decisions.iter().filter(|r| r.dataset == d.name && r.accepted) {
            let delta = JobSpec::from_canonical_json(&r.spec_json).map(|s| s.privacy.delta).unwrap_or(d.budget_delta);
            rows.push(serde_json::json!({
                "dataset": d.name, "job_id": r.job_id, "delta": delta, "active": r.active,
                "epsilon_spent": site.ledger.job_spent(&r.job_id, delta)?, "epsilon_limit": d.job_epsilon_cap,
            }));
        }
    }
    if json {
        return Ok(output::json(&serde_json::json!(rows))?);
    }
    let mut text = String::from("dataset     job              ε spent   + reserved  ε limit   δ\n");
    for r in &rows {
        let num = |k: &str| r[k].as_f64().map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
        text.push_str(&format!(
            "{:<11} {:<16} {:>8}  {:>10}  {:>8}  {:e}{}\n",
            r["dataset"].as_str().unwrap_or_default(),
            r["job_id"].as_str().unwrap_or("(all, composed)"),
            num("epsilon_spent"),
            num("epsilon_with_reserved"),
            num("epsilon_limit"),
            r["delta"].as_f64().unwrap_or_default(),
            if r["active"] == true { "  running" } else { "" }
        ));
    }
    output::block(&text)?;
    Ok(())
}
