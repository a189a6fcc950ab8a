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
        .map(|(i, line)| if i == 41 { line.replacen(",M,", &format!(",{marker},"), 1).replacen(",B,", &format!(",{marker},"), 1) } else { line.to_string() })
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
    fed.start_worker("hospital-a", "wdbc", &example("data/wdbc_breast_cancer.csv"), "diagnosis", crate::util::WDBC_NUMERIC);
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
    let text40: String = std::fs::read_to_string(example("data/wdbc_breast_cancer.csv")).unwrap().lines().take(41).map(|l| format!("{l}\n")).collect();
    let csv = fed.dir.join("few.csv");
    std::fs::write(&csv, text40).unwrap();
    fed.start_worker("hospital-a", "wdbc", &csv, "diagnosis", crate::util::WDBC_NUMERIC);
    let spec = WdbcJob { extra: "", ..Default::default() }.write(&fed, "job.toml");
    // batch 32 fits the released rows of a 40-record file only by chance; a smaller batch isolates the floor.
    let spec_text = std::fs::read_to_string(&spec).unwrap().replace("batch_size = 32", "batch_size = 4");
    std::fs::write(&spec, spec_text).unwrap();
    let job = wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    let out = fed.client("alice", &["job", "watch", &job]);
    assert!(!out.status.success(), "{}", text(&out));
    let status: serde_json::Value =
        serde_json::from_slice(&fed.client("alice", &["job", "status", &job, "--json"]).stdout).unwrap();
    assert_eq!(status["sites"][0]["reason_code"], "too_few_rows", "{status}");
    // A policy may not set a floor under DataSHIELD's 3.
    let bad = fed.dir.join("bad-worker.toml");
    let worker_toml = std::fs::read_to_string(fed.dir.join("hospital-a").join("worker.toml")).unwrap();
    std::fs::write(&bad, format!("{worker_toml}\n[policy]\nmin_training_rows = 2\n")).unwrap();
    let out = crate::util::run(&["worker", "--check", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("policy.min_training_rows: must be at least 3"), "{}", text(&out));
}
