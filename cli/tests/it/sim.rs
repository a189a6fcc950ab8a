//! `meridian sim`: a job through the real coordinator daemon with simulated
//! hospitals completes, every update accepted, and reports its measurements.

use crate::util::run;

/// Runs `meridian sim` with `sites`, `rounds` and `params` and returns its `--json` report.
fn sim_report(sites: &str, rounds: &str, params: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("sim");
    let out = run(&[
        "sim",
        "--sites",
        sites,
        "--rounds",
        rounds,
        "--params",
        params,
        "--json",
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_simulated_federation_completes_and_reports_its_rounds_and_memory() {
    let report = sim_report("12", "3", "5000");
    // Each site checked each model it pulled after the first.
    assert_eq!(report["model_mismatches"], 0, "{report}");
    assert_eq!(report["sites"], 12);
    assert_eq!(report["refused_updates"], 0);
    assert_eq!(report["errors"].as_array().unwrap().len(), 0, "{report}");
    // An MLP 100-h-2 of about 5,000 parameters: h = 48, 103 · 48 + 2 = 4,946.
    assert_eq!(report["params"], 4946);
    // Every site pulled the model and sent an update in every round.
    let bytes_per_round = 12.0 * 4946.0 * 4.0 / 1e6;
    let pushed = report["pushed_mb"].as_f64().unwrap();
    assert!((pushed - 3.0 * bytes_per_round).abs() < 1e-6, "{report}");
    assert!(report["coordinator_rss_peak_mb"].as_f64().unwrap() > 0.0);
    assert!(report["first_round_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_model_past_the_page_cache_threshold_moves_and_aggregates_exactly() {
    // About 18 MB: updates and models are written around the page cache
    // (`proto::checkpoint::UNCACHED_FROM_BYTES`), updates from a thread of
    // their own, and read back for aggregation; each site checks every
    // model it pulls against the last one plus the update all sites sent.
    let report = sim_report("2", "3", "4500000");
    assert_eq!(report["errors"].as_array().unwrap().len(), 0, "{report}");
    assert_eq!(report["refused_updates"], 0, "{report}");
    assert_eq!(report["model_mismatches"], 0, "{report}");
    let params = report["params"].as_f64().unwrap();
    assert!(params * 4.0 > (16 << 20) as f64, "{report}");
    // Two sites, three rounds: six pulls and six pushes, each of the whole model.
    assert_eq!(report["push_gb_per_s_each"].as_array().unwrap().len(), 6, "{report}");
    let pushed = report["pushed_mb"].as_f64().unwrap();
    assert!((pushed - 6.0 * params * 4.0 / 1e6).abs() < 1e-3, "{report}");
}
