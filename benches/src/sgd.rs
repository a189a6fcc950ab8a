//! The two training steps the benchmarks time: Meridian's DP-SGD step,
//! exactly as `worker::train::train_round` takes it, and a plain minibatch
//! SGD step on the same network, for the cost of privacy.
//!
//! # Why not call `train_round`
//! `train_round` sets `q = B / N` and `ceil(epochs / q)` steps; the
//! benchmark workloads fix `q = 1 / ceil(N / B)` (Opacus' rule) and count
//! the examples each step sampled, which the round does not report.
//! [`DpSgd::step`] therefore repeats the round's step — place the
//! parameters with `models::Network::new`, `clipped_gradient_sum`, noise
//! from `privacy::noise::PrefetchedNoise`, `params -= lr · sum / (qN)`, the
//! divergence check — with the same calls in the same order.
//!
//! # Why a second forward pass
//! `models` exposes only the per-example clipped gradient, which always
//! computes per-example norms. [`PlainSgd`] runs the same layers (linear
//! `x Wᵀ + b`, `conv2d`, ReLU, `max_pool2d`, flatten) with Burn's autodiff
//! on the parameters themselves, one backward pass of the mean
//! cross-entropy, and updates the parameters on the device, as a
//! PyTorch training loop does. A test checks its gradient against
//! `clipped_gradient_sum` with no clipping.

use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};
use models::{Architecture, CLASSES, Layer, LayoutError, Network};
use privacy::NoiseError;
use privacy::noise::PrefetchedNoise;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::data::Dataset;
use crate::workload::{CLIP_NORM, LEARNING_RATE, NOISE_MULTIPLIER, Workload};

/// Why a benchmark step could not run.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The workload's model or parameters do not fit.
    #[error("model: {0}")]
    Layout(#[from] LayoutError),
    /// No noise could be drawn.
    #[error("noise: {0}")]
    Noise(#[from] NoiseError),
    /// A layer [`PlainSgd`] does not implement (the workloads need none).
    #[error("layer {index} ({layer:?}) is not implemented by the plain step")]
    UnsupportedLayer {
        /// Position of the layer.
        index: usize,
        /// The layer.
        layer: Layer,
    },
    /// The workload's job spec was refused (a bug in [`crate::round::job_spec`]).
    #[error("job spec: {0}")]
    Spec(String),
    /// The worker's round failed.
    #[error("worker round: {0}")]
    Round(String),
    /// A parameter became NaN or infinite.
    #[error("training diverged at step {step}: a parameter became {value}")]
    Diverged {
        /// The step, counted from the trainer's creation.
        step: u64,
        /// The bad value.
        value: f32,
    },
}

/// One batch of rows, copied out of a [`Dataset`] as the worker does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// Row-major features, `len() · D` values.
    pub x: Vec<f32>,
    /// Labels.
    pub y: Vec<u8>,
}

impl Batch {
    /// Rows at `indices`.
    pub fn gather(data: &Dataset, indices: &[usize]) -> Batch {
        let mut batch = Batch::default();
        batch.refill(data, indices.iter().copied());
        batch
    }

    /// `size` distinct rows drawn uniformly by `rng`: a fixed-size batch,
    /// for timing single steps without Poisson's varying batch sizes.
    pub fn random(data: &Dataset, size: usize, rng: &mut ChaCha20Rng) -> Batch {
        let chosen = rand::seq::index::sample(rng, data.rows(), size.min(data.rows()));
        Batch::gather(data, &chosen.into_vec())
    }

    /// Examples in the batch.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the batch holds no example.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    fn refill(&mut self, data: &Dataset, rows: impl Iterator<Item = usize>) {
        self.x.clear();
        self.y.clear();
        for i in rows {
            self.x.extend_from_slice(data.row(i));
            self.y.push(data.y[i]);
        }
    }
}

/// Meridian's DP-SGD on a [`Workload`]: Poisson sampling at
/// [`Workload::sample_rate`], exact per-example clipping, Gaussian noise,
/// SGD; parameters on the host between steps, as in the worker.
pub struct DpSgd {
    arch: Architecture,
    device: Device,
    params: Vec<f32>,
    sample_rate: f64,
    clip: f64,
    noise_std: f64,
    /// `lr / (qN)`: the noised sum is divided by the expected batch size.
    scale: f32,
    noise: PrefetchedNoise,
    sampler: ChaCha20Rng,
    batch: Batch,
    steps_taken: u64,
}

impl DpSgd {
    /// A trainer at the workload's initial parameters, computing on `device`.
    /// Noise comes from an OS-seeded [`PrefetchedNoise`] (drawn ahead on a
    /// second thread), as in the worker; the
    /// Poisson sampler is seeded from the workload.
    pub fn new(workload: Workload, device: &Device) -> Result<DpSgd, StepError> {
        let arch = workload.architecture()?;
        let params = arch.init_params(workload.seed());
        let noise = PrefetchedNoise::new(params.len())?;
        let sample_rate = workload.sample_rate();
        let expected_batch = sample_rate * workload.rows() as f64;
        Ok(DpSgd {
            arch,
            device: device.clone(),
            params,
            sample_rate,
            clip: CLIP_NORM,
            noise_std: NOISE_MULTIPLIER * CLIP_NORM,
            scale: (LEARNING_RATE / expected_batch) as f32,
            noise,
            sampler: ChaCha20Rng::seed_from_u64(workload.seed()),
            batch: Batch::default(),
            steps_taken: 0,
        })
    }

    /// Poisson-samples `data` into `batch`: each row independently with
    /// probability q, by geometric gaps (the worker's sampler).
    pub fn sample(&mut self, data: &Dataset, batch: &mut Batch) {
        let q = self.sample_rate;
        let n = data.rows();
        let ln_keep = (1.0 - q).ln();
        let sampler = &mut self.sampler;
        let mut next = 0usize;
        let rows = std::iter::from_fn(|| {
            let gap = if q >= 1.0 {
                0
            } else {
                let u: f64 = 1.0 - sampler.random::<f64>(); // (0, 1]
                (u.ln() / ln_keep).floor() as usize
            };
            let i = next.saturating_add(gap);
            next = i.saturating_add(1);
            (i < n).then_some(i)
        });
        batch.refill(data, rows);
    }

    /// One DP-SGD step on `batch`: clipped gradient sum, noise, update.
    pub fn step(&mut self, batch: &Batch) -> Result<(), StepError> {
        let net = Network::new(&self.arch, &self.params, &self.device)?;
        let mut grads = net.clipped_gradient_sum(&batch.x, &batch.y, self.clip);
        self.noise
            .add_gaussian_noise(&mut grads.sum, self.noise_std)?;
        for (p, g) in self.params.iter_mut().zip(&grads.sum) {
            *p -= self.scale * g;
        }
        let step = self.steps_taken;
        self.steps_taken += 1;
        match self.params.iter().find(|v| !v.is_finite()) {
            Some(&value) => Err(StepError::Diverged { step, value }),
            None => Ok(()),
        }
    }

    /// `steps` sampled steps; returns the examples processed (the sum of
    /// the sampled batch sizes).
    pub fn run(&mut self, data: &Dataset, steps: usize) -> Result<usize, StepError> {
        let mut batch = std::mem::take(&mut self.batch);
        let mut examples = 0;
        for _ in 0..steps {
            self.sample(data, &mut batch);
            examples += batch.len();
            self.step(&batch)?;
        }
        self.batch = batch;
        Ok(examples)
    }

    /// The current parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }
}

/// Parameters of one layer on the device.
#[derive(Clone)]
enum Params {
    Linear { weight: Tensor<2>, bias: Tensor<1> },
    Conv { weight: Tensor<4>, bias: Tensor<1> },
    None,
}

/// Between two layers, batched.
enum Activation {
    Flat(Tensor<2>),
    Image(Tensor<4>),
}

/// Plain minibatch SGD on a [`Workload`]'s network with Burn's autodiff:
/// shuffled batches of exactly B, mean cross-entropy gradient, parameters
/// kept and updated on the device.
pub struct PlainSgd {
    arch: Architecture,
    device: Device,
    layers: Vec<Params>,
    lr: f64,
    batch_size: usize,
    shuffler: ChaCha20Rng,
    /// The current epoch's row order, and the next batch's position in it.
    order: Vec<usize>,
    cursor: usize,
    batch: Batch,
}

impl PlainSgd {
    /// A trainer at the workload's initial parameters, computing on `device`.
    pub fn new(workload: Workload, device: &Device) -> Result<PlainSgd, StepError> {
        let arch = workload.architecture()?;
        let params = arch.init_params(workload.seed());
        let mut rest = params.as_slice();
        let mut take = |shape: Vec<usize>| {
            let (head, tail) = rest.split_at(shape.iter().product());
            rest = tail;
            TensorData::new(head.to_vec(), shape)
        };
        let options = (device, DType::F32);
        let mut layers = Vec::with_capacity(arch.layers().len());
        for (index, &layer) in arch.layers().iter().enumerate() {
            layers.push(match layer {
                Layer::Linear { inputs, outputs } => Params::Linear {
                    weight: Tensor::from_data(take(vec![outputs, inputs]), options),
                    bias: Tensor::from_data(take(vec![outputs]), options),
                },
                Layer::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                } => Params::Conv {
                    weight: Tensor::from_data(
                        take(vec![out_channels, in_channels, kernel, kernel]),
                        options,
                    ),
                    bias: Tensor::from_data(take(vec![out_channels]), options),
                },
                Layer::Relu | Layer::MaxPool2 | Layer::Flatten => Params::None,
                Layer::LayerNorm { .. } | Layer::GroupNorm { .. } | Layer::BatchNorm { .. } => {
                    return Err(StepError::UnsupportedLayer { index, layer });
                }
            });
        }
        Ok(PlainSgd {
            arch,
            device: device.clone(),
            layers,
            lr: LEARNING_RATE,
            batch_size: workload.batch_size(),
            shuffler: ChaCha20Rng::seed_from_u64(workload.seed()),
            order: (0..workload.rows()).collect(),
            cursor: usize::MAX,
            batch: Batch::default(),
        })
    }

    /// The logits `[B, CLASSES]` of `input` `[B, D]` under `layers`.
    fn forward(&self, layers: &[Params], input: Tensor<2>) -> Tensor<2> {
        let mut act = match self.arch.image_side() {
            Some(side) => {
                let [b, _] = input.dims();
                Activation::Image(input.reshape([b, 1, side, side]))
            }
            None => Activation::Flat(input),
        };
        // `Architecture` checked that each layer fits the shape before it
        // and `new` refused the others, so the arms not listed never occur.
        for (layer, p) in self.arch.layers().iter().zip(layers) {
            act = match (layer, p, act) {
                (Layer::Linear { .. }, Params::Linear { weight, bias }, Activation::Flat(a)) => {
                    Activation::Flat(
                        a.matmul(weight.clone().transpose()) + bias.clone().unsqueeze::<2>(),
                    )
                }
                (Layer::Conv2d { .. }, Params::Conv { weight, bias }, Activation::Image(x)) => {
                    let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
                    Activation::Image(conv2d(x, weight.clone(), Some(bias.clone()), options))
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

    /// The parameters as autodiff leaves, and the gradients of the mean
    /// cross-entropy of `batch` with respect to them.
    fn backward(&self, batch: &Batch) -> (Vec<Params>, Gradients) {
        let b = batch.len();
        let d = self.arch.input_dim();
        let autodiff = self.device.clone().autodiff();
        let track2 = |t: &Tensor<2>| t.clone().autodiff().require_grad();
        let track1 = |t: &Tensor<1>| t.clone().autodiff().require_grad();
        let tracked: Vec<Params> = self
            .layers
            .iter()
            .map(|p| match p {
                Params::Linear { weight, bias } => Params::Linear {
                    weight: track2(weight),
                    bias: track1(bias),
                },
                Params::Conv { weight, bias } => Params::Conv {
                    weight: weight.clone().autodiff().require_grad(),
                    bias: track1(bias),
                },
                Params::None => Params::None,
            })
            .collect();
        let options = (&autodiff, DType::F32);
        let input = Tensor::<2>::from_data(TensorData::new(batch.x.clone(), [b, d]), options);
        let mut onehot = vec![0f32; b * CLASSES];
        for (i, &label) in batch.y.iter().enumerate() {
            onehot[i * CLASSES + usize::from(label.min(1))] = 1.0;
        }
        let onehot = Tensor::<2>::from_data(TensorData::new(onehot, [b, CLASSES]), options);
        let logits = self.forward(&tracked, input);
        let loss = (log_softmax(logits, 1) * onehot)
            .sum()
            .neg()
            .div_scalar(b.max(1) as f64);
        let grads = loss.backward();
        (tracked, grads)
    }

    /// The mean cross-entropy gradient of `batch`, flat in the layout's
    /// order (for checks; [`PlainSgd::step`] never leaves the device).
    pub fn gradient(&self, batch: &Batch) -> Vec<f32> {
        let (tracked, grads) = self.backward(batch);
        let mut flat = Vec::new();
        for p in &tracked {
            match p {
                Params::Linear { weight, bias } => {
                    flat.extend(host(weight.grad(&grads)));
                    flat.extend(host(bias.grad(&grads)));
                }
                Params::Conv { weight, bias } => {
                    flat.extend(host(weight.grad(&grads)));
                    flat.extend(host(bias.grad(&grads)));
                }
                Params::None => {}
            }
        }
        flat
    }

    /// One SGD step on `batch`: `θ -= lr · ∇ mean loss`, on the device.
    pub fn step(&mut self, batch: &Batch) {
        let (tracked, grads) = self.backward(batch);
        let lr = self.lr;
        for (p, t) in self.layers.iter_mut().zip(&tracked) {
            match (p, t) {
                (
                    Params::Linear { weight, bias },
                    Params::Linear {
                        weight: tw,
                        bias: tb,
                    },
                ) => {
                    *weight = descend(weight, tw.grad(&grads), lr);
                    *bias = descend(bias, tb.grad(&grads), lr);
                }
                (
                    Params::Conv { weight, bias },
                    Params::Conv {
                        weight: tw,
                        bias: tb,
                    },
                ) => {
                    *weight = descend(weight, tw.grad(&grads), lr);
                    *bias = descend(bias, tb.grad(&grads), lr);
                }
                _ => {}
            }
        }
    }

    /// `steps` steps over shuffled batches of exactly B, reshuffling after
    /// every `floor(N / B)` batches (an epoch); returns the examples
    /// processed. Reads the parameters back at the end, so that all the work
    /// is done when it returns, whatever the device.
    pub fn run(&mut self, data: &Dataset, steps: usize) -> usize {
        let b = self.batch_size;
        let mut batch = std::mem::take(&mut self.batch);
        let mut examples = 0;
        for _ in 0..steps {
            if self.cursor.saturating_add(b) > self.order.len() {
                self.order.shuffle(&mut self.shuffler);
                self.cursor = 0;
            }
            batch.refill(
                data,
                self.order[self.cursor..self.cursor + b].iter().copied(),
            );
            self.cursor += b;
            examples += batch.len();
            self.step(&batch);
        }
        self.batch = batch;
        let _ = self.params();
        examples
    }

    /// The current parameters, flat in the layout's order.
    pub fn params(&self) -> Vec<f32> {
        let mut flat = Vec::new();
        for p in &self.layers {
            match p {
                Params::Linear { weight, bias } => {
                    flat.extend(host(Some(weight.clone())));
                    flat.extend(host(Some(bias.clone())));
                }
                Params::Conv { weight, bias } => {
                    flat.extend(host(Some(weight.clone())));
                    flat.extend(host(Some(bias.clone())));
                }
                Params::None => {}
            }
        }
        flat
    }
}

/// `θ - lr · g` as a plain (non-autodiff) tensor; a missing gradient (the
/// loss does not depend on θ) leaves θ unchanged.
fn descend<const D: usize>(theta: &Tensor<D>, grad: Option<Tensor<D>>, lr: f64) -> Tensor<D> {
    match grad {
        Some(g) => theta.clone() - g.mul_scalar(lr),
        None => theta.clone(),
    }
}

/// A tensor's values on the host as `f32`; a missing tensor gives nothing.
fn host<const D: usize>(t: Option<Tensor<D>>) -> Vec<f32> {
    t.map(|t| {
        t.into_data()
            .try_into_vec_as::<f32>()
            .expect("a float tensor reads back as f32")
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests;
