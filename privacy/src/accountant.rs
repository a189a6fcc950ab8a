//! Rényi-DP accounting for DP-SGD: how much privacy a run of the
//! Poisson-subsampled Gaussian mechanism has spent.
//!
//! Every ε that Meridian reports, records in a ledger or checks against a
//! budget comes from here, so the numbers must be the ones an auditor gets
//! from the reference implementation. [`RdpAccountant`] reproduces Google's
//! `dp_accounting` 0.6 `RdpAccountant` for
//! `PoissonSampledDpEvent(q, GaussianDpEvent(σ))` under add/remove-one
//! neighbours:
//!
//! - the RDP of one step at each order α is `ln(A_α)/(α − 1)` (Mironov,
//!   Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian
//!   Mechanism", 2019): a finite binomial sum for integer α
//!   (`_compute_log_a_int`) and, for fractional α, the two series of Sec. 3.3
//!   evaluated in log space with `ln erfc` (`_compute_log_a_frac`, including
//!   its rule of excluding an order, i.e. giving it infinite RDP, when the
//!   series has not converged after 1000 terms); `α/(2σ²)` when `q = 1`;
//!   `0` when `q = 0`; `∞` when `σ = 0`;
//! - RDP composes by addition, so `steps` identical steps cost `steps` times
//!   the per-step vector (computed once), and heterogeneous runs on the same
//!   data (several jobs, several rounds) compose by calling
//!   [`RdpAccountant::compose_poisson_gaussian`] once per run;
//! - [`RdpAccountant::epsilon`] converts to (ε, δ) with dp_accounting's
//!   improved conversion (`compute_epsilon`; Canonne, Kamath and Steinke 2020,
//!   Prop. 12; Asoodeh et al. 2020): for each order,
//!   `ε = rdp + ln(1 − 1/α) − ln(δ·α)/(α − 1)` (only for α > 1.01), `ε = 0`
//!   where the KL bound `δ² + expm1(−rdp) > 0` already holds, minimised over
//!   the orders and clamped at zero. It returns the optimal order too.
//!
//! The default orders are dp_accounting's `DEFAULT_RDP_ORDERS`:
//! `1 + x/10` for `x` in `1..=99`, the integers `11..=63`, and
//! `128, 256, 512, 1024` (there is no 64 in dp_accounting's list).
//!
//! [`PldAccountant`] (in `accountant/pld.rs`) accounts for the same
//! mechanisms by their privacy loss distributions, as dp_accounting's
//! `PLDAccountant` does: slower (`examples/pld_cost.rs`; figures in
//! `docs/perf-log.md`) and tighter (8–12 % less ε on long DP-SGD runs at
//! δ = 1e-5, more on short ones).
//!
//! [`RdpAccountant::legacy`] with [`RdpAccountant::epsilon_legacy`] gives the
//! numbers of older papers and tutorials (Abadi et al. 2016, the TensorFlow
//! Privacy MNIST tutorial): TF Privacy's orders (`1 + x/10` for `x` in
//! `1..=99`, then `12..=63`) and the basic conversion
//! `ε = rdp + ln(1/δ)/(α − 1)` (Mironov 2017, Prop. 3). It is looser; use it
//! only to compare with published tables.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

mod pld;
#[cfg(test)]
mod properties;
mod special;
#[cfg(test)]
mod tests;

pub use pld::{DEFAULT_DISCRETIZATION, MAX_PLD_POINTS, PldAccountant, dpsgd_epsilon_pld};

#[cfg(test)]
pub(crate) use special::erfc;

/// The largest order accepted by [`RdpAccountant::with_orders`].
///
/// Integer orders cost one term per unit of α; a larger order than this has
/// never been the optimal one for DP-SGD and would only slow accounting down.
pub const MAX_ORDER: f64 = 10_000.0;

/// The largest noise multiplier [`noise_multiplier_for_epsilon`] tries before
/// declaring a target unreachable.
pub const MAX_NOISE_MULTIPLIER: f64 = 1e6;

/// Terms of the fractional-order series before dp_accounting gives up on an
/// order (`_MAX_STEPS_LOG_A_FRAC`).
const MAX_FRAC_TERMS: u32 = 1000;

/// Relative width at which [`noise_multiplier_for_epsilon`] stops bisecting.
const BISECTION_RELATIVE_TOLERANCE: f64 = 1e-9;

/// Errors from composing mechanisms or converting RDP to (ε, δ).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountantError {
    /// The Poisson sampling rate is not in [0, 1].
    #[error("sample_rate must be in [0, 1], got {0}")]
    SampleRate(f64),
    /// The noise multiplier is negative, infinite or NaN.
    #[error("noise_multiplier must be finite and >= 0, got {0}")]
    NoiseMultiplier(f64),
    /// δ is not in [0, 1].
    #[error("delta must be in [0, 1], got {0}")]
    Delta(f64),
    /// The legacy conversion needs δ > 0.
    #[error("delta must be in (0, 1] for the legacy conversion, got {0}")]
    LegacyDelta(f64),
    /// An accountant needs at least one order.
    #[error("orders must not be empty")]
    NoOrders,
    /// An order is not in (1, [`MAX_ORDER`]].
    #[error("order {value} at index {index} must be finite, > 1 and <= {MAX_ORDER}")]
    Order {
        /// Position of the offending order in the list.
        index: usize,
        /// The offending order.
        value: f64,
    },
    /// The target ε is not a positive finite number.
    #[error("target_epsilon must be finite and > 0, got {0}")]
    TargetEpsilon(f64),
    /// Even [`MAX_NOISE_MULTIPLIER`] does not bring ε down to the target.
    #[error(
        "target_epsilon {target_epsilon} is unreachable: noise_multiplier \
         {noise_multiplier} still gives epsilon {epsilon}"
    )]
    Unreachable {
        /// The requested ε.
        target_epsilon: f64,
        /// The largest noise multiplier tried.
        noise_multiplier: f64,
        /// The ε it gives.
        epsilon: f64,
    },
    /// A PLD discretization interval is not a positive finite number.
    #[error("value_discretization_interval must be finite and > 0, got {0}")]
    Discretization(f64),
    /// ε is NaN where a δ(ε) was asked for.
    #[error("epsilon must not be NaN, got {0}")]
    Epsilon(f64),
    /// A privacy loss distribution would need more grid points than
    /// [`MAX_PLD_POINTS`].
    #[error(
        "privacy loss distribution for sample_rate {sample_rate}, noise_multiplier \
         {noise_multiplier}, {steps} steps at discretization {discretization} needs \
         {points} points, more than {max}"
    )]
    PldTooLarge {
        /// The sampling rate of the run being composed.
        sample_rate: f64,
        /// The noise multiplier of the run being composed.
        noise_multiplier: f64,
        /// The number of steps of the run being composed.
        steps: u64,
        /// The grid interval of the accountant.
        discretization: f64,
        /// The number of points the distribution would need.
        points: f64,
        /// The limit, [`MAX_PLD_POINTS`].
        max: usize,
    },
}

/// An ε guarantee at a given δ, with the RDP order that achieved it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpsilonAtDelta {
    /// The privacy loss ε (may be `f64::INFINITY`, e.g. when σ = 0).
    pub epsilon: f64,
    /// The RDP order α at which the minimum over orders was reached; 0 when
    /// δ = 0 (as dp_accounting reports it).
    pub order: f64,
}

/// dp_accounting 0.6's `DEFAULT_RDP_ORDERS`.
pub fn default_orders() -> Vec<f64> {
    let mut orders = fractional_orders();
    orders.extend((11..=63).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// TF Privacy's legacy orders (`compute_dp_sgd_privacy`): `1 + x/10` for `x`
/// in `1..=99`, then `12..=63`.
pub fn legacy_orders() -> Vec<f64> {
    let mut orders = fractional_orders();
    orders.extend((12..=63).map(f64::from));
    orders
}

/// `1 + x/10` for `x` in `1..=99`, computed exactly as Python does, so that
/// 2.0, 3.0, … take the integer-order path as they do in dp_accounting.
fn fractional_orders() -> Vec<f64> {
    (1..=99).map(|x| 1.0 + f64::from(x) / 10.0).collect()
}

/// Accumulated Rényi-DP of a sequence of Poisson-subsampled Gaussian
/// mechanisms, at a fixed list of orders.
///
/// ```
/// use meridian_privacy::RdpAccountant;
///
/// let mut accountant = RdpAccountant::new();
/// // Abadi et al. 2016, Sec. 3.1: q = 0.01, σ = 4, 10,000 steps.
/// accountant.compose_poisson_gaussian(0.01, 4.0, 10_000)?;
/// let spent = accountant.epsilon(1e-5)?;
/// assert!((spent.epsilon - 1.03549).abs() < 1e-5);
/// assert_eq!(spent.order, 17.0);
/// # Ok::<(), meridian_privacy::AccountantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    /// The orders α, each finite and in (1, [`MAX_ORDER`]].
    orders: Vec<f64>,
    /// RDP at each order, same length as `orders`; starts at zero.
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An empty accountant over dp_accounting's default orders.
    pub fn new() -> Self {
        Self::from_valid_orders(default_orders())
    }

    /// An empty accountant over TF Privacy's legacy orders, for reproducing
    /// published values with [`RdpAccountant::epsilon_legacy`].
    pub fn legacy() -> Self {
        Self::from_valid_orders(legacy_orders())
    }

    /// An empty accountant over the given orders.
    ///
    /// Each order must be finite and in (1, [`MAX_ORDER`]]. Orders equal to an
    /// integer use the exact binomial sum; others the fractional series.
    pub fn with_orders(orders: Vec<f64>) -> Result<Self, AccountantError> {
        if orders.is_empty() {
            return Err(AccountantError::NoOrders);
        }
        if let Some((index, &value)) = orders.iter().enumerate().find(|&(_, &a)| !(a > 1.0 && a <= MAX_ORDER)) {
            return Err(AccountantError::Order { index, value });
        }
        Ok(Self::from_valid_orders(orders))
    }

    fn from_valid_orders(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Composes `steps` runs of the Poisson-subsampled Gaussian mechanism
    /// with sampling rate `sample_rate` and noise multiplier
    /// `noise_multiplier` (noise standard deviation over L2 sensitivity).
    ///
    /// May be called any number of times with different parameters; the RDP
    /// of each call is added. The per-step RDP is computed once per call and
    /// multiplied by `steps`.
    pub fn compose_poisson_gaussian(
        &mut self,
        sample_rate: f64,
        noise_multiplier: f64,
        steps: u64,
    ) -> Result<(), AccountantError> {
        let per_step = poisson_gaussian_rdp(sample_rate, noise_multiplier, &self.orders)?;
        if steps == 0 {
            // 0·∞ would be NaN; nothing happened, so nothing is spent.
            return Ok(());
        }
        let count = steps as f64;
        for (total, step) in self.rdp.iter_mut().zip(per_step) {
            *total += count * step;
        }
        Ok(())
    }

    /// ε at `delta` by dp_accounting's improved conversion, with the optimal
    /// order.
    ///
    /// δ = 0 gives ε = 0 if nothing has been spent and ∞ otherwise, with order
    /// 0, as dp_accounting does. Like dp_accounting, an order whose RDP is
    /// negative (possible only through rounding, at extreme parameters such
    /// as q ≈ 1e-9 over ~1e19 steps) counts as ε = 0.
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonAtDelta, AccountantError> {
        improved_epsilon(&self.orders, &self.rdp, delta)
    }

    /// ε at `delta` by the basic conversion `ε = rdp + ln(1/δ)/(α − 1)` used
    /// in older published tables (pair it with [`RdpAccountant::legacy`]).
    pub fn epsilon_legacy(&self, delta: f64) -> Result<EpsilonAtDelta, AccountantError> {
        legacy_epsilon(&self.orders, &self.rdp, delta)
    }

    /// The orders α.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The accumulated RDP at each order of [`RdpAccountant::orders`].
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }
}

/// ε at `delta` after `steps` steps of DP-SGD with Poisson sampling rate
/// `sample_rate` and noise multiplier `noise_multiplier`, over dp_accounting's
/// default orders with its improved conversion.
pub fn dpsgd_epsilon(
    sample_rate: f64,
    noise_multiplier: f64,
    steps: u64,
    delta: f64,
) -> Result<EpsilonAtDelta, AccountantError> {
    let mut accountant = RdpAccountant::new();
    accountant.compose_poisson_gaussian(sample_rate, noise_multiplier, steps)?;
    accountant.epsilon(delta)
}

/// ε at `delta` of Poisson-subsampled Gaussian mechanisms run one after
/// another, each `(sample_rate, noise_multiplier, steps)`, composed by RDP
/// (never a sum of ε): every ledger's total, and every plan's. 0 when
/// nothing ran.
pub fn composed_epsilon(
    mechanisms: impl IntoIterator<Item = (f64, f64, u64)>,
    delta: f64,
) -> Result<f64, AccountantError> {
    let mut accountant = RdpAccountant::new();
    let mut any = false;
    for (sample_rate, noise_multiplier, steps) in mechanisms {
        if steps > 0 {
            accountant.compose_poisson_gaussian(sample_rate, noise_multiplier, steps)?;
            any = true;
        }
    }
    if !any {
        return Ok(0.0);
    }
    Ok(accountant.epsilon(delta)?.epsilon)
}

/// The smallest noise multiplier for which `steps` steps of DP-SGD at
/// `sample_rate` satisfy (`target_epsilon`, `delta`)-DP according to
/// [`dpsgd_epsilon`].
///
/// Found by bisection to a relative width of 1e-9; the upper end of the final
/// bracket is returned, so the result always meets the target. Returns 0 when
/// nothing is spent (`sample_rate == 0` or `steps == 0`), and
/// [`AccountantError::Unreachable`] when even [`MAX_NOISE_MULTIPLIER`] does
/// not meet the target.
pub fn noise_multiplier_for_epsilon(
    target_epsilon: f64,
    sample_rate: f64,
    steps: u64,
    delta: f64,
) -> Result<f64, AccountantError> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(AccountantError::TargetEpsilon(target_epsilon));
    }
    check_sample_rate(sample_rate)?;
    check_delta(delta)?;
    if sample_rate == 0.0 || steps == 0 {
        return Ok(0.0);
    }
    let epsilon_at = |sigma: f64| dpsgd_epsilon(sample_rate, sigma, steps, delta).map(|e| e.epsilon);

    // Bracket: ε(σ) is non-increasing in σ and infinite at σ = 0.
    let mut low = 0.0;
    let mut high = 1.0;
    loop {
        let epsilon = epsilon_at(high)?;
        if epsilon <= target_epsilon {
            break;
        }
        if high >= MAX_NOISE_MULTIPLIER {
            return Err(AccountantError::Unreachable { target_epsilon, noise_multiplier: high, epsilon });
        }
        low = high;
        high = (high * 2.0).min(MAX_NOISE_MULTIPLIER);
    }
    while high - low > BISECTION_RELATIVE_TOLERANCE * high {
        let mid = 0.5 * (low + high);
        if epsilon_at(mid)? <= target_epsilon {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(high)
}

fn check_sample_rate(sample_rate: f64) -> Result<(), AccountantError> {
    if (0.0..=1.0).contains(&sample_rate) { Ok(()) } else { Err(AccountantError::SampleRate(sample_rate)) }
}

fn check_delta(delta: f64) -> Result<(), AccountantError> {
    if (0.0..=1.0).contains(&delta) { Ok(()) } else { Err(AccountantError::Delta(delta)) }
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism at each
/// order (`_compute_rdp_poisson_subsampled_gaussian`).
fn poisson_gaussian_rdp(sample_rate: f64, noise_multiplier: f64, orders: &[f64]) -> Result<Vec<f64>, AccountantError> {
    check_sample_rate(sample_rate)?;
    if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
        return Err(AccountantError::NoiseMultiplier(noise_multiplier));
    }
    let (q, sigma) = (sample_rate, noise_multiplier);
    if q == 0.0 {
        return Ok(vec![0.0; orders.len()]);
    }
    if sigma == 0.0 {
        return Ok(vec![f64::INFINITY; orders.len()]);
    }
    if q == 1.0 {
        return Ok(orders.iter().map(|&a| a / (2.0 * sigma * sigma)).collect());
    }
    Ok(orders
        .iter()
        .map(|&alpha| {
            let log_a = match integer_order(alpha) {
                Some(n) => log_a_int(q, sigma, n),
                None => log_a_frac(q, sigma, alpha),
            };
            log_a / (alpha - 1.0)
        })
        .collect())
}

/// `Some(n)` when the order is the integer `n` (Python's
/// `float(alpha).is_integer()`).
fn integer_order(alpha: f64) -> Option<usize> {
    // Orders are validated to lie in (1, MAX_ORDER], so the cast is exact.
    (alpha.fract() == 0.0).then_some(alpha as usize)
}

/// Largest k whose `ln k!` is kept in [`log_factorial`]'s table: the largest
/// default order.
const LOG_FACTORIAL_TABLE_MAX: usize = 1024;

/// `ln k! = ln Γ(k + 1)`, from a table built once per process for the
/// default orders.
fn log_factorial(k: usize) -> f64 {
    static TABLE: OnceLock<Vec<f64>> = OnceLock::new();
    let table =
        TABLE.get_or_init(|| (0..=LOG_FACTORIAL_TABLE_MAX).map(|k| special::ln_gamma(k as f64 + 1.0)).collect());
    match table.get(k) {
        Some(&value) => value,
        None => special::ln_gamma(k as f64 + 1.0),
    }
}

/// `ln(exp(x) + exp(y))` (dp_accounting's `_log_add`).
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY || b == f64::INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// `ln A_α` for integer α and 0 < q < 1 (`_compute_log_a_int`).
///
/// dp_accounting adds the α + 1 terms one by one in log space; summing them
/// as `max + ln Σ exp(s_i − max)` gives the same value to rounding and needs
/// one exponential per term instead of an exponential and a logarithm.
fn log_a_int(q: f64, sigma: f64, alpha: usize) -> f64 {
    let log_alpha_factorial = log_factorial(alpha);
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_sigma_sq = 2.0 * sigma * sigma;
    let term = |i: usize| {
        let fi = i as f64;
        // ln C(α, i), as dp_accounting's `_log_comb`.
        let log_comb = log_alpha_factorial - log_factorial(i) - log_factorial(alpha - i);
        let log_coef = log_comb + fi * log_q + (alpha - i) as f64 * log_1mq;
        log_coef + (fi * fi - fi) / two_sigma_sq
    };
    let max = (0..=alpha).map(term).fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = (0..=alpha).map(|i| (term(i) - max).exp()).sum();
    max + sum.ln()
}

/// `ln A_α` for fractional α and 0 < q < 1 (`_compute_log_a_frac`), or ∞
/// when the series has not converged after [`MAX_FRAC_TERMS`] terms, which
/// excludes the order from the minimum.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let mut log_a0 = f64::NEG_INFINITY;
    let mut log_a1 = f64::NEG_INFINITY;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let log_half = 0.5_f64.ln();
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    let two_sigma_sq = 2.0 * sigma * sigma;

    let mut last_s0 = f64::NEG_INFINITY;
    let mut last_s1 = f64::NEG_INFINITY;
    // ln|C(α, i)|, updated by the ratio C(α, i + 1)/C(α, i) = (α − i)/(i + 1).
    // dp_accounting evaluates the same quantity through `gammaln`, i.e. the
    // log of the absolute value for i > α + 1, and adds the term regardless
    // of its sign. The recurrence agrees with ln|Γ| to a few ulps near the
    // dominant terms and costs one logarithm instead of three ln Γ.
    let mut log_coef = 0.0;
    for step in 0..MAX_FRAC_TERMS {
        let i = f64::from(step);
        if step > 0 {
            log_coef += ((alpha - i + 1.0).abs() / i).ln();
        }
        let j = alpha - i;

        let log_t0 = log_coef + i * log_q + j * log_1mq;
        let log_t1 = log_coef + j * log_q + i * log_1mq;

        let log_e0 = log_half + special::log_erfc((i - z0) / sqrt2_sigma);
        let log_e1 = log_half + special::log_erfc((z0 - j) / sqrt2_sigma);

        let log_s0 = log_t0 + (i * i - i) / two_sigma_sq + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_sigma_sq + log_e1;

        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);

        // Stop once both terms decrease and are negligible against the total.
        if log_s0 < last_s0 && log_s1 < last_s1 {
            let total = log_add(log_a0, log_a1);
            if log_s0.max(log_s1) < total - 30.0 {
                return total;
            }
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// dp_accounting's `compute_epsilon` (improved conversion).
fn improved_epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> Result<EpsilonAtDelta, AccountantError> {
    check_delta(delta)?;
    if delta == 0.0 {
        let epsilon = if rdp.iter().all(|&r| r == 0.0) { 0.0 } else { f64::INFINITY };
        return Ok(EpsilonAtDelta { epsilon, order: 0.0 });
    }
    let candidates = orders.iter().zip(rdp).map(|(&a, &r)| {
        let epsilon = if r < 0.0 {
            // Only reachable through numerical error; dp_accounting returns 0.
            0.0
        } else if delta * delta + (-r).exp_m1() > 0.0 {
            // The KL bound δ <= sqrt(1 − exp(−KL)) already holds.
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            // The bound is numerically unstable as α → 1.
            f64::INFINITY
        };
        (epsilon, a)
    });
    let (epsilon, order) = first_minimum(candidates);
    Ok(EpsilonAtDelta { epsilon: epsilon.max(0.0), order })
}

/// TF Privacy's old `_compute_eps`: `ε = rdp − ln(δ)/(α − 1)`, minimised.
fn legacy_epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> Result<EpsilonAtDelta, AccountantError> {
    if !(delta > 0.0 && delta <= 1.0) {
        return Err(AccountantError::LegacyDelta(delta));
    }
    let log_delta = delta.ln();
    let candidates =
        orders.iter().zip(rdp).map(|(&a, &r)| (r - log_delta / (a - 1.0), a)).filter(|(epsilon, _)| !epsilon.is_nan());
    let (epsilon, order) = first_minimum(candidates);
    Ok(EpsilonAtDelta { epsilon, order })
}

/// The first (ε, α) with the smallest ε, like `np.argmin`; (∞, first α)
/// when every ε is infinite, (∞, 0) when there is no candidate.
fn first_minimum(mut candidates: impl Iterator<Item = (f64, f64)>) -> (f64, f64) {
    let Some(mut best) = candidates.next() else {
        return (f64::INFINITY, 0.0);
    };
    for candidate in candidates {
        if candidate.0 < best.0 {
            best = candidate;
        }
    }
    best
}
