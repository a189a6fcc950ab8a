//! The worker daemon's state, [`Worker`]: the site's configuration, ledger,
//! audit log and device, the jobs it accepted and the tasks it is running.
//! Built once by [`Worker::open`] from a validated configuration; what it
//! does lives in the submodules, one concern each: the connection to the
//! coordinator ([`session`]), offers ([`offers`]), the ledger's mirror
//! ([`sync`]) and a job's rounds ([`tasks`]).

mod announce;
mod backoff;
mod offers;
mod session;
mod sync;
mod tasks;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_spec::job::JobSpec;
use meridian_spec::reason::ReasonCode;
use meridian_sys::sync::lock;
use meridian_wire::identity::{IdentityFiles, Principal, Role};
use meridian_wire::pb;
use meridian_wire::pb::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tracing::warn;

use crate::approvals::Approvals;
use crate::config::{DatasetConfig, TrainingDevice, WorkerConfig};
use crate::dataset::{self, EncodedDataset, SplitOptions};
use crate::error::{CertificateProblem, RunError, StateError, WorkerError};
use crate::ledger::Ledger;
use crate::outgoing::Refusal;

/// Largest message the worker decodes from the coordinator.
const MAX_DECODING_BYTES: usize = 4 << 20;

/// A job this site has accepted.
pub(crate) struct JobContext {
    pub(crate) job_id: String,
    pub(crate) spec: JobSpec,
    pub(crate) spec_hash: String,
    pub(crate) cancel: CancellationToken,
}

/// The daemon: everything its sessions and tasks share.
pub(crate) struct Worker {
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
    audit: meridian_store::audit::AuditLog,
    /// Offers waiting for (or decided by) the hospital's IT in manual mode.
    approvals: Approvals,
    /// Jobs the coordinator stopped, so a pending offer stops waiting.
    stopped: Mutex<HashSet<String>>,
    /// The coordinator's idle timeout, learnt at registration: a model
    /// stream silent for this long is abandoned (and the task retried).
    idle_timeout_secs: AtomicU64,
    /// The memory of the last model pulled, which the next pull lands in
    /// (`meridian_wire::tensor::ChunkAssembler::reusing`): a model of 100M parameters would
    /// otherwise fault in 400 MB of fresh pages every round. One for the
    /// whole site, not one per job, so that a job that ends without word
    /// from the coordinator keeps none.
    spare_model: Mutex<Vec<f32>>,
    /// Where the coordinator is, for a second connection: opened for a
    /// model or update large enough to move in two parts
    /// ([`crate::download::PARTED_FROM_BYTES`]) and closed when that transfer
    /// ends, so a site holds one connection between transfers.
    endpoint: Endpoint,
}

/// The hospital the site certificate names; an error for any other role.
fn hospital(config: &WorkerConfig, identity: &IdentityFiles) -> Result<Principal, RunError> {
    let principal = meridian_wire::identity::principal_from_pem(&identity.cert_pem)
        .map_err(|e| RunError::Certificate { path: config.tls_cert.clone(), detail: e.into() })?;
    if principal.role != Role::Hospital {
        return Err(RunError::Certificate {
            path: config.tls_cert.clone(),
            detail: CertificateProblem::NotHospital { name: principal.name, role: principal.role },
        });
    }
    Ok(principal)
}

/// The coordinator's endpoint, over mutual TLS with the site's identity.
fn endpoint(config: &WorkerConfig, identity: &IdentityFiles) -> Result<Endpoint, RunError> {
    Ok(Endpoint::from_shared(config.coordinator.clone())
        .map_err(RunError::Endpoint)?
        .tls_config(identity.client_tls())
        .map_err(RunError::Endpoint)?
        .connect_timeout(Duration::from_secs(5))
        .max_frame_size(Some(meridian_wire::tensor::MAX_FRAME_BYTES))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20)))
}

/// The stores of the state directory: the ledger, the audit log and the approvals.
fn open_state(
    config: &WorkerConfig,
    site: &str,
) -> Result<(Ledger, meridian_store::audit::AuditLog, Approvals), StateError> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir.join("outbox"))?;
    let ledger = Ledger::open(&dir.join("ledger.sqlite"), site)?;
    let audit = meridian_store::audit::AuditLog::open(&dir.join("audit.log"))?;
    let approvals = Approvals::open(&dir.join("ledger.sqlite"))?;
    Ok((ledger, audit, approvals))
}

impl Worker {
    /// Checks the site's identity, opens its state and its training device:
    /// a daemon ready to connect, stopped by `shutdown`.
    pub(crate) fn open(config: WorkerConfig, shutdown: CancellationToken) -> Result<Arc<Worker>, RunError> {
        let identity = IdentityFiles::from_paths(&config.tls_ca, &config.tls_cert, &config.tls_key)?;
        let principal = hospital(&config, &identity)?;
        let (ledger, audit, approvals) = open_state(&config, &principal.name)
            .map_err(|detail| RunError::State { path: config.data_dir.clone(), detail })?;
        let endpoint = endpoint(&config, &identity)?;
        let device = meridian_models::default_device(config.device == TrainingDevice::Gpu).map_err(RunError::Device)?;
        meridian_models::limit_cpu_threads(config.cpu_threads);
        Ok(Arc::new(Worker {
            device,
            config,
            site: principal.name,
            ledger,
            data: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            spare_model: Mutex::new(Vec::new()),
            endpoint,
            inflight: Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
            shutdown,
            audit,
            approvals,
            stopped: Mutex::new(HashSet::new()),
            idle_timeout_secs: AtomicU64::new(60),
        }))
    }

    /// The site's name, from its certificate.
    pub(crate) fn site(&self) -> &str {
        &self.site
    }

    /// The coordinator's URL, as configured.
    pub(crate) fn coordinator(&self) -> &str {
        &self.config.coordinator
    }

    /// Cancels every job's work and waits (a bounded while) for the tasks
    /// under way to end.
    pub(crate) async fn stop(&self) {
        self.tasks.close();
        for job in self.jobs_snapshot() {
            job.cancel.cancel();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
    }

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
        WorkerServiceClient::new(self.endpoint.connect_lazy()).max_decoding_message_size(MAX_DECODING_BYTES)
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

    /// The context of an accepted job; after a restart it is rebuilt from
    /// the decision the ledger recorded.
    fn job(&self, job_id: &str) -> Result<Arc<JobContext>, WorkerError> {
        if let Some(job) = lock(&self.jobs).get(job_id) {
            return Ok(Arc::clone(job));
        }
        let (spec_json, spec_hash) =
            self.ledger.accepted_job(job_id)?.ok_or_else(|| WorkerError::NotAccepted(job_id.to_string()))?;
        let spec = JobSpec::from_canonical_json(&spec_json)?;
        let job =
            Arc::new(JobContext { job_id: job_id.to_string(), spec, spec_hash, cancel: self.shutdown.child_token() });
        lock(&self.jobs).insert(job_id.to_string(), Arc::clone(&job));
        Ok(job)
    }
}
