//! The special functions the RDP accountant needs.
//!
//! dp_accounting evaluates the subsampled-Gaussian RDP through
//! `scipy.special.gammaln` and `scipy.special.log_ndtr`; Rust's standard
//! library has neither on stable. `erfc` and `ln|Γ|` are `libm`'s (a pure
//! Rust port of musl's, so no C library is built), the scaled `erfcx` is
//! `puruspe`'s (a port of libcerf's), and [`log_erfc`] combines them so that
//! `ln(erfc(x))` does not underflow for large `x`. The tests hold each to
//! mpmath's values.

#[cfg(test)]
mod tests;

/// Below this x, erfc(x) lies in [0.5, 2): its logarithm is taken directly.
const DIRECT_LOG_BELOW: f64 = 0.468_75;

/// The complementary error function, erfc(x) = 1 - erf(x).
pub(crate) fn erfc(x: f64) -> f64 {
    libm::erfc(x)
}

/// The scaled complementary error function, exp(x²)·erfc(x).
#[cfg(test)]
fn erfcx(x: f64) -> f64 {
    puruspe::erfcx(x)
}

/// ln(erfc(x)), accurate in relative terms for all x, including large x
/// where erfc(x) underflows.
///
/// Equals dp_accounting's `_log_erfc(x) = ln 2 + scipy.special.log_ndtr(-x·√2)`.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= DIRECT_LOG_BELOW {
        // No cancellation, no underflow.
        erfc(x).ln()
    } else if x == f64::INFINITY {
        f64::NEG_INFINITY
    } else {
        puruspe::erfcx(x).ln() - x * x
    }
}

/// ln|Γ(x)| for real x; +inf at the poles (0, -1, -2, ...).
///
/// Like `scipy.special.gammaln`, it returns the logarithm of the absolute
/// value, so it is finite at negative non-integers.
pub(crate) fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}
