//! The workloads as jobs, and a worker round on one.

use super::*;

#[test]
fn job_specs_parse_and_match_the_workloads() {
    for w in Workload::ALL {
        let spec = job_spec(w).unwrap();
        assert_eq!(spec.model, w.model(), "{}", w.name());
        assert_eq!(spec.features.input_dim(), w.input_dim(), "{}", w.name());
        assert_eq!(spec.training.batch_size, w.batch_size());
        assert_eq!(spec.training.learning_rate, LEARNING_RATE);
        assert_eq!((spec.privacy.noise_multiplier, spec.privacy.clip_norm), (NOISE_MULTIPLIER, CLIP_NORM));
        // q = B/N gives the same ceil(N/B) steps per local epoch.
        assert_eq!(spec.site_plan(w.rows() as u64).steps_per_round, w.steps_per_epoch() as u64, "{}", w.name());
    }
}

#[test]
fn a_worker_round_takes_one_epoch_of_steps() {
    let w = Workload::MlpA;
    let mut round = WorkerRound::new(w, &w.dataset(), &Device::flex()).unwrap();
    let (steps, examples) = round.plan();
    assert_eq!(steps, 9);
    assert!((examples - 576.0).abs() < 1e-9, "9 steps of B = 64 expected, got {examples}");
    assert_eq!(round.run().unwrap(), 9);
    assert_ne!(round.params, w.initial_params().unwrap());
}
