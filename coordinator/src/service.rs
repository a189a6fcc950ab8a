//! The gRPC services: authorization by certificate role, request
//! validation, and the mapping of every error to a `tonic::Status` (this is
//! the one place that happens).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::failpoint;
use proto::identity::{Principal, Role, principal_from_der};
use proto::job::JobSpec;
use proto::pb;
use proto::evaluation::Histogram;
use proto::mechanism::Mechanism;
use proto::reason::SiteReason;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::model_cache::ModelPart;
use crate::BoxStream;
use crate::admission::{self, Expected, MAX_UPLOAD_PARTS, UpdateReceiver};
use crate::engine::{Coordinator, EngineError};
use crate::incoming::UpdateFile;
use crate::revocation::Revocations;
use crate::update_parts::{self, Arrival, ReceivedPart};
use crate::store::{EvaluationRow, Insert, JobRow, JobSiteRow, JobState, RoundRelease, StoreError, UpdateRow, now_ms};
use proto::checkpoint;

/// The three services over one shared [`Coordinator`].
#[derive(Clone)]
pub struct Services {
    pub(crate) inner: Arc<Coordinator>,
    pub(crate) revocations: Arc<Revocations>,
    pub(crate) board: Arc<TaskBoard>,
}

/// Every site's outstanding tasks as of one change: built by the first task
/// stream that wakes after the change and read by all the others, so a
/// change costs one pass over the jobs however many sites are connected.
#[derive(Default)]
pub struct TaskBoard {
    built: std::sync::Mutex<Option<(u64, Arc<SiteTasks>)>>,
}

/// Site → (task key, task) it still owes.
type SiteTasks = HashMap<String, Vec<(String, pb::Task)>>;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        warn!(error = %e, "store error");
        Status::internal(e.to_string())
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        warn!(error = %e, "engine error");
        Status::internal(e.to_string())
    }
}

/// ε of client-level DP after `rounds` aggregated rounds: every accepted
/// site takes part in every round (sampling rate 1), each round a Gaussian
/// mechanism with the effective noise multiplier, composed by RDP.
fn client_epsilon(job: &JobRow, rounds: u64) -> Result<f64, Status> {
    let Some(cdp) = &job.spec.client_dp else {
        return Ok(0.0);
    };
    if rounds == 0 {
        return Ok(0.0);
    }
    let mut acc = privacy::accountant::RdpAccountant::new();
    acc.compose_poisson_gaussian(1.0, cdp.update_noise_multiplier(), rounds)
        .and_then(|()| acc.epsilon(job.spec.privacy.delta))
        .map(|e| e.epsilon)
        .map_err(|e| Status::internal(format!("client-level accountant: {e}")))
}

/// Waits for the next committed change (and [`COALESCE`] more), or 5 s so
/// deadlines are re-read; false when the coordinator shuts down or the
/// client went away.
async fn next_change<T>(
    changes: &mut tokio::sync::watch::Receiver<u64>,
    shutdown: &tokio_util::sync::CancellationToken,
    tx: &mpsc::Sender<T>,
) -> bool {
    let changed = tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = tx.closed() => return false,
        r = changes.changed() => {
            if r.is_err() {
                return false;
            }
            true
        }
        _ = tokio::time::sleep(Duration::from_secs(5)) => true,
    };
    if changed {
        // Changes come in bursts (a thousand sites' updates); one look after
        // the burst settles costs a stream far less than one per change.
        tokio::time::sleep(COALESCE).await;
        changes.borrow_and_update();
    }
    true
}

/// How long a stream lets further changes gather before it looks.
const COALESCE: Duration = Duration::from_millis(20);

/// Who is calling, from the verified client certificate, if their role may call `rpc`.
fn authorize<T>(
    revocations: &Revocations,
    req: &Request<T>,
    allowed: &[Role],
    rpc: &str,
) -> Result<Principal, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let der = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let principal = principal_from_der(der.as_ref()).map_err(Status::unauthenticated)?;
    revocations
        .check(&principal.name, der.as_ref())
        .map_err(Status::unauthenticated)?;
    if !allowed.contains(&principal.role) {
        return Err(Status::permission_denied(format!(
            "{} (role {}) may not call {rpc}",
            principal.name, principal.role
        )));
    }
    Ok(principal)
}

const HOSPITAL: &[Role] = &[Role::Hospital];
const SUBMITTERS: &[Role] = &[Role::Scientist, Role::Admin];
const READERS: &[Role] = &[Role::Scientist, Role::Reviewer, Role::Admin];

impl Services {
    /// Who is calling, if their certificate is not revoked and their role may call `rpc`.
    pub(crate) fn authorize<T>(
        &self,
        req: &Request<T>,
        allowed: &[Role],
        rpc: &str,
    ) -> Result<Principal, Status> {
        authorize(&self.revocations, req, allowed, rpc)
    }

    fn job_or_not_found(&self, job_id: &str) -> Result<JobRow, Status> {
        self.inner
            .store
            .job(job_id)?
            .ok_or_else(|| Status::not_found(format!("no job \"{job_id}\"")))
    }

    /// The job's status as the scientist sees it.
    pub(crate) fn job_status(&self, job: &JobRow) -> Result<pb::JobStatus, Status> {
        let store = &self.inner.store;
        let sites = store.job_sites(&job.id)?;
        let policies = store.policies()?;
        let budgets: HashMap<String, f64> = store
            .datasets()?
            .into_iter()
            .filter(|d| d.info.name == job.spec.dataset)
            .map(|d| (d.site, d.info.budget_epsilon))
            .collect();
        // ε spent by each site on this job: the largest cumulative ε of its entries.
        let mut spent: HashMap<String, f64> = HashMap::new();
        for e in store.ledger("", &job.spec.dataset)?.into_iter().filter(|e| e.job_id == job.id) {
            let max = spent.entry(e.site).or_insert(0.0);
            *max = max.max(e.epsilon_job);
        }
        let evals = store.evaluations(&job.id)?;
        let bins = job.spec.evaluation.score_bins();
        let round_status = |round: u32, state: &str, attempt: u32, updated: Vec<String>, train: BTreeMap<String, f64>| {
            let rows: Vec<&EvaluationRow> = evals.iter().filter(|e| e.round == round).collect();
            let evaluation = crate::metrics::evaluation(&rows, &bins);
            let (exact_train, train): (BTreeMap<String, f64>, BTreeMap<String, f64>) =
                train.into_iter().partition(|(k, _)| k.starts_with(crate::metrics::EXACT));
            pb::RoundStatus {
                round,
                state: state.to_string(),
                attempt,
                updated_sites: updated,
                train_metrics: train.into_iter().collect(),
                eval_metrics: evaluation.pooled.into_iter().collect(),
                site_evaluations: evaluation.sites,
                exact_train_metrics: exact_train
                    .into_iter()
                    .map(|(k, v)| (k.trim_start_matches(crate::metrics::EXACT).to_string(), v))
                    .collect(),
                exact_eval_metrics: evaluation.exact.into_iter().collect(),
            }
        };
        let updated_sites = |round: u32| -> Result<Vec<String>, Status> {
            Ok(store.updates(&job.id, round)?.into_iter().map(|u| u.site).collect())
        };
        let mut rounds = Vec::new();
        if evals.iter().any(|e| e.round == 0) {
            rounds.push(round_status(0, "initial", 0, Vec::new(), BTreeMap::new()));
        }
        let closed = store.closed_rounds(&job.id)?;
        for (round, attempt, metrics) in &closed {
            rounds.push(round_status(*round, "aggregated", *attempt, updated_sites(*round)?, metrics.clone()));
        }
        if job.state == JobState::Running {
            let round = job.current_round;
            rounds.push(round_status(round, "open", job.attempt, updated_sites(round)?, BTreeMap::new()));
        }
        Ok(pb::JobStatus {
            job_id: job.id.clone(),
            name: job.spec.name.clone(),
            state: job.state.as_str().to_string(),
            reason: job.reason.clone(),
            submitted_by: job.submitted_by.clone(),
            current_round: job.current_round,
            total_rounds: job.spec.training.rounds,
            model: job.spec.model.kind().to_string(),
            dataset: job.spec.dataset.clone(),
            num_params: job.num_params,
            layout_hash: job.layout_hash.clone(),
            sites: sites
                .into_iter()
                .map(|s| pb::SiteStatus {
                    spent_epsilon: spent.get(&s.site).copied().unwrap_or(0.0),
                    releases_exact_metrics: policies.get(&s.site).is_some_and(|p| p.release_exact_metrics),
                    budget_epsilon: budgets.get(&s.site).copied().unwrap_or(0.0),
                    projected_epsilon: s.projected_epsilon,
                    site: s.site,
                    state: s.state,
                    reason: s.reason,
                    reason_code: s.reason_code,
                    reason_columns: s.reason_columns,
                    planned_epsilon: s.planned_epsilon,
                    train_examples: s.train_examples,
                })
                .collect(),
            rounds,
            submitted_at_unix_ms: job.submitted_at_ms,
            updated_at_unix_ms: job.updated_at_ms,
            spec_hash: job.spec_hash.clone(),
            delta: job.spec.privacy.delta,
            spec_json: job.spec.canonical_json(),
            client_epsilon: client_epsilon(job, closed.len() as u64)?,
        })
    }

    /// The job's plan at every site that holds its dataset.
    fn plan(&self, spec: &JobSpec) -> Result<pb::JobPlan, Status> {
        crate::plan::plan(&self.inner.store, spec).map_err(|e| match e {
            crate::plan::PlanError::NoHolder { .. } => Status::invalid_argument(e.to_string()),
            other => Status::internal(other.to_string()),
        })
    }

    /// The sites that can serve a spec, by its plan: every check but the
    /// budget passes (a budget changes as jobs run; the site decides it at
    /// the offer). Refused with the first problem when too few can.
    fn eligible_sites(&self, spec: &JobSpec) -> Result<Vec<String>, Status> {
        let plan = self.plan(spec)?;
        let mut eligible = Vec::new();
        let mut problems = BTreeSet::new();
        for site in &plan.sites {
            let failed: Vec<&pb::PolicyCheck> = site.checks.iter().filter(|c| !c.passed && c.name != "budget").collect();
            if failed.is_empty() {
                eligible.push(site.site.clone());
            }
            for c in failed {
                problems.insert(if c.detail.contains(&site.site) {
                    c.detail.clone()
                } else {
                    format!("{} at site {}: {} ({})", c.name, site.site, c.detail, c.code)
                });
            }
        }
        if (eligible.len() as u32) < spec.policy.min_sites {
            let detail = problems.into_iter().next().unwrap_or_else(|| {
                format!(
                    "policy.min_sites: {} sites hold dataset \"{}\", the job needs {}",
                    eligible.len(),
                    spec.dataset,
                    spec.policy.min_sites
                )
            });
            return Err(Status::invalid_argument(detail));
        }
        Ok(eligible)
    }
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for Services {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let who = self.authorize(&req, SUBMITTERS, "JobService/SubmitJob")?;
        let spec = JobSpec::from_toml(&req.get_ref().spec_toml, "job spec").map_err(|e| {
            Status::invalid_argument(e.to_string().trim_start_matches("job spec: ").to_string())
        })?;
        let sites = self.eligible_sites(&spec)?;
        let arch = models::Architecture::new(&spec.model, spec.features.input_dim())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let layout = arch.layout();
        // A fresh id: a clash with an existing job must not overwrite its initial model.
        let job_id = (0..8)
            .map(|_| format!("job-{:08x}", rand::random::<u32>()))
            .find(|id| !self.inner.model_path(id, 0).exists())
            .ok_or_else(|| Status::internal("no unused job id after 8 draws"))?;
        let seed = u64::from_le_bytes(
            <sha2::Sha256 as sha2::Digest>::digest(job_id.as_bytes())[..8]
                .try_into()
                .unwrap_or([0; 8]),
        );
        let chunks =
            checkpoint::write_chunks_atomic(&self.inner.model_path(&job_id, 0), &arch.init_params(seed), "checkpoint.rename")
                .map_err(|e| Status::internal(e.to_string()))?;
        let now = now_ms();
        let job = JobRow {
            id: job_id.clone(),
            spec_hash: spec.hash(),
            submitted_by: who.name.clone(),
            state: JobState::Offering,
            reason: String::new(),
            current_round: 0,
            attempt: 1,
            deadline_ms: now + spec.policy.round_deadline_secs as i64 * 1000,
            num_params: layout.num_params() as u64,
            layout_hash: layout.hash(),
            submitted_at_ms: now,
            updated_at_ms: now,
            spec,
        };
        self.inner.store.insert_job(&job, &sites)?;
        // The first round's pullers are served from memory, as every later round's are.
        self.inner.models.install(&job_id, 0, chunks);
        info!(job_id, submitted_by = %who.name, sites = ?sites, "job submitted");
        self.inner.audit(
            "job.submitted",
            &job_id,
            serde_json::json!({ "by": who.name, "spec_hash": job.spec_hash, "offered_to": sites }),
        );
        self.inner.spawn_driver(job_id.clone());
        self.inner.notify();
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn plan_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::JobPlan>, Status> {
        self.authorize(&req, READERS, "JobService/PlanJob")?;
        let spec = JobSpec::from_toml(&req.get_ref().spec_toml, "job spec").map_err(|e| {
            Status::invalid_argument(e.to_string().trim_start_matches("job spec: ").to_string())
        })?;
        Ok(Response::new(self.plan(&spec)?))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.authorize(&req, READERS, "JobService/ListJobs")?;
        let jobs = self
            .inner
            .store
            .jobs()?
            .iter()
            .map(|j| self.job_status(j))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.authorize(&req, READERS, "JobService/GetJob")?;
        let job = self.job_or_not_found(&req.get_ref().job_id)?;
        Ok(Response::new(self.job_status(&job)?))
    }

    type WatchJobStream = BoxStream<pb::JobStatus>;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.authorize(&req, READERS, "JobService/WatchJob")?;
        let job_id = req.get_ref().job_id.clone();
        self.job_or_not_found(&job_id)?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let mut changes = self.inner.changes.subscribe();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let mut last: Option<pb::JobStatus> = None;
            loop {
                let status = match this
                    .inner
                    .store
                    .job(&job_id)
                    .map_err(Status::from)
                    .and_then(|j| {
                        j.ok_or_else(|| Status::not_found("job vanished"))
                            .and_then(|j| this.job_status(&j))
                    }) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let terminal =
                    matches!(status.state.as_str(), "completed" | "failed" | "cancelled");
                let mut comparable = status.clone();
                comparable.updated_at_unix_ms = 0;
                let changed = last.as_ref() != Some(&comparable);
                if changed {
                    if tx.send(Ok(status)).await.is_err() {
                        return;
                    }
                    last = Some(comparable);
                }
                if terminal {
                    return;
                }
                if !next_change(&mut changes, &shutdown, &tx).await {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let who = self.authorize(&req, SUBMITTERS, "JobService/CancelJob")?;
        let job = self.job_or_not_found(&req.get_ref().job_id)?;
        if who.role != Role::Admin && who.name != job.submitted_by {
            return Err(Status::permission_denied(format!(
                "{} may not cancel {}: only its submitter {} or an admin may",
                who.name, job.id, job.submitted_by
            )));
        }
        if job.state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "job {} is already {}",
                job.id,
                job.state.as_str()
            )));
        }
        let reason = match req.get_ref().reason.trim() {
            "" => format!("cancelled by {}", who.name),
            r => format!("cancelled by {}: {r}", who.name),
        };
        self.inner.store.update_job(
            &job.id,
            JobState::Cancelled,
            &reason,
            job.current_round,
            job.attempt,
            job.deadline_ms,
        )?;
        self.inner.audit(
            "job.cancelled",
            &job.id,
            serde_json::json!({ "by": who.name, "reason": reason }),
        );
        self.inner.notify();
        let job = self.job_or_not_found(&job.id)?;
        Ok(Response::new(self.job_status(&job)?))
    }

    type PullJobModelStream = BoxStream<pb::ModelChunk>;

    async fn pull_job_model(
        &self,
        req: Request<pb::PullJobModelRequest>,
    ) -> Result<Response<Self::PullJobModelStream>, Status> {
        self.authorize(&req, SUBMITTERS, "JobService/PullJobModel")?;
        let job = self.job_or_not_found(&req.get_ref().job_id)?;
        let round = req.get_ref().round;
        Ok(Response::new(self.model_stream(&job, round, ModelPart::default())?))
    }
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for Services {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/Register")?;
        let r = req.get_ref();
        let mut names = BTreeSet::new();
        for d in &r.datasets {
            if !names.insert(d.name.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "datasets: \"{}\" is announced twice",
                    d.name
                )));
            }
        }
        for e in &r.ledger {
            if e.site != who.name {
                return Err(Status::invalid_argument(format!(
                    "ledger: entry {} names site \"{}\", the certificate says \"{}\"",
                    e.seq, e.site, who.name
                )));
            }
        }
        self.inner.store.register_site(
            &who.name,
            &r.software_version,
            &r.policy.clone().unwrap_or_default(),
            &r.datasets,
        )?;
        self.inner.store.mirror_ledger(&who.name, &r.ledger)?;
        info!(site = %who.name, datasets = r.datasets.len(), ledger_entries = r.ledger.len(), "site registered");
        self.inner.notify();
        let mirrored = self.mirrored(&who.name)?;
        Ok(Response::new(pb::RegisterResponse {
            site: who.name,
            idle_timeout_secs: self.inner.idle_timeout_secs,
            mirrored: Some(mirrored),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/Heartbeat")?;
        self.inner.store.touch_site(&who.name)?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    type ReceiveTasksStream = BoxStream<pb::Task>;

    async fn receive_tasks(
        &self,
        req: Request<pb::ReceiveTasksRequest>,
    ) -> Result<Response<Self::ReceiveTasksStream>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/ReceiveTasks")?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let mut changes = self.inner.changes.subscribe();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let mut sent: BTreeMap<String, String> = BTreeMap::new(); // task key -> job id
            loop {
                let tasks = match this.outstanding_tasks(&who.name) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let live: BTreeSet<String> = tasks.iter().map(|(k, _)| k.clone()).collect();
                for (key, task) in tasks {
                    if let std::collections::btree_map::Entry::Vacant(e) = sent.entry(key) {
                        e.insert(task.job_id.clone());
                        if matches!(task.kind, Some(pb::task::Kind::Train(_))) {
                            failpoint::hit("round.assign");
                        }
                        if tx.send(Ok(task)).await.is_err() {
                            return;
                        }
                    }
                }
                // Tasks of jobs that ended while this site was working on them: tell it to stop.
                let finished: Vec<(String, String)> = sent
                    .iter()
                    .filter(|(k, _)| !live.contains(*k))
                    .map(|(k, j)| (k.clone(), j.clone()))
                    .collect();
                for (key, job_id) in finished {
                    sent.remove(&key);
                    if let Ok(Some(job)) = this.inner.store.job(&job_id)
                        && job.state.is_terminal()
                    {
                        let cancel = pb::Task {
                            job_id,
                            kind: Some(pb::task::Kind::Cancel(pb::CancelJob {
                                reason: job.reason,
                            })),
                        };
                        if tx.send(Ok(cancel)).await.is_err() {
                            return;
                        }
                    }
                }
                if !next_change(&mut changes, &shutdown, &tx).await {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn answer_offer(
        &self,
        req: Request<pb::OfferAnswer>,
    ) -> Result<Response<pb::Ack>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/AnswerOffer")?;
        let a = req.get_ref();
        let job = self.job_or_not_found(&a.job_id)?;
        // A charge that came with the answer is mirrored first, whether or
        // not the answer is still wanted (a site that predates size releases
        // charges its count at acceptance).
        if let Some(entry) = &a.ledger_entry {
            if entry.site != who.name || entry.job_id != job.id {
                return Err(Status::invalid_argument(
                    "the answer's ledger entry belongs to another site or job",
                ));
            }
            self.inner
                .store
                .mirror_ledger(&who.name, std::slice::from_ref(entry))?;
        }
        if a.spec_hash != job.spec_hash {
            return Err(Status::failed_precondition(format!(
                "answer binds to spec {}, job {} has spec {}",
                a.spec_hash, job.id, job.spec_hash
            )));
        }
        if job.state != JobState::Offering {
            return Err(Status::failed_precondition(format!(
                "job {} is {}, not taking answers",
                job.id,
                job.state.as_str()
            )));
        }
        let state = if a.accept { "accepted" } else { "refused" };
        // Only a code and the spec's own column names are kept of a refusal.
        let refusal = (!a.accept).then(|| SiteReason::from_wire(a.refusal.as_ref(), &job.spec.features));
        if !self.inner.store.set_job_site(
            &job.id,
            &who.name,
            state,
            refusal.as_ref(),
            Some((a.planned_epsilon, a.projected_epsilon)),
            Some(a.train_examples),
        )? {
            return Err(Status::permission_denied(format!(
                "job {} was not offered to {}",
                job.id, who.name
            )));
        }
        let code = refusal.as_ref().map_or("", |r| r.code().as_str());
        let columns = refusal.as_ref().map_or(&[][..], |r| r.columns());
        info!(job_id = %job.id, site = %who.name, state, code, ?columns, "offer answered");
        self.inner.audit(
            if a.accept { "offer.accepted" } else { "offer.refused" },
            &job.id,
            serde_json::json!({ "site": who.name, "spec_hash": a.spec_hash, "code": code, "columns": columns, "planned_epsilon": a.planned_epsilon }),
        );
        self.inner.notify();
        Ok(Response::new(pb::Ack {}))
    }

    type PullModelStream = BoxStream<pb::ModelChunk>;

    async fn pull_model(
        &self,
        req: Request<pb::PullModelRequest>,
    ) -> Result<Response<Self::PullModelStream>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/PullModel")?;
        let r = req.get_ref();
        let job = self.job_or_not_found(&r.job_id)?;
        self.require_participant(&job, &who.name)?;
        let part = ModelPart { first_value: r.first_value, value_count: r.value_count };
        Ok(Response::new(self.model_stream(&job, Some(r.round), part)?))
    }

    async fn reserve_upload(
        &self,
        req: Request<pb::ReserveUploadRequest>,
    ) -> Result<Response<pb::ReserveUploadResponse>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/ReserveUpload")?;
        let job = self.job_or_not_found(&req.get_ref().job_id)?;
        self.require_participant(&job, &who.name)?;
        // A slot per part, taken at once: sites that each held one slot and
        // waited for a second could hold every slot between them.
        let parts = req.get_ref().parts.clamp(1, MAX_UPLOAD_PARTS);
        let slots = self.wait_for_upload_slots(&who.name, parts).await?;
        let valid_secs = self.inner.idle_timeout_secs;
        let lease = self.inner.leases.grant(&who.name, slots, Duration::from_secs(valid_secs));
        Ok(Response::new(pb::ReserveUploadResponse {
            lease,
            valid_secs: u32::try_from(valid_secs).unwrap_or(u32::MAX),
            parts,
        }))
    }

    async fn push_update(
        &self,
        req: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::PushUpdateResponse>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/PushUpdate")?;
        // At most RECEIVING_AT_ONCE updates are read at a time. A site that
        // reserved a slot (ReserveUpload) brings it in its lease; any other
        // waits here, unread, so HTTP/2 flow control holds it to one window.
        let lease = req
            .metadata()
            .get(proto::UPLOAD_LEASE_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|id| self.inner.leases.claim(id, &who.name));
        let _slot = match lease {
            Some(slot) => slot,
            None => self.wait_for_upload_slots(&who.name, 1).await?,
        };
        let mut stream = req.into_inner();
        let idle = Duration::from_secs(self.inner.idle_timeout_secs);
        // A stream that never sends its header must not keep its slot.
        let first = tokio::time::timeout(idle, stream.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no update header within the idle timeout"))?
            .ok_or_else(|| Status::invalid_argument("empty update stream"))??;
        let Some(pb::update_chunk::Part::Header(header)) = first.part else {
            return Err(Status::invalid_argument(
                "an update stream must start with its header",
            ));
        };
        let job = self.job_or_not_found(&header.job_id)?;
        // The site's charges are mirrored before anything can refuse the update: they were spent.
        self.mirror_own(&who.name, &job, header.ledger_entry.as_slice())?;
        let participant = self.require_participant(&job, &who.name)?;
        let reject = |reason: String| {
            warn!(job_id = %job.id, site = %who.name, round = header.round, reason, "update rejected");
            self.inner.audit(
                "update.rejected",
                &job.id,
                serde_json::json!({ "site": who.name, "round": header.round, "reason": reason }),
            );
            Ok(Response::new(pb::PushUpdateResponse {
                accepted: false,
                reason,
                complete: false,
            }))
        };
        let expected = Expected {
            job_id: &job.id,
            state: job.state.as_str(),
            running: job.state == JobState::Running,
            current_round: job.current_round,
            layout_hash: &job.layout_hash,
            num_params: job.num_params,
            spec_hash: &job.spec_hash,
            max_update_norm: job.spec.policy.max_update_norm,
            declared_examples: participant.train_examples,
            releases_clip_count: job.spec.privacy.clip_count_noise > 0.0,
        };
        let entry = match admission::check_header(&expected, &who.name, &header) {
            Ok(entry) => entry.clone(),
            Err(reason) => return reject(reason),
        };
        let part = match admission::check_part(&header) {
            Ok(part) => part,
            Err(reason) => return reject(reason),
        };
        // Every part of an upload carries the same header but for its range.
        let stream_of_part = match &part {
            None => None,
            Some(part) => {
                let update = (job.id.as_str(), header.round, who.name.as_str());
                match self.inner.update_parts.begin(update, &part.upload_id, admission::upload_identity(&header)) {
                    Ok(stream) => Some(stream),
                    Err(reason) => return reject(reason),
                }
            }
        };
        // A transfer that keeps making progress is waited for past the round's
        // deadline; one silent for the idle timeout is dropped.
        let transfer = self.inner.transfers.start(&job.id, &who.name);
        let name = format!("r{:04}-{}-{:08x}", header.round, who.name, rand::random::<u32>());
        let updates = self.inner.job_dir(&job.id).join("updates");
        // A part is a parameter file of its own until the last part lists them all.
        let mut path = match &part {
            None => updates.join(format!("{name}.bin")),
            Some(part) => update_parts::part_file(&updates, &name, part.first_value),
        };
        // Chunks go straight to disk as they are checked: one chunk in memory per transfer.
        // Read back once, when the round is aggregated: kept out of the page cache.
        let values = part.as_ref().map_or(job.num_params, |p| p.value_count);
        let file = checkpoint::CheckpointWriter::create_uncached(&path, values)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut file = UpdateFile::new(file);
        let mut receiver = match &part {
            None => UpdateReceiver::new(&expected),
            Some(part) => UpdateReceiver::part(&expected, part),
        };
        let receiving = Instant::now();
        let received: Result<Result<Option<f64>, String>, Status> = async {
            loop {
                let chunk = match tokio::time::timeout(idle, stream.next()).await {
                    Ok(Some(chunk)) => chunk?,
                    Ok(None) => return Ok(receiver.finish()),
                    Err(_) => {
                        return Ok(Err(format!(
                            "the update stream was silent for more than the idle timeout of {} s; the transfer was dropped",
                            self.inner.idle_timeout_secs
                        )));
                    }
                };
                let Some(pb::update_chunk::Part::Data(data)) = chunk.part else {
                    return Ok(Err("a second header inside the update stream".to_string()));
                };
                if let Err(reason) = receiver.push(&data) {
                    return Ok(Err(reason));
                }
                let len = data.len();
                file.write(data).await.map_err(Status::internal)?;
                transfer.progress(len);
                failpoint::hit("update.receive");
            }
        }
        .await;
        let received_in = receiving.elapsed();
        let abandon = || {
            if let Some(stream) = &stream_of_part {
                self.inner.update_parts.abandon(stream);
            }
        };
        let sum_of_squares = match received {
            Ok(Ok(sum_of_squares)) => {
                file.commit("update.rename").await.map_err(Status::internal)?;
                sum_of_squares
            }
            // Dropping the file removes it.
            Ok(Err(reason)) => {
                abandon();
                return reject(reason);
            }
            Err(status) => {
                abandon();
                return Err(status);
            }
        };
        if let (Some(part), Some(stream)) = (&part, &stream_of_part) {
            let received = ReceivedPart {
                path: path.clone(),
                first_value: part.first_value,
                value_count: part.value_count,
                sum_of_squares,
            };
            let parts = match self.inner.update_parts.arrive(stream, job.num_params, received) {
                Ok(Arrival::Waiting) => {
                    info!(job_id = %job.id, site = %who.name, round = header.round, first_value = part.first_value, values = part.value_count, "update part received");
                    return Ok(Response::new(pb::PushUpdateResponse {
                        accepted: true,
                        reason: format!(
                            "part of values {}..{} received; the update counts once all of its parts are in",
                            part.first_value,
                            part.first_value + part.value_count
                        ),
                        complete: false,
                    }));
                }
                Ok(Arrival::Whole(parts)) => parts,
                Err(reason) => return reject(reason),
            };
            if let Err(reason) = admission::check_norm(&expected, parts.iter().map(|p| p.sum_of_squares)) {
                update_parts::remove_files(parts);
                return reject(reason);
            }
            path = updates.join(format!("{name}.bin"));
            let listed: Vec<_> = parts.iter().map(|p| (p.path.clone(), p.value_count)).collect();
            // Two fsyncs: on a blocking thread, as the parts' own commits are.
            let list = path.clone();
            let written = tokio::task::spawn_blocking(move || checkpoint::write_parts(&list, &listed, "update.parts")).await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    update_parts::remove_files(parts);
                    return Err(Status::internal(e.to_string()));
                }
                Err(e) => {
                    update_parts::remove_files(parts);
                    return Err(Status::internal(format!("listing the update's parts failed: {e}")));
                }
            }
        }
        let exact_allowed = self.releases_exact_metrics(&who.name)?;
        let row = UpdateRow {
            site: who.name.clone(),
            num_examples: header.num_examples,
            released: RoundRelease {
                clipped: header.clipped_count,
                clip_denominator: entry.steps as f64 * entry.sample_rate * header.num_examples as f64,
                exact: if exact_allowed { header.exact_metrics.clone().into_iter().collect() } else { BTreeMap::new() },
            },
            path: path.to_string_lossy().into_owned(),
        };
        match self.inner.store.insert_update(&job.id, header.round, &row)? {
            Insert::Inserted => {}
            Insert::Duplicate => {
                let _ = checkpoint::remove(&path);
                return reject(format!("{} already sent its update for round {}", who.name, header.round));
            }
            Insert::RoundClosed => {
                let _ = checkpoint::remove(&path);
                return reject(format!(
                    "round {} closed while the update was arriving; it was not counted",
                    header.round
                ));
            }
        }
        failpoint::hit("update.persisted");
        // How long the values took to arrive, then to become durable: an
        // operator's first look at a slow upload.
        let receive_ms = received_in.as_millis() as u64;
        let persist_ms = (receiving.elapsed() - received_in).as_millis() as u64;
        info!(job_id = %job.id, site = %who.name, round = header.round, examples = header.num_examples, receive_ms, persist_ms, "update accepted");
        self.inner.audit(
            "update.accepted",
            &job.id,
            serde_json::json!({
                "site": who.name,
                "round": header.round,
                "examples": header.num_examples,
                "epsilon_round": entry.epsilon_round,
                "epsilon_job": entry.epsilon_job,
                "ledger_seq": entry.seq,
            }),
        );
        self.inner.notify();
        Ok(Response::new(pb::PushUpdateResponse {
            accepted: true,
            reason: String::new(),
            complete: true,
        }))
    }

    async fn report_evaluation(
        &self,
        req: Request<pb::EvaluationReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/ReportEvaluation")?;
        let r = req.get_ref();
        let job = self.job_or_not_found(&r.job_id)?;
        // The charge is mirrored before anything can refuse the report: it was spent.
        self.mirror_own(&who.name, &job, r.ledger_entry.as_slice())?;
        self.require_participant(&job, &who.name)?;
        // A released evaluation comes with its charge.
        let entry = r
            .ledger_entry
            .as_ref()
            .filter(|e| {
                e.site == who.name
                    && e.job_id == job.id
                    && e.round == r.round
                    && e.spec_hash == job.spec_hash
                    && Mechanism::of(e) == Mechanism::Evaluation
            })
            .ok_or_else(|| Status::invalid_argument("an evaluation must carry its own ledger entry (mechanism evaluation, this job, round and site)"))?;
        let histogram = Histogram { negatives: r.negatives.clone(), positives: r.positives.clone() };
        if !histogram.fits(&job.spec.evaluation.score_bins()) {
            return Err(Status::invalid_argument(format!(
                "the evaluation histogram has {} and {} cells, the job's evaluation has {} bins",
                r.negatives.len(),
                r.positives.len(),
                job.spec.evaluation.bins
            )));
        }
        if let Some((k, v)) = r.exact_metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(Status::invalid_argument(format!("exact_metrics.{k}: not finite ({v})")));
        }
        let exact_allowed = self.releases_exact_metrics(&who.name)?;
        self.inner.store.insert_evaluation(
            &job.id,
            &EvaluationRow {
                round: r.round,
                site: who.name.clone(),
                histogram,
                noise_scale: entry.noise_multiplier,
                exact: if exact_allowed { r.exact_metrics.clone().into_iter().collect() } else { BTreeMap::new() },
            },
        )?;
        self.inner.notify();
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_failure(
        &self,
        req: Request<pb::TaskFailure>,
    ) -> Result<Response<pb::Ack>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/ReportFailure")?;
        let r = req.get_ref();
        let job = self.job_or_not_found(&r.job_id)?;
        let reason = SiteReason::from_wire(r.reason.as_ref(), &job.spec.features);
        warn!(job_id = %job.id, site = %who.name, round = r.round, %reason, "site reported a failure");
        self.inner.audit(
            "site.failed",
            &job.id,
            serde_json::json!({ "site": who.name, "round": r.round, "code": reason.code().as_str(), "columns": reason.columns() }),
        );
        self.inner
            .store
            .set_job_site(&job.id, &who.name, "failed", Some(&reason), None, None)?;
        self.inner.notify();
        Ok(Response::new(pb::Ack {}))
    }

    async fn sync_ledger(
        &self,
        req: Request<pb::SyncLedgerRequest>,
    ) -> Result<Response<pb::SyncLedgerResponse>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/SyncLedger")?;
        let entries = &req.get_ref().entries;
        if let Some(e) = entries.iter().find(|e| e.site != who.name) {
            return Err(Status::invalid_argument(format!(
                "ledger: entry {} names site \"{}\", the certificate says \"{}\"",
                e.seq, e.site, who.name
            )));
        }
        self.inner.store.mirror_ledger(&who.name, entries)?;
        if !entries.is_empty() {
            info!(site = %who.name, entries = entries.len(), "ledger entries mirrored");
        }
        Ok(Response::new(self.mirrored(&who.name)?))
    }
}

impl Services {
    /// `slots` of the coordinator's upload slots, waited for in turn (the
    /// semaphore is first come, first served). A site waiting here counts as
    /// a transfer in progress for every job, so rounds wait for it; lapsed
    /// leases are released while waiting.
    async fn wait_for_upload_slots(&self, site: &str, slots: u32) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let queued = self.inner.transfers.start("", site);
        let acquire = Arc::clone(&self.inner.receiving).acquire_many_owned(slots);
        tokio::pin!(acquire);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                slot = &mut acquire => {
                    return slot.map_err(|_| Status::unavailable("the coordinator is shutting down"));
                }
                _ = tick.tick() => {
                    queued.progress(0);
                    self.inner.leases.purge();
                }
            }
        }
    }

    /// The global model of `round` (default: the latest aggregated) as a chunked stream.
    fn model_stream(
        &self,
        job: &JobRow,
        round: Option<u32>,
        part: ModelPart,
    ) -> Result<BoxStream<pb::ModelChunk>, Status> {
        let latest = self
            .inner
            .store
            .closed_rounds(&job.id)?
            .last()
            .map_or(0, |r| r.0);
        let round = round.unwrap_or(latest);
        if round > latest {
            return Err(Status::failed_precondition(format!(
                "job {} has no model for round {round} yet (latest: {latest})",
                job.id
            )));
        }
        let chunks = self
            .inner
            .models
            .get(&job.id, round, &self.inner.model_path(&job.id, round), !job.state.is_terminal())
            .map_err(|e| Status::internal(e.to_string()))?;
        let range = part.chunks(&chunks).map_err(Status::invalid_argument)?;
        let values = |chunks: &[Bytes]| chunks.iter().map(|c| c.len() as u64 / 4).sum::<u64>();
        let header = pb::ModelHeader {
            job_id: job.id.clone(),
            round,
            layout_hash: job.layout_hash.clone(),
            num_params: values(&chunks),
            first_value: values(&chunks[..range.start]),
            value_count: values(&chunks[range.clone()]),
        };
        Ok(self
            .inner
            .models
            .stream(chunks, range, header, Duration::from_secs(self.inner.idle_timeout_secs)))
    }

    /// Whether `site`'s announced policy lets it send exact metrics beside
    /// its released ones (kept only then).
    fn releases_exact_metrics(&self, site: &str) -> Result<bool, Status> {
        Ok(self.inner.store.policies()?.get(site).is_some_and(|p| p.release_exact_metrics))
    }

    /// The mirror's account of `site`'s ledger.
    fn mirrored(&self, site: &str) -> Result<pb::SyncLedgerResponse, Status> {
        let (count, head) = self.inner.store.mirrored(site)?;
        Ok(pb::SyncLedgerResponse { count, head })
    }

    /// Mirrors the entries `site` sent with a message about `job` that are
    /// its own and that job's, whatever the job's state: a site's committed
    /// charge is spent even when the message it came with is refused.
    fn mirror_own(&self, site: &str, job: &JobRow, entries: &[pb::LedgerEntry]) -> Result<(), Status> {
        let own: Vec<pb::LedgerEntry> =
            entries.iter().filter(|e| e.site == site && e.job_id == job.id).cloned().collect();
        if !own.is_empty() {
            self.inner.store.mirror_ledger(site, &own)?;
        }
        Ok(())
    }

    fn require_participant(&self, job: &JobRow, site: &str) -> Result<JobSiteRow, Status> {
        let sites = self.inner.store.job_sites(&job.id)?;
        match sites.into_iter().find(|s| s.site == site) {
            Some(s) if s.state == "accepted" => Ok(s),
            _ => Err(Status::permission_denied(format!(
                "{site} does not take part in job {}",
                job.id
            ))),
        }
    }

    /// Tasks a site still owes, keyed so a stream sends each once, read from
    /// the board of the current change (built here if no stream has yet).
    fn outstanding_tasks(&self, site: &str) -> Result<Vec<(String, pb::Task)>, Status> {
        let version = *self.inner.changes.borrow();
        // Held while building, so the other streams wait for this board rather than build their own.
        let mut built = self.board.built.lock().unwrap_or_else(|e| e.into_inner());
        let board = match &*built {
            Some((v, board)) if *v == version => Arc::clone(board),
            _ => {
                let board = Arc::new(self.build_task_board()?);
                *built = Some((version, Arc::clone(&board)));
                board
            }
        };
        Ok(board.get(site).cloned().unwrap_or_default())
    }

    /// Every site's outstanding tasks: one pass over the live jobs, reading
    /// each job's sites, updates and evaluations once.
    fn build_task_board(&self) -> Result<SiteTasks, Status> {
        let store = &self.inner.store;
        let mut board = SiteTasks::new();
        for job in store.jobs()? {
            if job.state.is_terminal() {
                continue;
            }
            let sites = store.job_sites(&job.id)?;
            match job.state {
                JobState::Offering => {
                    let offer = pb::Task {
                        job_id: job.id.clone(),
                        kind: Some(pb::task::Kind::Offer(pb::JobOffer {
                            spec_json: job.spec.canonical_json(),
                            spec_hash: job.spec_hash.clone(),
                            submitted_by: job.submitted_by.clone(),
                        })),
                    };
                    for s in sites.iter().filter(|s| s.state == "offered") {
                        board.entry(s.site.clone()).or_default().push((format!("{}/offer", job.id), offer.clone()));
                    }
                }
                JobState::Running => {
                    let done: HashSet<String> =
                        store.updates(&job.id, job.current_round)?.into_iter().map(|u| u.site).collect();
                    let train = pb::Task {
                        job_id: job.id.clone(),
                        kind: Some(pb::task::Kind::Train(pb::TrainTask {
                            round: job.current_round,
                            layout_hash: job.layout_hash.clone(),
                            num_params: job.num_params,
                            deadline_secs: ((job.deadline_ms - now_ms()).max(0) / 1000) as u64,
                        })),
                    };
                    let key = format!("{}/train/{}", job.id, job.current_round);
                    for s in sites.iter().filter(|s| s.state == "accepted" && !done.contains(&s.site)) {
                        board.entry(s.site.clone()).or_default().push((key.clone(), train.clone()));
                    }
                }
                JobState::Evaluating => {
                    let done: HashSet<String> = store
                        .evaluations(&job.id)?
                        .into_iter()
                        .filter(|e| e.round == job.current_round)
                        .map(|e| e.site)
                        .collect();
                    let evaluate = pb::Task {
                        job_id: job.id.clone(),
                        kind: Some(pb::task::Kind::Evaluate(pb::EvaluateTask {
                            round: job.current_round,
                            layout_hash: job.layout_hash.clone(),
                            num_params: job.num_params,
                        })),
                    };
                    let key = format!("{}/evaluate/{}", job.id, job.current_round);
                    for s in sites.iter().filter(|s| s.state == "accepted" && !done.contains(&s.site)) {
                        board.entry(s.site.clone()).or_default().push((key.clone(), evaluate.clone()));
                    }
                }
                _ => {}
            }
        }
        Ok(board)
    }
}
