//! Tests of the clipping rule and the Poisson sampler.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

use super::*;

#[test]
fn clip_factor_follows_opacus() {
    assert_eq!(clip_factor(0.0, 1.0), 1.0);
    assert_eq!(clip_factor(0.5, 1.0), 1.0);
    // At the boundary the 1e-6 makes the factor just below one.
    assert_eq!(clip_factor(1.0, 1.0), 1.0 / (1.0 + 1e-6));
    assert_eq!(clip_factor(4.0, 2.0), 2.0 / (4.0 + 1e-6));
    assert_eq!(clip_factor(f64::INFINITY, 1.0), 0.0);
}

#[test]
fn a_nan_norm_gives_a_nan_factor_not_full_weight() {
    assert!(clip_factor(f64::NAN, 1.0).is_nan());
    assert!(clip_factor(-f64::NAN, 3.0).is_nan());
}

#[test]
fn clipped_norm_never_exceeds_clip_norm() {
    for norm in [1e-9, 0.3, 0.999_999, 1.0, 1.000_001, 7.0, 1e12] {
        let clip = 1.0;
        assert!(norm * clip_factor(norm, clip) <= clip, "norm {norm}");
    }
}

fn sampler(q: f64) -> PoissonSampler {
    PoissonSampler::with_rng(q, ChaCha20Rng::seed_from_u64(7)).unwrap()
}

#[test]
fn rates_outside_zero_to_one_are_refused() {
    for q in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(matches!(PoissonSampler::with_rng(q, ChaCha20Rng::seed_from_u64(1)), Err(SamplerError::SampleRate(_))));
    }
}

#[test]
fn at_rate_one_every_row_is_taken_in_order() {
    let mut rows = Vec::new();
    sampler(1.0).sample(5, |i| rows.push(i));
    assert_eq!(rows, [0, 1, 2, 3, 4]);
}

#[test]
fn batch_sizes_are_binomial_and_rows_equally_likely() {
    // 4,000 batches of n = 500 at q = 0.02: the size is Binomial(500, 0.02),
    // mean 10 and variance 9.8; every row is taken with probability q.
    let (n, q, batches) = (500usize, 0.02, 4_000);
    let mut s = sampler(q);
    let mut sizes = Vec::with_capacity(batches);
    let mut per_row = vec![0u32; n];
    for _ in 0..batches {
        let mut size = 0usize;
        let mut last = None;
        s.sample(n, |i| {
            assert!(last.is_none_or(|l| i > l), "indices out of order");
            last = Some(i);
            per_row[i] += 1;
            size += 1;
        });
        sizes.push(size as f64);
    }
    let mean = sizes.iter().sum::<f64>() / batches as f64;
    let var = sizes.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (batches - 1) as f64;
    // Standard errors: mean 0.05, variance about 0.22.
    assert!((mean - 10.0).abs() < 0.25, "mean batch {mean}");
    assert!((var - 9.8).abs() < 1.2, "batch variance {var}");
    // First and second halves of the rows are hit alike (no bias to early rows).
    let (first, second): (u32, u32) = (per_row[..n / 2].iter().sum(), per_row[n / 2..].iter().sum());
    let ratio = f64::from(first) / f64::from(second);
    assert!((ratio - 1.0).abs() < 0.05, "first/second half {first}/{second}");
}
