//! The scalar rules of a DP-SGD step: per-example clipping and the validated
//! parameters that determine the noise and the privacy cost.
//!
//! The tensor math (per-example gradients, their norms, the clipped sum)
//! lives in the worker; it calls [`clip_factor`] for each example and draws
//! noise with standard deviation [`DpSgdConfig::noise_std`] from
//! [`crate::NoiseSource`]. The same [`DpSgdConfig`] feeds the accountant, so
//! the noise that is added and the noise that is accounted for cannot drift
//! apart.

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
/// silently kept at full weight.
pub fn clip_factor(norm: f64, clip_norm: f64) -> f64 {
    if norm.is_nan() {
        return f64::NAN;
    }
    (clip_norm / (norm + CLIP_EPSILON)).min(1.0)
}

/// One invalid field of a [`DpSgdConfig`], naming the value at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpSgdConfigError {
    /// The noise multiplier is negative, infinite or NaN.
    #[error("noise_multiplier must be finite and >= 0, got {0}")]
    NoiseMultiplier(f64),
    /// The clipping norm is not positive and finite.
    #[error("clip_norm must be finite and > 0, got {0}")]
    ClipNorm(f64),
    /// The Poisson sampling rate is not in (0, 1].
    #[error("sample_rate must be in (0, 1], got {0}")]
    SampleRate(f64),
}

/// Every problem found when validating a [`DpSgdConfig`], so that a user
/// fixes them all at once.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid DP-SGD configuration: {}", display_all(.0))]
pub struct InvalidDpSgdConfig(pub Vec<DpSgdConfigError>);

fn display_all(problems: &[DpSgdConfigError]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Validated DP-SGD parameters.
///
/// Invariants: `noise_multiplier` is finite and >= 0, `clip_norm` is finite
/// and > 0, `sample_rate` is in (0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdConfig {
    noise_multiplier: f64,
    clip_norm: f64,
    sample_rate: f64,
}

impl DpSgdConfig {
    /// Validates the parameters, reporting every invalid one.
    ///
    /// - `noise_multiplier`: noise standard deviation over the clipping norm
    ///   (σ in the accountant); 0 means no privacy.
    /// - `clip_norm`: the per-example L2 clipping norm C.
    /// - `sample_rate`: the Poisson sampling probability q of each example
    ///   in each step.
    pub fn new(
        noise_multiplier: f64,
        clip_norm: f64,
        sample_rate: f64,
    ) -> Result<Self, InvalidDpSgdConfig> {
        let mut problems = Vec::new();
        if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
            problems.push(DpSgdConfigError::NoiseMultiplier(noise_multiplier));
        }
        if !(clip_norm.is_finite() && clip_norm > 0.0) {
            problems.push(DpSgdConfigError::ClipNorm(clip_norm));
        }
        if !(sample_rate > 0.0 && sample_rate <= 1.0) {
            problems.push(DpSgdConfigError::SampleRate(sample_rate));
        }
        if problems.is_empty() {
            Ok(Self {
                noise_multiplier,
                clip_norm,
                sample_rate,
            })
        } else {
            Err(InvalidDpSgdConfig(problems))
        }
    }

    /// The noise multiplier σ.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The per-example clipping norm C.
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The Poisson sampling rate q.
    pub fn sample_rate(&self) -> f64 {
        self.sample_rate
    }

    /// The standard deviation σ·C of the noise added to the sum of clipped
    /// per-example gradients.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }

    /// Composes `steps` steps with these parameters into `accountant`.
    pub fn compose_into(
        &self,
        accountant: &mut crate::RdpAccountant,
        steps: u64,
    ) -> Result<(), crate::AccountantError> {
        accountant.compose_poisson_gaussian(self.sample_rate, self.noise_multiplier, steps)
    }
}
