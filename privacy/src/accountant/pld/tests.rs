//! Unit tests of the PLD accountant: the hockey-stick formulas against
//! numerical integration, the connect-the-dots discretization, composition,
//! edge cases and validation. The reference values from dp_accounting are
//! checked in `tests/it/pld.rs`.

use super::*;
use crate::accountant::RdpAccountant;

#[track_caller]
fn assert_rel(got: f64, want: f64, tol: f64) {
    let err = ((got - want) / want).abs();
    assert!(err <= tol, "got {got}, want {want} (relative error {err:e} > {tol:e})");
}

fn composed(q: f64, sigma: f64, steps: u64) -> PldAccountant {
    let mut accountant = PldAccountant::new();
    accountant.compose_poisson_gaussian(q, sigma, steps).unwrap();
    accountant
}

fn run(q: f64, sigma: f64) -> Run {
    Run { sample_rate: q, noise_multiplier: sigma, steps: 1, discretization: DEFAULT_DISCRETIZATION }
}

/// `(∫ (p − e^ε·q)_+, ∫ (e^ε·q − p)_+)`, δ and its complement, with `p`
/// and `q` the densities of the given direction, by Simpson's rule on
/// [−40σ, 1 + 40σ] split where `p = e^ε·q` (found by bisection), so that
/// the kink of the integrands falls on the boundary.
fn integrated_deltas(direction: Direction, q: f64, sigma: f64, epsilon: f64) -> (f64, f64) {
    let density = |mean: f64, x: f64| {
        let z = (x - mean) / sigma;
        (-0.5 * z * z).exp() / (sigma * (2.0 * std::f64::consts::PI).sqrt())
    };
    let mixture = |x: f64| (1.0 - q) * density(0.0, x) + q * density(1.0, x);
    let difference = |x: f64| {
        let (upper, lower) = match direction {
            Direction::Remove => (mixture(x), density(0.0, x)),
            Direction::Add => (density(0.0, x), mixture(x)),
        };
        upper - epsilon.exp() * lower
    };
    // The sign of difference/density(0) is monotone in x.
    let sign = |x: f64| difference(x) / density(0.0, x) > 0.0;
    let (a, b) = (-40.0 * sigma, 1.0 + 40.0 * sigma);
    let mut pieces = vec![a];
    // Between ±10σ the ratio is computable; beyond, the densities are
    // negligible.
    let (mut low, mut high) = (-10.0 * sigma, 1.0 + 10.0 * sigma);
    if sign(low) != sign(high) {
        for _ in 0..200 {
            let mid = 0.5 * (low + high);
            if sign(mid) == sign(low) {
                low = mid;
            } else {
                high = mid;
            }
        }
        pieces.push(low);
    }
    pieces.push(b);
    let simpson = |f: &dyn Fn(f64) -> f64, a: f64, b: f64| {
        let n = 200_000;
        let h = (b - a) / n as f64;
        let mut sum = f(a) + f(b);
        for i in 1..n {
            let weight = if i % 2 == 1 { 4.0 } else { 2.0 };
            sum += weight * f(a + i as f64 * h);
        }
        sum * h / 3.0
    };
    let positive = |x: f64| difference(x).max(0.0);
    let negative = |x: f64| (-difference(x)).max(0.0);
    let mut deltas = (0.0, 0.0);
    for piece in pieces.windows(2) {
        deltas.0 += simpson(&positive, piece[0], piece[1]);
        deltas.1 += simpson(&negative, piece[0], piece[1]);
    }
    deltas
}

#[test]
fn hockey_stick_formulas_match_numerical_integration() {
    for (q, sigma) in [(0.01, 1.0), (0.2, 0.8), (0.5, 2.0), (1.0, 1.5)] {
        let mu = 1.0 / sigma;
        for epsilon in [-0.5, -0.001, 0.0, 0.05, 0.3, 1.0, 2.5] {
            for (direction, got) in
                [(Direction::Remove, remove_delta(q, mu, epsilon)), (Direction::Add, add_delta(q, mu, epsilon))]
            {
                let (delta, complement) = integrated_deltas(direction, q, sigma, epsilon);
                let checks = [
                    ("delta", got.delta(epsilon), delta),
                    ("complement", GridDelta::Complement(0.0).same_form(got, epsilon), complement),
                ];
                for (what, got, want) in checks {
                    assert!(
                        (got - want).abs() <= 1e-10 * want.max(1e-6),
                        "q={q} sigma={sigma} epsilon={epsilon} {direction:?} {what}: \
                         {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn hockey_stick_limits() {
    let (q, mu) = (0.1_f64, 1.0);
    // Below the smallest remove loss ln(1 − q), δ = 1 − e^ε exactly.
    let epsilon = (1.0 - q).ln() - 0.01;
    assert_eq!(remove_delta(q, mu, epsilon), GridDelta::Complement(0.0));
    assert_eq!(remove_delta(q, mu, epsilon).delta(epsilon), -epsilon.exp_m1());
    // Above the largest add loss ln(1/(1 − q)), δ = 0.
    assert_eq!(add_delta(q, mu, -(1.0 - q).ln() + 1e-9), GridDelta::Direct(0.0));
    // Far in the tail, δ underflows to zero rather than going negative.
    assert_eq!(remove_delta(q, mu, 500.0), GridDelta::Direct(0.0));
    assert_eq!(gaussian_delta(mu, 1e4), 0.0);
    // The accurate form switches at the Gaussian's ε = 0.
    assert!(matches!(remove_delta(q, mu, 1e-3), GridDelta::Direct(_)));
    assert!(matches!(remove_delta(q, mu, -1e-3), GridDelta::Complement(_)));
}

#[test]
fn tail_quantile_is_that_of_dp_accounting_truncation() {
    let z = standard_normal_tail_quantile(LOG_MASS_TRUNCATION_BOUND);
    let tail = 0.5 * erfc(z / std::f64::consts::SQRT_2);
    assert_rel(tail, 0.5 * (-50.0_f64).exp(), 1e-12);
}

#[test]
fn connect_the_dots_interpolates_delta_pessimistically() {
    let (q, sigma) = (0.05, 1.0);
    let mu = 1.0 / sigma;
    let h = DEFAULT_DISCRETIZATION;
    for (direction, exact) in
        [(Direction::Remove, remove_delta as fn(f64, f64, f64) -> GridDelta), (Direction::Add, add_delta)]
    {
        let exact = |q, mu, epsilon| exact(q, mu, epsilon).delta(epsilon);
        let pmf = LossPmf::poisson_gaussian(direction, run(q, sigma)).unwrap();
        let total: f64 = pmf.probs.iter().sum::<f64>() + pmf.infinity_mass;
        assert!((total - 1.0).abs() < 1e-13, "{direction:?}: total mass {total}");
        assert!(pmf.infinity_mass < 1e-20, "{direction:?}: {}", pmf.infinity_mass);
        for k in [-500_i64, -20, -1, 0, 1, 7, 100, 1000, 5000] {
            let epsilon = k as f64 * h;
            // On the grid: equal; between grid points: never below, and
            // above by the chord's gap over a convex curve, O(h²).
            let want = exact(q, mu, epsilon);
            let got = pmf.delta(epsilon, h);
            assert!((got - want).abs() < 1e-12, "{direction:?} at {epsilon}: {got} vs {want}");
            let between = epsilon + 0.5 * h;
            let (got, want) = (pmf.delta(between, h), exact(q, mu, between));
            assert!(got >= want - 1e-14 && got - want < 1e-7, "{direction:?} at {between}: {got} vs {want}");
        }
    }
}

#[test]
fn empty_accountant_spends_nothing() {
    let accountant = PldAccountant::new();
    assert_eq!(accountant.epsilon(1e-5), Ok(0.0));
    assert_eq!(accountant.epsilon(0.0), Ok(0.0));
    assert_eq!(accountant.delta(0.0), Ok(0.0));
    assert_eq!(accountant.delta(-1.0), Ok(-(-1.0_f64).exp_m1()));
    assert_eq!(accountant, PldAccountant::default());
    assert_eq!(accountant.discretization(), 1e-4);
}

#[test]
fn zero_sample_rate_or_zero_steps_spend_nothing() {
    let mut accountant = PldAccountant::new();
    accountant.compose_poisson_gaussian(0.0, 1.0, 1000).unwrap();
    accountant.compose_poisson_gaussian(0.5, 1.0, 0).unwrap();
    accountant.compose_poisson_gaussian(0.0, 0.0, 10).unwrap();
    assert_eq!(accountant, PldAccountant::new());
    assert_eq!(dpsgd_epsilon_pld(0.0, 1.0, 100, 1e-5), Ok(0.0));
}

#[test]
fn zero_noise_is_not_private() {
    let mut accountant = composed(0.01, 1.0, 10);
    accountant.compose_poisson_gaussian(0.01, 0.0, 1).unwrap();
    assert_eq!(accountant.epsilon(1e-5), Ok(f64::INFINITY));
    assert_eq!(accountant.delta(10.0), Ok(1.0));
    // Composing more keeps it so.
    accountant.compose_poisson_gaussian(0.01, 1.0, 10).unwrap();
    assert_eq!(accountant.epsilon(0.5), Ok(f64::INFINITY));
    // Every mechanism is (0, 1)-DP.
    assert_eq!(accountant.epsilon(1.0), Ok(0.0));
}

#[test]
fn delta_zero_gives_infinite_epsilon_after_a_gaussian_step() {
    let accountant = composed(0.01, 1.0, 10);
    assert_eq!(accountant.epsilon(0.0), Ok(f64::INFINITY));
    assert_eq!(accountant.epsilon(1.0), Ok(0.0));
}

#[test]
fn delta_of_epsilon_inverts_epsilon_of_delta() {
    for (q, sigma, steps) in [(0.01, 1.0, 1000), (0.004, 1.1, 1000), (0.1, 2.0, 10), (1.0, 3.0, 5)] {
        let accountant = composed(q, sigma, steps);
        for delta in [1e-3, 1e-5, 1e-7, 1e-9] {
            let epsilon = accountant.epsilon(delta).unwrap();
            assert!(epsilon > 0.0 && epsilon.is_finite());
            assert_rel(accountant.delta(epsilon).unwrap(), delta, 1e-9);
            // Slightly less ε needs more δ.
            assert!(accountant.delta(epsilon - 1e-3).unwrap() > delta);
        }
    }
}

#[test]
fn epsilon_decreases_with_delta_and_noise() {
    let accountant = composed(0.01, 1.0, 1000);
    let epsilons: Vec<f64> = [1e-3, 1e-4, 1e-5, 1e-6].iter().map(|&d| accountant.epsilon(d).unwrap()).collect();
    assert!(epsilons.windows(2).all(|w| w[0] < w[1]), "{epsilons:?}");
    let by_noise: Vec<f64> =
        [0.8, 1.0, 1.5, 3.0].iter().map(|&s| dpsgd_epsilon_pld(0.01, s, 1000, 1e-5).unwrap()).collect();
    assert!(by_noise.windows(2).all(|w| w[0] > w[1]), "{by_noise:?}");
}

#[test]
fn split_composition_equals_one_call() {
    for (q, sigma, steps) in [(0.01, 1.0, 500), (0.004, 1.1, 1000), (0.1, 2.0, 10)] {
        let once = composed(q, sigma, 2 * steps);
        let mut twice = composed(q, sigma, steps);
        twice.compose_poisson_gaussian(q, sigma, steps).unwrap();
        for delta in [1e-5, 1e-6] {
            assert_rel(twice.epsilon(delta).unwrap(), once.epsilon(delta).unwrap(), 1e-9);
        }
    }
}

#[test]
fn heterogeneous_composition_commutes_and_beats_rdp() {
    let runs = [(0.01, 1.0, 300), (0.05, 2.0, 50), (1.0, 10.0, 3)];
    let mut forward = PldAccountant::new();
    let mut rdp = RdpAccountant::new();
    for &(q, sigma, steps) in &runs {
        forward.compose_poisson_gaussian(q, sigma, steps).unwrap();
        rdp.compose_poisson_gaussian(q, sigma, steps).unwrap();
    }
    let mut backward = PldAccountant::new();
    for &(q, sigma, steps) in runs.iter().rev() {
        backward.compose_poisson_gaussian(q, sigma, steps).unwrap();
    }
    for delta in [1e-5, 1e-6] {
        let epsilon = forward.epsilon(delta).unwrap();
        assert_rel(backward.epsilon(delta).unwrap(), epsilon, 1e-9);
        let rdp_epsilon = rdp.epsilon(delta).unwrap().epsilon;
        assert!(epsilon < rdp_epsilon, "{epsilon} vs RDP {rdp_epsilon}");
        // More than any single run spends on its own.
        for &(q, sigma, steps) in &runs {
            assert!(epsilon > dpsgd_epsilon_pld(q, sigma, steps, delta).unwrap());
        }
    }
}

#[test]
fn without_sampling_both_directions_agree() {
    let accountant = composed(1.0, 2.0, 4);
    assert_eq!(accountant.remove, accountant.add);
    // Four releases at σ = 2 are one at σ = 1: ε(1e-5) = 4.3771781 (the
    // analytic Gaussian mechanism, as in the fixture).
    assert_rel(accountant.epsilon(1e-5).unwrap(), 4.377_178_1, 1e-6);
}

#[test]
fn coarser_discretization_stays_close() {
    let fine = dpsgd_epsilon_pld(0.01, 1.0, 1000, 1e-5).unwrap();
    let mut coarse = PldAccountant::with_discretization(1e-3).unwrap();
    coarse.compose_poisson_gaussian(0.01, 1.0, 1000).unwrap();
    let coarse = coarse.epsilon(1e-5).unwrap();
    assert_rel(coarse, fine, 1e-3);
}

#[test]
fn composed_distribution_stays_compact() {
    let accountant = composed(0.01, 4.0, 100_000);
    for pmf in [&accountant.remove, &accountant.add] {
        // The loss spreads as sqrt(T): a few loss units wide, not T times
        // the single step's 0.1.
        let width = pmf.probs.len() as f64 * DEFAULT_DISCRETIZATION;
        assert!(width < 20.0, "{width}");
        assert!(pmf.probs[0] > 0.0 && pmf.probs[pmf.probs.len() - 1] > 0.0);
        assert!(pmf.infinity_mass < 1e-14, "{}", pmf.infinity_mass);
    }
}

#[test]
fn truncate_tails_moves_mass_pessimistically() {
    let mut pmf =
        LossPmf { lower: -2, probs: vec![1e-17, 2e-16, 0.5, -1e-18, 0.5 - 1e-15, 3e-16, 1e-16], infinity_mass: 0.0 };
    pmf.truncate_tails();
    assert_eq!(pmf.lower, 0);
    assert_eq!(pmf.probs, vec![0.5 + 2.1e-16, 0.0, 0.5 - 1e-15]);
    assert_eq!(pmf.infinity_mass, 4e-16);
}

#[test]
fn chernoff_window_holds_the_mass() {
    // Three steps of a fair coin on {0, 1}: the window must cover all of
    // {0, …, 3}, whose least likely outcomes have mass 1/8.
    assert_eq!(chernoff_window(&[0.5, 0.5], 3), (0, 3));
    // A single point composes to a single point.
    assert_eq!(chernoff_window(&[1.0], 1000), (0, 0));
    // Many steps: the window is much narrower than the full support, on the mean (T/2).
    // centred on the mean (T/2), between 8 and 10 standard deviations
    // (500) out, as the Gaussian tail of 5e-16 is 8.0 of them.
    let (start, end) = chernoff_window(&[0.5, 0.5], 1_000_000);
    assert_eq!(start + end, 1_000_000);
    assert!(start > 495_000 && start < 496_000, "{start}..{end}");
}

#[test]
fn invalid_inputs_are_rejected_and_leave_the_accountant_unchanged() {
    let mut accountant = composed(0.01, 1.0, 10);
    let before = accountant.clone();
    assert_eq!(accountant.compose_poisson_gaussian(1.5, 1.0, 1), Err(AccountantError::SampleRate(1.5)));
    assert!(matches!(
        accountant.compose_poisson_gaussian(f64::NAN, 1.0, 1),
        Err(AccountantError::SampleRate(q)) if q.is_nan()
    ));
    assert_eq!(accountant.compose_poisson_gaussian(0.1, -1.0, 1), Err(AccountantError::NoiseMultiplier(-1.0)));
    assert_eq!(
        accountant.compose_poisson_gaussian(0.1, f64::INFINITY, 1),
        Err(AccountantError::NoiseMultiplier(f64::INFINITY))
    );
    assert_eq!(accountant.epsilon(-0.1), Err(AccountantError::Delta(-0.1)));
    assert_eq!(accountant.epsilon(1.1), Err(AccountantError::Delta(1.1)));
    assert!(matches!(
        accountant.delta(f64::NAN),
        Err(AccountantError::Epsilon(e)) if e.is_nan()
    ));
    for interval in [0.0, -1e-4, f64::INFINITY] {
        assert_eq!(PldAccountant::with_discretization(interval), Err(AccountantError::Discretization(interval)));
    }
    assert_eq!(dpsgd_epsilon_pld(0.01, 1.0, 10, 2.0), Err(AccountantError::Delta(2.0)));
    assert_eq!(accountant, before);
}

#[test]
fn too_fine_a_grid_is_refused_with_its_parameters() {
    let mut accountant = composed(0.01, 1.0, 10);
    let before = accountant.clone();
    let err = accountant.compose_poisson_gaussian(0.01, 0.01, 10).unwrap_err();
    let AccountantError::PldTooLarge { sample_rate, noise_multiplier, steps, points, max, .. } = err else {
        panic!("{err:?}");
    };
    assert_eq!((sample_rate, noise_multiplier, steps), (0.01, 0.01, 10));
    assert!(points > max as f64, "{points}");
    assert_eq!(max, MAX_PLD_POINTS);
    assert!(err.to_string().contains("noise_multiplier 0.01"), "{err}");
    // Long runs at a fine interval hit the limit in the composition.
    let mut fine = PldAccountant::with_discretization(1e-6).unwrap();
    assert!(matches!(fine.compose_poisson_gaussian(0.01, 1.0, 1_000_000), Err(AccountantError::PldTooLarge { .. })));
    assert_eq!(accountant, before);
}
