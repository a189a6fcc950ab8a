//! Faults at a site: a worker killed with SIGKILL at arbitrary moments of
//! its rounds, and two jobs racing for the last of a budget. Privacy spent is
//! never exceeded nor refunded, and the job still completes. Faults at the
//! coordinator: SIGKILL at each phase of a round, three times over, and a
//! partition longer than the idle timeout.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, SystemTime};

use meridian_store::checkpoint;
use rusqlite::Connection;

use crate::util::{Federation, WDBC_NUMERIC, WdbcJob, example, free_port, wait_for};

const NUMERIC: &[&str] = WDBC_NUMERIC;

fn job_spec(fed: &Federation, file: &str, rounds: u32, local_epochs: f64, hidden: &str) -> std::path::PathBuf {
    WdbcJob { rounds, local_epochs, hidden, ..WdbcJob::default() }.write(fed, file)
}

/// The rounds of `job_id` whose DP-SGD is charged in the ledger of the worker at `home`, in order.
fn charged_rounds(home: &std::path::Path, job_id: &str) -> Vec<u32> {
    Connection::open(home.join("state").join("ledger.sqlite"))
        .unwrap()
        .prepare("SELECT round FROM ledger WHERE job_id = ?1 AND mechanism = 'dp_sgd' ORDER BY round")
        .unwrap()
        .query_map([job_id], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The coordinator's database in the federation `fed`.
fn coordinator_db(fed: &Federation) -> Connection {
    Connection::open(fed.dir.join("coord-state").join("coordinator.sqlite")).unwrap()
}

/// `SELECT COUNT(*) FROM {table} WHERE job_id = ?1 AND {condition}` on `db`.
fn count(db: &Connection, table: &str, condition: &str, job_id: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table} WHERE job_id = ?1 AND {condition}");
    db.query_row(&sql, [job_id], |r| r.get(0)).unwrap()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn worker_killed_at_any_moment_never_overspends_and_the_job_completes() {
    let mut fed = Federation::start(&["hospital-a"]);
    let home = fed.start_worker("hospital-a", "wdbc", &example("data/wdbc_breast_cancer.csv"), "diagnosis", NUMERIC);
    let spec = job_spec(&fed, "long.toml", 6, 40.0, "[128, 128]");
    let job_id = wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then(|| stdout(&out))
    });
    // Kill the worker at pseudo-random moments (10 to 400 ms apart), restarting it each time.
    let mut seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut kills = 0;
    for _ in 0..12 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(10 + seed % 390));
        let status = fed.client("alice", &["job", "status", &job_id, "--json"]);
        let state: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
        if state["state"] != "offering" && state["state"] != "running" {
            break;
        }
        fed.kill_and_restart_worker(1, &home);
        kills += 1;
    }
    eprintln!("killed the worker {kills} times");
    assert!(kills >= 3, "the job ended before the worker could be killed 3 times");
    let out = fed.client("alice", &["job", "watch", &job_id]);
    assert!(
        out.status.success(),
        "after {kills} kills: {}\n{}",
        stdout(&out),
        std::fs::read_to_string(home.join("worker.log")).unwrap_or_default()
    );

    let rounds = charged_rounds(&home, &job_id);
    // One charge per round, every round charged, none twice.
    assert_eq!(rounds, vec![1, 2, 3, 4, 5, 6], "after {kills} kills");
    let ledger = Connection::open(home.join("state").join("ledger.sqlite")).unwrap();
    let max_dataset_eps: f64 = ledger.query_row("SELECT MAX(epsilon_dataset) FROM ledger", [], |r| r.get(0)).unwrap();
    assert!(max_dataset_eps <= 40.0);
    // The coordinator's mirror has every charge: DP-SGD, clip counts, evaluations.
    let local: i64 =
        ledger.query_row("SELECT COUNT(*) FROM ledger WHERE job_id = ?1", [&job_id], |r| r.get(0)).unwrap();
    let mirrored = count(&coordinator_db(&fed), "ledger_mirror", "site = 'hospital-a'", &job_id);
    assert_eq!(mirrored, local);
    assert_eq!(count(&coordinator_db(&fed), "ledger_mirror", "mechanism = 'dp_sgd'", &job_id), 6);
}

#[test]
fn two_jobs_racing_for_the_last_of_a_budget_cannot_both_get_it() {
    let mut fed = Federation::start(&["hospital-a"]);
    // One job of this shape plans ε ≈ 1.62 at this site, two together ≈ 2.14: a budget of 1.8 fits one.
    fed.start_worker_with_budget(
        "hospital-a",
        "wdbc",
        &example("data/wdbc_breast_cancer.csv"),
        "diagnosis",
        NUMERIC,
        1.8,
        1.8,
    );
    let one = job_spec(&fed, "one.toml", 2, 1.0, "[8]");
    let two = job_spec(&fed, "two.toml", 2, 1.0, "[8]");
    wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("rita", &["budget", "--json"]);
        stdout(&out).contains("hospital-a").then_some(())
    });
    let ids: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| stdout(&fed.client("alice", &["job", "submit", one.to_str().unwrap()])));
        let b = s.spawn(|| stdout(&fed.client("alice", &["job", "submit", two.to_str().unwrap()])));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    let outcomes: Vec<String> = ids.iter().map(|id| stdout(&fed.client("alice", &["job", "watch", id]))).collect();
    let completed = outcomes.iter().filter(|o| o.contains("state      completed")).count();
    let refused = outcomes.iter().filter(|o| o.contains("refused: budget_exceeded")).count();
    assert_eq!((completed, refused), (1, 1), "{outcomes:#?}");
    // The refusal says what is true: the ε the dataset would reach, by RDP
    // composition of both jobs (less than the sum of their ε), over its budget.
    let statuses: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| serde_json::from_str(&stdout(&fed.client("alice", &["job", "status", id, "--json"]))).unwrap())
        .collect();
    let site = |s: &serde_json::Value, key: &str| s["sites"][0][key].as_f64().unwrap();
    let (done, refused) =
        if statuses[0]["state"] == "completed" { (&statuses[0], &statuses[1]) } else { (&statuses[1], &statuses[0]) };
    let projected = site(refused, "projected_epsilon");
    assert!(
        projected > 1.8 && projected < site(done, "planned_epsilon") + site(refused, "planned_epsilon"),
        "{refused}"
    );
    assert_eq!(site(refused, "budget_epsilon"), 1.8);
    let text = outcomes.iter().find(|o| o.contains("budget_exceeded")).unwrap();
    assert!(text.contains(&format!("would bring the dataset to ε {projected:.3}, composed with everything spent and reserved, over its budget of ε 1.800")), "{text}");
    // No "ε left" anywhere: a budget minus what was spent means nothing under composition.
    let budget = stdout(&fed.client("rita", &["budget"]));
    assert!(!budget.contains("left") && budget.contains("ε spent"), "{budget}");
    assert!(!stdout(&fed.client("rita", &["budget", "--json"])).contains("remaining"));
}

/// The moments of a round where a coordinator crash matters, as named by
/// `meridian_sys::failpoint` calls in the coordinator.
const PHASES: [&str; 7] = [
    "round.assign",     // a training task is being handed to a site
    "update.receive",   // an update's chunks are streaming in
    "update.rename",    // the update is written to a temporary file, not yet in place
    "update.persisted", // the update is committed, not yet acknowledged to the site
    "round.aggregate",  // the updates are folded, the new model not yet written
    "model.rename",     // the new model is half written (temporary file, not renamed)
    "round.commit",     // the new model is in place, the round not yet committed
];

#[test]
fn coordinator_killed_at_every_phase_of_a_round_carries_the_job_to_completion() {
    let mut fed = Federation::start_on(&["hospital-a", "hospital-b"], free_port());
    let data = example("data/wdbc_breast_cancer.csv");
    let homes = [
        fed.start_worker("hospital-a", "wdbc", &data, "diagnosis", NUMERIC),
        fed.start_worker("hospital-b", "wdbc", &data, "diagnosis", NUMERIC),
    ];
    let spec = WdbcJob { rounds: 10, local_epochs: 20.0, hidden: "[256, 256]", min_sites: 2, ..WdbcJob::default() }
        .write(&fed, "ten.toml");
    let job_id = wait_for(Duration::from_secs(30), "both workers to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then(|| stdout(&out))
    });
    // Three times through every phase: each restart arms the next phase, and
    // the coordinator must reach it and die there (SIGKILL, by its own hand).
    let mut kills = 0;
    for cycle in 0..3 {
        for phase in PHASES {
            fed.restart_coordinator_armed(phase);
            let Some(status) = fed.wait_for_coordinator_exit(Duration::from_secs(90)) else {
                panic!("cycle {cycle}: the coordinator never reached {phase}\n{}", fed.coordinator_log());
            };
            assert_eq!(status.signal(), Some(9), "cycle {cycle}, {phase}: {status}\n{}", fed.coordinator_log());
            kills += 1;
        }
    }
    assert_eq!(kills, 21);
    fed.kill_and_restart_coordinator();
    let out = fed.client("alice", &["job", "watch", &job_id]);
    assert!(out.status.success(), "after {kills} kills: {}\n{}", stdout(&out), fed.coordinator_log());
    let log = fed.coordinator_log();
    for phase in PHASES {
        let at = format!("killing this process at {phase} ");
        assert_eq!(log.matches(&at).count(), 3, "{phase}");
    }

    let coordinator = coordinator_db(&fed);
    assert_eq!(count(&coordinator, "rounds", "state = 'aggregated'", &job_id), 10);
    for home in &homes {
        assert_eq!(charged_rounds(home, &job_id), (1..=10).collect::<Vec<u32>>(), "{}", home.display());
    }
    // Every acknowledged update was counted once: one update row per site and round.
    assert_eq!(count(&coordinator, "updates", "1", &job_id), 20);
    assert_eq!(count(&coordinator, "ledger_mirror", "mechanism = 'dp_sgd'", &job_id), 20);
    // Every release of the job at every site is in the mirror, entry for entry.
    for home in &homes {
        let site = home.file_name().unwrap().to_str().unwrap();
        let local: i64 = Connection::open(home.join("state").join("ledger.sqlite"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM ledger WHERE job_id = ?1", [&job_id], |r| r.get(0))
            .unwrap();
        assert_eq!(count(&coordinator, "ledger_mirror", &format!("site = '{site}'"), &job_id), local, "{site}");
    }

    // Each round's model is exactly the previous one plus the weighted mean
    // of that round's stored updates: what an uninterrupted run with the
    // same updates computes, up to the order of summation.
    let job_dir = fed.dir.join("coord-state").join("jobs").join(&job_id);
    let mut model = checkpoint::read(&job_dir.join("model-r0000.bin")).unwrap();
    for round in 1..=10u32 {
        let rows: Vec<(String, f64)> = coordinator
            .prepare("SELECT path, num_examples FROM updates WHERE job_id = ?1 AND round = ?2")
            .unwrap()
            .query_map(rusqlite::params![job_id, round], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows.len(), 2, "round {round}");
        let mut sum = vec![0.0f64; model.len()];
        let total: f64 = rows.iter().map(|(_, w)| w).sum();
        for (path, weight) in &rows {
            let update = checkpoint::read(std::path::Path::new(path)).unwrap();
            assert_eq!(update.len(), model.len());
            for (s, u) in sum.iter_mut().zip(&update) {
                *s += weight * f64::from(*u);
            }
        }
        let next = checkpoint::read(&job_dir.join(format!("model-r{round:04}.bin"))).unwrap();
        for (i, ((m, s), n)) in model.iter().zip(&sum).zip(&next).enumerate() {
            let expected = (f64::from(*m) + s / total) as f32;
            assert!(
                (expected - n).abs() <= 1e-5 * expected.abs().max(1.0),
                "round {round}, parameter {i}: {n} != {expected}"
            );
        }
        model = next;
    }
}

/// Workers cut off (frozen with SIGSTOP) for longer than the idle timeout:
/// the job does not hang on them. It completes with the sites that remain,
/// and the frozen site rejoins when it thaws.
#[test]
fn a_partitioned_site_does_not_hang_the_job() {
    let mut fed = Federation::start_with(&["hospital-a", "hospital-b"], 0, "idle_timeout_secs = 2");
    let data = example("data/wdbc_breast_cancer.csv");
    fed.start_worker("hospital-a", "wdbc", &data, "diagnosis", NUMERIC);
    fed.start_worker("hospital-b", "wdbc", &data, "diagnosis", NUMERIC);
    // A deadline far beyond the test's patience: only the idle timeout can end the wait.
    let spec = WdbcJob { rounds: 6, local_epochs: 10.0, hidden: "[64, 64]", deadline_secs: 600, ..WdbcJob::default() }
        .write(&fed, "partition.toml");
    wait_for(Duration::from_secs(30), "both workers to register", || {
        let out = fed.client("rita", &["budget", "--json"]);
        let text = stdout(&out);
        (text.contains("hospital-a") && text.contains("hospital-b")).then_some(())
    });
    let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job_id = stdout(&out);
    wait_for(Duration::from_secs(30), "round 2", || {
        let out = fed.client("alice", &["job", "status", &job_id, "--json"]);
        let state: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
        (state["current_round"].as_u64()? >= 2).then_some(())
    });
    let frozen = fed.daemons[2].0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &frozen]).status().unwrap().success());
    let finished = wait_for(Duration::from_secs(120), "the job to end without the frozen site", || {
        let out = fed.client("alice", &["job", "status", &job_id, "--json"]);
        let state: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
        matches!(state["state"].as_str(), Some("completed" | "failed")).then_some(state)
    });
    assert!(std::process::Command::new("kill").args(["-CONT", &frozen]).status().unwrap().success());
    assert_eq!(finished["state"], "completed", "{finished}");
    let audit = std::fs::read_to_string(fed.dir.join("coord-state").join("audit.log")).unwrap();
    assert!(audit.contains("round.sites_silent") && audit.contains("hospital-b"), "{audit}");
    assert!(audit.contains("no heartbeat for more than the idle timeout of 2 s"), "{audit}");
}

#[test]
fn the_mirror_equals_the_sites_ledger_whatever_a_charge_races_with() {
    let mut fed = Federation::start_on(&["hospital-a"], free_port());
    let data = example("data/wdbc_breast_cancer.csv");
    let home = fed.start_worker_with_budget("hospital-a", "wdbc", &data, "diagnosis", NUMERIC, 10_000.0, 20.0);
    let spec = job_spec(&fed, "race.toml", 1, 1.0, "[8]");
    let site_config = home.join("worker.toml");
    wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        out.status.success().then_some(())
    });
    // Cancel each job a moment after submitting it, at some point of its
    // offer, evaluation, training or charge; kill the coordinator now and then.
    let mut seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut jobs = Vec::new();
    for i in 0..50 {
        let out = fed.client("alice", &["job", "submit", spec.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let job = stdout(&out);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(seed % 250));
        let _ = fed.client("alice", &["job", "cancel", &job, "--reason", "racing"]);
        jobs.push(job);
        if i % 10 == 7 {
            fed.kill_and_restart_coordinator();
        }
    }
    let read = |out: std::process::Output| -> Vec<serde_json::Value> {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let local = || read(crate::util::run(&["site", "ledger", "--json", "--config", site_config.to_str().unwrap()]));
    // Within seconds, and without restarting the worker, the mirror is the ledger, entry for entry.
    let (mirror, site) = wait_for(Duration::from_secs(30), "the mirror to equal the site's ledger", || {
        let mirror = read(fed.client("rita", &["budget", "ledger", "--site", "hospital-a", "--json"]));
        let site = local();
        (mirror == site).then_some((mirror, site))
    });
    assert_eq!(mirror, site);
    // The race happened: charges of jobs that were cancelled.
    let charged_then_cancelled = jobs.iter().filter(|j| site.iter().any(|e| e["job_id"] == j.as_str())).count();
    eprintln!("{charged_then_cancelled} of {} cancelled jobs had charges at the site", jobs.len());
    assert!(charged_then_cancelled > 0, "no job was charged before its cancel");
}
