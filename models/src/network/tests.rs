//! Tests of the network: the probe path against the batch-size-1 oracle and
//! against PyTorch reference values.

use meridian_spec::job::ModelSpec;
use serde_json::Value;

use super::*;
use crate::architecture::Layer;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| match x {
            Value::Array(inner) => inner.iter().map(|y| y.as_f64().unwrap()).collect::<Vec<_>>(),
            other => vec![other.as_f64().unwrap()],
        })
        .collect()
}

/// Flat values of a fixture's per-parameter map, in its param_names order.
fn flat(fix: &Value, map: &Value) -> Vec<f64> {
    fix["param_names"].as_array().unwrap().iter().flat_map(|n| floats(&map[n.as_str().unwrap()])).collect()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Largest `|got - want| / max(|want|, 1e-3 · max|want|)`: relative error per
/// value, with values under a thousandth of the largest compared to that.
fn max_relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let floor = (1e-3 * scale).max(f64::MIN_POSITIVE);
    got.iter().zip(want).map(|(g, w)| (g - w).abs() / w.abs().max(floor)).fold(0.0, f64::max)
}

#[track_caller]
fn assert_relative(what: &str, got: &[f32], want: &[f64], rel: f64) {
    let err = max_relative_error(&widen(got), want);
    assert!(err <= rel, "{what}: max relative error {err:e} > {rel:e}");
}

/// Every value within `rel` of the largest value in `want`.
#[track_caller]
fn assert_close(got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale.max(1e-6), "index {i}: got {g}, want {w}");
    }
}

/// The test oracle: one backward pass per example (batch size 1) through
/// the parameters themselves (`Network::burn_gradient_sum`), the textbook
/// definition of clipped per-example gradients; exact and slow. On Burn's
/// kernels, so it checks the CPU kernels and the probes alike.
fn clipped_sum_per_example(net: &Network, x: &[f32], y: &[u8], clip: f64) -> ClippedGradients {
    let d = net.arch.input_dim();
    let mut sum = vec![0f64; net.arch.layout().num_params()];
    let mut norms = Vec::with_capacity(y.len());
    let (mut loss_sum, mut correct, mut clipped) = (0.0, 0, 0);
    for (i, &label) in y.iter().enumerate() {
        let (g, loss, right) = net.burn_gradient_sum(&x[i * d..(i + 1) * d], &[label]);
        loss_sum += loss;
        correct += right;
        let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        let factor = clip_factor(norm, clip);
        if factor < 1.0 {
            clipped += 1;
        }
        for (s, v) in sum.iter_mut().zip(&g) {
            *s += factor * v;
        }
        norms.push(norm as f32);
    }
    ClippedGradients { sum: sum.into_iter().map(|v| v as f32).collect(), norms, loss_sum, correct, clipped }
}

fn labels(fix: &Value) -> Vec<u8> {
    fix["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect()
}

fn mlp_fixture_arch() -> Architecture {
    Architecture::from_layers(
        vec![
            Layer::Linear { inputs: 30, outputs: 64 },
            Layer::Relu,
            Layer::Linear { inputs: 64, outputs: 64 },
            Layer::Relu,
            Layer::Linear { inputs: 64, outputs: 2 },
        ],
        30,
        None,
    )
    .unwrap()
}

fn cnn_fixture_arch() -> Architecture {
    Architecture::from_layers(
        vec![
            Layer::Conv2d { in_channels: 1, out_channels: 4, kernel: 3 },
            Layer::Relu,
            Layer::MaxPool2,
            Layer::Conv2d { in_channels: 4, out_channels: 8, kernel: 3 },
            Layer::Relu,
            Layer::Flatten,
            Layer::Linear { inputs: 72, outputs: 2 },
        ],
        144,
        Some(12),
    )
    .unwrap()
}

/// Checks a fixture in `f64` to 1e-6 relative per value: per-example losses
/// and norms, clipped sums, clip counts; and in `f32` to 1e-4 of the largest
/// value.
#[track_caller]
fn check_fixture(name: &str, arch: &Architecture) {
    let fix = fixture(name);
    let weights = flat(&fix, &fix["weights"]);
    // The inputs are f32 values stored as float64.
    let x: Vec<f32> = floats(&fix["inputs"]).iter().map(|&v| v as f32).collect();
    let y = labels(&fix);
    let d = arch.input_dim();
    let exact = Network::new_f64(arch, &weights, &Device::flex()).unwrap();
    let weights_f32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let fast = Network::new(arch, &weights_f32, &Device::flex()).unwrap();

    let losses: Vec<f64> =
        (0..y.len()).map(|i| exact.clipped_gradient_sum(&x[i * d..(i + 1) * d], &y[i..=i], 1.0).loss_sum).collect();
    let want_losses = floats(&fix["per_sample_loss"]);
    let err = max_relative_error(&losses, &want_losses);
    assert!(err <= 1e-6, "per-example losses: max relative error {err:e}");
    let want_norms = floats(&fix["per_sample_grad_norm"]);
    for (clip, case) in fix["clipped_sums"].as_object().unwrap() {
        let clip: f64 = clip.parse().unwrap();
        let want_sum = flat(&fix, &case["sum_clipped_opacus"]);
        let got = exact.clipped_gradient_sum(&x, &y, clip);
        assert_relative("norms", &got.norms, &want_norms, 1e-6);
        assert_relative("clipped sum", &got.sum, &want_sum, 1e-6);
        let loss: f64 = want_losses.iter().sum();
        assert!((got.loss_sum - loss).abs() <= 1e-6 * loss.abs(), "{} vs {loss}", got.loss_sum);
        assert_eq!(got.clipped as u64, case["num_clipped"].as_u64().unwrap());

        let got = fast.clipped_gradient_sum(&x, &y, clip);
        let narrow = |v: &[f64]| v.iter().map(|&w| w as f32).collect::<Vec<_>>();
        assert_close(&got.norms, &narrow(&want_norms), 1e-4);
        assert_close(&got.sum, &narrow(&want_sum), 1e-4);
        assert!((got.loss_sum - loss).abs() <= 1e-4 * loss.abs(), "{} vs {loss}", got.loss_sum);
    }
}

#[test]
fn probes_match_pytorch_reference_on_mlp() {
    check_fixture("dpsgd_mlp.json", &mlp_fixture_arch());
}

#[test]
fn probes_match_pytorch_reference_on_cnn() {
    check_fixture("dpsgd_cnn.json", &cnn_fixture_arch());
}

/// Initial parameters of `arch` moved off their defaults by up to ±0.1, so
/// that norm layers' scales and shifts are not exactly 1 and 0.
fn random_params(arch: &Architecture, seed: u64) -> Vec<f64> {
    arch.init_params(seed)
        .iter()
        .enumerate()
        .map(|(i, &p)| f64::from(p) + 0.1 * (i as f64 * 1.7 + seed as f64).sin())
        .collect()
}

/// Probes equal the batch-size-1 oracle on `rows` made-up examples, in `f64`
/// to 1e-6 relative per value (the `f32` rounding of the results) and in
/// `f32` to `rel_f32` of the largest value.
#[track_caller]
fn check_against_oracle(arch: &Architecture, seed: u64, rows: usize, rel_f32: f32) {
    let d = arch.input_dim();
    let params = random_params(arch, seed);
    let x: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.37 + seed as f32).sin() * 2.0).collect();
    let y: Vec<u8> = (0..rows).map(|i| ((i + seed as usize) % 2) as u8).collect();
    let exact = Network::new_f64(arch, &params, &Device::flex()).unwrap();
    let params_f32: Vec<f32> = params.iter().map(|&p| p as f32).collect();
    let fast = Network::new(arch, &params_f32, &Device::flex()).unwrap();
    let fast_burn = Network::with_burn(arch, &params_f32, &Device::flex()).unwrap();
    let reference = clipped_sum_per_example(&exact, &x, &y, f64::INFINITY);
    let mut sorted = reference.norms.clone();
    sorted.sort_by(f32::total_cmp);
    let median = f64::from(sorted[rows / 2]);
    // Every example clipped, about half, none.
    for clip in [median / 10.0, median, 10.0 * median] {
        let probes = exact.clipped_gradient_sum(&x, &y, clip);
        let oracle = clipped_sum_per_example(&exact, &x, &y, clip);
        assert_relative("clipped sum", &probes.sum, &widen(&oracle.sum), 1e-6);
        assert_relative("norms", &probes.norms, &widen(&oracle.norms), 1e-6);
        assert!((probes.loss_sum - oracle.loss_sum).abs() <= 1e-9 * oracle.loss_sum.abs());
        assert_eq!(probes.clipped, oracle.clipped);
        assert_eq!(probes.correct, oracle.correct);

        let probes = fast.clipped_gradient_sum(&x, &y, clip);
        let oracle = clipped_sum_per_example(&fast_burn, &x, &y, clip);
        assert_close(&probes.sum, &oracle.sum, rel_f32);
        assert_close(&probes.norms, &oracle.norms, rel_f32);
        assert_eq!(probes.correct, oracle.correct);
    }
}

#[test]
fn probes_equal_the_oracle_on_mlps() {
    for (seed, hidden) in [(1u64, vec![8]), (2, vec![5, 7]), (3, vec![])] {
        let spec = if hidden.is_empty() { ModelSpec::LogisticRegression } else { ModelSpec::Mlp { hidden } };
        check_against_oracle(&Architecture::new(&spec, 6).unwrap(), seed, 9, 1e-5);
    }
}

#[test]
fn probes_equal_the_oracle_on_the_fixture_cnn() {
    check_against_oracle(&cnn_fixture_arch(), 4, 7, 1e-5);
}

#[test]
fn probes_equal_the_oracle_on_the_benchmark_cnn() {
    let arch = Architecture::new(&ModelSpec::Cnn { image_side: 28 }, 784).unwrap();
    check_against_oracle(&arch, 5, 3, 1e-4);
}

#[test]
fn probes_equal_the_oracle_with_layer_and_group_norm() {
    let mlp = Architecture::from_layers(
        vec![
            Layer::Linear { inputs: 6, outputs: 8 },
            Layer::LayerNorm { features: 8 },
            Layer::Relu,
            Layer::Linear { inputs: 8, outputs: 6 },
            Layer::GroupNorm { groups: 3, channels: 6 },
            Layer::Relu,
            Layer::Linear { inputs: 6, outputs: 2 },
        ],
        6,
        None,
    )
    .unwrap();
    check_against_oracle(&mlp, 6, 9, 1e-5);
    let cnn = Architecture::from_layers(
        vec![
            Layer::Conv2d { in_channels: 1, out_channels: 4, kernel: 3 },
            Layer::GroupNorm { groups: 2, channels: 4 },
            Layer::Relu,
            Layer::MaxPool2,
            Layer::Conv2d { in_channels: 4, out_channels: 6, kernel: 3 },
            Layer::GroupNorm { groups: 3, channels: 6 },
            Layer::Relu,
            Layer::Flatten,
            Layer::LayerNorm { features: 24 },
            Layer::Linear { inputs: 24, outputs: 2 },
        ],
        100,
        Some(10),
    )
    .unwrap();
    check_against_oracle(&cnn, 7, 5, 1e-5);
}

#[test]
fn an_empty_batch_gives_a_zero_sum() {
    let arch = cnn_fixture_arch();
    let net = Network::new(&arch, &arch.init_params(1), &Device::flex()).unwrap();
    let got = net.clipped_gradient_sum(&[], &[], 1.0);
    assert_eq!(got.sum, vec![0.0; arch.layout().num_params()]);
    assert!(got.norms.is_empty());
}

#[test]
fn f64_parameters_are_checked_like_f32_ones() {
    let arch = mlp_fixture_arch();
    let mut params = random_params(&arch, 1);
    params[5] = f64::NAN;
    assert_eq!(Network::new_f64(&arch, &params, &Device::flex()).err(), Some(LayoutError::NotFinite { index: 5 }));
}

#[test]
fn predict_returns_probabilities() {
    let arch = Architecture::new(&ModelSpec::LogisticRegression, 3).unwrap();
    let net = Network::new(&arch, &arch.init_params(1), &Device::flex()).unwrap();
    let p = net.predict(&[0.1, 0.2, 0.3, -1.0, 0.0, 1.0]);
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
}
