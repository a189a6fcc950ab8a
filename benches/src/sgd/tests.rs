//! The plain step against `models`' gradient, and the DP step's sampling
//! and bookkeeping.

use super::*;

fn cpu() -> Device {
    Device::flex()
}

/// `clipped_gradient_sum` with an infinite clip norm clips nothing, so its
/// sum over the batch divided by B is the mean gradient the plain step
/// computes without per-example work.
#[track_caller]
fn check_plain_gradient(workload: Workload, rows: usize) {
    let data = workload.dataset();
    let batch = Batch::gather(&data, &(0..rows).collect::<Vec<_>>());
    let plain = PlainSgd::new(workload, &cpu()).unwrap();
    let got = plain.gradient(&batch).unwrap();

    let arch = workload.architecture().unwrap();
    let net = Network::new(&arch, &workload.initial_params().unwrap(), &cpu()).unwrap();
    let unclipped = net.clipped_gradient_sum(&batch.x, &batch.y, f64::INFINITY);
    assert_eq!(unclipped.clipped, 0);
    let want: Vec<f32> = unclipped.sum.iter().map(|g| g / rows as f32).collect();

    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * scale, "{}: parameter {i}: got {g}, want {w}", workload.name());
    }
}

#[test]
fn plain_gradient_matches_models_for_the_mlp() {
    check_plain_gradient(Workload::MlpA, 16);
}

#[test]
fn plain_gradient_matches_models_for_the_cnn() {
    check_plain_gradient(Workload::Cnn, 4);
}

#[test]
fn plain_step_descends_the_gradient() {
    let w = Workload::MlpA;
    let data = w.dataset();
    let mut plain = PlainSgd::new(w, &cpu()).unwrap();
    let before = plain.params().to_vec();
    assert_eq!(before, w.initial_params().unwrap());
    let batch = Batch::gather(&data, &(0..64).collect::<Vec<_>>());
    let grad = plain.gradient(&batch).unwrap();
    plain.step(&batch).unwrap();
    let after = plain.params();
    for ((a, b), g) in after.iter().zip(&before).zip(&grad) {
        let want = b - (LEARNING_RATE as f32) * g;
        assert!((a - want).abs() <= 1e-6 * (1.0 + want.abs()), "got {a}, want {want}");
    }
}

#[test]
fn plain_epoch_takes_floor_n_over_b_full_batches() {
    let w = Workload::MlpA;
    let mut plain = PlainSgd::new(w, &cpu()).unwrap();
    let data = w.dataset();
    assert_eq!(plain.run(&data, w.plain_steps_per_epoch()).unwrap(), 8 * 64);
    // Each epoch's batches are distinct rows.
    let mut seen = plain.order[..plain.cursor].to_vec();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 8 * 64);
}

#[test]
fn poisson_batches_average_qn() {
    let w = Workload::Cnn;
    let data = Dataset::generate(3, w.rows(), 5);
    let mut dp = DpSgd::new(w, &cpu()).unwrap();
    let mut batch = Batch::default();
    let mut total = 0;
    let draws = 2_000;
    for _ in 0..draws {
        dp.sample(&data, &mut batch);
        assert!(batch.y.len() * 5 == batch.x.len());
        total += batch.len();
    }
    // Binomial(N, q): mean qN = 63.69, sd 7.96; the mean of 2000 draws has sd 0.18.
    let mean = total as f64 / draws as f64;
    let q_n = w.sample_rate() * w.rows() as f64;
    assert!((mean - q_n).abs() < 1.0, "mean batch {mean}, qN {q_n}");
}

#[test]
fn dp_run_counts_sampled_examples_and_moves_the_parameters() {
    let w = Workload::MlpA;
    let data = w.dataset();
    let mut dp = DpSgd::new(w, &cpu()).unwrap();
    let examples = dp.run(&data, w.steps_per_epoch()).unwrap();
    // 569 rows in expectation; Binomial sd about 22.
    assert!((400..740).contains(&examples), "{examples} examples in an epoch");
    assert_ne!(dp.params(), w.initial_params().unwrap().as_slice());
    assert!(dp.params().iter().all(|v| v.is_finite()));
}
