//! The worker's own round, `meridian_worker::train::train_round`, on a workload: a
//! cross-check that [`crate::DpSgd`] times what a site actually runs.
//!
//! The round takes `q = B / N` (not the workloads' `1 / ceil(N / B)`) and
//! `ceil(1 / q)` steps for one local epoch, and does not report how many
//! examples its batches held; its throughput is counted with the expected
//! `q · N` examples per step. For MLP-B both rules give q = 1/1250; for
//! MLP-A and CNN they differ by 1.2 % and 0.5 %.

use burn::tensor::Device;
use meridian_models::Architecture;
use meridian_spec::job::JobSpec;
use meridian_worker::dataset::EncodedDataset;
use meridian_worker::train::train_round;
use tokio_util::sync::CancellationToken;

use crate::data::Dataset;
use crate::sgd::StepError;
use crate::workload::{CLIP_NORM, LEARNING_RATE, NOISE_MULTIPLIER, Workload};

/// A site training a workload round after round, each round one local
/// epoch from the previous round's parameters.
pub struct WorkerRound {
    arch: Architecture,
    device: Device,
    spec: JobSpec,
    data: EncodedDataset,
    params: Vec<f32>,
    cancel: CancellationToken,
}

impl WorkerRound {
    /// The workload as a job and an encoded dataset (all rows for training).
    pub fn new(workload: Workload, data: &Dataset, device: &Device) -> Result<WorkerRound, StepError> {
        let arch = workload.architecture()?;
        let params = arch.init_params(workload.seed());
        Ok(WorkerRound {
            arch,
            device: device.clone(),
            spec: job_spec(workload)?,
            data: EncodedDataset {
                dim: data.dim,
                train_x: data.x.clone(),
                train_y: data.y.clone(),
                test_x: Vec::new(),
                test_y: Vec::new(),
                encoded_names: (0..data.dim).map(|j| format!("x{j}")).collect(),
                standardisation: vec![(0.0, 1.0); data.dim],
            },
            params,
            cancel: CancellationToken::new(),
        })
    }

    /// The job's plan at a site whose released training-set size is exact
    /// (the bench measures training, not the release).
    fn site_plan(&self) -> meridian_spec::job::SitePlan {
        self.spec.site_plan(self.data.n_train() as u64)
    }

    /// Steps of one round and the examples they take in expectation.
    pub fn plan(&self) -> (u64, f64) {
        let plan = self.site_plan();
        (plan.steps_per_round, plan.steps_per_round as f64 * plan.expected_batch)
    }

    /// One round (one local epoch); returns the steps taken.
    pub fn run(&mut self) -> Result<u64, StepError> {
        let outcome = train_round(
            &self.arch,
            &self.device,
            &self.params,
            &self.data,
            &self.spec,
            &self.site_plan(),
            &self.cancel,
        )
        .map_err(|e| StepError::Round(e.to_string()))?;
        self.params = outcome.params;
        Ok(outcome.steps)
    }
}

/// The job a data scientist would submit for `workload`: its model, D
/// numeric features, one local epoch at batch size B, σ, C and the learning
/// rate of the workloads. Written as TOML and parsed by `proto`, so the
/// spec is validated as a submitted one is.
pub fn job_spec(workload: Workload) -> Result<JobSpec, StepError> {
    let model = match workload.model() {
        meridian_spec::job::ModelSpec::Mlp { hidden } => format!("kind = \"mlp\"\nhidden = {hidden:?}"),
        meridian_spec::job::ModelSpec::Cnn { image_side } => {
            format!("kind = \"cnn\"\nimage_side = {image_side}")
        }
        meridian_spec::job::ModelSpec::LogisticRegression => "kind = \"logistic_regression\"".into(),
    };
    let numeric: Vec<String> = (0..workload.input_dim()).map(|j| format!("\"x{j}\"")).collect();
    let toml = format!(
        "name = \"bench-{key}\"\ndataset = \"synthetic-{key}\"\n\n[model]\n{model}\n\n\
         [features]\nlabel = \"y\"\npositive_label = \"1\"\nnegative_labels = [\"0\"]\nnumeric = [{numeric}]\n\n\
         [training]\nrounds = 1\nlocal_epochs = 1.0\nbatch_size = {b}\nlearning_rate = {LEARNING_RATE:?}\n\n\
         [privacy]\nnoise_multiplier = {NOISE_MULTIPLIER:?}\nclip_norm = {CLIP_NORM:?}\ndelta = 1e-5\n",
        key = workload.key(),
        numeric = numeric.join(", "),
        b = workload.batch_size(),
    );
    JobSpec::from_toml(&toml, workload.key()).map_err(|e| StepError::Spec(e.to_string()))
}

#[cfg(test)]
mod tests;
