//! A network's parameters on a Burn device, and the two computations the
//! worker needs from it: exact clipped per-example gradient sums (DP-SGD) and
//! predictions.
//!
//! # Why probes
//! Burn computes gradients of a scalar, so it never sees one example's
//! gradient on its own. For a linear layer `z = a Wᵀ + b`, example `i`'s
//! weight gradient is the outer product `dzᵢ aᵢᵀ`, whose squared norm is
//! `‖aᵢ‖²‖dzᵢ‖²` (plus `‖dzᵢ‖²` for the bias). So we add a zero "probe" tensor
//! to each layer's pre-activation; one backward pass of the summed loss gives
//! every `dzᵢ` as the probe's gradient; with the saved inputs `aᵢ` this yields
//! every example's exact gradient norm, and the clipped sum is one matmul per
//! layer: `(dz ⊙ f)ᵀ a`. Convolutional networks fall back to one backward pass
//! per example (exact, slower).

use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};

use crate::architecture::{Architecture, Layer, LayoutError};

/// The device training runs on: the `flex` CPU backend, or with the `wgpu`
/// feature and `gpu = true`, the first discrete GPU.
pub fn default_device(gpu: bool) -> Device {
    #[cfg(feature = "wgpu")]
    if gpu {
        return Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(0));
    }
    let _ = gpu;
    Device::flex()
}

/// Parameters of one layer on the device (inner tensors, no autodiff).
#[derive(Clone)]
enum LayerParams {
    Linear { weight: Tensor<2>, bias: Tensor<1> },
    Conv { weight: Tensor<4>, bias: Tensor<1> },
    None,
}

/// A network's parameters placed on a device.
pub struct Network {
    arch: Architecture,
    device: Device,
    params: Vec<LayerParams>,
}

/// The result of one DP-SGD gradient computation over a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct ClippedGradients {
    /// Σᵢ clip(gᵢ), flat, in the layout's order.
    pub sum: Vec<f32>,
    /// Each example's gradient norm before clipping.
    pub norms: Vec<f32>,
    /// Σᵢ lossᵢ (cross-entropy).
    pub loss_sum: f64,
    /// Examples whose argmax matched the label.
    pub correct: usize,
    /// Examples whose gradient was scaled down.
    pub clipped: usize,
}

impl Network {
    /// Places a flat parameter vector (PyTorch layout) on `device`.
    pub fn new(arch: &Architecture, params: &[f32], device: &Device) -> Result<Network, LayoutError> {
        let layout = arch.layout();
        layout.check(params)?;
        let mut offset = 0;
        let mut take = |n: usize| {
            let slice = params[offset..offset + n].to_vec();
            offset += n;
            slice
        };
        let mut layer_params = Vec::with_capacity(arch.layers().len());
        for layer in arch.layers() {
            layer_params.push(match *layer {
                Layer::Linear { inputs, outputs } => LayerParams::Linear {
                    weight: Tensor::from_data(TensorData::new(take(inputs * outputs), [outputs, inputs]), device),
                    bias: Tensor::from_data(TensorData::new(take(outputs), [outputs]), device),
                },
                Layer::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                } => LayerParams::Conv {
                    weight: Tensor::from_data(
                        TensorData::new(
                            take(out_channels * in_channels * kernel * kernel),
                            [out_channels, in_channels, kernel, kernel],
                        ),
                        device,
                    ),
                    bias: Tensor::from_data(TensorData::new(take(out_channels), [out_channels]), device),
                },
                _ => LayerParams::None,
            });
        }
        Ok(Network {
            arch: arch.clone(),
            device: device.clone(),
            params: layer_params,
        })
    }

    /// The architecture.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    fn has_conv(&self) -> bool {
        self.params.iter().any(|p| matches!(p, LayerParams::Conv { .. }))
    }

    /// Probability of class 1 for each of the `x.len() / input_dim` rows.
    pub fn predict(&self, x: &[f32]) -> Vec<f32> {
        let d = self.arch.input_dim();
        let rows = x.len() / d;
        let mut out = Vec::with_capacity(rows);
        for start in (0..rows).step_by(4096) {
            let n = (rows - start).min(4096);
            let input = Tensor::<2>::from_data(
                TensorData::new(x[start * d..(start + n) * d].to_vec(), [n, d]),
                &self.device,
            );
            let logits = self.forward(input, &self.params, None);
            let probs = burn::tensor::activation::softmax(logits, 1);
            let values = to_vec(probs);
            out.extend(values.chunks_exact(2).map(|p| p[1]));
        }
        out
    }

    /// Runs the layers; with `probes`, adds a zero probe (on the autodiff
    /// device) to every linear pre-activation and records each linear
    /// layer's input.
    fn forward(
        &self,
        input: Tensor<2>,
        params: &[LayerParams],
        mut probes: Option<&mut Vec<(Tensor<2>, Tensor<2>)>>,
    ) -> Tensor<2> {
        let mut flat: Option<Tensor<2>> = None;
        let mut image: Option<Tensor<4>> = None;
        if let Some(side) = self.arch.image_side() {
            let [b, _] = input.dims();
            image = Some(input.reshape([b, 1, side, side]));
        } else {
            flat = Some(input);
        }
        for (layer, p) in self.arch.layers().iter().zip(params) {
            match (layer, p) {
                (Layer::Linear { .. }, LayerParams::Linear { weight, bias }) => {
                    let Some(a) = flat.take() else { continue };
                    let mut z = a.clone().matmul(weight.clone().transpose()) + bias.clone().unsqueeze::<2>();
                    if let Some(probes) = probes.as_deref_mut() {
                        let probe = Tensor::<2>::zeros(z.dims(), &self.device.clone().autodiff()).require_grad();
                        z = z + probe.clone();
                        probes.push((probe, a.inner()));
                    }
                    flat = Some(z);
                }
                (Layer::Conv2d { .. }, LayerParams::Conv { weight, bias }) => {
                    if let Some(x) = image.take() {
                        image = Some(conv2d(
                            x,
                            weight.clone(),
                            Some(bias.clone()),
                            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
                        ));
                    }
                }
                (Layer::Relu, _) => {
                    flat = flat.map(relu);
                    image = image.map(relu);
                }
                (Layer::MaxPool2, _) => {
                    image = image.map(|x| max_pool2d(x, MaxPoolOptions::new([2, 2])));
                }
                (Layer::Flatten, _) => {
                    if let Some(x) = image.take() {
                        let [b, c, h, w] = x.dims();
                        flat = Some(x.reshape([b, c * h * w]));
                    }
                }
                _ => {}
            }
        }
        // A valid architecture always ends in a linear layer.
        flat.unwrap_or_else(|| Tensor::zeros([0, 2], &self.device))
    }

    /// The DP-SGD gradient of a batch: each example's gradient of its
    /// cross-entropy loss, scaled by `min(1, clip / (‖gᵢ‖ + 1e-6))` (Opacus'
    /// rule), summed. `x` holds `y.len()` rows. No noise is added here.
    pub fn clipped_gradient_sum(&self, x: &[f32], y: &[u8], clip: f64) -> ClippedGradients {
        if self.has_conv() {
            self.clipped_sum_per_example(x, y, clip)
        } else {
            self.clipped_sum_probes(x, y, clip)
        }
    }

    fn batch(&self, x: &[f32], y: &[u8], device: &Device) -> (Tensor<2>, Tensor<2>) {
        let b = y.len();
        let d = self.arch.input_dim();
        let input = Tensor::<2>::from_data(TensorData::new(x[..b * d].to_vec(), [b, d]), device);
        let mut onehot = vec![0f32; b * 2];
        for (i, &label) in y.iter().enumerate() {
            onehot[i * 2 + usize::from(label.min(1))] = 1.0;
        }
        let onehot = Tensor::<2>::from_data(TensorData::new(onehot, [b, 2]), device);
        (input, onehot)
    }

    fn clipped_sum_probes(&self, x: &[f32], y: &[u8], clip: f64) -> ClippedGradients {
        let b = y.len();
        let num_params = self.arch.layout().num_params();
        if b == 0 {
            return ClippedGradients {
                sum: vec![0.0; num_params],
                norms: Vec::new(),
                loss_sum: 0.0,
                correct: 0,
                clipped: 0,
            };
        }
        let (input, onehot) = self.batch(x, y, &self.device);
        let mut probes = Vec::new();
        let logits = self.forward(input, &self.params, Some(&mut probes));
        let log_probs = log_softmax(logits, 1);
        let per_example = (log_probs.clone() * onehot).sum_dim(1).neg();
        let loss = per_example.clone().sum();
        let grads = loss.backward();
        let (loss_sum, correct) = loss_and_correct(&to_vec(per_example.inner()), &to_vec(log_probs.inner()), y);

        // Per-example squared norms over all layers.
        let mut dz = Vec::with_capacity(probes.len());
        let mut norm2: Option<Tensor<2>> = None;
        for (probe, a) in &probes {
            let Some(g) = probe.grad(&grads) else { continue };
            let g2 = g.clone().powi_scalar(2).sum_dim(1);
            let a2 = a.clone().powi_scalar(2).sum_dim(1).add_scalar(1.0);
            let term = g2 * a2;
            norm2 = Some(match norm2 {
                Some(n) => n + term,
                None => term,
            });
            dz.push((g, a.clone()));
        }
        let Some(norm2) = norm2 else {
            return ClippedGradients {
                sum: vec![0.0; num_params],
                norms: vec![0.0; b],
                loss_sum,
                correct,
                clipped: 0,
            };
        };
        let norms = norm2.sqrt();
        let factor = norms.clone().add_scalar(1e-6).recip().mul_scalar(clip).clamp_max(1.0);
        let norms = to_vec(norms);
        let clipped = norms.iter().filter(|&&n| f64::from(n) + 1e-6 > clip).count();
        let mut sum = Vec::with_capacity(num_params);
        for (g, a) in dz {
            let scaled = g * factor.clone();
            let weight = scaled.clone().transpose().matmul(a);
            sum.extend(to_vec(weight));
            sum.extend(to_vec(scaled.sum_dim(0)));
        }
        ClippedGradients {
            sum,
            norms,
            loss_sum,
            correct,
            clipped,
        }
    }

    /// Exact but slow: one backward pass per example.
    fn clipped_sum_per_example(&self, x: &[f32], y: &[u8], clip: f64) -> ClippedGradients {
        let d = self.arch.input_dim();
        let num_params = self.arch.layout().num_params();
        let autodiff = self.device.clone().autodiff();
        let mut sum = vec![0f64; num_params];
        let mut norms = Vec::with_capacity(y.len());
        let (mut loss_sum, mut correct, mut clipped) = (0.0, 0, 0);
        for (i, &label) in y.iter().enumerate() {
            let tracked: Vec<LayerParams> = self
                .params
                .iter()
                .map(|p| match p {
                    LayerParams::Linear { weight, bias } => LayerParams::Linear {
                        weight: weight.clone().autodiff().require_grad(),
                        bias: bias.clone().autodiff().require_grad(),
                    },
                    LayerParams::Conv { weight, bias } => LayerParams::Conv {
                        weight: weight.clone().autodiff().require_grad(),
                        bias: bias.clone().autodiff().require_grad(),
                    },
                    LayerParams::None => LayerParams::None,
                })
                .collect();
            let (input, onehot) = self.batch(&x[i * d..(i + 1) * d], &[label], &autodiff);
            let logits = self.forward(input, &tracked, None);
            let log_probs = log_softmax(logits, 1);
            let loss = (log_probs.clone() * onehot).sum().neg();
            let grads = loss.backward();
            let (l, c) = loss_and_correct(&to_vec(loss.inner()), &to_vec(log_probs.inner()), &[label]);
            loss_sum += l;
            correct += c;
            let mut g = Vec::with_capacity(num_params);
            for p in &tracked {
                match p {
                    LayerParams::Linear { weight, bias } => {
                        g.extend(weight.grad(&grads).map(to_vec).unwrap_or_default());
                        g.extend(bias.grad(&grads).map(to_vec).unwrap_or_default());
                    }
                    LayerParams::Conv { weight, bias } => {
                        g.extend(weight.grad(&grads).map(to_vec).unwrap_or_default());
                        g.extend(bias.grad(&grads).map(to_vec).unwrap_or_default());
                    }
                    LayerParams::None => {}
                }
            }
            g.resize(num_params, 0.0);
            let norm = g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let factor = (clip / (norm + 1e-6)).min(1.0);
            if factor < 1.0 {
                clipped += 1;
            }
            for (s, v) in sum.iter_mut().zip(&g) {
                *s += factor * f64::from(*v);
            }
            norms.push(norm as f32);
        }
        ClippedGradients {
            sum: sum.into_iter().map(|v| v as f32).collect(),
            norms,
            loss_sum,
            correct,
            clipped,
        }
    }
}

fn loss_and_correct(per_example_loss: &[f32], log_probs: &[f32], y: &[u8]) -> (f64, usize) {
    let loss = per_example_loss.iter().map(|&l| f64::from(l)).sum();
    let correct = log_probs
        .chunks_exact(2)
        .zip(y)
        .filter(|(lp, label)| u8::from(lp[1] > lp[0]) == **label)
        .count();
    (loss, correct)
}

/// Copies a tensor's values to the host as `f32`.
fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests;
