//! A network's parameters on a device, and the computations the worker needs
//! from it: exact clipped per-example gradient sums (DP-SGD), plain gradient
//! sums and predictions. On the `flex` CPU device the layers Meridian's own
//! kernels implement run there (see `cpu`); this file is the Burn path, for
//! GPUs, `f64` reference checks and norm layers.
//!
//! # Why probes
//! Burn computes gradients of a scalar and has no backward hooks, so it never
//! sees one example's gradient on its own. But every trainable layer's
//! per-example parameter gradient is a simple function of two things: the
//! layer's input (or normalised input), saved during the forward pass, and
//! the gradient of the loss with respect to the layer's output. To get the
//! latter we add a zero "probe" tensor, which requires a gradient, to every
//! trainable layer's output; one backward pass of the summed loss gives every
//! example's output gradient as the probe's gradient, since example `i`'s
//! loss depends only on row `i` of each probe. Then, per layer:
//!
//! - Linear `z = a Wᵀ + b`: example `i`'s weight gradient is the outer
//!   product `dzᵢ aᵢᵀ`, whose squared norm is `‖aᵢ‖²‖dzᵢ‖²`, plus `‖dzᵢ‖²` for
//!   the bias, so it is never built ("ghost norm"); the clipped sum is one
//!   matmul, `(dz ⊙ f)ᵀ a`, with `fᵢ` each example's clip factor.
//! - Conv2d: with the input unfolded into patches `Uᵢ` `[C_in·k·k, L]` (the
//!   PyTorch weight order `[in, kh, kw]`) and `dzᵢ` `[C_out, L]`, the weight
//!   gradient is `Gᵢ = dzᵢ Uᵢᵀ`, one batched matmul for the whole batch, and
//!   the bias gradient `Σ_L dzᵢ`. `Gᵢ` is built explicitly rather than its norm
//!   taken through the Gram form `Σ (UᵢᵀUᵢ) ⊙ (dzᵢᵀdzᵢ)`, which costs
//!   `L²·(C_in·k·k + C_out)` per example against `C_out·C_in·k·k·L`, so only
//!   pays when `L < C_out·C_in·k·k / (C_in·k·k + C_out)`; no Meridian CNN
//!   comes close (benchmark CNN: L = 576 against 10, and 64 against 30), and
//!   `G` is small (`B·C_out·C_in·k·k` values). With `G` at hand the clipped
//!   sum is the weighted reduction `Σᵢ fᵢ Gᵢ`, `L` times cheaper than a second
//!   matmul over the patches.
//! - LayerNorm and GroupNorm `y = x̂ γ + β` (per feature or channel): the
//!   probe sits on `y`; example `i`'s gradients are `Σ dyᵢ ⊙ x̂ᵢ` for `γ` and
//!   `Σ dyᵢ` for `β`, summed over the pixels of each channel.
//!
//! ReLU, pooling and flatten have no parameters; the backward pass carries
//! gradients through them to the probes. BatchNorm is refused when the
//! architecture is built: it makes one example's output depend on the others.
//!
//! # Precision
//! [`Network::new`] computes in `f32`, as training does; [`Network::new_f64`]
//! computes in `f64`, which reference tests use to match PyTorch's `float64`
//! values to 1e-6 relative. Results come back as `f32` either way.

use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::module::{conv2d, max_pool2d, unfold4d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions, UnfoldOptions};
use burn::tensor::{DType, Device, Element, Tensor, TensorData};
use meridian_privacy::clip_factor;

use crate::architecture::{Architecture, CLASSES, Layer, LayoutError, NORM_EPSILON};
use crate::cpu::CpuNet;

/// The device training runs on: the `flex` CPU backend, or with the `wgpu`
/// feature and `gpu = true`, the first discrete GPU.
///
/// A GPU is probed with one small tensor round trip, because Burn panics on
/// first use (not on creation) when no adapter exists; that panic is caught
/// here and returned as an error naming what was missing.
pub fn default_device(gpu: bool) -> Result<Device, DeviceError> {
    #[cfg(feature = "wgpu")]
    if gpu {
        let device = Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(0));
        let probe = device.clone();
        let probe = std::panic::AssertUnwindSafe(move || {
            let sum = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &probe).sum();
            sum.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default()
        });
        return match std::panic::catch_unwind(probe) {
            Ok(sum) if sum == [3.0] => Ok(device),
            Ok(sum) => Err(DeviceError::NoGpu(format!("the GPU computed 1 + 2 = {sum:?}"))),
            Err(panic) => Err(DeviceError::NoGpu(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the wgpu runtime failed to start".to_string()),
            )),
        };
    }
    if gpu {
        return Err(DeviceError::NoGpu("this build has no GPU support (build with --features wgpu)".to_string()));
    }
    Ok(Device::flex())
}

/// Why no training device is available.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A GPU was asked for and none works.
    #[error("no usable GPU: {0}")]
    NoGpu(String),
}

/// Parameters of one layer on the device (inner tensors, no autodiff).
#[derive(Clone)]
enum LayerParams {
    Linear {
        weight: Tensor<2>,
        bias: Tensor<1>,
    },
    Conv {
        weight: Tensor<4>,
        bias: Tensor<1>,
    },
    /// LayerNorm or GroupNorm: scale and shift per feature or channel.
    Norm {
        weight: Tensor<1>,
        bias: Tensor<1>,
    },
    None,
}

/// A network's parameters placed on a device.
pub struct Network {
    arch: Architecture,
    device: Device,
    /// `F32` or `F64`: every tensor of this network is created in it.
    dtype: DType,
    /// Burn's copy of the parameters; empty when `cpu` computes instead.
    params: Vec<LayerParams>,
    /// Meridian's own CPU kernels, used for `f32` on the `flex` device when
    /// they implement every layer (see `cpu`).
    cpu: Option<CpuNet>,
}

/// The plain (unclipped) gradient of a batch's summed loss.
#[derive(Clone, Debug, PartialEq)]
pub struct GradientSum {
    /// Σᵢ gᵢ, flat, in the layout's order.
    pub sum: Vec<f32>,
    /// Σᵢ lossᵢ (cross-entropy).
    pub loss_sum: f64,
    /// Examples whose argmax matched the label.
    pub correct: usize,
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

/// One example's activation between two layers, batched.
enum Activation {
    /// `[B, features]`.
    Flat(Tensor<2>),
    /// `[B, channels, height, width]`.
    Image(Tensor<4>),
}

/// What a trainable layer saved during a probed forward pass: its zero probe,
/// whose gradient is each example's output gradient, and the values its
/// parameter gradients multiply that with (inner tensors).
enum Probe {
    /// Probe on `z = a Wᵀ + b` `[B, out]`; the input `a` `[B, in]`.
    Linear { probe: Tensor<2>, input: Tensor<2> },
    /// Probe on the pre-activation `[B, C_out, H', W']`; the input
    /// `[B, C_in, H, W]` and the kernel side.
    Conv { probe: Tensor<4>, input: Tensor<4>, kernel: usize },
    /// Probe on `y = x̂ γ + β` as `[B, C, S]`; `x̂` `[B, C, S]` (S pixels per
    /// channel, 1 for a flat input).
    Norm { probe: Tensor<3>, normalized: Tensor<3> },
}

/// A layer's per-example gradients, as the clipping needs them.
enum PerExample {
    /// Linear: example `i`'s weight gradient is `dzᵢ aᵢᵀ`, never built.
    Outer { dz: Tensor<2>, input: Tensor<2> },
    /// Every example's weight and bias gradient, `[B, n]` each, flat in the
    /// layout's order.
    Explicit { weight: Tensor<2>, bias: Tensor<2> },
}

impl Network {
    /// Places a flat parameter vector (PyTorch layout) on `device`; the
    /// network computes in `f32`. On the `flex` CPU device, networks made of
    /// linear, convolution, ReLU, max-pooling and flatten layers run on
    /// Meridian's own kernels (`cpu`), others on Burn.
    pub fn new(arch: &Architecture, params: &[f32], device: &Device) -> Result<Network, LayoutError> {
        if *device == Device::flex() {
            arch.layout().check(params)?;
            if let Some(cpu) = CpuNet::new(arch, params) {
                return Ok(Network {
                    arch: arch.clone(),
                    device: device.clone(),
                    dtype: DType::F32,
                    params: Vec::new(),
                    cpu: Some(cpu),
                });
            }
        }
        Network::place(arch, params, DType::F32, device)
    }

    /// Like [`Network::new`], but always on Burn's kernels: for comparing the
    /// two CPU paths, and the path every GPU takes.
    pub fn with_burn(arch: &Architecture, params: &[f32], device: &Device) -> Result<Network, LayoutError> {
        Network::place(arch, params, DType::F32, device)
    }

    /// Places a flat `f64` parameter vector (PyTorch layout) on `device`; the
    /// network computes in `f64` (slower; for reference checks).
    pub fn new_f64(arch: &Architecture, params: &[f64], device: &Device) -> Result<Network, LayoutError> {
        Network::place(arch, params, DType::F64, device)
    }

    fn place<E: Element + Copy + Into<f64>>(
        arch: &Architecture,
        params: &[E],
        dtype: DType,
        device: &Device,
    ) -> Result<Network, LayoutError> {
        arch.layout().check_values(params)?;
        let mut rest = params;
        let mut take = |shape: &[usize]| {
            let (head, tail) = rest.split_at(shape.iter().product());
            rest = tail;
            TensorData::new(head.to_vec(), shape.to_vec())
        };
        let options = (device, dtype);
        let mut layer_params = Vec::with_capacity(arch.layers().len());
        for layer in arch.layers() {
            layer_params.push(match *layer {
                Layer::Linear { inputs, outputs } => LayerParams::Linear {
                    weight: Tensor::from_data(take(&[outputs, inputs]), options),
                    bias: Tensor::from_data(take(&[outputs]), options),
                },
                Layer::Conv2d { in_channels, out_channels, kernel } => LayerParams::Conv {
                    weight: Tensor::from_data(take(&[out_channels, in_channels, kernel, kernel]), options),
                    bias: Tensor::from_data(take(&[out_channels]), options),
                },
                Layer::LayerNorm { features: channels } | Layer::GroupNorm { channels, .. } => LayerParams::Norm {
                    weight: Tensor::from_data(take(&[channels]), options),
                    bias: Tensor::from_data(take(&[channels]), options),
                },
                Layer::Relu | Layer::MaxPool2 | Layer::Flatten | Layer::BatchNorm { .. } => LayerParams::None,
            });
        }
        Ok(Network { arch: arch.clone(), device: device.clone(), dtype, params: layer_params, cpu: None })
    }

    /// Whether Meridian's own CPU kernels compute for this network.
    #[cfg(test)]
    pub(crate) fn on_cpu_kernels(&self) -> bool {
        self.cpu.is_some()
    }

    /// The architecture.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// Probability of class 1 for each of the `x.len() / input_dim` rows.
    pub fn predict(&self, x: &[f32]) -> Vec<f32> {
        self.positive_logits(x).into_iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect()
    }

    /// The logit of class 1 against class 0 (`z₁ − z₀`) for each of the
    /// `x.len() / input_dim` rows: the score a held-out evaluation bins,
    /// exact where a probability near 0 or 1 would round.
    pub fn positive_logits(&self, x: &[f32]) -> Vec<f32> {
        let d = self.arch.input_dim();
        let rows = x.len() / d;
        if let Some(cpu) = &self.cpu {
            return cpu.logits(&x[..rows * d]).chunks_exact(CLASSES).map(|z| z[1] - z[0]).collect();
        }
        let mut out = Vec::with_capacity(rows);
        for start in (0..rows).step_by(4096) {
            let n = (rows - start).min(4096);
            let input = Tensor::<2>::from_data(
                TensorData::new(x[start * d..(start + n) * d].to_vec(), [n, d]),
                (&self.device, self.dtype),
            );
            let logits = to_f32(self.forward(input, &self.params, None));
            out.extend(logits.chunks_exact(CLASSES).map(|z| z[1] - z[0]));
        }
        out
    }

    /// A zero tensor on the autodiff device that requires a gradient.
    fn probe<const D: usize>(&self, shape: [usize; D]) -> Tensor<D> {
        Tensor::zeros(shape, (&self.device.clone().autodiff(), self.dtype)).require_grad()
    }

    /// Runs the layers on `input` `[B, input_dim]`, giving the logits
    /// `[B, CLASSES]`. With `probes`, adds a zero probe to every trainable
    /// layer's output and records what [`Probe`] says.
    fn forward(&self, input: Tensor<2>, params: &[LayerParams], mut probes: Option<&mut Vec<Probe>>) -> Tensor<2> {
        let mut act = match self.arch.image_side() {
            Some(side) => {
                let [b, _] = input.dims();
                Activation::Image(input.reshape([b, 1, side, side]))
            }
            None => Activation::Flat(input),
        };
        // `Architecture::from_layers` checked that each layer fits the shape
        // before it, so the arms not listed never occur.
        for (layer, p) in self.arch.layers().iter().zip(params) {
            act = match (layer, p, act) {
                (Layer::Linear { .. }, LayerParams::Linear { weight, bias }, Activation::Flat(a)) => {
                    let mut z = a.clone().matmul(weight.clone().transpose()) + bias.clone().unsqueeze::<2>();
                    if let Some(probes) = probes.as_deref_mut() {
                        let probe = self.probe(z.dims());
                        z = z + probe.clone();
                        probes.push(Probe::Linear { probe, input: a.inner() });
                    }
                    Activation::Flat(z)
                }
                (Layer::Conv2d { kernel, .. }, LayerParams::Conv { weight, bias }, Activation::Image(x)) => {
                    let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
                    let mut z = conv2d(x.clone(), weight.clone(), Some(bias.clone()), options);
                    if let Some(probes) = probes.as_deref_mut() {
                        let probe = self.probe(z.dims());
                        z = z + probe.clone();
                        probes.push(Probe::Conv { probe, input: x.inner(), kernel: *kernel });
                    }
                    Activation::Image(z)
                }
                (Layer::Relu, _, Activation::Flat(x)) => Activation::Flat(relu(x)),
                (Layer::Relu, _, Activation::Image(x)) => Activation::Image(relu(x)),
                (Layer::MaxPool2, _, Activation::Image(x)) => {
                    Activation::Image(max_pool2d(x, MaxPoolOptions::new([2, 2])))
                }
                (Layer::Flatten, _, Activation::Image(x)) => {
                    let [b, c, h, w] = x.dims();
                    Activation::Flat(x.reshape([b, c * h * w]))
                }
                (Layer::LayerNorm { .. }, LayerParams::Norm { weight, bias }, Activation::Flat(x)) => {
                    let [b, f] = x.dims();
                    let normalized = normalize(x, 1).reshape([b, f, 1]);
                    Activation::Flat(self.affine(normalized, weight, bias, probes.as_deref_mut()).reshape([b, f]))
                }
                (Layer::GroupNorm { groups, .. }, LayerParams::Norm { weight, bias }, Activation::Flat(x)) => {
                    let [b, c] = x.dims();
                    let normalized = normalize(x.reshape([b, *groups, c / groups]), 2).reshape([b, c, 1]);
                    Activation::Flat(self.affine(normalized, weight, bias, probes.as_deref_mut()).reshape([b, c]))
                }
                (Layer::GroupNorm { groups, .. }, LayerParams::Norm { weight, bias }, Activation::Image(x)) => {
                    let [b, c, h, w] = x.dims();
                    let grouped = x.reshape([b, *groups, c / groups * h * w]);
                    let normalized = normalize(grouped, 2).reshape([b, c, h * w]);
                    let y = self.affine(normalized, weight, bias, probes.as_deref_mut());
                    Activation::Image(y.reshape([b, c, h, w]))
                }
                (_, _, act) => act,
            };
        }
        match act {
            Activation::Flat(logits) => logits,
            Activation::Image(x) => {
                let [b, c, h, w] = x.dims();
                x.reshape([b, c * h * w])
            }
        }
    }

    /// `x̂ γ + β` per channel of `normalized` `[B, C, S]`, with a probe.
    fn affine(
        &self,
        normalized: Tensor<3>,
        weight: &Tensor<1>,
        bias: &Tensor<1>,
        probes: Option<&mut Vec<Probe>>,
    ) -> Tensor<3> {
        let [_, c, _] = normalized.dims();
        let mut y = normalized.clone() * weight.clone().reshape([1, c, 1]) + bias.clone().reshape([1, c, 1]);
        if let Some(probes) = probes {
            let probe = self.probe(y.dims());
            y = y + probe.clone();
            probes.push(Probe::Norm { probe, normalized: normalized.inner() });
        }
        y
    }

    /// The DP-SGD gradient of a batch: each example's gradient of its
    /// cross-entropy loss, scaled by `min(1, clip / (‖gᵢ‖ + 1e-6))` (Opacus'
    /// rule), summed. `x` holds `y.len()` rows. No noise is added here.
    ///
    /// One forward and one backward pass over the whole batch, with probes
    /// (see the module documentation); exact, not an approximation.
    pub fn clipped_gradient_sum(&self, x: &[f32], y: &[u8], clip: f64) -> ClippedGradients {
        let b = y.len();
        if let Some(cpu) = &self.cpu {
            let outcome = cpu.gradient_sum(x, y, Some(clip));
            return ClippedGradients {
                sum: outcome.sum,
                norms: outcome.norms,
                loss_sum: outcome.loss_sum,
                correct: outcome.correct,
                clipped: outcome.clipped,
            };
        }
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
        let grads = per_example.clone().sum().backward();
        let (loss_sum, correct) = loss_and_correct(&to_f64(per_example.inner()), &to_f64(log_probs.inner()), y);

        let layers: Vec<PerExample> = probes.into_iter().map(|probe| per_example_gradients(probe, &grads)).collect();
        let norm2 =
            layers.iter().map(PerExample::norm2).reduce(|a, b| a + b).map(to_f64).unwrap_or_else(|| vec![0.0; b]);
        let norms: Vec<f64> = norm2.iter().copied().map(norm_of_squared).collect();
        let factors: Vec<f64> = norms.iter().map(|n| clip_factor(*n, clip)).collect();
        let clipped = factors.iter().filter(|&&f| f < 1.0).count();
        let factors = Tensor::<2>::from_data(TensorData::new(factors, [b, 1]), (&self.device, self.dtype));
        let parts: Vec<Tensor<1>> = layers.into_iter().flat_map(|layer| layer.clipped_sum(&factors)).collect();
        let sum = if parts.is_empty() { vec![0.0; num_params] } else { to_f32(Tensor::cat(parts, 0)) };
        ClippedGradients { sum, norms: norms.into_iter().map(|n| n as f32).collect(), loss_sum, correct, clipped }
    }

    /// The gradient of the summed cross-entropy of the `y.len()` rows of `x`,
    /// with no clipping: what a non-private SGD step descends. One forward
    /// and one backward pass, through the parameters themselves.
    pub fn gradient_sum(&self, x: &[f32], y: &[u8]) -> GradientSum {
        if let Some(cpu) = &self.cpu {
            let outcome = cpu.gradient_sum(x, y, None);
            return GradientSum { sum: outcome.sum, loss_sum: outcome.loss_sum, correct: outcome.correct };
        }
        let (sum, loss_sum, correct) = self.burn_gradient_sum(x, y);
        GradientSum { sum: sum.into_iter().map(|v| v as f32).collect(), loss_sum, correct }
    }

    /// [`Network::gradient_sum`] on Burn's kernels, the sum in full
    /// precision (`f64` networks keep it exact).
    fn burn_gradient_sum(&self, x: &[f32], y: &[u8]) -> (Vec<f64>, f64, usize) {
        let num_params = self.arch.layout().num_params();
        if y.is_empty() {
            return (vec![0.0; num_params], 0.0, 0);
        }
        let autodiff = self.device.clone().autodiff();
        let track = |t: &Tensor<1>| t.clone().autodiff().require_grad();
        let tracked: Vec<LayerParams> = self
            .params
            .iter()
            .map(|p| match p {
                LayerParams::Linear { weight, bias } => {
                    LayerParams::Linear { weight: weight.clone().autodiff().require_grad(), bias: track(bias) }
                }
                LayerParams::Conv { weight, bias } => {
                    LayerParams::Conv { weight: weight.clone().autodiff().require_grad(), bias: track(bias) }
                }
                LayerParams::Norm { weight, bias } => LayerParams::Norm { weight: track(weight), bias: track(bias) },
                LayerParams::None => LayerParams::None,
            })
            .collect();
        let (input, onehot) = self.batch(x, y, &autodiff);
        let log_probs = log_softmax(self.forward(input, &tracked, None), 1);
        let per_example = (log_probs.clone() * onehot).sum_dim(1).neg();
        let grads = per_example.clone().sum().backward();
        let (loss_sum, correct) = loss_and_correct(&to_f64(per_example.inner()), &to_f64(log_probs.inner()), y);
        let mut sum = Vec::with_capacity(num_params);
        for p in &tracked {
            match p {
                LayerParams::Linear { weight, bias } => {
                    sum.extend(gradient_of(weight, &grads));
                    sum.extend(gradient_of(bias, &grads));
                }
                LayerParams::Conv { weight, bias } => {
                    sum.extend(gradient_of(weight, &grads));
                    sum.extend(gradient_of(bias, &grads));
                }
                LayerParams::Norm { weight, bias } => {
                    sum.extend(gradient_of(weight, &grads));
                    sum.extend(gradient_of(bias, &grads));
                }
                LayerParams::None => {}
            }
        }
        (sum, loss_sum, correct)
    }

    /// The first `y.len()` rows of `x` and one-hot labels, on `device`.
    fn batch(&self, x: &[f32], y: &[u8], device: &Device) -> (Tensor<2>, Tensor<2>) {
        let b = y.len();
        let d = self.arch.input_dim();
        let options = (device, self.dtype);
        let input = Tensor::<2>::from_data(TensorData::new(x[..b * d].to_vec(), [b, d]), options);
        let mut onehot = vec![0f32; b * CLASSES];
        for (i, &label) in y.iter().enumerate() {
            onehot[i * CLASSES + usize::from(label.min(1))] = 1.0;
        }
        let onehot = Tensor::<2>::from_data(TensorData::new(onehot, [b, CLASSES]), options);
        (input, onehot)
    }
}

/// The norm from a squared norm; a NaN stays NaN, so that a gradient gone
/// NaN never reads as a zero one.
pub(crate) fn norm_of_squared(norm2: f64) -> f64 {
    if norm2.is_nan() { norm2 } else { norm2.max(0.0).sqrt() }
}

/// `(x - mean) / √(var + ε)` over `dim`, with the biased variance.
fn normalize<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let centered = x.clone() - x.mean_dim(dim);
    let var = centered.clone().square().mean_dim(dim);
    centered / var.add_scalar(NORM_EPSILON).sqrt()
}

/// A layer's per-example gradients from its probe's gradient. A probe
/// without a gradient (the loss does not depend on it) counts as zero.
fn per_example_gradients(probe: Probe, grads: &burn::tensor::Gradients) -> PerExample {
    match probe {
        Probe::Linear { probe, input } => {
            PerExample::Outer { dz: probe.grad(grads).unwrap_or_else(|| probe.inner()), input }
        }
        Probe::Conv { probe, input, kernel } => {
            let dz = probe.grad(grads).unwrap_or_else(|| probe.inner());
            let [b, c_out, h, w] = dz.dims();
            let dz = dz.reshape([b, c_out, h * w]);
            // [B, C_in·k·k, L], rows in PyTorch's weight order (c, kh, kw).
            let patches = unfold4d(input, [kernel, kernel], UnfoldOptions::new([1, 1], [0, 0], [1, 1]));
            let [_, patch, _] = patches.dims();
            let weight = dz.clone().matmul(patches.swap_dims(1, 2));
            PerExample::Explicit { weight: weight.reshape([b, c_out * patch]), bias: dz.sum_dim(2).reshape([b, c_out]) }
        }
        Probe::Norm { probe, normalized } => {
            let dy = probe.grad(grads).unwrap_or_else(|| probe.inner());
            let [b, c, _] = dy.dims();
            PerExample::Explicit {
                weight: (dy.clone() * normalized).sum_dim(2).reshape([b, c]),
                bias: dy.sum_dim(2).reshape([b, c]),
            }
        }
    }
}

impl PerExample {
    /// Each example's squared gradient norm over this layer, `[B]`.
    fn norm2(&self) -> Tensor<1> {
        let per_row = |t: &Tensor<2>| t.clone().square().sum_dim(1);
        let norm2 = match self {
            PerExample::Outer { dz, input } => per_row(dz) * per_row(input).add_scalar(1.0),
            PerExample::Explicit { weight, bias } => per_row(weight) + per_row(bias),
        };
        let [b, _] = norm2.dims();
        norm2.reshape([b])
    }

    /// `Σᵢ fᵢ gᵢ` for the weight and then the bias, flat, with `factors` `[B, 1]`.
    fn clipped_sum(self, factors: &Tensor<2>) -> [Tensor<1>; 2] {
        let flat = |t: Tensor<2>| {
            let n = t.dims().iter().product::<usize>();
            t.reshape([n])
        };
        match self {
            PerExample::Outer { dz, input } => {
                let scaled = dz * factors.clone();
                [flat(scaled.clone().transpose().matmul(input)), flat(scaled.sum_dim(0))]
            }
            PerExample::Explicit { weight, bias } => {
                [flat((weight * factors.clone()).sum_dim(0)), flat((bias * factors.clone()).sum_dim(0))]
            }
        }
    }
}

fn loss_and_correct(per_example_loss: &[f64], log_probs: &[f64], y: &[u8]) -> (f64, usize) {
    let loss = per_example_loss.iter().sum();
    let correct =
        log_probs.chunks_exact(CLASSES).zip(y).filter(|(lp, label)| u8::from(lp[1] > lp[0]) == **label).count();
    (loss, correct)
}

/// A tracked tensor's gradient on the host; zeros when the loss does not
/// depend on it.
fn gradient_of<const D: usize>(tracked: &Tensor<D>, grads: &burn::tensor::Gradients) -> Vec<f64> {
    match tracked.grad(grads) {
        Some(grad) => to_f64(grad),
        None => vec![0.0; tracked.shape().num_elements()],
    }
}

/// Copies a tensor's values to the host as `f32`.
fn to_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap_or_default()
}

/// Copies a tensor's values to the host as `f64`.
fn to_f64<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().try_into_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests;
