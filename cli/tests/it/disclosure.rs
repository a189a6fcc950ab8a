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
