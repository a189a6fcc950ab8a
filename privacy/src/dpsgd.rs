//! The two rules of a DP-SGD step that the accountant's ε depends on:
//! each example's gradient is clipped to norm C ([`clip_factor`]), and each
//! step's batch is a Poisson sample of the rows ([`PoissonSampler`]).
//!
//! The accountant assumes exactly these: sensitivity C, and a batch in
//! which every row is present with probability q independently of the
//! others (so batch sizes vary). The tensor math (per-example gradients,
//! their norms, the clipped sum) lives in `meridian-models` and the
//! training loop in the worker; both call these rules rather than restate
//! them, so the noise that is added and the noise that is accounted for
//! cannot drift apart.

use rand::rngs::SysRng;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[cfg(test)]
mod tests;

/// Added to the norm before dividing, as Opacus does, so that a zero
/// gradient does not divide by zero.
pub const CLIP_EPSILON: f64 = 1e-6;

/// The factor by which to scale a per-example gradient of L2 norm `norm` so
/// that its norm is at most `clip_norm`: `min(1, clip_norm / (norm + 1e-6))`
/// (Opacus' rule, which the reference fixtures use).
///
/// A NaN `norm` gives NaN, so that a broken gradient is noticed rather than
/// silently kept at full weight (`f64::min` would return 1 for it).
pub fn clip_factor(norm: f64, clip_norm: f64) -> f64 {
    if norm.is_nan() {
        return f64::NAN;
    }
    (clip_norm / (norm + CLIP_EPSILON)).min(1.0)
}

/// The sampling rate is not in (0, 1].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// The rate is outside (0, 1] or NaN.
    #[error("sample_rate must be in (0, 1], got {0}")]
    SampleRate(f64),
    /// The operating system gave no randomness to seed the sampler.
    #[error("no secure randomness for the Poisson sampler: {0}")]
    Random(String),
}

/// Draws Poisson samples of row indices: row `i` of `n` is in a batch with
/// probability `q`, independently of every other row and batch.
///
/// Rows are visited by geometric gaps (the distance to the next sampled row
/// is `⌊ln U / ln(1 − q)⌋` for `U` uniform in (0, 1]), so a batch costs one
/// draw per sampled row instead of one per row. The generator is ChaCha20
/// seeded from the operating system: which rows trained a step is as
/// unpredictable as the noise.
#[derive(Debug)]
pub struct PoissonSampler {
    rng: ChaCha20Rng,
    sample_rate: f64,
    /// `ln(1 − q)`; `-inf` at `q = 1`, where every gap is 0.
    ln_keep: f64,
}

impl PoissonSampler {
    /// A sampler at rate `sample_rate`, seeded from the operating system.
    pub fn new(sample_rate: f64) -> Result<PoissonSampler, SamplerError> {
        let rng = ChaCha20Rng::try_from_rng(&mut SysRng).map_err(|e| SamplerError::Random(e.to_string()))?;
        PoissonSampler::with_rng(sample_rate, rng)
    }

    /// A sampler drawing from `rng`: for tests that need a fixed sequence.
    pub fn with_rng(sample_rate: f64, rng: ChaCha20Rng) -> Result<PoissonSampler, SamplerError> {
        if !(sample_rate > 0.0 && sample_rate <= 1.0) {
            return Err(SamplerError::SampleRate(sample_rate));
        }
        Ok(PoissonSampler { rng, sample_rate, ln_keep: (1.0 - sample_rate).ln() })
    }

    /// The rate q.
    pub fn sample_rate(&self) -> f64 {
        self.sample_rate
    }

    /// Calls `take` with each index of one batch drawn from `0..n`, in
    /// increasing order.
    pub fn sample(&mut self, n: usize, mut take: impl FnMut(usize)) {
        let mut i = 0usize;
        loop {
            i = i.saturating_add(self.gap());
            if i >= n {
                return;
            }
            take(i);
            i += 1;
        }
    }

    /// Rows skipped before the next sampled one.
    fn gap(&mut self) -> usize {
        if self.sample_rate >= 1.0 {
            return 0;
        }
        let u: f64 = 1.0 - self.rng.random::<f64>(); // (0, 1]
        (u.ln() / self.ln_keep).floor() as usize
    }
}
