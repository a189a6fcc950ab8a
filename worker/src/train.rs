//! Local DP-SGD and held-out evaluation, run off the async threads.
//!
//! One round at a site: `steps = ceil(local_epochs / q)` steps with
//! `q = batch_size / Ñ`, where Ñ is the dataset's *released* training-set
//! size ([`meridian_spec::job::SitePlan`]); each step Poisson-samples every
//! training row with probability `q` (`meridian_privacy::PoissonSampler`) (so batch sizes vary, as the
//! accountant assumes), clips each example's gradient to norm C (exactly,
//! see `models`), adds N(0, σ²C²) to the sum, divides by the expected batch
//! size `qÑ` (Opacus' semantics, with a public denominator) and takes an
//! SGD step. Only the noised result ever leaves the site.

use std::collections::BTreeMap;

use burn::tensor::Device;
use meridian_models::{Architecture, Network};
use meridian_privacy::PoissonSampler;
use meridian_privacy::noise::PrefetchedNoise;
use meridian_spec::evaluation::{Histogram, ScoreBins};
use meridian_spec::job::{JobSpec, SitePlan};
use tokio_util::sync::CancellationToken;

use crate::dataset::EncodedDataset;

/// Why local training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The pulled model does not fit the job's architecture.
    #[error("model: {0}")]
    Layout(#[from] meridian_models::LayoutError),
    /// No secure randomness.
    #[error("randomness: {0}")]
    Random(String),
    /// Training produced a non-finite parameter (diverged).
    #[error("training diverged at step {step}: a parameter became {value}")]
    Diverged {
        /// The step.
        step: u64,
        /// The bad value.
        value: f32,
    },
}

/// The result of one local round.
pub struct RoundOutcome {
    /// Local parameters after training.
    pub params: Vec<f32>,
    /// Steps taken.
    pub steps: u64,
    /// Sampling rate used.
    pub sample_rate: f64,
    /// Examples clipped at each step: exact, so they stay here unless
    /// released with noise (`privacy.clip_count_noise`).
    pub clipped_per_step: Vec<u64>,
    /// Exact aggregate training metrics, which leave only under a policy
    /// that releases exact metrics.
    pub exact_metrics: BTreeMap<String, f64>,
}

/// Runs one round of DP-SGD from `global`, as `plan` says.
pub fn train_round(
    arch: &Architecture,
    device: &Device,
    global: &[f32],
    data: &EncodedDataset,
    spec: &JobSpec,
    plan: &SitePlan,
    cancel: &CancellationToken,
) -> Result<RoundOutcome, TrainError> {
    arch.layout().check(global)?;
    let n = data.n_train();
    let d = data.dim;
    let (q, steps) = (plan.sample_rate, plan.steps_per_round);
    let clip = spec.privacy.clip_norm;
    let noise_std = spec.privacy.noise_multiplier * clip;
    let expected_batch = plan.expected_batch;
    let lr = spec.training.learning_rate;
    // Each step's noise is drawn on a second thread while the step before computes.
    let mut noise = PrefetchedNoise::new(global.len()).map_err(|e| TrainError::Random(e.to_string()))?;
    let mut sampler = PoissonSampler::new(q).map_err(|e| TrainError::Random(e.to_string()))?;
    let mut params = global.to_vec();
    let (mut loss_sum, mut seen, mut correct, mut clipped) = (0.0f64, 0usize, 0usize, 0usize);
    let mut clipped_per_step = Vec::with_capacity(steps as usize);
    let mut bx = Vec::new();
    let mut by = Vec::new();
    for step in 0..steps {
        if cancel.is_cancelled() {
            return Err(TrainError::Cancelled);
        }
        bx.clear();
        by.clear();
        sampler.sample(n, |i| {
            bx.extend_from_slice(&data.train_x[i * d..(i + 1) * d]);
            by.push(data.train_y[i]);
        });
        let net = Network::new(arch, &params, device)?;
        let mut grads = net.clipped_gradient_sum(&bx, &by, clip);
        loss_sum += grads.loss_sum;
        seen += by.len();
        correct += grads.correct;
        clipped += grads.clipped;
        clipped_per_step.push(grads.clipped as u64);
        noise.add_gaussian_noise(&mut grads.sum, noise_std).map_err(|e| TrainError::Random(e.to_string()))?;
        let scale = (lr / expected_batch) as f32;
        for (p, g) in params.iter_mut().zip(&grads.sum) {
            *p -= scale * g;
        }
        if let Some(bad) = params.iter().find(|v| !v.is_finite()) {
            return Err(TrainError::Diverged { step, value: *bad });
        }
    }
    let mut exact_metrics = BTreeMap::new();
    let seen_f = seen.max(1) as f64;
    exact_metrics.insert("train_loss".to_string(), loss_sum / seen_f);
    exact_metrics.insert("train_accuracy".to_string(), correct as f64 / seen_f);
    exact_metrics.insert("clipped_fraction".to_string(), clipped as f64 / seen_f);
    exact_metrics.insert("examples_seen".to_string(), seen as f64);
    Ok(RoundOutcome { params, steps, sample_rate: q, clipped_per_step, exact_metrics })
}

/// A held-out evaluation before anything is released: the exact score ×
/// label histogram of the test split, and the exact metrics.
pub struct Evaluation {
    /// What is noised and released.
    pub histogram: Histogram,
    /// Loss, accuracy, AUC and the test-set size, exact: these leave only
    /// under a policy that releases exact metrics.
    pub exact_metrics: BTreeMap<String, f64>,
}

/// Evaluates `params` on the held-out split in the job's score bins.
pub fn evaluate(
    arch: &Architecture,
    device: &Device,
    params: &[f32],
    data: &EncodedDataset,
    bins: &ScoreBins,
) -> Result<Evaluation, TrainError> {
    let net = Network::new(arch, params, device)?;
    let logits = net.positive_logits(&data.test_x);
    let probs: Vec<f32> = logits.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
    let mut exact_metrics = metrics(&probs, &data.test_y);
    exact_metrics.insert("examples".to_string(), data.n_test() as f64);
    Ok(Evaluation { histogram: Histogram::of(bins, logits.iter().map(|&z| f64::from(z)), &data.test_y), exact_metrics })
}

/// Binary classification metrics from probabilities of class 1.
pub fn metrics(probs: &[f32], labels: &[u8]) -> BTreeMap<String, f64> {
    let n = labels.len().max(1) as f64;
    let mut loss = 0.0;
    let mut correct = 0usize;
    for (&p, &y) in probs.iter().zip(labels) {
        let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
        loss -= if y == 1 { p.ln() } else { (1.0 - p).ln() };
        if (p >= 0.5) == (y == 1) {
            correct += 1;
        }
    }
    let mut m = BTreeMap::new();
    m.insert("loss".to_string(), loss / n);
    m.insert("accuracy".to_string(), correct as f64 / n);
    if let Some(auc) = roc_auc(probs, labels) {
        m.insert("auc".to_string(), auc);
    }
    m
}

/// ROC AUC by the rank-sum (Mann–Whitney) formula, ties counted half;
/// `None` when one class is absent.
pub fn roc_auc(scores: &[f32], labels: &[u8]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len().min(labels.len())).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = order.iter().filter(|&&i| labels[i] == 1).count() as f64;
    let negatives = order.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let mean_rank = (start + end + 1) as f64 / 2.0; // ranks are 1-based
        rank_sum += mean_rank * order[start..end].iter().filter(|&&i| labels[i] == 1).count() as f64;
        start = end;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_known_rankings() {
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &[0, 0, 1, 1]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &[0, 0, 1, 1]), Some(0.0));
        assert_eq!(roc_auc(&[0.5, 0.5, 0.5, 0.5], &[0, 1, 0, 1]), Some(0.5));
        // one inversion out of 4 pairs
        assert_eq!(roc_auc(&[0.1, 0.6, 0.5, 0.9], &[0, 0, 1, 1]), Some(0.75));
        assert_eq!(roc_auc(&[0.1, 0.2], &[1, 1]), None);
    }
}
