//! Tests of ledger composition, budgets and the serialized forms.

use super::*;

fn entry(
    job_id: &str,
    round: u32,
    sample_rate: f64,
    noise_multiplier: f64,
    steps: u64,
) -> LedgerEntry {
    LedgerEntry {
        job_id: job_id.to_owned(),
        round,
        dataset: "cohort-a".to_owned(),
        site: "site-1".to_owned(),
        noise_multiplier,
        sample_rate,
        clip_norm: 1.0,
        steps,
        delta: 1e-5,
        epsilon_round: 0.0,
        epsilon_job: 0.0,
        epsilon_dataset: 0.0,
        accountant: ACCOUNTANT_RDP.to_owned(),
        conversion: CONVERSION_DP_ACCOUNTING_IMPROVED.to_owned(),
        library_version: LIBRARY_VERSION.to_owned(),
        recorded_at_unix_ms: 1_700_000_000_000,
    }
}

#[test]
fn empty_ledger_spends_nothing() {
    assert_eq!(dataset_epsilon(&[], 1e-5).unwrap().epsilon, 0.0);
}

#[test]
fn dataset_epsilon_composes_by_rdp() {
    let entries = [
        entry("job-1", 1, 0.01, 1.0, 100),
        entry("job-1", 2, 0.01, 1.0, 100),
        entry("job-2", 1, 0.02, 1.5, 50),
    ];
    let mut accountant = RdpAccountant::new();
    accountant.compose_poisson_gaussian(0.01, 1.0, 100).unwrap();
    accountant.compose_poisson_gaussian(0.02, 1.5, 50).unwrap();
    accountant.compose_poisson_gaussian(0.01, 1.0, 100).unwrap();
    let want = accountant.epsilon(1e-5).unwrap();
    let got = dataset_epsilon(&entries, 1e-5).unwrap();
    assert!((got.epsilon - want.epsilon).abs() <= 1e-12 * want.epsilon);
    assert_eq!(got.order, want.order);

    // Tighter than adding up each entry's ε.
    let summed: f64 = entries
        .iter()
        .map(|e| {
            crate::dpsgd_epsilon(e.sample_rate, e.noise_multiplier, e.steps, 1e-5)
                .unwrap()
                .epsilon
        })
        .sum();
    assert!(got.epsilon < summed, "{} >= {summed}", got.epsilon);

    // Independent of the order of the entries.
    let mut reversed = entries.to_vec();
    reversed.reverse();
    assert_eq!(dataset_epsilon(&reversed, 1e-5).unwrap(), got);
}

#[test]
fn invalid_entry_is_named() {
    let entries = [
        entry("job-1", 1, 0.01, 1.0, 10),
        entry("job-7", 3, 0.01, f64::NAN, 10),
    ];
    assert_eq!(
        dataset_epsilon(&entries, 1e-5).unwrap_err().to_string(),
        "ledger entry for job job-7 round 3: noise_multiplier must be finite and >= 0, got NaN"
    );
    assert_eq!(
        dataset_epsilon(&entries[..1], 2.0).unwrap_err(),
        LedgerError::Accountant(AccountantError::Delta(2.0))
    );
}

#[test]
fn huge_step_counts_do_not_overflow() {
    // Full batches have the closed-form RDP α/(2σ²), so the sum is exact.
    let entries = [
        entry("a", 1, 1.0, 1e6, u64::MAX),
        entry("a", 2, 1.0, 1e6, 2),
    ];
    let spent = dataset_epsilon(&entries, 1e-5).unwrap();
    let mut accountant = RdpAccountant::new();
    accountant
        .compose_poisson_gaussian(1.0, 1e6, u64::MAX)
        .unwrap();
    accountant.compose_poisson_gaussian(1.0, 1e6, 2).unwrap();
    assert_eq!(spent, accountant.epsilon(1e-5).unwrap());
    assert!(spent.epsilon.is_finite() && spent.epsilon > 0.0);
}

#[test]
fn ledger_entry_round_trips_through_json() {
    let original = entry("job-1", 4, 0.004, 1.1, 234);
    let json = serde_json::to_string(&original).unwrap();
    let back: LedgerEntry = serde_json::from_str(&json).unwrap();
    assert_eq!(back, original);
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["surprise"] = serde_json::Value::Bool(true);
    assert!(serde_json::from_value::<LedgerEntry>(value).is_err());
}

#[test]
fn budget_validates() {
    let budget = Budget::new(3.0, 1e-5).unwrap();
    assert_eq!((budget.epsilon(), budget.delta()), (3.0, 1e-5));
    assert_eq!(
        Budget::new(-1.0, 1e-5).unwrap_err().to_string(),
        "budget epsilon must be finite and >= 0, got -1"
    );
    assert_eq!(
        Budget::new(f64::INFINITY, 1e-5).unwrap_err(),
        LedgerError::BudgetEpsilon(f64::INFINITY)
    );
    assert_eq!(
        Budget::new(1.0, 1.0).unwrap_err().to_string(),
        "budget delta must be in [0, 1), got 1"
    );
    assert!(Budget::new(0.0, 0.0).is_ok());
}

#[test]
fn budget_serde_enforces_invariants() {
    let budget: Budget = serde_json::from_str(r#"{"epsilon": 8.0, "delta": 1e-6}"#).unwrap();
    assert_eq!(budget, Budget::new(8.0, 1e-6).unwrap());
    assert_eq!(
        serde_json::to_string(&budget).unwrap(),
        r#"{"epsilon":8.0,"delta":1e-6}"#
    );
    let err = serde_json::from_str::<Budget>(r#"{"epsilon": -8.0, "delta": 1e-6}"#).unwrap_err();
    assert!(
        err.to_string()
            .contains("budget epsilon must be finite and >= 0, got -8"),
        "{err}"
    );
}

#[test]
fn remaining_subtracts_and_clamps() {
    let total = Budget::new(3.0, 1e-5).unwrap();
    assert_eq!(
        remaining(&total, 1.0).unwrap(),
        Budget::new(2.0, 1e-5).unwrap()
    );
    assert_eq!(remaining(&total, 5.0).unwrap().epsilon(), 0.0);
    assert_eq!(remaining(&total, f64::INFINITY).unwrap().epsilon(), 0.0);
    assert_eq!(
        remaining(&total, -0.5).unwrap_err().to_string(),
        "spent epsilon must be >= 0, got -0.5"
    );
    assert!(remaining(&total, f64::NAN).is_err());
}

#[test]
fn recorded_constants() {
    assert_eq!(ACCOUNTANT_RDP, "rdp");
    assert_eq!(CONVERSION_DP_ACCOUNTING_IMPROVED, "dp_accounting-improved");
    assert_eq!(LIBRARY_VERSION, env!("CARGO_PKG_VERSION"));
}
