//! Unit tests of the RDP accountant: edge cases, validation, composition
//! and the internal series. The reference values from dp_accounting are
//! checked in `tests/it/accountant.rs`.

use super::*;

#[track_caller]
fn assert_rel(got: f64, want: f64, tol: f64) {
    let err = ((got - want) / want).abs();
    assert!(err <= tol, "got {got}, want {want} (relative error {err:e} > {tol:e})");
}

#[test]
fn default_orders_are_dp_accounting_0_6() {
    let orders = default_orders();
    assert_eq!(orders.len(), 99 + 53 + 4);
    assert_eq!(orders[0], 1.1);
    assert_eq!(orders[98], 10.9);
    assert_eq!(&orders[99..101], &[11.0, 12.0]);
    assert_eq!(&orders[151..], &[63.0, 128.0, 256.0, 512.0, 1024.0]);
    assert!(!orders.contains(&64.0));
    // 1 + 10/10 is exactly 2, so it takes the integer path as in Python.
    assert_eq!(integer_order(orders[9]), Some(2));
    assert_eq!(integer_order(orders[10]), None);
}

#[test]
fn legacy_orders_skip_eleven() {
    let orders = legacy_orders();
    assert_eq!(orders.len(), 99 + 52);
    assert_eq!(&orders[98..101], &[10.9, 12.0, 13.0]);
    assert_eq!(orders.last(), Some(&63.0));
}

#[test]
fn zero_sample_rate_spends_nothing() {
    let mut accountant = RdpAccountant::new();
    accountant.compose_poisson_gaussian(0.0, 0.0, 1000).unwrap();
    assert!(accountant.rdp().iter().all(|&r| r == 0.0));
    assert_eq!(accountant.epsilon(1e-5).unwrap().epsilon, 0.0);
    assert_eq!(accountant.epsilon(0.0).unwrap(), EpsilonAtDelta { epsilon: 0.0, order: 0.0 });
}

#[test]
fn zero_noise_is_infinite_epsilon() {
    let mut accountant = RdpAccountant::new();
    accountant.compose_poisson_gaussian(0.01, 0.0, 1).unwrap();
    assert!(accountant.rdp().iter().all(|&r| r == f64::INFINITY));
    let spent = accountant.epsilon(1e-5).unwrap();
    assert_eq!(spent.epsilon, f64::INFINITY);
    assert_eq!(spent.order, 1.1, "argmin over all-infinite picks the first order");
}

#[test]
fn zero_steps_spend_nothing_even_without_noise() {
    let mut accountant = RdpAccountant::new();
    accountant.compose_poisson_gaussian(0.5, 0.0, 0).unwrap();
    assert!(accountant.rdp().iter().all(|&r| r == 0.0));
}

#[test]
fn full_batch_is_the_gaussian_mechanism() {
    let mut accountant = RdpAccountant::with_orders(vec![2.0, 2.5, 32.0]).unwrap();
    accountant.compose_poisson_gaussian(1.0, 2.0, 3).unwrap();
    assert_eq!(accountant.rdp(), &[3.0 * 2.0 / 8.0, 3.0 * 2.5 / 8.0, 3.0 * 32.0 / 8.0]);
}

#[test]
fn delta_zero_after_spending_is_infinite() {
    let accountant = {
        let mut a = RdpAccountant::new();
        a.compose_poisson_gaussian(0.01, 1.0, 1).unwrap();
        a
    };
    assert_eq!(accountant.epsilon(0.0).unwrap(), EpsilonAtDelta { epsilon: f64::INFINITY, order: 0.0 });
}

#[test]
fn composition_adds_rdp() {
    let mut twice = RdpAccountant::new();
    twice.compose_poisson_gaussian(0.02, 1.3, 150).unwrap();
    twice.compose_poisson_gaussian(0.02, 1.3, 150).unwrap();
    let mut once = RdpAccountant::new();
    once.compose_poisson_gaussian(0.02, 1.3, 300).unwrap();
    for (a, b) in twice.rdp().iter().zip(once.rdp()) {
        assert_rel(*a, *b, 1e-14);
    }
}

#[test]
fn heterogeneous_composition_is_order_independent() {
    let runs = [(0.01, 1.0, 500), (0.05, 2.5, 40), (1.0, 8.0, 2)];
    let mut forward = RdpAccountant::new();
    for (q, sigma, steps) in runs {
        forward.compose_poisson_gaussian(q, sigma, steps).unwrap();
    }
    let mut backward = RdpAccountant::new();
    for (q, sigma, steps) in runs.iter().rev() {
        backward.compose_poisson_gaussian(*q, *sigma, *steps).unwrap();
    }
    let (f, b) = (forward.epsilon(1e-6).unwrap(), backward.epsilon(1e-6).unwrap());
    assert_rel(f.epsilon, b.epsilon, 1e-14);
    assert_eq!(f.order, b.order);
    // Composition costs more than either part alone.
    let alone = dpsgd_epsilon(0.01, 1.0, 500, 1e-6).unwrap();
    assert!(f.epsilon > alone.epsilon);
}

#[test]
fn epsilon_decreases_with_noise() {
    let mut previous = f64::INFINITY;
    for sigma in [0.5, 0.8, 1.0, 1.5, 2.0, 4.0, 8.0] {
        let epsilon = dpsgd_epsilon(0.01, sigma, 1000, 1e-5).unwrap().epsilon;
        assert!(epsilon < previous, "sigma {sigma}: {epsilon} >= {previous}");
        previous = epsilon;
    }
}

#[test]
fn integer_order_matches_direct_binomial_sum() {
    // A_α = Σ_i C(α, i) q^i (1 − q)^(α − i) exp((i² − i) / (2σ²)), small α.
    let (q, sigma) = (0.1_f64, 1.5_f64);
    for alpha in [2_usize, 3, 5, 10] {
        let mut direct = 0.0;
        let mut binom = 1.0;
        for i in 0..=alpha {
            let fi = i as f64;
            direct += binom
                * q.powi(i as i32)
                * (1.0 - q).powi((alpha - i) as i32)
                * ((fi * fi - fi) / (2.0 * sigma * sigma)).exp();
            binom = binom * (alpha - i) as f64 / (fi + 1.0);
        }
        let got = log_a_int(q, sigma, alpha);
        assert_rel(got, direct.ln(), 1e-13);
    }
}

#[test]
fn fractional_series_is_continuous_at_integers() {
    // The fractional series and the binomial sum agree as α approaches an
    // integer.
    let accountant = {
        let mut a = RdpAccountant::with_orders(vec![8.0 - 1e-9, 8.0, 8.0 + 1e-9]).unwrap();
        a.compose_poisson_gaussian(0.01, 1.1, 1).unwrap();
        a
    };
    let rdp = accountant.rdp();
    assert_rel(rdp[0], rdp[1], 1e-6);
    assert_rel(rdp[2], rdp[1], 1e-6);
}

#[test]
fn log_factorial_beyond_the_table() {
    let k = LOG_FACTORIAL_TABLE_MAX;
    // ln (k + 1)! = ln k! + ln(k + 1), across the end of the table.
    let step = log_factorial(k + 1) - log_factorial(k);
    assert_rel(step, ((k + 1) as f64).ln(), 1e-12);
    assert_eq!(log_factorial(0), 0.0);
    assert_eq!(log_factorial(1), 0.0);
    assert_rel(log_factorial(5), 120.0_f64.ln(), 1e-15);
}

#[test]
fn log_add_handles_zero_and_infinity() {
    assert_eq!(log_add(f64::NEG_INFINITY, 1.5), 1.5);
    assert_eq!(log_add(1.5, f64::NEG_INFINITY), 1.5);
    assert_eq!(log_add(f64::INFINITY, f64::INFINITY), f64::INFINITY);
    assert_rel(log_add(2.0_f64.ln(), 3.0_f64.ln()), 5.0_f64.ln(), 1e-15);
}

#[test]
fn invalid_parameters_name_the_value() {
    let mut accountant = RdpAccountant::new();
    let cases = [
        (accountant.compose_poisson_gaussian(1.5, 1.0, 1), "sample_rate must be in [0, 1], got 1.5"),
        (accountant.compose_poisson_gaussian(-0.1, 1.0, 1), "sample_rate must be in [0, 1], got -0.1"),
        (accountant.compose_poisson_gaussian(0.1, f64::NAN, 1), "noise_multiplier must be finite and >= 0, got NaN"),
        (
            accountant.compose_poisson_gaussian(0.1, f64::INFINITY, 1),
            "noise_multiplier must be finite and >= 0, got inf",
        ),
        (accountant.compose_poisson_gaussian(0.1, -1.0, 1), "noise_multiplier must be finite and >= 0, got -1"),
    ];
    for (result, message) in cases {
        assert_eq!(result.unwrap_err().to_string(), message);
    }
    // A rejected composition leaves the accountant untouched.
    assert!(accountant.rdp().iter().all(|&r| r == 0.0));

    assert_eq!(accountant.epsilon(-1e-5).unwrap_err().to_string(), "delta must be in [0, 1], got -0.00001");
    assert!(matches!(accountant.epsilon(f64::NAN), Err(AccountantError::Delta(d)) if d.is_nan()));
    assert_eq!(
        accountant.epsilon_legacy(0.0).unwrap_err().to_string(),
        "delta must be in (0, 1] for the legacy conversion, got 0"
    );
}

#[test]
fn invalid_orders_are_rejected_with_their_index() {
    assert_eq!(RdpAccountant::with_orders(vec![]).unwrap_err(), AccountantError::NoOrders);
    assert_eq!(
        RdpAccountant::with_orders(vec![2.0, 1.0]).unwrap_err().to_string(),
        "order 1 at index 1 must be finite, > 1 and <= 10000"
    );
    assert_eq!(
        RdpAccountant::with_orders(vec![f64::INFINITY]).unwrap_err(),
        AccountantError::Order { index: 0, value: f64::INFINITY }
    );
    assert!(RdpAccountant::with_orders(vec![1e5]).is_err());
    assert!(RdpAccountant::with_orders(vec![1.001, 10_000.0]).is_ok());
}

#[test]
fn orders_too_close_to_one_give_infinity() {
    let mut accountant = RdpAccountant::with_orders(vec![1.005]).unwrap();
    accountant.compose_poisson_gaussian(0.01, 1.0, 1000).unwrap();
    assert_eq!(accountant.epsilon(1e-5).unwrap(), EpsilonAtDelta { epsilon: f64::INFINITY, order: 1.005 });
}

#[test]
fn kl_bound_gives_zero_for_tiny_spend() {
    // δ² + expm1(−rdp) > 0 once rdp < −ln(1 − δ²).
    let mut accountant = RdpAccountant::new();
    accountant.compose_poisson_gaussian(1e-6, 50.0, 1).unwrap();
    let spent = accountant.epsilon(0.1).unwrap();
    assert_eq!(spent, EpsilonAtDelta { epsilon: 0.0, order: 1.1 });
}

#[test]
fn noise_multiplier_for_epsilon_inverts_dpsgd_epsilon() {
    let (q, steps, delta) = (256.0 / 60_000.0, 14_062, 1e-5);
    let target = dpsgd_epsilon(q, 1.1, steps, delta).unwrap().epsilon;
    let sigma = noise_multiplier_for_epsilon(target, q, steps, delta).unwrap();
    assert_rel(sigma, 1.1, 1e-6);
    assert!(dpsgd_epsilon(q, sigma, steps, delta).unwrap().epsilon <= target);
    let below = sigma * (1.0 - 1e-6);
    assert!(dpsgd_epsilon(q, below, steps, delta).unwrap().epsilon > target);
}

#[test]
fn noise_multiplier_for_epsilon_edge_cases() {
    assert_eq!(noise_multiplier_for_epsilon(1.0, 0.0, 100, 1e-5), Ok(0.0));
    assert_eq!(noise_multiplier_for_epsilon(1.0, 0.5, 0, 1e-5), Ok(0.0));
    assert_eq!(
        noise_multiplier_for_epsilon(0.0, 0.5, 10, 1e-5).unwrap_err().to_string(),
        "target_epsilon must be finite and > 0, got 0"
    );
    assert!(matches!(
        noise_multiplier_for_epsilon(f64::NAN, 0.5, 10, 1e-5),
        Err(AccountantError::TargetEpsilon(e)) if e.is_nan()
    ));
    assert_eq!(noise_multiplier_for_epsilon(1.0, 2.0, 10, 1e-5), Err(AccountantError::SampleRate(2.0)));
    // Full batches for a million steps cannot reach ε = 0.001: even σ = 1e6
    // leaves ε ≈ 0.012 over the default orders.
    match noise_multiplier_for_epsilon(1e-3, 1.0, 1_000_000, 1e-5) {
        Err(AccountantError::Unreachable { target_epsilon, noise_multiplier, epsilon }) => {
            assert_eq!(target_epsilon, 1e-3);
            assert_eq!(noise_multiplier, MAX_NOISE_MULTIPLIER);
            assert!(epsilon > 1e-3);
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}
