use super::*;
use crate::architecture::Layer;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().flat_map(|x| match x {
        Value::Array(inner) => inner.iter().map(|y| y.as_f64().unwrap() as f32).collect::<Vec<_>>(),
        other => vec![other.as_f64().unwrap() as f32],
    }).collect()
}

/// Flat parameters and clipped sums of a fixture, in its param_names order.
fn flat(fix: &Value, map: &Value) -> Vec<f32> {
    fix["param_names"].as_array().unwrap().iter()
        .flat_map(|n| floats(&map[n.as_str().unwrap()]))
        .collect()
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale.max(1e-6), "index {i}: got {g}, want {w}");
    }
}

fn mlp_fixture_network(fix: &Value) -> Network {
    let arch = Architecture::from_layers(
        vec![
            Layer::Linear { inputs: 30, outputs: 64 },
            Layer::Relu,
            Layer::Linear { inputs: 64, outputs: 64 },
            Layer::Relu,
            Layer::Linear { inputs: 64, outputs: 2 },
        ],
        30,
        None,
    );
    Network::new(&arch, &flat(fix, &fix["weights"]), &Device::flex()).unwrap()
}

#[test]
fn probes_match_pytorch_reference_on_mlp() {
    let fix = fixture("dpsgd_mlp.json");
    let net = mlp_fixture_network(&fix);
    let x = floats(&fix["inputs"]);
    let y: Vec<u8> = fix["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    for (clip, case) in fix["clipped_sums"].as_object().unwrap() {
        let clip: f64 = clip.parse().unwrap();
        let got = net.clipped_gradient_sum(&x, &y, clip);
        assert_close(&got.norms, &floats(&fix["per_sample_grad_norm"]), 1e-4);
        assert_close(&got.sum, &flat(&fix, &case["sum_clipped_opacus"]), 1e-4);
        assert_eq!(got.clipped as u64, case["num_clipped"].as_u64().unwrap());
        let loss: f64 = floats(&fix["per_sample_loss"]).iter().map(|&l| f64::from(l)).sum();
        assert!((got.loss_sum - loss).abs() < 1e-4 * loss.abs(), "{} vs {loss}", got.loss_sum);
    }
}

#[test]
fn per_example_loop_matches_pytorch_reference_on_cnn() {
    let fix = fixture("dpsgd_cnn.json");
    let arch = Architecture::from_layers(
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
    );
    let net = Network::new(&arch, &flat(&fix, &fix["weights"]), &Device::flex()).unwrap();
    let x = floats(&fix["inputs"]);
    let y: Vec<u8> = fix["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    for (clip, case) in fix["clipped_sums"].as_object().unwrap() {
        let got = net.clipped_gradient_sum(&x, &y, clip.parse().unwrap());
        assert_close(&got.norms, &floats(&fix["per_sample_grad_norm"]), 1e-4);
        assert_close(&got.sum, &flat(&fix, &case["sum_clipped_opacus"]), 1e-4);
    }
}

#[test]
fn probes_equal_the_batch_size_one_oracle_on_random_models() {
    for (seed, hidden) in [(1u64, vec![8]), (2, vec![5, 7]), (3, vec![])] {
        let spec = if hidden.is_empty() {
            proto::job::ModelSpec::LogisticRegression
        } else {
            proto::job::ModelSpec::Mlp { hidden }
        };
        let arch = Architecture::new(&spec, 6).unwrap();
        let net = Network::new(&arch, &arch.init_params(seed), &Device::flex()).unwrap();
        let rows = 9;
        let x: Vec<f32> = (0..rows * 6).map(|i| ((i as f32 * 0.37 + seed as f32).sin()) * 2.0).collect();
        let y: Vec<u8> = (0..rows).map(|i| (i % 2) as u8).collect();
        for clip in [0.05, 1.0, 100.0] {
            let fast = net.clipped_sum_probes(&x, &y, clip);
            let oracle = net.clipped_sum_per_example(&x, &y, clip);
            assert_close(&fast.sum, &oracle.sum, 1e-5);
            assert_close(&fast.norms, &oracle.norms, 1e-5);
            assert_eq!(fast.clipped, oracle.clipped);
            assert_eq!(fast.correct, oracle.correct);
        }
    }
}

#[test]
fn predict_returns_probabilities() {
    let arch = Architecture::new(&proto::job::ModelSpec::LogisticRegression, 3).unwrap();
    let net = Network::new(&arch, &arch.init_params(1), &Device::flex()).unwrap();
    let p = net.predict(&[0.1, 0.2, 0.3, -1.0, 0.0, 1.0]);
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
}
