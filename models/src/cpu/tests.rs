//! The CPU kernels against Burn's, layer by layer and on whole networks.

use burn::tensor::Device;
use meridian_spec::job::ModelSpec;

use crate::{Architecture, Layer, Network};

fn arch(layers: Vec<Layer>, input_dim: usize, side: Option<usize>) -> Architecture {
    Architecture::from_layers(layers, input_dim, side).unwrap()
}

/// Made-up rows and labels.
fn batch(d: usize, rows: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
    let x = (0..rows * d).map(|i| (i as f32 * 0.61 + seed as f32).sin() * 1.5).collect();
    let y = (0..rows).map(|i| ((i as u64 * 7 + seed) % 3 % 2) as u8).collect();
    (x, y)
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
}

/// Everything the CPU kernels return equals what Burn computes on the same
/// parameters, batch and clip norm.
#[track_caller]
fn check(arch: &Architecture, rows: usize, seed: u64) {
    let params: Vec<f32> =
        arch.init_params(seed).iter().enumerate().map(|(i, p)| p + 0.05 * (i as f32 * 0.3).cos()).collect();
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

    let mut sorted = burn.clipped_gradient_sum(&x, &y, f64::INFINITY).norms;
    sorted.sort_by(f32::total_cmp);
    // Halfway between two norms, so that f32 rounding cannot move an example
    // across the clip norm.
    let middle = match sorted.len() {
        1 => f64::from(sorted[0]) / 2.0,
        len => f64::from(sorted[len / 2 - 1] + sorted[len / 2]) / 2.0,
    };
    for clip in [f64::from(sorted[0]) / 10.0, middle, f64::INFINITY] {
        let (got, want) = (cpu.clipped_gradient_sum(&x, &y, clip), burn.clipped_gradient_sum(&x, &y, clip));
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
    check(&Architecture::new(&ModelSpec::LogisticRegression, 4).unwrap(), 6, 2);
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
        Layer::Conv2d { in_channels: 1, out_channels: 3, kernel: 3 },
        Layer::MaxPool2,
        Layer::Relu,
        Layer::Conv2d { in_channels: 3, out_channels: 4, kernel: 2 },
        Layer::Relu,
        Layer::Flatten,
        Layer::Linear { inputs: 4 * 2 * 2, outputs: 2 },
    ];
    check(&arch(layers, 81, Some(9)), 5, 4);
}

#[test]
fn norm_layers_stay_on_burn() {
    let layers = vec![
        Layer::Linear { inputs: 3, outputs: 4 },
        Layer::LayerNorm { features: 4 },
        Layer::Linear { inputs: 4, outputs: 2 },
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
    let mut patches = vec![f32::NAN; c * k * k * (h - k + 1) * (w - k + 1)];
    super::im2col(&x, c, h, w, k, &mut patches);
    assert!(patches.iter().all(|v| v.is_finite()), "every patch value written");
    let p: Vec<f32> = (0..patches.len()).map(|i| (i as f32 * 1.3).cos()).collect();
    let mut back = vec![0f32; x.len()];
    super::col2im(&p, c, h, w, k, &mut back);
    let left: f64 = patches.iter().zip(&p).map(|(a, b)| f64::from(a * b)).sum();
    let right: f64 = x.iter().zip(&back).map(|(a, b)| f64::from(a * b)).sum();
    assert!((left - right).abs() < 1e-4, "{left} vs {right}");
}

#[test]
fn every_cut_of_the_batch_gives_the_same_sums() {
    let cnn = Architecture::new(&ModelSpec::Cnn { image_side: 28 }, 784).unwrap();
    let params = cnn.init_params(6);
    let (x, y) = batch(784, 11, 6);
    let net = super::CpuNet::new(&cnn, &params).unwrap();
    let split = |threads, size| super::Split { threads, size };
    for clip in [Some(0.01), None] {
        let whole = net.gradient_sum_split(&x, &y, clip, split(1, 11));
        // Chunks of 3, 3, 3 and 2 on one thread, then on three: the same
        // chunks give the same bits, whatever thread ran them.
        let one = net.gradient_sum_split(&x, &y, clip, split(1, 3));
        let three = net.gradient_sum_split(&x, &y, clip, split(3, 3));
        assert_eq!(one.sum, three.sum);
        // One example per chunk, on two threads: another order of additions.
        let single = net.gradient_sum_split(&x, &y, clip, split(2, 1));
        for got in [&one, &single] {
            assert_close("sum", &got.sum, &whole.sum, 1e-6);
            assert_eq!(got.norms, whole.norms);
            assert_eq!((got.correct, got.clipped), (whole.correct, whole.clipped));
            assert!((got.loss_sum - whole.loss_sum).abs() < 1e-9 * whole.loss_sum);
        }
        if clip.is_some() {
            assert_eq!(whole.clipped, 11, "clip 0.01 clips every example");
        }
    }
}

#[test]
fn pooling_last_and_a_relu_first_match_burn_down_to_one_example() {
    let layers = vec![
        Layer::Relu,
        Layer::Conv2d { in_channels: 1, out_channels: 2, kernel: 4 },
        Layer::MaxPool2,
        Layer::Flatten,
    ];
    let arch = arch(layers, 25, Some(5));
    check(&arch, 1, 7);
    check(&arch, 4, 8);
}

#[test]
fn a_nan_input_reaches_the_gradient() {
    // ReLU and max pooling pass NaN on (as PyTorch does) instead of
    // turning it into a finite value the divergence check cannot see.
    let cnn = Architecture::new(&ModelSpec::Cnn { image_side: 28 }, 784).unwrap();
    let net = Network::new(&cnn, &cnn.init_params(1), &Device::flex()).unwrap();
    let (mut x, y) = batch(784, 2, 1);
    x[300] = f32::NAN;
    let grads = net.clipped_gradient_sum(&x, &y, 1.0);
    assert!(grads.norms[0].is_nan(), "{:?}", grads.norms);
    assert!(grads.sum.iter().any(|g| g.is_nan()));
    assert!(net.predict(&x)[0].is_nan());
}

#[test]
fn a_panicking_chunk_reaches_the_caller_with_its_message() {
    let mut folded = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let split = super::Split { threads: 3, size: 1 };
        let work = |start: usize, _end: usize| {
            if start == 4 {
                panic!("chunk four");
            }
            start
        };
        super::in_chunks(10, split, work, |c| folded.push(c));
    }));
    let panic = result.unwrap_err();
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"chunk four"));
    // Chunks fold in order, so nothing after the failed chunk was folded.
    assert_eq!(folded, (0..folded.len()).collect::<Vec<_>>());
    assert!(folded.len() <= 4, "{folded:?}");
}

#[test]
fn max_pooling_keeps_the_first_maximum_and_the_last_nan() {
    let nan = f32::NAN;
    // One channel of 2 rows × 5 columns: windows over columns 0–1 and 2–3,
    // column 4 (odd width) in no window. Window 0 holds the case as
    // [a b / c d]; window 1 is fixed; column 4 holds the largest value.
    let width = 5;
    let cases: [([f32; 4], f32, u32); 6] = [
        ([1.0, 1.0, 1.0, 1.0], 1.0, 0),
        ([0.0, 0.0, 2.0, 2.0], 2.0, 5),
        ([0.0, 3.0, 2.0, 3.0], 3.0, 1),
        ([nan, 2.0, nan, 3.0], nan, 5),
        ([nan, 1.0, 2.0, 3.0], nan, 0),
        ([-0.0, 0.0, -1.0, 4.0], 4.0, 6),
    ];
    for ([a, b, c, d], value, winner) in cases {
        let x = [a, b, 7.0, 8.0, 100.0, c, d, 9.0, 6.0, 100.0];
        let (mut out, mut winners) = ([0f32; 2], [0u32; 2]);
        super::max_pool(&x, 1, 2, width, &mut out, &mut winners);
        let what = format!("window {:?}", [a, b, c, d]);
        assert_eq!(out[0].to_bits(), value.to_bits(), "{what}: value");
        assert_eq!(winners[0], winner, "{what}: winner");
        assert_eq!((out[1], winners[1]), (9.0, 7), "{what}: second window");
    }
}

#[test]
fn a_workspace_full_of_stale_values_gives_the_same_bits() {
    // Buffers the kernels resize without zeroing keep what an earlier batch
    // left in them: a workspace left full of NaN (and larger than needed)
    // gives exactly what a fresh one gives, so nothing stale from an earlier
    // call is read. (A buffer read before it is written within one call
    // would give the same wrong bits on both sides; the comparisons with
    // Burn above catch that: they fail if MaxPool's `down` is not zeroed.)
    let cnn = Architecture::new(&ModelSpec::Cnn { image_side: 28 }, 784).unwrap();
    let params = cnn.init_params(8);
    let (x, y) = batch(784, 11, 8);
    let net = super::CpuNet::new(&cnn, &params).unwrap();
    let stale = || {
        let junk = || vec![f32::NAN; 1 << 19];
        let ops = net.ops.len();
        super::Workspace {
            tape: (0..=ops).map(|_| junk()).collect(),
            argmax: (0..ops).map(|_| vec![u32::MAX; 1 << 19]).collect(),
            unfolded: (0..ops).map(|_| junk()).collect(),
            patch_grad: junk(),
            dz_t: junk(),
            weight_t: junk(),
            delta: junk(),
            down: junk(),
            kept: (0..ops).map(|_| junk()).collect(),
            kept_bias: (0..ops).map(|_| junk()).collect(),
            norm2: vec![f64::NAN; 1 << 10],
        }
    };
    for clip in [Some(0.5), None] {
        let fresh = net.chunk_gradient(&mut super::Workspace::default(), &x, &y, clip);
        let reused = net.chunk_gradient(&mut stale(), &x, &y, clip);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert!(fresh.sum.iter().all(|v| v.is_finite()));
        assert_eq!(bits(&reused.sum), bits(&fresh.sum), "clip {clip:?}: sum");
        assert_eq!(bits(&reused.norms), bits(&fresh.norms), "clip {clip:?}: norms");
        assert_eq!(reused.loss_sum.to_bits(), fresh.loss_sum.to_bits());
    }
    let mut ws = stale();
    net.forward(&mut ws, &x, 11);
    let mut fresh = super::Workspace::default();
    net.forward(&mut fresh, &x, 11);
    assert_eq!(ws.tape[net.ops.len()], fresh.tape[net.ops.len()], "logits");
}

#[test]
fn lane_sums_match_a_sum_in_f64() {
    for len in 0..=20 {
        let values: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let exact: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let got = f64::from(super::lane_sum(&values));
        assert!((got - exact).abs() <= 1e-6 * (len as f64 + 1.0), "len {len}: {got} vs {exact}");
    }
}
