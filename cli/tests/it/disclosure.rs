//! What leaves a hospital: nothing but values released under DP and
//! charged to its ledger, and reasons as codes with the spec's own column
//! names. Each test plants something in a site's data or state and looks
//! for it everywhere the coordinator, the scientist and the reviewer can.

use std::path::Path;
use std::time::Duration;

use crate::util::{Federation, WdbcJob, example, wait_for};

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// Stdout and stderr of a command, as one string.
fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_bad_cell_stays_at_the_site_and_only_its_code_and_column_leave() {
    let mut fed = Federation::start(&["hospital-a"]);
    // A copy of WDBC whose line 42 has a unique marker as its label.
    let marker = format!("MARKER{:016x}", rand::random::<u64>());
    let original = std::fs::read_to_string(example("data/wdbc_breast_cancer.csv")).unwrap();
    let planted: Vec<String> = original
        .lines()
        .enumerate()
        .map(|(i, line)| {
            if i == 41 {
                line.replacen(",M,", &format!(",{marker},"), 1).replacen(",B,", &format!(",{marker},"), 1)
            } else {
                line.to_string()
            }
        })
        .collect();
    assert!(planted[41].contains(&marker));
    let csv = fed.dir.join("hospital-a-data.csv");
    std::fs::write(&csv, planted.join("\n") + "\n").unwrap();
    let home = fed.start_worker("hospital-a", "wdbc", &csv, "diagnosis", crate::util::WDBC_NUMERIC);

    let spec = WdbcJob::default().write(&fed, "job.toml");
    let job = wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let watched = fed.client("alice", &["job", "watch", &job]);
    assert!(!watched.status.success(), "{}", text(&watched));
    let status = fed.client("alice", &["job", "status", &job, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let site = &json["sites"][0];
    assert_eq!(site["state"], "refused", "{json}");
    assert_eq!(site["reason_code"], "schema_mismatch", "{json}");
    assert_eq!(site["reason_columns"], serde_json::json!(["diagnosis"]), "{json}");

    // The site's own log has the whole story: the value and the line.
    let site_log = std::fs::read_to_string(home.join("worker.log")).unwrap();
    assert!(site_log.contains(&marker) && site_log.contains(":42:"), "{site_log}");
    let site_audit = std::fs::read_to_string(home.join("state").join("audit.log")).unwrap();
    assert!(site_audit.contains(&marker), "{site_audit}");

    // Nothing the coordinator keeps or prints has the value or the path.
    let csv_path = csv.to_str().unwrap().as_bytes().to_vec();
    for needle in [marker.as_bytes(), &csv_path[..]] {
        let leaked = files_containing(&fed.dir.join("coord-state"), needle);
        assert!(leaked.is_empty(), "{} in {leaked:?}", String::from_utf8_lossy(needle));
        assert!(!fed.coordinator_log().as_bytes().windows(needle.len()).any(|w| w == needle));
    }
    for (user, args) in [
        ("alice", vec!["job", "status", &job]),
        ("alice", vec!["job", "status", &job, "--json"]),
        ("alice", vec!["job", "list", "--json"]),
        ("alice", vec!["job", "watch", &job]),
        ("rita", vec!["job", "status", &job, "--json"]),
        ("rita", vec!["budget", "--json"]),
        ("rita", vec!["budget", "ledger", "--json"]),
    ] {
        let out = text(&fed.client(user, &args));
        assert!(!out.contains(&marker) && !out.contains(csv.to_str().unwrap()), "{args:?}: {out}");
    }
    // What the scientist reads: the code, the column, what it means.
    let human = text(&fed.client("alice", &["job", "status", &job]));
    assert!(human.contains("schema_mismatch (column \"diagnosis\")"), "{human}");
}

/// The ledger as the coordinator mirrors it, read by the reviewer.
fn mirrored_ledger(fed: &Federation) -> Vec<serde_json::Value> {
    let out = fed.client("rita", &["budget", "ledger", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn sizes_leave_once_noised_and_every_job_plans_from_them() {
    let mut fed = Federation::start(&["hospital-a"]);
    fed.start_worker(
        "hospital-a",
        "wdbc",
        &example("data/wdbc_breast_cancer.csv"),
        "diagnosis",
        crate::util::WDBC_NUMERIC,
    );
    let spec = WdbcJob::default().write(&fed, "job.toml");
    let submit = || {
        wait_for(Duration::from_secs(30), "the worker to register", || {
            let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
    };
    let mut weights = Vec::new();
    for _ in 0..2 {
        let job = submit();
        let out = fed.client("alice", &["job", "watch", &job]);
        assert!(out.status.success(), "{}", text(&out));
        let status: serde_json::Value =
            serde_json::from_slice(&fed.client("alice", &["job", "status", &job, "--json"]).stdout).unwrap();
        let released = status["sites"][0]["train_examples"].as_u64().unwrap();
        // The job's sampling rate is the batch over the *released* size: the
        // exact count does not follow from anything the coordinator holds.
        let entries = mirrored_ledger(&fed);
        let dp_sgd = entries.iter().find(|e| e["job_id"] == job.as_str() && e["mechanism"] == "dp_sgd").unwrap();
        assert_eq!(dp_sgd["sample_rate"].as_f64().unwrap(), 32.0 / released as f64, "{dp_sgd}");
        weights.push(released);
    }
    // Both jobs used the same release; it was charged once, to the dataset, not to a job.
    assert_eq!(weights[0], weights[1]);
    let sizes: Vec<_> = mirrored_ledger(&fed).into_iter().filter(|e| e["mechanism"] == "size_release").collect();
    assert_eq!(sizes.len(), 1, "{sizes:?}");
    assert_eq!(sizes[0]["job_id"], serde_json::Value::Null);
    assert_eq!((sizes[0]["sample_rate"].as_f64(), sizes[0]["steps"].as_u64()), (Some(1.0), Some(1)));
    // 569 rows at test_fraction 0.2, noised with σ = 10: near 455, almost never exact.
    assert!(weights[0].abs_diff(455) < 100, "{weights:?}");
}

#[test]
fn a_site_with_too_few_records_refuses_with_a_code() {
    let mut fed = Federation::start(&["hospital-a"]);
    // The first 40 records of WDBC: about 32 for training, under the default floor of 50.
    let text40: String = std::fs::read_to_string(example("data/wdbc_breast_cancer.csv"))
        .unwrap()
        .lines()
        .take(41)
        .map(|l| format!("{l}\n"))
        .collect();
    let csv = fed.dir.join("few.csv");
    std::fs::write(&csv, text40).unwrap();
    fed.start_worker("hospital-a", "wdbc", &csv, "diagnosis", crate::util::WDBC_NUMERIC);
    let spec = WdbcJob { extra: "", ..Default::default() }.write(&fed, "job.toml");
    // batch 32 fits the released rows of a 40-record file only by chance; a smaller batch isolates the floor.
    let spec_text = std::fs::read_to_string(&spec).unwrap().replace("batch_size = 32", "batch_size = 4");
    std::fs::write(&spec, spec_text).unwrap();
    // The site's released sizes are under its announced floor: the job is
    // refused at submit with the code the site itself would answer with.
    let refused = wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (!out.status.success() && !err.contains("no registered site")).then_some(err)
    });
    assert!(refused.contains("released") && refused.contains("(too_few_rows)"), "{refused}");
    // A policy may not set a floor under DataSHIELD's 3.
    let bad = fed.dir.join("bad-worker.toml");
    let worker_toml = std::fs::read_to_string(fed.dir.join("hospital-a").join("worker.toml")).unwrap();
    std::fs::write(&bad, format!("{worker_toml}\n[policy]\nmin_training_rows = 2\n")).unwrap();
    let out = crate::util::run(&["worker", "--check", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("policy.min_training_rows: must be at least 3"), "{}", text(&out));
}

/// The AUC of summed histograms, computed here independently of the
/// coordinator, as a reviewer would: cells clamped at 0, ties in a bin half.
fn auc_of(sites: &[serde_json::Value]) -> f64 {
    let bins = sites[0]["negatives"].as_array().unwrap().len();
    let cell = |s: &serde_json::Value, class: &str, b: usize| s[class][b].as_i64().unwrap();
    let sum = |class: &str| -> Vec<f64> {
        (0..bins).map(|b| sites.iter().map(|s| cell(s, class, b)).sum::<i64>().max(0) as f64).collect()
    };
    let (neg, pos) = (sum("negatives"), sum("positives"));
    let (mut below, mut wins) = (0.0, 0.0);
    for b in 0..bins {
        wins += pos[b] * (below + neg[b] / 2.0);
        below += neg[b];
    }
    wins / (pos.iter().sum::<f64>() * neg.iter().sum::<f64>())
}

#[test]
fn metrics_leave_as_charged_noised_releases_unless_a_policy_says_exact() {
    let mut fed = Federation::start(&["hospital-a", "hospital-b"]);
    let data = example("data/wdbc_breast_cancer.csv");
    let (budget, cap) = (40.0, 20.0);
    let home_a =
        fed.start_worker_with_budget("hospital-a", "wdbc", &data, "diagnosis", crate::util::WDBC_NUMERIC, budget, cap);
    let home_b = fed.start_worker_with_toml(
        "hospital-b",
        "wdbc",
        &data,
        "diagnosis",
        crate::util::WDBC_NUMERIC,
        budget,
        cap,
        "[policy]\nrelease_exact_metrics = true\n",
    );
    let spec = WdbcJob { rounds: 2, min_sites: 2, extra: crate::util::SMALL_DATA_EVALUATION, ..Default::default() }
        .write(&fed, "job.toml");
    let job = wait_for(Duration::from_secs(30), "both workers to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let out = fed.client("alice", &["job", "watch", &job]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value =
        serde_json::from_slice(&fed.client("rita", &["job", "status", &job, "--json"]).stdout).unwrap();
    let sites = status["sites"].as_array().unwrap();
    let flag = |site: &str| sites.iter().find(|s| s["site"] == site).unwrap()["releases_exact_metrics"].clone();
    assert_eq!((flag("hospital-a"), flag("hospital-b")), (false.into(), true.into()), "{status}");

    let entries = mirrored_ledger(&fed);
    for round in status["rounds"].as_array().unwrap() {
        let evaluations = round["site_evaluations"].as_array().unwrap();
        assert_eq!(evaluations.len(), 2, "{round}");
        // Every evaluation is a release with its own charge, which a reviewer recomputes.
        for e in evaluations {
            let entry = entries
                .iter()
                .find(|l| {
                    l["site"] == e["site"]
                        && l["job_id"] == job.as_str()
                        && l["round"] == round["round"]
                        && l["mechanism"] == "evaluation"
                })
                .unwrap_or_else(|| panic!("no evaluation entry for {e}"));
            assert_eq!(entry["noise_multiplier"], e["noise_scale"]);
            let sigma = entry["noise_multiplier"].as_f64().unwrap().to_string();
            let delta = entry["delta"].as_f64().unwrap().to_string();
            let out = crate::util::run(&[
                "privacy",
                "epsilon",
                "--sample-rate",
                "1",
                "--noise",
                &sigma,
                "--steps",
                "1",
                "--delta",
                &delta,
                "--json",
            ]);
            let recomputed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let (got, want) = (recomputed["epsilon"].as_f64().unwrap(), entry["epsilon_round"].as_f64().unwrap());
            assert!((got - want).abs() <= 1e-9 * want, "{got} vs {entry}");
        }
        // The pooled AUC is the AUC of the summed releases.
        let auc = round["eval_metrics"]["auc"].as_f64().unwrap();
        assert!((auc - auc_of(evaluations)).abs() < 1e-12, "{round}");
        // Exact metrics only from the site whose policy says so.
        assert!(round["exact_eval_metrics"]["auc"].is_f64(), "{round}");
    }
    let aggregated = status["rounds"].as_array().unwrap().iter().find(|r| r["round"] == 1).unwrap();
    assert!(aggregated["train_metrics"]["clipped_fraction"].is_f64(), "{aggregated}");
    assert!(aggregated["exact_train_metrics"]["train_loss"].is_f64(), "{aggregated}");
    assert!(aggregated["train_metrics"].get("train_loss").is_none(), "{aggregated}");

    // What the coordinator keeps of hospital-a: no exact statistic anywhere.
    let db = rusqlite::Connection::open(fed.dir.join("coord-state").join("coordinator.sqlite")).unwrap();
    for table in ["updates", "evaluations"] {
        let stored: Vec<String> = db
            .prepare(&format!("SELECT metrics_json FROM {table} WHERE site = 'hospital-a'"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!stored.is_empty());
        for json in stored {
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(value["exact"], serde_json::json!({}), "{table}: {json}");
        }
    }
    // The budget flags the site that releases exact metrics; its audit records each release.
    let budget: Vec<serde_json::Value> =
        serde_json::from_slice(&fed.client("rita", &["budget", "--json"]).stdout).unwrap();
    assert!(budget.iter().all(|r| r["releases_exact_metrics"] == (r["site"] == "hospital-b")), "{budget:?}");
    let audit = |home: &Path| std::fs::read_to_string(home.join("state").join("audit.log")).unwrap();
    assert!(audit(&home_b).contains("exact_metrics.released"));
    assert!(!audit(&home_a).contains("exact_metrics.released"));
}
