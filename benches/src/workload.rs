//! The benchmark workloads, fixed so that Meridian's figures compare like
//! for like with the Opacus reference runs: model, data, batch size,
//! sampling rate and steps per epoch, and the accountant query.

use meridian_models::{Architecture, LayoutError};
use meridian_spec::job::ModelSpec;

use crate::data::Dataset;

/// SGD learning rate of every training workload.
pub const LEARNING_RATE: f64 = 0.05;
/// DP-SGD noise multiplier σ.
pub const NOISE_MULTIPLIER: f64 = 1.0;
/// DP-SGD per-example clip norm C.
pub const CLIP_NORM: f64 = 1.0;

/// The accountant workload: ε of this many DP-SGD steps...
pub const ACCOUNTANT_STEPS: u64 = 10_000;
/// ...at this Poisson sampling rate...
pub const ACCOUNTANT_SAMPLE_RATE: f64 = 0.01;
/// ...and noise multiplier...
pub const ACCOUNTANT_NOISE_MULTIPLIER: f64 = 1.0;
/// ...at this δ.
pub const ACCOUNTANT_DELTA: f64 = 1e-5;

/// A training workload: a model, its data and batch size.
///
/// | workload | model | D | N | seed | B |
/// |---|---|---|---|---|---|
/// | MLP-A | 30-64-64-2 ReLU | 30 | 569 | 1 | 64 |
/// | MLP-B | 17-128-128-2 ReLU | 17 | 320,000 | 2 | 256 |
/// | CNN | conv5(16) pool conv5(32) pool fc128 fc2 | 784 (28×28) | 10,000 | 3 | 64 |
///
/// Cross-entropy loss, SGD at [`LEARNING_RATE`]. DP-SGD samples each row
/// with probability `q = 1 / ceil(N/B)` per step (Poisson) for
/// `ceil(N/B)` steps per epoch, clips each example's gradient to
/// [`CLIP_NORM`], adds N(0, σ²C²) with σ = [`NOISE_MULTIPLIER`] and divides
/// by `qN`; the plain step takes shuffled batches of exactly `B` and the
/// mean gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Small tabular MLP (the WDBC shape).
    MlpA,
    /// Wide tabular MLP on a large dataset.
    MlpB,
    /// Small CNN on 28×28 single-channel images.
    Cnn,
}

/// Throughput Opacus reaches on a workload, examples per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reference {
    /// Plain PyTorch SGD.
    pub plain_examples_per_sec: f64,
    /// Opacus 1.6.0 DP-SGD with Poisson sampling.
    pub dp_examples_per_sec: f64,
}

impl Workload {
    /// Every workload, in table order.
    pub const ALL: [Workload; 3] = [Workload::MlpA, Workload::MlpB, Workload::Cnn];

    /// The display name: `MLP-A`, `MLP-B`, `CNN`.
    pub fn name(self) -> &'static str {
        match self {
            Workload::MlpA => "MLP-A",
            Workload::MlpB => "MLP-B",
            Workload::Cnn => "CNN",
        }
    }

    /// The command-line and criterion name: `mlp-a`, `mlp-b`, `cnn`.
    pub fn key(self) -> &'static str {
        match self {
            Workload::MlpA => "mlp-a",
            Workload::MlpB => "mlp-b",
            Workload::Cnn => "cnn",
        }
    }

    /// The workload named `key` (see [`Workload::key`]).
    pub fn from_key(key: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.key() == key)
    }

    /// The model, as a job would name it.
    pub fn model(self) -> ModelSpec {
        match self {
            Workload::MlpA => ModelSpec::Mlp { hidden: vec![64, 64] },
            Workload::MlpB => ModelSpec::Mlp { hidden: vec![128, 128] },
            Workload::Cnn => ModelSpec::Cnn { image_side: 28 },
        }
    }

    /// Features per row, D.
    pub fn input_dim(self) -> usize {
        match self {
            Workload::MlpA => 30,
            Workload::MlpB => 17,
            Workload::Cnn => 28 * 28,
        }
    }

    /// Training rows, N.
    pub fn rows(self) -> usize {
        match self {
            Workload::MlpA => 569,
            Workload::MlpB => 320_000,
            Workload::Cnn => 10_000,
        }
    }

    /// Seed of the data (and of the initial parameters).
    pub fn seed(self) -> u64 {
        match self {
            Workload::MlpA => 1,
            Workload::MlpB => 2,
            Workload::Cnn => 3,
        }
    }

    /// Batch size B: exact for the plain step, expected for DP-SGD.
    pub fn batch_size(self) -> usize {
        match self {
            Workload::MlpA | Workload::Cnn => 64,
            Workload::MlpB => 256,
        }
    }

    /// DP-SGD steps per epoch, `ceil(N / B)`.
    pub fn steps_per_epoch(self) -> usize {
        self.rows().div_ceil(self.batch_size())
    }

    /// DP-SGD Poisson sampling rate, `q = 1 / ceil(N / B)`, so that an
    /// epoch of [`Workload::steps_per_epoch`] steps sees N rows in expectation.
    pub fn sample_rate(self) -> f64 {
        1.0 / self.steps_per_epoch() as f64
    }

    /// Plain-SGD steps per epoch: `floor(N / B)` shuffled batches of exactly B.
    pub fn plain_steps_per_epoch(self) -> usize {
        self.rows() / self.batch_size()
    }

    /// The layer stack, built by `models` from [`Workload::model`].
    pub fn architecture(self) -> Result<Architecture, LayoutError> {
        Architecture::new(&self.model(), self.input_dim())
    }

    /// The initial parameters: `models`' PyTorch-style initialisation from
    /// [`Workload::seed`].
    pub fn initial_params(self) -> Result<Vec<f32>, LayoutError> {
        Ok(self.architecture()?.init_params(self.seed()))
    }

    /// The workload's N rows (see [`crate::data`]).
    pub fn dataset(self) -> Dataset {
        Dataset::generate(self.seed(), self.rows(), self.input_dim())
    }

    /// Opacus' throughput on this workload, from
    /// `shared/fixtures/reference-throughput.md`, which says where and how it
    /// was measured (see also `docs/perf-log.md`); not measured by this
    /// crate.
    pub fn opacus_reference(self) -> Reference {
        let (plain, dp) = match self {
            Workload::MlpA => (63_500.0, 11_600.0),
            Workload::MlpB => (161_000.0, 12_200.0),
            Workload::Cnn => (3_950.0, 1_800.0),
        };
        Reference { plain_examples_per_sec: plain, dp_examples_per_sec: dp }
    }
}

#[cfg(test)]
mod tests;
