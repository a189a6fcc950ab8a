//! The CPU kernels against Burn's, layer by layer and on whole networks.

use burn::tensor::Device;
use proto::job::ModelSpec;

use crate::{Architecture, Layer, Network};

fn arch(layers: Vec<Layer>, input_dim: usize, side: Option<usize>) -> Architecture {
    Architecture::from_layers(layers, input_dim, side).unwrap()
}

/// Made-up rows and labels.
fn batch(d: usize, rows: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
    let x = (0..rows * d)
        .map(|i| (i as f32 * 0.61 + seed as f32).sin() * 1.5)
        .collect();
    let y = (0..rows)
        .map(|i| ((i as u64 * 7 + seed) % 3 % 2) as u8)
        .collect();
    (x, y)
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

/// Everything the CPU kernels return equals what Burn computes on the same
/// parameters, batch and clip norm.
#[track_caller]
fn check(arch: &Architecture, rows: usize, seed: u64) {
    let params: Vec<f32> = arch
        .init_params(seed)
        .iter()
        .enumerate()
        .map(|(i, p)| p + 0.05 * (i as f32 * 0.3).cos())
        .collect();
    let device = Device::flex();
    let cpu = Network::new(arch, &params, &device).unwrap();
    assert!(cpu.on_cpu_kernels(), "the CPU kernels take this network");
    let burn = Network::with_burn(arch, &params, &device).unwrap();
    assert!(!burn.on_cpu_kernels());
    let (x, y) = batch(arch.input_dim(), rows, seed);

    let (got, want) = (cpu.gradient_sum(&x, &y), burn.gradient_sum(&x, &y));
    assert_close("plain sum", &got.sum, &want.sum, 1e-5);
    assert!((got.loss_sum - want.loss_sum).abs() <= 1e-5 * want.loss_sum.abs());
    assert_eq!(got.correct, want.correct);

    let norms = burn.clipped_gradient_sum(&x, &y, f64::INFINITY).norms;
    let mut sorted = norms.clone();
    sorted.sort_by(f32::total_cmp);
    let median = f64::from(sorted[rows / 2]);
    for clip in [median / 10.0, median, f64::INFINITY] {
        let (got, want) = (
            cpu.clipped_gradient_sum(&x, &y, clip),
            burn.clipped_gradient_sum(&x, &y, clip),
        );
        assert_close("clipped sum", &got.sum, &want.sum, 1e-5);
        assert_close("norms", &got.norms, &want.norms, 1e-5);
        assert_eq!(got.clipped, want.clipped, "clip {clip}");
        assert_eq!(got.correct, want.correct);
    }
    assert_close("predict", &cpu.predict(&x), &burn.predict(&x), 1e-5);
}

#[test]
fn linear_stacks_match_burn() {
    let mlp = Architecture::new(&ModelSpec::Mlp { hidden: vec![9, 5] }, 7).unwrap();
    check(&mlp, 13, 1);
    check(
        &Architecture::new(&ModelSpec::LogisticRegression, 4).unwrap(),
        6,
        2,
    );
}

#[test]
fn the_benchmark_cnn_matches_burn_across_threads() {
    let cnn = Architecture::new(&ModelSpec::Cnn { image_side: 28 }, 784).unwrap();
    // 40 examples are enough work to be split across threads where there
    // are several cores.
    check(&cnn, 40, 3);
}

#[test]
fn odd_shapes_match_burn() {
    // An odd side (pooling drops the last row and column), several input
    // channels after the first convolution, and a ReLU before a linear head.
    let layers = vec![
        Layer::Conv2d {
            in_channels: 1,
            out_channels: 3,
            kernel: 3,
        },
        Layer::MaxPool2,
        Layer::Relu,
        Layer::Conv2d {
            in_channels: 3,
            out_channels: 4,
            kernel: 2,
        },
        Layer::Relu,
        Layer::Flatten,
        Layer::Linear {
            inputs: 4 * 2 * 2,
            outputs: 2,
        },
    ];
    check(&arch(layers, 81, Some(9)), 5, 4);
}

#[test]
fn norm_layers_stay_on_burn() {
    let layers = vec![
        Layer::Linear {
            inputs: 3,
            outputs: 4,
        },
        Layer::LayerNorm { features: 4 },
        Layer::Linear {
            inputs: 4,
            outputs: 2,
        },
    ];
    let arch = arch(layers, 3, None);
    let net = Network::new(&arch, &arch.init_params(1), &Device::flex()).unwrap();
    assert!(!net.on_cpu_kernels());
}

#[test]
fn im2col_and_col2im_are_adjoint() {
    // ⟨im2col(x), p⟩ = ⟨x, col2im(p)⟩ for any x and p.
    let (c, h, w, k) = (2, 5, 4, 3);
    let x: Vec<f32> = (0..c * h * w).map(|i| (i as f32 * 0.7).sin()).collect();
    let mut patches = Vec::new();
    super::im2col(&x, c, h, w, k, &mut patches);
    assert_eq!(patches.len(), c * k * k * (h - k + 1) * (w - k + 1));
    let p: Vec<f32> = (0..patches.len()).map(|i| (i as f32 * 1.3).cos()).collect();
    let mut back = vec![0f32; x.len()];
    super::col2im(&p, c, h, w, k, &mut back);
    let left: f64 = patches.iter().zip(&p).map(|(a, b)| f64::from(a * b)).sum();
    let right: f64 = x.iter().zip(&back).map(|(a, b)| f64::from(a * b)).sum();
    assert!((left - right).abs() < 1e-4, "{left} vs {right}");
}

#[test]
fn a_batch_cut_into_many_chunks_sums_the_same() {
    let cnn = Architecture::new(&ModelSpec::Cnn { image_side: 28 }, 784).unwrap();
    let params = cnn.init_params(6);
    let (x, y) = batch(784, 11, 6);
    let whole = super::CpuNet::new(&cnn, &params).unwrap();
    let mut cut = whole.clone();
    // As if the workspace could hold 3 examples: chunks of 3, 3, 3 and 2.
    cut.max_chunk = 3;
    for clip in [Some(0.01), None] {
        let (a, b) = (
            whole.gradient_sum(&x, &y, clip),
            cut.gradient_sum(&x, &y, clip),
        );
        assert_close("sum", &b.sum, &a.sum, 1e-6);
        assert_eq!(b.norms, a.norms);
        assert_eq!((b.correct, b.clipped), (a.correct, a.clipped));
        assert!((a.loss_sum - b.loss_sum).abs() < 1e-9 * a.loss_sum);
    }
    assert_eq!(cut.logits(&x), whole.logits(&x));
}
