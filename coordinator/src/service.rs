//! The gRPC services: authorization by certificate role, request
//! validation, and the mapping of every error to a `tonic::Status` (this is
//! the one place that happens).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_spec::evaluation::{Histogram, ScoreBins};
use meridian_spec::job::JobSpec;
use meridian_spec::mechanism::Mechanism;
use meridian_store::checkpoint;
use meridian_sys::failpoint;
use meridian_sys::now_ms;
use meridian_wire::identity::{Principal, Role, principal_from_der};
use meridian_wire::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::BoxStream;
use crate::engine::{Coordinator, EngineError};
use crate::model_cache::ModelPart;
use crate::revocation::Revocations;
use crate::store::{EvaluationRow, JobRow, JobSiteRow, JobState, RoundState, SiteState, StoreError};
use crate::upload::{self, ReceiveError};

/// The three services over one shared [`Coordinator`].
#[derive(Clone)]
pub struct Services {
    pub(crate) inner: Arc<Coordinator>,
    /// The federation's CA certificate (PEM), against which stewards'
    /// signed decisions are checked.
    pub(crate) ca_pem: Vec<u8>,
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

impl From<ReceiveError> for Status {
    fn from(e: ReceiveError) -> Status {
        match e {
            ReceiveError::Store(e) => e.into(),
            ReceiveError::Stream(status) => status,
            ReceiveError::NoHeader => Status::deadline_exceeded(e.to_string()),
            ReceiveError::Empty | ReceiveError::HeaderNotFirst => Status::invalid_argument(e.to_string()),
            ReceiveError::NoJob(_) => Status::not_found(e.to_string()),
            ReceiveError::NotParticipant { .. } => Status::permission_denied(e.to_string()),
            ReceiveError::ShuttingDown => Status::unavailable(e.to_string()),
            ReceiveError::Checkpoint(_) | ReceiveError::File(_) | ReceiveError::ListingParts(_) => {
                Status::internal(e.to_string())
            }
        }
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
    let mut acc = meridian_privacy::accountant::RdpAccountant::new();
    acc.compose_poisson_gaussian(1.0, cdp.update_noise_multiplier(), rounds)
        .and_then(|()| acc.epsilon(job.spec.privacy.delta))
        .map(|e| e.epsilon)
        .map_err(|e| Status::internal(format!("client-level accountant: {e}")))
}

/// What a round's status says besides its evaluation.
struct RoundFacts {
    round: u32,
    state: RoundState,
    attempt: u32,
    updated_sites: Vec<String>,
    /// The round's training metrics, exact ones included (see [`crate::metrics::EXACT`]).
    train: BTreeMap<String, f64>,
}

/// A round's status, its evaluation pooled from the sites' released
/// histograms of its model in `evals`.
fn round_status(facts: RoundFacts, evals: &[EvaluationRow], bins: &ScoreBins) -> pb::RoundStatus {
    let rows: Vec<&EvaluationRow> = evals.iter().filter(|e| e.round == facts.round).collect();
    let evaluation = crate::metrics::evaluation(&rows, bins);
    let (exact_train, train): (BTreeMap<String, f64>, BTreeMap<String, f64>) =
        facts.train.into_iter().partition(|(k, _)| k.starts_with(crate::metrics::EXACT));
    pb::RoundStatus {
        round: facts.round,
        state: facts.state.as_str().to_string(),
        attempt: facts.attempt,
        updated_sites: facts.updated_sites,
        train_metrics: train.into_iter().collect(),
        eval_metrics: evaluation.pooled.into_iter().collect(),
        site_evaluations: evaluation.sites,
        exact_train_metrics: exact_train
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches(crate::metrics::EXACT).to_string(), v))
            .collect(),
        exact_eval_metrics: evaluation.exact.into_iter().collect(),
    }
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
fn authorize<T>(revocations: &Revocations, req: &Request<T>, allowed: &[Role], rpc: &str) -> Result<Principal, Status> {
    let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let der = certs.first().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let principal = principal_from_der(der.as_ref()).map_err(|e| Status::unauthenticated(e.to_string()))?;
    revocations.check(&principal.name, der.as_ref()).map_err(|e| Status::unauthenticated(e.to_string()))?;
    if !allowed.contains(&principal.role) {
        return Err(Status::permission_denied(format!(
            "{} (role {}) may not call {rpc}",
            principal.name, principal.role
        )));
    }
    Ok(principal)
}

const HOSPITAL: &[Role] = &[Role::Hospital];
/// Who may submit: jobs here, applications in `applications`.
pub(crate) const SUBMITTERS: &[Role] = &[Role::Scientist, Role::Admin];
const READERS: &[Role] = &[Role::Scientist, Role::Reviewer, Role::Admin];

impl Services {
    /// Who is calling, if their certificate is not revoked and their role may call `rpc`.
    pub(crate) fn authorize<T>(&self, req: &Request<T>, allowed: &[Role], rpc: &str) -> Result<Principal, Status> {
        authorize(&self.revocations, req, allowed, rpc)
    }

    fn job_or_not_found(&self, job_id: &str) -> Result<JobRow, Status> {
        self.inner.store.job(job_id)?.ok_or_else(|| Status::not_found(format!("no job \"{job_id}\"")))
    }

    /// The job's status as the scientist sees it.
    pub(crate) fn job_status(&self, job: &JobRow) -> Result<pb::JobStatus, Status> {
        let closed = self.inner.store.closed_rounds(&job.id)?;
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
            sites: self.site_statuses(job)?,
            rounds: self.round_statuses(job, &closed)?,
            submitted_at_unix_ms: job.submitted_at_ms,
            updated_at_unix_ms: job.updated_at_ms,
            spec_hash: job.spec_hash.clone(),
            delta: job.spec.privacy.delta,
            spec_json: job.spec.canonical_json(),
            client_epsilon: client_epsilon(job, closed.len() as u64)?,
        })
    }

    /// Each of the job's sites: where it stands, what it planned and spent
    /// of its dataset's budget on the job.
    fn site_statuses(&self, job: &JobRow) -> Result<Vec<pb::SiteStatus>, Status> {
        let store = &self.inner.store;
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
        let sites = store.job_sites(&job.id)?;
        Ok(sites
            .into_iter()
            .map(|s| pb::SiteStatus {
                spent_epsilon: spent.get(&s.site).copied().unwrap_or(0.0),
                releases_exact_metrics: policies.get(&s.site).is_some_and(|p| p.release_exact_metrics),
                budget_epsilon: budgets.get(&s.site).copied().unwrap_or(0.0),
                projected_epsilon: s.projected_epsilon,
                site: s.site,
                state: s.state.as_str().to_string(),
                reason: s.reason,
                reason_code: s.reason_code,
                reason_columns: s.reason_columns,
                planned_epsilon: s.planned_epsilon,
                train_examples: s.train_examples,
            })
            .collect())
    }

    /// The job's rounds: the initial model's if it was evaluated, every
    /// `closed` round's, and the open one's while the job is running.
    fn round_statuses(
        &self,
        job: &JobRow,
        closed: &[crate::store::ClosedRound],
    ) -> Result<Vec<pb::RoundStatus>, Status> {
        let store = &self.inner.store;
        let evals = store.evaluations(&job.id)?;
        let bins = job.spec.evaluation.score_bins();
        let updated_sites = |round: u32| -> Result<Vec<String>, Status> {
            Ok(store.updates(&job.id, round)?.into_iter().map(|u| u.site).collect())
        };
        let status = |round, state, attempt, updated_sites, train| {
            round_status(RoundFacts { round, state, attempt, updated_sites, train }, &evals, &bins)
        };
        let mut rounds = Vec::new();
        if evals.iter().any(|e| e.round == 0) {
            rounds.push(status(0, RoundState::Initial, 0, Vec::new(), BTreeMap::new()));
        }
        for (round, attempt, metrics) in closed {
            rounds.push(status(*round, RoundState::Aggregated, *attempt, updated_sites(*round)?, metrics.clone()));
        }
        if job.state == JobState::Running {
            let round = job.current_round;
            rounds.push(status(round, RoundState::Open, job.attempt, updated_sites(round)?, BTreeMap::new()));
        }
        Ok(rounds)
    }

    /// The status of the watched job `job_id`, and whether it will change no more.
    fn watched_status(&self, job_id: &str) -> Result<(pb::JobStatus, bool), Status> {
        let job = self.inner.store.job(job_id)?.ok_or_else(|| Status::not_found("job vanished"))?;
        Ok((self.job_status(&job)?, job.state.is_terminal()))
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
            let failed: Vec<&pb::PolicyCheck> =
                site.checks.iter().filter(|c| !c.passed && c.name != "budget").collect();
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
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let who = self.authorize(&req, SUBMITTERS, "JobService/SubmitJob")?;
        let spec = JobSpec::from_toml(&req.get_ref().spec_toml, "job spec")
            .map_err(|e| Status::invalid_argument(e.to_string().trim_start_matches("job spec: ").to_string()))?;
        let sites = self.eligible_sites(&spec)?;
        let arch = meridian_models::Architecture::new(&spec.model, spec.features.input_dim())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let layout = arch.layout();
        // A fresh id: a clash with an existing job must not overwrite its initial model.
        let job_id = (0..8)
            .map(|_| format!("job-{:08x}", rand::random::<u32>()))
            .find(|id| !self.inner.model_path(id, 0).exists())
            .ok_or_else(|| Status::internal("no unused job id after 8 draws"))?;
        let seed = u64::from_le_bytes(
            <sha2::Sha256 as sha2::Digest>::digest(job_id.as_bytes())[..8].try_into().unwrap_or([0; 8]),
        );
        let chunks = checkpoint::write_chunks_atomic(
            &self.inner.model_path(&job_id, 0),
            &arch.init_params(seed),
            "checkpoint.rename",
        )
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
        let spec = JobSpec::from_toml(&req.get_ref().spec_toml, "job spec")
            .map_err(|e| Status::invalid_argument(e.to_string().trim_start_matches("job spec: ").to_string()))?;
        Ok(Response::new(self.plan(&spec)?))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.authorize(&req, READERS, "JobService/ListJobs")?;
        let jobs = self.inner.store.jobs()?.iter().map(|j| self.job_status(j)).collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::JobStatus>, Status> {
        self.authorize(&req, READERS, "JobService/GetJob")?;
        let job = self.job_or_not_found(&req.get_ref().job_id)?;
        Ok(Response::new(self.job_status(&job)?))
    }

    type WatchJobStream = BoxStream<pb::JobStatus>;

    async fn watch_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
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
                let (status, terminal) = match this.watched_status(&job_id) {
                    Ok(watched) => watched,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
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

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::JobStatus>, Status> {
        let who = self.authorize(&req, SUBMITTERS, "JobService/CancelJob")?;
        let job = self.job_or_not_found(&req.get_ref().job_id)?;
        if who.role != Role::Admin && who.name != job.submitted_by {
            return Err(Status::permission_denied(format!(
                "{} may not cancel {}: only its submitter {} or an admin may",
                who.name, job.id, job.submitted_by
            )));
        }
        if job.state.is_terminal() {
            return Err(Status::failed_precondition(format!("job {} is already {}", job.id, job.state.as_str())));
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
        self.inner.audit("job.cancelled", &job.id, serde_json::json!({ "by": who.name, "reason": reason }));
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
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/Register")?;
        let r = req.get_ref();
        let mut names = BTreeSet::new();
        for d in &r.datasets {
            if !names.insert(d.name.as_str()) {
                return Err(Status::invalid_argument(format!("datasets: \"{}\" is announced twice", d.name)));
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

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
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
                let finished: Vec<(String, String)> =
                    sent.iter().filter(|(k, _)| !live.contains(*k)).map(|(k, j)| (k.clone(), j.clone())).collect();
                for (key, job_id) in finished {
                    sent.remove(&key);
                    if let Ok(Some(job)) = this.inner.store.job(&job_id)
                        && job.state.is_terminal()
                    {
                        let cancel = pb::Task {
                            job_id,
                            kind: Some(pb::task::Kind::Cancel(pb::CancelJob { reason: job.reason })),
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

    async fn answer_offer(&self, req: Request<pb::OfferAnswer>) -> Result<Response<pb::Ack>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/AnswerOffer")?;
        let a = req.get_ref();
        let job = self.job_or_not_found(&a.job_id)?;
        // A charge that came with the answer is mirrored first, whether or
        // not the answer is still wanted (a site that predates size releases
        // charges its count at acceptance).
        if let Some(entry) = &a.ledger_entry {
            if entry.site != who.name || entry.job_id != job.id {
                return Err(Status::invalid_argument("the answer's ledger entry belongs to another site or job"));
            }
            self.inner.store.mirror_ledger(&who.name, std::slice::from_ref(entry))?;
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
        let state = if a.accept { SiteState::Accepted } else { SiteState::Refused };
        // Only a code and the spec's own column names are kept of a refusal.
        let refusal =
            (!a.accept).then(|| meridian_wire::convert::received_reason(a.refusal.as_ref(), &job.spec.features));
        if !self.inner.store.set_job_site(
            &job.id,
            &who.name,
            state,
            refusal.as_ref(),
            Some((a.planned_epsilon, a.projected_epsilon)),
            Some(a.train_examples),
        )? {
            return Err(Status::permission_denied(format!("job {} was not offered to {}", job.id, who.name)));
        }
        let code = refusal.as_ref().map_or("", |r| r.code().as_str());
        let columns = refusal.as_ref().map_or(&[][..], |r| r.columns());
        info!(job_id = %job.id, site = %who.name, state = state.as_str(), code, ?columns, "offer answered");
        self.inner.audit(
            if a.accept { "offer.accepted" } else { "offer.refused" },
            &job.id,
            serde_json::json!({ "site": who.name, "spec_hash": a.spec_hash, "code": code, "columns": columns, "planned_epsilon": a.planned_epsilon }),
        );
        self.inner.notify();
        Ok(Response::new(pb::Ack {}))
    }

    type PullModelStream = BoxStream<pb::ModelChunk>;

    async fn pull_model(&self, req: Request<pb::PullModelRequest>) -> Result<Response<Self::PullModelStream>, Status> {
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
        Ok(Response::new(upload::reserve(&self.inner, &who.name, req.get_ref().parts).await?))
    }

    async fn push_update(
        &self,
        req: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::PushUpdateResponse>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/PushUpdate")?;
        Ok(Response::new(upload::receive(&self.inner, &who.name, req).await?))
    }

    async fn report_evaluation(&self, req: Request<pb::EvaluationReport>) -> Result<Response<pb::Ack>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/ReportEvaluation")?;
        let r = req.get_ref();
        let job = self.job_or_not_found(&r.job_id)?;
        // The charge is mirrored before anything can refuse the report: it was spent.
        self.inner.store.mirror_own(&who.name, &job.id, r.ledger_entry.as_slice())?;
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
                    && e.charged() == Mechanism::Evaluation
            })
            .ok_or_else(|| {
                Status::invalid_argument(
                    "an evaluation must carry its own ledger entry (mechanism evaluation, this job, round and site)",
                )
            })?;
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
        let exact_allowed = self.inner.store.releases_exact_metrics(&who.name)?;
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

    async fn report_failure(&self, req: Request<pb::TaskFailure>) -> Result<Response<pb::Ack>, Status> {
        let who = self.authorize(&req, HOSPITAL, "WorkerService/ReportFailure")?;
        let r = req.get_ref();
        let job = self.job_or_not_found(&r.job_id)?;
        let reason = meridian_wire::convert::received_reason(r.reason.as_ref(), &job.spec.features);
        warn!(job_id = %job.id, site = %who.name, round = r.round, %reason, "site reported a failure");
        self.inner.audit(
            "site.failed",
            &job.id,
            serde_json::json!({ "site": who.name, "round": r.round, "code": reason.code().as_str(), "columns": reason.columns() }),
        );
        self.inner.store.set_job_site(&job.id, &who.name, SiteState::Failed, Some(&reason), None, None)?;
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
    /// The global model of `round` (default: the latest aggregated) as a chunked stream.
    fn model_stream(
        &self,
        job: &JobRow,
        round: Option<u32>,
        part: ModelPart,
    ) -> Result<BoxStream<pb::ModelChunk>, Status> {
        let latest = self.inner.store.closed_rounds(&job.id)?.last().map_or(0, |r| r.0);
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
        Ok(self.inner.models.stream(chunks, range, header, Duration::from_secs(self.inner.idle_timeout_secs)))
    }

    /// The mirror's account of `site`'s ledger.
    fn mirrored(&self, site: &str) -> Result<pb::SyncLedgerResponse, Status> {
        let (count, head) = self.inner.store.mirrored(site)?;
        Ok(pb::SyncLedgerResponse { count, head })
    }

    /// `site`'s row of `job`, refused unless the site takes part in the job.
    fn require_participant(&self, job: &JobRow, site: &str) -> Result<JobSiteRow, Status> {
        self.inner
            .store
            .participant(&job.id, site)?
            .ok_or_else(|| Status::permission_denied(format!("{site} does not take part in job {}", job.id)))
    }

    /// Tasks a site still owes, keyed so a stream sends each once, read from
    /// the board of the current change (built here if no stream has yet).
    fn outstanding_tasks(&self, site: &str) -> Result<Vec<(String, pb::Task)>, Status> {
        let version = *self.inner.changes.borrow();
        // Held while building, so the other streams wait for this board rather than build their own.
        let mut built = meridian_sys::sync::lock(&self.board.built);
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
                    for s in sites.iter().filter(|s| s.state == SiteState::Offered) {
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
                    for s in sites.iter().filter(|s| s.state == SiteState::Accepted && !done.contains(&s.site)) {
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
                    for s in sites.iter().filter(|s| s.state == SiteState::Accepted && !done.contains(&s.site)) {
                        board.entry(s.site.clone()).or_default().push((key.clone(), evaluate.clone()));
                    }
                }
                _ => {}
            }
        }
        Ok(board)
    }
}
