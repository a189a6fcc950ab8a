//! Low-dimensional releases through OpenDP, where its exact samplers and
//! proofs are affordable: each site's training-set size (the FedAvg
//! weight) released with discrete Gaussian noise, and the zCDP → (ε, δ)
//! conversion of such a release.
//!
//! Why OpenDP here and not for DP-SGD: its discrete Gaussian sampler is
//! exact (no floating-point attack surface) but orders of magnitude slower
//! per value than the keystream sampler of [`crate::noise`] (see
//! `examples/opendp_cost.rs`): fine for one integer per job, not for a
//! gradient per step. The release's privacy cost is also
//! composed into the site's ledger by [`crate::accountant`]: a Gaussian
//! release with sensitivity 1 and scale s has RDP α/(2s²), exactly the
//! Poisson-subsampled Gaussian with q = 1, σ = s and one step.
//!
//! # OpenDP's `contrib` feature
//!
//! The workspace builds OpenDP with `contrib`, its label for constructors
//! whose proofs have not yet completed OpenDP's vetting process; both used
//! here sit behind it: `make_gaussian` (on integers it samples the discrete
//! Gaussian of Canonne, Kamath and Steinke) and `make_zCDP_to_approxDP`
//! (used only by [`count_release_epsilon`], a cross-check). Neither
//! `floating-point` nor `honest-but-curious` is enabled. Meridian does not
//! take the privacy claim on OpenDP's word alone: the ρ = 1/(2s²) each
//! release reports is checked against that closed form in the tests, the
//! noise's mean and variance are tested, and the ledger charges the
//! release through the accountant above, not through OpenDP's map.

use opendp::combinators::make_zCDP_to_approxDP;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::{AbsoluteDistance, L2Distance};

/// A release OpenDP refused.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The noise scale is not a positive finite number.
    #[error("count noise scale must be finite and > 0, got {0}")]
    Scale(f64),
    /// The count does not fit OpenDP's integer domain.
    #[error("count {0} is too large to release")]
    TooLarge(u64),
    /// OpenDP reported an error.
    #[error("opendp: {0}")]
    OpenDp(String),
}

fn opendp_err(e: opendp::error::Error) -> ReleaseError {
    ReleaseError::OpenDp(e.to_string())
}

/// A count released with discrete Gaussian noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoisyCount {
    /// The released value, post-processed to at least 1.
    pub value: u64,
    /// The noise scale (standard deviation of the discrete Gaussian).
    pub scale: f64,
    /// zCDP parameter ρ of the release for one added or removed record.
    pub rho: f64,
}

fn gaussian_on_counts(
    scale: f64,
) -> Result<
    opendp::core::Measurement<AtomDomain<i64>, AbsoluteDistance<i64>, ZeroConcentratedDivergence, i64>,
    ReleaseError,
> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(ReleaseError::Scale(scale));
    }
    make_gaussian(AtomDomain::<i64>::default(), AbsoluteDistance::<i64>::default(), scale, None).map_err(opendp_err)
}

/// Releases `count` (sensitivity 1: one record added or removed) with
/// OpenDP's exact discrete Gaussian sampler of standard deviation `scale`.
pub fn release_count(count: u64, scale: f64) -> Result<NoisyCount, ReleaseError> {
    let meas = gaussian_on_counts(scale)?;
    let value = i64::try_from(count).map_err(|_| ReleaseError::TooLarge(count))?;
    let noisy = meas.invoke(&value).map_err(opendp_err)?;
    let rho = meas.map(&1).map_err(opendp_err)?;
    Ok(NoisyCount { value: noisy.max(1) as u64, scale, rho })
}

/// Counts released together with OpenDP's exact discrete Gaussian
/// sampler, independent noise of standard deviation `scale` on each.
#[derive(Clone, Debug, PartialEq)]
pub struct NoisyCounts {
    /// The released values, as drawn: a small true count can come out
    /// negative, and clamping it is the reader's post-processing.
    pub values: Vec<i64>,
    /// The noise scale.
    pub scale: f64,
    /// zCDP parameter ρ of the whole release for an L2 change of 1 (one
    /// record added or removed moves one of the counts by one).
    pub rho: f64,
}

/// Releases `counts`, a vector in which one record added or removed moves
/// one count by one (a histogram, or a split's sizes): L2 sensitivity 1,
/// so the whole vector costs what one count does.
pub fn release_counts(counts: &[u64], scale: f64) -> Result<NoisyCounts, ReleaseError> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(ReleaseError::Scale(scale));
    }
    let meas = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L2Distance::<i64>::default(),
        scale,
        None,
    )
    .map_err(opendp_err)?;
    let exact = counts
        .iter()
        .map(|&c| i64::try_from(c).map_err(|_| ReleaseError::TooLarge(c)))
        .collect::<Result<Vec<i64>, _>>()?;
    let values = meas.invoke(&exact).map_err(opendp_err)?;
    let rho = meas.map(&1).map_err(opendp_err)?;
    Ok(NoisyCounts { values, scale, rho })
}

/// ε at `delta` of one count release with noise `scale`, by OpenDP's
/// zCDP → approximate-DP conversion.
pub fn count_release_epsilon(scale: f64, delta: f64) -> Result<f64, ReleaseError> {
    let profile = make_zCDP_to_approxDP(gaussian_on_counts(scale)?).map_err(opendp_err)?.map(&1).map_err(opendp_err)?;
    profile.epsilon(delta).map_err(opendp_err)
}

#[cfg(test)]
mod tests;
