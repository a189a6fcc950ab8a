//! Site governance: with manual approval, a job runs at a site only after
//! the hospital's IT approved that exact job on the worker host.

use std::time::Duration;

use crate::util::{Federation, example, run, wait_for};

const NUMERIC: &[&str] = &["radius_mean", "texture_mean"];

fn spec(fed: &Federation, file: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(example("jobs/wdbc.toml")).unwrap();
    let start = text.find("numeric = [").unwrap();
    let end = text[start..].find(']').unwrap() + start + 1;
    let mut text = text.clone();
    text.replace_range(start..end, "numeric = [\"radius_mean\", \"texture_mean\"]");
    let text =
        text.replace("min_sites = 3", "min_sites = 1").replace("round_deadline_secs = 60", "round_deadline_secs = 30");
    let path = fed.dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn manual_approval_decides_which_jobs_run_at_a_site() {
    let mut fed = Federation::start(&["hospital-a"]);
    let home = fed.start_worker_with_toml(
        "hospital-a",
        "wdbc",
        &example("data/wdbc_breast_cancer.csv"),
        "diagnosis",
        NUMERIC,
        40.0,
        20.0,
        "[policy]\napproval = \"manual\"\n",
    );
    let config = home.join("worker.toml");
    let site = |args: &[&str]| {
        let mut all = vec!["site"];
        all.extend_from_slice(args);
        all.extend(["--config", config.to_str().unwrap()]);
        run(&all)
    };
    let submit = |file: &str| {
        let path = spec(&fed, file);
        wait_for(Duration::from_secs(30), "the worker to register", || {
            let out = fed.client("alice", &["job", "submit", path.to_str().unwrap()]);
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
    };
    let wait_pending = |job: &str| {
        wait_for(Duration::from_secs(30), "the offer to wait for approval", || {
            let out = site(&["pending"]);
            String::from_utf8_lossy(&out.stdout).contains(job).then_some(())
        })
    };

    let approved = submit("approved.toml");
    wait_pending(&approved);
    // Not approved yet: the job is still being offered.
    let status = String::from_utf8_lossy(&fed.client("alice", &["job", "status", &approved]).stdout).to_string();
    assert!(status.contains("state      offering"), "{status}");
    // What the hospital reads before it decides: the spec, who asked, the
    // policy's verdict point by point, the ε the dataset would reach.
    let shown = String::from_utf8_lossy(&site(&["show", &approved]).stdout).to_string();
    for expected in [
        "submitted by alice",
        "numeric    radius_mean, texture_mean",
        "privacy    σ 1, clip C 1, δ 1e-5",
        "ok   model",
        "ok   training",
        "ok   schema",
        "ok   per-job cap    planned ε",
        "ok   budget         dataset at ε ",
        "model      logistic_regression",
        "offer      pending",
        "decision   none yet",
    ] {
        assert!(shown.contains(expected), "{expected:?} not in:\n{shown}");
    }
    let out = site(&["approve", &approved, "--as", "sam"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fed.client("alice", &["job", "watch", &approved]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    let rejected = submit("rejected.toml");
    wait_pending(&rejected);
    let out = site(&["reject", &rejected, "--reason", "not on our research agenda"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = fed.client("alice", &["job", "watch", &rejected]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The scientist learns the code; the steward's words stay at the site.
    assert!(stdout.contains("refused") && stdout.contains("not_approved"), "{stdout}");
    assert!(!stdout.contains("research agenda"), "{stdout}");

    // Deciding again is refused; nothing is pending any more.
    let out = site(&["approve", &rejected]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("job \"{rejected}\" was already rejected by ")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The refusal's local detail is the site's to read.
    let shown = String::from_utf8_lossy(&site(&["show", &rejected]).stdout).to_string();
    assert!(
        shown.contains("the coordinator was told not_approved only") && shown.contains("not on our research agenda"),
        "{shown}"
    );

    // An offer the budget would refuse anyway is refused without asking anyone.
    let greedy = spec(&fed, "greedy.toml");
    let text = std::fs::read_to_string(&greedy).unwrap().replace("noise_multiplier = 1.0", "noise_multiplier = 0.3");
    std::fs::write(&greedy, text).unwrap();
    // The coordinator's plan already says so at submit; nothing reaches the site to decide.
    let out = fed.client("alice", &["job", "submit", greedy.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(job_cap_exceeded)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&site(&["pending"]).stdout).contains("no offers waiting"));

    // An offer whose job is stopped is no longer pending, and deciding it records nothing.
    let stopped = submit("stopped.toml");
    wait_pending(&stopped);
    assert!(fed.client("alice", &["job", "cancel", &stopped]).status.success());
    wait_for(Duration::from_secs(30), "the stopped offer to leave the pending list", || {
        (!String::from_utf8_lossy(&site(&["pending"]).stdout).contains(&stopped)).then_some(())
    });
    let out = site(&["approve", &stopped]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("was stopped by the coordinator before it was decided; nothing was recorded")
    );

    // The hospital reads its own budgets and ledger with its worker config.
    let ledger: Vec<serde_json::Value> = serde_json::from_slice(&site(&["ledger", "--json"]).stdout).unwrap();
    assert!(ledger.iter().any(|e| e["job_id"] == approved.as_str() && e["mechanism"] == "dp_sgd"));
    let budget: Vec<serde_json::Value> = serde_json::from_slice(&site(&["budget", "--json"]).stdout).unwrap();
    let total = budget.iter().find(|r| r["job_id"].is_null()).unwrap();
    let mirrored: Vec<serde_json::Value> =
        serde_json::from_slice(&fed.client("rita", &["budget", "--json"]).stdout).unwrap();
    let theirs = mirrored.iter().find(|r| r["job_id"].is_null()).unwrap();
    assert!(
        (total["epsilon_spent"].as_f64().unwrap() - theirs["epsilon_spent"].as_f64().unwrap()).abs() < 1e-9,
        "{total} vs {theirs}"
    );
    assert!(String::from_utf8_lossy(&site(&["pending"]).stdout).contains("no offers waiting"));
    // The site's audit log records both decisions and verifies.
    let audit = home.join("state").join("audit.log");
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.contains("offer.accepted") && text.contains("offer.refused"), "{text}");
    // Who decided, in the site's audit.
    let approval = text.lines().find(|l| l.contains("\"kind\":\"offer.approved\"")).unwrap();
    let entry: serde_json::Value = serde_json::from_str(approval).unwrap();
    let detail: serde_json::Value = match &entry["detail"] {
        serde_json::Value::String(s) => serde_json::from_str(s).unwrap(),
        other => other.clone(),
    };
    assert!(detail["by"] == "sam" && detail["at_unix_ms"].as_i64().unwrap() > 0, "{approval}");
    assert!(text.lines().any(|l| l.contains("\"kind\":\"offer.rejected\"")), "{text}");
    assert!(run(&["audit", "verify", audit.to_str().unwrap()]).status.success());
}
