//! `meridian privacy` reproduces the reference accountants: dp_accounting's
//! RDP values to 1e-6 relative, and the published legacy figures.

use serde_json::Value;

use crate::util::run;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../privacy/tests/fixtures/accountant.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn epsilon(args: &[&str]) -> Value {
    let mut all = vec!["privacy", "epsilon", "--json"];
    all.extend_from_slice(args);
    let out = run(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[track_caller]
fn assert_rel(got: f64, want: f64, rel: f64, what: &str) {
    assert!(((got - want) / want).abs() <= rel, "{what}: got {got}, want {want}");
}

#[test]
fn epsilon_matches_dp_accounting_and_published_values() {
    let fix = fixture();
    for case in fix["classic"].as_array().unwrap() {
        let (q, s, t, d) =
            (case["q"].to_string(), case["sigma"].to_string(), case["steps"].to_string(), case["delta"].to_string());
        let args = ["--sample-rate", q.as_str(), "--noise", s.as_str(), "--steps", t.as_str(), "--delta", d.as_str()];
        let name = case["name"].as_str().unwrap();
        let got = epsilon(&args);
        assert_rel(got["epsilon"].as_f64().unwrap(), case["rdp_dpacc"]["eps"].as_f64().unwrap(), 1e-6, name);
        let mut pld = args.to_vec();
        pld.extend(["--accountant", "pld"]);
        let got = epsilon(&pld);
        assert_rel(got["epsilon"].as_f64().unwrap(), case["pld_dpacc"].as_f64().unwrap(), 0.01, name);
        let mut legacy = args.to_vec();
        legacy.push("--legacy-conversion");
        let got = epsilon(&legacy);
        let want = case["legacy_tfprivacy_basic_conversion"]["eps"].as_f64().unwrap();
        assert_rel(got["epsilon"].as_f64().unwrap(), want, 1e-6, name);
    }
    for case in fix["grid_sample"].as_array().unwrap() {
        for (delta, want) in case["rdp_dpacc"].as_object().unwrap() {
            let (q, s, t) = (case["q"].to_string(), case["sigma"].to_string(), case["steps"].to_string());
            let got = epsilon(&["--sample-rate", &q, "--noise", &s, "--steps", &t, "--delta", delta]);
            assert_rel(
                got["epsilon"].as_f64().unwrap(),
                want["eps"].as_f64().unwrap(),
                1e-6,
                &format!("q={q} σ={s} T={t} δ={delta}"),
            );
            let got =
                epsilon(&["--sample-rate", &q, "--noise", &s, "--steps", &t, "--delta", delta, "--accountant", "pld"]);
            let want = case["pld_dpacc"][delta].as_f64().unwrap();
            assert_rel(got["epsilon"].as_f64().unwrap(), want, 0.01, &format!("pld q={q} σ={s} T={t} δ={delta}"));
        }
    }
    // Abadi et al. 2016, Sec. 3.1: q = 0.01, σ = 4, T = 10,000, δ = 1e-5 -> 1.26 with the moments accountant.
    let abadi = epsilon(&[
        "--sample-rate",
        "0.01",
        "--noise",
        "4",
        "--steps",
        "10000",
        "--delta",
        "1e-5",
        "--legacy-conversion",
    ]);
    assert_eq!(format!("{:.2}", abadi["epsilon"].as_f64().unwrap()), "1.26");
    // TF Privacy MNIST tutorial: N = 60,000, batch 256, σ = 1.12, 60 epochs -> 2.92.
    let mnist = epsilon(&[
        "--sample-rate",
        "0.004266666666666667",
        "--noise",
        "1.12",
        "--steps",
        "14062",
        "--delta",
        "1e-5",
        "--legacy-conversion",
    ]);
    assert_eq!(format!("{:.2}", mnist["epsilon"].as_f64().unwrap()), "2.92");
}

#[test]
fn noise_for_a_target_epsilon_meets_it() {
    let out =
        run(&["privacy", "noise", "--target-epsilon", "1.0", "--sample-rate", "0.01", "--steps", "1000", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sigma = v["noise_multiplier"].as_f64().unwrap().to_string();
    let eps = epsilon(&["--sample-rate", "0.01", "--noise", &sigma, "--steps", "1000"]);
    let e = eps["epsilon"].as_f64().unwrap();
    assert!(e <= 1.0 && e > 0.999, "{e}");
}
