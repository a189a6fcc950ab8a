//! `meridian sim`: a job through the real coordinator daemon with simulated
//! hospitals completes, every update accepted, and reports its measurements.

use crate::util::run;

/// Runs `meridian sim` with `sites`, `rounds` and `params` and returns its `--json` report.
fn sim_report(sites: &str, rounds: &str, params: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    sim_report_in(dir.path(), sites, rounds, params)
}

/// [`sim_report`], its files under `dir/sim`.
fn sim_report_in(dir: &std::path::Path, sites: &str, rounds: &str, params: &str) -> serde_json::Value {
    let work = dir.join("sim");
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
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
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
fn a_large_model_moves_in_parts_and_aggregates_exactly() {
    // About 36 MB: models are pulled and updates pushed in two parts over
    // two connections each (`meridian_worker::download::PARTED_FROM_BYTES`), the
    // parts written around the page cache from threads of their own and
    // read back, in order, for aggregation; each site checks every model
    // it pulls against the last one plus the update all sites sent.
    let dir = tempfile::tempdir().unwrap();
    let report = sim_report_in(dir.path(), "2", "3", "9000000");
    assert_eq!(report["errors"].as_array().unwrap().len(), 0, "{report}");
    assert_eq!(report["refused_updates"], 0, "{report}");
    assert_eq!(report["model_mismatches"], 0, "{report}");
    let params = report["params"].as_f64().unwrap();
    assert!(params * 4.0 >= (32 << 20) as f64, "{report}");
    // Two sites, three rounds: six pulls and six pushes, each of the whole model.
    assert_eq!(report["push_gb_per_s_each"].as_array().unwrap().len(), 6, "{report}");
    let pushed = report["pushed_mb"].as_f64().unwrap();
    assert!((pushed - 6.0 * params * 4.0 / 1e6).abs() < 1e-3, "{report}");
    // Each update arrived as two parts, listed in a parts file the round read.
    let log = std::fs::read_to_string(dir.path().join("sim/coordinator/coordinator.log")).unwrap();
    assert_eq!(log.matches("update part received").count(), 6, "{log}");
    let jobs = dir.path().join("sim/coordinator/state/jobs");
    let job = std::fs::read_dir(&jobs).unwrap().next().unwrap().unwrap().path();
    let lists = std::fs::read_dir(job.join("updates"))
        .unwrap()
        .filter(|f| std::fs::read(f.as_ref().unwrap().path()).unwrap().starts_with(b"MRDN-parts v1"))
        .count();
    assert_eq!(lists, 6);
}
