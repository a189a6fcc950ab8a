//! Tests of the clipping rule and DP-SGD parameter validation.

use super::*;

#[test]
fn clip_factor_follows_opacus() {
    assert_eq!(clip_factor(0.0, 1.0), 1.0);
    assert_eq!(clip_factor(0.5, 1.0), 1.0);
    // At the boundary the 1e-6 makes the factor just below one.
    assert_eq!(clip_factor(1.0, 1.0), 1.0 / (1.0 + 1e-6));
    assert_eq!(clip_factor(4.0, 2.0), 2.0 / (4.0 + 1e-6));
    assert_eq!(clip_factor(f64::INFINITY, 1.0), 0.0);
    assert!(clip_factor(f64::NAN, 1.0).is_nan());
}

#[test]
fn clipped_norm_never_exceeds_clip_norm() {
    for norm in [1e-9, 0.3, 0.999_999, 1.0, 1.000_001, 7.0, 1e12] {
        let clip = 1.0;
        assert!(norm * clip_factor(norm, clip) <= clip, "norm {norm}");
    }
}

#[test]
fn valid_config_exposes_noise_std() {
    let config = DpSgdConfig::new(1.1, 2.0, 0.01).unwrap();
    assert_eq!(config.noise_multiplier(), 1.1);
    assert_eq!(config.clip_norm(), 2.0);
    assert_eq!(config.sample_rate(), 0.01);
    assert_eq!(config.noise_std(), 2.2);
    assert!(DpSgdConfig::new(0.0, 1.0, 1.0).is_ok());
}

#[test]
fn invalid_config_names_every_field() {
    let err = DpSgdConfig::new(f64::NAN, 0.0, 1.5).unwrap_err();
    assert_eq!(err.0.len(), 3);
    assert_eq!(
        err.to_string(),
        "invalid DP-SGD configuration: noise_multiplier must be finite and >= 0, got NaN; \
         clip_norm must be finite and > 0, got 0; sample_rate must be in (0, 1], got 1.5"
    );
    assert_eq!(
        DpSgdConfig::new(1.0, f64::INFINITY, 0.1).unwrap_err(),
        InvalidDpSgdConfig(vec![DpSgdConfigError::ClipNorm(f64::INFINITY)])
    );
    assert_eq!(
        DpSgdConfig::new(-0.5, 1.0, 0.0).unwrap_err(),
        InvalidDpSgdConfig(vec![
            DpSgdConfigError::NoiseMultiplier(-0.5),
            DpSgdConfigError::SampleRate(0.0),
        ])
    );
}

#[test]
fn compose_into_uses_the_config() {
    let config = DpSgdConfig::new(1.1, 1.0, 256.0 / 60_000.0).unwrap();
    let mut accountant = crate::RdpAccountant::new();
    config.compose_into(&mut accountant, 14_062).unwrap();
    let direct = crate::dpsgd_epsilon(256.0 / 60_000.0, 1.1, 14_062, 1e-5).unwrap();
    assert_eq!(accountant.epsilon(1e-5).unwrap(), direct);
}
