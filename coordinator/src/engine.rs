//! The job state machine: one driver task per live job moves it from offers
//! to rounds to the final evaluation, reading its state from the store at
//! every step, so a restarted coordinator carries every job on from its
//! last committed state.
//!
//! The driver never waits on a peer directly: RPC handlers commit what peers
//! send and bump [`Coordinator::changes`]; the driver wakes on a change or at
//! the phase's deadline, whichever comes first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, instrument, warn};

use crate::aggregate::{ClientDpRound, FedAvg};
use crate::store::{JobRow, JobState, Store, now_ms};
use privacy::noise::NoiseSource;
use proto::{checkpoint, failpoint};

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
    pub audit: proto::audit::AuditLog,
    /// Update streams in progress, so a round waits for uploads still moving.
    pub transfers: crate::transfers::Transfers,
    /// Slots for reading updates: [`RECEIVING_AT_ONCE`] at a time.
    pub receiving: Arc<tokio::sync::Semaphore>,
    /// Slots reserved by sites for their next upload.
    pub leases: crate::leases::Leases,
    /// Each live job's latest model as chunks ready to send, and the serving slots.
    pub models: crate::model_cache::ModelCache,
    /// The parts of updates sent in parts, until each update is whole.
    pub update_parts: crate::update_parts::UpdateParts,
}

/// From this model size on, a job's steps run on a blocking thread (see
/// `Coordinator::drive`); the size from which its files bypass the page
/// cache too.
const BLOCKING_STEP_FROM_BYTES: u64 = 16 << 20;

/// Updates read at once; the rest wait in HTTP/2 flow control. Each holds
/// one chunk (≤ 1 MiB) in memory while it streams to disk.
pub const RECEIVING_AT_ONCE: usize = 16;

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
    Layout(#[from] models::LayoutError),
    /// No secure randomness for client-level noise.
    #[error("noise: {0}")]
    Noise(String),
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
            match crate::update_parts::sweep_orphans(&self.job_dir(&job.id).join("updates")) {
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
            this.update_parts.sweep(|j, _| j != job_id);
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
        self.audit(
            "job.failed",
            &job.id,
            serde_json::json!({ "reason": reason }),
        );
        self.store.update_job(
            &job.id,
            JobState::Failed,
            &reason,
            job.current_round,
            job.attempt,
            job.deadline_ms,
        )?;
        Ok(true)
    }

    /// Waits for every offered site to answer; starts round 1 with the accepted ones.
    fn step_offering(&self, job: &JobRow) -> Result<bool, EngineError> {
        let sites = self.store.job_sites(&job.id)?;
        let pending = sites.iter().filter(|s| s.state == "offered").count();
        let accepted = sites.iter().filter(|s| s.state == "accepted").count() as u32;
        let min = job.spec.policy.min_sites;
        if pending > 0 && now_ms() < job.deadline_ms {
            // Nothing more can change the outcome once too many refused.
            if accepted + pending as u32 >= min {
                return Ok(false);
            }
        }
        if accepted >= min {
            info!(job_id = %job.id, accepted, "sites accepted; starting round 1");
            self.store
                .update_job(&job.id, JobState::Running, "", 1, 1, Self::deadline(job))?;
            return Ok(true);
        }
        let mut why: Vec<String> = sites
            .iter()
            .filter(|s| s.state != "accepted")
            .map(|s| {
                if s.state == "offered" {
                    format!("{} did not answer", s.site)
                } else {
                    format!("{} {}: {}", s.site, s.state, s.reason)
                }
            })
            .collect();
        why.sort();
        self.fail(
            job,
            format!(
                "only {accepted} of {} sites accepted (min_sites {min}): {}",
                sites.len(),
                why.join("; ")
            ),
        )
    }

    /// Closes the current round when every participant sent its update, or at
    /// the deadline with at least `min_sites` updates; retries or fails otherwise.
    fn step_round(&self, job: &JobRow) -> Result<bool, EngineError> {
        let round = job.current_round;
        let sites = self.store.job_sites(&job.id)?;
        let participants: Vec<&str> = sites
            .iter()
            .filter(|s| s.state == "accepted")
            .map(|s| s.site.as_str())
            .collect();
        // Transfers are read before the updates: one that completes in between
        // is then seen as moving or as stored, never as neither.
        let moving = self
            .transfers
            .moving(&job.id, now_ms() - self.idle_timeout_secs as i64 * 1000);
        let updates = self.store.updates(&job.id, round)?;
        let min = job.spec.policy.min_sites as usize;
        // A participant silent for longer than the idle timeout (no heartbeat, no
        // call, no chunk) is not waited for; one that is still training keeps
        // heartbeating, and one still uploading keeps sending chunks.
        let is_silent = self.silence()?;
        let silent: Vec<&str> = participants
            .iter()
            .copied()
            .filter(|p| !updates.iter().any(|u| u.site == *p))
            .filter(|p| is_silent(p) && !moving.iter().any(|m| m == p))
            .collect();
        let all_in = participants
            .iter()
            .all(|p| silent.contains(p) || updates.iter().any(|u| u.site == *p))
            && updates.len() >= min;
        if !silent.is_empty() && all_in {
            info!(job_id = %job.id, round, silent = ?silent, "closing the round without sites silent for longer than the idle timeout");
            self.audit(
                "round.sites_silent",
                &job.id,
                serde_json::json!({
                    "round": round,
                    "sites": silent,
                    "reason": format!("no heartbeat for more than the idle timeout of {} s", self.idle_timeout_secs),
                }),
            );
        }
        let possible = participants.len().max(updates.len());
        if possible < min {
            let failed: Vec<String> = sites
                .iter()
                .filter(|s| s.state == "failed")
                .map(|s| format!("{}: {}", s.site, s.reason))
                .collect();
            return self.fail(
                job,
                format!(
                    "round {round}: only {} sites can still take part (min_sites {min}); failed: {}",
                    participants.len(),
                    failed.join("; ")
                ),
            );
        }
        if !all_in && now_ms() < job.deadline_ms {
            return Ok(false);
        }
        // The deadline bounds computation, not bandwidth: an update whose chunks
        // are still arriving is waited for, for as long as they keep arriving.
        let uploading: Vec<&str> = participants
            .iter()
            .copied()
            .filter(|p| !updates.iter().any(|u| u.site == *p) && moving.iter().any(|m| m == p))
            .collect();
        if !all_in && !uploading.is_empty() {
            debug!(job_id = %job.id, round, sites = ?uploading, "deadline passed; waiting for updates still arriving");
            return Ok(false);
        }
        if updates.len() < min {
            if job.attempt < job.spec.policy.max_round_attempts {
                warn!(job_id = %job.id, round, attempt = job.attempt, got = updates.len(), "round deadline passed with too few updates; retrying");
                self.store.update_job(
                    &job.id,
                    JobState::Running,
                    "",
                    round,
                    job.attempt + 1,
                    Self::deadline(job),
                )?;
                return Ok(true);
            }
            return self.fail(
                job,
                format!(
                    "round {round}: only {} of min_sites {min} updates arrived by the deadline after {} attempts",
                    updates.len(),
                    job.attempt
                ),
            );
        }
        // The model the sites trained on, from the chunks its pullers were
        // served (the file is read only after a restart, and not kept): a
        // round of a 400 MB model 3.5–4.2 → 2.6 s, the file's read into
        // fresh memory gone.
        let served = self.models.get(&job.id, round - 1, &self.model_path(&job.id, round - 1), false)?;
        let mut global = proto::tensor::decode_chunks(&served);
        // Out of the cache until the next model is installed, so the round
        // does not hold both models' chunks (400 MB at d = 100M). A site
        // being served this model keeps its chunks alive itself; one that
        // asks for it meanwhile is served from the file, which is not kept.
        drop(served);
        self.models.release(&job.id, round - 1);
        // Client-level DP clips each site's update and weighs sites equally; FedAvg weighs by
        // examples. Either way updates are folded one at a time, so memory stays O(d).
        let client_clip = match &job.spec.client_dp {
            Some(cdp) => Some(
                self.store
                    .closed_rounds(&job.id)?
                    .last()
                    .and_then(|(_, _, m)| m.get("client_clip_next").copied())
                    .unwrap_or(cdp.clip),
            ),
            None => None,
        };
        let mut client_dp = client_clip.map(|clip| ClientDpRound::new(global.len(), clip));
        let robust_rule = (!job.spec.aggregation.is_fedavg()).then_some(&job.spec.aggregation);
        // Made with the first update it folds: its sum (8·d bytes) is zeroed
        // when it is made, and client DP and the robust rules have their own.
        let mut fedavg: Option<FedAvg> = None;
        if robust_rule.is_some() {
            let bytes = updates.len() as u64 * global.len() as u64 * 4;
            if bytes > proto::job::Aggregation::MAX_ROBUST_BYTES {
                return self.fail(
                    job,
                    format!(
                        "round {round}: aggregation {} would hold {bytes} bytes of updates, above its bound of {}",
                        job.spec.aggregation.name(),
                        proto::job::Aggregation::MAX_ROBUST_BYTES
                    ),
                );
            }
        }
        let mut held = Vec::new();
        let mut metrics = crate::metrics::training(&updates);
        for u in &updates {
            let pieces = checkpoint::Pieces::open(Path::new(&u.path))?;
            if pieces.len() != global.len() {
                warn!(job_id = %job.id, site = %u.site, "stored update has the wrong length; skipped");
                continue;
            }
            match (client_dp.as_mut(), robust_rule) {
                (Some(dp), _) => dp.fold(&pieces.read_all()?),
                (None, Some(_)) => held.push(pieces.read_all()?),
                // FedAvg folds the update in as it is read, a piece at a time,
                // so the round holds the running sum and one piece, never the
                // update. A read that fails part way fails this attempt, whose
                // sum is dropped.
                (None, None) => {
                    let weight = u.num_examples as f64;
                    let fedavg = fedavg.get_or_insert_with(|| FedAvg::new(global.len()));
                    pieces.for_each(|offset, piece| fedavg.fold_piece(offset, piece, weight))?;
                    fedavg.count_update(weight);
                }
            }
        }
        let eta = job.spec.training.server_learning_rate;
        let folded = match (client_dp, &job.spec.client_dp, client_clip) {
            (Some(dp), Some(cdp), Some(clip)) => {
                let mut noise =
                    NoiseSource::new().map_err(|e| EngineError::Noise(e.to_string()))?;
                let out = dp
                    .apply(&mut global, eta, cdp, &mut noise)
                    .map_err(|e| EngineError::Noise(e.to_string()))?;
                metrics.insert("client_clip".to_string(), clip);
                metrics.insert("client_clip_next".to_string(), out.next_clip);
                metrics.insert(
                    "unclipped_fraction".to_string(),
                    out.unclipped as f64 / out.count.max(1) as f64,
                );
                out.count
            }
            _ => match robust_rule {
                Some(rule) => {
                    let combined = crate::aggregate::robust(&held, rule);
                    for (g, c) in global.iter_mut().zip(&combined) {
                        *g = (f64::from(*g) + eta * f64::from(*c)) as f32;
                    }
                    held.len()
                }
                None => fedavg.as_ref().map_or(0, |fedavg| {
                    fedavg.apply(&mut global, eta);
                    fedavg.count()
                }),
            },
        };
        failpoint::hit("round.aggregate");
        // The running sum (twice the model's size) is no longer needed.
        drop(fedavg);
        drop(held);
        let chunks = checkpoint::write_chunks_atomic(&self.model_path(&job.id, round), &global, "model.rename")?;
        drop(global);
        failpoint::hit("round.commit");
        let (next_state, next_round) = if round >= job.spec.training.rounds {
            (JobState::Evaluating, round)
        } else {
            (JobState::Running, round + 1)
        };
        info!(job_id = %job.id, round, updates = folded, "round aggregated");
        self.audit(
            "round.aggregated",
            &job.id,
            serde_json::json!({
                "round": round,
                "attempt": job.attempt,
                "sites": updates.iter().map(|u| u.site.as_str()).collect::<Vec<_>>(),
                "rule": job.spec.aggregation.name(),
                "client_dp": job.spec.client_dp.is_some(),
            }),
        );
        self.store.advance_round(
            &job.id,
            round,
            job.attempt,
            &metrics,
            next_state,
            next_round,
            Self::deadline(job),
        )?;
        // Served from memory to the next round's pullers once the round is
        // committed (the file is the durable copy; no one may pull a round
        // before it is closed).
        self.models.install(&job.id, round, chunks);
        // Parts of this round's updates that never became whole are dropped.
        self.update_parts.sweep(|job_id, r| job_id != job.id || r > round);
        Ok(true)
    }

    /// Completes the job once every participant evaluated the final model, or at the deadline.
    fn step_evaluating(&self, job: &JobRow) -> Result<bool, EngineError> {
        let round = job.current_round;
        let sites = self.store.job_sites(&job.id)?;
        let evals = self.store.evaluations(&job.id)?;
        let is_silent = self.silence()?;
        let all_in = sites.iter().filter(|s| s.state == "accepted").all(|s| {
            evals.iter().any(|e| e.round == round && e.site == s.site) || is_silent(&s.site)
        }) && evals.iter().any(|e| e.round == round);
        if !all_in && now_ms() < job.deadline_ms {
            return Ok(false);
        }
        info!(job_id = %job.id, "job completed");
        self.audit(
            "job.completed",
            &job.id,
            serde_json::json!({ "rounds": round }),
        );
        self.store.update_job(
            &job.id,
            JobState::Completed,
            "",
            round,
            job.attempt,
            job.deadline_ms,
        )?;
        Ok(true)
    }
}
