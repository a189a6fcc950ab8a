//! The job state machine: one driver task per live job moves it from offers
//! to rounds to the final evaluation, reading its state from the store at
//! every step, so a restarted coordinator carries every job on from its
//! last committed state.
//!
//! The driver never waits on a peer directly: RPC handlers commit what peers
//! send and bump [`Coordinator::changes`]; the driver wakes on a change or at
//! the phase's deadline, whichever comes first.

mod round;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_store::checkpoint;
use meridian_sys::now_ms;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, instrument, warn};

use crate::store::{JobRow, JobState, SiteState, Store};

/// Shared state of a running coordinator.
pub struct Coordinator {
    /// Durable state.
    pub store: Store,
    /// Where checkpoints and updates live.
    pub data_dir: PathBuf,
    /// Seconds of silence before a site counts as offline.
    pub idle_timeout_secs: u64,
    /// Bumped after every committed change; drivers and streams wait on it.
    pub changes: watch::Sender<u64>,
    /// Cancelled when the coordinator shuts down.
    pub shutdown: CancellationToken,
    /// Every spawned task, awaited on shutdown.
    pub tasks: TaskTracker,
    /// The tamper-evident record of submissions, answers, updates and rounds.
    pub audit: meridian_store::audit::AuditLog,
    /// Updates on their way in: receiving slots, leases, transfers in
    /// flight, and the parts of updates sent in parts.
    pub uploads: crate::upload::Uploads,
    /// Each live job's latest model as chunks ready to send, and the serving slots.
    pub models: crate::model_cache::ModelCache,
}

/// From this model size on, a job's steps run on a blocking thread (see
/// `Coordinator::drive`); the size from which its files bypass the page
/// cache too.
const BLOCKING_STEP_FROM_BYTES: u64 = 16 << 20;

/// Why the coordinator could not carry out an operation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A parameter file failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// A model could not be built from its spec.
    #[error(transparent)]
    Layout(#[from] meridian_models::LayoutError),
    /// No secure randomness for client-level noise, or noise of an invalid scale.
    #[error("noise: {0}")]
    Noise(#[from] meridian_privacy::noise::NoiseError),
}

impl Coordinator {
    /// Appends to the audit log; a failure is logged, never fatal to the caller.
    pub fn audit(&self, kind: &str, subject: &str, detail: serde_json::Value) {
        if let Err(e) = self.audit.record(kind, subject, detail) {
            warn!(error = %e, kind, "cannot write the audit log");
        }
    }

    /// Signals every waiting driver and stream that state changed.
    pub fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Directory of a job's files.
    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.data_dir.join("jobs").join(job_id)
    }

    /// Path of the global model after `round` (0 = initial).
    pub fn model_path(&self, job_id: &str, round: u32) -> PathBuf {
        self.job_dir(job_id).join(format!("model-r{round:04}.bin"))
    }

    /// Starts a driver for every job that is not finished (after a restart).
    pub fn resume_jobs(self: &Arc<Self>) -> Result<(), EngineError> {
        for job in self.store.jobs()? {
            // Parts that were waiting for the rest of their update when the coordinator stopped.
            match crate::upload::parts::sweep_orphans(&self.job_dir(&job.id).join("updates")) {
                Ok(0) => {}
                Ok(removed) => info!(job_id = %job.id, removed, "removed the parts of updates that never became whole"),
                Err(e) => warn!(job_id = %job.id, error = %e, "could not remove the parts of unfinished updates"),
            }
            if !job.state.is_terminal() {
                info!(job_id = %job.id, state = job.state.as_str(), round = job.current_round, "resuming job");
                self.spawn_driver(job.id);
            }
        }
        Ok(())
    }

    /// Starts the driver task of a job.
    pub fn spawn_driver(self: &Arc<Self>, job_id: String) {
        let this = Arc::clone(self);
        self.tasks.spawn(async move {
            let driven = this.drive(&job_id).await;
            // The job ended, its driver failed, or the coordinator is
            // stopping: either way its cached model is no longer served.
            this.models.forget(&job_id);
            this.uploads.parts.sweep(|j, _| j != job_id);
            if let Err(e) = driven {
                warn!(job_id, error = %e, "job driver stopped");
                let reason = format!("coordinator error: {e}");
                if let Ok(Some(job)) = this.store.job(&job_id) {
                    let _ = this.store.update_job(
                        &job_id,
                        JobState::Failed,
                        &reason,
                        job.current_round,
                        job.attempt,
                        job.deadline_ms,
                    );
                    this.notify();
                }
            }
        });
    }

    #[instrument(skip_all, fields(job_id = %job_id))]
    async fn drive(self: &Arc<Self>, job_id: &str) -> Result<(), EngineError> {
        let mut changes = self.changes.subscribe();
        loop {
            let Some(job) = self.store.job(job_id)? else {
                return Ok(());
            };
            if job.state.is_terminal() {
                return Ok(());
            }
            let deadline_ms = job.deadline_ms;
            // A step may read every update back, fold them and write the
            // next model: for a 400 MB model, seconds of disk and memory
            // work, which must not hold one of the runtime's threads (two
            // on a 2-core host) away from the sites' streams. A small
            // model's step stays here: on a blocking thread, whose own
            // allocator arena starts cold, a round of 10 sites × 1M
            // parameters took 11 % longer and 26 MB more peak memory.
            let progressed = if job.num_params.saturating_mul(4) >= BLOCKING_STEP_FROM_BYTES {
                let this = Arc::clone(self);
                let span = tracing::Span::current();
                match tokio::task::spawn_blocking(move || span.in_scope(|| this.step(&job))).await {
                    Ok(stepped) => stepped?,
                    // A panic goes on unwinding the driver, as it does
                    // from a step taken here.
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // The runtime is shutting down.
                    Err(_) => return Ok(()),
                }
            } else {
                self.step(&job)?
            };
            if progressed {
                self.notify();
                continue;
            }
            // Past the deadline the driver is only waiting for transfers still
            // making progress; an arriving update wakes it sooner.
            let wait_ms = match deadline_ms - now_ms() {
                left if left <= 0 => 250,
                left => left.clamp(10, 5_000) as u64,
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = changes.changed() => {
                    // Let a burst of changes (many sites' updates) settle: one
                    // step after it, not one per change.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    changes.borrow_and_update();
                }
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            }
        }
    }

    /// Carries `job` one step on from its stored state; whether anything changed.
    fn step(&self, job: &JobRow) -> Result<bool, EngineError> {
        match job.state {
            JobState::Offering => self.step_offering(job),
            JobState::Running => self.step_round(job),
            JobState::Evaluating => self.step_evaluating(job),
            _ => Ok(false),
        }
    }

    /// Whether a site has been silent (no registration or heartbeat) for
    /// longer than the idle timeout, as of now.
    fn silence(&self) -> Result<impl Fn(&str) -> bool, EngineError> {
        let last_seen = self.store.last_seen()?;
        let idle_ms = self.idle_timeout_secs as i64 * 1000;
        let now = now_ms();
        Ok(move |site: &str| last_seen.get(site).is_none_or(|seen| now - seen > idle_ms))
    }

    fn deadline(job: &JobRow) -> i64 {
        now_ms() + (job.spec.policy.round_deadline_secs as i64) * 1000
    }

    fn fail(&self, job: &JobRow, reason: String) -> Result<bool, EngineError> {
        warn!(job_id = %job.id, reason, "job failed");
        self.audit("job.failed", &job.id, serde_json::json!({ "reason": reason }));
        self.store.update_job(&job.id, JobState::Failed, &reason, job.current_round, job.attempt, job.deadline_ms)?;
        Ok(true)
    }

    /// Waits for every offered site to answer; starts round 1 with the accepted ones.
    fn step_offering(&self, job: &JobRow) -> Result<bool, EngineError> {
        let sites = self.store.job_sites(&job.id)?;
        let pending = sites.iter().filter(|s| s.state == SiteState::Offered).count();
        let accepted = sites.iter().filter(|s| s.state == SiteState::Accepted).count() as u32;
        let min = job.spec.policy.min_sites;
        if pending > 0 && now_ms() < job.deadline_ms {
            // Nothing more can change the outcome once too many refused.
            if accepted + pending as u32 >= min {
                return Ok(false);
            }
        }
        if accepted >= min {
            info!(job_id = %job.id, accepted, "sites accepted; starting round 1");
            self.store.update_job(&job.id, JobState::Running, "", 1, 1, Self::deadline(job))?;
            return Ok(true);
        }
        let mut why: Vec<String> = sites
            .iter()
            .filter(|s| s.state != SiteState::Accepted)
            .map(|s| {
                if s.state == SiteState::Offered {
                    format!("{} did not answer", s.site)
                } else {
                    format!("{} {}: {}", s.site, s.state.as_str(), s.reason)
                }
            })
            .collect();
        why.sort();
        self.fail(
            job,
            format!("only {accepted} of {} sites accepted (min_sites {min}): {}", sites.len(), why.join("; ")),
        )
    }

    /// Completes the job once every participant evaluated the final model, or at the deadline.
    fn step_evaluating(&self, job: &JobRow) -> Result<bool, EngineError> {
        let round = job.current_round;
        let sites = self.store.job_sites(&job.id)?;
        let evals = self.store.evaluations(&job.id)?;
        let is_silent = self.silence()?;
        let all_in = sites
            .iter()
            .filter(|s| s.state == SiteState::Accepted)
            .all(|s| evals.iter().any(|e| e.round == round && e.site == s.site) || is_silent(&s.site))
            && evals.iter().any(|e| e.round == round);
        if !all_in && now_ms() < job.deadline_ms {
            return Ok(false);
        }
        info!(job_id = %job.id, "job completed");
        self.audit("job.completed", &job.id, serde_json::json!({ "rounds": round }));
        self.store.update_job(&job.id, JobState::Completed, "", round, job.attempt, job.deadline_ms)?;
        Ok(true)
    }
}
