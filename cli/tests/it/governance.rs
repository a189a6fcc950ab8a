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
    let text = text.replace("min_sites = 3", "min_sites = 1").replace("round_deadline_secs = 60", "round_deadline_secs = 30");
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
    let out = site(&["approve", &approved]);
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
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no pending offer for job \"{rejected}\"")));
    assert!(String::from_utf8_lossy(&site(&["pending"]).stdout).contains("no offers waiting"));
    // The site's audit log records both decisions and verifies.
    let audit = home.join("state").join("audit.log");
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(text.contains("offer.accepted") && text.contains("offer.refused"), "{text}");
    assert!(run(&["audit", "verify", audit.to_str().unwrap()]).status.success());
}
