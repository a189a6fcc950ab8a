//! Privacy-loss-distribution (PLD) accounting for DP-SGD: a tighter ε than
//! Rényi DP for the same run, as Google's dp_accounting 0.6 `PLDAccountant`
//! computes it.
//!
//! RDP bounds the privacy loss through its Rényi moments and gives away
//! 8–12 % of ε on long DP-SGD runs (more on short ones) in the conversion to
//! (ε, δ); the PLD keeps the whole distribution of the privacy loss on a
//! grid, composes it exactly (up to discretization) by convolution, and
//! reads δ(ε) off it. This module reproduces dp_accounting's
//! `PLDAccountant(ADD_OR_REMOVE_ONE, value_discretization_interval)` for
//! `PoissonSampledDpEvent(q, GaussianDpEvent(σ))`, to about 1e-8 relative
//! on the fixture's ε:
//!
//! - Both directions of add/remove-one adjacency are tracked: "remove",
//!   `P = (1 − q)·N(0, σ²) + q·N(1, σ²)` against `Q = N(0, σ²)`, and "add",
//!   the same pair swapped (identical when `q = 1`; otherwise built and
//!   composed on two threads, as they are independent). Their hockey-stick divergences reduce to the
//!   Gaussian one, `δ_G(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2)` with
//!   `μ = 1/σ`: `δ_remove(ε) = q·δ_G(ln(1 + (e^ε − 1)/q))` (or `1 − e^ε`
//!   below `ln(1 − q)`), and `δ_add(ε) = c·δ_G(ε + ln q − ln c)` with
//!   `c = 1 − (1 − q)·e^ε` (or 0 when `c <= 0`). Where the Gaussian's ε is
//!   negative, the complement `δ − (1 − e^ε)`, which is `e^ε·δ_G(−ε)` for a
//!   Gaussian, is computed instead: it is tiny where δ is close to
//!   `1 − e^ε`, and the masses below are differences of it.
//! - One step is discretized by dp_accounting's default "connect the dots"
//!   method (Doroshenko et al., "Connect the Dots: Tighter Discrete
//!   Approximations of Privacy Loss Distributions", PETS 2022): δ(ε) is
//!   evaluated exactly at every multiple of the interval `h` between the
//!   losses at the points where either Gaussian has tail mass
//!   `½·e^(−50)` (dp_accounting's `log_mass_truncation_bound = −50`), and the
//!   mass function on that grid is the one whose δ(ε) interpolates those
//!   values linearly in `e^ε`. As δ is convex in `e^ε`, this is pessimistic
//!   (never below the true δ), and far tighter than rounding each loss up,
//!   whose bias would grow as `T·h/2` over `T` steps.
//! - `T` identical steps are composed by one real FFT, a pointwise `T`-th
//!   power and one inverse FFT over a window of the composed support chosen
//!   by Chernoff bounds so that at most 5e-16 of mass lies beyond either end
//!   (dp_accounting's `self_convolve` with `tail_mass_truncation = 1e-15`);
//!   that bound is added to the infinity mass, which keeps the result
//!   pessimistic. Heterogeneous runs compose by calling
//!   [`PldAccountant::compose_poisson_gaussian`] once per run, which
//!   convolves the new distribution into the accumulated one.
//! - After every composition, the tails holding less than 5e-16 of mass
//!   each are cut: the lower tail's mass moves to the lowest kept loss, the
//!   upper tail's to the infinity mass (dp_accounting's `_truncate_tails`).
//!   This also drops the FFT's rounding noise and keeps memory proportional
//!   to the width of the distribution, not to `T`.
//! - ε(δ) is dp_accounting's `get_epsilon_for_delta`: the exact inverse of
//!   the piecewise `δ(ε) = Σ_{ℓ > ε} p(ℓ)·(1 − e^(ε − ℓ)) + p(∞)`, and the
//!   larger of the two directions (likewise for δ(ε)).
//!
//! The grid costs time and memory in proportion to the width of the loss
//! distribution over `h`; a distribution that would need more than
//! [`MAX_PLD_POINTS`] points (tiny σ, or very long runs at a fine
//! interval) is refused with [`AccountantError::PldTooLarge`] rather than
//! allowed to exhaust memory.

use super::special::{erfc, log_erfc};
use super::{AccountantError, check_delta, check_sample_rate};

mod fft;
#[cfg(test)]
mod tests;

use fft::RealFft;

/// dp_accounting's default `value_discretization_interval`.
pub const DEFAULT_DISCRETIZATION: f64 = 1e-4;

/// The most grid points a privacy loss distribution, or the FFT composing
/// one, may have (2²³, at which the FFT holds 64 MiB of data and as much of
/// twiddle factors).
pub const MAX_PLD_POINTS: usize = 1 << 23;

/// dp_accounting's `log_mass_truncation_bound`: each Gaussian contributes
/// at most `½·e^(−50)` of mass beyond each end of the single-step grid.
const LOG_MASS_TRUNCATION_BOUND: f64 = -50.0;

/// Mass allowed beyond each end of a composed distribution: half of
/// dp_accounting's `tail_mass_truncation = 1e-15`.
const TAIL_MASS_PER_SIDE: f64 = 0.5e-15;

/// Golden-section iterations when optimising a Chernoff bound's order:
/// they narrow `ln t` from a range of 12 to 0.02, which leaves the bound
/// within a fraction of a percent of its optimum.
const CHERNOFF_ITERATIONS: usize = 13;

/// A privacy loss distribution on the grid `h·ℤ`: mass `probs[i]` at loss
/// `(lower + i)·h`, and `infinity_mass` at +∞.
#[derive(Debug, Clone, PartialEq)]
struct LossPmf {
    /// Grid index of `probs[0]`.
    lower: i64,
    /// Non-negative masses; never empty.
    probs: Vec<f64>,
    /// Mass at an infinite loss (δ is at least this at every ε).
    infinity_mass: f64,
}

/// Which neighbour is the "upper" distribution of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// `(1 − q)·N(0, σ²) + q·N(1, σ²)` against `N(0, σ²)`.
    Remove,
    /// `N(0, σ²)` against `(1 − q)·N(0, σ²) + q·N(1, σ²)`.
    Add,
}

/// The parameters of one call, named in [`AccountantError::PldTooLarge`].
#[derive(Debug, Clone, Copy)]
struct Run {
    sample_rate: f64,
    noise_multiplier: f64,
    steps: u64,
    discretization: f64,
}

impl Run {
    fn too_large(self, points: f64) -> AccountantError {
        AccountantError::PldTooLarge {
            sample_rate: self.sample_rate,
            noise_multiplier: self.noise_multiplier,
            steps: self.steps,
            discretization: self.discretization,
            points,
            max: MAX_PLD_POINTS,
        }
    }
}

impl LossPmf {
    /// No privacy loss at all: mass 1 at loss 0.
    fn identity() -> Self {
        Self { lower: 0, probs: vec![1.0], infinity_mass: 0.0 }
    }

    /// A mechanism without privacy: all mass at +∞.
    fn non_private() -> Self {
        Self { lower: 0, probs: vec![0.0], infinity_mass: 1.0 }
    }

    fn is_identity(&self) -> bool {
        *self == Self::identity()
    }

    /// The connect-the-dots distribution of one step in `direction`.
    fn poisson_gaussian(direction: Direction, run: Run) -> Result<Self, AccountantError> {
        let Run { sample_rate: q, noise_multiplier: sigma, discretization: h, .. } = run;
        let z = standard_normal_tail_quantile(LOG_MASS_TRUNCATION_BOUND);
        // Beyond these, each of N(0, σ²) and N(1, σ²) has mass ½·e^(−50).
        let (x_low, x_high) = (-sigma * z, 1.0 + sigma * z);
        let (loss_low, loss_high) = match direction {
            Direction::Remove => (remove_loss(q, sigma, x_low), remove_loss(q, sigma, x_high)),
            Direction::Add => (-remove_loss(q, sigma, x_high), -remove_loss(q, sigma, x_low)),
        };
        let k_low = (loss_low / h).floor();
        let k_high = (loss_high / h).ceil();
        let points = k_high - k_low + 1.0;
        if !(points.is_finite() && points <= MAX_PLD_POINTS as f64) {
            return Err(run.too_large(points));
        }
        // Exact: both are integers of magnitude below 2^53.
        let (k_low, count) = (k_low as i64, points as usize);
        let mu = 1.0 / sigma;
        let deltas: Vec<GridDelta> = (0..count)
            .map(|i| {
                let epsilon = (k_low + i as i64) as f64 * h;
                match direction {
                    Direction::Remove => remove_delta(q, mu, epsilon),
                    Direction::Add => add_delta(q, mu, epsilon),
                }
            })
            .collect();
        Ok(Self::connect_the_dots(k_low, &deltas, h))
    }

    /// The distribution on the grid `(k_low + i)·h` whose δ(ε) equals
    /// `deltas[i]` at every grid point and is linear in `e^ε` in between.
    ///
    /// Its δ curve has a kink of slope `p_i·e^(−ε_i)` at each `e^(ε_i)`, so
    /// `p_i = e^(ε_i)·(s_i − s_(i−1))` with `s_i` the slope between grid
    /// points `i` and `i + 1` (zero beyond the last, where δ equals the
    /// infinity mass); the lowest point takes the remaining mass, which also
    /// makes δ = 1 − e^ε below the grid.
    ///
    /// The part `1 − e^ε` of δ contributes exactly nothing to an interior
    /// `p_i`, so each is computed from whichever form of δ the middle point
    /// holds accurately: second differences of O(1) values would leave
    /// rounding noise of 1e-16/h = 1e-12 on each of tens of thousands of
    /// points where the true mass is far smaller.
    fn connect_the_dots(k_low: i64, deltas: &[GridDelta], h: f64) -> Self {
        let last = deltas.len() - 1;
        let epsilon = |i: usize| (k_low + i as i64) as f64 * h;
        let infinity_mass = deltas[last].delta(epsilon(last));
        let up = 1.0 / h.exp_m1();
        let down = 1.0 / -(-h).exp_m1();
        let mut probs = vec![0.0; deltas.len()];
        for i in 1..=last {
            let (previous, middle, next) = if i == last {
                // Slope zero beyond the grid holds for δ only.
                let middle = deltas[i].delta(epsilon(i));
                (deltas[i - 1].delta(epsilon(i - 1)), middle, middle)
            } else {
                let form = deltas[i];
                (
                    form.same_form(deltas[i - 1], epsilon(i - 1)),
                    form.value(),
                    form.same_form(deltas[i + 1], epsilon(i + 1)),
                )
            };
            let p = (next - middle) * up - (middle - previous) * down;
            // Negative only through rounding, where δ is flat.
            probs[i] = p.max(0.0);
        }
        let rest: f64 = probs[1..].iter().sum();
        probs[0] = (1.0 - rest - infinity_mass).max(0.0);
        let mut pmf = Self { lower: k_low, probs, infinity_mass };
        pmf.trim_zeros();
        pmf
    }

    /// Drops zero masses at both ends, keeping at least one entry.
    fn trim_zeros(&mut self) {
        let Some(first) = self.probs.iter().position(|&p| p > 0.0) else {
            self.probs.truncate(1);
            return;
        };
        let last = self.probs.iter().rposition(|&p| p > 0.0).unwrap_or(first);
        self.probs.truncate(last + 1);
        self.probs.drain(..first);
        self.lower += first as i64;
    }

    /// Clamps rounding noise to zero and cuts each tail holding at most
    /// [`TAIL_MASS_PER_SIDE`]: the lower tail's mass moves to the lowest
    /// kept loss, the upper tail's to the infinity mass (both pessimistic).
    fn truncate_tails(&mut self) {
        for p in &mut self.probs {
            *p = p.max(0.0);
        }
        let n = self.probs.len();
        let mut low_mass = 0.0;
        let mut first = 0;
        while first + 1 < n && low_mass + self.probs[first] <= TAIL_MASS_PER_SIDE {
            low_mass += self.probs[first];
            first += 1;
        }
        let mut high_mass = 0.0;
        let mut last = n - 1;
        while last > first && high_mass + self.probs[last] <= TAIL_MASS_PER_SIDE {
            high_mass += self.probs[last];
            last -= 1;
        }
        self.probs.truncate(last + 1);
        self.probs.drain(..first);
        self.probs[0] += low_mass;
        self.lower += first as i64;
        self.infinity_mass = (self.infinity_mass + high_mass).min(1.0);
        self.trim_zeros();
    }

    /// `times` independent copies composed (`times >= 1`).
    fn self_compose(&self, times: u64, run: Run) -> Result<Self, AccountantError> {
        if times == 1 {
            return Ok(self.clone());
        }
        let last = (self.probs.len() - 1) as u128;
        let full_last = u128::from(times) * last;
        let (start, end) = chernoff_window(&self.probs, times);
        let window = end - start + 1;
        if window > MAX_PLD_POINTS as u128 {
            return Err(run.too_large(window as f64));
        }
        // At most MAX_PLD_POINTS: fits a usize, and so does its power of two.
        let window = window as usize;
        let fft_len = fft::transform_len(window).ok_or_else(|| run.too_large(window as f64))?;
        let fft = RealFft::new(fft_len);
        let probs = fft::self_convolve_window(&fft, &self.probs, times, start, window);
        let lower = i128::from(times) * i128::from(self.lower) + start as i128;
        let lower = i64::try_from(lower).map_err(|_| run.too_large(f64::INFINITY))?;
        // 1 − (1 − p∞)^T without cancellation.
        let mut infinity_mass = -(times as f64 * (-self.infinity_mass).ln_1p()).exp_m1();
        if end < full_last {
            // Mass beyond the window (at most this much) is lost or folded
            // down into it by the cyclic transform; count it as infinite.
            infinity_mass += TAIL_MASS_PER_SIDE;
        }
        let mut pmf = Self { lower, probs, infinity_mass: infinity_mass.min(1.0) };
        pmf.truncate_tails();
        Ok(pmf)
    }

    /// The composition of `self` and `other`.
    fn compose(&self, other: &Self, run: Run) -> Result<Self, AccountantError> {
        if self.is_identity() {
            return Ok(other.clone());
        }
        if other.is_identity() {
            return Ok(self.clone());
        }
        if self.infinity_mass >= 1.0 || other.infinity_mass >= 1.0 {
            return Ok(Self::non_private());
        }
        let len = self.probs.len() + other.probs.len() - 1;
        if len > MAX_PLD_POINTS {
            return Err(run.too_large(len as f64));
        }
        let fft_len = fft::transform_len(len).ok_or_else(|| run.too_large(len as f64))?;
        let fft = RealFft::new(fft_len);
        let probs = fft::convolve(&fft, &self.probs, &other.probs);
        let lower = self.lower.checked_add(other.lower).ok_or_else(|| run.too_large(f64::INFINITY))?;
        let (a, b) = (self.infinity_mass, other.infinity_mass);
        let mut pmf = Self { lower, probs, infinity_mass: (a + b - a * b).min(1.0) };
        pmf.truncate_tails();
        Ok(pmf)
    }

    /// The loss at `probs[i]`.
    fn loss(&self, i: usize, h: f64) -> f64 {
        (self.lower + i as i64) as f64 * h
    }

    /// dp_accounting's `_get_epsilon_for_delta`: the smallest ε with
    /// δ(ε) <= `delta`, found by walking down from the largest loss.
    fn epsilon(&self, delta: f64, h: f64) -> f64 {
        if self.infinity_mass > delta {
            return f64::INFINITY;
        }
        // δ(ε) = mass_upper − e^ε·mass_lower on the current segment.
        let mut mass_upper = self.infinity_mass;
        let mut mass_lower = 0.0;
        for i in (0..self.probs.len()).rev() {
            let loss = self.loss(i, h);
            let p = self.probs[i];
            let exp_neg_loss = (-loss).exp();
            // ln((mass_upper − δ)/mass_lower) >= loss: ε is on this segment.
            if mass_upper > delta && mass_lower > 0.0 && (mass_upper - delta) * exp_neg_loss >= mass_lower {
                break;
            }
            mass_upper += p;
            mass_lower += exp_neg_loss * p;
            if mass_upper >= delta && mass_lower == 0.0 {
                // Only when e^(−loss) underflows.
                return loss.max(0.0);
            }
        }
        if mass_upper <= mass_lower + delta {
            return 0.0;
        }
        ((mass_upper - delta) / mass_lower).ln()
    }

    /// `δ(ε) = Σ_{ℓ > ε} p(ℓ)·(1 − e^(ε − ℓ)) + p(∞)`.
    fn delta(&self, epsilon: f64, h: f64) -> f64 {
        let mut delta = self.infinity_mass;
        for i in (0..self.probs.len()).rev() {
            let loss = self.loss(i, h);
            if loss <= epsilon {
                break;
            }
            delta += self.probs[i] * -(epsilon - loss).exp_m1();
        }
        delta.min(1.0)
    }
}

/// The Chernoff window `[start, end]` of grid offsets (from `times` times
/// the lowest index) outside which the `times`-fold composition of `probs`
/// has at most [`TAIL_MASS_PER_SIDE`] of mass on each side.
///
/// For an order `t > 0`, `P(S >= b) <= exp(T·K(t) − t·b)` with `K` the
/// cumulant generating function of one step, so `b = (T·K(t) + ln(1/τ))/t`
/// bounds the upper tail; it is unimodal in `t`, so a golden-section search
/// over `ln t` finds the best order, around the one that is optimal for a
/// Gaussian of the same variance. Likewise for the lower tail with `t < 0`.
/// `probs` must have positive first and last entries.
fn chernoff_window(probs: &[f64], times: u64) -> (u128, u128) {
    let last = probs.len() - 1;
    let full_last = u128::from(times) * last as u128;
    if last == 0 {
        return (0, 0);
    }
    let count = times as f64;
    let log_inv_tail = -TAIL_MASS_PER_SIDE.ln();
    let gaussian_order = {
        let mass: f64 = probs.iter().sum();
        let mean = probs.iter().enumerate().map(|(j, p)| j as f64 * p).sum::<f64>() / mass;
        let variance = probs.iter().enumerate().map(|(j, p)| (j as f64 - mean).powi(2) * p).sum::<f64>() / mass;
        // At least one grid step of spread, so that the order is finite.
        (2.0 * log_inv_tail / (count * variance.max(1.0))).sqrt()
    };
    // For t > 0, relative to the top: K(t) = t·last + ln Σ p_j e^(−t·(last − j)),
    // so b_upper = T·last + excess(t).
    let reversed: Vec<f64> = probs.iter().rev().copied().collect();
    let excess =
        minimise_over_log_order(gaussian_order, |t| (count * discounted_sum(&reversed, t).ln() + log_inv_tail) / t);
    // For t = −u < 0: K(−u) = ln Σ p_j e^(−u·j), and b_lower = −(T·K + c)/u.
    let lower =
        -minimise_over_log_order(gaussian_order, |u| (count * discounted_sum(probs, u).ln() + log_inv_tail) / u);
    let end = if excess < 0.0 { full_last.saturating_sub(float_to_u128((-excess).floor())) } else { full_last };
    let start = if lower > 0.0 { float_to_u128(lower.floor()).min(end) } else { 0 };
    (start, end)
}

/// `Σ p_j·e^(−t·j)`, stopping once the weights underflow; four
/// interleaved sums, so that the loop is not bound by the latency of one
/// chain of multiplications.
fn discounted_sum(probs: &[f64], t: f64) -> f64 {
    let ratio = (-t).exp();
    let step = ratio.powi(4);
    let mut weights = [1.0, ratio, ratio * ratio, ratio * ratio * ratio];
    let mut sums = [0.0; 4];
    let mut chunks = probs.chunks_exact(4);
    for chunk in &mut chunks {
        for lane in 0..4 {
            sums[lane] += chunk[lane] * weights[lane];
            weights[lane] *= step;
        }
        if weights[0] == 0.0 {
            return sums.iter().sum();
        }
    }
    for (p, weight) in chunks.remainder().iter().zip(weights) {
        sums[0] += p * weight;
    }
    sums.iter().sum()
}

/// The smallest value of a unimodal `f` over orders `t` (per grid step)
/// from `e^−8` to `e^4` times `guess`, by golden-section search over
/// `ln t`.
fn minimise_over_log_order(guess: f64, f: impl Fn(f64) -> f64) -> f64 {
    let ratio = (5.0_f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (guess.ln() - 8.0, guess.ln() + 4.0);
    let mut c = b - ratio * (b - a);
    let mut d = a + ratio * (b - a);
    let (mut fc, mut fd) = (f(c.exp()), f(d.exp()));
    let mut best = fc.min(fd);
    for _ in 0..CHERNOFF_ITERATIONS {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - ratio * (b - a);
            fc = f(c.exp());
            best = best.min(fc);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + ratio * (b - a);
            fd = f(d.exp());
            best = best.min(fd);
        }
    }
    // NaN only if every evaluation was NaN; then no bound is known.
    if best.is_nan() { f64::INFINITY } else { best }
}

/// A non-negative integral float as u128, saturating.
fn float_to_u128(x: f64) -> u128 {
    // `as` saturates, and maps NaN to 0.
    x as u128
}

/// The z with `Φ(−z) = ½·e^(log_mass)`: solves `ln erfc(z/√2) = log_mass`
/// by bisection (`ln erfc` is decreasing).
fn standard_normal_tail_quantile(log_mass: f64) -> f64 {
    let (mut low, mut high) = (0.0_f64, 40.0_f64);
    for _ in 0..100 {
        let mid = 0.5 * (low + high);
        if log_erfc(mid / std::f64::consts::SQRT_2) > log_mass {
            low = mid;
        } else {
            high = mid;
        }
    }
    high
}

/// The remove-direction privacy loss at `x`,
/// `ln(1 − q + q·e^((2x − 1)/(2σ²)))`, without overflow.
fn remove_loss(q: f64, sigma: f64, x: f64) -> f64 {
    let a = (2.0 * x - 1.0) / (2.0 * sigma * sigma);
    if a <= 0.0 { (q * a.exp_m1()).ln_1p() } else { a + (q + (1.0 - q) * (-a).exp()).ln() }
}

/// `Φ(−x)` for the standard normal.
fn normal_upper_tail(x: f64) -> f64 {
    0.5 * erfc(x / std::f64::consts::SQRT_2)
}

/// `ln Φ(−x)`, without underflow.
fn log_normal_upper_tail(x: f64) -> f64 {
    (-std::f64::consts::LN_2) + log_erfc(x / std::f64::consts::SQRT_2)
}

/// δ(ε) at one point, in whichever of two forms is accurate there.
#[derive(Debug, Clone, Copy, PartialEq)]
enum GridDelta {
    /// δ(ε) itself: accurate in relative terms where it is small.
    Direct(f64),
    /// `δ(ε) − (1 − e^ε) = e^ε·Q(L <= ε) − P(L <= ε)`, the hockey stick
    /// the other way round: accurate where δ is close to `1 − e^ε`, at the
    /// lowest losses.
    Complement(f64),
}

impl GridDelta {
    /// δ(ε).
    fn delta(self, epsilon: f64) -> f64 {
        match self {
            Self::Direct(delta) => delta,
            Self::Complement(complement) => complement - epsilon.exp_m1(),
        }
    }

    /// The stored value, in its own form.
    fn value(self) -> f64 {
        match self {
            Self::Direct(value) | Self::Complement(value) => value,
        }
    }

    /// `other` (taken at `epsilon`) in the form of `self`.
    fn same_form(self, other: Self, epsilon: f64) -> f64 {
        match (self, other) {
            (Self::Direct(_), _) => other.delta(epsilon),
            (Self::Complement(_), Self::Complement(value)) => value,
            (Self::Complement(_), Self::Direct(delta)) => delta + epsilon.exp_m1(),
        }
    }
}

/// δ(ε) of the Gaussian mechanism with sensitivity over noise `mu`:
/// `Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2)`, the second term in log space.
fn gaussian_delta(mu: f64, epsilon: f64) -> f64 {
    let u = epsilon / mu + mu / 2.0;
    let delta = normal_upper_tail(u - mu) - (epsilon + log_normal_upper_tail(u)).exp();
    delta.clamp(0.0, 1.0)
}

/// δ(ε) of the Gaussian mechanism in its accurate form, scaled by `scale`:
/// directly for ε >= 0, else as the complement, which for a Gaussian is
/// `e^ε·δ_G(−ε)`.
fn scaled_gaussian_delta(scale: f64, mu: f64, epsilon: f64) -> GridDelta {
    if epsilon >= 0.0 {
        GridDelta::Direct(scale * gaussian_delta(mu, epsilon))
    } else {
        GridDelta::Complement(scale * epsilon.exp() * gaussian_delta(mu, -epsilon))
    }
}

/// δ(ε) of `(1 − q)·N(0, σ²) + q·N(1, σ²)` against `N(0, σ²)`, `μ = 1/σ`.
fn remove_delta(q: f64, mu: f64, epsilon: f64) -> GridDelta {
    let shifted = epsilon.exp_m1() / q;
    if shifted <= -1.0 {
        // Below ln(1 − q) every loss exceeds ε: δ = 1 − e^ε.
        return GridDelta::Complement(0.0);
    }
    // ln(1 + (e^ε − 1)/q), computed for large ε without overflow.
    let gaussian_epsilon =
        if epsilon > 1.0 { epsilon + (-(1.0 - q) * (-epsilon).exp()).ln_1p() - q.ln() } else { shifted.ln_1p() };
    scaled_gaussian_delta(q, mu, gaussian_epsilon)
}

/// δ(ε) of `N(0, σ²)` against `(1 − q)·N(0, σ²) + q·N(1, σ²)`, `μ = 1/σ`.
fn add_delta(q: f64, mu: f64, epsilon: f64) -> GridDelta {
    // c = 1 − (1 − q)·e^ε
    let c = -(epsilon + (-q).ln_1p()).exp_m1();
    if c <= 0.0 {
        // Every loss is below ln(1/(1 − q)) <= ε.
        return GridDelta::Direct(0.0);
    }
    scaled_gaussian_delta(c, mu, epsilon + q.ln() - c.ln())
}

/// A composition of Poisson-subsampled Gaussian mechanisms (DP-SGD runs)
/// under add/remove-one neighbours, tracked as the privacy loss
/// distributions of both directions.
///
/// ```
/// use meridian_privacy::PldAccountant;
///
/// let mut accountant = PldAccountant::new();
/// // Abadi et al. 2016, Sec. 3.1: q = 0.01, σ = 4, 10,000 steps.
/// accountant.compose_poisson_gaussian(0.01, 4.0, 10_000)?;
/// let epsilon = accountant.epsilon(1e-5)?;
/// // dp_accounting's PLDAccountant gives 0.946999; RDP gives 1.035.
/// assert!((epsilon - 0.946999).abs() < 1e-5);
/// assert!((accountant.delta(epsilon)? - 1e-5).abs() < 1e-12);
/// # Ok::<(), meridian_privacy::AccountantError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PldAccountant {
    /// The grid interval `h` of privacy loss values; positive and finite.
    discretization: f64,
    /// Losses of `(1 − q)·N(0, σ²) + q·N(1, σ²)` against `N(0, σ²)`.
    remove: LossPmf,
    /// Losses of `N(0, σ²)` against `(1 − q)·N(0, σ²) + q·N(1, σ²)`.
    add: LossPmf,
}

impl Default for PldAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl PldAccountant {
    /// An empty accountant at dp_accounting's default discretization
    /// interval, [`DEFAULT_DISCRETIZATION`] (1e-4).
    pub fn new() -> Self {
        Self { discretization: DEFAULT_DISCRETIZATION, remove: LossPmf::identity(), add: LossPmf::identity() }
    }

    /// An empty accountant whose privacy loss grid has spacing `interval`,
    /// which must be finite and positive.
    ///
    /// Every interval gives an upper bound on the true ε, up to rounding
    /// (connect the dots and the truncations are pessimistic); it approaches the true ε roughly as the square of
    /// the interval relative to the spread of one step's privacy loss
    /// (at 1e-4, within about 1e-4 relative for σ = 4, q = 0.01). A finer
    /// interval costs time and memory in proportion to its inverse.
    pub fn with_discretization(interval: f64) -> Result<Self, AccountantError> {
        if !(interval.is_finite() && interval > 0.0) {
            return Err(AccountantError::Discretization(interval));
        }
        Ok(Self { discretization: interval, ..Self::new() })
    }

    /// The privacy loss grid spacing.
    pub fn discretization(&self) -> f64 {
        self.discretization
    }

    /// Composes `steps` runs of the Poisson-subsampled Gaussian mechanism
    /// with sampling rate `sample_rate` and noise multiplier
    /// `noise_multiplier` (noise standard deviation over L2 sensitivity).
    ///
    /// May be called any number of times with different parameters; each
    /// call convolves its `steps`-fold composition into the accumulated
    /// distributions. `sample_rate == 0` or `steps == 0` spends nothing;
    /// `noise_multiplier == 0` (with `sample_rate > 0`) is not private, and
    /// makes every later ε infinite. On error the accountant is unchanged.
    pub fn compose_poisson_gaussian(
        &mut self,
        sample_rate: f64,
        noise_multiplier: f64,
        steps: u64,
    ) -> Result<(), AccountantError> {
        check_sample_rate(sample_rate)?;
        if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
            return Err(AccountantError::NoiseMultiplier(noise_multiplier));
        }
        if sample_rate == 0.0 || steps == 0 {
            return Ok(());
        }
        if noise_multiplier == 0.0 {
            self.remove = LossPmf::non_private();
            self.add = LossPmf::non_private();
            return Ok(());
        }
        let run = Run { sample_rate, noise_multiplier, steps, discretization: self.discretization };
        let composed = |direction: Direction, accumulated: &LossPmf| {
            let steps_pmf = LossPmf::poisson_gaussian(direction, run)?.self_compose(steps, run)?;
            accumulated.compose(&steps_pmf, run)
        };
        let (remove, add) = if sample_rate == 1.0 {
            // Without sampling the two directions are mirror images.
            let steps_pmf = LossPmf::poisson_gaussian(Direction::Remove, run)?.self_compose(steps, run)?;
            (self.remove.compose(&steps_pmf, run), self.add.compose(&steps_pmf, run))
        } else {
            // The directions are independent: one on another thread, if the
            // system gives us one.
            std::thread::scope(|scope| {
                let add = std::thread::Builder::new().spawn_scoped(scope, || composed(Direction::Add, &self.add));
                let remove = composed(Direction::Remove, &self.remove);
                let add = match add {
                    Ok(handle) => handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(_) => composed(Direction::Add, &self.add),
                };
                (remove, add)
            })
        };
        self.remove = remove?;
        self.add = add?;
        Ok(())
    }

    /// The smallest ε such that everything composed so far is
    /// (ε, `delta`)-DP according to the discretized distributions: the
    /// larger of the two directions' ε. Infinite when `delta` is below the
    /// mass at infinite loss (e.g. `delta == 0` after any Gaussian step).
    pub fn epsilon(&self, delta: f64) -> Result<f64, AccountantError> {
        check_delta(delta)?;
        let h = self.discretization;
        Ok(self.remove.epsilon(delta, h).max(self.add.epsilon(delta, h)))
    }

    /// The smallest δ such that everything composed so far is
    /// (`epsilon`, δ)-DP according to the discretized distributions: the
    /// larger of the two directions' hockey-stick divergence at `epsilon`.
    pub fn delta(&self, epsilon: f64) -> Result<f64, AccountantError> {
        if epsilon.is_nan() {
            return Err(AccountantError::Epsilon(epsilon));
        }
        let h = self.discretization;
        Ok(self.remove.delta(epsilon, h).max(self.add.delta(epsilon, h)))
    }
}

/// ε at `delta` after `steps` steps of DP-SGD with Poisson sampling rate
/// `sample_rate` and noise multiplier `noise_multiplier`, by a
/// [`PldAccountant`] at the default discretization.
pub fn dpsgd_epsilon_pld(
    sample_rate: f64,
    noise_multiplier: f64,
    steps: u64,
    delta: f64,
) -> Result<f64, AccountantError> {
    check_delta(delta)?;
    let mut accountant = PldAccountant::new();
    accountant.compose_poisson_gaussian(sample_rate, noise_multiplier, steps)?;
    accountant.epsilon(delta)
}
