//! A job offer decided at the site: the spec checked against its hash
//! and the site's policy, every row the job would read loaded and checked,
//! the budget previewed, a person asked in manual mode, and the decision
//! committed to the ledger before the answer goes out. A refusal sends only
//! its code and the spec's columns; its detail stays in the site's log and
//! audit.

use std::sync::Arc;
use std::time::Duration;

use meridian_spec::job::JobSpec;
use meridian_spec::reason::ReasonCode;
use meridian_sys::sync::lock;
use meridian_wire::pb;
use meridian_wire::pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;
use tracing::{info, instrument, warn};

use super::{JobContext, Worker};
use crate::approvals::{self, ApprovalState};
use crate::error::WorkerError;
use crate::ledger;
use crate::outgoing::{self, Refusal};
use crate::policy;

/// What a decision says a job costs.
fn cost_of(decision: &ledger::Decision) -> outgoing::Cost {
    outgoing::Cost { planned: decision.planned_epsilon, projected: decision.projected_epsilon }
}

impl Worker {
    /// Decides an offer and answers it.
    #[instrument(skip_all, fields(job_id = %job_id))]
    pub(super) async fn handle_offer(
        self: &Arc<Self>,
        job_id: &str,
        offer: pb::JobOffer,
        client: &mut WorkerServiceClient<Channel>,
    ) -> Result<(), WorkerError> {
        let answer = match self.decide_offer(job_id, &offer).await {
            Ok(answer) => {
                info!(planned_epsilon = answer.planned_epsilon, "accepting offer");
                self.audit(
                    "offer.accepted",
                    job_id,
                    serde_json::json!({
                        "spec_hash": answer.spec_hash,
                        "planned_epsilon": answer.planned_epsilon,
                        "released_examples": answer.train_examples,
                    }),
                );
                answer
            }
            Err(refusal) => {
                // The detail is the site's alone; only the code and the spec's columns leave.
                warn!(reason = %refusal.reason, detail = %refusal.detail, "refusing offer");
                self.audit(
                    "offer.refused",
                    job_id,
                    serde_json::json!({
                        "spec_hash": offer.spec_hash,
                        "code": refusal.reason.code().as_str(),
                        "columns": refusal.reason.columns(),
                        "detail": refusal.detail,
                    }),
                );
                outgoing::refusal(job_id, &offer.spec_hash, &refusal.reason, refusal.cost)
            }
        };
        client.answer_offer(answer).await?;
        Ok(())
    }

    async fn decide_offer(self: &Arc<Self>, job_id: &str, offer: &pb::JobOffer) -> Result<pb::OfferAnswer, Refusal> {
        let internal = |e: &dyn std::fmt::Display| Refusal::new(ReasonCode::Internal, e.to_string());
        let spec = JobSpec::from_canonical_json(&offer.spec_json)
            .map_err(|e| Refusal::new(ReasonCode::SpecMismatch, e.to_string()))?;
        if spec.hash() != offer.spec_hash {
            return Err(Refusal::new(ReasonCode::SpecMismatch, "the offered spec does not match its hash"));
        }
        let sizes = self.ledger.current_sizes(&spec.dataset).map_err(|e| internal(&e))?;
        if let Some(refusal) = policy::first_failure(&self.config, &spec, sizes.as_ref()) {
            return Err(refusal);
        }
        let (Some(cfg), Some(sizes)) = (self.dataset_config(&spec.dataset).cloned(), sizes) else {
            return Err(Refusal::new(ReasonCode::Internal, "the policy checks passed without a dataset or its sizes"));
        };
        // Reads and checks every row the job would use: a bad one refuses it now.
        self.load_data(&spec, &offer.spec_hash).await?;
        let plan = spec.site_plan(sizes.train_rows);
        // A person is asked only about an offer the budget would take.
        let preview = self.ledger.preview(&cfg, job_id, &plan, spec.privacy.delta).map_err(|e| internal(&e))?;
        if let Some(refusal) = preview.refusal.clone() {
            return Err(Refusal { cost: cost_of(&preview), ..refusal });
        }
        let offered = ledger::Offered {
            job_id,
            spec_hash: &offer.spec_hash,
            spec_json: &offer.spec_json,
            submitted_by: &offer.submitted_by,
        };
        if self.config.manual_approval
            && let Err(refusal) = self.await_approval(job_id, offer, &spec, cost_of(&preview)).await
        {
            // A person's no is a decision, recorded like the budget's.
            if refusal.reason.code() == ReasonCode::NotApproved {
                self.ledger.refuse(&cfg, &offered, &plan, spec.privacy.delta, &refusal).map_err(|e| internal(&e))?;
            }
            return Err(Refusal { cost: cost_of(&preview), ..refusal });
        }
        let decision = self.ledger.decide(&cfg, &offered, &plan, spec.privacy.delta).map_err(|e| internal(&e))?;
        let cost = cost_of(&decision);
        if let Some(refusal) = decision.refusal {
            return Err(Refusal { cost, ..refusal });
        }
        lock(&self.jobs).insert(
            job_id.to_string(),
            Arc::new(JobContext {
                job_id: job_id.to_string(),
                spec_hash: offer.spec_hash.clone(),
                spec,
                cancel: self.shutdown.child_token(),
            }),
        );
        Ok(outgoing::acceptance(job_id, &offer.spec_hash, cost, decision.train_examples))
    }

    /// Waits until a person at the hospital approves (Ok) or rejects this
    /// exact spec, the job is stopped, or the daemon shuts down; marks the
    /// offer as waited on every second, so `site pending` shows it, and
    /// audits the decision with who made it.
    async fn await_approval(
        &self,
        job_id: &str,
        offer: &pb::JobOffer,
        spec: &JobSpec,
        cost: outgoing::Cost,
    ) -> Result<(), Refusal> {
        let internal = |e: approvals::ApprovalError| Refusal::new(ReasonCode::Internal, e.to_string());
        let mut current = self.approvals.request(&approval_request(job_id, offer, spec, cost)).map_err(internal)?;
        if current.state == ApprovalState::Pending {
            info!(job_id, spec_hash = %offer.spec_hash, "offer waits for approval: meridian site approve {job_id}");
        }
        // Bounded: a pending offer waits at most a day.
        for _ in 0..86_400 {
            if let Some(decided) = self.settled(job_id, &offer.spec_hash, &current) {
                return decided;
            }
            if lock(&self.stopped).contains(job_id) {
                self.approvals.stop(job_id).map_err(internal)?;
                return Err(Refusal::new(ReasonCode::JobStopped, "the job was stopped before it was approved"));
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    return Err(Refusal::new(ReasonCode::ShuttingDown, "the site is shutting down"));
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            current = self
                .approvals
                .waiting(job_id, &offer.spec_hash)
                .map_err(internal)?
                .ok_or_else(|| Refusal::new(ReasonCode::Internal, "the approval request vanished"))?;
        }
        Err(Refusal::new(ReasonCode::Expired, "no decision within a day"))
    }

    /// The outcome of an approval request that is no longer pending (a
    /// person's decision audited with who made it); `None` while it is.
    fn settled(&self, job_id: &str, spec_hash: &str, current: &approvals::Approval) -> Option<Result<(), Refusal>> {
        let decided = serde_json::json!({
            "spec_hash": spec_hash, "by": current.decided_by, "at_unix_ms": current.decided_at_ms,
        });
        match current.state {
            ApprovalState::Approved => {
                self.audit("offer.approved", job_id, decided);
                Some(Ok(()))
            }
            ApprovalState::Rejected => {
                self.audit(
                    "offer.rejected",
                    job_id,
                    serde_json::json!({ "decision": decided, "reason": current.reason }),
                );
                Some(Err(Refusal::new(
                    ReasonCode::NotApproved,
                    format!("rejected by {}: {}", current.decided_by, current.reason),
                )))
            }
            ApprovalState::Stopped => {
                Some(Err(Refusal::new(ReasonCode::JobStopped, "the job was stopped before it was decided")))
            }
            ApprovalState::Pending => None,
        }
    }
}

/// The request for a person's decision on an offer, pending.
fn approval_request(job_id: &str, offer: &pb::JobOffer, spec: &JobSpec, cost: outgoing::Cost) -> approvals::Approval {
    approvals::Approval {
        job_id: job_id.to_string(),
        spec_hash: offer.spec_hash.clone(),
        spec_json: offer.spec_json.clone(),
        submitted_by: offer.submitted_by.clone(),
        name: spec.name.clone(),
        dataset: spec.dataset.clone(),
        model: spec.model.kind().to_string(),
        planned_epsilon: cost.planned,
        projected_epsilon: cost.projected,
        state: ApprovalState::Pending,
        reason: String::new(),
        decided_by: String::new(),
        decided_at_ms: 0,
    }
}
