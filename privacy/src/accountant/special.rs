//! The special functions the accountants need.
//!
//! dp_accounting evaluates the subsampled-Gaussian RDP through
//! `scipy.special.gammaln` and `scipy.special.log_ndtr`; Rust's standard
//! library has neither on stable. `ln|Γ(x)|` is `libm`'s `lgamma` (a pure
//! Rust port of musl's). [`erfc`] and [`erfcx`] (the scaled
//! `exp(x²)·erfc(x)`) are W. J. Cody's rational Chebyshev approximations
//! ("Rational Chebyshev approximations for the error function", Math. Comp.
//! 23, 1969; the `CALERF` routine of SPECFUN, ACM TOMS 715), relative error
//! about 1e-16, kept here rather than taken from `libm` and `puruspe`: the
//! PLD accountant evaluates erfc at every grid point, and with those crates
//! (whose `erfc` runs on a software `exp`) both accountants were measurably
//! slower (`docs/perf-log.md`, "Accountants"). [`log_erfc`] combines them so
//! that `ln(erfc(x))` does not underflow for large `x`. The tests hold each
//! to mpmath's values.

// Cody's coefficients are kept as published, with more digits than an f64.
#![allow(clippy::excessive_precision)]

#[cfg(test)]
mod tests;

/// 1/sqrt(pi).
const FRAC_1_SQRT_PI: f64 = 0.564_189_583_547_756_3;

/// Below this |x|, erf is evaluated directly and erfc = 1 - erf.
const THRESH: f64 = 0.468_75;

// Cody's coefficients, digit for digit as published in CALERF (18
// significant digits, more than an f64 holds; the compiler rounds them).

/// Cody's coefficients for erf on |x| <= 0.46875.
const A: [f64; 5] = [
    3.16112374387056560e00,
    1.13864154151050156e02,
    3.77485237685302021e02,
    3.20937758913846947e03,
    1.85777706184603153e-1,
];
const B: [f64; 4] = [2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03, 2.84423683343917062e03];

/// Cody's coefficients for erfcx on 0.46875 < x <= 4.
const C: [f64; 9] = [
    5.64188496988670089e-1,
    8.88314979438837594e00,
    6.61191906371416295e01,
    2.98635138197400131e02,
    8.81952221241769090e02,
    1.71204761263407058e03,
    2.05107837782607147e03,
    1.23033935479799725e03,
    2.15311535474403846e-8,
];
const D: [f64; 8] = [
    1.57449261107098347e01,
    1.17693950891312499e02,
    5.37181101862009858e02,
    1.62138957456669019e03,
    3.29079923573345963e03,
    4.36261909014324716e03,
    3.43936767414372164e03,
    1.23033935480374942e03,
];

/// Cody's coefficients for erfcx on x > 4.
const P: [f64; 6] = [
    3.05326634961232344e-1,
    3.60344899949804439e-1,
    1.25781726111229246e-1,
    1.60837851487422766e-2,
    6.58749161529837803e-4,
    1.63153871373020978e-2,
];
const Q: [f64; 5] = [
    2.56852019228982242e00,
    1.87295284992346725e00,
    5.27905102951428412e-1,
    6.05183413124413191e-2,
    2.33520497626869185e-3,
];

/// erf(x) for |x| <= 0.46875.
fn erf_small(x: f64) -> f64 {
    let ysq = x * x;
    let mut xnum = A[4] * ysq;
    let mut xden = ysq;
    for i in 0..3 {
        xnum = (xnum + A[i]) * ysq;
        xden = (xden + B[i]) * ysq;
    }
    x * (xnum + A[3]) / (xden + B[3])
}

/// exp(y²)·erfc(y) for y > 0.46875.
fn erfcx_large(y: f64) -> f64 {
    if y <= 4.0 {
        let mut xnum = C[8] * y;
        let mut xden = y;
        for i in 0..7 {
            xnum = (xnum + C[i]) * y;
            xden = (xden + D[i]) * y;
        }
        (xnum + C[7]) / (xden + D[7])
    } else {
        // For y above ~1e154, y*y overflows and ysq becomes 0: the
        // asymptotic value 1/(y sqrt(pi)) is then exact to double precision.
        let ysq = 1.0 / (y * y);
        let mut xnum = P[5] * ysq;
        let mut xden = ysq;
        for i in 0..4 {
            xnum = (xnum + P[i]) * ysq;
            xden = (xden + Q[i]) * ysq;
        }
        let r = ysq * (xnum + P[4]) / (xden + Q[4]);
        (FRAC_1_SQRT_PI - r) / y
    }
}

/// exp(-y²), computed as Cody does: y is split into a part with few
/// significant bits (so its square is exact) and a small remainder, which
/// avoids the relative error that rounding y² would cause for large y.
fn exp_neg_square(y: f64) -> f64 {
    let ysq = (y * 16.0).trunc() / 16.0;
    let del = (y - ysq) * (y + ysq);
    (-ysq * ysq).exp() * (-del).exp()
}

/// The complementary error function, erfc(x) = 1 - erf(x).
pub(crate) fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let y = x.abs();
    if y <= THRESH {
        return 1.0 - erf_small(x);
    }
    // Beyond y ~ 27.3 the exponential underflows and erfc(y) is 0.
    let upper = if y == f64::INFINITY { 0.0 } else { exp_neg_square(y) * erfcx_large(y) };
    if x < 0.0 { 2.0 - upper } else { upper }
}

/// The scaled complementary error function, exp(x²)·erfc(x), for x >= 0.
///
/// Only the non-negative half line is needed (for [`log_erfc`]); negative
/// arguments would overflow for large |x| anyway.
pub(crate) fn erfcx(x: f64) -> f64 {
    debug_assert!(x >= 0.0 || x.is_nan());
    if x <= THRESH { (x * x).exp() * (1.0 - erf_small(x)) } else { erfcx_large(x) }
}

/// ln(erfc(x)), accurate in relative terms for all x, including large x
/// where erfc(x) underflows.
///
/// Equals dp_accounting's `_log_erfc(x) = ln 2 + scipy.special.log_ndtr(-x·√2)`.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= THRESH {
        // erfc(x) lies in [0.5, 2): no cancellation, no underflow.
        erfc(x).ln()
    } else if x == f64::INFINITY {
        f64::NEG_INFINITY
    } else {
        erfcx(x).ln() - x * x
    }
}

/// ln|Γ(x)| for real x; +inf at the poles (0, -1, -2, ...).
///
/// Like `scipy.special.gammaln`, it returns the logarithm of the absolute
/// value, so it is finite at negative non-integers.
pub(crate) fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}
