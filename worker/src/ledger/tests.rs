use super::*;

const COUNT: CountRelease = CountRelease { examples: 1000, noise_scale: 100.0 };

fn dataset(budget: f64, cap: f64) -> DatasetConfig {
    DatasetConfig {
        name: "heart".to_string(),
        path: "unused.csv".into(),
        label: "y".to_string(),
        numeric: vec![],
        categorical: vec![],
        budget_epsilon: budget,
        budget_delta: 1e-5,
        job_epsilon_cap: cap,
        test_fraction: 0.2,
        split_seed: 0,
    }
}

fn charge(job: &str, round: u32, steps: u64) -> Charge {
    Charge {
        job_id: job.to_string(),
        spec_hash: "h".to_string(),
        round,
        noise_multiplier: 2.0,
        sample_rate: 0.01,
        clip_norm: 1.0,
        steps,
        delta: 1e-5,
    }
}

#[test]
fn reservations_stop_two_jobs_taking_the_last_of_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("l.sqlite"), "site-a").unwrap();
    let d = dataset(0.9, 0.8);
    // One job of 1,000 steps at q = 0.01, σ = 2 costs ε ≈ 0.69 alone.
    let first = ledger.decide(&d, "job-1", "h1", "{}", 0.01, 2.0, 1000, 1e-5, COUNT).unwrap();
    assert!(first.refusal.is_none(), "{first:?}");
    // Planned: 1,000 DP-SGD steps and one release of the training-set size (σ = 100), composed by RDP.
    let mut acc = privacy::accountant::RdpAccountant::new();
    acc.compose_poisson_gaussian(0.01, 2.0, 1000).unwrap();
    acc.compose_poisson_gaussian(1.0, 100.0, 1).unwrap();
    assert!((first.planned_epsilon - acc.epsilon(1e-5).unwrap().epsilon).abs() < 1e-12);
    assert!(first.train_examples.abs_diff(1000) < 1000, "{}", first.train_examples);
    // A second identical job would take the dataset past 0.9 once the first's reservation counts.
    let second = ledger.decide(&d, "job-2", "h2", "{}", 0.01, 2.0, 1000, 1e-5, COUNT).unwrap();
    let refusal = second.refusal.clone().expect("refused");
    assert_eq!(refusal.reason.code(), proto::reason::ReasonCode::BudgetExceeded);
    assert!(refusal.detail.starts_with("dataset \"heart\": planned ε"), "{}", refusal.detail);
    // Decisions are recorded once: asking again returns the same answer.
    assert_eq!(ledger.decide(&d, "job-2", "h2", "{}", 0.01, 2.0, 10, 1e-5, COUNT).unwrap(), second);
    // Over the per-job cap.
    let big = ledger.decide(&d, "job-3", "h3", "{}", 0.01, 2.0, 5000, 1e-5, COUNT).unwrap();
    let refusal = big.refusal.expect("refused");
    assert_eq!(refusal.reason.code(), proto::reason::ReasonCode::JobCapExceeded);
    assert!(refusal.detail.contains("exceeds the per-job cap ε 0.800"), "{}", refusal.detail);
}

#[test]
fn charges_compose_are_durable_and_never_overspend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite");
    let d = dataset(1.0, 1.0);
    {
        let ledger = Ledger::open(&path, "site-a").unwrap();
        ledger.decide(&d, "job-1", "h", "{\"spec\":1}", 0.01, 2.0, 1000, 1e-5, COUNT).unwrap();
        // The acceptance charged the count release as round 0.
        let release = ledger.entry("job-1", 0).unwrap().unwrap();
        assert_eq!((release.seq, release.sample_rate, release.noise_multiplier, release.steps), (1, 1.0, 100.0, 1));
        let e1 = ledger.charge(&d, &charge("job-1", 1, 300)).unwrap();
        let e2 = ledger.charge(&d, &charge("job-1", 2, 300)).unwrap();
        assert_eq!((e1.seq, e2.seq), (2, 3));
        // Composition by RDP, not by summing ε.
        let mut acc = privacy::accountant::RdpAccountant::new();
        acc.compose_poisson_gaussian(0.01, 2.0, 600).unwrap();
        acc.compose_poisson_gaussian(1.0, 100.0, 1).unwrap();
        let composed = acc.epsilon(1e-5).unwrap().epsilon;
        assert!((e2.epsilon_job - composed).abs() < 1e-12);
        assert!(e2.epsilon_job < e1.epsilon_round + e2.epsilon_round);
        // Charging the same round again returns the committed entry, charging nothing more.
        assert_eq!(ledger.charge(&d, &charge("job-1", 2, 300)).unwrap(), e2);
    }
    // After a restart everything is still there, and the accepted job can be resumed.
    let ledger = Ledger::open(&path, "site-a").unwrap();
    assert_eq!(ledger.entries().unwrap().len(), 3);
    assert_eq!(ledger.accepted_job("job-1").unwrap(), Some(("{\"spec\":1}".to_string(), "h".to_string())));
    // A charge past the budget is refused and not recorded.
    let err = ledger.charge(&d, &charge("job-1", 3, 5000)).unwrap_err();
    assert!(matches!(err, LedgerError::OverBudget { round: 3, .. }), "{err}");
    assert_eq!(ledger.entries().unwrap().len(), 3);
    assert!(ledger.spent("heart", 1e-5).unwrap() <= 1.0);
    // The ledger is append-only.
    let conn = ledger.lock();
    let err = conn.execute("DELETE FROM ledger", []).unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    drop(conn);
    ledger.finish_job("job-1").unwrap();
    assert_eq!(ledger.accepted_job("job-1").unwrap(), None);
}
