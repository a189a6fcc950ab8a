//! Unit tests of the OpenDP releases: the count release's noise and ρ,
//! and the zCDP conversion against the RDP accountant.

use super::*;

#[test]
fn count_release_is_noisy_unbiased_and_accounted() {
    let scale = 10.0;
    let draws: Vec<f64> = (0..2000).map(|_| release_count(10_000, scale).unwrap().value as f64).collect();
    let mean = draws.iter().sum::<f64>() / draws.len() as f64;
    let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (draws.len() - 1) as f64;
    // Mean within 5 standard errors of the truth; variance near scale².
    assert!((mean - 10_000.0).abs() < 5.0 * scale / (draws.len() as f64).sqrt(), "{mean}");
    assert!((var / (scale * scale) - 1.0).abs() < 0.15, "{var}");
    assert!(draws.iter().any(|&d| d != 10_000.0));
    // ρ = Δ²/(2s²) for the Gaussian mechanism.
    let r = release_count(5, scale).unwrap();
    assert!((r.rho - 1.0 / (2.0 * scale * scale)).abs() < 1e-12, "{}", r.rho);
    // Post-processing keeps the weight positive.
    assert!(release_count(0, 1000.0).unwrap().value >= 1);
}

#[test]
fn opendp_conversion_agrees_with_the_accountant_and_rejects_bad_scales() {
    // OpenDP's zCDP conversion and the RDP accountant (q = 1, σ = s, 1 step) bound the same release.
    let eps_opendp = count_release_epsilon(10.0, 1e-5).unwrap();
    let eps_rdp = crate::accountant::dpsgd_epsilon(1.0, 10.0, 1, 1e-5).unwrap().epsilon;
    assert!(eps_opendp > 0.0 && eps_opendp < 1.0, "{eps_opendp}");
    assert!((eps_opendp - eps_rdp).abs() / eps_rdp < 0.25, "opendp {eps_opendp} vs rdp {eps_rdp}");
    assert!(matches!(release_count(3, 0.0), Err(ReleaseError::Scale(_))));
    assert!(matches!(release_count(u64::MAX, 1.0), Err(ReleaseError::TooLarge(_))));
}

#[test]
fn counts_released_together_get_independent_noise_and_one_rho() {
    let scale = 5.0;
    let truth = [1_000u64, 0, 40];
    let draws: Vec<Vec<i64>> = (0..2000).map(|_| release_counts(&truth, scale).unwrap().values).collect();
    for (k, &t) in truth.iter().enumerate() {
        let mean = draws.iter().map(|d| d[k] as f64).sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|d| (d[k] as f64 - mean).powi(2)).sum::<f64>() / (draws.len() - 1) as f64;
        assert!((mean - t as f64).abs() < 5.0 * scale / (draws.len() as f64).sqrt(), "count {k}: {mean}");
        assert!((var / (scale * scale) - 1.0).abs() < 0.15, "count {k}: {var}");
    }
    // The noise of two counts is not shared: their difference varies as 2s².
    let diff: Vec<f64> = draws.iter().map(|d| (d[0] - d[2]) as f64).collect();
    let mean = diff.iter().sum::<f64>() / diff.len() as f64;
    let var = diff.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (diff.len() - 1) as f64;
    assert!((var / (2.0 * scale * scale) - 1.0).abs() < 0.15, "{var}");
    // A count of zero can come out negative: clamping is for the reader.
    assert!(draws.iter().any(|d| d[1] < 0));
    // The whole vector costs one Gaussian mechanism of sensitivity 1.
    let r = release_counts(&truth, scale).unwrap();
    assert!((r.rho - 1.0 / (2.0 * scale * scale)).abs() < 1e-12, "{}", r.rho);
    assert!(matches!(release_counts(&[1], f64::NAN), Err(ReleaseError::Scale(_))));
}
