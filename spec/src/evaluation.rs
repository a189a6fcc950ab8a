//! Held-out evaluation as it leaves a site: one histogram of the model's
//! scores by label, each cell noised, from which the coordinator derives
//! every metric.
//!
//! An exact AUC, accuracy or loss of a site's test split is a statistic of
//! patient records; a histogram of scores by label, in bins the job spec
//! fixes, has L2 sensitivity 1 (one record moves one cell by one), so one
//! Gaussian mechanism releases all of it and is charged once. Everything
//! else is post-processing, here, at the coordinator or by a reviewer:
//! the cells clamped at 0, then AUC, accuracy, binned log loss and Brier
//! score, calibration error, the noisy number of test records, and the
//! AUC's standard error from the known noise. Summing the sites' histograms gives pooled metrics, an AUC
//! over all sites' records at once, defined even where one site's test
//! split holds one class only.
//!
//! The score is the model's logit of the positive class; bin `i` of `B`
//! covers `[lo + i·w, lo + (i+1)·w)` with `w = (hi − lo) / B`, and the two
//! outer bins also take everything below `lo` and above `hi`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The score bins a job evaluates with (`[evaluation]` in its spec).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreBins {
    /// Number of bins.
    pub bins: usize,
    /// Lower edge of the first bin's finite part (logit).
    pub logit_min: f64,
    /// Upper edge of the last bin's finite part (logit).
    pub logit_max: f64,
}

impl ScoreBins {
    fn width(&self) -> f64 {
        (self.logit_max - self.logit_min) / self.bins as f64
    }

    /// The bin of a logit; NaN goes to the first bin.
    pub fn bin(&self, logit: f64) -> usize {
        let at = ((logit - self.logit_min) / self.width()).floor();
        if at.is_nan() || at < 0.0 { 0 } else { (at as usize).min(self.bins - 1) }
    }

    /// The logit a bin stands for: the middle of its finite part.
    pub fn center(&self, bin: usize) -> f64 {
        self.logit_min + (bin as f64 + 0.5) * self.width()
    }

    /// `(lower, upper)` edges of a bin's finite part.
    pub fn edges(&self, bin: usize) -> (f64, f64) {
        let w = self.width();
        (self.logit_min + bin as f64 * w, self.logit_min + (bin + 1) as f64 * w)
    }
}

/// A score × label histogram: counts of negatives and positives per bin.
/// Released, its cells are noised and may be negative.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Records of the negative class per bin.
    pub negatives: Vec<i64>,
    /// Records of the positive class per bin.
    pub positives: Vec<i64>,
}

impl Histogram {
    /// The exact histogram of `logits` (of the positive class) with `labels` (0 or 1).
    pub fn of(bins: &ScoreBins, logits: impl IntoIterator<Item = f64>, labels: &[u8]) -> Histogram {
        let mut h = Histogram { negatives: vec![0; bins.bins], positives: vec![0; bins.bins] };
        for (z, &y) in logits.into_iter().zip(labels) {
            let cell = if y == 1 { &mut h.positives } else { &mut h.negatives };
            cell[bins.bin(z)] += 1;
        }
        h
    }

    /// The cells as one vector, negatives first: what is noised.
    pub fn cells(&self) -> Vec<i64> {
        self.negatives.iter().chain(&self.positives).copied().collect()
    }

    /// The histogram of `cells` (as [`Histogram::cells`] lays them out).
    pub fn from_cells(cells: &[i64]) -> Histogram {
        let (negatives, positives) = cells.split_at(cells.len() / 2);
        Histogram { negatives: negatives.to_vec(), positives: positives.to_vec() }
    }

    /// The cell-wise sum of histograms of the same bins (a pooled one).
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Histogram>) -> Option<Histogram> {
        let mut all = all.into_iter();
        let mut total = all.next()?.clone();
        for h in all {
            if h.negatives.len() != total.negatives.len() || h.positives.len() != total.positives.len() {
                return None;
            }
            total.negatives.iter_mut().zip(&h.negatives).for_each(|(t, v)| *t += v);
            total.positives.iter_mut().zip(&h.positives).for_each(|(t, v)| *t += v);
        }
        Some(total)
    }

    /// Whether it has `bins` bins of each class.
    pub fn fits(&self, bins: &ScoreBins) -> bool {
        self.negatives.len() == bins.bins && self.positives.len() == bins.bins
    }

    /// Every metric derived from the histogram. `noise_variance` is the
    /// variance of each cell's noise (the sum over the sites pooled), for
    /// the AUC's standard error.
    pub fn metrics(&self, bins: &ScoreBins, noise_variance: f64) -> BTreeMap<String, f64> {
        // A count is not negative: noised cells are clamped at 0 first (the
        // projection onto histograms, post-processing like everything here).
        let neg: Vec<f64> = self.negatives.iter().map(|&v| v.max(0) as f64).collect();
        let pos: Vec<f64> = self.positives.iter().map(|&v| v.max(0) as f64).collect();
        let (n_neg, n_pos): (f64, f64) = (neg.iter().sum(), pos.iter().sum());
        let n = n_neg + n_pos;
        let mut m = BTreeMap::new();
        m.insert("examples".to_string(), n);
        m.insert("positives".to_string(), n_pos);
        if n <= 0.0 {
            return m;
        }
        if let Some((auc, se)) = auc(&neg, &pos, noise_variance) {
            m.insert("auc".to_string(), auc);
            m.insert("auc_se".to_string(), se);
        }
        let (mut correct, mut loss, mut brier, mut calibration) = (0.0, 0.0, 0.0, 0.0);
        for b in 0..bins.bins {
            let z = bins.center(b);
            let p = 1.0 / (1.0 + (-z).exp());
            // Accuracy at p = 0.5 (logit 0): a bin across 0 counts by the share of it on each side.
            let (lo, hi) = bins.edges(b);
            let above = if hi <= 0.0 {
                0.0
            } else if lo >= 0.0 {
                1.0
            } else {
                hi / (hi - lo)
            };
            correct += pos[b] * above + neg[b] * (1.0 - above);
            loss += pos[b] * softplus(-z) + neg[b] * softplus(z);
            brier += pos[b] * (1.0 - p).powi(2) + neg[b] * p * p;
            calibration += (pos[b] - (pos[b] + neg[b]) * p).abs();
        }
        m.insert("accuracy".to_string(), (correct / n).clamp(0.0, 1.0));
        m.insert("loss".to_string(), (loss / n).max(0.0));
        m.insert("brier".to_string(), (brier / n).clamp(0.0, 1.0));
        m.insert("calibration_error".to_string(), (calibration / n).max(0.0));
        m
    }
}

/// ln(1 + e^x), without overflow.
fn softplus(x: f64) -> f64 {
    if x > 30.0 { x } else { x.exp().ln_1p() }
}

/// The AUC of a binned score distribution, ties within a bin counted half
/// (the trapezoidal ROC through the bin edges), and its standard error
/// under independent noise of `variance` per cell (delta method; an upper
/// bound where cells are nearly empty, since their clamped noise is
/// smaller); `None` when either class is empty.
fn auc(neg: &[f64], pos: &[f64], variance: f64) -> Option<(f64, f64)> {
    let (n_neg, n_pos): (f64, f64) = (neg.iter().sum(), pos.iter().sum());
    if n_neg <= 0.0 || n_pos <= 0.0 {
        return None;
    }
    // U = Σ_b pos_b (N_<b + neg_b / 2); AUC = U / (P·N).
    let mut below = 0.0;
    let mut u = 0.0;
    for (p, q) in pos.iter().zip(neg) {
        u += p * (below + q / 2.0);
        below += q;
    }
    let auc = u / (n_pos * n_neg);
    // ∂AUC/∂pos_b = (N_<b + neg_b/2)/(PN) − AUC/P; ∂AUC/∂neg_b = (P_>b + pos_b/2)/(PN) − AUC/N.
    let (mut neg_below, mut pos_above) = (0.0, n_pos);
    let mut sum_sq = 0.0;
    for (p, q) in pos.iter().zip(neg) {
        pos_above -= p;
        let d_pos = (neg_below + q / 2.0) / (n_pos * n_neg) - auc / n_pos;
        let d_neg = (pos_above + p / 2.0) / (n_pos * n_neg) - auc / n_neg;
        sum_sq += d_pos * d_pos + d_neg * d_neg;
        neg_below += q;
    }
    Some((auc.clamp(0.0, 1.0), (sum_sq * variance).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BINS: ScoreBins = ScoreBins { bins: 24, logit_min: -6.0, logit_max: 6.0 };

    #[test]
    fn bins_cover_the_line_and_their_edges() {
        assert_eq!(BINS.bin(-100.0), 0);
        assert_eq!(BINS.bin(-6.0), 0);
        assert_eq!(BINS.bin(-5.51), 0);
        assert_eq!(BINS.bin(-5.5), 1);
        assert_eq!(BINS.bin(0.0), 12);
        assert_eq!(BINS.bin(5.99), 23);
        assert_eq!(BINS.bin(1e9), 23);
        assert_eq!(BINS.bin(f64::NAN), 0);
        assert_eq!(BINS.edges(12), (0.0, 0.5));
        assert_eq!(BINS.center(12), 0.25);
    }

    #[test]
    fn exact_histograms_give_the_rank_auc_and_the_threshold_accuracy() {
        // Scores in distinct bins: the binned AUC is the exact one.
        let logits = [-3.0, -1.2, 0.3, 2.2, -0.7, 4.1];
        let labels = [0, 0, 0, 1, 1, 1];
        let h = Histogram::of(&BINS, logits, &labels);
        let m = h.metrics(&BINS, 0.0);
        // 9 pairs: the positive at -0.7 is below one negative (0.3): 8/9.
        assert!((m["auc"] - 8.0 / 9.0).abs() < 1e-12, "{m:?}");
        assert_eq!(m["auc_se"], 0.0);
        // p >= 0.5 predicts positive: 0.3 wrong, -0.7 wrong, the rest right.
        assert!((m["accuracy"] - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!((m["examples"], m["positives"]), (6.0, 3.0));
        // One class only: no AUC, the other metrics still.
        let one = Histogram::of(&BINS, [1.0, 2.0], &[1, 1]);
        let m = one.metrics(&BINS, 0.0);
        assert!(!m.contains_key("auc") && m.contains_key("accuracy"));
    }

    #[test]
    fn pooled_auc_is_over_all_records_not_a_mean_of_sites() {
        // Site a has only negatives, site b mostly positives: a's AUC is
        // undefined, the pooled one is over every pair.
        let a = Histogram::of(&BINS, [-2.0, -1.0], &[0, 0]);
        let b = Histogram::of(&BINS, [-1.5, 1.0, 2.0], &[0, 1, 1]);
        let pooled = Histogram::sum([&a, &b]).unwrap();
        let all = Histogram::of(&BINS, [-2.0, -1.0, -1.5, 1.0, 2.0], &[0, 0, 0, 1, 1]);
        assert_eq!(pooled, all);
        assert_eq!(pooled.metrics(&BINS, 0.0)["auc"], 1.0);
        assert!(Histogram::sum([&a, &Histogram::default()]).is_none());
        assert_eq!(Histogram::from_cells(&pooled.cells()), pooled);
    }

    #[test]
    fn the_standard_error_matches_the_spread_under_noise() {
        // 2,000 records, AUC about 0.8; noise σ = 5 per cell.
        let mut state = 7u64;
        let mut uniform = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut normal = || {
            let (u, v) = (uniform().max(1e-12), uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        };
        let labels: Vec<u8> = (0..2000).map(|i| u8::from(i % 4 == 0)).collect();
        let logits: Vec<f64> = labels.iter().map(|&y| normal() * 1.2 + if y == 1 { 0.5 } else { -1.5 }).collect();
        let exact = Histogram::of(&BINS, logits.iter().copied(), &labels);
        let se = exact.metrics(&BINS, 25.0)["auc_se"];
        let draws: Vec<f64> = (0..400)
            .map(|_| {
                let noisy: Vec<i64> = exact.cells().iter().map(|&c| c + (normal() * 5.0).round() as i64).collect();
                Histogram::from_cells(&noisy).metrics(&BINS, 25.0)["auc"]
            })
            .collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let sd = (draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (draws.len() - 1) as f64).sqrt();
        // Conservative: clamping shrinks the noise of nearly empty tail cells,
        // which the delta method counts in full.
        assert!(sd / se > 0.5 && sd / se < 1.1, "spread {sd} vs standard error {se}");
        assert!((mean - exact.metrics(&BINS, 0.0)["auc"]).abs() < 3.0 * se, "{mean}");
    }

    #[test]
    fn binned_loss_and_calibration_follow_the_bin_centres() {
        let bins = ScoreBins { bins: 4, logit_min: -2.0, logit_max: 2.0 };
        // Every record at a bin centre: the binned loss is the exact one.
        let logits = [-1.5, -0.5, 0.5, 1.5];
        let labels = [0, 1, 0, 1];
        let m = Histogram::of(&bins, logits, &labels).metrics(&bins, 0.0);
        let exact: f64 =
            logits.iter().zip(labels).map(|(&z, y)| if y == 1 { softplus(-z) } else { softplus(z) }).sum::<f64>() / 4.0;
        assert!((m["loss"] - exact).abs() < 1e-12);
        assert!(m["calibration_error"] > 0.0 && m["brier"] > 0.0);
    }
}
