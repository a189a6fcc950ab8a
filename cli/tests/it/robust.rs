//! Byzantine robustness end to end: four honest hospitals running the real
//! worker and one hospital that, in every round, claims a large training set
//! and sends a scaled update (every parameter moved by −10). Five jobs run
//! side by side, one per aggregation rule: FedAvg is dragged far from where
//! the honest sites lead it; the coordinate-wise median, the trimmed mean,
//! Krum and Multi-Krum are not, and their models still classify well.

use std::collections::BTreeMap;
use std::time::Duration;

use meridian_store::checkpoint;
use meridian_wire::pb;

use crate::util::{Federation, RawSite, WDBC_NUMERIC, WdbcJob, example, wait_for};

const NUMERIC: &[&str] = WDBC_NUMERIC;
const HONEST: [&str; 4] = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"];
const ROUNDS: u32 = 3;

fn spec(fed: &Federation, rule: &str, options: &str) -> std::path::PathBuf {
    // The honest sites' AUC must read clearly from their noised histograms.
    let aggregation = format!("[aggregation]\nrule = \"{rule}\"\n{options}\n{}", crate::util::SMALL_DATA_EVALUATION);
    WdbcJob {
        rounds: ROUNDS,
        min_sites: 5,
        deadline_secs: 120,
        max_round_attempts: 1,
        extra: &aggregation,
        ..WdbcJob::default()
    }
    .write(fed, &format!("{rule}.toml"))
}

fn norm_of_difference(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn one_poisoning_hospital_of_five_corrupts_fedavg_but_not_the_robust_rules() {
    let mut sites = HONEST.to_vec();
    sites.push("hospital-x");
    let mut fed = Federation::start(&sites);
    let data = example("data/wdbc_breast_cancer.csv");
    for site in HONEST {
        fed.start_worker(site, "wdbc", &data, "diagnosis", NUMERIC);
    }
    let mut evil = RawSite::join(&fed, "hospital-x", "wdbc", "diagnosis", NUMERIC);
    wait_for(Duration::from_secs(60), "the honest workers to register", || {
        let out = fed.client("rita", &["budget", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        HONEST.iter().all(|s| text.contains(s)).then_some(())
    });
    let rules = [
        ("fedavg", ""),
        ("median", ""),
        ("trimmed_mean", "trim_fraction = 0.2"),
        ("krum", "byzantine = 1"),
        ("multi_krum", "byzantine = 1\nselect = 3"),
    ];
    let mut jobs: BTreeMap<String, &str> = BTreeMap::new();
    for (rule, options) in rules {
        let path = spec(&fed, rule, options);
        let out = fed.client("alice", &["job", "submit", path.to_str().unwrap()]);
        assert!(out.status.success(), "{rule}: {}", String::from_utf8_lossy(&out.stderr));
        jobs.insert(String::from_utf8_lossy(&out.stdout).trim().to_string(), rule);
    }

    // The poisoner: accepts every job claiming 2,000 rows, sends its scaled
    // update every round, and declines to evaluate.
    let mut spec_hashes: BTreeMap<String, String> = BTreeMap::new();
    let mut declined = 0;
    for _ in 0..200 {
        if declined == jobs.len() {
            break;
        }
        let task = evil.next_task(Duration::from_secs(120));
        match task.kind.unwrap() {
            pb::task::Kind::Offer(offer) => {
                spec_hashes.insert(task.job_id.clone(), offer.spec_hash.clone());
                evil.accept(&task.job_id, &offer, 2_000);
            }
            pb::task::Kind::Train(t) => {
                let poison = vec![-10.0f32; t.num_params as usize];
                let reply = evil.push(
                    "hospital-x",
                    &task.job_id,
                    &spec_hashes[&task.job_id],
                    t.round,
                    &t.layout_hash,
                    2_000,
                    &poison,
                );
                assert!(reply.accepted, "{}: {}", jobs[&task.job_id], reply.reason);
            }
            pb::task::Kind::Evaluate(e) => {
                evil.rt
                    .block_on(evil.client.report_failure(pb::TaskFailure {
                        job_id: task.job_id.clone(),
                        round: e.round,
                        reason: Some(pb::SiteReason { code: pb::ReasonCode::Internal as i32, columns: Vec::new() }),
                    }))
                    .unwrap();
                declined += 1;
            }
            pb::task::Kind::Cancel(c) => panic!("{} was stopped: {}", jobs[&task.job_id], c.reason),
        }
    }
    assert_eq!(declined, jobs.len());

    let mut drift = BTreeMap::new();
    let mut auc = BTreeMap::new();
    for (job_id, rule) in &jobs {
        let out = fed.client("alice", &["job", "watch", job_id]);
        assert!(out.status.success(), "{rule}: {}", String::from_utf8_lossy(&out.stdout));
        let status = fed.client("alice", &["job", "status", job_id, "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        let last =
            status["rounds"].as_array().unwrap().iter().find(|r| r["round"] == ROUNDS).cloned().unwrap_or_default();
        auc.insert(*rule, last["eval_metrics"]["auc"].as_f64().unwrap_or(f64::NAN));
        let dir = fed.dir.join("coord-state").join("jobs").join(job_id);
        let start = checkpoint::read(&dir.join("model-r0000.bin")).unwrap();
        let end = checkpoint::read(&dir.join(format!("model-r{ROUNDS:04}.bin"))).unwrap();
        drift.insert(*rule, norm_of_difference(&start, &end));
    }
    eprintln!("distance moved from the initial model: {drift:?}\nfinal AUC at the honest sites: {auc:?}");
    // FedAvg moves every parameter by about 10 × 2000 / (2000 + 4 × ~364) ≈ 6
    // per round; the robust rules move the model only as far as honest training does.
    for rule in ["median", "trimmed_mean", "krum", "multi_krum"] {
        assert!(drift["fedavg"] > 5.0 * drift[rule], "{rule} drifted like FedAvg: {drift:?}");
        assert!(auc[rule] >= 0.8, "{rule}: AUC {} at the honest sites ({auc:?})", auc[rule]);
    }
}
