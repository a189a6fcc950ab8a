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
pub mod check;
pub mod config;
pub mod dataset;
pub mod download;
pub mod ledger;
pub mod outgoing;
pub mod policy;
pub mod release;
mod tasks;
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
use crate::ledger::Ledger;
use crate::outgoing::Refusal;
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
    job_id: String,
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

/// Ledger entries sent in one `SyncLedger` call (about 300 bytes each).
const SYNC_BATCH: usize = 1_000;

/// What a decision says a job costs.
fn cost_of(decision: &ledger::Decision) -> outgoing::Cost {
    outgoing::Cost { planned: decision.planned_epsilon, projected: decision.projected_epsilon }
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
            release_exact_metrics: self.config.release_exact_metrics,
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
                if r.stale {
                    warn!(dataset = %d.name, release = r.release, "the dataset's records changed, but its budget has no room for a new size release: the last one stands");
                }
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
        // The ledger follows in batches through SyncLedger: a long one would
        // not fit one message.
        let reply = client
            .register(pb::RegisterRequest {
                datasets,
                software_version: env!("CARGO_PKG_VERSION").to_string(),
                ledger: Vec::new(),
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
        {
            let (mut link, done, this) = (client.clone(), session_done.clone(), Arc::clone(&self));
            let mirrored = reply.mirrored.unwrap_or_default();
            self.tasks.spawn(async move { this.sync_ledger(&mut link, mirrored, done).await });
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

    /// Keeps the coordinator's mirror of the ledger whole for as long as the
    /// session lasts: each second, the entries committed since the mirror's
    /// last account go out (whatever became of the message each was
    /// committed for); a mirror whose account disagrees with the ledger's
    /// gets all of it, in batches of `SYNC_BATCH`. A new session starts from
    /// the mirror's account that registration's reply carries.
    async fn sync_ledger(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        mut mirrored: pb::SyncLedgerResponse,
        done: CancellationToken,
    ) {
        let mut since = self.synced_through(&mirrored);
        let mut pause = Duration::from_secs(1);
        loop {
            match self.ledger.head() {
                Ok((count, head)) if (count, head) != (mirrored.count, mirrored.head) => {
                    let entries = match self.ledger.entries_after(since, SYNC_BATCH) {
                        Ok(entries) => entries,
                        Err(e) => {
                            warn!(error = %e, "cannot read the ledger to mirror it");
                            Vec::new()
                        }
                    };
                    match client.sync_ledger(pb::SyncLedgerRequest { entries }).await {
                        Ok(reply) => {
                            let sent_all = since == 0;
                            mirrored = reply.into_inner();
                            since = self.synced_through(&mirrored);
                            // A mirror that still disagrees after the whole ledger (entries the
                            // site no longer has) is not sent everything every second.
                            let behind = (count, head) != (mirrored.count, mirrored.head);
                            pause = if sent_all && since == 0 && behind && count <= SYNC_BATCH as u64 {
                                warn!(count, head, mirrored_count = mirrored.count, mirrored_head = mirrored.head, "the coordinator's mirror holds entries this ledger lacks");
                                Duration::from_secs(60)
                            } else if behind && since > 0 {
                                // More batches to send: straight on.
                                Duration::ZERO
                            } else {
                                Duration::from_secs(1)
                            };
                        }
                        Err(e) => warn!(error = %e, "cannot mirror the ledger yet"),
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot read the ledger's head"),
            }
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// The sequence number up to which the mirror holds exactly the
    /// ledger's entries (0: send everything).
    fn synced_through(&self, mirrored: &pb::SyncLedgerResponse) -> u64 {
        match self.ledger.count_through(mirrored.head) {
            Ok((count, _)) if count == mirrored.count => mirrored.head,
            _ => 0,
        }
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
                if let Err(e) = self.approvals.stop(&task.job_id) {
                    warn!(error = %e, "cannot mark the job's offer stopped");
                }
                if let Some(job) = lock(&self.jobs).get(&task.job_id) {
                    job.cancel.cancel();
                }
                self.finish(&task.job_id);
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
    async fn load_data(&self, spec: &JobSpec, spec_hash: &str) -> Result<Arc<EncodedDataset>, Refusal> {
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
        let decision = self
            .ledger
            .decide(&cfg, &offered, &plan, spec.privacy.delta)
            .map_err(|e| internal(&e))?;
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
        use approvals::ApprovalState;
        let internal = |e: approvals::ApprovalError| Refusal::new(ReasonCode::Internal, e.to_string());
        let request = approvals::Approval {
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
        };
        let mut current = self.approvals.request(&request).map_err(internal)?;
        if current.state == ApprovalState::Pending {
            info!(job_id, spec_hash = %offer.spec_hash, "offer waits for approval: meridian site approve {job_id}");
        }
        // Bounded: a pending offer waits at most a day.
        for _ in 0..86_400 {
            let decided = serde_json::json!({
                "spec_hash": offer.spec_hash, "by": current.decided_by, "at_unix_ms": current.decided_at_ms,
            });
            match current.state {
                ApprovalState::Approved => {
                    self.audit("offer.approved", job_id, decided);
                    return Ok(());
                }
                ApprovalState::Rejected => {
                    self.audit("offer.rejected", job_id, serde_json::json!({ "decision": decided, "reason": current.reason }));
                    return Err(Refusal::new(
                        ReasonCode::NotApproved,
                        format!("rejected by {}: {}", current.decided_by, current.reason),
                    ));
                }
                ApprovalState::Stopped => {
                    return Err(Refusal::new(ReasonCode::JobStopped, "the job was stopped before it was decided"));
                }
                ApprovalState::Pending => {}
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
        let job = Arc::new(JobContext { job_id: job_id.to_string(), spec, spec_hash, cancel: self.shutdown.child_token() });
        lock(&self.jobs).insert(job_id.to_string(), Arc::clone(&job));
        Ok(job)
    }
}
