//! The releases a site makes during a job beside its DP-SGD updates: each
//! held-out evaluation's score × label histogram and each round's count of
//! clipped examples, noised with OpenDP's discrete Gaussian and charged to
//! the ledger in the transaction that draws the noise
//! ([`crate::ledger::Ledger::release`]).
//!
//! Sensitivities, for add/remove of one record: a histogram's cells move
//! by one in one cell (L2 sensitivity 1, one Gaussian mechanism of scale
//! σ_e for the whole vector: q = 1, σ = σ_e, one step). A step's clipped
//! count moves by at most one on the same Poisson sample as the step's
//! gradient sum (which moves by at most C): the pair is one subsampled
//! Gaussian of noise multiplier (σ⁻² + σ_b⁻²)^(−1/2), charged as the round's
//! DP-SGD entry; summing the steps' counts is post-processing.

use meridian_spec::evaluation::Histogram;
use meridian_spec::job::{JobSpec, SitePlan};
use meridian_spec::mechanism::Mechanism;
use meridian_wire::pb;

use crate::config::DatasetConfig;
use crate::ledger::{Charge, Ledger, LedgerError};
use crate::outgoing::Released;

/// Cells of a histogram as counts to noise.
fn counts(cells: &[i64]) -> Vec<u64> {
    cells.iter().map(|&c| c.max(0) as u64).collect()
}

/// The job a release belongs to.
pub struct JobRef<'a> {
    /// Job id.
    pub job_id: &'a str,
    /// The spec hash the site accepted.
    pub spec_hash: &'a str,
    /// The spec.
    pub spec: &'a JobSpec,
}

impl JobRef<'_> {
    fn charge(&self, round: u32, mechanism: Mechanism, sample_rate: f64, noise: f64, steps: u64) -> Charge {
        Charge {
            job_id: self.job_id.to_string(),
            spec_hash: self.spec_hash.to_string(),
            round,
            mechanism,
            noise_multiplier: noise,
            sample_rate,
            clip_norm: 1.0,
            steps,
            delta: self.spec.privacy.delta,
        }
    }
}

/// Releases the evaluation of round `round`'s model: `exact` with each
/// cell noised at the spec's scale for that round, charged first. Asked
/// again for the same round, it gives the values released then.
pub fn evaluation(
    ledger: &Ledger,
    dataset: &DatasetConfig,
    job: &JobRef<'_>,
    round: u32,
    exact: &Histogram,
) -> Result<Released<Histogram>, LedgerError> {
    let scale = job.spec.evaluation.noise_for(round, job.spec.training.rounds);
    let charge = job.charge(round, Mechanism::Evaluation, 1.0, scale, 1);
    let (entry, cells) = ledger.release(dataset, &charge, || {
        Ok(meridian_privacy::release::release_counts(&counts(&exact.cells()), scale)?.values)
    })?;
    Ok(Released { value: Histogram::from_cells(&cells), entry })
}

/// Charges round `round`'s DP-SGD steps and, if the spec releases one,
/// draws its clip count (each step's count noised at
/// `privacy.clip_count_noise`, summed), in one transaction: the two leave
/// from the same Poisson samples and are charged as one mechanism at the
/// joint noise multiplier. Asked again for the same round, the entry and the
/// count charged then.
pub fn round(
    ledger: &Ledger,
    dataset: &DatasetConfig,
    job: &JobRef<'_>,
    plan: &SitePlan,
    round: u32,
    per_step: &[u64],
) -> Result<(pb::LedgerEntry, Option<Released<i64>>), LedgerError> {
    let noise = job.spec.privacy.clip_count_noise;
    let mut charge = job.charge(
        round,
        Mechanism::DpSgd,
        plan.sample_rate,
        job.spec.privacy.charged_noise_multiplier(),
        per_step.len() as u64,
    );
    charge.clip_norm = job.spec.privacy.clip_norm;
    let (entry, values) = ledger.release(dataset, &charge, || {
        if noise <= 0.0 {
            return Ok(Vec::new());
        }
        let noisy = meridian_privacy::release::release_counts(per_step, noise)?;
        Ok(vec![noisy.values.iter().sum()])
    })?;
    let clipped = values.first().map(|&value| Released { value, entry: entry.clone() });
    Ok((entry, clipped))
}

/// The clip count charged with round `round` before, if any (an update
/// sent again carries the count it was sent with).
pub fn released_clip_count(ledger: &Ledger, job_id: &str, round: u32) -> Result<Option<Released<i64>>, LedgerError> {
    Ok(ledger
        .released(job_id, round, Mechanism::DpSgd)?
        .and_then(|(entry, values)| values.first().map(|&value| Released { value, entry })))
}
