//! A round's step: whether the round can close, then folding its updates
//! into the next global model, committed with the round in one transaction.
//!
//! The call and the fold are apart because they fail differently: the call
//! reads only the store and may wait, retry the round or fail the job; the
//! fold reads every update back and writes the next model, and fails only
//! the attempt whose read failed.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use meridian_privacy::noise::NoiseSource;
use meridian_spec::job::{Aggregation, ClientDpSpec};
use meridian_store::checkpoint;
use meridian_sys::{failpoint, now_ms};
use tracing::{debug, info, warn};

use super::{Coordinator, EngineError};
use crate::aggregate::{ClientDpRound, FedAvg};
use crate::store::{JobRow, JobSiteRow, JobState, SiteState, UpdateRow};

/// What a round's step found before folding anything.
enum Call {
    /// Nothing to do yet: updates are still due, or still arriving past the deadline.
    Wait,
    /// The round was retried or the job failed.
    Changed,
    /// The round closes with these updates.
    Close(Vec<UpdateRow>),
}

impl Coordinator {
    /// Closes the current round when every participant sent its update, or at
    /// the deadline with at least `min_sites` updates; retries or fails otherwise.
    pub(super) fn step_round(&self, job: &JobRow) -> Result<bool, EngineError> {
        match self.call_round(job)? {
            Call::Wait => Ok(false),
            Call::Changed => Ok(true),
            Call::Close(updates) => self.close_round(job, &updates),
        }
    }

    /// Whether the round can close now, and with which updates.
    fn call_round(&self, job: &JobRow) -> Result<Call, EngineError> {
        let round = job.current_round;
        let sites = self.store.job_sites(&job.id)?;
        let participants: Vec<&str> =
            sites.iter().filter(|s| s.state == SiteState::Accepted).map(|s| s.site.as_str()).collect();
        // Transfers are read before the updates: one that completes in between
        // is then seen as moving or as stored, never as neither.
        let moving = self.uploads.transfers.moving(&job.id, now_ms() - self.idle_timeout_secs as i64 * 1000);
        let updates = self.store.updates(&job.id, round)?;
        let min = job.spec.policy.min_sites as usize;
        let sent = |p: &str| updates.iter().any(|u| u.site == p);
        let is_moving = |p: &str| moving.iter().any(|m| m == p);
        // A participant silent for longer than the idle timeout (no heartbeat, no
        // call, no chunk) is not waited for; one that is still training keeps
        // heartbeating, and one still uploading keeps sending chunks.
        let is_silent = self.silence()?;
        let silent: Vec<&str> =
            participants.iter().copied().filter(|p| !sent(p)).filter(|p| is_silent(p) && !is_moving(p)).collect();
        let all_in = participants.iter().all(|p| silent.contains(p) || sent(p)) && updates.len() >= min;
        if !silent.is_empty() && all_in {
            self.audit_silent(job, &silent);
        }
        if participants.len().max(updates.len()) < min {
            self.fail_short_of_sites(job, &sites, participants.len())?;
            return Ok(Call::Changed);
        }
        if !all_in && now_ms() < job.deadline_ms {
            return Ok(Call::Wait);
        }
        // The deadline bounds computation, not bandwidth: an update whose chunks
        // are still arriving is waited for, for as long as they keep arriving.
        let uploading: Vec<&str> = participants.iter().copied().filter(|p| !sent(p) && is_moving(p)).collect();
        if !all_in && !uploading.is_empty() {
            debug!(job_id = %job.id, round, sites = ?uploading, "deadline passed; waiting for updates still arriving");
            return Ok(Call::Wait);
        }
        if updates.len() < min {
            self.retry_or_fail(job, updates.len())?;
            return Ok(Call::Changed);
        }
        Ok(Call::Close(updates))
    }

    /// Records that the round closes without the `silent` participants.
    fn audit_silent(&self, job: &JobRow, silent: &[&str]) {
        let round = job.current_round;
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

    /// Fails the job: only `participants` of its `sites` can still take part, fewer than `min_sites`.
    fn fail_short_of_sites(
        &self,
        job: &JobRow,
        sites: &[JobSiteRow],
        participants: usize,
    ) -> Result<bool, EngineError> {
        let failed: Vec<String> = sites
            .iter()
            .filter(|s| s.state == SiteState::Failed)
            .map(|s| format!("{}: {}", s.site, s.reason))
            .collect();
        self.fail(
            job,
            format!(
                "round {}: only {participants} sites can still take part (min_sites {}); failed: {}",
                job.current_round,
                job.spec.policy.min_sites,
                failed.join("; ")
            ),
        )
    }

    /// The deadline passed with only `got` updates: the round starts again,
    /// or the job fails once it has had its `max_round_attempts`.
    fn retry_or_fail(&self, job: &JobRow, got: usize) -> Result<bool, EngineError> {
        let (round, min) = (job.current_round, job.spec.policy.min_sites);
        if job.attempt < job.spec.policy.max_round_attempts {
            warn!(job_id = %job.id, round, attempt = job.attempt, got, "round deadline passed with too few updates; retrying");
            self.store.update_job(&job.id, JobState::Running, "", round, job.attempt + 1, Self::deadline(job))?;
            return Ok(true);
        }
        self.fail(
            job,
            format!(
                "round {round}: only {got} of min_sites {min} updates arrived by the deadline after {} attempts",
                job.attempt
            ),
        )
    }

    /// Folds `updates` into the model the sites trained on and commits the
    /// next model with the round.
    fn close_round(&self, job: &JobRow, updates: &[UpdateRow]) -> Result<bool, EngineError> {
        let round = job.current_round;
        let mut global = self.served_model(job)?;
        let client_dp = self.client_dp(job)?;
        if let Some(reason) = robust_bound_exceeded(job, updates.len(), global.len()) {
            return self.fail(job, reason);
        }
        let mut fold = Fold::new(job, client_dp, global.len());
        for update in updates {
            fold.add(&job.id, update, global.len())?;
        }
        let mut metrics = crate::metrics::training(updates);
        let folded = fold.apply(&mut global, job.spec.training.server_learning_rate, &mut metrics)?;
        failpoint::hit("round.aggregate");
        let chunks = checkpoint::write_chunks_atomic(&self.model_path(&job.id, round), &global, "model.rename")?;
        drop(global);
        failpoint::hit("round.commit");
        self.commit_round(job, updates, folded, &metrics, chunks)
    }

    /// The model the sites trained on (the previous round's), from the
    /// chunks its pullers were served: the file is read only after a
    /// restart, and not kept.
    fn served_model(&self, job: &JobRow) -> Result<Vec<f32>, EngineError> {
        let previous = job.current_round - 1;
        let served = self.models.get(&job.id, previous, &self.model_path(&job.id, previous), false)?;
        let global = meridian_wire::tensor::decode_chunks(&served);
        // Out of the cache until the next model is installed, so the round
        // does not hold both models' chunks. A site being served this model
        // keeps its chunks alive itself; one that asks for it meanwhile is
        // served from the file, which is not kept.
        drop(served);
        self.models.release(&job.id, previous);
        Ok(global)
    }

    /// The job's client-level DP and this round's clip (the previous
    /// round's adaptive clip, else the spec's), if it has client-level DP.
    fn client_dp<'a>(&self, job: &'a JobRow) -> Result<Option<(&'a ClientDpSpec, f64)>, EngineError> {
        let Some(cdp) = &job.spec.client_dp else {
            return Ok(None);
        };
        let closed = self.store.closed_rounds(&job.id)?;
        let clip = closed.last().and_then(|(_, _, m)| m.get("client_clip_next").copied()).unwrap_or(cdp.clip);
        Ok(Some((cdp, clip)))
    }

    /// Records the aggregated round and moves the job on, then serves the
    /// new model (`chunks`) and drops the parts of this round's updates that
    /// never became whole.
    fn commit_round(
        &self,
        job: &JobRow,
        updates: &[UpdateRow],
        folded: usize,
        metrics: &BTreeMap<String, f64>,
        chunks: Vec<Bytes>,
    ) -> Result<bool, EngineError> {
        let round = job.current_round;
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
        self.store.advance_round(&job.id, round, job.attempt, metrics, next_state, next_round, Self::deadline(job))?;
        // Served from memory to the next round's pullers once the round is
        // committed (the file is the durable copy; no one may pull a round
        // before it is closed).
        self.models.install(&job.id, round, chunks);
        self.uploads.parts.sweep(|job_id, r| job_id != job.id || r > round);
        Ok(true)
    }
}

/// Why the job's robust rule may not run on this round: holding its
/// `updates` updates of `d` values each would pass the rule's memory bound.
/// `None` for FedAvg, which holds no update.
fn robust_bound_exceeded(job: &JobRow, updates: usize, d: usize) -> Option<String> {
    if job.spec.aggregation.is_fedavg() {
        return None;
    }
    let bytes = updates as u64 * d as u64 * 4;
    (bytes > Aggregation::MAX_ROBUST_BYTES).then(|| {
        format!(
            "round {}: aggregation {} would hold {bytes} bytes of updates, above its bound of {}",
            job.current_round,
            job.spec.aggregation.name(),
            Aggregation::MAX_ROBUST_BYTES
        )
    })
}

/// How a round folds its updates into the global model. Each is folded in
/// as it is read, so memory stays O(d), except under a robust rule, which
/// needs them all at once.
enum Fold<'a> {
    /// Client-level DP: each site's update clipped to `clip`, sites weighed
    /// equally, the sum noised once.
    ClientDp { round: ClientDpRound, spec: &'a ClientDpSpec, clip: f64 },
    /// A robust rule over every update, held in memory.
    Robust { rule: &'a Aggregation, held: Vec<Vec<f32>> },
    /// FedAvg, weighed by examples. Made with the first update it folds:
    /// its sum (8·d bytes) is zeroed when it is made.
    FedAvg(Option<FedAvg>),
}

impl<'a> Fold<'a> {
    /// The fold of `job`'s rule over updates of `d` values; `client_dp`
    /// (see `Coordinator::client_dp`) takes precedence.
    fn new(job: &'a JobRow, client_dp: Option<(&'a ClientDpSpec, f64)>, d: usize) -> Self {
        match client_dp {
            Some((spec, clip)) => Fold::ClientDp { round: ClientDpRound::new(d, clip), spec, clip },
            None if !job.spec.aggregation.is_fedavg() => Fold::Robust { rule: &job.spec.aggregation, held: Vec::new() },
            None => Fold::FedAvg(None),
        }
    }

    /// Folds in the stored update `update`; one that is not `d` values long is skipped.
    fn add(&mut self, job_id: &str, update: &UpdateRow, d: usize) -> Result<(), EngineError> {
        let pieces = checkpoint::Pieces::open(Path::new(&update.path))?;
        if pieces.len() != d {
            warn!(job_id, site = %update.site, "stored update has the wrong length; skipped");
            return Ok(());
        }
        match self {
            Fold::ClientDp { round, .. } => round.fold(&pieces.read_all()?),
            Fold::Robust { held, .. } => held.push(pieces.read_all()?),
            // FedAvg folds the update in as it is read, a piece at a time,
            // so the round holds the running sum and one piece, never the
            // update. A read that fails part way fails this attempt, whose
            // sum is dropped.
            Fold::FedAvg(fedavg) => {
                let weight = update.num_examples as f64;
                let fedavg = fedavg.get_or_insert_with(|| FedAvg::new(d));
                pieces.for_each(|offset, piece| fedavg.fold_piece(offset, piece, weight))?;
                fedavg.count_update(weight);
            }
        }
        Ok(())
    }

    /// Applies what was folded to `global` at the server learning rate
    /// `eta`; gives how many updates were folded. Client-level DP records
    /// its clips in `metrics`.
    fn apply(self, global: &mut [f32], eta: f64, metrics: &mut BTreeMap<String, f64>) -> Result<usize, EngineError> {
        match self {
            Fold::ClientDp { round, spec, clip } => {
                let mut noise = NoiseSource::new()?;
                let out = round.apply(global, eta, spec, &mut noise)?;
                metrics.insert("client_clip".to_string(), clip);
                metrics.insert("client_clip_next".to_string(), out.next_clip);
                metrics.insert("unclipped_fraction".to_string(), out.unclipped as f64 / out.count.max(1) as f64);
                Ok(out.count)
            }
            Fold::Robust { rule, held } => {
                let combined = crate::aggregate::robust(&held, rule);
                for (g, c) in global.iter_mut().zip(&combined) {
                    *g = (f64::from(*g) + eta * f64::from(*c)) as f32;
                }
                Ok(held.len())
            }
            Fold::FedAvg(fedavg) => Ok(fedavg.map_or(0, |fedavg| {
                fedavg.apply(global, eta);
                fedavg.count()
            })),
        }
    }
}
