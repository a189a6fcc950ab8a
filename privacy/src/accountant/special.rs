//! Special functions the RDP accountant needs, in pure Rust.
//!
//! dp_accounting evaluates the subsampled-Gaussian RDP through
//! `scipy.special.gammaln` and `scipy.special.log_ndtr`; Rust's standard
//! library has neither on stable, and a C dependency (libm's `erfc`,
//! `lgamma`) would be one more thing to build and audit. This module provides
//! the three functions with double-precision accuracy:
//!
//! - [`erfc`] and [`erfcx`] (the scaled `exp(x²)·erfc(x)`) from W. J. Cody's
//!   rational Chebyshev approximations ("Rational Chebyshev approximations for
//!   the error function", Math. Comp. 23, 1969; the `CALERF` routine of
//!   SPECFUN, ACM TOMS 715), relative error about 1e-16;
//! - [`log_erfc`], `ln(erfc(x))` without underflow for large `x`;
//! - [`ln_gamma`], `ln|Γ(x)|` for every real `x` (including negative
//!   non-integers, as `scipy.special.gammaln` returns), from the Stirling
//!   series after shifting the argument above 15, and the reflection formula
//!   below zero.

use std::f64::consts::PI;

#[cfg(test)]
mod tests;

/// 1/sqrt(pi).
const FRAC_1_SQRT_PI: f64 = 0.564_189_583_547_756_3;

/// Below this |x|, erf is evaluated directly and erfc = 1 - erf.
const THRESH: f64 = 0.468_75;

/// Cody's coefficients for erf on |x| <= 0.46875.
const A: [f64; 5] = [
    3.161_123_743_870_565_6e0,
    1.138_641_541_510_501_6e2,
    3.774_852_376_853_020_2e2,
    3.209_377_589_138_469_5e3,
    1.857_777_061_846_031_5e-1,
];
const B: [f64; 4] = [
    2.360_129_095_234_412e1,
    2.440_246_379_344_441_7e2,
    1.282_616_526_077_372_3e3,
    2.844_236_833_439_170_6e3,
];

/// Cody's coefficients for erfcx on 0.46875 < x <= 4.
const C: [f64; 9] = [
    5.641_884_969_886_701e-1,
    8.883_149_794_388_376e0,
    6.611_919_063_714_163e1,
    2.986_351_381_974_001_3e2,
    8.819_522_212_417_691e2,
    1.712_047_612_634_070_6e3,
    2.051_078_377_826_071_6e3,
    1.230_339_354_797_997_2e3,
    2.153_115_354_744_038_5e-8,
];
const D: [f64; 8] = [
    1.574_492_611_070_983_5e1,
    1.176_939_508_913_125e2,
    5.371_811_018_620_099e2,
    1.621_389_574_566_690_2e3,
    3.290_799_235_733_459_7e3,
    4.362_619_090_143_247e3,
    3.439_367_674_143_721_6e3,
    1.230_339_354_803_749_5e3,
];

/// Cody's coefficients for erfcx on x > 4.
const P: [f64; 6] = [
    3.053_266_349_612_323_4e-1,
    3.603_448_999_498_044_4e-1,
    1.257_817_261_112_292_5e-1,
    1.608_378_514_874_227_7e-2,
    6.587_491_615_298_378e-4,
    1.631_538_713_730_209_8e-2,
];
const Q: [f64; 5] = [
    2.568_520_192_289_822_4e0,
    1.872_952_849_923_467_3e0,
    5.279_051_029_514_284e-1,
    6.051_834_131_244_132e-2,
    2.335_204_976_268_691_8e-3,
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
    let upper = exp_neg_square(y) * erfcx_large(y);
    if x < 0.0 { 2.0 - upper } else { upper }
}

/// The scaled complementary error function, exp(x²)·erfc(x), for x >= 0.
///
/// Only the non-negative half line is needed (for [`log_erfc`]); negative
/// arguments would overflow for large |x| anyway.
pub(crate) fn erfcx(x: f64) -> f64 {
    debug_assert!(x >= 0.0 || x.is_nan());
    if x <= THRESH {
        (x * x).exp() * (1.0 - erf_small(x))
    } else {
        erfcx_large(x)
    }
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

/// sin(pi·x) with the argument reduced exactly, so that large |x| keeps full
/// relative accuracy.
fn sin_pi(x: f64) -> f64 {
    // r in [-1, 1], exact: x and 2·round(x/2) share the same binade or r is 0.
    let r = x - 2.0 * (x / 2.0).round();
    let (sign, a) = if r < 0.0 { (-1.0, -r) } else { (1.0, r) };
    // sin(pi·a) = sin(pi·(1 - a)); 1 - a is exact for a in [0.5, 1].
    let a = if a > 0.5 { 1.0 - a } else { a };
    sign * (PI * a).sin()
}

/// Coefficients B_{2k} / (2k (2k - 1)) of the Stirling series for ln Γ.
const STIRLING: [f64; 8] = [
    1.0 / 12.0,
    -1.0 / 360.0,
    1.0 / 1260.0,
    -1.0 / 1680.0,
    1.0 / 1188.0,
    -691.0 / 360_360.0,
    1.0 / 156.0,
    -3617.0 / 122_400.0,
];

/// Where the Stirling series is used directly; its truncation error there is
/// below 1e-19.
const STIRLING_MIN: f64 = 15.0;

/// ln|Γ(x)| for real x; +inf at the poles (0, -1, -2, ...).
///
/// Like `scipy.special.gammaln`, it returns the logarithm of the absolute
/// value, so it is finite at negative non-integers.
pub(crate) fn ln_gamma(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x == f64::INFINITY {
        return f64::INFINITY;
    }
    if x <= 0.0 {
        if x == x.floor() {
            return f64::INFINITY;
        }
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        return (PI / sin_pi(x).abs()).ln() - ln_gamma(1.0 - x);
    }
    if x < STIRLING_MIN {
        // Γ(x) = Γ(x + n) / (x (x + 1) ... (x + n - 1)).
        let mut shifted = x;
        let mut product = 1.0;
        while shifted < STIRLING_MIN {
            product *= shifted;
            shifted += 1.0;
        }
        return stirling(shifted) - product.ln();
    }
    stirling(x)
}

/// ln Γ(x) for x >= 15 from the Stirling series.
fn stirling(x: f64) -> f64 {
    const HALF_LN_2PI: f64 = 0.918_938_533_204_672_8;
    let inv = 1.0 / x;
    let inv_sq = inv * inv;
    let mut series = 0.0;
    for c in STIRLING.iter().rev() {
        series = series * inv_sq + c;
    }
    (x - 0.5) * x.ln() - x + HALF_LN_2PI + series * inv
}
