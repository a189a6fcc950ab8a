//! The workloads as specified: sizes, sampling rates, steps per epoch and
//! the models `models` builds for them.

use super::*;

#[test]
fn sampling_rate_and_steps_per_epoch() {
    // (workload, ceil(N/B), floor(N/B))
    let cases = [(Workload::MlpA, 9, 8), (Workload::MlpB, 1_250, 1_250), (Workload::Cnn, 157, 156)];
    for (w, steps, plain_steps) in cases {
        assert_eq!(w.steps_per_epoch(), steps, "{}", w.name());
        assert_eq!(w.sample_rate(), 1.0 / steps as f64, "{}", w.name());
        assert_eq!(w.plain_steps_per_epoch(), plain_steps, "{}", w.name());
        // q · N rows per step for ceil(N/B) steps: N rows per epoch in expectation.
        let expected_rows = w.sample_rate() * w.rows() as f64 * steps as f64;
        assert!((expected_rows - w.rows() as f64).abs() < 1e-6, "{}", w.name());
    }
    assert_eq!(Workload::MlpB.sample_rate(), 0.0008);
}

#[test]
fn models_have_the_reference_parameter_counts() {
    // The "params" column of reference-throughput.md.
    let cases = [(Workload::MlpA, 6_274), (Workload::MlpB, 19_074), (Workload::Cnn, 79_170)];
    for (w, params) in cases {
        let arch = w.architecture().unwrap();
        assert_eq!(arch.layout().num_params(), params, "{}", w.name());
        assert_eq!(w.initial_params().unwrap().len(), params, "{}", w.name());
    }
}

#[test]
fn datasets_have_the_specified_shape() {
    let data = Workload::MlpA.dataset();
    assert_eq!((data.rows(), data.dim), (569, 30));
    assert_eq!(data, Dataset::generate(1, 569, 30));
    assert_eq!(Workload::Cnn.input_dim(), 784);
}

#[test]
fn keys_round_trip() {
    for w in Workload::ALL {
        assert_eq!(Workload::from_key(w.key()), Some(w));
    }
    assert_eq!(Workload::from_key("mlp-c"), None);
}
