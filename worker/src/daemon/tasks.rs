//! Carrying out a job's rounds at the site: evaluate the model a round
//! starts from, train on it, release and charge, send; and evaluate the
//! final model.
//!
//! Every value that leaves is charged first, in the order that keeps a
//! crash harmless: the update goes to the outbox, the round's clip count
//! and then its DP-SGD step are charged, and only then does anything go out.
//! A round whose DP-SGD charge is committed and whose update is in the
//! outbox is sent again as it was, never trained (and charged) again; a
//! release asked for again gives the values released then
//! ([`crate::ledger::Ledger::release`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_spec::job::SitePlan;
use meridian_spec::mechanism::Mechanism;
use meridian_spec::reason::ReasonCode;
use meridian_wire::pb;
use meridian_wire::pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;
use tracing::{info, instrument, warn};

use meridian_sys::sync::lock;

use super::{JobContext, Worker};
use crate::config::DatasetConfig;
use crate::dataset::EncodedDataset;
use crate::error::WorkerError;
use crate::ledger::{Decision, LedgerError};
use crate::outgoing::{self, ExactMetrics, Refusal, Released, UpdateFacts};
use crate::release::{self, JobRef};
use crate::train::{self, RoundOutcome, TrainError};
use crate::{download, upload};

/// An update ready to leave: charged, in the outbox.
struct Charged {
    update: Vec<f32>,
    entry: pb::LedgerEntry,
    clipped: Option<Released<i64>>,
    exact: ExactMetrics,
}

/// What every task of an accepted job needs.
struct Accepted {
    job: Arc<JobContext>,
    dataset: DatasetConfig,
    decision: Decision,
}

impl Worker {
    /// Pulls the global model of `round` into the site's spare model memory.
    async fn pull_model(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        job_id: &str,
        round: u32,
        layout_hash: &str,
        num_params: u64,
    ) -> Result<Vec<f32>, WorkerError> {
        let idle = Duration::from_secs(self.idle_timeout_secs.load(std::sync::atomic::Ordering::Relaxed));
        let memory = std::mem::take(&mut *lock(&self.spare_model));
        let wanted = download::Wanted { job_id, round, layout_hash, num_params };
        Ok(download::pull_model(client, &mut self.second_link(), wanted, memory, idle).await?)
    }

    fn outbox_path(&self, job_id: &str, round: u32) -> PathBuf {
        self.config.data_dir.join("outbox").join(format!("{job_id}-r{round:04}.bin"))
    }

    /// Tells the coordinator that a task failed, with the code and the
    /// spec's columns only; the detail goes to the site's log and audit.
    async fn report_failure(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        job_id: &str,
        round: u32,
        refusal: Refusal,
    ) -> Result<(), WorkerError> {
        warn!(job_id, round, reason = %refusal.reason, detail = %refusal.detail, "task failed at this site");
        self.audit(
            "task.failed",
            job_id,
            serde_json::json!({
                "round": round,
                "code": refusal.reason.code().as_str(),
                "columns": refusal.reason.columns(),
                "detail": refusal.detail,
            }),
        );
        client.report_failure(outgoing::failure(job_id, round, &refusal.reason)).await?;
        Ok(())
    }

    /// The accepted job, its dataset and its decision; a failure (reported)
    /// when any is missing.
    async fn accepted(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        job_id: &str,
        round: u32,
    ) -> Result<Option<Accepted>, WorkerError> {
        let job = match self.job(job_id) {
            Ok(job) => job,
            Err(e) => {
                let refusal =
                    Refusal::new(ReasonCode::Internal, format!("{job_id} was not accepted at this site: {e}"));
                let _ = self.report_failure(client, job_id, round, refusal).await;
                return Err(e);
            }
        };
        let Some(dataset) = self.dataset_config(&job.spec.dataset).cloned() else {
            let detail = format!("dataset \"{}\" is gone from this site's configuration", job.spec.dataset);
            self.report_failure(client, job_id, round, Refusal::new(ReasonCode::DatasetUnknown, detail)).await?;
            return Ok(None);
        };
        let Some(decision) = self.ledger.decision(job_id)? else {
            let refusal = Refusal::new(ReasonCode::Internal, format!("{job_id} has no recorded decision at this site"));
            self.report_failure(client, job_id, round, refusal).await?;
            return Ok(None);
        };
        Ok(Some(Accepted { job, dataset, decision }))
    }

    /// The job's data and architecture, and the global model of `round`;
    /// a failure (reported) when the data cannot be loaded or the layout
    /// differs.
    async fn model_and_data(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        job: &JobContext,
        round: u32,
        (layout_hash, num_params, task_round): (&str, u64, u32),
    ) -> Result<Option<(Arc<EncodedDataset>, meridian_models::Architecture, Vec<f32>)>, WorkerError> {
        let job_id = job.job_id.as_str();
        let data = match self.load_data(&job.spec, &job.spec_hash).await {
            Ok(d) => d,
            Err(refusal) => {
                self.report_failure(client, job_id, task_round, refusal).await?;
                return Ok(None);
            }
        };
        let arch = meridian_models::Architecture::new(&job.spec.model, data.dim)?;
        if arch.layout().hash() != layout_hash {
            let detail =
                format!("the job's model layout {layout_hash} differs from this site's {}", arch.layout().hash());
            self.report_failure(client, job_id, task_round, Refusal::new(ReasonCode::SpecMismatch, detail)).await?;
            return Ok(None);
        }
        let global = self.pull_model(client, job_id, round, layout_hash, num_params).await?;
        Ok(Some((data, arch, global)))
    }

    #[instrument(skip_all, fields(job_id = %job_id, round = task.round))]
    pub(super) async fn handle_train(
        self: &Arc<Self>,
        job_id: &str,
        task: pb::TrainTask,
        client: &mut WorkerServiceClient<Channel>,
    ) -> Result<(), WorkerError> {
        let round = task.round;
        let Some(accepted) = self.accepted(client, job_id, round).await? else {
            return Ok(());
        };
        // The site trains the rounds it accepted and no other, whoever asks.
        let rounds = accepted.job.spec.training.rounds;
        if round == 0 || round > rounds {
            let detail = format!("round {round} is outside the job's {rounds} rounds");
            return self.report_failure(client, job_id, round, Refusal::new(ReasonCode::SpecMismatch, detail)).await;
        }
        let outbox = self.outbox_path(job_id, round);
        let charged = match self.ledger.entry(job_id, round, Mechanism::DpSgd)? {
            Some(entry) if outbox.is_file() => {
                info!("resending the update of a charged round");
                let update = meridian_store::checkpoint::read(&outbox)?;
                let clipped = release::released_clip_count(&self.ledger, job_id, round)?;
                Charged { update, entry, clipped, exact: None }
            }
            // Charged, but its update is gone: training again would release a
            // second update on one charge.
            Some(_) => {
                let detail = format!(
                    "round {round} is charged but its update is gone from {}; it is not trained again",
                    outbox.display()
                );
                return self.report_failure(client, job_id, round, Refusal::new(ReasonCode::Internal, detail)).await;
            }
            None => match self.train_and_charge(client, job_id, &task, &accepted).await? {
                Some(charged) => charged,
                None => return Ok(()),
            },
        };
        let facts = UpdateFacts {
            job_id: job_id.to_string(),
            round,
            layout_hash: task.layout_hash.clone(),
            num_params: charged.update.len() as u64,
            weight: accepted.decision.train_examples.max(1),
            entry: charged.entry,
            clipped: charged.clipped,
            exact: charged.exact,
        };
        self.send_update(client, facts, charged.update).await
    }

    async fn send_update(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        facts: UpdateFacts,
        update: Vec<f32>,
    ) -> Result<(), WorkerError> {
        let (job_id, round) = (facts.job_id.clone(), facts.round);
        let header = outgoing::update_header(facts);
        let limit = self.config.upload_limit_bytes_per_sec;
        let reply = upload::push_reserved(client, &mut self.second_link(), header, Arc::new(update), limit).await?;
        self.audit(
            "update.sent",
            &job_id,
            serde_json::json!({ "round": round, "accepted": reply.accepted, "reason": reply.reason }),
        );
        if reply.accepted {
            info!("update delivered");
        } else {
            warn!(reason = %reply.reason, "update refused by the coordinator");
        }
        Ok(())
    }

    /// Evaluates the model the round starts from, trains, and charges the
    /// round's releases; `None` when the task ended otherwise (cancelled,
    /// or a failure reported).
    async fn train_and_charge(
        self: &Arc<Self>,
        client: &mut WorkerServiceClient<Channel>,
        job_id: &str,
        task: &pb::TrainTask,
        accepted: &Accepted,
    ) -> Result<Option<Charged>, WorkerError> {
        let (job, round) = (&accepted.job, task.round);
        let wanted = (task.layout_hash.as_str(), task.num_params, round);
        let Some((data, arch, global)) = self.model_and_data(client, job, round - 1, wanted).await? else {
            return Ok(None);
        };
        let global = Arc::new(global);
        // The held-out evaluation of the model this round starts from.
        if let Err(e) = self.report_evaluation(client, accepted, &arch, &data, Arc::clone(&global), round - 1).await {
            warn!(error = %e, "the evaluation of the round's starting model was not reported");
        }
        let plan = job.spec.site_plan(accepted.decision.train_examples);
        info!(epochs = job.spec.training.local_epochs, steps = plan.steps_per_round, "local training started");
        let (spec, device, cancel) = (job.spec.clone(), self.device.clone(), job.cancel.clone());
        let (global2, plan2) = (Arc::clone(&global), plan.clone());
        let trained = tokio::task::spawn_blocking(move || {
            train::train_round(&arch, &device, &global2, &data, &spec, &plan2, &cancel)
        })
        .await
        .map_err(WorkerError::panicked("training"))?;
        let Some(outcome) = self.trained(client, job_id, round, trained).await? else {
            return Ok(None);
        };
        let update: Vec<f32> = outcome.params.iter().zip(global.iter()).map(|(l, g)| l - g).collect();
        // The evaluation and training threads are done with it.
        if let Ok(memory) = Arc::try_unwrap(global) {
            *lock(&self.spare_model) = memory;
        }
        self.charge(client, accepted, &plan, round, outcome, update).await
    }

    /// The outcome of local training; `None` when it did not finish (the
    /// job cancelled, audited; or a failure, reported).
    async fn trained(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        job_id: &str,
        round: u32,
        trained: Result<RoundOutcome, TrainError>,
    ) -> Result<Option<RoundOutcome>, WorkerError> {
        let e = match trained {
            Ok(outcome) => return Ok(Some(outcome)),
            Err(TrainError::Cancelled) => {
                info!("local training stopped: the job was cancelled");
                self.audit("training.cancelled", job_id, serde_json::json!({ "round": round }));
                return Ok(None);
            }
            Err(e) => e,
        };
        let code = match e {
            TrainError::Diverged { .. } => ReasonCode::TrainingDiverged,
            TrainError::Layout(_) => ReasonCode::SpecMismatch,
            _ => ReasonCode::Internal,
        };
        self.report_failure(client, job_id, round, Refusal::new(code, e.to_string())).await?;
        Ok(None)
    }

    /// Puts the round's update in the outbox, then charges the round's
    /// releases (audited); `None` when the ledger refused (reported, the
    /// update removed).
    async fn charge(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        accepted: &Accepted,
        plan: &SitePlan,
        round: u32,
        outcome: RoundOutcome,
        update: Vec<f32>,
    ) -> Result<Option<Charged>, WorkerError> {
        let job = &accepted.job;
        let job_id = job.job_id.as_str();
        // Outbox first, then the charges: a crash in between leaves an
        // uncharged update that was never sent, which is discarded.
        let outbox = self.outbox_path(job_id, round);
        meridian_store::checkpoint::write_atomic(&outbox, &update)?;
        let job_ref = JobRef { job_id, spec_hash: &job.spec_hash, spec: &job.spec };
        let (entry, clipped) =
            match release::round(&self.ledger, &accepted.dataset, &job_ref, plan, round, &outcome.clipped_per_step) {
                Ok(charged) => charged,
                Err(e) => {
                    let _ = std::fs::remove_file(&outbox);
                    let code = match e {
                        LedgerError::OverBudget { .. } | LedgerError::BeyondPlan { .. } => ReasonCode::BudgetExceeded,
                        _ => ReasonCode::Internal,
                    };
                    self.report_failure(client, job_id, round, Refusal::new(code, e.to_string())).await?;
                    return Ok(None);
                }
            };
        self.audit(
            "epsilon.charged",
            job_id,
            serde_json::json!({
                "round": round,
                "ledger_seq": entry.seq,
                "epsilon_round": entry.epsilon_round,
                "epsilon_job": entry.epsilon_job,
                "epsilon_dataset": entry.epsilon_dataset,
                "clip_count_released": clipped.is_some(),
            }),
        );
        let exact = self.exact_metrics(job_id, round, "training", outcome.exact_metrics);
        Ok(Some(Charged { update, entry, clipped, exact }))
    }

    /// Exact metrics to send, if the site's policy releases them (audited).
    fn exact_metrics(
        &self,
        job_id: &str,
        round: u32,
        what: &str,
        metrics: std::collections::BTreeMap<String, f64>,
    ) -> ExactMetrics {
        if !self.config.release_exact_metrics {
            return None;
        }
        self.audit(
            "exact_metrics.released",
            job_id,
            serde_json::json!({ "round": round, "of": what, "metrics": metrics, "policy": "release_exact_metrics" }),
        );
        Some(metrics)
    }

    /// Evaluates `params` (the global model of `round`) on the held-out
    /// split and reports it: its histogram, noised and charged.
    async fn report_evaluation(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        accepted: &Accepted,
        arch: &meridian_models::Architecture,
        data: &Arc<EncodedDataset>,
        params: Arc<Vec<f32>>,
        round: u32,
    ) -> Result<(), WorkerError> {
        let job = &accepted.job;
        let bins = job.spec.evaluation.score_bins();
        let (arch2, device, data2) = (arch.clone(), self.device.clone(), Arc::clone(data));
        let evaluation = tokio::task::spawn_blocking(move || train::evaluate(&arch2, &device, &params, &data2, &bins))
            .await
            .map_err(WorkerError::panicked("evaluation"))??;
        let job_id = job.job_id.clone();
        let job_ref = JobRef { job_id: &job_id, spec_hash: &job.spec_hash, spec: &job.spec };
        let released = release::evaluation(&self.ledger, &accepted.dataset, &job_ref, round, &evaluation.histogram)?;
        self.audit(
            "evaluation.released",
            &job_id,
            serde_json::json!({ "round": round, "ledger_seq": released.entry.seq, "epsilon_job": released.entry.epsilon_job }),
        );
        let exact = self.exact_metrics(&job_id, round, "evaluation", evaluation.exact_metrics);
        client.report_evaluation(outgoing::evaluation(&job_id, round, released, exact)).await?;
        Ok(())
    }

    #[instrument(skip_all, fields(job_id = %job_id, round = task.round))]
    pub(super) async fn handle_evaluate(
        self: &Arc<Self>,
        job_id: &str,
        task: pb::EvaluateTask,
        client: &mut WorkerServiceClient<Channel>,
    ) -> Result<(), WorkerError> {
        let Some(accepted) = self.accepted(client, job_id, task.round).await? else {
            return Ok(());
        };
        let outcome = self.evaluate_final(client, job_id, &task, &accepted).await;
        // The job is over for this site, evaluated or not: release its
        // reservation and its outbox.
        self.finish(job_id);
        outcome
    }

    async fn evaluate_final(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        job_id: &str,
        task: &pb::EvaluateTask,
        accepted: &Accepted,
    ) -> Result<(), WorkerError> {
        // The final evaluation is of the last round's model, and there is one.
        let rounds = accepted.job.spec.training.rounds;
        if task.round != rounds {
            let detail =
                format!("an evaluation of round {} is not the final one of the job's {rounds} rounds", task.round);
            return self
                .report_failure(client, job_id, task.round, Refusal::new(ReasonCode::SpecMismatch, detail))
                .await;
        }
        let wanted = (task.layout_hash.as_str(), task.num_params, task.round);
        let Some((data, arch, params)) = self.model_and_data(client, &accepted.job, task.round, wanted).await? else {
            return Ok(());
        };
        self.report_evaluation(client, accepted, &arch, &data, Arc::new(params), task.round).await
    }

    /// Ends a job at this site: its reservation released, its updates
    /// removed from the outbox (a finished job's rounds are never sent again).
    pub(super) fn finish(&self, job_id: &str) {
        if let Err(e) = self.ledger.finish_job(job_id) {
            warn!(job_id, error = %e, "cannot release the job's reservation");
        }
        lock(&self.jobs).remove(job_id);
        let prefix = format!("{job_id}-r");
        if let Ok(entries) = std::fs::read_dir(self.config.data_dir.join("outbox")) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}
