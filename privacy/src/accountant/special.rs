//! Special functions the RDP accountant needs, in pure Rust.
//!
//! dp_accounting evaluates the subsampled-Gaussian RDP through
//! `scipy.special.gammaln` and `scipy.special.log_ndtr`; Rust's standard
//! library has neither on stable, and a C dependency (libm's `erfc`,
//! `lgamma`) would be one more thing to build and audit. This module provides
//! them with double-precision accuracy:
//!
//! - [`erfc`] and [`erfcx`] (the scaled `exp(x²)·erfc(x)`) from W. J. Cody's
//!   rational Chebyshev approximations ("Rational Chebyshev approximations for
//!   the error function", Math. Comp. 23, 1969; the `CALERF` routine of
//!   SPECFUN, ACM TOMS 715), relative error about 1e-16;
//! - [`log_erfc`], `ln(erfc(x))` without underflow for large `x`;
//! - [`ln_gamma`], `ln|Γ(x)|` for every real `x` (including negative
//!   non-integers, as `scipy.special.gammaln` returns): the Taylor series of
//!   `ln Γ(1 + z)` with the recurrence below 14.5, the Stirling series above,
//!   and the reflection formula below zero.

// Cody's coefficients are kept as published, with more digits than an f64.
#![allow(clippy::excessive_precision)]

use std::f64::consts::PI;

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
const B: [f64; 4] = [
    2.36012909523441209e01,
    2.44024637934444173e02,
    1.28261652607737228e03,
    2.84423683343917062e03,
];

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
    let upper = if y == f64::INFINITY {
        0.0
    } else {
        exp_neg_square(y) * erfcx_large(y)
    };
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

/// Euler–Mascheroni constant γ.
const EULER_GAMMA: f64 = 0.577_215_664_901_532_9;

/// `(−1)^k (ζ(k) − 1) / k` for k = 2..=30, from mpmath: the coefficients of
/// `ln Γ(1 + z) = −ln(1 + z) + z (1 − γ) + Σ_k c_k z^k` (Abramowitz and
/// Stegun 6.1.33), which converges like `(z/2)^k`; for |z| <= 1/2 the
/// truncation error is below 5e-18.
const LN_GAMMA_1P_SERIES: [f64; 29] = [
    0.322_467_033_424_113_2,
    -0.067_352_301_053_198_1,
    0.020_580_808_427_784_546,
    -0.007_385_551_028_673_986,
    0.002_890_510_330_741_523_4,
    -0.001_192_753_911_703_261,
    0.000_509_669_524_743_042_5,
    -0.000_223_154_758_453_579_39,
    9.945_751_278_180_853e-5,
    -4.492_623_673_813_314e-5,
    2.050_721_277_567_069e-5,
    -9.439_488_275_268_397e-6,
    4.374_866_789_907_488e-6,
    -2.039_215_753_801_366e-6,
    9.551_412_130_407_42e-7,
    -4.492_469_198_764_566e-7,
    2.120_718_480_555_466_5e-7,
    -1.004_322_482_396_809_9e-7,
    4.769_810_169_363_980_4e-8,
    -2.271_109_460_894_316_4e-8,
    1.083_865_921_489_695_5e-8,
    -5.183_475_041_970_047e-9,
    2.483_674_543_802_478_5e-9,
    -1.192_140_140_586_091_2e-9,
    5.731_367_241_678_862e-10,
    -2.759_522_885_124_233_4e-10,
    1.330_476_437_424_449e-10,
    -6.422_964_563_838_1e-11,
    3.104_424_774_732_227_6e-11,
];

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

/// Where the Stirling series is used; its truncation error there is below
/// 1e-19.
const STIRLING_MIN: f64 = 14.5;

/// ln|Γ(x)| for real x; +inf at the poles (0, -1, -2, ...).
///
/// Like `scipy.special.gammaln`, it returns the logarithm of the absolute
/// value, so it is finite at negative non-integers. The absolute error is
/// within a few ulps of max(1, |ln Γ(x)|).
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
        return ln_gamma_small(x);
    }
    stirling(x)
}

/// ln Γ(x) for 0 < x < 14.5, from the series for ln Γ(1 + z), |z| <= 1/2,
/// and the recurrence Γ(n + z) = Γ(1 + z) · (1 + z)(2 + z)…(n − 1 + z).
fn ln_gamma_small(x: f64) -> f64 {
    let n = x.round();
    // Exact: x and n are within a factor of two of each other, or n = 0.
    let z = x - n;
    let mut poly = 0.0;
    for c in LN_GAMMA_1P_SERIES.iter().rev() {
        poly = poly * z + c;
    }
    // ln Γ(1 + z) + ln(1 + z), i.e. ln Γ(2 + z), without the two logarithms
    // of (1 + z) that would cancel.
    let ln_gamma_2pz = z * (1.0 - EULER_GAMMA) + z * z * poly;
    if n == 0.0 {
        // Γ(z) = Γ(2 + z) / ((1 + z) z).
        ln_gamma_2pz - z.ln_1p() - z.ln()
    } else if n == 1.0 {
        ln_gamma_2pz - z.ln_1p()
    } else {
        let mut product = 1.0;
        let mut k = 2.0;
        while k < n {
            product *= k + z;
            k += 1.0;
        }
        ln_gamma_2pz + product.ln()
    }
}

/// ln Γ(x) for x >= 14.5 from the Stirling series.
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
