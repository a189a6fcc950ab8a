//! The scientist's and reviewer's commands: talking to the coordinator over
//! mutual TLS and rendering what comes back as tables or JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use meridian_spec::job::JobSpec;
use meridian_wire::identity::IdentityFiles;
use meridian_wire::pb;
use meridian_wire::tensor::ChunkAssembler;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

/// Where the coordinator is and who we are.
#[derive(Clone, Debug)]
pub struct Connection {
    /// `https://host:port`.
    pub coordinator: String,
    /// Directory with `ca.pem`, `cert.pem`, `key.pem`.
    pub identity: PathBuf,
}

impl Connection {
    /// Opens a channel with mutual TLS.
    pub async fn channel(&self) -> Result<Channel> {
        let identity = IdentityFiles::from_dir(&self.identity)
            .with_context(|| format!("loading the identity in {}", self.identity.display()))?;
        let channel = Endpoint::from_shared(self.coordinator.clone())
            .with_context(|| format!("coordinator URL \"{}\"", self.coordinator))?
            .tls_config(identity.client_tls())?
            .connect_timeout(Duration::from_secs(5))
            .max_frame_size(Some(meridian_wire::tensor::MAX_FRAME_BYTES))
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.coordinator))?;
        Ok(channel)
    }

    /// A job service client.
    pub async fn jobs(&self) -> Result<pb::job_service_client::JobServiceClient<Channel>> {
        Ok(pb::job_service_client::JobServiceClient::new(self.channel().await?).max_decoding_message_size(4 << 20))
    }

    /// An application service client.
    pub async fn applications(&self) -> Result<pb::application_service_client::ApplicationServiceClient<Channel>> {
        Ok(pb::application_service_client::ApplicationServiceClient::new(self.channel().await?))
    }

    /// A privacy service client.
    pub async fn privacy(&self) -> Result<pb::privacy_service_client::PrivacyServiceClient<Channel>> {
        Ok(pb::privacy_service_client::PrivacyServiceClient::new(self.channel().await?))
    }
}

/// Turns a gRPC status into a one-line error.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// `meridian job submit`: validates locally, then submits; returns the job id.
pub async fn submit(conn: &Connection, path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    JobSpec::from_toml(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?;
    let reply = conn
        .jobs()
        .await?
        .submit_job(pb::SubmitJobRequest { spec_toml: text })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", path.display(), s.message()))?;
    Ok(reply.into_inner().job_id)
}

/// `meridian job plan`: validates locally, then asks the coordinator.
pub async fn plan(conn: &Connection, path: &Path) -> Result<pb::JobPlan> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    JobSpec::from_toml(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?;
    let reply = conn
        .jobs()
        .await?
        .plan_job(pb::SubmitJobRequest { spec_toml: text })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", path.display(), s.message()))?;
    Ok(reply.into_inner())
}

/// What a planned charge releases (a plan always names it; DP-SGD is
/// what a charge of a job's rounds is otherwise).
fn charge_mechanism(c: &pb::PlannedCharge) -> meridian_spec::mechanism::Mechanism {
    meridian_wire::convert::mechanism(c.mechanism).unwrap_or(meridian_spec::mechanism::Mechanism::DpSgd)
}

fn charge_text(c: &pb::PlannedCharge) -> String {
    format!("{} q {:.5} σ {} × {}", charge_mechanism(c), c.sample_rate, c.noise_multiplier, c.steps)
}

/// A plan as a human reads it.
pub fn render_plan(plan: &pb::JobPlan) -> String {
    let mut out = format!("ε at δ = {:e} by {}; sizes are the sites' released ones\n", plan.delta, plan.accountant);
    for s in &plan.sites {
        let verdict = if s.would_take {
            if s.manual_approval { "would take it once a person there approves" } else { "would take it" }
        } else {
            "would refuse it"
        };
        out.push_str(&format!("  {}: {verdict}\n", s.site));
        for c in &s.checks {
            let code = if c.passed { String::new() } else { format!(" ({})", c.code) };
            out.push_str(&format!(
                "    {} {:<14} {}{code}\n",
                if c.passed { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        if s.train_rows > 0 {
            out.push_str(&format!(
                "    plan   {} training rows: q {:.5}, {} steps a round; {}\n",
                s.train_rows,
                s.sample_rate,
                s.steps_per_round,
                s.charges.iter().map(charge_text).collect::<Vec<_>>().join(", ")
            ));
            out.push_str(&format!(
                "    ε      {:.3} for the job (cap {:.3}); the dataset is at {:.3} and would reach {:.3} (budget {:.3} at δ {:e})\n",
                s.planned_epsilon, s.job_epsilon_cap, s.spent_epsilon, s.projected_epsilon, s.budget_epsilon, s.budget_delta
            ));
        }
    }
    out.push_str(&format!(
        "{} of {} sites would take the job; it needs {} (policy.min_sites)\n",
        plan.takers,
        plan.sites.len(),
        plan.min_sites
    ));
    out
}

/// A plan as JSON.
pub fn plan_json(plan: &pb::JobPlan) -> serde_json::Value {
    let sites: Vec<_> = plan
        .sites
        .iter()
        .map(|s| {
            serde_json::json!({
                "site": s.site, "would_take": s.would_take, "manual_approval": s.manual_approval,
                "checks": s.checks.iter().map(|c| serde_json::json!({
                    "name": c.name, "passed": c.passed, "detail": c.detail, "code": if c.code.is_empty() { None } else { Some(&c.code) },
                })).collect::<Vec<_>>(),
                "train_rows": s.train_rows, "sample_rate": s.sample_rate, "steps_per_round": s.steps_per_round,
                "charges": s.charges.iter().map(|c| serde_json::json!({
                    "mechanism": charge_mechanism(c).as_str(),
                    "sample_rate": c.sample_rate, "noise_multiplier": c.noise_multiplier, "steps": c.steps,
                })).collect::<Vec<_>>(),
                "planned_epsilon": s.planned_epsilon, "job_epsilon_cap": s.job_epsilon_cap,
                "spent_epsilon": s.spent_epsilon, "projected_epsilon": s.projected_epsilon,
                "budget_epsilon": s.budget_epsilon, "budget_delta": s.budget_delta,
            })
        })
        .collect();
    serde_json::json!({
        "sites": sites, "takers": plan.takers, "min_sites": plan.min_sites, "delta": plan.delta, "accountant": plan.accountant,
    })
}

/// One job's status.
pub async fn get(conn: &Connection, job_id: &str) -> Result<pb::JobStatus> {
    Ok(conn
        .jobs()
        .await?
        .get_job(pb::GetJobRequest { job_id: job_id.to_string() })
        .await
        .map_err(status_error)?
        .into_inner())
}

fn metric(m: &std::collections::HashMap<String, f64>, key: &str) -> String {
    m.get(key).map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

/// A job as a human-readable block.
pub fn render_status(s: &pb::JobStatus) -> String {
    let mut out = format!(
        "job {} ({})\n  state      {}{}\n  model      {} on dataset {} ({} parameters)\n  round      {} of {}\n  submitted  by {}\n",
        s.job_id,
        s.name,
        s.state,
        if s.reason.is_empty() { String::new() } else { format!(": {}", s.reason) },
        s.model,
        s.dataset,
        s.num_params,
        s.current_round,
        s.total_rounds,
        s.submitted_by
    );
    if s.client_epsilon > 0.0 {
        out.push_str(&format!("  client-level DP: ε = {:.3} per hospital at δ = {:e}\n", s.client_epsilon, s.delta));
    }
    out.push_str(&format!("  sites (ε at δ = {:e}, every release composed):\n", s.delta));
    for site in &s.sites {
        out.push_str(&format!(
            "    {:<14} {:<9} planned ε {:.3}  spent ε {:.3}  {} training rows (released){}{}\n",
            site.site,
            site.state,
            site.planned_epsilon,
            site.spent_epsilon,
            site.train_examples,
            if site.releases_exact_metrics { "  [releases EXACT metrics]" } else { "" },
            site_reason(site)
        ));
    }
    out.push_str(&render_rounds(s));
    if s.rounds.iter().any(|r| !r.exact_eval_metrics.is_empty() || !r.exact_train_metrics.is_empty()) {
        out.push_str("  exact metrics (unprotected, from sites whose policy releases them):\n");
        for r in s.rounds.iter().filter(|r| !r.exact_eval_metrics.is_empty() || !r.exact_train_metrics.is_empty()) {
            out.push_str(&format!(
                "  {:>5}  test AUC {}  test loss {}  train loss {}\n",
                r.round,
                metric(&r.exact_eval_metrics, "auc"),
                metric(&r.exact_eval_metrics, "loss"),
                metric(&r.exact_train_metrics, "train_loss")
            ));
        }
    }
    out
}

/// The AUC and its standard error under the releases' noise: `0.8342±0.0040`.
fn auc(m: &std::collections::HashMap<String, f64>) -> String {
    match (m.get("auc"), m.get("auc_se")) {
        (Some(a), Some(se)) => format!("{a:.4}±{se:.4}"),
        (Some(a), None) => format!("{a:.4}"),
        _ => "-".to_string(),
    }
}

/// A site's reason as the scientist reads it: the code and columns, and
/// what the code means.
fn site_reason(site: &pb::SiteStatus) -> String {
    match meridian_spec::reason::ReasonCode::parse(&site.reason_code) {
        Some(meridian_spec::reason::ReasonCode::BudgetExceeded) if site.projected_epsilon > 0.0 => format!(
            "  ({}: the job would bring the dataset to ε {:.3}, composed with everything spent and reserved, over its budget of ε {:.3})",
            site.reason, site.projected_epsilon, site.budget_epsilon
        ),
        Some(code) => format!("  ({}: {})", site.reason, code.meaning()),
        None if site.reason.is_empty() => String::new(),
        None => format!("  ({})", site.reason),
    }
}

/// The per-round table: held-out metrics of each round's global model,
/// derived from the sites' noised histograms, and the released clipped
/// fraction of its training.
pub fn render_rounds(s: &pb::JobStatus) -> String {
    let mut out = String::from("  round  state       test AUC        test acc  test loss  clipped  updates\n");
    for r in &s.rounds {
        out.push_str(&format!(
            "  {:>5}  {:<10}  {:<14}  {:>8}  {:>9}  {:>7}  {}\n",
            r.round,
            r.state,
            auc(&r.eval_metrics),
            metric(&r.eval_metrics, "accuracy"),
            metric(&r.eval_metrics, "loss"),
            metric(&r.train_metrics, "clipped_fraction"),
            r.updated_sites.join(",")
        ));
    }
    out
}

/// ε a site has spent on the job so far, as the job status reports it.
fn epsilon_so_far(status: &pb::JobStatus) -> String {
    status
        .sites
        .iter()
        .filter(|s| s.state == "accepted" || s.spent_epsilon > 0.0)
        .map(|s| format!("{} {:.3}", s.site, s.spent_epsilon))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line for an aggregated round: what a person reads off a terminal or a log.
pub fn round_line(status: &pb::JobStatus, r: &pb::RoundStatus) -> String {
    format!(
        "round {:>3}/{} aggregated: {} updates, clipped {}, test AUC of round {} model {}, ε so far: {}",
        r.round,
        status.total_rounds,
        r.updated_sites.len(),
        metric(&r.train_metrics, "clipped_fraction"),
        r.round.saturating_sub(1),
        status.rounds.iter().find(|p| p.round + 1 == r.round).map_or_else(|| "-".to_string(), |p| auc(&p.eval_metrics)),
        epsilon_so_far(status)
    )
}

/// How `job watch` reports progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchOutput {
    /// A progress bar and a line per round, for a terminal.
    Terminal,
    /// A plain line per round, nothing else: stdout is not a terminal.
    Lines,
    /// One JSON object per event (JSON Lines), ending with the final state.
    Json,
    /// Nothing until the end (the demo's `--quiet`).
    Quiet,
}

/// `meridian job watch`: follows a job until it ends, reporting each
/// aggregated round as `output` says. Returns the final status.
pub async fn watch(conn: &Connection, job_id: &str, output: WatchOutput) -> Result<pb::JobStatus> {
    let mut stream = conn
        .jobs()
        .await?
        .watch_job(pb::GetJobRequest { job_id: job_id.to_string() })
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = if output == WatchOutput::Terminal { ProgressBar::new(1) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] round {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(job_id.to_string());
    if output == WatchOutput::Terminal {
        bar.enable_steady_tick(Duration::from_millis(200));
    }
    let mut printed = 0u32;
    let mut last_state = String::new();
    let mut last = None;
    while let Some(status) = stream.next().await {
        let status = status.map_err(status_error)?;
        bar.set_length(u64::from(status.total_rounds.max(1)));
        let aggregated = status.rounds.iter().filter(|r| r.state == "aggregated").count() as u64;
        bar.set_position(aggregated);
        let open = status.rounds.iter().find(|r| r.state == "open");
        bar.set_message(match (status.state.as_str(), open) {
            ("running", Some(r)) => format!("waiting for updates ({} in)", r.updated_sites.len()),
            (state, _) => state.to_string(),
        });
        if output == WatchOutput::Json && status.state != last_state {
            crate::output::json_line(
                &serde_json::json!({ "event": "state", "job_id": job_id, "state": status.state }),
            )?;
        }
        last_state.clone_from(&status.state);
        let fresh: Vec<&pb::RoundStatus> =
            status.rounds.iter().filter(|r| r.state == "aggregated" && r.round > printed).collect();
        for r in fresh {
            match output {
                WatchOutput::Terminal => bar.println(round_line(&status, r)),
                WatchOutput::Lines => crate::output::line(&round_line(&status, r))?,
                WatchOutput::Json => crate::output::json_line(&serde_json::json!({
                    "event": "round",
                    "job_id": job_id,
                    "round": round_json(r),
                    "epsilon": status.sites.iter().map(|s| (s.site.clone(), s.spent_epsilon)).collect::<BTreeMap<_, _>>(),
                }))?,
                WatchOutput::Quiet => {}
            }
            printed = r.round;
        }
        last = Some(status);
    }
    bar.finish_and_clear();
    let last = last.context("the watch stream ended without a status")?;
    // Evaluations of the last round can land after the final state change.
    let last = get(conn, &last.job_id).await?;
    if output == WatchOutput::Json {
        crate::output::json_line(&serde_json::json!({ "event": "final", "status": status_json(&last) }))?;
    }
    Ok(last)
}

/// `meridian model pull`: the global model as safetensors.
pub async fn pull_model(conn: &Connection, job_id: &str, round: Option<u32>, out: &Path) -> Result<(u32, usize)> {
    let status = get(conn, job_id).await?;
    let spec = JobSpec::from_canonical_json(&status.spec_json).map_err(anyhow::Error::msg)?;
    let arch = meridian_models::Architecture::new(&spec.model, spec.features.input_dim())?;
    let layout = arch.layout();
    if layout.hash() != status.layout_hash {
        bail!("the job's layout {} differs from this build's {}", status.layout_hash, layout.hash());
    }
    let mut stream = conn
        .jobs()
        .await?
        .pull_job_model(pb::PullJobModelRequest { job_id: job_id.to_string(), round })
        .await
        .map_err(status_error)?
        .into_inner();
    let header = match stream.next().await {
        Some(Ok(pb::ModelChunk { part: Some(pb::model_chunk::Part::Header(h)) })) => h,
        Some(Err(e)) => return Err(status_error(e)),
        _ => bail!("the model stream did not start with a header"),
    };
    let mut asm = ChunkAssembler::new(layout.num_params());
    while let Some(chunk) = stream.next().await {
        if let Some(pb::model_chunk::Part::Data(d)) = chunk.map_err(status_error)?.part {
            asm.push(&d)?;
        }
    }
    let params = asm.finish()?;
    let mut meta = BTreeMap::new();
    meta.insert("job_id".to_string(), job_id.to_string());
    meta.insert("round".to_string(), header.round.to_string());
    meta.insert("layout_hash".to_string(), header.layout_hash.clone());
    meta.insert("model".to_string(), spec.model.kind().to_string());
    meta.insert("inputs".to_string(), spec.features.encoded_names().join(","));
    crate::safetensors::write(out, &layout, &params, &meta)?;
    Ok((header.round, params.len()))
}

/// Budget rows, per site and dataset then per job.
pub async fn budgets(conn: &Connection) -> Result<Vec<pb::BudgetRow>> {
    Ok(conn.privacy().await?.get_budgets(pb::GetBudgetsRequest {}).await.map_err(status_error)?.into_inner().rows)
}

/// Budget rows as a table: ε spent is every entry composed by RDP; the
/// limit is the budget (or the per-job cap); there is no "left", which a
/// subtraction would get wrong (`job plan` says what a job would bring).
pub fn render_budgets(rows: &[pb::BudgetRow]) -> String {
    let mut out = String::from("site            dataset     job              ε spent   ε limit   δ        entries\n");
    for r in rows {
        out.push_str(&format!(
            "{:<15} {:<11} {:<16} {:>8.4}  {:>8.4}  {:<8e} {}{}\n",
            r.site,
            r.dataset,
            if r.job_id.is_empty() { "(all, composed)" } else { &r.job_id },
            r.epsilon_spent,
            r.epsilon_total,
            r.delta,
            r.rounds,
            if r.releases_exact_metrics { "  [site releases EXACT metrics]" } else { "" }
        ));
    }
    out
}

/// Ledger entries, optionally filtered.
pub async fn ledger(conn: &Connection, site: &str, dataset: &str) -> Result<Vec<pb::LedgerEntry>> {
    Ok(conn
        .privacy()
        .await?
        .list_ledger(pb::ListLedgerRequest { site: site.to_string(), dataset: dataset.to_string() })
        .await
        .map_err(status_error)?
        .into_inner()
        .entries)
}

/// Ledger entries as a table.
pub fn render_ledger(entries: &[pb::LedgerEntry]) -> String {
    let mut out = String::from(
        "site            seq dataset     job            round  mechanism     σ       q          C      steps  δ        ε entry  ε job    ε dataset\n",
    );
    for e in entries {
        out.push_str(&format!(
            "{:<15} {:>3} {:<11} {:<14} {:>5}  {:<13} {:<7} {:<10.6} {:<6} {:>5}  {:<8e} {:<8.4} {:<8.4} {:.4}\n",
            e.site,
            e.seq,
            e.dataset,
            if e.job_id.is_empty() { "(dataset)" } else { &e.job_id },
            e.round,
            e.charged().as_str(),
            e.noise_multiplier,
            e.sample_rate,
            e.clip_norm,
            e.steps,
            e.delta,
            e.epsilon_round,
            e.epsilon_job,
            e.epsilon_dataset
        ));
    }
    out
}

/// A ledger entry as JSON (every field a reviewer needs to recompute ε).
pub fn ledger_json(e: &pb::LedgerEntry) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq, "site": e.site, "dataset": e.dataset,
        "job_id": if e.job_id.is_empty() { None } else { Some(&e.job_id) }, "round": e.round,
        "mechanism": e.charged().as_str(),
        "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "clip_norm": e.clip_norm,
        "steps": e.steps, "delta": e.delta, "epsilon_round": e.epsilon_round, "epsilon_job": e.epsilon_job,
        "epsilon_dataset": e.epsilon_dataset, "accountant": e.accountant, "conversion": e.conversion,
        "library_version": e.library_version, "recorded_at_unix_ms": e.recorded_at_unix_ms, "spec_hash": e.spec_hash,
    })
}

/// A budget row as JSON.
pub fn budget_json(r: &pb::BudgetRow) -> serde_json::Value {
    serde_json::json!({
        "site": r.site, "dataset": r.dataset, "job_id": if r.job_id.is_empty() { None } else { Some(&r.job_id) },
        "epsilon_spent": r.epsilon_spent, "epsilon_limit": r.epsilon_total,
        "delta": r.delta, "entries": r.rounds, "releases_exact_metrics": r.releases_exact_metrics,
    })
}

/// A job status as JSON.
pub fn status_json(s: &pb::JobStatus) -> serde_json::Value {
    let rounds: Vec<_> = s.rounds.iter().map(round_json).collect();
    let sites: Vec<_> = s
        .sites
        .iter()
        .map(|x| {
            serde_json::json!({
                "site": x.site, "state": x.state, "reason": x.reason,
                "reason_code": if x.reason_code.is_empty() { None } else { Some(&x.reason_code) },
                "reason_columns": x.reason_columns, "planned_epsilon": x.planned_epsilon,
                "spent_epsilon": x.spent_epsilon, "train_examples": x.train_examples,
                "releases_exact_metrics": x.releases_exact_metrics,
                "projected_epsilon": x.projected_epsilon, "budget_epsilon": x.budget_epsilon,
            })
        })
        .collect();
    serde_json::json!({
        "job_id": s.job_id, "name": s.name, "state": s.state, "reason": s.reason, "submitted_by": s.submitted_by,
        "current_round": s.current_round, "total_rounds": s.total_rounds, "model": s.model, "dataset": s.dataset,
        "num_params": s.num_params, "layout_hash": s.layout_hash, "spec_hash": s.spec_hash, "delta": s.delta,
        "client_epsilon": s.client_epsilon,
        "sites": sites, "rounds": rounds,
    })
}

/// A round as JSON: its derived metrics, each site's released histogram
/// (for a reviewer to recompute them), and any exact metrics apart.
pub fn round_json(r: &pb::RoundStatus) -> serde_json::Value {
    let sites: Vec<_> = r
        .site_evaluations
        .iter()
        .map(|e| {
            serde_json::json!({
                "site": e.site, "negatives": e.negatives, "positives": e.positives, "noise_scale": e.noise_scale,
                "metrics": e.metrics.iter().collect::<BTreeMap<_, _>>(),
            })
        })
        .collect();
    serde_json::json!({
        "round": r.round, "state": r.state, "attempt": r.attempt, "updated_sites": r.updated_sites,
        "train_metrics": r.train_metrics.iter().collect::<BTreeMap<_, _>>(),
        "eval_metrics": r.eval_metrics.iter().collect::<BTreeMap<_, _>>(),
        "site_evaluations": sites,
        "exact_train_metrics": r.exact_train_metrics.iter().collect::<BTreeMap<_, _>>(),
        "exact_eval_metrics": r.exact_eval_metrics.iter().collect::<BTreeMap<_, _>>(),
    })
}
