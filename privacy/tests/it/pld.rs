//! The PLD accountant against `tests/fixtures/accountant.json`: ε computed
//! by Google's dp_accounting 0.6 `PLDAccountant` (add/remove-one neighbours,
//! `value_discretization_interval = 1e-4`), and never above the RDP ε of the
//! same run.

use meridian_privacy::{PldAccountant, dpsgd_epsilon, dpsgd_epsilon_pld};
use serde_json::Value;

/// Relative tolerance against dp_accounting's PLD accountant.
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
fn check(case: &str, got: f64, want: f64) {
    let err = ((got - want) / want).abs();
    eprintln!("{case}: pld {got} vs dp_accounting {want} (relative error {err:.3e})");
    assert!(err <= TOLERANCE, "{case}: epsilon {got} vs dp_accounting {want} (relative error {err:e})");
}

#[test]
fn classic_cases_match_dp_accounting_pld() {
    let fixture = fixture();
    let cases = fixture["classic"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (q, sigma, delta) = (f(case, "q"), f(case, "sigma"), f(case, "delta"));
        let steps = case["steps"].as_u64().unwrap();
        let got = dpsgd_epsilon_pld(q, sigma, steps, delta).unwrap();
        check(name, got, f(case, "pld_dpacc"));
        let rdp = dpsgd_epsilon(q, sigma, steps, delta).unwrap().epsilon;
        assert!(got <= rdp, "{name}: pld {got} > rdp {rdp}");
    }
}

#[test]
fn grid_sample_matches_dp_accounting_pld() {
    let fixture = fixture();
    let cases = fixture["grid_sample"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let mut checked = 0;
    for case in cases {
        let (q, sigma) = (f(case, "q"), f(case, "sigma"));
        let steps = case["steps"].as_u64().unwrap();
        let mut accountant = PldAccountant::new();
        accountant.compose_poisson_gaussian(q, sigma, steps).unwrap();
        for (delta, want) in case["pld_dpacc"].as_object().unwrap() {
            let delta: f64 = delta.parse().unwrap();
            let name = format!("q={q} sigma={sigma} steps={steps} delta={delta}");
            let got = accountant.epsilon(delta).unwrap();
            check(&name, got, want.as_f64().unwrap());
            let rdp = dpsgd_epsilon(q, sigma, steps, delta).unwrap().epsilon;
            assert!(got <= rdp, "{name}: pld {got} > rdp {rdp}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

#[test]
fn gaussian_single_release_matches_dp_accounting_pld() {
    let fixture = fixture();
    let cases = fixture["gaussian_mechanism_single_release"].as_array().unwrap();
    assert_eq!(cases.len(), 14);
    for case in cases {
        let (sigma, delta) = (f(case, "sigma"), f(case, "delta"));
        let got = dpsgd_epsilon_pld(1.0, sigma, 1, delta).unwrap();
        check(&format!("sigma={sigma} delta={delta}"), got, f(case, "pld_dpacc_GaussianDpEvent"));
    }
}
