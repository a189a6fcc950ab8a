//! The accountant against `tests/fixtures/accountant.json`: ε computed by
//! Google's dp_accounting 0.6 `RdpAccountant` (default orders, improved
//! conversion), by TF Privacy's legacy conversion, and the published values
//! of Abadi et al. 2016 and the TensorFlow Privacy MNIST tutorial.

use meridian_privacy::{EpsilonAtDelta, RdpAccountant, dpsgd_epsilon};
use serde_json::Value;

/// Relative tolerance against dp_accounting.
const TOLERANCE: f64 = 1e-6;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/accountant.json");
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f(value: &Value, key: &str) -> f64 {
    value[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {value}"))
}

#[track_caller]
fn check(case: &str, got: EpsilonAtDelta, want_epsilon: f64, want_order: Option<f64>) {
    let err = ((got.epsilon - want_epsilon) / want_epsilon).abs();
    assert!(
        err <= TOLERANCE,
        "{case}: epsilon {} vs dp_accounting {want_epsilon} (relative error {err:e})",
        got.epsilon
    );
    if let Some(order) = want_order {
        assert_eq!(got.order, order, "{case}: optimal order");
    }
}

fn legacy_epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> EpsilonAtDelta {
    let mut accountant = RdpAccountant::legacy();
    accountant.compose_poisson_gaussian(q, sigma, steps).unwrap();
    accountant.epsilon_legacy(delta).unwrap()
}

#[test]
fn classic_cases_match_dp_accounting() {
    let fixture = fixture();
    let cases = fixture["classic"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        assert_eq!(case["rdp_dpacc_excluded_orders"].as_array().map(Vec::len), Some(0), "{name}");
        let (q, sigma, delta) = (f(case, "q"), f(case, "sigma"), f(case, "delta"));
        let steps = case["steps"].as_u64().unwrap();
        let want = &case["rdp_dpacc"];
        let got = dpsgd_epsilon(q, sigma, steps, delta).unwrap();
        check(name, got, f(want, "eps"), Some(f(want, "order")));
    }
}

#[test]
fn classic_cases_match_legacy_conversion() {
    let fixture = fixture();
    for case in fixture["classic"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let want = &case["legacy_tfprivacy_basic_conversion"];
        assert_eq!(want["orders"], "1+x/10 for x in 1..99, then 12..63", "{name}");
        let steps = case["steps"].as_u64().unwrap();
        let got = legacy_epsilon(f(case, "q"), f(case, "sigma"), steps, f(case, "delta"));
        check(name, got, f(want, "eps"), Some(f(want, "order")));
    }
}

#[test]
fn grid_sample_matches_dp_accounting() {
    let fixture = fixture();
    let cases = fixture["grid_sample"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let mut checked = 0;
    for case in cases {
        let (q, sigma) = (f(case, "q"), f(case, "sigma"));
        let steps = case["steps"].as_u64().unwrap();
        let mut accountant = RdpAccountant::new();
        accountant.compose_poisson_gaussian(q, sigma, steps).unwrap();
        for (delta, want) in case["rdp_dpacc"].as_object().unwrap() {
            let delta: f64 = delta.parse().unwrap();
            let name = format!("q={q} sigma={sigma} steps={steps} delta={delta}");
            check(&name, accountant.epsilon(delta).unwrap(), f(want, "eps"), Some(f(want, "order")));
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

#[test]
fn gaussian_single_release_matches_dp_accounting() {
    let fixture = fixture();
    let cases = fixture["gaussian_mechanism_single_release"].as_array().unwrap();
    assert_eq!(cases.len(), 14);
    for case in cases {
        let (sigma, delta) = (f(case, "sigma"), f(case, "delta"));
        let got = dpsgd_epsilon(1.0, sigma, 1, delta).unwrap();
        check(&format!("sigma={sigma} delta={delta}"), got, f(case, "rdp_dpacc"), None);
    }
}

fn classic_case<'a>(fixture: &'a Value, name: &str) -> &'a Value {
    fixture["classic"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no classic case {name}"))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[test]
fn abadi_2016_published_value() {
    // Abadi et al. 2016, Sec. 3.1: q = 0.01, σ = 4, δ = 1e-5, T = 10,000 → ε ≈ 1.26.
    let fixture = fixture();
    let case = classic_case(&fixture, "abadi2016_sec3.1");
    assert_eq!(f(case, "published_eps"), 1.26);
    let got = legacy_epsilon(0.01, 4.0, 10_000, 1e-5);
    assert_eq!(round2(got.epsilon), 1.26, "{got:?}");
    // The improved conversion certifies a better guarantee for the same run.
    assert!(dpsgd_epsilon(0.01, 4.0, 10_000, 1e-5).unwrap().epsilon < 1.04);
}

#[test]
fn tf_privacy_mnist_tutorial_published_values() {
    let fixture = fixture();
    // Noise 1.12, 60 epochs, batch 256 of 60,000 → 2.92 in the tutorial.
    let case = classic_case(&fixture, "mnist_tfp_s1.12_b256_e60");
    assert_eq!(f(case, "published_eps"), 2.92);
    let got = legacy_epsilon(256.0 / 60_000.0, 1.12, 14_062, 1e-5);
    assert!((got.epsilon - 2.92).abs() < 0.005, "{got:?}");
    assert_eq!(round2(got.epsilon), 2.92);

    // Noise 1.2, 10 epochs → 1.20.
    let case = classic_case(&fixture, "mnist_tfp_s1.2_b256_e10");
    assert_eq!(f(case, "published_eps"), 1.2);
    let got = legacy_epsilon(256.0 / 60_000.0, 1.2, 2343, 1e-5);
    assert_eq!(round2(got.epsilon), 1.2);

    // Noise 0.6, 30 epochs: the tutorial says 9.74, the legacy conversion
    // gives 9.76 (as the fixture records); FIXME: find which accounting
    // produced 9.74 if it ever matters.
    let case = classic_case(&fixture, "mnist_tfp_s0.6_b256_e30");
    assert_eq!(f(case, "published_eps"), 9.74);
    let got = legacy_epsilon(256.0 / 60_000.0, 0.6, 7031, 1e-5);
    assert_eq!(round2(got.epsilon), 9.76);
}

#[test]
fn published_cases_in_fixture_are_the_expected_ones() {
    let fixture = fixture();
    let published: Vec<(&str, f64)> = fixture["classic"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| Some((c["name"].as_str()?, c["published_eps"].as_f64()?)))
        .collect();
    assert_eq!(
        published,
        [
            ("abadi2016_sec3.1", 1.26),
            ("mnist_tfp_s1.12_b256_e60", 2.92),
            ("mnist_tfp_s0.6_b256_e30", 9.74),
            ("mnist_tfp_s1.2_b256_e10", 1.2),
        ]
    );
}
