//! Meridian's hospital worker: the only process that reads patient rows.
//! It connects out to the coordinator over mutual TLS, decides each job
//! offer against the site's own policy and privacy budget, trains locally
//! with DP-SGD on Burn, commits every round's ε to its ledger before the
//! update leaves, and evaluates global models on a local held-out split.
//!
//! # Brief overview
//! - [`run`]: the daemon; reconnects with backoff until shutdown.
//! - [`WorkerConfig`]: the validated `worker.toml` (datasets, budgets, policy).
//! - [`dataset`]: CSV loading and encoding; [`ledger`]: the site's privacy
//!   ledger and budget; [`train`]: DP-SGD rounds and evaluation.

#![deny(clippy::unwrap_used)]
#![deny(missing_docs)]

pub mod approvals;
pub mod config;
pub mod dataset;
pub mod download;
pub mod ledger;
pub mod outgoing;
pub mod train;
pub mod upload;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use config::{ConfigError, DatasetConfig, TrainingDevice, WorkerConfig};
use proto::identity::IdentityFiles;
use proto::job::JobSpec;
use proto::pb;
use proto::pb::worker_service_client::WorkerServiceClient;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, instrument, warn};

use crate::dataset::{EncodedDataset, SplitOptions};
use crate::ledger::{Charge, Ledger};
use crate::outgoing::Refusal;
use proto::mechanism::Mechanism;
use proto::reason::ReasonCode;

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// TLS files unreadable.
    #[error(transparent)]
    Identity(#[from] proto::identity::IdentityError),
    /// The site certificate does not name a hospital.
    #[error("{path}: {detail}")]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The state directory or ledger could not be opened.
    #[error("state in {path}: {detail}")]
    State {
        /// The data directory.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The coordinator URL is unusable.
    #[error("coordinator: {0}")]
    Endpoint(String),
    /// The configured training device is not available.
    #[error("device: {0}")]
    Device(String),
}

/// A job this site has accepted.
struct JobContext {
    spec: JobSpec,
    spec_hash: String,
    cancel: CancellationToken,
}

struct Worker {
    config: WorkerConfig,
    site: String,
    ledger: Ledger,
    device: burn::tensor::Device,
    /// Encoded datasets per (dataset, spec hash): loading is done once per job.
    data: Mutex<HashMap<(String, String), Arc<EncodedDataset>>>,
    jobs: Mutex<HashMap<String, Arc<JobContext>>>,
    /// Task keys being handled, so a resent task is not run twice.
    inflight: Mutex<HashSet<String>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// The site's tamper-evident record of decisions, charges and sent updates.
    audit: proto::audit::AuditLog,
    /// Offers waiting for (or decided by) the hospital's IT in manual mode.
    approvals: approvals::Approvals,
    /// Jobs the coordinator stopped, so a pending offer stops waiting.
    stopped: Mutex<HashSet<String>>,
    /// The coordinator's idle timeout, learnt at registration: a model
    /// stream silent for this long is abandoned (and the task retried).
    idle_timeout_secs: std::sync::atomic::AtomicU64,
    /// The memory of the last model pulled, which the next pull lands in
    /// (`proto::tensor::ChunkAssembler::reusing`): a model of 100M parameters would
    /// otherwise fault in 400 MB of fresh pages every round. One for the
    /// whole site, not one per job, so that a job that ends without word
    /// from the coordinator keeps none.
    spare_model: Mutex<Vec<f32>>,
    /// Where the coordinator is, for a second connection: opened for a
    /// model or update large enough to move in two parts
    /// ([`download::PARTED_FROM_BYTES`]) and closed when that transfer
    /// ends, so a site holds one connection between transfers.
    endpoint: Endpoint,
}

/// Runs the worker until `shutdown` is cancelled.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let identity = IdentityFiles::from_paths(&config.tls_ca, &config.tls_cert, &config.tls_key)?;
    let principal = proto::identity::principal_from_pem(&identity.cert_pem)
        .map_err(|detail| RunError::Certificate { path: config.tls_cert.clone(), detail })?;
    if principal.role != proto::identity::Role::Hospital {
        return Err(RunError::Certificate {
            path: config.tls_cert.clone(),
            detail: format!(
                "certificate of {} has role {}, a worker needs role hospital",
                principal.name, principal.role
            ),
        });
    }
    let state_err = |detail: String| RunError::State { path: config.data_dir.clone(), detail };
    std::fs::create_dir_all(config.data_dir.join("outbox")).map_err(|e| state_err(e.to_string()))?;
    let ledger =
        Ledger::open(&config.data_dir.join("ledger.sqlite"), &principal.name).map_err(|e| state_err(e.to_string()))?;
    let audit =
        proto::audit::AuditLog::open(&config.data_dir.join("audit.log")).map_err(|e| state_err(e.to_string()))?;
    let approvals =
        approvals::Approvals::open(&config.data_dir.join("ledger.sqlite")).map_err(|e| state_err(e.to_string()))?;
    let endpoint = Endpoint::from_shared(config.coordinator.clone())
        .map_err(|e| RunError::Endpoint(e.to_string()))?
        .tls_config(identity.client_tls())
        .map_err(|e| RunError::Endpoint(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .max_frame_size(Some(proto::tensor::MAX_FRAME_BYTES))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let device =
        models::default_device(config.device == TrainingDevice::Gpu).map_err(|e| RunError::Device(e.to_string()))?;
    models::limit_cpu_threads(config.cpu_threads);
    let worker = Arc::new(Worker {
        device,
        config,
        site: principal.name,
        ledger,
        data: Mutex::new(HashMap::new()),
        jobs: Mutex::new(HashMap::new()),
        spare_model: Mutex::new(Vec::new()),
        endpoint: endpoint.clone(),
        inflight: Mutex::new(HashSet::new()),
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
        audit,
        approvals,
        stopped: Mutex::new(HashSet::new()),
        idle_timeout_secs: std::sync::atomic::AtomicU64::new(60),
    });
    info!(site = %worker.site, coordinator = %worker.config.coordinator, "worker starting");
    // Reconnect with exponential backoff (250 ms doubling to 10 s), reset
    // whenever a session got as far as registering.
    let mut backoff = Duration::from_millis(250);
    while !shutdown.is_cancelled() {
        let mut registered = false;
        if let Err(e) = worker.clone().session(&endpoint, &mut registered).await {
            if registered {
                backoff = Duration::from_millis(250);
            }
            warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "connection to coordinator lost");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    worker.tasks.close();
    for job in worker.jobs_snapshot() {
        job.cancel.cancel();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), worker.tasks.wait()).await;
    info!("worker stopped");
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Worker {
    /// Appends to the site's audit log; a failure is logged, never fatal.
    fn audit(&self, kind: &str, subject: &str, detail: serde_json::Value) {
        if let Err(e) = self.audit.record(kind, subject, detail) {
            warn!(error = %e, kind, "cannot write the audit log");
        }
    }

    fn jobs_snapshot(&self) -> Vec<Arc<JobContext>> {
        lock(&self.jobs).values().cloned().collect()
    }

    /// A client for a second connection, which connects on its first call
    /// (a small transfer makes none) and closes once dropped.
    fn second_link(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.endpoint.connect_lazy()).max_decoding_message_size(4 << 20)
    }

    fn dataset_config(&self, name: &str) -> Option<&DatasetConfig> {
        self.config.datasets.iter().find(|d| d.name == name)
    }

    /// What the site tells the coordinator of its policy.
    fn policy(&self) -> pb::SitePolicy {
        pb::SitePolicy {
            allowed_models: self.config.allowed_models.clone(),
            manual_approval: self.config.manual_approval,
            min_training_rows: self.config.min_training_rows,
            min_test_rows: self.config.min_test_rows,
        }
    }

    /// Each dataset as announced: its schema as configured, its budget and
    /// its released sizes, released now if its records changed since the
    /// last release (or never were). Blocking: it reads every file.
    fn announcements(&self) -> Vec<pb::DatasetInfo> {
        self.config.datasets.iter().map(|d| self.announce(d)).collect()
    }

    fn announce(&self, d: &DatasetConfig) -> pb::DatasetInfo {
        // The columns the configuration declares that the file holds:
        // names IT wrote, never whatever else a file's header says.
        let header = dataset::read_header(&d.path).unwrap_or_default();
        let columns = std::iter::once(&d.label)
            .chain(&d.numeric)
            .chain(&d.categorical)
            .filter(|c| header.contains(c))
            .cloned()
            .collect();
        let split = SplitOptions { test_fraction: d.test_fraction, seed: d.split_seed };
        let released = dataset::count_split(&d.path, &split)
            .map_err(|e| e.to_string())
            .and_then(|sizes| self.ledger.release_sizes(d, &sizes).map_err(|e| e.to_string()));
        let size = match released {
            Ok(r) => {
                info!(dataset = %d.name, release = r.release, train_rows = r.train_rows, test_rows = r.test_rows, "dataset sizes released");
                Some(pb::ReleasedSize { train_rows: r.train_rows, test_rows: r.test_rows, release: r.release })
            }
            Err(detail) => {
                warn!(dataset = %d.name, %detail, "the dataset's sizes could not be released; it takes no jobs");
                None
            }
        };
        pb::DatasetInfo {
            name: d.name.clone(),
            columns,
            label: d.label.clone(),
            numeric: d.numeric.clone(),
            categorical: d.categorical.clone(),
            size,
            budget_epsilon: d.budget_epsilon,
            budget_delta: d.budget_delta,
            job_epsilon_cap: d.job_epsilon_cap,
        }
    }

    /// One connection: register, then serve the task stream until it ends.
    async fn session(self: Arc<Self>, endpoint: &Endpoint, registered: &mut bool) -> Result<(), tonic::Status> {
        let channel =
            endpoint.connect().await.map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e}")))?;
        let mut client = WorkerServiceClient::new(channel.clone()).max_decoding_message_size(4 << 20);
        let this = Arc::clone(&self);
        let datasets = tokio::task::spawn_blocking(move || this.announcements())
            .await
            .map_err(|e| tonic::Status::internal(format!("announcing the datasets panicked: {e}")))?;
        let ledger = self.ledger.entries().map_err(|e| tonic::Status::internal(e.to_string()))?;
        let reply = client
            .register(pb::RegisterRequest {
                datasets,
                software_version: env!("CARGO_PKG_VERSION").to_string(),
                ledger,
                policy: Some(self.policy()),
            })
            .await?
            .into_inner();
        info!(site = %reply.site, "registered with the coordinator");
        *registered = true;
        self.idle_timeout_secs.store(reply.idle_timeout_secs.max(1), std::sync::atomic::Ordering::Relaxed);
        let heartbeat_every = Duration::from_secs((reply.idle_timeout_secs / 3).max(1));
        let session_done = self.shutdown.child_token();
        {
            let mut hb = client.clone();
            let done = session_done.clone();
            self.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = done.cancelled() => return,
                        _ = tokio::time::sleep(heartbeat_every) => {}
                    }
                    if hb.heartbeat(pb::HeartbeatRequest {}).await.is_err() {
                        return;
                    }
                }
            });
        }
        let mut stream = client.receive_tasks(pb::ReceiveTasksRequest {}).await?.into_inner();
        let result = loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => break Ok(()),
                next = stream.next() => next,
            };
            match next {
                None => break Err(tonic::Status::unavailable("task stream closed")),
                Some(Err(e)) => break Err(e),
                Some(Ok(task)) => self.dispatch(task, client.clone()),
            }
        };
        session_done.cancel();
        result
    }

    fn dispatch(self: &Arc<Self>, task: pb::Task, client: WorkerServiceClient<Channel>) {
        let Some(kind) = task.kind else { return };
        let key = match &kind {
            pb::task::Kind::Offer(_) => format!("{}/offer", task.job_id),
            pb::task::Kind::Train(t) => format!("{}/train/{}", task.job_id, t.round),
            pb::task::Kind::Evaluate(t) => format!("{}/evaluate/{}", task.job_id, t.round),
            pb::task::Kind::Cancel(c) => {
                info!(job_id = %task.job_id, reason = %c.reason, "job stopped by the coordinator");
                lock(&self.stopped).insert(task.job_id.clone());
                if let Some(job) = lock(&self.jobs).remove(&task.job_id) {
                    job.cancel.cancel();
                }
                if let Err(e) = self.ledger.finish_job(&task.job_id) {
                    warn!(error = %e, "cannot release the job's reservation");
                }
                return;
            }
        };
        if !lock(&self.inflight).insert(key.clone()) {
            return;
        }
        let this = Arc::clone(self);
        let job_id = task.job_id;
        self.tasks.spawn(async move {
            let mut client = client;
            let outcome = match kind {
                pb::task::Kind::Offer(offer) => this.handle_offer(&job_id, offer, &mut client).await,
                pb::task::Kind::Train(t) => this.handle_train(&job_id, t, &mut client).await,
                pb::task::Kind::Evaluate(t) => this.handle_evaluate(&job_id, t, &mut client).await,
                pb::task::Kind::Cancel(_) => Ok(()),
            };
            if let Err(e) = outcome {
                warn!(job_id, task = %key, error = %e, "task failed");
            }
            lock(&this.inflight).remove(&key);
        });
    }

    /// Loads (once per job) the encoded dataset a job asks for.
    async fn load_data(self: &Arc<Self>, spec: &JobSpec, spec_hash: &str) -> Result<Arc<EncodedDataset>, Refusal> {
        let key = (spec.dataset.clone(), spec_hash.to_string());
        if let Some(d) = lock(&self.data).get(&key) {
            return Ok(Arc::clone(d));
        }
        let cfg = self
            .dataset_config(&spec.dataset)
            .ok_or_else(|| {
                Refusal::new(ReasonCode::DatasetUnknown, format!("this site has no dataset \"{}\"", spec.dataset))
            })?
            .clone();
        let features = spec.features.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            dataset::load(
                &cfg.path,
                &features,
                &SplitOptions { test_fraction: cfg.test_fraction, seed: cfg.split_seed },
            )
        })
        .await
        .map_err(|e| Refusal::new(ReasonCode::Internal, format!("loading panicked: {e}")))?
        .map_err(|e| Refusal::with(e.reason(&spec.features), e.to_string()))?;
        let loaded = Arc::new(loaded);
        lock(&self.data).insert(key, Arc::clone(&loaded));
        Ok(loaded)
    }

    #[instrument(skip_all, fields(job_id = %job_id))]
    async fn handle_offer(
        self: &Arc<Self>,
        job_id: &str,
        offer: pb::JobOffer,
        client: &mut WorkerServiceClient<Channel>,
    ) -> Result<(), tonic::Status> {
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
                outgoing::refusal(job_id, &offer.spec_hash, &refusal.reason)
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
        if !self.config.allowed_models.is_empty() && !self.config.allowed_models.iter().any(|m| m == spec.model.kind())
        {
            return Err(Refusal::new(
                ReasonCode::ModelNotAllowed,
                format!(
                    "site policy does not allow model \"{}\" (allowed: {})",
                    spec.model.kind(),
                    self.config.allowed_models.join(", ")
                ),
            ));
        }
        let cfg = self
            .dataset_config(&spec.dataset)
            .ok_or_else(|| {
                Refusal::new(ReasonCode::DatasetUnknown, format!("this site has no dataset \"{}\"", spec.dataset))
            })?
            .clone();
        let sizes = self.ledger.current_sizes(&cfg.name).map_err(|e| internal(&e))?.ok_or_else(|| {
            Refusal::new(ReasonCode::DataUnreadable, format!("dataset \"{}\" has no released size yet", cfg.name))
        })?;
        self.check_rows(&spec, &sizes)?;
        // Reads and checks every row the job would use: a bad one refuses it now.
        self.load_data(&spec, &offer.spec_hash).await?;
        let plan = spec.site_plan(sizes.train_rows);
        if self.config.manual_approval {
            let planned = ledger::planned_epsilon(&plan, spec.privacy.delta).map_err(|e| internal(&e))?;
            self.await_approval(job_id, &offer.spec_hash, &spec, planned).await?;
        }
        let decision = self
            .ledger
            .decide(&cfg, job_id, &offer.spec_hash, &offer.spec_json, &plan, spec.privacy.delta)
            .map_err(|e| internal(&e))?;
        if let Some(refusal) = decision.refusal {
            return Err(refusal);
        }
        lock(&self.jobs).insert(
            job_id.to_string(),
            Arc::new(JobContext { spec_hash: offer.spec_hash.clone(), spec, cancel: self.shutdown.child_token() }),
        );
        Ok(outgoing::acceptance(job_id, &offer.spec_hash, decision.planned_epsilon, decision.train_examples, None))
    }

    /// Refuses a job the dataset's released sizes are too small for: under
    /// the policy's floors, or fewer training rows than one batch.
    fn check_rows(&self, spec: &JobSpec, sizes: &ledger::SizeRelease) -> Result<(), Refusal> {
        let too_few = |detail: String| Err(Refusal::new(ReasonCode::TooFewRows, detail));
        if sizes.train_rows < self.config.min_training_rows {
            return too_few(format!(
                "dataset \"{}\": {} released training rows, under the policy's min_training_rows {}",
                spec.dataset, sizes.train_rows, self.config.min_training_rows
            ));
        }
        if sizes.test_rows < self.config.min_test_rows {
            return too_few(format!(
                "dataset \"{}\": {} released test rows, under the policy's min_test_rows {}",
                spec.dataset, sizes.test_rows, self.config.min_test_rows
            ));
        }
        if spec.training.batch_size as u64 > sizes.train_rows {
            return too_few(format!(
                "dataset \"{}\": training.batch_size {} is more than its {} released training rows",
                spec.dataset, spec.training.batch_size, sizes.train_rows
            ));
        }
        Ok(())
    }

    /// Waits until the hospital's IT approves (Ok) or rejects this exact
    /// spec, the job is stopped, or the daemon shuts down.
    async fn await_approval(&self, job_id: &str, spec_hash: &str, spec: &JobSpec, planned: f64) -> Result<(), Refusal> {
        let internal = |e: approvals::ApprovalError| Refusal::new(ReasonCode::Internal, e.to_string());
        let request = approvals::Approval {
            job_id: job_id.to_string(),
            spec_hash: spec_hash.to_string(),
            name: spec.name.clone(),
            dataset: spec.dataset.clone(),
            model: spec.model.kind().to_string(),
            planned_epsilon: planned,
            state: "pending".to_string(),
            reason: String::new(),
        };
        let mut current = self.approvals.request(&request).map_err(internal)?;
        if current.state == "pending" {
            info!(job_id, spec_hash, "offer waits for approval: meridian site approve {job_id}");
        }
        // Bounded: a pending offer waits at most a day.
        for _ in 0..86_400 {
            match current.state.as_str() {
                "approved" => return Ok(()),
                "rejected" => {
                    return Err(Refusal::new(
                        ReasonCode::NotApproved,
                        format!("rejected by the site: {}", current.reason),
                    ));
                }
                _ => {}
            }
            if lock(&self.stopped).contains(job_id) {
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
                .state(job_id, spec_hash)
                .map_err(internal)?
                .ok_or_else(|| Refusal::new(ReasonCode::Internal, "the approval request vanished"))?;
        }
        Err(Refusal::new(ReasonCode::Expired, "no decision within a day"))
    }

    /// The context of an accepted job; after a restart it is rebuilt from
    /// the decision the ledger recorded.
    fn job(&self, job_id: &str) -> Result<Arc<JobContext>, tonic::Status> {
        if let Some(job) = lock(&self.jobs).get(job_id) {
            return Ok(Arc::clone(job));
        }
        let (spec_json, spec_hash) = self
            .ledger
            .accepted_job(job_id)
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .ok_or_else(|| tonic::Status::failed_precondition(format!("job {job_id} was not accepted here")))?;
        let spec = JobSpec::from_canonical_json(&spec_json).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let job = Arc::new(JobContext { spec, spec_hash, cancel: self.shutdown.child_token() });
        lock(&self.jobs).insert(job_id.to_string(), Arc::clone(&job));
        Ok(job)
    }

    /// Pulls the global model of `round` into the site's spare model memory.
    async fn pull_model(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        job_id: &str,
        round: u32,
        layout_hash: &str,
        num_params: u64,
    ) -> Result<Vec<f32>, tonic::Status> {
        let idle = Duration::from_secs(self.idle_timeout_secs.load(std::sync::atomic::Ordering::Relaxed));
        let memory = std::mem::take(&mut *lock(&self.spare_model));
        let wanted = download::Wanted { job_id, round, layout_hash, num_params };
        download::pull_model(client, &mut self.second_link(), wanted, memory, idle).await
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
    ) -> Result<(), tonic::Status> {
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

    #[instrument(skip_all, fields(job_id = %job_id, round = task.round))]
    async fn handle_train(
        self: &Arc<Self>,
        job_id: &str,
        task: pb::TrainTask,
        client: &mut WorkerServiceClient<Channel>,
    ) -> Result<(), tonic::Status> {
        let round = task.round;
        let job = match self.job(job_id) {
            Ok(job) => job,
            Err(e) => {
                let refusal = Refusal::new(ReasonCode::Internal, format!("{job_id} was not accepted at this site: {e}"));
                let _ = self.report_failure(client, job_id, round, refusal).await;
                return Err(e);
            }
        };
        let cfg = match self.dataset_config(&job.spec.dataset) {
            Some(c) => c.clone(),
            None => {
                let detail = format!("dataset \"{}\" is gone from this site's configuration", job.spec.dataset);
                return self.report_failure(client, job_id, round, Refusal::new(ReasonCode::DatasetUnknown, detail)).await;
            }
        };
        // The plan the site accepted the job with: its released training-set size decides q and the steps.
        let Some(decision) = self.ledger.decision(job_id).map_err(|e| tonic::Status::internal(e.to_string()))? else {
            let refusal = Refusal::new(ReasonCode::Internal, format!("{job_id} has no recorded decision at this site"));
            return self.report_failure(client, job_id, round, refusal).await;
        };
        let plan = job.spec.site_plan(decision.train_examples);
        let outbox = self.outbox_path(job_id, round);
        // A round already charged is resent as it was, never trained (and charged) again.
        let (update, entry, metrics) = match self
            .ledger
            .entry(job_id, round, Mechanism::DpSgd)
            .map_err(|e| tonic::Status::internal(e.to_string()))?
        {
            Some(entry) if outbox.is_file() => {
                info!("resending the update of a charged round");
                let update = proto::checkpoint::read(&outbox).map_err(|e| tonic::Status::internal(e.to_string()))?;
                (update, entry, Default::default())
            }
            _ => {
                let data = match self.load_data(&job.spec, &job.spec_hash).await {
                    Ok(d) => d,
                    Err(refusal) => return self.report_failure(client, job_id, round, refusal).await,
                };
                let global =
                    Arc::new(self.pull_model(client, job_id, round - 1, &task.layout_hash, task.num_params).await?);
                let arch = models::Architecture::new(&job.spec.model, data.dim)
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
                if arch.layout().hash() != task.layout_hash {
                    let detail = format!(
                        "the job's model layout {} differs from this site's {}",
                        task.layout_hash,
                        arch.layout().hash()
                    );
                    return self.report_failure(client, job_id, round, Refusal::new(ReasonCode::SpecMismatch, detail)).await;
                }
                // Held-out metrics of the model we received (round - 1).
                let (arch2, device, global2, data2) =
                    (arch.clone(), self.device.clone(), Arc::clone(&global), Arc::clone(&data));
                if let Ok(Ok(m)) =
                    tokio::task::spawn_blocking(move || train::evaluate(&arch2, &device, &global2, &data2)).await
                {
                    let _ = client
                        .report_evaluation(pb::EvaluationReport {
                            job_id: job_id.to_string(),
                            round: round - 1,
                            num_examples: data.n_test() as u64,
                            metrics: m.into_iter().collect(),
                        })
                        .await;
                }
                info!(epochs = job.spec.training.local_epochs, "local training started");
                let (spec, device, cancel) = (job.spec.clone(), self.device.clone(), job.cancel.clone());
                let (arch3, global3, data3, plan3) = (arch.clone(), Arc::clone(&global), Arc::clone(&data), plan.clone());
                let outcome = tokio::task::spawn_blocking(move || {
                    train::train_round(&arch3, &device, &global3, &data3, &spec, &plan3, &cancel)
                })
                .await
                .map_err(|e| tonic::Status::internal(format!("training panicked: {e}")))?;
                let outcome = match outcome {
                    Ok(o) => o,
                    Err(train::TrainError::Cancelled) => {
                        info!("local training stopped: the job was cancelled");
                        self.audit("training.cancelled", job_id, serde_json::json!({ "round": round }));
                        return Ok(());
                    }
                    Err(e) => {
                        let code = match e {
                            train::TrainError::Diverged { .. } => ReasonCode::TrainingDiverged,
                            train::TrainError::Layout(_) => ReasonCode::SpecMismatch,
                            _ => ReasonCode::Internal,
                        };
                        return self.report_failure(client, job_id, round, Refusal::new(code, e.to_string())).await;
                    }
                };
                let update: Vec<f32> = outcome.params.iter().zip(global.iter()).map(|(l, g)| l - g).collect();
                // The evaluation and training threads are done with it.
                if let Ok(memory) = Arc::try_unwrap(global) {
                    *lock(&self.spare_model) = memory;
                }
                // Outbox first, then the charge: a crash in between leaves an
                // uncharged update that was never sent, which is discarded.
                proto::checkpoint::write_atomic(&outbox, &update)
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
                let charge = Charge {
                    job_id: job_id.to_string(),
                    spec_hash: job.spec_hash.clone(),
                    round,
                    mechanism: Mechanism::DpSgd,
                    noise_multiplier: job.spec.privacy.noise_multiplier,
                    sample_rate: outcome.sample_rate,
                    clip_norm: job.spec.privacy.clip_norm,
                    steps: outcome.steps,
                    delta: job.spec.privacy.delta,
                };
                let entry = match self.ledger.charge(&cfg, &charge) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = std::fs::remove_file(&outbox);
                        let code = match e {
                            ledger::LedgerError::OverBudget { .. } => ReasonCode::BudgetExceeded,
                            _ => ReasonCode::Internal,
                        };
                        return self.report_failure(client, job_id, round, Refusal::new(code, e.to_string())).await;
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
                    }),
                );
                let mut metrics = outcome.metrics;
                metrics.insert("epsilon_round".to_string(), entry.epsilon_round);
                metrics.insert("epsilon_job".to_string(), entry.epsilon_job);
                (update, entry, metrics)
            }
        };
        // The FedAvg weight is the dataset's released training-set size.
        let weight = decision.train_examples.max(1);
        let header = pb::UpdateHeader {
            job_id: job_id.to_string(),
            round,
            layout_hash: task.layout_hash.clone(),
            num_params: update.len() as u64,
            num_examples: weight,
            metrics: metrics.into_iter().collect(),
            ledger_entry: Some(entry),
            // The whole update; `push_reserved` cuts a large one into parts.
            ..Default::default()
        };
        let reply =
            upload::push_reserved(client, &mut self.second_link(), header, Arc::new(update), self.config.upload_limit_bytes_per_sec).await?;
        self.audit(
            "update.sent",
            job_id,
            serde_json::json!({ "round": round, "accepted": reply.accepted, "reason": reply.reason }),
        );
        if reply.accepted {
            info!("update delivered");
        } else {
            warn!(reason = %reply.reason, "update refused by the coordinator");
        }
        Ok(())
    }

    #[instrument(skip_all, fields(job_id = %job_id, round = task.round))]
    async fn handle_evaluate(
        self: &Arc<Self>,
        job_id: &str,
        task: pb::EvaluateTask,
        client: &mut WorkerServiceClient<Channel>,
    ) -> Result<(), tonic::Status> {
        let job = self.job(job_id)?;
        let data = match self.load_data(&job.spec, &job.spec_hash).await {
            Ok(data) => data,
            Err(refusal) => return self.report_failure(client, job_id, task.round, refusal).await,
        };
        let params = self.pull_model(client, job_id, task.round, &task.layout_hash, task.num_params).await?;
        let arch =
            models::Architecture::new(&job.spec.model, data.dim).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let device = self.device.clone();
        let data2 = Arc::clone(&data);
        let m = tokio::task::spawn_blocking(move || train::evaluate(&arch, &device, &params, &data2))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        client
            .report_evaluation(pb::EvaluationReport {
                job_id: job_id.to_string(),
                round: task.round,
                num_examples: data.n_test() as u64,
                metrics: m.into_iter().collect(),
            })
            .await?;
        // The job is over for this site: release its reservation.
        self.ledger.finish_job(job_id).map_err(|e| tonic::Status::internal(e.to_string()))?;
        lock(&self.jobs).remove(job_id);
        Ok(())
    }
}
