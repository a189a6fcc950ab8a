//! The two training steps the benchmarks time: Meridian's DP-SGD step,
//! exactly as `meridian_worker::train::train_round` takes it, and a plain minibatch
//! SGD step on the same network, for the cost of privacy.
//!
//! # Why not call `train_round`
//! `train_round` sets `q = B / N` and `ceil(epochs / q)` steps; the
//! benchmark workloads fix `q = 1 / ceil(N / B)` (Opacus' rule) and count
//! the examples each step sampled, which the round does not report.
//! [`DpSgd::step`] therefore repeats the round's step — place the
//! parameters with `meridian_models::Network::new`, `clipped_gradient_sum`, noise
//! from `meridian_privacy::noise::PrefetchedNoise`, `params -= lr · sum / (qN)`, the
//! divergence check — with the same calls in the same order.
//!
//! # The plain step
//! [`PlainSgd`] takes the same path with `meridian_models::Network::gradient_sum`
//! (one backward pass of the summed loss, no per-example work, no noise)
//! and divides by B: the difference between the two is the cost of
//! privacy, whichever kernels compute (Meridian's CPU kernels on the CPU,
//! Burn's on a GPU).

use burn::tensor::Device;
use meridian_models::{Architecture, LayoutError, Network};
use meridian_privacy::NoiseError;
use meridian_privacy::noise::PrefetchedNoise;
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
        self.noise.add_gaussian_noise(&mut grads.sum, self.noise_std)?;
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

/// Plain minibatch SGD on a [`Workload`]'s network: shuffled batches of
/// exactly B, the mean cross-entropy gradient from
/// [`Network::gradient_sum`], parameters on the host between steps (as in
/// [`DpSgd`], so the two differ only by clipping and noise).
pub struct PlainSgd {
    arch: Architecture,
    device: Device,
    params: Vec<f32>,
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
        Ok(PlainSgd {
            arch,
            device: device.clone(),
            params,
            lr: LEARNING_RATE,
            batch_size: workload.batch_size(),
            shuffler: ChaCha20Rng::seed_from_u64(workload.seed()),
            order: (0..workload.rows()).collect(),
            cursor: usize::MAX,
            batch: Batch::default(),
        })
    }

    /// The mean cross-entropy gradient of `batch`, flat in the layout's order.
    pub fn gradient(&self, batch: &Batch) -> Result<Vec<f32>, StepError> {
        let net = Network::new(&self.arch, &self.params, &self.device)?;
        let mut grads = net.gradient_sum(&batch.x, &batch.y).sum;
        let scale = 1.0 / batch.len().max(1) as f32;
        grads.iter_mut().for_each(|g| *g *= scale);
        Ok(grads)
    }

    /// One SGD step on `batch`: `θ -= lr · ∇ mean loss`.
    pub fn step(&mut self, batch: &Batch) -> Result<(), StepError> {
        let grads = self.gradient(batch)?;
        let lr = self.lr as f32;
        for (p, g) in self.params.iter_mut().zip(&grads) {
            *p -= lr * g;
        }
        Ok(())
    }

    /// `steps` steps over shuffled batches of exactly B, reshuffling after
    /// every `floor(N / B)` batches (an epoch); returns the examples
    /// processed.
    pub fn run(&mut self, data: &Dataset, steps: usize) -> Result<usize, StepError> {
        let b = self.batch_size;
        let mut batch = std::mem::take(&mut self.batch);
        let mut examples = 0;
        for _ in 0..steps {
            if self.cursor.saturating_add(b) > self.order.len() {
                self.order.shuffle(&mut self.shuffler);
                self.cursor = 0;
            }
            batch.refill(data, self.order[self.cursor..self.cursor + b].iter().copied());
            self.cursor += b;
            examples += batch.len();
            self.step(&batch)?;
        }
        self.batch = batch;
        Ok(examples)
    }

    /// The current parameters, flat in the layout's order.
    pub fn params(&self) -> &[f32] {
        &self.params
    }
}

#[cfg(test)]
mod tests;
