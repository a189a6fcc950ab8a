use super::*;

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
        size_noise_scale: 100.0,
    }
}

fn charge(job: &str, round: u32, steps: u64) -> Charge {
    Charge {
        job_id: job.to_string(),
        spec_hash: "h".to_string(),
        round,
        mechanism: Mechanism::DpSgd,
        noise_multiplier: 2.0,
        sample_rate: 0.01,
        clip_norm: 1.0,
        steps,
        delta: 1e-5,
    }
}

/// A plan of `steps` DP-SGD steps at q = 0.01, σ = 2 for 1,000 released rows.
fn plan(steps: u64) -> SitePlan {
    SitePlan {
        train_rows: 1000,
        sample_rate: 0.01,
        steps_per_round: steps,
        expected_batch: 10.0,
        charges: vec![PlannedCharge { mechanism: Mechanism::DpSgd, sample_rate: 0.01, noise_multiplier: 2.0, steps }],
    }
}

/// [`plan`] with `evaluations` evaluations at σ = 50.
fn plan_with_evaluations(steps: u64, evaluations: u64) -> SitePlan {
    let mut p = plan(steps);
    p.charges.push(PlannedCharge {
        mechanism: Mechanism::Evaluation,
        sample_rate: 1.0,
        noise_multiplier: 50.0,
        steps: evaluations,
    });
    p
}

fn offer<'a>(job_id: &'a str, spec_hash: &'a str, spec_json: &'a str) -> Offered<'a> {
    Offered { job_id, spec_hash, spec_json, submitted_by: "alice" }
}

fn sizes(train: u64, test: u64, digest: &str) -> SplitSizes {
    SplitSizes { train, test, digest: digest.to_string() }
}

#[test]
fn reservations_stop_two_jobs_taking_the_last_of_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("l.sqlite"), "site-a").unwrap();
    let d = dataset(0.9, 0.8);
    // One job of 1,000 steps at q = 0.01, σ = 2 costs ε ≈ 0.69 alone.
    let first = ledger.decide(&d, &offer("job-1", "h1", "{}"), &plan(1000), 1e-5).unwrap();
    assert!(first.refusal.is_none(), "{first:?}");
    let mut acc = meridian_privacy::accountant::RdpAccountant::new();
    acc.compose_poisson_gaussian(0.01, 2.0, 1000).unwrap();
    assert!((first.planned_epsilon - acc.epsilon(1e-5).unwrap().epsilon).abs() < 1e-12);
    assert_eq!(first.train_examples, 1000);
    // A second identical job would take the dataset past 0.9 once the first's reservation counts.
    let second = ledger.decide(&d, &offer("job-2", "h2", "{}"), &plan(1000), 1e-5).unwrap();
    let refusal = second.refusal.clone().expect("refused");
    assert_eq!(refusal.reason.code(), ReasonCode::BudgetExceeded);
    // What the dataset would reach: both jobs composed by RDP, not their ε summed.
    let mut both = meridian_privacy::accountant::RdpAccountant::new();
    both.compose_poisson_gaussian(0.01, 2.0, 2000).unwrap();
    assert!((second.projected_epsilon - both.epsilon(1e-5).unwrap().epsilon).abs() < 1e-12);
    assert!(second.projected_epsilon < 2.0 * first.planned_epsilon);
    assert!(
        refusal.detail.contains(&format!("would bring the dataset to ε {:.3}", second.projected_epsilon)),
        "{}",
        refusal.detail
    );
    // Decisions are recorded once: asking again returns the same answer.
    assert_eq!(ledger.decide(&d, &offer("job-2", "h2", "{}"), &plan(10), 1e-5).unwrap(), second);
    // Over the per-job cap.
    let big = ledger.decide(&d, &offer("job-3", "h3", "{}"), &plan(5000), 1e-5).unwrap();
    let refusal = big.refusal.expect("refused");
    assert_eq!(refusal.reason.code(), ReasonCode::JobCapExceeded);
    assert!(refusal.detail.contains("exceeds the per-job cap ε 0.800"), "{}", refusal.detail);
    // Once the first job has charged part of its plan, only the rest stays reserved.
    ledger.charge(&d, &charge("job-1", 1, 400)).unwrap();
    let third = ledger.decide(&d, &offer("job-4", "h4", "{}"), &plan(10), 1e-5).unwrap();
    let mut spent_and_reserved = meridian_privacy::accountant::RdpAccountant::new();
    spent_and_reserved.compose_poisson_gaussian(0.01, 2.0, 1010).unwrap();
    assert!((third.projected_epsilon - spent_and_reserved.epsilon(1e-5).unwrap().epsilon).abs() < 1e-12);
}

#[test]
fn charges_compose_are_durable_and_never_overspend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite");
    let d = dataset(1.0, 1.0);
    {
        let ledger = Ledger::open(&path, "site-a").unwrap();
        ledger.decide(&d, &offer("job-1", "h", "{\"spec\":1}"), &plan_with_evaluations(1000, 1), 1e-5).unwrap();
        let e1 = ledger.charge(&d, &charge("job-1", 1, 300)).unwrap();
        let e2 = ledger.charge(&d, &charge("job-1", 2, 300)).unwrap();
        assert_eq!((e1.seq, e2.seq), (1, 2));
        assert_eq!(e2.charged(), Mechanism::DpSgd);
        // An evaluation of the same round is a charge of its own.
        let eval = Charge {
            mechanism: Mechanism::Evaluation,
            sample_rate: 1.0,
            noise_multiplier: 50.0,
            steps: 1,
            ..charge("job-1", 2, 1)
        };
        let e3 = ledger.charge(&d, &eval).unwrap();
        assert_eq!(e3.seq, 3);
        // Composition by RDP, not by summing ε.
        let mut acc = meridian_privacy::accountant::RdpAccountant::new();
        acc.compose_poisson_gaussian(0.01, 2.0, 600).unwrap();
        acc.compose_poisson_gaussian(1.0, 50.0, 1).unwrap();
        assert!((e3.epsilon_job - acc.epsilon(1e-5).unwrap().epsilon).abs() < 1e-12);
        assert!(e2.epsilon_job < e1.epsilon_round + e2.epsilon_round);
        // Charging the same release again returns the committed entry, charging nothing more.
        assert_eq!(ledger.charge(&d, &charge("job-1", 2, 300)).unwrap(), e2);
        assert_eq!(ledger.entry("job-1", 2, Mechanism::Evaluation).unwrap(), Some(e3));
    }
    // After a restart everything is still there, and the accepted job can be resumed.
    let ledger = Ledger::open(&path, "site-a").unwrap();
    assert_eq!(ledger.entries().unwrap().len(), 3);
    assert_eq!(ledger.accepted_job("job-1").unwrap(), Some(("{\"spec\":1}".to_string(), "h".to_string())));
    // A charge past the budget (here lowered since the job was accepted) is refused and not recorded.
    let err = ledger.charge(&dataset(0.3, 1.0), &charge("job-1", 3, 300)).unwrap_err();
    assert!(matches!(err, LedgerError::OverBudget { round: 3, .. }), "{err}");
    assert_eq!(ledger.entries().unwrap().len(), 3);
    // So is one the accepted plan does not hold (a second evaluation, a
    // round at another noise), however small, and one for a job not accepted.
    let eval = Charge {
        mechanism: Mechanism::Evaluation,
        sample_rate: 1.0,
        noise_multiplier: 50.0,
        steps: 1,
        ..charge("job-1", 3, 1)
    };
    assert!(matches!(ledger.charge(&d, &eval), Err(LedgerError::BeyondPlan { .. })));
    let noisier = Charge { noise_multiplier: 3.0, ..charge("job-1", 4, 1) };
    assert!(matches!(ledger.charge(&d, &noisier), Err(LedgerError::BeyondPlan { .. })));
    assert!(matches!(ledger.charge(&d, &charge("job-1", 4, 401)), Err(LedgerError::BeyondPlan { .. })));
    assert!(matches!(ledger.charge(&d, &charge("job-9", 1, 1)), Err(LedgerError::BeyondPlan { .. })));
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

#[test]
fn sizes_are_released_once_per_version_of_the_records_and_charged() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("l.sqlite"), "site-a").unwrap();
    let d = dataset(5.0, 1.0);
    let first = ledger.release_sizes(&d, &sizes(8_000, 2_000, "aaa")).unwrap();
    assert_eq!(first.release, 1);
    // σ = 100: within 6σ of the truth, and almost surely not exact for both.
    assert!(first.train_rows.abs_diff(8_000) < 600 && first.test_rows.abs_diff(2_000) < 600, "{first:?}");
    let entry = &ledger.entries().unwrap()[0];
    assert_eq!(entry.seq, first.ledger_seq);
    assert_eq!((entry.charged(), entry.job_id.as_str(), entry.round), (Mechanism::SizeRelease, "", 1));
    assert_eq!((entry.sample_rate, entry.noise_multiplier, entry.steps), (1.0, 100.0, 1));
    // The same records again: the same release, nothing charged.
    assert_eq!(ledger.release_sizes(&d, &sizes(8_000, 2_000, "aaa")).unwrap(), first);
    assert_eq!(ledger.entries().unwrap().len(), 1);
    // Changed records: a second release, charged and composed with the first.
    let second = ledger.release_sizes(&d, &sizes(8_100, 2_010, "bbb")).unwrap();
    assert_eq!(second.release, 2);
    let entries = ledger.entries().unwrap();
    assert_eq!(entries.len(), 2);
    let mut acc = meridian_privacy::accountant::RdpAccountant::new();
    acc.compose_poisson_gaussian(1.0, 100.0, 2).unwrap();
    assert!((entries[1].epsilon_dataset - acc.epsilon(1e-5).unwrap().epsilon).abs() < 1e-12);
    assert_eq!(ledger.current_sizes("heart").unwrap(), Some(second.clone()));
    // A changed split is a change too.
    let resplit = DatasetConfig { split_seed: 9, ..d.clone() };
    assert_eq!(ledger.release_sizes(&resplit, &sizes(8_100, 2_010, "bbb")).unwrap().release, 3);
    // No budget for a release: nothing is released or charged.
    let poor = DatasetConfig { name: "poor".into(), budget_epsilon: 0.01, ..d };
    assert!(matches!(ledger.release_sizes(&poor, &sizes(10, 2, "ccc")), Err(LedgerError::OverBudget { .. })));
    assert_eq!(ledger.current_sizes("poor").unwrap(), None);
}

#[test]
fn a_ledger_from_before_mechanisms_is_migrated_entry_for_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.sqlite");
    {
        // The tables as the previous version made them, with a job's size (round 0) and a round.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            r#"
            CREATE TABLE ledger (seq INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, dataset TEXT NOT NULL,
                job_id TEXT NOT NULL, round INTEGER NOT NULL, spec_hash TEXT NOT NULL, noise_multiplier REAL NOT NULL,
                sample_rate REAL NOT NULL, clip_norm REAL NOT NULL, steps INTEGER NOT NULL, delta REAL NOT NULL,
                epsilon_round REAL NOT NULL, epsilon_job REAL NOT NULL, epsilon_dataset REAL NOT NULL, accountant TEXT NOT NULL,
                conversion TEXT NOT NULL, library_version TEXT NOT NULL, recorded_at_ms INTEGER NOT NULL, UNIQUE (job_id, round));
            CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
            CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
            CREATE TABLE jobs (job_id TEXT PRIMARY KEY, dataset TEXT NOT NULL, spec_hash TEXT NOT NULL, spec_json TEXT NOT NULL,
                accepted INTEGER NOT NULL, reason TEXT NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
                planned_steps INTEGER NOT NULL, delta REAL NOT NULL, planned_epsilon REAL NOT NULL,
                noisy_examples INTEGER NOT NULL DEFAULT 0, active INTEGER NOT NULL, decided_at_ms INTEGER NOT NULL);
            INSERT INTO ledger VALUES (7, 'site-a', 'heart', 'job-1', 0, 'h', 10.0, 1.0, 1.0, 1, 1e-5, 0.4, 0.4, 0.4, 'rdp', 'dp_accounting-improved', 'v', 1);
            "#,
        )
        .unwrap();
        conn.execute(
            "INSERT INTO ledger VALUES (8, 'site-a', 'heart', 'job-1', 1, 'h', 2.0, 0.01, 1.0, 300, 1e-5, 0.2, 0.5, 0.5, 'rdp', 'dp_accounting-improved', 'v', 2)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO jobs VALUES ('job-1', 'heart', 'h', '{}', 1, '', 2.0, 0.01, 1000, 1e-5, 0.7, 990, 1, 1)",
            [],
        )
        .unwrap();
    }
    let before: Vec<(i64, u32, f64)> = {
        let conn = Connection::open(&path).unwrap();
        let mut stmt = conn.prepare("SELECT seq, round, epsilon_dataset FROM ledger ORDER BY seq").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
    };
    let ledger = Ledger::open(&path, "site-a").unwrap();
    let after = ledger.entries().unwrap();
    assert_eq!(after.iter().map(|e| (e.seq as i64, e.round, e.epsilon_dataset)).collect::<Vec<_>>(), before);
    assert_eq!(after.iter().map(pb::LedgerEntry::charged).collect::<Vec<_>>(), [Mechanism::JobSize, Mechanism::DpSgd]);
    // Still append-only, and the sequence goes on after the migrated entries.
    assert!(ledger.lock().execute("UPDATE ledger SET steps = 0", []).unwrap_err().to_string().contains("append-only"));
    let d = dataset(10.0, 10.0);
    assert_eq!(ledger.charge(&d, &charge("job-1", 2, 300)).unwrap().seq, 9);
    // The old job's reservation is its DP-SGD steps not yet charged (1000 - 600).
    let reserved = Ledger::reserved(&ledger.lock(), "heart", "").unwrap();
    assert_eq!(reserved, vec![(0.01, 2.0, 400)]);
    // Opening again changes nothing.
    drop(ledger);
    assert_eq!(Ledger::open(&path, "site-a").unwrap().entries().unwrap().len(), 3);
}
