//! Checks the special functions against values computed with mpmath at 50
//! significant digits.

use super::{erfc, erfcx, ln_gamma, log_erfc};

/// (x, erfc(x)) from mpmath.
const ERFC: [(f64, f64); 26] = [
    (-6.0, 2.0),
    (-3.0, 1.9999779095030015),
    (-1.5, 1.9661051464753108),
    (-0.5, 1.5204998778130465),
    (-0.46875, 1.492613473217938),
    (-0.2, 1.2227025892104784),
    (0.0, 1.0),
    (1e-10, 0.999999999887162),
    (0.1, 0.887537083981715),
    (0.3, 0.6713732405408726),
    (0.46875, 0.507386526782062),
    (0.5, 0.4795001221869535),
    (0.75, 0.28884436634648486),
    (1.0, 0.15729920705028513),
    (1.5, 0.033894853524689274),
    (2.0, 0.004677734981047266),
    (3.0, 2.209049699858544e-05),
    (3.99, 1.6739211364520814e-08),
    (4.0, 1.541725790028002e-08),
    (4.5, 1.9661604415428876e-10),
    (5.0, 1.537459794428035e-12),
    (7.5, 2.776649386030569e-26),
    (10.0, 2.088487583762545e-45),
    (15.0, 7.212994172451207e-100),
    (20.0, 5.395865611607901e-176),
    (26.0, 5.663192408856143e-296),
];

/// (x, ln(erfc(x))) from mpmath.
const LOG_ERFC: [(f64, f64); 14] = [
    (-5.0, 0.6931471805591766),
    (-0.5, 0.41903914777555956),
    (0.0, 0.0),
    (0.4, -0.5593024583599312),
    (0.5, -0.7350111298370844),
    (2.0, -5.364941264616638),
    (5.0, -27.200889545537436),
    (26.0, -679.8311997631943),
    (27.0, -732.8688865078974),
    (30.0, -903.9741171106439),
    (100.0, -10005.177585122665),
    (1000.0, -1000007.4801207219),
    (100000.0, -10000000012.08529),
    (100000000.0, -1.0000000000000018e+16),
];

/// (x, ln|Γ(x)|) from mpmath.
const LN_GAMMA: [(f64, f64); 23] = [
    (1e-08, 18.42068073818021),
    (0.1, 2.252712651734206),
    (0.5, 0.5723649429247001),
    (1.0, 0.0),
    (1.5, -0.12078223763524522),
    (2.0, 0.0),
    (2.5, 0.2846828704729192),
    (3.0, std::f64::consts::LN_2),
    (7.3, 7.147892523022248),
    (10.0, 12.801827480081469),
    (14.999, 25.18854687054693),
    (15.0, 25.19122118273868),
    (17.5, 32.08111489594735),
    (30.0, 71.25703896716801),
    (100.5, 361.4355404677776),
    (1025.0, 6078.211884750051),
    (1000000.0, 12815504.569147611),
    (-0.5, 1.2655121234846454),
    (-1.5, 0.860047015376481),
    (-2.3, 0.36956666345500805),
    (-7.9, -8.072039736012833),
    (-100.7, -365.61225576180533),
    (-500.25, -2611.3931193524472),
];

#[track_caller]
fn check_close(what: &str, x: f64, got: f64, want: f64, tol: f64) {
    let err = if want == 0.0 { got.abs() } else { ((got - want) / want).abs() };
    assert!(err <= tol, "{what}({x}) = {got:e}, want {want:e} (relative error {err:e} > {tol:e})");
}

#[test]
fn erfc_matches_mpmath_to_2e_minus_15() {
    for (x, want) in ERFC {
        check_close("erfc", x, erfc(x), want, 2e-15);
    }
}

#[test]
fn erfcx_matches_erfc_times_exp_square() {
    // erfcx(x) = exp(x²) erfc(x); checked where both sides are representable.
    for (x, want) in ERFC.iter().copied().filter(|&(x, _)| (0.0..=20.0).contains(&x)) {
        let scaled = want * (x * x).exp();
        check_close("erfcx", x, erfcx(x), scaled, 4e-15);
    }
    // Asymptotically erfcx(x) ~ 1/(x sqrt(pi)).
    let x = 1e200;
    check_close("erfcx", x, erfcx(x), 1.0 / (x * std::f64::consts::PI.sqrt()), 1e-15);
}

#[test]
fn erfc_limits() {
    assert_eq!(erfc(f64::INFINITY), 0.0);
    assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
    assert_eq!(erfc(40.0), 0.0);
    assert!(erfc(f64::NAN).is_nan());
}

#[test]
fn log_erfc_matches_mpmath_without_underflow() {
    for (x, want) in LOG_ERFC {
        check_close("log_erfc", x, log_erfc(x), want, 2e-15);
    }
    assert_eq!(log_erfc(f64::INFINITY), f64::NEG_INFINITY);
    assert!(log_erfc(f64::NAN).is_nan());
}

#[test]
fn ln_gamma_matches_mpmath() {
    for (x, want) in LN_GAMMA {
        // Absolute error scaled by max(1, |ln Γ|): near the zeros at 1 and 2
        // only the absolute error is meaningful.
        let err = (ln_gamma(x) - want).abs() / want.abs().max(1.0);
        assert!(err <= 2e-15, "ln_gamma({x}) = {}, want {want} (error {err:e})", ln_gamma(x));
    }
}

#[test]
fn ln_gamma_poles_are_infinite() {
    for x in [0.0, -1.0, -2.0, -50.0] {
        assert_eq!(ln_gamma(x), f64::INFINITY, "ln_gamma({x})");
    }
}

#[test]
fn ln_gamma_of_integers_is_log_factorial() {
    let mut log_factorial = 0.0_f64;
    for n in 1..=170_u32 {
        // ln Γ(n + 1) = ln n!
        log_factorial += f64::from(n).ln();
        let got = ln_gamma(f64::from(n) + 1.0);
        assert!(
            (got - log_factorial).abs() <= 1e-13 * log_factorial.max(1.0),
            "ln_gamma({}) = {got}, want {log_factorial}",
            n + 1
        );
    }
}
