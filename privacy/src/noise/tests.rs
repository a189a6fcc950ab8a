//! Statistical tests of the Gaussian sampler on a fixed test seed, and tests
//! of seeding and validation.

use super::*;
use crate::accountant::erfc;

const N: usize = 1_000_000;

/// Standard normal CDF.
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn samples(seed: u64, std_dev: f64) -> Vec<f64> {
    let mut noise = NoiseSource::from_seed_for_tests(seed);
    let mut out = vec![0.0; N];
    noise.fill_gaussian(&mut out, std_dev).unwrap();
    out
}

#[test]
fn mean_and_variance_match() {
    let std_dev = 2.5;
    let xs = samples(1, std_dev);
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let variance = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    // Standard errors: σ/√n for the mean, σ²·√(2/n) for the variance.
    let se_mean = std_dev / n.sqrt();
    assert!(mean.abs() < 5.0 * se_mean, "mean {mean} vs 5 SE {}", 5.0 * se_mean);
    let var = std_dev * std_dev;
    let se_var = var * (2.0 / n).sqrt();
    assert!((variance - var).abs() < 5.0 * se_var, "variance {variance} vs {var} ± {}", 5.0 * se_var);
}

#[test]
fn tail_frequencies_match() {
    let xs = samples(2, 1.0);
    let n = xs.len() as f64;
    for k in [1.0, 2.0, 3.0, 4.0] {
        let p = erfc(k / std::f64::consts::SQRT_2); // P(|X| > k)
        let observed = xs.iter().filter(|x| x.abs() > k).count() as f64 / n;
        let se = (p * (1.0 - p) / n).sqrt();
        assert!((observed - p).abs() < 5.0 * se, "P(|X| > {k}) observed {observed}, expected {p} ± {}", 5.0 * se);
    }
}

#[test]
fn kolmogorov_smirnov_below_critical_value() {
    let mut xs = samples(3, 1.0);
    xs.sort_unstable_by(f64::total_cmp);
    let n = xs.len() as f64;
    let d = xs
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = phi(x);
            (f - i as f64 / n).max((i + 1) as f64 / n - f)
        })
        .fold(0.0, f64::max);
    // Asymptotic critical value at significance 1e-3: 1.949/√n.
    let critical = 1.949 / n.sqrt();
    assert!(d < critical, "KS statistic {d} >= {critical}");
}

#[test]
fn standard_normal_matches_fill() {
    let mut a = NoiseSource::from_seed_for_tests(7);
    let mut b = NoiseSource::from_seed_for_tests(7);
    let mut filled = [0.0; 16];
    b.fill_gaussian(&mut filled, 1.0).unwrap();
    for want in filled {
        assert_eq!(a.standard_normal(), want);
    }
}

#[test]
fn add_gaussian_noise_adds_scaled_noise() {
    let mut noise = NoiseSource::from_seed_for_tests(11);
    let mut reference = NoiseSource::from_seed_for_tests(11);
    let mut values = [1.0_f32, -2.0, 0.5, 100.0];
    let original = values;
    noise.add_gaussian_noise(&mut values, 0.25).unwrap();
    for (v, o) in values.iter().zip(original) {
        let want = (f64::from(o) + 0.25 * reference.standard_normal()) as f32;
        assert_eq!(*v, want);
    }
}

#[test]
fn zero_std_dev_changes_nothing() {
    let mut noise = NoiseSource::from_seed_for_tests(5);
    let mut values = [1.0_f32, 2.0, 3.0];
    noise.add_gaussian_noise(&mut values, 0.0).unwrap();
    assert_eq!(values, [1.0, 2.0, 3.0]);
    let mut out = [9.0; 3];
    noise.fill_gaussian(&mut out, 0.0).unwrap();
    assert_eq!(out, [0.0; 3]);
    // Nothing was drawn: the stream continues where a fresh one starts.
    let mut fresh = NoiseSource::from_seed_for_tests(5);
    assert_eq!(noise.standard_normal(), fresh.standard_normal());
}

#[test]
fn invalid_std_dev_is_rejected() {
    let mut noise = NoiseSource::from_seed_for_tests(5);
    let mut values = [1.0_f32];
    for bad in [-1.0, f64::INFINITY, f64::NAN] {
        let err = noise.add_gaussian_noise(&mut values, bad).unwrap_err();
        assert_eq!(err.to_string(), format!("std_dev must be finite and >= 0, got {bad}"));
        assert!(noise.fill_gaussian(&mut [0.0], bad).is_err());
    }
    assert_eq!(values, [1.0]);
}

#[test]
fn os_seeded_sources_differ() {
    let mut a = NoiseSource::new().unwrap();
    let mut b = NoiseSource::new().unwrap();
    let xa: Vec<f64> = (0..8).map(|_| a.standard_normal()).collect();
    let xb: Vec<f64> = (0..8).map(|_| b.standard_normal()).collect();
    assert_ne!(xa, xb);
}

#[test]
fn test_seeds_are_reproducible_and_distinct() {
    let draw = |seed| {
        let mut s = NoiseSource::from_seed_for_tests(seed);
        (0..4).map(|_| s.standard_normal()).collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
}

#[test]
fn debug_shows_no_state() {
    let noise = NoiseSource::from_seed_for_tests(42);
    assert_eq!(format!("{noise:?}"), "NoiseSource { .. }");
    assert_eq!(format!("{noise:#?}"), "NoiseSource { .. }");
}

#[test]
fn prefetched_noise_is_the_same_stream_drawn_ahead() {
    // One thread: exactly the source's draws, in order.
    let mut direct = NoiseSource::from_seed_for_tests(9);
    let mut prefetched = PrefetchedNoise::from_seed_for_tests(9, 1000, 1).unwrap();
    for step in 0..5 {
        let mut a = vec![0.25f32; 1000];
        let mut b = a.clone();
        direct.add_gaussian_noise(&mut a, 1.5).unwrap();
        prefetched.add_gaussian_noise(&mut b, 1.5).unwrap();
        assert_eq!(a, b, "step {step}");
    }
    let err = prefetched.add_gaussian_noise(&mut [0.0; 3], 1.0).unwrap_err();
    assert_eq!(err.to_string(), "noise prefetched for 1000 values, asked for 3");
    assert!(prefetched.add_gaussian_noise(&mut [0.0; 1000], f64::NAN).is_err());
    // Two threads: each half is its own seeded stream, step after step.
    let (mut first, mut second) = (NoiseSource::from_seed_for_tests(20), NoiseSource::from_seed_for_tests(21));
    let mut split = PrefetchedNoise::from_seed_for_tests(20, 1001, 2).unwrap();
    for step in 0..3 {
        let mut expected = vec![0.0f32; 1001];
        first.add_gaussian_noise(&mut expected[..501], 2.0).unwrap();
        second.add_gaussian_noise(&mut expected[501..], 2.0).unwrap();
        let mut got = vec![0.0f32; 1001];
        split.add_gaussian_noise(&mut got, 2.0).unwrap();
        assert_eq!(got, expected, "step {step}");
    }
}

#[test]
fn a_second_noise_thread_only_with_cores_to_spare() {
    // The benchmark CNN's 79,170 parameters, MLP-A's 6,274.
    assert_eq!(noise_threads(2, 79_170), 1);
    assert_eq!(noise_threads(3, 79_170), 1);
    assert_eq!(noise_threads(4, 79_170), 2);
    assert_eq!(noise_threads(16, 6_274), 1);
    assert_eq!(noise_threads(8, SPLIT_ABOVE), 1);
    assert_eq!(noise_threads(8, SPLIT_ABOVE + 1), 2);
}
